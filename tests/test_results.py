"""Results folders: save/load runs with an index, selection for the widgets, profiles, the gallery."""

import gzip
import json
from pathlib import Path

import pandas as pd
import pytest

from splitlab.config import RunConfig
from splitlab.present import results
from splitlab.errors import SplitlabError
from splitlab.measure.metrics import RequestTrace, Run, StepTrace, load_run
from splitlab.measure.profile import Ceilings
from splitlab.present.results import (load_profile, load_results, nearest, recorded, run_label, save_profile, save_runs, select_runs)


def make_run(mode, rate, share=None, backend=None, tpot=0.1):
    """Two requests arriving at 0 and 0.5 s; each 3 tokens, first at +0.2 s, then every ``tpot``."""
    traces = []
    for i, arrival in enumerate((0.0, 0.5)):
        first = arrival + 0.2
        traces.append(RequestTrace(i, arrival, 4, 3, arrival + 0.05, first, [first, first + tpot, first + 2 * tpot],
                                   [1, 2, 3], "w"))
    config = RunConfig(mode=mode, backend=backend, rate=rate, num_requests=2, prefill_share=share,
                       decode_share=None if share is None else 100 - share)
    return Run(mode=mode, model="tiny", workload=f"poisson-r{rate:g}-n2", config=config,
               env={"gpu_name": "NVIDIA H200", "device": "cuda"}, traces=traces,
               steps=[StepTrace("w", "prefill", 0.05, 0.2, [0], 4)])


def sweep():
    return [make_run("serial", 1.0), make_run("serial", 2.0), make_run("split", 1.0, 30, "mps"),
            make_run("split", 1.0, 50, "mps", tpot=0.05), make_run("split", 2.0, 50, "mps"),
            make_run("chunked", 2.0)]


def test_run_label_and_meta():
    run = make_run("split", 2.0, 40, "mps")
    meta = results.run_meta(run)
    assert meta["rate"] == 2.0 and meta["prefill_share"] == 40 and meta["decode_share"] == 60
    assert meta["backend"] == "mps" and meta["gpu"] == "NVIDIA H200"
    assert run_label(run) == "split mps 40/60"
    assert run_label(make_run("serial", 1.0)) == "serial"
    replicas = Run(mode="replicas", model="m", workload="w", config=RunConfig(mode="replicas", replicas=4, rate=0.5),
                   env={"device": "cpu"}, traces=[])
    meta = results.run_meta(replicas)
    assert meta["rate"] == 0.5 and meta["replicas"] == 4 and meta["gpu"] == "cpu"
    assert meta["label"] == "replicas x4"
    # the fields are read, not guessed: a workload name alone says nothing about the rate
    assert results.run_meta(Run("serial", "m", "poisson-r2-n8", RunConfig(mode="serial"), {}, []))["rate"] is None


def test_an_old_untyped_run_config_is_converted_once():
    """Runs of format splitlab.run/1 held a dict whose keys depended on the mode; it becomes a
    RunConfig when the run is made (their workload names carried the rate)."""
    old = Run(mode="split", model="m", workload="poisson-r21.2-n160", env={}, traces=[],
              config={"mode": "split", "backend": "mps", "prefill_share": 60, "decode_share": 40,
                      "split": {"backend": "mps", "prefill_share": 60, "decode_share": 40}, "max_batch": 64,
                      "chunk_size": 2048, "mps": {"pipe_dir": "/tmp/x", "workers_are_clients": {"prefill": True}},
                      "effective": {"num_slots": 64}, "session_run": 2, "slo": {"ttft_s": 2.0}})
    cfg = old.config
    assert isinstance(cfg, RunConfig) and (cfg.backend, cfg.prefill_share, cfg.rate) == ("mps", 60, 21.2)
    assert cfg.split.decode_share == 40 and cfg.engine.chunk_size == 2048 and cfg.mps is True
    assert cfg.mps_daemon["workers_are_clients"] == {"prefill": True} and cfg.slo.ttft_s == 2.0
    assert (cfg.effective, cfg.session_run, cfg.extra) == ({"num_slots": 64}, 2, {})
    replicas = Run(mode="replicas", model="m", workload="check", env={}, traces=[],
                   config={"mode": "replicas", "replicas": 2, "engine": "serial", "mps": False, "device": "cuda",
                           "per_replica": [{"num_slots": 32}, {"num_slots": 32, "weights_shared": True}],
                           "assignment": "round-robin in arrival order"})
    cfg = replicas.config
    assert (cfg.replicas, cfg.replica_engine, cfg.mps, cfg.rate, cfg.effective) == (2, "serial", False, None,
                                                                                    {"device": "cuda"})
    assert cfg.workers["replica-1"]["weights_shared"] is True and cfg.extra == {"assignment": "round-robin in arrival order"}
    again = Run.from_dict(json.loads(json.dumps(replicas.to_dict())))
    assert again.config == cfg and again.to_dict()["format"] == "splitlab.run/2"


RECORDED = Path(__file__).resolve().parents[1] / "results"


@pytest.mark.parametrize("folder", ["colocation_h200", "colocation_h200_slots128"])
def test_recorded_runs_load_and_describe_themselves_as_their_index_does(folder):
    """The committed GPU runs (format splitlab.run/1, gzip JSON) load, and ``run_meta`` of each
    gives the entry the index was written with (the date aside: the index keeps its own)."""
    index = json.loads((RECORDED / folder / "index.json").read_text())
    table, runs = load_results(RECORDED / folder)
    assert len(runs) == len(index["runs"]) > 0
    for entry in index["runs"]:
        with gzip.open(RECORDED / folder / entry["file"], "rt") as f:
            assert json.load(f)["format"] == "splitlab.run/1"
        meta = results.run_meta(runs[entry["id"]])
        assert {k: v for k, v in meta.items() if k != "date"} == {k: entry[k] for k in meta if k != "date"}
    run = load_run(RECORDED / folder / index["runs"][0]["file"])
    assert Run.from_dict(json.loads(json.dumps(results.to_jsonable(run.to_dict())))).to_dict() == run.to_dict()


def test_save_and_load_results(tmp_path):
    runs = sweep()
    index_path = save_runs(runs, tmp_path)
    index = json.loads(index_path.read_text())
    assert index["format"] == "splitlab.results/1" and len(index["runs"]) == 6
    files = [e["file"] for e in index["runs"]]
    assert len(set(files)) == 6 and all((tmp_path / f).is_file() for f in files)
    entry = index["runs"][3]
    assert {k: entry[k] for k in ("mode", "backend", "model", "rate", "prefill_share", "decode_share", "gpu")} == {
        "mode": "split", "backend": "mps", "model": "tiny", "rate": 1.0, "prefill_share": 50.0,
        "decode_share": 50.0, "gpu": "NVIDIA H200"}
    assert entry["date"]
    table, loaded = load_results(tmp_path)
    assert len(table) == 6 and set(loaded) == set(table["id"])
    assert list(table.columns[:12]) == list(results.INDEX_COLUMNS)
    row = table.iloc[3]
    assert row["label"] == "split mps 50/50"
    assert row["tpot_p50_s"] == pytest.approx(0.05) and row["ttft_p50_s"] == pytest.approx(0.2)
    assert row["num_requests"] == 2 and row["output_tokens"] == 6
    original = runs[3]
    again = loaded[row["id"]]
    assert again.to_dict() == original.to_dict()
    # saving more runs keeps the index entries already there; auto names never collide
    save_runs([make_run("serial", 1.0)], tmp_path)
    assert len(load_results(tmp_path)[0]) == 7


def test_compressed_runs_round_trip(tmp_path):
    """``compress=True`` writes ``.json.gz`` files (byte-identical for the same run) that load
    back to the same runs, with or without the index."""
    runs = sweep()
    index = json.loads(save_runs(runs, tmp_path / "gz", compress=True).read_text())
    files = [e["file"] for e in index["runs"]]
    assert all(f.endswith(".json.gz") for f in files)
    raw = (tmp_path / "gz" / files[0]).read_bytes()
    assert raw[:2] == b"\x1f\x8b"  # gzip magic
    table, loaded = load_results(tmp_path / "gz")
    assert [loaded[i].to_dict() for i in table["id"]] == [r.to_dict() for r in runs]
    save_runs(runs[:1], tmp_path / "gz", compress=True)
    assert (tmp_path / "gz" / files[0]).read_bytes() == raw
    (tmp_path / "gz" / "index.json").unlink()
    table, _ = load_results(tmp_path / "gz")
    assert sorted(table["id"]) == sorted(f.split(".json")[0] for f in files)
    (tmp_path / "gz" / files[1]).write_bytes(b"not gzip")
    with pytest.raises(SplitlabError, match="not valid JSON"):
        load_results(tmp_path / "gz")


def test_load_recorded_says_where_a_result_came_from_or_how_to_make_it(tmp_path, capsys):
    (tmp_path / "bench.json").write_text(json.dumps({"gpu": "NVIDIA H200", "date": "2026-11-29", "command": "b.py",
                                                     "slo": {"ttft_s": 1.0}, "value": 3}))
    data = results.load_recorded("bench.json", "python b.py", show=("slo",), root=tmp_path)
    assert data["value"] == 3
    assert capsys.readouterr().out == "RECORDED on NVIDIA H200, 2026-11-29\ncommand: b.py\nslo: {'ttft_s': 1.0}\n"
    assert results.load_recorded("missing.json", "python b.py", root=tmp_path) is None
    assert "does not exist. It is written by `python b.py`" in capsys.readouterr().out
    (tmp_path / "list.json").write_text("[1, 2]")
    with pytest.raises(SplitlabError, match="rewrite it with `python b.py`"):
        results.load_recorded("list.json", "python b.py", root=tmp_path)


def test_load_without_index_and_errors(tmp_path):
    make_run("serial", 1.0).save(tmp_path / "a.json")
    (tmp_path / "notes.json").write_text('{"hello": 1}')
    table, runs = load_results(tmp_path)
    assert list(table["id"]) == ["a"] and table["mode"].iloc[0] == "serial"
    with pytest.raises(SplitlabError):
        load_results(tmp_path / "missing")
    (tmp_path / "index.json").write_text('{"format": "splitlab.results/1", "runs": [{"id": "b", "file": "b.json"}]}')
    with pytest.raises(SplitlabError, match="b.json"):
        load_results(tmp_path)


def test_select_runs_snaps_to_recorded_values(tmp_path):
    save_runs(sweep(), tmp_path)
    table, _ = load_results(tmp_path)
    got = select_runs(table, rate=1.2, share=45)  # nearest: rate 1, share 50; baselines without shares stay
    assert sorted(got["label"]) == ["serial", "split mps 50/50"]
    assert set(got["rate"]) == {1.0}
    got = select_runs(table, rate=1.9, share=0, mode="split")
    assert list(got["label"]) == ["split mps 50/50"] and list(got["rate"]) == [2.0]
    got = select_runs(table, rate=1.0, share=31, mode=["split"])
    assert list(got["prefill_share"]) == [30.0]
    assert len(select_runs(table)) == 6
    assert sorted(select_runs(table, mode=("serial", "chunked"))["mode"]) == ["chunked", "serial", "serial"]
    assert len(select_runs(table, rate=2.0, backend="mps")) == 1
    assert nearest([1.0, 2.0, 4.0], 3.0) == 2.0  # tie -> smaller
    assert nearest([1.0, float("nan")], 9) == 1.0 and nearest([], 1) is None
    assert results.choices(table, "rate") == [1.0, 2.0]


def test_profile_round_trip(tmp_path):
    ceil = Ceilings(device="cuda:0", device_name="NVIDIA H200", dtype="bfloat16", matmul_flops_s=663e12,
                    copy_bytes_s=4.2e12, matmul_n=8192, copy_buffer_bytes=1 << 30, repeats=7)
    df = pd.DataFrame([{"model": "m", "backend": "hf", "phase": "decode", "batch": 1, "tokens": 512,
                        "time_s": 0.004, "frac_of_roof": float("nan")}])
    path = save_profile(df, ceil, tmp_path / "p" / "profile_h200.json", command="python benchmarks/profile_sweep.py")
    raw = json.loads(path.read_text())
    assert raw["format"] == "splitlab.profile/1" and raw["gpu"] == "NVIDIA H200"
    assert raw["command"] == "python benchmarks/profile_sweep.py" and raw["versions"]["torch"]
    assert raw["table"][0]["frac_of_roof"] is None  # strict JSON
    prof = load_profile(path)
    assert prof.ceilings == ceil and prof.datasheet.name == "H200"
    assert prof.table["time_s"].iloc[0] == 0.004 and prof.meta["date"]
    records = save_profile(df.to_dict(orient="records"), ceil, tmp_path / "r.json", datasheet=None)
    assert load_profile(records).datasheet is None
    with pytest.raises(SplitlabError):
        load_profile(tmp_path / "nope.json")


def test_recorded_finds_profiles_and_run_folders(tmp_path, monkeypatch):
    ceil = Ceilings(device="cpu", device_name="cpu", dtype="float32", matmul_flops_s=1e11, copy_bytes_s=1e10,
                    matmul_n=64, copy_buffer_bytes=1024, repeats=1)
    save_profile([], ceil, tmp_path / "profile_x.json")
    save_runs([make_run("serial", 1.0)], tmp_path / "poisson_h200")
    (tmp_path / "empty").mkdir()
    assert recorded("profile", root=tmp_path) == [tmp_path / "profile_x.json"]
    assert recorded("runs", root=tmp_path) == [tmp_path / "poisson_h200"]
    monkeypatch.setenv("SPLITLAB_RESULTS", str(tmp_path))
    assert recorded("profile") == [tmp_path / "profile_x.json"]
    assert recorded("runs", root=tmp_path / "nothing-here") == []
    with pytest.raises(SplitlabError):
        recorded("plots")


def test_runs_in_memory_make_the_table_a_folder_would(tmp_path):
    runs = sweep()
    save_runs(runs, tmp_path, [f"r{i}" for i in range(len(runs))])
    from_folder, _ = load_results(tmp_path)
    in_memory, by_id = results.runs_table({f"r{i}": r for i, r in enumerate(runs)})
    assert list(by_id) == [f"r{i}" for i in range(len(runs))]
    shared = [c for c in from_folder.columns if c in in_memory.columns and c not in ("file", "date")]
    assert len(shared) > 10
    pd.testing.assert_frame_equal(from_folder[shared].reset_index(drop=True), in_memory[shared].reset_index(drop=True),
                                  check_dtype=False)
    listed, ids = results.runs_table(runs[:2])
    assert list(ids) == ["0", "1"] and len(listed) == 2
    with pytest.raises(SplitlabError, match="at least one Run"):
        results.runs_table([])

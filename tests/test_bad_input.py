"""Every bad input a new user can give is refused at the door with a SplitlabError that says
what to do: requests, lengths, builders, trace files, model specs and devices, configs and
saved-run files. Nothing here may hang, wait on a network or leave a half-written file."""

from __future__ import annotations

import gzip
import json
import os
import pickle
import time

import numpy as np
import pytest
import torch

from splitlab import workload as W
from splitlab.config import SLO, EngineConfig, SplitConfig
from splitlab.errors import ConfigError, DeviceError, ModelSpecError, RunFileError, SplitlabError, WorkloadError
from splitlab.measure.metrics import RequestTrace, Run, load_run
from splitlab.models import load_model
from splitlab.workload import LengthDist, Request, Workload, fixed_batch, from_azure_trace, from_prompts, poisson

HEADER = "TIMESTAMP,ContextTokens,GeneratedTokens\n"
NAN, INF = float("nan"), float("inf")


# ---- requests ------------------------------------------------------------------------------

@pytest.mark.parametrize("arrival", [NAN, INF, -INF, -1.0, "0.5", None, True])
def test_arrival_must_be_a_finite_time(arrival):
    with pytest.raises(WorkloadError, match=r"request 3: arrival_s must be a finite number"):
        Request(3, (5, 6), 2, arrival)


def test_an_arrival_beyond_a_week_is_refused():
    assert Request(0, (5,), 1, W.MAX_ARRIVAL_S).arrival_s == W.MAX_ARRIVAL_S
    with pytest.raises(WorkloadError, match="MAX_ARRIVAL_S = 604800"):
        Request(0, (5,), 1, W.MAX_ARRIVAL_S + 1)
    with pytest.raises(WorkloadError, match="raise the rate"):  # a rate in the wrong unit
        poisson(5, rate=1e-9, vocab_size=100)


@pytest.mark.parametrize("n", [True, False, np.bool_(True), 1.0, "3", W.MAX_TOKENS + 1])
def test_max_new_tokens_must_be_a_real_count(n):
    with pytest.raises(WorkloadError, match="max_new_tokens must be a positive integer"):
        Request(0, (5,), n)


@pytest.mark.parametrize("ids, position", [((5, 5.7), 1), ((True, 6), 0), ((5, "6"), 1), ((5, None), 1),
                                           (torch.tensor([5.0, 6.0]), 0)])
def test_token_ids_must_be_integers(ids, position):
    with pytest.raises(WorkloadError, match=f"token id at position {position} must be an integer"):
        Request(0, ids, 1)


def test_integer_like_values_are_accepted_as_python_ints():
    r = Request(np.int64(2), np.array([5, 6], dtype=np.int32), np.int64(3), np.float32(0.5))
    assert (r.id, r.prompt_ids, r.max_new_tokens, r.arrival_s) == (2, (5, 6), 3, 0.5)
    assert all(type(t) is int for t in r.prompt_ids) and type(r.max_new_tokens) is int
    assert Request(0, torch.tensor([7, 8]), 1).prompt_ids == (7, 8)


def test_request_ids_and_workload_contents():
    for rid in (-1, 1.0, "a", True):
        with pytest.raises(WorkloadError, match="request id"):
            Request(rid, (5,), 1)
    with pytest.raises(WorkloadError, match="must be a splitlab Request"):
        Workload("w", (Request(0, (5,), 1), (1, (5,), 1)))
    with pytest.raises(WorkloadError, match="sequence of Request"):
        Workload("w", 3)


def test_from_prompts_explains_a_flat_list():
    with pytest.raises(WorkloadError, match=r"each a list of ids \(\[\[5, 6, 7\]\]\)"):
        from_prompts([5, 6, 7], 3)
    with pytest.raises(WorkloadError, match="2 values for 1 prompts"):
        from_prompts([[5, 6]], [3, 4])
    with pytest.raises(WorkloadError, match="arrival_s"):
        from_prompts([[5]], 2, arrivals_s=[NAN])
    wl = from_prompts([[5, 6], [7]], np.int64(2), arrivals_s=np.array([0.0, 1.5]))
    assert [(r.max_new_tokens, r.arrival_s) for r in wl] == [(2, 0.0), (2, 1.5)]


# ---- lengths and builders ------------------------------------------------------------------

@pytest.mark.parametrize("make, message", [
    (lambda: LengthDist.lognormal(INF, 1), "mean must be a finite number"),
    (lambda: LengthDist.lognormal(100, NAN), "sigma must be a finite number"),
    (lambda: LengthDist.lognormal("100", 1), "mean must be a finite number"),
    (lambda: LengthDist.lognormal(100, 1e200), "sigma <= 10"),
    (lambda: LengthDist.uniform(1, W.MAX_TOKENS + 1), "MAX_TOKENS = 1048576"),
    (lambda: LengthDist.fixed(True), "positive integers"),
])
def test_length_parameters_must_be_finite_and_bounded(make, message):
    with pytest.raises(WorkloadError, match=message):
        make()


def test_wide_lognormal_draws_stay_inside_the_bounds():
    # a far-tail draw cast to int64 before clipping used to wrap to a negative length
    # (mean 1e22: nearly every draw is above 2**63 and must land on hi, not on lo)
    values = LengthDist.lognormal(1e22, 2, lo=3, hi=500).sample(np.random.default_rng(0), 5000)
    assert values.min() >= 3 and (values == 500).mean() > 0.95


def test_request_counts_are_bounded_before_anything_is_built():
    start = time.perf_counter()
    for build in (lambda: poisson(10_000_000, 1.0, vocab_size=100), lambda: fixed_batch(W.MAX_REQUESTS + 1, 4, 4, vocab_size=100),
                  lambda: W.poisson_arrivals(10_000_000, 1.0)):
        with pytest.raises(WorkloadError, match=f"MAX_REQUESTS = {W.MAX_REQUESTS}"):
            build()
    assert time.perf_counter() - start < 1.0


def test_total_prompt_tokens_are_bounded():
    with pytest.raises(WorkloadError, match=f"MAX_WORKLOAD_TOKENS = {W.MAX_WORKLOAD_TOKENS}"):
        fixed_batch(1000, 100_000, 1, vocab_size=100)


@pytest.mark.parametrize("seed", [-1, True, 1.5, "0"])
def test_seed_must_be_a_non_negative_integer(seed):
    with pytest.raises(WorkloadError, match="seed"):
        fixed_batch(2, 4, 4, vocab_size=100, seed=seed)


def test_rates_refuse_bools_and_accept_numpy_numbers():
    with pytest.raises(WorkloadError, match="rate"):
        poisson(3, rate=True, vocab_size=100)
    assert len(poisson(3, rate=np.int64(2), vocab_size=100)) == 3
    with pytest.raises(WorkloadError, match="vocab_size"):
        fixed_batch(2, 4, 4, vocab_size=2.5e4)


# ---- trace files ---------------------------------------------------------------------------

def _trace(tmp_path, body):
    path = tmp_path / "trace.csv"
    path.write_text(HEADER + body)
    return path


@pytest.mark.parametrize("body, row, column", [
    ("2023-11-16 18:17:03,inf,5\n", 1, "ContextTokens"),
    ("2023-11-16 18:17:03,10,5\n2023-11-16 18:17:04,10,NaN\n", 2, "GeneratedTokens"),
    ("2023-11-16 18:17:03,10,5\n2023-11-16 18:17:04,1e30,5\n", 2, "ContextTokens"),  # was a 1-token prompt
    ("2023-11-16 18:17:03,9223372036854775808,5\n", 1, "ContextTokens"),
    ("2023-11-16 18:17:03,10,-7\n", 1, "GeneratedTokens"),
    (f"2023-11-16 18:17:03,{W.MAX_TOKENS + 1},5\n", 1, "ContextTokens"),
])
def test_trace_counts_that_are_not_counts_name_the_row(tmp_path, body, row, column):
    with pytest.raises(WorkloadError, match=rf"row {row} \(line {row + 1}\): {column} must be a non-negative "
                                            rf"integer of at most MAX_TOKENS"):
        from_azure_trace(_trace(tmp_path, body), vocab_size=100)


def test_trace_timestamps_with_utc_offsets_are_instants(tmp_path):
    path = _trace(tmp_path, "2023-11-16 18:17:03.5+00:00,10,5\n2023-11-16 20:17:04+02:00,10,5\n"
                            "2023-11-16T17:17:05-01:00,10,5\n")
    wl = from_azure_trace(path, vocab_size=100)
    assert [r.arrival_s for r in sorted(wl, key=lambda r: r.id)] == pytest.approx([0.0, 0.5, 1.5])


def test_trace_mixing_zoned_and_local_timestamps_is_refused(tmp_path):
    path = _trace(tmp_path, "2023-11-16 18:17:03,10,5\n2023-11-16 18:17:04,10,5\n2023-11-16 18:17:05+02:00,10,5\n")
    with pytest.raises(WorkloadError, match=r"row 3 \(line 4\): TIMESTAMP has a time zone but row 1"):
        from_azure_trace(path, vocab_size=100)


@pytest.mark.parametrize("stamp", ["2023-13-45 99:00", "yesterday", "", "12:00:00:00"])
def test_unparsable_trace_timestamps_name_the_row(tmp_path, stamp):
    path = _trace(tmp_path, f"2023-11-16 18:17:03,10,5\n{stamp},10,5\n")
    with pytest.raises(WorkloadError, match=r"row 2 \(line 3\): TIMESTAMP is not a date-time"):
        from_azure_trace(path, vocab_size=100)


def test_a_trace_spanning_years_names_the_row_and_rate_scale_fixes_it(tmp_path):
    path = _trace(tmp_path, "2023-11-16 18:17:03,10,5\n2021-11-16 18:17:03,10,5\n")
    with pytest.raises(WorkloadError, match=r"row 1 \(line 2\).*MAX_ARRIVAL_S.*earliest TIMESTAMP, row 2"):
        from_azure_trace(path, vocab_size=100)
    fast = from_azure_trace(path, vocab_size=100, rate_scale=1e4)
    assert max(r.arrival_s for r in fast) == pytest.approx(2 * 365 * 86400 / 1e4, rel=0.01)


def test_a_trace_longer_than_the_bound_needs_a_limit(tmp_path, monkeypatch):
    monkeypatch.setattr(W, "MAX_REQUESTS", 5)
    path = _trace(tmp_path, "".join(f"2023-11-16 18:17:{i:02d},10,5\n" for i in range(7)))
    with pytest.raises(WorkloadError, match="more than MAX_REQUESTS = 5 rows; replay its first rows with limit"):
        from_azure_trace(path, vocab_size=100)
    assert len(from_azure_trace(path, vocab_size=100, limit=5)) == 5
    with pytest.raises(WorkloadError, match="limit is 6"):
        from_azure_trace(path, vocab_size=100, limit=6)


# ---- models and devices --------------------------------------------------------------------

@pytest.mark.parametrize("device", ["tpu", "mps", "cuda:x", 0, "gpu"])
def test_unknown_devices_list_the_accepted_ones(device):
    with pytest.raises(DeviceError, match=r"unknown device .*accepted: 'cpu', 'cuda', 'cuda:N'"):
        load_model("tiny", device=device)


def test_a_gpu_that_is_not_there():
    if torch.cuda.is_available():
        missing = f"cuda:{torch.cuda.device_count()}"
        with pytest.raises(DeviceError, match=f"{missing}' does not exist"):
            load_model("tiny", device=missing)
    else:
        for device in ("cuda", "cuda:0", torch.device("cuda")):
            with pytest.raises(DeviceError, match="no CUDA GPU is visible; use device='cpu'"):
                load_model("tiny", device=device)


@pytest.fixture
def no_from_pretrained(monkeypatch):
    """Fail the test if a spec reaches transformers (where it would retry the hub)."""
    import transformers

    def refuse(*args, **kwargs):
        raise AssertionError("from_pretrained was called")

    for cls in (transformers.AutoModelForCausalLM, transformers.AutoTokenizer):
        monkeypatch.setattr(cls, "from_pretrained", refuse)


@pytest.mark.parametrize("spec, close", [("smollm2", "smollm2-135m"), ("tiny2", "tiny"), ("Tiny", "tiny"),
                                         ("llama-3.1-8b", "dummy:llama-3.1-8b")])
def test_a_mistyped_spec_suggests_the_close_name(no_from_pretrained, spec, close):
    start = time.perf_counter()
    with pytest.raises(ModelSpecError, match=f"unknown model '{spec}'; did you mean '{close}'"):
        load_model(spec, device="cpu")
    assert time.perf_counter() - start < 5


def test_a_mistyped_dummy_arch_suggests_and_lists():
    with pytest.raises(ModelSpecError, match=r"did you mean 'dummy:llama-3.1-8b'\? accepted: dummy:llama-3.1-8b, "):
        load_model("dummy:llama-3.1-8", device="meta")
    with pytest.raises(ModelSpecError) as info:
        load_model("dummy:zzz", device="meta")
    assert "did you mean" not in str(info.value) and "dummy:opt-125m" in str(info.value)


def test_offline_an_uncached_hub_id_fails_at_once(no_from_pretrained, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelSpecError, match="not in the Hugging Face cache, and the hub is off"):
        load_model("someorg/not-cached-here", device="cpu")


def test_without_network_an_uncached_hub_id_fails_at_once(no_from_pretrained, monkeypatch):
    import socket

    from huggingface_hub import constants

    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    calls = []

    def no_route(address, timeout=None):
        calls.append(address)
        raise OSError("Network is unreachable")

    monkeypatch.setattr(socket, "create_connection", no_route)
    with pytest.raises(ModelSpecError, match=r"the hub \(https://huggingface.co\) cannot be reached"):
        load_model("someorg/not-cached-here", device="cpu")
    assert calls == [("huggingface.co", 443)]


def test_a_cached_hub_id_loads_offline(tiny, tmp_path, monkeypatch):
    from huggingface_hub import constants

    snapshot = tmp_path / "models--someorg--tiny-copy" / "snapshots" / ("a" * 40)
    tiny.model.save_pretrained(snapshot)
    tiny.tokenizer.save_pretrained(snapshot)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("a" * 40)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    loaded = load_model("someorg/tiny-copy", device="cpu", dtype="float32")
    assert loaded.facts == tiny.facts


def test_bad_seed_and_dtype():
    with pytest.raises(ConfigError, match="seed must be a non-negative integer"):
        load_model("tiny", device="cpu", seed=-1)
    with pytest.raises(ModelSpecError, match="unknown dtype torch.int8"):
        load_model("tiny", device="cpu", dtype=torch.int8)


# ---- configs -------------------------------------------------------------------------------

@pytest.mark.parametrize("cls", [EngineConfig, SplitConfig, SLO])
def test_unknown_config_keywords_are_config_errors(cls):
    with pytest.raises(ConfigError, match=rf"{cls.__name__} got unknown key\(s\) \['foo'\]; accepted keys: \["):
        cls(foo=1)
    with pytest.raises(ConfigError, match="unknown key"):
        cls.from_dict({"foo": 1})
    with pytest.raises(ConfigError, match="needs a mapping"):
        cls.from_dict(["foo"])


def test_config_positional_mistakes_are_config_errors():
    with pytest.raises(ConfigError, match="both by position and by name"):
        SLO(1.0, ttft_s=2.0)
    too_many = len([f for f in EngineConfig.__dataclass_fields__.values() if f.init]) + 1
    with pytest.raises(ConfigError, match="positional values"):
        EngineConfig(*range(too_many))


def test_configs_still_copy_pickle_and_replace():
    cfg = EngineConfig(max_batch=8, chunk_size=64)
    assert pickle.loads(pickle.dumps(cfg)) == cfg
    assert cfg.replace(max_batch=4).max_batch == 4
    with pytest.raises(ConfigError, match="unknown key"):
        cfg.replace(max_batchh=4)


# ---- saved runs ----------------------------------------------------------------------------

def _run() -> Run:
    return Run("hand", "none", "w", {}, {}, [RequestTrace(0, 0.0, 3, 2, 0.0, 0.1, [0.1, 0.2], [5, 6])])


def _damaged(tmp_path):
    good = json.dumps(_run().to_dict()).encode()
    gz = gzip.compress(good, mtime=0)
    flipped = bytearray(gz)
    flipped[len(gz) // 2] ^= 0xFF
    return {
        "truncated.json": good[: len(good) // 2],
        "truncated.json.gz": gz[: len(gz) // 2],
        "flipped.json.gz": bytes(flipped),
        "plain.json.gz": good,  # not gzip at all
        "latin1.json": "é".encode("latin-1"),
        "empty.json": b"",
        "list.json": b"[1, 2]",
        "notraces.json": json.dumps({**_run().to_dict(), "traces": None}).encode(),
        "nomode.json": json.dumps({k: v for k, v in _run().to_dict().items() if k != "mode"}).encode(),
        "badtrace.json": json.dumps({**_run().to_dict(), "traces": [{"colour": 1}]}).encode(),
        "foreign.json": json.dumps({"format": "other"}).encode(),
    }


def test_every_damaged_run_file_is_one_clear_error(tmp_path):
    for name, data in _damaged(tmp_path).items():
        path = tmp_path / name
        path.write_bytes(data)
        with pytest.raises(RunFileError) as info:
            load_run(path)
        assert str(path) in str(info.value), name
    with pytest.raises(RunFileError, match="no run file"):
        load_run(tmp_path)  # a folder


def test_save_refuses_a_folder_or_a_path_under_a_file(tmp_path):
    with pytest.raises(RunFileError, match="it is a folder; give a file name"):
        _run().save(tmp_path)
    (tmp_path / "afile").write_text("x")
    with pytest.raises(RunFileError, match="afile is a file, not a folder"):
        _run().save(tmp_path / "afile" / "sub" / "run.json")
    assert (tmp_path / "afile").read_text() == "x"


def test_save_refuses_a_folder_it_may_not_write(tmp_path, monkeypatch):
    real = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if str(p) == str(tmp_path) else real(p, mode))
    with pytest.raises(RunFileError, match=f"no permission to write in {tmp_path}"):
        _run().save(tmp_path / "new" / "run.json")
    assert not (tmp_path / "new").exists()


@pytest.mark.parametrize("name", ["run.json", "run.json.gz"])
@pytest.mark.parametrize("crash", [OSError(28, "No space left on device"), KeyboardInterrupt()])
def test_a_failed_save_keeps_the_old_file_whole(tmp_path, monkeypatch, name, crash):
    path = _run().save(tmp_path / name)
    before = path.read_bytes()

    def fail(fd):
        raise crash

    monkeypatch.setattr(os, "fsync", fail)
    bigger = _run()
    bigger.traces.append(RequestTrace(1, 0.0, 3, 1, 0.0, 0.1, [0.1], [7]))
    with pytest.raises(RunFileError if isinstance(crash, OSError) else KeyboardInterrupt):
        bigger.save(path)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [name]  # no temporary file left
    monkeypatch.undo()
    assert len(load_run(path).traces) == 1


def test_saves_are_reproducible_and_follow_the_umask(tmp_path):
    a = _run().save(tmp_path / "a.json.gz")
    b = _run().save(tmp_path / "b.json.gz")
    assert a.read_bytes() == b.read_bytes()  # the temporary name is not in the gzip header
    umask = os.umask(0)
    os.umask(umask)
    assert a.stat().st_mode & 0o777 == 0o666 & ~umask
    assert isinstance(load_run(a), Run)


def test_every_refusal_is_a_splitlab_error():
    assert issubclass(RunFileError, SplitlabError)

"""The explorers: selection through results.select_runs, figures from plots, nothing else."""

import pandas as pd
import pytest

pytest.importorskip("ipywidgets")
pytest.importorskip("plotly")

from splitlab.present import widgets
from splitlab.measure.metrics import RequestTrace, Run, StepTrace
from splitlab.measure.profile import Ceilings
from splitlab.present.results import load_results, save_profile, save_runs


def make_run(mode, rate, share=None, tpot=0.1):
    traces = [RequestTrace(i, a, 4, 3, a + 0.05, a + 0.2, [a + 0.2, a + 0.2 + tpot, a + 0.2 + 2 * tpot], [1, 2, 3], "w")
              for i, a in enumerate((0.0, 0.5))]
    cfg = {"rate": rate, **({"backend": "mps", "prefill_share": share, "decode_share": 100 - share} if share else {})}
    return Run(mode=mode, model="tiny", workload=f"poisson-r{rate}-n2", config=cfg, env={}, traces=traces,
               steps=[StepTrace("w", "prefill", 0.05, 0.2, [0], 4), StepTrace("w", "decode", 0.2, 0.4, [0, 1], 2)])


@pytest.fixture
def folder(tmp_path):
    save_runs([make_run("serial", 1), make_run("split", 1, 30), make_run("split", 1, 50, tpot=0.05),
               make_run("serial", 2), make_run("split", 2, 50)], tmp_path)
    return tmp_path


def test_sweep_explorer_sliders_pick_the_matching_run(folder):
    box = widgets.sweep_explorer(folder)
    rate, share, mode = box.children[0].children
    assert list(rate.options) == [1.0, 2.0] and list(share.options) == [30.0, 50.0]
    sel = box.state["selection"]
    assert sorted(sel["label"]) == ["serial", "split mps 30/70"]  # first values: rate 1, share 30
    assert box.state["figures"]["timeline"].layout.title.text == "Timeline — split mps 30/70"
    share.value = 50.0
    assert sorted(box.state["selection"]["label"]) == ["serial", "split mps 50/50"]
    assert box.state["figures"]["timeline"].layout.title.text == "Timeline — split mps 50/50"
    rate.value = 2.0
    assert set(box.state["selection"]["rate"]) == {2.0}
    bars = box.state["figures"]["breakdown"]
    assert list(bars.data[0].x) == list(box.state["selection"]["label"])
    mode.value = "serial"
    assert box.state["figures"]["timeline"].layout.title.text == "Timeline — serial"


def test_runs_explorer_metric_and_percentile(folder):
    table, runs = load_results(folder)
    box = widgets.runs_explorer((table, runs))
    pick, (metric, pct) = box.children[0], box.children[1].children
    assert len(box.state["figures"]["cdf"].data) == 5
    metric.value = "tpot_s"
    pct.value = 50
    bars = box.state["figures"]["bars"]
    assert bars.layout.yaxis.title.text == "tpot_p50_s"
    assert list(bars.data[0].y) == pytest.approx(list(table.groupby("label", sort=False)["tpot_p50_s"].mean()))
    pick.value = tuple(table["id"][:2])
    assert [t.name for t in box.state["figures"]["cdf"].data] == list(table["label"][:2])
    metric.value = "itl"
    assert box.state["figures"]["bars"].layout.yaxis.title.text == "itl_p50_s"


def test_roofline_explorer(tmp_path):
    ceil = Ceilings(device="cpu", device_name="cpu", dtype="float32", matmul_flops_s=1e11, copy_bytes_s=1e10,
                    matmul_n=64, copy_buffer_bytes=1024, repeats=1)
    rows = [{"model": m, "backend": "hf", "phase": p, "batch": 1, "tokens": 8, "time_s": 0.01, "tokens_per_s": 1.0,
             "achieved_flops_s": 1e9, "achieved_bytes_s": 1e8, "intensity": 10.0, "bound": "compute",
             "frac_of_roof": 0.1} for m in ("a", "b") for p in ("prefill", "decode")]
    path = save_profile(pd.DataFrame(rows), ceil, tmp_path / "p.json")
    box = widgets.roofline_explorer(path)
    fig = box.state["figures"]["roofline"]
    assert [t.name for t in fig.data][2:] == ["prefill L=8 · a", "prefill L=8 · b", "decode C=8 · a", "decode C=8 · b"]
    box.children[0].value = ("b", "hf")
    assert [t.name for t in box.state["figures"]["roofline"].data][2:] == ["prefill L=8", "decode C=8"]
    assert set(box.state["selection"]["model"]) == {"b"}

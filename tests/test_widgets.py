"""The explorers: one plotly figure each, its control switching views chosen by results.select_runs."""

import pandas as pd
import pytest

pytest.importorskip("plotly")

import plotly.graph_objects as go

from splitlab.present import plots, widgets
from splitlab.measure.metrics import RequestTrace, Run, StepTrace
from splitlab.measure.profile import Ceilings
from splitlab.present.results import load_results, save_profile, save_runs, select_runs


def make_run(mode, rate, share=None, tpot=0.1, tokens=3):
    traces = [RequestTrace(i, a, 4, tokens, a + 0.05, a + 0.2, [a + 0.2 + k * tpot for k in range(tokens)],
                           list(range(1, tokens + 1)), "w")
              for i, a in enumerate((0.0, 0.5))]
    cfg = {"rate": rate, **({"backend": "mps", "prefill_share": share, "decode_share": 100 - share} if share else {})}
    return Run(mode=mode, model="tiny", workload=f"poisson-r{rate}-n2", config=cfg, env={}, traces=traces,
               steps=[StepTrace("w", "prefill", 0.05, 0.2, [0], 4), StepTrace("w", "decode", 0.2, 0.4, [0, 1], 2)])


@pytest.fixture
def folder(tmp_path):
    save_runs([make_run("serial", 1), make_run("split", 1, 30), make_run("split", 1, 50, tpot=0.05),
               make_run("serial", 2), make_run("split", 2, 50)], tmp_path)
    return tmp_path


def shown(fig):
    return [t for t in fig.data if t.visible is not False]


def panel_titles(fig):
    return [a.text for a in fig.layout.annotations]


def test_sweep_explorer_slider_steps_pick_the_matching_runs(folder):
    table, runs = load_results(folder)
    fig = widgets.sweep_explorer(folder)
    assert isinstance(fig, go.Figure) and fig.layout.sliders and not fig.layout.updatemenus
    assert widgets.labels(fig) == ["1 req/s · prefill 30%", "1 req/s · prefill 50%", "2 req/s · prefill 50%"]
    for step in fig.layout.sliders[0].steps:
        assert step.method == "update" and len(step.args[0]["visible"]) == len(fig.data)
    # the figure opens on its first step
    assert [t.visible for t in fig.data] == list(widgets.view(fig, 0).layout.sliders[0].steps[0].args[0]["visible"])
    for label, rate, share in (("1 req/s · prefill 30%", 1, 30), ("1 req/s · prefill 50%", 1, 50),
                               ("2 req/s · prefill 50%", 2, 50)):
        v = widgets.view(fig, label)
        expected = [plots.legend_label(runs[i]) for i in select_runs(table, rate=rate, share=share)["id"]]
        breakdown = [t for t in shown(v) if t.legend in (None, "legend")]
        assert [list(t.x) for t in breakdown] == [expected] * len(breakdown), label
        # the timeline's title names the recorded run it draws
        assert panel_titles(v)[1] == (f"Timeline of run split-mps-{share}-{100 - share}-poisson-r{rate}-n2 "
                                      f"(split mps {share}/{100 - share} · {rate} req/s)")
        timeline = [t for t in shown(v) if t.legend == "legend2" and t.type == "bar"]
        assert {t.name for t in timeline} == {"prefill", "decode"}
    assert panel_titles(widgets.view(widgets.sweep_explorer(folder, mode="serial"), 0))[1] == \
        "Timeline of run serial-poisson-r1-n2 (serial · 1 req/s)"


def test_sweep_explorer_without_shares_or_rates(tmp_path):
    save_runs([make_run("serial", 1), make_run("chunked", 1)], tmp_path)
    fig = widgets.sweep_explorer(tmp_path, mode="split")  # no split run: the first mode's timeline
    assert widgets.labels(fig) == ["1 req/s"]
    assert panel_titles(fig)[1] == "Timeline of run chunked-poisson-r1-n2 (chunked · 1 req/s)"


def test_runs_explorer_menu_picks_metric_and_percentile(folder):
    table, runs = load_results(folder)
    fig = widgets.runs_explorer((table, runs))
    menu = fig.layout.updatemenus[0]
    assert len(widgets.labels(fig)) == 12 and widgets.labels(fig)[menu.active] == "TTFT p99"
    assert fig.layout.yaxis2.title.text == plots.column_title("ttft_p99_s")
    names = [plots.legend_label(runs[i]) for i in table["id"]]
    assert len(set(names)) == 5  # the rate tells the two serial runs apart
    assert sorted(t.name for t in shown(fig) if t.type == "scatter") == sorted(names)
    v = widgets.view(fig, "TPOT p50")
    cdfs, bars = [t for t in shown(v) if t.type == "scatter"], [t for t in shown(v) if t.type == "bar"]
    assert len(cdfs) == 5 and "time per output token" in v.layout.xaxis.title.text
    assert v.layout.yaxis2.title.text == plots.column_title("tpot_p50_s") and panel_titles(v)[1] == "tpot_p50_s per run"
    by_name = dict(zip(bars[0].x, bars[0].y))  # one bar per run, not a mean over runs sharing a label
    assert bars[0].showlegend is False
    assert by_name == pytest.approx(dict(zip(names, table["tpot_p50_s"])))
    assert widgets.view(fig, "ITL p90").layout.yaxis2.title.text == plots.column_title("itl_p90_s")
    with pytest.raises(KeyError):
        widgets.view(fig, "TTFT p42")


def test_roofline_explorer(tmp_path):
    ceil = Ceilings(device="cpu", device_name="cpu", dtype="float32", matmul_flops_s=1e11, copy_bytes_s=1e10,
                    matmul_n=64, copy_buffer_bytes=1024, repeats=1)
    rows = [{"model": m, "backend": "hf", "phase": p, "batch": 1, "tokens": 8, "time_s": 0.01, "tokens_per_s": 1.0,
             "achieved_flops_s": 1e9, "achieved_bytes_s": 1e8, "intensity": 10.0, "bound": "compute",
             "frac_of_roof": 0.1} for m in ("a", "b") for p in ("prefill", "decode")]
    path = save_profile(pd.DataFrame(rows), ceil, tmp_path / "p.json")
    fig = widgets.roofline_explorer(path)
    assert widgets.labels(fig) == ["all models", "a (hf)", "b (hf)"]
    assert [t.name for t in shown(fig)][2:] == ["prefill L=8 · a", "prefill L=8 · b", "decode C=8 · a", "decode C=8 · b"]
    b = widgets.view(fig, "b (hf)")
    assert [t.name for t in shown(b)][2:] == ["prefill L=8", "decode C=8"]
    assert b.layout.xaxis.type == "log" and b.layout.yaxis.type == "log" and panel_titles(b) == ["Roofline — b (hf)"]


def sm_run(rate, decode_sms, tpot=0.1):
    run = make_run("split", rate, tpot=tpot)
    run.steps = [StepTrace("prefill", "prefill", 0.05, 0.2, [0], 4, sms=132 - decode_sms),
                 StepTrace("decode", "decode", 0.2, 0.4, [0, 1], 2, sms=decode_sms)]
    run.env = {"sm_count": 132}
    return run


def test_policy_explorer_dropdown_shows_goodput_itl_and_the_sm_split():
    from splitlab.config import SLO

    groups = {"serial": [make_run("serial", r, tpot=0.2) for r in (1, 2, 4)],
              "split-table": [sm_run(r, 32) for r in (1, 2, 4)], "split-slo": [sm_run(r, 64, 0.05) for r in (1, 2, 4)]}
    slo = SLO(ttft_s=1.0, tpot_s=None, itl_s=0.15)
    fig = widgets.policy_explorer(groups, slo, {"table": "split-table", "slo": "split-slo"}, peers=("serial",), rate=2)
    assert isinstance(fig, go.Figure) and fig.layout.updatemenus and widgets.labels(fig) == ["table", "slo"]
    for name, label, sms in (("table", "split-table", 32), ("slo", "split-slo", 64)):
        v = widgets.view(fig, name)
        assert panel_titles(v) == [f"{name}: goodput under TTFT ≤ 1 s, every gap ≤ 150 ms",
                                   f"{name}: p99 of the gaps between tokens",
                                   f"{name}: run {label} at 2 req/s, the SM split over time"]
        curves = [t for t in shown(v) if t.legend in (None, "legend")]
        assert [t.name for t in curves] == ["serial", label] and list(curves[0].x) == [1, 2, 4]
        assert curves[0].line.dash == "dash" and curves[1].line.dash is None  # the peer dashed
        # serial's gaps (0.2 s) break the 150 ms bound: no goodput; the split's 0.1 / 0.05 s meet it
        assert list(curves[0].y) == [0, 0, 0] and min(curves[1].y) > 0
        itl = {t.name: list(t.y) for t in shown(v) if t.legend == "legend2"}
        assert itl["serial"] == pytest.approx([0.2] * 3)
        assert v.layout.yaxis2.title.text == plots.column_title("itl_p99_s")
        sm = {t.name: [y for y in t.y if y is not None] for t in shown(v) if t.name and t.name.endswith(" SMs")}
        assert sm == {"decode SMs": [sms, sms], "prefill SMs": [132 - sms, 132 - sms]}
    with pytest.raises(ValueError, match="missing"):
        widgets.policy_explorer(groups, slo, {"x": "split-nope"})


def test_combine_unsets_in_each_view_what_another_view_set_and_refuses_bad_input():
    from splitlab.errors import ConfigError

    log = go.Figure(go.Scatter(x=[1, 10], y=[1, 100], name="log"), layout=dict(title="log view", yaxis_type="log"))
    flat = go.Figure(go.Scatter(x=[1, 2], y=[3, 4], name="flat"), layout=dict(title="flat view"))
    fig = widgets._combine([("log", [log]), ("flat", [flat])], "dropdown", "two views", active=1)
    items = fig.layout.updatemenus[0].buttons
    assert set(items[0].args[1]) == set(items[1].args[1])  # the same keys in every view
    assert items[0].args[1]["yaxis.type"] == "log" and items[1].args[1]["yaxis.type"] is None
    assert [t.name for t in shown(fig)] == ["flat"] and panel_titles(fig) == ["flat view"]  # opens on `active`
    assert panel_titles(widgets.view(fig, "log")) == ["log view"] and widgets.view(fig, "log").layout.yaxis.type == "log"
    with pytest.raises(ConfigError, match="at least one view"):
        widgets._combine([], "dropdown", "none")
    with pytest.raises(ConfigError, match="'dropdown' or 'slider'"):
        widgets._combine([("log", [log])], "radio", "bad control")
    with pytest.raises(ConfigError, match="no dropdown or slider"):
        widgets.labels(go.Figure())


def test_runs_explorer_starts_on_the_view_asked_for():
    from splitlab.errors import ConfigError
    from splitlab.measure.metrics import RequestTrace, Run
    from splitlab.present import widgets

    def run(gap):
        traces = [RequestTrace(0, 0.0, 4, 4, 0.0, 0.1, [0.1, 0.1 + gap, 0.1 + 2 * gap, 0.1 + 3 * gap], [1, 2, 3, 4], "w")]
        return Run(mode="serial", model="tiny", workload="one", config={}, env={}, traces=traces, wall_s=1.0)

    fig = widgets.runs_explorer({"a": run(0.01), "b": run(0.02)}, start="ITL p50")
    labels = widgets.labels(fig)
    assert fig.layout.updatemenus[0].active == labels.index("ITL p50")
    with pytest.raises(ConfigError, match="start must be one of"):
        widgets.runs_explorer({"a": run(0.01)}, start="ITL p42")

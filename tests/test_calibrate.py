"""splitlab.measure.calibrate: workloads at rates set against serial's burst capacity, and
their reuse when a benchmark resumes from a merged result file."""

from __future__ import annotations

import pytest

from splitlab.config import EngineConfig
from splitlab.errors import WorkloadError
from splitlab.measure import calibrate as cal
from splitlab.workload import LengthDist, Request, Workload, from_azure_trace

CONFIG = EngineConfig(max_seq_len=96, num_slots=4, max_batch=4, token_budget=128, chunk_size=24)
PLEN, OLEN = LengthDist.uniform(8, 16), LengthDist.uniform(2, 4)


def test_rebase_renumbers_in_arrival_order_from_zero():
    reqs = [Request(7, (5, 6), 2, 3.5), Request(2, (7,), 1, 1.5), Request(4, (8, 9, 10), 3, 1.5)]
    wl = cal.rebase(reqs, "re")
    assert wl.name == "re" and [r.id for r in wl] == [0, 1, 2]
    assert [r.prompt_ids for r in wl] == [(7,), (8, 9, 10), (5, 6)]  # ties keep id order
    assert [r.arrival_s for r in wl] == [0.0, 0.0, 2.0]
    assert [r.arrival_s for r in cal.rebase(reqs, "burst", at_zero=True)] == [0.0, 0.0, 0.0]
    with pytest.raises(WorkloadError, match="no requests"):
        cal.rebase([], "empty")


def test_mean_rate_and_burst_capacity(monkeypatch):
    wl = Workload("w", tuple(Request(i, (5,), 1, 0.5 * i) for i in range(5)))
    assert cal.mean_rate(wl) == 5 / 2.0
    assert cal.mean_rate(Workload("at-once", (Request(0, (5,), 1, 0.0),))) == 1.0

    served = []

    class FakeRun:
        wall_s = 0.25

    def fake_run(workload, model, mode, config, progress):
        served.append((workload, mode, config))
        return FakeRun()

    monkeypatch.setattr("splitlab.run", fake_run)
    assert cal.burst_capacity(wl, object(), CONFIG) == 5 / 0.25
    workload, mode, config = served[0]
    assert mode == "serial" and config is CONFIG and {r.arrival_s for r in workload} == {0.0}


def test_poisson_at_labels_and_prefix(tiny):
    built = cal.poisson_at([4.0, 2.0, 8.0], 6, PLEN, OLEN, tiny)
    assert list(built) == ["poisson-low", "poisson-mid", "poisson-high"]
    wl, meta = built["poisson-mid"]
    assert wl.name == "poisson-r4-n6" and len(wl) == 6 and meta == {"kind": "poisson", "rate": 4.0}
    prefix, pmeta = cal.prefix_of(wl, meta, 3)
    assert prefix.name == "poisson-r4-n6-first3" and pmeta == {"kind": "poisson-prefix", "rate": 4.0}
    assert [r.prompt_ids for r in prefix] == [r.prompt_ids for r in wl.requests[:3]] and prefix.requests[0].arrival_s == 0


def test_trace_at_replays_at_the_target_mean_rates(tiny, azure_csv):
    trace_rate = cal.mean_rate(from_azure_trace(azure_csv, limit=20, max_total_len=96, seed=3, model=tiny))
    built = cal.trace_at(azure_csv, [0.5, 2.0, 9.0], trace_rate, 20, 96, tiny)
    assert list(built) == ["azure-a", "azure-b"]  # two replays at most
    for key, target in (("azure-a", 0.5), ("azure-b", 2.0)):
        wl, meta = built[key]
        assert meta["kind"] == "azure" and meta["rate"] == target and len(wl) == 20
        assert cal.mean_rate(wl) == pytest.approx(target, rel=1e-6)


def test_recorded_rates_and_workload_changes():
    recorded = {"poisson-mid": {"kind": "poisson", "rate": 3.0, "name": "p", "requests": 4},
                "azure-a": {"kind": "azure", "rate": 1.0, "name": "a", "requests": 4},
                "poisson-low": {"kind": "poisson", "rate": 1.5, "name": "q", "requests": 4}}
    assert cal.recorded_rates(recorded, "poisson") == [3.0, 1.5] and cal.recorded_rates({}, "azure") == []
    same = Workload("p", tuple(Request(i, (5,), 1, 0.0) for i in range(4)))
    renamed = Workload("a2", same.requests)
    built = {"poisson-mid": (same, {}), "azure-a": (renamed, {}), "new": (same, {})}
    assert cal.workload_changes(built, recorded) == ["workload azure-a was a (4 requests), now a2 (4)"]


def test_check_workload_is_seeded_and_mixes_bursts_with_stagger():
    wl = cal.check_workload(100, (7, 30, 12, 41, 3), 6)
    assert wl.name == "check" and [len(r.prompt_ids) for r in wl] == [7, 30, 12, 41, 3]
    assert [r.arrival_s for r in wl] == [0.0, 0.0, 0.0, pytest.approx(0.12), pytest.approx(0.16)]
    assert all(r.max_new_tokens == 6 and min(r.prompt_ids) >= 4 and max(r.prompt_ids) < 100 for r in wl)
    assert [r.prompt_ids for r in cal.check_workload(100, (7, 30, 12, 41, 3), 6)] == [r.prompt_ids for r in wl]


def test_calibration_measures_only_what_no_one_gave(tiny, azure_csv, monkeypatch):
    measured_on = []
    monkeypatch.setattr(cal, "burst_capacity", lambda wl, model, config: measured_on.append(wl.name) or 10.0)
    seen = []
    measured = {"earlier": 1}
    calib = cal.Calibration(tiny, CONFIG, measured=measured, on_capacity=lambda wl, cap: seen.append((wl.name, cap)))
    built = calib.poisson(5, PLEN, OLEN, calib_n=3)
    assert [meta["rate"] for _, meta in built.values()] == pytest.approx([6.0, 10.0, 13.0])
    assert measured == {"earlier": 1, "poisson_capacity_req_s": 10.0, "rate_multiples": [0.6, 1.0, 1.3]}
    assert seen == [("calibration-poisson", 10.0)] and calib.measured is measured  # updated in place
    assert [meta["rate"] for _, meta in calib.poisson(5, PLEN, OLEN, rates=[2.0]).values()] == [2.0]
    trace = calib.trace(azure_csv, 10, 96, multiples=(0.5, 1.0))
    assert [meta["rate"] for _, meta in trace.values()] == [5.0, 10.0]
    assert measured["azure_capacity_req_s"] == 10.0 and measured["azure_trace_rate_req_s"] > 0
    assert measured_on == ["calibration-poisson", "calibration-azure"]

    recorded = {"poisson-mid": {"kind": "poisson", "rate": 3.0}, "azure-a": {"kind": "azure", "rate": 2.0}}
    resumed = cal.Calibration(tiny, CONFIG, recorded=recorded)  # the merged file's rates: nothing measured
    assert list(resumed.poisson(5, PLEN, OLEN)) == ["poisson-mid"]
    assert [meta["rate"] for _, meta in resumed.trace(azure_csv, 10, 96).values()] == [2.0]
    assert measured_on == ["calibration-poisson", "calibration-azure"]
    assert "azure_capacity_req_s" not in resumed.measured and "poisson_capacity_req_s" not in resumed.measured

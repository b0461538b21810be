"""The co-location benchmark's mechanics (``benchmarks/colocation.py`` holds its plan and its
grid of steps): the cells of that grid still to run, the row of one (step, workload) run, the
check workload's tokens judged against serial's, the line it logs, whether a call's own
checks held, and the summary of a result file. Its conclusions over the rows are
``analysis.colocation_analysis`` (``analyse_saved``).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Mapping, Sequence

from splitlab.config import SLO
from splitlab.measure import analysis as an
from splitlab.measure.metrics import Run
from splitlab.measure.sweep import Cell
from splitlab.workload import Workload

# steps whose session starts worker processes or an MPS daemon: a slower set-up
HEAVY_BACKENDS = ("mps", "processes")


@dataclasses.dataclass(frozen=True, kw_only=True)
class Step(Cell):
    """One (step, workload) cell; the cells of one step share its session (``group``)."""

    step: str
    workload: str
    kind: str  # engine | split | replicas | hf
    options: tuple = ()  # the mode's keywords as (name, value) pairs
    sweep: bool = False
    gpu_only: bool = False


def wanted(name: str, modes: Sequence[str] | None) -> bool:
    """Whether ``--modes`` (step names or prefixes; None: all) asks for step ``name``."""
    return modes is None or any(name == m or name.startswith(m) for m in modes)


def step_cells(specs: Sequence[tuple], workloads: Mapping[str, Workload], done: set[str],
               modes: Sequence[str] | None = None) -> list[Step]:
    """The grid's cells still to run: every wanted step of ``specs`` (``(name, kind, options,
    workload keys, gpu_only, sweep)`` in priority order) on each of its workloads that was built
    and is not ``done``; a step's ``check`` cell only while it has a comparison workload left.
    A cell costs its workload's arrival span plus 5 s (2 s for the check)."""
    out, names = [], set()
    for name, kind, options, keys, gpu_only, sweep in specs:
        if not wanted(name, modes):
            continue
        keys = [k for k in keys if k in workloads and f"{name}--{k}" not in done | names]
        if not [k for k in keys if k != "check"]:
            continue
        heavy = kind == "replicas" or dict(options).get("backend") in HEAVY_BACKENDS
        for key in keys:
            cost = 2.0 if key == "check" else max(r.arrival_s for r in workloads[key]) + 5.0
            out.append(Step(name=f"{name}--{key}", group=name, cost_s=cost, setup_s=30.0 if heavy else 15.0,
                            step=name, workload=key, kind=kind, options=options, sweep=sweep, gpu_only=gpu_only))
            names.add(f"{name}--{key}")
    return out


def cell_key(row: Mapping[str, Any]) -> str:
    """A row's (and its saved run's) name: ``<step>--<workload_key>``."""
    return f"{row['step']}--{row['workload_key']}"


def run_record(run: Run, slo: SLO, step: str, workload_key: str, workload: str, meta: Mapping[str, Any],
               sweep: bool = False) -> dict[str, Any]:
    """One run as a row: its step, its workload (key, name and what the result file records of
    it), ``analysis.run_row`` under ``slo``, and whether it belongs to the SM-share sweep."""
    return {"step": step, "workload_key": workload_key, "workload": workload, **meta, **an.run_row(run, slo),
            "sweep": sweep}


class TokenCheck:
    """The check workload's tokens: the first run of it (serial's, first in the grid) is the
    reference, kept in ``checks["check_reference"]`` so a resumed call judges against the same
    tokens; every later run's are compared with it (``analysis.token_match``)."""

    def __init__(self, checks: dict[str, Any]) -> None:
        self.checks = checks
        self.reference = {int(k): v for k, v in checks.get("check_reference", {}).items()}  # JSON keys are text

    def __call__(self, run: Run) -> dict[str, Any]:
        if not self.reference:
            self.reference = self.checks["check_reference"] = run.output_ids()
            return {"reference": True}
        return an.token_match(run.output_ids(), self.reference)


def describe(name: str, row: Mapping[str, Any]) -> str:
    """The line logged after a run: completion, throughput, tails, goodput, decode slowdown."""
    slow = (row.get("decode_interference") or {}).get("slowdown_batch_matched")
    return (f"{name}: {row['completed']}/{row['num_requests']} done, {row['throughput_tok_s']:.0f} tok/s, "
            f"TTFT p99 {row['ttft_p99_s']:.3f} s, TPOT p99 {row['tpot_p99_s'] * 1e3:.1f} ms, goodput "
            f"{row['goodput_req_s']:.2f} req/s" + (f", decode slowdown {slow:.2f}x" if slow else ""))


def checks_ok(checks: Mapping[str, Any]) -> bool:
    """A call's checks held: the device tests did not fail, the call left nothing behind, and no
    co-location mechanism was seen not working (``analysis.gpu_paths``)."""
    tests = checks.get("gpu_tests") or {}
    return (tests.get("passed") is not False and not any(checks["leftovers"].values())
            and all(v is not False for v in checks["gpu_paths"].values()))


def summary(data: Mapping[str, Any], out: str, runs_dir: str) -> dict[str, Any]:
    """A result file in brief: where it is, whether its checks held, the chosen SM shares and
    the targets (without their thresholds)."""
    analysis = data.get("analysis") or {}
    return {"out": out, "runs_dir": runs_dir, "checks_ok": data.get("checks_ok"),
            "gpu_tests_passed": (data.get("checks", {}).get("gpu_tests") or {}).get("passed"),
            "chosen_shares": (analysis.get("sm_share_sweep") or {}).get("chosen"),
            "targets": {k: v for k, v in analysis.get("targets", {}).items() if k != "thresholds"}}


def analyse_saved(rows: Sequence[Mapping[str, Any]], runs_dir: str | Path) -> dict[str, Any]:
    """``analysis.colocation_analysis`` of the rows, with the step stalls of their saved runs."""
    return an.colocation_analysis(rows, an.stalls_of_saved_runs(runs_dir, [cell_key(r) for r in rows]))

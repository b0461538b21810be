"""Worker processes started together: each warms up, says it is ready, and all begin at one
start time the parent hands out, so the work of co-running processes overlaps from its first
step (``benchmarks/mps_corun.py`` measures sharing mechanisms this way).

Parent and workers talk through files in a private control folder that the parent removes:

- ``<name>.ready``: the worker has warmed up (``ready_and_wait``);
- ``start``: the common start, a ``time.monotonic()`` value (CLOCK_MONOTONIC is system-wide,
  so every process reads the same clock), written once all are ready;
- ``<name>.json``: the worker's result (``write_result``);
- ``<name>.log``: the worker's stdout and stderr, quoted when it fails.

A worker that finds it cannot run on this machine says why with ``skip`` (a result
``{"skipped": why}`` and the exit status ``SKIP_EXIT``); the parent raises ``CoRunSkipped``.
Files, not pipes: a worker may be any program, its environment set before it starts (MPS
client variables must be there before CUDA initialises in it).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from splitlab.errors import WorkerError

SKIP_EXIT = 3  # a worker's exit status for "this cannot run here" (the reason in its result)
START_LEAD_S = 0.25  # the start lies this far ahead, so every worker sees it before it comes
POLL_S = 0.02


class CoRunSkipped(Exception):
    """The co-run cannot run on this machine; the message says why."""


@dataclasses.dataclass(frozen=True)
class Launch:
    """One worker process: its command line given the control folder and its name, the
    variables added to its environment, and the label that errors name it by."""

    argv: Callable[[Path, str], Sequence[str]]
    env: Mapping[str, str] | None = None
    label: str = ""


def clean_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """This process's environment without any MPS client variable, plus ``extra``: a worker
    without MPS must not reach a daemon someone else left in the environment."""
    return {**{k: v for k, v in os.environ.items() if not k.startswith("CUDA_MPS_")}, **(extra or {})}


# ---- worker side ------------------------------------------------------------------------------------

def ready_and_wait(ctrl: str | Path, name: str, timeout_s: float) -> float:
    """Say this worker is ready, then wait for the common start time (``time.monotonic()``)."""
    ctrl = Path(ctrl)
    (ctrl / f"{name}.ready").write_text("ok")
    deadline = time.monotonic() + timeout_s
    while not (ctrl / "start").exists():
        if time.monotonic() > deadline:
            raise TimeoutError("no start signal from the parent")
        time.sleep(0.005)
    return float((ctrl / "start").read_text())


def write_result(ctrl: str | Path, name: str, data: Mapping[str, Any]) -> None:
    """The worker's result, written whole (a temp file renamed) so the parent never reads half."""
    path = Path(ctrl) / f"{name}.json"
    path.with_suffix(".tmp").write_text(json.dumps(data))
    os.replace(path.with_suffix(".tmp"), path)


def skip(ctrl: str | Path, name: str, why: str) -> int:
    """Record why this worker cannot run here; returns the exit status that tells the parent."""
    write_result(ctrl, name, {"skipped": why})
    return SKIP_EXIT


# ---- parent side ------------------------------------------------------------------------------------

def run_together(launches: Sequence[Launch], ready_timeout_s: float, finish_timeout_s: float,
                 cwd: str | Path | None = None) -> list[dict[str, Any]]:
    """Start every worker, wait until all are ready, give them one start time, and return their
    results in order. Raises ``CoRunSkipped`` (a worker skipped), ``WorkerError`` (one exited
    with an error) or ``TimeoutError`` (not ready or not finished in time). Nothing outlives
    this call: the workers are stopped and the control folder removed."""
    ctrl = Path(tempfile.mkdtemp(prefix="splitlab-corun-"))
    names, procs = [f"w{i}" for i in range(len(launches))], []
    try:
        procs = [_spawn(launch, name, ctrl, cwd) for name, launch in zip(names, launches)]
        _wait_ready(ctrl, names, launches, procs, ready_timeout_s)
        (ctrl / "start.tmp").write_text(repr(time.monotonic() + START_LEAD_S))
        os.replace(ctrl / "start.tmp", ctrl / "start")
        return _collect(ctrl, names, procs, finish_timeout_s)
    finally:
        _stop(procs)
        shutil.rmtree(ctrl, ignore_errors=True)


def _spawn(launch: Launch, name: str, ctrl: Path, cwd) -> subprocess.Popen:
    with open(ctrl / f"{name}.log", "wb") as log:
        return subprocess.Popen(list(launch.argv(ctrl, name)), env=clean_env(launch.env), cwd=cwd,
                                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)


def _wait_ready(ctrl: Path, names: list[str], launches: Sequence[Launch], procs: list, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not all((ctrl / f"{n}.ready").exists() for n in names):
        for name, launch, p in zip(names, launches, procs):
            if p.poll() is not None and not (ctrl / f"{name}.ready").exists():
                if p.returncode == SKIP_EXIT and (ctrl / f"{name}.json").exists():
                    raise CoRunSkipped(json.loads((ctrl / f"{name}.json").read_text())["skipped"])
                raise WorkerError(f"worker {name} ({launch.label}) exited with status {p.returncode} before it "
                                  f"was ready:\n" + _tail(ctrl / f"{name}.log"))
        if time.monotonic() > deadline:
            raise TimeoutError(f"workers not ready within {timeout_s} s")
        time.sleep(POLL_S)


def _collect(ctrl: Path, names: list[str], procs: list, timeout_s: float) -> list[dict[str, Any]]:
    finish_by, out = time.monotonic() + timeout_s, []
    for name, p in zip(names, procs):
        try:
            rc = p.wait(timeout=max(0.1, finish_by - time.monotonic()))
        except subprocess.TimeoutExpired as exc:
            raise TimeoutError(f"worker {name} did not finish within {timeout_s:.0f} s") from exc
        if rc != 0:
            raise WorkerError(f"worker {name} failed with status {rc}:\n" + _tail(ctrl / f"{name}.log"))
        out.append(json.loads((ctrl / f"{name}.json").read_text()))
    return out


def _stop(procs: list, grace_s: float = 10.0) -> None:
    """SIGTERM what still runs, SIGKILL what does not exit within ``grace_s``."""
    for p in procs:
        if p.poll() is None:
            p.terminate()
    for p in procs:
        try:
            p.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def _tail(path: Path, n: int = 2000) -> str:
    try:
        return path.read_text(errors="replace")[-n:]
    except OSError:
        return ""

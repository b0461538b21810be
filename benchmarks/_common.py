"""What every benchmark script shares: a log line, freeing device memory, what runs leave behind,
the device checks (``tests/gpu``) run first and recorded, a step's session, and the
re-analysis of recorded results."""

from __future__ import annotations

import contextlib
import gc
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def log(name: str, msg: str) -> None:
    print(f"[{name} {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def free_memory() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def leftovers() -> dict[str, Any]:
    """What runs could leave behind: live descendants of this process, /dev/shm entries, MPS
    processes of splitlab's private daemons."""
    from splitlab.system.procs import descendants

    try:
        from splitlab.system.mps import find_mps_processes

        mps = [p.pid for p in find_mps_processes() if p.pipe_dir and "splitlab-mps-" in p.pipe_dir]
    except Exception:  # noqa: BLE001 - no /proc view of MPS here
        mps = []
    shm = sorted(os.listdir("/dev/shm")) if os.path.isdir("/dev/shm") else []
    return {"processes": sorted(descendants()), "mps_processes": mps, "dev_shm": shm}


def leftover_diff(before: dict[str, Any], timeout_s: float = 10.0) -> dict[str, list]:
    """New leftovers since ``before``, waiting up to ``timeout_s`` for exits to settle; /dev/shm
    entries that another process maps (other programs on the machine) are left out."""
    from splitlab.system.procs import shm_mapped_elsewhere

    deadline = time.monotonic() + timeout_s
    while True:
        after = leftovers()
        new = {f"new_{k}": sorted(set(after[k]) - set(before[k])) for k in after}
        if new["new_dev_shm"]:
            others = shm_mapped_elsewhere()
            new["new_dev_shm"] = [n for n in new["new_dev_shm"] if n not in others]
        if not any(new.values()) or time.monotonic() > deadline:
            return new
        time.sleep(0.2)


def leftovers_baseline() -> dict[str, Any]:
    """``leftovers()`` at a benchmark's start, after making tqdm's one multiprocessing lock per
    process (its /dev/shm semaphore would otherwise look like something a run left behind)."""
    from tqdm.auto import tqdm

    tqdm(disable=True).close()
    return leftovers()


@contextlib.contextmanager
def leftovers_watched(on_left: Callable[[dict[str, list]], None], timeout_s: float = 3.0) -> Iterator[None]:
    """Frees device memory after the block and passes what the block left behind (processes,
    /dev/shm entries, MPS processes; see ``leftover_diff``) to ``on_left``, only if anything."""
    before = leftovers()
    try:
        yield
    finally:
        free_memory()
        left = leftover_diff(before, timeout_s=timeout_s)
        if any(left.values()):
            on_left(left)


@contextlib.contextmanager
def step_session(kind: str, model, config, options: dict[str, Any]) -> Iterator[Any]:
    """The session a step's workloads run in, closed after the block: a ``SplitSession``
    (``split``), a ``ReplicaSession`` of serial engines (``replicas``), or None for the modes
    that are one ``splitlab.run`` call each."""
    if kind not in ("split", "replicas"):
        yield None
        return
    from splitlab.modes.replicas import ReplicaSession
    from splitlab.modes.split import SplitSession

    opened = SplitSession(model, config, **options) if kind == "split" else \
        ReplicaSession(model, engine="serial", config=config, **options)
    with opened as session:
        yield session


def run_step(session, workload, model, kind: str, options: dict[str, Any], config, progress: bool = False,
             hf_batch: int | None = None):
    """One workload of a step: in its session when it has one (``step_session``), else one
    ``splitlab.run`` call: ``hf-generate`` (batches of ``hf_batch``) for kind ``hf``, else the
    engine mode that ``options`` name."""
    import splitlab

    if session is not None:
        return session.run(workload, progress=progress)
    if kind == "hf":
        return splitlab.run(workload, model, mode="hf-generate", batch_size=hf_batch, progress=progress)
    return splitlab.run(workload, model, config=config, progress=progress, **options)


def gpu_tests(paths: list[str], model: str | None = None, timeout_s: float = 480.0) -> dict[str, Any]:
    """``python -m pytest <paths> -m gpu -q`` in the repository (the device checks of
    ``tests/gpu``; ``model`` becomes ``SPLITLAB_GPU_TEST_MODEL``): its exit status, its last
    lines, and ``passed`` (every selected test passed)."""
    cmd = [sys.executable, "-m", "pytest", *paths, "-m", "gpu", "-q", "-p", "no:cacheprovider"]
    env = {**os.environ, **({"SPLITLAB_GPU_TEST_MODEL": model} if model else {})}
    t0 = time.perf_counter()
    try:
        done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout_s)
        rc, tail = done.returncode, (done.stdout + done.stderr)[-3000:]
    except subprocess.TimeoutExpired as exc:
        rc, tail = None, f"timed out after {timeout_s:.0f} s: {str(exc.stdout or '')[-2000:]}"
    last = [line for line in tail.splitlines() if line.strip()]
    return {"command": " ".join(["python", *cmd[1:]]), "model": model, "returncode": rc, "passed": rc == 0,
            "summary": last[-1] if last else "", "tail": tail, "wall_s": round(time.perf_counter() - t0, 1)}


def run_device_checks(checks: dict[str, Any], paths: list[str], model: str, say: Callable[[str], None]) -> None:
    """The device checks (``gpu_tests``) on ``model``, recorded as ``checks["gpu_tests"]``,
    saying what runs and how it went."""
    say(f"device checks: {' '.join(paths)} on {model}")
    checks["gpu_tests"] = gpu_tests(paths, model=model)
    say(f"device checks: {checks['gpu_tests']['summary']}")


def quiet_transformers() -> None:
    """No per-load progress bars or advisory warnings from transformers."""
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
    except Exception:  # noqa: BLE001 - a transformers without these helpers
        pass


def parse_shares(text: str) -> list[tuple[int, int]]:
    """``"50/50,30/70"`` -> [(50, 50), (30, 70)]: pairs of percentages in 1..100; ValueError else."""
    out = []
    for part in text.split(","):
        pieces = part.strip().split("/")
        if len(pieces) != 2 or not all(x.strip().isdigit() for x in pieces):
            raise ValueError(f"{part!r} is not A/B, two percentages, e.g. 30/70")
        a, b = int(pieces[0]), int(pieces[1])
        if not (1 <= a <= 100 and 1 <= b <= 100):
            raise ValueError(f"{part!r}: each share is a percentage in 1..100")
        out.append((a, b))
    return out


def print_rows(rows: list[dict[str, Any]], columns: list[tuple[str, str, int, int | None]]) -> None:
    """A fixed-width table: ``columns`` are (key, heading, width, decimals; None for text)."""
    print(" ".join(f"{h:<{w}}" if d is None else f"{h:>{w}}" for _, h, w, d in columns))
    for r in rows:
        cells = []
        for key, _, w, d in columns:
            v = r.get(key)
            if d is None:
                cells.append(f"{str(v)[:w]:<{w}}")
            else:
                cells.append(f"{float(v) if isinstance(v, (int, float)) else float('nan'):>{w}.{d}f}")
        print(" ".join(cells))


def report(data: dict[str, Any], summary: dict[str, Any]) -> None:
    """What a sweep did not do (skipped, failed, left by the budget), then the summary as one
    JSON line, the last line a benchmark prints."""
    import json

    from splitlab.measure.metrics import to_jsonable

    for what in ("skipped", "failed", "left"):
        if data.get(what):
            print(f"{what}: " + "; ".join(f"{e.get('cell') or e.get('what')} ({str(e.get('why') or e.get('error'))[:160]})"
                                          for e in data[what]))
    counts = {k: len(data.get(k) or []) for k in ("runs", "skipped", "failed", "left")}
    print(json.dumps(to_jsonable({**summary, **counts, "wall_s": data.get("wall_s")})), flush=True)


def reanalysed(paths: Sequence[str | Path], benchmark: str, key_of: Callable[[dict[str, Any]], str],
               analyse: Callable[[dict[str, Any]], Any], out: Path) -> dict[str, Any]:
    """``--analyse-only``: the result file(s) as recorded (several merged by ``key_of``), their
    ``analysis`` redone by ``analyse(data)`` and stamped ``analysed_on``, written to ``out``."""
    import datetime as dt

    from splitlab.measure.sweep import command_line, load_result, merge_results, write_json_atomic

    loaded = [load_result(p, benchmark) for p in paths]
    data = loaded[0] if len(loaded) == 1 else merge_results(loaded, key_of)
    data["analysis"] = analyse(data)
    data["analysed_on"] = {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                           "command": command_line()}
    write_json_atomic(out, data)
    return data

"""Grid runs for benchmarks: named cells, a time budget, resume and merge, whole result files.

A benchmark is a list of *cells* in priority order, each a frozen dataclass with a unique
``name`` (subclass ``Cell`` to add the parameters), and one function that measures a cell and
returns a JSON-able dict. ``Sweep`` runs them::

    sweep = Sweep("mybench", out="results/mybench.json", budget_s=470, resume=["earlier.json"])
    data = sweep.run(cells, measure)          # measure(cell, context) -> dict

- **budget**: a cell is not started when less than its ``cost_s`` (plus its group's
  ``setup_s`` when the group is not open yet) is left of ``budget_s`` (counted from the
  ``Sweep``'s creation); it is listed under ``left`` with the reason, and the next call can
  pick it up.
- **resume**: ``resume`` names earlier result files (or holds their dicts); their rows are kept
  untouched, in their order, and every cell they hold is skipped. Several files are merged
  first (``merge_results``), so one grid can run as several bounded device calls and the
  pieces be joined.
- **groups**: consecutive cells with the same ``group`` share one context, opened by
  ``group_context(group)`` (a context manager factory: a loaded session, an MPS daemon) before
  the group's first cell and closed after its last; the cell function gets it as ``context``.
- **whole files**: the result JSON (``out``; None keeps it in memory) is rewritten after every cell, to a temporary file beside it
  and renamed over it, so a crash or a kill mid-cell leaves the last whole file.
- **format**: ``file_format`` names the file's format (default ``FORMAT``; a benchmark whose
  file another reader expects, e.g. a profile, gives that reader's).
- **provenance**: every file holds the command, the date, the GPU and the package versions
  (``splitlab.system.env.environment``), and every call's command (``commands``, ``calls``).
- **progress**: a ``tqdm.auto`` bar over the cells of this call.

A cell function raises ``SkipCell("why")`` for a cell that cannot run on this machine
(listed under ``skipped``); any other exception is recorded under ``failed`` with its
traceback and the sweep goes on. KeyboardInterrupt and SystemExit stop it (the file stays
whole). Rows are ``{"cell": name, **result}``; ``key_of`` names rows of files that predate
the ``cell`` key.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as _dt
import gzip
import json
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable, ContextManager, Iterable, Mapping, Sequence

from splitlab.errors import ConfigError, SplitlabError
from splitlab.measure.metrics import to_jsonable

FORMAT = "splitlab.measure.sweep/1"
# the keys a sweep owns in its result file; a benchmark's own sections sit beside them
SWEEP_KEYS = ("format", "benchmark", "command", "commands", "calls", "date", "gpu", "environment", "runs",
              "skipped", "failed", "left", "budget_s", "stopped_by_budget", "wall_s")


class SweepError(SplitlabError, ValueError):
    """A result file cannot be resumed from or merged (missing, not a sweep result, another benchmark)."""


class SkipCell(Exception):
    """Raised by a cell function: this cell cannot run here; the message says why."""


@dataclasses.dataclass(frozen=True)
class Cell:
    """One point of a grid. ``name``: unique in the grid (it keys the result rows); ``group``:
    consecutive cells of one group share one ``group_context``; ``cost_s``: the seconds it needs
    at least; ``setup_s``: what opening its group costs. Subclass with
    ``@dataclasses.dataclass(frozen=True, kw_only=True)`` to add parameters."""

    name: str
    group: str | None = None
    cost_s: float = 0.0
    setup_s: float = 0.0


def check_grid(cells: Iterable[Any]) -> list[Any]:
    """The cells as a list, after checking each is a frozen dataclass with a unique ``name``."""
    out, seen = [], set()
    for cell in cells:
        params = getattr(type(cell), "__dataclass_params__", None)
        if not dataclasses.is_dataclass(cell) or isinstance(cell, type) or not params.frozen:
            raise ConfigError(f"a grid cell must be a frozen dataclass instance, got {cell!r}")
        name = getattr(cell, "name", None)
        if not isinstance(name, str) or not name:
            raise ConfigError(f"a grid cell needs a non-empty string name, got {name!r} in {cell!r}")
        if name in seen:
            raise ConfigError(f"two cells of the grid are named {name!r}; names must be unique")
        seen.add(name)
        out.append(cell)
    return out


# ---- files -----------------------------------------------------------------------------------

def command_line(argv: Sequence[str] | None = None) -> str:
    """The command that is running: the script's file name and its arguments."""
    argv = list(sys.argv if argv is None else argv)
    return " ".join([Path(argv[0]).name if argv else "python", *argv[1:]])


def provenance(command: str | None = None) -> dict[str, Any]:
    """Command, UTC date, GPU name and ``environment()`` (device, driver, package versions)."""
    from splitlab.system.env import environment

    env = environment()
    return {"command": command or command_line(),
            "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "gpu": env.get("gpu_name"), "environment": env}


def write_json_atomic(path: str | Path, data: Any, indent: int | None = 1) -> Path:
    """Write ``data`` as JSON to ``path`` whole or not at all: a temporary file in the same
    folder, flushed to disk, then renamed over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(to_jsonable(data), indent=indent)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return path


def load_result(path: str | Path, benchmark: str | None = None) -> dict[str, Any]:
    """An earlier result file (plain or ``.gz`` JSON) with a ``runs`` list; ``benchmark``, when
    given, must match the file's."""
    path = Path(path)
    if not path.is_file():
        raise SweepError(f"no result file at {path}; give the output JSON of an earlier call")
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
        data = json.loads(raw)
    except (OSError, ValueError) as exc:
        raise SweepError(f"{path} is not a readable JSON result file ({exc.__class__.__name__}: {exc})") from exc
    if not isinstance(data, dict) or not isinstance(data.get("runs"), list):
        raise SweepError(f"{path} holds no 'runs' list: not a benchmark result file")
    if benchmark is not None and data.get("benchmark") != benchmark:
        raise SweepError(f"{path} is a result of {data.get('benchmark')!r}, not of {benchmark!r}")
    return data


def row_name(row: Mapping[str, Any], key_of: Callable[[Mapping[str, Any]], str] | None = None) -> str:
    """The cell a result row belongs to."""
    if row.get("cell"):
        return str(row["cell"])
    if key_of is None:
        raise SweepError(f"a result row has no 'cell' key and no key_of was given: {sorted(row)[:8]}")
    return key_of(row)


def merge_results(results: Sequence[Mapping[str, Any]],
                  key_of: Callable[[Mapping[str, Any]], str] | None = None) -> dict[str, Any]:
    """Several partial results of one grid as one: rows in file order, a cell held by more than
    one file kept from the first (the others listed under ``merge_dropped``); commands and calls
    concatenated; failures kept (``earlier``) unless a file holds the cell; the other sections
    merged with the first file's values winning (dicts one level deep)."""
    if not results:
        raise SweepError("nothing to merge: give at least one result")
    names = {r.get("benchmark") for r in results}
    if len(names) > 1:
        raise SweepError(f"cannot merge results of different benchmarks: {sorted(map(str, names))}")
    rows, seen, dropped = [], set(), []
    for data in results:
        for row in data.get("runs", []):
            name = row_name(row, key_of)
            if name in seen:
                dropped.append(name)
                continue
            seen.add(name)
            rows.append(row)
    merged: dict[str, Any] = {}
    for data in reversed(results):  # the first file's sections win
        for key, value in data.items():
            if key in SWEEP_KEYS:
                continue
            if isinstance(value, dict) and isinstance(merged.get(key), dict):
                merged[key] = {**merged[key], **value}
            else:
                merged[key] = value
    commands = [c for data in results for c in (data.get("commands") or [data.get("command")]) if c]
    failed = [{**f, "earlier": True} for data in results for f in data.get("failed", [])
              if (f.get("cell") or f.get("what")) not in seen]
    merged.update(benchmark=results[0].get("benchmark"), runs=rows, commands=commands, failed=failed,
                  calls=[c for data in results for c in data.get("calls", [])])
    if dropped:
        merged["merge_dropped"] = dropped
    return merged


# ---- the runner ------------------------------------------------------------------------------

class Sweep:
    """One call of a benchmark over a grid; see the module docstring."""

    def __init__(self, benchmark: str, out: str | Path | None, *, budget_s: float | None = None,
                 resume: Sequence[str | Path | Mapping[str, Any]] = (),
                 key_of: Callable[[Mapping[str, Any]], str] | None = None, progress: bool = True,
                 command: str | None = None, state: Callable[[], Mapping[str, Any]] | None = None,
                 clock: Callable[[], float] = time.perf_counter, file_format: str = FORMAT) -> None:
        if budget_s is not None and not budget_s > 0:
            raise ConfigError(f"budget_s must be a positive number of seconds, got {budget_s!r}")
        self.benchmark, self.out, self.budget_s = benchmark, None if out is None else Path(out), budget_s
        self.key_of, self.progress, self.state, self.clock = key_of, progress, state, clock
        self.file_format = file_format
        self.t0 = clock()
        self.info = provenance(command)
        loaded = [load_result(r, benchmark) if not isinstance(r, Mapping) else dict(r) for r in resume]
        self.earlier: dict[str, Any] | None = merge_results(loaded, key_of) if loaded else None
        self.rows: list[dict[str, Any]] = list((self.earlier or {}).get("runs", []))
        self.done: set[str] = {row_name(r, key_of) for r in self.rows}
        self.failed: list[dict[str, Any]] = list((self.earlier or {}).get("failed", []))
        self.skipped: list[dict[str, Any]] = []
        self.left: list[dict[str, Any]] = []
        self.ran: list[str] = []

    # -- time
    def elapsed(self) -> float:
        return self.clock() - self.t0

    def time_left(self) -> float:
        return float("inf") if self.budget_s is None else self.budget_s - self.elapsed()

    def budget_ok(self, need_s: float = 0.0) -> bool:
        return need_s <= self.time_left()

    # -- bookkeeping
    def skip(self, what: str, why: str) -> None:
        """Record something that did not run here (a cell, or a benchmark's own step)."""
        self.skipped.append({"cell": what, "why": why, "at_s": round(self.elapsed(), 1)})

    def fail(self, what: str, exc: BaseException) -> None:
        self.failed.append({"cell": what, "error": f"{exc.__class__.__name__}: {exc}"[:2000],
                            "traceback": "".join(traceback.format_exception(exc))[-4000:]})

    def data(self, **extra: Any) -> dict[str, Any]:
        """The result file's content now: the benchmark's sections, then the sweep's."""
        earlier = self.earlier or {}
        command = self.info["command"]
        call = {"command": command, "date": self.info["date"], "gpu": self.info["gpu"],
                "cells_run": list(self.ran), "wall_s": round(self.elapsed(), 1)}
        out = {k: v for k, v in earlier.items() if k not in SWEEP_KEYS}
        out.update(self.state() if self.state else {})
        out.update(extra)
        failed = [f for f in self.failed if not (f.get("earlier") and f.get("cell") in self.done)]
        out.update(format=self.file_format, benchmark=self.benchmark, **self.info,
                   commands=[*earlier.get("commands", []), command], calls=[*earlier.get("calls", []), call],
                   runs=self.rows, skipped=self.skipped, failed=failed, left=self.left,
                   budget_s=self.budget_s, stopped_by_budget=bool(self.left), wall_s=round(self.elapsed(), 1))
        return out

    def write(self, **extra: Any) -> dict[str, Any]:
        """Rewrite the result file whole (nothing when the sweep has no ``out``); return what it holds."""
        data = self.data(**extra)
        if self.out is not None:
            write_json_atomic(self.out, data)
        return data

    # -- running
    def run(self, cells: Iterable[Any], measure: Callable[[Any, Any], Mapping[str, Any]],
            group_context: Callable[[str], ContextManager[Any]] | None = None) -> dict[str, Any]:
        """Measure every cell not done yet, in order, within the budget; return the file's data."""
        from tqdm.auto import tqdm

        todo = [c for c in check_grid(cells) if c.name not in self.done]
        bar = tqdm(total=len(todo), desc=self.benchmark, disable=not self.progress, leave=False)
        groups = _Groups(group_context)
        try:
            for cell in todo:
                bar.set_postfix_str(cell.name, refresh=False)
                self._one(cell, measure, groups)
                self.write()
                bar.update()
        finally:
            for what, exc in groups.close():
                self.fail(what, exc)
            bar.close()
            data = self.write()
        return data

    def _one(self, cell: Any, measure: Callable[[Any, Any], Mapping[str, Any]], groups: "_Groups") -> None:
        group = getattr(cell, "group", None)
        for what, exc in groups.leave_unless(group):
            self.fail(what, exc)
        need = float(getattr(cell, "cost_s", 0.0)) + (0.0 if groups.is_open(group) else
                                                       float(getattr(cell, "setup_s", 0.0)))
        if not self.budget_ok(need):
            self.left.append({"cell": cell.name, "why": f"budget: {self.elapsed():.0f} of {self.budget_s:.0f} s "
                                                        f"spent, the cell needs about {need:.0f} s"})
            return
        try:
            context = groups.enter(group)
            result = measure(cell, context)
        except SkipCell as exc:
            self.skip(cell.name, str(exc))
            return
        except Exception as exc:  # noqa: BLE001 - one cell failing must not end the sweep
            self.fail(cell.name, exc)
            return
        self.rows.append({"cell": cell.name, **dict(result)})
        self.done.add(cell.name)
        self.ran.append(cell.name)


class _Groups:
    """The one open group context of a sweep (consecutive cells of a group share it)."""

    def __init__(self, factory: Callable[[str], ContextManager[Any]] | None) -> None:
        self.factory = factory
        self.name: str | None = None
        self.stack: contextlib.ExitStack | None = None
        self.value: Any = None
        self.broken: dict[str, str] = {}  # group -> why it could not open
        self.unrunnable: dict[str, str] = {}  # group -> why it cannot run here (SkipCell)

    def is_open(self, group: str | None) -> bool:
        return group is None or self.factory is None or (self.stack is not None and self.name == group)

    def enter(self, group: str | None) -> Any:
        if self.is_open(group):
            return self.value if group is not None else None
        if group in self.unrunnable:
            raise SkipCell(self.unrunnable[group])
        if group in self.broken:
            raise RuntimeError(f"group {group!r} could not be set up: {self.broken[group]}")
        stack = contextlib.ExitStack()
        try:
            self.value = stack.enter_context(self.factory(group))
        except SkipCell as exc:
            stack.close()
            self.unrunnable[group] = str(exc)
            raise
        except Exception as exc:
            stack.close()
            self.broken[group] = f"{exc.__class__.__name__}: {exc}"[:500]
            raise
        self.name, self.stack = group, stack
        return self.value

    def leave_unless(self, group: str | None) -> list[tuple[str, BaseException]]:
        return [] if self.stack is None or self.name == group else self.close()

    def close(self) -> list[tuple[str, BaseException]]:
        stack, name = self.stack, self.name
        self.stack, self.name, self.value = None, None, None
        if stack is None:
            return []
        try:
            stack.close()
        except Exception as exc:  # noqa: BLE001 - recorded as a failure of the group
            return [(f"{name} (close)", exc)]
        return []

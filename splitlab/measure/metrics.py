"""The ``Run`` every mode returns, and the metrics computed from it.

Definitions, all times in seconds, all relative to the run's start:

- TTFT: arrival to first output token (queueing delay included).
- TPOT: (E2E - TTFT) / (output tokens - 1); undefined (NaN) for a one-token output.
- ITL: every gap between consecutive output tokens of a request; p50/p99 over all gaps.
- E2E: arrival to last output token.
- Throughput: output tokens of the run / wall time of the run.
- Goodput: requests that meet every bound of the SLO (TTFT, TPOT, inter-token gaps, E2E:
  whichever it sets) / wall time of the run (DistServe; vLLM ``bench serve --goodput``).

The wall time runs from the run's start (time 0, the reference of every ``arrival_s``) to
the last token of the last request.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import secrets
import zlib
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np

from splitlab.config import SLO, RunConfig
from splitlab.errors import ConfigError, RunFileError, SplitlabError

PERCENTILES = (50, 90, 99)
# run files: format 2 holds a typed RunConfig; format 1 (older runs) an untyped dict
RUN_FORMAT = "splitlab.run/2"
RUN_FORMATS = ("splitlab.run/1", RUN_FORMAT)


@dataclasses.dataclass
class RequestTrace:
    """Timestamps and outputs of one request (seconds since the run's start)."""

    id: int
    arrival_s: float
    prompt_len: int
    max_new_tokens: int
    prefill_start_s: float | None = None
    prefill_end_s: float | None = None
    token_times_s: list[float] = dataclasses.field(default_factory=list)
    output_ids: list[int] = dataclasses.field(default_factory=list)
    worker: str = ""

    @property
    def finished(self) -> bool:
        return len(self.output_ids) == self.max_new_tokens and len(self.token_times_s) == self.max_new_tokens


@dataclasses.dataclass
class StepTrace:
    """One forward step of one worker: what ran, when, for which requests (for timelines)."""

    worker: str
    kind: str  # "prefill", "decode" or "mixed"
    start_s: float
    end_s: float
    request_ids: list[int]
    num_tokens: int
    sms: int | None = None  # SMs of the partition the step ran on (adaptive green split), else None
    # KV pool after the step (``Scheduler.kv_usage``): slots or pages held, of the pool's total;
    # None where the worker cannot see the pool (a split's decode side) and in older run files
    kv_used: int | None = None
    kv_total: int | None = None


@dataclasses.dataclass
class Run:
    """Everything one run recorded; every mode returns this same object."""

    mode: str
    model: str
    workload: str
    config: RunConfig
    env: dict[str, Any]
    traces: list[RequestTrace]
    steps: list[StepTrace] = dataclasses.field(default_factory=list)
    monitor: list[dict[str, float]] = dataclasses.field(default_factory=list)
    memory: dict[str, Any] = dataclasses.field(default_factory=dict)
    wall_s: float | None = None

    def __post_init__(self) -> None:
        if isinstance(self.config, Mapping):  # the untyped dict of older code and records
            self.config = RunConfig.from_legacy(self.config, self.mode, self.workload, len(self.traces))
        if self.wall_s is None:
            ends = [t.token_times_s[-1] for t in self.traces if t.token_times_s]
            self.wall_s = max(ends) if ends else 0.0

    # ---- tables ---------------------------------------------------------------------
    @property
    def requests(self):
        """One row per request: TTFT, TPOT, E2E, ITL p50/p99/max, prefill and decode time."""
        import pandas as pd

        rows = []
        for t in sorted(self.traces, key=lambda t: t.id):
            times = t.token_times_s
            n = len(times)
            ttft = times[0] - t.arrival_s if n else math.nan
            e2e = times[-1] - t.arrival_s if n else math.nan
            tpot = (e2e - ttft) / (n - 1) if n > 1 else math.nan
            gaps = np.diff(times) if n > 1 else np.array([])
            prefill = (
                t.prefill_end_s - t.prefill_start_s
                if t.prefill_start_s is not None and t.prefill_end_s is not None
                else math.nan
            )
            rows.append(
                {
                    "id": t.id,
                    "worker": t.worker,
                    "arrival_s": t.arrival_s,
                    "prompt_len": t.prompt_len,
                    "output_len": n,
                    "queue_s": (t.prefill_start_s - t.arrival_s) if t.prefill_start_s is not None else math.nan,
                    "prefill_s": prefill,
                    "decode_s": (times[-1] - times[0]) if n > 1 else 0.0,
                    "ttft_s": ttft,
                    "tpot_s": tpot,
                    "e2e_s": e2e,
                    "itl_p50_s": float(np.percentile(gaps, 50)) if gaps.size else math.nan,
                    "itl_p99_s": float(np.percentile(gaps, 99)) if gaps.size else math.nan,
                    "itl_max_s": float(gaps.max()) if gaps.size else math.nan,
                }
            )
        return pd.DataFrame(rows)

    def itl_gaps(self) -> np.ndarray:
        """Every inter-token gap of every request, pooled (the ITL distribution)."""
        gaps = [np.diff(t.token_times_s) for t in self.traces if len(t.token_times_s) > 1]
        return np.concatenate(gaps) if gaps else np.array([])

    def output_ids(self) -> dict[int, list[int]]:
        return {t.id: list(t.output_ids) for t in self.traces}

    def summary(self, slo: SLO | None = None) -> dict[str, Any]:
        """Throughput, request rate, p50/p90/p99 of TTFT/TPOT/ITL/E2E, and goodput at ``slo``.

        Without ``slo``: the SLO the run was made with (``config.slo``, set by
        ``splitlab.run(..., slo=...)``), else ``SLO()``'s defaults. The goodput keys are those
        of ``goodput``: which requests met every bound, and the attainment of each bound.
        ``preemptions``: sequences a paged KV pool preempted (``memory``; None when unrecorded).
        """
        if slo is None:
            slo = self.config.slo or SLO()
        table = self.requests
        wall = self.wall_s or math.nan
        out_tokens = int(table["output_len"].sum())
        out: dict[str, Any] = {
            "mode": self.mode,
            "model": self.model,
            "workload": self.workload,
            "num_requests": len(table),
            "completed": int(sum(t.finished for t in self.traces)),
            "output_tokens": out_tokens,
            "wall_s": wall,
            "throughput_tok_s": out_tokens / wall if wall > 0 else math.nan,
            "request_rate_s": len(table) / wall if wall > 0 else math.nan,
        }
        for col, name in (("ttft_s", "ttft"), ("tpot_s", "tpot"), ("e2e_s", "e2e")):
            values = table[col].dropna().to_numpy()
            for p in PERCENTILES:
                out[f"{name}_p{p}_s"] = float(np.percentile(values, p)) if values.size else math.nan
        gaps = self.itl_gaps()
        for p in PERCENTILES:
            out[f"itl_p{p}_s"] = float(np.percentile(gaps, p)) if gaps.size else math.nan
        itl = itl_statistic(request_gaps(self.traces), slo.itl_quantile) if slo.itl_s is not None else None
        out.update(goodput(table, wall, slo, itl=itl))
        if self.memory:
            out["peak_memory_bytes"] = self.memory.get("peak_bytes")
        # a paged pool that ran out preempts (and recomputes); None where the mode counts none
        out["preemptions"] = (self.memory or {}).get("preemptions")
        return out

    # ---- persistence ----------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "format": RUN_FORMAT,
            "mode": self.mode,
            "model": self.model,
            "workload": self.workload,
            "config": self.config.to_dict(),
            "env": self.env,
            "wall_s": self.wall_s,
            "memory": self.memory,
            "traces": [dataclasses.asdict(t) for t in self.traces],
            "steps": [dataclasses.asdict(s) for s in self.steps],
            "monitor": self.monitor,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Run":
        if data.get("format") not in RUN_FORMATS:
            raise SplitlabError(
                f"not a splitlab run (format={data.get('format')!r}); expected one of {', '.join(RUN_FORMATS)}"
            )
        # format 1 held an untyped config dict: Run converts it once (RunConfig.from_legacy)
        config = data["config"] if data["format"] != RUN_FORMAT else RunConfig.from_dict(data["config"])
        return cls(
            mode=data["mode"],
            model=data["model"],
            workload=data["workload"],
            config=config,
            env=data["env"],
            traces=[RequestTrace(**t) for t in data["traces"]],
            steps=[StepTrace(**s) for s in data.get("steps", [])],
            monitor=data.get("monitor", []),
            memory=data.get("memory", {}),
            wall_s=data.get("wall_s"),
        )

    def save(self, path: str | Path) -> Path:
        """Write the run as one JSON file (everything needed to recompute every metric);
        gzip-compressed when ``path`` ends in ``.gz`` (a run's step trace compresses ~10x).
        Written whole or not at all (see ``write_json_file``); RunFileError if it cannot be."""
        path = Path(path).expanduser()
        write_json_file(path, to_jsonable(self.to_dict()))
        return path


def load_run(path: str | Path) -> Run:
    """Read a run written by ``Run.save`` (``.json`` or ``.json.gz``).

    A missing, truncated, corrupted or foreign file raises one RunFileError naming it.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise RunFileError(f"no run file at {path}; give the path of a JSON written by Run.save")
    try:
        data = read_json_file(path)
    except (OSError, EOFError, ValueError, zlib.error) as exc:  # ValueError: bad JSON or UTF-8
        raise RunFileError(f"cannot read the run file {path}: it is truncated or corrupted "
                           f"({type(exc).__name__}: {str(exc)[:200]}); save the run again or delete it") from exc
    if not isinstance(data, dict):
        raise RunFileError(f"{path} is not a splitlab run (its JSON is a {type(data).__name__}, not an object)")
    try:
        return Run.from_dict(data)
    except SplitlabError as exc:
        raise RunFileError(f"{path}: {exc}") from exc
    except (KeyError, TypeError, AttributeError, ValueError) as exc:
        what = f"the field {exc} is missing" if isinstance(exc, KeyError) else f"{type(exc).__name__}: {exc}"
        raise RunFileError(f"{path} is not a complete splitlab run ({what}); save the run again") from exc


def check_writable(path: str | Path) -> Path:
    """``path`` as a Path when a file can be written there (missing folders will be made),
    else a RunFileError saying why: checked before a run, a bad ``--save`` fails before the work."""
    path = Path(path).expanduser()
    if path.is_dir():
        raise RunFileError(f"cannot write {path}: it is a folder; give a file name, e.g. {path / 'run.json'}")
    if path.exists() and not os.access(path, os.W_OK):
        raise RunFileError(f"cannot write {path}: the file exists and is not writable")
    folder = path.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir():
        raise RunFileError(f"cannot write {path}: {folder} is a file, not a folder")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise RunFileError(f"cannot write {path}: no permission to write in {folder}")
    return path


def write_json_file(path: Path, data: Any) -> None:
    """JSON to ``path``; gzip-compressed when its name ends in ``.gz``. Missing folders are made.

    Written whole or not at all: into a temporary file in the same folder, then renamed over
    ``path`` (``os.replace`` is atomic), so a crash or a full disk never leaves a truncated file.
    """
    path = check_writable(path)
    body = json.dumps(data, indent=1).encode()  # serialised first: a bad value touches no file
    if path.suffix == ".gz":
        import gzip

        # mtime 0 and no file name in the header: the same run gives the same bytes
        body = gzip.compress(body, mtime=0)
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # os.open with 0o666: the umask applies, as it would to a plain open()
        with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), "wb") as f:
            f.write(body)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise RunFileError(f"cannot write {path}: {exc.strerror or exc}") from exc
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def read_json_file(path: Path) -> Any:
    """The JSON in ``path`` (``.gz``: gzip-compressed). A damaged file raises what the reader
    met (OSError, EOFError, ValueError, zlib.error); ``load_run`` turns that into RunFileError."""
    if path.suffix == ".gz":
        import gzip

        with gzip.open(path, "rt") as f:
            return json.load(f)
    return json.loads(path.read_text())


def request_gaps(traces: Iterable[RequestTrace]) -> list[np.ndarray]:
    """The inter-token gaps of each request, in the row order of ``Run.requests`` (by id)."""
    return [np.diff(t.token_times_s) for t in sorted(traces, key=lambda t: t.id)]


def itl_statistic(gaps: Iterable[np.ndarray], quantile: float = 1.0) -> np.ndarray:
    """Per request, the gap statistic an ITL bound judges: its largest gap (``quantile`` 1)
    or the ``quantile`` of its own gaps (numpy's linear interpolation); NaN without gaps."""
    return np.array([float(np.quantile(g, quantile)) if len(g) else math.nan for g in gaps], dtype=float)


def slo_checks(table, slo: SLO, itl=None):
    """Per request (a row of ``Run.requests``), whether it meets each bound of ``slo``.

    Columns ``ttft``, ``tpot``, ``itl``, ``e2e`` and ``all``. An unbounded metric is met by
    every request that produced a token; a request without tokens meets nothing. A
    one-token request has no TPOT and no gap: those bounds do not judge it. ``itl``: the
    per-request gap statistic (``itl_statistic``) in the table's row order; without it the
    table's ``itl_max_s`` (quantile 1) or ``itl_p99_s`` (quantile 0.99) column is used.
    """
    import pandas as pd

    produced = (table["output_len"] > 0).to_numpy()
    if slo.itl_s is not None and itl is None:
        column = {1.0: "itl_max_s", 0.99: "itl_p99_s"}.get(slo.itl_quantile)
        if column is None or column not in table:
            raise ConfigError(f"judging the p{slo.itl_quantile * 100:g} gap of each request needs its gaps: "
                              "pass itl=itl_statistic(request_gaps(run.traces), quantile), or use Run.summary")
        itl = table[column].to_numpy(float)
    values = {"ttft": table["ttft_s"].to_numpy(float), "tpot": table["tpot_s"].to_numpy(float),
              "itl": None if itl is None else np.asarray(itl, dtype=float), "e2e": table["e2e_s"].to_numpy(float)}
    if values["itl"] is not None and len(values["itl"]) != len(table):
        raise ConfigError(f"itl has {len(values['itl'])} values for {len(table)} requests; give one per row")
    checks = {}
    for key, bound in (("ttft", slo.ttft_s), ("tpot", slo.tpot_s), ("itl", slo.itl_s), ("e2e", slo.e2e_s)):
        if bound is None:
            checks[key] = produced.copy()
            continue
        v = values[key]
        # NaN TPOT / gap statistic: a one-token request, which these bounds do not judge
        exempt = np.isnan(v) if key in ("tpot", "itl") else np.zeros(len(v), dtype=bool)
        checks[key] = produced & (exempt | (v <= bound))
    checks["all"] = np.logical_and.reduce([checks[k] for k in ("ttft", "tpot", "itl", "e2e")])
    return pd.DataFrame(checks, index=table.index)


def goodput(table, wall_s: float, slo: SLO, itl=None) -> dict[str, Any]:
    """Requests meeting EVERY bound of ``slo``, per second of wall time, and which bound failed.

    ``slo_met`` / ``slo_attainment`` / ``goodput_req_s``: requests meeting every bound
    (count, fraction of all requests, per second of ``wall_s``). ``slo_attainment_<bound>``
    (ttft, tpot, itl, e2e): the fraction meeting that bound alone, NaN when the SLO leaves
    it unbounded. ``slo_<bound>_s``: the bounds (None = unbounded); ``slo``: in words.
    ``itl``: as in ``slo_checks``.
    """
    checks = slo_checks(table, slo, itl)
    n = len(table)
    met = int(checks["all"].sum())
    out: dict[str, Any] = {
        "slo": slo.describe(),
        "slo_ttft_s": slo.ttft_s,
        "slo_tpot_s": slo.tpot_s,
        "slo_itl_s": slo.itl_s,
        "slo_itl_quantile": slo.itl_quantile,
        "slo_e2e_s": slo.e2e_s,
        "slo_met": met,
        "slo_attainment": met / n if n else math.nan,
        "goodput_req_s": met / wall_s if wall_s and wall_s > 0 else math.nan,
    }
    for key in ("ttft", "tpot", "itl", "e2e"):
        bounded = getattr(slo, f"{key}_s") is not None
        out[f"slo_attainment_{key}"] = float(checks[key].sum()) / n if bounded and n else math.nan
    return out


def summaries_table(runs: Iterable[Run], slo: SLO | None = None):
    """One summary row per run, as a pandas DataFrame (``slo``: as in ``Run.summary``)."""
    import pandas as pd

    return pd.DataFrame([r.summary(slo) for r in runs])


def to_jsonable(value: Any) -> Any:
    """Strict-JSON form of ``value``: NaN/inf become None (browsers and pandas read the file),
    numpy and torch scalars become Python numbers, dict keys become strings."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v) for v in value]
    if isinstance(value, np.generic) or (hasattr(value, "item") and callable(value.item)):
        try:
            return to_jsonable(value.item())
        except (TypeError, ValueError, RuntimeError):  # e.g. a tensor of several elements
            return str(value)
    return value

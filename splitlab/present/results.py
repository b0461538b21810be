"""Results folders: runs saved as JSON with an index, benchmark JSONs, and the recorded gallery.

A results folder holds::

    index.json            {"format": "splitlab.results/1", "runs": [entry, ...]}
    <run>.json            one file per run, written by Run.save (format splitlab.run/2; /1 still reads)
    profile_<gpu>.json    free-form benchmark JSONs, e.g. save_profile (format splitlab.profile/1)

Each index entry names the run's file and what a person selects runs by: ``mode``,
``backend``, ``model``, ``workload``, ``rate`` (requests/s, when the workload had one),
``prefill_share`` / ``decode_share`` (MPS SM percentages, when set), ``label``, ``date``,
``gpu``. ``load_results`` turns a folder into a tidy table (index entry + ``Run.summary``
columns, one row per run) and a dict of the runs themselves.

``select_runs`` is the selection logic the widgets use (pure, tested); ``recorded(kind)``
finds the GPU results committed under the repository's ``results/`` folder.

Plain JSON and pandas only: importable on a bare GPU machine (pandas is imported lazily).
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import math
import os
import re
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from splitlab.errors import SplitlabError
from splitlab.measure.metrics import RUN_FORMATS, to_jsonable

INDEX = "index.json"
# format names are part of the files (recorded results hold these): never renamed with modules
RESULTS_FORMAT = "splitlab.results/1"
PROFILE_FORMAT = "splitlab.profile/1"
INDEX_COLUMNS = ("id", "file", "mode", "backend", "model", "workload", "rate", "prefill_share",
                 "decode_share", "label", "date", "gpu")


# ---- describing a run -------------------------------------------------------------------

def run_meta(run) -> dict[str, Any]:
    """The index entry of a run (without file/id): what runs are chosen and labelled by."""
    cfg = run.config
    env = run.env or {}
    meta = {
        "mode": run.mode,
        "backend": cfg.backend,
        "model": run.model,
        "workload": run.workload,
        "rate": _float_or_none(cfg.rate),
        "prefill_share": _float_or_none(cfg.prefill_share),
        "decode_share": _float_or_none(cfg.decode_share),
        "replicas": cfg.replicas,
        "date": env.get("date"),
        "gpu": env.get("gpu_name") or ("cpu" if env.get("device") == "cpu" else env.get("device")),
    }
    meta["label"] = run_label(meta)
    return meta


def run_label(run_or_meta) -> str:
    """A short human label: mode + backend + shares (+ replica count), e.g. ``split mps 40/60``."""
    meta = run_or_meta if isinstance(run_or_meta, Mapping) else run_meta(run_or_meta)
    parts = [str(meta.get("mode") or "?")]
    if meta.get("replicas"):
        parts.append(f"x{meta['replicas']}")
    if meta.get("backend"):
        parts.append(str(meta["backend"]))
    p, d = meta.get("prefill_share"), meta.get("decode_share")
    if _present(p) or _present(d):
        parts.append(f"{_fmt_share(p)}/{_fmt_share(d)}")
    return " ".join(parts)


# ---- saving and loading runs -------------------------------------------------------------

def save_runs(runs: Iterable, folder: str | Path, names: Sequence[str] | None = None,
              compress: bool = False) -> Path:
    """Write each run as ``<name>.json`` in ``folder`` and (re)write ``index.json``.

    Entries already in the index are kept unless a new run takes the same file name.
    ``compress``: ``<name>.json.gz`` instead (for results committed to a repository).
    Returns the index path.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    runs = list(runs)
    if names is not None and len(names) != len(runs):
        raise SplitlabError(f"save_runs got {len(runs)} runs but {len(names)} names; give one name per run")
    index = _read_index(folder) if (folder / INDEX).is_file() else {"format": RESULTS_FORMAT, "runs": []}
    entries = {e["file"]: e for e in index.get("runs", [])}
    now = _now()
    taken = set(entries)
    for i, run in enumerate(runs):
        meta = run_meta(run)
        stem = _slug(names[i]) if names is not None else _unique(_slug(f"{meta['label']} {meta['workload']}"), taken)
        file = f"{stem}.json.gz" if compress else f"{stem}.json"
        taken.add(file)
        run.save(folder / file)
        entries[file] = {"id": stem, "file": file, **meta, "date": meta["date"] or now}
    index["runs"] = list(entries.values())
    path = folder / INDEX
    path.write_text(json.dumps(to_jsonable(index), indent=1))
    return path


def load_results(folder: str | Path, slo=None):
    """``(table, runs)``: one row per run (index entry + ``Run.summary(slo)``), runs by id.

    Without an ``index.json``, every ``*.json`` / ``*.json.gz`` run file of the folder is read.
    """
    from splitlab.measure.metrics import Run

    folder = Path(folder)
    if not folder.is_dir():
        raise SplitlabError(f"no results folder at {folder}; give a folder written by save_runs")
    if (folder / INDEX).is_file():
        entries = _read_index(folder).get("runs", [])
    else:
        entries = []
        for path in sorted([*folder.glob("*.json"), *folder.glob("*.json.gz")]):
            data = _read_json(path)
            if isinstance(data, dict) and data.get("format") in RUN_FORMATS:
                entries.append({"id": path.name.split(".json")[0], "file": path.name, "_data": data})
    runs: dict[str, Any] = {}
    rows = []
    for entry in entries:
        data = entry.pop("_data", None)
        path = folder / entry["file"]
        if data is None:
            if not path.is_file():
                raise SplitlabError(f"{folder / INDEX} lists {entry['file']} but the file is missing")
            data = _read_json(path)
        run = Run.from_dict(data)
        rid = str(entry.get("id") or path.stem)
        runs[rid] = run
        rows.append(_row(run, {**{k: v for k, v in entry.items() if v is not None}, "id": rid, "file": entry["file"]},
                         slo))
    return _table(rows), runs


def runs_table(runs, slo=None):
    """``(table, runs)`` as ``load_results`` gives it, of runs in memory: ``{name: Run}`` (the
    names become the ids) or a list of runs (ids ``0``, ``1``, ...)."""
    named = dict(runs) if isinstance(runs, dict) else {str(i): r for i, r in enumerate(runs)}
    if not named:
        raise SplitlabError("runs_table: give at least one Run")
    return _table([_row(run, {"id": rid}, slo) for rid, run in named.items()]), named


def _row(run, entry: dict[str, Any], slo) -> dict[str, Any]:
    """One table row: the run's facts, what the index says of it, its summary under ``slo``."""
    row = {**run_meta(run), **entry}
    row.update({k: v for k, v in run.summary(slo).items() if k not in row})
    return row


def _table(rows: list[dict[str, Any]]):
    import pandas as pd

    table = pd.DataFrame(rows)
    if rows:
        first = [c for c in INDEX_COLUMNS if c in table.columns]
        table = table[first + [c for c in table.columns if c not in first]]
    return table


def _read_index(folder: Path) -> dict[str, Any]:
    data = _read_json(folder / INDEX)
    if not isinstance(data, dict) or data.get("format") != RESULTS_FORMAT:
        raise SplitlabError(f"{folder / INDEX} is not a splitlab results index (format {RESULTS_FORMAT!r})")
    return data


# ---- selection (what the widgets call) -------------------------------------------------------

def select_runs(table, rate: float | None = None, share: float | None = None, *, mode: str | Sequence[str] | None = None,
                backend: str | None = None, model: str | None = None, workload: str | None = None,
                share_column: str = "prefill_share"):
    """Rows of ``table`` matching a selection; ``rate`` and ``share`` snap to the nearest recorded value.

    Exact filters first (``mode`` (one or several), ``backend``, ``model``, ``workload``);
    then, among what is left, rows whose rate is the recorded rate nearest ``rate``, and
    whose ``share_column`` is the recorded share nearest ``share``. Rows without a share
    (modes that have none, e.g. ``serial``) are kept when a share is asked for, so a slider
    over the split runs' shares leaves the baselines in view. ``None`` means "any".
    """
    out = table
    if mode is not None:
        modes = [mode] if isinstance(mode, str) else list(mode)
        out = out[out["mode"].isin(modes)]
    for col, value in (("backend", backend), ("model", model), ("workload", workload)):
        if value is not None and col in out.columns:
            out = out[out[col] == value]
    if rate is not None and "rate" in out.columns:
        near = nearest(out["rate"].dropna().unique(), rate)
        if near is not None:
            out = out[out["rate"] == near]
    if share is not None and share_column in out.columns:
        near = nearest(out[share_column].dropna().unique(), share)
        if near is not None:
            out = out[(out[share_column] == near) | out[share_column].isna()]
    return out


def nearest(values: Iterable[float], target: float) -> float | None:
    """The value closest to ``target`` (ties: the smaller), or None when there are none."""
    vals = sorted(float(v) for v in values if v is not None and not (isinstance(v, float) and math.isnan(v)))
    if not vals:
        return None
    return min(vals, key=lambda v: (abs(v - target), v))


def choices(table, column: str) -> list:
    """Sorted distinct non-missing values of a column (for sliders and dropdowns)."""
    if column not in table.columns:
        return []
    return sorted(table[column].dropna().unique().tolist())


# ---- profiles (benchmark JSONs) ----------------------------------------------------------------

@dataclasses.dataclass
class Profile:
    """A saved profile sweep: its table, the ceilings it was judged against, and provenance."""

    table: Any  # pandas DataFrame
    ceilings: Any  # profile.Ceilings
    datasheet: Any  # profile.GPUSpec or None
    meta: dict[str, Any]  # command, date, gpu, versions, env, path


def save_profile(table, ceilings, path: str | Path, command: str | None = None, datasheet: Any = "auto",
                 extra: Mapping[str, Any] | None = None) -> Path:
    """Write a profile sweep (DataFrame or list of dicts) with its ceilings and provenance."""
    from splitlab.system.env import environment
    from splitlab.measure.profile import GPUSpec, datasheet_for

    records = table.to_dict(orient="records") if hasattr(table, "to_dict") and not isinstance(table, list) else list(table)
    spec = datasheet_for(ceilings.device_name) if datasheet == "auto" else datasheet
    env = environment()
    doc = {
        "format": PROFILE_FORMAT,
        "command": command,
        "date": _now(),
        "gpu": ceilings.device_name,
        "versions": env.get("versions"),
        "env": env,
        "ceilings": ceilings.to_dict(),
        "datasheet": spec.to_dict() if isinstance(spec, GPUSpec) else None,
        "table": records,
    }
    if extra:
        doc.update(dict(extra))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(to_jsonable(doc), indent=1))
    return path


def load_profile(path: str | Path) -> Profile:
    """Read a file written by ``save_profile``."""
    import pandas as pd

    from splitlab.measure.profile import DATASHEET, Ceilings, GPUSpec

    path = Path(path)
    if not path.is_file():
        raise SplitlabError(f"no profile file at {path}")
    data = _read_json(path)
    if not isinstance(data, dict) or data.get("format") != PROFILE_FORMAT:
        raise SplitlabError(f"{path} is not a splitlab profile (format {PROFILE_FORMAT!r})")
    sheet = data.get("datasheet")
    spec = None
    if sheet:
        spec = DATASHEET.get(sheet.get("name")) or GPUSpec(**{k: sheet[k] for k in ("name", "bf16_tflops", "mem_tb_s")},
                                                          note=sheet.get("note", ""))
    meta = {k: v for k, v in data.items() if k not in ("table", "ceilings", "datasheet")}
    meta["path"] = str(path)
    return Profile(table=pd.DataFrame(data.get("table", [])), ceilings=Ceilings.from_dict(data["ceilings"]),
                   datasheet=spec, meta=meta)


def find_profiles(folder: str | Path) -> list[Path]:
    """Profile JSONs (format splitlab.profile/1) directly in ``folder``."""
    out = []
    for path in sorted(Path(folder).glob("*.json")):
        if path.name == INDEX:
            continue
        data = _read_json(path, missing_ok=True)
        if isinstance(data, dict) and data.get("format") == PROFILE_FORMAT:
            out.append(path)
    return out


# ---- the recorded gallery ------------------------------------------------------------------

def results_root() -> Path:
    """``$SPLITLAB_RESULTS``, else the repository's ``results/`` folder (next to the package)."""
    env = os.environ.get("SPLITLAB_RESULTS")
    return Path(env) if env else Path(__file__).resolve().parents[2] / "results"


def load_recorded(name: str, made_by: str, show: Sequence[str] = (), root: str | Path | None = None
                  ) -> dict[str, Any] | None:
    """A benchmark's JSON under ``results/`` (``name``), after printing where it came from (GPU,
    date, command and the keys in ``show``); None, after printing which command writes it
    (``made_by``), when it is not recorded. What every notebook shows beside a recorded figure."""
    path = (Path(root) if root is not None else results_root()) / name
    if not path.is_file():
        print(f"No recorded GPU result yet: {path} does not exist. It is written by `{made_by}` on an H200.")
        return None
    data = _read_json(path)
    if not isinstance(data, dict):
        raise SplitlabError(f"{path} holds no benchmark result (a JSON object); rewrite it with `{made_by}`")
    extra = "".join(f"\n{key}: {data.get(key)}" for key in show)
    print(f"RECORDED on {data.get('gpu') or data.get('gpu_name')}, {data.get('date')}\n"
          f"command: {data.get('command')}{extra}")
    return data


def recorded(kind: str = "runs", root: str | Path | None = None) -> list[Path]:
    """Recorded results under ``results/``: ``"profile"`` -> profile JSONs (top level and one
    folder down); ``"runs"`` -> folders holding an ``index.json`` (the root included).
    An empty list where nothing is recorded (e.g. a pip-installed package without the repo)."""
    base = Path(root) if root is not None else results_root()
    if kind not in ("runs", "profile"):
        raise SplitlabError(f"recorded(kind) takes 'runs' or 'profile', got {kind!r}")
    if not base.is_dir():
        return []
    folders = [base] + sorted(p for p in base.iterdir() if p.is_dir())
    if kind == "profile":
        return [p for f in folders for p in find_profiles(f)]
    return [f for f in folders if (f / INDEX).is_file()]


# ---- helpers -------------------------------------------------------------------------------

def _read_json(path: Path, missing_ok: bool = False):
    from splitlab.measure.metrics import read_json_file

    try:
        return read_json_file(Path(path))
    except FileNotFoundError:
        if missing_ok:
            return None
        raise SplitlabError(f"missing file {path}") from None
    except (json.JSONDecodeError, UnicodeDecodeError, OSError, EOFError) as exc:  # OSError: a bad gzip
        if missing_ok:
            return None
        raise SplitlabError(f"{path} is not valid JSON ({exc})") from None


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", str(text)).strip("-._") or "run"


def _unique(stem: str, taken: set[str]) -> str:
    name, i = stem, 2
    while f"{name}.json" in taken:
        name = f"{stem}-{i}"
        i += 1
    return name


def _float_or_none(value) -> float | None:
    try:
        out = float(value)
    except (TypeError, ValueError):
        return None
    return out if math.isfinite(out) else None


def _present(value) -> bool:
    return value is not None and not (isinstance(value, float) and math.isnan(value))


def _fmt_share(value) -> str:
    if not _present(value):
        return "-"
    return f"{value:g}"

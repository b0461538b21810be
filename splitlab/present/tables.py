"""What each column of splitlab's tables means, in words and units, and tables for people.

``COLUMNS`` is the one mapping from a column name to a title, the unit of its stored value
and how it is printed; ``column_title`` reads it for axis titles (``ttft_p99_s`` ->
``TTFT p99 (s)``) and ``for_people`` for tables. Columns it does not name are read from
their names (``..._s`` seconds, ``..._bytes`` bytes, ``p<N>`` percentiles) and values.

``for_people(df)`` returns the table as text: bytes as GiB/MiB, counts as integers, seconds
as s/ms/µs, fractions as percentages, large numbers with SI prefixes, columns with no value
dropped, dicts and lists written out as ``key=value`` text (never a truncated repr).

pandas only (imported lazily); no plotly.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Mapping


@dataclasses.dataclass(frozen=True)
class Column:
    """``title``: words; ``unit``: of the stored value (what an axis shows); ``kind``: how a
    table prints it (text, count, seconds, bytes, fraction, share, si, number)."""

    title: str
    unit: str = ""
    kind: str = "number"


_LATENCY_WORDS = {"ttft": "TTFT", "tpot": "TPOT", "itl": "ITL", "e2e": "E2E"}

COLUMNS: dict[str, Column] = {
    "id": Column("id", kind="text"),
    "file": Column("file", kind="text"),
    "label": Column("run", kind="text"),
    "legend": Column("run", kind="text"),
    "experiment": Column("experiment", kind="text"),
    "mode": Column("mode", kind="text"),
    "backend": Column("backend", kind="text"),
    "model": Column("model", kind="text"),
    "workload": Column("workload", kind="text"),
    "gpu": Column("GPU", kind="text"),
    "date": Column("date", kind="text"),
    "slo": Column("SLO", kind="text"),
    "rate": Column("arrival rate", "req/s"),
    "prefill_share": Column("prefill SM share", "%", "share"),
    "decode_share": Column("decode SM share", "%", "share"),
    "replicas": Column("replicas", kind="count"),
    "num_requests": Column("requests", kind="count"),
    "completed": Column("completed", kind="count"),
    "output_tokens": Column("output tokens", kind="count"),
    "slo_met": Column("requests meeting the SLO", kind="count"),
    "wall_s": Column("wall time", "s", "seconds"),
    "throughput_tok_s": Column("throughput", "output tok/s"),
    "request_rate_s": Column("requests served", "req/s"),
    "goodput_req_s": Column("goodput", "req/s"),
    "slo_attainment": Column("SLO attainment", "fraction of requests", "fraction"),
    "slo_itl_quantile": Column("SLO gap quantile", "fraction", "fraction"),
    "peak_memory_bytes": Column("peak GPU memory", "bytes", "bytes"),
    # profile sweeps (splitlab.measure.profile)
    "phase": Column("phase", kind="text"),
    "bound": Column("bound", kind="text"),
    "dtype": Column("dtype", kind="text"),
    "device": Column("device", kind="text"),
    "batch": Column("batch size", kind="count"),
    "tokens": Column("tokens (prompt length or context)", kind="count"),
    "time_s": Column("step time", "s", "seconds"),
    "roof_time_s": Column("time at the roof", "s", "seconds"),
    "tokens_per_s": Column("tokens/s", "tok/s"),
    "flops": Column("work", "FLOP", "si"),
    "bytes": Column("memory traffic", "bytes", "bytes"),
    "achieved_flops_s": Column("achieved", "FLOP/s", "si"),
    "achieved_bytes_s": Column("achieved bandwidth", "B/s", "si"),
    "intensity": Column("arithmetic intensity", "FLOP/B"),
    "frac_of_roof": Column("fraction of the roof", "fraction", "fraction"),
    "measured_over_datasheet": Column("measured / datasheet", "fraction", "fraction"),
}

# kinds whose printed cell carries its unit: the table header leaves it out
_UNIT_IN_CELL = ("seconds", "bytes", "fraction", "si")


def column_info(column: str) -> Column:
    """The ``Column`` of a name: from ``COLUMNS``, else read from the name."""
    if column in COLUMNS:
        return COLUMNS[column]
    parts = column.split("_")
    if len(parts) == 3 and parts[0] in _LATENCY_WORDS and re.fullmatch(r"p\d+(\.\d+)?|mean|max", parts[1]) \
            and parts[2] == "s":
        return Column(f"{_LATENCY_WORDS[parts[0]]} {parts[1]}", "s", "seconds")
    if len(parts) == 3 and parts[0] == "slo" and parts[1] in _LATENCY_WORDS and parts[2] == "s":
        return Column(f"SLO bound on {_LATENCY_WORDS[parts[1]]}", "s", "seconds")
    if len(parts) == 3 and parts[:2] == ["slo", "attainment"] and parts[2] in _LATENCY_WORDS:
        return Column(f"{_LATENCY_WORDS[parts[2]]} bound met", "fraction of requests", "fraction")
    if column.endswith("_bytes"):
        return Column(column[:-6].replace("_", " "), "bytes", "bytes")
    if column.endswith("_s") and not column.endswith("_per_s"):
        return Column(column[:-2].replace("_", " "), "s", "seconds")
    return Column(column.replace("_", " "))


def column_title(column: str) -> str:
    """An axis title with its unit: ``ttft_p99_s`` -> ``TTFT p99 (s)``."""
    info = column_info(column)
    return f"{info.title} ({info.unit})" if info.unit else info.title


def header(column: str) -> str:
    """A table header: the title, with the unit unless every cell prints its own."""
    info = column_info(column)
    return info.title if info.kind in _UNIT_IN_CELL or not info.unit else f"{info.title} ({info.unit})"


# ---- formatting one value -------------------------------------------------------------------

def missing(value: Any) -> bool:
    if value is None:
        return True
    if isinstance(value, float):
        return math.isnan(value)
    try:
        import pandas as pd

        return bool(pd.isna(value)) if not isinstance(value, (Mapping, list, tuple, set)) else False
    except (TypeError, ValueError, ImportError):
        return False


def fmt_seconds(value: float) -> str:
    """``0.0671`` -> ``67.1 ms``; three significant figures, µs / ms / s / min."""
    v = float(value)
    a = abs(v)
    if a == 0:
        return "0 s"
    if a < 1e-3:
        return f"{v * 1e6:.3g} µs"
    if a < 1:
        return f"{v * 1e3:.3g} ms"
    if a < 600:
        return f"{v:.3g} s"
    return f"{v / 60:.3g} min"


def fmt_bytes(value: float) -> str:
    """``35624580608`` -> ``33.2 GiB`` (binary prefixes, three significant figures)."""
    v = float(value)
    for unit, size in (("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if abs(v) >= size:
            return f"{v / size:.3g} {unit}"
    return f"{v:.0f} B"


_SI = ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k"))


def fmt_si(value: float, unit: str = "") -> str:
    """``1.649317e+11`` FLOP -> ``165 GFLOP``."""
    v = float(value)
    for size, prefix in _SI:
        if abs(v) >= size:
            return f"{v / size:.3g} {prefix}{unit}".rstrip()
    return f"{v:.3g} {unit}".rstrip()


def fmt_number(value: float) -> str:
    """Integers as integers (``21.000`` -> ``21``, ``35,624``), others with three or four
    significant figures; from a million on, an SI prefix (``1.649317e+11`` -> ``165 G``)."""
    v = float(value)
    if math.isinf(v):
        return "∞" if v > 0 else "-∞"
    a = abs(v)
    if a >= 1e6:
        return fmt_si(v)
    if v.is_integer():
        return f"{int(v):,}"
    if a >= 1000:
        return f"{v:,.0f}"
    if a >= 1:
        return f"{v:.4g}"
    if a >= 1e-3:
        return f"{v:.3g}"
    return f"{v:.2e}"


def format_value(value: Any, column: str = "", kind: str | None = None) -> str:
    """One cell as a person reads it (``""`` when missing)."""
    if isinstance(value, Mapping):
        return ", ".join(f"{k}={format_value(v)}" for k, v in value.items() if not missing(v))
    if isinstance(value, (list, tuple, set)):
        return ", ".join(format_value(v) for v in value)
    if missing(value):
        return ""
    if hasattr(value, "to_dict") and callable(value.to_dict):  # a config object: its fields
        return format_value(value.to_dict())
    if isinstance(value, bool):
        return "yes" if value else "no"
    info = column_info(column) if column else Column("")
    kind = kind or info.kind
    if isinstance(value, str) or kind == "text":
        return str(value)
    try:
        value = float(value)
    except (TypeError, ValueError):
        return str(value)
    if kind == "seconds":
        return fmt_seconds(value)
    if kind == "bytes":
        return fmt_bytes(value)
    if kind == "fraction":
        return f"{float(value) * 100:.3g}%"
    if kind == "si":
        return fmt_si(value, info.unit)
    if kind == "count":
        return fmt_number(round(value)) if math.isfinite(value) else fmt_number(value)
    return fmt_number(value)


# ---- formatting a table ------------------------------------------------------------------------

def for_people(df, columns: Mapping[str, str] | None = None, keep_empty: bool = False):
    """The table as text for a person: one formatted string per cell, readable headers.

    Columns with no value in any row are dropped (``keep_empty`` keeps them). A float
    column of whole numbers prints as integers. ``columns`` renames headers beyond
    ``COLUMNS`` ({name: header}). The result's ``attrs["numeric"]`` lists the headers of
    columns that hold numbers (to right-align them).
    """
    import pandas as pd

    out = {}
    numeric = []
    for col in df.columns:
        values = list(df[col])
        if not keep_empty and all(missing(v) or v == "" for v in values):
            continue
        kind = _kind_of(str(col), df[col])
        name = (columns or {}).get(col) or header(str(col))
        while name in out:  # two columns with one title: keep both, tell them apart
            name = f"{name} [{col}]"
        out[name] = [format_value(v, str(col), kind) for v in values]
        if kind != "text" and pd.api.types.is_numeric_dtype(df[col]):
            numeric.append(name)
    table = pd.DataFrame(out, index=df.index)
    table.attrs["numeric"] = numeric
    return table


def _kind_of(column: str, series) -> str:
    import pandas as pd

    info = column_info(column)
    if column in COLUMNS or info.kind != "number":
        return info.kind
    if pd.api.types.is_bool_dtype(series):
        return "text"
    if pd.api.types.is_numeric_dtype(series):
        finite = [float(v) for v in series if not missing(v) and math.isfinite(float(v))]
        if finite and all(v.is_integer() for v in finite):
            return "count"
        return "number"
    return "text"

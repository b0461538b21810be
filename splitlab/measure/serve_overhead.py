"""What HTTP adds: a workload run through ``splitlab serve`` + ``splitlab bench`` against the
same workload run in-process (``splitlab.run``), per mode and rate.

The client's TTFT counts from the request's arrival in the client to the first streamed
chunk (the network, HTTP, JSON and the server's tokenising included); the in-process one from
the arrival in the engine. Both runs replay the same requests at the same arrival times, but
they are two runs: scheduling noise between them shows up as "overhead" of either sign, so
the target is judged on the medians (p50) and the file keeps the p99s beside them.
"""

from __future__ import annotations

import hashlib
from typing import Any, Mapping

#: The targets: HTTP adds at most this fraction to TTFT p50, and this many seconds to ITL p50.
TTFT_P50_MAX_ADDED = 0.05
ITL_P50_MAX_ADDED_S = 0.001


def workload_shape(run) -> str:
    """A digest of the requests a run replayed (id, prompt length, output length, arrival to
    the millisecond): two runs compare only when theirs are equal."""
    rows = sorted((t.id, t.prompt_len, t.max_new_tokens, round(t.arrival_s, 3)) for t in run.traces)
    return hashlib.sha1(repr(rows).encode()).hexdigest()[:16]


def ttft_mean_s(run) -> float | None:
    """Mean TTFT over a run's requests that produced a token (exact, as the servers' histogram means)."""
    ttfts = [t.token_times_s[0] - t.arrival_s for t in run.traces if t.token_times_s]
    return sum(ttfts) / len(ttfts) if ttfts else None


def overhead(client: Mapping[str, Any], inproc: Mapping[str, Any]) -> dict[str, Any]:
    """From two ``Run.summary()`` dicts: TTFT p50 ratio - 1, ITL p50 difference (s), the p99s,
    the goodputs, and whether each target was met."""
    ttft_added = client["ttft_p50_s"] / inproc["ttft_p50_s"] - 1 if inproc["ttft_p50_s"] else None
    itl_added = client["itl_p50_s"] - inproc["itl_p50_s"] \
        if client["itl_p50_s"] is not None and inproc["itl_p50_s"] is not None else None
    return {
        "ttft_p50_s": {"http": client["ttft_p50_s"], "in_process": inproc["ttft_p50_s"]},
        "ttft_p99_s": {"http": client["ttft_p99_s"], "in_process": inproc["ttft_p99_s"]},
        "itl_p50_s": {"http": client["itl_p50_s"], "in_process": inproc["itl_p50_s"]},
        "itl_p99_s": {"http": client["itl_p99_s"], "in_process": inproc["itl_p99_s"]},
        "goodput_req_s": {"http": client["goodput_req_s"], "in_process": inproc["goodput_req_s"]},
        "completed": {"http": client["completed"], "in_process": inproc["completed"]},
        "ttft_p50_added": ttft_added,
        "itl_p50_added_s": itl_added,
        "ttft_target_met": ttft_added is not None and ttft_added <= TTFT_P50_MAX_ADDED,
        "itl_target_met": itl_added is not None and itl_added <= ITL_P50_MAX_ADDED_S,
    }


def judge(pairs: Mapping[str, tuple[Mapping[str, Any], Mapping[str, Any]]]) -> dict[str, Any]:
    """``{name: (client summary, in-process summary)}`` -> each pair's overhead and the verdict
    over all of them (met only if every pair meets both targets)."""
    rows = {name: overhead(c, i) for name, (c, i) in pairs.items()}
    ttft = [r["ttft_p50_added"] for r in rows.values() if r["ttft_p50_added"] is not None]
    itl = [r["itl_p50_added_s"] for r in rows.values() if r["itl_p50_added_s"] is not None]
    return {
        "targets": {"ttft_p50_max_added": TTFT_P50_MAX_ADDED, "itl_p50_max_added_s": ITL_P50_MAX_ADDED_S},
        "pairs": rows,
        "worst_ttft_p50_added": max(ttft) if ttft else None,
        "worst_itl_p50_added_s": max(itl) if itl else None,
        "met": bool(rows) and all(r["ttft_target_met"] and r["itl_target_met"] for r in rows.values()),
    }


def judge_rows(rows) -> dict[str, Any]:
    """``judge`` over a serve benchmark's result rows (``step``, ``side``, ``rate``, ``summary``,
    ``workload_shape``): HTTP against in-process for every (step, rate) measured both ways on the
    same requests, with where the mean TTFT went (``ttft_where``) when the rows hold it;
    ``different_requests`` names the pairs whose requests differed (not judged)."""
    by = {(r["step"], r["side"], r["rate"]): r for r in rows if "summary" in r}
    pairs, where, mismatched = {}, {}, []
    for (step, side, rate), row in by.items():
        twin = by.get((step, "in_process", rate))
        if side != "http" or twin is None:
            continue
        if row["workload_shape"] != twin["workload_shape"]:
            mismatched.append(f"{step}@{rate:g}")
            continue
        pairs[f"{step}@{rate:g}"] = (row["summary"], twin["summary"])
        parts = ttft_where(row, twin)
        if parts is not None:  # rows recorded before the server's view was kept have none
            where[f"{step}@{rate:g}"] = parts
    judged = judge(pairs)
    for name, parts in where.items():
        judged["pairs"][name]["ttft_mean_where"] = parts
    return {**judged, "different_requests": mismatched}


def ttft_where(http_row, in_process_row) -> dict[str, Any] | None:
    """Where the HTTP run's mean TTFT went, from a row's ``ttft_mean_s`` (the client's) and
    ``server_view`` (the server's histograms over the replay) beside the in-process run's mean:
    the server's parse, engine TTFT and first-token delivery, the rest outside the server (the
    HTTP server, the network, the client), and how much slower the engine's own TTFT was under
    the server than in-process. None when a row lacks them (runs recorded before they were kept)."""
    view = (http_row.get("server_view") or {}).get("histograms")
    parts = breakdown(http_row.get("ttft_mean_s"), view)
    inproc = in_process_row.get("ttft_mean_s")
    if parts is None or inproc is None:
        return None
    return {**parts, "in_process_ttft_mean_s": inproc, "engine_added_s": parts["server_ttft_mean_s"] - inproc}


def breakdown(client_ttft_mean_s: float | None, view: dict[str, dict[str, Any]] | None) -> dict[str, Any] | None:
    """The client's mean TTFT split into the server's parse, TTFT and first-token delivery, and
    the rest (the HTTP server, the network, the client); None without the server's TTFT."""
    if client_ttft_mean_s is None or not view or (view.get("ttft") or {}).get("mean_s") is None:
        return None
    parts = {key: (view.get(key) or {}).get("mean_s") for key in ("parse", "ttft", "first_delivery")}
    known = sum(v for v in parts.values() if v is not None)
    return {"client_ttft_mean_s": client_ttft_mean_s, **{f"server_{k}_mean_s": v for k, v in parts.items()},
            "outside_server_mean_s": client_ttft_mean_s - known}

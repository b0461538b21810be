"""The roofline: measured roofs, prefill and decode points (``profile_phases``)."""

from __future__ import annotations

import math
from typing import Mapping

import numpy as np

from splitlab.present.plots._base import _go, template

ROOF_COLORS = {"memory": "#E45756", "compute": "#72B7B2", "datasheet": "#888888"}


def roofline(profile_df, ceilings, datasheet=None, title: str | None = None, labels: bool = False):
    """Log-log roofline: measured memory and compute roofs, prefill and decode points.

    ``profile_df``: the table of ``profile_phases`` (columns phase, batch, tokens,
    intensity, achieved_flops_s, ...). ``ceilings``: a ``Ceilings`` (or its dict). One trace
    per phase and length (``prefill L=512``, ``decode C=2048``; `` · model · backend`` added
    when the table holds several): blue shades for prefill, orange for decode, darker for
    longer; marker size grows with the batch; the symbol tells models/backends apart; hover
    shows every number. ``labels=True`` also writes ``B=..`` beside each point.
    ``datasheet``: a ``GPUSpec`` drawn as a dashed roof for comparison.
    """
    go = _go()
    peak, bw = _ceiling_values(ceilings)
    ridge = peak / bw
    df = profile_df[np.isfinite(profile_df["achieved_flops_s"].astype(float))] if len(profile_df) else profile_df
    intens = [float(v) for v in df["intensity"]] if len(df) else []
    lo = min(intens + [ridge]) / 4
    hi = max(intens + [ridge]) * 4
    if datasheet is not None:
        lo = min(lo, datasheet.ridge / 4)
        hi = max(hi, datasheet.ridge * 4)
    fig = go.Figure()
    fig.add_trace(go.Scatter(x=[lo, ridge], y=[bw * lo, peak], mode="lines",
                             name=f"memory roof ({bw / 1e12:.3g} TB/s measured)",
                             line=dict(color=ROOF_COLORS["memory"], width=2),
                             hovertemplate="memory roof: %{y:.3s}FLOP/s at %{x:.3g} FLOP/B<extra></extra>"))
    fig.add_trace(go.Scatter(x=[ridge, hi], y=[peak, peak], mode="lines",
                             name=f"compute roof ({peak / 1e12:.3g} TFLOP/s measured; ridge {ridge:.3g} FLOP/B)",
                             line=dict(color=ROOF_COLORS["compute"], width=2),
                             hovertemplate="compute roof: %{y:.3s}FLOP/s<extra></extra>"))
    if datasheet is not None:
        fig.add_trace(go.Scatter(
            x=[lo, datasheet.ridge, hi], y=[datasheet.bytes_s * lo, datasheet.flops_s, datasheet.flops_s],
            mode="lines", name=f"datasheet roof ({datasheet.name}: {datasheet.bf16_tflops:g} TFLOP/s, "
                               f"{datasheet.mem_tb_s:g} TB/s)",
            line=dict(color=ROOF_COLORS["datasheet"], dash="dash", width=1)))
    if len(df):
        extra = [c for c in ("model", "backend") if c in df.columns and df[c].nunique() > 1]
        order = {"prefill": 0, "mixed": 1, "decode": 2}
        parts = [((k if isinstance(k, tuple) else (k,)), p) for k, p in df.groupby(["phase", "tokens"] + extra,
                                                                                    sort=False)]
        parts.sort(key=lambda kp: (order.get(kp[0][0], 3), kp[0][1]))  # stable: models keep their order
        combos = list(dict.fromkeys(k[2:] for k, _ in parts))
        lengths = {ph: sorted({k[1] for k, _ in parts if k[0] == ph}) for ph in {k[0] for k, _ in parts}}
        for key, part in parts:
            phase, n = key[0], int(key[1])
            length = "L" if phase == "prefill" else "C"
            name = f"{phase} {length}={n}" + "".join(f" · {k}" for k in key[2:])
            shades = _SHADES.get(phase, ["#333333"])
            color = _shade(shades, lengths[phase].index(key[1]), len(lengths[phase]))
            text = [f"B={int(b)}" for b in part["batch"]]
            hover = [
                f"{phase} B={int(b)} {length}={n}" + "".join(f" · {k}" for k in key[2:])
                + f"<br>{t * 1e3:.4g} ms, {tps:.4g} tok/s<br>{af / 1e12:.3g} TFLOP/s, {ab / 1e12:.3g} TB/s"
                f"<br>intensity {i:.3g} FLOP/B ({bound}-bound)<br>{fr:.0%} of the roof"
                for b, t, tps, af, ab, i, bound, fr in zip(
                    part["batch"], part["time_s"], part["tokens_per_s"], part["achieved_flops_s"],
                    part["achieved_bytes_s"], part["intensity"], part["bound"], part["frac_of_roof"])
            ]
            fig.add_trace(go.Scatter(
                x=part["intensity"].astype(float).tolist(), y=part["achieved_flops_s"].astype(float).tolist(),
                mode="markers+text" if labels else "markers", name=name, text=text, textposition="top center",
                textfont=dict(size=9), hovertext=hover, hoverinfo="text",
                marker=dict(size=[7 + 3 * math.log2(max(1, int(b))) for b in part["batch"]], color=color,
                            opacity=0.9, symbol=_SYMBOLS[combos.index(key[2:]) % len(_SYMBOLS)],
                            line=dict(width=1, color="white"))))
    dev = getattr(ceilings, "device_name", None) or (ceilings.get("device_name") if isinstance(ceilings, Mapping) else None)
    fig.update_layout(
        title=title or f"Roofline{f' — {dev}' if dev else ''}",
        xaxis=dict(type="log", title=dict(text="arithmetic intensity (FLOP/byte)")),
        yaxis=dict(type="log", title=dict(text="achieved FLOP/s"), exponentformat="SI"),
        legend=dict(title=dict(text="marker size = batch")), template=template(),
    )
    return fig


_SHADES = {
    "prefill": ["#9ecae1", "#6baed6", "#3182bd", "#08519c", "#08306b"],
    "decode": ["#fdae6b", "#fd8d3c", "#e6550d", "#a63603", "#7f2704"],
    "mixed": ["#a1d99b", "#41ab5d", "#006d2c"],
}


def _shade(shades: list[str], rank: int, count: int) -> str:
    """Spread ``count`` lengths over the darker shades (the lightest is too pale alone)."""
    if count <= 1:
        return shades[len(shades) // 2]
    return shades[int(round(1 + rank * (len(shades) - 2) / (count - 1)))]


_SYMBOLS = ["circle", "diamond", "square", "triangle-up", "cross", "x"]


def _ceiling_values(ceilings) -> tuple[float, float]:
    if isinstance(ceilings, Mapping):
        return float(ceilings["matmul_flops_s"]), float(ceilings["copy_bytes_s"])
    return float(ceilings.matmul_flops_s), float(ceilings.copy_bytes_s)

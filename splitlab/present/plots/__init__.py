"""Pure functions from data to plotly Figures (testable without a browser).

Every figure has axis titles with units (``splitlab.present.tables.column_title``: the one
mapping from a column to its title and unit) and named traces. Inputs are the project's
own objects: a ``Run`` (or several), a summary table (``load_results`` / ``summaries_table``),
a profile table (``profile_phases``) with its ``Ceilings``. plotly is imported inside each
function, so the core imports where plotly is absent.

Figures stay small, in a notebook and in a report: a CDF keeps at most ``CDF_POINTS`` of
its corners (rounded to four significant figures), a timeline draws runs of back-to-back
decode steps as one span and the decode batch as a step line, and every figure carries the
lean ``template()`` rather than plotly_white's defaults for every trace type.

One module per kind of figure; every name is used as ``plots.<name>``:

- ``_base``: plotly's import (``_go``), ``template``, ``rounded``, ``shared_tables``,
  ``PHASE_COLORS``, ``legend_label`` and the private helpers every figure shares (run labels,
  colours, ``_wide``).
- ``_roofline``: ``roofline``, ``ROOF_COLORS``.
- ``_phases``: ``phase_breakdown``, ``phase_breakdown_runs`` (and ``_segments``).
- ``_timeline``: ``timeline``, ``MERGE_GAP_S``, the SM split ``step_sms``, ``total_sms``.
- ``_latency``: ``cdf_points``, ``latency_cdf``, ``latency_cdf_grid``, ``METRICS``,
  ``CDF_POINTS``; the comparisons ``speedup_bars``, ``metric_bars``, ``lower_is_better``.
- ``_rates``: ``heatmap``, ``slo_scale_curve``, ``attainment_rate_curve``, ``rate_curves``,
  ``goodput_ratio_map``.
- ``_capacity``: ``corun_fractions`` (``CORUN_JOBS``), ``kv_usage``, ``page_size_figure``.

The modules are private (a leading underscore) so that ``plots.roofline`` and
``plots.timeline`` stay the functions and ``dir(plots)`` holds the names it always held.
"""

from __future__ import annotations

# The names the single module had in its namespace, kept so that ``dir(plots)`` is unchanged
# (``plots.column_title`` is used as such).
import contextlib  # noqa: F401
import math  # noqa: F401
from collections import Counter  # noqa: F401
from typing import Any, Mapping, Sequence  # noqa: F401

import numpy as np  # noqa: F401

from splitlab.errors import SplitlabError  # noqa: F401
from splitlab.present.results import run_label  # noqa: F401
from splitlab.present.tables import column_info, column_title, format_value  # noqa: F401

from splitlab.present.plots._base import (  # noqa: F401
    PHASE_COLORS, _color, _go, _labelled, _wide, legend_label, rounded, shared_tables, template,
)
from splitlab.present.plots._roofline import ROOF_COLORS, roofline  # noqa: F401
from splitlab.present.plots._phases import _SEGMENT_NAMES, _segments, phase_breakdown, phase_breakdown_runs  # noqa: F401
from splitlab.present.plots._timeline import MERGE_GAP_S, step_sms, timeline, total_sms  # noqa: F401
from splitlab.present.plots._latency import (  # noqa: F401
    CDF_POINTS, METRICS, cdf_points, latency_cdf, latency_cdf_grid, lower_is_better, metric_bars, speedup_bars,
)
from splitlab.present.plots._rates import (  # noqa: F401
    attainment_rate_curve, goodput_ratio_map, heatmap, rate_curves, slo_scale_curve,
)
from splitlab.present.plots._capacity import CORUN_JOBS, corun_fractions, kv_usage, page_size_figure  # noqa: F401

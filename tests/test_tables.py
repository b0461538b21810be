"""Tables for people: one mapping from column to title and unit, one formatter of cells."""

import math

import numpy as np
import pandas as pd

from splitlab.present import tables
from splitlab.present.tables import column_title, for_people, format_value


def test_column_titles_have_words_and_units():
    assert column_title("goodput_req_s") == "goodput (req/s)"
    assert column_title("ttft_p99_s") == "TTFT p99 (s)"
    assert column_title("itl_p50_s") == "ITL p50 (s)"
    assert column_title("slo_attainment_tpot") == "TPOT bound met (fraction of requests)"
    assert column_title("kv_pool_bytes") == "kv pool (bytes)"
    assert column_title("decode_slowdown") == "decode slowdown"  # unknown: the name in words


def test_values_for_people():
    assert format_value(35624580608, "peak_memory_bytes") == "33.2 GiB"
    assert format_value(512 * 2**20, "kv_pool_bytes") == "512 MiB"
    assert format_value(0.0671, "itl_p99_s") == "67.1 ms"
    assert format_value(2.366, "ttft_p99_s") == "2.37 s"
    assert format_value(0.000512, "wall_s") == "512 µs"
    assert format_value(0.1125, "slo_attainment") == "11.2%"
    assert format_value(21.0, "num_requests") == "21"
    assert format_value(1.649317e11) == "165 G" and format_value(1.649317e11, "flops") == "165 GFLOP"
    assert format_value(3315.04) == "3,315" and format_value(13.0821) == "13.08"
    assert format_value(float("nan"), "rate") == "" and format_value(None) == ""
    assert format_value({"a": 1.0, "b": {"c": 0.5}, "d": None}) == "a=1, b=c=0.5"
    assert format_value([1, 2.5]) == "1, 2.5"
    assert format_value(True) == "yes"


def test_for_people_drops_empty_columns_and_formats_each():
    df = pd.DataFrame({
        "label": ["serial", "split mps 60/40"],
        "rate": [16.28002154932318, math.nan],
        "steps": [21.0, 1098.0],  # whole numbers in a float column: counts
        "peak_memory_bytes": [35624580608, 35061367808],
        "ttft_p99_s": [0.0981, 2.49],
        "slo_itl_s": [None, None],  # no value anywhere: dropped
        "backend": [np.nan, np.nan],
        "effective": [{"slots": 64, "graphs": True}, {}],
    })
    out = for_people(df)
    assert list(out.columns) == ["run", "arrival rate (req/s)", "steps", "peak GPU memory", "TTFT p99", "effective"]
    assert list(out["arrival rate (req/s)"]) == ["16.28", ""]
    assert list(out["steps"]) == ["21", "1,098"]
    assert list(out["peak GPU memory"]) == ["33.2 GiB", "32.7 GiB"]
    assert list(out["TTFT p99"]) == ["98.1 ms", "2.49 s"]
    assert list(out["effective"]) == ["slots=64, graphs=yes", ""]
    assert not any(isinstance(v, dict) for v in out.to_numpy().ravel())
    assert out.attrs["numeric"] == ["arrival rate (req/s)", "steps", "peak GPU memory", "TTFT p99"]
    assert "SLO bound on ITL" in for_people(df, keep_empty=True).columns


def test_every_summary_column_gets_a_title_in_words():
    from splitlab.measure.metrics import RequestTrace, Run

    run = Run(mode="serial", model="tiny", workload="poisson-r2-n1", config={}, env={},
              traces=[RequestTrace(0, 0.0, 4, 2, 0.0, 0.1, [0.1, 0.2], [1, 2])], memory={"peak_bytes": 1 << 30})
    for column in run.summary():
        assert "_" not in column_title(column), column

"""splitlab.measure.sweep with a trivial cell function: resume, budget, merge, groups, whole files."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from splitlab.errors import ConfigError, SplitlabError
from splitlab.measure import sweep as sw
from splitlab.measure.sweep import Cell, SkipCell, Sweep, SweepError, merge_results, write_json_atomic

REPO = Path(__file__).resolve().parents[1]


@dataclasses.dataclass(frozen=True, kw_only=True)
class Square(Cell):
    x: int


def grid(n: int = 5, cost_s: float = 0.0, group=None) -> list[Square]:
    return [Square(name=f"x{i}", x=i, cost_s=cost_s, group=group(i) if group else None) for i in range(n)]


def square(cell: Square, context) -> dict:
    return {"x": cell.x, "y": cell.x ** 2}


class Clock:
    """A fake perf_counter: each cell advances it by ``step`` seconds."""

    def __init__(self, step: float = 10.0) -> None:
        self.t, self.step = 0.0, step

    def __call__(self) -> float:
        return self.t


def names(data: dict) -> list[str]:
    return [r["cell"] for r in data["runs"]]


def test_a_whole_grid_with_provenance(tmp_path):
    out = tmp_path / "r.json"
    data = Sweep("squares", out, progress=False, command="bench.py --all").run(grid(), square)
    on_disk = json.loads(out.read_text())
    assert on_disk == json.loads(json.dumps(data))
    assert names(on_disk) == ["x0", "x1", "x2", "x3", "x4"]
    assert [r["y"] for r in on_disk["runs"]] == [0, 1, 4, 9, 16]
    assert on_disk["command"] == "bench.py --all" and on_disk["commands"] == ["bench.py --all"]
    assert on_disk["benchmark"] == "squares" and on_disk["format"] == sw.FORMAT
    assert on_disk["date"][:2] == "20" and "versions" in on_disk["environment"]
    assert "gpu" in on_disk and on_disk["left"] == [] and not on_disk["stopped_by_budget"]
    assert on_disk["calls"][0]["cells_run"] == names(on_disk)


def test_resume_skips_done_cells_and_keeps_their_rows_untouched(tmp_path):
    first, second = tmp_path / "a.json", tmp_path / "b.json"
    Sweep("squares", first, progress=False).run(grid(3), square)
    a = json.loads(first.read_text())
    calls = []

    def counting(cell, context):
        calls.append(cell.name)
        return {"x": cell.x, "y": -1}  # a different value: a re-run would show

    Sweep("squares", second, progress=False, resume=[first], command="again").run(grid(5), counting)
    b = json.loads(second.read_text())
    assert calls == ["x3", "x4"]
    assert b["runs"][:3] == a["runs"]
    assert [r["y"] for r in b["runs"]] == [0, 1, 4, -1, -1]
    assert len(b["commands"]) == 2 and b["commands"][1] == "again"
    assert [c["cells_run"] for c in b["calls"]] == [["x0", "x1", "x2"], ["x3", "x4"]]


def test_the_budget_stops_before_it_is_spent_and_says_what_was_left(tmp_path):
    clock = Clock()
    out = tmp_path / "r.json"

    def slow(cell, context):
        clock.t += 10.0
        return square(cell, context)

    data = Sweep("squares", out, budget_s=35.0, progress=False, clock=clock).run(grid(6, cost_s=10.0), slow)
    assert names(data) == ["x0", "x1", "x2"]  # a 4th cell would need 10 s with 5 left
    assert [e["cell"] for e in data["left"]] == ["x3", "x4", "x5"]
    assert "budget: 30 of 35 s spent" in data["left"][0]["why"]
    assert data["stopped_by_budget"] and clock.t <= 35.0
    assert json.loads(out.read_text())["left"] == data["left"]
    # the next call picks up exactly what was left
    resumed = Sweep("squares", tmp_path / "r2.json", budget_s=35.0, progress=False, clock=Clock(),
                    resume=[out]).run(grid(6, cost_s=10.0), square)
    assert names(resumed) == [f"x{i}" for i in range(6)] and resumed["left"] == []


def test_two_partial_files_merge_into_one_grid(tmp_path):
    a, b, c = tmp_path / "a.json", tmp_path / "b.json", tmp_path / "c.json"
    cells = grid(6)
    Sweep("squares", a, progress=False, command="piece a").run(cells[:2], square)
    Sweep("squares", b, progress=False, command="piece b").run([cells[1], *cells[3:5]], square)
    merged = merge_results([json.loads(a.read_text()), json.loads(b.read_text())])
    assert names(merged) == ["x0", "x1", "x3", "x4"] and merged["merge_dropped"] == ["x1"]
    ran = []
    data = Sweep("squares", c, progress=False, resume=[a, b], command="rest").run(
        cells, lambda cell, ctx: ran.append(cell.name) or square(cell, ctx))
    assert ran == ["x2", "x5"]
    assert sorted(names(data)) == [f"x{i}" for i in range(6)] and len(set(names(data))) == 6
    assert data["commands"] == ["piece a", "piece b", "rest"]
    with pytest.raises(SweepError, match="different benchmarks"):
        merge_results([json.loads(a.read_text()), {"benchmark": "other", "runs": []}])


def test_a_crash_mid_cell_leaves_the_last_whole_file(tmp_path):
    out = tmp_path / "r.json"
    code = textwrap.dedent(f"""
        import dataclasses, os, sys
        sys.path.insert(0, {str(REPO)!r})
        from splitlab.measure.sweep import Cell, Sweep

        def measure(cell, context):
            if cell.name == "c2":
                os._exit(3)  # killed mid-cell: no finally, no last write
            return {{"ok": cell.name}}

        Sweep("crash", {str(out)!r}, progress=False).run([Cell(name=f"c{{i}}") for i in range(4)], measure)
    """)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert done.returncode == 3, done.stderr
    data = json.loads(out.read_text())
    assert names(data) == ["c0", "c1"]
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]  # no temporary file beside it


def test_an_interrupt_mid_cell_keeps_what_was_done(tmp_path):
    out = tmp_path / "r.json"

    def measure(cell, context):
        if cell.x == 2:
            raise KeyboardInterrupt
        return square(cell, context)

    with pytest.raises(KeyboardInterrupt):
        Sweep("squares", out, progress=False).run(grid(4), measure)
    assert names(json.loads(out.read_text())) == ["x0", "x1"]


def test_a_failed_write_leaves_the_old_file(tmp_path, monkeypatch):
    out = write_json_atomic(tmp_path / "r.json", {"runs": [1]})

    def broken(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(sw.os, "replace", broken)
    with pytest.raises(OSError, match="disk full"):
        write_json_atomic(out, {"runs": [2]})
    assert json.loads(out.read_text()) == {"runs": [1]}
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]


def test_failures_and_skips_are_recorded_and_the_sweep_goes_on(tmp_path):
    def measure(cell, context):
        if cell.x == 1:
            raise ValueError("bad cell")
        if cell.x == 2:
            raise SkipCell("needs a GPU")
        return square(cell, context)

    data = Sweep("squares", tmp_path / "r.json", progress=False).run(grid(4), measure)
    assert names(data) == ["x0", "x3"]
    assert data["failed"][0]["cell"] == "x1" and "ValueError: bad cell" in data["failed"][0]["error"]
    assert "Traceback" in data["failed"][0]["traceback"]
    assert data["skipped"][0]["cell"] == "x2" and data["skipped"][0]["why"] == "needs a GPU"
    # a later call retries the failed cell; the earlier failure goes once it is done
    again = Sweep("squares", tmp_path / "r2.json", progress=False, resume=[tmp_path / "r.json"]).run(grid(4), square)
    assert sorted(names(again)) == ["x0", "x1", "x2", "x3"] and again["failed"] == []


def test_consecutive_cells_of_a_group_share_one_context(tmp_path):
    events = []

    @contextlib.contextmanager
    def session(group):
        events.append(("open", group))
        if group == "broken":
            raise RuntimeError("no daemon")
        if group == "absent":
            raise SkipCell("no MPS here")
        yield f"ctx-{group}"
        events.append(("close", group))

    groups = ["a", "a", "broken", "broken", "absent", "absent", "b", "a"]
    cells = [Square(name=f"x{i}", x=i, group=g) for i, g in enumerate(groups)]
    data = Sweep("squares", tmp_path / "r.json", progress=False).run(
        cells, lambda cell, ctx: {"ctx": ctx}, group_context=session)
    assert [(r["cell"], r["ctx"]) for r in data["runs"]] == [("x0", "ctx-a"), ("x1", "ctx-a"), ("x6", "ctx-b"),
                                                            ("x7", "ctx-a")]
    # each group set up once per run of consecutive cells; a broken or absent one only once
    assert events == [("open", "a"), ("close", "a"), ("open", "broken"), ("open", "absent"), ("open", "b"),
                      ("close", "b"), ("open", "a"), ("close", "a")]
    assert [f["cell"] for f in data["failed"]] == ["x2", "x3"]
    assert [s["cell"] for s in data["skipped"]] == ["x4", "x5"] and data["skipped"][1]["why"] == "no MPS here"


def test_a_bad_grid_or_file_is_refused(tmp_path):
    @dataclasses.dataclass
    class Loose:
        name: str

    with pytest.raises(ConfigError, match="frozen dataclass"):
        sw.check_grid([Loose("a")])
    with pytest.raises(ConfigError, match="named 'x1'"):
        sw.check_grid([*grid(2), Square(name="x1", x=9)])
    with pytest.raises(ConfigError, match="budget_s"):
        Sweep("squares", tmp_path / "r.json", budget_s=0)
    (tmp_path / "bad.json").write_text("{not json")
    (tmp_path / "other.json").write_text(json.dumps({"benchmark": "other", "runs": []}))
    for path, match in ((tmp_path / "missing.json", "no result file"), (tmp_path / "bad.json", "not a readable"),
                        (tmp_path / "other.json", "not of 'squares'")):
        with pytest.raises(SweepError, match=match) as info:
            Sweep("squares", tmp_path / "r.json", resume=[path])
        assert isinstance(info.value, SplitlabError)


def test_rows_of_older_files_are_named_by_key_of(tmp_path):
    old = tmp_path / "old.json"
    old.write_text(json.dumps({"benchmark": "squares", "runs": [{"x": 0, "y": 0}], "command": "old"}))
    data = Sweep("squares", tmp_path / "r.json", progress=False, resume=[old],
                 key_of=lambda row: f"x{row['x']}").run(grid(2), square)
    assert data["runs"][0] == {"x": 0, "y": 0} and names({"runs": data["runs"][1:]}) == ["x1"]
    assert data["commands"][0] == "old"
    assert os.path.exists(tmp_path / "r.json")

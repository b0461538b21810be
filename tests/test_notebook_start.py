"""The one set-up call every notebook makes first."""

from __future__ import annotations

import os

import plotly.io as pio

from splitlab.present.notebook import NO_GPU, start


def test_start_quiets_sets_the_offline_renderer_and_prints_the_machine(capsys, monkeypatch):
    monkeypatch.delenv("HF_HUB_DISABLE_PROGRESS_BARS", raising=False)
    monkeypatch.setattr(pio.renderers, "default", "browser")
    env = start()
    out = capsys.readouterr().out
    assert env["device"] == "cpu" and pio.renderers.default == "plotly_mimetype"
    assert os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] == "1"
    assert out.splitlines()[0].startswith("python ") and "| splitlab " in out
    assert "device: cpu | GPU: none" in out and NO_GPU in out

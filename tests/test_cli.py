"""The splitlab command: JSON on the last line, clear errors with exit status 2."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest

from splitlab import load_run
from splitlab.cli import main

REPO_ROOT = Path(__file__).resolve().parents[1]


def _cli(*args, timeout=300):
    """Run the command as a user would, in a fresh process."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, "-m", "splitlab.cli", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=REPO_ROOT, env=env)


def _last_json(text):
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return json.loads(lines[-1])


def test_console_script_is_declared():
    eps = metadata.entry_points(group="console_scripts")
    assert any(ep.name == "splitlab" and ep.value == "splitlab.cli:main" for ep in eps)


def test_run_prints_a_table_and_json_last(tmp_path):
    save = tmp_path / "run.json"
    proc = _cli("run", "--model", "tiny", "--mode", "hf-generate", "--workload", "poisson", "--rate", "40",
                "--num-requests", "6", "--prompt-len", "8:24", "--output-len", "5", "--batch-size", "3",
                "--save", str(save), "--slo-ttft", "3", "--slo-tpot", "0.5")
    assert proc.returncode == 0, proc.stderr
    summary = _last_json(proc.stdout)
    assert summary["mode"] == "hf-generate" and summary["model"] == "tiny"
    assert summary["num_requests"] == 6 and summary["completed"] == 6 and summary["output_tokens"] == 30
    assert summary["slo_ttft_s"] == 3.0 and summary["slo_tpot_s"] == 0.5
    assert "throughput_tok_s" in proc.stdout  # the table
    run = load_run(save)
    assert run.summary()["output_tokens"] == 30 and run.summary()["slo_ttft_s"] == 3.0


def test_run_fixed_workload_in_process(capsys):
    assert main(["run", "--model", "tiny", "--workload", "fixed", "--num-requests", "3", "--prompt-len", "10",
                 "--output-len", "4", "--no-progress"]) == 0
    summary = _last_json(capsys.readouterr().out)
    assert summary["num_requests"] == 3 and summary["output_tokens"] == 12
    assert summary["workload"].startswith("fixed-n3")


def test_run_trace_workload(capsys, azure_csv):
    assert main(["run", "--model", "tiny", "--workload", "trace", "--trace-path", str(azure_csv),
                 "--num-requests", "5", "--rate-scale", "100", "--prompt-len", "40", "--output-len", "3",
                 "--no-progress"]) == 0
    summary = _last_json(capsys.readouterr().out)
    assert summary["num_requests"] == 5
    assert summary["output_tokens"] <= 15


def test_env_prints_json_last():
    proc = _cli("env", timeout=120)
    assert proc.returncode == 0, proc.stderr
    env = _last_json(proc.stdout)
    assert env["device"] in ("cpu", "cuda")
    assert "hf-generate" in env["modes_here"]
    assert env["versions"]["torch"]
    assert "MPS control binary" in proc.stdout and "NVML" in proc.stdout


@pytest.mark.parametrize("args, message", [
    (["run", "--model", "tiny", "--prompt-len", "600"], "context is 512"),
    (["run", "--model", "dummy:nope"], "accepted"),
    (["run", "--model", "tiny", "--workload", "trace"], "--trace-path"),
    (["run", "--model", "tiny", "--workload", "trace", "--trace-path", "/no/such.csv"], "AzurePublicDataset"),
    (["run", "--model", "tiny", "--prompt-len", "ten"], "--prompt-len must be N or LO:HI"),
    (["run", "--model", "tiny", "--prompt-len", "9:3"], "reversed"),
    (["run", "--model", "tiny", "--dtype", "float8"], "dtype"),
    (["report", "/no/such/results"], "no results folder"),
    (["run", "--model", "tiny", "--device", "tpu"], "unknown device 'tpu'; accepted: 'cpu', 'cuda'"),
    (["run", "--model", "smollm2"], "did you mean 'smollm2-135m'"),
    (["run", "--model", "tiny", "--seed", "-1"], "seed must be a non-negative integer"),
    (["run", "--model", "tiny", "--prompt-len", "1:99999999"], "MAX_TOKENS"),
])
def test_bad_input_exits_2_with_a_clear_message(capsys, args, message):
    assert main(args + ["--no-progress"] if args[0] == "run" else args) == 2
    err = capsys.readouterr().err
    assert err.startswith("splitlab: error: ")
    assert message in err
    assert "Traceback" not in err


def test_bad_flags_exit_2_through_argparse(capsys):
    for args in (["run", "--mode", "turbo"], ["run", "--rate", "-1"], ["run", "--num-requests", "0"], ["nope"]):
        with pytest.raises(SystemExit) as info:
            main(args)
        assert info.value.code == 2
    assert "invalid choice: 'turbo'" in capsys.readouterr().err


def test_bad_input_in_a_real_process_exits_2():
    proc = _cli("run", "--model", "tiny", "--output-len", "0", timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("splitlab: error:")


def test_demo_on_tiny_writes_runs(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--model", "tiny", "--out", str(out), "--num-requests", "4", "--rate", "50",
                 "--no-progress"]) == 0
    text = capsys.readouterr().out
    last = _last_json(text)
    modes = [row["mode"] for row in last["runs"]]
    assert "hf-generate" in modes
    for mode in modes:
        run = load_run(out / f"{mode}.json")
        assert run.summary()["completed"] == 4
    assert "random weights" in text


def test_too_many_requests_is_refused_by_the_parser(capsys):
    with pytest.raises(SystemExit) as info:
        main(["run", "--model", "tiny", "--num-requests", "10000000"])
    assert info.value.code == 2
    assert "at most MAX_REQUESTS = 100000" in capsys.readouterr().err


@pytest.fixture
def no_model(monkeypatch):
    """Fail the test if the command gets as far as loading a model."""
    import splitlab.models

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the bad destination was refused")

    monkeypatch.setattr(splitlab.models, "load_model", refuse)


def test_a_bad_save_destination_fails_before_the_run(tmp_path, capsys, no_model):
    (tmp_path / "afile").write_text("x")
    for dest, message in ((tmp_path, "it is a folder"), (tmp_path / "afile" / "run.json", "is a file, not a folder")):
        assert main(["run", "--model", "tiny", "--save", str(dest), "--no-progress"]) == 2
        err = capsys.readouterr().err
        assert err.startswith("splitlab: error: cannot write") and message in err


def test_a_demo_out_that_is_a_file_fails_before_the_runs(tmp_path, capsys, no_model):
    out = tmp_path / "out"
    out.write_text("x")
    assert main(["demo", "--model", "tiny", "--out", str(out), "--no-progress"]) == 2
    assert "is a file, not a folder" in capsys.readouterr().err


def test_a_bad_trace_row_exits_2_naming_it(tmp_path, capsys):
    trace = tmp_path / "t.csv"
    trace.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:17:03,1e30,5\n")
    assert main(["run", "--model", "tiny", "--workload", "trace", "--trace-path", str(trace), "--no-progress"]) == 2
    assert "row 1 (line 2): ContextTokens" in capsys.readouterr().err


def test_run_picks_the_split_backend_and_its_sm_policy(tmp_path, capsys):
    """``--backend`` / ``--sm-policy`` reach SplitConfig; on a non-split mode they are refused."""
    profile = Path(__file__).resolve().parents[1] / "results" / "sm_profile_h200.json"
    out = tmp_path / "run.json"
    assert main(["run", "--model", "tiny", "--mode", "split", "--backend", "streams", "--sm-policy", "slo",
                 "--sm-profile", str(profile), "--gap-ms", "30", "--num-requests", "4", "--prompt-len", "12",
                 "--output-len", "4", "--save", str(out), "--no-progress"]) == 0
    run = load_run(out)
    assert (run.config.backend, run.config.split.sm_policy, run.config.split.gap_s) == ("streams", "slo", 0.03)
    assert run.config.green["decisions"] == len(run.steps)
    capsys.readouterr()
    assert main(["run", "--model", "tiny", "--mode", "serial", "--backend", "green", "--no-progress"]) == 2
    assert "--backend applies to --mode split only" in capsys.readouterr().err

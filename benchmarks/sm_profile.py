"""Measure the SM profile the adaptive split's policies predict from, and whether MPS can
hold SM-limited contexts in one process. GPU only.

    python benchmarks/sm_profile.py --model dummy:llama-3.1-8b --out results/sm_profile_h200.json

Writes (whole, or not at all) the profile (``splitlab.modes.split.policy.SMProfile``), the
MPS probe's answer, and the command, date, GPU and package versions.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from splitlab.system.env import environment  # noqa: E402


def mps_probe() -> dict:
    """Run ``splitlab.system.mps_affinity`` as a client of a private MPS daemon."""
    from splitlab.system.mps import MPSDaemon

    with MPSDaemon() as daemon:
        env = {**os.environ, **daemon.client_env(), "PYTHONPATH": str(ROOT)}
        answers = {}
        for what in ("driver", "torch", "torch-stream", "torch-stream-in-context"):
            done = subprocess.run([sys.executable, "-m", "splitlab.system.mps_affinity", what], env=env,
                                  capture_output=True, text=True, timeout=120)
            answers[what] = ({"ok": True, **json.loads(done.stdout)} if done.returncode == 0
                             else {"ok": False, "returncode": done.returncode, "error": done.stderr[-3000:],
                                   "stdout": done.stdout[-3000:]})
    return answers


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="dummy:llama-3.1-8b")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--decode-sms", default="16,32,48,64,96")
    parser.add_argument("--batches", default="1,8,32,64,128")
    parser.add_argument("--contexts", default="512,2048")
    parser.add_argument("--skip-mps", action="store_true")
    parser.add_argument("--out", default=str(ROOT / "results" / "sm_profile_h200.json"))
    args = parser.parse_args()
    ints = lambda s: tuple(int(x) for x in s.split(","))  # noqa: E731

    out: dict = {"command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
                 "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    out["mps_context_affinity"] = {"skipped": True} if args.skip_mps else mps_probe()
    print(json.dumps(out["mps_context_affinity"], indent=1), flush=True)

    import splitlab as sl
    from splitlab.measure.sm_profile import measure_sm_profile

    model = sl.load_model(args.model, device="cuda", dtype=args.dtype)
    profile = measure_sm_profile(model, decode_sms=ints(args.decode_sms), batches=ints(args.batches),
                                 contexts=ints(args.contexts))
    out["env"] = environment()
    out["profile"] = profile.to_dict()
    from splitlab.measure.sweep import write_json_atomic

    path = write_json_atomic(args.out, out)
    print(json.dumps({k: v for k, v in out["profile"].items() if k != "facts"})[:4000])
    print(f"wrote {path}")


if __name__ == "__main__":
    main()

"""The GPU-sharing mechanisms themselves: a green context with a fraction of the SMs runs a
matmul about that much slower (the partition is in force), and a private MPS daemon starts,
serves a client process and stops without leaving anything behind."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
import torch

pytestmark = pytest.mark.gpu


def timed_matmul(stream, a, b, iters: int = 20) -> float:
    with torch.cuda.stream(stream):
        for _ in range(3):
            a @ b
        stream.synchronize()
        start = time.perf_counter()
        for _ in range(iters):
            a @ b
        stream.synchronize()
    return (time.perf_counter() - start) / iters


def test_a_green_context_runs_at_its_share_of_the_sms():
    """bf16 8192^3 matmuls on a full-device stream and on each green context's stream: each
    context must be slower by at least half of what its SM fraction predicts (the recorded
    H200 run: 64 / 68 of 132 SMs ran 1.97x / 1.79x slower, 2.06x / 1.94x predicted)."""
    from splitlab.system.green import split_sms

    total = torch.cuda.get_device_properties(0).multi_processor_count
    part = split_sms((total // 2 - 2, total // 2 - 2), device=0)
    assert min(part.sm_counts) > 0 and sum(part.sm_counts) <= part.total_sms == total
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn_like(a)
    full = timed_matmul(torch.cuda.Stream(), a, b)
    for stream, sms in zip(part.streams, part.sm_counts):
        slowdown, expected = timed_matmul(stream, a, b) / full, total / sms
        assert slowdown > 1 + 0.5 * (expected - 1), f"{sms} of {total} SMs: {slowdown:.2f}x slower, {expected:.2f}x predicted"


CLIENT = "import torch; x = torch.ones(1 << 20, device='cuda'); torch.cuda.synchronize(); print(float(x.sum()))"


def test_a_private_mps_daemon_serves_a_client_and_stops_cleanly():
    from splitlab.system.mps import MPSDaemon, find_mps_processes

    with MPSDaemon(timeout=30) as mps:
        env = mps.client_env(50)
        done = subprocess.run([sys.executable, "-c", CLIENT], env={**os.environ, **env},
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr[-2000:]
        assert float(done.stdout.strip()) == float(1 << 20)
        pipe = str(mps.pipe_dir)
        assert [p for p in find_mps_processes() if p.pipe_dir == pipe and p.role == "daemon"]
    deadline = time.monotonic() + 10
    while [p for p in find_mps_processes() if p.pipe_dir == pipe] and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not [p for p in find_mps_processes() if p.pipe_dir == pipe], "the MPS daemon outlived its context"

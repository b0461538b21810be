"""Where one decode step's time goes: its kernels grouped by kind, and the host time around them.

``profile_events(step, steps, device)`` runs ``step`` under ``torch.profiler`` and returns its
``(name, µs)`` events: on CUDA every kernel, copy and memset the device ran (the kernels of a
CUDA-graph replay included); on a CPU every op's self time (nested ops counted once).
``group_events`` sums them per step into ``GROUPS`` by name (``kernel_group``: the first pattern
that matches wins, so attention is tried before GEMM and RoPE before copy), each group with its
share of the step's wall time; ``host_us`` is the wall time per step minus the kernel-time sum:
the host's staging, launch and the sync that returns the tokens, plus any gaps between kernels.

The names come from the Triton kernels of ``splitlab.engine.kernels`` (the fused decode
attention ``decode_attn_stage1`` also does RoPE and the KV write; ``add_rmsnorm_kernel`` also
gathers the first layer's embedding rows, so the Triton path shows no embedding kernel), from
cuBLAS (``nvjet``, ``sm90_xmma_gemm``, ``cutlass``, ``gemv``, ``splitKreduce``) and from
PyTorch (``aten::mm``, ``aten::embedding``, ``Memcpy HtoD``, ...). Argmax and the EOS mask fall
under ``other``. ``decode_step_breakdown`` does it all for one decode step of a runner.
"""

from __future__ import annotations

import collections
import math
import numbers
import re
from typing import Any, Callable, Iterable, Sequence

import torch

from splitlab.errors import ConfigError, DeviceError

# (group, pattern searched case-insensitively in the event name), tried in order
GROUPS: tuple[tuple[str, str], ...] = (
    ("attention", r"attn|attention|flash|fmha|sdpa|softmax|aten::bmm|aten::einsum"),
    ("rope+kv-write", r"rope|kv_write|index_copy|rotate"),
    ("norm", r"rmsnorm|layer_?norm|rsqrt"),
    ("silu-mul", r"silu"),
    ("embedding", r"embed|index_?select"),
    ("gemm", r"gemm|gemv|nvjet|cutlass|xmma|cublas|splitkreduce|aten::(mm|addmm|linear|matmul)$"),
    ("copy", r"memcpy|memset|copy|catarray|fillfunctor|aten::(cat|fill_|zero_)$"),
)
GROUP_NAMES = tuple(g for g, _ in GROUPS) + ("other",)
_COMPILED = tuple((g, re.compile(p, re.IGNORECASE)) for g, p in GROUPS)


def kernel_group(name: str) -> str:
    """The group of one kernel or op name (``"other"`` when no pattern matches)."""
    if not isinstance(name, str):
        raise ConfigError(f"a kernel name must be a string, got {name!r}")
    return next((g for g, pat in _COMPILED if pat.search(name)), "other")


def group_events(events: Iterable[tuple[str, float]], steps: int = 1, wall_us: float | None = None,
                 top: int = 3) -> dict[str, Any]:
    """Per step: each group's kernel µs and launch count, its share of ``wall_us`` (the wall
    time of one step; None: of the kernel-time sum), its ``top`` kernels by time, and the host
    time ``wall_us - kernel_us``. ``events``: ``(name, µs)`` of ``steps`` steps."""
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ConfigError(f"steps must be a positive integer (the steps the events cover), got {steps!r}")
    if wall_us is not None and (not _real(wall_us) or not wall_us > 0):
        raise ConfigError(f"wall_us must be a positive number of µs (one step's wall time) or None, got {wall_us!r}")
    us: dict[str, float] = dict.fromkeys(GROUP_NAMES, 0.0)
    count: collections.Counter = collections.Counter()
    names: dict[str, collections.Counter] = {g: collections.Counter() for g in GROUP_NAMES}
    for event in events:
        if not (isinstance(event, (tuple, list)) and len(event) == 2 and _real(event[1]) and event[1] >= 0):
            raise ConfigError(f"an event must be a (name, µs) pair with a non-negative time, got {event!r}")
        name, t = event
        g = kernel_group(name)
        us[g] += t
        count[g] += 1
        names[g][name[:120]] += t
    kernel_us = sum(us.values()) / steps
    base = wall_us if wall_us is not None else kernel_us
    out: dict[str, Any] = {"steps": steps, "wall_us": wall_us, "kernel_us": kernel_us,
                           "host_us": None if wall_us is None else wall_us - kernel_us,
                           "host_share": None if wall_us is None else (wall_us - kernel_us) / wall_us,
                           "share_of": "wall time of a step" if wall_us is not None else "kernel time of a step"}
    out["groups"] = {g: {"us": us[g] / steps, "count": count[g] / steps,
                         "share": us[g] / steps / base if base else 0.0,
                         "top": [[n, t / steps] for n, t in names[g].most_common(top)]} for g in GROUP_NAMES}
    return out


def profile_events(step: Callable[[], Any], steps: int, device: str | torch.device,
                   warmup: int = 2) -> list[tuple[str, float]]:
    """``(name, µs)`` of the device events (CUDA) or the ops' self times (CPU) of ``steps``
    calls of ``step`` under ``torch.profiler``, after ``warmup`` profiled-but-dropped calls."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile, schedule

    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ConfigError(f"steps must be a positive integer, got {steps!r}")
    cuda = torch.device(device).type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities, schedule=schedule(wait=0, warmup=warmup, active=steps, repeat=1)) as prof:
        for _ in range(warmup + steps):
            step()
            if cuda:
                torch.cuda.synchronize(device)
            prof.step()
    # the profiler's own ProfilerStep range spans the whole step (on the CPU, and mirrored on the
    # GPU timeline as an annotation): a range around the kernels, not one of them
    events = [e for e in prof.events() if not e.name.startswith("ProfilerStep")]
    if cuda:
        return [(e.name, e.time_range.elapsed_us()) for e in events if e.device_type == DeviceType.CUDA]
    return [(e.name, e.self_cpu_time_total) for e in events if e.device_type == DeviceType.CPU and not e.is_async]


def decode_step_breakdown(runner, batches: Sequence[int], context: int, steps: int = 20, iters: int = 30,
                          gen=None) -> list[dict[str, Any]]:
    """Per batch of ``batches``, ``group_events`` of one decode step of that many sequences at
    ``context`` cached tokens (slots ``0..``), with its wall time (median of ``iters``) and,
    with CUDA graphs, ``graph_replay_us`` (CUDA events, back-to-back replays): wall minus it is
    the host's part, it minus the kernel sum the gaps between kernels. Every batch is timed
    before any is profiled: CUPTI stays attached after torch.profiler and slows launches."""
    from splitlab.engine.tuning import cuda_time
    from splitlab.measure.engine_timing import decode_stepper, median_wall_s

    cuda, out = runner.device.type == "cuda", []
    for b in batches:
        step = decode_stepper(runner, b, context, None, gen)
        replay = cuda_time(runner.graph(b, context + 1).replay, iters) * 1e6 if runner.cuda_graphs else None
        out.append((b, step, median_wall_s(step, runner.device, iters, 3), replay))
    rows = []
    for b, step, wall_s, replay in out:
        events = profile_events(step, steps, runner.device)
        if cuda and not events:
            raise DeviceError("torch.profiler recorded no device events in the decode step (is CUPTI available?)")
        rows.append({"batch": b, "context": context, "cuda_graph": runner.cuda_graphs, "graph_replay_us": replay,
                     "events": "device kernels and copies" if cuda else "CPU ops, self time (no CUDA here)",
                     **group_events(events, steps, wall_s * 1e6)})
    return rows


def gemm_only_time(runner, batch: int, iters: int = 20) -> float:
    """CUDA-event seconds of a decode step's matmuls alone (every layer's and the lm_head's, at
    ``batch`` rows), captured and replayed as one CUDA graph."""
    import torch.nn.functional as F

    from splitlab.engine.tuning import cuda_time

    dev, dt, arch = runner.device, runner.dtype, runner.arch
    x = torch.randn(batch, arch["hidden_size"], device=dev, dtype=dt)
    a = torch.randn(batch, runner.num_heads * runner.head_dim, device=dev, dtype=dt)
    m = torch.randn(batch, arch["intermediate_size"], device=dev, dtype=dt)

    def body():
        for layer in runner.layers:
            F.linear(x, layer.qkv), F.linear(a, layer.o), F.linear(x, layer.gate_up), F.linear(m, layer.down)
        F.linear(x, runner.lm_head)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # cuBLAS workspaces and heuristics outside the capture
        body()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        body()
    return cuda_time(graph.replay, iters)


def _real(x: Any) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool) and math.isfinite(x)

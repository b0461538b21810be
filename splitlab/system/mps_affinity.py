"""Can ONE process under MPS hold contexts with different SM limits? A measured answer.

MPS lets a client create a context with an SM-count execution affinity
(``cuCtxCreate`` with ``CU_EXEC_AFFINITY_TYPE_SM_COUNT``). If one process could hold two
such contexts (say 40 and 92 SMs) and launch into either, the ``mps`` split backend could
change its shares per step as the ``green`` backend does, instead of restarting workers.

``probe(sm_counts)`` must run inside an MPS client (a daemon answering on
``CUDA_MPS_PIPE_DIRECTORY``). In each context it launches a spin kernel of a fixed number
of cycles per block, with more blocks than fit the GPU at once, and times it: the time
grows as the SMs a context may use shrink. It reports, per context, what the driver says
(``cuCtxGetExecAffinity``) and what the timing implies. ``probe_torch`` and
``probe_torch_stream`` ask what PyTorch can do with such a context: launch into it while it is
current, and use a stream made in it from the primary context, eagerly and as a CUDA graph
(the way the green backend switches). The measured answers are in
``results/mps_affinity_h200.json``: eager work runs there, a CUDA graph on that stream crashes.
"""

from __future__ import annotations

import sys
import time
from typing import Any, Sequence

SPIN_SRC = r"""
extern "C" __global__ void spin(long long cycles) {
    long long start = clock64();
    while (clock64() - start < cycles) { }
}
"""
THREADS = 1024  # two such blocks fill an SM's 2048 threads


def _check(result: Any, what: str) -> Any:
    err, *rest = result if isinstance(result, tuple) else (result,)
    if int(err) != 0:
        raise RuntimeError(f"{what} failed: {err!r}")
    return rest[0] if len(rest) == 1 else tuple(rest)


def _spin_function(driver, nvrtc, capability: tuple[int, int]):
    prog = _check(nvrtc.nvrtcCreateProgram(SPIN_SRC.encode(), b"spin.cu", 0, [], []), "nvrtcCreateProgram")
    arch = f"--gpu-architecture=sm_{capability[0]}{capability[1]}".encode()
    _check(nvrtc.nvrtcCompileProgram(prog, 1, [arch]), "nvrtcCompileProgram")
    size = _check(nvrtc.nvrtcGetCUBINSize(prog), "nvrtcGetCUBINSize")
    cubin = b" " * size
    _check(nvrtc.nvrtcGetCUBIN(prog, cubin), "nvrtcGetCUBIN")
    module = _check(driver.cuModuleLoadData(cubin), "cuModuleLoadData")
    return _check(driver.cuModuleGetFunction(module, b"spin"), "cuModuleGetFunction")


def _time_spin(driver, function, blocks: int, cycles: int) -> float:
    import ctypes

    import numpy as np

    arg = np.array([cycles], dtype=np.int64)
    params = np.array([arg.ctypes.data], dtype=np.uint64)
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        _check(driver.cuLaunchKernel(function, blocks, 1, 1, THREADS, 1, 1, 0, 0, params.ctypes.data, 0), "launch")
        _check(driver.cuCtxSynchronize(), "cuCtxSynchronize")
        best = min(best, time.perf_counter() - start)
    del ctypes
    return best


def _affinity_context(driver, device, sm_count: int):
    param = driver.CUexecAffinityParam()
    param.type = driver.CUexecAffinityType.CU_EXEC_AFFINITY_TYPE_SM_COUNT
    param.param.smCount.val = int(sm_count)
    if hasattr(driver, "CUctxCreateParams"):  # CUDA 13 bindings
        create = driver.CUctxCreateParams()
        create.execAffinityParams = [param]
        create.numExecAffinityParams = 1
        return _check(driver.cuCtxCreate(create, 0, device), f"cuCtxCreate({sm_count} SMs)")
    return _check(driver.cuCtxCreate_v3([param], 1, 0, device), f"cuCtxCreate_v3({sm_count} SMs)")


def probe(sm_counts: Sequence[int] = (40, 92), device_index: int = 0, cycles: int = 2_000_000) -> dict[str, Any]:
    """Create one SM-limited context per count in this process and time a spin kernel in each."""
    from cuda.bindings import driver, nvrtc

    _check(driver.cuInit(0), "cuInit")
    device = _check(driver.cuDeviceGet(device_index), "cuDeviceGet")
    total = _check(driver.cuDeviceGetAttribute(
        driver.CUdevice_attribute.CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT, device), "attribute")
    major = _check(driver.cuDeviceGetAttribute(
        driver.CUdevice_attribute.CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR, device), "attribute")
    minor = _check(driver.cuDeviceGetAttribute(
        driver.CUdevice_attribute.CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR, device), "attribute")
    supported = _check(driver.cuDeviceGetExecAffinitySupport(
        driver.CUexecAffinityType.CU_EXEC_AFFINITY_TYPE_SM_COUNT, device), "cuDeviceGetExecAffinitySupport")
    out: dict[str, Any] = {"total_sms": int(total), "affinity_supported": bool(supported), "contexts": []}
    blocks = 8 * int(total)  # 4 waves on the whole GPU at 2 blocks per SM
    contexts = []
    try:
        for n in [int(total), *sm_counts]:
            ctx = _affinity_context(driver, device, n)
            contexts.append(ctx)
            got = _check(driver.cuCtxGetExecAffinity(driver.CUexecAffinityType.CU_EXEC_AFFINITY_TYPE_SM_COUNT),
                         "cuCtxGetExecAffinity")
            function = _spin_function(driver, nvrtc, (int(major), int(minor)))
            seconds = _time_spin(driver, function, blocks, cycles)
            _check(driver.cuCtxPopCurrent(), "cuCtxPopCurrent")
            out["contexts"].append({"asked_sms": n, "driver_sms": int(got.param.smCount.val), "spin_s": seconds})
        # the same contexts again, alternating, to show both stay usable side by side
        again = []
        for entry, ctx in zip(out["contexts"], contexts):
            _check(driver.cuCtxPushCurrent(ctx), "cuCtxPushCurrent")
            function = _spin_function(driver, nvrtc, (int(major), int(minor)))
            again.append(_time_spin(driver, function, blocks, cycles))
            _check(driver.cuCtxPopCurrent(), "cuCtxPopCurrent")
        whole = out["contexts"][0]["spin_s"]
        for entry, seconds in zip(out["contexts"], again):
            entry["spin_again_s"] = seconds
            entry["implied_sms"] = round(int(total) * whole / entry["spin_s"], 1)
    finally:
        for ctx in contexts:
            driver.cuCtxDestroy(ctx)
    return out


def probe_torch(sm_count: int = 40, size: int = 8192) -> dict[str, Any]:
    """Can PyTorch launch into an SM-limited context of its own process? Time a bf16 matmul
    in the primary context, with an affinity context current, and after popping it."""
    import torch
    from cuda.bindings import driver

    a = torch.randn(size, size, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(size, size, device="cuda", dtype=torch.bfloat16)

    def matmul_s() -> float:
        a @ b
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(5):
            a @ b
        torch.cuda.synchronize()
        return (time.perf_counter() - start) / 5

    out: dict[str, Any] = {"primary_s": matmul_s()}
    device = _check(driver.cuDeviceGet(0), "cuDeviceGet")
    ctx = _affinity_context(driver, device, sm_count)  # made current on this thread
    try:
        out["affinity_ctx_s"] = matmul_s()
    except Exception as exc:  # noqa: BLE001 - the answer is that it failed, and how
        out["affinity_ctx_error"] = f"{type(exc).__name__}: {exc}"
    finally:
        driver.cuCtxPopCurrent()
        driver.cuCtxDestroy(ctx)
    out["after_pop_s"] = matmul_s()
    out["sm_count"] = sm_count
    return out


def probe_torch_stream(sm_count: int = 40, size: int = 8192, capture_in_context: bool = False) -> dict[str, Any]:
    """Can PyTorch use an SM-limited context the way the green backend uses a green one: a
    stream made in that context, wrapped in ``torch.cuda.ExternalStream``, with the primary
    context current? That is what per-step lanes would need. Time an eager bf16 matmul and a
    CUDA graph of it on that stream, and check both against the primary context's result.
    ``capture_in_context`` makes the SM-limited context current while the graph is captured."""
    import torch
    from cuda.bindings import driver

    a = torch.randn(size, size, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(size, size, device="cuda", dtype=torch.bfloat16)
    reference = a @ b
    torch.cuda.synchronize()

    def timed(launch, stream) -> float:
        launch()
        stream.synchronize()
        start = time.perf_counter()
        for _ in range(5):
            launch()
        stream.synchronize()
        return (time.perf_counter() - start) / 5

    primary = torch.cuda.current_stream()
    out: dict[str, Any] = {"sm_count": sm_count, "capture_in_context": capture_in_context,
                           "primary_s": timed(lambda: a @ b, primary)}
    device = _check(driver.cuDeviceGet(0), "cuDeviceGet")
    ctx = _affinity_context(driver, device, sm_count)  # current on this thread until popped
    try:
        handle = _check(driver.cuStreamCreate(int(driver.CUstream_flags.CU_STREAM_NON_BLOCKING)), "cuStreamCreate")
    finally:
        driver.cuCtxPopCurrent()
    print(f"stream {int(handle):#x} made in a {sm_count}-SM context", file=sys.stderr, flush=True)
    try:
        stream = torch.cuda.ExternalStream(int(handle))
        for stage in ("eager", "graph"):
            print(f"stage {stage}: {out}", file=sys.stderr, flush=True)  # a crash shows how far it got
            try:
                with torch.cuda.stream(stream):
                    if stage == "eager":
                        result = a @ b
                        out["eager_s"] = timed(lambda: a @ b, stream)
                    else:
                        graph = torch.cuda.CUDAGraph()
                        if capture_in_context:
                            driver.cuCtxPushCurrent(ctx)
                        try:
                            with torch.cuda.graph(graph, stream=stream):
                                result = a @ b
                        finally:
                            if capture_in_context:
                                driver.cuCtxPopCurrent()
                        out["graph_on_its_stream_s"] = timed(graph.replay, stream)
                if stage == "graph":  # a graph may keep its context's SMs wherever it is launched
                    out["graph_on_primary_stream_s"] = timed(graph.replay, primary)
                stream.synchronize()
                out[f"{stage}_matches"] = bool(torch.equal(result, reference))
                out[f"{stage}_max_abs_diff"] = float((result.float() - reference.float()).abs().max())
            except Exception as exc:  # noqa: BLE001 - the answer is that it failed, and how
                out[f"{stage}_error"] = f"{type(exc).__name__}: {exc}"
    finally:
        driver.cuCtxPushCurrent(ctx)
        driver.cuStreamDestroy(handle)
        driver.cuCtxPopCurrent()
        driver.cuCtxDestroy(ctx)
    return out


if __name__ == "__main__":
    import json

    which = {"driver": probe, "torch": probe_torch, "torch-stream": probe_torch_stream,
             "torch-stream-in-context": lambda: probe_torch_stream(capture_in_context=True)}
    print(json.dumps(which[sys.argv[1] if sys.argv[1:] else "driver"](), indent=1))

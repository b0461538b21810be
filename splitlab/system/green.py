"""Green contexts: one GPU's SMs split into two DISJOINT groups, one CUDA stream on each.

Why not ``torch.cuda.green_contexts.GreenContext.create()`` twice: each call splits the whole
device on its own, so the two groups OVERLAP (seen on an H200). A disjoint split takes ONE
``cuDevSmResourceSplitByCount`` call: it returns a group of the requested size and the
remainder, which is the second group. Each gets ``cuDevResourceGenerateDesc`` +
``cuGreenCtxCreate`` and a stream from ``cuGreenCtxStreamCreate``, wrapped in
``torch.cuda.ExternalStream`` so PyTorch work can be queued on it::

    part = split_sms((40, 92))          # on an H200 (132 SMs): 40 + 92
    with torch.cuda.stream(part.streams[0]):
        y = a @ b                        # runs on the first group's 40 SMs only

The driver rounds the first count up to its granularity (multiples of 8 on Hopper, 2 on
Volta/Ampere/Ada); ``GreenPartition.sm_counts`` reports what the driver actually gave.
Tensors still live in PyTorch's primary context; only where kernels run changes.
"""

from __future__ import annotations

import dataclasses
import math
import threading
from typing import Any, Sequence

from splitlab.errors import ConfigError, DeviceError, ModeError

HINT = (
    "green contexts need an NVIDIA GPU, a CUDA 12.4+ driver and cuda-python "
    "(`pip install cuda-bindings`, module cuda.bindings)"
)
MIN_DRIVER_VERSION = 12040

# Keep-alive registry, the one piece of module-level state here, on purpose: a stream made on
# a green context dies with it ("CUDA error: context is destroyed"), and
# PyTorch's ExternalStream does not own what it wraps. So every green context and stream
# created here stays referenced, never destroyed, for the life of the process.
_KEEP_ALIVE: list[Any] = []
_KEEP_ALIVE_LOCK = threading.Lock()


@dataclasses.dataclass(frozen=True, eq=False)
class GreenPartition:
    """Two disjoint SM groups on one device and a stream on each.

    ``requested``: the counts asked for. ``sm_counts``: what each green context really has
    (the first rounded up to the driver's granularity, the second = every remaining SM).
    ``streams``: ``torch.cuda.ExternalStream`` per group, in the same order.
    ``contexts``/``raw_streams``: the driver handles (kept alive by this module).
    """

    device: int
    requested: tuple[int, int]
    sm_counts: tuple[int, int]
    total_sms: int
    granularity: int
    streams: tuple[Any, Any]
    contexts: tuple[Any, Any]
    raw_streams: tuple[Any, Any]

    def to_dict(self) -> dict[str, Any]:
        return {
            "device": self.device,
            "requested": list(self.requested),
            "sm_counts": list(self.sm_counts),
            "total_sms": self.total_sms,
            "granularity": self.granularity,
        }


# --------------------------------------------------------------------------- pure helpers


def sm_granularity(capability: tuple[int, int]) -> int:
    """SM count granularity of a split on a GPU of that compute capability (CUDA docs:
    multiples of 8 from 9.0 on, of 2 on 7.x/8.x)."""
    major = int(capability[0])
    if major >= 9:
        return 8
    if major >= 7:
        return 2
    return 1


def check_sm_counts(sm_counts: Sequence[int]) -> tuple[int, int]:
    """Two positive integers, or ConfigError."""
    if isinstance(sm_counts, (str, bytes)) or not isinstance(sm_counts, Sequence):
        raise ConfigError(f"sm_counts must be two SM counts, e.g. (40, 92); got {sm_counts!r}")
    if len(sm_counts) != 2:
        raise ConfigError(f"sm_counts must be two SM counts, e.g. (40, 92); got {sm_counts!r}")
    for n in sm_counts:
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ConfigError(f"SM counts must be positive integers; got {sm_counts!r}")
    return int(sm_counts[0]), int(sm_counts[1])


def plan_split(sm_counts: Sequence[int], total_sms: int, granularity: int = 8) -> tuple[int, int]:
    """The SM counts one split will give: the first rounded up to ``granularity``, the second
    every SM left (at least what was asked for, and at least one granule).

    ``plan_split((40, 92), 132) == (40, 92)``; ``plan_split((30, 100), 132) == (32, 100)``.
    Raises ConfigError for malformed counts and DeviceError when they do not fit the device.
    """
    first_req, second_req = check_sm_counts(sm_counts)
    if granularity < 1 or total_sms < 1:
        raise ConfigError(f"bad device description: {total_sms} SMs, granularity {granularity}")
    first = math.ceil(first_req / granularity) * granularity
    second = total_sms - first
    if second < max(second_req, granularity):
        raise DeviceError(
            f"cannot split {total_sms} SMs into {first_req} + {second_req}: the first group "
            f"rounds up to {first} (multiples of {granularity} on this GPU), leaving {second}"
            + (f", and a group needs at least {granularity}" if second < granularity else "")
            + ". Ask for fewer SMs: the first count is rounded up to that multiple and the "
            "second group gets every SM left."
        )
    return first, second


# --------------------------------------------------------------------------- driver access


def _load_driver() -> Any:
    """The CUDA driver bindings module (cuda.bindings.driver; cuda.cuda on cuda-python <12.6)."""
    try:
        from cuda.bindings import driver  # cuda-python 12.6+ / 13.x
    except ImportError:
        try:
            from cuda import cuda as driver  # older cuda-python layout
        except ImportError as exc:
            raise ModeError(f"the 'green' backend cannot run here: {HINT}") from exc
    needed = (
        "cuDevSmResourceSplitByCount", "cuDevResourceGenerateDesc", "cuGreenCtxCreate",
        "cuGreenCtxStreamCreate", "cuDeviceGetDevResource",
    )
    missing = [name for name in needed if not hasattr(driver, name)]
    if missing:
        raise ModeError(f"this cuda-python lacks {', '.join(missing)}: {HINT}")
    return driver


def _device_info(device: int) -> tuple[int, tuple[int, int]]:
    """(SM count, compute capability) of a visible CUDA device, or DeviceError."""
    import torch

    if not torch.cuda.is_available():
        raise DeviceError(f"no CUDA GPU is visible, so green contexts cannot run: {HINT}")
    count = torch.cuda.device_count()
    if not 0 <= device < count:
        raise DeviceError(f"CUDA device {device} does not exist ({count} visible)")
    props = torch.cuda.get_device_properties(device)
    return int(props.multi_processor_count), (int(props.major), int(props.minor))


def _activate_primary_context(device: int) -> None:
    """Make PyTorch create its primary context on ``device`` first: tensors live there, and
    the driver advises having it active before cuGreenCtxCreate."""
    import torch

    torch.cuda.init()
    with torch.cuda.device(device):
        torch.empty(1, device=f"cuda:{device}")
        torch.cuda.synchronize(device)


def _wrap_stream(handle: Any, device: int) -> Any:
    import torch

    return torch.cuda.ExternalStream(int(handle), device=torch.device("cuda", device))


def _result_name(driver: Any, err: Any) -> str:
    try:
        got = driver.cuGetErrorName(err)
        if int(getattr(got[0], "value", got[0])) == 0:
            name = got[1]
            return name.decode() if isinstance(name, bytes) else str(name)
    except Exception:
        pass
    return str(err)


def _check(driver: Any, result: Any, what: str) -> Any:
    """Unpack a cuda-python call's (CUresult, *outputs); DeviceError unless CUDA_SUCCESS."""
    if not isinstance(result, tuple):
        result = (result,)
    err = result[0]
    code = int(getattr(err, "value", err))
    if code != 0:
        name = _result_name(driver, err)
        advice = " The driver may be older than CUDA 12.4." if "NOT_SUPPORTED" in name else ""
        raise DeviceError(f"{what} failed: {name} ({code}).{advice} {HINT}")
    if len(result) == 1:
        return None
    if len(result) == 2:
        return result[1]
    return result[1:]


def _keep(*objects: Any) -> None:
    with _KEEP_ALIVE_LOCK:
        _KEEP_ALIVE.extend(objects)


# --------------------------------------------------------------------------- the split


def split_sms(
    sm_counts: Sequence[int], device: int = 0, priorities: tuple[int, int] = (0, 0)
) -> GreenPartition:
    """Split ``device``'s SMs into two disjoint green contexts with one stream each.

    The first group gets ``sm_counts[0]`` rounded up to the driver's granularity; the second
    gets every SM left, which must be at least ``sm_counts[1]``. ``priorities``: stream
    priorities (lower = higher priority, 0 = default). The green contexts are never
    destroyed (see ``_KEEP_ALIVE``): make a partition once per process and reuse it.

    Raises ConfigError (malformed counts), DeviceError (no GPU, counts do not fit, the
    driver refuses a call) or ModeError (cuda.bindings missing or driver older than 12.4).
    """
    check_sm_counts(sm_counts)
    requested = (int(sm_counts[0]), int(sm_counts[1]))
    if len(priorities) != 2 or not all(isinstance(p, int) for p in priorities):
        raise ConfigError(f"priorities must be two integers, got {priorities!r}")
    total, capability = _device_info(device)
    granularity = sm_granularity(capability)
    plan_split(requested, total, granularity)  # refuse impossible splits before any driver call
    driver = _load_driver()
    _activate_primary_context(device)

    _check(driver, driver.cuInit(0), "cuInit")
    version = _check(driver, driver.cuDriverGetVersion(), "cuDriverGetVersion")
    if int(version) < MIN_DRIVER_VERSION:
        raise ModeError(
            f"the CUDA driver supports CUDA {int(version) // 1000}.{int(version) % 1000 // 10}; "
            f"{HINT}"
        )
    cu_device = _check(driver, driver.cuDeviceGet(device), f"cuDeviceGet({device})")
    resources, planned, total, granularity = _split_resources(driver, cu_device, requested, total, granularity)
    contexts, raw_streams, actual = _green_contexts(driver, cu_device, resources, planned, priorities)
    streams = tuple(_wrap_stream(s, device) for s in raw_streams)
    _keep(*streams)
    return GreenPartition(
        device=device,
        requested=requested,
        sm_counts=(actual[0], actual[1]),
        total_sms=total,
        granularity=granularity,
        streams=(streams[0], streams[1]),
        contexts=(contexts[0], contexts[1]),
        raw_streams=(raw_streams[0], raw_streams[1]),
    )


def _split_resources(driver: Any, cu_device: Any, requested: tuple[int, int], total: int, granularity: int):
    """ONE ``cuDevSmResourceSplitByCount``: a group of the first count and the remainder."""
    sm_type = driver.CUdevResourceType.CU_DEV_RESOURCE_TYPE_SM
    whole = _check(
        driver, driver.cuDeviceGetDevResource(cu_device, sm_type), "cuDeviceGetDevResource"
    )
    # CUDA 13 reports the alignment and minimum partition itself: prefer them to the table,
    # and ask for an already aligned count (the driver rounds up anyway on 12.x)
    total = int(getattr(whole.sm, "smCount", total) or total)
    granularity = int(getattr(whole.sm, "smCoscheduledAlignment", 0) or granularity)
    first, _ = plan_split(requested, total, granularity)
    first = max(first, int(getattr(whole.sm, "minSmPartitionSize", 0) or 0))
    groups, n_groups, remainder = _check(
        driver,
        driver.cuDevSmResourceSplitByCount(1, whole, 0, first),
        f"cuDevSmResourceSplitByCount(1 group of {first} SMs)",
    )
    if int(n_groups) != 1 or len(groups) < 1:
        raise DeviceError(
            f"cuDevSmResourceSplitByCount made {int(n_groups)} groups of {first} SMs "
            f"out of {total}, not 1. {HINT}"
        )
    _keep(whole, groups, remainder)
    planned = (int(groups[0].sm.smCount), int(remainder.sm.smCount))
    if planned[1] < requested[1]:
        raise DeviceError(
            f"the split left {planned[1]} SMs for the second group, fewer than the "
            f"{requested[1]} asked for (first group: {planned[0]} of {total})"
        )
    return (groups[0], remainder), planned, total, granularity


def _green_contexts(driver: Any, cu_device: Any, resources, planned: tuple[int, int], priorities):
    """A green context and a non-blocking stream on each group; the SMs each really got."""
    sm_type = driver.CUdevResourceType.CU_DEV_RESOURCE_TYPE_SM
    contexts, raw_streams, actual = [], [], []
    create_flags = driver.CUgreenCtxCreate_flags.CU_GREEN_CTX_DEFAULT_STREAM
    stream_flags = driver.CUstream_flags.CU_STREAM_NON_BLOCKING
    for i, (resource, priority) in enumerate(zip(resources, priorities)):
        desc = _check(
            driver, driver.cuDevResourceGenerateDesc([resource], 1),
            f"cuDevResourceGenerateDesc(group {i})",
        )
        context = _check(
            driver, driver.cuGreenCtxCreate(desc, cu_device, create_flags),
            f"cuGreenCtxCreate(group {i}, {planned[i]} SMs)",
        )
        _keep(desc, context)
        contexts.append(context)
        stream = _check(
            driver, driver.cuGreenCtxStreamCreate(context, stream_flags, int(priority)),
            f"cuGreenCtxStreamCreate(group {i})",
        )
        _keep(stream)
        raw_streams.append(stream)
        count = planned[i]
        if hasattr(driver, "cuGreenCtxGetDevResource"):  # what the context really got
            got = _check(
                driver, driver.cuGreenCtxGetDevResource(context, sm_type),
                f"cuGreenCtxGetDevResource(group {i})",
            )
            count = int(got.sm.smCount)
        actual.append(count)
    return contexts, raw_streams, actual


_PARTITIONS: dict[tuple, GreenPartition] = {}


def cached_split_sms(sm_counts: Sequence[int], device: int = 0, priorities: tuple[int, int] = (0, 0)
                     ) -> GreenPartition:
    """``split_sms``, made once per (device, counts, priorities) in this process and reused:
    green contexts are never destroyed, so making them per session would only leak more."""
    key = (int(device), *check_sm_counts(sm_counts), *priorities)
    with _KEEP_ALIVE_LOCK:
        if key in _PARTITIONS:
            return _PARTITIONS[key]
    part = split_sms(sm_counts, device=device, priorities=priorities)
    with _KEEP_ALIVE_LOCK:
        return _PARTITIONS.setdefault(key, part)


def decode_first_split(device: int, decode_sms: int, priority: int = 0) -> GreenPartition:
    """A partition whose FIRST group (``decode_sms``, rounded up) is decode's and the rest
    prefill's: first groups of different sizes nest, so moving SMs between the two sides
    only ever moves the SMs at the boundary."""
    total, capability = _device_info(device)
    first, second = plan_split((decode_sms, sm_granularity(capability)), total, sm_granularity(capability))
    return cached_split_sms((first, second), device=device, priorities=(priority, 0))

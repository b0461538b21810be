"""NVML sampler: SM and memory-controller utilisation, memory used, power and clocks.

``NvmlMonitor`` samples one GPU from a background thread every ``interval_s`` (default
50 ms). Each sample is a dict::

    {"t_s": seconds since t0, "sm_util_pct": ..., "mem_util_pct": ..., "mem_used_bytes": ...,
     "power_w": ..., "sm_clock_mhz": ..., "mem_clock_mhz": ...}

``t_s`` is ``time.perf_counter()`` minus ``t0`` (the run's start, the same clock the engine
stamps requests with), so the series lines up with a run's timeline. A field the GPU does
not report is ``None``. NVML's utilisation counters are averages over the driver's own
sample period (1/6 s to 1 s depending on the GPU), so a 50 ms series is smoothed.

On a machine without NVML (``pynvml`` missing, or ``nvmlInit`` failing: no driver) the
monitor records nothing and says so once per process through ``logging`` (INFO, logger
``splitlab.system.monitor``): no exception, no warning spam.

Usage::

    t0 = time.perf_counter()
    with NvmlMonitor(t0=t0) as mon:
        ...                       # the run
    mon.attach(run)               # run.monitor = mon.samples_relative_to(t0)
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

log = logging.getLogger(__name__)

FIELDS = ("sm_util_pct", "mem_util_pct", "mem_used_bytes", "power_w", "sm_clock_mhz", "mem_clock_mhz")

_said_unavailable = threading.Event()  # "no NVML" is said once per process


class NvmlMonitor:
    """Background NVML sampler of one GPU; a context manager; a no-op without NVML."""

    def __init__(self, interval_s: float = 0.05, device_index: int = 0, t0: float | None = None):
        if interval_s <= 0:
            from splitlab.errors import ConfigError

            raise ConfigError(f"interval_s must be > 0, got {interval_s}")
        self.interval_s = float(interval_s)
        self.device_index = int(device_index)
        self.t0 = t0
        self.available: bool | None = None  # known after start()
        self.reason: str | None = None  # why nothing is recorded, when not available
        self._raw: list[dict[str, Any]] = []  # "t_abs" = perf_counter seconds
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._nvml: Any = None
        self._handle: Any = None

    # ---- life cycle ---------------------------------------------------------------------
    def start(self) -> "NvmlMonitor":
        if self._thread is not None:
            return self
        if self.t0 is None:
            self.t0 = time.perf_counter()
        self.available = self._init()
        if not self.available:
            return self
        self._stop.clear()
        self.sample()  # one sample at the start, so even a short run has one
        self._thread = threading.Thread(target=self._loop, name="splitlab-nvml", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> "NvmlMonitor":
        if self._thread is not None:
            self._stop.set()
            self._thread.join(timeout=max(2.0, 5 * self.interval_s))
            self._thread = None
            self.sample()  # and one at the end
        if self._nvml is not None:
            try:
                self._nvml.nvmlShutdown()
            except Exception:
                pass
            self._nvml = None
            self._handle = None
        return self

    def __enter__(self) -> "NvmlMonitor":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ---- sampling -----------------------------------------------------------------------
    def _init(self) -> bool:
        try:
            import pynvml
        except ImportError:
            return self._unavailable("the nvidia-ml-py package (module pynvml) is not installed")
        try:
            pynvml.nvmlInit()
        except Exception as exc:  # NVMLError_LibraryNotFound / DriverNotLoaded on machines without a GPU
            return self._unavailable(f"NVML could not start ({exc.__class__.__name__}: {exc})")
        try:
            self._handle = pynvml.nvmlDeviceGetHandleByIndex(self.device_index)
        except Exception as exc:
            try:
                pynvml.nvmlShutdown()
            except Exception:
                pass
            return self._unavailable(f"NVML has no GPU {self.device_index} ({exc})")
        self._nvml = pynvml
        self.reason = None
        return True

    def _unavailable(self, reason: str) -> bool:
        self.reason = reason
        if not _said_unavailable.is_set():
            _said_unavailable.set()
            log.info("splitlab.system.monitor: no GPU monitoring: %s; runs record no NVML samples", reason)
        return False

    def sample(self) -> dict[str, Any] | None:
        """Take one sample now (the thread calls this every ``interval_s``)."""
        nv, h = self._nvml, self._handle
        if nv is None:
            return None
        now = time.perf_counter()
        rec: dict[str, Any] = {"t_abs": now}
        util = _try(lambda: nv.nvmlDeviceGetUtilizationRates(h))
        rec["sm_util_pct"] = _num(getattr(util, "gpu", None))
        rec["mem_util_pct"] = _num(getattr(util, "memory", None))
        mem = _try(lambda: nv.nvmlDeviceGetMemoryInfo(h))
        rec["mem_used_bytes"] = _num(getattr(mem, "used", None))
        power_mw = _try(lambda: nv.nvmlDeviceGetPowerUsage(h))
        rec["power_w"] = power_mw / 1000.0 if isinstance(power_mw, (int, float)) else None
        rec["sm_clock_mhz"] = _num(_try(lambda: nv.nvmlDeviceGetClockInfo(h, nv.NVML_CLOCK_SM)))
        rec["mem_clock_mhz"] = _num(_try(lambda: nv.nvmlDeviceGetClockInfo(h, nv.NVML_CLOCK_MEM)))
        with self._lock:
            self._raw.append(rec)
        return rec

    def _loop(self) -> None:
        next_t = time.perf_counter() + self.interval_s
        while not self._stop.wait(max(0.0, next_t - time.perf_counter())):
            self.sample()
            next_t += self.interval_s
            if next_t < time.perf_counter():  # fell behind (a slow call): do not burst
                next_t = time.perf_counter() + self.interval_s

    # ---- results ------------------------------------------------------------------------
    @property
    def samples(self) -> list[dict[str, Any]]:
        """Samples so far, ``t_s`` relative to this monitor's ``t0``."""
        return self.samples_relative_to(self.t0 if self.t0 is not None else 0.0)

    def samples_relative_to(self, t0: float) -> list[dict[str, Any]]:
        """Samples with ``t_s = perf_counter time - t0`` (pass the run's start)."""
        with self._lock:
            raw = list(self._raw)
        return [{"t_s": r["t_abs"] - t0, **{k: r[k] for k in FIELDS}} for r in raw]

    def attach(self, run, t0: float | None = None):
        """Store the samples in ``run.monitor`` (times relative to ``t0``, default this monitor's)."""
        run.monitor = self.samples_relative_to(self.t0 if t0 is None else t0)
        return run


def _try(fn):
    try:
        return fn()
    except Exception:  # NVMLError_NotSupported etc.: that field is None
        return None


def _num(value):
    return value if isinstance(value, (int, float)) and not isinstance(value, bool) else None

"""One exception family for everything a user can get wrong.

Every error splitlab raises on purpose is a ``SplitlabError``; the subclasses say which
part of the system refused, and every message says what to do next.
"""


class SplitlabError(Exception):
    """Base class of every error splitlab raises on purpose."""


class ConfigError(SplitlabError, ValueError):
    """A configuration value or keyword is wrong (unknown key, out-of-range value)."""


class ModelSpecError(SplitlabError, ValueError):
    """A model spec cannot be loaded, or the model's architecture is unsupported for a mode."""


class WorkloadError(SplitlabError, ValueError):
    """A workload or request is invalid (empty, prompt too long, bad lengths or arrival times, bad trace file)."""


class ModeError(SplitlabError, ValueError):
    """An unknown mode or backend, or a mode that this machine cannot run."""


class DeviceError(SplitlabError, RuntimeError):
    """An unknown device, or one that cannot do what was asked (no GPU, out of memory for the KV pool, ...)."""


class MPSError(SplitlabError, RuntimeError):
    """The NVIDIA MPS daemon could not be started, reached or stopped."""


class WorkerError(SplitlabError, RuntimeError):
    """A worker (thread or process) of a run raised or died; the message names it."""


class RunFileError(SplitlabError, ValueError):
    """A saved run cannot be read (missing, truncated, corrupted, not a run) or written where asked."""

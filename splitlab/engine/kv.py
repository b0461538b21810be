"""The KV pool: one preallocated K and V tensor for every running sequence, and a slot allocator.

Layout: ``k`` and ``v`` are ``[num_layers, num_slots + 1, max_seq_len, num_kv_heads, head_dim]``.
A *slot* is one sequence's row: position ``p`` of the sequence in slot ``s`` lives at
``k[layer, s, p]``. The extra last row (index ``num_slots``, ``KVPool.pad_slot``) is scratch:
padded rows of a CUDA-graph batch write there, so padding never touches a live sequence.

The pool is nothing but these two tensors (plus shape facts derived from them), so it can
cross a process boundary: share the tensors (CUDA IPC through ``torch.multiprocessing``, or
``share_memory_()`` on CPU) and rebuild the pool on the other side with
``KVPool.from_tensors(k, v)``. Which slot belongs to which request is the scheduler's
business (``SlotAllocator``), not the pool's.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from splitlab.errors import ConfigError, DeviceError

CPU_DEFAULT_SLOTS = 8


@dataclasses.dataclass(frozen=True)
class KVShape:
    """Shape facts of a pool (JSON-able)."""

    num_layers: int
    num_slots: int  # usable slots; the tensors have one more row (the padding scratch row)
    max_seq_len: int
    num_kv_heads: int
    head_dim: int

    @property
    def tensor_shape(self) -> tuple[int, int, int, int, int]:
        return (self.num_layers, self.num_slots + 1, self.max_seq_len, self.num_kv_heads, self.head_dim)


class KVPool:
    """Preallocated K/V cache for ``num_slots`` sequences of up to ``max_seq_len`` positions."""

    def __init__(self, k: torch.Tensor, v: torch.Tensor):
        if k.shape != v.shape or k.dtype != v.dtype or k.device != v.device:
            raise ConfigError(f"KVPool: k and v must match in shape, dtype and device; got "
                              f"{tuple(k.shape)}/{k.dtype}/{k.device} and {tuple(v.shape)}/{v.dtype}/{v.device}")
        if k.ndim != 5 or k.shape[1] < 2:
            raise ConfigError(
                "KVPool: tensors must be [num_layers, num_slots + 1, max_seq_len, num_kv_heads, head_dim] "
                f"with at least one usable slot; got {tuple(k.shape)}"
            )
        if not (k.is_contiguous() and v.is_contiguous()):
            raise ConfigError("KVPool: k and v must be contiguous")
        self.k = k
        self.v = v
        layers, rows, seq, heads, dim = k.shape
        self.shape = KVShape(layers, rows - 1, seq, heads, dim)

    # ---- construction ---------------------------------------------------------------------
    @classmethod
    def from_tensors(cls, k: torch.Tensor, v: torch.Tensor) -> "KVPool":
        """Rebuild a pool around existing tensors (e.g. received from another process)."""
        return cls(k, v)

    @classmethod
    def allocate(cls, num_layers: int, num_slots: int, max_seq_len: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: str | torch.device) -> "KVPool":
        """Zero-filled pool (zeros: padded reads of never-written positions stay finite)."""
        shape = KVShape(num_layers, num_slots, max_seq_len, num_kv_heads, head_dim)
        try:
            k = torch.zeros(shape.tensor_shape, dtype=dtype, device=device)
            v = torch.zeros(shape.tensor_shape, dtype=dtype, device=device)
        except torch.OutOfMemoryError as exc:
            need = 2 * _numel(shape.tensor_shape) * torch.empty((), dtype=dtype).element_size()
            raise DeviceError(
                f"out of memory allocating a KV pool of {num_slots} slots x {max_seq_len} positions "
                f"({need / 2**30:.2f} GiB); lower num_slots, max_seq_len or kv_memory_fraction"
            ) from exc
        return cls(k, v)

    @classmethod
    def for_model(cls, model: Any, max_seq_len: int, num_slots: int | None = None,
                  memory_budget_bytes: int | None = None, memory_fraction: float = 0.9,
                  max_slots: int | None = None) -> "KVPool":
        """A pool shaped for ``model`` (a ``LoadedModel``) on its device, in its dtype.

        The slot count is, in order: ``num_slots`` if given; else as many slots as fit in
        ``memory_budget_bytes``; else (CUDA) as many as fit in ``memory_fraction`` of the free
        memory measured now by ``torch.cuda.mem_get_info``; else (CPU) ``CPU_DEFAULT_SLOTS``.
        ``max_slots`` caps the derived counts (a slot no decode batch can use is waste).
        """
        facts = model.facts
        if isinstance(max_seq_len, bool) or not isinstance(max_seq_len, int) or max_seq_len <= 0:
            raise ConfigError(f"max_seq_len must be a positive integer, got {max_seq_len!r}")
        if max_seq_len > facts.max_positions:
            raise ConfigError(
                f"max_seq_len {max_seq_len} is beyond the model's context of {facts.max_positions} positions; "
                "lower max_seq_len"
            )
        per_slot = slot_bytes(facts.num_layers, max_seq_len, facts.num_kv_heads, facts.head_dim, model.dtype)
        device = torch.device(model.device)
        if num_slots is None:
            if memory_budget_bytes is not None:
                budget, where = int(memory_budget_bytes), f"the budget of {memory_budget_bytes / 2**30:.2f} GiB"
            elif device.type == "cuda":
                free, _total = torch.cuda.mem_get_info(device)
                budget = int(free * memory_fraction)
                where = f"{memory_fraction:.0%} of the {free / 2**30:.1f} GiB free on the GPU"
            else:
                budget, where = None, ""
            if budget is None:
                num_slots = CPU_DEFAULT_SLOTS
            else:
                # the pool holds one scratch row beyond the usable slots
                num_slots = budget // per_slot - 1
                if num_slots < 1:
                    raise DeviceError(
                        f"a KV slot of {max_seq_len} positions needs {per_slot / 2**20:.1f} MiB (plus one "
                        f"scratch row) but {where} allows none; lower max_seq_len or free memory"
                    )
            if max_slots is not None:
                num_slots = min(num_slots, max_slots)
        if isinstance(num_slots, bool) or not isinstance(num_slots, int) or num_slots <= 0:
            raise ConfigError(f"num_slots must be a positive integer, got {num_slots!r}")
        return cls.allocate(facts.num_layers, num_slots, max_seq_len, facts.num_kv_heads, facts.head_dim,
                            model.dtype, device)

    # ---- facts ----------------------------------------------------------------------------
    @property
    def num_layers(self) -> int:
        return self.shape.num_layers

    @property
    def num_slots(self) -> int:
        return self.shape.num_slots

    @property
    def pad_slot(self) -> int:
        """The scratch row that padded batch rows write into."""
        return self.shape.num_slots

    @property
    def max_seq_len(self) -> int:
        return self.shape.max_seq_len

    @property
    def num_kv_heads(self) -> int:
        return self.shape.num_kv_heads

    @property
    def head_dim(self) -> int:
        return self.shape.head_dim

    @property
    def dtype(self) -> torch.dtype:
        return self.k.dtype

    @property
    def device(self) -> torch.device:
        return self.k.device

    @property
    def nbytes(self) -> int:
        """Bytes of both tensors, scratch row included."""
        return 2 * self.k.numel() * self.k.element_size()

    @property
    def bytes_per_token(self) -> int:
        """K and V bytes of one position, all layers."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * self.k.element_size()

    # ---- views ----------------------------------------------------------------------------
    def layer_flat(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V of one layer as ``[(num_slots + 1) * max_seq_len, num_kv_heads, head_dim]``
        views: row ``slot * max_seq_len + pos`` is one position (the write index)."""
        n = (self.num_slots + 1) * self.max_seq_len
        return (self.k[layer].view(n, self.num_kv_heads, self.head_dim),
                self.v[layer].view(n, self.num_kv_heads, self.head_dim))

    def share_memory_(self) -> "KVPool":
        """Move CPU tensors to shared memory (for a child process); a no-op on CUDA (use IPC)."""
        if self.device.type == "cpu":
            self.k.share_memory_()
            self.v.share_memory_()
        return self

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.k, self.v

    def describe(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self.shape), "dtype": str(self.dtype).replace("torch.", ""),
                "device": str(self.device), "bytes": self.nbytes}

    def __repr__(self) -> str:
        s = self.shape
        return (f"KVPool({s.num_slots} slots x {s.max_seq_len} positions, {s.num_layers} layers, "
                f"{s.num_kv_heads}x{s.head_dim}, {self.dtype}, {self.device}, {self.nbytes / 2**20:.1f} MiB)")


def slot_bytes(num_layers: int, max_seq_len: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
    """K and V bytes of one slot of ``max_seq_len`` positions."""
    elem = torch.empty((), dtype=dtype).element_size()
    return 2 * num_layers * max_seq_len * num_kv_heads * head_dim * elem


class SlotAllocator:
    """Hands out KV slots ``0 .. num_slots-1``; lowest free slot first (deterministic).

    ``alloc()`` returns None when every slot is taken: that is not an error, the caller keeps
    the request waiting. Freeing a slot that is not allocated is a bug and raises.
    """

    def __init__(self, num_slots: int):
        if isinstance(num_slots, bool) or not isinstance(num_slots, int) or num_slots <= 0:
            raise ConfigError(f"SlotAllocator needs a positive number of slots, got {num_slots!r}")
        self.num_slots = num_slots
        self._free = list(range(num_slots - 1, -1, -1))  # a stack: pop() gives the lowest
        self._used: set[int] = set()

    def alloc(self) -> int | None:
        if not self._free:
            return None
        slot = self._free.pop()
        self._used.add(slot)
        return slot

    def free(self, slot: int) -> None:
        if slot not in self._used:
            raise ValueError(f"slot {slot} is not allocated (double free or foreign slot)")
        self._used.remove(slot)
        self._free.append(slot)
        self._free.sort(reverse=True)

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return len(self._used)

    def __repr__(self) -> str:
        return f"SlotAllocator({self.num_used}/{self.num_slots} used)"


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n

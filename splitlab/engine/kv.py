"""The KV pool: preallocated K and V tensors, as fixed slots (the default) or as pages.

Slot pool (``KVPool``): ``k`` and ``v`` are ``[num_layers, num_slots + 1, max_seq_len,
num_kv_heads, head_dim]``. A *slot* is one sequence's row: position ``p`` of the sequence in
slot ``s`` lives at ``k[layer, s, p]``. The extra last row (index ``num_slots``,
``KVPool.pad_slot``) is scratch: padded rows of a CUDA-graph batch write there, so padding
never touches a live sequence.

Paged pool (``PagedKVPool``, ``EngineConfig.kv_block_size``): the same five dimensions with
pages for rows, ``[num_layers, num_pages + 1, block_size, num_kv_heads, head_dim]``. A
sequence owns a *block table*, the list of its page ids: position ``p`` lives at
``k[layer, table[p // block_size], p % block_size]``. The last page (``pad_page``) is the
scratch. A slot pool is the special case of one page of ``max_seq_len`` positions per
sequence (its block table is ``[slot]``), which is how the kernels treat both.

Either pool is nothing but its two tensors (plus shape facts derived from them), so it can
cross a process boundary: share the tensors (CUDA IPC through ``torch.multiprocessing``, or
``share_memory_()`` on CPU) and rebuild the pool on the other side with ``from_tensors``.
Which slot or page belongs to which request is the scheduler's business (``SlotAllocator``,
``PageAllocator``), not the pool's.
"""

from __future__ import annotations

import collections
import dataclasses
import heapq
from typing import Any, Iterable

import torch

from splitlab.errors import ConfigError, DeviceError
from splitlab.engine.capacity import batch_bound, measured_free_bytes, reserve_for

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


class _Pool:
    """What both pools read the same way off their ``shape`` and their two tensors ``k`` and
    ``v`` (``[num_layers, rows, block_size, num_kv_heads, head_dim]``; a slot pool's row is a
    slot of ``max_seq_len`` positions, a paged pool's a page of ``block_size``)."""

    k: torch.Tensor
    v: torch.Tensor
    num_layers = property(lambda self: self.shape.num_layers)
    max_seq_len = property(lambda self: self.shape.max_seq_len)
    num_kv_heads = property(lambda self: self.shape.num_kv_heads)
    head_dim = property(lambda self: self.shape.head_dim)
    dtype = property(lambda self: self.k.dtype)
    device = property(lambda self: self.k.device)

    @property
    def nbytes(self) -> int:
        """Bytes of both tensors, the scratch row (or page) included."""
        return 2 * self.k.numel() * self.k.element_size()

    @property
    def bytes_per_token(self) -> int:
        """K and V bytes of one position, all layers."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * self.k.element_size()

    def layer_flat(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V of one layer as ``[rows * block_size, num_kv_heads, head_dim]`` views (rows:
        the usable slots or pages and the scratch one): row ``row * block_size + offset`` is one
        position (the write index)."""
        n = self.k.shape[1] * self.block_size
        return (self.k[layer].view(n, self.num_kv_heads, self.head_dim),
                self.v[layer].view(n, self.num_kv_heads, self.head_dim))

    def share_memory_(self):
        """Move CPU tensors to shared memory (for a child process); a no-op on CUDA (use IPC).
        Returns the pool."""
        if self.device.type == "cpu":
            self.k.share_memory_()
            self.v.share_memory_()
        return self

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.k, self.v

    def describe(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self.shape), "dtype": str(self.dtype).replace("torch.", ""),
                "device": str(self.device), "bytes": self.nbytes}


class KVPool(_Pool):
    """Preallocated K/V cache for ``num_slots`` sequences of up to ``max_seq_len`` positions."""

    paged = False

    def __init__(self, k: torch.Tensor, v: torch.Tensor):
        _check_tensors("KVPool", k, v, "[num_layers, num_slots + 1, max_seq_len, num_kv_heads, head_dim] "
                                       "with at least one usable slot")
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
        k, v = _zeros(shape.tensor_shape, dtype, device, f"a KV pool of {num_slots} slots x {max_seq_len} positions",
                      "num_slots, max_seq_len or kv_memory_fraction")
        return cls(k, v)

    @classmethod
    def for_model(cls, model: Any, max_seq_len: int, num_slots: int | None = None,
                  memory_budget_bytes: int | None = None, memory_fraction: float = 0.9,
                  max_slots: int | None = None, reserve_bytes: int = 0) -> "KVPool":
        """A pool shaped for ``model`` (a ``LoadedModel``) on its device, in its dtype.

        The slot count is, in order: ``num_slots`` if given; else as many slots as fit in
        ``memory_budget_bytes``; else (CUDA) as many as fit in ``memory_fraction`` of the free
        memory measured now by ``torch.cuda.mem_get_info``, less ``reserve_bytes`` (what the
        engine allocates after the pool: ``splitlab.engine.capacity.reserve_for``); else (CPU)
        ``CPU_DEFAULT_SLOTS``. ``max_slots`` caps the derived counts (a slot no decode batch
        can use is waste).
        """
        facts = model.facts
        _check_seq_len(max_seq_len, facts.max_positions)
        per_slot = slot_bytes(facts.num_layers, max_seq_len, facts.num_kv_heads, facts.head_dim, model.dtype)
        if num_slots is None:
            budget, where = _budget(model, memory_budget_bytes, memory_fraction, reserve_bytes)
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
                            model.dtype, model.device)

    # ---- facts (the common ones: _Pool) -----------------------------------------------------
    @property
    def num_slots(self) -> int:
        return self.shape.num_slots

    @property
    def pad_slot(self) -> int:
        """The scratch row that padded batch rows write into."""
        return self.shape.num_slots

    @property
    def block_size(self) -> int:
        """Positions per row of the tensors: a slot is one page of ``max_seq_len`` positions."""
        return self.shape.max_seq_len

    @property
    def max_sequences(self) -> int:
        """The most sequences the pool can hold at once."""
        return self.shape.num_slots

    def new_allocator(self) -> "SlotAllocator":
        """A fresh allocator of this pool's slots."""
        return SlotAllocator(self.num_slots)

    # ---- views (layer_flat: _Pool) ------------------------------------------------------------
    def sequence(self, layer: int, where: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V of positions ``0 .. length - 1`` of the sequence in slot ``where``:
        ``[length, num_kv_heads, head_dim]`` views."""
        return self.k[layer][where, :length], self.v[layer][where, :length]

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
    def capacity(self) -> int:
        return self.num_slots

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return len(self._used)

    def __repr__(self) -> str:
        return f"SlotAllocator({self.num_used}/{self.num_slots} used)"


# ---- the paged pool -----------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class PagedShape:
    """Shape facts of a paged pool (JSON-able)."""

    num_layers: int
    num_pages: int  # usable pages; the tensors have one more (the padding scratch page)
    block_size: int  # positions per page
    max_seq_len: int  # positions one sequence may hold (its block table has max_blocks entries)
    num_kv_heads: int
    head_dim: int

    @property
    def tensor_shape(self) -> tuple[int, int, int, int, int]:
        return (self.num_layers, self.num_pages + 1, self.block_size, self.num_kv_heads, self.head_dim)

    @property
    def max_blocks(self) -> int:
        return -(-self.max_seq_len // self.block_size)


class PagedKVPool(_Pool):
    """Preallocated K/V cache of ``num_pages`` pages of ``block_size`` positions; a sequence of
    up to ``max_seq_len`` positions holds ``cdiv(length, block_size)`` of them, in any order."""

    paged = True

    def __init__(self, k: torch.Tensor, v: torch.Tensor, max_seq_len: int):
        _check_tensors("PagedKVPool", k, v, "[num_layers, num_pages + 1, block_size, num_kv_heads, head_dim] "
                                            "with at least one usable page")
        layers, rows, block, heads, dim = k.shape
        if block & (block - 1):
            raise ConfigError(f"PagedKVPool: the block size (dimension 2) must be a power of two, got {block}")
        if isinstance(max_seq_len, bool) or not isinstance(max_seq_len, int) or max_seq_len <= 0:
            raise ConfigError(f"PagedKVPool: max_seq_len must be a positive integer, got {max_seq_len!r}")
        self.k = k
        self.v = v
        self.shape = PagedShape(layers, rows - 1, block, max_seq_len, heads, dim)

    # ---- construction ---------------------------------------------------------------------
    @classmethod
    def from_tensors(cls, k: torch.Tensor, v: torch.Tensor, max_seq_len: int) -> "PagedKVPool":
        """Rebuild a pool around existing tensors (e.g. received from another process)."""
        return cls(k, v, max_seq_len)

    @classmethod
    def allocate(cls, num_layers: int, num_pages: int, block_size: int, max_seq_len: int, num_kv_heads: int,
                 head_dim: int, dtype: torch.dtype, device: str | torch.device) -> "PagedKVPool":
        """Zero-filled pool (zeros: padded reads of never-written positions stay finite)."""
        shape = PagedShape(num_layers, num_pages, block_size, max_seq_len, num_kv_heads, head_dim)
        k, v = _zeros(shape.tensor_shape, dtype, device,
                      f"a paged KV pool of {num_pages} pages x {block_size} positions", "num_pages or kv_memory_fraction")
        return cls(k, v, max_seq_len)

    @classmethod
    def for_model(cls, model: Any, max_seq_len: int, block_size: int, num_pages: int | None = None,
                  memory_budget_bytes: int | None = None, memory_fraction: float = 0.9,
                  max_batch: int | None = None, reserve_bytes: int = 0) -> "PagedKVPool":
        """A paged pool shaped for ``model`` (a ``LoadedModel``) on its device, in its dtype.

        The page count is, in order: ``num_pages`` if given; else as many pages as fit in
        ``memory_budget_bytes``; else (CUDA) in ``memory_fraction`` of the free memory measured
        now less ``reserve_bytes`` (as ``KVPool.for_model``); else (CPU) the pages of
        ``min(max_batch, CPU_DEFAULT_SLOTS)`` full-length
        sequences (the memory of the slot pool's CPU default). The derived counts are capped at
        ``max_batch`` full-length sequences' pages (more can never be in use at once).
        """
        facts = model.facts
        _check_seq_len(max_seq_len, facts.max_positions)
        if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size <= 0 \
                or block_size & (block_size - 1):
            raise ConfigError(f"the KV block size must be a power of two, got {block_size!r}")
        per_page = slot_bytes(facts.num_layers, block_size, facts.num_kv_heads, facts.head_dim, model.dtype)
        full = -(-max_seq_len // block_size)  # pages of one full-length sequence
        if num_pages is None:
            budget, where = _budget(model, memory_budget_bytes, memory_fraction, reserve_bytes)
            if budget is None:
                num_pages = min(max_batch or CPU_DEFAULT_SLOTS, CPU_DEFAULT_SLOTS) * full
            else:
                num_pages = budget // per_page - 1  # the pool holds one scratch page beyond the usable ones
                if num_pages < 2:
                    raise DeviceError(
                        f"a KV page of {block_size} positions needs {per_page / 2**20:.2f} MiB but {where} "
                        "allows fewer than two (plus one scratch page); free memory or raise the budget"
                    )
            if max_batch is not None:
                num_pages = min(num_pages, max_batch * full)
        if isinstance(num_pages, bool) or not isinstance(num_pages, int) or num_pages <= 0:
            raise ConfigError(f"num_pages must be a positive integer, got {num_pages!r}")
        return cls.allocate(facts.num_layers, num_pages, block_size, max_seq_len, facts.num_kv_heads,
                            facts.head_dim, model.dtype, model.device)

    # ---- facts (the common ones: _Pool) -----------------------------------------------------
    num_pages = property(lambda self: self.shape.num_pages)
    block_size = property(lambda self: self.shape.block_size)
    max_blocks = property(lambda self: self.shape.max_blocks)
    num_slots = None  # no slots: sequences hold pages (kept so that slot-pool readers see "none")

    @property
    def pad_page(self) -> int:
        """The scratch page that padded batch rows write into."""
        return self.shape.num_pages

    @property
    def max_sequences(self) -> int:
        """The most sequences the pool can hold at once (one page each)."""
        return self.shape.num_pages

    def pages_for(self, positions: int) -> int:
        """Pages that hold ``positions`` positions."""
        return -(-int(positions) // self.block_size)

    def new_allocator(self, prefix_cache: bool = False) -> "PageAllocator":
        """A fresh allocator of this pool's pages (``prefix_cache``: see ``PageAllocator``)."""
        return PageAllocator(self.num_pages, self.block_size, prefix_cache)

    # ---- views (layer_flat: _Pool) ------------------------------------------------------------
    def sequence(self, layer: int, where: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V of positions ``0 .. length - 1`` of the sequence whose block table starts
        with ``where`` (a device int64 tensor of page ids covering ``length``), gathered:
        ``[length, num_kv_heads, head_dim]`` (a copy)."""
        pages = where[: self.pages_for(length)]
        k = self.k[layer].index_select(0, pages).flatten(0, 1)[:length]
        v = self.v[layer].index_select(0, pages).flatten(0, 1)[:length]
        return k, v

    def __repr__(self) -> str:
        s = self.shape
        return (f"PagedKVPool({s.num_pages} pages x {s.block_size} positions, sequences up to {s.max_seq_len}, "
                f"{s.num_layers} layers, {s.num_kv_heads}x{s.head_dim}, {self.dtype}, {self.device}, "
                f"{self.nbytes / 2**20:.1f} MiB)")


class PageAllocator:
    """Hands out pages ``0 .. num_pages-1``; lowest free pages first (deterministic).

    ``alloc(n)`` gives ``n`` pages or none (None when fewer are free: not an error, the caller
    waits or preempts). ``free`` takes one page id or an iterable of them; freeing a page that
    is not held (twice, or never) is a bug and raises. A page is held by one sequence, except
    a cached prefix block, which its sharers hold together (a reference count).

    ``prefix_cache``: full blocks of a sequence's fill are kept by content: ``register`` names
    a written page by its block hash (``block_hashes``: each full block's hash chained on the
    blocks before it), ``take`` gives a new sequence the cached pages of its longest cached
    prefix (shared, read-only: they are full, so nobody writes them again) and fresh pages for
    the rest. A cached page nobody holds counts as free and is reused (least recently freed
    first) only when no never-cached page is left. ``prefix_stats`` counts the blocks looked
    up and found.
    """

    def __init__(self, num_pages: int, block_size: int, prefix_cache: bool = False):
        for name, value in (("num_pages", num_pages), ("block_size", block_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ConfigError(f"PageAllocator needs a positive {name}, got {value!r}")
        self.num_pages = num_pages
        self.block_size = block_size
        self.prefix_cache = bool(prefix_cache)
        self._free = list(range(num_pages))  # a heap: the lowest free page first
        self._refs: dict[int, int] = {}  # held pages -> holders
        self._block_of: dict[int, tuple[int, tuple[int, ...]]] = {}  # cached page -> (hash, tokens)
        self._page_of: dict[int, int] = {}  # block hash -> cached page
        self._idle: collections.OrderedDict[int, None] = collections.OrderedDict()  # cached, unheld: LRU first
        self.prefix_queries = 0
        self.prefix_hits = 0

    def pages_for(self, positions: int) -> int:
        """Pages that hold ``positions`` positions."""
        return -(-int(positions) // self.block_size)

    def alloc(self, n: int = 1) -> list[int] | None:
        if n < 0:
            raise ValueError(f"cannot allocate {n} pages")
        if n > self.num_free:
            return None
        pages = []
        for _ in range(n):
            if self._free:
                page = heapq.heappop(self._free)
            else:  # reuse the least recently freed cached block: it is no longer cached
                page, _ = self._idle.popitem(last=False)
                self._page_of.pop(self._block_of.pop(page)[0], None)
            self._refs[page] = 1
            pages.append(page)
        return pages

    def free(self, pages: int | Iterable[int]) -> None:
        pages = [pages] if isinstance(pages, int) else [int(p) for p in pages]
        bad = [p for p in pages if p not in self._refs]
        if bad or len(set(pages)) != len(pages):
            raise ValueError(f"pages {bad or pages} are not allocated (double free or foreign pages)")
        for p in pages:
            self._refs[p] -= 1
            if self._refs[p]:
                continue
            del self._refs[p]
            if p in self._block_of:
                self._idle[p] = None
            else:
                heapq.heappush(self._free, p)

    # ---- the prefix cache --------------------------------------------------------------------
    def block_hashes(self, token_ids: tuple[int, ...]) -> list[int]:
        """The chained hash of each full block of ``token_ids``."""
        out, h, b = [], 0, self.block_size
        for i in range(len(token_ids) // b):
            h = hash((h, tuple(token_ids[i * b:(i + 1) * b])))
            out.append(h)
        return out

    def take(self, token_ids: tuple[int, ...], cacheable: int, total: int, headroom: int = 0
             ) -> tuple[list[int], int] | None:
        """``total`` pages for a sequence whose fill is ``token_ids``: the cached pages of its
        longest cached prefix among the first ``cacheable`` full blocks, then fresh ones; None
        unless ``headroom`` more stay free. Returns ``(pages, cached blocks)``."""
        hits: list[int] = []
        if self.prefix_cache and cacheable > 0:
            b = self.block_size
            for i, h in enumerate(self.block_hashes(token_ids[: cacheable * b])):
                page = self._page_of.get(h)
                if page is None or self._block_of[page][1] != tuple(token_ids[i * b:(i + 1) * b]):
                    break
                hits.append(page)
        fresh = max(0, total - len(hits))
        idle_hits = sum(p in self._idle for p in hits)  # taking them leaves fewer pages free
        if self.num_free - idle_hits < fresh + headroom:
            return None
        for p in hits:
            if p in self._idle:
                del self._idle[p]
            self._refs[p] = self._refs.get(p, 0) + 1
        self.prefix_queries += cacheable if self.prefix_cache else 0
        self.prefix_hits += len(hits)
        return hits + self.alloc(fresh), len(hits)

    def register(self, page: int, block_hash: int, tokens: tuple[int, ...]) -> None:
        """Page ``page`` (held) now holds the full block ``tokens`` of hash ``block_hash``; a
        block cached already keeps its first page."""
        if not self.prefix_cache or block_hash in self._page_of or page in self._block_of:
            return
        if page not in self._refs:
            raise ValueError(f"page {page} is not allocated; only a held page can be cached")
        self._page_of[block_hash] = page
        self._block_of[page] = (block_hash, tuple(tokens))

    @property
    def prefix_stats(self) -> dict[str, Any]:
        q = self.prefix_queries
        return {"prefix_blocks_queried": q, "prefix_blocks_hit": self.prefix_hits,
                "prefix_hit_rate": self.prefix_hits / q if q else None}

    # ---- counts ------------------------------------------------------------------------------
    @property
    def capacity(self) -> int:
        return self.num_pages

    @property
    def num_free(self) -> int:
        """Pages an ``alloc`` can hand out: never-cached ones and cached blocks nobody holds."""
        return len(self._free) + len(self._idle)

    @property
    def num_used(self) -> int:
        return len(self._refs)

    def __repr__(self) -> str:
        return f"PageAllocator({self.num_used}/{self.num_pages} pages of {self.block_size} used)"


def build_kv(model: Any, config: Any, max_seq_len: int) -> tuple[KVPool | PagedKVPool, SlotAllocator | PageAllocator]:
    """The pool and allocator ``config`` (an ``EngineConfig``) asks for: slots when
    ``kv_block_size`` is None, else pages of that many positions. Sized from free GPU memory,
    the pool leaves the reserve of ``capacity.reserve_for`` for the activations and decode
    graphs. The largest decode batch of the pool is ``capacity.decode_batch_limit(kv, config)``
    (``config.max_batch``, or derived from the pool when that is None)."""
    batch = batch_bound(config)  # max_batch None: the most it may derive (more would be waste)
    count = config.num_slots if config.kv_block_size is None else config.num_pages
    measured = count is None and config.kv_budget_bytes is None and torch.device(model.device).type == "cuda"
    reserve = reserve_for(model.facts, config).total_bytes if measured else 0
    if config.kv_block_size is None:
        kv = KVPool.for_model(model, max_seq_len, num_slots=config.num_slots,
                              memory_budget_bytes=config.kv_budget_bytes, memory_fraction=config.kv_memory_fraction,
                              max_slots=batch, reserve_bytes=reserve)
    else:
        kv = PagedKVPool.for_model(model, max_seq_len, config.kv_block_size, num_pages=config.num_pages,
                                   memory_budget_bytes=config.kv_budget_bytes,
                                   memory_fraction=config.kv_memory_fraction, max_batch=batch, reserve_bytes=reserve)
        return kv, kv.new_allocator(prefix_cache=config.kv_prefix_cache)
    return kv, kv.new_allocator()


def pages_written(request: Any, block_size: int) -> int:
    """Pages of every KV position ``request`` writes (anything with ``prompt_len`` and
    ``max_new_tokens``): its prompt and each output token but the last, whose KV no step reads."""
    return -(-(request.prompt_len + request.max_new_tokens - 1) // block_size)


def _check_tensors(name: str, k: torch.Tensor, v: torch.Tensor, layout: str) -> None:
    if k.shape != v.shape or k.dtype != v.dtype or k.device != v.device:
        raise ConfigError(f"{name}: k and v must match in shape, dtype and device; got "
                          f"{tuple(k.shape)}/{k.dtype}/{k.device} and {tuple(v.shape)}/{v.dtype}/{v.device}")
    if k.ndim != 5 or k.shape[1] < 2:
        raise ConfigError(f"{name}: tensors must be {layout}; got {tuple(k.shape)}")
    if not (k.is_contiguous() and v.is_contiguous()):
        raise ConfigError(f"{name}: k and v must be contiguous")


def _check_seq_len(max_seq_len: Any, max_positions: int) -> None:
    if isinstance(max_seq_len, bool) or not isinstance(max_seq_len, int) or max_seq_len <= 0:
        raise ConfigError(f"max_seq_len must be a positive integer, got {max_seq_len!r}")
    if max_seq_len > max_positions:
        raise ConfigError(f"max_seq_len {max_seq_len} is beyond the model's context of {max_positions} positions; "
                          "lower max_seq_len")


def _zeros(tensor_shape: tuple[int, ...], dtype: torch.dtype, device: str | torch.device, what: str,
           lower: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero-filled K and V of ``tensor_shape``; out of memory, a ``DeviceError`` naming ``what``
    is allocated, its size, and the settings to ``lower``."""
    try:
        return (torch.zeros(tensor_shape, dtype=dtype, device=device),
                torch.zeros(tensor_shape, dtype=dtype, device=device))
    except torch.OutOfMemoryError as exc:
        need = 2 * _numel(tensor_shape) * torch.empty((), dtype=dtype).element_size()
        raise DeviceError(f"out of memory allocating {what} ({need / 2**30:.2f} GiB); lower {lower}") from exc


def _budget(model: Any, memory_budget_bytes: int | None, memory_fraction: float,
            reserve_bytes: int = 0) -> tuple[int | None, str]:
    """The bytes a pool may take and where that number came from (None: no budget, the CPU).
    An explicit budget is the pool's alone; measured free memory loses ``reserve_bytes``."""
    if memory_budget_bytes is not None:
        return int(memory_budget_bytes), f"the budget of {memory_budget_bytes / 2**30:.2f} GiB"
    free = measured_free_bytes(model.device)
    if free is None:
        return None, ""
    where = f"{memory_fraction:.0%} of the {free / 2**30:.1f} GiB free on the GPU"
    if reserve_bytes:
        where += (f" less {reserve_bytes / 2**30:.2f} GiB reserved for activations and decode graphs "
                  "(lower token_budget or max_batch to shrink it)")
    return max(0, int(free * memory_fraction) - int(reserve_bytes)), where


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def new_allocator(kv, config):
    """A fresh allocator of ``kv``'s slots, or of its pages (with the prefix cache of
    ``config``, an ``EngineConfig``): one per run, so a run's prefix hits and counts are its own."""
    return kv.new_allocator(prefix_cache=config.kv_prefix_cache) if kv.paged else kv.new_allocator()

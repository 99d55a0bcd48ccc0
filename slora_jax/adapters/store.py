"""The tiered adapter store: disk -> host memory -> pages of the unified pool.

- **Disk**: registered PEFT folders (memory-mapped when read; thousands of them).
- **Host**: per adapter, the `LoraAdapter` as read, and its rows once packed for the
  pool (all a load needs: a disk-backed adapter's `LoraAdapter` is dropped then, as
  disk can give it again), kept LRU under a byte budget. An adapter added in memory
  keeps its `LoraAdapter` whatever the budget; only its rows can be dropped.
- **Resident**: adapters whose rows are in pool pages, each with a slot id.
  In-use adapters are pinned by refcount and never evicted; idle ones are
  evicted LRU when pages are needed (by another adapter, or by the KV cache
  through `evict_idle`).

Loading into the pool is packing the adapter's rows on the host (skipped while the
host tier keeps them from an earlier load), their `jax.device_put` (asynchronous)
and the donated `write_adapter` scatter. Packing and copying run on
background threads: `prefetch` (the engine calls it for the adapters of queued
requests) starts them early, so they overlap the steps run before the adapter is
needed, and `load` waits only for what is left. Bad input (a corrupt file, an
adapter larger than the whole pool) raises `AdapterError` for that adapter and
changes nothing else.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import functools
import os
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np

from slora_jax.adapters.adapter import LoraAdapter
from slora_jax.adapters.pack import pack_slots
from slora_jax.adapters.peft import load_adapter
from slora_jax.adapters.spares import SpareBuffers
from slora_jax.config import PROJECTIONS, LlamaConfig
from slora_jax.errors import AdapterError
from slora_jax.memory.allocator import OutOfPages, PageAllocator
from slora_jax.memory.paged_lora import PagedLora, SlotLora
from slora_jax.memory.pool import (
    AdapterPlacement,
    AdapterTable,
    PoolLayout,
    WHOLE,
    adapter_shard_rows,
    place_adapter,
    rows_shape,
    write_adapter,
)
from slora_jax.ops.lora import KernelConfig, LoraMeta, SlotWeights, build_lora_meta


def _pow2(n: int, lo: int = 1) -> int:
    return 1 << (max(n, lo) - 1).bit_length()


@dataclasses.dataclass
class HostEntry:
    """What host memory holds of one adapter."""

    adapter: LoraAdapter | None  # as read; None once packed, for an adapter that disk can give again
    placement: AdapterPlacement | None = None
    rows: np.ndarray | None = None  # `AdapterStore._pack`'s rows in the store's dtype, with `placement`
    # (id, bytes) of the adapter last measured: `LoraAdapter.nbytes` walks every module, and the
    # budget check sums all entries on every load (25 ms a load with 1000 adapters, H200 host).
    _adapter_bytes: tuple[int, int] = dataclasses.field(default=(0, 0), repr=False)

    @property
    def nbytes(self) -> int:
        n = 0 if self.rows is None else self.rows.nbytes
        if self.adapter is not None:
            if self._adapter_bytes[0] != id(self.adapter):
                self._adapter_bytes = (id(self.adapter), self.adapter.nbytes)
            n += self._adapter_bytes[1]
        return n


@dataclasses.dataclass
class Resident:
    slot: int
    placement: AdapterPlacement
    pages: np.ndarray  # int32, the adapter's page table
    pins: int = 0
    read_elems: int = 0  # weight elements the kernels read for it in a step (`AdapterStore.read_elems`)


class AdapterStore:
    def __init__(self, cfg: LlamaConfig, layout: PoolLayout, allocator: PageAllocator,
                 host_budget_bytes: int = 8 << 30, dtype=jnp.bfloat16, max_resident: int = 1024,
                 stage_threads: int = 1, spare_bytes: int = 0):
        self.cfg, self.layout, self.allocator = cfg, layout, allocator
        self.shards = WHOLE  # how packed rows are cut (a sharded store: one part per device)
        self.stage_threads = stage_threads
        # Row buffers the host tier dropped, packed into again (`spares.py`: fresh host memory is slow)
        self.spares = SpareBuffers(spare_bytes)
        self.dtype = jnp.dtype(dtype)
        self.host_budget_bytes = host_budget_bytes
        self._paths: dict[str, str] = {}
        self._host: collections.OrderedDict[str, HostEntry] = collections.OrderedDict()  # LRU order
        self._resident: collections.OrderedDict[str, Resident] = collections.OrderedDict()  # LRU order
        # prefetched: the placement, and (host rows, device rows) once the staging thread has packed and sent them
        self._staged: dict[str, tuple[AdapterPlacement, concurrent.futures.Future]] = {}
        self._stager: concurrent.futures.ThreadPoolExecutor | None = None  # started on first use
        self._free_slots = list(range(max_resident - 1, -1, -1))
        # disk_loads, host_hits, packed_hits, packs (by the staging threads; spare_packs of them into
        # recycled buffers), pool_loads, pool_hits,
        # prefetch_hits, evictions; the engine's start_deferred and start_deferred_unstaged (`Engine._defer_start`)
        self.stats = collections.Counter()
        # Host seconds: load's evict / wait_staged (for the staging thread) / write; the staging
        # threads' stage_pack / stage_put (summed over threads, so they overlap the rest).
        self.seconds: collections.Counter = collections.Counter()
        self._seconds_lock = threading.Lock()
        self._table_pages, self._r_max = 1, 8  # batch shape bounds that only grow (few compiles)
        self._targeted: set[str] = set()

    # ------------------------------------------------------------------ tiers
    def register(self, name: str, path: str | os.PathLike) -> None:
        """Make a PEFT folder available under `name` (nothing is read yet)."""
        if name in self._paths or name in self._host:
            raise ValueError(f"adapter name {name!r} is already registered")
        self._paths[name] = os.fspath(path)

    def add(self, adapter: LoraAdapter) -> None:
        """Put an in-memory adapter straight into the host tier (it is never evicted from it)."""
        if adapter.name in self._paths or adapter.name in self._host:
            raise ValueError(f"adapter name {adapter.name!r} is already registered")
        self._host[adapter.name] = HostEntry(adapter)

    def __contains__(self, name: str) -> bool:
        return name in self._paths or name in self._host

    @property
    def names(self) -> list[str]:
        return list(dict.fromkeys([*self._paths, *self._host]))

    def host(self, name: str) -> LoraAdapter:
        """The adapter in host memory, read from disk if needed (LRU under the byte budget)."""
        entry = self._host.get(name)
        if entry is not None and entry.adapter is not None:
            self._host.move_to_end(name)
            self.stats["host_hits"] += 1
            return entry.adapter
        if name not in self._paths:
            raise KeyError(f"unknown adapter {name!r}")
        adapter = load_adapter(self._paths[name], self.cfg, name=name)
        self.stats["disk_loads"] += 1
        if entry is None:
            self._host[name] = HostEntry(adapter)
        else:
            entry.adapter = adapter
            self._host.move_to_end(name)
        self._trim_host()
        return adapter

    def fetch(self, name: str) -> None:
        """Have `name` in host memory in some form (as read, or packed), reading (and so
        validating) it from disk if it is in none; raises `AdapterError` for a bad adapter."""
        if name in self._host:
            self._host.move_to_end(name)
        else:
            self.host(name)

    def _trim_host(self) -> None:
        used = sum(e.nbytes for e in self._host.values())
        for name, entry in list(self._host.items()):
            if used <= self.host_budget_bytes:
                break
            used -= entry.nbytes
            if entry.rows is not None and name not in self._staged:  # a staged copy may still read them
                self.spares.give(entry.rows)
            if name in self._paths:  # disk can give it again
                del self._host[name]
            else:  # an in-memory adapter stays; its rows can be packed again
                entry.placement = entry.rows = None
                used += entry.nbytes

    def _keep_rows(self, name: str, placement: AdapterPlacement, rows: np.ndarray) -> None:
        """Keep `name`'s packed rows in the host tier, where they replace a disk-backed `LoraAdapter`."""
        entry = self._host.setdefault(name, HostEntry(None))  # trimmed while its rows were packed: a new entry
        entry.placement, entry.rows = placement, rows
        if name in self._paths:
            entry.adapter = None
        self._host.move_to_end(name)
        self._trim_host()

    # --------------------------------------------------------------- residency
    def is_resident(self, name: str) -> bool:
        return name in self._resident

    def resident(self, name: str) -> Resident:
        return self._resident[name]

    def ready(self, name: str) -> bool:
        """`load(name)` would not wait for the staging threads: resident, or staged (packed, copy started)."""
        if name in self._resident:
            return True
        staged = self._staged.get(name)
        return staged is not None and staged[1].done()

    def prefetch(self, name: str) -> None:
        """Start packing `name`'s rows (unless the host tier has them) and copying them to the
        device, without taking pages.

        The host read (if not in host memory yet) happens here; packing and the copy on the
        staging thread (they only read the immutable `LoraAdapter` or rows).
        """
        if name in self._resident or name in self._staged:
            return
        entry = self._host.get(name)
        if entry is not None and entry.rows is not None:
            self._host.move_to_end(name)
            self.stats["packed_hits"] += 1
            placement, adapter, rows = entry.placement, None, entry.rows
        else:
            adapter, rows = self.host(name), None
            placement = self._placement(adapter)
        if self._stager is None:
            # Several threads pack several adapters at once: numpy's casts and copies release the GIL.
            self._stager = concurrent.futures.ThreadPoolExecutor(self.stage_threads,
                                                                 thread_name_prefix="adapter-stager")
        self._staged[name] = (placement, self._stager.submit(self._stage, adapter, placement, rows))

    def _stage(self, adapter: LoraAdapter | None, placement: AdapterPlacement,
               rows: np.ndarray | None) -> tuple[np.ndarray, jax.Array]:
        """On the staging thread: pack `adapter`'s rows unless `rows` are given; start their copy."""
        t0 = time.perf_counter()
        packed = rows is None
        if packed:
            rows = self._pack(adapter, placement)
        t1 = time.perf_counter()
        rows_dev = self._put(rows)  # async copy (waiting for it here took 14 ms a rank-8 adapter on an H200
        # and did not shorten load's write: session 11)
        self.spares.copying(rows, rows_dev)
        with self._seconds_lock:  # staging threads add up concurrently
            self.stats["packs"] += packed
            self.seconds["stage_pack"] += t1 - t0
            self.seconds["stage_put"] += time.perf_counter() - t1
        return rows, rows_dev

    def prefetch_only(self, names: list[str]) -> None:
        """Keep exactly `names` staged (the adapters of the next queued requests): start the
        missing ones, drop the staged rows of others. An adapter that cannot be staged
        (corrupt, too large) is skipped; its error comes when a request loads it."""
        for name in set(self._staged) - set(names):
            future = self._staged.pop(name)[1]
            if not future.cancel() and future.done() and future.exception() is None:  # packed and sent
                rows = future.result()[0]
                entry = self._host.get(name)
                if entry is None or entry.rows is not rows:  # rows the host tier does not keep
                    self.spares.give(rows)
        for name in names:
            try:
                self.prefetch(name)
            except AdapterError:
                pass

    def load(self, pool: jax.Array, name: str) -> jax.Array:
        """Make `name` resident (evicting idle adapters LRU if pages are short); returns the pool.

        Raises `AdapterError` (nothing changed) for a corrupt adapter or one that
        cannot fit even in an empty pool, and `OutOfPages` when pinned adapters
        and the KV cache leave too few pages (or slots) for now.
        """
        if name in self._resident:
            self._resident.move_to_end(name)
            self.stats["pool_hits"] += 1
            return pool
        if name in self._staged:
            self.stats["prefetch_hits"] += 1
        self.prefetch(name)
        placement, staged = self._staged[name]
        need = placement.num_pages
        t0 = time.perf_counter()
        while not self._free_slots or not self.allocator.can_alloc(need):
            if self._evict_one_idle() is None:
                raise OutOfPages(need, self.allocator.num_free, self.allocator.num_pages)
        t1 = time.perf_counter()
        rows, rows_dev = staged.result()
        t2 = time.perf_counter()
        pages = self.allocator.alloc(need, ("adapter", name), "adapter")
        del self._staged[name]
        self._keep_rows(name, placement, rows)
        pool = self._write(pool, rows_dev, pages)
        self.seconds["evict"] += t1 - t0
        self.seconds["wait_staged"] += t2 - t1
        self.seconds["write"] += time.perf_counter() - t2
        L = self.cfg.num_hidden_layers
        read = L * sum(p.rank * sum(self.cfg.projection_shape(proj)) for proj, p in placement.projections.items())
        self._resident[name] = Resident(self._free_slots.pop(), placement, pages, read_elems=read)
        self.stats["pool_loads"] += 1
        return pool

    def pin(self, name: str) -> None:
        """Mark a resident adapter in use (a running request needs it): it will not be evicted."""
        self._resident[name].pins += 1

    def unpin(self, name: str) -> None:
        r = self._resident[name]
        if r.pins == 0:
            raise ValueError(f"adapter {name!r} is not pinned")
        r.pins -= 1

    def evict_idle(self, pages_needed: int) -> int:
        """Evict idle adapters (LRU first) until `pages_needed` pages are free; returns pages freed."""
        freed = 0
        while self.allocator.num_free < pages_needed:
            n = self._evict_one_idle()
            if n is None:
                break
            freed += n
        return freed

    def _evict_one_idle(self) -> int | None:
        """Evict the least recently used unpinned adapter; pages freed, or None if all are pinned."""
        for name, r in self._resident.items():
            if r.pins == 0:
                del self._resident[name]
                self._free_slots.append(r.slot)
                self.stats["evictions"] += 1
                return self._release_pages(name)
        return None

    def _release_pages(self, name: str) -> int:
        return len(self.allocator.free_owner(("adapter", name)))

    def batch_lora(self, names: list[str], slot_T: np.ndarray, rows: int, impl: str = "reference",
                   kernel: KernelConfig | None = None) -> PagedLora:
        """The model's LoRA input for a batch using resident adapters `names`.

        `slot_T` (int32 `[T]`) is each token's index into `names`, -1 for none;
        `rows` (>= len(names)) is the padded number of adapters per batch; `impl`
        as `ops.add_lora` ("reference": the jnp read of the pages).
        """
        resident = [self._resident[n] for n in names]
        self._table_pages = max(self._table_pages, _pow2(max((len(r.pages) for r in resident), default=1)))
        self._r_max = max(self._r_max, _pow2(max(
            (p.rank for r in resident for p in r.placement.projections.values()), default=1), 8))
        # Projections any adapter seen so far targets (only grows: few compiles); the others launch nothing.
        self._targeted |= {p for r in resident for p in r.placement.projections}
        table = AdapterTable.build([(r.placement, r.pages) for r in resident], rows, self._table_pages)
        return self._lora_input(table, np.asarray(slot_T, np.int32)[None],
                                tuple(p for p in PROJECTIONS if p in self._targeted),
                                _step_meta(slot_T, rows, impl), impl, kernel)

    # ------------------------------------------------- where adapter rows live (hooks of a sharded store)
    def _pack(self, adapter: LoraAdapter, placement: AdapterPlacement) -> np.ndarray:
        """Host rows `[num_shards, L, rows, C]` of `adapter` for `placement` (on a staging thread),
        into a spare buffer when one of their size is free."""
        out = self.spares.take(rows_shape(placement, self.cfg, self.layout, self.shards), self.dtype)
        if out is not None:
            with self._seconds_lock:
                self.stats["spare_packs"] += 1
        return adapter_shard_rows(adapter, placement, self.cfg, self.layout, self.shards, self.dtype, out)

    def _put(self, rows: np.ndarray) -> jax.Array:
        """Start the host-to-device copy of packed rows (on a staging thread)."""
        return jax.device_put(rows[0])

    def _write(self, pool: jax.Array, rows_dev: jax.Array, pages: np.ndarray) -> jax.Array:
        """Copied rows into their pages; returns the pool (donated)."""
        return write_adapter(pool, rows_dev, jnp.asarray(pages), self.layout)

    def _lora_input(self, table: AdapterTable, slot_ids: np.ndarray, projections: tuple[str, ...],
                    meta: LoraMeta | None, impl: str, kernel: KernelConfig | None):
        """The model's LoRA input over `table` (`slot_ids` `[1, T]`)."""
        return PagedLora(table, slot_ids, self.layout, self.cfg, self._r_max, projections, meta, impl, kernel)

    def read_elems(self, name: str) -> int:
        """Weight elements the LoRA kernels read for resident adapter `name` in a step: every
        layer's A and B of each projection at the adapter's rank for it (as its pages hold them;
        a layer it does not target holds zeros, read all the same)."""
        return self._resident[name].read_elems

    def memory(self) -> dict[str, float]:
        """Adapter memory: resident count and internal fragmentation of their pages."""
        alloc = sum(len(r.pages) for r in self._resident.values()) * self.layout.page_elems
        unused = sum(r.placement.unused_elems for r in self._resident.values())
        return {"resident_adapters": len(self._resident), "adapter_fragmentation": unused / alloc if alloc else 0.0}

    def _place(self, adapter: LoraAdapter) -> AdapterPlacement:
        return place_adapter(adapter, self.cfg, self.layout)

    def _placement(self, adapter: LoraAdapter) -> AdapterPlacement:
        placement = self._place(adapter)
        if placement.num_pages > self.layout.num_pages:
            raise AdapterError(
                f"adapter {adapter.name!r} ({adapter.path or 'in memory'}) needs {placement.num_pages} pages, "
                f"more than the whole pool ({self.layout.num_pages} pages)"
            )
        return placement


def _step_meta(slot_T: np.ndarray, rows: int, impl: str) -> LoraMeta | None:
    """The step's LoRA metadata (none for the reference path); tile bounds fixed, so no per-layout compile."""
    return None if impl == "reference" else build_lora_meta(slot_T, max_segments=rows, static_tiles=True)


@functools.partial(jax.jit, donate_argnames=("weights",))
def _write_slot(weights: dict[str, SlotWeights], new: dict[str, SlotWeights], slot: jax.Array) -> dict[str, SlotWeights]:
    return {p: SlotWeights(w.a.at[:, slot].set(new[p].a[:, 0]), w.b.at[:, slot].set(new[p].b[:, 0]),
                           w.ranks.at[:, slot].set(new[p].ranks[:, 0])) for p, w in weights.items()}


class SlotAdapterStore(AdapterStore):
    """S-LoRA's "no unified memory" ablation: adapters in `max_loras` fixed slots of
    `max_rank`, a region reserved beside a KV-only pool (dense `SlotWeights`, every
    adapter padded to `max_rank`). Same tiers, pins and LRU as `AdapterStore`.
    """

    def __init__(self, cfg: LlamaConfig, max_loras: int, max_rank: int, projections=PROJECTIONS,
                 host_budget_bytes: int = 8 << 30, dtype=jnp.bfloat16):
        super().__init__(cfg, layout=None, allocator=None, host_budget_bytes=host_budget_bytes, dtype=dtype,
                         max_resident=max_loras)
        unknown = set(projections) - set(PROJECTIONS)
        if unknown or not projections:
            raise ValueError(f"slot projections must be a non-empty subset of {list(PROJECTIONS)}, got {list(projections)}")
        self.max_loras, self.max_rank = max_loras, max_rank
        self.projections = tuple(p for p in PROJECTIONS if p in projections)
        self._used_elems: dict[str, int] = {}
        self.weights = {p: self._zero_slots(p) for p in self.projections}

    def load(self, pool: jax.Array, name: str) -> jax.Array:
        if name in self._resident:
            self._resident.move_to_end(name)
            self.stats["pool_hits"] += 1
            return pool
        adapter = self.host(name)
        if adapter.max_rank > self.max_rank or not set(adapter.projections) <= set(self.projections):
            raise AdapterError(
                f"adapter {name!r} (rank {adapter.max_rank}, {list(adapter.projections)}) does not fit the fixed "
                f"adapter slots (max rank {self.max_rank}, {list(self.projections)})"
            )
        while not self._free_slots:
            if self._evict_one_idle() is None:
                raise OutOfPages(1, 0, len(self._resident))
        slot = self._free_slots.pop()
        new = pack_slots([adapter], self.cfg, self.dtype, max_rank=self.max_rank)
        L = self.cfg.num_hidden_layers
        for p in self.projections:  # projections this adapter lacks: zeros
            if p not in new:
                h_in, h_out = self.cfg.projection_shape(p)
                new[p] = SlotWeights(jnp.zeros((L, 1, h_in, self.max_rank), self.dtype),
                                     jnp.zeros((L, 1, self.max_rank, h_out), self.dtype), jnp.zeros((L, 1), jnp.int32))
        self.weights = self._write_slot(new, slot)
        self._resident[name] = Resident(slot, None, np.zeros(0, np.int32))
        self._used_elems[name] = sum(m.rank * (m.a.shape[0] + m.b.shape[1]) for m in adapter.modules.values())
        self.stats["pool_loads"] += 1
        return pool

    def prefetch(self, name: str) -> None:
        pass  # the ablation loads synchronously (no staging into fixed slots)

    def ready(self, name: str) -> bool:
        return True  # nothing to wait for: `load` packs on the engine thread

    def _zero_slots(self, proj: str) -> SlotWeights:
        """Zeroed `[L, max_loras, ...]` slots of one projection (placement: `_write_slot` keeps it)."""
        (h_in, h_out), L = self.cfg.projection_shape(proj), self.cfg.num_hidden_layers
        return SlotWeights(jnp.zeros((L, self.max_loras, h_in, self.max_rank), self.dtype),
                           jnp.zeros((L, self.max_loras, self.max_rank, h_out), self.dtype),
                           jnp.zeros((L, self.max_loras), jnp.int32))

    def _write_slot(self, new: dict[str, SlotWeights], slot: int) -> dict[str, SlotWeights]:
        return _write_slot(self.weights, new, jnp.int32(slot))

    def evict_idle(self, pages_needed: int) -> int:
        return 0  # adapters hold no pool pages here: evicting one frees nothing for the KV cache

    def _release_pages(self, name: str) -> int:
        return 0

    def batch_lora(self, names, slot_T, rows, impl="reference", kernel=None):
        # A trailing -1 maps "no adapter" (index -1) to slot -1.
        to_slot = np.array([self._resident[n].slot for n in names] + [-1], np.int32)[slot_T]
        return SlotLora(self.weights, np.asarray(to_slot, np.int32)[None], _step_meta(to_slot, rows, impl), impl, kernel)

    def read_elems(self, name: str) -> int:
        """Weight elements of resident `name` at its own ranks (the kernels read no slot padding)."""
        return self._used_elems[name]

    def memory(self) -> dict[str, float]:
        """Resident count, the reserved slot region, and how much of the resident slots is padding."""
        per_slot = sum((w.a.size + w.b.size) // w.a.shape[1] for w in self.weights.values())  # shapes only: no
        # device op (this runs every step)
        used = sum(self._used_elems[n] for n in self._resident)
        return {"resident_adapters": len(self._resident),
                "adapter_slots_bytes": sum(w.a.nbytes + w.b.nbytes for w in self.weights.values()),
                "adapter_fragmentation": 1 - used / (per_slot * len(self._resident)) if self._resident else 0.0}

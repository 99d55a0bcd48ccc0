"""The tiered adapter store: disk -> host memory -> pages of the unified pool.

- **Disk**: registered PEFT folders (memory-mapped when read; thousands of them).
- **Host**: loaded `LoraAdapter`s, kept LRU under a byte budget.
- **Resident**: adapters whose rows are in pool pages, each with a slot id.
  In-use adapters are pinned by refcount and never evicted; idle ones are
  evicted LRU when pages are needed (by another adapter, or by the KV cache
  through `evict_idle`).

Loading into the pool is `jax.device_put` of the adapter's rows (asynchronous)
plus the donated `write_adapter` scatter; `prefetch` starts the host read and
the host-to-device copy early, so they overlap the device work of the steps
before the adapter is needed. Bad input (a corrupt file, an adapter larger than
the whole pool) raises `AdapterError` for that adapter and changes nothing else.
"""

from __future__ import annotations

import collections
import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np

from slora_jax.adapters.adapter import LoraAdapter
from slora_jax.adapters.peft import load_adapter
from slora_jax.config import LlamaConfig
from slora_jax.errors import AdapterError
from slora_jax.memory.allocator import OutOfPages, PageAllocator
from slora_jax.memory.pool import AdapterPlacement, PoolLayout, adapter_rows, place_adapter, write_adapter


@dataclasses.dataclass
class Resident:
    slot: int
    placement: AdapterPlacement
    pages: np.ndarray  # int32, the adapter's page table
    pins: int = 0


class AdapterStore:
    def __init__(self, cfg: LlamaConfig, layout: PoolLayout, allocator: PageAllocator,
                 host_budget_bytes: int = 8 << 30, dtype=jnp.bfloat16, max_resident: int = 1024):
        self.cfg, self.layout, self.allocator = cfg, layout, allocator
        self.dtype = jnp.dtype(dtype)
        self.host_budget_bytes = host_budget_bytes
        self._paths: dict[str, str] = {}
        self._host: collections.OrderedDict[str, LoraAdapter] = collections.OrderedDict()  # LRU order
        self._resident: collections.OrderedDict[str, Resident] = collections.OrderedDict()  # LRU order
        self._staged: dict[str, tuple[AdapterPlacement, jax.Array]] = {}  # prefetched rows on device
        self._free_slots = list(range(max_resident - 1, -1, -1))
        self.stats = collections.Counter()  # disk_loads, host_hits, pool_loads, pool_hits, evictions

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
        self._host[adapter.name] = adapter

    def __contains__(self, name: str) -> bool:
        return name in self._paths or name in self._host

    @property
    def names(self) -> list[str]:
        return list(dict.fromkeys([*self._paths, *self._host]))

    def host(self, name: str) -> LoraAdapter:
        """The adapter in host memory, read from disk if needed (LRU under the byte budget)."""
        if name in self._host:
            self._host.move_to_end(name)
            self.stats["host_hits"] += 1
            return self._host[name]
        if name not in self._paths:
            raise KeyError(f"unknown adapter {name!r}")
        adapter = load_adapter(self._paths[name], self.cfg, name=name)
        self.stats["disk_loads"] += 1
        self._host[name] = adapter
        self._trim_host()
        return adapter

    def _trim_host(self) -> None:
        used = sum(a.nbytes for a in self._host.values())
        for name in list(self._host):
            if used <= self.host_budget_bytes:
                break
            if name in self._paths:  # only disk-backed adapters can be dropped and re-read
                used -= self._host.pop(name).nbytes

    # --------------------------------------------------------------- residency
    def is_resident(self, name: str) -> bool:
        return name in self._resident

    def resident(self, name: str) -> Resident:
        return self._resident[name]

    def prefetch(self, name: str) -> None:
        """Start reading `name` and copying its rows to the device, without taking pages."""
        if name in self._resident or name in self._staged:
            return
        adapter = self.host(name)
        placement = self._placement(adapter)
        rows = adapter_rows(adapter, placement, self.cfg, self.layout, self.dtype)
        self._staged[name] = (placement, jax.device_put(rows))  # asynchronous copy

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
        self.prefetch(name)
        placement, rows = self._staged[name]
        need = placement.num_pages
        while not self._free_slots or not self.allocator.can_alloc(need):
            if self._evict_one_idle() is None:
                raise OutOfPages(need, self.allocator.num_free, self.allocator.num_pages)
        pages = self.allocator.alloc(need, ("adapter", name), "adapter")
        del self._staged[name]
        pool = write_adapter(pool, rows, jnp.asarray(pages), self.layout)
        self._resident[name] = Resident(self._free_slots.pop(), placement, pages)
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
                return len(self.allocator.free_owner(("adapter", name)))
        return None

    def _placement(self, adapter: LoraAdapter) -> AdapterPlacement:
        placement = place_adapter(adapter, self.cfg, self.layout)
        if placement.num_pages > self.layout.num_pages:
            raise AdapterError(
                f"adapter {adapter.name!r} ({adapter.path or 'in memory'}) needs {placement.num_pages} pages, "
                f"more than the whole pool ({self.layout.num_pages} pages)"
            )
        return placement


"""Host-side page allocator of the unified pool.

The pool is `num_pages` fixed-size pages; a page id names the same slot in
every layer's device buffer. KV-cache blocks and adapter weights both take
pages from this one allocator, so pages freed by a finished request can hold
adapter weights at once, and vice versa (S-LoRA's Unified Paging).

Every reference to a page is held by an **owner**, a hashable key such as
`("kv", request_id)` or `("adapter", name)`. A page's refcount is the number
of references all owners hold on it; it returns to the free list when that
reaches 0. Sharing a page (e.g. a common prompt prefix) is `incref` by a
second owner; `free_owner` then drops only that owner's references.

Invariants (checked by tests/test_allocator.py):
- a page is either free (refcount 0, in the free list once) or allocated
  (refcount > 0, not in the free list): never handed out twice, never lost;
- refcount[p] == sum over owners of the references that owner holds on p;
- a call that raises leaves the allocator unchanged.

Pure Python + numpy, not thread-safe: the engine's host loop owns it.
"""

from __future__ import annotations

import dataclasses
import heapq
import operator
from collections import Counter
from collections.abc import Hashable, Iterable, Mapping
from typing import Literal

import numpy as np

from slora_jax.errors import SloraError

Kind = Literal["kv", "adapter"]
KINDS: tuple[str, ...] = ("kv", "adapter")

_FREE = -1  # value of `_kind` for a free page; otherwise an index into KINDS


class OutOfPages(SloraError, MemoryError):
    """Not enough free pages for an allocation; the allocator is unchanged."""

    def __init__(self, requested: int, free: int, total: int):
        self.requested = requested
        self.free = free
        self.total = total
        super().__init__(
            f"out of pool pages: need {requested}, {free} of {total} free"
        )


@dataclasses.dataclass(frozen=True)
class PoolStats:
    """A snapshot of the pool's page usage."""

    total: int
    free: int
    kv: int  # allocated pages holding KV-cache blocks
    adapter: int  # allocated pages holding adapter weights
    owners: int  # owners holding at least one reference

    @property
    def used(self) -> int:
        return self.kv + self.adapter


class PageAllocator:
    """Free list of page ids 0..num_pages-1 with per-page kind and refcount."""

    def __init__(self, num_pages: int):
        num_pages = operator.index(num_pages)
        if num_pages < 0:
            raise ValueError(f"num_pages must be >= 0, got {num_pages}")
        self._num_pages = num_pages
        # Lowest free id first (a min-heap): deterministic, and live pages stay
        # packed at low ids, which makes page tables and dumps easy to read.
        self._free_heap: list[int] = list(range(num_pages))
        self._refcount = np.zeros(num_pages, np.int32)  # [num_pages]
        self._kind = np.full(num_pages, _FREE, np.int8)  # [num_pages]
        # owner -> {page: references held}; dicts keep allocation order, which
        # is the order of a sequence's KV blocks in its page table.
        self._refs: dict[Hashable, dict[int, int]] = {}

    # ---- queries ---------------------------------------------------------

    @property
    def num_pages(self) -> int:
        return self._num_pages

    @property
    def num_free(self) -> int:
        return len(self._free_heap)

    def can_alloc(self, n: int) -> bool:
        return 0 <= operator.index(n) <= self.num_free

    def free_pages(self) -> np.ndarray:
        """Ids of the free pages, ascending. [num_free] int32."""
        return np.array(sorted(self._free_heap), np.int32)

    def pages_of(self, owner: Hashable) -> np.ndarray:
        """Pages `owner` holds references on, in the order it got them. int32."""
        return np.fromiter(self._refs.get(owner, ()), np.int32)

    def refcount(self, pages: Iterable[int]) -> np.ndarray:
        """Refcounts of `pages` (0 for a free page). [len(pages)] int32."""
        return self._refcount[self._check_ids(pages)].copy()

    def stats(self) -> PoolStats:
        return PoolStats(
            total=self._num_pages,
            free=self.num_free,
            kv=int(np.count_nonzero(self._kind == KINDS.index("kv"))),
            adapter=int(np.count_nonzero(self._kind == KINDS.index("adapter"))),
            owners=len(self._refs),
        )

    def fragmentation(
        self, used_elems_by_owner: Mapping[Hashable, int], elems_per_page: int
    ) -> float:
        """Internal fragmentation of the given owners' pages.

        (allocated - used) / allocated elements, where an owner's allocated
        elements are `len(pages_of(owner)) * elems_per_page` and its used
        elements are given (e.g. tokens * elements per token for a KV owner).
        A page shared by two owners counts for each. 0.0 when nothing is
        allocated.
        """
        elems_per_page = operator.index(elems_per_page)
        if elems_per_page <= 0:
            raise ValueError(f"elems_per_page must be > 0, got {elems_per_page}")
        allocated = used = 0
        for owner, owner_used in used_elems_by_owner.items():
            owner_alloc = len(self._refs.get(owner, ())) * elems_per_page
            if not 0 <= owner_used <= owner_alloc:
                raise ValueError(
                    f"owner {owner!r} uses {owner_used} elements but holds "
                    f"{owner_alloc} ({elems_per_page} per page)"
                )
            allocated += owner_alloc
            used += owner_used
        return (allocated - used) / allocated if allocated else 0.0

    # ---- updates ---------------------------------------------------------

    def alloc(self, n: int, owner: Hashable, kind: Kind) -> np.ndarray:
        """Allocate `n` pages to `owner`, all or none. [n] int32, ascending.

        Raises OutOfPages (and changes nothing) when fewer than `n` are free.
        """
        n = operator.index(n)
        if n < 0:
            raise ValueError(f"cannot allocate {n} pages")
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        hash(owner)  # an unhashable owner fails here, before any state changes
        if n > self.num_free:
            raise OutOfPages(n, self.num_free, self._num_pages)
        if n == 0:
            return np.zeros(0, np.int32)
        pages = np.array(
            [heapq.heappop(self._free_heap) for _ in range(n)], np.int32
        )
        self._refcount[pages] = 1
        self._kind[pages] = KINDS.index(kind)
        refs = self._refs.setdefault(owner, {})
        for p in pages.tolist():
            refs[p] = 1
        return pages

    def incref(self, pages: Iterable[int], owner: Hashable) -> None:
        """`owner` takes one more reference on each of `pages` (all allocated).

        A page listed k times gets k references. Raises ValueError (and
        changes nothing) if any page is free or out of range.
        """
        ids = self._check_ids(pages)
        hash(owner)
        self._check_allocated(ids)
        np.add.at(self._refcount, ids, 1)
        refs = self._refs.setdefault(owner, {})
        for p in ids.tolist():
            refs[p] = refs.get(p, 0) + 1
        if not refs:  # incref of no pages must not register an owner
            del self._refs[owner]

    def free(self, pages: Iterable[int], owner: Hashable) -> np.ndarray:
        """Drop one of `owner`'s references on each of `pages`.

        Returns the pages whose refcount reached 0 (now free), int32. Raises
        ValueError (and changes nothing) if any page is out of range, free, or
        not held (often enough, for a page listed twice) by `owner`.
        """
        ids = self._check_ids(pages)
        self._check_allocated(ids)
        refs = self._refs.get(owner, {})
        drop = Counter(ids.tolist())  # page -> references to drop
        for p, k in drop.items():
            if refs.get(p, 0) < k:
                raise ValueError(
                    f"owner {owner!r} holds {refs.get(p, 0)} reference(s) "
                    f"on page {p}, cannot free {k}"
                )
        for p, k in drop.items():
            refs[p] -= k
            if refs[p] == 0:
                del refs[p]
        if owner in self._refs and not refs:
            del self._refs[owner]
        return self._decref(ids)

    def free_owner(self, owner: Hashable) -> np.ndarray:
        """Drop every reference `owner` holds (finished or preempted request,
        evicted adapter). Returns the pages now free, int32; an owner holding
        nothing is a no-op.
        """
        refs = self._refs.pop(owner, {})
        ids = np.repeat(
            np.fromiter(refs.keys(), np.int64, len(refs)),
            np.fromiter(refs.values(), np.int64, len(refs)),
        )
        return self._decref(ids)

    # ---- helpers ---------------------------------------------------------

    def _decref(self, ids: np.ndarray) -> np.ndarray:
        """Decrement refcounts (already validated); free pages that reach 0."""
        np.subtract.at(self._refcount, ids, 1)
        freed = np.unique(ids[self._refcount[ids] == 0]).astype(np.int32)
        self._kind[freed] = _FREE
        for p in freed.tolist():
            heapq.heappush(self._free_heap, p)
        return freed

    def _check_ids(self, pages: Iterable[int]) -> np.ndarray:
        ids = np.asarray(pages)
        if ids.ndim != 1:
            raise ValueError(f"page ids must be 1-D, got shape {ids.shape}")
        if ids.size == 0:
            return ids.astype(np.int64)
        if not np.issubdtype(ids.dtype, np.integer):
            raise ValueError(f"page ids must be integers, got dtype {ids.dtype}")
        bad = ids[(ids < 0) | (ids >= self._num_pages)]
        if bad.size:
            raise ValueError(
                f"page id(s) {bad.tolist()} out of range [0, {self._num_pages})"
            )
        return ids.astype(np.int64)

    def _check_allocated(self, ids: np.ndarray) -> None:
        free = ids[self._refcount[ids] == 0]
        if free.size:
            raise ValueError(f"page(s) {np.unique(free).tolist()} are free")

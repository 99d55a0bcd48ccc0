"""Tests of the unified pool's page allocator.

A hypothesis state machine runs random alloc / incref / free / free_owner
sequences (valid and invalid) against a plain reference model: a Counter of
references per owner. After every step the allocator must agree with it.
"""

from collections import Counter

import numpy as np
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    rule,
)

from slora_jax.errors import SloraError
from slora_jax.memory.allocator import OutOfPages, PageAllocator, PoolStats

OWNERS = [("kv", 0), ("kv", 1), ("kv", 2), ("adapter", "a"), ("adapter", "b")]
owners = st.sampled_from(OWNERS)


def snapshot(a: PageAllocator):
    """Everything observable about the allocator's state."""
    return (
        a.free_pages().tolist(),
        a.refcount(np.arange(a.num_pages)).tolist(),
        {o: a.pages_of(o).tolist() for o in OWNERS},
        a.stats(),
    )


class AllocatorMachine(RuleBasedStateMachine):
    @initialize(num_pages=st.integers(0, 24))
    def init(self, num_pages):
        self.a = PageAllocator(num_pages)
        self.n = num_pages
        self.refs = {o: Counter() for o in OWNERS}  # owner -> page -> refs
        self.kind = {}  # page -> kind, for allocated pages

    # ---- reference model ---------------------------------------------------

    def model_refcount(self, p):
        return sum(c[p] for c in self.refs.values())

    def model_free(self):
        return [p for p in range(self.n) if self.model_refcount(p) == 0]

    def model_allocated(self):
        return [p for p in range(self.n) if self.model_refcount(p) > 0]

    def drop(self, owner, pages):
        """Apply a free of `pages` by `owner` to the model; pages now free."""
        for p in pages:
            self.refs[owner][p] -= 1
        self.refs[owner] += Counter()  # drop zero entries
        freed = sorted({p for p in pages if self.model_refcount(p) == 0})
        for p in freed:
            del self.kind[p]
        return freed

    # ---- rules --------------------------------------------------------------

    @rule(n=st.integers(0, 30), owner=owners)
    def alloc(self, n, owner):
        free = self.model_free()
        if n > len(free):
            before = snapshot(self.a)
            assert not self.a.can_alloc(n)
            with pytest.raises(OutOfPages):
                self.a.alloc(n, owner, owner[0])
            assert snapshot(self.a) == before
            return
        assert self.a.can_alloc(n)
        pages = self.a.alloc(n, owner, owner[0])
        assert pages.dtype == np.int32 and pages.shape == (n,)
        # lowest free ids first; so in particular only free pages, each once
        assert pages.tolist() == free[:n]
        for p in pages.tolist():
            self.refs[owner][p] += 1
            self.kind[p] = owner[0]

    @rule(owner=owners, data=st.data())
    def incref(self, owner, data):
        allocated = self.model_allocated()
        if not allocated:
            return
        pages = data.draw(st.lists(st.sampled_from(allocated), max_size=6))
        assert self.a.incref(pages, owner) is None
        self.refs[owner].update(pages)

    @rule(owner=owners, data=st.data())
    def free(self, owner, data):
        held = sorted(self.refs[owner].elements())
        if not held:
            return
        idx = data.draw(st.lists(st.sampled_from(range(len(held))), unique=True))
        pages = [held[i] for i in idx]
        freed = self.a.free(np.array(pages, np.int32), owner)
        assert freed.dtype == np.int32
        assert sorted(freed.tolist()) == self.drop(owner, pages)

    @rule(owner=owners)
    def free_owner(self, owner):
        freed = self.a.free_owner(owner)
        assert sorted(freed.tolist()) == self.drop(
            owner, list(self.refs[owner].elements())
        )

    @rule(owner=owners, data=st.data())
    def bad_free_or_incref(self, owner, data):
        """A list with one bad id in it changes nothing."""
        held = list(self.refs[owner].elements())
        bad = [-1, self.n, self.n + 7] + self.model_free()
        not_held = [p for p in self.model_allocated() if p not in self.refs[owner]]
        good = data.draw(st.lists(st.sampled_from(held), max_size=3)) if held else []
        bad_id = data.draw(st.sampled_from(bad + not_held))
        pages = good + [bad_id]
        if bad_id in not_held:
            op = "free"  # allocated but not this owner's: only free rejects it
        else:
            op = data.draw(st.sampled_from(["free", "incref"]))
        before = snapshot(self.a)
        with pytest.raises(ValueError):
            getattr(self.a, op)(pages, owner)
        assert snapshot(self.a) == before

    @rule(owner=owners)
    def over_free(self, owner):
        """Freeing a page more times than the owner holds it changes nothing."""
        if not self.refs[owner]:
            return
        p, k = next(iter(self.refs[owner].items()))
        before = snapshot(self.a)
        with pytest.raises(ValueError):
            self.a.free([p] * (k + 1), owner)
        assert snapshot(self.a) == before

    # ---- invariants -----------------------------------------------------------

    @invariant()
    def agrees_with_model(self):
        free = self.a.free_pages().tolist()
        # never lost, never in two places: free + allocated partition the pool
        assert free == self.model_free()
        assert len(free) == self.a.num_free
        assert len(set(free)) == len(free)
        counts = self.a.refcount(np.arange(self.n))
        assert counts.tolist() == [self.model_refcount(p) for p in range(self.n)]
        assert (counts[free] == 0).all()
        for o in OWNERS:
            assert sorted(self.a.pages_of(o).tolist()) == sorted(self.refs[o])

    @invariant()
    def stats_consistent(self):
        s = self.a.stats()
        kinds = Counter(self.kind.values())
        assert s == PoolStats(
            total=self.n,
            free=len(self.model_free()),
            kv=kinds["kv"],
            adapter=kinds["adapter"],
            owners=sum(1 for c in self.refs.values() if c),
        )
        assert s.free + s.used == s.total


AllocatorMachine.TestCase.settings = settings(
    max_examples=150,
    stateful_step_count=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestAllocatorMachine = AllocatorMachine.TestCase


# ---- plain unit tests ---------------------------------------------------------


def test_out_of_pages_is_all_or_nothing():
    a = PageAllocator(4)
    a.alloc(3, ("kv", 0), "kv")
    with pytest.raises(OutOfPages, match="need 2, 1 of 4 free") as e:
        a.alloc(2, ("kv", 1), "kv")
    assert isinstance(e.value, SloraError) and isinstance(e.value, MemoryError)
    assert (e.value.requested, e.value.free, e.value.total) == (2, 1, 4)
    assert a.free_pages().tolist() == [3]
    assert a.pages_of(("kv", 1)).size == 0
    assert a.stats().owners == 1


def test_lowest_free_ids_first():
    a = PageAllocator(6)
    assert a.alloc(3, "x", "kv").tolist() == [0, 1, 2]
    assert a.free([1], "x").tolist() == [1]
    assert a.alloc(2, "y", "adapter").tolist() == [1, 3]
    assert a.pages_of("x").tolist() == [0, 2]


def test_pages_of_keeps_allocation_order():
    a = PageAllocator(8)
    a.alloc(2, "x", "kv")  # 0, 1
    a.alloc(2, "y", "kv")  # 2, 3
    a.free([0], "x")
    a.alloc(2, "x", "kv")  # 0, 4: appended after the page x already held
    assert a.pages_of("x").tolist() == [1, 0, 4]


def test_kv_pages_freed_are_reused_for_adapters():
    a = PageAllocator(4)
    kv = a.alloc(4, ("kv", 0), "kv")
    assert a.stats() == PoolStats(total=4, free=0, kv=4, adapter=0, owners=1)
    assert a.free_owner(("kv", 0)).tolist() == kv.tolist()
    a.alloc(4, ("adapter", "a"), "adapter")
    assert a.stats() == PoolStats(total=4, free=0, kv=0, adapter=4, owners=1)


def test_shared_page_lives_until_last_owner_frees_it():
    a = PageAllocator(4)
    p = a.alloc(2, ("kv", 0), "kv")
    a.incref(p[:1], ("kv", 1))
    assert a.refcount(p).tolist() == [2, 1]
    assert a.free_owner(("kv", 0)).tolist() == [1]
    assert a.refcount(p).tolist() == [1, 0]
    assert a.pages_of(("kv", 1)).tolist() == [0]
    assert a.free_owner(("kv", 1)).tolist() == [0]
    assert a.num_free == 4


@pytest.mark.parametrize(
    "pages, match",
    [
        ([4], "out of range"),
        ([-1], "out of range"),
        ([2], "are free"),
        ([0, 0], "cannot free 2"),
        ([0.0], "integers"),
        ([[0]], "1-D"),
    ],
)
def test_free_bad_ids_raise_and_change_nothing(pages, match):
    a = PageAllocator(4)
    a.alloc(2, "x", "kv")
    with pytest.raises(ValueError, match=match):
        a.free(pages, "x")
    assert a.refcount([0, 1, 2, 3]).tolist() == [1, 1, 0, 0]


def test_double_free_raises():
    a = PageAllocator(2)
    p = a.alloc(1, "x", "kv")
    a.free(p, "x")
    with pytest.raises(ValueError, match="free"):
        a.free(p, "x")


def test_free_by_owner_without_reference_raises():
    a = PageAllocator(2)
    p = a.alloc(1, "x", "kv")
    with pytest.raises(ValueError, match="holds 0"):
        a.free(p, "y")
    assert a.refcount(p).tolist() == [1]


def test_incref_of_free_or_out_of_range_page_raises():
    a = PageAllocator(3)
    a.alloc(1, "x", "kv")
    for pages in ([0, 1], [0, 3]):
        with pytest.raises(ValueError):
            a.incref(pages, "y")
    assert a.refcount([0, 1, 2]).tolist() == [1, 0, 0]
    assert a.stats().owners == 1


def test_bad_alloc_arguments():
    a = PageAllocator(3)
    with pytest.raises(ValueError, match="cannot allocate -1"):
        a.alloc(-1, "x", "kv")
    with pytest.raises(ValueError, match="kind"):
        a.alloc(1, "x", "lora")
    with pytest.raises(TypeError):
        a.alloc(1, ["unhashable"], "kv")
    with pytest.raises(TypeError):
        a.alloc(1.5, "x", "kv")
    assert a.num_free == 3 and a.stats().owners == 0
    with pytest.raises(ValueError):
        PageAllocator(-1)


def test_empty_operations_register_no_owner():
    a = PageAllocator(0)
    assert a.alloc(0, "x", "kv").shape == (0,)
    a.incref([], "x")
    assert a.free([], "x").shape == (0,)
    assert a.free_owner("never-seen").shape == (0,)
    assert a.can_alloc(0) and not a.can_alloc(1)
    assert a.stats() == PoolStats(total=0, free=0, kv=0, adapter=0, owners=0)
    with pytest.raises(OutOfPages):
        a.alloc(1, "x", "kv")


def test_fragmentation():
    a = PageAllocator(10)
    a.alloc(3, "x", "kv")  # 3 pages x 4 elems = 12, uses 9
    a.alloc(1, "y", "adapter")  # 4, uses 4
    assert a.fragmentation({"x": 9, "y": 4}, elems_per_page=4) == 3 / 16
    assert a.fragmentation({"y": 4}, elems_per_page=4) == 0.0
    assert a.fragmentation({}, elems_per_page=4) == 0.0
    with pytest.raises(ValueError, match="uses 13"):
        a.fragmentation({"x": 13}, elems_per_page=4)
    with pytest.raises(ValueError, match="holds 0"):
        a.fragmentation({"z": 1}, elems_per_page=4)
    with pytest.raises(ValueError, match="elems_per_page"):
        a.fragmentation({"x": 1}, elems_per_page=0)

"""The tiered adapter store: disk -> host LRU -> pool pages, pins, eviction, bad input."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from slora_jax.adapters import pack_slots, random_adapter, save_peft_adapter
from slora_jax.adapters.adapter import LoraAdapter
from slora_jax.adapters.store import AdapterStore
from slora_jax.config import preset
from slora_jax.errors import AdapterError
from slora_jax.memory.allocator import OutOfPages, PageAllocator
from slora_jax.memory.pool import PoolLayout, adapter_rows, create_pool, gather_slots, place_adapter

CFG = preset("tiny")
LAYOUT = PoolLayout.for_model(CFG, num_pages=64, page_size=16, lora_chunk=64)  # 32 rows of 64 per page


def make_store(tmp_path, n=4, rank=8, host_budget=1 << 30, num_pages=None, stage_threads=1):
    layout = LAYOUT if num_pages is None else PoolLayout.for_model(CFG, num_pages, 16, 64)
    alloc = PageAllocator(layout.num_pages)
    store = AdapterStore(CFG, layout, alloc, host_budget_bytes=host_budget, dtype=jnp.float32,
                         stage_threads=stage_threads)
    ads = []
    for i in range(n):
        ad = random_adapter(CFG, rank, ("q", "v", "down"), seed=i, name=f"a{i}")
        save_peft_adapter(ad, tmp_path / f"a{i}")
        store.register(f"a{i}", tmp_path / f"a{i}")
        ads.append(ad)
    return store, alloc, layout, ads


def test_resident_adapters_read_back_from_pages(tmp_path):
    store, alloc, layout, ads = make_store(tmp_path)
    pool = create_pool(layout, jnp.float32)
    for name in ["a2", "a0", "a3"]:
        pool = store.load(pool, name)
    assert store.stats["disk_loads"] == 3
    resident = sorted((store.resident(n).slot, n) for n in ["a2", "a0", "a3"])
    got = gather_slots(pool, layout, CFG, [(store.resident(n).placement, store.resident(n).pages) for _, n in resident])
    want = pack_slots([ads[int(n[1])] for _, n in resident], CFG, jnp.float32)
    for proj in want:
        np.testing.assert_allclose(np.asarray(got[proj].a), np.asarray(want[proj].a), rtol=1e-6)
        np.testing.assert_allclose(np.asarray(got[proj].b), np.asarray(want[proj].b), rtol=1e-6)
    pool = store.load(pool, "a0")  # already resident: no copy
    assert store.stats["pool_hits"] == 1 and store.stats["pool_loads"] == 3


def test_host_tier_is_lru_under_its_byte_budget(tmp_path):
    two_adapters = 2 * random_adapter(CFG, 8, ("q", "v", "down")).nbytes
    store, _, _, _ = make_store(tmp_path, host_budget=two_adapters)
    for name in ["a0", "a1", "a0", "a2", "a0"]:
        store.host(name)
    # a1 was least recently used when a2 came in, so it was dropped; a0 stayed.
    assert store.stats["disk_loads"] == 3 and store.stats["host_hits"] == 2
    store.host("a1")
    assert store.stats["disk_loads"] == 4


def assert_resident_equal(store, pool, layout, name, adapter):
    got = gather_slots(pool, layout, CFG, [(store.resident(name).placement, store.resident(name).pages)])
    want = pack_slots([adapter], CFG, jnp.float32)
    for proj in want:
        np.testing.assert_array_equal(np.asarray(got[proj].a), np.asarray(want[proj].a))
        np.testing.assert_array_equal(np.asarray(got[proj].b), np.asarray(want[proj].b))


def test_evicted_adapters_load_again_from_their_packed_rows(tmp_path):
    per = place_adapter(random_adapter(CFG, 8, ("q", "v", "down")), CFG, LAYOUT).num_pages
    store, _, layout, ads = make_store(tmp_path, num_pages=per)  # room for one adapter
    pool = create_pool(layout, jnp.float32)
    pool = store.load(pool, "a0")
    assert store._host["a0"].adapter is None  # the packed rows are all a load needs
    store.fetch("a0")  # what a request's submission asks: in host memory, and known to be valid
    assert store.stats["disk_loads"] == 1
    pool = store.load(pool, "a1")  # evicts a0
    pool = store.load(pool, "a0")  # no disk read, no packing
    assert store.stats["disk_loads"] == 2 and store.stats["packed_hits"] == 1 and store.stats["evictions"] == 2
    assert_resident_equal(store, pool, layout, "a0", ads[0])


def test_packed_rows_count_in_the_host_budget(tmp_path):
    placement = place_adapter(random_adapter(CFG, 8, ("q", "v", "down")), CFG, LAYOUT)
    rows_bytes = adapter_rows(random_adapter(CFG, 8, ("q", "v", "down")), placement, CFG, LAYOUT, jnp.float32).nbytes
    store, _, layout, ads = make_store(tmp_path, host_budget=rows_bytes, num_pages=placement.num_pages)
    pool = create_pool(layout, jnp.float32)
    for name in ["a0", "a1", "a0"]:  # a1 pushes a0's rows out of host memory
        pool = store.load(pool, name)
    assert store.stats["disk_loads"] == 3 and store.stats["packed_hits"] == 0
    # An in-memory adapter stays in host memory (only its rows are dropped) and packs again.
    mem = random_adapter(CFG, 8, ("q", "v", "down"), seed=9, name="mem")
    store.add(mem)
    for name in ["mem", "a0", "mem"]:
        pool = store.load(pool, name)
    assert store.stats["packed_hits"] == 0 and store._host["mem"].rows is None
    assert_resident_equal(store, pool, layout, "mem", mem)


def test_pinned_adapters_are_never_evicted(tmp_path):
    per = place_adapter(random_adapter(CFG, 8, ("q", "v", "down")), CFG, LAYOUT).num_pages
    store, alloc, layout, _ = make_store(tmp_path, num_pages=2 * per)  # room for two adapters
    pool = create_pool(layout, jnp.float32)
    pool = store.load(pool, "a0")
    store.pin("a0")
    pool = store.load(pool, "a1")
    pool = store.load(pool, "a2")  # evicts a1 (idle), not a0 (pinned)
    assert store.is_resident("a0") and store.is_resident("a2") and not store.is_resident("a1")
    store.pin("a2")
    before = (alloc.stats(), [store.is_resident(n) for n in store.names])
    with pytest.raises(OutOfPages):
        store.load(pool, "a3")
    assert (alloc.stats(), [store.is_resident(n) for n in store.names]) == before
    store.unpin("a2")
    pool = store.load(pool, "a3")
    assert store.is_resident("a3") and not store.is_resident("a2")
    with pytest.raises(ValueError, match="not pinned"):
        store.unpin("a3")


def test_kv_cache_can_take_pages_from_idle_adapters(tmp_path):
    store, alloc, layout, _ = make_store(tmp_path)
    pool = create_pool(layout, jnp.float32)
    for name in ["a0", "a1", "a2"]:
        pool = store.load(pool, name)
    store.pin("a1")
    want = alloc.num_free + 2  # two more pages than free: some idle adapter must go
    freed = store.evict_idle(want)
    assert freed > 0 and alloc.num_free >= want and store.is_resident("a1")
    alloc.alloc(want, ("kv", 0), "kv")


def test_bad_adapters_fail_alone(tmp_path):
    store, alloc, layout, _ = make_store(tmp_path, n=2)
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "adapter_config.json").write_text("{not json")
    store.register("broken", tmp_path / "broken")
    huge = random_adapter(CFG, 256, ("q", "k", "v", "o", "gate", "up", "down"), name="huge")
    store.add(huge)
    pool = create_pool(layout, jnp.float32)
    pool = store.load(pool, "a0")
    with pytest.raises(AdapterError, match="broken"):
        store.load(pool, "broken")
    with pytest.raises(AdapterError, match="more than the whole pool"):
        store.load(pool, "huge")
    pool = store.load(pool, "a1")
    assert store.is_resident("a0") and store.is_resident("a1")
    with pytest.raises(ValueError, match="already registered"):
        store.register("a0", tmp_path / "a0")
    with pytest.raises(KeyError):
        store.load(pool, "nope")


def test_prefetch_stages_rows_without_taking_pages(tmp_path):
    store, alloc, layout, ads = make_store(tmp_path, n=3)
    free = alloc.num_free
    store.prefetch("a1")
    assert alloc.num_free == free and not store.is_resident("a1")
    pool = store.load(create_pool(layout, jnp.float32), "a1")
    assert store.is_resident("a1") and store.stats["disk_loads"] == 1 and store.stats["prefetch_hits"] == 1
    got = gather_slots(pool, layout, CFG, [(store.resident("a1").placement, store.resident("a1").pages)])
    want = pack_slots([ads[1]], CFG, jnp.float32)
    np.testing.assert_allclose(np.asarray(got["v"].b), np.asarray(want["v"].b), rtol=1e-6)
    # prefetch_only keeps exactly the names asked for (resident ones need nothing), skipping bad ones
    store.add(random_adapter(CFG, 256, ("q", "k", "v", "o", "gate", "up", "down"), name="huge"))
    store.prefetch_only(["a0", "huge", "a2", "a1"])  # "huge" needs more than the whole pool: skipped
    assert set(store._staged) == {"a0", "a2"}
    store.prefetch_only(["a2"])
    assert set(store._staged) == {"a2"} and alloc.num_free == free - len(store.resident("a1").pages)


def test_several_staging_threads_pack_adapters_at_once(tmp_path):
    store, alloc, layout, ads = make_store(tmp_path, n=4, stage_threads=3)
    store.prefetch_only(["a3", "a1", "a0", "a2"])
    pool = create_pool(layout, jnp.float32)
    for name in ["a0", "a1", "a2", "a3"]:
        pool = store.load(pool, name)
    assert store.stats["prefetch_hits"] == 4 and store._stager._max_workers == 3
    for i, ad in enumerate(ads):
        assert_resident_equal(store, pool, layout, f"a{i}", ad)


def test_host_budget_check_measures_each_adapter_once(tmp_path, monkeypatch):
    """Every load checks the host budget over all entries; an adapter's size (a walk over its
    modules) is measured once, not on every check."""
    store, alloc, layout, ads = make_store(tmp_path, n=4)
    calls = []
    size = LoraAdapter.nbytes.fget
    monkeypatch.setattr(LoraAdapter, "nbytes", property(lambda a: calls.append(a.name) or size(a)))
    for i in range(6):
        store.add(random_adapter(CFG, 4, ("q",), seed=10 + i, name=f"m{i}"))
    pool = create_pool(layout, jnp.float32)
    for name in ["m0", "m1", "m2", "m3", "m4", "m5", "m0", "m1"]:
        pool = store.load(pool, name)
        store._evict_one_idle()
    assert sorted(set(calls)) == [f"m{i}" for i in range(6)] and len(calls) == 6


def test_dropped_rows_are_packed_into_again_and_loads_stay_exact(tmp_path):
    per = place_adapter(random_adapter(CFG, 8, ("q", "v", "down")), CFG, LAYOUT)
    rows_bytes = adapter_rows(random_adapter(CFG, 8, ("q", "v", "down")), per, CFG, LAYOUT, jnp.float32).nbytes
    layout = PoolLayout.for_model(CFG, per.num_pages, 16, 64)  # room for one adapter: every load evicts
    store = AdapterStore(CFG, layout, PageAllocator(layout.num_pages), host_budget_bytes=rows_bytes,
                         dtype=jnp.float32, stage_threads=2, spare_bytes=4 * rows_bytes)
    ads = [random_adapter(CFG, 8, ("q", "v", "down"), seed=i, name=f"m{i}") for i in range(4)]
    for ad in ads[:2]:
        store.add(ad)
    for ad in ads[2:]:
        store.add(ad.folded(jnp.float32))
    pool = create_pool(layout, jnp.float32)
    for i in [0, 1, 2, 3, 0, 2, 1, 3, 3, 0]:
        store.prefetch_only([f"m{(i + 1) % 4}"])  # a staged copy in flight while rows are dropped
        pool = store.load(pool, f"m{i}")
        assert_resident_equal(store, pool, layout, f"m{i}", ads[i])
    # Each load's rows push the previous ones out of the 1-adapter host budget, into the spares.
    assert store.stats["spare_packs"] >= 4 and store.spares.reuses == store.stats["spare_packs"]
    assert store.stats["packs"] + store.stats["packed_hits"] >= 10


def test_rows_a_staging_will_copy_are_not_recycled(tmp_path):
    per = place_adapter(random_adapter(CFG, 8, ("q", "v", "down")), CFG, LAYOUT)
    layout = PoolLayout.for_model(CFG, per.num_pages, 16, 64)  # room for one adapter
    store = AdapterStore(CFG, layout, PageAllocator(layout.num_pages), dtype=jnp.float32, spare_bytes=1 << 30)
    for i in range(2):
        store.add(random_adapter(CFG, 8, ("q", "v", "down"), seed=i, name=f"m{i}"))
    pool = create_pool(layout, jnp.float32)
    pool = store.load(store.load(pool, "m0"), "m1")  # m0 evicted from the pool, its rows kept on the host
    store.prefetch("m0")  # a packed hit: the staging copies the host tier's rows
    staged_rows = store._staged["m0"][1].result()[0]
    assert staged_rows is store._host["m0"].rows
    store.host_budget_bytes = 0
    store._trim_host()  # drops both adapters' rows
    assert store._host["m0"].rows is None and store.spares.bytes == staged_rows.nbytes  # m1's alone
    out = store.spares.take(staged_rows.shape, staged_rows.dtype)
    assert out is not None and not np.shares_memory(out, staged_rows)

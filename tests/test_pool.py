"""The unified pool on the device: adapter pages round-trip, KV pages serve the model."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from slora_jax.adapters import LoraAdapter, LoraModule, pack_slots, random_adapter
from slora_jax.config import preset
from slora_jax.memory.allocator import PageAllocator
from slora_jax.memory.kv_cache import PagedKVCache
from slora_jax.memory.pool import (
    AdapterTable,
    WHOLE,
    PoolLayout,
    adapter_rows,
    adapter_shard_rows,
    create_pool,
    gather_slots,
    lora_from_pages,
    place_adapter,
    rows_shape,
    write_adapter,
)
from slora_jax.model import DenseKVCache, forward, init_random_params

CFG = preset("tiny")  # GQA 4:2, head_dim 16, hidden 64, intermediate 128


def adapters():
    """Mixed ranks (incl. not a multiple of anything) and targets; one with a per-layer rank."""
    ads = [
        random_adapter(CFG, 3, ("q", "v"), seed=1, name="r3"),
        random_adapter(CFG, 16, ("q", "k", "v", "o", "gate", "up", "down"), seed=2, name="r16"),
        random_adapter(CFG, 8, ("gate", "down"), alpha=4, seed=3, name="r8"),
    ]
    rng = np.random.default_rng(0)
    h_in, h_out = CFG.projection_shape("down")
    ads[2].modules[(1, "down")] = LoraModule(rng.standard_normal((h_in, 5), np.float32),
                                             rng.standard_normal((5, h_out), np.float32), 0.5)
    del ads[2].modules[(0, "gate")]
    return ads


def resident_adapters():
    """`adapters()` written into a fresh pool: (layout, allocator, pool, adapters, [(placement, pages)])."""
    layout = PoolLayout.for_model(CFG, num_pages=256, page_size=4, lora_chunk=16)
    alloc = PageAllocator(layout.num_pages)
    pool = create_pool(layout, jnp.float32)
    ads, entries = adapters(), []
    for ad in ads:
        placement = place_adapter(ad, CFG, layout)
        pages = alloc.alloc(placement.num_pages, ad.name, "adapter")
        pool = write_adapter(pool, jnp.asarray(adapter_rows(ad, placement, CFG, layout, jnp.float32)),
                             jnp.asarray(pages), layout)
        entries.append((placement, pages))
    return layout, alloc, pool, ads, entries


def test_layout_rejects_pages_not_divisible_into_rows():
    with pytest.raises(ValueError, match="lora_chunk"):
        PoolLayout(num_layers=1, num_pages=4, page_size=1, num_kv_heads=1, head_dim=16, lora_chunk=64)


@pytest.mark.parametrize("chunk", [16, 64])
def test_adapters_round_trip_through_pages(chunk):
    layout = PoolLayout.for_model(CFG, num_pages=256, page_size=4, lora_chunk=chunk)
    alloc = PageAllocator(layout.num_pages)
    alloc.alloc(5, ("kv", "someone"), "kv")  # pages are not handed out from 0
    pool = create_pool(layout, jnp.float32)
    resident = []
    for ad in adapters():
        placement = place_adapter(ad, CFG, layout)
        pages = alloc.alloc(placement.num_pages, ("adapter", ad.name), "adapter")
        old = pool
        pool = write_adapter(pool, jnp.asarray(adapter_rows(ad, placement, CFG, layout, jnp.float32)),
                             jnp.asarray(pages), layout)
        assert old.is_deleted()  # donated: updated in place, not copied
        resident.append((placement, pages))
        # Stored at its own rank: only the last page is partly empty.
        assert placement.unused_elems < layout.rows_per_page * chunk
    got = gather_slots(pool, layout, CFG, resident)
    want = pack_slots(adapters(), CFG, jnp.float32)
    assert set(got) == set(want)
    for proj in want:
        np.testing.assert_allclose(np.asarray(got[proj].a), np.asarray(want[proj].a), rtol=1e-6)
        np.testing.assert_allclose(np.asarray(got[proj].b), np.asarray(want[proj].b), rtol=1e-6)


def reference_adapter_rows(adapter, placement, cfg, layout, dtype) -> np.ndarray:
    """The first `adapter_rows` (float32 buffers, zero-padded per module, one cast at the end):
    the fast one must equal it bit for bit."""
    c = layout.lora_chunk
    rows = np.zeros((cfg.num_hidden_layers, placement.num_pages * layout.rows_per_page, c), np.float32)
    for (layer, proj), m in adapter.modules.items():
        p = placement.projections[proj]
        for first, m_rxW in ((p.a_row, m.a.T), (p.b_row, m.b.astype(np.float32) * np.float32(m.scale))):
            n = -(-m_rxW.shape[1] // c)
            padded_RxW = np.zeros((p.rank, n * c), np.float32)
            padded_RxW[: m.rank, : m_rxW.shape[1]] = m_rxW
            rows[layer, first : first + n * p.rank] = padded_RxW.reshape(p.rank, n, c).transpose(1, 0, 2).reshape(-1, c)
    return rows.astype(jnp.dtype(dtype))


def mixed_adapter(cfg, projections, seed) -> LoraAdapter:
    """Per module: a random rank, scale, source dtype and memory order; some layers untargeted."""
    rng = np.random.default_rng(seed)
    modules = {}
    for proj in projections:
        h_in, h_out = cfg.projection_shape(proj)
        for layer in range(cfg.num_hidden_layers):
            if rng.random() < 0.3:
                continue
            r = int(rng.integers(1, 20))
            dt = (np.float32, np.float64, np.float16)[int(rng.integers(3))]
            order = "CF"[int(rng.integers(2))]
            a = np.asarray(rng.standard_normal((h_in, r)), dt, order=order)
            b = np.asarray(rng.standard_normal((r, h_out)), dt, order=order)
            modules[(layer, proj)] = LoraModule(a, b, float(rng.uniform(0.1, 4)))
    return LoraAdapter(f"mixed{seed}", None, modules, {})


# chunk 48: widths 32 (k, v: no whole chunk), 64 and 128 (a partial last chunk)
@pytest.mark.parametrize("chunk,page_size", [(16, 4), (48, 3), (64, 4)])
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16, jnp.float32])
def test_adapter_rows_equal_the_reference_bit_for_bit(chunk, page_size, dtype):
    cfg = dataclasses.replace(CFG, num_hidden_layers=5)
    layout = PoolLayout.for_model(cfg, num_pages=64, page_size=page_size, lora_chunk=chunk)
    for seed, projections in enumerate([("q", "k", "v", "o"), ("k", "v", "gate", "down"), ("up", "q")]):
        ad = mixed_adapter(cfg, projections, seed)
        placement = place_adapter(ad, cfg, layout)
        want = reference_adapter_rows(ad, placement, cfg, layout, dtype)
        np.full(want.nbytes, 0xFF, np.uint8)  # freed at once: adapter_rows' np.empty likely gets these bytes
        got = adapter_rows(ad, placement, cfg, layout, dtype)  # so rows it fails to zero show
        assert got.dtype == want.dtype and got.shape == want.shape
        np.testing.assert_array_equal(got.view(np.uint8), want.view(np.uint8))
        # Into a reused buffer full of stale bytes, and from the adapter kept folded (no casts): the same rows.
        shape = rows_shape(placement, cfg, layout)
        for src in (ad, ad.folded(dtype)):
            out = np.frombuffer(np.full(want.nbytes, 0xFF, np.uint8).tobytes(), dtype).reshape(shape).copy()
            got = adapter_shard_rows(src, placement, cfg, layout, WHOLE, dtype, out)
            assert got is out
            np.testing.assert_array_equal(got[0].view(np.uint8), want.view(np.uint8))
        with pytest.raises(ValueError, match="out must be"):
            adapter_shard_rows(ad, placement, cfg, layout, WHOLE, dtype, np.empty(shape[1:], dtype))


def test_folded_adapter_keeps_the_product_and_is_idempotent():
    ad = mixed_adapter(CFG, ("q", "down"), 3)
    f = ad.folded(jnp.float32)
    key = next(iter(f.modules))
    assert f.folded(jnp.float32).modules[key] is f.modules[key]
    for key, m in ad.modules.items():
        fm = f.modules[key]
        assert fm.scale == 1.0 and fm.a.dtype == np.float32 and fm.rank == m.rank
        a, b = m.a.astype(np.float32), m.b.astype(np.float32)  # modules of several dtypes
        np.testing.assert_allclose(fm.a @ fm.b, m.scale * (a @ b), rtol=1e-5, atol=1e-5)


def test_pages_freed_by_kv_hold_an_adapter():
    """Unified paging: the very pages a finished sequence used are reused for adapter weights."""
    layout = PoolLayout.for_model(CFG, num_pages=8, page_size=4, lora_chunk=16)
    alloc = PageAllocator(layout.num_pages)
    kv_pages = alloc.alloc(8, ("kv", 0), "kv")
    pool = create_pool(layout, jnp.float32).at[:, kv_pages].set(7.0)  # a sequence's KV
    alloc.free_owner(("kv", 0))
    ad = random_adapter(CFG, 4, ("q",), seed=5)
    placement = place_adapter(ad, CFG, layout)
    pages = alloc.alloc(placement.num_pages, ("adapter", "a"), "adapter")
    assert set(pages) <= set(kv_pages)
    pool = write_adapter(pool, jnp.asarray(adapter_rows(ad, placement, CFG, layout, jnp.float32)),
                         jnp.asarray(pages), layout)
    got = gather_slots(pool, layout, CFG, [(placement, pages)])["q"]
    np.testing.assert_allclose(np.asarray(got.a), np.asarray(pack_slots([ad], CFG)["q"].a), rtol=1e-6)


def test_model_on_paged_kv_equals_dense_cache():
    """Chunked prefill then decode, with scattered page tables, gives the dense-cache logits."""
    params = init_random_params(CFG, jax.random.key(1), jnp.float32)
    layout = PoolLayout.for_model(CFG, num_pages=32, page_size=4, lora_chunk=16)
    rng = np.random.default_rng(2)
    lens = [13, 6, 9]
    B, T = len(lens), 16
    tokens = rng.integers(0, CFG.vocab_size, (B, T)).astype(np.int32)
    page_table = rng.permutation(layout.num_pages)[: B * (T // 4)].reshape(B, T // 4).astype(np.int32)
    pool = create_pool(layout, jnp.float32)
    dense = DenseKVCache.create(CFG, B, T, jnp.float32)
    step = jax.jit(forward, static_argnums=1)
    # Two prefill chunks of different sizes, then single-token decodes.
    chunks = [(0, 5), (5, 9)] + [(t, t + 1) for t in range(9, 13)]
    for start, stop in chunks:
        pos = np.arange(start, stop)[None, :].repeat(B, 0)
        pos = np.where(pos < np.array(lens)[:, None], pos, -1).astype(np.int32)
        toks = jnp.asarray(tokens[:, start:stop])
        paged = PagedKVCache.batched(pool, jnp.asarray(page_table), layout, stop - start)
        lp, paged = step(params, CFG, toks, jnp.asarray(pos), paged)
        pool = paged.pool
        ld, dense = step(params, CFG, toks, jnp.asarray(pos), dense)
        valid = pos >= 0
        np.testing.assert_allclose(np.asarray(lp)[valid], np.asarray(ld)[valid], rtol=2e-5, atol=2e-5)
        # The same tokens as one ragged row [1, T] (how the engine runs them) give the same logits.
        seq = np.repeat(np.arange(B), stop - start)[None].astype(np.int32)
        ragged = PagedKVCache(pool, jnp.asarray(page_table), jnp.asarray(seq), layout)
        lr, _ = step(params, CFG, toks.reshape(1, -1), jnp.asarray(pos.reshape(1, -1)), ragged)
        np.testing.assert_allclose(np.asarray(lr)[0][valid.reshape(-1)], np.asarray(ld)[valid], rtol=2e-5, atol=2e-5)


def test_jitted_lora_from_pages_matches_dense_slots():
    layout, alloc, pool, ads, entries = resident_adapters()
    # Batch order differs from residency order, plus one padding row.
    order = [2, 0, 1]
    table = AdapterTable.build([entries[i] for i in order], num_rows=4, max_pages=80)
    want = pack_slots([ads[i] for i in order], CFG, jnp.float32)
    for proj, w in want.items():
        h_in, h_out = CFG.projection_shape(proj)
        read = jax.jit(lora_from_pages, static_argnums=(1, 3, 4, 5, 6))
        for layer in range(CFG.num_hidden_layers):
            got = read(pool[layer], layout, table, proj, h_in, h_out, 32)
            r = w.a.shape[-1]
            np.testing.assert_allclose(np.asarray(got.a[:3, :, :r]), np.asarray(w.a[layer]), rtol=1e-6)
            np.testing.assert_allclose(np.asarray(got.b[:3, :r]), np.asarray(w.b[layer]), rtol=1e-6)
            assert not np.asarray(got.a[:, :, r:]).any() and not np.asarray(got.a[3]).any()


def test_model_with_adapters_in_pages_equals_dense_slots():
    from slora_jax.memory.paged_lora import PagedLora
    from slora_jax.model import LoraInputs

    params = init_random_params(CFG, jax.random.key(3), jnp.float32)
    layout, alloc, pool, ads, entries = resident_adapters()
    B, T = 4, 8
    kv_pages = alloc.alloc(B * 2, "kv", "kv").reshape(B, 2)
    slots = np.array([1, -1, 0, 2], np.int32)[:, None].repeat(T, 1)
    toks = jnp.asarray(np.random.default_rng(4).integers(0, CFG.vocab_size, (B, T)).astype(np.int32))
    pos = jnp.asarray(np.arange(T)[None].repeat(B, 0).astype(np.int32))
    dense_lora = LoraInputs(pack_slots(ads, CFG, jnp.float32), jnp.asarray(slots))
    want, _ = forward(params, CFG, toks, pos, DenseKVCache.create(CFG, B, T, jnp.float32), dense_lora)
    paged_lora = PagedLora(AdapterTable.build(entries, 4, 96), jnp.asarray(slots), layout, CFG, 16,
                           ("q", "k", "v", "o", "gate", "up", "down"))
    cache = PagedKVCache.batched(pool, jnp.asarray(kv_pages), layout, T)
    got, _ = jax.jit(forward, static_argnums=1)(params, CFG, toks, pos, cache, paged_lora)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=2e-5, atol=2e-5)


def paged_lora_case(slots_BxT: np.ndarray):
    """The model's inputs for `slots_BxT` (rows of `adapters()`, -1 none) on a fresh pool:
    (params, tokens, positions, paged cache, `lora(impl, **KernelConfig fields)` -> `PagedLora`)."""
    from slora_jax.memory.paged_lora import PagedLora
    from slora_jax.ops import KernelConfig, build_lora_meta

    params = init_random_params(CFG, jax.random.key(5), jnp.float32)
    layout, alloc, pool, ads, entries = resident_adapters()
    B, T = slots_BxT.shape
    kv_pages = alloc.alloc(B * -(-T // layout.page_size), "kv", "kv").reshape(B, -1)
    toks = jnp.asarray(np.random.default_rng(6).integers(0, CFG.vocab_size, (B, T)).astype(np.int32))
    pos = jnp.asarray(np.arange(T)[None].repeat(B, 0).astype(np.int32))
    cache = PagedKVCache.batched(pool, jnp.asarray(kv_pages), layout, T)
    table = AdapterTable.build(entries, 4, 96)
    meta = build_lora_meta(slots_BxT.reshape(-1), max_segments=4)

    def lora(impl, **kernel):
        return PagedLora(table, jnp.asarray(slots_BxT), layout, CFG, 16, ("q", "k", "v", "o", "gate", "up", "down"),
                         meta, impl, KernelConfig(**kernel))

    return params, toks, pos, cache, lora


def test_model_grouped_lora_equals_reference():
    """The Pallas split pair on pages with q/k/v and gate/up in one launch pair each (`layer_group_fn`)
    gives the jnp path's logits, in 4 launch pairs a layer instead of 7 (or 4 single launches)."""
    slots = np.array([[1, 1, 0, -1], [2, 0, 0, 1], [-1, 2, 2, 1]], np.int32)
    params, toks, pos, cache, lora = paged_lora_case(slots)
    run = jax.jit(forward, static_argnums=1)
    want, _ = run(params, CFG, toks, pos, cache, lora("reference"))
    # The split pair (12 tokens would take the one launch by default: that one runs with lora_stream below).
    got, _ = run(params, CFG, toks, pos, cache, lora("pallas", interpret=True, paged_one_launch_max_tokens=0))
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=2e-5, atol=2e-5)
    # Per scanned layer: q/k/v, o, gate/up, down -> 4 launch pairs grouped, 7 one projection at a time.
    for group, pairs in ((True, 4), (False, 7)):
        text = run.trace(params, CFG, toks, pos, cache, lora("pallas", interpret=False, group_projections=group,
                                                                   paged_one_launch_max_tokens=0)
                         ).lower(lowering_platforms=("cuda",)).as_text()
        assert text.count("xla.gpu.triton") == 2 * pairs
    # One launch per group instead of a pair (`paged_one_launch_max_tokens`): 4 launches a layer (its logits:
    # the lora_stream run below, which takes the one launch at 12 tokens).
    one = dict(paged_one_launch_max_tokens=1 << 30, paged_one_launch_max_rank=1 << 30)
    text = run.trace(params, CFG, toks, pos, cache, lora("pallas", interpret=False, **one)
                     ).lower(lowering_platforms=("cuda",)).as_text()
    assert text.count("xla.gpu.triton") == 4
    # Each delta on GPU stream 1 (`lora_stream`), added after, each group in one launch (the default at <= 16
    # tokens): same logits; 4 annotated calls a layer.
    got, _ = run(params, CFG, toks, pos, cache, lora("pallas", interpret=True, lora_stream=1))
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=2e-5, atol=2e-5)
    text = run.trace(params, CFG, toks, pos, cache, lora("pallas", interpret=False, lora_stream=1)
                     ).lower(lowering_platforms=("cuda",)).as_text()
    calls = [ln for ln in text.splitlines() if "call @compute_on" in ln]
    assert text.count("xla.gpu.triton") == 4 and len(calls) == 4, calls
    assert all('_xla_stream_annotation = "1"' in ln for ln in calls)


def test_model_base_and_lora_in_one_launch_equals_reference():
    """`KernelConfig.linear_max_tokens`: each projection group's base matmul and LoRA in one launch
    (`PagedLora.layer_linear_fn`, row tables built once a forward, each layer's rows by offset) gives the
    jnp path's logits, in 4 launches a layer and no XLA matmul for the projections."""
    slots = np.array([[1, 1, 0, -1], [2, 0, 0, 1], [-1, 2, 2, 1]], np.int32)
    params, toks, pos, cache, lora = paged_lora_case(slots)
    run = jax.jit(forward, static_argnums=1)
    want, _ = run(params, CFG, toks, pos, cache, lora("reference"))
    fused = dict(linear_max_tokens=64, linear_block_n=16, linear_block_k=16)
    got, _ = run(params, CFG, toks, pos, cache, lora("pallas", interpret=True, **fused))
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=2e-5, atol=2e-5)
    text = run.trace(params, CFG, toks, pos, cache, lora("pallas", interpret=False, **fused)
                     ).lower(lowering_platforms=("cuda",)).as_text()
    assert text.count("xla.gpu.triton") == 4  # q/k/v, o, gate/up, down
    assert text.count("lora_linear_x3") >= 1 and text.count("lora_linear_x2") >= 1
    # The shrink as its own launch first (`linear_shrink_launch`): same logits, 8 launches a layer.
    got, _ = run(params, CFG, toks, pos, cache, lora("pallas", interpret=True, linear_shrink_launch=True, **fused))
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=2e-5, atol=2e-5)
    text = run.trace(params, CFG, toks, pos, cache, lora("pallas", interpret=False, linear_shrink_launch=True,
                                                               **fused)).lower(lowering_platforms=("cuda",)).as_text()
    assert text.count("xla.gpu.triton") == 8 and "expand_linear_x3" in text
    # Calls past the bound take the XLA matmul and the split pair.
    text = run.trace(params, CFG, toks, pos, cache, lora("pallas", interpret=False, linear_max_tokens=8,
                                                               paged_one_launch_max_tokens=0)
                     ).lower(lowering_platforms=("cuda",)).as_text()
    assert "lora_linear_x" not in text and text.count("xla.gpu.triton") == 8


def test_capacity_report():
    from slora_jax.memory.pool import capacity

    cfg7b = preset("llama-7b")
    layout = PoolLayout.for_model(cfg7b, num_pages=1000, page_size=16, lora_chunk=64)
    cap = capacity(layout, cfg7b, rank=16)
    # A page is 16 tokens of K and V over 32 layers: 16 * 2 * 4096 * 32 * 2 bytes = 8 MiB.
    assert cap["page_bytes"] == 8 << 20 and cap["tokens_fit"] == 16000
    # Rank 16 on q, k, v, o: 4 * 2 * 16 rows of 4096 per layer = 4 * 2 * 16 * 4096 / (16 * 2 * 4096) = 4 pages.
    assert cap["pages_per_adapter"] == 4 and cap["adapters_fit"] == 250
    assert cap["adapter_fragmentation"] == 0.0
    odd = capacity(layout, cfg7b, rank=24, projections=("q", "v", "down"))
    assert 0 < odd["adapter_fragmentation"] < 1 / odd["pages_per_adapter"]


def test_paged_kv_cache_with_the_pallas_kernel_equals_reference():
    """The engine's attention path: the Pallas decode kernel reading the unified pool in place."""
    params = init_random_params(CFG, jax.random.key(5), jnp.float32)
    layout = PoolLayout.for_model(CFG, num_pages=16, page_size=4, lora_chunk=16)
    rng = np.random.default_rng(6)
    page_table = jnp.asarray(rng.permutation(16)[:12].reshape(3, 4).astype(np.int32))
    toks = jnp.asarray(rng.integers(0, CFG.vocab_size, (3, 7)).astype(np.int32))
    pos = jnp.asarray(np.where(np.arange(7)[None] < np.array([[7], [3], [5]]), np.arange(7)[None], -1).astype(np.int32))
    outs = {}
    for impl in ("reference", "pallas"):
        cache = PagedKVCache.batched(create_pool(layout, jnp.float32), page_table, layout, 7, attention_impl=impl)
        outs[impl], _ = forward(params, CFG, toks, pos, cache)
    valid = np.asarray(pos) >= 0
    np.testing.assert_allclose(np.asarray(outs["pallas"])[valid], np.asarray(outs["reference"])[valid],
                               rtol=1e-4, atol=1e-4)

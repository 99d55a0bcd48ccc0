"""Adapter pages under tensor parallelism (`parallel/paged.py`) on 4 host CPU devices: each
device's slab of an adapter's pages holds exactly its shard for the strategy (read back
against slices of the adapter's A and B), for mixed ranks (3 and 6, not multiples of tp;
a layer of lower rank), GQA shapes, TP 2 and 4; the shared placement and accounting; the
column- and row-parallel LoRA of `parallel.lora` on those shards (jnp and Pallas) against
the single-device `lora_reference`."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from slora_jax import parallel
from slora_jax.adapters import LoraModule, pack_slots, random_adapter
from slora_jax.compat import shard_map
from slora_jax.config import PROJECTIONS, preset
from slora_jax.memory.pool import (
    AdapterTable,
    PoolLayout,
    adapter_rows,
    adapter_shard_rows,
    capacity,
    place_adapter,
)
from slora_jax.ops.lora import build_lora_meta, lora_reference
from slora_jax.parallel import TP_AXIS
from slora_jax.parallel.lora import GatheredLora, ShardedProjections, column_parallel_lora, row_parallel_lora
from slora_jax.parallel.paged import ShardedPagedLora, TPShards, put_shards, write_adapter_shards
from slora_jax.parallel.sharding import COLUMN_PARALLEL, local_pool_layout

# GQA 2:1 (8 query heads, 4 KV heads: q is 64 -> 128, k/v 64 -> 64), so TP 4 divides both.
CFG = dataclasses.replace(preset("tiny"), num_attention_heads=8, num_key_value_heads=4)


def adapters():
    """Ranks 3 and 6 (tp does not divide them) and 16, on every projection between them;
    rank 6's layer 1 `q` module has rank 2 (stored at the projection's rank 6)."""
    ads = [random_adapter(CFG, 3, ("q", "v", "down"), seed=1, name="r3"),
           random_adapter(CFG, 6, ("q", "k", "o", "up"), seed=2, name="r6"),
           random_adapter(CFG, 16, ("gate", "o", "v"), seed=3, name="r16")]
    rng = np.random.default_rng(0)
    h_in, h_out = CFG.projection_shape("q")
    ads[1].modules[(1, "q")] = LoraModule(rng.standard_normal((h_in, 2), np.float32),
                                          rng.standard_normal((2, h_out), np.float32), 0.5)
    return ads


def read_shard(slab_layer: np.ndarray, local: PoolLayout, pages: np.ndarray, pp, h_in: int, h_out: int):
    """numpy read of a shard's `A [h_in, a_rank]`, `B [rank, h_out]` from one layer of a device's slab."""
    c, rpp = local.lora_chunk, local.rows_per_page
    rows_NxC = slab_layer.reshape(-1, c)

    def read(first: int, width: int, r: int) -> np.ndarray:
        n = -(-width // c)
        v = first + np.arange(n * r)
        m_NxRxC = rows_NxC[pages[v // rpp] * rpp + v % rpp].reshape(n, r, c)
        return m_NxRxC.transpose(1, 0, 2).reshape(r, n * c)[:, :width]

    return read(pp.a_row, h_in, pp.a_rank).T, read(pp.b_row, h_out, pp.rank)


def expected_shard(module: LoraModule, rank: int, proj: str, i: int, tp: int, strategy: str):
    """Device i's `(A, B)` of one module, from the whole matrices: the module docstring's table."""
    a_IxR = np.zeros((module.a.shape[0], rank), np.float32)
    a_IxR[:, : module.rank] = module.a
    b_RxO = np.zeros((rank, module.b.shape[1]), np.float32)
    b_RxO[: module.rank] = module.b * np.float32(module.scale)
    cut = lambda m, axis: np.split(m, tp, axis=axis)[i]
    if proj in COLUMN_PARALLEL:
        if strategy == "slora":
            rl = -(-rank // tp)
            a_IxR = np.pad(a_IxR, ((0, 0), (0, tp * rl - rank)))[:, i * rl : (i + 1) * rl]
        return a_IxR, cut(b_RxO, 1)
    return cut(a_IxR, 0), cut(b_RxO, 1) if strategy == "slora" else b_RxO


@pytest.mark.parametrize("strategy", parallel.LORA_STRATEGIES)
@pytest.mark.parametrize("tp", [2, 4])
def test_each_slab_holds_its_shard(tp, strategy):
    mesh = parallel.make_mesh(CFG, tp)
    layout = PoolLayout.for_model(CFG, num_pages=96, page_size=4, lora_chunk=16)
    local = local_pool_layout(layout, tp)
    shards = TPShards(tp, strategy)
    pool = parallel.create_pool(layout, mesh, jnp.float32)
    next_page, entries = 1, []
    for ad in adapters():
        placement = place_adapter(ad, CFG, layout, shards)
        pages = np.arange(next_page, next_page + placement.num_pages)[::-1].astype(np.int32)  # out of order
        next_page += placement.num_pages
        rows = adapter_shard_rows(ad, placement, CFG, layout, shards, jnp.float32)
        assert rows.shape == (tp, CFG.num_hidden_layers, placement.num_pages * local.rows_per_page, 16)
        rows_dev = put_shards(rows, mesh)
        assert {s.data.shape for s in rows_dev.addressable_shards} == {(1, *rows.shape[1:])}  # its own shard only
        pool = write_adapter_shards(pool, rows_dev, jnp.asarray(pages), layout, mesh)
        entries.append((ad, placement, pages))
    assert pool.sharding.spec == P(None, None, "tp")
    slabs = {s.index[2].start // local.page_elems: np.asarray(s.data) for s in pool.addressable_shards}
    checked = 0
    for ad, placement, pages in entries:
        for proj, pp in placement.projections.items():
            assert pp.a_rank == (-(-pp.rank // tp) if strategy == "slora" and proj in COLUMN_PARALLEL else pp.rank)
            widths = shards.widths(proj, *CFG.projection_shape(proj))
            for (layer, p), m in ad.modules.items():
                if p != proj:
                    continue
                for i in range(tp):
                    a, b = read_shard(slabs[i][layer], local, pages, pp, *widths)
                    want_a, want_b = expected_shard(m, pp.rank, proj, i, tp, strategy)
                    np.testing.assert_array_equal(np.asarray(a), want_a, err_msg=f"{ad.name} {layer} {proj} {i}")
                    np.testing.assert_array_equal(np.asarray(b), want_b, err_msg=f"{ad.name} {layer} {proj} {i}")
                    checked += 1
    assert checked == CFG.num_hidden_layers * (3 + 4 + 3) * tp
    table = AdapterTable.build([(pl, pg) for _, pl, pg in entries], 4, 64)
    q = PROJECTIONS.index("q")
    assert table.rank[:2, q].tolist() == [3, 6]
    assert table.a_rank[:2, q].tolist() == ([-(-3 // tp), -(-6 // tp)] if strategy == "slora" else [3, 6])


def test_sharded_placement_accounting():
    """Pages hold a shard's rows at `rows_per_page / tp` a page; unused elements count every
    device; `capacity` with the shards agrees with the placement."""
    layout = PoolLayout.for_model(CFG, num_pages=96, page_size=4, lora_chunk=16)
    ad = random_adapter(CFG, 6, ("q", "o", "down"), seed=4)
    whole = place_adapter(ad, CFG, layout)
    np.testing.assert_array_equal(adapter_shard_rows(ad, whole, CFG, layout, TPShards(1, "slora"), jnp.float32)[0],
                                  adapter_rows(ad, whole, CFG, layout, jnp.float32))  # tp 1: the single-device rows
    for strategy in parallel.LORA_STRATEGIES:
        shards = TPShards(4, strategy)
        placement = place_adapter(ad, CFG, layout, shards)
        rpp = layout.rows_per_page // 4
        assert (placement.num_pages - 1) * rpp < placement.num_rows <= placement.num_pages * rpp
        assert placement.unused_elems == (placement.num_pages * rpp - placement.num_rows) * 16 * 4
        cap = capacity(layout, CFG, 6, ("q", "o", "down"), jnp.float32, shards)
        assert cap["pages_per_adapter"] == placement.num_pages
        assert cap["adapters_fit"] == layout.num_pages // placement.num_pages
        assert cap["adapter_fragmentation"] == pytest.approx(
            placement.unused_elems / (placement.num_pages * layout.page_elems))
    # replicated_a stores A of q and B of o, down whole on every device: more pages than slora
    rep, slo = (place_adapter(ad, CFG, layout, TPShards(4, s)).num_rows for s in ("replicated_a", "slora"))
    assert rep > slo


def test_slab_must_hold_whole_rows():
    layout = PoolLayout.for_model(CFG, num_pages=8, page_size=1, lora_chunk=64)  # 128 elements a page
    with pytest.raises(ValueError, match="not a multiple of lora_chunk 64"):
        TPShards(4, "slora").layout(layout)
    with pytest.raises(ValueError, match="strategy must be one of"):
        TPShards(2, "megatron")
    assert jax.device_count() == 4


def fill_pool(ads, layout: PoolLayout, shards: TPShards, mesh):
    """A TP pool holding `ads` in pages with gaps between them; (pool, table entries)."""
    pool = parallel.create_pool(layout, mesh, jnp.float32)
    entries, next_page = [], 3
    for ad in ads:
        placement = place_adapter(ad, CFG, layout, shards)
        pages = np.arange(next_page, next_page + placement.num_pages, dtype=np.int32)
        next_page += placement.num_pages + 1  # gaps: pages need not be contiguous
        rows = put_shards(adapter_shard_rows(ad, placement, CFG, layout, shards, jnp.float32), mesh)
        pool = write_adapter_shards(pool, rows, jnp.asarray(pages), layout, mesh)
        entries.append((placement, pages))
    return pool, entries


@pytest.mark.parametrize("impl", ["reference", "pallas"])
@pytest.mark.parametrize("strategy", parallel.LORA_STRATEGIES)
def test_partitions_on_adapter_pages(strategy, impl):
    """q (column-parallel) and o (row-parallel) at TP 4 on paged shards: ranks 3, 16, 7, 5
    (a rank-3 A split leaves device 3 a zero column), tokens without adapters, fp32."""
    tp, T = 4, 12
    mesh = parallel.make_mesh(CFG, tp)
    layout = PoolLayout.for_model(CFG, num_pages=64, page_size=4, lora_chunk=16)
    shards = TPShards(tp, strategy)
    ads = [random_adapter(CFG, r, ("q", "o"), seed=10 + r, name=f"r{r}") for r in (3, 16, 7, 5)]
    pool, entries = fill_pool(ads, layout, shards, mesh)
    slot_T = np.random.default_rng(0).integers(-1, len(ads), T).astype(np.int32)
    assert (slot_T < 0).any()
    meta = build_lora_meta(slot_T, max_segments=len(ads)) if impl == "pallas" else None
    paged = ShardedPagedLora(AdapterTable.build(entries, len(ads), 32), slot_T[None], layout, CFG, shards, 16,
                             ("q", "o"), meta, impl)
    dense = pack_slots(ads, CFG, jnp.float32)
    kx, ky = jax.random.split(jax.random.key(1))
    layer = 1

    def per_device(pool_slab, paged, y, x, slot, meta):
        g = GatheredLora(slot, impl, meta)
        w = paged.weights(jnp.int32(layer), pool_slab, proj)
        if proj == "q":
            return column_parallel_lora(y, x, w, g, strategy)
        return row_parallel_lora(y / tp, x, w, g, strategy)  # the partial base output: y/tp on each device

    for proj in ("q", "o"):
        h_in, h_out = CFG.projection_shape(proj)
        x_TxI = jax.random.normal(kx, (T, h_in), jnp.float32)
        y_TxO = jax.random.normal(ky, (T, h_out), jnp.float32)
        w = jax.tree.map(lambda a: a[layer], dense[proj])
        want = np.asarray(lora_reference(y_TxO, x_TxI, w, jnp.asarray(slot_T)))
        specs = (P(None, None, TP_AXIS), P(), P(None, TP_AXIS) if proj == "q" else P(),
                 P() if proj == "q" else P(None, TP_AXIS), P(), P())
        out_spec = P(None, TP_AXIS) if proj == "q" else P()
        got = jax.jit(shard_map(per_device, mesh=mesh, in_specs=specs, out_specs=out_spec, check_vma=False))(
            pool, paged, y_TxO, x_TxI, jnp.asarray(slot_T), meta)
        got = np.asarray(got)
        assert np.linalg.norm(want - np.asarray(y_TxO)) > 0.1 * np.linalg.norm(y_TxO)  # the LoRA term matters
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5, err_msg=proj)
        np.testing.assert_allclose(got[slot_T < 0], np.asarray(y_TxO)[slot_T < 0], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("strategy,impl", [("slora", "pallas"), ("slora", "reference"), ("replicated_a", "pallas")])
def test_qkv_group_on_adapter_pages(strategy, impl):
    """q, k, v (GQA widths) through the epilogue's group hook at TP 4: one shrink, one all-gather
    (slora), one expand; ranks 3, 16, 6 (not all on every projection), tokens without adapters."""
    tp, T, layer = 4, 10, 0
    mesh = parallel.make_mesh(CFG, tp)
    layout = PoolLayout.for_model(CFG, num_pages=64, page_size=4, lora_chunk=16)
    shards = TPShards(tp, strategy)
    ads = [random_adapter(CFG, 3, ("q", "v"), seed=21, name="a"), random_adapter(CFG, 16, ("q", "k", "v"), seed=22,
           name="b"), random_adapter(CFG, 6, ("k",), seed=23, name="c")]
    pool, entries = fill_pool(ads, layout, shards, mesh)
    slot_T = np.array([0, 1, -1, 2, 1, 0, 2, -1, 1, 1], np.int32)
    meta = build_lora_meta(slot_T, max_segments=len(ads)) if impl == "pallas" else None
    projs = ("q", "k", "v")
    paged = ShardedPagedLora(AdapterTable.build(entries, len(ads), 32), slot_T[None], layout, CFG, shards, 16,
                             projs, meta, impl)
    dense = pack_slots(ads, CFG, jnp.float32)
    x_TxI = jax.random.normal(jax.random.key(2), (T, CFG.hidden_size), jnp.float32)
    ys = tuple(jax.random.normal(jax.random.key(3 + i), (T, CFG.projection_shape(p)[1]), jnp.float32)
               for i, p in enumerate(projs))

    def per_device(pool_slab, paged, ys, x, slot, meta):
        class Live:
            pool = pool_slab

        epilogue = ShardedProjections({}, GatheredLora(slot, impl, meta), strategy, paged)
        group = epilogue.layer_group_fn(jnp.int32(layer), {}, lambda: Live)
        assert group.reads_pool == (impl != "pallas")
        return group(projs, ys, x)

    col = P(None, TP_AXIS)
    run = shard_map(per_device, mesh=mesh, in_specs=(P(None, None, TP_AXIS), P(), (col,) * 3, P(), P(), P()),
                    out_specs=(col,) * 3, check_vma=False)
    got = jax.jit(run)(pool, paged, ys, x_TxI, jnp.asarray(slot_T), meta)
    for p, y, out in zip(projs, ys, got):
        w = jax.tree.map(lambda a: a[layer], dense[p])
        want = np.asarray(lora_reference(y, x_TxI, w, jnp.asarray(slot_T)))
        np.testing.assert_allclose(np.asarray(out), want, rtol=1e-5, atol=1e-5, err_msg=p)
    assert np.linalg.norm(np.asarray(got[1]) - np.asarray(ys[1])) > 0.1 * np.linalg.norm(ys[1])


def test_epilogue_marks_pool_reads():
    """The TP epilogue says when its LoRA reads pool pages (the decoder layer then orders q's
    read before the KV write: tests/test_model.py); dense slots and steps without adapters do not."""
    layout = PoolLayout.for_model(CFG, num_pages=8, page_size=4, lora_chunk=16)
    paged = ShardedPagedLora(AdapterTable.build([], 1, 1), np.zeros((1, 4), np.int32), layout, CFG,
                             TPShards(2, "slora"), 16, ("q",))
    g = GatheredLora(jnp.zeros(4, jnp.int32))
    fn = lambda proj: ShardedProjections({}, *proj).layer_fn(jnp.int32(0), {}, None)  # noqa: E731
    assert fn((g, "slora", paged)).reads_pool
    assert not fn((g, "slora")).reads_pool  # dense slots
    assert not fn((None, "slora", paged)).reads_pool  # no adapter in this step
    group = lambda proj: ShardedProjections({}, *proj).layer_group_fn(jnp.int32(0), {}, None)  # noqa: E731
    assert group((g, "slora", paged)).reads_pool  # the jnp reference reads per projection
    assert not group((GatheredLora(g.slot_T, "pallas"), "slora", paged)).reads_pool  # one launch for q, k, v
    assert group((g, "slora")) is None and group((None, "slora", paged)) is None

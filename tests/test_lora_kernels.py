"""Pallas SGMV kernels (interpret mode on CPU) against the jnp references."""

from __future__ import annotations

import dataclasses
import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pallas_kernels.sgmv_expand import expand_reference, sgmv_expand
from pallas_kernels.sgmv_shrink import sgmv_shrink, shrink_reference
from pallas_kernels.sgmv_paged import MAX_K_STEPS, MIN_K_STEPS, default_k_steps, paged_group_reference
from slora_jax.ops import (
    KernelConfig,
    PagedWeights,
    add_lora,
    add_lora_group,
    build_lora_meta,
    expand,
    expand_group,
    lora_reference,
    paged_warps_for,
    random_slot_weights,
    shrink,
    shrink_group,
)
from test_lora_ops import RANKS, make_slots

H_IN, H_OUT, S = 64, 32, 7
# Small blocks so the tiny shapes still take several K steps, splits and N blocks.
CFG = KernelConfig(shrink_block_k=16, expand_block_n=16, chunk=16, unroll_k=2, fused=True, interpret=True,
                   paged_k_steps=3, paged_n_steps=1)  # pages: 2 K splits, the second with a masked tail
SPLIT = dataclasses.replace(CFG, fused=False, paged_one_launch_max_tokens=0)  # the two-launch shrink + expand pair
# the same programs in one launch (pages only), at any size and rank
ONE = dataclasses.replace(SPLIT, paged_one_launch_max_tokens=1 << 30, paged_one_launch_max_rank=1 << 30)
_add = jax.jit(add_lora, static_argnames=("impl", "config"))
_add_group = jax.jit(add_lora_group, static_argnames=("impl", "config"))


def rel_err(out, ref, base):
    d_ref = ref.astype(jnp.float32) - base.astype(jnp.float32)
    num = jnp.linalg.norm(out.astype(jnp.float32) - ref.astype(jnp.float32))
    return float(num / (jnp.linalg.norm(d_ref) + 1e-6))


def paged_group_from_slots(ws, chunk: int, rows_per_page: int, rng: np.random.Generator) -> tuple[PagedWeights, ...]:
    """Dense slots of G projections packed into one pool's pages (one page table per adapter):
    shuffled page ids with gaps, garbage in every row no adapter owns."""
    pws = PagedWeights.group_from_slots(ws, chunk=chunk, rows_per_page=rows_per_page,
                                        page_ids=rng.permutation(33 * len(ws) * len(ws[0].ranks)))  # >= 32 pages
    owned = np.zeros(pws[0].rows.shape[0], bool)  # each at rank 128
    for w, pw in zip(ws, pws):
        for s, n in enumerate(np.asarray(pw.pages)):
            v = int(pw.a_row[s]) + np.arange((w.a.shape[1] + w.b.shape[2]) // chunk * int(w.ranks[s]))
            owned[n[v // rows_per_page] * rows_per_page + v % rows_per_page] = True
    garbage = jnp.asarray(rng.standard_normal(owned.shape + (chunk,)), pws[0].rows.dtype)
    rows = jnp.where(jnp.asarray(owned)[:, None], pws[0].rows, garbage)
    return tuple(dataclasses.replace(pw, rows=rows) for pw in pws)


def paged_from_slots(w, chunk: int, rows_per_page: int, rng: np.random.Generator) -> PagedWeights:
    return paged_group_from_slots((w,), chunk, rows_per_page, rng)[0]


def run_case(T, layout, ranks, dtype, seed, block_m=16, cfg=CFG, paged=False, rows_per_page=128):
    rng = np.random.default_rng(seed)
    w = random_slot_weights(jax.random.key(seed), ranks, H_IN, H_OUT, dtype=dtype, max_rank=128)
    slot_T = make_slots(layout, T, len(ranks), rng)
    meta = build_lora_meta(slot_T, block_m=block_m)
    x = jnp.asarray(rng.standard_normal((T, H_IN)), dtype)
    y = jnp.asarray(rng.standard_normal((T, H_OUT)), dtype)
    ref = lora_reference(y, x, w, jnp.asarray(slot_T))
    out = _add(y, x, paged_from_slots(w, 16, rows_per_page, rng) if paged else w, meta, impl="pallas", config=cfg)
    no_T = slot_T < 0
    np.testing.assert_array_equal(np.asarray(out)[no_T], np.asarray(y)[no_T])  # skipped rows untouched
    return rel_err(out, ref, y)


CASES = [
    (1, "distinct", jnp.float32, 16),
    (37, "mixed_none", jnp.float32, 16),
    (37, "skewed", jnp.bfloat16, 16),
    (64, "distinct", jnp.bfloat16, 16),
    (200, "uniform", jnp.float32, 32),
    (200, "identical", jnp.bfloat16, 64),
    (37, "all_none", jnp.float32, 16),
]


# Every case on pages with the split pair (the engine's path) and with its one-launch form;
# the dense layouts alternate between the one-launch kernel and the split pair (each sees
# every block size and dtype).
@pytest.mark.parametrize("T,layout,dtype,block_m,weights", [
    *(c + ("paged_split",) for c in CASES),
    *(c + ("paged_one",) for c in CASES),
    *(c + (("dense", "dense_split")[i % 2],) for i, c in enumerate(CASES)),
])
def test_pallas_matches_reference(T, layout, dtype, block_m, weights):
    cfg = {"paged_one": ONE}.get(weights, SPLIT if weights.endswith("split") else CFG)
    err = run_case(T, layout, np.array(RANKS), dtype, seed=T + block_m, block_m=block_m, cfg=cfg,
                   paged=weights.startswith("paged"))
    assert err < (1e-5 if dtype == jnp.float32 else 1e-2), err


def test_paged_small_pages():
    """Pages of 24 rows (< rank): a rank block spans several pages, read row by row (both paged kernels)."""
    for cfg in (CFG, SPLIT):
        assert run_case(40, "skewed", np.array(RANKS), jnp.float32, seed=4, cfg=cfg, paged=True,
                        rows_per_page=24) < 1e-5


@pytest.mark.parametrize("target_programs,n_split_max", [(1, 1), (4, 2), (10_000, 16)])
def test_fused_split_choices(target_programs, n_split_max):
    """However the H_out chunks are shared out (1 program a tile .. as many as chunks), the sum is the same."""
    cfg = dataclasses.replace(CFG, target_programs=target_programs, n_split_max=n_split_max, unroll_n=3)
    for paged in (False, True):
        assert run_case(40, "skewed", np.array(RANKS), jnp.float32, seed=3, cfg=cfg, paged=paged) < 1e-5


def test_paged_weights_to_slots_roundtrip():
    """`PagedWeights.to_slots` (the jnp read of pages) gives back the packed slots, zero past each rank."""
    rng = np.random.default_rng(1)
    w = random_slot_weights(jax.random.key(1), np.array(RANKS), H_IN, H_OUT, dtype=jnp.float32, max_rank=128)
    back = paged_from_slots(w, 16, 24, rng).to_slots()
    np.testing.assert_array_equal(back.a, w.a)
    np.testing.assert_array_equal(back.b, w.b)
    np.testing.assert_array_equal(back.ranks, w.ranks)


@settings(max_examples=4, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    ranks=st.lists(st.sampled_from(RANKS + (0,)), min_size=S, max_size=S),
    layout=st.sampled_from(("distinct", "identical", "uniform", "skewed", "mixed_none")),
    seed=st.integers(0, 2**16),
)
def test_pallas_random_layouts_and_ranks(ranks, layout, seed):
    """Same shapes every example (one interpret compile), random slots and per-slot ranks."""
    for paged, cfg in ((False, CFG), (True, SPLIT)):
        err = run_case(48, layout, np.array(ranks), jnp.float32, seed=seed, cfg=cfg, paged=paged)
        assert err < 1e-5, err


# ----------------------------------------------------------------------------- grouped projections
# q, k, v of a GQA model sharing x: outputs 64, 32, 32 wide (k, v narrower).
GROUP_OUT = (H_IN, H_OUT, H_OUT)


def run_group_case(T, layout, ranks_GxS, dtype, seed, block_m=16, cfg=SPLIT, rows_per_page=128, outs=GROUP_OUT):
    """`add_lora_group` on one pool against `lora_reference` per projection (and the kernel file's
    `paged_group_reference`, which reads the pages in jnp); the worst relative error."""
    rng = np.random.default_rng(seed)
    ws = [random_slot_weights(jax.random.key(seed + g), ranks, H_IN, o, dtype=dtype, max_rank=128)
          for g, (ranks, o) in enumerate(zip(ranks_GxS, outs))]
    slot_T = make_slots(layout, T, len(ranks_GxS[0]), rng)
    meta = build_lora_meta(slot_T, block_m=block_m)
    x = jnp.asarray(rng.standard_normal((T, H_IN)), dtype)
    ys = tuple(jnp.asarray(rng.standard_normal((T, o)), dtype) for o in outs)
    pws = paged_group_from_slots(ws, 16, rows_per_page, rng)
    got = _add_group(ys, x, pws, meta, config=cfg)
    stack = lambda field: jnp.stack([getattr(pw, field) for pw in pws])
    from_pages = paged_group_reference(ys, x, pws[0].rows, pws[0].pages, stack("rank"), stack("a_row"),
                                       stack("b_row"), jnp.asarray(slot_T), rows_per_page=rows_per_page, r_max=128)
    errs = []
    for g, (y, w, out) in enumerate(zip(ys, ws, got)):
        untouched_T = (slot_T < 0) | (np.asarray(ranks_GxS[g])[np.maximum(slot_T, 0)] == 0)
        np.testing.assert_array_equal(np.asarray(out)[untouched_T], np.asarray(y)[untouched_T])
        want = lora_reference(y, x, w, jnp.asarray(slot_T))
        errs += [rel_err(out, want, y), rel_err(from_pages[g], want, y)]
    return max(errs)


GROUP_RANKS = np.array([[16, 0, 8, 24, 4, 64, 1], [16, 8, 0, 24, 1, 64, 0], [0, 8, 8, 24, 4, 128, 0]])


@pytest.mark.parametrize("cfg", [SPLIT, ONE], ids=["pair", "one_launch"])
@pytest.mark.parametrize("T,layout,dtype,block_m,rows_per_page", [
    (1, "distinct", jnp.float32, 16, 128),
    (37, "mixed_none", jnp.bfloat16, 16, 24),  # pages smaller than a rank block
    (64, "skewed", jnp.float32, 32, 128),
])
def test_paged_group_matches_reference(T, layout, dtype, block_m, rows_per_page, cfg):
    """q, k, v in one launch pair (or one launch): per-projection ranks (0: not targeted), GQA widths, empty tiles."""
    err = run_group_case(T, layout, GROUP_RANKS, dtype, seed=T, block_m=block_m, rows_per_page=rows_per_page,
                         cfg=cfg)
    assert err < (1e-5 if dtype == jnp.float32 else 1e-2), err


LOOP = dataclasses.replace(SPLIT, paged_tile_programs=3)  # 3 programs along the tiles, each looping (stride 3)


@pytest.mark.parametrize("T,layout,block_m,programs,flat", [
    (37, "mixed_none", 16, 3, 0), (64, "identical", 16, 3, 0), (37, "mixed_none", 16, 0, 0),
    (37, "mixed_none", 16, 0, 5), (64, "identical", 16, 0, 7), (37, "distinct", 16, 0, 1), (37, "skewed", 32, 0, 4096),
])
def test_paged_tile_loop_matches_reference(T, layout, block_m, programs, flat):
    """`paged_tile_programs`: fewer programs than tiles, each looping over the used ones (7 of 37 tiles, or 4
    of 64), give the reference's results: grouped, and one projection alone; and so does 0, one program per
    bound tile (the default, 128, loops: these tiny cases have fewer tiles than that). `paged_flat_programs`
    (the loop flattened over splits or N blocks and used tiles) too: fewer programs than items, one program
    for all of them, and more programs than items."""
    cfg = dataclasses.replace(LOOP, paged_tile_programs=programs, paged_flat_programs=flat)
    assert run_group_case(T, layout, GROUP_RANKS, jnp.float32, seed=T, block_m=block_m, cfg=cfg) < 1e-5
    rng = np.random.default_rng(T)
    w = random_slot_weights(jax.random.key(T), GROUP_RANKS[0], H_IN, H_OUT, dtype=jnp.float32, max_rank=128)
    (pw,) = paged_group_from_slots([w], 16, 128, rng)
    slot_T = make_slots(layout, T, S, rng)
    meta = build_lora_meta(slot_T, block_m=block_m)
    x = jnp.asarray(rng.standard_normal((T, H_IN)), jnp.float32)
    y = jnp.asarray(rng.standard_normal((T, H_OUT)), jnp.float32)
    want = lora_reference(y, x, w, jnp.asarray(slot_T))
    assert rel_err(_add(y, x, pw, meta, config=cfg), want, y) < 1e-5


@pytest.mark.parametrize("base", [SPLIT, ONE], ids=["pair", "one_launch"])
@pytest.mark.parametrize("k_steps,k_loop,presum", [(1, 3, 0), (1, 2, 1), (3, 1, 1), (1, 4, 1), (2, 9, 0)])
def test_paged_k_loop_and_presum_match_reference(k_steps, k_loop, presum, base):
    """`paged_k_loop` (K chunks per shrink program as a loop of `paged_k_steps` unrolled ones; H_in = 4
    chunks: 2 splits of 3 chunks with a masked tail, 2 of 2, one of 4, one of 4 with more loop steps than
    needed) and `paged_presum_min_tokens` (the partials summed before the expand) give the reference's
    results, grouped and one projection alone, and `shrink` alone; so does the one-launch path with the
    K loop (it has no presum)."""
    cfg = dataclasses.replace(base, paged_k_steps=k_steps, paged_k_loop=k_loop, paged_presum_min_tokens=presum)
    assert run_group_case(37, "mixed_none", GROUP_RANKS, jnp.float32, seed=5, cfg=cfg) < 1e-5
    rng = np.random.default_rng(6)
    w = random_slot_weights(jax.random.key(6), GROUP_RANKS[2], H_IN, H_OUT, dtype=jnp.float32, max_rank=128)
    (pw,) = paged_group_from_slots([w], 16, 128, rng)
    slot_T = make_slots("skewed", 37, S, rng)
    meta = build_lora_meta(slot_T, block_m=16)
    x = jnp.asarray(rng.standard_normal((37, H_IN)), jnp.float32)
    y = jnp.asarray(rng.standard_normal((37, H_OUT)), jnp.float32)
    assert rel_err(_add(y, x, pw, meta, config=cfg), lora_reference(y, x, w, jnp.asarray(slot_T)), y) < 1e-5
    v_want = jnp.einsum("ti,tir->tr", x, w.a[jnp.maximum(jnp.asarray(slot_T), 0)], precision="highest")
    v_want = jnp.where((jnp.asarray(slot_T) >= 0)[:, None], v_want, 0.0)[:, : pw.r_max]
    got = shrink(x, pw, meta, impl="pallas", config=cfg)
    assert float(jnp.max(jnp.abs(got - v_want))) < 1e-4 * float(jnp.max(jnp.abs(v_want)))


def test_paged_k_loop_lowers_for_the_gpu():
    """The shrink's K loop (inside the tile loop) lowers to Triton; the presum is an XLA reduction between."""
    ws = [random_slot_weights(jax.random.key(g), r, H_IN, o, dtype=jnp.bfloat16, max_rank=128)
          for g, (r, o) in enumerate(zip(GROUP_RANKS, GROUP_OUT))]
    pws = paged_group_from_slots(ws, 16, 128, np.random.default_rng(0))
    meta = build_lora_meta(make_slots("skewed", 64, S, np.random.default_rng(1)), block_m=16)
    x = jnp.zeros((64, H_IN), jnp.bfloat16)
    ys = tuple(jnp.zeros((64, o), jnp.bfloat16) for o in GROUP_OUT)
    cfg = dataclasses.replace(LOOP, interpret=False, paged_k_steps=1, paged_k_loop=2, paged_presum_min_tokens=1)
    text = _add_group.trace(ys, x, pws, meta, config=cfg).lower(lowering_platforms=("cuda",)).as_text()
    assert text.count("xla.gpu.triton") == 2 and "stablehlo.reduce" in text
    one = dataclasses.replace(cfg, paged_one_launch_max_tokens=1 << 30, paged_one_launch_max_rank=1 << 30)
    text = _add_group.trace(ys, x, pws, meta, config=one).lower(lowering_platforms=("cuda",)).as_text()
    assert text.count("xla.gpu.triton") == 1


@pytest.mark.parametrize("loads", ["cg", "block"])
@pytest.mark.parametrize("T,layout", [(1, "distinct"), (37, "mixed_none")])
def test_paged_one_launch_wait_loads_match_reference(T, layout, loads):
    """`paged_wait_loads`: the one-launch expand reads the partials as L2-only loads ("cg"), or all K splits
    in block loads of several splits each ("block"; 1 K chunk a program, so there are several splits, and
    rank blocks up to 128, so several blocks); same results (interpret mode: the programs run in order, so
    this checks the kernel's arithmetic and masks), and it lowers."""
    cfg = dataclasses.replace(ONE, paged_wait_loads=loads, paged_k_steps=1 if loads == "block" else None)
    assert run_group_case(T, layout, GROUP_RANKS, jnp.float32, seed=T, cfg=cfg) < 1e-5
    ws = [random_slot_weights(jax.random.key(g), r, H_IN, o, dtype=jnp.bfloat16, max_rank=128)
          for g, (r, o) in enumerate(zip(GROUP_RANKS, GROUP_OUT))]
    pws = paged_group_from_slots(ws, 16, 128, np.random.default_rng(0))
    meta = build_lora_meta(make_slots(layout, T, S, np.random.default_rng(1)), block_m=16)
    x = jnp.zeros((T, H_IN), jnp.bfloat16)
    ys = tuple(jnp.zeros((T, o), jnp.bfloat16) for o in GROUP_OUT)
    gpu = dataclasses.replace(cfg, interpret=False)
    assert _add_group.trace(ys, x, pws, meta, config=gpu).lower(lowering_platforms=("cuda",)).as_text().count(
        "xla.gpu.triton") == 1
    with pytest.raises(ValueError, match="wait_loads"):
        _add_group(ys, x, pws, meta, config=dataclasses.replace(cfg, paged_wait_loads="ca"))


def test_paged_k_loop_checks_its_value():
    w = random_slot_weights(jax.random.key(0), GROUP_RANKS[0], H_IN, H_OUT, dtype=jnp.float32, max_rank=128)
    (pw,) = paged_group_from_slots([w], 16, 128, np.random.default_rng(0))
    meta = build_lora_meta(np.zeros(16, np.int32), block_m=16)
    with pytest.raises(ValueError, match="k_loop must be >= 1"):
        add_lora(jnp.zeros((16, H_OUT)), jnp.zeros((16, H_IN)), pw, meta, impl="pallas",
                 config=dataclasses.replace(SPLIT, paged_k_loop=0))


@pytest.mark.parametrize("flat,splits,k_steps,T,layout", [
    (7, 3, 1, 37, "mixed_none"),   # few programs for the used tiles: 1 split of all 4 loop steps
    (1000, 16, 1, 64, "identical"),  # many programs, 4 tiles: the most splits, 4 of one step
    (6, 4, 1, 37, "distinct"),     # 1 split
    (64, 4, 3, 37, "skewed"),      # steps of 3 chunks: 2 of them, the second a masked tail
])
def test_paged_run_time_splits_match_reference(flat, splits, k_steps, T, layout):
    """`paged_run_time_splits` (K splits picked at run time from the used tiles, the partials past them
    unwritten and masked out of the sum; interpret mode fills unwritten outputs with NaN, so an unmasked sum
    fails) gives the reference's results, grouped and one projection alone."""
    cfg = dataclasses.replace(LOOP, paged_flat_programs=flat, paged_run_time_splits=splits, paged_k_steps=k_steps)
    assert run_group_case(T, layout, GROUP_RANKS, jnp.float32, seed=T, block_m=16, cfg=cfg) < 1e-5
    rng = np.random.default_rng(T)
    w = random_slot_weights(jax.random.key(T), GROUP_RANKS[2], H_IN, H_OUT, dtype=jnp.float32, max_rank=128)
    (pw,) = paged_group_from_slots([w], 16, 128, rng)
    slot_T = make_slots(layout, T, S, rng)
    meta = build_lora_meta(slot_T, block_m=16)
    x = jnp.asarray(rng.standard_normal((T, H_IN)), jnp.float32)
    y = jnp.asarray(rng.standard_normal((T, H_OUT)), jnp.float32)
    assert rel_err(_add(y, x, pw, meta, config=cfg), lora_reference(y, x, w, jnp.asarray(slot_T)), y) < 1e-5


def test_run_time_split_counts_and_errors():
    """About target / (used tiles x G) splits, 1 to the most, of whole loop steps (the last one shorter);
    no used tile counts as one. Run-time splits need the flattened loop."""
    from pallas_kernels.sgmv_paged import run_time_split_counts, run_time_split_plan, sgmv_shrink_paged_group

    def counts(*a):
        return tuple(int(c) for c in run_time_split_counts(*a))

    assert counts(4, 3, 16, 16, 1000) == (16, 1)
    assert counts(7, 3, 16, 3, 7) == (1, 16)
    assert counts(2, 1, 16, 16, 6) == (3, 6)  # steps of 6, 6 and 4
    assert counts(0, 1, 16, 16, 6) == (6, 3)  # 6 wanted: steps of 3, so 6 splits (the last of one step)
    assert run_time_split_plan(64 * 11, 64, None, 64) == (4, 3, 3)  # 11 chunks in steps of 4: 3 at most
    with pytest.raises(ValueError, match="max_splits"):
        run_time_split_plan(256, 64, None, 0)
    w = random_slot_weights(jax.random.key(0), GROUP_RANKS[2], H_IN, H_OUT, dtype=jnp.float32, max_rank=128)
    (pw,) = paged_group_from_slots([w], 16, 128, np.random.default_rng(0))
    meta = build_lora_meta(np.arange(16) % 3 - 1, block_m=16)
    x, y = jnp.zeros((16, H_IN)), jnp.zeros((16, H_OUT))
    with pytest.raises(ValueError, match="paged_flat_programs"):
        _add(y, x, pw, meta, config=dataclasses.replace(LOOP, paged_run_time_splits=2))
    with pytest.raises(ValueError, match="flat=True"):
        sgmv_shrink_paged_group(x, pw.rows, pw.pages, pw.rank[None], pw.a_row[None], meta.perm, meta.tile_start,
                                meta.tile_end, meta.tile_slot, rows_per_page=pw.rows_per_page, r_block=128,
                                block_m=16, tile_programs=4, max_splits=2, split_counts=jnp.array([1, 4]))


def test_paged_tile_loop_lowers_for_the_gpu():
    """The loop's bound is read at run time (`used_tiles`): it must lower to Triton, with the tile axis
    of both launches cut to `paged_tile_programs`."""
    ws = [random_slot_weights(jax.random.key(g), r, H_IN, o, dtype=jnp.bfloat16, max_rank=128)
          for g, (r, o) in enumerate(zip(GROUP_RANKS, GROUP_OUT))]
    pws = paged_group_from_slots(ws, 16, 128, np.random.default_rng(0))
    meta = build_lora_meta(make_slots("skewed", 64, S, np.random.default_rng(1)), block_m=16)
    x = jnp.zeros((64, H_IN), jnp.bfloat16)
    ys = tuple(jnp.zeros((64, o), jnp.bfloat16) for o in GROUP_OUT)
    cfg = dataclasses.replace(LOOP, interpret=False, paged_tile_programs=4)
    text = _add_group.trace(ys, x, pws, meta, config=cfg).lower(lowering_platforms=("cuda",)).as_text()
    assert text.count("xla.gpu.triton") == 2
    assert meta.tile_slot.shape[0] > 4  # the bound the default would launch a program for each of
    flat = dataclasses.replace(cfg, paged_flat_programs=6)  # the flattened loop: grids (1, 6)
    text = _add_group.trace(ys, x, pws, meta, config=flat).lower(lowering_platforms=("cuda",)).as_text()
    assert text.count("xla.gpu.triton") == 2
    assert text.count("grid_x = 1") == 2 and text.count("grid_y = 6") == 2, re.findall(r"grid_\w = \d+", text)
    with pytest.raises(ValueError, match="paged_flat_programs"):
        _add_group(ys, x, pws, meta, config=dataclasses.replace(cfg, paged_flat_programs=-1))
    dyn = dataclasses.replace(flat, paged_run_time_splits=4, paged_k_steps=1)  # run-time splits: same grids
    text = _add_group.trace(ys, x, pws, meta, config=dyn).lower(lowering_platforms=("cuda",)).as_text()
    assert text.count("xla.gpu.triton") == 2 and text.count("grid_y = 6") == 2


@pytest.mark.parametrize("base", [SPLIT, ONE, LOOP, dataclasses.replace(LOOP, paged_flat_programs=5,
                                                                         paged_run_time_splits=2, paged_k_steps=1)],
                         ids=["pair", "one_launch", "tile_loop", "run_time_splits"])
@pytest.mark.parametrize("T,layout,k_steps,n_steps", [(1, "distinct", 3, 1), (37, "mixed_none", 4, 2),
                                                      (64, "identical", 2, 2)])
def test_paged_phased_loads_match_reference(base, T, layout, k_steps, n_steps):
    """`paged_phased_loads` (metadata read beside the rank, every chunk's page entries then loads then dots)
    gives the reference's results: several unrolled shrink chunks (4 of 4, 2 of 4, 3 with a masked tail)
    and expand chunks, pages smaller than a rank block, on every path that runs the programs."""
    rt = base.paged_run_time_splits
    cfg = dataclasses.replace(base, paged_phased_loads=True, paged_n_steps=n_steps,
                              paged_k_steps=1 if rt else k_steps)
    assert run_group_case(T, layout, GROUP_RANKS, jnp.float32, seed=T, cfg=cfg) < 1e-5
    assert run_group_case(T, layout, GROUP_RANKS, jnp.float32, seed=T + 1, cfg=cfg, rows_per_page=24) < 1e-5


def test_paged_phased_loads_issue_every_load_before_a_dot(monkeypatch, capsys):
    """In the Triton module of the phased shrink, every load of a loop step (page entries, x and A) comes
    before its first dot; the default interleaves them (a load after the first dot)."""
    import pallas_kernels.sgmv_paged as sp

    monkeypatch.setattr(sp.pl, "pallas_call", functools.partial(sp.pl.pallas_call, debug=True))
    w = random_slot_weights(jax.random.key(0), [8, 16, 64, 24], 256, 128)
    ws = paged_group_from_slots((w,), 64, 96, np.random.default_rng(0))
    meta = build_lora_meta(np.arange(16) % 5 - 1)
    x, y = jnp.zeros((16, 256), jnp.bfloat16), jnp.zeros((16, 128), jnp.bfloat16)

    def shrink_ir(phased):
        cfg = dataclasses.replace(SPLIT, interpret=False, paged_k_steps=4, paged_phased_loads=phased)
        f = jax.jit(lambda y, x, ws, m: add_lora_group((y,), x, ws, m, config=cfg))
        f.trace(y, x, ws, meta).lower(lowering_platforms=("cuda",))
        out = capsys.readouterr().out
        mod = out.split("The Triton module for pallas_call sgmv_shrink_paged")[1].split("The Triton module")[0]
        # the partial's store is a masked swap, which reads too: not a load of the loop
        return [op for op in mod.splitlines() if ("tt.load" in op and "masked_swap" not in op) or "tt.dot" in op]

    for phased in (True, False):
        ops = shrink_ir(phased)
        dots = [i for i, op in enumerate(ops) if "tt.dot" in op]
        assert len(dots) == 4
        assert any("tt.load" in op for op in ops[dots[0]:]) != phased


@pytest.mark.parametrize("block_m,want", [(16, 2), (32, 4)])
def test_paged_warps_by_tile(block_m, want):
    """`paged_warps=None` picks the launch's warps by tile (`paged_warps_for`): 2 for 16-row tiles at rank
    block 128 (2048 fp32 values), 4 for 32-row ones (4096); a set value wins. Checked in the Triton calls."""
    assert paged_warps_for(KernelConfig(), block_m, 128) == want
    assert paged_warps_for(KernelConfig(), 64, 64) == 4 and paged_warps_for(KernelConfig(), 64, 16) == 2
    assert paged_warps_for(KernelConfig(paged_warps=8), block_m, 128) == 8
    ws = [random_slot_weights(jax.random.key(g), r, H_IN, o, dtype=jnp.bfloat16, max_rank=128)
          for g, (r, o) in enumerate(zip(GROUP_RANKS, GROUP_OUT))]
    pws = paged_group_from_slots(ws, 16, 128, np.random.default_rng(0))
    meta = build_lora_meta(make_slots("skewed", 64, S, np.random.default_rng(1)), block_m=block_m)
    x = jnp.zeros((64, H_IN), jnp.bfloat16)
    ys = tuple(jnp.zeros((64, o), jnp.bfloat16) for o in GROUP_OUT)
    base = dataclasses.replace(SPLIT, interpret=False, paged_mid_max_tokens=0)  # 64 tokens: not the mid rule's
    for cfg, warps in ((base, want), (dataclasses.replace(base, paged_warps=1), 1)):
        text = _add_group.trace(ys, x, pws, meta, config=cfg).lower(lowering_platforms=("cuda",)).as_text()
        assert re.findall(r"num_warps = (\d+) : i32", text) == [str(warps)] * 2


@settings(max_examples=4, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    ranks=st.lists(st.lists(st.sampled_from(RANKS + (0, 0)), min_size=S, max_size=S), min_size=3, max_size=3),
    layout=st.sampled_from(("distinct", "identical", "uniform", "skewed", "mixed_none", "all_none")),
    seed=st.integers(0, 2**16),
)
def test_paged_group_random_layouts_and_ranks(ranks, layout, seed):
    """Same shapes every example (one interpret compile each), random slots and per-projection ranks."""
    for cfg in (SPLIT, ONE):
        assert run_group_case(48, layout, np.array(ranks), jnp.float32, seed=seed, cfg=cfg) < 1e-5


def test_add_lora_group_falls_back_per_projection():
    """Without the grouped launch (flag off; or dense slots) the op is one `add_lora` each."""
    assert run_group_case(20, "skewed", GROUP_RANKS, jnp.float32, seed=9,
                          cfg=dataclasses.replace(SPLIT, group_projections=False)) < 1e-5
    rng = np.random.default_rng(3)
    ws = [random_slot_weights(jax.random.key(g), r, H_IN, H_OUT, dtype=jnp.float32) for g, r in enumerate(GROUP_RANKS)]
    slot_T = make_slots("uniform", 20, S, rng)
    x = jnp.asarray(rng.standard_normal((20, H_IN)), jnp.float32)
    ys = [jnp.asarray(rng.standard_normal((20, H_OUT)), jnp.float32)] * 3
    got = _add_group(ys, x, ws, build_lora_meta(slot_T), impl="reference")
    for y, w, out in zip(ys, ws, got):
        np.testing.assert_allclose(out, lora_reference(y, x, w, jnp.asarray(slot_T)), rtol=1e-6)


def test_group_halves_on_pages():
    """`shrink_group` then `expand_group` (one launch each, as under tensor parallelism where the
    all-gather sits between them) give `shrink`/`add_lora` per projection, masked past each rank."""
    rng = np.random.default_rng(11)
    T = 29
    ranks_GxS = GROUP_RANKS.copy()
    ranks_GxS[2] = np.minimum(ranks_GxS[2], 24)  # rank bounds (r_max) 64, 64, 24
    ws = [random_slot_weights(jax.random.key(g), ranks, H_IN, o, dtype=jnp.float32, max_rank=128)
          for g, (ranks, o) in enumerate(zip(ranks_GxS, GROUP_OUT))]
    pws = paged_group_from_slots(ws, 16, 128, rng)
    assert [pw.r_max for pw in pws] == [64, 64, 24]
    slot_T = make_slots("mixed_none", T, S, rng)
    meta = build_lora_meta(slot_T, block_m=16)
    x = jnp.asarray(rng.standard_normal((T, H_IN)), jnp.float32)
    ys = tuple(jnp.asarray(rng.standard_normal((T, o)), jnp.float32) for o in GROUP_OUT)

    def halves(ys, x, pws, meta):
        vs = shrink_group(x, pws, meta, config=SPLIT)
        return vs, expand_group(ys, vs, pws, meta, config=SPLIT)

    vs, got = jax.jit(halves)(ys, x, pws, meta)
    for v, pw, w, y, out in zip(vs, pws, ws, ys, got):
        assert v.shape == (T, pw.r_max)
        np.testing.assert_allclose(v, shrink(x, pw, meta, impl="reference"), rtol=1e-5, atol=1e-5)
        assert rel_err(out, lora_reference(y, x, w, jnp.asarray(slot_T)), y) < 1e-5
    with pytest.raises(ValueError, match="rank bound"):
        expand_group(ys, (vs[0][:, :8],) + vs[1:], pws, meta, config=SPLIT)


@pytest.mark.parametrize("n_in,programs_per_split,want", [
    (32, 1, MIN_K_STEPS),  # one tile (one token): short programs, the GPU is idle anyway
    (32, 64, 4),  # 64 tiles, one projection: 8 splits of 4 chunks = 512 programs
    (32, 192, MAX_K_STEPS),  # 64 tiles of q, k, v: fewer partials to re-read
    (86, 4096, MAX_K_STEPS),  # 11008 / 128: capped, still 11 splits
    (2, 1, 2),  # fewer chunks than the minimum: one split
])
def test_default_k_steps(n_in, programs_per_split, want):
    assert default_k_steps(n_in, programs_per_split) == want


def test_shrink_expand_kernels_alone():
    """Raw kernel contract: vpart summed over splits is the shrink; expand adds into y."""
    rng = np.random.default_rng(5)
    T, ranks = 40, np.array([16, 1, 24, 0, 64, 8, 4])
    w = random_slot_weights(jax.random.key(5), ranks, H_IN, H_OUT, dtype=jnp.float32)
    slot_T = make_slots("mixed_none", T, len(ranks), rng)
    meta = build_lora_meta(slot_T, block_m=16)
    x = jnp.asarray(rng.standard_normal((T, H_IN)), jnp.float32)
    y = jnp.asarray(rng.standard_normal((T, H_OUT)), jnp.float32)
    args = (w.ranks, meta.perm, meta.tile_start, meta.tile_end, meta.tile_slot)
    # 4 K blocks in 3 splits: 2 + 2 + an empty last split (which must write zeros).
    vpart = jax.jit(lambda x, a, *args: sgmv_shrink(x, a, *args, block_m=16, block_k=16, k_splits=3,
                                                    interpret=True))(x, w.a, *args)
    assert vpart.shape == (3, T, w.a.shape[-1]) and vpart.dtype == jnp.float32
    v_ref = shrink_reference(x, w.a, w.ranks, jnp.asarray(slot_T))
    np.testing.assert_allclose(jax.jit(lambda x, w, m: shrink(x, w, m, config=CFG))(x, w, meta), v_ref,
                               rtol=1e-5, atol=1e-5)
    out = jax.jit(lambda y, vp, b, *args: sgmv_expand(y, vp, b, *args, block_m=16, block_n=16,
                                                      interpret=True))(y, vpart, w.b, *args)
    np.testing.assert_allclose(out, expand_reference(y, v_ref, w.b, w.ranks, jnp.asarray(slot_T)),
                               rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(jax.jit(lambda y, v, w, m: expand(y, v, w, m, config=CFG))(y, v_ref, w, meta),
                               expand_reference(y, v_ref, w.b, w.ranks, jnp.asarray(slot_T)),
                               rtol=1e-5, atol=1e-5)


def test_odd_number_of_k_blocks():
    """H_in = 48 = 3 blocks of 16 (like 11008 = 43 blocks of 256): the default splits are uneven."""
    rng = np.random.default_rng(7)
    T, H = 24, 48
    w = random_slot_weights(jax.random.key(7), [16, 8, 24], H, H_OUT, dtype=jnp.float32)
    slot_T = make_slots("mixed_none", T, 3, rng)
    meta = build_lora_meta(slot_T)
    x = jnp.asarray(rng.standard_normal((T, H)), jnp.float32)
    y = jnp.asarray(rng.standard_normal((T, H_OUT)), jnp.float32)
    for cfg in (CFG, SPLIT):
        out = _add(y, x, w, meta, config=cfg)
        np.testing.assert_allclose(out, lora_reference(y, x, w, jnp.asarray(slot_T)), rtol=1e-5, atol=1e-5)


def test_rank_not_multiple_of_block_is_padded():
    """R < 16 (or not a multiple of the rank block) still works: the op pads the weights."""
    rng = np.random.default_rng(6)
    T = 20
    w = random_slot_weights(jax.random.key(6), [4, 8, 1], H_IN, H_OUT, dtype=jnp.float32, max_rank=8)
    assert w.a.shape[-1] == 8
    slot_T = make_slots("mixed_none", T, 3, rng)
    meta = build_lora_meta(slot_T)
    x = jnp.asarray(rng.standard_normal((T, H_IN)), jnp.float32)
    y = jnp.asarray(rng.standard_normal((T, H_OUT)), jnp.float32)
    for cfg in (CFG, SPLIT):
        out = _add(y, x, w, meta, config=cfg)
        np.testing.assert_allclose(out, lora_reference(y, x, w, jnp.asarray(slot_T)), rtol=1e-5, atol=1e-5)


def test_one_launch_lowering_keeps_the_wait(monkeypatch, capsys):
    """The expand programs' wait survives into the Triton module as a loop of atomics.

    Interpret mode runs programs in order, so it cannot see a missing wait; the first GPU
    run did (session 10): a poll of plain loads whose result nothing used was dropped,
    and the expand read partials the shrink had not yet written.
    """
    import pallas_kernels.sgmv_paged as sp

    monkeypatch.setattr(sp.pl, "pallas_call", functools.partial(sp.pl.pallas_call, debug=True))
    T, H = 64, 256
    w = random_slot_weights(jax.random.key(0), [8, 16, 64, 24], H, 128)
    ws = paged_group_from_slots((w,), 64, 96, np.random.default_rng(0))
    meta = build_lora_meta(np.arange(T) % 5 - 1)
    y = jnp.zeros((T, 128), jnp.bfloat16)
    cfg = dataclasses.replace(ONE, interpret=False)
    f = jax.jit(lambda y, x, ws, m: add_lora_group((y,), x, ws, m, config=cfg))
    f.trace(y, jnp.zeros((T, H), jnp.bfloat16), ws, meta).lower(lowering_platforms=("cuda",))
    module = capsys.readouterr().out.split("The Triton module for pallas_call")[-1]
    assert module.count("scf.while") == 1
    loop = module[module.index("scf.while"):]
    body = loop[loop.index("} do {") : loop.index('} "while:"')]
    assert "tt.atomic_rmw add, acq_rel, gpu" in body
    assert module.count("tt.atomic_rmw add, acq_rel, gpu") == 3  # shrink's +1; expand's first poll and loop poll


@pytest.mark.parametrize("T,ranks,launches", [(1, [8, 16, 24], 1), (16, [8, 32], 1), (17, [8, 16, 24], 2),
                                             (64, [8, 16, 24], 2), (1, [8, 64], 2), (16, [128, 4], 2)])
def test_default_one_launch_for_small_calls(T, ranks, launches):
    """By default the paged pair runs as one launch for calls of <= 16 tokens whose rank block is <= 32, as two
    (with the partials summed by XLA between) otherwise."""
    cfg = KernelConfig(interpret=False)
    assert (cfg.paged_one_launch_max_tokens, cfg.paged_one_launch_max_rank, cfg.paged_presum_min_tokens) == (16, 32, 1)
    w = random_slot_weights(jax.random.key(0), ranks, 1024, 128)  # 16 chunks: > 1 K split
    ws = paged_group_from_slots((w,), 64, 96, np.random.default_rng(0))
    meta = build_lora_meta(np.arange(T) % (len(ranks) + 1) - 1)
    f = jax.jit(lambda y, x, ws, m: add_lora_group((y,), x, ws, m, config=cfg))
    x, y = jnp.zeros((T, 1024), jnp.bfloat16), jnp.zeros((T, 128), jnp.bfloat16)
    text = f.trace(y, x, ws, meta).lower(lowering_platforms=("cuda",)).as_text()
    assert text.count("xla.gpu.triton") == launches
    assert ("stablehlo.reduce" in text) == (launches == 2)


@pytest.mark.parametrize("T,ranks,splits,warps", [(1, [8, 64], 16, 4), (16, [8, 128], 16, 4), (17, [8, 64], 8, 4),
                                                  (64, [8, 64], 8, 4), (128, [8, 64], 4, 2)])
def test_default_small_pair_calls_take_short_programs(T, ranks, splits, warps):
    """Calls of <= 16 tokens that the rank rule sends to the split pair take 1 K chunk per shrink program
    (16 chunks: 16 splits) and 4 warps (`paged_small_k_steps`, `paged_small_warps`); 17-64 tokens the mid
    rule's 2 chunks (8 splits) and 4 warps; larger calls keep `default_k_steps` (4 splits here) and
    `paged_warps_for`; set `paged_k_steps` / `paged_warps` win."""
    w = random_slot_weights(jax.random.key(0), ranks, 1024, 128)
    ws = paged_group_from_slots((w,), 64, 96, np.random.default_rng(0))
    meta = build_lora_meta(np.arange(T) % 3 - 1)
    x, y = jnp.zeros((T, 1024), jnp.bfloat16), jnp.zeros((T, 128), jnp.bfloat16)

    def lowered(cfg):
        f = jax.jit(lambda y, x, ws, m: add_lora_group((y,), x, ws, m, config=cfg))
        return f.trace(y, x, ws, meta).lower(lowering_platforms=("cuda",)).as_text()

    text = lowered(KernelConfig(interpret=False))
    assert re.findall(r"num_warps = (\d+)", text) == [str(warps)] * 2
    assert f"tensor<1x{splits}x{T}x" in text  # the partials: [G, splits, T, R]
    if T <= 16:
        text = lowered(KernelConfig(interpret=False, paged_k_steps=4, paged_warps=2))
        assert re.findall(r"num_warps = (\d+)", text) == ["2"] * 2 and f"tensor<1x4x{T}x" in text
        text = lowered(KernelConfig(interpret=False, paged_small_k_steps=0, paged_small_warps=0))
        assert f"tensor<1x16x{T}x" not in text


@pytest.mark.parametrize("T,mid_max,splits,warps", [(64, 0, 4, 2), (64, 64, 8, 4), (17, 64, 8, 4), (128, 64, 4, 2),
                                                      (8, 64, 16, 4), (64, None, 8, 4), (128, None, 4, 2)])
def test_mid_pair_calls_take_the_mid_programs(T, mid_max, splits, warps):
    """With `paged_mid_max_tokens`, pair calls of more than `paged_one_launch_max_tokens` and at most that many
    tokens take `paged_mid_k_steps` K chunks a program (2: 8 splits of 16 chunks) and `paged_mid_warps`; larger
    calls keep the defaults (4 splits, 2 warps); decode calls keep the small rule (1 chunk: 16 splits).
    None: the default config, on up to 64 tokens."""
    w = random_slot_weights(jax.random.key(0), [8, 64], 1024, 128)
    ws = paged_group_from_slots((w,), 64, 96, np.random.default_rng(0))
    meta = build_lora_meta(np.arange(T) % 3 - 1)
    x, y = jnp.zeros((T, 1024), jnp.bfloat16), jnp.zeros((T, 128), jnp.bfloat16)
    cfg = KernelConfig(interpret=False, **({} if mid_max is None else {"paged_mid_max_tokens": mid_max}))
    f = jax.jit(lambda y, x, ws, m: add_lora_group((y,), x, ws, m, config=cfg))
    text = f.trace(y, x, ws, meta).lower(lowering_platforms=("cuda",)).as_text()
    assert re.findall(r"num_warps = (\d+)", text) == [str(warps)] * 2
    assert f"tensor<1x{splits}x{T}x" in text  # the partials: [G, splits, T, R]


@pytest.mark.parametrize("cfg,T,want", [({}, 1, None), ({}, 16, None), ({}, 17, 128),
                                         ({"paged_small_tile_programs": None}, 8, 128),
                                         ({"paged_small_tile_programs": 32}, 8, 32),
                                         ({"paged_tile_programs": 64}, 17, 64)])
def test_small_pair_calls_take_one_program_a_tile(monkeypatch, cfg, T, want):
    """Split-pair calls of <= `paged_one_launch_max_tokens` tokens (rank over the one launch's) launch one
    program per bound tile (`paged_small_tile_programs=0`: no tile loop, no `used_tiles` read); larger
    calls keep the loop of `paged_tile_programs`; None leaves small calls on it too."""
    import slora_jax.ops.lora as ops_lora

    seen = []
    for name in ("sgmv_shrink_paged_group", "sgmv_expand_paged_group"):
        real = getattr(ops_lora, name)
        monkeypatch.setattr(ops_lora, name, lambda *a, _real=real, **k: seen.append(k.get("tile_programs"))
                            or _real(*a, **k))
    w = random_slot_weights(jax.random.key(0), [8, 64], 64, 32, dtype=jnp.float32)
    ws = paged_group_from_slots((w,), 16, 96, np.random.default_rng(0))
    slot_T = np.arange(T) % 3 - 1
    meta = build_lora_meta(slot_T)
    x = jnp.asarray(np.random.default_rng(1).standard_normal((T, 64)), jnp.float32)
    y = jnp.zeros((T, 32), jnp.float32)
    (got,) = add_lora_group((y,), x, ws, meta, config=KernelConfig(interpret=True, **cfg))
    assert seen == [want, want]
    np.testing.assert_allclose(got, lora_reference(y, x, w, jnp.asarray(slot_T)), rtol=2e-3, atol=2e-3)


@pytest.mark.parametrize("setting,want", [(None, True), (True, True), (False, False), (0, False), (1, True)])
def test_one_launch_takes_phased_loads_by_default(monkeypatch, setting, want):
    """`paged_phased_loads=None` (the default) phases the one launch's loads; True and False force it, and so
    do 1 and 0 (as `bench_kernels.py`'s 'pallas_paged[paged_phased_loads=0]' passes them)."""
    import slora_jax.ops.lora as ops_lora

    seen = []
    real = ops_lora.sgmv_paged_group_one_launch
    monkeypatch.setattr(ops_lora, "sgmv_paged_group_one_launch", lambda *a, **k: seen.append(k["phased"]) or real(*a, **k))
    cfg = dataclasses.replace(ONE, paged_phased_loads=setting)
    jax.clear_caches()  # 0 == False as a static argument: the call must trace, not reuse another setting's
    assert run_group_case(5, "mixed_none", GROUP_RANKS, jnp.float32, seed=3, cfg=cfg) < 1e-5
    assert seen == [want]


@pytest.mark.parametrize("mixed_index", [True, False])
@pytest.mark.parametrize("weights,launches", [("dense", 1), ("paged", 1), ("dense_split", 2), ("paged_split", 2),
                                               ("paged_group", 2)])
def test_lowers_to_triton_for_gpu(mixed_index, weights, launches):
    """The Triton lowering (which interpret mode skips) accepts every kernel and both index forms."""
    T, H = 64, 256
    w = random_slot_weights(jax.random.key(0), [8, 16, 64, 24], H, 128)
    meta = build_lora_meta(np.arange(T) % 5 - 1)
    x = jnp.zeros((T, H), jnp.bfloat16)
    y = jnp.zeros((T, 128), jnp.bfloat16)
    cfg = KernelConfig(interpret=False, mixed_index=mixed_index, fused=not weights.endswith(("split", "group")))
    if weights == "paged_group":  # q, k, v of GQA: 256 -> 256, 128, 128
        wq = random_slot_weights(jax.random.key(1), [16, 0, 8, 24], H, H)
        ws = paged_group_from_slots((wq, w, w), 64, 96, np.random.default_rng(0))
        f = jax.jit(lambda y, x, ws, m: add_lora_group((jnp.zeros((T, H), y.dtype), y, y), x, ws, m, config=cfg))
        text = f.trace(y, x, ws, meta).lower(lowering_platforms=("cuda",)).as_text()
        assert text.count("xla.gpu.triton") == launches
        return
    if weights.startswith("paged"):
        w = paged_from_slots(w, 64, 96, np.random.default_rng(0))
    f = jax.jit(lambda y, x, w, m: add_lora(y, x, w, m, config=cfg))
    text = f.trace(y, x, w, meta).lower(lowering_platforms=("cuda",)).as_text()
    assert text.count("xla.gpu.triton") == launches


def test_one_launch_counters_are_never_a_one_element_buffer():
    """The one launch's counter buffer has at least `COUNTERS_MIN` entries, also for one token and one
    projection (one tile): a 1-element zero buffer was the 0.9 us copy in session 22's profile."""
    from pallas_kernels.sgmv_paged import COUNTERS_MIN

    w = random_slot_weights(jax.random.key(0), [8, 16], 256, 128)
    ws = paged_group_from_slots((w,), 64, 96, np.random.default_rng(0))
    meta = build_lora_meta(np.array([1], np.int32))
    f = jax.jit(lambda y, x, ws, m: add_lora_group((y,), x, ws, m, config=dataclasses.replace(ONE, interpret=False)))
    text = f.trace(jnp.zeros((1, 128), jnp.bfloat16), jnp.zeros((1, 256), jnp.bfloat16), ws, meta).lower(
        lowering_platforms=("cuda",)).as_text()
    assert text.count("xla.gpu.triton") == 1
    call = text.split("xla.gpu.triton")[1].split("\n")[0]
    n = re.search(r"-> \(tensor<[0-9x]+xf32>, tensor<(\d+)xi32>", call)
    assert n and int(n.group(1)) == COUNTERS_MIN > 1, call[-200:]

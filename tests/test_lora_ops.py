"""Gathered-LoRA metadata and the jnp baselines against `lora_reference` (CPU, fast)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from slora_jax.ops import (
    IMPLS,
    LoraMeta,
    add_lora,
    build_lora_meta,
    build_lora_meta_jnp,
    expand,
    lora_reference,
    random_slot_weights,
    shrink,
)

RANKS = (1, 4, 8, 16, 24, 64, 128)
META_FIELDS = ("perm", "seg_start", "seg_len", "seg_slot", "num_segments", "tile_start", "tile_end",
               "tile_slot")


def make_slots(layout: str, T: int, S: int, rng: np.random.Generator) -> np.ndarray:
    """Per-token slots for a named popularity layout, shuffled, with -1 for no adapter."""
    if layout == "distinct":
        s = np.arange(T) % S
    elif layout == "identical":
        s = np.full(T, rng.integers(S))
    elif layout == "uniform":
        g = int(np.ceil(np.sqrt(T)))
        s = rng.permutation(S)[np.arange(T) % min(g, S)]
    elif layout == "skewed":
        s = np.minimum(rng.zipf(1.5, T) - 1, S - 1)
    elif layout == "mixed_none":
        s = rng.integers(-1, S, T)
    elif layout == "all_none":
        s = np.full(T, -1)
    else:
        raise ValueError(layout)
    return rng.permutation(s).astype(np.int32)


LAYOUTS = ("distinct", "identical", "uniform", "skewed", "mixed_none", "all_none")


def check_meta_invariants(meta: LoraMeta, slot_T: np.ndarray) -> None:
    T = len(slot_T)
    perm = np.asarray(meta.perm)
    assert sorted(perm.tolist()) == list(range(T))
    n = int(meta.num_segments)
    assert n == len(np.unique(slot_T[slot_T >= 0]))
    covered = np.zeros(T, int)
    for g in range(n):
        s, ln, sl = int(meta.seg_start[g]), int(meta.seg_len[g]), int(meta.seg_slot[g])
        assert ln > 0 and np.all(slot_T[perm[s:s + ln]] == sl)
        covered[perm[s:s + ln]] += 1
    assert np.all(np.asarray(meta.seg_len)[n:] == 0) and np.all(np.asarray(meta.seg_slot)[n:] == -1)
    # Tiles cover every adapter token exactly once, each tile inside one segment.
    tiled = np.zeros(T, int)
    for ts, te, sl in zip(np.asarray(meta.tile_start), np.asarray(meta.tile_end), np.asarray(meta.tile_slot)):
        if sl < 0:
            continue
        rows = perm[ts:min(ts + meta.block_m, te)]
        assert len(rows) > 0 and np.all(slot_T[rows] == sl)
        tiled[rows] += 1
    np.testing.assert_array_equal(tiled, (slot_T >= 0).astype(int))
    np.testing.assert_array_equal(covered, (slot_T >= 0).astype(int))


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("T,block_m", [(1, 16), (17, 16), (100, 32), (64, 16)])
def test_meta_numpy_and_jnp_agree(layout, T, block_m):
    rng = np.random.default_rng(T * 7 + len(layout))
    slot_T = make_slots(layout, T, 9, rng)
    meta = build_lora_meta(slot_T, block_m=block_m)
    check_meta_invariants(meta, slot_T)
    meta_j = jax.jit(build_lora_meta_jnp, static_argnames=("max_segments", "block_m"))(
        jnp.asarray(slot_T), block_m=block_m)
    for f in META_FIELDS:
        np.testing.assert_array_equal(np.asarray(getattr(meta, f)), np.asarray(getattr(meta_j, f)), err_msg=f)


def test_meta_static_shapes_and_max_segments():
    slot_T = np.array([3, 3, -1, 5, 0, 5, 3], np.int32)
    meta = build_lora_meta(slot_T, max_segments=4, block_m=16)
    assert meta.seg_start.shape == (4,)
    assert meta.tile_slot.shape == (min(7, 1 + 4),)
    np.testing.assert_array_equal(meta.seg_slot, [0, 3, 5, -1])
    np.testing.assert_array_equal(meta.seg_len, [1, 3, 2, 0])
    assert meta.active_tiles == 4  # 3 real tiles, rounded up to a power of two
    assert build_lora_meta(slot_T, max_segments=4, block_m=16, static_tiles=True).active_tiles == 5  # the bound NT
    with pytest.raises(ValueError, match="distinct slots"):
        build_lora_meta(slot_T, max_segments=2)
    with pytest.raises(ValueError, match="power of two"):
        build_lora_meta(slot_T, block_m=24)


BASELINES = [i for i in IMPLS if i != "pallas"]
_jitted_add_lora = jax.jit(add_lora, static_argnames=("impl", "config"))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_baselines_match_reference(layout, dtype):
    rng = np.random.default_rng(len(layout))
    T, H_in, H_out, S = 45, 32, 48, 8
    ranks = rng.choice(RANKS, S)
    w = random_slot_weights(jax.random.key(1), ranks, H_in, H_out, dtype=dtype)
    slot_T = make_slots(layout, T, S, rng)
    meta = build_lora_meta(slot_T, block_m=16)
    x = jnp.asarray(rng.standard_normal((T, H_in)), dtype)
    y = jnp.asarray(rng.standard_normal((T, H_out)), dtype)
    ref = lora_reference(y, x, w, jnp.asarray(slot_T))
    delta_ref = ref.astype(jnp.float32) - y.astype(jnp.float32)
    scale = float(jnp.linalg.norm(delta_ref)) + 1e-6
    tol = 1e-5 if dtype == jnp.float32 else 2e-2
    for impl in BASELINES:
        if impl == "loop":  # unrolled over concrete segments
            out = jax.jit(lambda y, x, w: add_lora(y, x, w, meta, impl="loop"))(y, x, w)
        else:  # metadata traced: one compile per impl and dtype for all layouts
            out = _jitted_add_lora(y, x, w, meta, impl=impl)
        err = float(jnp.linalg.norm(out.astype(jnp.float32) - ref.astype(jnp.float32))) / scale
        assert err < tol, (impl, err)
        no_T = slot_T < 0
        np.testing.assert_array_equal(np.asarray(out)[no_T], np.asarray(y)[no_T])


def test_traced_meta_under_jit():
    """Metadata built inside jit (jnp builder) feeds the jnp baselines; `loop` asks for concrete metadata."""
    rng = np.random.default_rng(0)
    T, S = 30, 5
    w = random_slot_weights(jax.random.key(2), [4, 16, 8, 0, 24], 32, 32, dtype=jnp.float32)
    slot_T = jnp.asarray(make_slots("mixed_none", T, S, rng))
    x = jnp.asarray(rng.standard_normal((T, 32)), jnp.float32)
    y = jnp.asarray(rng.standard_normal((T, 32)), jnp.float32)
    ref = lora_reference(y, x, w, slot_T)

    @jax.jit
    def step(y, x, slot_T):
        return add_lora(y, x, w, build_lora_meta_jnp(slot_T, block_m=16), impl="ragged_dot")

    np.testing.assert_allclose(step(y, x, slot_T), ref, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="concrete"):
        jax.jit(lambda m: add_lora(y, x, w, m, impl="loop"))(build_lora_meta(np.asarray(slot_T)))


def test_shrink_expand_reference_compose():
    rng = np.random.default_rng(3)
    T, S = 20, 4
    w = random_slot_weights(jax.random.key(3), [1, 24, 16, 8], 32, 16, dtype=jnp.float32)
    slot_T = make_slots("mixed_none", T, S, rng)
    meta = build_lora_meta(slot_T)
    x = jnp.asarray(rng.standard_normal((T, 32)), jnp.float32)
    y = jnp.asarray(rng.standard_normal((T, 16)), jnp.float32)
    v = jax.jit(lambda x, w, m: shrink(x, w, m, impl="reference"))(x, w, meta)
    assert v.shape == (T, 32) and v.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(v)[slot_T < 0], 0.0)
    out = jax.jit(lambda y, v, w, m: expand(y, v, w, m, impl="reference"))(y, v, w, meta)
    np.testing.assert_allclose(out, lora_reference(y, x, w, jnp.asarray(slot_T)), rtol=1e-5, atol=1e-5)


def test_static_tile_bound_keeps_short_shrink_programs():
    """The engine's metadata (`static_tiles`) bounds the tiles by NT itself. At the campaigns' 128-token
    bucket over 64 adapter rows (NT = 72) the paged o shrink keeps 4 K chunks a program, as at the
    64-token bucket; NT rounded up to 128 gave 8, measured slower in the 7B decode step."""
    from pallas_kernels.sgmv_paged import default_k_steps

    for T in (64, 128):
        slot_T = np.arange(T) % 64 if T == 64 else np.where(np.arange(T) < 64, np.arange(T), -1)
        meta = build_lora_meta(slot_T, max_segments=64, static_tiles=True)
        assert meta.active_tiles == len(meta.tile_slot) == min(T, -(-T // 16) + 64)
        assert default_k_steps(4096 // 128, meta.active_tiles) == 4
    meta_j = build_lora_meta_jnp(jnp.asarray(slot_T), max_segments=64)
    assert meta_j.active_tiles == 72


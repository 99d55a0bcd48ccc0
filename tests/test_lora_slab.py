"""The slab LoRA kernels (`pallas_kernels.lora_slab`) and `ops.lora_linear_slab`, interpret mode on CPU."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.lora_slab import linear_slab, linear_slab_reference, slab_shrink, slab_shrink_reference
from slora_jax.ops import (KernelConfig, add_lora_slab, lora_linear_slab, lora_reference, random_slot_weights,
                           slab_fits)

TOL = {jnp.float32: 1e-5, jnp.bfloat16: 2e-2}


def _rel(got, want) -> float:
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    return float(np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-30))


def _ranges(rng, G, T, n_rows, r=16):
    """Each token in one of the adapters laid in rows [0, n_rows) (r rows each), some with none."""
    s_T = rng.integers(-1, n_rows // r, T) if n_rows >= r else np.full(T, -1)
    lo = np.where(s_T >= 0, s_T * r, 0)
    r_GxT = np.where(s_T[None] >= 0, rng.choice([0, 4, r], (G, T)), 0)  # a projection may be untargeted
    return jnp.asarray(np.broadcast_to(lo, (G, T)), jnp.int32), jnp.asarray(lo[None] + r_GxT, jnp.int32)


@pytest.mark.parametrize("T,H,P,G,n_rows,splits,offset,dtype", [
    (1, 64, 64, 1, 64, 1, 0, jnp.float32),
    (7, 128, 128, 3, 80, 2, 3, jnp.float32),   # n_rows inside the second block; a stacked slab's layer 1
    (33, 128, 96, 2, 32, 3, 0, jnp.bfloat16),  # T past a 32-row block; most of P unused; 3 -> 2 splits
    (16, 64, 64, 2, 0, 1, 2, jnp.float32),     # nothing in the slab: all zeros
])
def test_slab_shrink_equals_reference(T, H, P, G, n_rows, splits, offset, dtype):
    rng = np.random.default_rng(T + P)
    x = jnp.asarray(rng.standard_normal((T, H)), dtype)
    a = jnp.asarray(rng.standard_normal((offset + G + 1, H, P)) / np.sqrt(H), dtype)  # nonzero past n_rows too
    lo, hi = _ranges(rng, G, T, n_rows)
    v = slab_shrink(x, a, lo, hi, n_rows, offset, block_p=32, block_k=32, k_splits=splits, interpret=True)
    want = slab_shrink_reference(x, a[offset : offset + G], lo, hi)
    assert v.shape == (G, T, P) and v.dtype == dtype
    assert _rel(v, want) < TOL[dtype] if n_rows else not np.asarray(v).any()
    assert not np.asarray(v[:, :, -(-n_rows // 32) * 32 :]).any()  # zeros past the used blocks


@pytest.mark.parametrize("T,H,outs,P,n_rows,splits,offset,dtype", [
    (5, 64, (64, 32, 32), 64, 48, 1, 0, jnp.float32),   # GQA: k and v narrower than q
    (20, 128, (64,), 96, 96, 3, 1, jnp.float32),         # splits that do not divide K + P steps evenly
    (64, 64, (32, 32), 64, 16, 2, 0, jnp.bfloat16),
])
def test_linear_slab_equals_reference(T, H, outs, P, n_rows, splits, offset, dtype):
    rng = np.random.default_rng(T)
    G = len(outs)
    x = jnp.asarray(rng.standard_normal((T, H)), dtype)
    ws = tuple(jnp.asarray(rng.standard_normal((H, o)) / 8, dtype) for o in outs)
    v = rng.standard_normal((G, T, P))
    v[:, :, n_rows:] = 0  # as the shrink leaves them
    v = jnp.asarray(v, dtype)
    b = jnp.asarray(rng.standard_normal((offset + G, P, max(outs))) / 4, dtype)
    got = linear_slab(x, ws, v, b, n_rows, offset, block_n=32, block_k=32, block_p=16, k_splits=splits,
                      interpret=True)
    want = linear_slab_reference(x, ws, v, b[offset:])
    for y, w in zip(got, want):
        assert y.shape == w.shape and _rel(y, w) < TOL[dtype]
    plain = linear_slab(x, ws, None, None, None, block_n=32, block_k=32, k_splits=splits, interpret=True)
    for y, w in zip(plain, linear_slab_reference(x, ws, None, None)):
        assert _rel(y, w) < TOL[dtype]


def test_bad_shapes_are_refused():
    x = jnp.zeros((4, 64), jnp.float32)
    lo = jnp.zeros((1, 4), jnp.int32)
    with pytest.raises(ValueError, match="power of two"):
        slab_shrink(x, jnp.zeros((1, 64, 64)), lo, lo, 0, block_p=24, interpret=True)
    with pytest.raises(ValueError, match="k_splits"):
        slab_shrink(x, jnp.zeros((1, 64, 64)), lo, lo, 0, block_k=32, k_splits=0, interpret=True)
    with pytest.raises(ValueError, match="does not take"):
        slab_shrink(x, jnp.zeros((1, 48, 64)), lo, lo, 0, block_k=32, interpret=True)
    with pytest.raises(ValueError, match="lo/hi"):
        slab_shrink(x, jnp.zeros((1, 64, 64)), jnp.zeros((2, 4), jnp.int32), lo, 0, block_k=32, interpret=True)
    with pytest.raises(ValueError, match="tokens"):
        linear_slab(jnp.zeros((300, 64)), (jnp.zeros((64, 64)),), None, None, None, interpret=True)
    with pytest.raises(ValueError, match="blocks of"):
        linear_slab(x, (jnp.zeros((64, 48)),), None, None, None, block_n=32, block_k=32, interpret=True)
    with pytest.raises(ValueError, match="lora_linear_slab takes"):
        lora_linear_slab(x, (jnp.zeros((64, 64)),), None, None, lo, lo, 0)  # 64 is not a multiple of block_k 128


def test_lora_linear_slab_equals_the_reference_lora_on_slots():
    """The functional op on a slab laid out from dense slots gives `x @ W + lora_reference`'s output."""
    rng = np.random.default_rng(0)
    H, outs, T = 64, (64, 32, 32), 24
    ranks = np.array([16, 4, 8, 16, 1], np.int32)
    slots = [random_slot_weights(jax.random.key(g), ranks, H, o, dtype=jnp.float32) for g, o in enumerate(outs)]
    starts = np.concatenate([[0], np.cumsum(ranks)[:-1]])
    P = 64
    a = np.zeros((3, H, P), np.float32)
    b = np.zeros((3, P, max(outs)), np.float32)
    for g, w in enumerate(slots):
        for s, (st, r) in enumerate(zip(starts, ranks)):
            a[g, :, st : st + r] = np.asarray(w.a[s, :, :r])
            b[g, st : st + r, : outs[g]] = np.asarray(w.b[s, :r])
    slot_T = rng.integers(-1, len(ranks), T).astype(np.int32)
    has = slot_T >= 0
    lo = np.where(has, starts[np.maximum(slot_T, 0)], 0).astype(np.int32)
    hi = (lo + np.where(has, ranks[np.maximum(slot_T, 0)], 0)).astype(np.int32)
    x = jnp.asarray(rng.standard_normal((T, H)), jnp.float32)
    ws = tuple(jnp.asarray(rng.standard_normal((H, o)) / 8, jnp.float32) for o in outs)
    cfg = KernelConfig(slab_block_n=32, slab_block_k=32, slab_block_p=16, interpret=True)
    assert slab_fits(T, H, outs, cfg) and not slab_fits(T, 48, outs, cfg) and not slab_fits(300, H, outs, cfg)
    assert slab_fits(T, H, outs, dataclasses.replace(cfg, slab_max_tokens=T))
    assert not slab_fits(T, H, outs, dataclasses.replace(cfg, slab_max_tokens=T - 1))
    G = len(outs)
    args = (jnp.asarray(a), jnp.asarray(b), jnp.asarray(np.tile(lo, (G, 1))), jnp.asarray(np.tile(hi, (G, 1))),
            int(ranks.sum()))
    bases = tuple(jnp.dot(x, w, precision="highest") for w in ws)
    wants = [lora_reference(y, x, slot, jnp.asarray(slot_T)) for y, slot in zip(bases, slots)]
    for got in (lora_linear_slab(x, ws, *args, config=cfg),
                lora_linear_slab(x, ws, *args, config=dataclasses.replace(cfg, slab_shrink_with_base=True)),
                add_lora_slab(bases, x, *args, config=cfg)):
        for y, want in zip(got, wants):
            assert _rel(y, want) < 1e-5


@pytest.mark.parametrize("T,rows,dtype", [(21, None, jnp.float32), (6, 128, jnp.bfloat16), (4, None, jnp.float32)])
def test_slab_from_slots_gives_the_reference_lora(T, rows, dtype):
    """Dense slots -> the batch's slab (`slab_from_slots`, ranks 1..64 mixed, unused slots, tokens with no
    adapter) -> `add_lora_slab` equals `lora_reference` on the slots; T=4: no token has an adapter."""
    from slora_jax.ops import slab_from_slots

    rng = np.random.default_rng(T)
    ranks = np.array([1, 4, 8, 16, 24, 64, 3], np.int32)
    w = random_slot_weights(jax.random.key(T), ranks, 64, 32, dtype=dtype)
    slot_T = np.full(T, -1, np.int32) if T == 4 else rng.choice([-1, 0, 2, 3, 4, 5, 6], T).astype(np.int32)
    s = slab_from_slots(w, slot_T, rows=rows, block=16)
    assert s.a.shape[2] == s.b.shape[1] == (rows or max(16, int(s.n_rows)))
    x = jnp.asarray(rng.standard_normal((T, 64)), dtype)
    y = jnp.asarray(rng.standard_normal((T, 32)), dtype)
    cfg = KernelConfig(slab_block_n=16, slab_block_k=32, slab_block_p=16, interpret=True)
    (got,) = add_lora_slab((y,), x, s.a, s.b, s.lo, s.hi, s.n_rows, config=cfg)
    want = lora_reference(y, x, w, jnp.asarray(slot_T))
    assert _rel(got, want) < TOL[dtype]
    if T == 4:
        np.testing.assert_array_equal(np.asarray(got), np.asarray(y))
    with pytest.raises(ValueError, match="multiple of block"):
        slab_from_slots(w, np.array([5, 4, 3], np.int32), rows=16, block=16)  # 91 rows do not fit in 16


@pytest.mark.parametrize("T,outs,splits,expand_splits", [(9, (64, 32, 32), 2, 2)])
def test_shrink_beside_the_base_gemm_then_the_expand(T, outs, splits, expand_splits):
    """`linear_shrink_slab` (the GEMM's and the shrink's programs in one launch), then `slab_expand`
    (`y += v @ B` in place), give what `slab_shrink` and `linear_slab` give."""
    from pallas_kernels.lora_slab import linear_shrink_slab, slab_expand

    rng = np.random.default_rng(T)
    H, P, G, n_rows = 128, 64, len(outs), 48
    x = jnp.asarray(rng.standard_normal((T, H)), jnp.float32)
    ws = tuple(jnp.asarray(rng.standard_normal((H, o)) / 8, jnp.float32) for o in outs)
    a = jnp.asarray(rng.standard_normal((G + 1, H, P)) / np.sqrt(H), jnp.float32)
    b = jnp.asarray(rng.standard_normal((G + 1, P, max(outs))) / 4, jnp.float32)
    lo, hi = _ranges(rng, G, T, n_rows)
    blocks = dict(block_n=32, block_p=16, interpret=True)
    ys, v = linear_shrink_slab(x, ws, a, lo, hi, n_rows, 1, block_k=32, shrink_splits=splits, **blocks)
    # a shared counter workspace: the same outputs (the GEMM's counters, then the shrink's); too small refused
    ys_c, v_c = linear_shrink_slab(x, ws, a, lo, hi, n_rows, 1, block_k=32, shrink_splits=splits, **blocks,
                                   counters=jnp.zeros((64,), jnp.int32))
    assert all(np.array_equal(p, q) for p, q in zip((*ys, v), (*ys_c, v_c)))
    with pytest.raises(ValueError, match="counters"):
        linear_shrink_slab(x, ws, a, lo, hi, n_rows, 1, block_k=32, shrink_splits=splits, **blocks,
                           counters=jnp.zeros((2,), jnp.int32))
    want_v = slab_shrink(x, a, lo, hi, n_rows, 1, block_p=16, block_k=32, k_splits=splits, interpret=True)
    assert _rel(v, want_v) < 1e-6 and not np.asarray(v[:, :, n_rows:]).any()
    for y, w in zip(ys, linear_slab_reference(x, ws, None, None)):
        assert _rel(y, w) < 1e-5
    got = jax.jit(lambda ys, v: slab_expand(ys, v, b, n_rows, 1, k_splits=expand_splits, **blocks),
                  donate_argnums=0)(ys, v)
    for y, w in zip(got, linear_slab_reference(x, ws, want_v, b[1:])):
        assert _rel(y, w) < 1e-5

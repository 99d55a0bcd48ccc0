"""The fused base projection + gathered LoRA kernel (`pallas_kernels.lora_linear`), interpret mode on CPU."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.lora_linear import lora_linear_paged_group, lora_linear_reference, paged_row_table
from pallas_kernels.sgmv_paged import sgmv_shrink_paged_group
from slora_jax.ops import build_lora_meta, random_slot_weights
from test_lora_kernels import GROUP_RANKS, H_IN, paged_group_from_slots
from test_lora_ops import make_slots

OUTS = (64, 32, 32)  # q, k, v of a GQA model: k and v narrower


def _tables(pws, r_block):
    a = jnp.stack([paged_row_table(pw.pages, pw.rank, pw.a_row, pw.h_in // pw.rows.shape[1],
                                   rows_per_page=pw.rows_per_page, r_block=r_block) for pw in pws])
    n_out = max(pw.h_out for pw in pws) // pws[0].rows.shape[1]
    b = jnp.stack([paged_row_table(pw.pages, pw.rank, pw.b_row, n_out, rows_per_page=pw.rows_per_page,
                                   r_block=r_block).transpose(1, 0, 2) for pw in pws])
    return a, b


def run(T, layout, ranks_GxS, dtype, seed, *, block_m=16, rows_per_page=128, outs=OUTS, lora=True,
        shrink_launch_k_steps=None, **launch):
    """The kernel against the reference on random pages; the worst per-output error. `shrink_launch_k_steps`:
    the shrink as its own launch first (the split pair's, with that many K chunks a program), its partials
    passed in."""
    rng = np.random.default_rng(seed)
    ws = [random_slot_weights(jax.random.key(seed + g), ranks, H_IN, o, dtype=dtype, max_rank=128)
          for g, (ranks, o) in enumerate(zip(ranks_GxS, outs))]
    pws = paged_group_from_slots(ws, 16, rows_per_page, rng)
    slot_T = make_slots(layout, T, len(ranks_GxS[0]), rng)
    meta = build_lora_meta(slot_T, block_m=block_m)
    x = jnp.asarray(rng.standard_normal((T, H_IN)), dtype)
    w_IxO = tuple(jnp.asarray(rng.standard_normal((H_IN, o)) / 8, dtype) for o in outs)
    r_block = 128
    a_tab, b_tab = _tables(pws, r_block)
    rank = jnp.stack([pw.rank for pw in pws])
    stack = lambda field: jnp.stack([getattr(pw, field) for pw in pws])  # noqa: E731
    tiles = (meta.perm, meta.tile_start, meta.tile_end, meta.tile_slot)
    vpart = None
    if shrink_launch_k_steps is not None:
        vpart = sgmv_shrink_paged_group(x, pws[0].rows, pws[0].pages, rank, stack("a_row"), *tiles,
                                        rows_per_page=rows_per_page, r_block=r_block, block_m=block_m,
                                        k_steps=shrink_launch_k_steps, interpret=True)
    f = jax.jit(functools.partial(lora_linear_paged_group, block_m=block_m, lora=lora, interpret=True, **launch))
    got = f(x, w_IxO, pws[0].rows, rank, a_tab, b_tab, jnp.asarray(slot_T, jnp.int32), *tiles, None, vpart)
    ref = functools.partial(lora_linear_reference, x, w_IxO, pws[0].rows, pws[0].pages, a_row_GxS=stack("a_row"),
                            b_row_GxS=stack("b_row"), slot_T=jnp.asarray(slot_T), rows_per_page=rows_per_page,
                            r_max=r_block)
    base = ref(jnp.zeros_like(rank))
    want = ref(rank) if lora else base
    errs = []
    for out, w, b in zip(got, want, base):
        assert out.shape == w.shape and out.dtype == w.dtype
        f32 = lambda a: a.astype(jnp.float32)  # noqa: E731
        # the delta's error (the base product's when lora=False, or where no token's adapter targets the
        # projection), so a wrong LoRA cannot hide under the base
        delta = float(jnp.linalg.norm(f32(w) - f32(b))) if lora else 0.0
        errs.append(float(jnp.linalg.norm(f32(out) - f32(w))) / (delta or float(jnp.linalg.norm(f32(w)))))
    return max(errs)


@pytest.mark.parametrize("T,layout,dtype,rows_per_page", [
    (1, "distinct", jnp.float32, 128),
    (37, "mixed_none", jnp.bfloat16, 24),  # pages smaller than a rank block
    (64, "skewed", jnp.float32, 128),
])
def test_matches_reference(T, layout, dtype, rows_per_page):
    err = run(T, layout, GROUP_RANKS, dtype, seed=T, rows_per_page=rows_per_page, block_n=16, block_k=16)
    assert err < (1e-5 if dtype == jnp.float32 else 1e-2), err


def test_random_ranks_layouts_and_blocks():
    """Ranks 1-128 mixed across projections (0: not targeted), every layout, both dtypes, block shapes."""
    rng = np.random.default_rng(7)
    for i, (layout, dtype, bn, bk) in enumerate([("distinct", jnp.float32, 16, 32), ("identical", jnp.bfloat16, 16, 16),
                                                 ("all_none", jnp.float32, 16, 64), ("uniform", jnp.float32, 16, 16)]):
        ranks = rng.choice([0, 1, 4, 8, 16, 24, 64, 128], size=GROUP_RANKS.shape)
        err = run(24 + i, layout, ranks, dtype, seed=100 + i, block_n=bn, block_k=bk, shrink_unroll=1 + i % 3,
                  expand_unroll=(1, 2, 4, 8)[i], shrink_k_steps=(None, 3, 1, 2)[i])  # 7 adapters: 8 pads the
        # expand's last step; 3 K chunks a shrink program leave the last split short
        assert err < (1e-5 if dtype == jnp.float32 else 1e-2), (layout, err)


@pytest.mark.parametrize("k_steps", [1, 3])
def test_shrink_in_its_own_launch(k_steps):
    """`vpart`: the split pair's shrink first (K splits of 1 or 3 chunks), this launch only the matmul and the
    expand over the given partials."""
    err = run(37, "skewed", GROUP_RANKS, jnp.float32, seed=11, shrink_launch_k_steps=k_steps, block_n=16, block_k=16)
    assert err < 1e-5, err


def test_base_only():
    """`lora=False` is the plain matmul (the Pallas GEMM the fused kernel is built on)."""
    assert run(37, "distinct", GROUP_RANKS, jnp.float32, seed=3, lora=False, block_n=16, block_k=16) < 1e-6


def test_row_offset_moves_every_read():
    """Tables of layer 0 plus `row_offset` read layer l's rows (the engine's pool holds layers one after another)."""
    rng = np.random.default_rng(0)
    T, outs = 8, (32,)
    w = random_slot_weights(jax.random.key(0), np.array([8, 16, 0]), H_IN, 32, dtype=jnp.float32)
    (pw,) = paged_group_from_slots([w], 16, 24, rng)
    n_rows = pw.rows.shape[0]
    rows = jnp.concatenate([jnp.asarray(rng.standard_normal(pw.rows.shape), jnp.float32), pw.rows])  # layer 1 after 0
    slot_T = make_slots("distinct", T, 3, rng)
    meta = build_lora_meta(slot_T)
    x = jnp.asarray(rng.standard_normal((T, H_IN)), jnp.float32)
    W = (jnp.asarray(rng.standard_normal((H_IN, 32)), jnp.float32),)
    a_tab, b_tab = _tables((pw,), 16)
    got = lora_linear_paged_group(x, W, rows, pw.rank[None], a_tab, b_tab, jnp.asarray(slot_T, jnp.int32), meta.perm,
                                  meta.tile_start, meta.tile_end, meta.tile_slot, jnp.int32(n_rows), block_m=16,
                                  block_n=16, block_k=16, interpret=True)
    (want,) = lora_linear_reference(x, W, pw.rows, pw.pages, pw.rank[None], pw.a_row[None], pw.b_row[None],
                                    jnp.asarray(slot_T), rows_per_page=24, r_max=16)
    np.testing.assert_allclose(got[0], want, rtol=1e-5, atol=1e-5)
    del outs


def test_bad_input_raises():
    x = jnp.zeros((300, 64), jnp.bfloat16)
    with pytest.raises(ValueError, match="tokens"):
        lora_linear_paged_group(x, (jnp.zeros((64, 64), jnp.bfloat16),), jnp.zeros((8, 16), jnp.bfloat16),
                                jnp.zeros((1, 1), jnp.int32), jnp.zeros((1, 1, 4, 16), jnp.int32),
                                jnp.zeros((1, 1, 4, 16), jnp.int32), jnp.zeros((300,), jnp.int32),
                                *(jnp.zeros((300,), jnp.int32),) * 4, block_m=16)
    with pytest.raises(ValueError, match="block_n"):
        lora_linear_paged_group(x[:8], (jnp.zeros((64, 64), jnp.bfloat16),), jnp.zeros((8, 16), jnp.bfloat16),
                                jnp.zeros((1, 1), jnp.int32), jnp.zeros((1, 1, 4, 16), jnp.int32),
                                jnp.zeros((1, 1, 4, 16), jnp.int32), jnp.zeros((8,), jnp.int32),
                                *(jnp.zeros((8,), jnp.int32),) * 4, block_m=16, block_n=24)


def test_lowering_keeps_the_wait(monkeypatch, capsys):
    """The matmul programs' wait survives into the Triton module as a loop of atomics (interpret mode cannot
    see a missing wait: it runs programs in order)."""
    import pallas_kernels.lora_linear as ll

    monkeypatch.setattr(ll.pl, "pallas_call", functools.partial(ll.pl.pallas_call, debug=True))
    T, H = 64, 256
    rng = np.random.default_rng(0)
    ws = [random_slot_weights(jax.random.key(g), [8, 16, 64, 24], H, o) for g, o in enumerate((256, 128, 128))]
    pws = paged_group_from_slots(ws, 64, 96, rng)
    meta = build_lora_meta(np.arange(T) % 5 - 1)
    a, b = _tables(pws, 64)
    f = jax.jit(functools.partial(lora_linear_paged_group, block_m=16, interpret=False, block_n=64, block_k=64))
    W = tuple(jnp.zeros((H, o), jnp.bfloat16) for o in (256, 128, 128))
    f.trace(jnp.zeros((T, H), jnp.bfloat16), W, pws[0].rows, jnp.stack([p.rank for p in pws]), a, b, meta.slot,
            meta.perm, meta.tile_start, meta.tile_end, meta.tile_slot).lower(lowering_platforms=("cuda",))
    module = capsys.readouterr().out.split("The Triton module for pallas_call")[-1]
    assert module.count("scf.while") == 3  # one poll loop per projection's matmul programs
    loop = module[module.index("scf.while"):]
    body = loop[loop.index("} do {") : loop.index('} "while:"')]
    assert "tt.atomic_rmw add, acq_rel, gpu" in body
    assert module.count("scf.for") >= 1 + 2 * 3  # the shrink's K loop; each projection's K and adapter loops

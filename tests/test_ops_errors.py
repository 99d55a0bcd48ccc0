"""Bad input to the public LoRA ops raises a clear error up front; valid input under jit still runs.

One test per review finding (out-of-range slot ids, widths, token count, ranks, slot dtype, 3-D x,
gradients through Pallas, T = 0, config type, x's dtype); each checks the error type and that the
message names the argument. Tiny shapes: the Pallas kernels run in interpret mode on CPU.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from slora_jax.ops import (
    IMPLS,
    KernelConfig,
    PagedWeights,
    add_lora,
    add_lora_group,
    build_lora_meta,
    build_lora_meta_jnp,
    expand,
    expand_group,
    lora_reference,
    random_slot_weights,
    shrink,
    shrink_group,
)

T, S, H_IN, H_OUT = 8, 3, 32, 16
RANKS = (4, 0, 16)  # R = 16
SLOT_T = np.array([0, -1, 2, 2, 1, 0, -1, 2], np.int32)
BASELINES = [i for i in IMPLS if i != "pallas"]


def case(dtype=jnp.float32, h_out=H_OUT, key=0):
    w = random_slot_weights(jax.random.key(key), RANKS, H_IN, h_out, dtype=dtype)
    rng = np.random.default_rng(key)
    x_TxI = jnp.asarray(rng.standard_normal((T, H_IN)), dtype)
    y_TxO = jnp.asarray(rng.standard_normal((T, h_out)), dtype)
    return y_TxO, x_TxI, w


def paged(*ws):
    return PagedWeights.group_from_slots(ws, chunk=16, rows_per_page=8)


def with_slots(slot_T):
    return build_lora_meta(np.asarray(slot_T, np.int32))


# 1. slot ids at or past S


def test_out_of_range_slot_ids_raise_in_every_op():
    y, x, w = case()
    _, _, w2 = case(h_out=32, key=1)
    y2 = jnp.zeros((T, 32), jnp.float32)
    pw, pw2 = paged(w, w2)
    bad = SLOT_T.copy()
    bad[[1, 4]] = [7, 3]
    meta = with_slots(bad)
    match = r"meta's slot ids \[3, 7\] are out of range: the weights hold S=3"
    for impl in IMPLS:
        for ww in (w, pw):
            with pytest.raises(ValueError, match=match):
                add_lora(y, x, ww, meta, impl=impl)
    v = jnp.zeros((T, 16), jnp.float32)
    for impl in ("pallas", "reference"):
        for ww in (w, pw):
            with pytest.raises(ValueError, match=match):
                shrink(x, ww, meta, impl=impl)
            with pytest.raises(ValueError, match=match):
                expand(y, v, ww, meta, impl=impl)
        with pytest.raises(ValueError, match=match):
            add_lora_group((y, y2), x, (pw, pw2), meta, impl=impl)
        with pytest.raises(ValueError, match=match):
            shrink_group(x, (pw, pw2), meta, impl=impl)
        with pytest.raises(ValueError, match=match):
            expand_group((y, y2), (v, v), (pw, pw2), meta, impl=impl)
    with pytest.raises(ValueError, match=match):  # jnp metadata outside jit is concrete too
        add_lora(y, x, w, build_lora_meta_jnp(jnp.asarray(bad)), impl="reference")
    # Any negative id means no adapter, in every impl.
    neg = SLOT_T.copy()
    neg[1] = -5
    ref = lora_reference(y, x, w, jnp.asarray(SLOT_T))
    for impl in IMPLS:
        np.testing.assert_allclose(add_lora(y, x, w, with_slots(neg), impl=impl), ref, rtol=1e-5, atol=1e-5)


# 2. x and y widths, and 2-D


@pytest.mark.parametrize("weights", ["dense", "paged"])
def test_x_and_y_must_match_the_weights(weights):
    y, x, w = case()
    if weights == "paged":
        (w,) = paged(w)
    meta = with_slots(SLOT_T)
    for impl in IMPLS:
        for bad_x in (x[:, :16], jnp.concatenate([x, x], 1), x[0]):
            with pytest.raises(ValueError, match=r"x must be \[T, H_in\] = \[T, 32\]"):
                add_lora(y, bad_x, w, meta, impl=impl)
        for bad_y in (y[:, :8], jnp.concatenate([y, y], 1)):
            with pytest.raises(ValueError, match=r"y must be \[8, H_out\] = \[8, 16\]"):
                add_lora(bad_y, x, w, meta, impl=impl)
    with pytest.raises(ValueError, match=r"x must be \[T, H_in\]"):
        shrink(x[:, :16], w, meta)
    with pytest.raises(ValueError, match=r"y must be \[T, H_out\]"):
        expand(y[:, :8], jnp.zeros((T, 16)), w, meta)
    with pytest.raises(ValueError, match=r"v must be \[T, R\] = \[8, 16\]"):
        expand(y, jnp.zeros((T, 8)), w, meta)


# 3. metadata for another token count


def test_meta_must_be_built_for_these_tokens():
    y, x, w = case()
    meta16 = with_slots(np.tile(SLOT_T, 2))
    for impl in IMPLS:
        with pytest.raises(ValueError, match="meta was built for 16 tokens, x and y have T=8 rows"):
            add_lora(y, x, w, meta16, impl=impl)
    with pytest.raises(ValueError, match="meta was built for 16 tokens"):
        shrink(x, w, meta16)
    with pytest.raises(TypeError, match="meta must be a LoraMeta"):
        add_lora(y, x, w, SLOT_T, impl="reference")


# 4. ranks against A and B


def test_ranks_must_agree_with_the_weights():
    y, x, w = case()
    meta = with_slots(SLOT_T)
    for impl in ("pallas", "reference"):
        with pytest.raises(ValueError, match="SlotWeights.ranks has 2 entries but a"):
            add_lora(y, x, w._replace(ranks=w.ranks[:2]), meta, impl=impl)
        with pytest.raises(ValueError, match=r"SlotWeights.ranks must be in 0..16 .*\[40\]"):
            add_lora(y, x, w._replace(ranks=jnp.array([4, 0, 40], jnp.int32)), meta, impl=impl)
        with pytest.raises(ValueError, match="SlotWeights.a .* and .b .* must have one R"):
            add_lora(y, x, w._replace(b=w.b[:, :8]), meta, impl=impl)
        with pytest.raises(TypeError, match="SlotWeights.ranks must be integer"):
            add_lora(y, x, w._replace(ranks=w.ranks.astype(jnp.float32)), meta, impl=impl)
    (pw,) = paged(w)
    with pytest.raises(ValueError, match=r"PagedWeights.rank must be in 0..16"):
        add_lora(y, x, dataclasses.replace(pw, rank=jnp.array([4, 0, 17], jnp.int32)), meta)
    # A rank-split A (tensor parallelism: fewer rank columns than B) is valid for the halves.
    local = w._replace(a=w.a[:, :, :8], ranks=jnp.minimum(w.ranks, 8))
    v = shrink(x, local, meta, impl="reference")
    assert v.shape == (T, 8)
    expand(y, jnp.pad(v, ((0, 0), (0, 8))), w._replace(a=w.a[:, :, :8]), meta, impl="reference")


# 5. slot ids that are not integers, or not 1-D


@pytest.mark.parametrize("build", [build_lora_meta, build_lora_meta_jnp])
def test_meta_builders_reject_float_and_non_1d_slots(build):
    with pytest.raises(TypeError, match=r"slot_T must hold integer slot ids .* got dtype float32"):
        build(np.array([-0.5, 1.9, 2.0], np.float32))
    with pytest.raises(ValueError, match=r"slot_T must be 1-D \[T\] .* got shape \(2, 4\)"):
        build(SLOT_T.reshape(2, 4))
    assert build(np.array([], np.float32)).slot.shape == (0,)  # no ids: nothing to truncate


# 6. impl="loop" with a 3-D x


def test_loop_rejects_3d_x():
    y, x, w = case()
    with pytest.raises(ValueError, match=r"x must be \[T, H_in\] .* got shape \(1, 8, 32\)"):
        add_lora(y[None], x[None], w, with_slots(SLOT_T), impl="loop")


# 7. gradients through the Pallas kernels


@pytest.mark.parametrize("weights", ["dense", "paged"])
def test_grad_through_pallas_says_forward_only(weights):
    y, x, w = case()
    (pw,) = paged(w)
    ww = w if weights == "dense" else pw
    meta = with_slots(SLOT_T)
    match = "impl='pallas' is forward-only.*'reference'"
    with pytest.raises(NotImplementedError, match=match):
        jax.grad(lambda x: add_lora(y, x, ww, meta).sum())(x)
    with pytest.raises(NotImplementedError, match=match):
        jax.grad(lambda y: add_lora(y, x, ww, meta).sum())(y)
    with pytest.raises(NotImplementedError, match=match):
        jax.grad(lambda x: shrink(x, ww, meta).sum())(x)
    with pytest.raises(NotImplementedError, match=match):
        jax.grad(lambda v: expand(y, v, ww, meta).sum())(jnp.zeros((T, 16)))
    if weights == "dense":
        with pytest.raises(NotImplementedError, match=match):
            jax.grad(lambda a: add_lora(y, x, w._replace(a=a), meta).sum())(w.a)
    else:
        with pytest.raises(NotImplementedError, match=match):
            jax.grad(lambda x: add_lora_group((y,), x, (pw,), meta)[0].sum())(x)
    g = jax.grad(lambda x: add_lora(y, x, ww, meta, impl="reference").sum())(x)
    assert g.shape == x.shape


# 8. no tokens


def test_zero_tokens_return_y_in_every_impl():
    _, _, w = case()
    (pw,) = paged(w)
    y0, x0 = jnp.zeros((0, H_OUT)), jnp.zeros((0, H_IN))
    meta0 = build_lora_meta(np.zeros(0, np.int32))
    meta0_j = build_lora_meta_jnp(jnp.zeros(0, jnp.int32))
    for f in ("slot", "perm", "seg_start", "seg_len", "seg_slot", "tile_start", "tile_end", "tile_slot"):
        np.testing.assert_array_equal(getattr(meta0, f), getattr(meta0_j, f), err_msg=f)
    for impl in IMPLS:
        for ww in (w, pw):
            assert add_lora(y0, x0, ww, meta0, impl=impl).shape == (0, H_OUT)
    assert jax.jit(lambda y, x, s: add_lora(y, x, w, build_lora_meta_jnp(s)))(y0, x0, jnp.zeros(0, jnp.int32)).shape == (
        0, H_OUT)
    for ww, r in ((w, 16), (pw, pw.r_max)):
        assert shrink(x0, ww, meta0).shape == (0, r)
        assert expand(y0, jnp.zeros((0, r)), ww, meta0).shape == (0, H_OUT)
    assert add_lora_group((y0, y0), x0, (pw, pw), meta0)[1].shape == (0, H_OUT)
    assert [v.shape for v in shrink_group(x0, (pw, pw), meta0)] == [(0, pw.r_max)] * 2


# 9. config of the wrong type


def test_config_must_be_a_kernel_config():
    y, x, w = case()
    with pytest.raises(TypeError, match=r"config must be a KernelConfig \(e.g. KernelConfig\(fused=True\)\)"):
        add_lora(y, x, w, with_slots(SLOT_T), config={"fused": True})
    with pytest.raises(TypeError, match="config must be a KernelConfig"):
        shrink(x, w, with_slots(SLOT_T), config={"fused": True})


# 10. x's dtype


def test_pallas_needs_x_in_the_weights_dtype():
    y, x, w = case(dtype=jnp.bfloat16)
    meta = with_slots(SLOT_T)
    with pytest.raises(TypeError, match="impl='pallas' needs x in the weights' dtype bfloat16, got x float32"):
        add_lora(y, x.astype(jnp.float32), w, meta)
    with pytest.raises(TypeError, match="x must be floating, got dtype int32"):
        add_lora(y, x.astype(jnp.int32), w, meta, impl="reference")
    # The jnp impls promote; y's dtype is free everywhere.
    y32, x32 = y.astype(jnp.float32), x.astype(jnp.float32)
    ref = lora_reference(y32, x32, w, jnp.asarray(SLOT_T))
    np.testing.assert_allclose(add_lora(y32, x32, w, meta, impl="gather_bmm"), ref, rtol=1e-5, atol=1e-5)
    out = add_lora(y32, x, w, meta)
    assert out.dtype == jnp.float32


# Valid calls under jit: every value is a tracer, no check trips and none runs.


@pytest.mark.parametrize("impl", [i for i in IMPLS if i != "loop"])
def test_valid_calls_under_jit_with_traced_meta_and_weights(impl):
    y, x, w = case()
    ref = lora_reference(y, x, w, jnp.asarray(SLOT_T))
    step = jax.jit(lambda y, x, w, s: add_lora(y, x, w, build_lora_meta_jnp(s), impl=impl))
    np.testing.assert_allclose(step(y, x, w, jnp.asarray(SLOT_T)), ref, rtol=1e-5, atol=1e-5)
    if impl == "pallas":
        (pw,) = paged(w)
        meta = with_slots(SLOT_T)
        out = jax.jit(lambda y, x, w, m: add_lora(y, x, w, m, config=KernelConfig()))(y, x, pw, meta)
        np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)
        halves = jax.jit(lambda y, x, ws, m: expand_group((y, y), shrink_group(x, ws, m), ws, m))
        for out in halves(y, x, (pw, pw), meta):
            np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)


def test_value_checks_skip_on_tracers():
    """Out-of-range ids and ranks are not checked under jit (they would need a device op and a host sync)."""
    y, x, w = case()
    bad = SLOT_T.copy()
    bad[0] = 7
    f = jax.jit(lambda w, m: add_lora(y, x, w, m))
    f.trace(w._replace(ranks=jnp.array([4, 0, 40], jnp.int32)), with_slots(bad)).lower()
    jax.eval_shape(lambda s: add_lora(y, x, w, build_lora_meta_jnp(s), impl="reference"), jnp.asarray(bad))


# 13. no segment for the jittable builder


@pytest.mark.parametrize("max_segments", [0, -1])
def test_jittable_builder_needs_one_segment(max_segments):
    with pytest.raises(ValueError, match="max_segments"):
        build_lora_meta_jnp(jnp.asarray(SLOT_T), max_segments=max_segments)
    with pytest.raises(ValueError, match="max_segments"):
        jax.jit(lambda s: build_lora_meta_jnp(s, max_segments=max_segments))(jnp.asarray(SLOT_T))
    meta = build_lora_meta_jnp(jnp.full((T,), -1, jnp.int32), max_segments=1)  # one segment is enough
    assert int(meta.num_segments) == 0


# 14. the slab ops: operands that the kernels would read past or mix


def test_slab_ops_check_their_operands():
    from slora_jax.ops import add_lora_slab, lora_linear_slab, slab_from_slots

    cfg = KernelConfig(interpret=True, slab_block_n=16, slab_block_k=32, slab_block_p=16)
    w = random_slot_weights(jax.random.key(0), (4, 8, 16), 64, 32, dtype=jnp.float32)
    x, y = jnp.ones((4, 64)), jnp.zeros((4, 32))
    s = slab_from_slots(w, np.array([0, 2, -1, 1], np.int32), block=16)
    args = (s.a, s.b, s.lo, s.hi, s.n_rows)
    with pytest.raises(ValueError, match=r"ys\[0\]"):
        add_lora_slab((jnp.zeros((3, 32)),), x, *args, config=cfg)
    with pytest.raises(TypeError, match="one dtype"):
        add_lora_slab((y,), x.astype(jnp.bfloat16), *args, config=cfg)
    with pytest.raises(ValueError, match=r"x must be \[T, H_in\]"):
        add_lora_slab((y,), x[None], *args, config=cfg)
    for call in (lambda off: add_lora_slab((y,), x, *args, off, config=cfg),
                 lambda off: lora_linear_slab(x, (jnp.ones((64, 32)),), *args, off, config=cfg)):
        with pytest.raises(ValueError, match="offset=1"):  # the slabs hold one projection
            call(1)
        call(0)
    with pytest.raises(ValueError, match="offset=0 with 2 projections"):
        add_lora_slab((y, y), x, *args, config=cfg)
    with pytest.raises(ValueError, match="out of range"):
        slab_from_slots(w, np.array([5, 0], np.int32), block=16)
    with pytest.raises(TypeError, match="integer"):
        slab_from_slots(w, np.array([0.5, 0.0]), block=16)
    # a traced offset skips the range check (no host sync in a jitted step)
    got = jax.jit(lambda off: add_lora_slab((y,), x, *args, off, config=cfg)[0])(jnp.int32(0))
    np.testing.assert_allclose(got, lora_reference(y, x, w, jnp.array([0, 2, -1, 1])), rtol=1e-4, atol=1e-4)


def test_lora_linear_group_checks_the_base_weights():
    from slora_jax.ops import lora_linear_group

    y, x, w = case()
    pw = paged(w)
    meta = with_slots(SLOT_T)
    cfg = KernelConfig(interpret=True, linear_max_tokens=64, linear_block_n=16, linear_block_k=16)
    with pytest.raises(ValueError, match=r"ws_IxO\[0\]"):
        lora_linear_group(x, (jnp.ones((H_IN, 2 * H_OUT)),), pw, meta, config=cfg)
    with pytest.raises(ValueError, match="tokens"):
        lora_linear_group(x[:5], (jnp.ones((H_IN, H_OUT)),), pw, meta, config=cfg)
    (got,) = lora_linear_group(x, (jnp.ones((H_IN, H_OUT)),), pw, meta, config=cfg)
    want = lora_reference(x @ jnp.ones((H_IN, H_OUT)), x, w, jnp.asarray(SLOT_T))
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_segments_past_max_segments_get_no_lora_in_every_impl():
    """The jittable builder drops slots past `max_segments` (it cannot raise under jit); every impl then
    leaves those tokens' rows alone, the per-token ones (gather_bmm, onehot, ...) as the segment ones."""
    y, x, w = case()
    meta = build_lora_meta_jnp(jnp.asarray(SLOT_T), max_segments=2)  # slots 0, 1 kept; 2 dropped
    assert np.asarray(meta.slot).tolist() == [0, -1, -1, -1, 1, 0, -1, -1]
    want = lora_reference(y, x, w, meta.slot)
    cfg = KernelConfig(interpret=True)
    for impl in IMPLS:
        np.testing.assert_allclose(add_lora(y, x, w, meta, impl=impl, config=cfg), want, rtol=2e-3, atol=2e-3,
                                   err_msg=impl)

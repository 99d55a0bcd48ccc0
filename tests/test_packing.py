"""`engine.packing`: a pytree's numpy leaves through one int32 buffer and back, under jit."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from slora_jax.engine.packing import pack, unpack

DTYPES = [np.int32, np.uint32, np.float32, np.bool_]


def _leaf(rng, dtype, shape):
    if dtype == np.bool_:
        return rng.random(shape) < 0.5
    if dtype == np.float32:
        return rng.standard_normal(shape).astype(np.float32)
    info = np.iinfo(dtype)
    return rng.integers(info.min, info.max, shape, dtype=np.int64).astype(dtype)


@settings(max_examples=15, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(DTYPES), st.lists(st.integers(0, 4), max_size=3)), min_size=1,
                max_size=6), st.integers(0, 2**31 - 1))
def test_round_trip_under_jit(leaves, seed):
    rng = np.random.default_rng(seed)
    tree = {f"x{i}": _leaf(rng, d, tuple(s)) for i, (d, s) in enumerate(leaves)}
    tree["nested"] = (np.int32(7), None, jnp.arange(3.0))  # a scalar, an empty node, a device leaf
    buf, dev, spec = pack(tree)
    assert buf.dtype == np.int32 and buf.shape == (spec.size,) and len(dev) == 1
    out = jax.jit(unpack, static_argnums=2)(buf, dev, spec)
    assert jax.tree_util.tree_structure(out) == jax.tree_util.tree_structure(tree)
    for got, want in zip(jax.tree_util.tree_leaves(out), jax.tree_util.tree_leaves(tree)):
        assert got.dtype == np.asarray(want).dtype and got.shape == np.shape(want)
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))  # bit-exact, NaN-free inputs


def test_unpackable_leaf_is_refused():
    with pytest.raises(TypeError, match="float64"):
        pack({"x": np.zeros(3, np.float64)})

"""The LoRA partitions of `parallel.lora` alone: one projection over 4 host devices against
`lora_reference`, heterogeneous ranks (0, 3, 5, 7, 16 at R = 16, so rank-3 and rank-5 slots
span only some devices' rank columns), tokens without adapters, fp32 and bf16."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from slora_jax.compat import auto_mesh_1d, shard_map
from slora_jax.ops.lora import lora_reference, random_slot_weights
from slora_jax.parallel import LORA_STRATEGIES, TP_AXIS
from slora_jax.parallel.lora import column_parallel_lora, row_parallel_lora
from slora_jax.parallel.sharding import lora_spec

TP = 4
RANKS = [3, 0, 16, 7, 5]
T, H_IN, H_OUT = 12, 32, 24


def reference_and_inputs(dtype, seed=0):
    kx, kw, ky = jax.random.split(jax.random.key(seed), 3)
    w = random_slot_weights(kw, RANKS, H_IN, H_OUT, dtype=dtype)  # R = 16
    x_TxI = jax.random.normal(kx, (T, H_IN), jnp.float32).astype(dtype)
    y_TxO = jax.random.normal(ky, (T, H_OUT), jnp.float32).astype(dtype)
    slot_T = jnp.asarray(np.random.default_rng(seed).integers(-1, len(RANKS), T), jnp.int32)
    return x_TxI, y_TxO, w, slot_T, jax.jit(lora_reference)(y_TxO, x_TxI, w, slot_T)


def run_sharded(kind: str, strategy: str, x_TxI, y_TxO, w, slot_T):
    """The projection as a TP layer runs it: base output sliced (column) or split into partial
    sums (row, the partial base matmul emulated as y/tp on every device)."""
    mesh = auto_mesh_1d(jax.devices()[:TP], TP_AXIS)
    specs = lora_spec("q" if kind == "column" else "o", strategy)
    w_layer = jax.tree.map(lambda s: P(*s[1:]), specs, is_leaf=lambda s: isinstance(s, P))  # drop the [L] axis
    if kind == "column":
        f = lambda y, x, w, s: column_parallel_lora(y, x, w, s, strategy)
        in_specs = (P(None, TP_AXIS), P(), w_layer, P())
        out_specs = P(None, TP_AXIS)
    else:
        f = lambda y, x, w, s: row_parallel_lora(y / TP, x, w, s, strategy)
        in_specs = (P(), P(None, TP_AXIS), w_layer, P())
        out_specs = P()
    return jax.jit(shard_map(f, mesh=mesh, in_specs=in_specs, out_specs=out_specs))(y_TxO, x_TxI, w, slot_T)


@pytest.mark.parametrize("strategy", LORA_STRATEGIES)
@pytest.mark.parametrize("kind", ["column", "row"])
@pytest.mark.parametrize("dtype, tol", [(jnp.float32, 1e-6), (jnp.bfloat16, 1e-2)])
def test_partition_equals_reference(kind, strategy, dtype, tol):
    x, y, w, slot, ref = reference_and_inputs(dtype)
    if kind == "row":  # the emulated partial sums y/tp must add back to y exactly
        y = y.astype(jnp.float32)
        ref = jax.jit(lora_reference)(y, x, w, slot)
    out = run_sharded(kind, strategy, x, y, w, slot)
    ref, out = np.asarray(ref, np.float64), np.asarray(out, np.float64)
    base = np.asarray(y, np.float64)
    assert np.linalg.norm(ref - base) > 0.1 * np.linalg.norm(base)  # the LoRA term matters
    assert np.linalg.norm(out - ref) / np.linalg.norm(ref) < tol
    no_adapter = np.asarray(slot) < 0
    assert no_adapter.any()
    np.testing.assert_allclose(out[no_adapter], base[no_adapter], rtol=1e-6)

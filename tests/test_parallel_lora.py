"""The LoRA partitions of `parallel.lora` alone: one projection over 4 host devices against
`lora_reference`, heterogeneous ranks (0, 3, 5, 7, 16 at R = 16, so rank-3 and rank-5 slots
span only some devices' rank columns), tokens without adapters, fp32 and bf16, jnp and the
Pallas SGMV kernels."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from slora_jax.compat import auto_mesh_1d, shard_map
from slora_jax.ops.lora import build_lora_meta, lora_reference, random_slot_weights
from slora_jax.parallel import LORA_STRATEGIES, TP_AXIS
from slora_jax.parallel.lora import GatheredLora, column_parallel_lora, row_parallel_lora
from slora_jax.parallel.sharding import lora_spec

TP = 4
RANKS = [3, 0, 16, 7, 5]
T, H_IN, H_OUT = 12, 64, 64  # H_in/tp, H_out/tp: the kernels take multiples of 16


def reference_and_inputs(dtype, seed=0):
    kx, kw, ky = jax.random.split(jax.random.key(seed), 3)
    w = random_slot_weights(kw, RANKS, H_IN, H_OUT, dtype=dtype)  # R = 16
    x_TxI = jax.random.normal(kx, (T, H_IN), jnp.float32).astype(dtype)
    y_TxO = jax.random.normal(ky, (T, H_OUT), jnp.float32).astype(dtype)
    slot_T = jnp.asarray(np.random.default_rng(seed).integers(-1, len(RANKS), T), jnp.int32)
    return x_TxI, y_TxO, w, slot_T, jax.jit(lora_reference)(y_TxO, x_TxI, w, slot_T)


def run_sharded(kind: str, strategy: str, x_TxI, y_TxO, w, slot_T, impl: str = "reference"):
    """The projection as a TP layer runs it: base output sliced (column) or split into partial
    sums (row, the partial base matmul emulated as y/tp on every device)."""
    mesh = auto_mesh_1d(jax.devices()[:TP], TP_AXIS)
    w_layer = lora_spec("q" if kind == "column" else "o", strategy, stacked=False)
    meta = build_lora_meta(np.asarray(slot_T)) if impl == "pallas" else None
    if kind == "column":
        f = lambda y, x, w, s, m: column_parallel_lora(y, x, w, GatheredLora(s, impl, m), strategy)
        in_specs = (P(None, TP_AXIS), P(), w_layer, P(), P())
        out_specs = P(None, TP_AXIS)
    else:
        f = lambda y, x, w, s, m: row_parallel_lora(y / TP, x, w, GatheredLora(s, impl, m), strategy)
        in_specs = (P(), P(None, TP_AXIS), w_layer, P(), P())
        out_specs = P()
    return jax.jit(shard_map(f, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=impl != "pallas"))(
        y_TxO, x_TxI, w, slot_T, meta)


def check_partition(kind, strategy, dtype, tol, impl="reference"):
    x, y, w, slot, ref = reference_and_inputs(dtype)
    if kind == "row":  # the emulated partial sums y/tp must add back to y exactly
        y = y.astype(jnp.float32)
        ref = jax.jit(lora_reference)(y, x, w, slot)
    out = run_sharded(kind, strategy, x, y, w, slot, impl)
    ref, out = np.asarray(ref, np.float64), np.asarray(out, np.float64)
    base = np.asarray(y, np.float64)
    assert np.linalg.norm(ref - base) > 0.1 * np.linalg.norm(base)  # the LoRA term matters
    assert np.linalg.norm(out - ref) / np.linalg.norm(ref) < tol
    no_adapter = np.asarray(slot) < 0
    assert no_adapter.any()
    np.testing.assert_allclose(out[no_adapter], base[no_adapter], rtol=1e-6)


@pytest.mark.parametrize("strategy", LORA_STRATEGIES)
@pytest.mark.parametrize("kind", ["column", "row"])
@pytest.mark.parametrize("dtype, tol", [(jnp.float32, 1e-6), (jnp.bfloat16, 1e-2)])
def test_partition_equals_reference(kind, strategy, dtype, tol):
    check_partition(kind, strategy, dtype, tol)


@pytest.mark.parametrize("strategy", LORA_STRATEGIES)
@pytest.mark.parametrize("kind", ["column", "row"])
def test_partition_pallas_kernels(kind, strategy):
    """The split SGMV kernels per shard (interpreted on CPU), fp32; under `slora` a column
    shard's R/tp = 4 is padded to the kernels' 16-column rank block."""
    check_partition(kind, strategy, jnp.float32, 1e-5, impl="pallas")

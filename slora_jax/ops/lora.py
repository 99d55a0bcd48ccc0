"""Gathered LoRA: `y[t] += (x[t] @ A[slot[t]]) @ B[slot[t]]` for a batch of mixed adapters.

Weight layout "dense stacked slots" (`SlotWeights`): every resident adapter has a
slot `s`; `a[s]` is `[H_in, R]` and `b[s]` is `[R, H_out]` with the adapter's
scale (`alpha/r`, or `alpha/sqrt(r)` for rsLoRA) already folded into `b`.
Adapters of rank `r < R` are zero-padded to `R`; `ranks[s]` is the true rank
(0 where the adapter does not target this projection). The same arrays with a
leading layer axis `[L, ...]` hold a whole model; the model slices one layer.

A token whose slot is -1 uses no adapter and is left unchanged.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


class SlotWeights(NamedTuple):
    """LoRA weights of one projection for `S` adapter slots (optionally `[L, ...]`-stacked)."""

    a: jax.Array  # [(L,) S, H_in, R]
    b: jax.Array  # [(L,) S, R, H_out], scale folded in
    ranks: jax.Array  # [(L,) S] int32


def lora_reference(y_TxO: jax.Array, x_TxI: jax.Array, w: SlotWeights, slot_T: jax.Array) -> jax.Array:
    """Plain-jnp gathered LoRA (the reference every implementation is tested against).

    Args:
      y_TxO: base output `[T, H_out]`.
      x_TxI: input `[T, H_in]`.
      w: one layer's `SlotWeights` (`a: [S, H_in, R]`, `b: [S, R, H_out]`).
      slot_T: int32 `[T]`, adapter slot per token, -1 for none.
    Returns:
      `y + (x @ A) @ B` per token in `y.dtype`; the shrink accumulates in fp32.
    """
    has_T = slot_T >= 0
    s_T = jnp.where(has_T, slot_T, 0)
    a_TxIxR = w.a[s_T]
    b_TxRxO = w.b[s_T]
    v_TxR = jnp.einsum("ti,tir->tr", x_TxI, a_TxIxR, preferred_element_type=jnp.float32)
    d_TxO = jnp.einsum("tr,tro->to", v_TxR.astype(b_TxRxO.dtype), b_TxRxO, preferred_element_type=jnp.float32)
    d_TxO = jnp.where(has_T[:, None], d_TxO, 0.0)
    return (y_TxO.astype(jnp.float32) + d_TxO).astype(y_TxO.dtype)

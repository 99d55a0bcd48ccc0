"""Attention over a sequence's cached keys and values.

`attention_reference` is the plain-jnp contract the paged kernels will be tested
against: query `s` of sequence `b` sits at position `q_pos[b, s]` and attends
causally to cached key slots `0 .. q_pos[b, s]` (its own K/V already written).
A query with position -1 is padding: its output is zero.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def attention_reference(
    q_BxSxNxD: jax.Array,
    k_BxTxKxD: jax.Array,
    v_BxTxKxD: jax.Array,
    q_pos_BxS: jax.Array,
) -> jax.Array:
    """Causal GQA attention of `S` new queries over `T` cache slots; returns `[B, S, N, D]`.

    Scores and softmax in fp32; `N` query heads share `K` KV heads in groups of `N // K`.
    """
    B, S, N, D = q_BxSxNxD.shape
    T, K = k_BxTxKxD.shape[1], k_BxTxKxD.shape[2]
    q_BxSxKxGxD = q_BxSxNxD.reshape(B, S, K, N // K, D)
    s_BxKxGxSxT = jnp.einsum(
        "bskgd,btkd->bkgst", q_BxSxKxGxD, k_BxTxKxD, preferred_element_type=jnp.float32
    ) * (D**-0.5)
    visible_BxSxT = jnp.arange(T)[None, None, :] <= q_pos_BxS[:, :, None]
    s_BxKxGxSxT = jnp.where(visible_BxSxT[:, None, None], s_BxKxGxSxT, -jnp.inf)
    # Padding queries see nothing; keep their softmax finite and zero them after.
    s_BxKxGxSxT = jnp.where((q_pos_BxS >= 0)[:, None, None, :, None], s_BxKxGxSxT, 0.0)
    p_BxKxGxSxT = jax.nn.softmax(s_BxKxGxSxT, axis=-1)
    o_BxSxKxGxD = jnp.einsum(
        "bkgst,btkd->bskgd", p_BxKxGxSxT.astype(v_BxTxKxD.dtype), v_BxTxKxD,
        preferred_element_type=jnp.float32,
    )
    o_BxSxKxGxD = jnp.where((q_pos_BxS >= 0)[:, :, None, None, None], o_BxSxKxGxD, 0.0)
    return o_BxSxKxGxD.reshape(B, S, N, D).astype(q_BxSxNxD.dtype)

"""Attention over a sequence's cached keys and values.

`attention_reference` is the plain-jnp contract the paged kernels are tested
against (tests/test_paged_attention.py): query `s` of sequence `b` sits at position `q_pos[b, s]` and attends
causally to cached key slots `0 .. q_pos[b, s]` (its own K/V already written).
A query with position -1 is padding: its output is zero.

The paged ops below read the cache from pool pages through per-sequence page tables
(`paged_attention` for a `[B, S]` batch, `paged_ragged_attention` for a flat batch of
chunks of any lengths; kernels in `pallas_kernels.paged_attention`), write new tokens
into pages (`write_kv_pages`), and keep a gather-then-dense reference
(`paged_attention_reference`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.paged_attention import (
    gather_pages,
    paged_decode_attention,
    paged_prefill_attention,
    paged_ragged_attention as _ragged_kernel,
)


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


# ----------------------------------------------------------------------------- paged KV cache
#
# Page layout (shared with the unified pool): per layer `k_pages, v_pages [num_pages, P, K, D]`
# (or the whole pool `[L, num_pages, P, K, D]` with a `layer` index); token `t` of sequence
# `b` lives at page `page_table[b, t // P]`, slot `t % P`.

PAGED_IMPLS = ("pallas", "reference")


def paged_attention_reference(
    q_BxSxNxD: jax.Array,
    k_pages: jax.Array,
    v_pages: jax.Array,
    page_table_BxM: jax.Array,
    q_pos_BxS: jax.Array,
    *,
    layer=None,
) -> jax.Array:
    """Plain jnp: gather each sequence's pages into a contiguous cache, then `attention_reference`.

    `v_pages=None`: `k_pages` is a combined pool `[(L,) num_pages, 2, P, K, D]` (K, V at 0, 1).
    """
    if v_pages is None:
        k_pages, v_pages = jnp.take(k_pages, 0, axis=-4), jnp.take(k_pages, 1, axis=-4)
    k_BxTxKxD = gather_pages(k_pages, page_table_BxM, layer)
    v_BxTxKxD = gather_pages(v_pages, page_table_BxM, layer)
    return attention_reference(q_BxSxNxD, k_BxTxKxD, v_BxTxKxD, q_pos_BxS)


def write_kv_pages(
    k_pages: jax.Array,
    v_pages: jax.Array,
    k_BxSxKxD: jax.Array,
    v_BxSxKxD: jax.Array,
    page_table_BxM: jax.Array,
    pos_BxS: jax.Array,
    *,
    layer=None,
) -> tuple[jax.Array, jax.Array]:
    """Scatter new tokens' K/V into their pages; returns the updated `(k_pages, v_pages)`.

    Token at position `pos[b, s]` goes to page `page_table[b, pos // P]`, slot `pos % P`;
    `pos == -1` (padding) is dropped. Updates are functional (`.at[].set`): under jit with
    the pool donated, XLA writes in place.
    """
    P = k_pages.shape[-3]
    num_pages = k_pages.shape[-4]
    ok_BxS = pos_BxS >= 0
    safe_pos_BxS = jnp.where(ok_BxS, pos_BxS, 0)
    page_BxS = jnp.take_along_axis(page_table_BxM, safe_pos_BxS // P, axis=1)
    # Padding goes to an out-of-range page and is dropped by the scatter.
    page_BxS = jnp.where(ok_BxS, page_BxS, num_pages)
    slot_BxS = safe_pos_BxS % P
    idx = (page_BxS, slot_BxS) if layer is None else (layer, page_BxS, slot_BxS)
    k_pages = k_pages.at[idx].set(k_BxSxKxD.astype(k_pages.dtype), mode="drop")
    v_pages = v_pages.at[idx].set(v_BxSxKxD.astype(v_pages.dtype), mode="drop")
    return k_pages, v_pages


def paged_attention(
    q_BxSxNxD: jax.Array,
    k_pages: jax.Array,
    v_pages: jax.Array,
    page_table_BxM: jax.Array,
    q_pos_BxS: jax.Array,
    *,
    layer=None,
    impl: str = "pallas",
    interpret: bool | None = None,
    **kernel_options,
) -> jax.Array:
    """Causal GQA attention of `S` new queries per sequence over K/V in pool pages; `[B, S, N, D]`.

    Same contract as `attention_reference` on the gathered cache: query `s` of sequence `b`
    at position `q_pos[b, s]` sees tokens `0 .. q_pos[b, s]` (its own K/V already written,
    e.g. by `write_kv_pages`); `q_pos == -1` is padding (output 0). `S == 1` runs the decode
    kernel (lengths `q_pos + 1`), `S > 1` the prefill-chunk kernel. `impl="reference"` runs
    `paged_attention_reference`. `kernel_options` (block sizes, splits, warps, stages) go to
    the kernel launcher (see `pallas_kernels.paged_attention`).
    """
    if impl == "reference":
        return paged_attention_reference(q_BxSxNxD, k_pages, v_pages, page_table_BxM, q_pos_BxS, layer=layer)
    if impl != "pallas":
        raise ValueError(f"impl must be one of {PAGED_IMPLS}, got {impl!r}")
    if q_BxSxNxD.shape[1] == 1:
        lengths_B = jnp.where(q_pos_BxS[:, 0] >= 0, q_pos_BxS[:, 0] + 1, 0)
        o_BxNxD = paged_decode_attention(q_BxSxNxD[:, 0], k_pages, v_pages, page_table_BxM, lengths_B,
                                         layer=layer, interpret=interpret, **kernel_options)
        return o_BxNxD[:, None]
    return paged_prefill_attention(q_BxSxNxD, k_pages, v_pages, page_table_BxM, q_pos_BxS, layer=layer,
                                   interpret=interpret, **kernel_options)


def paged_ragged_attention(
    q_TxNxD: jax.Array,
    k_pages: jax.Array,
    v_pages: jax.Array,
    page_table_RxM: jax.Array,
    seq_T: jax.Array,
    q_pos_T: jax.Array,
    *,
    layer=None,
    impl: str = "pallas",
    interpret: bool | None = None,
    **kernel_options,
) -> jax.Array:
    """`paged_attention` of a flat batch: token `t` is a query of page-table row `seq_T[t]` at
    position `q_pos_T[t]` (-1: padding); returns `[T, N, D]`.

    Chunks and decode tokens of many sequences mix freely, as long as each row's tokens are
    contiguous (see `pallas_kernels.paged_attention`): the Pallas chunk kernel then reads each
    K/V tile once for a whole chunk. `impl="reference"` treats every token as a sequence of
    its own (`paged_attention_reference`, no layout condition).
    """
    T, N, D = q_TxNxD.shape
    if impl == "reference":
        return paged_attention_reference(q_TxNxD[:, None], k_pages, v_pages, page_table_RxM[seq_T],
                                         q_pos_T[:, None], layer=layer)[:, 0]
    if impl != "pallas":
        raise ValueError(f"impl must be one of {PAGED_IMPLS}, got {impl!r}")
    return _ragged_kernel(q_TxNxD, k_pages, v_pages, page_table_RxM, seq_T, q_pos_T, layer=layer,
                          interpret=interpret, **kernel_options)

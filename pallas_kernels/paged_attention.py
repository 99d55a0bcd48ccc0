"""Paged attention: queries attend to K/V read from pool pages through a page table.

Two kernels share one page layout and one online-softmax loop:

- `paged_decode_attention`: one query token per sequence (decode).
- `paged_prefill_attention`: a chunk of `S` query tokens per sequence, each attending
  causally (by position) to everything already in the sequence's pages (chunked prefill;
  the chunk's own K/V must be written to the pages first).

Contract
--------
Pool (one layer, or the whole pool with a `layer` index):
  k_pages, v_pages  `[num_pages, P, K, D]` or `[L, num_pages, P, K, D]`, bf16 or fp32;
                    `P` (tokens per page) a power of two, `D` a power of two >= 16.
                    Or `v_pages=None` and `k_pages` the unified pool's KV view
                    `[num_pages, 2, P, K, D]` / `[L, num_pages, 2, P, K, D]` (K at index 0
                    and V at 1 of axis `-4`), read in place.
  page_table `[B, max_pages]` int32: token `t` of sequence `b` lives at page
             `page_table[b, t // P]`, slot `t % P`. Entries past a sequence's last
             page are never read (they may hold anything).
  layer      int32 scalar (only with a 5-D pool): which layer's buffer to read.
Decode:
  q        `[B, N, D]`, N query heads sharing K KV heads in groups of `G = N // K`.
  lengths  `[B]` int32, tokens stored for the sequence (the new one included); 0 marks a
           padding row, whose output is 0.
  returns  `[B, N, D]` in q's dtype: `softmax(q k^T / sqrt(D)) v` over tokens `0..length-1`.
Prefill chunk:
  q        `[B, S, N, D]`;  q_pos `[B, S]` int32, each query's position (-1: padding,
           output 0). Query `s` attends to tokens `0 .. q_pos[b, s]`.
  returns  `[B, S, N, D]` in q's dtype.
Scores, softmax and accumulation are fp32; `p` is cast to V's dtype for the PV dot.

Work
----
Decode grid `(B, K, n_splits)`: a program takes one sequence and one KV head, loads the
`G` query heads of that KV head as one `[block_g, D]` tile (`block_g` = G padded to a
power of two >= 16, so the dots are `[block_g, D] x [D, block_t]` and
`[block_g, block_t] x [block_t, D]`), and walks its share of the sequence's tokens in
blocks of `block_t`, looking each token's page up in the page table (a block may span
pages, or a page several blocks). With `n_splits > 1` (flash-decoding: small batches
fill the GPU by splitting the context) every split writes fp32 partials
`(acc, max, sum)` and a few jnp ops combine them; with one split the kernel writes the
normalised output itself. Each split covers an equal share of *its own* sequence's
blocks, so ragged lengths stay balanced inside a sequence.

Prefill grid `(B, K, cdiv(S * G, block_m))`: rows are (query, group-head) pairs, so
GQA heads share each K/V tile; a program loops over token blocks up to the largest
position among its rows and masks `t > q_pos` per row.

Reference: `slora_jax.ops.attention.paged_attention_reference` (gathers the pages with
`gather_pages` below, then runs the dense `attention_reference`).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels.compat import compiler_params, default_interpret, pl, plgpu

_LOG2E = math.log2(math.e)
_M_INIT = -1e30  # running max start: finite, so a fully masked row never gives inf - inf


def _iota(n: int) -> jax.Array:
    return lax.broadcasted_iota(jnp.int32, (n,), 0)


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def gather_pages(pages: jax.Array, page_table_BxM: jax.Array, layer=None) -> jax.Array:
    """Plain jnp: pages `[(L,) num_pages, P, K, D]` -> contiguous `[B, max_pages * P, K, D]`."""
    if layer is not None:
        pages = pages[layer]
    B, M = page_table_BxM.shape
    _, P, K, D = pages.shape
    return pages[page_table_BxM].reshape(B, M * P, K, D)


def _as_5d(k_pages, v_pages, layer):
    """Both kernels index a 5-D pool (6-D for a combined K/V pool, `v_pages=None`);
    a one-layer pool gets a unit leading axis (free)."""
    if v_pages is None:
        if k_pages.ndim == 5 and layer is None:
            return k_pages[None], k_pages[None], jnp.zeros((1,), jnp.int32)
        if k_pages.ndim != 6 or layer is None or k_pages.shape[2] != 2:
            raise ValueError(f"combined pool must be [num_pages, 2, P, K, D], or 6-D with a layer; "
                             f"got {k_pages.shape}")
        return k_pages, k_pages, jnp.asarray(layer, jnp.int32).reshape(1)
    if k_pages.shape != v_pages.shape:
        raise ValueError(f"k_pages {k_pages.shape} and v_pages {v_pages.shape} differ")
    if k_pages.ndim == 4:
        if layer is not None:
            raise ValueError("layer is only valid with a 5-D [L, num_pages, P, K, D] pool")
        return k_pages[None], v_pages[None], jnp.zeros((1,), jnp.int32)
    if k_pages.ndim != 5 or layer is None:
        raise ValueError(f"pool must be [num_pages, P, K, D], or 5-D with a layer; got {k_pages.shape}")
    return k_pages, v_pages, jnp.asarray(layer, jnp.int32).reshape(1)


def _check(P: int, D: int, block_t: int):
    for name, v in (("page size", P), ("head_dim", D), ("block_t", block_t)):
        if v & (v - 1):
            raise ValueError(f"{name} must be a power of two, got {v}")
    if D < 16 or block_t < 16:
        raise ValueError(f"head_dim and block_t must be >= 16 (Triton dot), got {D}, {block_t}")


def _kv_block(k_ref, v_ref, page_table_ref, b, layer, h, t0, tok_end, *, block_t: int, D: int,
              page_size: int, max_pages: int):
    """K and V tiles `[block_t, D]` of tokens `t0 + [0, block_t)` (tokens >= tok_end read as 0)."""
    t_T = t0 + _iota(block_t)
    b_T = jnp.full((block_t,), b, jnp.int32)
    ok_T = t_T < tok_end
    pidx_T = jnp.minimum(t_T // page_size, max_pages - 1)
    page_T = plgpu.load(page_table_ref.at[b_T, pidx_T])
    page_T = jnp.where(ok_T, page_T, 0)  # never follow a table entry past the sequence
    shape = (block_t, D)
    lead = (jnp.full(shape, layer, jnp.int32), jnp.broadcast_to(page_T[:, None], shape))
    rest = (jnp.broadcast_to((t_T % page_size)[:, None], shape), jnp.full(shape, h, jnp.int32),
            jnp.broadcast_to(_iota(D)[None, :], shape))
    mask = jnp.broadcast_to(ok_T[:, None], shape)
    if len(k_ref.shape) == 6:  # combined pool: K and V are entries 0 and 1 of one axis
        k_idx = (*lead, jnp.zeros(shape, jnp.int32), *rest)
        v_idx = (*lead, jnp.ones(shape, jnp.int32), *rest)
    else:
        k_idx = v_idx = (*lead, *rest)
    k_TxD = plgpu.load(k_ref.at[k_idx], mask=mask, other=0)
    v_TxD = plgpu.load(v_ref.at[v_idx], mask=mask, other=0)
    return t_T, k_TxD, v_TxD


def _online_softmax_step(q_MxD, k_TxD, v_TxD, visible_MxT, carry, scale_log2: float):
    """One flash-attention step in base 2: scores, running max/sum, rescaled accumulator."""
    acc_MxD, m_M, l_M = carry
    s_MxT = lax.dot_general(q_MxD, k_TxD, (((1,), (1,)), ((), ())),
                            preferred_element_type=jnp.float32) * scale_log2
    s_MxT = jnp.where(visible_MxT, s_MxT, -jnp.inf)
    m_new_M = jnp.maximum(m_M, jnp.max(s_MxT, axis=1))
    alpha_M = jnp.exp2(m_M - m_new_M)
    p_MxT = jnp.exp2(s_MxT - m_new_M[:, None])
    l_M = alpha_M * l_M + jnp.sum(p_MxT, axis=1)
    acc_MxD = acc_MxD * alpha_M[:, None] + jnp.dot(
        p_MxT.astype(v_TxD.dtype), v_TxD, preferred_element_type=jnp.float32)
    return acc_MxD, m_new_M, l_M


def _init_carry(rows: int, D: int):
    return (jnp.zeros((rows, D), jnp.float32), jnp.full((rows,), _M_INIT, jnp.float32),
            jnp.zeros((rows,), jnp.float32))


def _normalise(acc_MxD, l_M):
    return jnp.where(l_M[:, None] > 0, acc_MxD / jnp.where(l_M > 0, l_M, 1.0)[:, None], 0.0)


# ----------------------------------------------------------------------------- decode


def _decode_kernel(layer_ref, lengths_ref, page_table_ref, q_ref, k_ref, v_ref, *out_refs,
                   G: int, N: int, D: int, block_g: int, block_t: int, page_size: int,
                   max_pages: int, n_splits: int, scale_log2: float):
    b = pl.program_id(0)
    h = pl.program_id(1)
    split = pl.program_id(2)
    layer = layer_ref[0]
    length = lengths_ref[b]
    n_blk = pl.cdiv(length, block_t)
    per_split = pl.cdiv(n_blk, n_splits)
    lo = split * per_split
    hi = jnp.minimum(n_blk, lo + per_split)

    g_G = _iota(block_g)
    row_ok_G = g_G < G
    # Padding rows point one past the last head: masked on the GPU, dropped by interpret mode.
    head_G = jnp.where(row_ok_G, h * G + g_G, N)
    shape = (block_g, D)
    head_GxD = jnp.broadcast_to(head_G[:, None], shape)
    d_GxD = jnp.broadcast_to(_iota(D)[None, :], shape)
    b_GxD = jnp.full(shape, b, jnp.int32)
    mask_GxD = jnp.broadcast_to(row_ok_G[:, None], shape)
    q_GxD = plgpu.load(q_ref.at[b_GxD, head_GxD, d_GxD], mask=mask_GxD, other=0)

    def body(j, carry):
        t_T, k_TxD, v_TxD = _kv_block(k_ref, v_ref, page_table_ref, b, layer, h, j * block_t, length,
                                      block_t=block_t, D=D, page_size=page_size, max_pages=max_pages)
        visible_GxT = jnp.broadcast_to((t_T < length)[None, :], (block_g, block_t))
        return _online_softmax_step(q_GxD, k_TxD, v_TxD, visible_GxT, carry, scale_log2)

    acc_GxD, m_G, l_G = lax.fori_loop(lo, hi, body, _init_carry(block_g, D))

    if n_splits == 1:
        (o_ref,) = out_refs
        o_GxD = _normalise(acc_GxD, l_G).astype(o_ref.dtype)
        plgpu.store(o_ref.at[b_GxD, head_GxD, d_GxD], o_GxD, mask=mask_GxD)
    else:
        acc_ref, m_ref, l_ref = out_refs
        split_GxD = jnp.full(shape, split, jnp.int32)
        plgpu.store(acc_ref.at[split_GxD, b_GxD, head_GxD, d_GxD], acc_GxD, mask=mask_GxD)
        split_G = jnp.full((block_g,), split, jnp.int32)
        b_G = jnp.full((block_g,), b, jnp.int32)
        plgpu.store(m_ref.at[split_G, b_G, head_G], m_G, mask=row_ok_G)
        plgpu.store(l_ref.at[split_G, b_G, head_G], l_G, mask=row_ok_G)


def default_decode_splits(batch: int, kv_heads: int, max_tokens: int, block_t: int,
                          target_programs: int = 264) -> int:
    """Power-of-two context splits so `B * K * splits` reaches ~2 programs per H100 SM,
    while each split keeps >= 4 token blocks of the longest possible sequence."""
    splits = 1
    while batch * kv_heads * splits < target_programs and max_tokens // (block_t * splits * 2) >= 4:
        splits *= 2
    return splits


def paged_decode_attention(q_BxNxD, k_pages, v_pages, page_table_BxM, lengths_B, *, layer=None,
                           block_t: int = 64, n_splits: int | None = None, num_warps: int = 4,
                           num_stages: int = 2, interpret: bool | None = None):
    """Decode attention of one query per sequence over its pages; returns `[B, N, D]` (module doc).

    `n_splits=None` uses `default_decode_splits` on the static shapes.
    """
    k5, v5, layer_1 = _as_5d(k_pages, v_pages, layer)
    B, N, D = q_BxNxD.shape
    P, K, Dk = k5.shape[-3:]
    M = page_table_BxM.shape[1]
    if Dk != D or N % K:
        raise ValueError(f"q heads/dim {N, D} do not match pool heads/dim {K, Dk}")
    _check(P, D, block_t)
    G = N // K
    if n_splits is None:
        n_splits = default_decode_splits(B, K, M * P, block_t)
    if interpret is None:
        interpret = default_interpret()
    kernel = functools.partial(
        _decode_kernel, G=G, N=N, D=D, block_g=max(16, _next_pow2(G)), block_t=block_t, page_size=P,
        max_pages=M, n_splits=n_splits, scale_log2=D**-0.5 * _LOG2E)
    if n_splits == 1:
        out_shape = jax.ShapeDtypeStruct((B, N, D), q_BxNxD.dtype)
    else:
        out_shape = (jax.ShapeDtypeStruct((n_splits, B, N, D), jnp.float32),
                     jax.ShapeDtypeStruct((n_splits, B, N), jnp.float32),
                     jax.ShapeDtypeStruct((n_splits, B, N), jnp.float32))
    out = pl.pallas_call(
        kernel,
        out_shape=out_shape,
        grid=(B, K, n_splits),
        compiler_params=compiler_params(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name="paged_decode_attention",
    )(layer_1, lengths_B.astype(jnp.int32), page_table_BxM.astype(jnp.int32), q_BxNxD, k5, v5)
    if n_splits == 1:
        return out
    acc_XxBxNxD, m_XxBxN, l_XxBxN = out
    # Flash-decoding combine over splits; empty splits carry m = -1e30, l = 0 and weigh 0.
    w_XxBxN = jnp.exp2(m_XxBxN - jnp.max(m_XxBxN, axis=0, keepdims=True))
    l_BxN = jnp.sum(w_XxBxN * l_XxBxN, axis=0)
    # Broadcast-multiply-sum, not einsum: XLA fuses it, where an einsum became a batched GEMM.
    acc_BxNxD = jnp.sum(w_XxBxN[..., None] * acc_XxBxNxD, axis=0)
    o_BxNxD = jnp.where(l_BxN[..., None] > 0, acc_BxNxD / jnp.where(l_BxN > 0, l_BxN, 1.0)[..., None], 0.0)
    return o_BxNxD.astype(q_BxNxD.dtype)


# ----------------------------------------------------------------------------- prefill chunk


def _prefill_kernel(layer_ref, q_pos_ref, page_table_ref, q_ref, k_ref, v_ref, o_ref, *, S: int, G: int,
                    D: int, block_m: int, block_t: int, page_size: int, max_pages: int,
                    scale_log2: float):
    b = pl.program_id(0)
    h = pl.program_id(1)
    mb = pl.program_id(2)
    layer = layer_ref[0]

    r_M = mb * block_m + _iota(block_m)
    row_ok_M = r_M < S * G
    # Rows past the chunk point one past the last query: masked on the GPU, dropped by interpret.
    s_M = jnp.where(row_ok_M, r_M // G, S)
    head_M = h * G + r_M % G
    pos_M = plgpu.load(q_pos_ref.at[jnp.full((block_m,), b, jnp.int32), s_M], mask=row_ok_M, other=-1)
    tok_end = jnp.max(pos_M) + 1  # 0 when every row is padding: no blocks

    shape = (block_m, D)
    b_MxD = jnp.full(shape, b, jnp.int32)
    s_MxD = jnp.broadcast_to(s_M[:, None], shape)
    head_MxD = jnp.broadcast_to(head_M[:, None], shape)
    d_MxD = jnp.broadcast_to(_iota(D)[None, :], shape)
    mask_MxD = jnp.broadcast_to(row_ok_M[:, None], shape)
    q_MxD = plgpu.load(q_ref.at[b_MxD, s_MxD, head_MxD, d_MxD], mask=mask_MxD, other=0)

    def body(j, carry):
        t_T, k_TxD, v_TxD = _kv_block(k_ref, v_ref, page_table_ref, b, layer, h, j * block_t, tok_end,
                                      block_t=block_t, D=D, page_size=page_size, max_pages=max_pages)
        visible_MxT = t_T[None, :] <= pos_M[:, None]
        return _online_softmax_step(q_MxD, k_TxD, v_TxD, visible_MxT, carry, scale_log2)

    acc_MxD, _, l_M = lax.fori_loop(0, pl.cdiv(tok_end, block_t), body, _init_carry(block_m, D))
    o_MxD = _normalise(acc_MxD, l_M).astype(o_ref.dtype)
    plgpu.store(o_ref.at[b_MxD, s_MxD, head_MxD, d_MxD], o_MxD, mask=mask_MxD)


def paged_prefill_attention(q_BxSxNxD, k_pages, v_pages, page_table_BxM, q_pos_BxS, *, layer=None,
                            block_m: int | None = None, block_t: int = 32, num_warps: int = 4,
                            num_stages: int = 2, interpret: bool | None = None):
    """Causal attention of a chunk of queries per sequence over its pages; returns `[B, S, N, D]`.

    `block_m` (rows = query x group-head pairs per program) defaults to `S * G` rounded up
    to a power of two, between 16 and 64.
    """
    k5, v5, layer_1 = _as_5d(k_pages, v_pages, layer)
    B, S, N, D = q_BxSxNxD.shape
    P, K, Dk = k5.shape[-3:]
    M = page_table_BxM.shape[1]
    if Dk != D or N % K:
        raise ValueError(f"q heads/dim {N, D} do not match pool heads/dim {K, Dk}")
    _check(P, D, block_t)
    G = N // K
    if block_m is None:
        block_m = min(64, max(16, _next_pow2(S * G)))
    if block_m < 16 or block_m & (block_m - 1):
        raise ValueError(f"block_m must be a power of two >= 16, got {block_m}")
    if interpret is None:
        interpret = default_interpret()
    kernel = functools.partial(
        _prefill_kernel, S=S, G=G, D=D, block_m=block_m, block_t=block_t, page_size=P, max_pages=M,
        scale_log2=D**-0.5 * _LOG2E)
    return pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((B, S, N, D), q_BxSxNxD.dtype),
        grid=(B, K, pl.cdiv(S * G, block_m)),
        compiler_params=compiler_params(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name="paged_prefill_attention",
    )(layer_1, q_pos_BxS.astype(jnp.int32), page_table_BxM.astype(jnp.int32), q_BxSxNxD, k5, v5)

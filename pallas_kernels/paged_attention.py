"""Paged attention: queries attend to K/V read from pool pages through a page table.

Two kernels share one page layout and one online-softmax loop:

- `paged_decode_attention`: one query token per sequence (decode).
- the chunk kernel: chunks of query tokens, each attending causally (by position) to
  everything already in its sequence's pages (chunked prefill; the chunk's own K/V must
  be written to the pages first). `paged_prefill_attention` launches it on a `[B, S]`
  batch, `paged_ragged_attention` on a flat batch of chunks of any lengths.

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
Ragged prefill chunks (`paged_ragged_attention`, the engine's mixed batches):
  q        `[T, N, D]`;  seq `[T]` int32, the page-table row of each token;  q_pos `[T]`
           int32 as above. Each row's tokens are contiguous (a *run*), at most `max_runs`
           runs in all, padding included.
  returns  `[T, N, D]` in q's dtype.
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

Prefill chunks run one kernel on a flat `[T]` batch of queries, grid `(tiles, K)`: a
*run* is a stretch of consecutive tokens of one sequence (a prefill chunk, or a lone
decode token), its rows are (query, group-head) pairs so GQA heads share each K/V tile,
and a tile is `block_m` rows of one run (`regular_tiles` for a `[B, S]` batch,
`ragged_tiles` for a ragged one, computed from the per-token sequence ids on the
device, so the grid depends only on `T` and the number of page-table rows). A program
loops over token blocks up to the largest position among its rows and masks
`t > q_pos` per row.

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


# ----------------------------------------------------------------------------- prefill chunks

# A tile (runs, rows and tiles: module doc) is four int32:
TILE_FIELDS = 4  # (first token of the run, first row of the tile, run length in tokens, page-table row)


def regular_tiles(B: int, S: int, G: int, block_m: int) -> jax.Array:
    """Tiles `[B * cdiv(S * G, block_m), 4]` of a `[B, S]` batch flattened: run b is row b."""
    per = pl.cdiv(S * G, block_m)
    b_I = jnp.repeat(jnp.arange(B, dtype=jnp.int32), per)
    j_I = jnp.tile(jnp.arange(per, dtype=jnp.int32), B)
    return jnp.stack([b_I * S, j_I * block_m, jnp.full_like(b_I, S), b_I], axis=1)


def ragged_tiles(seq_T: jax.Array, max_runs: int, G: int, block_m: int) -> jax.Array:
    """Tiles `[cdiv(T * G, block_m) + max_runs, 4]` of a ragged batch, `seq_T` the page-table row
    of each token; runs are maximal stretches of equal `seq_T`. Trailing tiles past the last run
    have length 0 (their programs return at once). Runs past `max_runs` get no tile."""
    T = seq_T.shape[0]
    t_T = jnp.arange(T, dtype=jnp.int32)
    new_T = jnp.concatenate([jnp.ones((1,), bool), seq_T[1:] != seq_T[:-1]])
    run_T = jnp.cumsum(new_T.astype(jnp.int32)) - 1
    first_X = jnp.full((max_runs,), T, jnp.int32).at[run_T].min(t_T, mode="drop")
    len_X = jnp.zeros((max_runs,), jnp.int32).at[run_T].add(1, mode="drop")
    seq_X = jnp.zeros((max_runs,), jnp.int32).at[run_T].max(seq_T.astype(jnp.int32), mode="drop")
    tiles_X = (len_X * G + block_m - 1) // block_m
    end_X = jnp.cumsum(tiles_X)  # one past each run's last tile
    # Each run wastes less than one tile, so this many tiles always cover every run.
    i_I = jnp.arange(pl.cdiv(T * G, block_m) + max_runs, dtype=jnp.int32)
    run_I = jnp.sum(end_X[None, :] <= i_I[:, None], axis=1, dtype=jnp.int32)  # == max_runs: past the end
    ok_I = run_I < max_runs
    run_I = jnp.minimum(run_I, max_runs - 1)
    row0_I = (i_I - end_X[run_I] + tiles_X[run_I]) * block_m
    return jnp.stack([first_X[run_I], row0_I, jnp.where(ok_I, len_X[run_I], 0), seq_X[run_I]], axis=1)


def _chunk_kernel(layer_ref, tiles_ref, q_pos_ref, page_table_ref, q_ref, k_ref, v_ref, o_ref, *, T: int,
                  G: int, D: int, block_m: int, block_t: int, page_size: int, max_pages: int, scale_log2: float):
    i = pl.program_id(0)
    h = pl.program_id(1)
    layer = layer_ref[0]
    first = tiles_ref[TILE_FIELDS * i]
    row0 = tiles_ref[TILE_FIELDS * i + 1]
    n_tok = tiles_ref[TILE_FIELDS * i + 2]
    b = tiles_ref[TILE_FIELDS * i + 3]

    r_M = row0 + _iota(block_m)
    row_ok_M = r_M < n_tok * G
    # Rows past the run point one past the last token: masked on the GPU, dropped by interpret mode.
    t_M = jnp.where(row_ok_M, first + r_M // G, T)
    head_M = h * G + r_M % G
    pos_M = plgpu.load(q_pos_ref.at[t_M], mask=row_ok_M, other=-1)
    tok_end = jnp.max(pos_M) + 1  # 0 when every row is padding: no blocks

    shape = (block_m, D)
    t_MxD = jnp.broadcast_to(t_M[:, None], shape)
    head_MxD = jnp.broadcast_to(head_M[:, None], shape)
    d_MxD = jnp.broadcast_to(_iota(D)[None, :], shape)
    mask_MxD = jnp.broadcast_to(row_ok_M[:, None], shape)
    q_MxD = plgpu.load(q_ref.at[t_MxD, head_MxD, d_MxD], mask=mask_MxD, other=0)

    def body(j, carry):
        t_T, k_TxD, v_TxD = _kv_block(k_ref, v_ref, page_table_ref, b, layer, h, j * block_t, tok_end,
                                      block_t=block_t, D=D, page_size=page_size, max_pages=max_pages)
        visible_MxT = t_T[None, :] <= pos_M[:, None]
        return _online_softmax_step(q_MxD, k_TxD, v_TxD, visible_MxT, carry, scale_log2)

    acc_MxD, _, l_M = lax.fori_loop(0, pl.cdiv(tok_end, block_t), body, _init_carry(block_m, D))
    o_MxD = _normalise(acc_MxD, l_M).astype(o_ref.dtype)
    plgpu.store(o_ref.at[t_MxD, head_MxD, d_MxD], o_MxD, mask=mask_MxD)


def _chunk_attention(q_TxNxD, k_pages, v_pages, page_table_RxM, q_pos_T, tiles_Ix4, layer, *, block_m: int,
                     block_t: int, num_warps: int, num_stages: int, interpret: bool | None):
    k5, v5, layer_1 = _as_5d(k_pages, v_pages, layer)
    T, N, D = q_TxNxD.shape
    P, K, Dk = k5.shape[-3:]
    if Dk != D or N % K:
        raise ValueError(f"q heads/dim {N, D} do not match pool heads/dim {K, Dk}")
    _check(P, D, block_t)
    if block_m < 16 or block_m & (block_m - 1):
        raise ValueError(f"block_m must be a power of two >= 16, got {block_m}")
    if interpret is None:
        interpret = default_interpret()
    kernel = functools.partial(
        _chunk_kernel, T=T, G=N // K, D=D, block_m=block_m, block_t=block_t, page_size=P,
        max_pages=page_table_RxM.shape[1], scale_log2=D**-0.5 * _LOG2E)
    return pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((T, N, D), q_TxNxD.dtype),
        grid=(tiles_Ix4.shape[0], K),
        compiler_params=compiler_params(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name="paged_chunk_attention",
    )(layer_1, tiles_Ix4.reshape(-1).astype(jnp.int32), q_pos_T.astype(jnp.int32),
      page_table_RxM.astype(jnp.int32), q_TxNxD, k5, v5)


def paged_prefill_attention(q_BxSxNxD, k_pages, v_pages, page_table_BxM, q_pos_BxS, *, layer=None,
                            block_m: int | None = None, block_t: int = 32, num_warps: int = 4,
                            num_stages: int = 2, interpret: bool | None = None):
    """Causal attention of a chunk of queries per sequence over its pages; returns `[B, S, N, D]`.

    `block_m` (rows = query x group-head pairs per program) defaults to `S * G` rounded up
    to a power of two, between 16 and 64.
    """
    B, S, N, D = q_BxSxNxD.shape
    G = N // k_pages.shape[-2]
    if block_m is None:
        block_m = min(64, max(16, _next_pow2(S * G)))
    o_TxNxD = _chunk_attention(
        q_BxSxNxD.reshape(B * S, N, D), k_pages, v_pages, page_table_BxM, q_pos_BxS.reshape(B * S),
        regular_tiles(B, S, G, block_m), layer, block_m=block_m, block_t=block_t, num_warps=num_warps,
        num_stages=num_stages, interpret=interpret)
    return o_TxNxD.reshape(B, S, N, D)


def paged_ragged_attention(q_TxNxD, k_pages, v_pages, page_table_RxM, seq_T, q_pos_T, *, layer=None,
                           max_runs: int | None = None, block_m: int = 64, block_t: int = 32,
                           num_warps: int = 4, num_stages: int = 2, interpret: bool | None = None):
    """Causal attention of a ragged flat batch of queries over their sequences' pages; `[T, N, D]`.

    Token `t` is a query of page-table row `seq_T[t]` at position `q_pos_T[t]` (-1: padding,
    output 0), attending to tokens `0 .. q_pos_T[t]` of that row. The batch must consist of at
    most `max_runs` runs of consecutive tokens sharing a row (default `R + 1`: each row's tokens
    contiguous, plus trailing padding); tokens of further runs are left uncomputed. Each run is
    processed as a prefill chunk: its queries share every K/V tile they read.
    """
    T, N, _ = q_TxNxD.shape
    G = N // k_pages.shape[-2]
    if max_runs is None:
        max_runs = min(T, page_table_RxM.shape[0] + 1)
    tiles_Ix4 = ragged_tiles(seq_T, max_runs, G, block_m)
    return _chunk_attention(q_TxNxD, k_pages, v_pages, page_table_RxM, q_pos_T, tiles_Ix4, layer,
                            block_m=block_m, block_t=block_t, num_warps=num_warps, num_stages=num_stages,
                            interpret=interpret)

"""Paged attention (decode and prefill-chunk kernels, interpret mode) vs the dense reference.

Every case builds a random pool with a random, non-contiguous page table, compares the
kernel with `attention_reference` on the equivalent contiguous cache (the pages gathered
in fp32), and covers ragged lengths (1, page boundaries, the table's end), padding rows
(position -1), MHA / GQA / non-power-of-two groups, page sizes 8 and 16, bf16 and fp32.
Kernel compiles dominate the run time in interpret mode, so each case packs many
features into one batch.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.paged_attention import default_decode_splits, gather_pages, paged_decode_attention, ragged_tiles
from slora_jax.config import preset
from slora_jax.model import forward, init_random_params
from slora_jax.model.cache import DenseKVCache
from slora_jax.ops.attention import (
    attention_reference,
    paged_attention,
    paged_attention_reference,
    paged_ragged_attention,
    write_kv_pages,
)

TOL = {jnp.float32: 1e-5, jnp.bfloat16: 1e-2}  # shared/BENCHMARKS.md: bf16 lands in 1e-3 .. 1e-2


def rel_err(out, ref):
    out = np.asarray(out, np.float32)
    ref = np.asarray(ref, np.float32)
    assert np.all(np.isfinite(out))
    return float(np.linalg.norm(out - ref) / np.linalg.norm(ref))


def random_pool(rng, *, B, M, P, K, D, dtype, spare=5):
    """Pool `[num_pages, P, K, D]` (more pages than the table uses) and a random page table."""
    num_pages = B * M + spare
    k_pages = jnp.asarray(rng.standard_normal((num_pages, P, K, D)), dtype)
    v_pages = jnp.asarray(rng.standard_normal((num_pages, P, K, D)), dtype)
    page_table = jnp.asarray(rng.permutation(num_pages)[: B * M].reshape(B, M).astype(np.int32))
    return k_pages, v_pages, page_table


def dense_reference(q, k_pages, v_pages, page_table, q_pos):
    """`attention_reference` on the gathered contiguous cache, fp32 inputs."""
    f32 = jnp.float32
    return attention_reference(q.astype(f32), gather_pages(k_pages, page_table).astype(f32),
                               gather_pages(v_pages, page_table).astype(f32), q_pos)


# B, N, K, D, P, M (pages per sequence), dtype, n_splits (None: the default heuristic)
DECODE_CASES = [
    pytest.param(6, 4, 4, 16, 8, 6, jnp.float32, 1, id="mha-P8-fp32"),
    pytest.param(6, 8, 2, 32, 16, 4, jnp.bfloat16, 3, id="gqa4-P16-bf16-split3"),
    pytest.param(5, 16, 2, 16, 8, 5, jnp.float32, None, id="gqa8-P8-fp32-default-splits"),
]


@pytest.mark.parametrize("B,N,K,D,P,M,dtype,n_splits", DECODE_CASES)
def test_decode_matches_dense_reference(B, N, K, D, P, M, dtype, n_splits):
    rng = np.random.default_rng(B * N + P)
    k_pages, v_pages, page_table = random_pool(rng, B=B, M=M, P=P, K=K, D=D, dtype=dtype)
    T = M * P
    # length 1, a full page, one past a page, the whole table, random, and a padding row (0)
    lengths = np.array([1, P, P + 1, T, rng.integers(2, T), 0][:B], np.int32)
    q = jnp.asarray(rng.standard_normal((B, 1, N, D)), dtype)
    q_pos = jnp.asarray(lengths - 1)[:, None]
    out = paged_attention(q, k_pages, v_pages, page_table, q_pos, n_splits=n_splits, block_t=16)
    assert out.shape == (B, 1, N, D) and out.dtype == dtype
    ref = dense_reference(q, k_pages, v_pages, page_table, q_pos)
    assert rel_err(out, ref) < TOL[dtype]
    if lengths[-1] == 0:
        np.testing.assert_array_equal(np.asarray(out[-1], np.float32), 0.0)


# B, S, N, K, D, P, M, dtype
PREFILL_CASES = [
    pytest.param(4, 7, 6, 2, 16, 8, 6, jnp.bfloat16, id="gqa3-P8-bf16"),
    pytest.param(3, 5, 4, 4, 32, 16, 3, jnp.float32, id="mha-P16-fp32"),
]


@pytest.mark.parametrize("B,S,N,K,D,P,M,dtype", PREFILL_CASES)
def test_prefill_chunk_matches_dense_reference(B, S, N, K, D, P, M, dtype):
    rng = np.random.default_rng(B * S + N)
    k_pages, v_pages, page_table = random_pool(rng, B=B, M=M, P=P, K=K, D=D, dtype=dtype)
    T = M * P
    # chunk starts: first chunk of a prompt, mid-sequence across a page boundary, the table's end
    starts = np.array([0, P - 2, T - S, rng.integers(1, T - S)][:B])
    q_pos = starts[:, None] + np.arange(S)[None, :]
    q_pos[1, -2:] = -1  # a ragged chunk: padded tail
    q_pos[-1, :] = -1 if B > 3 else q_pos[-1, :]  # a whole padding row
    q_pos = jnp.asarray(q_pos.astype(np.int32))
    q = jnp.asarray(rng.standard_normal((B, S, N, D)), dtype)
    out = paged_attention(q, k_pages, v_pages, page_table, q_pos)
    assert out.shape == (B, S, N, D) and out.dtype == dtype
    ref = dense_reference(q, k_pages, v_pages, page_table, q_pos)
    assert rel_err(out, ref) < TOL[dtype]
    pad = np.asarray(q_pos) < 0
    np.testing.assert_array_equal(np.asarray(out, np.float32)[pad], 0.0)


# N, K, D, P, dtype, combined (the unified pool's 6-D K/V view with a layer index)
RAGGED_CASES = [
    pytest.param(6, 2, 16, 8, jnp.bfloat16, False, id="gqa3-P8-bf16"),
    pytest.param(4, 4, 32, 16, jnp.float32, True, id="mha-P16-fp32-combined-pool"),
]


@pytest.mark.parametrize("N,K,D,P,dtype,combined", RAGGED_CASES)
def test_ragged_chunks_match_dense_reference(N, K, D, P, dtype, combined):
    """The engine's flat batch: prefill chunks and decode tokens of several sequences, in any
    row order, a chunk spanning several tiles and pages, padding inside a chunk and at the end."""
    rng = np.random.default_rng(N * P)
    R, M = 5, 4
    k_pages, v_pages, page_table = random_pool(rng, B=R, M=M, P=P, K=K, D=D, dtype=dtype)
    T_max = M * P
    # (row, first position, chunk length); row 3 is unused
    chunks = [(2, 0, 11), (0, T_max - 1, 1), (4, P - 3, 6), (1, rng.integers(0, T_max - 3), 3), (3, 0, 0)]
    seq = np.concatenate([np.full(n, r) for r, _, n in chunks] + [np.zeros(4, int)]).astype(np.int32)
    pos = np.concatenate([np.arange(p0, p0 + n) for _, p0, n in chunks] + [np.full(4, -1)]).astype(np.int32)
    pos[13] = -1  # padding inside row 4's chunk
    T = len(seq)
    q = jnp.asarray(rng.standard_normal((T, N, D)), dtype)
    if combined:  # [L, num_pages, 2, P, K, D], layer 1 of 2
        pool = jnp.stack([jnp.stack([k_pages, v_pages], axis=1)] * 2).at[0].multiply(-1.0)
        out = paged_ragged_attention(q, pool, None, page_table, jnp.asarray(seq), jnp.asarray(pos), layer=1,
                                     block_m=16, block_t=16)
    else:
        out = paged_ragged_attention(q, k_pages, v_pages, page_table, jnp.asarray(seq), jnp.asarray(pos),
                                     block_m=16, block_t=16)
    assert out.shape == (T, N, D) and out.dtype == dtype
    ref = dense_reference(q[:, None], k_pages, v_pages, page_table[seq], jnp.asarray(pos)[:, None])[:, 0]
    assert rel_err(out, ref) < TOL[dtype]
    np.testing.assert_array_equal(np.asarray(out, np.float32)[pos < 0], 0.0)


def test_ragged_tiles_cover_every_token_once():
    """Random run layouts: the tiles give each (token, group-head) row to exactly one program,
    with the token's own page-table row."""
    rng = np.random.default_rng(7)
    T, R, block_m = 160, 5, 16  # fixed shapes: one compile per G
    tiles_of = jax.jit(ragged_tiles, static_argnums=(1, 2, 3))
    for i in range(20):
        G = (1, 3)[i % 2]
        lens = rng.integers(0, 32, R)
        # rows in random order, then padding (row 0) up to T
        seq = np.concatenate([np.full(n, r) for r, n in zip(rng.permutation(R), lens)])
        seq = np.concatenate([seq, np.zeros(T - len(seq), int)]).astype(np.int32)
        tiles = np.asarray(tiles_of(jnp.asarray(seq), R + 1, G, block_m))
        hits = np.zeros(T * G, int)
        for first, row0, n, row in tiles:
            r = np.arange(row0, min(row0 + block_m, n * G))
            hits[first * G + r] += 1
            assert (seq[first + r // G] == row).all()
        np.testing.assert_array_equal(hits, 1)


def test_chunked_prefill_then_decode_equals_dense_cache():
    """Write a prompt in two chunks, then a decode token, through `write_kv_pages` into a
    5-D pool (layer 1 of 2), attending after each write: equals `DenseKVCache`."""
    rng = np.random.default_rng(3)
    B, N, K, D, P, M, L = 2, 4, 2, 16, 8, 4, 2
    num_pages = B * M + 3
    shape = (L, num_pages, P, K, D)
    k_pool = jnp.asarray(rng.standard_normal(shape), jnp.float32)  # stale data must be ignored
    v_pool = jnp.asarray(rng.standard_normal(shape), jnp.float32)
    page_table = jnp.asarray(rng.permutation(num_pages)[: B * M].reshape(B, M).astype(np.int32))
    dense = DenseKVCache(jnp.zeros((L, B, K, M * P, D)), jnp.zeros((L, B, K, M * P, D)))
    layer = jnp.int32(1)
    pos0 = np.array([[0, 1, 2, 3, 4, 5, 6, 7, 8, 9], [0, 1, 2, 3, 4, 5, -1, -1, -1, -1]])
    steps = [pos0, pos0 + 10 * (pos0 >= 0) + np.array([[0], [-4]]) * (pos0 >= 0), np.array([[20], [12]])]
    for pos in steps:
        pos = jnp.asarray(pos.astype(np.int32))
        S = pos.shape[1]
        k_new = jnp.asarray(rng.standard_normal((B, S, K, D)), jnp.float32)
        v_new = jnp.asarray(rng.standard_normal((B, S, K, D)), jnp.float32)
        q = jnp.asarray(rng.standard_normal((B, S, N, D)), jnp.float32)
        k_pool, v_pool = write_kv_pages(k_pool, v_pool, k_new, v_new, page_table, pos, layer=layer)
        dense = dense.write(layer, k_new, v_new, pos)
        ref = dense.attend(layer, q, pos)
        out = paged_attention(q, k_pool, v_pool, page_table, pos, layer=layer, block_t=16)
        assert rel_err(out, ref) < 1e-5
        out_ref = paged_attention(q, k_pool, v_pool, page_table, pos, layer=layer, impl="reference")
        assert rel_err(out_ref, ref) < 1e-6


def test_write_kv_pages_scatters_and_drops_padding():
    rng = np.random.default_rng(4)
    B, S, K, D, P, M = 3, 5, 2, 4, 4, 3
    k_pages, v_pages, page_table = random_pool(rng, B=B, M=M, P=P, K=K, D=D, dtype=jnp.float32)
    pos = np.array([[0, 1, 2, 3, 4], [6, 7, 8, -1, -1], [-1] * 5], np.int32)
    k_new = jnp.asarray(rng.standard_normal((B, S, K, D)), jnp.float32)
    k2, v2 = write_kv_pages(k_pages, v_pages, k_new, -k_new, page_table, jnp.asarray(pos))
    k_dense = np.asarray(gather_pages(k2, page_table))
    k_before = np.asarray(gather_pages(k_pages, page_table))
    expect = k_before.copy()
    for b in range(B):
        for s in range(S):
            if pos[b, s] >= 0:
                expect[b, pos[b, s]] = np.asarray(k_new[b, s])
    np.testing.assert_array_equal(k_dense, expect)
    np.testing.assert_array_equal(np.asarray(gather_pages(v2, page_table))[0, :5], -np.asarray(k_new[0]))
    # pages outside every table are untouched
    unused = np.setdiff1d(np.arange(k_pages.shape[0]), np.asarray(page_table))
    np.testing.assert_array_equal(np.asarray(k2)[unused], np.asarray(k_pages)[unused])


def test_reference_impl_equals_dense_and_validates():
    rng = np.random.default_rng(5)
    k_pages, v_pages, page_table = random_pool(rng, B=2, M=3, P=8, K=2, D=16, dtype=jnp.float32)
    q = jnp.asarray(rng.standard_normal((2, 3, 4, 16)), jnp.float32)
    q_pos = jnp.asarray(np.array([[5, 6, 7], [20, 21, -1]], np.int32))
    out = paged_attention_reference(q, k_pages, v_pages, page_table, q_pos)
    assert rel_err(out, dense_reference(q, k_pages, v_pages, page_table, q_pos)) < 1e-6
    with pytest.raises(ValueError, match="impl"):
        paged_attention(q, k_pages, v_pages, page_table, q_pos, impl="nope")
    with pytest.raises(ValueError, match="power of two"):
        paged_decode_attention(q[:, 0], k_pages, v_pages, page_table, jnp.array([1, 2]), block_t=24)


def test_default_splits_fill_the_gpu_for_small_batches():
    assert default_decode_splits(64, 32, 2048, 64) == 1
    assert default_decode_splits(8, 8, 8192, 64) == 8
    assert default_decode_splits(8, 8, 128, 64) == 1  # too short to split


class PagedCache(NamedTuple):
    """The model's cache interface over a 5-D page pool (what the unified pool will provide)."""

    k: jax.Array  # [L, num_pages, P, K, D]
    v: jax.Array  # [L, num_pages, P, K, D]
    page_table: jax.Array  # [B, max_pages]

    def write(self, layer, k_BxSxKxD, v_BxSxKxD, pos_BxS):
        k, v = write_kv_pages(self.k, self.v, k_BxSxKxD, v_BxSxKxD, self.page_table, pos_BxS, layer=layer)
        return PagedCache(k, v, self.page_table)

    def attend(self, layer, q_BxSxNxD, pos_BxS):
        return paged_attention(q_BxSxNxD, self.k, self.v, self.page_table, pos_BxS, layer=layer, block_t=16)


def test_model_logits_paged_equal_dense():
    """Tiny Llama (GQA 4:2, head_dim 16): a ragged prompt prefill then a decode step, the
    paged cache (kernels, random page table) gives the dense cache's logits."""
    cfg = preset("tiny")
    params = init_random_params(cfg, jax.random.key(0), dtype=jnp.float32)
    rng = np.random.default_rng(6)
    B, P, M = 2, 8, 3
    L, K, D = cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim
    num_pages = B * M + 2
    shape = (L, num_pages, P, K, D)
    paged = PagedCache(jnp.zeros(shape), jnp.zeros(shape),
                       jnp.asarray(rng.permutation(num_pages)[: B * M].reshape(B, M).astype(np.int32)))
    dense = DenseKVCache.create(cfg, B, M * P, jnp.float32)
    tokens = jnp.asarray(rng.integers(0, cfg.vocab_size, (B, 11)).astype(np.int32))
    pos = np.tile(np.arange(11), (B, 1))
    pos[1, 9:] = -1
    steps = [(tokens, pos), (tokens[:, :1], np.array([[11], [9]]))]
    for toks, pos in steps:
        pos = jnp.asarray(pos.astype(np.int32))
        want, dense = forward(params, cfg, toks, pos, dense)
        got, paged = forward(params, cfg, toks, pos, paged)
        valid = np.asarray(pos) >= 0
        assert rel_err(np.asarray(got)[valid], np.asarray(want)[valid]) < 1e-5

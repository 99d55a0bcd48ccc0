"""Base projection and its gathered LoRA in one launch: `y_g = x @ W_g + (x @ A_g[slot]) @ B_g[slot]`.

Why: at decode the LoRA kernels are latency-bound. Each program waits on a chain of
loads for a few KB, so a launch takes ~10 us for ~4 us of adapter bytes, and four
launches a layer cost the 7B step ~1.3 ms (benchmarks/NOTES_lora_kernels.md, sessions
8-12). Here the LoRA work runs in the same launch as the base matmul that streams W, so
that its latency would hide under that stream, leaving its bytes.

Measured (session 13, one H200; benchmarks/results/kernels_s13_h200/): correct, but
slower than XLA's matmul then the split pair. The 7B decode step took 8.47-8.70 against
8.19 ms, so `ops.KernelConfig.linear_max_tokens` leaves it off by default. With `vpart`
(the shrink as its own launch, only the expand in this one) it is not measured yet.

Contract
--------
G projections share x (q, k, v; gate, up; or one). T tokens in their original order,
S adapters of the batch, NT tiles (as in `sgmv_shrink`: `perm`, `tile_start`,
`tile_end`, `tile_slot`):
  x      `[T, H_in]`, bf16 or fp32 (the weights' dtype); T <= 256 (decode-sized calls).
  ws     G base weights `[H_in, N_g]`, x's dtype.
  rows   `[num_rows, C]`: the pool as rows of C elements (`slora_jax.memory.pool`).
  rank   `[G, S]` int32, projection g's rank of adapter s (0: not targeted).
  a_tab  `[G, S, H_in / C, R]` int32: pool row of row i of chunk j of `A_g^T` of adapter
         s, -1 past its rank (`paged_row_table`; R = `r_block`, a power of two >= 16
         bounding every rank).
  b_tab  `[G, max_g N_g / C, S, R]` int32: the same for `B_g` (scale folded in), chunk-major
         (a column chunk's entries of every adapter are contiguous).
  slot   `[T]` int32, each token's adapter, -1 for none.
  row_offset `[1]` int32, added to every table entry (the engine's tables are layer 0's:
         layer l's rows are the same pages `l * num_pages` further on).
  vpart  optional `[G, k_splits, T, R]` fp32 shrink partials (`sgmv_shrink_paged_group`'s
         output, whose `r_block` must be R): then the shrink ran in its own launch before
         this one, and this launch is only the matmul with the expand riding on it.
Returns `y_g [T, N_g]` in x's dtype: the base product plus the LoRA delta (fp32
accumulation of both; `v = x @ A` is rounded to the weights' dtype before `@ B`, as the
split pair does). `lora=False` leaves the LoRA out (the plain Pallas GEMM, a baseline).
Reference: `lora_linear_reference`.

Work. A 1-D grid: first k_splits x G x NT shrink programs (none with `vpart`), then
sum_g N_g / block_n matmul programs (static ranges, one per projection).
  Shrink `(tile, split, g)`: `x[rows of tile] @ A_g^T` over `shrink_k_steps` C-wide
    chunks of H_in (default all: one split; a loop, `shrink_unroll` chunks a step), stored
    fp32 to an HBM scratch of partials; then it adds 1 to projection g's counter (a CTA
    barrier first, then an acq_rel atomic). Padding tiles and rank-0 adapters only add 1.
  Matmul `(n, g)`: `acc = x @ W_g[:, n-block]` (a loop over H_in in `block_k` steps,
    Triton-pipelined with `num_stages`). Halfway through it polls g's counter until all
    shrink programs are in and sums `v_g`'s partials for all T rows. Then, for each adapter
    s, it adds `where(slot == s, v_g, 0) @ B_g[s][:, n-block]` (`expand_unroll` adapters a
    step, as one dot), one expand step in each of the K loop's remaining steps
    (`_matmul_program`). B is read once per column block, at each adapter's own rank (rows
    past it are masked, never read).
The wait cannot deadlock if programs start in id order (NVIDIA GPUs dispatch blocks
that way; CUDA does not promise it, the same assumption as `sgmv_paged_group_one_launch`):
every shrink program has then started before any matmul program waits, and no shrink
program waits. The intent was that the shrink finishes while the matmul programs stream
their first half of W, so a poll costs one atomic; session 13's timings suggest it does
not (notes, Session 13). Interpret mode runs programs in order and has no barrier, so the
poll loop and barriers are left out there.

Every load in the two loops has an address known from the loop index and one table
entry (no page-table chain inside a loop), so Triton's pipeliner can issue the next
steps' loads early.

Triton rules kept: block sizes are powers of two (T block, `block_n`, `block_k`, C, R);
every dot is 2-D with both sides >= 16.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels.compat import compiler_params, default_interpret, pl, plgpu
from pallas_kernels.sgmv_paged import paged_group_reference, wait_for_count
from pallas_kernels.sgmv_shrink import _iota, rows_at, tile_rows

MAX_TOKENS = 256


def _pow2_ceil(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def paged_row_table(pages_SxP, rank_S, first_S, n_chunks: int, *, rows_per_page: int, r_block: int):
    """`[S, n_chunks, r_block]` int32: pool row of row i of chunk j of each adapter's matrix, -1 past its rank.

    The matrix starts at virtual row `first_S[s]` and is chunk-major (chunk j is `rank`
    consecutive virtual rows, `PagedWeights`). Built once a step with jnp; every layer's
    call reads the same table, since a page id names the same rows in every layer.
    """
    i_R = jnp.arange(r_block, dtype=jnp.int32)
    v_SxJxR = (first_S[:, None, None] + jnp.arange(n_chunks, dtype=jnp.int32)[None, :, None] * rank_S[:, None, None]
               + i_R[None, None, :])
    page_SxJxR = jnp.take_along_axis(pages_SxP, (v_SxJxR // rows_per_page).reshape(pages_SxP.shape[0], -1), axis=1,
                                     mode="clip").reshape(v_SxJxR.shape)
    phys = page_SxJxR * rows_per_page + v_SxJxR % rows_per_page
    return jnp.where(i_R[None, None, :] < rank_S[:, None, None], phys, -1).astype(jnp.int32)


def _shrink_program(perm_ref, tile_start_ref, tile_end_ref, tile_slot_ref, rank_ref, a_tab_ref, off_ref, rows_ref,
                    x_ref, v_ref, split, tile, g, *, n_adapters: int, n_in: int, chunk: int, block_m: int,
                    block_r: int, k_steps: int, unroll: int, n_tokens: int, mixed: bool):
    """Split `split` (chunks `[split k_steps, (split + 1) k_steps)` of H_in) of g's shrink for `tile`."""
    slot = tile_slot_ref[tile]
    safe = jnp.maximum(slot, 0)
    rank = jnp.where(slot >= 0, rank_ref[g * n_adapters + safe], 0)
    off = off_ref[0]

    @pl.when(rank > 0)
    def _():
        rows_M, row_ok_M = tile_rows(perm_ref, tile_start_ref, tile_end_ref, tile, block_m=block_m,
                                     n_tokens=n_tokens)
        xmask_MxC = jnp.broadcast_to(row_ok_M[:, None], (block_m, chunk))
        precision = lax.Precision.HIGHEST if x_ref.dtype == jnp.float32 else None  # fp32: no TF32
        tab0 = (g * n_adapters + safe) * n_in * block_r

        def step(i, acc_MxR):
            for u in range(unroll):
                j_raw = split * k_steps + i * unroll + u
                j = jnp.minimum(j_raw, n_in - 1)
                ok = (j_raw < n_in) & (i * unroll + u < k_steps)
                phys_R = a_tab_ref[pl.ds(tab0 + j * block_r, block_r)]
                ok_R = (phys_R >= 0) & ok
                at_RxC = plgpu.load(rows_at(rows_ref, (), jnp.where(ok_R, phys_R + off, 0), 0, chunk, mixed=mixed),
                                    mask=jnp.broadcast_to(ok_R[:, None], (block_r, chunk)), other=0)
                x_MxC = plgpu.load(rows_at(x_ref, (), rows_M, j * chunk, chunk, mixed=mixed), mask=xmask_MxC & ok,
                                   other=0)
                acc_MxR += lax.dot_general(x_MxC, at_RxC, (((1,), (1,)), ((), ())), precision=precision,
                                           preferred_element_type=jnp.float32)
            return acc_MxR

        acc_MxR = lax.fori_loop(0, -(-k_steps // unroll), step, jnp.zeros((block_m, block_r), jnp.float32))
        plgpu.store(rows_at(v_ref, (g, split), rows_M, 0, block_r, mixed=mixed), acc_MxR,
                    mask=jnp.broadcast_to(row_ok_M[:, None], (block_m, block_r)))


def _matmul_program(x_ref, w_ref, o_ref, n, *, n_tokens: int, block_t: int, block_n: int, block_k: int,
                    h_in: int, expand_steps: int, mixed: bool, lora=None):
    """Column block n of `o = x @ w`, plus the LoRA delta in registers before the store.

    `lora(rows_T, ok_T, n0)` waits for the shrink and returns the expand's loop step
    `step(i, acc) -> acc` (`expand_steps` of them). They ride on the last K steps: the first
    `n_k - tail` K steps run alone, then each of the last `tail` loop steps loads and
    multiplies one K block of W and one step of B, so the expand's loads stream beside W's
    in the same pipelined loop instead of after it (any steps left over run after).
    """
    i_T = _iota(block_t)
    ok_T = i_T < n_tokens
    # Rows past T point one past the end: masked on the GPU, and dropped (not written onto a
    # real row) by interpret mode's read-modify-write stores.
    rows_T = jnp.where(ok_T, i_T, n_tokens)
    n0 = n * block_n
    precision = lax.Precision.HIGHEST if x_ref.dtype == jnp.float32 else None
    xmask = jnp.broadcast_to(ok_T[:, None], (block_t, block_k))

    def step(k, acc_TxN):
        x_TxK = plgpu.load(rows_at(x_ref, (), rows_T, k * block_k, block_k, mixed=mixed), mask=xmask, other=0)
        w_KxN = w_ref[pl.ds(k * block_k, block_k), pl.ds(n0, block_n)]
        return acc_TxN + jnp.dot(x_TxK, w_KxN, precision=precision, preferred_element_type=jnp.float32)

    n_k = h_in // block_k
    zeros = jnp.zeros((block_t, block_n), jnp.float32)
    if lora is None:
        acc_TxN = lax.fori_loop(0, n_k, step, zeros)
    else:
        tail = min(expand_steps, max(1, n_k // 2))
        acc_TxN = lax.fori_loop(0, n_k - tail, step, zeros)
        expand_step = lora(rows_T, ok_T, n0)
        acc_TxN = lax.fori_loop(0, tail, lambda i, acc: expand_step(i, step(n_k - tail + i, acc)), acc_TxN)
        if expand_steps > tail:
            acc_TxN = lax.fori_loop(tail, expand_steps, expand_step, acc_TxN)
    plgpu.store(rows_at(o_ref, (), rows_T, n0, block_n, mixed=mixed), acc_TxN.astype(o_ref.dtype),
                mask=jnp.broadcast_to(ok_T[:, None], (block_t, block_n)))


def _expand_step(rows_T, ok_T, n0, *, slot_ref, b_tab_ref, off_ref, rows_ref, v_ref, g: int, n_adapters: int,
                 n_out_max: int, chunk: int, block_t: int, block_n: int, block_r: int, k_splits: int, unroll: int,
                 mixed: bool, wait):
    """Waits for g's shrink; returns `step(i, acc)`, adapters `[i U, (i + 1) U)` of
    `acc += sum_s where(slot == s, v_g, 0) @ B_g[s][:, n0:n0 + block_n]`.

    `unroll` = U adapters a loop step, as one `[T, U R] @ [U R, block_n]` dot: their table
    entries for this column chunk are contiguous (`b_tab [G, J, S, R]`), so a step is one
    vector load of U R row ids and one gather of U R rows of B. v is tiled U times across
    (an exact dot with a 0/1 matrix), and each copy keeps only the tokens of its adapter.
    """
    wait(g)
    dtype = rows_ref.dtype
    slot_T = plgpu.load(slot_ref.at[rows_T], mask=ok_T, other=-1)
    # The shrink's stores of this launch: read volatile, never from a stale L1 line. Rows of
    # tokens with no adapter were never written; the select below drops them.
    v_TxR = jnp.zeros((block_t, block_r), jnp.float32)
    for split in range(k_splits):
        v_TxR += plgpu.load(rows_at(v_ref, (g, split), rows_T, 0, block_r, mixed=mixed),
                            mask=jnp.broadcast_to(ok_T[:, None], (block_t, block_r)), other=0.0, volatile=True)
    UR = unroll * block_r
    c_UR = _iota(UR)
    tile_RxUR = (c_UR[None, :] % block_r == _iota(block_r)[:, None]).astype(dtype)
    precision = lax.Precision.HIGHEST if dtype == jnp.float32 else None
    v_TxUR = jnp.dot(v_TxR.astype(dtype), tile_RxUR, precision=precision, preferred_element_type=jnp.float32)
    j = n0 // chunk
    col = n0 % chunk
    tab0 = (g * n_out_max + j) * n_adapters * block_r
    off = off_ref[0]

    def step(i, acc):
        phys_UR = b_tab_ref[pl.ds(tab0 + i * UR, UR)]
        ok_UR = phys_UR >= 0
        b_URxN = plgpu.load(rows_at(rows_ref, (), jnp.where(ok_UR, phys_UR + off, 0), col, block_n, mixed=mixed),
                            mask=jnp.broadcast_to(ok_UR[:, None], (UR, block_n)), other=0)
        sel_TxUR = (slot_T[:, None] == i * unroll + c_UR[None, :] // block_r) & ok_UR[None, :]
        vs_TxUR = jnp.where(sel_TxUR, v_TxUR, 0.0).astype(dtype)
        return acc + jnp.dot(vs_TxUR, b_URxN, precision=precision, preferred_element_type=jnp.float32)

    return step


def _kernel(*refs, G: int, n_out: tuple[int, ...], n_shrink: int, k_splits: int, block_n: int, n_tiles: int,
            lora: bool, external_v: bool, gpu_sync: bool, shrink: dict, matmul: dict, expand: dict):
    (perm_ref, tile_start_ref, tile_end_ref, tile_slot_ref, slot_ref, rank_ref, a_tab_ref, b_tab_ref, off_ref,
     rows_ref, x_ref) = refs[:11]
    w_refs = refs[11 : 11 + G]
    # then the counters' input (and with `external_v` the partials'), aliased to count_ref (v_ref)
    n_in = 12 + G + external_v
    v_ref, count_ref = refs[n_in], refs[n_in + 1]
    o_refs = refs[n_in + 2 :]
    p = pl.program_id(0)

    def wait(g):
        if not external_v:  # partials given: written before this launch
            wait_for_count(count_ref, g, k_splits * n_tiles, gpu_sync=gpu_sync)

    if lora:
        @pl.when(p < n_shrink)
        def _():
            tile, split, g = p // (k_splits * G), p // G % k_splits, p % G  # a tile's programs side by side
            _shrink_program(perm_ref, tile_start_ref, tile_end_ref, tile_slot_ref, rank_ref, a_tab_ref, off_ref,
                            rows_ref, x_ref, v_ref, split, tile, g, **shrink)
            if gpu_sync:
                plgpu.debug_barrier()
            plgpu.atomic_add(count_ref, g, jnp.ones((), jnp.int32))

    q = p - n_shrink
    first = 0
    for g in range(G):
        n_blocks = n_out[g] // block_n
        add = (functools.partial(_expand_step, slot_ref=slot_ref, b_tab_ref=b_tab_ref, off_ref=off_ref,
                                 rows_ref=rows_ref, v_ref=v_ref, g=g, wait=wait, **expand) if lora else None)
        body = functools.partial(_matmul_program, x_ref, w_refs[g], o_refs[g], q - first, lora=add, **matmul)
        pl.when((q >= first) & (q < first + n_blocks))(body)
        first += n_blocks


def lora_linear_paged_group(x_TxI, ws_IxO, rows_NxC, rank_GxS, a_tab_GxSxJxR, b_tab_GxJxSxR, slot_T, perm_T,
                            tile_start, tile_end, tile_slot, row_offset=None, vpart=None, *, block_m: int,
                            lora: bool = True,
                            block_n: int = 64, block_k: int = 128, shrink_k_steps: int | None = None,
                            shrink_unroll: int = 2, expand_unroll: int | None = None,
                            num_warps: int = 4,
                            num_stages: int = 3, interpret: bool | None = None,
                            mixed_index: bool | None = None) -> tuple[jax.Array, ...]:
    """`x @ W_g` plus each token's LoRA delta for G projections, one launch; returns the G outputs (module doc)."""
    ws_IxO = tuple(ws_IxO)
    T, H_in = x_TxI.shape
    G = len(ws_IxO)
    C = rows_NxC.shape[1]
    S = rank_GxS.shape[1]
    R = a_tab_GxSxJxR.shape[-1]
    if not 1 <= T <= MAX_TOKENS:
        raise ValueError(f"lora_linear takes 1..{MAX_TOKENS} tokens (decode-sized calls), got {T}")
    for what, v in (("block_m", block_m), ("block_n", block_n), ("block_k", block_k), ("chunk C", C), ("r_block", R)):
        if v < 16 or v & (v - 1):
            raise ValueError(f"{what} must be a power of two >= 16, got {v}")
    if H_in % block_k or H_in % C:
        raise ValueError(f"H_in={H_in} must be a multiple of block_k={block_k} and of the row width C={C}")
    if C % block_n and block_n % C:
        raise ValueError(f"block_n={block_n} and the row width C={C} must divide one another")
    if block_n > C:
        raise ValueError(f"block_n={block_n} must be at most the row width C={C} (one chunk of B a block)")
    for w in ws_IxO:
        if w.shape[0] != H_in or w.shape[1] % block_n:
            raise ValueError(f"weight {w.shape} does not take x {x_TxI.shape} in blocks of {block_n} columns")
    if expand_unroll is None:  # few enough expand steps to ride on the last half of the K loop
        expand_unroll = _pow2_ceil(-(-S // max(1, H_in // block_k // 2)))
    if expand_unroll < 1 or expand_unroll & (expand_unroll - 1):
        raise ValueError(f"expand_unroll must be a power of two, got {expand_unroll}")
    if (rank_GxS.shape[0] != G or a_tab_GxSxJxR.shape[:3] != (G, S, H_in // C)
            or b_tab_GxJxSxR.shape[0] != G or b_tab_GxJxSxR.shape[2] != S
            or b_tab_GxJxSxR.shape[1] < max(w.shape[1] for w in ws_IxO) // C):
        raise ValueError(f"tables {a_tab_GxSxJxR.shape} / {b_tab_GxJxSxR.shape} and ranks {rank_GxS.shape} do not "
                         f"match {G} projections of H_in={H_in} over {S} adapters")
    interpret = default_interpret() if interpret is None else interpret
    mixed = (not interpret) if mixed_index is None else mixed_index
    NT = tile_slot.shape[0]
    if S % expand_unroll:  # whole steps of the expand's loop: padding adapters have no rows
        b_tab_GxJxSxR = jnp.pad(b_tab_GxJxSxR, ((0, 0), (0, 0), (0, -S % expand_unroll), (0, 0)), constant_values=-1)
    n_out = tuple(w.shape[1] for w in ws_IxO)
    n_in = H_in // C
    k_steps = n_in if shrink_k_steps is None else max(1, min(shrink_k_steps, n_in))
    k_splits = -(-n_in // k_steps)
    if vpart is not None:  # the shrink ran before this launch: only the expand rides here
        if vpart.shape[0] != G or vpart.shape[2:] != (T, R) or vpart.dtype != jnp.float32:
            raise ValueError(f"vpart {vpart.shape} {vpart.dtype} is not fp32 [{G}, k_splits, {T}, {R}] partials")
        k_splits = vpart.shape[1]
    n_shrink = k_splits * G * NT if lora and vpart is None else 0
    block_t = _pow2_ceil(max(16, T))
    kernel = functools.partial(
        _kernel, G=G, n_out=n_out, n_shrink=n_shrink, k_splits=k_splits, block_n=block_n, n_tiles=NT, lora=lora,
        external_v=vpart is not None, gpu_sync=not interpret,
        shrink=dict(n_adapters=S, n_in=n_in, chunk=C, block_m=block_m, block_r=R, k_steps=k_steps,
                    unroll=shrink_unroll, n_tokens=T, mixed=mixed),
        matmul=dict(n_tokens=T, block_t=block_t, block_n=block_n, block_k=block_k, h_in=H_in,
                    expand_steps=-(-S // expand_unroll), mixed=mixed),
        expand=dict(n_adapters=b_tab_GxJxSxR.shape[2], n_out_max=b_tab_GxJxSxR.shape[1], chunk=C, block_t=block_t,
                    block_n=block_n, block_r=R, k_splits=k_splits, unroll=expand_unroll, mixed=mixed))
    off = jnp.zeros((1,), jnp.int32) if row_offset is None else jnp.asarray(row_offset, jnp.int32).reshape(1)
    args = (perm_T, tile_start, tile_end, tile_slot, slot_T, rank_GxS.reshape(-1), a_tab_GxSxJxR.reshape(-1),
            b_tab_GxJxSxR.reshape(-1), off, rows_NxC, x_TxI, *ws_IxO, jnp.zeros((G,), jnp.int32),
            *(() if vpart is None else (vpart,)))
    out = pl.pallas_call(
        kernel,
        out_shape=(jax.ShapeDtypeStruct((G, k_splits, T, R), jnp.float32), jax.ShapeDtypeStruct((G,), jnp.int32),
                   *(jax.ShapeDtypeStruct((T, n), x_TxI.dtype) for n in n_out)),
        grid=(n_shrink + sum(n // block_n for n in n_out),),
        input_output_aliases={11 + G: 1, **({} if vpart is None else {12 + G: 0})},
        compiler_params=compiler_params(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name=(f"skinny_matmul_x{G}" if not lora else f"lora_linear_x{G}" if vpart is None else f"expand_linear_x{G}"),
    )(*args)
    return tuple(out[2:])


def lora_linear_reference(x_TxI, ws_IxO, rows_NxC, pages_SxP, rank_GxS, a_row_GxS, b_row_GxS, slot_T, *,
                          rows_per_page: int, r_max: int) -> tuple[jax.Array, ...]:
    """jnp: `x @ W_g` (fp32 accumulate) plus `paged_group_reference`'s delta, rounded once to x's dtype."""
    base = tuple(jnp.dot(x_TxI, w_IxO, preferred_element_type=jnp.float32, precision=lax.Precision.HIGHEST)
                 for w_IxO in ws_IxO)
    out = paged_group_reference(base, x_TxI, rows_NxC, pages_SxP, rank_GxS, a_row_GxS, b_row_GxS, slot_T,
                                rows_per_page=rows_per_page, r_max=r_max)
    return tuple(y.astype(x_TxI.dtype) for y in out)

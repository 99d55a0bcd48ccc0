"""SGMV split pair on pool pages: shrink (split-K, fp32 partials) then expand, reading adapters in place.

One launch of each serves a *group* of G projections that share their input x (q, k, v;
or gate, up): one adapter page table, one H_in, per-projection ranks and rows, and G
outputs of their own widths (GQA: k and v narrower than q). G = 1 is a single
projection.

Contract
--------
Inputs (T tokens in their original order, S adapters of the batch, NT tiles; tiles as in
`sgmv_shrink`: `perm`, `tile_start`, `tile_end`, `tile_slot`):
  x      `[T, H_in]`, the weights' dtype; only rows of tiles are read.
  rows   `[num_rows, C]`: the pool as rows of C = lora_chunk elements (`slora_jax.memory.pool`).
  pages  `[S, max_pages]` int32, each adapter's page table (shared by the group).
  rank, a_row, b_row `[G, S]` int32: projection g's rank (0: not
         targeted) and first virtual rows of A^T and B. Both are chunk-major: column chunk
         `j` (width C) is `rank` consecutive virtual rows; virtual row `v` of adapter `s` is
         physical row `pages[s, v // rows_per_page] * rows_per_page + v % rows_per_page`.
Shrink output: `vpart [G, k_splits, T, R]` fp32, `v_g = vpart[g].sum(0)` (R = `r_block`,
  static, a power of two >= 16 bounding every rank of the group); only rows of tiles are
  written, and only for projections the tile's adapter targets.
Expand: `y_g [T, H_out_g]` aliased to output g; `y_g'[t] = f32(y_g[t]) + (v_g[t] as the
  weights' dtype) @ B_g`, cast to y's dtype; rows outside every tile, and rows whose
  adapter has rank 0 on g, are neither read nor written.
Reference: `paged_group_reference` (jnp, the pages read with `read_paged`).

Work. Shrink: grid `(k_splits * G, NT)`, program `(split * G + g, tile)` takes `k_steps`
consecutive K chunks of projection g, unrolled, so all its loads are in flight at once
(a loop over chunks would pay one memory latency per step: the one-launch `sgmv_fused`
is bound by that, benchmarks/NOTES_lora_kernels.md); `k_loop > 1` repeats that `k_loop`
times in a loop, for fewer splits (not faster in session 20's H200 probe once the partials
are summed before the expand, which `ops.lora` does from `paged_presum_min_tokens`). Expand: grid
`(sum_g n_blocks_g, NT)`; the first axis is cut into static ranges, one per projection
(a static `pl.when` branch each, so no program is spent past a narrow output), and
program `(n, tile)` sums its projection's partials for its rows and adds `n_steps`
chunks of `v @ B`, unrolled. The first axis is the fastest: a tile's programs run
together and share x (shrink: a split's G programs read the same x chunk back to back)
and its partials in L2. Padding tiles and rank-0 adapters return at once; rows past a
tile and weight rows past an adapter's rank are masked (never read), so bytes follow
each adapter's rank.

`k_steps=None` picks K chunks per program with `default_k_steps`.

`tile_programs=N` (> 0) launches at most N programs along the tile axis of both kernels, each
looping over the used tiles with stride N (`used_tiles`, the metadata's count, read at run time),
so the padding tiles of a metadata bound (NT) launch no program. 0 (one program per bound tile)
is this function's default; `ops.lora` launches 128 (`KernelConfig.paged_tile_programs`, measured
in session 19). `flat=True` (with N > 0) flattens the loop instead: N programs in all, on a
grid `(1, N)`, each looping with stride N over the run-time items (first-axis program, used
tile), the first axis fastest as in the grid: every item of a used tile gets a program, and no
program waits on a padding tile, whatever the split of work between the two axes. With it the
shrink can also take its K splits at run time (`max_splits`, `split_counts`:
`run_time_split_counts` of the used tiles): few used tiles get many splits, many get few; the
partials past the call's count are left unwritten for the caller to mask.

`sgmv_paged_group_one_launch` runs the same shrink and expand programs in one launch: the
expand's programs load their B and y blocks, then wait on per-(projection, tile) counters
that the shrink's programs raise (`_one_launch_kernel`). It relies on programs starting in
id order (as NVIDIA GPUs dispatch them); `ops.lora` uses it for small calls
(`KernelConfig.paged_one_launch_max_tokens`), where it measured faster.

Triton rules kept: block sizes are powers of two (`block_m`, R, C); every dot is 2-D
with both sides >= 16.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels.compat import compiler_params, default_interpret, pl, plgpu
from pallas_kernels.sgmv_shrink import _iota, rows_at, tile_rows

# `default_k_steps`: shrink programs aimed at (about 4 resident per SM on a 132-SM H100/H200)
# and the bounds on K chunks per program.
TARGET_PROGRAMS = 512
MIN_K_STEPS = 4
MAX_K_STEPS = 8
COUNTERS_MIN = 32  # entries of the one launch's counter buffer, at least (`sgmv_paged_group_one_launch`)


def default_k_steps(n_in: int, programs_per_split: int) -> int:
    """K chunks per shrink program: enough splits for ~`TARGET_PROGRAMS` programs, 4 to 8 chunks each.

    `programs_per_split` = G x tiles (a static bound: the metadata's `active_tiles`).
    Few tiles (one token, a few adapters) leave most SMs idle whatever the split; a
    program's time is then its chain of dependent loads (tile -> adapter -> page ->
    rows) plus its own chunks, so short programs (4 chunks, as measured in session 3)
    are best and more splits would only add partials for the expand to sum. Many tiles
    (64 distinct adapters x 3 projections) fill the GPU anyway; 8 chunks a program
    halve the partials the expand re-reads (every expand program of a tile sums all
    `k_splits` of them) and the programs to schedule. More unrolled chunks would hold
    too many loads in registers (8 chunks of [16, 128] x and A blocks in bf16 are
    64 KiB in flight, ~128 registers a thread at 4 warps).
    """
    splits = -(-TARGET_PROGRAMS // max(1, programs_per_split))
    return max(1, min(n_in, max(MIN_K_STEPS, min(MAX_K_STEPS, -(-n_in // splits)))))


def paged_row_ids(pages_ref, s, max_pages: int, v0, rank_ok_R, *, rows_per_page: int, block_r: int):
    """Physical pool rows `[R]` of the virtual rows `v0 .. v0 + R` of adapter `s` (0 where masked).

    A block within two pages costs two scalar page-table reads (no per-row gather, no
    chain of dependent vector loads); with pages smaller than the block, each row's
    page is read.
    """
    i_R = _iota(block_r)
    if block_r > rows_per_page:
        v_R = v0 + i_R
        page_R = pages_ref[s * max_pages + jnp.minimum(v_R // rows_per_page, max_pages - 1)]
        return jnp.where(rank_ok_R, page_R * rows_per_page + v_R % rows_per_page, 0)
    off = v0 % rows_per_page + i_R
    base = s * max_pages + v0 // rows_per_page
    p0 = pages_ref[base]
    p1 = pages_ref[jnp.minimum(base + 1, pages_ref.shape[0] - 1)]
    phys_R = jnp.where(off < rows_per_page, p0 * rows_per_page + off, p1 * rows_per_page + off - rows_per_page)
    return jnp.where(rank_ok_R, phys_R, 0)


def _tile_adapter(tile_slot_ref, rank_ref, tile, g, n_adapters: int):
    """The tile's adapter (clamped to 0 for padding) and its rank on projection `g` (0 for padding)."""
    slot = tile_slot_ref[tile]
    safe = jnp.maximum(slot, 0)
    return safe, jnp.where(slot >= 0, rank_ref[g * n_adapters + safe], 0)


def _shrink_program(perm_ref, tile_start_ref, tile_end_ref, tile_slot_ref, rank_ref, pages_ref, a_row_ref,
                    rows_ref, x_ref, vpart_ref, split, g, tile, *, block_m: int, block_r: int, chunk: int, n_in: int,
                    k_steps: int, n_adapters: int, rows_per_page: int, n_tokens: int, mixed: bool, k_loop: int = 1,
                    done=None, phased: bool = False):
    """Split `split` of projection `g`'s shrink for `tile`; `done(g, tile)` runs after its partial is stored.

    The split covers `k_loop * k_steps` K chunks: `k_loop` steps of a loop (a static int, or a traced one
    read at run time), each `k_steps` unrolled chunks. `phased`: the tile's rows and the adapter's first row
    are read beside its rank (not after the rank test), and each loop step reads every chunk's page-table
    entries, then issues every chunk's x and A loads, then does the dots, so no chunk's loads wait on an
    earlier chunk's dot (the default interleaves page read, loads and dot chunk by chunk)."""
    safe, rank = _tile_adapter(tile_slot_ref, rank_ref, tile, g, n_adapters)
    max_pages = pages_ref.shape[0] // n_adapters

    def metadata():
        rows_M, row_ok_M = tile_rows(perm_ref, tile_start_ref, tile_end_ref, tile, block_m=block_m,
                                     n_tokens=n_tokens)
        return rows_M, row_ok_M, a_row_ref[g * n_adapters + safe]

    early = metadata() if phased else None

    @pl.when(rank > 0)
    def _():
        rows_M, row_ok_M, a_first = early if phased else metadata()
        rank_ok_R = _iota(block_r) < rank
        precision = lax.Precision.HIGHEST if x_ref.dtype == jnp.float32 else None  # fp32: no TF32

        def chunk_rows(i, u):
            j_raw = (split * k_loop + i) * k_steps + u
            ok = j_raw < n_in
            j = jnp.minimum(j_raw, n_in - 1)
            phys_R = paged_row_ids(pages_ref, safe, max_pages, a_first + j * rank, rank_ok_R,
                                   rows_per_page=rows_per_page, block_r=block_r)
            return j, ok, phys_R

        def chunk_loads(j, ok, phys_R):
            at_RxC = plgpu.load(rows_at(rows_ref, (), phys_R, 0, chunk, mixed=mixed),
                                mask=jnp.broadcast_to((rank_ok_R & ok)[:, None], (block_r, chunk)), other=0)
            x_MxC = plgpu.load(rows_at(x_ref, (), rows_M, j * chunk, chunk, mixed=mixed),
                               mask=jnp.broadcast_to((row_ok_M & ok)[:, None], (block_m, chunk)), other=0)
            return x_MxC, at_RxC

        def dot(acc_MxR, x_MxC, at_RxC):
            return acc_MxR + lax.dot_general(x_MxC, at_RxC, (((1,), (1,)), ((), ())), precision=precision,
                                             preferred_element_type=jnp.float32)

        def chunks(i, acc_MxR):
            if phased:
                ids = [chunk_rows(i, u) for u in range(k_steps)]
                for loads in [chunk_loads(*c) for c in ids]:
                    acc_MxR = dot(acc_MxR, *loads)
                return acc_MxR
            for u in range(k_steps):  # unrolled: every chunk's loads issue together
                acc_MxR = dot(acc_MxR, *chunk_loads(*chunk_rows(i, u)))
            return acc_MxR

        acc_MxR = jnp.zeros((block_m, block_r), jnp.float32)
        static_one = isinstance(k_loop, int) and k_loop == 1  # a traced k_loop: run-time splits (`split_counts`)
        acc_MxR = chunks(0, acc_MxR) if static_one else lax.fori_loop(0, k_loop, chunks, acc_MxR)
        plgpu.store(rows_at(vpart_ref, (g, split), rows_M, 0, block_r, mixed=mixed), acc_MxR,
                    mask=jnp.broadcast_to(row_ok_M[:, None], (block_m, block_r)))
        if done is not None:
            done(g, tile)


def _tile_loop(program, p, used_ref, tile_programs: int) -> None:
    """`program(tile)` for the used tiles `p, p + tile_programs, ...` (below `used_ref[0]`): a program of the
    tile axis loops over real tiles instead of one program per bound tile (`tile_programs` > 0)."""
    n_iter = jnp.maximum((used_ref[0] - p + tile_programs - 1) // tile_programs, 0)

    def body(i, carry):
        program(p + i * tile_programs)
        return carry

    lax.fori_loop(0, n_iter, body, 0)


def _flat_loop(program, q, used_ref, n_first, n_programs: int) -> None:
    """`program(first, tile)` for the items `q, q + n_programs, ...` of the `used_ref[0] x n_first` items
    (first-axis program fastest): the tile loop flattened over both grid axes (`flat=True`). `n_first` may
    be traced (run-time splits)."""
    n_items = used_ref[0] * n_first
    n_iter = jnp.maximum((n_items - q + n_programs - 1) // n_programs, 0)

    def body(i, carry):
        item = q + i * n_programs
        program(item % n_first, item // n_first)
        return carry

    lax.fori_loop(0, n_iter, body, 0)


def _shrink_kernel(*refs, n_groups: int, tile_programs: int = 0, flat_first: int = 0, run_time_splits: bool = False,
                   **static):
    a, p = pl.program_id(0), pl.program_id(1)  # read here: interpret mode cannot discharge one in a loop
    split, g = a // n_groups, a % n_groups
    if not tile_programs:
        _shrink_program(*refs, split, g, p, **static)
        return
    if run_time_splits:  # flattened loop over (split x projection, used tile), splits and steps read here
        prog_refs, used_ref, counts_ref = refs[:9] + refs[11:], refs[9], refs[10]
        n_splits, steps = counts_ref[0], counts_ref[1]
        static = {**static, "k_loop": steps}
        _flat_loop(lambda a, tile: _shrink_program(*prog_refs, a // n_groups, a % n_groups, tile, **static), p,
                   used_ref, n_splits * n_groups, tile_programs)
        return
    prog_refs, used_ref = refs[:9] + refs[10:], refs[9]
    if flat_first:
        _flat_loop(lambda a, tile: _shrink_program(*prog_refs, a // n_groups, a % n_groups, tile, **static), p,
                   used_ref, flat_first, tile_programs)
        return
    _tile_loop(lambda tile: _shrink_program(*prog_refs, split, g, tile, **static), p, used_ref, tile_programs)


def _expand_block(perm_ref, tile_start_ref, tile_end_ref, tile_slot_ref, rank_ref, pages_ref, b_row_ref,
                  rows_ref, vpart_ref, y_ref, o_ref, nblk, tile, *, g: int, block_m: int, block_r: int, chunk: int,
                  n_out: int, n_steps: int, k_splits: int, n_adapters: int, rows_per_page: int, n_tokens: int,
                  mixed: bool, wait=None, wait_loads: str = "volatile", phased: bool = False):
    """Program `(nblk, tile)` of projection `g` (static): `n_steps` chunks of `y_g += v_g @ B_g`.

    `wait` (the one-launch kernel: returns once the tile's shrink is done): B and y are
    loaded before it, the partials after, as `wait_loads` says: "volatile" loads, or "cg"
    loads (cached in L2 only, which other SMs' stores reach; never a stale L1 line either), one a split;
    or "block": one volatile load of every split's partial, summed after (`_partials_block`).
    `phased` (the split pair): the tile's rows and the adapter's first B row are read beside its rank, and
    every chunk's B and y loads issue before the partials are summed and the dots done (as after a wait).
    """
    safe, rank = _tile_adapter(tile_slot_ref, rank_ref, tile, g, n_adapters)
    max_pages = pages_ref.shape[0] // n_adapters

    def metadata():
        return tile_rows(perm_ref, tile_start_ref, tile_end_ref, tile, block_m=block_m, n_tokens=n_tokens)

    early = (*metadata(), b_row_ref[g * n_adapters + safe]) if phased else None

    @pl.when(rank > 0)
    def _():
        rows_M, row_ok_M = early[:2] if phased else metadata()
        rank_ok_R = _iota(block_r) < rank
        precision = lax.Precision.HIGHEST if y_ref.dtype == jnp.float32 else None

        def v_sum():
            vmask_MxR = row_ok_M[:, None] & rank_ok_R[None, :]
            v_MxR = jnp.zeros((block_m, block_r), jnp.float32)
            # After a wait the partials are other programs' stores of this launch: never read from a
            # stale L1 line.
            fresh = {} if wait is None else dict(volatile=True) if wait_loads != "cg" else dict(cache_modifier=".cg")
            if wait is not None and wait_loads == "block" and k_splits > 1:
                return _partials_block(vpart_ref, g, rows_M, vmask_MxR, k_splits, block_r, **fresh).astype(
                    rows_ref.dtype)
            for s in range(k_splits):
                v_MxR += plgpu.load(rows_at(vpart_ref, (g, s), rows_M, 0, block_r, mixed=mixed), mask=vmask_MxR,
                                    other=0.0, **fresh)
            return v_MxR.astype(rows_ref.dtype)

        def b_rows(b_first, u):
            j_raw = nblk * n_steps + u
            ok = j_raw < n_out
            j = jnp.minimum(j_raw, n_out - 1)
            phys_R = paged_row_ids(pages_ref, safe, max_pages, b_first + j * rank, rank_ok_R,
                                   rows_per_page=rows_per_page, block_r=block_r)
            return j, ok, phys_R

        def load_b(b_first, u):
            return b_load(*b_rows(b_first, u))

        def b_load(j, ok, phys_R):
            b_RxC = plgpu.load(rows_at(rows_ref, (), phys_R, 0, chunk, mixed=mixed),
                               mask=jnp.broadcast_to((rank_ok_R & ok)[:, None], (block_r, chunk)), other=0)
            return j, b_RxC, jnp.broadcast_to((row_ok_M & ok)[:, None], (block_m, chunk))

        def load_y(j, ymask_MxC):
            return plgpu.load(rows_at(y_ref, (), rows_M, j * chunk, chunk, mixed=mixed), mask=ymask_MxC, other=0)

        def add(v_MxR, j, b_RxC, ymask_MxC, y_MxC=None):
            d_MxC = jnp.dot(v_MxR, b_RxC, precision=precision, preferred_element_type=jnp.float32)
            if y_MxC is None:
                y_MxC = load_y(j, ymask_MxC)
            plgpu.store(rows_at(o_ref, (), rows_M, j * chunk, chunk, mixed=mixed),
                        (y_MxC.astype(jnp.float32) + d_MxC).astype(y_MxC.dtype), mask=ymask_MxC)

        if wait is None and not phased:  # the split pair: the partials are ready
            v_MxR = v_sum()
            b_first = b_row_ref[g * n_adapters + safe]
            for u in range(n_steps):
                add(v_MxR, *load_b(b_first, u))
        else:  # one launch: this program's B and y loads overlap the shrink still running (or `phased`)
            b_first = early[2] if phased else b_row_ref[g * n_adapters + safe]
            if phased:  # every chunk's page-table entries, then every chunk's loads
                chunks = [b_load(*ids) for ids in [b_rows(b_first, u) for u in range(n_steps)]]
            else:
                chunks = [load_b(b_first, u) for u in range(n_steps)]
            chunks = [(j, b_RxC, ymask_MxC, load_y(j, ymask_MxC)) for j, b_RxC, ymask_MxC in chunks]
            if wait is not None:
                wait(g, tile)
            v_MxR = v_sum()
            for chunk_args in chunks:
                add(v_MxR, *chunk_args)


PARTIALS_BLOCK_ELEMS = 4096  # fp32 elements a program loads at once in `_partials_block` (16 KiB)


def _partials_block(vpart_ref, g, rows_M, vmask_MxR, k_splits: int, block_r: int, **load_kw):
    """`sum_s vpart[g, s, rows_M, :block_r]` in `[KG, M, R]` block loads of KG splits each, each summed over
    its splits (KG: a power of two, at most `PARTIALS_BLOCK_ELEMS` elements a block).

    Loaded one split at a time, each partial is converted to the accumulator's layout through shared memory
    before the next load issues, so the loads wait one after another (session 24, `sass_global_waits`: 16 of
    the one launch's 33 waits at 16 splits). A block load puts KG of them in flight at once."""
    M = rows_M.shape[0]
    KS = 1 << (k_splits - 1).bit_length()
    KG = max(1, min(KS, PARTIALS_BLOCK_ELEMS // (M * block_r)))
    KG = 1 << (KG.bit_length() - 1)  # a power of two (Triton block shapes)
    shape = (KG, M, block_r)
    r_KxMxR = jnp.broadcast_to(rows_M[None, :, None], shape)
    c_KxMxR = jnp.broadcast_to(_iota(block_r)[None, None, :], shape)
    v_MxR = jnp.zeros((M, block_r), jnp.float32)
    for first in range(0, k_splits, KG):
        s_K = first + _iota(KG)
        s_KxMxR = jnp.broadcast_to(jnp.minimum(s_K, k_splits - 1)[:, None, None], shape)
        mask_KxMxR = (s_K < k_splits)[:, None, None] & vmask_MxR[None]
        part_KxMxR = plgpu.load(vpart_ref.at[(g, s_KxMxR, r_KxMxR, c_KxMxR)], mask=mask_KxMxR, other=0.0,
                                **load_kw)
        v_MxR += part_KxMxR.sum(axis=0)
    return v_MxR


def _expand_programs(meta_refs, y_refs, o_refs, n, tile, *, n_out: tuple[int, ...], n_steps: tuple[int, ...],
                     wait=None, **static):
    """Program `(n, tile)` of the expand, sent to its projection's static block range `[first_g, first_g + n_blocks_g)`."""
    G = len(n_out)
    first = 0
    for g in range(G):
        n_blocks = -(-n_out[g] // n_steps[g])
        body = functools.partial(_expand_block, *meta_refs, y_refs[g], o_refs[g], n - first, tile, g=g,
                                 n_out=n_out[g], n_steps=n_steps[g], wait=wait, **static)
        if G == 1:
            body()
        else:
            pl.when((n >= first) & (n < first + n_blocks))(body)
        first += n_blocks


def _expand_kernel(*refs, n_out: tuple[int, ...], tile_programs: int = 0, flat_first: int = 0, **static):
    G = len(n_out)
    # program ids read here: interpret mode cannot discharge one inside a `pl.when`
    n, p = pl.program_id(0), pl.program_id(1)
    if not tile_programs:
        _expand_programs(refs[:9], refs[9 : 9 + G], refs[9 + G :], n, p, n_out=n_out, **static)
        return
    used_ref, y_refs, o_refs = refs[9], refs[10 : 10 + G], refs[10 + G :]
    if flat_first:
        _flat_loop(lambda n, tile: _expand_programs(refs[:9], y_refs, o_refs, n, tile, n_out=n_out, **static), p,
                   used_ref, flat_first, tile_programs)
        return
    _tile_loop(lambda tile: _expand_programs(refs[:9], y_refs, o_refs, n, tile, n_out=n_out, **static), p, used_ref,
               tile_programs)


def wait_for_count(count_ref, idx, target: int, *, gpu_sync: bool) -> None:
    """Spin until `count_ref[idx] >= target` (other programs of this launch raise it), then a CTA barrier.

    The poll is an acq_rel atomic (+0), not a load: a loop of loads whose result nothing
    uses is dead code, and JAX dropped it (session 10: no wait on the GPU).
    `gpu_sync=False` (interpret mode, which runs programs in order and has no barrier, and
    cannot discharge the loop) polls once.
    """
    idx = jnp.asarray(idx, jnp.int32)  # traced: interpret mode's atomic takes no Python int
    poll = lambda _: plgpu.atomic_add(count_ref, idx, jnp.zeros((), jnp.int32))  # noqa: E731
    if gpu_sync:
        lax.while_loop(lambda c: c < target, poll, poll(None))
        plgpu.debug_barrier()
    else:
        poll(None)


def _one_launch_kernel(*refs, n_out: tuple[int, ...], n_steps: tuple[int, ...], n_groups: int, n_tiles: int,
                       k_splits: int, n_shrink: int, n_blocks: int, shrink: dict, expand: dict, gpu_sync: bool):
    """Programs `[0, n_shrink)` are the shrink's (split-major within a tile), the rest the expand's.

    Shrink program done: a CTA barrier, then +1 on its (projection, tile) counter (an
    acq_rel atomic, so the partial's stores are visible first). Expand program: its B
    and y loads, then it polls the counter (acq_rel atomics adding 0) until all
    `k_splits` are in, then a barrier, then the partials (volatile or L2-only loads: `wait_loads`). Waiting cannot
    deadlock: programs start in id order, so every shrink program has started (and
    needs no other) before any expand program waits. `gpu_sync=False` (interpret mode,
    which has no barrier and runs programs one after another) leaves the barriers and the
    poll loop out.
    """
    G = n_groups
    (perm_ref, tile_start_ref, tile_end_ref, tile_slot_ref, rank_ref, pages_ref, a_row_ref, b_row_ref, rows_ref,
     x_ref) = refs[:10]
    y_refs = refs[11 : 11 + G]
    vpart_ref, count_ref = refs[11 + G], refs[12 + G]
    o_refs = refs[13 + G :]
    p = pl.program_id(0)

    def done(g, tile):
        if gpu_sync:
            plgpu.debug_barrier()
        plgpu.atomic_add(count_ref, g * n_tiles + tile, jnp.ones((), jnp.int32))

    def wait(g, tile):
        wait_for_count(count_ref, g * n_tiles + tile, k_splits, gpu_sync=gpu_sync)

    @pl.when(p < n_shrink)
    def _():
        a = p % (k_splits * G)
        _shrink_program(perm_ref, tile_start_ref, tile_end_ref, tile_slot_ref, rank_ref, pages_ref, a_row_ref,
                        rows_ref, x_ref, vpart_ref, a // G, a % G, p // (k_splits * G), done=done, **shrink)

    @pl.when(p >= n_shrink)
    def _():
        q = p - n_shrink
        meta = (perm_ref, tile_start_ref, tile_end_ref, tile_slot_ref, rank_ref, pages_ref, b_row_ref, rows_ref,
                vpart_ref)
        _expand_programs(meta, y_refs, o_refs, q % n_blocks, q // n_blocks, n_out=n_out, n_steps=n_steps, wait=wait,
                         k_splits=k_splits, **expand)


def _tile_programs(tile_programs: int, used_tiles, n_tiles: int, n_first: int, flat: bool):
    """The grid `(first axis, tile axis)`, the static loop arguments of the kernel (programs on the tile
    axis; `flat_first`: the first axis's size when the loop is flattened, else 0), and the extra kernel
    input of the tile loop (none without it)."""
    if tile_programs < 0:
        raise ValueError(f"tile_programs must be >= 0, got {tile_programs}")
    if not tile_programs:
        if flat:
            raise ValueError("flat=True needs tile_programs > 0 (the programs of the flattened loop)")
        return (n_first, n_tiles), dict(tile_programs=0, flat_first=0), ()
    used = jnp.full((1,), n_tiles, jnp.int32) if used_tiles is None else jnp.reshape(used_tiles, (1,)).astype(jnp.int32)
    if flat:
        P = min(tile_programs, n_first * n_tiles)
        return (1, P), dict(tile_programs=P, flat_first=n_first), (used,)
    P = min(tile_programs, n_tiles)
    return (n_first, P), dict(tile_programs=P, flat_first=0), (used,)


def _check(block_m: int, block_r: int, chunk: int, h: int, name: str) -> None:
    for what, v in (("block_m", block_m), ("r_block", block_r), ("chunk C", chunk)):
        if v < 16 or v & (v - 1):
            raise ValueError(f"{what} must be a power of two >= 16, got {v}")
    if h % chunk:
        raise ValueError(f"{name}={h} must be a multiple of the pool's row width C={chunk}")


def _k_split(n_in: int, k_steps: int, k_loop: int) -> tuple[int, int, int]:
    """K chunks per loop step and loop steps per shrink program, clamped to the `n_in` chunks, and the splits."""
    if k_loop < 1:
        raise ValueError(f"k_loop must be >= 1, got {k_loop}")
    k_steps = max(1, min(k_steps, n_in))
    k_loop = min(k_loop, -(-n_in // k_steps))
    return k_steps, k_loop, -(-n_in // (k_steps * k_loop))


def run_time_split_plan(H_in: int, chunk: int, k_steps: int | None, max_splits: int) -> tuple[int, int, int]:
    """Static part of run-time K splits: (K chunks per loop step, loop steps over all of K, the most splits
    the partials buffer holds). `k_steps` None: `MIN_K_STEPS`, short steps, so that few used tiles can
    take many splits."""
    if max_splits < 1:
        raise ValueError(f"max_splits must be >= 1, got {max_splits}")
    n_in = H_in // chunk
    k_steps = max(1, min(MIN_K_STEPS if k_steps is None else k_steps, n_in))
    n_steps = -(-n_in // k_steps)
    return k_steps, n_steps, min(max_splits, n_steps)


def run_time_split_counts(used_tiles, n_groups: int, n_steps: int, max_splits: int, target: int) -> jax.Array:
    """int32 `[2]`: the K splits of this call and the loop steps of each, from the metadata's used tiles:
    about `target / (used tiles x G)` splits, 1 to `max_splits`, each a whole number of the `n_steps` loop
    steps (the last split may have fewer), so that few used tiles still give about `target` programs'
    work and many get few splits (fewer partials)."""
    used = jnp.maximum(jnp.reshape(jnp.asarray(used_tiles, jnp.int32), ()), 1)
    want = jnp.clip(-(-target // (used * n_groups)), 1, max_splits)
    steps = -(-n_steps // want)
    return jnp.stack([-(-n_steps // steps), steps]).astype(jnp.int32)


def _modes(interpret: bool | None, mixed_index: bool | None) -> tuple[bool, bool]:
    interpret = default_interpret() if interpret is None else interpret
    return interpret, (not interpret) if mixed_index is None else mixed_index


def sgmv_shrink_paged_group(x_TxI, rows_NxC, pages_SxP, rank_GxS, a_row_GxS, perm_T, tile_start, tile_end,
                            tile_slot, *, rows_per_page: int, r_block: int, block_m: int,
                            k_steps: int | None = None, active_tiles: int | None = None, num_warps: int = 4,
                            num_stages: int = 1, interpret: bool | None = None, mixed_index: bool | None = None,
                            tile_programs: int = 0, used_tiles=None, k_loop: int = 1, flat: bool = False,
                            max_splits: int = 0, split_counts=None, phased: bool = False):
    """Split-K shrink of G projections sharing x; returns `vpart [G, k_splits, T, r_block]` fp32 (module doc).

    `k_steps` K chunks per loop step, unrolled (None: `default_k_steps` over G x `active_tiles`,
    a static bound on the tiles holding rows, default NT), `k_loop` loop steps per program;
    `k_splits = ceil(H_in / C / (k_steps * k_loop))`.
    `tile_programs` > 0: at most that many programs along the tile axis, each looping over the
    used tiles (`used_tiles`, a scalar int32: the metadata's count; None: all NT) with that
    stride, so padding tiles launch no program. 0: one program per tile of the bound NT.
    `flat`: `tile_programs` programs in all, looping over (split x projection, used tile) items.
    `max_splits` > 0 (with `flat`): run-time K splits. `split_counts` (`run_time_split_counts`: this call's
    splits and loop steps per split, of `k_steps` chunks each) picks them; the result has `max_splits`
    splits, and those past `split_counts[0]` are not written (the caller masks them; `k_loop` is unused).
    `phased`: each program reads its metadata and page-table entries before any weight load, and issues
    every chunk's loads before its dots (`_shrink_program`); the same result.
    """
    T, H_in = x_TxI.shape
    G, S = rank_GxS.shape
    C = rows_NxC.shape[1]
    _check(block_m, r_block, C, H_in, "H_in")
    n_in = H_in // C
    NT = tile_slot.shape[0]
    interpret, mixed = _modes(interpret, mixed_index)
    statics = dict(block_m=block_m, block_r=r_block, chunk=C, n_in=n_in, n_groups=G, n_adapters=S,
                   rows_per_page=rows_per_page, n_tokens=T, mixed=mixed, phased=phased)
    if max_splits:
        if not (flat and tile_programs > 0) or split_counts is None:
            raise ValueError("max_splits (run-time splits) needs flat=True, tile_programs > 0 and split_counts")
        k_steps, n_steps, most = run_time_split_plan(H_in, C, k_steps, max_splits)
        if most != max_splits:
            raise ValueError(f"max_splits={max_splits}: K has only {n_steps} loop steps of {k_steps} chunks")
        k_splits = max_splits
        grid, loop, loop_args = _tile_programs(tile_programs, used_tiles, NT, k_splits * G, flat)
        statics.update(k_steps=k_steps, run_time_splits=True)
        loop_args = (*loop_args, jnp.reshape(jnp.asarray(split_counts, jnp.int32), (2,)))
    else:
        if k_steps is None:
            k_steps = default_k_steps(n_in, G * (active_tiles or tile_slot.shape[0]))
        k_steps, k_loop, k_splits = _k_split(n_in, k_steps, k_loop)
        grid, loop, loop_args = _tile_programs(tile_programs, used_tiles, NT, k_splits * G, flat)
        statics.update(k_steps=k_steps, k_loop=k_loop)
    return pl.pallas_call(
        functools.partial(_shrink_kernel, **statics, **loop),
        out_shape=jax.ShapeDtypeStruct((G, k_splits, T, r_block), jnp.float32),
        grid=grid,
        compiler_params=compiler_params(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name=f"sgmv_shrink_paged_x{G}",
    )(perm_T, tile_start, tile_end, tile_slot, rank_GxS.reshape(-1), pages_SxP.reshape(-1), a_row_GxS.reshape(-1),
      rows_NxC, x_TxI, *loop_args)


def sgmv_expand_paged_group(ys_TxO, vpart_GxKxTxR, rows_NxC, pages_SxP, rank_GxS, b_row_GxS, perm_T, tile_start,
                            tile_end, tile_slot, *, rows_per_page: int, block_m: int, n_steps: int = 2,
                            num_warps: int = 4, num_stages: int = 1, interpret: bool | None = None,
                            mixed_index: bool | None = None, tile_programs: int = 0,
                            used_tiles=None, flat: bool = False, phased: bool = False) -> tuple[jax.Array, ...]:
    """Expand G projections into their outputs `ys_TxO` (a sequence, each aliased in place); returns them.

    `n_steps` N chunks per program (fewer for an output narrower than that). `tile_programs`,
    `used_tiles`, `flat`, `phased`: as `sgmv_shrink_paged_group` (items: N block, used tile; `phased`: every
    B and y load before the partials and the dots, `_expand_block`).
    """
    ys_TxO = tuple(ys_TxO)
    G, k_splits, T, R = vpart_GxKxTxR.shape
    C = rows_NxC.shape[1]
    if len(ys_TxO) != G or rank_GxS.shape[0] != G:
        raise ValueError(f"{len(ys_TxO)} outputs and {rank_GxS.shape[0]} rank rows for {G} partials")
    for y in ys_TxO:
        _check(block_m, R, C, y.shape[1], "H_out")
    n_out = tuple(y.shape[1] // C for y in ys_TxO)
    steps = tuple(max(1, min(n_steps, n)) for n in n_out)
    interpret, mixed = _modes(interpret, mixed_index)
    n_blocks = sum(-(-n // s) for n, s in zip(n_out, steps))
    grid, loop, loop_args = _tile_programs(tile_programs, used_tiles, tile_slot.shape[0], n_blocks, flat)
    kernel = functools.partial(_expand_kernel, n_out=n_out, n_steps=steps, block_m=block_m, block_r=R, chunk=C,
                               k_splits=k_splits, n_adapters=rank_GxS.shape[1], rows_per_page=rows_per_page,
                               n_tokens=T, mixed=mixed, phased=phased, **loop)
    args = (perm_T, tile_start, tile_end, tile_slot, rank_GxS.reshape(-1), pages_SxP.reshape(-1),
            b_row_GxS.reshape(-1), rows_NxC, vpart_GxKxTxR, *loop_args, *ys_TxO)
    return pl.pallas_call(
        kernel,
        out_shape=tuple(jax.ShapeDtypeStruct(y.shape, y.dtype) for y in ys_TxO),
        grid=grid,
        input_output_aliases={len(args) - G + g: g for g in range(G)},
        compiler_params=compiler_params(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name=f"sgmv_expand_paged_x{G}",
    )(*args)


def sgmv_paged_group_one_launch(ys_TxO, x_TxI, rows_NxC, pages_SxP, rank_GxS, a_row_GxS, b_row_GxS, perm_T,
                                tile_start, tile_end, tile_slot, *, rows_per_page: int, r_block: int, block_m: int,
                                k_steps: int | None = None, active_tiles: int | None = None, n_steps: int = 2,
                                num_warps: int = 4, num_stages: int = 1, interpret: bool | None = None,
                                mixed_index: bool | None = None, k_loop: int = 1,
                                wait_loads: str = "block", phased: bool = False) -> tuple[jax.Array, ...]:
    """The split pair's shrink and expand as one launch; returns the outputs `ys_TxO`.

    Same programs and results as `sgmv_shrink_paged_group` then `sgmv_expand_paged_group`
    (the partials still go through HBM), on a 1-D grid: the shrink's programs first,
    then the expand's, which wait on a per-(projection, tile) counter of finished
    splits (`_one_launch_kernel`). One launch fewer, and each expand program's B and y
    loads overlap the shrink instead of following it. `wait_loads`: how the expand reads the
    partials after its wait, "volatile", "cg" or "block" (`_expand_block`; "block", the default, took 0.63-0.69x
    the device time of "volatile" at 1-16 tokens on an H100, session 25). `phased`: as `sgmv_shrink_paged_group`.
    """
    if wait_loads not in ("volatile", "cg", "block"):
        raise ValueError(f"wait_loads must be 'volatile', 'cg' or 'block', got {wait_loads!r}")
    ys_TxO = tuple(ys_TxO)
    T, H_in = x_TxI.shape
    G, S = rank_GxS.shape
    C = rows_NxC.shape[1]
    NT = tile_slot.shape[0]
    if len(ys_TxO) != G:
        raise ValueError(f"{len(ys_TxO)} outputs and {G} rank rows")
    _check(block_m, r_block, C, H_in, "H_in")
    for y in ys_TxO:
        _check(block_m, r_block, C, y.shape[1], "H_out")
    n_in = H_in // C
    if k_steps is None:
        k_steps = default_k_steps(n_in, G * (active_tiles or NT))
    k_steps, k_loop, k_splits = _k_split(n_in, k_steps, k_loop)
    n_out = tuple(y.shape[1] // C for y in ys_TxO)
    steps = tuple(max(1, min(n_steps, n)) for n in n_out)
    n_blocks = sum(-(-n // st) for n, st in zip(n_out, steps))
    interpret, mixed = _modes(interpret, mixed_index)
    common = dict(block_m=block_m, block_r=r_block, chunk=C, n_adapters=S, rows_per_page=rows_per_page, n_tokens=T,
                  mixed=mixed, phased=phased)
    kernel = functools.partial(_one_launch_kernel, n_out=n_out, n_steps=steps, n_groups=G, n_tiles=NT,
                               k_splits=k_splits, n_shrink=k_splits * G * NT, n_blocks=n_blocks,
                               shrink=dict(n_in=n_in, k_steps=k_steps, k_loop=k_loop, **common),
                               expand=dict(wait_loads=wait_loads, **common),
                               gpu_sync=not interpret)
    # At least COUNTERS_MIN entries (only the first G x NT are used). H200 profile (session 22): one-token calls
    # with one projection (a 1-entry buffer) each paid a 0.9 us `memcpy32_post`, 8-token calls (8 entries) a
    # zero-fill shared by the whole chain (0.03 us a call), as if XLA copies a 1-element zero constant into the
    # aliased buffer but broadcasts larger ones. The padding is meant to give every call the broadcast; not yet
    # re-profiled.
    n_counters = max(G * NT, COUNTERS_MIN)
    args = (perm_T, tile_start, tile_end, tile_slot, rank_GxS.reshape(-1), pages_SxP.reshape(-1),
            a_row_GxS.reshape(-1), b_row_GxS.reshape(-1), rows_NxC, x_TxI, jnp.zeros((n_counters,), jnp.int32), *ys_TxO)
    out = pl.pallas_call(
        kernel,
        out_shape=(jax.ShapeDtypeStruct((G, k_splits, T, r_block), jnp.float32),
                   jax.ShapeDtypeStruct((n_counters,), jnp.int32),
                   *(jax.ShapeDtypeStruct(y.shape, y.dtype) for y in ys_TxO)),
        grid=((k_splits * G + n_blocks) * NT,),
        input_output_aliases={10: 1, **{11 + g: 2 + g for g in range(G)}},
        compiler_params=compiler_params(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name=f"sgmv_paged_one_launch_x{G}",
    )(*args)
    return tuple(out[2:])


# ----------------------------------------------------------------------------- jnp reference


def read_paged(rows_NxC, pages_SxP, rank_S, first_S, width: int, *, rows_per_page: int, r_max: int):
    """Dense `[S, r_max, width]` of each adapter's chunk-major matrix starting at virtual row `first_S`.

    The jnp read of the page layout (a copy): zero past each adapter's rank and past `width`.
    """
    c = rows_NxC.shape[1]
    n = -(-width // c)
    i_R = jnp.arange(r_max)
    v_SxNxR = first_S[:, None, None] + jnp.arange(n)[None, :, None] * rank_S[:, None, None] + i_R[None, None, :]
    page_SxNxR = jnp.take_along_axis(pages_SxP, (v_SxNxR // rows_per_page).reshape(v_SxNxR.shape[0], -1), axis=1,
                                     mode="clip").reshape(v_SxNxR.shape)
    m_SxNxRxC = rows_NxC[page_SxNxR * rows_per_page + v_SxNxR % rows_per_page]
    m_SxNxRxC = jnp.where((i_R[None, :] < rank_S[:, None])[:, None, :, None], m_SxNxRxC, 0)
    return m_SxNxRxC.transpose(0, 2, 1, 3).reshape(-1, r_max, n * c)[:, :, :width]


def paged_group_reference(ys_TxO, x_TxI, rows_NxC, pages_SxP, rank_GxS, a_row_GxS, b_row_GxS, slot_T, *,
                          rows_per_page: int, r_max: int) -> tuple[jax.Array, ...]:
    """jnp: `y_g + (x @ A_g[slot]) @ B_g[slot]` per token and projection (slot -1 unchanged), fp32 accumulate."""
    has_T = slot_T >= 0
    s_T = jnp.maximum(slot_T, 0)
    out = []
    for g, y_TxO in enumerate(ys_TxO):
        read = functools.partial(read_paged, rows_NxC, pages_SxP, rank_GxS[g], rows_per_page=rows_per_page,
                                 r_max=r_max)
        at_SxRxI = read(a_row_GxS[g], x_TxI.shape[1])
        b_SxRxO = read(b_row_GxS[g], y_TxO.shape[1])
        v_TxR = jnp.einsum("ti,tri->tr", x_TxI, at_SxRxI[s_T], preferred_element_type=jnp.float32)
        d_TxO = jnp.einsum("tr,tro->to", v_TxR.astype(b_SxRxO.dtype), b_SxRxO[s_T],
                           preferred_element_type=jnp.float32)
        out.append((y_TxO.astype(jnp.float32) + jnp.where(has_T[:, None], d_TxO, 0.0)).astype(y_TxO.dtype))
    return tuple(out)

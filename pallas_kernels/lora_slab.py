"""LoRA on a dense slab of the batch's adapters: a masked shrink GEMM, then the base GEMM with K extended.

Why: at decode the gathered kernels (`sgmv_paged`) are latency-bound. Each program waits on a
chain of table and row loads for a few KB (benchmarks/NOTES_lora_kernels.md, sessions 8-13),
and Triton cannot pipeline a load whose address comes from another load in the same loop
step. Here the batch's adapters sit side by side in dense operands (the slab,
`slora_jax.memory.slab`, kept by the engine and written only when an adapter joins the batch), so every load is at an
address known from the loop index and both kernels are plain pipelined GEMMs:

    v_g = mask_g(x @ A_g)            [T, P]   each token keeps only its own adapter's rows
    y_g = x @ W_g + v_g @ B_g        [T, N_g] one K loop over H_in, then one over P

The shrink computes every token against every adapter in the slab (T x P dot products, cheap
at decode sizes) and reads A once; the expand is P more rows of the base GEMM's K.

Contract
--------
G projections share x (q, k, v; or one). T <= 256 tokens, P slab rows (a multiple of
`block_p`), of which the first `n_rows` are used.
  x       `[T, H_in]`, bf16 or fp32 (every operand's dtype).
  a_slab  `[M, H_in, P]`: column p of projection `offset + g`'s A (scale folded into B); M >= G,
          e.g. every layer's projections stacked, `offset` = layer G (no slice is copied).
  lo, hi  `[G, T]` int32: token t keeps slab rows `[lo, hi)` of projection g (its adapter's
          `rank` rows; lo = hi: none, e.g. no adapter or not targeted).
  n_rows  int32 scalar, used slab rows (a multiple of `block_p` is read; the rest is masked
          by lo/hi anyway). Programs and loop steps past it do nothing, so one compiled
          kernel serves every batch.
  `slab_shrink` returns `v [G, T, P]` in x's dtype (fp32 accumulation, rounded once, as
  the split pair rounds v), zero outside each token's rows (past `n_rows` too, without
  reading A there).
  ws      G base weights `[H_in, N_g]`; b_slab `[M, P, N_max]`: row p of projection `offset + g`'s B.
  `linear_slab` returns `y_g [T, N_g]`: `x @ W_g + v_g @ B_g` with fp32 accumulation of both.
References: `slab_shrink_reference`, `linear_slab_reference`.

Work. `slab_shrink`: one program per (projection, `block_p` slab columns, K split); a K loop over
its share of H_in in `block_k` steps (Triton-pipelined, `num_stages`). `linear_slab`: one program
per (projection, column block, K split), static ranges per projection as in `lora_linear`; the
base K loop, then `ceil(n_rows / block_p)` steps over P (loops with run-time bounds, still
`scf.for`); with K splits, split j takes the j-th share of those base-then-slab steps.
K splits store fp32 partials; each adds 1 to its block's counter (an acq_rel atomic, after a CTA
barrier), and the one that sees the last count sums them (volatile loads), stores the result and
sets the counter back to 0. No program waits on another, so nothing depends on the order programs
start in.
Counters. Every launch takes `counters=`, an int32 workspace that is all zero on entry and is all
zero again when the launch ends (each counter is reset by its block's last program). One such
array, zeroed once and passed to every call (the engine's slab keeps one), saves a launch a call:
without it each call zeroes a fresh array, and on a GPU that is a kernel of its own (~1 µs, plus
the gap to the next kernel). The kernels write the workspace although XLA sees a read-only
operand; that is sound because the calls of one stream run one after another and each leaves
the workspace as it found it. Counters used: the GEMM's column blocks (when its K is split),
then, in `linear_shrink_slab`, the shrink's `G * P / block_p` (when its K is split); a workspace too
small is a ValueError.
Two more launch forms of the same programs: `linear_shrink_slab` runs the shrink's programs in
the plain GEMM's launch (first in the grid; its output v is read by a later launch only), and
`slab_expand` runs the K extension alone, accumulating into given outputs in place.

Measured (session 14, one H200, 7B shapes at 64 tokens of 47 rank-16 adapters, device time;
benchmarks/results/kernels_s14_h200/): q/k/v 47.8 us (shrink 12.4, GEMM with K extended 34.1;
GEMM alone 27.4) against 73.5 for XLA's matmul and the split pair; o 26.7 against 34.3.
Triton rules kept: block sizes are powers of two; every dot is 2-D with both sides >= 16.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels.compat import compiler_params, default_interpret, pl, plgpu
from pallas_kernels.sgmv_shrink import _iota, rows_at

MAX_TOKENS = 256
# Entries of the counter workspace callers keep (`counters=`): the most any launch of up to 16384
# column blocks (G * N / block_n, plus a shrink's G * P / block_p) uses.
COUNTERS = 16384
# Shared memory a program may take (Hopper allows 227 KiB a block), less room for Triton's own scratch.
SMEM_BUDGET = 200 * 1024


def _pow2_ceil(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def _token_rows(n_tokens: int, block_t: int):
    i_T = _iota(block_t)
    ok_T = i_T < n_tokens
    # Rows past T point one past the end: masked on the GPU, dropped by interpret mode's stores.
    return jnp.where(ok_T, i_T, n_tokens), ok_T


def _k_loop(x_ref, lead, w_at, rows_T, ok_T, n_steps, block_k, acc, *, mixed, k0=0):
    """`acc + x[*lead][:, (k0 + k)-th block] @ w_at(k)` for k < `n_steps` (w_at(k): a `[block_k, N]` view)."""
    precision = lax.Precision.HIGHEST if x_ref.dtype == jnp.float32 else None  # fp32: no TF32
    xmask = jnp.broadcast_to(ok_T[:, None], (ok_T.shape[0], block_k))

    def step(k, acc):
        x_TxK = plgpu.load(rows_at(x_ref, lead, rows_T, (k0 + k) * block_k, block_k, mixed=mixed), mask=xmask, other=0)
        return acc + jnp.dot(x_TxK, w_at(k)[...], precision=precision, preferred_element_type=jnp.float32)

    return lax.fori_loop(0, n_steps, step, acc)


def _split_store(part_ref, count_ref, cidx, acc, lead, split, k_splits, rows_T, ok_T, col0, width, store, *,
                 gpu_sync, mixed):
    """`store(sum of the k_splits programs' acc)`, done by whichever of them finishes last.

    Each stores its fp32 partial, then (a CTA barrier first) adds 1 to counter `cidx` with an
    acq_rel atomic; the one that sees `k_splits - 1` reads every partial (volatile loads, past
    L1), stores the sum and sets the counter back to 0. No program waits. One split: `store(acc)`.
    """
    if k_splits == 1:
        store(acc)
        return
    mask = jnp.broadcast_to(ok_T[:, None], acc.shape)
    plgpu.store(rows_at(part_ref, (split, *lead), rows_T, col0, width, mixed=mixed), acc, mask=mask)
    if gpu_sync:
        plgpu.debug_barrier()
    old = plgpu.atomic_add(count_ref, jnp.asarray(cidx, jnp.int32), jnp.ones((), jnp.int32))

    @pl.when(old == k_splits - 1)
    def _():
        total = jnp.zeros(acc.shape, jnp.float32)
        for j in range(k_splits):
            total += plgpu.load(rows_at(part_ref, (j, *lead), rows_T, col0, width, mixed=mixed), mask=mask,
                                other=0.0, volatile=True)
        store(total)
        # Back to zero (every program of this launch has counted): the counters leave the launch as
        # they came, so one zeroed workspace serves every call of a step (`counters=`).
        plgpu.atomic_add(count_ref, jnp.asarray(cidx, jnp.int32), jnp.asarray(-k_splits, jnp.int32))


def _shrink_program(p, scal_ref, lo_ref, hi_ref, x_ref, a_ref, v_ref, part_ref, count_ref, *, n_tokens, block_t,
                    block_p, block_k, h_in, n_pblocks, k_splits, gpu_sync, mixed, count0=0):
    """Program p of the shrink: projection g, slab columns `[p0, p0 + block_p)`, K split `split`
    (its column block's counter: `count0 + g n_pblocks + b`)."""
    g, b, split = p // (n_pblocks * k_splits), p // k_splits % n_pblocks, p % k_splits
    p0 = b * block_p
    ga = scal_ref[1] + g  # this projection's slab in a_ref (a layer's offset into a layer-stacked slab)
    rows_T, ok_T = _token_rows(n_tokens, block_t)
    row_mask = jnp.broadcast_to(ok_T[:, None], (block_t, block_p))

    def store(v_TxP):
        plgpu.store(rows_at(v_ref, (g,), rows_T, p0, block_p, mixed=mixed), v_TxP.astype(v_ref.dtype), mask=row_mask)

    @pl.when((p0 >= scal_ref[0]) & (split == 0))  # zeros past the used rows: a reader with a larger block reads 0
    def _():
        store(jnp.zeros((block_t, block_p), jnp.float32))

    @pl.when(p0 < scal_ref[0])
    def _():
        k_steps = h_in // block_k // k_splits
        acc = _k_loop(x_ref, (), lambda k: a_ref.at[ga, pl.ds((split * k_steps + k) * block_k, block_k),
                                                    pl.ds(p0, block_p)],
                      rows_T, ok_T, k_steps, block_k, jnp.zeros((block_t, block_p), jnp.float32), mixed=mixed,
                      k0=split * k_steps)
        lo_T = plgpu.load(lo_ref.at[g, rows_T], mask=ok_T, other=0)
        hi_T = plgpu.load(hi_ref.at[g, rows_T], mask=ok_T, other=0)
        c_P = p0 + _iota(block_p)
        keep = (c_P[None, :] >= lo_T[:, None]) & (c_P[None, :] < hi_T[:, None])
        _split_store(part_ref, count_ref, count0 + g * n_pblocks + b, jnp.where(keep, acc, 0.0), (g,), split,
                     k_splits, rows_T, ok_T, p0, block_p, store, gpu_sync=gpu_sync, mixed=mixed)


def _scalars(n_rows, offset) -> jax.Array:
    """`[n_rows, offset]` int32, the kernels' run-time scalars."""
    return jnp.stack([jnp.asarray(0 if n_rows is None else n_rows, jnp.int32).reshape(()),
                      jnp.asarray(offset, jnp.int32).reshape(())])


def _check_blocks(**blocks):
    for what, v in blocks.items():
        if v < 16 or v & (v - 1):
            raise ValueError(f"{what} must be a power of two >= 16, got {v}")


def _fit_stages(num_stages: int, stage_bytes: int) -> int:
    """`num_stages`, fewer where that many pipeline buffers of `stage_bytes` overflow `SMEM_BUDGET`
    (at 256 tokens, 3 stages of a 128-deep K step take 240 KiB: a launch error on an H200)."""
    return max(1, min(num_stages, SMEM_BUDGET // stage_bytes))


def _stage_bytes(block_t: int, block_k: int, block_n: int, dtype) -> int:
    """One pipeline stage of a K loop: an x tile `[block_t, block_k]` and a weight tile `[block_k, block_n]`."""
    return (block_t * block_k + block_k * block_n) * jnp.dtype(dtype).itemsize


def _default_splits(n_programs: int, n_k: int, target: int) -> int:
    """The smallest power-of-two K split that gives `target` programs, at most n_k."""
    s = 1
    while n_programs * s < target and s * 2 <= n_k and n_k % (s * 2) == 0:
        s *= 2
    return s


def _unpack(refs, spec):
    """`refs` by name: `spec` is ((name, count), ...) in order; count None gives the ref, else a tuple."""
    out, i = {}, 0
    for name, n in spec:
        out[name] = refs[i] if n is None else tuple(refs[i : i + n])
        i += 1 if n is None else n
    return out


def _shrink_call(x_TxI, a_slab, lo_GxT, hi_GxT, block_p, block_k, k_splits):
    """Checks and static facts of a shrink over `a_slab` (shared by the two launches that run one)."""
    T, H_in = x_TxI.shape
    G, P = lo_GxT.shape[0], a_slab.shape[-1]
    _check_blocks(block_p=block_p, block_k=block_k)
    if a_slab.ndim != 3 or a_slab.shape[1] != H_in or H_in % block_k or P % block_p:
        raise ValueError(f"a_slab {a_slab.shape} does not take x {x_TxI.shape} in blocks of "
                         f"{block_k} (H_in) and {block_p} (P)")
    if lo_GxT.shape != (G, T) or hi_GxT.shape != (G, T):
        raise ValueError(f"lo/hi must be [G={G}, T={T}] int32, got {lo_GxT.shape} / {hi_GxT.shape}")
    n_k = H_in // block_k
    if k_splits < 1:
        raise ValueError(f"k_splits must be >= 1, got {k_splits}")
    k_splits = max(d for d in range(1, min(k_splits, n_k) + 1) if n_k % d == 0)  # at most asked, dividing K
    n_pblocks = P // block_p
    kw = dict(n_tokens=T, block_t=_pow2_ceil(max(16, T)), block_p=block_p, block_k=block_k, h_in=H_in,
              n_pblocks=n_pblocks, k_splits=k_splits)
    outs = (jax.ShapeDtypeStruct((G, T, P), x_TxI.dtype),
            jax.ShapeDtypeStruct((k_splits, G, T, P) if k_splits > 1 else (1, 1, 1, 1), jnp.float32))
    return kw, G * n_pblocks * k_splits, outs, (G * n_pblocks if k_splits > 1 else 0)


def _counters(counters, needed: int) -> jax.Array:
    """The split-K counters of a launch that uses `needed` of them: the caller's workspace, or new zeros."""
    if counters is None:
        return jnp.zeros((max(1, needed),), jnp.int32)
    if counters.ndim != 1 or counters.dtype != jnp.int32 or counters.shape[0] < needed:
        raise ValueError(f"counters must be int32 [>= {needed}] (this launch's split-K counters), got "
                         f"{counters.dtype}{list(counters.shape)}")
    return counters


def _check_tokens(T: int, what: str):
    if not 1 <= T <= MAX_TOKENS:
        raise ValueError(f"{what} takes 1..{MAX_TOKENS} tokens (decode-sized calls), got {T}")


def slab_shrink(x_TxI, a_slab_GxIxP, lo_GxT, hi_GxT, n_rows, offset=0, *, block_p: int = 64, block_k: int = 128,
                k_splits: int = 4, num_warps: int = 4, num_stages: int = 3, interpret: bool | None = None,
                mixed_index: bool | None = None, counters: jax.Array | None = None) -> jax.Array:
    """`v [G, T, P]`: `x @ A_g` keeping, for each token, only slab rows `[lo, hi)` (module doc)."""
    _check_tokens(x_TxI.shape[0], "slab_shrink")
    kw, n_programs, outs, n_counters = _shrink_call(x_TxI, a_slab_GxIxP, lo_GxT, hi_GxT, block_p, block_k, k_splits)
    interpret = default_interpret() if interpret is None else interpret
    mixed = (not interpret) if mixed_index is None else mixed_index

    def kernel(scal_ref, lo_ref, hi_ref, x_ref, a_ref, count_ref, v_ref, part_ref):
        _shrink_program(pl.program_id(0), scal_ref, lo_ref, hi_ref, x_ref, a_ref, v_ref, part_ref, count_ref, **kw,
                        gpu_sync=not interpret, mixed=mixed)

    v, _ = pl.pallas_call(
        kernel,
        out_shape=outs,
        grid=(n_programs,),
        compiler_params=compiler_params(num_warps=num_warps, num_stages=_fit_stages(
            num_stages, _stage_bytes(kw["block_t"], block_k, block_p, x_TxI.dtype))),
        interpret=interpret,
        name=f"slab_shrink_x{lo_GxT.shape[0]}",
    )(_scalars(n_rows, offset), lo_GxT.astype(jnp.int32), hi_GxT.astype(jnp.int32), x_TxI, a_slab_GxIxP,
      _counters(counters, n_counters))
    return v


def _linear_kernel(*refs, spec, G, n_out, n_tokens, block_t, block_n, block_k, block_p, h_in, k_splits, base, lora,
                   shrink, gpu_sync, mixed):
    """Column-block programs of `y_g = [x @ W_g] + [v_g @ B_g]` (`base`, `lora`); with `shrink`, the
    shrink's programs come first in the grid (they write v for a later launch; nothing here reads it)."""
    r = _unpack(refs, spec)
    scal_ref = r["scal"]
    q = pl.program_id(0)
    if shrink is not None:
        n_shrink = shrink.pop("n_programs")
        pl.when(q < n_shrink)(lambda: _shrink_program(q, scal_ref, r["lo"], r["hi"], r["x"], r["a"], r["v_out"],
                                                      r["part_s"], r["count"], **shrink, gpu_sync=gpu_sync,
                                                      mixed=mixed))
        q = q - n_shrink
    n_k = h_in // block_k if base else 0
    first, col_first = 0, 0
    for g in range(G):
        n_blocks = n_out[g] // block_n

        def body(g=g, first=first, col_first=col_first):
            blk, split = (q - first) // k_splits, (q - first) % k_splits
            n0 = blk * block_n
            rows_T, ok_T = _token_rows(n_tokens, block_t)
            mask = jnp.broadcast_to(ok_T[:, None], (block_t, block_n))
            w_at = lambda k: r["w"][g].at[pl.ds(k * block_k, block_k), pl.ds(n0, block_n)]  # noqa: E731
            b_at = lambda i: r["b"].at[scal_ref[1] + g, pl.ds(i * block_p, block_p), pl.ds(n0, block_n)]  # noqa: E731
            acc = jnp.zeros((block_t, block_n), jnp.float32)
            if not base:  # the expand alone accumulates into y (split 0 adds it)
                y = plgpu.load(rows_at(r["y_in"][g], (), rows_T, n0, block_n, mixed=mixed), mask=mask, other=0)
                acc = jnp.where(split == 0, y.astype(jnp.float32), acc)
            n_p = (jnp.minimum((scal_ref[0] + block_p - 1) // block_p, r["v"].shape[-1] // block_p) if lora else 0)
            if k_splits == 1:  # loop bounds as static as they can be
                if base:
                    acc = _k_loop(r["x"], (), w_at, rows_T, ok_T, n_k, block_k, acc, mixed=mixed)
                if lora:
                    acc = _k_loop(r["v"], (g,), b_at, rows_T, ok_T, n_p, block_p, acc, mixed=mixed)
            else:  # split j takes steps [j L, (j + 1) L) of the n_k base steps followed by the n_p slab steps
                total = n_k + n_p
                size = (total + k_splits - 1) // k_splits
                lo = split * size
                hi = jnp.minimum(total, lo + size)
                if base:
                    k0 = jnp.minimum(lo, n_k)
                    acc = _k_loop(r["x"], (), lambda k: w_at(k0 + k), rows_T, ok_T,
                                  jnp.maximum(jnp.minimum(hi, n_k) - k0, 0), block_k, acc, mixed=mixed, k0=k0)
                if lora:
                    i0 = jnp.maximum(lo, n_k) - n_k
                    acc = _k_loop(r["v"], (g,), lambda i: b_at(i0 + i), rows_T, ok_T, jnp.maximum(hi - n_k - i0, 0),
                                  block_p, acc, mixed=mixed, k0=i0)

            def store(y_TxN):
                o = r["o"][g]
                plgpu.store(rows_at(o, (), rows_T, n0, block_n, mixed=mixed), y_TxN.astype(o.dtype), mask=mask)

            _split_store(r["part"], r["count"], first // k_splits + blk, acc, (), split, k_splits, rows_T, ok_T,
                         col_first + n0, block_n, store, gpu_sync=gpu_sync, mixed=mixed)

        pl.when((q >= first) & (q < first + n_blocks * k_splits))(body)
        first += n_blocks * k_splits
        col_first += n_out[g]


def _linear_call(x_TxI, ws_IxO, ys_TxO, v_GxTxP, b_slab_GxPxO, shrink_args, n_rows, offset, *, block_n, block_k,
                 block_p, k_splits, shrink_splits, num_warps, num_stages, interpret, mixed_index, name, counters):
    """One launch of `_linear_kernel`: the base GEMM (`ws_IxO`, or None: `ys_TxO` is accumulated into),
    the slab's K extension (`v`, `b`, or None), and optionally a shrink's programs (`shrink_args`)."""
    base = ys_TxO is None
    T, H_in = x_TxI.shape
    G = len(ws_IxO) if base else len(ys_TxO)
    _check_tokens(T, name)
    _check_blocks(block_n=block_n, block_k=block_k, block_p=block_p)
    n_out = tuple(w.shape[1] for w in ws_IxO) if base else tuple(y.shape[1] for y in ys_TxO)
    if base:
        if H_in % block_k:
            raise ValueError(f"H_in={H_in} must be a multiple of block_k={block_k}")
        for w in ws_IxO:
            if w.shape[0] != H_in or w.shape[1] % block_n:
                raise ValueError(f"weight {w.shape} does not take x {x_TxI.shape} in blocks of {block_n} columns")
    elif any(y.shape[0] != T or y.shape[1] % block_n for y in ys_TxO):
        raise ValueError(f"outputs {[y.shape for y in ys_TxO]} are not {T} rows in blocks of {block_n} columns")
    lora = v_GxTxP is not None
    if lora:
        P = v_GxTxP.shape[-1]
        if (v_GxTxP.shape != (G, T, P) or b_slab_GxPxO.ndim != 3 or b_slab_GxPxO.shape[1] != P or P % block_p
                or b_slab_GxPxO.shape[2] < max(n_out)):
            raise ValueError(f"v {v_GxTxP.shape} and b_slab {b_slab_GxPxO.shape} do not match {G} projections of "
                             f"{T} tokens, outputs {n_out}, in blocks of {block_p} slab rows")
    interpret = default_interpret() if interpret is None else interpret
    mixed = (not interpret) if mixed_index is None else mixed_index
    n_blocks = sum(n // block_n for n in n_out)
    n_k = H_in // block_k if base else max(1, v_GxTxP.shape[-1] // block_p)
    k_splits = _default_splits(n_blocks, n_k, target=160) if k_splits is None else k_splits
    if k_splits < 1 or k_splits > n_k:
        raise ValueError(f"k_splits={k_splits} must be in 1..{n_k} (the K blocks)")
    shrink, n_shrink, shrink_outs, n_counters = None, 0, (), n_blocks if k_splits > 1 else 0
    if shrink_args is not None:  # the shrink's counters after the GEMM's
        a_slab, lo_GxT, hi_GxT = shrink_args
        shrink, n_shrink, shrink_outs, n_shrink_counters = _shrink_call(x_TxI, a_slab, lo_GxT, hi_GxT, block_p,
                                                                        block_k, shrink_splits)
        shrink.update(n_programs=n_shrink, count0=n_counters)
        n_counters += n_shrink_counters
    ins = [("scal", _scalars(n_rows, offset)), ("x", x_TxI)]
    ins += [("w", tuple(ws_IxO))] if base else [("y_in", tuple(ys_TxO))]
    ins += [("v", v_GxTxP), ("b", b_slab_GxPxO)] if lora else []
    if shrink is not None:
        ins += [("lo", lo_GxT.astype(jnp.int32)), ("hi", hi_GxT.astype(jnp.int32)), ("a", a_slab)]
    ins += [("count", _counters(counters, n_counters))]
    outs = [("o", tuple(jax.ShapeDtypeStruct((T, n), x_TxI.dtype if base else ys_TxO[0].dtype) for n in n_out)),
            ("part", jax.ShapeDtypeStruct((k_splits, T, sum(n_out)) if k_splits > 1 else (1, 1, 1), jnp.float32))]
    if shrink is not None:
        outs += [("v_out", shrink_outs[0]), ("part_s", shrink_outs[1])]
    count = lambda v: len(v) if isinstance(v, tuple) else 1  # noqa: E731
    spec = tuple((n, len(v) if isinstance(v, tuple) else None) for n, v in ins + outs)
    flat_in = [a for _, v in ins for a in (v if isinstance(v, tuple) else (v,))]
    flat_out = [a for _, v in outs for a in (v if isinstance(v, tuple) else (v,))]
    where = {n: i for i, n in enumerate(a for n, v in ins for a in [n] * count(v))}
    out_at = {n: i for i, n in enumerate(a for n, v in outs for a in [n] * count(v))}
    aliases = {}
    if not base:  # y in place
        first_y = [i for i, (n, _) in enumerate((n, 0) for n, v in ins for _ in range(count(v))) if n == "y_in"][0]
        aliases.update({first_y + g: g for g in range(G)})
    block_t = _pow2_ceil(max(16, T))
    # the base loop's and the slab loop's buffers, and a shrink's beside them (branches of one kernel)
    stage = max(_stage_bytes(block_t, block_k, block_n, x_TxI.dtype) if base else 0,
                _stage_bytes(block_t, block_p, block_n, x_TxI.dtype) if lora else 0)
    stage += _stage_bytes(block_t, block_k, block_p, x_TxI.dtype) if shrink is not None else 0
    kernel = functools.partial(_linear_kernel, spec=spec, G=G, n_out=n_out, n_tokens=T,
                               block_t=block_t, block_n=block_n, block_k=block_k, block_p=block_p,
                               h_in=H_in, k_splits=k_splits, base=base, lora=lora, shrink=shrink,
                               gpu_sync=not interpret, mixed=mixed)
    out = pl.pallas_call(
        kernel,
        out_shape=tuple(flat_out),
        grid=(n_shrink + n_blocks * k_splits,),
        input_output_aliases=aliases,
        compiler_params=compiler_params(num_warps=num_warps, num_stages=_fit_stages(num_stages, stage)),
        interpret=interpret,
        name=f"{name}_x{G}",
    )(*flat_in)
    ys = tuple(out[:G])
    return ys if shrink is None else (ys, out[out_at["v_out"]])


def linear_slab(x_TxI, ws_IxO, v_GxTxP, b_slab_GxPxO, n_rows, offset=0, *, block_n: int = 64, block_k: int = 128,
                block_p: int = 64, k_splits: int | None = None, num_warps: int = 4, num_stages: int = 3,
                interpret: bool | None = None, mixed_index: bool | None = None,
                counters: jax.Array | None = None) -> tuple[jax.Array, ...]:
    """`x @ W_g + v_g @ B_g` for G projections in one launch (module doc); `v=None`: the plain GEMM."""
    return _linear_call(x_TxI, tuple(ws_IxO), None, v_GxTxP, b_slab_GxPxO, None, n_rows, offset, block_n=block_n,
                        block_k=block_k, block_p=block_p, k_splits=k_splits, shrink_splits=1, num_warps=num_warps,
                        num_stages=num_stages, interpret=interpret, mixed_index=mixed_index,
                        name="linear_slab" if v_GxTxP is not None else "linear", counters=counters)


def linear_shrink_slab(x_TxI, ws_IxO, a_slab_GxIxP, lo_GxT, hi_GxT, n_rows, offset=0, *, block_n: int = 64,
                       block_k: int = 128, block_p: int = 64, k_splits: int | None = None, shrink_splits: int = 4,
                       num_warps: int = 4, num_stages: int = 3, interpret: bool | None = None,
                       mixed_index: bool | None = None,
                       counters: jax.Array | None = None) -> tuple[tuple[jax.Array, ...], jax.Array]:
    """`(x @ W_g for each g, v)` in one launch: the plain GEMM's programs and `slab_shrink`'s side by side
    (both stream their weights; neither waits on the other). Then `slab_expand(ys, v, b_slab, ...)`."""
    if a_slab_GxIxP.ndim != 3 or lo_GxT.shape[0] != len(tuple(ws_IxO)):
        raise ValueError(f"lo/hi {lo_GxT.shape} must have a row per projection ({len(tuple(ws_IxO))})")
    return _linear_call(x_TxI, tuple(ws_IxO), None, None, None, (a_slab_GxIxP, lo_GxT, hi_GxT), n_rows, offset,
                        block_n=block_n, block_k=block_k, block_p=block_p, k_splits=k_splits,
                        shrink_splits=shrink_splits, num_warps=num_warps, num_stages=num_stages, interpret=interpret,
                        mixed_index=mixed_index, name="linear_shrink_slab", counters=counters)


def slab_expand(ys_TxO, v_GxTxP, b_slab_GxPxO, n_rows, offset=0, *, block_n: int = 64, block_p: int = 64,
                k_splits: int | None = None, num_warps: int = 4, num_stages: int = 3, interpret: bool | None = None,
                mixed_index: bool | None = None, counters: jax.Array | None = None) -> tuple[jax.Array, ...]:
    """`y_g + v_g @ B_g` (in place: the ys are donated by a caller under jit), one launch for G projections."""
    ys_TxO = tuple(ys_TxO)
    x_like = jnp.zeros((ys_TxO[0].shape[0], block_p), ys_TxO[0].dtype)  # only T is read (no base loop)
    return _linear_call(x_like, None, ys_TxO, v_GxTxP, b_slab_GxPxO, None, n_rows, offset, block_n=block_n,
                        block_k=block_p, block_p=block_p, k_splits=k_splits, shrink_splits=1, num_warps=num_warps,
                        num_stages=num_stages, interpret=interpret, mixed_index=mixed_index, name="slab_expand",
                        counters=counters)


def slab_shrink_reference(x_TxI, a_slab_GxIxP, lo_GxT, hi_GxT):
    """jnp: `v [G, T, P]`, fp32 accumulation, masked to each token's rows, rounded to x's dtype."""
    P = a_slab_GxIxP.shape[-1]
    v = jnp.einsum("ti,gip->gtp", x_TxI, a_slab_GxIxP, preferred_element_type=jnp.float32,
                   precision=lax.Precision.HIGHEST)
    c = jnp.arange(P)[None, None, :]
    keep = (c >= lo_GxT[:, :, None]) & (c < hi_GxT[:, :, None])
    return jnp.where(keep, v, 0.0).astype(x_TxI.dtype)


def linear_slab_reference(x_TxI, ws_IxO, v_GxTxP, b_slab_GxPxO) -> tuple[jax.Array, ...]:
    """jnp: `x @ W_g + v_g @ B_g[:, :N_g]`, fp32 accumulation, rounded once to x's dtype."""
    out = []
    for g, w in enumerate(ws_IxO):
        y = jnp.dot(x_TxI, w, preferred_element_type=jnp.float32, precision=lax.Precision.HIGHEST)
        if v_GxTxP is not None:
            y = y + jnp.dot(v_GxTxP[g], b_slab_GxPxO[g, :, : w.shape[1]], preferred_element_type=jnp.float32,
                            precision=lax.Precision.HIGHEST)
        out.append(y.astype(x_TxI.dtype))
    return tuple(out)

"""Benchmark the gathered-LoRA implementations (`slora_jax.ops.add_lora`, every `impl=`) on a GPU.

Grid (issue 3): tokens x projection x rank case x popularity x impl, with 1000
adapters resident in dense stacked slots (bf16). Each row: median time of the
full op (shrink + expand, y updated), the HBM floor, the floor ratio and the
speedup against every other impl of the same case. JSON as in
`shared/BENCHMARKS.md` goes to `--out` (default `$OUT`, else `benchmarks/results`).

Method: every impl is checked against `lora_reference` (fresh random inputs) before
it is timed. One compiled function chains `n_rot` calls (y carried and donated; no
device-side loop, whose per-iteration host sync would land in small rows), each
call on its own x buffer and its own slot draw from the 1000 resident adapters, so
consecutive calls do not find their inputs in L2; `n_rot` grows until the rotated
working set is >= 120 MB (at least 8, at most 32). Each call is a nested jit (traced
and lowered once, inlined by XLA), so a chain costs one call's tracing. Timing
dispatches the chain `reps` times back to back (asynchronous) and blocks once: per
call = (t(2 reps) - t(reps)) / (reps n_rot), which cancels the fixed sync cost;
`reps` makes t(reps) about 4 ms. Differences are taken until 3 agree within 3%
(at most 5); the median is reported. Chains over 20 ms are timed whole (median of
3; the fixed cost is < 0.5% of them), and an impl whose first chain is over 50x the
best per-call time so far in its case is recorded from that one chain (an upper
bound; `timing: "capped"`). Rows hold `timing`, `reps`, `diffs` and `spread`.

Compiling is ahead of time and in parallel: each (case, impl) chain is lowered
(`.lower(...)`, Python: one at a time, and not while a chain shorter than 5 ms is
timed, so that dispatch loop owns the GIL) and compiled (`.compile()`, C++, on a
thread pool) `--ahead` cases at a time, which are then timed with no compile running
(`--overlap-compile` keeps compiling later cases while timing: faster, but on an
H200 the compile threads and XLA's autotuning on the GPU left most rows noisy); the
timing calls the compiled executable. Executables are shared between cases of the same signature:
impls other than the dense split pair get the metadata as `build_lora_meta(...,
static_tiles=True)` gives it (as the engine does: `active_tiles` is the tile bound),
so they compile once for all popularities; dense impls also share across rank cases
of the same padded R. `loop` unrolls a matmul pair per segment and per call, so it is
skipped beyond 2 segments a call (`--loop-max-segments`; with 3 to 8 it lost by 4-24x in every row
measured, and its chains took most of the compile time).
Weights: 1000 adapters in dense slots, generated once per (projection, rank case)
group (the cases are ordered so that groups are contiguous), and for
`pallas_paged` the same adapters packed into pool pages (`PagedWeights.from_slots`,
rows `chunk` wide (KernelConfig.chunk, default 64 = EngineConfig.lora_chunk),
pages of 256 KiB as a Llama-7B pool page, page ids shuffled).
Floor = max(bytes / copy bandwidth, flops / bf16 matmul rate), both ceilings
measured in this run; bytes = x read + the used adapters' A and B (at their own
rank) read once + y read and written. Impls that cannot run a case (errors, OOM,
wrong results) are rows with the reason; so are skipped ones (`skipped`).

`--budget-s` stops starting new cases, and stops waiting for a batch's compiles (the
JSON is rewritten after every case); `--resume FILE` skips the cases already in FILE
and appends to its rows and a new `runs` entry, so the grid can be finished over
several runs; `--resume FILE --retime` instead times `--impls` again on the cases FILE holds (those the
grid options select), puts the new rows in place of those impls' old ones (kept in `replaced_rows`) and
recomputes every row's `vs` of the case (for a default that changed; floor ratios are each row's own run's);
`--summarize FILE` only prints the summary; `--against IMPL` adds every impl's time over IMPL's, case by
case (median and range, optionally `--by` tokens, proj, rank or popularity: the probes' variant tables);
`--plot PNG` draws the engine impl's speedup over the best baseline and its floor ratio by tokens.
`--profile` also runs each timed chain once under the profiler (one trace a case, the chains cut apart at
the idle gaps left between them; one trace a chain if that cut fails): each row's `profile` has the device
time a call (its kernels summed), the span a call (first kernel's start to last one's end: the device time
plus the gaps where the GPU waited), kernels a call and the top kernels. Wall slope near the span and well above the
device time: the call is bound by launching its kernels, not by running them.
Where the wall time goes: each `runs` entry has `phase_s`, the main thread's wall
seconds by phase (setup, ceilings, prepare: host data and compile submission,
compile_wait: waiting on the compile threads, which lower (serially, `lower_s`) and
compile (`compile_thread_s`), data: weights and x, pages: packing the paged weights,
reference, check: first call and rel_err, timing (with `--overlap-compile` also the
wait for a lowering in progress), json, other), summing to `wall_s`; each row's
`phase_s` has its own impl's share (compile_wait, pages, check, timing).
Impls take KernelConfig overrides for variants: 'pallas[k_splits=2,expand_block_n=256]'.
`pallas_slab` times `add_lora_slab` on a slab of each draw's adapters (`slab_from_slots`, rows a power
of two, copied before the clock starts: the engine keeps its slab across steps and copies only the
adapters that join); it takes decode-sized calls only (<= 256 tokens; the others are skipped rows).

    python scripts/bench_kernels.py --plan-only                  # counts, no device work
    python scripts/bench_kernels.py --budget-s 480 --out /tmp/res
    python scripts/bench_kernels.py --resume /tmp/res/lora_kernels.json --out /tmp/res
    python scripts/bench_kernels.py --tokens 64,256 --ranks 16 --impls pallas_paged,onehot
    python scripts/bench_kernels.py --smoke                      # CPU: tiny shapes, whole flow
    python scripts/bench_kernels.py --summarize benchmarks/results/lora_kernels.json
    python scripts/bench_kernels.py --summarize benchmarks/results/kernels_s21_h200/tile_programs.json \
        --against pallas_paged --by popularity
    python scripts/bench_kernels.py --summarize benchmarks/results/lora_kernels_grid_h200.json \
        --plot benchmarks/results/lora_kernels_grid_h200.png
"""

from __future__ import annotations

import argparse
import collections
import concurrent.futures
import contextlib
import dataclasses
import functools
import json
import math
import os
import sys
import threading
import time
import zlib

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # profiling.py, also when imported by a test

import profiling  # noqa: E402 - scripts/profiling.py
from pallas_kernels.lora_slab import MAX_TOKENS as SLAB_MAX_TOKENS  # noqa: E402
from slora_jax.ops import (  # noqa: E402
    IMPLS,
    KernelConfig,
    PagedWeights,
    SlotSlab,
    SlotWeights,
    add_lora,
    add_lora_slab,
    build_lora_meta,
    lora_reference,
    random_slot_weights,
    slab_fits,
    slab_from_slots,
)
from slora_jax.provenance import git_commit  # noqa: E402

N_SLOTS = 1000
TOKENS = (1, 8, 32, 64, 256, 1024, 4096)
PROJS = ((4096, 4096), (4096, 11008), (11008, 4096), (4096, 1024))
RANK_CASES = ("8", "16", "64", "128", "mixed")
MIXED_RANKS = (8, 16, 64, 128)
POPS = ("distinct", "uniform", "skewed", "identical")
IMPLS_DEFAULT = ("pallas_paged", "pallas_slab", "pallas", "loop", "gather_bmm", "onehot", "ragged_dot", "padded_bmm")
ENGINE_IMPL = "pallas_paged"  # what the engine runs (paged split pair, chunk = EngineConfig.lora_chunk)
QUICK = dict(tokens=(1, 64, 256, 4096), projs=((4096, 4096), (4096, 11008)), ranks=("16", "mixed"),
             pops=("distinct", "uniform", "identical"))
SMOKE = dict(tokens=(1, 16), projs=((128, 256),), ranks=("16", "mixed"), pops=("distinct", "identical"))
META_DEFAULT = dict(tight_segments=False, block_m=None)  # the metadata of runs that do not record theirs
MAX_INTERMEDIATE_BYTES = 8e9  # baselines that would materialize more are skipped (and say so)
# `loop` unrolls a matmul pair per segment per call (n_rot x segments in a chain: 47 s of compile thread time per
# chain on an H200). With 3 to 8 segments it lost to the best other impl by 4-24x in all 12 such rows of the
# session-18 grid run (`lora_kernels_grid_h200.json`, run 0); it is competitive only with one segment.
MAX_LOOP_SEGMENTS = 2
# XLA's Triton GEMM autotuning took most of a grid's compile time (H200, session 18: onehot 18 s and ragged_dot
# 34 s of compile thread time per (projection, rank, tokens) signature). With it off these two ran at 0.93-1.03x
# of their default-compiled times on 8 cases (and compiled 10-40x faster); loop and padded_bmm did not (up to
# 1.65x and 1.17x; benchmarks/results/kernels_s18_h200/), so they, gather_bmm and our kernels keep the default.
# `--triton-gemm-off` changes the list.
TRITON_GEMM_OFF = ("onehot", "ragged_dot", "(reference)")


@dataclasses.dataclass(frozen=True)
class Timing:
    """How a row is timed (see the module doc)."""

    target_s: float = 4e-3  # t(reps) aimed at
    min_diffs: int = 3
    max_diffs: int = 5
    tol: float = 0.03  # (max - min) / median of the differences that stops early
    whole_chain_s: float = 20e-3  # chains at least this long: median of 3 whole chains
    cap: float = 50.0  # first chain per call over cap x best so far: that chain alone
    gated_chain_s: float = 5e-3  # shorter chains are timed with lowering held off (see TraceGate)


# ----------------------------------------------------------------------------- workload


def slot_draw(pop: str, T: int, rng: np.random.Generator) -> np.ndarray:
    """Adapter slot per row for a Punica popularity, rows shuffled (all rows use an adapter)."""
    if pop == "distinct":  # every row its own adapter (rows beyond 1000 reuse them)
        s = rng.permutation(N_SLOTS)[np.arange(T) % N_SLOTS]
    elif pop == "uniform":  # ceil(sqrt(T)) equal groups
        g = math.ceil(math.sqrt(T))
        s = rng.choice(N_SLOTS, g, replace=False)[np.arange(T) % g]
    elif pop == "skewed":  # group sizes growing by 1.5x (Zipf-like)
        sizes, size = [], 1.0
        while sum(sizes) < T:
            sizes.append(max(1, round(size)))
            size *= 1.5
        sizes[-1] -= sum(sizes) - T
        ids = rng.choice(N_SLOTS, len(sizes), replace=False)
        s = np.repeat(ids, sizes)
    elif pop == "identical":
        s = np.full(T, rng.integers(N_SLOTS))
    else:
        raise ValueError(pop)
    return rng.permutation(s).astype(np.int32)


def slot_ranks(rank_case: str) -> np.ndarray:
    if rank_case == "mixed":
        return np.array([MIXED_RANKS[s % len(MIXED_RANKS)] for s in range(N_SLOTS)], np.int32)
    return np.full(N_SLOTS, int(rank_case), np.int32)


def padded_rank(ranks_S: np.ndarray) -> int:
    """R of `random_slot_weights`: the max rank rounded up to 16."""
    return max(16, -(-int(ranks_S.max()) // 16) * 16)


def lora_bytes_flops(slot_T, ranks_S, T, h_in, h_out, itemsize=2):
    used = np.unique(slot_T[slot_T >= 0])
    w_bytes = int(ranks_S[used].sum()) * (h_in + h_out) * itemsize
    bytes_ = T * h_in * itemsize + w_bytes + 2 * T * h_out * itemsize
    r_T = ranks_S[np.maximum(slot_T, 0)] * (slot_T >= 0)
    flops = 2 * int(r_T.sum()) * (h_in + h_out)
    return bytes_, flops


def rotations(T: int, h_in: int, h_out: int, ranks_S: np.ndarray, lo: int, hi: int) -> int:
    """Calls per chain: the working set of `n_rot` single-adapter calls (smallest rank) >= 120 MB."""
    ws = lora_bytes_flops(np.zeros(T, np.int32), np.full(1, ranks_S.min()), T, h_in, h_out)[0]
    return int(np.clip(math.ceil(120e6 / ws), lo, hi))


# ----------------------------------------------------------------------------- impl specs


def split_list(values):
    """argparse values, each comma-separated ('64,256'), into one list; commas inside [...] kept."""
    out = []
    for v in values or ():
        depth, cur = 0, ""
        for ch in v:
            depth += (ch == "[") - (ch == "]")
            if ch == "," and depth == 0:
                out.append(cur)
                cur = ""
            else:
                cur += ch
        out.append(cur)
    return [s.strip() for s in out if s.strip()]


def parse_impl(spec: str):
    """'pallas', 'pallas_paged', 'pallas_slab' or 'pallas[fused=0,k_splits=4]' -> (impl, KernelConfig, paged),
    impl "slab" for 'pallas_slab'; baselines as is."""
    name, _, rest = spec.partition("[")
    paged = name == "pallas_paged"
    name = {"pallas_paged": "pallas", "pallas_slab": "slab"}.get(name, name)
    if name not in (*IMPLS, "slab"):
        raise ValueError(f"unknown impl {spec!r}; choose from {IMPLS}, pallas_paged and pallas_slab")
    if name not in ("pallas", "slab"):
        return name, None, False
    kw = {}
    for item in filter(None, rest.rstrip("]").split(",")):
        k, v = item.split("=")
        kw[k] = None if v == "None" else int(v) if v.lstrip("-").isdigit() else v  # str fields: as written
    return name, KernelConfig(**kw), paged


def sizes_by_layout(name, cfg, paged) -> bool:
    """Whether the impl reads the static `LoraMeta.active_tiles` (the dense split pair sizes its split-K by it)."""
    return name == "pallas" and not paged and not cfg.fused


def static_tiles(meta):
    """`meta` as `build_lora_meta(static_tiles=True)` gives it (the engine's choice: `active_tiles` is the
    tile bound), so impls share one compile across popularities."""
    return dataclasses.replace(meta, active_tiles=len(meta.tile_slot))


def page_plan(ranks_S, h_in: int, h_out: int, chunk: int):
    """Pages of Llama-7B's size (256 KiB a layer) for adapters of `ranks_S`: rows a page, each
    adapter's page count, and the page ids (shuffled, 1/8 of the pages unused)."""
    rpp = 131072 // chunk
    n_pages_S = np.maximum(1, -(-(h_in + h_out) // chunk * np.asarray(ranks_S) // rpp))
    need = int(n_pages_S.sum())
    return rpp, n_pages_S, np.random.default_rng(1).permutation(need + need // 8)


def pack_pages(w: SlotWeights, chunk: int) -> PagedWeights:
    """The resident adapters packed into pool pages (`page_plan`), rows `chunk` wide."""
    rpp, _, ids = page_plan(w.ranks, w.a.shape[1], w.b.shape[2], chunk)
    return PagedWeights.from_slots(w, chunk=chunk, rows_per_page=rpp, page_ids=ids)


def paged_abstract(ranks_S, h_in: int, h_out: int, chunk: int) -> PagedWeights:
    """The shapes `pack_pages` gives, without packing (it packs on the host, so it cannot be traced)."""
    rpp, n_pages_S, ids = page_plan(ranks_S, h_in, h_out, chunk)
    num_pages = int(ids[: int(n_pages_S.sum())].max()) + 1
    S, i32 = len(n_pages_S), functools.partial(jax.ShapeDtypeStruct, dtype=jnp.int32)
    return PagedWeights(jax.ShapeDtypeStruct((num_pages * rpp, chunk), jnp.bfloat16), i32((S, int(n_pages_S.max()))),
                        i32((S,)), i32((S,)), i32((S,)), rpp, h_in, h_out, int(max(1, np.max(ranks_S))))


def skip_reason(name, T, h_in, h_out, R, n_segments, n_tiles, max_loop_segments=MAX_LOOP_SEGMENTS, cfg=None):
    if name == "slab" and not slab_fits(T, h_in, [h_out], cfg):
        return (f"the slab kernels take decode-sized calls (<= {SLAB_MAX_TOKENS} tokens) in blocks of "
                f"{cfg.slab_block_k} (H_in) and {cfg.slab_block_n} (H_out)")
    if name in ("gather_bmm", "reference") and T * (h_in + h_out) * R * 2 > MAX_INTERMEDIATE_BYTES:
        return "gathered per-token weights exceed 8 GB"
    if name == "padded_bmm" and n_tiles * (h_in + h_out) * R * 2 > MAX_INTERMEDIATE_BYTES:
        return "gathered per-tile weights exceed 8 GB"
    if name == "onehot" and T * N_SLOTS * R * 4 > MAX_INTERMEDIATE_BYTES:
        return "[T, S, R] intermediate exceeds 8 GB"
    if name == "loop" and n_segments > max_loop_segments:
        return (f"more than {max_loop_segments} segments to unroll (3 to 8 lost by 4-24x in every row measured; "
                f"the chain's tracing and compile grow with n_rot x segments)")
    return None


# ----------------------------------------------------------------------------- measurement


def slope_diffs(run, reps: int, max_trials: int = 5, min_trials: int | None = None, tol: float = 0.0):
    """Differences (t(2r) - t(r)) / r of `run(r)` (which blocks), and the last t(2r).

    The difference cancels the fixed cost of one dispatch, the loop set-up and the sync.
    Stops early once `min_trials` differences agree within `tol` of their median.
    """
    ds = []
    while len(ds) < max_trials:
        t0 = time.perf_counter()
        run(reps)
        t1 = time.perf_counter()
        run(2 * reps)
        t2 = time.perf_counter()
        ds.append(((t2 - t1) - (t1 - t0)) / reps)
        med = float(np.median(ds))
        if min_trials and len(ds) >= min_trials and med > 0 and np.ptp(ds) <= tol * med:
            break
    return ds, t2 - t1


def slope_time(run, reps: int, trials: int = 5) -> float:
    """Seconds per rep of `run(reps)` (which blocks): median over trials of (t(2r) - t(r)) / r."""
    ds, last = slope_diffs(run, reps, trials)
    med = float(np.median(ds))
    return med if med > 0 else last / (2 * reps)  # noise swamped the difference: an upper bound


def measure_ceilings(small: bool = False):
    n_el = (4 if small else 256) * 1024 * 1024  # 512 MiB of bf16 on the GPU
    copy = jax.jit(lambda a, r: jax.lax.fori_loop(0, r, lambda _, a: a + 1, a), donate_argnums=0)
    state = {"x": jnp.ones((n_el,), jnp.bfloat16)}

    def run_copy(r):
        state["x"] = copy(state["x"], jnp.int32(r))
        state["x"].block_until_ready()

    run_copy(1)
    # A GPU copy of 512 MiB takes ~0.3 ms: 64 of them put the timed difference (~20 ms) well above host
    # jitter. With 4, the same H200 read 3137-3695 GB/s in three runs of one session (session 12).
    copy_GBps = 2 * n_el * 2 / slope_time(run_copy, 4 if small else 64) / 1e9
    n = 512 if small else 8192
    k1, k2 = jax.random.split(jax.random.key(0))
    a = jax.random.normal(k1, (n, n), jnp.bfloat16)
    b = jax.random.normal(k2, (n, n), jnp.bfloat16)
    mm = jax.jit(lambda a, b, r: jax.lax.fori_loop(0, r, lambda _, c: (c @ b) * (1.0 / math.sqrt(n)), a))

    def run_mm(r):
        mm(a, b, jnp.int32(r)).block_until_ready()

    run_mm(1)
    tflops = 2 * n**3 / slope_time(run_mm, 4 if small else 16) / 1e12  # ~1.5 ms a product on an H200
    del state, a, b
    sig4 = lambda v: float(f"{v:.4g}")  # noqa: E731 - not round(v, 1): a CPU's TFLOP/s rounds to 0
    return {"copy_GBps": sig4(copy_GBps), "bf16_TFLOPs": sig4(tflops)}


def chunked_reference(y_TxO, x_TxI, w, slot_T):
    """`lora_reference` over chunks of <= 128 tokens (its per-token weight gather would not fit at T=4096)."""
    T = y_TxO.shape[0]
    c = math.gcd(T, 128)
    out = jax.lax.map(lambda a: lora_reference(a[0], a[1], w, a[2]),
                      (y_TxO.reshape(T // c, c, -1), x_TxI.reshape(T // c, c, -1), slot_T.reshape(T // c, c)))
    return out.reshape(y_TxO.shape)


@jax.jit
def rel_err(y_TxO, y_ref_TxO, y0_TxO):
    """||y - y_ref|| / ||y_ref - y0||: the error relative to the LoRA delta, not to y."""
    f32 = lambda a: a.astype(jnp.float32)  # noqa: E731
    return jnp.linalg.norm(f32(y_TxO) - f32(y_ref_TxO)) / jnp.linalg.norm(f32(y_ref_TxO) - f32(y0_TxO))


def make_chain_fn(name, cfg, n_rot, static_metas=None):
    """jit: y -> y after `n_rot` chained add_lora calls (y donated), no device loop.

    Each call is a nested jit, traced and lowered once for all `n_rot` calls of one
    metadata signature and inlined by XLA. `loop` closes over concrete metadata, so its
    calls are unrolled directly.
    """
    if static_metas is not None:
        def run(y, xs, w, metas):
            for j in range(n_rot):
                y = add_lora(y, xs[j], w, static_metas[j], impl=name, config=cfg)
            return y
    else:
        one = jax.jit(lambda y, x, w, m: add_lora(y, x, w, m, impl=name, config=cfg))

        def run(y, xs, w, metas):
            for j in range(n_rot):
                y = one(y, xs[j], w, metas[j])
            return y

    return jax.jit(run, donate_argnums=0)


def slab_rows(slots, ranks_S, block: int) -> int:
    """Slab rows that hold any of the draws' adapters at their own ranks (one shape for the chain), a
    power of two: the kernels read only the rows in use, so the padding costs memory, not time, and
    cases share compiles."""
    need = max(int(np.asarray(ranks_S)[np.unique(s[s >= 0])].sum()) for s in slots)
    return max(block, 1 << (need - 1).bit_length())


def make_slab_chain_fn(cfg, n_rot):
    """jit: y -> y after `n_rot` chained `add_lora_slab` calls, each on its draw's slab (`slab_from_slots`)."""
    one = jax.jit(lambda y, x, s: add_lora_slab((y,), x, s.a, s.b, s.lo, s.hi, s.n_rows, config=cfg)[0])

    def run(y, xs, slabs):
        for j in range(n_rot):
            y = one(y, xs[j], slabs[j])
        return y

    return jax.jit(run, donate_argnums=0)


def slab_abstract(T: int, h_in: int, h_out: int, P: int) -> SlotSlab:
    i32 = functools.partial(jax.ShapeDtypeStruct, dtype=jnp.int32)
    return SlotSlab(jax.ShapeDtypeStruct((1, h_in, P), jnp.bfloat16), jax.ShapeDtypeStruct((1, P, h_out), jnp.bfloat16),
                    i32((1, T)), i32((1, T)), i32(()))


def time_chain(exe, y, args, n_rot, best_call_s, tm: Timing, gate: TraceGate):
    """Seconds per add_lora call of the compiled chain `exe(y, *args)`, and how it was timed (module doc).

    `y` is a live output of `exe` (donated on). Returns (seconds, row fields).
    """
    with gate.timing():
        return _time_chain(exe, y, args, n_rot, best_call_s, tm, gate)


def _time_chain(exe, y, args, n_rot, best_call_s, tm: Timing, gate: TraceGate):
    state = {"y": y}

    def run(reps):
        y = state["y"]
        for _ in range(reps):
            y = exe(y, *args)
        state["y"] = y.block_until_ready()

    t0 = time.perf_counter()
    run(1)
    chain_s = time.perf_counter() - t0  # includes the fixed costs: an upper bound
    if chain_s >= tm.gated_chain_s:  # dispatching a chain takes far less: a lowering thread cannot starve it
        gate.release_timing()
    if best_call_s is not None and chain_s / n_rot > tm.cap * best_call_s:
        return chain_s / n_rot, {"timing": "capped", "reps": 1, "diffs": 0}
    if chain_s >= tm.whole_chain_s:
        ts = [chain_s]
        for _ in range(2):
            t0 = time.perf_counter()
            run(1)
            ts.append(time.perf_counter() - t0)
        return float(np.median(ts)) / n_rot, {"timing": "chains", "reps": 1, "diffs": 0,
                                             "spread": float(np.ptp(ts) / np.median(ts))}
    reps = int(np.clip(round(tm.target_s / chain_s), 1, 500))
    ds, last = slope_diffs(run, reps, tm.max_diffs, tm.min_diffs, tm.tol)
    med = float(np.median(ds))
    fields = {"timing": "slope", "reps": reps, "diffs": len(ds), "spread": float(np.ptp(ds) / max(abs(med), 1e-12))}
    if med <= 0:  # noise swamped the difference: an upper bound
        med = last / (2 * reps)
        fields["timing"] = "slope_failed_upper_bound"
    return med / n_rot, fields


# ----------------------------------------------------------------------------- where the wall time goes


class Phases:
    """Wall seconds of the main thread by phase: `with phases("timing"): ...`.

    A phase entered inside another pauses the outer one, so the totals are exclusive and
    sum to at most the wall time; `totals(wall)` adds the rest as `other`. Main thread only
    (the compile threads keep their own `Planner.trace_s` / `compile_s`).
    """

    def __init__(self):
        self.s = collections.Counter()
        self._stack = []  # [name, seconds since perf_counter() at which it was last resumed]

    @contextlib.contextmanager
    def __call__(self, name):
        now = time.perf_counter()
        if self._stack:
            self.s[self._stack[-1][0]] += now - self._stack[-1][1]
        self._stack.append([name, now])
        try:
            yield
        finally:
            now = time.perf_counter()
            self.s[name] += now - self._stack.pop()[1]
            if self._stack:
                self._stack[-1][1] = now

    def since(self, snapshot: collections.Counter) -> dict:
        """Seconds by phase spent since `snapshot` (a copy of `self.s`)."""
        return {k: round(v - snapshot[k], 4) for k, v in self.s.items() if v > snapshot[k]}

    def totals(self, wall_s: float) -> dict:
        out = {k: round(v, 3) for k, v in self.s.most_common()}
        out["other"] = round(max(0.0, wall_s - sum(self.s.values())), 3)
        return out


# ----------------------------------------------------------------------------- compile ahead


class TraceGate:
    """Tracing and lowering (Python, holding the GIL) run one at a time, and not while a short chain is timed.

    A lowering thread holding the GIL would delay the timing thread's dispatches; for
    chains shorter than a few ms that can leave the device idle and inflate the time.
    The main thread wraps each timing in `timing()`, which waits for a lowering in
    progress and keeps new ones out, and lets them in again (`release_timing()`) once
    the first chain shows it takes >= `Timing.gated_chain_s`. Compile threads wrap
    `.lower()` in `tracing()`; `.compile()` (C++, GIL released) runs at any time.
    """

    def __init__(self):
        self._cv = threading.Condition()
        self._timing = False
        self._tracing = False

    @contextlib.contextmanager
    def timing(self):
        with self._cv:
            self._timing = True
            self._cv.wait_for(lambda: not self._tracing)
        try:
            yield
        finally:
            self.release_timing()

    def release_timing(self):
        """Let lowering run again (early, from inside `timing()`: for timings a lowering cannot disturb)."""
        with self._cv:
            self._timing = False
            self._cv.notify_all()

    @contextlib.contextmanager
    def tracing(self):
        with self._cv:
            self._cv.wait_for(lambda: not self._timing and not self._tracing)
            self._tracing = True
        try:
            yield
        finally:
            with self._cv:
                self._tracing = False
                self._cv.notify_all()


def abstract(tree):
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(np.shape(a), np.asarray(a).dtype)
                        if not isinstance(a, jax.ShapeDtypeStruct) else a, tree)


def signature(tree):
    leaves, treedef = jax.tree.flatten(tree)
    return treedef, tuple((tuple(a.shape), a.dtype) for a in leaves)


@dataclasses.dataclass
class Case:
    """One (projection, rank case, tokens, popularity) cell with its host data and compile futures."""

    h_in: int
    h_out: int
    rank: str
    T: int
    pop: str
    n_rot: int
    slots: list  # n_rot x [T] int32
    metas: list  # n_rot LoraMeta (numpy)
    metas_static: list  # the same, `static_tiles`
    bytes_: float
    flops: float
    segments: int  # most segments of one draw
    segs_total: int  # segments summed over the chain
    n_tiles: int  # the metadata's static tile count NT (`num_tiles(T, max_segments, block_m)`)
    max_segments: int  # the metadata's segment bound G
    jobs: dict  # impl label -> Future of the compiled chain, or a skip reason (str)
    ref: concurrent.futures.Future  # compiled chunked_reference
    slab_rows: dict = dataclasses.field(default_factory=dict)  # pallas_slab label -> rows of its draws' slabs

    @property
    def group(self):
        return (self.h_in, self.h_out, self.rank)

    @property
    def block(self):
        return (self.h_in, self.h_out, self.rank, self.T)

    def label(self):
        return f"T={self.T:5d} {self.h_in}x{self.h_out} r={self.rank:5s} {self.pop:9s}"


def case_key(c: dict):
    return (c["tokens"], c["h_in"], c["h_out"], str(c["rank"]), c["popularity"])


class Planner:
    """Builds each case's host data and submits its chains' compiles to a thread pool (deduplicated)."""

    def __init__(self, impl_labels, threads: int, n_rot_range, gate: TraceGate, plan_only: bool = False,
                 max_loop_segments: int = MAX_LOOP_SEGMENTS, compiler_options=None, tight_segments: bool = False,
                 block_m: int | None = None):
        self.labels = impl_labels
        self.tight_segments = tight_segments  # metadata bound = the case's most segments, not min(T, N_SLOTS)
        self.block_m = block_m  # metadata rows per tile (None: `default_block_m` of the token count)
        self.compiler_options = compiler_options or {}  # impl label -> XLA options for its compiles
        self.max_loop_segments = max_loop_segments
        self.impls = [parse_impl(s) for s in impl_labels]
        self.n_rot_range = n_rot_range
        self.gate = gate
        self.plan_only = plan_only
        self.pool = None if plan_only else concurrent.futures.ThreadPoolExecutor(threads, "compile")
        self.cache = collections.OrderedDict()  # signature -> Future, LRU
        self.cache_size = 512
        self.abstract_w = {}  # (group, chunk or None) -> abstract weights
        self.n_compiles = collections.Counter()  # impl label -> compiles submitted
        self.trace_s = collections.Counter()  # impl label -> seconds lowering (Python)
        self.compile_s = collections.Counter()  # impl label -> seconds compiling (thread time)
        self._stats_lock = threading.Lock()

    def _compile(self, label, build, args):
        def job():
            with self.gate.tracing():
                t1 = time.perf_counter()
                lowered = build().lower(*args)
                t2 = time.perf_counter()
            exe = lowered.compile(compiler_options=self.compiler_options.get(label) or None)
            with self._stats_lock:
                self.trace_s[label] += t2 - t1
                self.compile_s[label] += time.perf_counter() - t2
            return exe

        return self.pool.submit(job)

    def wait_all(self, timeout=None) -> bool:
        """Until every compile submitted so far is done (True), or `timeout` seconds (False)."""
        _, not_done = concurrent.futures.wait([f for f in self.cache.values() if f is not None], timeout)
        return not not_done

    def _submit(self, key, label, build, args):
        if key in self.cache:
            self.cache.move_to_end(key)
            return self.cache[key]
        self.n_compiles[label] += 1
        fut = None if self.plan_only else self._compile(label, build, args)
        self.cache[key] = fut
        while len(self.cache) > self.cache_size:
            self.cache.popitem(last=False)
        return fut

    def weights_abstract(self, h_in, h_out, rank, chunk=None):
        k = (h_in, h_out, rank, chunk)
        if k not in self.abstract_w:
            ranks_S = slot_ranks(rank)
            dense = jax.eval_shape(lambda key: random_slot_weights(key, ranks_S, h_in, h_out, dtype=jnp.bfloat16),
                                   jax.random.key(0))
            if chunk is None:
                self.abstract_w[k] = dense
            else:
                self.abstract_w[k] = paged_abstract(ranks_S, h_in, h_out, chunk)
            if len(self.abstract_w) > 16:
                self.abstract_w.pop(next(iter(self.abstract_w)))
        return self.abstract_w[k]

    def prepare(self, h_in, h_out, rank, T, pop) -> Case:
        ranks_S = slot_ranks(rank)
        R = padded_rank(ranks_S)
        n_rot = rotations(T, h_in, h_out, ranks_S, *self.n_rot_range)
        rng = np.random.default_rng(zlib.crc32(f"{T} {h_in} {h_out} {rank} {pop}".encode()))
        slots = [slot_draw(pop, T, rng) for _ in range(n_rot)]
        G = (max(1, max(len(np.unique(s[s >= 0])) for s in slots)) if self.tight_segments
             else min(T, N_SLOTS))
        metas = [build_lora_meta(s, max_segments=G, block_m=self.block_m) for s in slots]
        bf = [lora_bytes_flops(s, ranks_S, T, h_in, h_out) for s in slots]
        segs = [int(m.num_segments) for m in metas]
        n_tiles = len(metas[0].tile_slot)
        metas_static = [static_tiles(m) for m in metas]
        y = jax.ShapeDtypeStruct((T, h_out), jnp.bfloat16)
        xs = [jax.ShapeDtypeStruct((T, h_in), jnp.bfloat16)] * n_rot
        # once per case, not per impl: per impl they took most of prepare's time
        ms_of = {layout: abstract(metas if layout else metas_static) for layout in (True, False)}
        ms_sig = {layout: signature(ms) for layout, ms in ms_of.items()}
        jobs, rows_of = {}, {}
        for label, (name, cfg, paged) in zip(self.labels, self.impls):
            reason = skip_reason(name, T, h_in, h_out, R, max(segs), n_tiles, self.max_loop_segments, cfg)
            if reason:
                jobs[label] = reason
                continue
            if name == "slab":
                P = rows_of[label] = slab_rows(slots, ranks_S, cfg.slab_block_p)
                args = (y, xs, [slab_abstract(T, h_in, h_out, P)] * n_rot)
                build = lambda cfg=cfg, n_rot=n_rot: make_slab_chain_fn(cfg, n_rot)
                jobs[label] = self._submit((label, n_rot, signature(args)), label, build, args)
                continue
            w = self.weights_abstract(h_in, h_out, rank, cfg.chunk if paged else None)
            layout = sizes_by_layout(name, cfg, paged)
            args = (y, xs, w, ms_of[layout])
            if name == "loop":
                key = (label, n_rot, (h_in, h_out, rank, T, pop))  # closes over this case's metadata
                build = lambda name=name, cfg=cfg, n_rot=n_rot: make_chain_fn(name, cfg, n_rot, static_metas=metas)
            else:
                key = (label, n_rot, signature((y, xs, w)), ms_sig[layout])
                build = lambda name=name, cfg=cfg, n_rot=n_rot: make_chain_fn(name, cfg, n_rot)
            jobs[label] = self._submit(key, label, build, args)
        wd = self.weights_abstract(h_in, h_out, rank)
        ref_args = (y, xs[0], wd, jax.ShapeDtypeStruct((T,), jnp.int32))
        ref = self._submit(("reference", signature(ref_args)), "(reference)", lambda: jax.jit(chunked_reference),
                           ref_args)
        return Case(h_in, h_out, rank, T, pop, n_rot, slots, metas, metas_static,
                    float(np.mean([b for b, _ in bf])), float(np.mean([f for _, f in bf])), max(segs), sum(segs),
                    n_tiles, G, jobs, ref, rows_of)


# ----------------------------------------------------------------------------- running a case


class DeviceData:
    """The device-side inputs of the current group (weights) and block (x buffers, y0)."""

    def __init__(self):
        self.group = self.block = None
        self.w = None
        self.paged = {}
        self.xs = self.y0 = None

    def for_case(self, c: Case):
        if c.group != self.group:
            self.w = None
            self.paged.clear()
            self.group = c.group
            self.w = random_slot_weights(jax.random.key(c.h_in + c.h_out), slot_ranks(c.rank), c.h_in, c.h_out,
                                         dtype=jnp.bfloat16)
        if c.block != self.block or len(self.xs) != c.n_rot:
            self.xs = self.y0 = None
            self.block = c.block
            self.xs = [jax.random.normal(jax.random.key(100 + j), (c.T, c.h_in), jnp.bfloat16)
                       for j in range(c.n_rot)]
            self.y0 = jax.random.normal(jax.random.key(99), (c.T, c.h_out), jnp.bfloat16)

    def paged_weights(self, chunk):
        if chunk not in self.paged:
            self.paged[chunk] = pack_pages(self.w, chunk)
        return self.paged[chunk]


def chain_profile(kernels, n_rot) -> dict:
    """`profile_chain`'s fields from one chain's kernel events `(device, name, start_us, dur_us)`."""
    s = profiling.summarize(kernels, top=4)
    return {"device_us": s["device_us_total"] / n_rot, "span_us": s["span_us"] / n_rot,
            "kernels_a_call": s["kernels"] / n_rot,
            "top_kernels": [dict(k, us=k["us"] / n_rot, calls=k["calls"] / n_rot) for k in s["top"]]}


def profile_chain(exe, y, args, n_rot) -> dict | None:
    """Device time of one chain from a profiler trace, per call: the kernels' summed time (`device_us`), the
    span from the first kernel's start to the last one's end (`span_us`: the device time plus the gaps where
    the GPU waited for the host), kernels a call and the top kernels. None without a trace (a CPU).

    Against the wall slope (`median_us`) it says whether a call is bound by its kernels or by launching them."""
    kernels = profiling.gpu_kernels(lambda: exe(y, *args).block_until_ready())
    return chain_profile(kernels, n_rot) if kernels else None


def split_at_gaps(kernels, gap_us: float) -> list[list]:
    """Kernel events cut where the device sat idle for more than `gap_us` (start order)."""
    out, end = [], None
    for k in sorted(kernels, key=lambda k: k[2]):
        if end is None or k[2] - end > gap_us:
            out.append([])
        out[-1].append(k)
        end = k[2] + k[3] if end is None else max(end, k[2] + k[3])
    return out


def profile_chains(chains, gap_s: float = 5e-3) -> dict | None:
    """`profile_chain` for several chains in one trace: `chains` is a list of `(label, exe, y, args, n_rot)`.

    The chains run one after another, each waited for and followed by `gap_s` of host sleep, so the device
    timeline falls into one run of kernels per chain, cut at idle gaps over `gap_s / 2`. One trace a case
    instead of one a row (a trace costs about a second). Returns `{label: fields}` ({} without a trace, a
    CPU), or None when the cut does not give one run per chain (then profile them one by one)."""
    def run():
        for _, exe, y, args, _ in chains:
            exe(y, *args).block_until_ready()
            time.sleep(gap_s)

    kernels = profiling.gpu_kernels(run)
    if not kernels:
        return {}
    runs = split_at_gaps(kernels, gap_s * 1e6 / 2)
    if len(runs) != len(chains):
        return None
    return {label: chain_profile(ks, n_rot) for (label, *_, n_rot), ks in zip(chains, runs)}


def run_case(c: Case, data: DeviceData, labels, impls, floor_s, gate: TraceGate, tm: Timing, run_id: int,
             phases: Phases, profile: bool = False):
    """Check every impl against the reference, then time it; returns the rows (in `labels` order).

    Each row's `phase_s`: the wall seconds of its own impl by phase (`Phases`). With `profile`, each timed
    row also gets `profile_chain`'s fields, from one trace of all the case's timed chains (`profile_chains`;
    the case's `profile` phase, in no row's `phase_s`)."""
    with phases("data"):
        data.for_case(c)
        xs, y0, w = data.xs, data.y0, data.w
        slots_dev = [jnp.asarray(s) for s in c.slots]
        metas_dev = jax.device_put(c.metas)  # on the device once, not with every dispatch
        metas_static_dev = jax.device_put(c.metas_static)
    rows = {}
    try:
        with phases("compile_wait"):
            ref = c.ref.result()
        with phases("reference"):
            y_ref = y0
            for j in range(c.n_rot):  # the same chain of n_rot calls (fp32 accumulation inside each)
                y_ref = ref(y_ref, xs[j], w, slots_dev[j])
            y_ref.block_until_ready()
    except Exception as e:  # noqa: BLE001 - no reference: nothing in this case can be checked
        ref_error = f"error: reference: {type(e).__name__}: {str(e)[:300]}"
    else:
        ref_error = None
    best = None
    to_profile = []  # (label, compiled chain, args) of the timed rows, profiled after the case's timings
    # the Pallas impls first: a fast time early makes the cap for slow baselines useful
    order = sorted(range(len(labels)), key=lambda i: not labels[i].startswith("pallas"))
    for i in order:
        label, (name, cfg, paged) = labels[i], impls[i]
        case = {"tokens": c.T, "h_in": c.h_in, "h_out": c.h_out, "rank": c.rank, "popularity": c.pop,
                "impl": label}
        row = {"case": case, "floor_us": floor_s * 1e6, "bytes": int(c.bytes_), "flops": int(c.flops),
               "segments": c.segments, "max_segments": c.max_segments, "tiles": c.n_tiles,
               "block_m": int(c.metas[0].block_m), "n_rot": c.n_rot,
               "run": run_id}
        rows[label] = row
        job = c.jobs[label]
        if isinstance(job, str) or ref_error:
            row["skipped"] = job if isinstance(job, str) else ref_error
            continue
        before = phases.s.copy()
        try:
            with phases("compile_wait"):
                exe = job.result()
            if name == "slab":  # the draws' adapters copied into slabs first (not timed: the engine keeps
                with phases("pages"):  # its slab across steps and copies only adapters that join)
                    args = (xs, [slab_from_slots(w, s, rows=c.slab_rows[label], block=cfg.slab_block_p)
                                 for s in c.slots])
                row["slab_rows"] = c.slab_rows[label]
            else:
                with phases("pages"):
                    w_used = data.paged_weights(cfg.chunk) if paged else w
                args = (xs, w_used, metas_dev if sizes_by_layout(name, cfg, paged) else metas_static_dev)
            with phases("check"):
                y1 = exe(jnp.copy(y0), *args)
                err = float(rel_err(y1, y_ref, y0))
            row["rel_err"] = err
            if not err < 2e-2:
                row["skipped"] = f"WRONG: rel_err {err:.3g}"
                continue
            with phases("timing"):
                sec, fields = time_chain(exe, y1, args, c.n_rot, best, tm, gate)
            del y1
            if profile and fields["timing"] != "capped":
                to_profile.append((label, exe, args))
            row.update(median_us=sec * 1e6, floor_ratio=floor_s / sec, **fields)
            best = sec if best is None else min(best, sec)
        except Exception as e:  # noqa: BLE001 - a failing impl is a result, not a crash
            row["skipped"] = f"error: {type(e).__name__}: {str(e)[:300]}"
        finally:
            row["phase_s"] = phases.since(before)
    if to_profile:
        with phases("profile"):
            chains = [(label, exe, jnp.copy(y0).block_until_ready(), args, c.n_rot) for label, exe, args in to_profile]
            profs = profile_chains(chains)
            if profs is None:  # no trace, or the runs did not separate: one trace a chain
                profs = {label: profile_chain(exe, y, args, n) for label, exe, y, args, n in chains}
            del chains
        for label, prof in profs.items():
            if prof:
                rows[label]["profile"] = prof
    rows = [rows[label] for label in labels]
    timed = {r["case"]["impl"]: r["median_us"] for r in rows if "median_us" in r}
    for r in rows:
        if "median_us" in r:
            r["vs"] = {k: v / r["median_us"] for k, v in timed.items() if k != r["case"]["impl"]}
    return rows


def replace_rows(result: dict, rows: list) -> list[int]:
    """`rows` (one case, new timings of some impls) in place of that case's rows of the same impls (the old
    ones move to `result["replaced_rows"]`, nothing is lost); every row of the case gets its `vs` again.
    Returns the indices of the case's rows in `result["rows"]` (changed: `ResultWriter.write`'s `changed`)."""
    key = case_key(rows[0]["case"])
    new = {r["case"]["impl"]: r for r in rows}
    merged = []
    for r in result["rows"]:
        if case_key(r["case"]) == key and r["case"]["impl"] in new:
            result.setdefault("replaced_rows", []).append(r)
            merged.append(new.pop(r["case"]["impl"]))
        else:
            merged.append(r)
    merged.extend(new.values())  # impls the case had no row of
    result["rows"] = merged
    where = [i for i, r in enumerate(merged) if case_key(r["case"]) == key]
    timed = {merged[i]["case"]["impl"]: merged[i]["median_us"] for i in where if "median_us" in merged[i]}
    for i in where:
        r = merged[i]
        if "median_us" in r:
            r["vs"] = {k: v / r["median_us"] for k, v in timed.items() if k != r["case"]["impl"]}
    return where


# ----------------------------------------------------------------------------- summary


def by_tokens_table(by_case: dict, engine_impl: str, min_tokens: int) -> list[str]:
    """Markdown lines: per token count, `engine_impl`'s floor ratio (median, max), cases at >= 50% of the
    floor, and its speedup over the best baseline (impls not named pallas*: median, cases below 1); then
    the same over the cases with >= `min_tokens` tokens. Cases without a timed engine row or baseline are
    left out."""
    per_T = collections.defaultdict(list)  # T -> [(floor ratio, speedup)]
    for (T, *_), d in by_case.items():
        e = d.get(engine_impl)
        base = [r["median_us"] for b, r in d.items() if not b.startswith("pallas") and "median_us" in r]
        if e is not None and "median_us" in e and base:
            per_T[T].append((e["floor_ratio"], min(base) / e["median_us"]))

    def line(name, vals):
        fl, sp = np.array([v[0] for v in vals]), np.array([v[1] for v in vals])
        return (f"| {name} | {len(vals)} | {np.median(fl):.2f} ({fl.max():.2f}) | {int((fl >= 0.5).sum())} | "
                f"{np.median(sp):.2f}x | {int((sp < 1).sum())} |")

    if not per_T:
        return []
    out = [f"\n{engine_impl} against the best baseline, by tokens:",
           "| tokens | cases | floor ratio, median (max) | >= 50% of floor | speedup, median | slower |",
           "| --- | --- | --- | --- | --- | --- |"]
    out += [line(str(T), per_T[T]) for T in sorted(per_T)]
    big = [v for T in per_T if T >= min_tokens for v in per_T[T]]
    if big:
        out.append(line(f">= {min_tokens}", big))
    return out


CASE_FIELDS = ("tokens", "proj", "rank", "popularity")  # the parts of `case_key`, for `--by`


def row_time(r: dict, metric: str = "wall") -> float | None:
    """A row's time: its wall slope (`median_us`), or with `metric="device"` its kernels' device time a call
    (`--profile`'s `device_us`); None when the row has none."""
    if metric == "device":
        return r.get("profile", {}).get("device_us")
    return r.get("median_us")


def ratio_table(by_case: dict, ref_impl: str, by: str | None = None, metric: str = "wall") -> list[str]:
    """Markdown lines: each other impl's time over `ref_impl`'s in the same case (median, range, cases, and
    cases more than 5% slower), over all cases both timed or per value of `by` (a `CASE_FIELDS` name). The
    probe tables of `benchmarks/results/*/README.md` ("time of each variant over the default"). `metric`:
    "wall" (the wall slopes) or "device" (the profiled device times, `row_time`)."""
    if by is not None and by not in CASE_FIELDS:
        raise ValueError(f"--by must be one of {CASE_FIELDS}, got {by!r}")
    groups = collections.defaultdict(list)  # (impl, group) -> ratios, in first-seen order
    for (T, hi, ho, rc, pop), d in by_case.items():
        ref = d.get(ref_impl)
        t_ref = None if ref is None else row_time(ref, metric)
        if t_ref is None:
            continue
        key = dict(tokens=T, proj=f"{hi}x{ho}", rank=rc, popularity=pop).get(by, "all")
        for impl, r in d.items():
            if impl != ref_impl and row_time(r, metric) is not None:
                groups[(impl, key)].append(row_time(r, metric) / t_ref)
    if not groups:
        return []
    what = "device time" if metric == "device" else "time"
    out = [f"\n{what} over {ref_impl}'s in the same case" + (f", by {by}:" if by else ":"),
           f"| impl | {by or 'cases'} | n | median | range | > 5% slower |", "| --- | --- | --- | --- | --- | --- |"]
    impls = list(dict.fromkeys(impl for impl, _ in groups))
    keys = list(dict.fromkeys(key for _, key in groups))
    for (impl, key), rs in sorted(groups.items(), key=lambda kv: (impls.index(kv[0][0]), keys.index(kv[0][1]))):
        a = np.array(rs)
        out.append(f"| {impl} | {key} | {len(a)} | {np.median(a):.2f}x | {a.min():.2f}-{a.max():.2f}x | "
                   f"{int((a > 1.05).sum())} |")
    return out


def grid_series(by_case: dict, engine_impl: str) -> dict:
    """`{popularity: {tokens: (speedups, floor ratios)}}` of `engine_impl` over the cases with a timed row
    and a timed baseline (an impl not named pallas*): the data `plot_grid` draws."""
    series = collections.defaultdict(lambda: collections.defaultdict(lambda: ([], [])))
    for (T, _hi, _ho, _rc, pop), d in by_case.items():
        e = d.get(engine_impl)
        base = [r["median_us"] for b, r in d.items() if not b.startswith("pallas") and "median_us" in r]
        if e is not None and "median_us" in e and base:
            series[pop][T][0].append(min(base) / e["median_us"])
            series[pop][T][1].append(e["floor_ratio"])
    return {pop: dict(by_T) for pop, by_T in series.items()}


def plot_grid(by_case: dict, engine_impl: str, path: str, title: str = "") -> dict:
    """PNG of the grid: `engine_impl`'s speedup over the best baseline (left) and its floor ratio (right)
    against tokens, one line per popularity (median over projections and ranks, the band min to max),
    with the targets (1x, 50% of the floor) dashed. Returns `grid_series`."""
    from slora_jax.experiment.plots import _pyplot, save_figure

    series = grid_series(by_case, engine_impl)
    if not series:
        raise ValueError(f"no case has a timed {engine_impl} row and a timed baseline")
    plt = _pyplot()
    fig, (ax_s, ax_f) = plt.subplots(1, 2, figsize=(11, 4.2))
    for pop, by_T in series.items():
        Ts = sorted(by_T)
        for ax, k in ((ax_s, 0), (ax_f, 1)):
            vals = [np.array(by_T[T][k]) for T in Ts]
            line, = ax.plot(Ts, [np.median(v) for v in vals], marker="o", label=pop)
            ax.fill_between(Ts, [v.min() for v in vals], [v.max() for v in vals], color=line.get_color(), alpha=0.12)
    ax_s.axhline(1.0, color="k", ls="--", lw=0.8)
    ax_f.axhline(0.5, color="k", ls="--", lw=0.8)
    ax_s.set(xscale="log", yscale="log", xlabel="tokens", ylabel="speedup over the best baseline",
             title=f"{engine_impl} vs best baseline")
    ax_f.set(xscale="log", xlabel="tokens", ylabel="fraction of the HBM floor", ylim=(0, 1), title="floor ratio")
    for ax in (ax_s, ax_f):
        ax.grid(True, which="both", alpha=0.3)
    ax_s.legend(title="popularity")
    save_figure(fig, path, title)
    return series


def summarize(result, engine_impl=ENGINE_IMPL, min_tokens=64, table=False, out=None):
    """Per impl: median floor ratio (cases with >= min_tokens), cases timed, cases fastest; the cases where
    the engine's impl is slower than the best baseline (a baseline: an impl not named pallas*)."""
    p = lambda *a: print(*a, file=out or sys.stdout)  # noqa: E731
    by_case = {}
    for r in result["rows"]:
        by_case.setdefault(case_key(r["case"]), {})[r["case"]["impl"]] = r
    labels = list(dict.fromkeys(r["case"]["impl"] for r in result["rows"]))
    fastest = collections.Counter()
    for d in by_case.values():
        timed = {k: r["median_us"] for k, r in d.items() if "median_us" in r}
        if len(timed) > 1:
            fastest[min(timed, key=timed.get)] += 1
    devices = {run.get("device") for run in result.get("runs", [])} or {result.get("device")}
    p(f"\n{len(by_case)} cases ({result.get('device')}; runs {len(result.get('runs', [])) or 1})"
      + (f"  WARNING: devices differ across runs: {sorted(map(str, devices))}" if len(devices) > 1 else ""))
    p(f"{'impl':>36} {'timed':>6} {'skipped':>7} {'failed':>6} {'median floor ratio (T>=' + str(min_tokens) + ')':>30} "
      f"{'fastest':>7} {'capped':>6} {'noisy':>5}")
    for label in labels:
        rs = [d[label] for d in by_case.values() if label in d]
        timed = [r for r in rs if "median_us" in r]
        big = [r["floor_ratio"] for r in timed if r["case"]["tokens"] >= min_tokens]
        failed = sum("skipped" in r and (r["skipped"].startswith(("error", "WRONG"))) for r in rs)
        skipped = sum("skipped" in r for r in rs) - failed
        noisy = sum(r.get("timing") == "slope" and r.get("spread", 0) > Timing.tol for r in timed)
        capped = sum(r.get("timing") == "capped" for r in timed)
        med = f"{np.median(big):.3g} (of {len(big)})" if big else "-"
        p(f"{label:>36} {len(timed):6d} {skipped:7d} {failed:6d} {med:>30} {fastest[label]:7d} {capped:6d} "
          f"{noisy:5d}")
    slower, missing = [], []
    for k, d in by_case.items():
        e = d.get(engine_impl)
        base = {b: r["median_us"] for b, r in d.items() if not b.startswith("pallas") and "median_us" in r}
        if e is None or "median_us" not in e:
            missing.append((k, (e or {}).get("skipped", "not run")))
            continue
        if base:
            b = min(base, key=base.get)
            if base[b] < e["median_us"]:
                slower.append((k, e["median_us"], b, base[b]))
    for line in by_tokens_table(by_case, engine_impl, min_tokens):
        p(line)
    p(f"\n{engine_impl} slower than the best baseline in {len(slower)} of "
      f"{sum(1 for d in by_case.values() if engine_impl in d and 'median_us' in d[engine_impl])} cases:")
    for (T, hi, ho, rc, pop), us, b, bus in slower:  # in grid order
        p(f"  T={T:5d} {hi:>5}x{ho:<5} r={rc:5s} {pop:9s} {engine_impl} {us:9.1f} us  {b} {bus:9.1f} us  "
          f"({us / bus:.2f}x)")
    if missing:
        p(f"{engine_impl} not timed in {len(missing)} cases:")
        for (T, hi, ho, rc, pop), why in missing:
            p(f"  T={T:5d} {hi:>5}x{ho:<5} r={rc:5s} {pop:9s} {why[:120]}")
    if table:
        p(f"\n{'T':>5} {'proj':>11} {'rank':>5} {'pop':>9} {'floor':>8} {engine_impl:>10} {'ratio':>6} "
          f"{'best other':>22} {'speedup':>7}")
        for (T, hi, ho, rc, pop), d in by_case.items():
            e = d.get(engine_impl)
            others = {k: r["median_us"] for k, r in d.items() if k != engine_impl and "median_us" in r}
            b = min(others, key=others.get) if others else None
            et = f"{e['median_us']:10.1f} {e['floor_ratio']:6.2f}" if e and "median_us" in e else f"{'-':>10} {'-':>6}"
            bt = f"{b:>12}={others[b]:9.1f}" if b else f"{'-':>22}"
            sp = f"{others[b] / e['median_us']:7.2f}" if (b and e and "median_us" in e) else f"{'-':>7}"
            floor = next(iter(d.values()))["floor_us"]
            p(f"{T:5d} {hi:>5}x{ho:<5} {rc:>5} {pop:>9} {floor:8.1f} {et} {bt} {sp}")


# ----------------------------------------------------------------------------- main


class ResultWriter:
    """Writes the result JSON after every case, atomically (a run killed mid-write keeps the previous file).

    Rows go one a line, each encoded once: `json.dump(indent=1)` of the whole growing file (Python's
    pure-Python encoder, as any indent selects) took 0.27 s a case at the full grid's 3920 rows.
    A row changed once written (`--retime`) must be named in `changed` (its index), or the file keeps
    its old text.
    """

    def __init__(self, path):
        self.path = path
        self._rows = []  # encoded rows

    def write(self, result, changed=()):
        for i in changed:
            if i < len(self._rows):
                self._rows[i] = json.dumps(result["rows"][i])
        self._rows += [json.dumps(r) for r in result["rows"][len(self._rows):]]
        head = json.dumps({k: v for k, v in result.items() if k != "rows"}, indent=1)
        with open(self.path + ".tmp", "w") as f:
            f.write(head[:-2] + ',\n "rows": [\n' + ",\n".join(self._rows) + "\n ]\n}\n")
        os.replace(self.path + ".tmp", self.path)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small subset of the grid")
    p.add_argument("--smoke", action="store_true", help="CPU check of the whole flow: tiny shapes, short chains")
    p.add_argument("--tokens", nargs="*", help="e.g. 64,256 (default: all of %s)" % (TOKENS,))
    p.add_argument("--projections", "--projs", dest="projs", nargs="*", help="e.g. 4096x4096,4096x11008")
    p.add_argument("--ranks", nargs="*", help=f"from {RANK_CASES}")
    p.add_argument("--pops", nargs="*", help=f"from {POPS}")
    p.add_argument("--impls", nargs="*", help="pallas, pallas_paged, pallas[k=v,...] (KernelConfig fields), "
                   f"baselines; default {','.join(IMPLS_DEFAULT)}")
    p.add_argument("--budget-s", type=float, default=1e9, help="start no new case after this many seconds")
    p.add_argument("--resume", help="JSON of an earlier (cut-off) run: skip its cases, append to its rows")
    p.add_argument("--retime", action="store_true",
                   help="with --resume: time --impls again on FILE's cases, replacing their rows there")
    p.add_argument("--summarize", help="only print the summary of this JSON")
    p.add_argument("--table", action="store_true", help="summary: also one line per case")
    p.add_argument("--engine-impl", default=ENGINE_IMPL, help="summary: the impl compared with the baselines")
    p.add_argument("--min-tokens", type=int, default=64, help="summary: floor ratios over cases with >= this")
    p.add_argument("--against", help="with --summarize: also every impl's time over this impl's, case by case")
    p.add_argument("--metric", choices=("wall", "device"), default="wall",
                   help="with --against: compare wall slopes, or the device times of --profile runs")
    p.add_argument("--by", choices=CASE_FIELDS, help="with --against: one line per impl and value of this field")
    p.add_argument("--plot", help="with --summarize: write a PNG of --engine-impl's speedup and floor ratio by "
                   "tokens and popularity here")
    p.add_argument("--compile-threads", type=int, default=12)
    p.add_argument("--ahead", type=int, default=24, help="cases compiled ahead of the one being timed")
    p.add_argument("--overlap-compile", action="store_true",
                   help="time while later cases compile (faster; on an H200 it left 52 of 61 cases noisy, "
                        "spreads of the differences over 100%%: compile threads and XLA's autotuning on the "
                        "GPU disturb the timing). Default: compile `--ahead` cases, then time them")
    p.add_argument("--loop-max-segments", type=int, default=MAX_LOOP_SEGMENTS,
                   help="skip `loop` where a call has more segments (it unrolls a matmul pair for each)")
    p.add_argument("--rot-range", default=None,
                   help="LO,HI: calls per chain (default 8,32; 2,4 with --smoke); compile time grows with HI")
    p.add_argument("--triton-gemm-off", nargs="*", default=None,
                   help="impl labels (and '(reference)') compiled with xla_gpu_enable_triton_gemm=false "
                        f"(default: {','.join(TRITON_GEMM_OFF)}; pass none to compile everything by default)")
    p.add_argument("--tight-segments", action="store_true",
                   help="size each case's metadata to its own most segments (default: min(T, 1000), the bound a "
                        "batch of up to 1000 adapters needs; its padding tiles launch programs that return at once). For probes: "
                        "the popularities of a case then differ in shape, so they no longer share compiles")
    p.add_argument("--block-m", type=int, default=None,
                   help="rows per tile of every case's metadata (a power of two >= 16; default: by token count, "
                        "`ops.lora.default_block_m`)")
    p.add_argument("--profile", action="store_true",
                   help="also run each timed chain once under the profiler: device us a call (kernels summed), "
                        "the span (with the gaps where the GPU waited for the host), kernels a call")
    p.add_argument("--plan-only", action="store_true", help="print the case and compile counts; no device work")
    p.add_argument("--out", default=os.environ.get("OUT", "benchmarks/results"))
    p.add_argument("--name", default="lora_kernels")
    p.add_argument("--git-commit", default=None)
    args = p.parse_args(argv)

    if args.summarize:
        with open(args.summarize) as f:
            result = json.load(f)
        summarize(result, args.engine_impl, args.min_tokens, table=args.table)
        by_case = {}
        for r in result["rows"]:
            by_case.setdefault(case_key(r["case"]), {})[r["case"]["impl"]] = r
        if args.against:
            lines = ratio_table(by_case, args.against, args.by, args.metric)
            print("\n".join(lines) if lines else f"\nno case has a timed {args.against} row")
        if args.plot:
            plot_grid(by_case, args.engine_impl, args.plot,
                      title=f"{os.path.basename(args.summarize)} ({result.get('device', '')}, {len(by_case)} cases)")
            print(f"wrote {args.plot}")
        return

    base = SMOKE if args.smoke else QUICK if args.quick else dict(tokens=TOKENS, projs=PROJS, ranks=RANK_CASES,
                                                                   pops=POPS)
    tokens = tuple(int(t) for t in split_list(args.tokens)) or base["tokens"]
    projs = tuple(tuple(int(v) for v in s.split("x")) for s in split_list(args.projs)) or base["projs"]
    rank_cases = tuple(split_list(args.ranks)) or base["ranks"]
    pops = tuple(split_list(args.pops)) or base["pops"]
    labels = split_list(args.impls) or list(IMPLS_DEFAULT)
    bad = [r for r in rank_cases if r not in RANK_CASES] + [q for q in pops if q not in POPS]
    if bad:
        p.error(f"unknown rank case or popularity: {bad}")
    n_rot_range = (2, 4) if args.smoke else (8, 32)
    if args.block_m is not None and (args.block_m < 16 or args.block_m & (args.block_m - 1)):
        p.error(f"--block-m must be a power of two >= 16, got {args.block_m}")
    meta_opts = dict(tight_segments=args.tight_segments, block_m=args.block_m)
    if args.rot_range:
        n_rot_range = tuple(int(v) for v in args.rot_range.split(","))
        if len(n_rot_range) != 2 or not 1 <= n_rot_range[0] <= n_rot_range[1]:
            p.error(f"--rot-range wants LO,HI with 1 <= LO <= HI, got {args.rot_range!r}")
    tm = Timing(target_s=1e-3, min_diffs=2, max_diffs=3) if args.smoke else Timing()

    plan = [(hi, ho, rc, T, pop) for hi, ho in projs for rc in rank_cases for T in tokens for pop in pops]
    result = None
    if args.resume:
        with open(args.resume) as f:
            result = json.load(f)
        meta_of = {json.dumps(run.get("metadata", META_DEFAULT), sort_keys=True) for run in result.get("runs", [])}
        if meta_of and meta_of != {json.dumps(meta_opts, sort_keys=True)}:
            p.error(f"{args.resume} was run with metadata {sorted(meta_of)}; resume it with the same "
                    f"(--tight-segments, --block-m), not {meta_opts}")
        done_keys = {case_key(r["case"]) for r in result["rows"]}
        n_before = len(plan)
        plan = [k for k in plan if ((k[3], k[0], k[1], k[2], k[4]) in done_keys) == args.retime]
        if args.retime:
            print(f"retime: {len(plan)} of {n_before} cases in {args.resume}, impls {labels}", flush=True)
        else:
            print(f"resume: {n_before - len(plan)} of {n_before} cases already in {args.resume}", flush=True)
    elif args.retime:
        p.error("--retime needs --resume FILE")

    gate = TraceGate()
    if args.plan_only:
        planner = Planner(labels, 1, n_rot_range, gate, plan_only=True, max_loop_segments=args.loop_max_segments,
                          **meta_opts)
        skips = collections.Counter()
        pairs = 0
        for k in plan:
            c = planner.prepare(*k)
            skips.update(f"{lb}: {j[:40]}" for lb, j in c.jobs.items() if isinstance(j, str))
            pairs += c.segs_total if not isinstance(c.jobs.get("loop", ""), str) else 0
        print(f"{len(plan)} cases, {len(plan) * len(labels)} rows; compiles by impl: {dict(planner.n_compiles)}; "
              f"total {sum(planner.n_compiles.values())}; loop matmul pairs unrolled: {pairs}")
        for s, n in skips.most_common():
            print(f"  skipped {n:4d}  {s}")
        return

    off = ([lb for lb in TRITON_GEMM_OFF if lb in labels or lb == "(reference)"] if args.triton_gemm_off is None
           else split_list(args.triton_gemm_off))
    unknown = [lb for lb in off if lb not in labels and lb != "(reference)"]
    if unknown:
        p.error(f"--triton-gemm-off names impls not in this run: {unknown}")
    compiler_options = {} if jax.default_backend() != "gpu" else {
        lb: {"xla_gpu_enable_triton_gemm": False} for lb in off}

    t_start = time.perf_counter()
    phases = Phases()
    sys.setswitchinterval(1e-4)  # a compile thread's Python never holds the dispatching thread long
    with phases("setup"):
        commit = args.git_commit or git_commit(short=True)
        dev = jax.devices()[0]
    with phases("ceilings"):
        ceilings = measure_ceilings(small=jax.default_backend() == "cpu")
    bw = ceilings["copy_GBps"] * 1e9
    rate = ceilings["bf16_TFLOPs"] * 1e12
    print(f"device {dev.device_kind}  jax {jax.__version__}  ceilings {ceilings}", flush=True)
    run_info = {"device": dev.device_kind, "git_commit": commit, "measured_ceilings": ceilings,
                "command": " ".join([os.path.basename(sys.argv[0]), *(sys.argv[1:] if argv is None else argv)]),
                "cases_planned": len(plan), "compiler_options": compiler_options,
                "metadata": meta_opts, **({"retime": labels} if args.retime else {})}
    if result is None:
        result = {"benchmark": args.name, "git_commit": commit, "device": dev.device_kind,
                  "jax_version": jax.__version__, "measured_ceilings": ceilings, "command": run_info["command"],
                  "method": "per call = median of differences (t(2*reps) - t(reps)) / (reps * n_rot), 3 to 5 "
                            "until 3 agree within 3%, of a compiled chain of n_rot add_lora calls (y donated; x and "
                            "slot draws rotated over n_rot buffers, >= 120 MB working set, 8 to 32); chains >= "
                            "20 ms: median of 3 whole chains; first chain > 50x the case's best: that chain "
                            "(timing 'capped'); bf16 weights, 1000 slots resident",
                  "rows": [], "runs": []}
    result.setdefault("runs", [])
    run_id = len(result["runs"])
    result["runs"].append(run_info)
    if len({r["device"] for r in result["runs"]}) > 1:
        print(f"WARNING: resuming a run made on {result['runs'][0]['device']} on {dev.device_kind}", flush=True)
    os.makedirs(args.out, exist_ok=True)
    out_path = os.path.join(args.out, f"{args.name}.json")
    writer = ResultWriter(out_path)

    planner = Planner(labels, args.compile_threads, n_rot_range, gate, max_loop_segments=args.loop_max_segments,
                      compiler_options=compiler_options, **meta_opts)
    impls = planner.impls
    data = DeviceData()
    pending = collections.deque()
    next_i = 0
    done = 0

    def record():
        wall_s = time.perf_counter() - t_start
        run_info.update(cases_done=done, wall_s=round(wall_s, 3), phase_s=phases.totals(wall_s))

    for i in range(len(plan)):
        if time.perf_counter() - t_start > args.budget_s:
            print(f"budget reached: {done}/{len(plan)} cases done", flush=True)
            break
        if args.overlap_compile:
            with phases("prepare"):
                while next_i < len(plan) and next_i <= i + args.ahead:
                    pending.append(planner.prepare(*plan[next_i]))
                    next_i += 1
        elif not pending:  # compile the next `ahead` cases in parallel, then time them with nothing compiling
            with phases("prepare"):
                while next_i < len(plan) and len(pending) < args.ahead:
                    pending.append(planner.prepare(*plan[next_i]))
                    next_i += 1
            with phases("compile_wait"):
                left_s = args.budget_s - (time.perf_counter() - t_start)
                compiled = planner.wait_all(timeout=min(max(0.0, left_s), threading.TIMEOUT_MAX))
            if not compiled:  # the device's own time limit may not wait for the rest of the batch
                print(f"budget reached while compiling: {done}/{len(plan)} cases done", flush=True)
                break
        c = pending.popleft()
        floor_s = max(c.bytes_ / bw, c.flops / rate)
        rows = run_case(c, data, labels, impls, floor_s, gate, tm, run_id, phases, profile=args.profile)
        changed = []
        if args.retime:
            changed = replace_rows(result, rows)
        else:
            result["rows"].extend(rows)
        done += 1
        line = "  ".join(f"{r['case']['impl']}={r['median_us']:.1f}" + ("*" if r.get("timing") == "capped" else "")
                         + (f"(dev {r['profile']['device_us']:.1f} span {r['profile']['span_us']:.1f} "
                            f"k {r['profile']['kernels_a_call']:.1f})" if "profile" in r else "")
                         if "median_us" in r else f"{r['case']['impl']}=skip" for r in rows)
        print(f"{c.label()} floor={floor_s * 1e6:8.1f}us  {line}", flush=True)
        record()
        with phases("json"):
            writer.write(result, changed)
    record()
    run_info.update(lower_s=dict(planner.trace_s), compile_thread_s=dict(planner.compile_s),
                    compiles=dict(planner.n_compiles))
    with phases("json"):
        writer.write(result)
    print(f"compiles {dict(planner.n_compiles)}\nlowering s (serial) "
          f"{ {k: round(v, 1) for k, v in planner.trace_s.items()} }\ncompile thread-s "
          f"{ {k: round(v, 1) for k, v in planner.compile_s.items()} }", flush=True)
    with phases("summary"):
        summarize(result, args.engine_impl, args.min_tokens, table=args.table)
    wall_s = time.perf_counter() - t_start
    print(f"wrote {out_path}  ({done} cases in {wall_s:.1f} s)\nphase s (main thread): "
          + "  ".join(f"{k} {v:.1f}" for k, v in phases.totals(wall_s).items())
          + f"  (lowering, serial in the compile threads: {sum(planner.trace_s.values()):.1f})", flush=True)
    in_flight = planner.pool._work_queue.qsize() if planner.pool else 0  # noqa: SLF001
    planner.pool.shutdown(wait=False, cancel_futures=True)
    if done < len(plan) or in_flight:  # compiles of cases not timed may still run: do not wait for them
        sys.stdout.flush()
        os._exit(0)


if __name__ == "__main__":
    main()

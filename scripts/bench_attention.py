"""Benchmark paged decode attention (`pallas_kernels.paged_attention`) on a GPU.

Grid (issue 4): batch {8, 64, 256} x context {512, 2048, 8192} x head shapes
Llama-7B (32 q / 32 KV heads) and Llama-3-8B (32 q / 8 KV heads), head_dim 128, bf16,
16-token pages scattered over the pool by a random page table. Every sequence holds
`context` tokens. Each row: median time of one decode attention call, the HBM floor,
the floor ratio, and the time of `jax.nn.dot_product_attention` on the same K/V laid
out contiguously (`vs` = its time / ours; > 1 means the paged kernel is faster).
JSON as in `shared/BENCHMARKS.md` goes to `--out` (default `$OUT`, else
`benchmarks/results`).

Method: the kernel is first checked against `paged_attention_reference` with ragged
lengths (1 .. context, one sequence of length 1) on fresh random data, for the first
<= 8 sequences; a prefill-chunk check on the GPU comes first. Timing: one jit makes
`n_rot` calls back to back, each on its own query and its own pool region (`n_rot`
regions, enough that the rotated working set is >= 150 MB, so L2 holds none of it);
it is dispatched `reps` times asynchronously (host dispatch overlaps device work) before one
`block_until_ready`, and the median per-call time over 7 such batches is reported.
Floor = max(bytes / copy bandwidth, flops / bf16 matmul rate), both ceilings measured
in this run; bytes = K and V of every token read once + q read + output written
(+ the page table). The pool region for the contiguous baseline is the same buffer
reshaped (pages of a region in order), so both read the same bytes.

Before the grid, a small sweep of the context split (flash-decoding) for small batches;
the grid runs the launcher's defaults (`n_splits` from `default_decode_splits`).

    python scripts/bench_attention.py --quick
    python scripts/bench_attention.py --out /tmp/res
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from pallas_kernels.paged_attention import default_decode_splits, paged_decode_attention  # noqa: E402
from slora_jax.ops.attention import paged_attention, paged_attention_reference  # noqa: E402
from slora_jax.provenance import git_commit  # noqa: E402

MODELS = {"llama-7b": (32, 32), "llama-3-8b": (32, 8)}  # name -> (q heads, KV heads)
HEAD_DIM = 128
PAGE = 16
BATCHES = (8, 64, 256)
CONTEXTS = (512, 2048, 8192)
DEFAULT_CFG = dict(block_t=64, num_warps=4, num_stages=2)  # the launcher's defaults
# (model, batch, context, config) tried before the grid. Run 1 (notes) swept block_t 16..128,
# warps 2..8, stages 1..4 at the target: all within 5% (block_t 64, 4 warps, 2 stages is kept);
# what is left to learn is the context split for small batches.
SWEEP = tuple(
    (m, b, c, dict(DEFAULT_CFG, n_splits=x))
    for m, b, c, xs in (("llama-3-8b", 64, 2048, (1, 2)), ("llama-3-8b", 8, 8192, (2, 4, 8, 16)),
                        ("llama-3-8b", 8, 512, (1, 2, 4)), ("llama-7b", 8, 2048, (1, 2, 4)))
    for x in xs
)
TARGET = (64, 2048)  # (batch, context) of the target: >= 70% of the floor
MIN_ROT_BYTES = 150e6
nan = float("nan")


def _per_call_s(fn, *args, reps=10, batches=7):
    """Median seconds per call of `fn(*args)`, `reps` calls dispatched back to back per batch."""
    jax.block_until_ready(fn(*args))
    ts = []
    for _ in range(batches):
        t0 = time.perf_counter()
        for _ in range(reps):
            out = fn(*args)
        jax.block_until_ready(out)
        ts.append((time.perf_counter() - t0) / reps)
    return float(np.median(ts))


def measure_ceilings(small: bool = False):
    """Copy bandwidth (bytes read + written), read-only bandwidth (a sum) and bf16 matmul rate.

    A second of matmuls first, so the clocks are up (the first run read a copy rate 35% low).
    """
    n = 512 if small else 8192
    k1, k2 = jax.random.split(jax.random.key(0))
    a = jax.random.normal(k1, (n, n), jnp.bfloat16)
    b = jax.random.normal(k2, (n, n), jnp.bfloat16)
    mm = jax.jit(lambda a, b: a @ b)
    t_end = time.perf_counter() + (0.05 if small else 1.0)
    while time.perf_counter() < t_end:
        jax.block_until_ready(mm(a, b))
    tflops = 2 * n**3 / _per_call_s(mm, a, b) / 1e12
    x = jax.random.normal(jax.random.key(1), ((4 if small else 1024) * 1024 * 1024,), jnp.bfloat16)
    copy_GBps = 2 * x.nbytes / _per_call_s(jax.jit(lambda a: a + 1), x) / 1e9
    read_GBps = x.nbytes / _per_call_s(jax.jit(lambda a: jnp.sum(a, dtype=jnp.float32)), x) / 1e9
    return {"copy_GBps": round(copy_GBps, 1), "read_GBps": round(read_GBps, 1),
            "bf16_TFLOPs": round(tflops, 3)}


def random_pool(key, shape, n_chunks=16):
    """Random bf16 `shape`, filled in chunks in place (whole-array RNG would need its fp32/uint32
    intermediates at full size, too much for a 34 GB pool)."""
    n_chunks = math.gcd(n_chunks, shape[0])
    rows = shape[0] // n_chunks

    def fill(key):
        def body(i, buf):
            chunk = jax.random.normal(jax.random.fold_in(key, i), (rows, *shape[1:]), jnp.bfloat16)
            return jax.lax.dynamic_update_slice_in_dim(buf, chunk, i * rows, 0)

        return jax.lax.fori_loop(0, n_chunks, body, jnp.zeros(shape, jnp.bfloat16))

    return jax.jit(fill)(key)


class Workload:
    """A pool of `n_rot` regions of `B * ctx / PAGE` pages each, random bf16 K/V, and per
    region a random page table (a permutation of the region's pages) and a query."""

    def __init__(self, B, ctx, N, K, seed, min_rot_bytes=MIN_ROT_BYTES):
        self.B, self.ctx, self.N, self.K = B, ctx, N, K
        self.M = ctx // PAGE
        kv_bytes = 2 * B * ctx * K * HEAD_DIM * 2
        self.n_rot = int(min(8, max(1, math.ceil(min_rot_bytes / kv_bytes))))
        region = B * self.M
        kk, kv, kq = jax.random.split(jax.random.key(seed), 3)
        shape = (self.n_rot * region, PAGE, K, HEAD_DIM)
        self.k_pages = random_pool(kk, shape)
        self.v_pages = random_pool(kv, shape)
        self.q = jax.random.normal(kq, (self.n_rot, B, N, HEAD_DIM), jnp.bfloat16)
        rng = np.random.default_rng(seed)
        self.tables = jnp.asarray(np.stack(
            [r * region + rng.permutation(region).reshape(B, self.M) for r in range(self.n_rot)]).astype(np.int32))
        self.lengths = jnp.full((B,), ctx, jnp.int32)
        self.kv_bytes = kv_bytes

    def contiguous(self, r):
        """Region r's pages in order, as a contiguous `[B, ctx, K, D]` cache (a free reshape)."""
        region = self.B * self.M
        sl = slice(r * region, (r + 1) * region)
        return (self.k_pages[sl].reshape(self.B, self.ctx, self.K, HEAD_DIM),
                self.v_pages[sl].reshape(self.B, self.ctx, self.K, HEAD_DIM))


def floor_of(w: Workload, ceil):
    bytes_ = w.kv_bytes + 2 * w.B * w.N * HEAD_DIM * 2 + w.B * w.M * 4
    flops = 4 * w.B * w.N * w.ctx * HEAD_DIM
    return max(bytes_ / (ceil["copy_GBps"] * 1e9), flops / (ceil["bf16_TFLOPs"] * 1e12)), bytes_


def check_decode(w: Workload, cfg, seed):
    """rel err of the kernel vs the reference, ragged lengths, first <= 8 sequences."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, w.ctx + 1, w.B)
    lengths[0] = 1
    lengths[-1] = w.ctx
    lengths = jnp.asarray(lengths.astype(np.int32))
    q = w.q[0]
    out = jax.jit(lambda q, kp, vp, pt, ln: paged_decode_attention(q, kp, vp, pt, ln, **cfg))(
        q, w.k_pages, w.v_pages, w.tables[0], lengths)
    nb = min(8, w.B)
    ref = jax.jit(paged_attention_reference)(
        q[:nb, None].astype(jnp.float32), w.k_pages, w.v_pages, w.tables[0][:nb], (lengths[:nb] - 1)[:, None])
    ref = ref.astype(jnp.float32)[:, 0]
    err = float(jnp.linalg.norm(out[:nb].astype(jnp.float32) - ref) / jnp.linalg.norm(ref))
    finite = bool(jnp.all(jnp.isfinite(out)))
    return err if finite else float("nan")


def make_pallas_fn(w: Workload, cfg):
    def run(q, kp, vp, tables, lengths):
        return tuple(paged_decode_attention(q[i % w.n_rot], kp, vp, tables[i % w.n_rot], lengths, **cfg)
                     for i in range(w.n_rot))

    f = jax.jit(run)
    return lambda: f(w.q, w.k_pages, w.v_pages, w.tables, w.lengths)


def make_dpa_fn(w: Workload, implementation=None):
    def run(q, kp, vp, lengths):
        region = w.B * w.M
        outs = []
        for r in range(w.n_rot):
            k = kp[r * region:(r + 1) * region].reshape(w.B, w.ctx, w.K, HEAD_DIM)
            v = vp[r * region:(r + 1) * region].reshape(w.B, w.ctx, w.K, HEAD_DIM)
            outs.append(jax.nn.dot_product_attention(q[r][:, None], k, v, key_value_seq_lengths=lengths,
                                                     implementation=implementation)[:, 0])
        return tuple(outs)

    f = jax.jit(run)
    return lambda: f(w.q, w.k_pages, w.v_pages, w.lengths)


def time_calls(fn, guess_s, n_calls, target_s=20e-3):
    """Median per-call seconds of `fn` (which makes `n_calls` calls), dispatched `reps` times
    asynchronously per timed batch so host dispatch overlaps device work."""
    out = fn()
    jax.block_until_ready(out)
    reps = int(np.clip(target_s / max(guess_s * n_calls, 1e-6), 2, 200))
    ts = []
    for _ in range(7):
        t0 = time.perf_counter()
        for _ in range(reps):
            out = fn()
        jax.block_until_ready(out)
        ts.append((time.perf_counter() - t0) / (reps * n_calls))
    return float(np.median(ts)), reps


def check_prefill(N, K, seed, S=128, start=1000, M=128):
    """Prefill-chunk kernel on the GPU vs the reference: 4 sequences, a chunk of S queries
    starting mid-sequence (one row padded), bf16."""
    B = 4
    rng = np.random.default_rng(seed)
    num_pages = B * M
    kk, kv, kq = jax.random.split(jax.random.key(seed), 3)
    kp = jax.random.normal(kk, (num_pages, PAGE, K, HEAD_DIM), jnp.bfloat16)
    vp = jax.random.normal(kv, (num_pages, PAGE, K, HEAD_DIM), jnp.bfloat16)
    q = jax.random.normal(kq, (B, S, N, HEAD_DIM), jnp.bfloat16)
    pt = jnp.asarray(rng.permutation(num_pages).reshape(B, M).astype(np.int32))
    starts = np.array([0, start, start + 7, M * PAGE - S])
    q_pos = starts[:, None] + np.arange(S)[None]
    q_pos[2, S // 2:] = -1
    q_pos = jnp.asarray(q_pos.astype(np.int32))
    out = jax.jit(paged_attention)(q, kp, vp, pt, q_pos)
    ref = jax.jit(paged_attention_reference)(q.astype(jnp.float32), kp, vp, pt, q_pos)
    err = float(jnp.linalg.norm(out.astype(jnp.float32) - ref) / jnp.linalg.norm(ref))
    f = jax.jit(paged_attention)
    t, _ = time_calls(lambda: f(q, kp, vp, pt, q_pos), 1e-4, 1)
    return {"n_heads": N, "n_kv_heads": K, "batch": B, "chunk": S, "rel_err": err,
            "median_us_untuned": t * 1e6}



def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="the target case (batch 64, context 2048) only, short sweep")
    p.add_argument("--no-sweep", action="store_true", help="skip the split sweep")
    p.add_argument("--out", default=os.environ.get("OUT") or "benchmarks/results")
    args = p.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    out_path = os.path.join(args.out, "paged_attention.json")
    t_start = time.perf_counter()

    ceil = measure_ceilings(small=jax.default_backend() != "gpu")
    result = {"benchmark": "paged_attention_decode", "git_commit": git_commit(),
              "device": jax.devices()[0].device_kind, "jax_version": jax.__version__,
              "measured_ceilings": ceil, "page_size": PAGE, "head_dim": HEAD_DIM, "dtype": "bfloat16",
              "command": " ".join(["python scripts/bench_attention.py", *(sys.argv[1:] if argv is None else argv)]),
              "sweep": [], "prefill_checks": [], "rows": []}
    print(f"device {result['device']}  jax {jax.__version__}  ceilings {ceil}", flush=True)

    def dump():
        with open(out_path, "w") as f:
            json.dump(result, f, indent=1)

    for name, (N, K) in MODELS.items():
        try:
            result["prefill_checks"].append({"model": name, **check_prefill(N, K, seed=7)})
        except Exception as e:  # noqa: BLE001 - a failure is a result
            result["prefill_checks"].append({"model": name, "error": f"{type(e).__name__}: {str(e)[:400]}"})
        print("prefill check", result["prefill_checks"][-1], flush=True)
    dump()

    if not args.no_sweep:
        for name, B, ctx, cfg in (SWEEP[:2] if args.quick else SWEEP):
            N, K = MODELS[name]
            row = {"model": name, "batch": B, "context": ctx, "config": cfg}
            try:
                w = Workload(B, ctx, N, K, seed=1)
                row["floor_us"] = floor_of(w, ceil)[0] * 1e6
                row["rel_err"] = check_decode(w, cfg, seed=2)
                if not row["rel_err"] < 2e-2:
                    raise AssertionError(f"rel_err {row['rel_err']}")
                row["median_us"] = time_calls(make_pallas_fn(w, cfg), 1e-4, w.n_rot)[0] * 1e6
            except Exception as e:  # noqa: BLE001 - a failure is a result
                row["error"] = f"{type(e).__name__}: {str(e)[:400]}"
            w = None
            gc.collect()
            result["sweep"].append(row)
            print("sweep", row, flush=True)
        dump()

    grid = [TARGET] if args.quick else [(b, c) for b in BATCHES for c in CONTEXTS]
    cfg = DEFAULT_CFG
    for name, (N, K) in MODELS.items():
        for B, ctx in grid:
            case = {"model": name, "batch": B, "context": ctx, "n_heads": N, "n_kv_heads": K,
                    "head_dim": HEAD_DIM, "page_size": PAGE, "impl": "pallas_paged", "config": cfg}
            row = {"case": case}
            try:
                w = Workload(B, ctx, N, K, seed=B + ctx)
                floor_s, bytes_ = floor_of(w, ceil)
                row.update(floor_us=floor_s * 1e6, bytes=bytes_, n_rot=w.n_rot,
                           n_splits=default_decode_splits(B, K, ctx, cfg["block_t"]))
                row["rel_err"] = check_decode(w, cfg, seed=B * ctx)
                if not row["rel_err"] < 2e-2:
                    raise AssertionError(f"WRONG: rel_err {row['rel_err']}")
                t, _ = time_calls(make_pallas_fn(w, cfg), floor_s, w.n_rot)
                row.update(median_us=t * 1e6, floor_ratio=floor_s / t, achieved_GBps=bytes_ / t / 1e9, vs={})
                for impl in ("xla", "cudnn"):
                    try:
                        tb, _ = time_calls(make_dpa_fn(w, impl), floor_s, w.n_rot)
                        row["vs"][f"dot_product_attention_{impl}"] = tb / t
                        row[f"dot_product_attention_{impl}_us"] = tb * 1e6
                    except Exception as e:  # noqa: BLE001
                        row[f"dot_product_attention_{impl}_error"] = f"{type(e).__name__}: {str(e)[:200]}"
            except Exception as e:  # noqa: BLE001
                row["error"] = f"{type(e).__name__}: {str(e)[:400]}"
            w = None
            gc.collect()
            result["rows"].append(row)
            dump()
            print(f"{name:11s} B={B:4d} ctx={ctx:5d} floor={row.get('floor_us', 0):9.1f}us "
                  f"pallas={row.get('median_us', nan):9.1f}us ratio={row.get('floor_ratio', nan):.2f} "
                  f"xla={row.get('dot_product_attention_xla_us', nan):9.1f}us "
                  f"cudnn={row.get('dot_product_attention_cudnn_us', nan):9.1f}us "
                  f"err={row.get('rel_err', nan):.1e} {row.get('error', '')}", flush=True)

    result["wall_s"] = time.perf_counter() - t_start
    dump()
    print_summary(result)
    print(f"wrote {out_path}")


def print_summary(result):
    print(f"\n{'model':11s} {'B':>4} {'ctx':>5} {'floor_us':>9} {'pallas_us':>9} {'floor%':>6} {'GB/s':>6} "
          f"{'xla_us':>9} {'vs_xla':>6} {'cudnn_us':>9} {'vs_cudnn':>8}")
    for r in result["rows"]:
        c = r["case"]
        if "median_us" not in r:
            print(f"{c['model']:11s} {c['batch']:4d} {c['context']:5d} error: {r.get('error', '')[:80]}")
            continue
        print(f"{c['model']:11s} {c['batch']:4d} {c['context']:5d} {r['floor_us']:9.1f} {r['median_us']:9.1f} "
              f"{100 * r['floor_ratio']:6.1f} {r['achieved_GBps']:6.0f} "
              f"{r.get('dot_product_attention_xla_us', nan):9.1f} {r['vs'].get('dot_product_attention_xla', nan):6.2f} "
              f"{r.get('dot_product_attention_cudnn_us', nan):9.1f} "
              f"{r['vs'].get('dot_product_attention_cudnn', nan):8.2f}")


if __name__ == "__main__":
    main()

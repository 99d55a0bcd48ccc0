"""Benchmark prefill-chunk attention on a GPU: the chunk kernel against the per-token decode path.

1. Kernel. Llama-7B heads (32 q / 32 KV heads, head_dim 128, bf16, 16-token pages scattered
   by a random page table): `--batch` sequences (default 4), each holding `context` tokens
   of which the last `chunk` are the new queries (chunk {128, 512} x context {512, 2048};
   chunk == context is a whole-prompt prefill). The queries are one flat ragged batch, as
   the engine lays them out. Timed, per case:
   - `chunk`: `paged_ragged_attention` (the engine's path for steps with prompt chunks),
   - `per_token`: the decode kernel with every query as a sequence of its own (the engine's
     path before it: each query reads its whole context),
   - `dot_product_attention` (`xla`, `cudnn`) on the same K/V laid out contiguously
     (`[B, context, K, D]`, a free reshape of the pool region), bottom-right causal mask.
   Floor = max(bytes / copy bandwidth, flops / bf16 matmul rate), both measured in this run;
   bytes = K and V of every context token read once + q read + output written; flops =
   4 * D * N * (keys each query sees). Outputs are checked against
   `paged_attention_reference` (first two sequences) before timing. Timing as in
   `bench_attention.py` (one jit makes `n_rot` calls on rotated pool regions so L2 holds
   none of the working set; median of 7 batches of asynchronous dispatches).
2. A sweep of the chunk kernel's block sizes, warps and stages on two cases.
3. Engine step. Llama-7B with random bf16 weights, the engine's jitted step (`_step`,
   per-layer weights, pool donated) on `--batch` sequences each prefilling a chunk of
   `--engine-chunk` tokens at the end of `--engine-context`: device time per step with
   `prefill=True` (chunk kernel) and `prefill=False` (per-token decode kernel), and
   whether both sample the same tokens.

JSON to `--out` (default `$OUT`) as `prefill_attention.json`; a short table is printed.
`--smoke`: tiny shapes, interpret mode, for a CPU check of the script.

    PYTHONPATH=$PWD python scripts/bench_prefill.py --out $OUT
    PYTHONPATH=$PWD python scripts/bench_prefill.py --smoke --out /tmp/res
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

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_attention import measure_ceilings, random_pool  # noqa: E402
from pallas_kernels.paged_attention import paged_decode_attention  # noqa: E402
from slora_jax.config import preset  # noqa: E402
from slora_jax.ops.attention import paged_attention_reference, paged_ragged_attention  # noqa: E402
from slora_jax.provenance import git_commit  # noqa: E402

MIN_ROT_BYTES = 150e6
nan = float("nan")


class Shapes:
    """Everything that differs between a GPU run and a CPU smoke run."""

    def __init__(self, smoke: bool):
        self.smoke = smoke
        if smoke:
            self.N, self.K, self.D, self.P = 4, 2, 32, 8
            self.cases = [(8, 16), (16, 16), (8, 32)]  # (chunk, context)
            self.sweep_cases = [(16, 32)]
            self.sweep = [dict(block_m=16, block_t=16, num_warps=4, num_stages=2),
                          dict(block_m=32, block_t=16, num_warps=4, num_stages=2)]
            self.dtype = jnp.float32
            self.model = "tiny"
        else:
            self.N, self.K, self.D, self.P = 32, 32, 128, 16
            self.cases = [(128, 512), (512, 512), (128, 2048), (512, 2048)]
            self.sweep_cases = [(128, 2048), (512, 2048)]
            self.sweep = [dict(block_m=bm, block_t=bt, num_warps=w, num_stages=s) for bm, bt, w, s in (
                (64, 32, 4, 2), (64, 64, 4, 2), (64, 64, 8, 3), (128, 32, 4, 2), (128, 64, 4, 2),
                (128, 64, 8, 2), (128, 64, 8, 3), (32, 64, 4, 2))]  # the first: the launcher's defaults
            self.dtype = jnp.bfloat16
            self.model = "llama-7b"


class Workload:
    """`n_rot` pool regions of `B * context / P` pages (random K/V), each with a random page table
    and its own queries: a flat batch of `B` chunks of `S` tokens at the end of `context`."""

    def __init__(self, sh: Shapes, B: int, S: int, ctx: int, seed: int):
        self.B, self.S, self.ctx, self.T = B, S, ctx, B * S
        self.M = ctx // sh.P
        self.kv_bytes = 2 * B * ctx * sh.K * sh.D * jnp.dtype(sh.dtype).itemsize
        self.n_rot = int(min(8, max(1, math.ceil(MIN_ROT_BYTES / self.kv_bytes)))) if not sh.smoke else 1
        region = B * self.M
        kk, kv, kq = jax.random.split(jax.random.key(seed), 3)
        shape = (self.n_rot * region, sh.P, sh.K, sh.D)
        self.k_pages = random_pool(kk, shape).astype(sh.dtype)
        self.v_pages = random_pool(kv, shape).astype(sh.dtype)
        self.q = jax.random.normal(kq, (self.n_rot, self.T, sh.N, sh.D), sh.dtype)
        rng = np.random.default_rng(seed)
        self.tables = jnp.asarray(np.stack(
            [r * region + rng.permutation(region).reshape(B, self.M) for r in range(self.n_rot)]).astype(np.int32))
        self.seq = jnp.asarray(np.repeat(np.arange(B), S).astype(np.int32))
        self.pos = jnp.asarray(np.tile(np.arange(ctx - S, ctx), B).astype(np.int32))
        # keys seen by each query: pos + 1
        self.visible = B * sum(range(ctx - S + 1, ctx + 1))

    def floor(self, sh: Shapes, ceil) -> tuple[float, float, float]:
        io = 2 * self.T * sh.N * sh.D * jnp.dtype(sh.dtype).itemsize
        bytes_ = self.kv_bytes + io
        flops = 4 * sh.D * sh.N * self.visible
        return max(bytes_ / (ceil["copy_GBps"] * 1e9), flops / (ceil["bf16_TFLOPs"] * 1e12)), bytes_, flops

    def contiguous(self, sh: Shapes, kp, vp, r):
        region = self.B * self.M
        sl = slice(r * region, (r + 1) * region)
        return (kp[sl].reshape(self.B, self.ctx, sh.K, sh.D), vp[sl].reshape(self.B, self.ctx, sh.K, sh.D))


def chunk_fn(w: Workload, **cfg):
    def one(q, kp, vp, table, seq, pos):
        return paged_ragged_attention(q, kp, vp, table, seq, pos, **cfg)

    f = jax.jit(lambda q, kp, vp, tables, seq, pos: tuple(
        one(q[r], kp, vp, tables[r], seq, pos) for r in range(w.n_rot)))
    return one, lambda: f(w.q, w.k_pages, w.v_pages, w.tables, w.seq, w.pos)


def per_token_fn(w: Workload):
    def one(q, kp, vp, table, seq, pos):
        return paged_decode_attention(q, kp, vp, table[seq], pos + 1)

    f = jax.jit(lambda q, kp, vp, tables, seq, pos: tuple(
        one(q[r], kp, vp, tables[r], seq, pos) for r in range(w.n_rot)))
    return one, lambda: f(w.q, w.k_pages, w.v_pages, w.tables, w.seq, w.pos)


def dpa_fn(w: Workload, sh: Shapes, implementation):
    # Bottom-right causal: query s (position ctx - S + s) sees keys 0 .. ctx - S + s.
    mask = (jnp.arange(w.ctx)[None, :] <= (w.ctx - w.S + jnp.arange(w.S))[:, None])[None, None]

    def one(q, k, v):
        o = jax.nn.dot_product_attention(q.reshape(w.B, w.S, sh.N, sh.D), k, v, mask=mask,
                                         implementation=implementation)
        return o.reshape(w.T, sh.N, sh.D)

    def run(q, kp, vp):
        return tuple(one(q[r], *w.contiguous(sh, kp, vp, r)) for r in range(w.n_rot))

    f = jax.jit(run)
    return one, lambda: f(w.q, w.k_pages, w.v_pages)


def rel_err_first_two(w: Workload, sh: Shapes, out_TxNxD, table_BxM) -> float:
    """Against `paged_attention_reference` on the first two sequences (region 0)."""
    n = min(2, w.B) * w.S
    q = w.q[0][:n].reshape(-1, w.S, sh.N, sh.D).astype(jnp.float32)
    ref = jax.jit(paged_attention_reference)(q, w.k_pages, w.v_pages, table_BxM[: n // w.S],
                                             w.pos[:n].reshape(-1, w.S)).reshape(n, sh.N, sh.D)
    out = out_TxNxD[:n].astype(jnp.float32)
    if not bool(jnp.all(jnp.isfinite(out))):
        return nan
    return float(jnp.linalg.norm(out - ref) / jnp.linalg.norm(ref))


def time_calls(many, n_calls: int, target_s: float = 0.05, batches: int = 5) -> float:
    """Median seconds per call of `many()` (which makes `n_calls` calls), dispatched back to back
    in batches of about `target_s` (sized from one timed run, so slow paths stay short)."""
    jax.block_until_ready(many())
    t0 = time.perf_counter()
    jax.block_until_ready(many())
    reps = int(np.clip(target_s / (time.perf_counter() - t0), 1, 100))
    ts = []
    for _ in range(batches):
        t0 = time.perf_counter()
        for _ in range(reps):
            out = many()
        jax.block_until_ready(out)
        ts.append((time.perf_counter() - t0) / (reps * n_calls))
    return float(np.median(ts))


def timed(row: dict, name: str, w: Workload, sh: Shapes, make):
    """Check then time one implementation; results (or the error) go into `row`."""
    try:
        one, many = make()
        if name.startswith("dpa"):  # the region's pages in order
            out = jax.jit(one)(w.q[0], *w.contiguous(sh, w.k_pages, w.v_pages, 0))
            table = jnp.arange(w.B * w.M, dtype=jnp.int32).reshape(w.B, w.M)
        else:
            out = jax.jit(one)(w.q[0], w.k_pages, w.v_pages, w.tables[0], w.seq, w.pos)
            table = w.tables[0]
        err = rel_err_first_two(w, sh, out, table)
        row[f"{name}_rel_err"] = err
        if not err < 2e-2:
            raise AssertionError(f"WRONG: rel_err {err}")
        t = time_calls(many, w.n_rot)
        row[f"{name}_us"] = t * 1e6
        return t
    except Exception as e:  # noqa: BLE001 - a failure is a result
        row[f"{name}_error"] = f"{type(e).__name__}: {str(e)[:300]}"
        return None


def kernel_rows(sh: Shapes, B: int, ceil, result, dump):
    for S, ctx in sh.cases:
        w = Workload(sh, B, S, ctx, seed=S + ctx)
        floor_s, bytes_, flops = w.floor(sh, ceil)
        row = {"case": {"batch": B, "chunk": S, "context": ctx, "n_heads": sh.N, "n_kv_heads": sh.K,
                        "head_dim": sh.D, "page_size": sh.P, "tokens": w.T},
               "floor_us": floor_s * 1e6, "bytes": bytes_, "flops": flops, "n_rot": w.n_rot}
        t = timed(row, "chunk", w, sh, lambda: chunk_fn(w))
        if t:
            row.update(floor_ratio=floor_s / t, TFLOPs=flops / t / 1e12)
        timed(row, "per_token", w, sh, lambda: per_token_fn(w))
        for impl in ("xla", "cudnn"):
            timed(row, f"dpa_{impl}", w, sh, lambda: dpa_fn(w, sh, impl))
        if t:
            row["vs"] = {k[:-3]: row[k] / row["chunk_us"] for k in ("per_token_us", "dpa_xla_us", "dpa_cudnn_us")
                         if k in row}
        result["rows"].append(row)
        dump()
        print(f"S={S:4d} ctx={ctx:5d} floor={floor_s * 1e6:8.1f}us chunk={row.get('chunk_us', nan):8.1f}us "
              f"({100 * row.get('floor_ratio', nan):5.1f}%) per_token={row.get('per_token_us', nan):9.1f}us "
              f"xla={row.get('dpa_xla_us', nan):8.1f}us cudnn={row.get('dpa_cudnn_us', nan):8.1f}us "
              f"{row.get('chunk_error', '')}", flush=True)
        del w
        gc.collect()


def sweep_rows(sh: Shapes, B: int, ceil, result, dump):
    for S, ctx in sh.sweep_cases:
        w = Workload(sh, B, S, ctx, seed=7 + S + ctx)
        floor_s = w.floor(sh, ceil)[0]
        for cfg in sh.sweep:
            row = {"chunk": S, "context": ctx, "batch": B, "config": cfg, "floor_us": floor_s * 1e6}
            t = timed(row, "chunk", w, sh, lambda: chunk_fn(w, **cfg))
            if t:
                row["floor_ratio"] = floor_s / t
            result["sweep"].append(row)
            print("sweep", json.dumps(row), flush=True)
        dump()
        del w
        gc.collect()


def engine_step(sh: Shapes, B: int, S: int, ctx: int, reps: int) -> dict:
    """Device time of the engine's jitted step on `B` prefill chunks, chunk kernel vs per-token path."""
    import slora_jax.engine.engine as engine_mod
    from slora_jax.engine.packing import pack
    from slora_jax.engine.sampling import SamplingBatch, SamplingParams, request_key_data
    from slora_jax.memory.pool import PoolLayout, create_pool
    from slora_jax.model import init_random_params, unstack_layers

    cfg = preset(sh.model)
    t0 = time.perf_counter()
    params = unstack_layers(jax.block_until_ready(init_random_params(cfg, jax.random.key(0), sh.dtype)))
    R = 1 << (B - 1).bit_length()
    M = ctx // sh.P
    layout = PoolLayout.for_model(cfg, B * M + 1, sh.P)
    rng = np.random.default_rng(0)
    T = B * S
    tokens = rng.integers(3, cfg.vocab_size, T).astype(np.int32)
    pos = np.tile(np.arange(ctx - S, ctx), B).astype(np.int32)
    seq = np.repeat(np.arange(B), S).astype(np.int32)
    table = np.zeros((R, M), np.int32)
    table[:B] = 1 + rng.permutation(B * M).reshape(B, M)
    logits_index = np.zeros(R, np.int32)
    logits_index[:B] = np.arange(B) * S + S - 1
    sampling = SamplingBatch.from_params([SamplingParams()] * B, [request_key_data(0, i) for i in range(B)],
                                         [0] * B, size=R)
    batch = engine_mod.StepBatch(tokens, np.full(T, -1, np.int32), pos, seq, table, logits_index, None, sampling)
    buf, dev, spec = pack(batch)  # the engine's one packed transfer
    args = (engine_mod._no_samples(R), buf, dev)
    out = {"batch": B, "chunk": S, "context": ctx, "layers": cfg.num_hidden_layers, "tokens": T,
           "init_s": time.perf_counter() - t0}
    pool = create_pool(layout, sh.dtype)
    sampled = {}
    for label, prefill in (("chunk", True), ("per_token", False)):
        try:
            t0 = time.perf_counter()
            s, pool = engine_mod._step(params, pool, *args, cfg=cfg, layout=layout, attention_impl="pallas",
                                       prefill=prefill, spec=spec)
            sampled[label] = np.asarray(s)[:B]
            out[f"{label}_compile_s"] = time.perf_counter() - t0
            ts = []
            for _ in range(5):
                t0 = time.perf_counter()
                for _ in range(reps):
                    s, pool = engine_mod._step(params, pool, *args, cfg=cfg, layout=layout, attention_impl="pallas",
                                               prefill=prefill, spec=spec)
                pool.block_until_ready()
                ts.append((time.perf_counter() - t0) / reps)
            out[f"{label}_step_ms"] = float(np.median(ts)) * 1e3
        except Exception as e:  # noqa: BLE001 - a failure is a result
            out[f"{label}_error"] = f"{type(e).__name__}: {str(e)[:300]}"
            pool = create_pool(layout, sh.dtype)  # a failed call may have consumed the donated pool
        print("engine", label, {k: v for k, v in out.items() if k.startswith(label)}, flush=True)
    if "chunk_step_ms" in out and "per_token_step_ms" in out:
        out["per_token_over_chunk"] = out["per_token_step_ms"] / out["chunk_step_ms"]
        out["same_sampled_tokens"] = int(np.sum(sampled["chunk"] == sampled["per_token"]))
    del params, pool
    gc.collect()
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.environ.get("OUT") or "benchmarks/results")
    p.add_argument("--smoke", action="store_true", help="tiny shapes on any backend (a CPU check of the script)")
    p.add_argument("--batch", type=int, default=4, help="sequences per batch (kernel and engine step)")
    p.add_argument("--no-sweep", action="store_true")
    p.add_argument("--no-engine", action="store_true")
    p.add_argument("--engine-chunk", type=int, default=128)
    p.add_argument("--engine-context", type=int, default=2048)
    p.add_argument("--engine-reps", type=int, default=5)
    args = p.parse_args(argv)
    sh = Shapes(args.smoke)
    if args.smoke:
        args.engine_chunk, args.engine_context, args.engine_reps = 16, 32, 1
    os.makedirs(args.out, exist_ok=True)
    out_path = os.path.join(args.out, "prefill_attention.json")
    t_start = time.perf_counter()
    ceil = measure_ceilings(small=args.smoke or jax.default_backend() != "gpu")
    result = {"benchmark": "paged_prefill_attention", "git_commit": git_commit(),
              "device": jax.devices()[0].device_kind, "jax_version": jax.__version__, "measured_ceilings": ceil,
              "dtype": jnp.dtype(sh.dtype).name, "smoke": args.smoke,
              "command": " ".join(["python scripts/bench_prefill.py", *(sys.argv[1:] if argv is None else argv)]),
              "rows": [], "sweep": []}
    print(f"device {result['device']}  jax {jax.__version__}  ceilings {ceil}", flush=True)

    def dump():
        result["wall_s"] = time.perf_counter() - t_start
        with open(out_path, "w") as f:
            json.dump(result, f, indent=1)

    kernel_rows(sh, args.batch, ceil, result, dump)
    if not args.no_sweep:
        sweep_rows(sh, args.batch, ceil, result, dump)
    if not args.no_engine:
        result["engine_step"] = engine_step(sh, args.batch, args.engine_chunk, args.engine_context, args.engine_reps)
    dump()
    print_summary(result)
    print(f"wrote {out_path} in {result['wall_s']:.0f} s")


def print_summary(result):
    print(f"\n{'chunk':>5} {'ctx':>5} {'floor_us':>9} {'chunk_us':>9} {'floor%':>6} {'TFLOP/s':>7} "
          f"{'per_tok_us':>10} {'xla_us':>8} {'cudnn_us':>8}   (vs: their time / chunk kernel's)")
    for r in result["rows"]:
        c = r["case"]
        vs = r.get("vs", {})
        print(f"{c['chunk']:5d} {c['context']:5d} {r['floor_us']:9.1f} {r.get('chunk_us', nan):9.1f} "
              f"{100 * r.get('floor_ratio', nan):6.1f} {r.get('TFLOPs', nan):7.1f} "
              f"{r.get('per_token_us', nan):10.1f} {r.get('dpa_xla_us', nan):8.1f} {r.get('dpa_cudnn_us', nan):8.1f}"
              f"   x{vs.get('per_token', nan):.1f} x{vs.get('dpa_xla', nan):.2f} x{vs.get('dpa_cudnn', nan):.2f}")
    ok = [s for s in result["sweep"] if "chunk_us" in s]
    for S, ctx in sorted({(s["chunk"], s["context"]) for s in ok}):
        best = min((s for s in ok if (s["chunk"], s["context"]) == (S, ctx)), key=lambda s: s["chunk_us"])
        print(f"sweep best at chunk {S} ctx {ctx}: {best['chunk_us']:.1f} us {best['config']}")
    e = result.get("engine_step")
    if e:
        print(f"engine step ({e['batch']} x {e['chunk']} tokens at context {e['context']}, {e['layers']} layers): "
              f"chunk kernel {e.get('chunk_step_ms', nan):.2f} ms, per-token {e.get('per_token_step_ms', nan):.2f} ms, "
              f"x{e.get('per_token_over_chunk', nan):.2f}; same tokens {e.get('same_sampled_tokens')}/{e['batch']}")


if __name__ == "__main__":
    main()

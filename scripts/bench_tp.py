"""Tensor-parallel decode throughput, base model vs many LoRA adapters, both LoRA strategies.

    python scripts/bench_tp.py --out DIR --preset llama-13b --tp 1 2 4     # 4 GPUs
    python scripts/bench_tp.py --out DIR --preset llama-70b --tp 4
    XLA_FLAGS=--xla_force_host_platform_device_count=4 \\
        python scripts/bench_tp.py --out DIR --preset tiny --set num_attention_heads=8 num_key_value_heads=4 \\
        head_dim=8 --tp 1 2 4 --batch 8 --context 64 --adapters 8 --steps 3     # CPU smoke run

For each TP size: random bf16 weights drawn straight into their shards; a full
batch of decode steps (`parallel.decode_step`, every row at position
`context - 1`; KV split by KV heads: the unified pool read by the Pallas paged
kernel on a GPU, a dense cache with jnp attention elsewhere) timed for the base model, then with
`--adapters` random adapters of ranks `--ranks` (alternating) on
`--projections`, every row on its own adapter (distinct popularity), under each
`--strategies`. LoRA runs the gathered jnp path (`lora_reference` math per
shard); the Pallas SGMV kernels are not yet used under TP.

Time in LoRA collectives is measured two ways: (a) isolated, the exact
collectives `slora` adds to one decode step (per layer, an all-gather of
`[T, R/tp]` per column-parallel projection and an all-reduce of `[T, R]` per
row-parallel one) run alone under `shard_map`; (b) end to end, the step-time
difference `slora - replicated_a` (which also differs in the bytes it reads).

Floor of a step (GPU only): the largest per-device byte count (its weight
shards, its KV heads' cache, its adapter shards read by the batch) over the
copy bandwidth of one device measured in the same run.

Multi-GPU rule of these machines: NVLink multicast stays off (set below,
before JAX starts, for this process and anything it starts).
"""

from __future__ import annotations

import os

os.environ.update(NCCL_NVLS_ENABLE="0", TORCH_SYMM_MEM_DISABLE_MULTICAST="1", NVSHMEM_DISABLE_NVLS="1")

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import json  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax import lax  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from gpu_engine_check import copy_bandwidth_GBps  # noqa: E402  (scripts/ is on sys.path)
from slora_jax import parallel  # noqa: E402
from slora_jax.compat import shard_map  # noqa: E402
from slora_jax.config import preset  # noqa: E402
from slora_jax.memory.pool import PoolLayout  # noqa: E402
from slora_jax.model import LoraInputs  # noqa: E402
from slora_jax.parallel.sharding import COLUMN_PARALLEL  # noqa: E402


def median_ms(fn, steps: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(steps):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return float(np.median(ts)) * 1e3


def kv_cache(cfg, mesh, batch: int, context: int, attention: str, dtype, page_size: int = 16):
    """Dense cache (jnp attention), or the unified pool split by KV heads read by the Pallas kernel."""
    if attention == "reference":
        return parallel.dense_kv_cache(cfg, batch, context, mesh, dtype)
    pages_per_seq = -(-context // page_size)
    layout = PoolLayout.for_model(cfg, batch * pages_per_seq + 1, page_size)
    page_table = jnp.arange(1, batch * pages_per_seq + 1, dtype=jnp.int32).reshape(batch, pages_per_seq)
    return parallel.paged_kv_cache(parallel.create_pool(layout, mesh, dtype), page_table, layout, 1, mesh,
                                   attention_impl="pallas")


def decode_timer(params, cfg, mesh, batch: int, context: int, lora, strategy: str, attention: str, dtype):
    """A closure running one decode step on a persistent (donated) cache and waiting for its logits."""
    cache = kv_cache(cfg, mesh, batch, context, attention, dtype)
    rng = np.random.default_rng(0)
    tokens_B = jnp.asarray(rng.integers(0, cfg.vocab_size, batch), jnp.int32)
    pos_B = jnp.full((batch,), context - 1, jnp.int32)
    state = {"cache": cache}

    def step():
        logits, state["cache"] = parallel.decode_step(params, cfg, tokens_B, pos_B, state["cache"], lora,
                                                      mesh=mesh, strategy=strategy)
        logits.block_until_ready()

    return step


def lora_collectives_timer(cfg, mesh, T: int, R: int, projections, dtype):
    """The collectives `slora` adds to one decode step, alone (scan over layers, as in the model)."""
    tp = parallel.tp_size(mesh)
    n_col = sum(p in COLUMN_PARALLEL for p in projections)
    n_row = len(projections) - n_col

    def per_device(v_TxRl, v_TxR):
        def layer(carry, _):
            c_TxRl, r_TxR = carry
            for _ in range(n_col):
                c_TxRl = lax.all_gather(c_TxRl, parallel.TP_AXIS, axis=1, tiled=True)[:, : R // tp]
            for _ in range(n_row):
                r_TxR = lax.psum(r_TxR, parallel.TP_AXIS) * (1.0 / tp)
            return (c_TxRl, r_TxR), None

        return lax.scan(layer, (v_TxRl, v_TxR), None, length=cfg.num_hidden_layers)[0]

    spec = P(None, parallel.TP_AXIS)
    f = jax.jit(shard_map(per_device, mesh=mesh, in_specs=(spec, P()), out_specs=(spec, P()), check_vma=False))
    args = (jnp.ones((T, R), dtype), jnp.ones((T, R), jnp.float32))
    return lambda: jax.block_until_ready(f(*args))


def per_device_bytes(cfg, tp: int, batch: int, context: int, lora_w, itemsize: int, n_used: int) -> dict:
    """Bytes one device must read per decode step: weight shards, KV of its heads, adapter shards in use."""
    kv_heads = cfg.num_key_value_heads // tp
    adapters = 0.0
    for w in (lora_w or {}).values():
        shard_bytes = w.a.addressable_shards[0].data.nbytes + w.b.addressable_shards[0].data.nbytes
        adapters += shard_bytes * min(n_used, w.a.shape[1]) / w.a.shape[1]
    return {"weights": cfg.num_params() * itemsize / tp,
            "kv": batch * context * 2 * kv_heads * cfg.head_dim * itemsize * cfg.num_hidden_layers,
            "adapters": adapters}


def run_tp(args, cfg, tp: int, bw_GBps: float | None) -> list[dict]:
    dtype = jnp.dtype(args.dtype)
    mesh = parallel.make_mesh(cfg, tp)
    params = jax.block_until_ready(parallel.init_random_params(cfg, jax.random.key(0), mesh, dtype))
    B, ctx = args.batch, args.context
    ranks = [args.ranks[s % len(args.ranks)] for s in range(args.adapters)]
    slot_Bx1 = jnp.asarray((np.arange(B) % args.adapters)[:, None], jnp.int32)
    common = {"preset": args.preset, "tp": tp, "batch": B, "context": ctx, "dtype": args.dtype,
              "attention": args.attention}
    rows = []

    def record(case: dict, ms: float, lora_w=None) -> dict:
        row = {"case": {**common, **case}, "median_ms": ms, "tokens_per_s": B / ms * 1e3}
        if bw_GBps:
            nbytes = per_device_bytes(cfg, tp, B, ctx, lora_w, dtype.itemsize, min(B, args.adapters))
            floor_ms = sum(nbytes.values()) / (bw_GBps * 1e9) * 1e3
            row.update(floor_ms=floor_ms, floor_ratio=floor_ms / ms, per_device_bytes=nbytes)
        print(json.dumps(row), flush=True)
        rows.append(row)
        return row

    base = record({"lora": None}, median_ms(decode_timer(params, cfg, mesh, B, ctx, None, "slora", args.attention,
                                                         dtype), args.steps))
    for strategy in args.strategies:
        w = parallel.init_random_lora(jax.random.key(1), cfg, ranks, args.projections, mesh, strategy, dtype)
        step = decode_timer(params, cfg, mesh, B, ctx, LoraInputs(w, slot_Bx1), strategy, args.attention, dtype)
        row = record({"lora": {"adapters": args.adapters, "ranks": sorted(set(ranks)),
                               "projections": args.projections, "popularity": "distinct", "impl": "reference"},
                      "strategy": strategy}, median_ms(step, args.steps), w)
        row["lora_overhead"] = row["median_ms"] / base["median_ms"]
        del w, step
    if "slora" in args.strategies and tp > 1:
        R = -(-max(ranks) // 16) * 16
        ms = median_ms(lora_collectives_timer(cfg, mesh, B, R, args.projections, dtype), args.steps)
        by = {r["case"].get("strategy"): r["median_ms"] for r in rows}
        rows.append({"case": {**common, "what": "slora_lora_collectives"}, "isolated_ms": ms,
                     "slora_minus_replicated_a_ms": by["slora"] - by["replicated_a"]
                     if "replicated_a" in by else None})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def checks(rows: list[dict]) -> dict:
    """The issue's targets, where the rows to compute them are present."""
    def get(tp, strategy=None):
        for r in rows:
            c = r["case"]
            if c.get("tp") == tp and "median_ms" in r and c.get("strategy") == strategy:
                return r
        return None

    out = {}
    b1, b2 = get(1), get(2)
    if b1 and b2:
        out["tp2_over_tp1_base_throughput"] = b2["tokens_per_s"] / b1["tokens_per_s"]  # target >= 1.7 (13B, batch 64)
    for strategy in ("slora", "replicated_a"):
        r1 = get(1, strategy)
        for tp in (2, 4, 8):
            rt = get(tp, strategy)
            if r1 and rt:  # target <= 1.2
                out[f"lora_overhead_tp{tp}_over_tp1_{strategy}"] = rt["lora_overhead"] / r1["lora_overhead"]
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=".")
    ap.add_argument("--preset", default="llama-13b")
    ap.add_argument("--tp", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--context", type=int, default=512)
    ap.add_argument("--adapters", type=int, default=100)
    ap.add_argument("--ranks", type=int, nargs="+", default=[16, 64])
    ap.add_argument("--projections", nargs="+", default=["q", "k", "v", "o"])
    ap.add_argument("--strategies", nargs="+", default=list(parallel.LORA_STRATEGIES))
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--set", nargs="*", default=[], metavar="FIELD=INT",
                    help="override integer LlamaConfig fields of the preset, e.g. num_key_value_heads=4")
    ap.add_argument("--attention", choices=["pallas", "reference"], default=None,
                    help="pallas: the paged kernel on the pool split by KV heads (default on GPU); "
                         "reference: jnp attention on a dense cache (default elsewhere)")
    args = ap.parse_args()
    if args.attention is None:
        args.attention = "pallas" if jax.default_backend() == "gpu" else "reference"
    overrides = {k: int(v) for k, v in (kv.split("=", 1) for kv in args.set)}
    cfg = dataclasses.replace(preset(args.preset), **overrides)
    on_gpu = jax.default_backend() == "gpu"
    bw = copy_bandwidth_GBps() if on_gpu else None
    res = {"benchmark": "tensor_parallel_decode", "model": dataclasses.asdict(cfg), "device": jax.devices()[0].device_kind,
           "num_devices": jax.device_count(), "jax_version": jax.__version__,
           "command": "python scripts/bench_tp.py " + " ".join(sys.argv[1:]),
           "git_commit": subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip(),
           "measured_ceilings": {"copy_GBps": bw}, "rows": []}
    for tp in args.tp:
        res["rows"] += run_tp(args, cfg, tp, bw)
    res["checks"] = checks(res["rows"])
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"tp_{args.preset}_{jax.devices()[0].platform}.json")
    with open(path, "w") as f:
        json.dump(res, f, indent=2)
    print(json.dumps(res["checks"], indent=2), "\nwrote", path)


if __name__ == "__main__":
    main()

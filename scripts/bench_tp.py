"""Tensor-parallel decode throughput, base model vs many LoRA adapters, both LoRA strategies.

    python scripts/bench_tp.py --out DIR --budget-s 500     # 4 GPUs: 13B at TP 1, 2; 70B at TP 4; 13B at TP 4
    python scripts/bench_tp.py --out DIR --plan llama-13b:1,2   # 2 GPUs
    XLA_FLAGS=--xla_force_host_platform_device_count=4 \\
        python scripts/bench_tp.py --out DIR --plan tiny:1,2,4 --set num_attention_heads=8 \\
        num_key_value_heads=4 head_dim=16 --batch 8 --context 64 --adapters 8 --ranks 16 --steps 3  # CPU smoke

One process runs every `--plan` entry (`PRESET:TP[,TP...]`, in order). For each
(preset, TP): random weights drawn straight into their shards (never whole on
one device: 70B in bf16 is ~140 GB), as per-layer buffers (`--layers
unrolled`, a Python loop over layers; `scan` copies every layer's weights each
step on a GPU); a full batch of decode steps (`parallel.decode_step`, every row
at position `context - 1`; KV split by KV heads: the unified pool read by the
Pallas paged kernel on a GPU, a dense cache with jnp attention elsewhere) timed
for the base model, then for each `--ranks` with `--adapters` random adapters of
that rank on `--projections`, every row on its own adapter (distinct
popularity), under each `--strategies` (at TP 1 they are the same program:
the first only, which the checks compare every TP size's strategies with). LoRA runs the Pallas split SGMV kernels
per shard on a GPU (`--lora-impl`, default), the gathered jnp path elsewhere.
Each model is freed before the next.

Step time is measured two ways: `step_ms`, `--steps` steps dispatched back to
back and waited on once (the device-bound rate: the host dispatches ahead), and
`blocking_step_ms`, the median of single steps each waited on (adds the host's
dispatch latency). Throughput and LoRA overhead (LoRA step / base step) use
`step_ms`.

Time in LoRA collectives (TP > 1): the exact collectives `slora` adds to one
decode step (per layer, an all-gather of `[T, R/tp]` per column-parallel
projection and an all-reduce of `[T, R]` per row-parallel one, at the padded R
the weights use) run alone under `shard_map`; also reported per row beside the
step-time difference `slora - replicated_a` (which also differs in bytes read).

Floor of a step (GPU only): the largest per-device byte count (its weight
shards, its KV heads' cache, the adapter bytes its shards must read for the used
adapters at their true ranks) over the copy bandwidth of one device measured in
the same run (`bench_kernels.measure_ceilings`).

`--budget-s`: a case is skipped (and recorded as skipped, with the reason) when
the time left is less than an estimate of its cost (the last LoRA case of this
model; for a new model, the last one's init and first case scaled by layer
count). A case that fails (e.g. out of memory) is recorded with its error and
the run goes on. The JSON is rewritten after every case, so a run cut short
still leaves its rows.

Multi-GPU rule of these machines: NVLink multicast stays off (set below,
before JAX starts, for this process and anything it starts).
"""

from __future__ import annotations

import os

os.environ.update(NCCL_NVLS_ENABLE="0", TORCH_SYMM_MEM_DISABLE_MULTICAST="1", NVSHMEM_DISABLE_NVLS="1")

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax import lax  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import profiling  # noqa: E402  (scripts/ is on sys.path)
from bench_kernels import measure_ceilings  # noqa: E402
from slora_jax import parallel  # noqa: E402
from slora_jax.compat import shard_map  # noqa: E402
from slora_jax.config import preset  # noqa: E402
from slora_jax.provenance import git_commit  # noqa: E402
from slora_jax.memory.pool import PoolLayout  # noqa: E402
from slora_jax.model import LoraInputs  # noqa: E402
from slora_jax.parallel.sharding import COLUMN_PARALLEL  # noqa: E402

# Under a tight --budget-s what runs first matters: 13B at TP 1 and 2 (the TP 2 / TP 1
# throughput target and the overheads every TP size compares with), 70B at TP 4 (the model that
# needs TP), 13B at TP 4 last.
DEFAULT_PLAN = ["llama-13b:1,2", "llama-70b:4", "llama-13b:4"]


def parse_plan(entries: list[str]) -> list[tuple[str, int]]:
    plan = []
    for e in entries:
        name, _, tps = e.partition(":")
        if not tps:
            raise SystemExit(f"--plan entry {e!r} is not PRESET:TP[,TP...]")
        plan += [(name, int(t)) for t in tps.split(",")]
    return plan


class Budget:
    """Wall-clock budget of the run; cases that would not fit are skipped."""

    def __init__(self, seconds: float | None):
        self.start, self.seconds = time.perf_counter(), seconds

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def fits(self, estimate_s: float) -> bool:
        return self.seconds is None or self.elapsed() + estimate_s <= self.seconds


def kv_cache(cfg, mesh, batch: int, context: int, attention: str, dtype, page_size: int = 16):
    """Dense cache (jnp attention), or the unified pool split by KV heads read by the Pallas kernel."""
    if attention == "reference":
        return parallel.dense_kv_cache(cfg, batch, context, mesh, dtype)
    pages_per_seq = -(-context // page_size)
    layout = PoolLayout.for_model(cfg, batch * pages_per_seq + 1, page_size)
    page_table = jnp.arange(1, batch * pages_per_seq + 1, dtype=jnp.int32).reshape(batch, pages_per_seq)
    return parallel.paged_kv_cache(parallel.create_pool(layout, mesh, dtype), page_table, layout, 1, mesh,
                                   attention_impl="pallas")


def time_decode(params, cfg, mesh, cache, args, lora, strategy: str) -> dict:
    """Compile, then time decode steps on a persistent (donated) cache; returns times and the cache."""
    rng = np.random.default_rng(0)
    tokens_B = jnp.asarray(rng.integers(0, cfg.vocab_size, args.batch), jnp.int32)
    pos_B = jnp.full((args.batch,), args.context - 1, jnp.int32)
    state = {"cache": cache}

    def step():
        logits, state["cache"] = parallel.decode_step(params, cfg, tokens_B, pos_B, state["cache"], lora, mesh=mesh,
                                                      strategy=strategy, lora_impl=args.lora_impl)
        return logits

    t0 = time.perf_counter()
    step().block_until_ready()
    compile_s = time.perf_counter() - t0
    step().block_until_ready()
    ts = []
    for _ in range(args.steps):
        t = time.perf_counter()
        step().block_until_ready()
        ts.append(time.perf_counter() - t)
    t = time.perf_counter()
    for _ in range(args.steps - 1):
        step()
    step().block_until_ready()
    pipelined = (time.perf_counter() - t) / args.steps
    out = {"step_ms": pipelined * 1e3, "blocking_step_ms": float(np.median(ts)) * 1e3, "first_call_s": compile_s}
    if args.profile:  # where each device's step time goes (collectives, matmuls, attention, LoRA, other)
        n = 5
        try:
            kernels = profiling.gpu_kernels(lambda: jax.block_until_ready([step() for _ in range(n)]))
            out["profile"] = None if kernels is None else profiling.by_category(kernels, n)
        except Exception as e:  # noqa: BLE001 - the profile is extra information
            out["profile"] = {"error": error_text(e)[:300]}
    return out, state["cache"]


def lora_collectives_ms(cfg, mesh, T: int, rank: int, projections, dtype, steps: int) -> float:
    """The collectives `slora` adds to one decode step, alone (a scan over layers), per step, at
    the padded ranks `init_random_lora` places the weights with."""
    tp = parallel.tp_size(mesh)
    r_col, r_row = (parallel.padded_rank(p, rank, tp, "slora", 16) for p in ("q", "o"))
    n_col = sum(p in COLUMN_PARALLEL for p in projections)
    n_row = len(projections) - n_col

    def per_device(v_TxRl, v_TxR):
        def layer(carry, _):
            c_TxRl, r_TxR = carry
            for _ in range(n_col):
                c_TxRl = lax.all_gather(c_TxRl, parallel.TP_AXIS, axis=1, tiled=True)[:, : r_col // tp]
            for _ in range(n_row):
                r_TxR = lax.psum(r_TxR, parallel.TP_AXIS) * (1.0 / tp)
            return (c_TxRl, r_TxR), None

        return lax.scan(layer, (v_TxRl, v_TxR), None, length=cfg.num_hidden_layers)[0]

    spec = P(None, parallel.TP_AXIS)
    f = jax.jit(shard_map(per_device, mesh=mesh, in_specs=(spec, P()), out_specs=(spec, P()), check_vma=False))
    args = (jnp.ones((T, r_col), dtype), jnp.ones((T, r_row), jnp.float32))
    jax.block_until_ready(f(*args))
    t = time.perf_counter()
    for _ in range(steps):
        out = f(*args)
    jax.block_until_ready(out)
    return (time.perf_counter() - t) / steps * 1e3


def per_device_bytes(cfg, tp: int, batch: int, context: int, itemsize: int, lora: dict | None) -> dict:
    """Bytes one device must read per decode step: its weight shards, the KV of its heads, and the
    adapter bytes its shards hold for the `n_used` adapters in the batch at their true rank."""
    out = {"weights": cfg.num_params() * itemsize / tp,
           "kv": batch * context * 2 * (cfg.num_key_value_heads // tp) * cfg.head_dim * itemsize
           * cfg.num_hidden_layers,
           "adapters": 0.0}
    if lora:
        r, per_layer = lora["rank"], 0
        for proj in lora["projections"]:
            h_in, h_out = cfg.projection_shape(proj)
            if proj in COLUMN_PARALLEL:  # A [I, r] split on r (slora) or whole; B split on its output
                per_layer += h_in * r / (tp if lora["strategy"] == "slora" else 1) + r * h_out / tp
            else:  # A split on its input; B split on its output (slora) or whole
                per_layer += h_in / tp * r + r * h_out / (tp if lora["strategy"] == "slora" else 1)
        out["adapters"] = per_layer * lora["n_used"] * cfg.num_hidden_layers * itemsize
    return out


class Run:
    """The rows of the run, rewritten to `path` after each one."""

    def __init__(self, header: dict, path: str):
        self.res, self.path = {**header, "rows": []}, path

    def add(self, row: dict) -> dict:
        self.res["rows"].append(row)
        print(json.dumps(row), flush=True)
        self.res["checks"] = checks(self.res["rows"])
        self.save()
        return row

    def save(self) -> None:
        with open(self.path, "w") as f:
            json.dump(self.res, f, indent=2)


def error_text(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}"[:2000]


def measure_case(args, cfg, mesh, params, cache, case, slot_Bx1, unstacked: bool):
    """One decode case: the base model (`case` None) or `(rank, strategy)` adapters drawn for it
    (freed on return). Returns (row fields, the cache)."""
    if case is None:
        times, cache = time_decode(params, cfg, mesh, cache, args, None, "slora")
        return {"case_lora": None, **times}, cache
    rank, strategy = case
    w = parallel.init_random_lora(jax.random.key(1), cfg, [rank] * args.adapters, args.projections, mesh, strategy,
                                  jnp.dtype(args.dtype), unstacked=unstacked)
    times, cache = time_decode(params, cfg, mesh, cache, args, LoraInputs(w, slot_Bx1), strategy)
    del w
    desc = {"adapters": args.adapters, "rank": rank, "projections": args.projections,
            "n_used": min(args.batch, args.adapters), "popularity": "distinct", "impl": args.lora_impl,
            "strategy": strategy}
    out = {"case_lora": desc, **times}
    if strategy == "slora" and parallel.tp_size(mesh) > 1:
        out["lora_collectives_ms"] = lora_collectives_ms(cfg, mesh, args.batch, rank, args.projections,
                                                         jnp.dtype(args.dtype), args.steps)
    return out, cache


def run_config(args, name: str, cfg, tp: int, run: Run, budget: Budget, bw_GBps: float | None,
               estimates: dict) -> None:
    """Every case of one (model, TP size); failures are recorded as rows and the run goes on."""
    dtype = jnp.dtype(args.dtype)
    B, ctx = args.batch, args.context
    unstacked = args.layers == "unrolled"
    common = {"preset": name, "tp": tp, "batch": B, "context": ctx, "dtype": args.dtype, "attention": args.attention,
              "layers": args.layers}
    # At TP 1 the strategies are the same program (nothing split, no collective): run the first only.
    strategies = args.strategies if tp > 1 else args.strategies[:1]
    cases = [None] + [(r, s) for r in args.ranks for s in strategies]
    label = lambda case: "base" if case is None else f"r{case[0]} {case[1]}"

    # A new model's first case costs its weight init too: the last model's, scaled by layer count.
    first_est = estimates.get("first_per_layer", 0.0) * cfg.num_hidden_layers
    if not budget.fits(first_est):
        for case in cases:
            run.add({"case": {**common, "what": label(case)}, "skipped": f"budget: {budget.elapsed():.0f} s used, "
                     f"this model estimated at {first_est:.0f} s for init + first case"})
        return
    t_model = time.perf_counter()
    try:
        mesh = parallel.make_mesh(cfg, tp)
        params = jax.block_until_ready(parallel.init_random_params(cfg, jax.random.key(0), mesh, dtype, unstacked))
        cache = kv_cache(cfg, mesh, B, ctx, args.attention, dtype)
    except Exception as e:  # e.g. out of memory: record it, go on with the next model
        run.add({"case": {**common, "what": "setup"}, "error": error_text(e)})
        return
    init_s = time.perf_counter() - t_model
    slot_Bx1 = jnp.asarray((np.arange(B) % args.adapters)[:, None], jnp.int32)
    done, last_lora_s = {}, None
    for case in cases:
        est = 1.5 * (time.perf_counter() - t_model) if last_lora_s is None else last_lora_s
        if case is not None and not budget.fits(est):
            run.add({"case": {**common, "what": label(case)},
                     "skipped": f"budget: {budget.elapsed():.0f} s used, case estimated at {est:.0f} s"})
            continue
        if case is not None and "base" not in done:
            continue  # the base case failed: its error row says why; no overheads to report
        t_case = time.perf_counter()
        try:
            fields, cache = measure_case(args, cfg, mesh, params, cache, case, slot_Bx1, unstacked)
        except Exception as e:
            run.add({"case": {**common, "what": label(case)}, "error": error_text(e)})
            cache = kv_cache(cfg, mesh, B, ctx, args.attention, dtype)  # the failed step may have taken it
            continue
        row = {"case": {**common, "what": label(case), "lora": fields.pop("case_lora")}, **fields,
               "tokens_per_s": B / fields["step_ms"] * 1e3}
        if case is None:
            row["init_s"] = init_s
        else:
            base = done["base"]
            row["lora_overhead"] = row["step_ms"] / base["step_ms"]
            row["blocking_lora_overhead"] = row["blocking_step_ms"] / base["blocking_step_ms"]
            other = done.get(label((case[0], "replicated_a" if case[1] == "slora" else "slora")))
            if other is not None:
                sl, ra = (row, other) if case[1] == "slora" else (other, row)
                sl["slora_minus_replicated_a_ms"] = sl["step_ms"] - ra["step_ms"]
        if bw_GBps:
            nbytes = per_device_bytes(cfg, tp, B, ctx, dtype.itemsize, row["case"]["lora"])
            row["floor_ms"] = sum(nbytes.values()) / (bw_GBps * 1e9) * 1e3
            row["floor_ratio"] = row["floor_ms"] / row["step_ms"]
            row["per_device_bytes"] = nbytes
        row["case_s"] = time.perf_counter() - t_case
        if case is None:
            estimates["first_per_layer"] = (time.perf_counter() - t_model) / cfg.num_hidden_layers
        else:
            last_lora_s = row["case_s"]
        done[label(case)] = run.add(row)
    del params, cache
    gc.collect()


def checks(rows: list[dict]) -> dict:
    """The issue's targets, where the rows to compute them are present."""
    def get(preset_name, tp, what):
        for r in rows:
            c = r["case"]
            if "step_ms" in r and (c["preset"], c["tp"], c["what"]) == (preset_name, tp, what):
                return r
        return None

    out = {}
    for name in sorted({r["case"]["preset"] for r in rows}):
        b1 = get(name, 1, "base")
        for tp in (2, 4, 8):
            bt = get(name, tp, "base")
            if b1 and bt:  # target >= 1.7 at TP 2 (13B, batch 64)
                out[f"{name}_tp{tp}_over_tp1_base_throughput"] = bt["tokens_per_s"] / b1["tokens_per_s"]
        for what in sorted({r["case"]["what"] for r in rows if r["case"]["preset"] == name} - {"base"}):
            r1 = get(name, 1, what) or get(name, 1, what.split()[0] + " slora")  # TP 1: one strategy
            for tp in (2, 4, 8):
                rt = get(name, tp, what)
                if r1 and rt:  # target <= 1.2
                    key = f"{name}_{what.replace(' ', '_')}_lora_overhead_tp{tp}_over_tp1"
                    out[key] = rt["lora_overhead"] / r1["lora_overhead"]
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=".")
    ap.add_argument("--plan", nargs="+", default=DEFAULT_PLAN, metavar="PRESET:TP[,TP...]")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--context", type=int, default=512)
    ap.add_argument("--adapters", type=int, default=100)
    ap.add_argument("--ranks", type=int, nargs="+", default=[16, 64])
    ap.add_argument("--projections", nargs="+", default=["q", "k", "v", "o"])
    ap.add_argument("--strategies", nargs="+", default=list(parallel.LORA_STRATEGIES))
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--layers", choices=["unrolled", "scan"], default="unrolled",
                    help="unrolled: per-layer weight buffers, a Python loop; scan: layer-stacked weights")
    ap.add_argument("--budget-s", type=float, default=None, help="skip cases that would end past this many seconds")
    ap.add_argument("--set", nargs="*", default=[], metavar="FIELD=INT",
                    help="override integer LlamaConfig fields of every preset, e.g. num_key_value_heads=4")
    ap.add_argument("--attention", choices=["pallas", "reference"], default=None,
                    help="pallas: the paged kernel on the pool split by KV heads (default on GPU); "
                         "reference: jnp attention on a dense cache (default elsewhere)")
    ap.add_argument("--lora-impl", choices=list(parallel.TP_LORA_IMPLS), default=None,
                    help="pallas: the split SGMV kernels per shard (default on GPU); reference: gathered jnp")
    ap.add_argument("--profile", action="store_true",
                    help="also profile 5 steps of each case: device time per step by kernel category")
    ap.add_argument("--tag", default="", help="suffix of the JSON file name (e.g. an XLA flag variant)")
    args = ap.parse_args()
    budget = Budget(args.budget_s)
    on_gpu = jax.default_backend() == "gpu"
    args.attention = args.attention or ("pallas" if on_gpu else "reference")
    args.lora_impl = args.lora_impl or ("pallas" if on_gpu else "reference")
    overrides = {k: int(v) for k, v in (kv.split("=", 1) for kv in args.set)}
    plan = [(name, dataclasses.replace(preset(name), **overrides), tp) for name, tp in parse_plan(args.plan)]
    ceilings = measure_ceilings() if on_gpu else {}
    os.makedirs(args.out, exist_ok=True)
    run = Run({"benchmark": "tensor_parallel_decode", "models": {n: dataclasses.asdict(c) for n, c, _ in plan},
               "device": jax.devices()[0].device_kind, "num_devices": jax.device_count(),
               "jax_version": jax.__version__, "command": "python scripts/bench_tp.py " + " ".join(sys.argv[1:]),
               "git_commit": git_commit(),
               "lora_impl": args.lora_impl, "measured_ceilings": ceilings,
               "env": {k: v for k, v in os.environ.items() if k.startswith(("XLA_FLAGS", "NCCL_"))}},
              os.path.join(args.out, f"tp_decode_{jax.devices()[0].platform}{'_' + args.tag if args.tag else ''}.json"))
    estimates: dict = {}
    for name, cfg, tp in plan:
        if tp > jax.device_count():
            run.add({"case": {"preset": name, "tp": tp, "what": "all"},
                     "skipped": f"needs {tp} devices, {jax.device_count()} present"})
            continue
        run_config(args, name, cfg, tp, run, budget, ceilings.get("copy_GBps"), estimates)
    run.res["wall_s"] = budget.elapsed()
    run.save()
    print_table(run.res["rows"])
    print(json.dumps(run.res["checks"], indent=2), f"\nwall {budget.elapsed():.0f} s; wrote", run.path)


def print_table(rows: list[dict]) -> None:
    cols = [("preset", 10), ("tp", 3), ("case", 17), ("step_ms", 9), ("block_ms", 9), ("tok/s", 9), ("floor_ms", 9),
            ("overhead", 9), ("coll_ms", 8), ("first_s", 8)]
    print("\n" + " | ".join(f"{c:>{w}}" for c, w in cols))
    for r in rows:
        c = r["case"]
        head = [c["preset"], c["tp"], c["what"]]
        if "step_ms" not in r:
            vals = head + [f"skipped: {r['skipped']}" if "skipped" in r else f"error: {r['error'][:200]}"]
        else:
            vals = head + [r["step_ms"], r["blocking_step_ms"], r["tokens_per_s"], r.get("floor_ms"),
                           r.get("lora_overhead"), r.get("lora_collectives_ms"), r["first_call_s"]]
        print(" | ".join(f"{v:>{w}.2f}" if isinstance(v, float) else f"{'' if v is None else v:>{w}}"
                         for v, (_, w) in zip(vals, cols + [("", 0)])))


if __name__ == "__main__":
    main()

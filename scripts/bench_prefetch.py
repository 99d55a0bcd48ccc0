"""Measure how much of an adapter load the engine's prefetch hides, on a GPU.

1. Load of one adapter with the engine idle (rank `--rank` on q, k, v, o of `--model`,
   random bf16 weights): packing its rows on the host (`adapter_rows`), the host-to-device
   copy, the donated scatter into its pool pages (`write_adapter`), and a whole cold
   `AdapterStore.load` (all three, waited for); medians over a few adapters.
2. Serving. `--batch` requests on one resident adapter decode; `--arrivals` requests,
   each on its own adapter that is not resident yet, wait in the queue (the batch is
   full: `max_num_seqs = --batch`). Running request k (k < arrivals) stops after
   `--first + k * gap` tokens, so one queued request starts every `gap` steps, loading
   its adapter in that step; everything else runs on. Each scenario runs with
   `prefetch_adapters=0` (the load happens whole inside the start step) and with
   `--prefetch` (the adapters of the first queued requests are packed and copied by the
   store's staging thread while earlier steps run), on a fresh engine each time (compiled
   steps shared: a warm-up run compiles them first). Reported per run: the median wall
   time of steps that load an adapter, of prefill steps that load none (the initial
   prompts: the baseline of a start step), of decode steps; mean and max time to first
   token of the queued requests (from submission, so queueing is included). Hidden =
   load-step time without prefetch - with prefetch; hidden fraction = hidden / the
   load-step overhead without prefetch (load-step time - baseline prefill step).

JSON to `--out` (default `$OUT`) as `prefetch.json`; a short table is printed. `--smoke`:
the tiny preset on any backend (a CPU check of the script).

    PYTHONPATH=$PWD python scripts/bench_prefetch.py --out $OUT
    PYTHONPATH=$PWD python scripts/bench_prefetch.py --smoke --out /tmp/res
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from slora_jax.provenance import git_commit  # noqa: E402
from slora_jax.adapters import random_adapter  # noqa: E402
from slora_jax.config import EngineConfig, preset  # noqa: E402
from slora_jax.engine import Engine, SamplingParams  # noqa: E402
from slora_jax.memory.pool import adapter_rows, place_adapter, write_adapter  # noqa: E402
from slora_jax.model import init_random_params, unstack_layers  # noqa: E402

PROJ = ("q", "k", "v", "o")
nan = float("nan")


def median_ms(xs) -> float:
    return float(np.median(xs)) * 1e3 if len(xs) else nan


def load_breakdown(engine: Engine, adapters: list) -> dict:
    """Engine idle: pack, copy, scatter and a whole cold `store.load`, per adapter (ms, medians)."""
    store, cfg, layout = engine.store, engine.cfg, engine.layout
    t = {"pack": [], "copy": [], "scatter": [], "load": []}
    for i, ad in enumerate(adapters):
        placement = place_adapter(ad, cfg, layout)
        t0 = time.perf_counter()
        rows = adapter_rows(ad, placement, cfg, layout, engine.dtype)
        t["pack"].append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        rows_dev = jax.device_put(rows).block_until_ready()
        t["copy"].append(time.perf_counter() - t0)
        name = f"idle{i}"
        engine.add_adapter(name, dataclasses.replace(ad, name=name))
        t0 = time.perf_counter()
        engine.pool = store.load(engine.pool, name).block_until_ready()
        t["load"].append(time.perf_counter() - t0)
        pages = jnp.asarray(store.resident(name).pages)
        engine.pool = write_adapter(engine.pool, rows_dev, pages, layout).block_until_ready()  # compiled by load
        t0 = time.perf_counter()
        engine.pool = write_adapter(engine.pool, rows_dev, pages, layout).block_until_ready()
        t["scatter"].append(time.perf_counter() - t0)
        nbytes = rows.nbytes
        del rows, rows_dev
    out = {f"{k}_ms": median_ms(v[1:] if len(v) > 2 else v) for k, v in t.items()}  # the first may compile
    out.update(adapter_bytes=nbytes, pages=int(placement.num_pages),
               copy_GBps=nbytes / (out["copy_ms"] * 1e-3) / 1e9, samples=len(adapters))
    return out


def scenario(engine: Engine, args, gap: int, names: list[str]) -> dict:
    """The running batch on adapter "w", `names` queued; steps until every queued request has a token."""
    rng = np.random.default_rng(0)
    long = engine.config.max_model_len - args.prompt
    prompt = lambda: rng.integers(3, min(30000, engine.cfg.vocab_size), args.prompt).tolist()  # noqa: E731
    for k in range(args.batch):
        n = args.first + k * gap if k < len(names) else long
        engine.submit(prompt(), "w", SamplingParams(max_new_tokens=n, ignore_eos=True))
    queued = [engine.submit(prompt(), a, SamplingParams(max_new_tokens=long, ignore_eos=True)) for a in names]
    steps = []
    started: set[int] = set()
    st = engine.store.stats
    longest = []  # the longest chunk of each step's plan (> 1: a prefill step)
    run = engine._run
    engine._run = lambda plan: (longest.append(max(n for _, n in plan)), run(plan))[1]
    t_start = time.perf_counter()
    while len(started) < len(queued):
        loads, hits = st["pool_loads"], st["prefetch_hits"]
        t0 = time.perf_counter()
        events = engine.step()
        dt = time.perf_counter() - t0
        started |= {e.request_id for e in events if e.token is not None and e.request_id in queued}
        steps.append({"ms": dt * 1e3, "loads": st["pool_loads"] - loads, "prefetched": st["prefetch_hits"] - hits,
                      "prefill": longest[-1] > 1})
    total = time.perf_counter() - t_start
    engine._run = run
    for rid in list(engine._requests):
        engine.abort(rid)
    ttft = [engine.completion(r).first_token_time - engine.completion(r).arrival_time for r in queued]
    for rid in list(engine._requests):
        engine.release(rid)
    load_steps = [s["ms"] for s in steps if s["loads"]]
    return {"gap": gap, "prefetch_adapters": engine.config.prefetch_adapters, "steps": len(steps),
            "load_steps": len(load_steps), "prefetched_loads": sum(s["prefetched"] for s in steps),
            "load_step_ms": float(np.median(load_steps)) if load_steps else nan,
            "prefill_step_ms": float(np.median([s["ms"] for s in steps if s["prefill"] and not s["loads"]] or [nan])),
            "decode_step_ms": float(np.median([s["ms"] for s in steps if not s["prefill"] and not s["loads"]]
                                              or [nan])),
            "ttft_mean_s": float(np.mean(ttft)), "ttft_max_s": float(np.max(ttft)), "wall_s": total,
            "step_ms": [round(s["ms"], 2) for s in steps], "step_loads": [s["loads"] for s in steps]}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.environ.get("OUT") or "benchmarks/results")
    p.add_argument("--smoke", action="store_true", help="tiny preset on any backend")
    p.add_argument("--model", default="llama-7b")
    p.add_argument("--rank", type=int, default=64)
    p.add_argument("--batch", type=int, default=16, help="running requests (max_num_seqs)")
    p.add_argument("--arrivals", type=int, default=8, help="queued requests, one new adapter each")
    p.add_argument("--prompt", type=int, default=128)
    p.add_argument("--first", type=int, default=16, help="tokens of the first running request to finish")
    p.add_argument("--gaps", default="4,16", help="steps between queued requests' starts (comma list)")
    p.add_argument("--prefetch", type=int, default=4, help="prefetch_adapters of the 'on' runs")
    args = p.parse_args(argv)
    if args.smoke:
        args.model, args.rank, args.batch, args.arrivals, args.prompt, args.first, args.gaps = \
            "tiny", 8, 4, 2, 16, 2, "2"
    gaps = [int(g) for g in args.gaps.split(",")]
    os.makedirs(args.out, exist_ok=True)
    out_path = os.path.join(args.out, "prefetch.json")
    t_start = time.perf_counter()
    cfg = preset(args.model)
    dtype = jnp.float32 if args.smoke else jnp.bfloat16
    result = {"benchmark": "adapter_prefetch", "git_commit": git_commit(), "device": jax.devices()[0].device_kind,
              "jax_version": jax.__version__, "model": args.model, "rank": args.rank, "projections": list(PROJ),
              "args": vars(args),
              "command": " ".join(["python scripts/bench_prefetch.py", *(sys.argv[1:] if argv is None else argv)])}

    def dump():
        result["wall_s"] = time.perf_counter() - t_start
        with open(out_path, "w") as f:
            json.dump(result, f, indent=1)

    params = unstack_layers(jax.block_until_ready(init_random_params(cfg, jax.random.key(0), dtype)))
    t0 = time.perf_counter()
    adapters = [random_adapter(cfg, args.rank, PROJ, seed=i, name=f"n{i}") for i in range(args.arrivals)]
    warm = random_adapter(cfg, args.rank, PROJ, seed=10_000, name="w")
    result["adapter_create_s"] = time.perf_counter() - t0
    names = [a.name for a in adapters]
    max_len = args.prompt + args.first + (args.arrivals + 1) * max(gaps) + 64
    pages_kv = (args.batch + args.arrivals) * -(-max_len // 16)
    ec = EngineConfig(num_pages=pages_kv + (args.arrivals + 8) * 32, page_size=16,
                      lora_chunk=64 if args.smoke else 128, max_num_seqs=args.batch, max_batch_tokens=256,
                      max_model_len=max_len)

    def engine(prefetch: int) -> Engine:
        e = Engine(cfg, params, ec.replace(prefetch_adapters=prefetch))
        for a in [warm, *adapters]:
            e.add_adapter(a.name, a)
        e.pool = e.store.load(e.pool, "w").block_until_ready()  # resident before the run: no load in its steps
        return e

    # Warm-up: the same step shapes (prefill and decode buckets, the adapter scatter) compile here.
    e = engine(args.prefetch)
    t0 = time.perf_counter()
    scenario(e, args, 2, names[:2])
    result["warmup_s"] = time.perf_counter() - t0
    print(f"warm-up {result['warmup_s']:.1f} s", flush=True)
    result["idle_load"] = load_breakdown(e, adapters[: min(4, len(adapters))])
    print("idle load", json.dumps(result["idle_load"]), flush=True)
    del e
    gc.collect()
    dump()

    result["runs"] = []
    for gap in gaps:
        for prefetch in (0, args.prefetch):
            e = engine(prefetch)
            run = scenario(e, args, gap, names)
            result["runs"].append(run)
            print("run", json.dumps({k: v for k, v in run.items() if not k.startswith("step_")}), flush=True)
            del e
            gc.collect()
            dump()

    load_ms = result["idle_load"]["load_ms"]
    result["summary"] = []
    for gap in gaps:
        off, on = (next(r for r in result["runs"] if r["gap"] == gap and r["prefetch_adapters"] == n)
                   for n in (0, args.prefetch))
        overhead = off["load_step_ms"] - off["prefill_step_ms"]
        hidden = off["load_step_ms"] - on["load_step_ms"]
        result["summary"].append({
            "gap": gap, "idle_load_ms": load_ms, "load_step_ms_off": off["load_step_ms"],
            "load_step_ms_on": on["load_step_ms"], "prefill_step_ms": off["prefill_step_ms"],
            "load_overhead_ms_off": overhead, "hidden_ms": hidden,
            "hidden_fraction": hidden / overhead if overhead > 0 else nan,
            "decode_step_ms_off": off["decode_step_ms"], "decode_step_ms_on": on["decode_step_ms"],
            "ttft_mean_s_off": off["ttft_mean_s"], "ttft_mean_s_on": on["ttft_mean_s"],
            "prefetched_loads_on": on["prefetched_loads"], "loads": on["load_steps"]})
    dump()
    il = result["idle_load"]
    print(f"\none adapter ({il['adapter_bytes'] / 1e6:.0f} MB, {il['pages']} pages), engine idle: pack "
          f"{il['pack_ms']:.1f} ms, copy {il['copy_ms']:.1f} ms ({il['copy_GBps']:.1f} GB/s), scatter "
          f"{il['scatter_ms']:.2f} ms, whole load {il['load_ms']:.1f} ms")
    print(f"{'gap':>4} {'load step off':>13} {'on':>8} {'prefill':>8} {'hidden':>8} {'hidden%':>7} "
          f"{'decode off':>10} {'on':>7} {'TTFT off':>8} {'on':>7}")
    for s in result["summary"]:
        print(f"{s['gap']:4d} {s['load_step_ms_off']:13.1f} {s['load_step_ms_on']:8.1f} {s['prefill_step_ms']:8.1f} "
              f"{s['hidden_ms']:8.1f} {100 * s['hidden_fraction']:7.0f} {s['decode_step_ms_off']:10.1f} "
              f"{s['decode_step_ms_on']:7.1f} {s['ttft_mean_s_off']:8.2f} {s['ttft_mean_s_on']:7.2f}"
              f"   ({s['prefetched_loads_on']}/{s['loads']} loads prefetched)")
    print(f"wrote {out_path} in {result['wall_s']:.0f} s")


if __name__ == "__main__":
    main()

"""Engine on a GPU: kernel-path correctness, then Llama-7B decode steps against the HBM floor.

    python scripts/bench_engine.py --out DIR [--batch 64] [--adapters 100] [--skip-tiny]

1. Tiny fp32 model, mixed adapters (ranks 4/16/64 on all seven projections):
   greedy tokens of the engine with the Pallas kernels (paged attention and the
   one-launch LoRA reading pool pages) against the jnp references.
2. Llama-7B shape (random bf16 weights), `--batch` concurrent requests (prompt
   128, 64 new tokens), each on an adapter drawn uniformly from `--adapters`
   rank-16 q/k/v/o adapters; and the same batch on the base model alone.
   For each: the median wall time of a decode `engine.step()` (scheduling, batch
   building, the jitted step, reading the sampled tokens), the device time of the
   same jitted step (a decode step from the middle of the run, all requests decoding,
   re-run back to back, dispatch
   overlapped, so the device never waits), their difference = host overhead per
   step (time the device sits idle between steps), and the step's HBM floor
   (base weights + KV read at the mean context + the batch's distinct adapters
   read once, at the copy bandwidth measured in this run as in bench_kernels.py).
   Each runs with overlapped steps (the default: step t+1 dispatched before
   step t's tokens are read) and synchronously (`overlap_steps=False`: the
   host work of a step and the device's add up). `dispatch_ms`: the median host
   time inside the call of the jitted step (the launch of its kernels, when the
   runtime launches them on the calling thread; `--tag` and `XLA_FLAGS` compare
   launch settings such as command buffers). A profile of a few
   decode steps (when the JAX profiler writes a Perfetto trace) gives the device
   time by kernel.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

nan = float("nan")

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))  # runs from a bare checkout too

import slora_jax.engine.engine as engine_mod  # noqa: E402
import profiling  # noqa: E402  (scripts/ is on sys.path)
from bench_kernels import measure_ceilings  # same ceilings as the kernel benchmark
from slora_jax.adapters import random_adapter
from slora_jax.config import PROJECTIONS, EngineConfig, preset
from slora_jax.engine import Engine, SamplingParams
from slora_jax.provenance import git_commit
from slora_jax.parallel import serving
from slora_jax.model import init_random_params


def tiny_check(tp: int = 1) -> dict:
    """Greedy tokens of the Pallas engine (at `tp` devices) against the one-device jnp engine."""
    cfg = preset("tiny")
    rng = np.random.default_rng(0)
    prompts = [rng.integers(3, 250, rng.integers(5, 100)).tolist() for _ in range(12)]
    names = [None, "a0", "a1", "a2"]
    outs = {}
    params = init_random_params(cfg, jax.random.key(0), jnp.float32)  # the same weights at every tp
    for impl in ("reference", "pallas"):
        ec = EngineConfig(num_pages=256, page_size=16, lora_chunk=16, max_model_len=256, max_num_seqs=8,
                          max_batch_tokens=128, attention_impl=impl, lora_impl=impl, tp=tp if impl == "pallas" else 1)
        e = Engine(cfg, params, ec)
        for i, r in enumerate([4, 16, 64]):
            e.add_adapter(f"a{i}", random_adapter(cfg, r, ("q", "k", "v", "o", "gate", "up", "down"), seed=i,
                                                  name=f"a{i}"))
        sp = SamplingParams(max_new_tokens=24, ignore_eos=True)
        outs[impl] = [o.token_ids for o in e.generate(prompts, [names[i % 4] for i in range(12)], sp)]
    same = [a == b for a, b in zip(outs["reference"], outs["pallas"])]
    return {"requests": len(same), "identical_outputs": int(sum(same)), "tp": tp}


class StepRecorder:
    """Wraps the engine's jitted step to keep the arguments of its calls (to re-run one alone).

    `pick()` chooses the call `keep()` held (`run_batch` keeps the middle step of the whole batch
    decoding), else the middle of those since the last `clear()`: the last call of a run is not
    representative (the prompts are prefilled in waves, so the last decode
    steps hold only the last wave's requests: a quarter of the batch and of its KV reads).
    """

    def __init__(self):
        self.inner = engine_mod._step
        self.last = None
        self.calls: list[tuple] = []
        self.dispatch_s: list[float] = []  # host time inside each call (tracing cache hit, launch)
        self.kept = None

    def clear(self):
        self.calls.clear()
        self.dispatch_s.clear()

    def keep(self):
        """Hold a copy of the last call's inputs (but the pool, donated anyway) for `pick`: a later slab
        compaction (as requests finish) donates the slab that call read (`LoraSlab.ensure`)."""
        (params, _, *rest), kw = self.last
        copy = lambda x: x.copy() if isinstance(x, jax.Array) else x  # noqa: E731
        self.kept = ((params, None, *jax.tree.map(copy, rest)), jax.tree.map(copy, kw))

    def pick(self):
        """The call the re-runs replay: the one `keep` held, else the middle one."""
        self.last = self.kept if self.kept is not None else self.calls[len(self.calls) // 2]
        self.kept = None

    def __call__(self, *args, **kw):
        self.last = (args, kw)
        self.calls.append((args, kw))
        t = time.perf_counter()
        out = self.inner(*args, **kw)
        self.dispatch_s.append(time.perf_counter() - t)
        return out


def rerun(rec: StepRecorder, engine: Engine, reps: int) -> float:
    """Seconds per step of the recorded batch run `reps` times back to back (the pool donated along)."""
    args, kw = rec.last
    params, _, *rest = args
    pool = engine.pool
    t = time.perf_counter()
    for _ in range(reps):
        _, pool = rec.inner(params, pool, *rest, **kw)
    engine.pool = pool.block_until_ready()
    return (time.perf_counter() - t) / reps


def profile_kernels(run, top: int = 12) -> dict | None:
    """Device time by kernel name over `run()` from a Perfetto trace (None if none is written)."""
    try:
        kernels = profiling.gpu_kernels(run)
        return None if kernels is None else profiling.summarize(kernels, top)
    except Exception as e:  # noqa: BLE001 - the profile is extra information
        return {"error": f"{type(e).__name__}: {e}"[:300]}


def pool_copies(rec: StepRecorder, engine: Engine, path: str) -> list[str]:
    """Copies of pool-sized buffers in the compiled step (there should be none); the HLO goes to `path`."""
    args, kw = rec.last
    params, _, *rest = args
    try:
        text = rec.inner.lower(params, engine.pool, *rest, **kw).compile().as_text()
    except Exception as e:  # noqa: BLE001 - diagnostics only
        return [f"error: {type(e).__name__}: {e}"[:300]]
    with open(path, "w") as f:
        f.write(text)
    return pool_sized_copy_lines(text, engine.pool.shape)


_HLO_OP = re.compile(r"^\s*(?:ROOT\s+)?%(\S+) = \w+(\[[^\]]*\])\S* (\S+?)\(")


def pool_sized_copy_lines(hlo_text: str, pool_shape) -> list[str]:
    """HLO instructions that produce a copy with the pool's leading dims (a copy op, or a fusion named copy).

    Only the instruction's own result counts: a kernel taking the pool and some other copied
    operand (session 13's one-launch kernel took a copied s32[1]) is not a pool copy.
    """
    lead = f"[{pool_shape[0]},{pool_shape[1]}"
    out = []
    for ln in hlo_text.splitlines():
        m = _HLO_OP.match(ln)
        if m and m.group(2).startswith(lead) and ("copy" in m.group(1) or "copy" in m.group(3)):
            out.append(ln.strip()[:240])
    return out


def run_batch(engine: Engine, batch: int, prompt_len: int, new: int, adapters: list, seed: int,
              rec: StepRecorder | None = None) -> list[float]:
    """Serve `batch` requests; the wall seconds of each step of the whole batch decoding. `rec`: keep
    the middle such step's inputs."""
    rng = np.random.default_rng(seed)
    for i in range(batch):
        engine.submit(rng.integers(3, min(30000, engine.cfg.vocab_size), prompt_len).tolist(), adapters[i],
                      SamplingParams(max_new_tokens=new, ignore_eos=True))
    times = []
    while engine.has_unfinished():
        decoding = all(r.num_pending == 1 for r in engine._requests.values() if r.status.value != "finished")
        t = time.perf_counter()
        engine.step()  # sync: returns after this step's tokens reach the host; overlapped: the last step's
        if decoding:
            times.append(time.perf_counter() - t)
            if rec is not None and len(times) == new // 2:
                rec.keep()
    for rid in list(engine._requests):
        engine.release(rid)
    return times


def serving_profile(engine: Engine, batch: int, prompt_len: int, adapters: list, steps: int = 12) -> dict | None:
    """Profile `steps` decode `engine.step()` calls as served (not re-run): the device's busy
    time against the span shows the idle time the host leaves between steps."""
    rng = np.random.default_rng(3)
    for i in range(batch):
        engine.submit(rng.integers(3, min(30000, engine.cfg.vocab_size), prompt_len).tolist(), adapters[i],
                      SamplingParams(max_new_tokens=steps + 8, ignore_eos=True))
    while not all(r.num_pending == 1 for r in engine._requests.values()):
        engine.step()
    t = time.perf_counter()
    prof = profile_kernels(lambda: [engine.step() for _ in range(steps)], top=4)
    wall = time.perf_counter() - t
    while engine.has_unfinished():
        engine.step()
    for rid in list(engine._requests):
        engine.release(rid)
    if prof is not None:
        prof["steps"], prof["wall_ms_with_profiler"] = steps, wall * 1e3
    return prof


RUNS = {"base": (False, True), "base_sync": (False, False), "lora": (True, True), "lora_sync": (True, False),
        "lora_slab": (True, True)}  # lora_slab: the batch's adapters in a dense slab (EngineConfig.lora_slab_rows)


def bench_7b(bw_GBps: float, batch: int, n_adapters: int, prompt_len: int, new: int, rank: int,
             model: str = "llama-7b", lora_chunk: int = 128, out_dir: str = ".", labels=tuple(RUNS),
             tp: int = 1, unified: bool = True, strategy: str = "slora", lora_kernel: dict | None = None,
             slab_rows: int = 1024, top: int = 12) -> dict:
    cfg = preset(model)
    if tp > 1:  # drawn straight into their shards (the engine keeps them there)
        params = jax.block_until_ready(serving.init_random_params(cfg, EngineConfig(tp=tp), jnp.bfloat16, 0))
    else:
        params = jax.block_until_ready(init_random_params(cfg, jax.random.key(0)))
    ec = EngineConfig(num_pages=2048, page_size=16, lora_chunk=lora_chunk, max_model_len=prompt_len + new + 16,
                      max_num_seqs=batch, max_batch_tokens=max(batch, 2048), attention_impl="pallas",
                      lora_impl="pallas", tp=tp, tp_lora_strategy=strategy, unified_memory=unified,
                      lora_kernel=dict(lora_kernel or {}),
                      **({} if unified else dict(max_loras=batch, max_lora_rank=rank)))
    weight_bytes = sum(x.nbytes for x in jax.tree.leaves(params))
    ctx = prompt_len + new // 2
    kv_bytes = batch * ctx * 2 * cfg.num_key_value_heads * cfg.head_dim * 2 * cfg.num_hidden_layers
    rng = np.random.default_rng(7)
    draw = rng.integers(0, n_adapters, batch)
    out = {"model": model, "tp": tp, "strategy": strategy, "unified_memory": unified,
           "batch": batch, "prompt_len": prompt_len, "new_tokens": new, "adapters": n_adapters, "rank": rank,
           "distinct_adapters_in_batch": int(len(set(draw.tolist())))}
    rec = StepRecorder()
    engine_mod._step = rec
    try:
        for label in labels:
            with_lora, overlap = RUNS[label]
            engine = Engine(cfg, params, ec.replace(overlap_steps=overlap,
                                                    lora_slab_rows=slab_rows if label.endswith("_slab") else 0))
            names = [None] * batch
            if with_lora:
                for i in range(n_adapters):
                    engine.add_adapter(f"a{i}", random_adapter(cfg, rank, ("q", "k", "v", "o"), seed=i, name=f"a{i}"))
                names = [f"a{i}" for i in draw]
            run_batch(engine, batch, prompt_len, 4, names, seed=0)  # warm-up: compiles the buckets
            rec.clear()
            times = run_batch(engine, batch, prompt_len, new, names, seed=1, rec=rec)
            dispatch = float(np.median(rec.dispatch_s[-len(times):])) if times else nan
            rec.pick()  # a decode step of the whole batch (the re-runs below and the profile use it)
            rec.calls.clear()
            rerun(rec, engine, 2)
            dev_s = rerun(rec, engine, 20)
            adapter_bytes = (out["distinct_adapters_in_batch"] if with_lora else 0) * cfg.num_hidden_layers * 4 \
                * rank * (cfg.hidden_size * 2) * 2
            floor_s = (weight_bytes + kv_bytes + adapter_bytes) / (bw_GBps * 1e9) / tp  # spread over tp devices
            med = float(np.median(times))
            row = {"decode_steps": len(times), "median_step_ms": med * 1e3, "device_step_ms": dev_s * 1e3,
                   "host_overhead_ms": (med - dev_s) * 1e3, "dispatch_ms": dispatch * 1e3, "floor_ms": floor_s * 1e3,
                   "floor_ratio_device": floor_s / dev_s, "floor_ratio_wall": floor_s / med,
                   "tokens_per_s": batch / med, "pool_pages_used": engine.memory_report()["pages_adapter"]}
            row["profile"] = profile_kernels(lambda: rerun(rec, engine, 1), top=top)
            row["serving_profile"] = serving_profile(engine, batch, prompt_len, names)
            try:
                row["pool_sized_copies"] = pool_copies(rec, engine, os.path.join(out_dir, f"step_hlo_{label}.txt"))
            except Exception as e:  # noqa: BLE001 - extra information (e.g. not written under TP)
                row["pool_sized_copies"] = f"{type(e).__name__}: {e}"[:200]
            out[label] = row
            print(label, json.dumps({k: v for k, v in row.items() if k != "profile"}), flush=True)
            del engine
    finally:
        engine_mod._step = rec.inner
    for k in ("lora", "lora_slab"):
        if k in out and "base" in out:
            out[f"{k}_step_over_base_device"] = out[k]["device_step_ms"] / out["base"]["device_step_ms"]
            out[f"{k}_step_over_base_wall"] = out[k]["median_step_ms"] / out["base"]["median_step_ms"]
    return out


def default_lora_chunk(cfg, most: int = 128) -> int:
    """The largest power of two <= `most` dividing every projection's sizes (the pages' row width must)."""
    sizes = {d for p in PROJECTIONS for d in cfg.projection_shape(p)}
    c = most
    while c > 1 and any(d % c for d in sizes):
        c //= 2
    return c


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--skip-tiny", action="store_true")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--adapters", type=int, default=100)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--model", default="llama-7b", help="a preset (tiny: a CPU smoke run)")
    ap.add_argument("--lora-chunk", type=int, default=None,
                    help="EngineConfig.lora_chunk (default: 128, or the largest power of two below it that "
                         "divides every projection's sizes, e.g. 32 for tiny)")
    ap.add_argument("--labels", default=",".join(RUNS), help=f"runs, a subset of {','.join(RUNS)}")
    ap.add_argument("--tp", type=int, default=1, help="tensor-parallel size (EngineConfig.tp)")
    ap.add_argument("--strategy", default="slora", help="LoRA under TP: slora | replicated_a")
    ap.add_argument("--slots", action="store_true", help="dense adapter slots (unified_memory=False)")
    ap.add_argument("--kernel", default="", help="EngineConfig.lora_kernel overrides, e.g. paged_warps=4,paged_k_steps=4")
    ap.add_argument("--slab-rows", type=int, default=1024, help="EngineConfig.lora_slab_rows of the lora_slab run")
    ap.add_argument("--top", type=int, default=12, help="kernels listed in the profile of the re-run step")
    ap.add_argument("--tag", default="", help="suffix of the JSON name (engine{tag}.json), e.g. for XLA_FLAGS variants")
    args = ap.parse_args(argv)
    if args.lora_chunk is None:
        args.lora_chunk = default_lora_chunk(preset(args.model))
    res = {"benchmark": "engine", "device": jax.devices()[0].device_kind, "jax_version": jax.__version__,
           "command": "python scripts/bench_engine.py " + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items()
                                                                   if k in ("batch", "adapters", "rank", "new", "model", "lora_chunk",
                                                                            "tp", "strategy", "kernel") and v != "")
                      + (" --slots" if args.slots else ""),
           "xla_flags": os.environ.get("XLA_FLAGS", ""),
           "git_commit": git_commit()}
    res["measured_ceilings"] = measure_ceilings(small=jax.default_backend() == "cpu")
    bw = res["measured_ceilings"]["copy_GBps"]
    print("ceilings", res["measured_ceilings"], flush=True)
    if not args.skip_tiny:
        res["tiny_pallas_vs_reference"] = tiny_check(args.tp)
        print("tiny", res["tiny_pallas_vs_reference"], flush=True)
    os.makedirs(args.out, exist_ok=True)
    labels = [x for x in args.labels.split(",") if x]
    if bad := set(labels) - set(RUNS):
        ap.error(f"unknown --labels {sorted(bad)}; choose from {list(RUNS)}")
    key = args.model.replace("-", "_")  # llama-7b -> "llama_7b", the key of the earlier result files
    res[key] = bench_7b(bw, args.batch, args.adapters, 128, args.new, args.rank, args.model,
                        args.lora_chunk, args.out, labels, args.tp, not args.slots, args.strategy,
                        {k: int(v) for k, v in (kv.split("=") for kv in args.kernel.split(",") if kv)},
                        args.slab_rows, args.top)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, f"engine{args.tag}.json"), "w") as f:
        json.dump(res, f, indent=2)
    r = res[key]
    print(f"\n{'':9} {'wall ms':>8} {'device ms':>9} {'host ms':>8} {'dispatch':>8} {'floor ms':>8} {'floor/dev':>9} "
          f"{'tok/s':>8}")
    for k in labels:
        x = r[k]
        print(f"{k:9} {x['median_step_ms']:8.2f} {x['device_step_ms']:9.2f} {x['host_overhead_ms']:8.2f} "
              f"{x['dispatch_ms']:8.2f} "
              f"{x['floor_ms']:8.2f} {x['floor_ratio_device']:9.2f} {x['tokens_per_s']:8.0f}")
        sp = x.get("serving_profile") or {}
        if "span_us" in sp:
            print(f"    served steps: device busy {sp['busy_us'] / 1e3:.2f} of {sp['span_us'] / 1e3:.2f} ms over "
                  f"{sp['steps']} steps; idle gaps > 50 us: {sp['idle_gaps_over_50us']}")
        for t in (x.get("profile") or {}).get("top", [])[:8]:
            print(f"    {t['us']:9.1f} us {t['calls']:5d} calls  {t['name']}")
        print("   pool-sized copies:", len(x["pool_sized_copies"]), *x["pool_sized_copies"][:4], sep="\n    ")


if __name__ == "__main__":
    main()

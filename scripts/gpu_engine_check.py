"""End-to-end engine check and first timings on a GPU.

    python scripts/gpu_engine_check.py --out DIR [--skip-7b]

1. Tiny fp32 model, mixed adapters: the engine's greedy tokens with the Pallas
   paged-attention kernel (reading the unified pool in place) against the jnp
   reference attention.
2. Llama-7B shape (random bf16 weights): decode steps of a full batch, base
   model only and with every request on its own rank-16 q/k/v/o adapter (LoRA
   still on the jnp read-from-pages path), against the HBM floor of a decode
   step (weights + KV read + adapters read once) at the measured copy bandwidth.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import time

import jax
import jax.numpy as jnp
import numpy as np

from slora_jax.adapters import random_adapter
from slora_jax.config import EngineConfig, preset
from slora_jax.engine import Engine, SamplingParams
from slora_jax.model import init_random_params


def copy_bandwidth_GBps() -> float:
    x = jnp.ones((1 << 28,), jnp.float32)  # 1 GiB
    f = jax.jit(lambda a: a * 1.0001)
    for _ in range(50):  # raise the clocks from idle first: a cold first reading is ~25% low
        x = f(x)
    x.block_until_ready()
    ts = []
    for _ in range(10):
        t = time.perf_counter()
        f(x).block_until_ready()
        ts.append(time.perf_counter() - t)
    return 2 * x.nbytes / float(np.median(ts)) / 1e9


def tiny_check() -> dict:
    cfg = preset("tiny")
    rng = np.random.default_rng(0)
    prompts = [rng.integers(3, 250, rng.integers(5, 100)).tolist() for _ in range(12)]
    names = [None, "a0", "a1", "a2"]
    outs = {}
    for impl in ("reference", "pallas"):
        e = Engine.from_pretrained("tiny", dtype="float32", num_pages=256, page_size=16, lora_chunk=64,
                                   max_model_len=256, max_num_seqs=8, max_batch_tokens=128, attention_impl=impl)
        for i, r in enumerate([4, 16, 64]):
            e.add_adapter(f"a{i}", random_adapter(cfg, r, ("q", "k", "v", "o", "gate", "up", "down"), seed=i,
                                                  name=f"a{i}"))
        sp = SamplingParams(max_new_tokens=24, ignore_eos=True)
        outs[impl] = [o.token_ids for o in e.generate(prompts, [names[i % 4] for i in range(12)], sp)]
    same = [a == b for a, b in zip(outs["reference"], outs["pallas"])]
    return {"requests": len(same), "identical_outputs": int(sum(same))}


def decode_steps(engine: Engine, batch: int, prompt_len: int, new: int, adapters: list[str | None]) -> list[float]:
    rng = np.random.default_rng(1)
    for i in range(batch):
        engine.submit(rng.integers(3, 30000, prompt_len).tolist(), adapters[i],
                      SamplingParams(max_new_tokens=new, ignore_eos=True))
    times = []
    while engine.has_unfinished():
        decoding = all(r.num_pending == 1 for r in engine._requests.values() if r.status.value != "finished")
        t = time.perf_counter()
        engine.step()  # returns after the sampled tokens reach the host
        if decoding:
            times.append(time.perf_counter() - t)
    for rid in list(engine._requests):
        engine.release(rid)
    return times


def bench_7b(bw_GBps: float, batch: int, prompt_len: int, new: int) -> dict:
    cfg = preset("llama-7b")
    params = jax.block_until_ready(init_random_params(cfg, jax.random.key(0)))
    ec = EngineConfig(num_pages=1024, page_size=16, lora_chunk=64, max_model_len=prompt_len + new + 16,
                      max_num_seqs=batch, max_batch_tokens=max(batch, 1024), attention_impl="pallas")
    out = {"batch": batch, "prompt_len": prompt_len, "new_tokens": new}
    weight_bytes = sum(x.nbytes for x in jax.tree.leaves(params))
    ctx = prompt_len + new // 2
    kv_bytes = batch * ctx * 2 * cfg.num_key_value_heads * cfg.head_dim * 2 * cfg.num_hidden_layers
    for label, n_adapters in (("base", 0), ("lora_r16_qkvo_distinct", batch)):
        engine = Engine(cfg, params, ec)
        names = []
        for i in range(n_adapters):
            engine.add_adapter(f"a{i}", random_adapter(cfg, 16, ("q", "k", "v", "o"), seed=i, name=f"a{i}"))
            names.append(f"a{i}")
        adapters = names or [None] * batch
        decode_steps(engine, batch, prompt_len, 4, adapters)  # warm-up: compiles prefill and decode buckets
        times = decode_steps(engine, batch, prompt_len, new, adapters)
        adapter_bytes = n_adapters * cfg.num_hidden_layers * 4 * 16 * (4096 + 4096) * 2
        floor_s = (weight_bytes + kv_bytes + adapter_bytes) / (bw_GBps * 1e9)
        med = float(np.median(times))
        out[label] = {"decode_steps": len(times), "median_step_ms": med * 1e3, "floor_ms": floor_s * 1e3,
                      "floor_ratio": floor_s / med, "tokens_per_s": batch / med}
        print(label, json.dumps(out[label]), flush=True)
        del engine
    out["lora_overhead"] = out["lora_r16_qkvo_distinct"]["median_step_ms"] / out["base"]["median_step_ms"]
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=".")
    ap.add_argument("--skip-7b", action="store_true")
    ap.add_argument("--batch", type=int, default=32)
    args = ap.parse_args()
    res = {"benchmark": "engine_check", "device": jax.devices()[0].device_kind, "jax_version": jax.__version__,
           "command": "python scripts/gpu_engine_check.py",
           "git_commit": subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()}
    bw = copy_bandwidth_GBps()
    res["measured_ceilings"] = {"copy_GBps": bw}
    res["tiny_pallas_vs_reference"] = tiny_check()
    print("tiny", res["tiny_pallas_vs_reference"], flush=True)
    if not args.skip_7b:
        res["llama_7b"] = bench_7b(bw, args.batch, 128, 32)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "engine_check.json"), "w") as f:
        json.dump(res, f, indent=2)
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()

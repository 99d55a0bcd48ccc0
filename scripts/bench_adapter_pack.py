"""Host packing of adapters for the pool: fresh memory vs recycled buffers, as read vs kept folded.

    python scripts/bench_adapter_pack.py [--model llama-7b] [--ranks 8,64] [--threads 1,4] [--rounds 6] [--out DIR]

Packing (`memory.pool.adapter_shard_rows`) is what the adapter store's staging threads do on
the first load of an adapter (S2 at n = 1000 packs 160-180 adapters in its 12 s window). For
each rank and thread count, every thread packs `--rounds` adapters (q, k, v, o, every layer),
each result kept alive as the host tier keeps it, in four ways:

- `fresh`: modules as `load_adapter` reads them (float32, scale apart), into a new array;
- `fresh_folded`: modules kept folded in the pool's dtype (`LoraAdapter.folded`), new array;
- `spare`: float32 modules into a buffer packed before (`adapters.spares.SpareBuffers`);
- `spare_folded`: both.

Prints ms per adapter (median over rounds and threads) and the host's transparent-huge-page
settings, which decide what a page fault in fresh memory costs; `--out` writes the JSON.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import platform
import time

import jax.numpy as jnp
import numpy as np

from slora_jax.adapters.random import random_adapter
from slora_jax.config import preset
from slora_jax.memory.pool import WHOLE, PoolLayout, adapter_shard_rows, place_adapter, rows_shape

MODES = ("fresh", "fresh_folded", "spare", "spare_folded")


def thp_settings() -> dict[str, str]:
    out = {}
    for name in ("enabled", "defrag"):
        try:
            with open(f"/sys/kernel/mm/transparent_hugepage/{name}") as f:
                out[name] = f.read().strip()
        except OSError:
            out[name] = "unknown"
    return out


def run(model: str, rank: int, threads: int, rounds: int, mode: str, chunk: int) -> list[float]:
    cfg = preset(model)
    layout = PoolLayout.for_model(cfg, 1024, 16, chunk)
    ad = random_adapter(cfg, rank, ("q", "k", "v", "o"), seed=rank)
    if mode.endswith("folded"):
        ad = ad.folded(jnp.bfloat16)
    placement = place_adapter(ad, cfg, layout)
    shape = rows_shape(placement, cfg, layout)
    kept = []  # every result stays alive, as in the host tier

    def one(_):
        times, out = [], None
        if mode.startswith("spare"):  # a buffer written before: its pages are in
            out = np.empty(shape, jnp.bfloat16)
            out.view(np.uint16).fill(0)
        for _ in range(rounds):
            t = time.perf_counter()
            rows = adapter_shard_rows(ad, placement, cfg, layout, WHOLE, jnp.bfloat16, out)
            times.append(time.perf_counter() - t)
            if out is None:
                kept.append(rows)
        return times

    with concurrent.futures.ThreadPoolExecutor(threads) as ex:
        times = [t for ts in ex.map(one, range(threads)) for t in ts]
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="llama-7b")
    ap.add_argument("--ranks", default="8,64")
    ap.add_argument("--threads", default="1,4")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--chunk", type=int, default=128)
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    thp = thp_settings()
    print(f"host {platform.node()} cpus {os.cpu_count()} THP enabled: {thp['enabled']} defrag: {thp['defrag']}")
    rows = []
    print(f"{'rank':>4} {'threads':>7} " + " ".join(f"{m:>13}" for m in MODES) + "   (ms per adapter, median)")
    for rank in [int(r) for r in args.ranks.split(",")]:
        for threads in [int(t) for t in args.threads.split(",")]:
            line = {}
            for mode in MODES:
                times = run(args.model, rank, threads, args.rounds, mode, args.chunk)
                line[mode] = float(np.median(times)) * 1e3
                rows.append({"rank": rank, "threads": threads, "mode": mode, "ms": [t * 1e3 for t in times],
                             "median_ms": line[mode]})
            print(f"{rank:>4} {threads:>7} " + " ".join(f"{line[m]:>13.1f}" for m in MODES))
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "adapter_pack.json"), "w") as f:
            json.dump({"benchmark": "adapter_pack", "model": args.model, "host": platform.node(),
                       "cpus": os.cpu_count(), "thp": thp, "rounds": args.rounds, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()

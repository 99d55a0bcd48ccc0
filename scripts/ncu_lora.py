"""Run the paged LoRA kernels of one engine-like decode step once per variant, for `ncu` to profile.

The Llama-7B decode case of `bench_engine.py`: 64 tokens over `--adapters` distinct
rank-16 adapters (default 47, as in the engine's batch), pool rows of C = 128; per
variant (`KernelConfig` overrides, as in bench_lora_group.py) one `add_lora_group`
for q, k, v and one `add_lora` for o, each run twice (compile, then the profiled
call). Under Nsight Compute:

    XLA_PYTHON_CLIENT_PREALLOCATE=false ncu --clock-control none -k regex:'sgmv|linear' \\
        --section LaunchStats --section Occupancy --section SpeedOfLight python scripts/ncu_lora.py

(without the preallocation flag ncu saves and restores JAX's whole memory pool
around every replayed kernel). Each variant's launches are preceded by a tiny
`jnp` marker kernel named in the NVTX-free output by its shape, so the profile
reads in the order printed here.

`--linear` also runs the base projections with their LoRA in one launch (`lora_linear_group`,
session 13), for q, k, v and for o, with the shrink inside the launch and as its own launch
(`linear_shrink_launch`), on the batch's adapters as the engine passes them (64 rows, the
unused ones rank 0).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_lora_group import VARIANTS  # noqa: E402
from slora_jax.ops import KernelConfig, PagedWeights, add_lora, add_lora_group, build_lora_meta  # noqa: E402
from slora_jax.ops import lora_linear_group, random_slot_weights  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variants", nargs="*", default=["group", "group_w4"])
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--adapters", type=int, default=47)
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--linear", action="store_true", help="also the one-launch base + LoRA kernels")
    args = p.parse_args(argv)
    H, r, T, C, S = args.hidden, 16, args.tokens, 128, 256
    rng = np.random.default_rng(0)
    dense = [random_slot_weights(jax.random.key(g), np.full(S, r, np.int32), H, H) for g in range(4)]
    paged = PagedWeights.group_from_slots(dense, chunk=C, rows_per_page=1024, page_ids=rng.permutation(4 * S))
    ids = rng.choice(S, args.adapters, replace=False)
    slot_T = rng.permutation(ids[np.arange(T) % args.adapters]).astype(np.int32)
    meta = jax.device_put(build_lora_meta(slot_T, max_segments=64, static_tiles=True))
    x = jax.random.normal(jax.random.key(9), (T, H), jnp.bfloat16)
    for v in args.variants:
        cfg = KernelConfig(**VARIANTS[v])
        qkv = jax.jit(lambda ys, x, cfg=cfg: add_lora_group(ys, x, paged[:3], meta, config=cfg))
        o = jax.jit(lambda y, x, cfg=cfg: add_lora(y, x, paged[3], meta, config=cfg))
        for _ in range(2):
            ys = tuple(jax.random.normal(jax.random.key(g), (T, H), jnp.bfloat16) for g in range(3))
            jax.block_until_ready((qkv(ys, x), o(ys[0], x)))
        print(f"variant {v}: {VARIANTS[v]}", flush=True)
    if args.linear:
        rows = 64  # the engine's table: the batch's adapters first, then rank-0 rows
        local = lambda a: jnp.concatenate([a[ids], jnp.zeros((rows - len(ids), *a.shape[1:]), a.dtype)])  # noqa: E731
        batch = [dataclasses.replace(w, pages=local(w.pages), rank=local(w.rank), a_row=local(w.a_row),
                                     b_row=local(w.b_row)) for w in paged]
        to_local = {int(s): i for i, s in enumerate(ids)}
        lmeta = jax.device_put(build_lora_meta(np.array([to_local[int(s)] for s in slot_T], np.int32),
                                               max_segments=64, static_tiles=True))
        Ws = [jax.random.normal(jax.random.key(20 + g), (H, H), jnp.bfloat16) * 0.02 for g in range(4)]
        for shrink_launch in (False, True):
            cfg = KernelConfig(linear_max_tokens=256, linear_shrink_launch=shrink_launch)
            qkv = jax.jit(lambda x, cfg=cfg: lora_linear_group(x, Ws[:3], batch[:3], lmeta, config=cfg))
            o = jax.jit(lambda x, cfg=cfg: lora_linear_group(x, Ws[3:], batch[3:], lmeta, config=cfg))
            for _ in range(2):
                jax.block_until_ready((qkv(x), o(x)))
            print(f"lora_linear_group, linear_shrink_launch={shrink_launch}", flush=True)


if __name__ == "__main__":
    main()

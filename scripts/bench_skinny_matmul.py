"""Decode-shaped matmuls `x[T, K] @ W[K, N]` (T = 64 rows, weights read once): how close XLA's GEMM
comes to the memory floor, and whether splitting K by hand (a batched matmul over K slices, then a
sum) does better for the shapes tensor parallelism leaves on each device.

    python scripts/bench_skinny_matmul.py --out DIR [--tag cublas]
    XLA_FLAGS=--xla_gpu_enable_triton_gemm=false python scripts/bench_skinny_matmul.py --out DIR --tag cublas

Each case chains 8 matmuls on 8 distinct weight buffers inside one jitted call (so weights come
from HBM, not L2), timed as (t(2n) - t(n)) / n over back-to-back calls; floor = weight bytes /
copy bandwidth (`bench_kernels.measure_ceilings`, same run).
"""

from __future__ import annotations

import argparse
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from bench_kernels import measure_ceilings  # scripts/ is on sys.path

SHAPES = {  # (K, N) per device
    "13b q (tp1)": (5120, 5120), "13b up (tp1)": (5120, 13824), "13b down (tp1)": (13824, 5120),
    "13b q (tp2)": (5120, 2560), "13b o (tp2)": (2560, 5120), "13b up (tp2)": (5120, 6912),
    "13b down (tp2)": (6912, 5120), "7b q": (4096, 4096), "7b up": (4096, 11008), "7b down": (11008, 4096),
}
COPIES = 8


def matmul(x, w, split: int):
    if split == 1:
        return jnp.dot(x, w, preferred_element_type=jnp.float32).astype(x.dtype)
    T, K = x.shape
    xs = x.reshape(T, split, K // split).transpose(1, 0, 2)  # [s, T, K/s]
    ws = w.reshape(split, K // split, w.shape[1])  # [s, K/s, N]
    part = jnp.einsum("stk,skn->stn", xs, ws, preferred_element_type=jnp.float32)
    return part.sum(0).astype(x.dtype)


def time_case(x, ws, split: int, iters: int = 20) -> float:
    @jax.jit
    def chain(x, ws):
        acc = jnp.zeros((x.shape[0], ws[0].shape[1]), jnp.float32)
        for w in ws:
            acc = acc + matmul(x, w, split)
        return acc

    jax.block_until_ready(chain(x, ws))

    def run(n):
        t = time.perf_counter()
        for _ in range(n):
            out = chain(x, ws)
        jax.block_until_ready(out)
        return time.perf_counter() - t

    diffs = sorted((run(2 * iters) - run(iters)) / (iters * COPIES) for _ in range(5))
    return diffs[2] * 1e6


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=".")
    ap.add_argument("--tag", default="default")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--splits", type=int, nargs="+", default=[1, 2, 4, 8])
    args = ap.parse_args()
    ceil = measure_ceilings()
    bw = ceil["copy_GBps"] * 1e9
    rng = np.random.default_rng(0)
    rows = []
    for name, (K, N) in SHAPES.items():
        x = jnp.asarray(rng.standard_normal((args.tokens, K)), jnp.bfloat16)
        ws = [jnp.asarray(rng.standard_normal((K, N)) * 0.02, jnp.bfloat16) for _ in range(COPIES)]
        ref = np.asarray(matmul(x, ws[0], 1), np.float32)
        floor = K * N * 2 / bw * 1e6
        row = {"case": name, "K": K, "N": N, "tokens": args.tokens, "floor_us": floor, "us": {}}
        for s in args.splits:
            if K % s:
                continue
            got = np.asarray(matmul(x, ws[0], s), np.float32)
            err = float(np.linalg.norm(got - ref) / np.linalg.norm(ref))
            assert err < 2e-2, (name, s, err)
            row["us"][s] = time_case(x, ws, s)
        rows.append(row)
        best = min(row["us"], key=row["us"].get)
        print(f"{name:16} K={K:6} N={N:6} floor {floor:6.1f} us  " +
              "  ".join(f"s{s}={u:6.1f}" for s, u in row["us"].items()) +
              f"  best s{best} floor/best {floor / row['us'][best]:.2f}", flush=True)
        del ws
    os.makedirs(args.out, exist_ok=True)
    res = {"benchmark": "skinny_matmul", "device": jax.devices()[0].device_kind, "jax_version": jax.__version__,
           "xla_flags": os.environ.get("XLA_FLAGS", ""), "measured_ceilings": ceil, "rows": rows}
    with open(os.path.join(args.out, f"skinny_matmul_{args.tag}.json"), "w") as f:
        json.dump(res, f, indent=2)


if __name__ == "__main__":
    main()

"""Time grouped LoRA launches (q, k, v sharing x: one shrink + one expand) against one pair per projection.

Cases: attention shapes of Llama-7B (MHA: q, k, v all 4096 -> 4096) and of a GQA
model (q 4096 -> 4096, k and v 4096 -> 1024), T tokens in {1, 16, 64, 256}, each
token drawn round-robin from `n` distinct adapters (n in {16, 64}, at most T),
rank 16, bf16. The adapters live in pool pages as the engine keeps them
(`PagedWeights.group_from_slots`: each adapter's q, k, v in one run of pages; rows of
C = 128 elements, pages of 256 KiB as a Llama-7B pool page, page ids shuffled), 512
resident, so the rotated calls below do not find their weights in L2.

Variants (`--variants`, `KernelConfig` overrides): `per_proj_k4` (one launch pair per
projection, 4 K chunks per shrink program: `main` before grouping), `per_proj` (the
same with the `default_k_steps` heuristic), `group` (one pair for q, k, v; heuristic),
`group_k4`, `group_k8`, `group_k16` (explicit K chunks per shrink program), `group_n4` (4 N
chunks per expand program), `group_w1` / `group_w4` / `group_w8` (warps per program of both
kernels; the default is 2), `group_w4_k4`, `group_one` / `per_proj_one` (shrink and expand always in one
launch; by default only calls of <= `KernelConfig.paged_one_launch_max_tokens` tokens with a rank
block <= `paged_one_launch_max_rank`),
`group_pair` / `per_proj_pair` (never in one launch).

Method (as scripts/bench_kernels.py): every variant is checked against
`lora_reference` per projection first. One jitted function chains `n_rot` = 8
`add_lora_group` calls, unrolled, the outputs carried and donated, each call on its
own x and its own adapter draw; it is dispatched `reps` times back to back and
blocked on once: per call = median over 5 trials of (t(2 reps) - t(reps)) /
(reps n_rot). A call is the LoRA of all three projections. JSON to `--out`.

    python scripts/bench_lora_group.py --out /tmp/res
    python scripts/bench_lora_group.py --smoke    # CPU check (interpret mode, tiny shapes)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_kernels import measure_ceilings, slope_time  # noqa: E402
from slora_jax.ops import (  # noqa: E402
    KernelConfig,
    PagedWeights,
    add_lora_group,
    build_lora_meta,
    lora_reference,
    random_slot_weights,
)
from slora_jax.provenance import git_commit  # noqa: E402

VARIANTS = {
    "per_proj_k4": dict(group_projections=False, paged_k_steps=4),
    "per_proj": dict(group_projections=False),
    "group": dict(),
    "group_k4": dict(paged_k_steps=4),
    "group_k8": dict(paged_k_steps=8),
    "group_k16": dict(paged_k_steps=16),
    "group_n4": dict(paged_n_steps=4),
    "group_w1": dict(paged_warps=1),
    "group_w4": dict(paged_warps=4),
    "group_w8": dict(paged_warps=8),
    "group_w4_k4": dict(paged_warps=4, paged_k_steps=4),
    "group_one": dict(paged_one_launch_max_tokens=1 << 30, paged_one_launch_max_rank=1 << 30),
    "per_proj_one": dict(group_projections=False, paged_one_launch_max_tokens=1 << 30,
                         paged_one_launch_max_rank=1 << 30),
    "group_pair": dict(paged_one_launch_max_tokens=0),
    "per_proj_pair": dict(group_projections=False, paged_one_launch_max_tokens=0),
}


@dataclasses.dataclass(frozen=True)
class Setup:
    hidden: int
    kv_width: dict  # attention -> k/v output width
    tokens: tuple
    adapters: tuple
    rank: int
    chunk: int
    page_elems: int
    resident: int
    n_rot: int


FULL = Setup(4096, {"mha": 4096, "gqa": 1024}, (1, 16, 64, 256), (16, 64), 16, 128, 131072, 512, 8)
SMOKE = Setup(128, {"mha": 128, "gqa": 64}, (1, 16), (4,), 16, 64, 4096, 8, 2)


def draw(T: int, n: int, resident: int, rng: np.random.Generator) -> np.ndarray:
    """Each token's adapter: round-robin over n distinct adapters of the resident ones, shuffled."""
    ids = rng.choice(resident, n, replace=False)
    return rng.permutation(ids[np.arange(T) % n]).astype(np.int32)


def chain(cfg: KernelConfig, n_rot: int):
    """jit: (q, k, v outputs) -> after `n_rot` chained `add_lora_group` calls (outputs donated), unrolled."""

    def run(ys, xs, ws, metas):
        for j in range(n_rot):
            ys = add_lora_group(ys, xs[j], ws, metas[j], config=cfg)
        return ys

    return jax.jit(run, donate_argnums=0)


def time_chain(fn, ys0, xs, ws, metas, n_rot: int, target_s: float = 4e-3) -> tuple[float, int]:
    state = {"ys": fn(tuple(jnp.copy(y) for y in ys0), xs, ws, metas)}

    def run(reps):
        ys = state["ys"]
        for _ in range(reps):
            ys = fn(ys, xs, ws, metas)
        state["ys"] = jax.block_until_ready(ys)

    t0 = time.perf_counter()
    run(1)
    reps = int(np.clip(target_s / max(time.perf_counter() - t0, 1e-7), 2, 500))
    return slope_time(run, reps) / n_rot, reps


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="tiny shapes, for a CPU check")
    p.add_argument("--variants", nargs="*", default=list(VARIANTS), help=f"from {list(VARIANTS)}")
    p.add_argument("--tokens", type=int, nargs="*")
    p.add_argument("--attention", nargs="*", help="of mha (Llama-7B q/k/v), gqa (k, v 4096 -> 1024); default both")
    p.add_argument("--adapters", type=int, nargs="*", help="distinct adapters per case (default 16 64)")
    p.add_argument("--out", default=os.environ.get("OUT", "benchmarks/results"))
    p.add_argument("--name", default="lora_group")
    args = p.parse_args(argv)
    st = SMOKE if args.smoke else FULL
    tokens = tuple(args.tokens or st.tokens)
    commit = git_commit()
    dev = jax.devices()[0]
    ceilings = measure_ceilings(small=args.smoke)
    print(f"device {dev.device_kind}  jax {jax.__version__}  ceilings {ceilings}", flush=True)
    result = {"benchmark": args.name, "git_commit": commit, "device": dev.device_kind, "jax_version": jax.__version__,
              "measured_ceilings": ceilings, "command": " ".join([os.path.basename(sys.argv[0]), *sys.argv[1:]]),
              "method": "per call (q, k, v LoRA) = median over 5 trials of (t(2*reps) - t(reps)) / (reps * n_rot), "
                        f"a jit of n_rot={st.n_rot} chained add_lora_group calls, outputs donated, x and adapter "
                        f"draws rotated; {st.resident} rank-{st.rank} adapters resident in pool pages (C={st.chunk})",
              "rows": []}
    os.makedirs(args.out, exist_ok=True)
    out_path = os.path.join(args.out, f"{args.name}.json")
    rng = np.random.default_rng(0)
    H, r, C = st.hidden, st.rank, st.chunk
    ranks_S = np.full(st.resident, r, np.int32)
    for attn, kv in st.kv_width.items():
        if args.attention and attn not in args.attention:
            continue
        dense = [random_slot_weights(jax.random.key(g), ranks_S, H, o, dtype=jnp.bfloat16)
                 for g, o in enumerate((H, kv, kv))]
        n_pages = st.resident * -(-r * (4 * H + 2 * kv) // C // (st.page_elems // C))  # whole pages each
        paged = PagedWeights.group_from_slots(dense, chunk=C, rows_per_page=st.page_elems // C,
                                              page_ids=rng.permutation(n_pages + n_pages // 8))
        for T in tokens:
            xs = [jax.random.normal(jax.random.key(100 + j), (T, H), jnp.bfloat16) for j in range(st.n_rot)]
            ys0 = tuple(jax.random.normal(jax.random.key(99 + g), (T, o), jnp.bfloat16)
                        for g, o in enumerate((H, kv, kv)))
            for n in sorted({min(n, T) for n in (args.adapters or st.adapters)}):
                slots = [draw(T, n, st.resident, rng) for _ in range(st.n_rot)]
                # As the engine builds it: tile bounds fixed by (T, segments), not by the draw.
                metas = jax.device_put([build_lora_meta(s, max_segments=n, static_tiles=True) for s in slots])
                want = ys0
                for j in range(st.n_rot):
                    want = tuple(lora_reference(y, xs[j], w, jnp.asarray(slots[j])) for y, w in zip(want, dense))
                line = []
                for v in args.variants:
                    cfg = KernelConfig(**VARIANTS[v])
                    row = {"case": {"attention": attn, "tokens": T, "adapters": n, "rank": r, "variant": v},
                           "n_rot": st.n_rot}
                    try:
                        fn = chain(cfg, st.n_rot)
                        got = fn(tuple(jnp.copy(y) for y in ys0), xs, paged, metas)
                        err = max(float(jnp.linalg.norm(g.astype(jnp.float32) - w.astype(jnp.float32))
                                        / jnp.linalg.norm(w.astype(jnp.float32) - y.astype(jnp.float32)))
                                  for g, w, y in zip(got, want, ys0))
                        row["rel_err"] = err
                        if not err < 2e-2:
                            row["skipped"] = f"WRONG: rel_err {err:.3g}"
                        else:
                            med, reps = time_chain(fn, ys0, xs, paged, metas, st.n_rot)
                            row.update(median_us=med * 1e6, reps=reps)
                    except Exception as e:  # noqa: BLE001 - a failing variant is a result, not a crash
                        row["skipped"] = f"error: {type(e).__name__}: {str(e)[:300]}"
                    result["rows"].append(row)
                    line.append(f"{v}={row['median_us']:.1f}" if "median_us" in row else f"{v}=skip")
                print(f"{attn} T={T:4d} adapters={n:3d}  " + "  ".join(line), flush=True)
                with open(out_path, "w") as f:
                    json.dump(result, f, indent=1)
    print(f"wrote {out_path}")


if __name__ == "__main__":
    main()

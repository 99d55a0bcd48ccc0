"""Time base projection + LoRA forms (`pallas_kernels.lora_linear`, `lora_slab`) against XLA's matmul plus the split pair.

Decode-shaped calls of Llama-7B (bf16): the attention's q, k, v (three 4096 -> 4096
projections sharing x, G = 3) and o (4096 -> 4096, G = 1); T tokens drawn from n
distinct rank-16 adapters of 512 resident in pool pages (rows of C = 128, 256 KiB
pages, shuffled page ids), the batch's adapters as the engine passes them (S = 64 rows,
the unused ones rank 0).

Variants per case:
  `xla`        x @ W per projection (XLA's GEMM): the base model alone.
  `xla_pair`   the same plus `add_lora_group` with the default `KernelConfig` (the
               engine's path: the split pair, one launch at <= 16 tokens).
  `pallas[c]`  `lora_linear_paged_group(lora=False)` with launch config c: the plain Pallas GEMM.
  `fused[c]`   `lora_linear_paged_group` with config c: base and LoRA in one launch.
  `shrink+fused[c]`  the split pair's shrink as its own launch, then the matmul launch with
               the expand riding on its K loop (`vpart`; `KernelConfig.linear_shrink_launch`).
  `xla_slab`   the drawn adapters copied (outside the timed chain, as the engine's slab holds
               them: `memory/slab.py`) into dense operands, A as `[H_in, P]` (laid out like W) and B
               as `[P, H_out]` (P = n r rounded up to 128), then plain XLA: `x @ W + mask(x @ A) @ B`,
               each token keeping only its own adapter's r columns. `xla_slab_g`: the same with
               the G projections' shrink as one dot and their expand as one batched dot.
               `xla_slab_t`: as `xla_slab` with A stored transposed, `[P, H_in]` (the pool's A^T rows).
  `slab[bn{block_n}_s{shrink k_splits}_l{linear k_splits}(_p{block_p})]` (l0: the kernel's default split) the same
               slab through `pallas_kernels.lora_slab`: the masked shrink GEMM, then the base GEMM
               with its K extended by the slab's rows; `linear[bn_l]` that GEMM alone.
  `slab_base[bn_s]`  the shrink's programs in the GEMM's launch (`linear_shrink_slab`), then the
               expand as its own launch (`slab_expand`); `slab_xla[bn_s]` XLA's matmul, then the
               slab's shrink and expand (`ops.add_lora_slab`: the LoRA alone). `slab_xshrink[bn]`
               XLA's dot for the masked shrink, then the Pallas GEMM with its K extended.
  `slab_ws[...]`, `slab_ws_base[...]`  as `slab[...]`, `slab_base[...]` with one split-K counter
               workspace shared by every call (`counters=`, as the engine's slab passes it): no
               zeroing kernel a launch. `slab_ws[bn64_s4_l0_k{block_k}_w{warps}_st{stages}]`: the
               shrink's launch with that K step, warps and pipeline stages.
Configs `c` are `bn{block_n}_bk{block_k}_s{num_stages}_w{num_warps}_u{shrink_unroll}_e{expand_unroll}_k{shrink_k_steps}`
(k0: all of H_in in one shrink program; e0: the default expand step).

Method (as scripts/bench_lora_group.py): every LoRA variant is checked against
`lora_linear_reference` first (error of the delta, relative to the delta). One jit
chains `n_rot` = 16 calls, each on its own x, its own base weights (16 layers' worth:
the weights come from HBM, not L2) and its own adapter draw; per call = median over 5
trials of (t(2 reps) - t(reps)) / (reps n_rot). The row tables are built outside the
timed chain (the engine builds them once a step for all layers); their build is timed
on its own. Floor = (base weights + the drawn adapters' A and B + x + y) bytes over the
copy bandwidth measured in the same run. `--profile` also sums each variant's kernel time from a
profiler trace (`device_us`, the top kernels): wall slopes carry the host's noise, device time does
not. JSON to `--out`.

    python scripts/bench_lora_linear.py --out DIR
    python scripts/bench_lora_linear.py --smoke     # CPU check (interpret mode, tiny shapes)
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import profiling  # noqa: E402
from bench_kernels import measure_ceilings, slope_time  # noqa: E402
from pallas_kernels.lora_linear import lora_linear_paged_group, lora_linear_reference  # noqa: E402
from pallas_kernels.lora_slab import linear_shrink_slab, linear_slab, slab_expand, slab_shrink  # noqa: E402
from pallas_kernels.sgmv_paged import sgmv_shrink_paged_group  # noqa: E402
from slora_jax.ops import (  # noqa: E402
    KernelConfig,
    PagedWeights,
    add_lora_group,
    build_lora_meta,
    paged_row_tables,
    random_slot_weights,
    slab_counters,
)
from slora_jax.provenance import git_commit  # noqa: E402


@dataclasses.dataclass(frozen=True)
class Setup:
    hidden: int
    rank: int
    chunk: int
    page_elems: int
    resident: int
    batch_adapters: int
    n_rot: int
    cases: tuple  # (group, T, n)


FULL = Setup(4096, 16, 128, 131072, 512, 64, 16,
             (("qkv", 64, 47), ("o", 64, 47), ("qkv", 64, 8), ("o", 64, 8), ("qkv", 16, 16), ("o", 16, 16),
              ("qkv", 1, 1), ("o", 1, 1)))
SMOKE = Setup(256, 16, 64, 4096, 16, 8, 2, (("qkv", 16, 5), ("o", 1, 1)))
DEFAULT = (64, 128, 3, 4, 2, 0, 0)
SWEEP = ((64, 128, 3, 4, 2, 0, 8), (64, 128, 3, 4, 4, 0, 4), (64, 128, 3, 4, 2, 8, 0), (64, 128, 3, 4, 2, 16, 0),
         (32, 128, 3, 4, 2, 0, 0), (128, 128, 3, 4, 2, 0, 0), (64, 256, 3, 4, 2, 0, 0), (64, 128, 4, 4, 2, 0, 0),
         (64, 128, 2, 4, 2, 0, 0), (64, 128, 3, 8, 2, 0, 0), (64, 128, 3, 4, 4, 0, 0), (32, 128, 3, 4, 2, 0, 8))


def cname(c) -> str:
    return "bn{}_bk{}_s{}_w{}_u{}_e{}_k{}".format(*c)


def launch(c) -> dict:
    bn, bk, st, w, u, e, k = c
    return dict(block_n=bn, block_k=bk, num_stages=st, num_warps=w, shrink_unroll=u, expand_unroll=e or None,
                shrink_k_steps=k or None)


def batch_weights(pws, ids: np.ndarray, S: int):
    """The drawn adapters as the batch's rows 0..n-1 of S (the rest rank 0), as the engine's table holds them."""
    n = len(ids)
    pad = lambda a, fill=0: jnp.concatenate([a[ids], jnp.full((S - n, *a.shape[1:]), fill, a.dtype)])  # noqa: E731
    return tuple(dataclasses.replace(pw, pages=pad(pw.pages), rank=pad(pw.rank), a_row=pad(pw.a_row),
                                     b_row=pad(pw.b_row)) for pw in pws)


def tables(bws, r_block: int):
    return paged_row_tables(bws, r_block)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="tiny shapes, for a CPU check")
    p.add_argument("--sweep", nargs="?", const="all", default="",
                   help="also time the config sweep (first two cases only): all, or indices into SWEEP (0,3)")
    p.add_argument("--cases", nargs="*", help="group:T:n, e.g. qkv:64:47 (default: the full list)")
    p.add_argument("--budget-s", type=float, default=1e9, help="stop starting cases after this many seconds")
    p.add_argument("--out", default=os.environ.get("OUT", "benchmarks/results"))
    p.add_argument("--name", default="lora_linear")
    p.add_argument("--only", default="", help="comma-separated variant names to run, `name*` a prefix (default: all)")
    p.add_argument("--hlo", action="store_true", help="also write each XLA variant's optimized HLO to --out")
    p.add_argument("--profile", action="store_true",
                   help="also sum each variant's kernel time from a profiler trace (device us a call; robust to "
                        "host noise, which the wall-clock slopes are not)")
    args = p.parse_args(argv)
    st = SMOKE if args.smoke else FULL
    t_start = time.perf_counter()
    cases = [(g, int(t), int(n)) for g, t, n in (c.split(":") for c in args.cases)] if args.cases else st.cases
    interpret = args.smoke or jax.default_backend() != "gpu"
    dev = jax.devices()[0]
    ceilings = measure_ceilings(small=args.smoke)
    print(f"device {dev.device_kind}  jax {jax.__version__}  ceilings {ceilings}", flush=True)
    result = {"benchmark": args.name, "git_commit": git_commit(), "device": dev.device_kind,
              "jax_version": jax.__version__, "measured_ceilings": ceilings,
              "command": " ".join([os.path.basename(sys.argv[0]), *sys.argv[1:]]), "rows": []}
    os.makedirs(args.out, exist_ok=True)
    out_path = os.path.join(args.out, f"{args.name}.json")
    rng = np.random.default_rng(0)
    H, r, C, S = st.hidden, st.rank, st.chunk, st.batch_adapters
    ranks_S = np.full(st.resident, r, np.int32)
    groups = {"qkv": 3, "o": 1}
    dense = {g: [random_slot_weights(jax.random.key(10 * i + j), ranks_S, H, H, dtype=jnp.bfloat16) for j in range(G)]
             for i, (g, G) in enumerate(groups.items())}
    paged = {}
    for g, ws in dense.items():
        n_pages = st.resident * -(-r * 2 * H * len(ws) // C // (st.page_elems // C))
        paged[g] = PagedWeights.group_from_slots(ws, chunk=C, rows_per_page=st.page_elems // C,
                                                 page_ids=rng.permutation(n_pages + n_pages // 8))
    base = {g: [tuple(jax.random.normal(jax.random.key(1000 + 10 * j + k), (H, H), jnp.bfloat16) * 0.02
                      for k in range(G)) for j in range(st.n_rot)] for g, G in groups.items()}
    kcfg = KernelConfig(interpret=interpret)
    r_block = 16
    print(f"{'case':<14}{'variant':<28}{'us':>9}{'floor':>8}{'ratio':>7}{'err':>9}"
          + (f"{'dev us':>9}{'kernels':>8}" if args.profile else ""), flush=True)
    for group, T, n in cases:
        if time.perf_counter() - t_start > args.budget_s:
            print(f"budget spent: {group}:{T}:{n} and later cases not run", flush=True)
            break
        G = groups[group]
        xs = [jax.random.normal(jax.random.key(100 + j), (T, H), jnp.bfloat16) for j in range(st.n_rot)]
        draws, metas, bwss, tabs, draw_ids = [], [], [], [], []
        for _ in range(st.n_rot):
            ids = rng.choice(st.resident, n, replace=False)
            draw_ids.append(ids)
            slot_T = rng.permutation(np.arange(T) % n).astype(np.int32)
            draws.append(jnp.asarray(slot_T))
            # on the device: numpy leaves would be copied to the GPU at every call of the timed chain
            metas.append(jax.device_put(build_lora_meta(slot_T, max_segments=min(T, S), static_tiles=True)))
            bwss.append(batch_weights(paged[group], ids, S))
            tabs.append(tables(bwss[-1], r_block))
        build = jax.jit(lambda bwss: [tables(bws, r_block) for bws in bwss])  # one build per call's adapters
        jax.block_until_ready(build(bwss))
        table_us = slope_time(lambda k: jax.block_until_ready([build(bwss) for _ in range(k)]), 8) / st.n_rot * 1e6
        rows = bwss[0][0].rows
        floor_bytes = (G * H * H + n * G * r * 2 * H + T * H + G * T * H) * 2
        floor_us = floor_bytes / (ceilings["copy_GBps"] * 1e9) * 1e6
        stack = lambda bws, f: jnp.stack([getattr(w, f) for w in bws])  # noqa: E731
        want = [lora_linear_reference(xs[j], base[group][j], rows, bwss[j][0].pages, stack(bwss[j], "rank"),
                                      stack(bwss[j], "a_row"), stack(bwss[j], "b_row"), draws[j],
                                      rows_per_page=bwss[j][0].rows_per_page, r_max=r_block) for j in range(1)]
        no_lora = lora_linear_reference(xs[0], base[group][0], rows, bwss[0][0].pages,
                                        jnp.zeros_like(stack(bwss[0], "rank")), stack(bwss[0], "a_row"),
                                        stack(bwss[0], "b_row"), draws[0], rows_per_page=bwss[0][0].rows_per_page,
                                        r_max=r_block)

        # Each call's inputs as a flat tuple of arrays (few jit arguments: dispatch must not time the host).
        def lean(j, lora_meta):
            m, bws = metas[j], bwss[j]
            common = (xs[j], base[group][j], draws[j])
            if lora_meta == "slab":
                return common + slabs[j]
            if lora_meta == "slab_ws":  # and the one counter workspace every call shares (as the engine's slab)
                return common + slabs[j] + (counters,)
            if lora_meta == "slab_t":
                return common + (jnp.swapaxes(slabs[j][0], 1, 2), slabs[j][1])
            if lora_meta == "pair":
                return common + (bws[0].pages, stack(bws, "rank"), stack(bws, "a_row"), stack(bws, "b_row"), m)
            return common + (tabs[j], stack(bws, "rank"), m.perm, m.tile_start, m.tile_end, m.tile_slot, bws[0].pages,
                             stack(bws, "a_row"))

        def op_xla(rows, args, lora):
            x, Ws, slot = args[:3]
            ys = tuple(jnp.dot(x, W) for W in Ws)  # as the model computes a projection
            if not lora:
                return ys
            pages, rank, a_row, b_row, meta = args[3:]
            bws = tuple(PagedWeights(rows, pages, rank[g], a_row[g], b_row[g], bwss[0][0].rows_per_page, H, H, r_block)
                        for g in range(G))
            return add_lora_group(ys, x, bws, meta, config=kcfg)

        def op_pallas(rows, args, lora, c, shrink_launch=False):
            x, Ws, slot, tab, rank, perm, ts, te, tsl, pages, a_row = args
            vpart = None
            if shrink_launch:  # the split pair's shrink (default launch) first, its partials passed in
                vpart = sgmv_shrink_paged_group(x, rows, pages, rank, a_row, perm, ts, te, tsl,
                                                rows_per_page=bwss[0][0].rows_per_page, r_block=r_block,
                                                block_m=metas[0].block_m, active_tiles=metas[0].active_tiles,
                                                num_warps=kcfg.paged_warps, interpret=interpret)
            return lora_linear_paged_group(x, Ws, rows, rank, *tab, slot, perm, ts, te, tsl, None, vpart,
                                           block_m=metas[0].block_m, lora=lora, interpret=interpret, **launch(c))

        def slab_mask(slot, P):
            return (jnp.arange(P)[None, :] // r) == slot[:, None]  # [T, P]: the token's own r columns

        def op_xla_slab(rows, args):
            """Per projection: `x @ W + mask(x @ A) @ B`, A `[H_in, P]` like W."""
            x, Ws, slot, a_slab, b_slab = args
            keep_TxP = slab_mask(slot, a_slab.shape[-1])
            out = []
            for g, W in enumerate(Ws):
                v_TxP = jnp.einsum("ti,ip->tp", x, a_slab[g], preferred_element_type=jnp.float32)
                v_TxP = jnp.where(keep_TxP, v_TxP, 0.0).astype(x.dtype)
                d_TxO = jnp.einsum("tp,po->to", v_TxP, b_slab[g], preferred_element_type=jnp.float32)
                out.append((jnp.dot(x, W, preferred_element_type=jnp.float32) + d_TxO).astype(x.dtype))
            return tuple(out)

        def op_xla_slab_t(rows, args):
            x, Ws, slot, a_slab, b_slab = args
            return op_xla_slab(rows, (x, Ws, slot, jnp.swapaxes(a_slab, 1, 2), b_slab))

        def op_xla_slab_g(rows, args):
            """The G projections' LoRA as two dots: one shrink `[T, G P]`, one batched expand."""
            x, Ws, slot, a_slab, b_slab = args
            keep_TxP = slab_mask(slot, a_slab.shape[-1])
            v_GxTxP = jnp.einsum("ti,gip->gtp", x, a_slab, preferred_element_type=jnp.float32)
            v_GxTxP = jnp.where(keep_TxP[None], v_GxTxP, 0.0).astype(x.dtype)
            d_GxTxO = jnp.einsum("gtp,gpo->gto", v_GxTxP, b_slab, preferred_element_type=jnp.float32)
            return tuple((jnp.dot(x, W, preferred_element_type=jnp.float32) + d_GxTxO[g]).astype(x.dtype)
                         for g, W in enumerate(Ws))

        P = -(-n * r // 128) * 128
        slabs = []
        for j in range(st.n_rot):
            ids_j = jnp.asarray(draw_ids[j])
            a_ = jnp.stack([jnp.pad(dense[group][g].a[ids_j].transpose(1, 0, 2).reshape(H, n * r),
                                    ((0, 0), (0, P - n * r))) for g in range(G)])
            b_ = jnp.stack([jnp.pad(dense[group][g].b[ids_j].reshape(n * r, H), ((0, P - n * r), (0, 0)))
                            for g in range(G)])
            slabs.append((a_, b_))

        counters = slab_counters()

        def op_slab_pallas(rows, args, bn, lora=True, sk=4, lk=None, mode="ext", bp=64, shrink_launch=None):
            x, Ws, slot, a_slab, b_slab = args[:5]
            ws = {"counters": args[5]} if len(args) > 5 else {}
            if not lora:
                return linear_slab(x, Ws, None, None, None, block_n=bn, k_splits=lk, interpret=interpret)
            lo = jnp.where(slot >= 0, slot * r, 0).astype(jnp.int32)
            lo_GxT = jnp.broadcast_to(lo, (G, T))
            hi_GxT = lo_GxT + r * (slot >= 0)
            if mode == "base":  # the shrink's programs beside the GEMM's, then the expand
                ys, v = linear_shrink_slab(x, Ws, a_slab, lo_GxT, hi_GxT, n * r, block_n=bn, k_splits=lk,
                                           shrink_splits=sk, interpret=interpret, **ws)
                return slab_expand(ys, v, b_slab, n * r, block_n=bn, interpret=interpret, **ws)
            if mode == "xshrink":  # XLA's dot for the shrink (masked by lo/hi), then the Pallas GEMM
                v = jnp.einsum("ti,gip->gtp", x, a_slab, preferred_element_type=jnp.float32)
                c = jnp.arange(a_slab.shape[-1])[None, None, :]
                v = jnp.where((c >= lo_GxT[:, :, None]) & (c < hi_GxT[:, :, None]), v, 0.0).astype(x.dtype)
                return linear_slab(x, Ws, v, b_slab, n * r, block_n=bn, k_splits=lk, block_p=bp, interpret=interpret)
            v = slab_shrink(x, a_slab, lo_GxT, hi_GxT, n * r, k_splits=sk, block_p=bp, interpret=interpret, **ws,
                            **(shrink_launch or {}))
            if mode == "xla":  # XLA's matmul, then the slab's expand accumulating into it
                return slab_expand(tuple(jnp.dot(x, W) for W in Ws), v, b_slab, n * r, block_n=bn,
                                   interpret=interpret)
            return linear_slab(x, Ws, v, b_slab, n * r, block_n=bn, k_splits=lk, block_p=bp, interpret=interpret,
                               **ws)

        variants = [("xla", functools.partial(op_xla, lora=False), False, "pair"),
                    ("xla_pair", functools.partial(op_xla, lora=True), True, "pair"),
                    ("xla_slab", op_xla_slab, True, "slab"), ("xla_slab_g", op_xla_slab_g, True, "slab"),
                    ("xla_slab_t", op_xla_slab_t, True, "slab_t")]
        for bn, lk in ((64, None), (64, 1), (32, None)):
            variants.append((f"linear[bn{bn}_l{lk or 0}]", functools.partial(op_slab_pallas, bn=bn, lora=False, lk=lk),
                             False, "slab"))
        for bn, sk, lk in ((64, 4, None), (64, 1, None), (64, 8, None), (64, 16, None), (64, 4, 1), (32, 4, None)):
            variants.append((f"slab[bn{bn}_s{sk}_l{lk or 0}]",
                             functools.partial(op_slab_pallas, bn=bn, sk=sk, lk=lk), True, "slab"))
        for sk in (4, 8):  # 32 slab columns a shrink program: twice the programs (o has 12 blocks of 64)
            variants.append((f"slab[bn64_s{sk}_l0_p32]", functools.partial(op_slab_pallas, bn=64, sk=sk, bp=32), True,
                             "slab"))
        for sk in (4, 8, 16):  # 128 slab columns a shrink program: x read by half as many column blocks
            variants.append((f"slab[bn64_s{sk}_l0_p128]", functools.partial(op_slab_pallas, bn=64, sk=sk, bp=128), True,
                             "slab"))
        for bk, w, ns in ((256, 4, 3), (64, 4, 3), (128, 8, 3), (128, 2, 3), (128, 4, 2), (128, 4, 4)):
            variants.append((f"slab_ws[bn64_s4_l0_k{bk}_w{w}_st{ns}]",
                             functools.partial(op_slab_pallas, bn=64, shrink_launch=dict(block_k=bk, num_warps=w,
                                                                                         num_stages=ns)),
                             True, "slab_ws"))
        variants.append(("slab_ws[bn64_s4_l0]", functools.partial(op_slab_pallas, bn=64), True, "slab_ws"))
        variants.append(("slab_ws_base[bn64_s4]", functools.partial(op_slab_pallas, bn=64, mode="base"), True,
                         "slab_ws"))
        variants.append(("slab_xshrink[bn64]", functools.partial(op_slab_pallas, bn=64, mode="xshrink"), True, "slab"))
        for mode in ("base", "xla"):
            for sk in (4, 1):
                variants.append((f"slab_{mode}[bn64_s{sk}]", functools.partial(op_slab_pallas, bn=64, sk=sk, mode=mode),
                                 True, "slab"))
        sweep = [SWEEP[i] for i in map(int, args.sweep.split(","))] if args.sweep not in ("", "all") else list(SWEEP)
        configs = [DEFAULT] + (sweep if args.sweep and (group, T, n) in cases[:2] else [])
        for c in configs:
            if c == DEFAULT or c[:4] != DEFAULT[:4]:  # the plain GEMM only where its launch differs
                variants.append((f"pallas[{cname(c)}]", functools.partial(op_pallas, lora=False, c=c), False, "tab"))
            variants.append((f"fused[{cname(c)}]", functools.partial(op_pallas, lora=True, c=c), True, "tab"))
            variants.append((f"shrink+fused[{cname(c)}]", functools.partial(op_pallas, lora=True, c=c,
                                                                           shrink_launch=True), True, "tab"))
        if args.only:
            picked = args.only.split(",")
            variants = [v for v in variants
                        if any(v[0].startswith(o[:-1]) if o.endswith("*") else v[0] == o for o in picked)]
        for name, op, lora, form in variants:
            row = {"case": {"group": group, "tokens": T, "adapters": n, "rank": r, "variant": name},
                   "floor_us": floor_us, "table_build_us": table_us}
            try:
                calls = [lean(j, form) for j in range(st.n_rot)]
                got = jax.jit(op)(rows, calls[0])
                if args.hlo and name.startswith("xla"):
                    with open(os.path.join(args.out, f"hlo_{group}_{T}_{n}_{name}.txt"), "w") as f:
                        f.write(jax.jit(op).lower(rows, calls[0]).compile().as_text())
                ref = want[0] if lora else no_lora
                f32 = lambda a: a.astype(jnp.float32)  # noqa: E731
                errs = []
                for o, w_, b_ in zip(got, ref, no_lora):
                    scale = jnp.linalg.norm(f32(w_) - f32(b_)) if lora else jnp.linalg.norm(f32(w_))
                    errs.append(float(jnp.linalg.norm(f32(o) - f32(w_)) / scale))
                row["rel_err"] = max(errs)
                chain = jax.jit(lambda rows, calls, op=op: [op(rows, a) for a in calls])
                jax.block_until_ready(chain(rows, calls))
                t0 = time.perf_counter()
                jax.block_until_ready(chain(rows, calls))
                reps = int(np.clip(25e-3 / max(time.perf_counter() - t0, 1e-7), 2, 200))  # ~25 ms a slope
                us = slope_time(lambda k: jax.block_until_ready([chain(rows, calls) for _ in range(k)]), reps)
                us = us / st.n_rot * 1e6
                row.update(median_us=us, floor_ratio=floor_us / us, reps=reps)
                if args.profile:
                    prof = profiling.gpu_kernels(lambda: jax.block_until_ready([chain(rows, calls) for _ in range(4)]))
                    if prof:
                        summ = profiling.summarize(prof, top=6)
                        row["device_us"] = summ["device_us_total"] / (4 * st.n_rot)
                        row["kernels_a_call"] = summ["kernels"] / (4 * st.n_rot)
                        row["top_kernels"] = [dict(k, us=k["us"] / (4 * st.n_rot), calls=k["calls"] / (4 * st.n_rot))
                                              for k in summ["top"]]
            except Exception as e:  # noqa: BLE001 - one failing variant must not lose the others' rows
                row["error"] = f"{type(e).__name__}: {str(e)[:400]}"
            result["rows"].append(row)
            print(f"{group + ':' + str(T) + ':' + str(n):<14}{name:<28}{row.get('median_us', float('nan')):9.2f}"
                  f"{floor_us:8.2f}{row.get('floor_ratio', float('nan')):7.2f}{row.get('rel_err', float('nan')):9.1e}"
                  + (f"{row.get('device_us', float('nan')):9.2f}{row.get('kernels_a_call', float('nan')):8.1f}"
                     if args.profile else "")
                  + (f"  {row['error'][:120]}" if "error" in row else ""), flush=True)
            with open(out_path, "w") as f:
                json.dump(result, f, indent=1)
        print(f"{'':<14}table build (both tables, once a step): {table_us:.1f} us", flush=True)
    print(f"wrote {out_path}")


if __name__ == "__main__":
    main()

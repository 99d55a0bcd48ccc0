"""Benchmark the gathered-LoRA implementations (`slora_jax.ops.add_lora`, every `impl=`) on a GPU.

Grid (issue 3): tokens x projection x rank case x popularity x impl, with 1000
adapters resident in dense stacked slots (bf16). Each row: median time of the
full op (shrink + expand, y updated), the HBM floor, the floor ratio and the
speedup against every other impl of the same case. JSON as in
`shared/BENCHMARKS.md` goes to `--out` (default `$OUT`, else `benchmarks/results`).

Method: every impl is checked against `lora_reference` (fresh random inputs) before
it is timed. One jitted function chains `n_rot` calls, unrolled (y carried and
donated; no device-side loop, whose per-iteration host sync would land in small
rows), each call on its own x buffer and its own slot draw from the 1000 resident
adapters, so consecutive calls do not find their inputs in L2; `n_rot` grows until
the rotated working set is >= 120 MB (at least 8, at most 32). Timing dispatches
it `reps` times back to back (asynchronous; a chain takes longer on the device
than a dispatch on the host) and blocks once: per call = (t(2 reps) - t(reps)) /
(reps n_rot), which cancels the fixed sync cost; the median of 5 such differences
is reported. Weights: 1000 adapters in dense slots, and for `pallas_paged` the same
adapters packed into pool pages (`PagedWeights.from_slots`, rows `chunk` wide
(KernelConfig.chunk, default 64), pages of 256 KiB as a Llama-7B pool page, page
ids shuffled).
Floor = max(bytes / copy bandwidth, flops / bf16 matmul rate), both ceilings
measured in this run; bytes = x read + the used adapters' A and B (at their own
rank) read once + y read and written. `--budget-s` stops starting new cases
(the JSON is rewritten after every case, so a cut-off run keeps what it did).
Impls take KernelConfig overrides for variants: 'pallas[k_splits=2,expand_block_n=256]'.

    python scripts/bench_kernels.py --quick
    python scripts/bench_kernels.py --budget-s 420 --out /tmp/res
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from slora_jax.ops import (  # noqa: E402
    IMPLS,
    KernelConfig,
    PagedWeights,
    add_lora,
    build_lora_meta,
    lora_reference,
    random_slot_weights,
)

try:
    from tqdm import tqdm
except ImportError:  # the bench runs without a progress bar
    tqdm = None

N_SLOTS = 1000
TOKENS = (1, 8, 32, 64, 256, 1024, 4096)
PROJS = ((4096, 4096), (4096, 11008), (11008, 4096), (4096, 1024))
RANK_CASES = ("8", "16", "64", "128", "mixed")
MIXED_RANKS = (8, 16, 64, 128)
POPS = ("distinct", "uniform", "skewed", "identical")
BASELINES = tuple(i for i in IMPLS if i != "pallas")
MAX_INTERMEDIATE_BYTES = 8e9  # baselines that would materialize more are skipped (and say so)
MAX_LOOP_SEGMENTS = 64  # `loop` unrolls one matmul pair per segment at trace time


# ----------------------------------------------------------------------------- workload


def slot_draw(pop: str, T: int, rng: np.random.Generator) -> np.ndarray:
    """Adapter slot per row for a Punica popularity, rows shuffled (all rows use an adapter)."""
    if pop == "distinct":  # every row its own adapter (rows beyond 1000 reuse them)
        s = rng.permutation(N_SLOTS)[np.arange(T) % N_SLOTS]
    elif pop == "uniform":  # ceil(sqrt(T)) equal groups
        g = math.ceil(math.sqrt(T))
        s = rng.choice(N_SLOTS, g, replace=False)[np.arange(T) % g]
    elif pop == "skewed":  # group sizes growing by 1.5x (Zipf-like)
        sizes, size = [], 1.0
        while sum(sizes) < T:
            sizes.append(max(1, round(size)))
            size *= 1.5
        sizes[-1] -= sum(sizes) - T
        ids = rng.choice(N_SLOTS, len(sizes), replace=False)
        s = np.repeat(ids, sizes)
    elif pop == "identical":
        s = np.full(T, rng.integers(N_SLOTS))
    else:
        raise ValueError(pop)
    return rng.permutation(s).astype(np.int32)


def slot_ranks(rank_case: str) -> np.ndarray:
    if rank_case == "mixed":
        return np.array([MIXED_RANKS[s % len(MIXED_RANKS)] for s in range(N_SLOTS)], np.int32)
    return np.full(N_SLOTS, int(rank_case), np.int32)


def lora_bytes_flops(slot_T, ranks_S, T, h_in, h_out, itemsize=2):
    used = np.unique(slot_T[slot_T >= 0])
    w_bytes = int(ranks_S[used].sum()) * (h_in + h_out) * itemsize
    bytes_ = T * h_in * itemsize + w_bytes + 2 * T * h_out * itemsize
    r_T = ranks_S[np.maximum(slot_T, 0)] * (slot_T >= 0)
    flops = 2 * int(r_T.sum()) * (h_in + h_out)
    return bytes_, flops


# ----------------------------------------------------------------------------- impl specs


def parse_impl(spec: str):
    """'pallas', 'pallas_paged' or 'pallas[fused=0,k_splits=4]' -> (impl, KernelConfig, paged); baselines as is."""
    name, _, rest = spec.partition("[")
    paged = name == "pallas_paged"
    name = "pallas" if paged else name
    if name not in IMPLS:
        raise ValueError(f"unknown impl {spec!r}; choose from {IMPLS} and pallas_paged")
    if name != "pallas":
        return name, None, False
    kw = {}
    for item in filter(None, rest.rstrip("]").split(",")):
        k, v = item.split("=")
        kw[k] = None if v == "None" else int(v)
    return name, KernelConfig(**kw), paged


PAGED_CACHE = {}


def paged_weights(key, w, chunk: int):
    """The resident adapters of `key` packed into pool pages of Llama-7B's size (256 KiB a layer), rows
    `chunk` wide (cached: one packing per weight set)."""
    if (key, chunk) not in PAGED_CACHE:
        PAGED_CACHE.clear()
        h_in, h_out = w.a.shape[1], w.b.shape[2]
        rpp = 131072 // chunk
        need = int(np.maximum(1, -(-(h_in + h_out) // chunk * np.asarray(w.ranks) // rpp)).sum())
        PAGED_CACHE[key, chunk] = PagedWeights.from_slots(  # page ids shuffled, 1/8 of the pages unused
            w, chunk=chunk, rows_per_page=rpp, page_ids=np.random.default_rng(1).permutation(need + need // 8))
    return PAGED_CACHE[key, chunk]


def skip_reason(name, T, h_in, h_out, R, n_segments, n_tiles):
    if name in ("gather_bmm", "reference") and T * (h_in + h_out) * R * 2 > MAX_INTERMEDIATE_BYTES:
        return "gathered per-token weights exceed 8 GB"
    if name == "padded_bmm" and n_tiles * (h_in + h_out) * R * 2 > MAX_INTERMEDIATE_BYTES:
        return "gathered per-tile weights exceed 8 GB"
    if name == "onehot" and T * N_SLOTS * R * 4 > MAX_INTERMEDIATE_BYTES:
        return "[T, S, R] intermediate exceeds 8 GB"
    if name == "loop" and n_segments > MAX_LOOP_SEGMENTS:
        return f"more than {MAX_LOOP_SEGMENTS} segments to unroll"
    return None


# ----------------------------------------------------------------------------- measurement


def slope_time(run, reps: int, trials: int = 5) -> float:
    """Seconds per rep of `run(reps)` (which blocks): median over trials of (t(2r) - t(r)) / r.

    The difference cancels the fixed cost of one dispatch, the loop set-up and the sync.
    """
    ts = []
    for _ in range(trials):
        t0 = time.perf_counter()
        run(reps)
        t1 = time.perf_counter()
        run(2 * reps)
        t2 = time.perf_counter()
        ts.append(((t2 - t1) - (t1 - t0)) / reps)
    med = float(np.median(ts))
    return med if med > 0 else (t2 - t1) / (2 * reps)  # noise swamped the difference: an upper bound


def measure_ceilings(small: bool = False):
    n_el = (4 if small else 256) * 1024 * 1024  # 512 MiB of bf16 on the GPU
    copy = jax.jit(lambda a, r: jax.lax.fori_loop(0, r, lambda _, a: a + 1, a), donate_argnums=0)
    state = {"x": jnp.ones((n_el,), jnp.bfloat16)}

    def run_copy(r):
        state["x"] = copy(state["x"], jnp.int32(r))
        state["x"].block_until_ready()

    run_copy(1)
    copy_GBps = 2 * n_el * 2 / slope_time(run_copy, 4) / 1e9
    n = 512 if small else 8192
    k1, k2 = jax.random.split(jax.random.key(0))
    a = jax.random.normal(k1, (n, n), jnp.bfloat16)
    b = jax.random.normal(k2, (n, n), jnp.bfloat16)
    mm = jax.jit(lambda a, b, r: jax.lax.fori_loop(0, r, lambda _, c: (c @ b) * (1.0 / math.sqrt(n)), a))

    def run_mm(r):
        mm(a, b, jnp.int32(r)).block_until_ready()

    run_mm(1)
    tflops = 2 * n**3 / slope_time(run_mm, 4) / 1e12
    del state, a, b
    return {"copy_GBps": round(copy_GBps, 1), "bf16_TFLOPs": round(tflops, 1)}


@jax.jit
def chunked_reference(y_TxO, x_TxI, w, slot_T):
    """`lora_reference` over chunks of <= 128 tokens (its per-token weight gather would not fit at T=4096)."""
    T = y_TxO.shape[0]
    c = math.gcd(T, 128)
    out = jax.lax.map(lambda a: lora_reference(a[0], a[1], w, a[2]),
                      (y_TxO.reshape(T // c, c, -1), x_TxI.reshape(T // c, c, -1), slot_T.reshape(T // c, c)))
    return out.reshape(y_TxO.shape)


def make_chain_fn(name, cfg, n_rot, static_metas=None):
    """jit: y -> y after `n_rot` chained add_lora calls (y donated), unrolled: no device loop."""

    def run(y, xs, w, metas):
        ms = static_metas if static_metas is not None else metas
        for j in range(n_rot):
            y = add_lora(y, xs[j], w, ms[j], impl=name, config=cfg)
        return y

    return jax.jit(run, donate_argnums=0)


def time_fn(fn, y0, xs, w, metas, n_rot, target_s=4e-3):
    """Median seconds per add_lora call (slope over the number of dispatches; see module doc)."""
    state = {"y": fn(jnp.copy(y0), xs, w, metas)}

    def run(reps):
        y = state["y"]
        for _ in range(reps):
            y = fn(y, xs, w, metas)
        state["y"] = y.block_until_ready()

    t0 = time.perf_counter()
    run(1)
    guess = (time.perf_counter() - t0) / n_rot  # an upper bound: includes the fixed costs
    reps = int(np.clip(target_s / max(guess * n_rot, 1e-7), 2, 500))
    return slope_time(run, reps) / n_rot, reps


# ----------------------------------------------------------------------------- main


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small subset of the grid")
    p.add_argument("--tokens", type=int, nargs="*")
    p.add_argument("--projs", nargs="*", help="e.g. 4096x4096")
    p.add_argument("--ranks", nargs="*", help=f"from {RANK_CASES}")
    p.add_argument("--pops", nargs="*", help=f"from {POPS}")
    p.add_argument("--impls", nargs="*", help="pallas, pallas[k=v,...] (KernelConfig fields), baselines")
    p.add_argument("--budget-s", type=float, default=1e9, help="start no new case after this many seconds")
    p.add_argument("--out", default=os.environ.get("OUT", "benchmarks/results"))
    p.add_argument("--name", default="lora_kernels")
    p.add_argument("--git-commit", default=None)
    args = p.parse_args(argv)

    if args.quick:
        tokens, projs = (1, 64, 256, 4096), ((4096, 4096), (4096, 11008))
        rank_cases, pops = ("16", "mixed"), ("distinct", "uniform", "identical")
    else:
        tokens, projs, rank_cases, pops = TOKENS, PROJS, RANK_CASES, POPS
    tokens = tuple(args.tokens or tokens)
    projs = tuple(tuple(int(v) for v in s.split("x")) for s in args.projs) if args.projs else projs
    rank_cases = tuple(args.ranks or rank_cases)
    pops = tuple(args.pops or pops)
    impl_labels = args.impls or ["pallas", "pallas_paged", *BASELINES]
    impls = [parse_impl(s) for s in impl_labels]

    t_start = time.perf_counter()
    commit = args.git_commit
    if commit is None:
        try:
            commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                                    check=True).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            commit = "unknown"
    dev = jax.devices()[0]
    ceilings = measure_ceilings(small=jax.default_backend() == "cpu")
    bw = ceilings["copy_GBps"] * 1e9
    rate = ceilings["bf16_TFLOPs"] * 1e12
    print(f"device {dev.device_kind}  jax {jax.__version__}  ceilings {ceilings}", flush=True)
    result = {"benchmark": args.name, "git_commit": commit, "device": dev.device_kind,
              "jax_version": jax.__version__, "measured_ceilings": ceilings,
              "command": " ".join([os.path.basename(sys.argv[0]), *sys.argv[1:]]),
              "method": "per call = median over 5 trials of (t(2*reps) - t(reps)) / (reps * n_rot), each a "
                        "jitted fori_loop of n_rot chained add_lora calls with y donated; x and slot "
                        "draws rotated over n_rot buffers (>= 120 MB working set, <= 16); bf16 weights, "
                        "1000 slots resident",
              "rows": []}
    os.makedirs(args.out, exist_ok=True)
    out_path = os.path.join(args.out, f"{args.name}.json")

    cases = [(pr, rc, T) for pr in projs for rc in rank_cases for T in tokens]
    n_total = len(cases) * len(pops)
    bar = tqdm(total=n_total, file=sys.stdout, mininterval=5) if tqdm else None
    done = 0
    rng = np.random.default_rng(0)
    w_cache = {}
    for (h_in, h_out), rc, T in cases:
        if time.perf_counter() - t_start > args.budget_s:
            print(f"budget reached: {done}/{n_total} cases done", flush=True)
            break
        key = (h_in, h_out, rc)
        if key not in w_cache:
            w_cache.clear()
            ranks_S = slot_ranks(rc)
            w_cache[key] = (ranks_S, random_slot_weights(jax.random.key(len(w_cache) + h_in + h_out), ranks_S,
                                                         h_in, h_out, dtype=jnp.bfloat16))
        ranks_S, w = w_cache[key]
        R = w.a.shape[-1]
        G = min(T, N_SLOTS)
        ident = slot_draw("identical", T, rng)
        ws_min = lora_bytes_flops(ident, ranks_S, T, h_in, h_out)[0]
        n_rot = int(np.clip(math.ceil(120e6 / ws_min), 8, 32))
        xs = [jax.random.normal(jax.random.key(100 + j), (T, h_in), jnp.bfloat16) for j in range(n_rot)]
        y0 = jax.random.normal(jax.random.key(99), (T, h_out), jnp.bfloat16)
        compiled = {}
        for pop in pops:
            if time.perf_counter() - t_start > args.budget_s:
                break
            slots = [slot_draw(pop, T, rng) for _ in range(n_rot)]
            metas = [build_lora_meta(s, max_segments=G) for s in slots]  # block_m from the layout
            metas_dev = jax.device_put(metas)  # on the device once, not with every dispatch
            bf = [lora_bytes_flops(s, ranks_S, T, h_in, h_out) for s in slots]
            bytes_, flops = np.mean([b for b, _ in bf]), np.mean([f for _, f in bf])
            floor_s = max(bytes_ / bw, flops / rate)
            n_seg = max(int(m.num_segments) for m in metas)
            n_tiles = len(metas[0].tile_slot)
            # reference chain (fp32 accumulation inside each call; same chain of n_rot calls)
            y_ref = y0
            for j in range(n_rot):
                y_ref = chunked_reference(y_ref, xs[j], w, jnp.asarray(slots[j]))
            d_ref = y_ref.astype(jnp.float32) - y0.astype(jnp.float32)
            case_rows = []
            for label, (name, cfg, paged) in zip(impl_labels, impls):
                case = {"tokens": T, "h_in": h_in, "h_out": h_out, "rank": rc, "popularity": pop,
                        "impl": label}
                row = {"case": case, "floor_us": floor_s * 1e6, "bytes": int(bytes_), "flops": int(flops),
                       "segments": n_seg, "n_rot": n_rot}
                reason = skip_reason(name, T, h_in, h_out, R, n_seg, n_tiles)
                if reason:
                    row["skipped"] = reason
                    case_rows.append(row)
                    continue
                try:
                    if name == "loop":
                        fn = make_chain_fn(name, cfg, n_rot, static_metas=metas)
                    else:
                        fn = compiled.get(label) or make_chain_fn(name, cfg, n_rot)
                        compiled[label] = fn
                    w_used = paged_weights(key, w, cfg.chunk) if paged else w
                    y1 = fn(jnp.copy(y0), xs, w_used, metas_dev)
                    err = float(jnp.linalg.norm(y1.astype(jnp.float32) - y_ref.astype(jnp.float32))
                                / jnp.linalg.norm(d_ref))
                    row["rel_err"] = err
                    if not err < 2e-2:
                        row["skipped"] = f"WRONG: rel_err {err:.3g}"
                        case_rows.append(row)
                        continue
                    med, reps = time_fn(fn, y0, xs, w_used, metas_dev, n_rot)
                    row.update(median_us=med * 1e6, floor_ratio=floor_s / med, reps=reps)
                except Exception as e:  # noqa: BLE001 - a failing impl is a result, not a crash
                    row["skipped"] = f"error: {type(e).__name__}: {str(e)[:300]}"
                case_rows.append(row)
            timed = {r["case"]["impl"]: r["median_us"] for r in case_rows if "median_us" in r}
            for r in case_rows:
                if "median_us" in r:
                    r["vs"] = {k: v / r["median_us"] for k, v in timed.items() if k != r["case"]["impl"]}
            result["rows"].extend(case_rows)
            done += 1
            if bar:
                bar.update(1)
            line = "  ".join(f"{r['case']['impl']}={r['median_us']:.1f}" if "median_us" in r
                             else f"{r['case']['impl']}=skip" for r in case_rows)
            print(f"T={T:5d} {h_in}x{h_out} r={rc:5s} {pop:9s} floor={floor_s*1e6:8.1f}us  {line}", flush=True)
            with open(out_path, "w") as f:
                json.dump(result, f, indent=1)
        del xs, y0
    if bar:
        bar.close()
    result["cases_done"] = done
    result["cases_planned"] = n_total
    result["wall_s"] = time.perf_counter() - t_start
    with open(out_path, "w") as f:
        json.dump(result, f, indent=1)
    print_summary(result)
    print(f"wrote {out_path}")


def print_summary(result):
    rows = [r for r in result["rows"] if "median_us" in r]
    by_case = {}
    for r in rows:
        c = r["case"]
        by_case.setdefault((c["tokens"], c["h_in"], c["h_out"], c["rank"], c["popularity"]), {})[c["impl"]] = r
    print(f"\n{'T':>5} {'proj':>10} {'rank':>5} {'pop':>9} {'floor':>7} {'pallas':>8} {'ratio':>6} "
          f"{'paged':>8} {'ratio':>6} {'best base':>18} {'speedup':>7}")
    for (T, hi, ho, rc, pop), d in by_case.items():
        p = d.get("pallas")
        q = d.get("pallas_paged")
        base = {k: v for k, v in d.items() if not k.startswith("pallas")}
        best = min(base.items(), key=lambda kv: kv[1]["median_us"]) if base else None
        ptxt = f"{p['median_us']:8.1f} {p['floor_ratio']:6.2f}" if p else f"{'-':>8} {'-':>6}"
        btxt = f"{best[0]:>10}={best[1]['median_us']:7.1f}" if best else f"{'-':>18}"
        sp = f"{best[1]['median_us'] / p['median_us']:7.2f}" if (p and best) else f"{'-':>7}"
        qtxt = f"{q['median_us']:8.1f} {q['floor_ratio']:6.2f}" if q else f"{'-':>8} {'-':>6}"
        print(f"{T:5d} {hi:>5}x{ho:<5} {rc:>5} {pop:>9} {p['floor_us'] if p else 0:7.1f} {ptxt} {qtxt} {btxt} {sp}")


if __name__ == "__main__":
    main()

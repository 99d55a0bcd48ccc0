"""Fit decode-size LoRA kernel device times to what the compiled code says, and predict untimed variants.

    python scripts/kernel_time_model.py --fit STATIC.json:PROFILE.json [...] \\
        [--check STATIC.json:PROFILE.json ...] [--predict STATIC.json ...] [--max-tokens 8] [--out FILE]

STATIC.json is `kernel_resources.py` rows (CPU compile: SASS waits, spills, grid) and PROFILE.json is a
`bench_kernels.py --profile` run of the same cases on a GPU (each row's `profile.top_kernels`: device µs
per kernel). Rows are joined on the case and the kernel's name. The model is a least-squares line

    device µs = c0 + c_wait * sass_waits + c_bytes * weight_bytes / 4 TB/s

- `sass_waits` (`kernel_resources.sass_global_waits`): global-memory latencies one warp of a program waits
  through in turn in the compiled schedule.
- `weight_bytes`: the adapters' A and/or B bytes the kernel reads (distinct popularity: one adapter a
  token; otherwise one).

It is meant for calls that fit in one wave (`--max-tokens`, 8 by default), where a program's time is its
chain of waits. From 64 tokens the kernels are bound by bandwidth and occupancy instead, and the line does
not hold (session 24: median error 31% on session 22's 64-256-token rows). Kernels that spill are left out
of the fit (`stack_bytes` > 0; local-memory traffic is not in the model) and flagged in predictions.
`--check` reports the fitted line's error on other runs (e.g. another tree; with `--against IMPL`, also each
variant's predicted and measured device time over IMPL's, case by case), `--predict` prints predicted
µs for static rows with no GPU time yet. Nothing here measures; a prediction is a hypothesis for the next
GPU run to test.
"""

from __future__ import annotations

import argparse
import collections
import json
import sys

import numpy as np

FEATURES = ("1", "sass_waits", "weight_us")
BANDWIDTH = 4.0e12  # bytes/s, H200-class HBM: the weight term's unit (its coefficient absorbs the real rate)


def case_key(case: dict) -> tuple:
    return tuple(str(case.get(k)) for k in ("tokens", "h_in", "h_out", "rank", "popularity", "impl"))


def weight_us(row: dict) -> float:
    """µs to read the adapter weights this kernel reads, at `BANDWIDTH` (mixed ranks: their mean)."""
    c, kernel = row["case"], row["kernel"]
    ranks = [8, 16, 64, 128] if str(c["rank"]) == "mixed" else [int(c["rank"])]
    adapters = int(c["tokens"]) if c["popularity"] == "distinct" else 1
    per_rank = (c["h_in"] if "shrink" in kernel or "one_launch" in kernel else 0) \
        + (c["h_out"] if "expand" in kernel or "one_launch" in kernel else 0)
    return adapters * float(np.mean(ranks)) * per_rank * 2 / BANDWIDTH * 1e6


def features(row: dict) -> list[float]:
    return [1.0, float(row["sass_waits"]), weight_us(row)]


def _rows(path: str) -> list[dict]:
    with open(path) as f:
        return json.load(f)["rows"]


def join(static_path: str, profile_path: str, max_tokens: int) -> list[dict]:
    """Static rows with a GPU time: `us` = device µs a launch of that kernel in that case."""
    static = collections.defaultdict(list)
    for row in _rows(static_path):
        if "sass_waits" not in row:
            raise SystemExit(f"{static_path}: rows have no sass_waits (re-run kernel_resources.py)")
        static[case_key(row["case"])].append(row)
    out = []
    for prof in _rows(profile_path):
        rows = static.get(case_key(prof["case"]))
        if not rows or not prof.get("profile") or int(prof["case"]["tokens"]) > max_tokens:
            continue
        for k in prof["profile"]["top_kernels"]:
            same = [r for r in rows if r["kernel"] == k["name"]]
            if len(same) == 1 and k["calls"] > 0:
                out.append({**same[0], "us": k["us"] / k["calls"], "source": profile_path})
    return out


def fit(rows: list[dict]) -> np.ndarray:
    clean = [r for r in rows if r["stack_bytes"] == 0]
    if len(clean) < len(FEATURES) + 1:
        raise SystemExit(f"only {len(clean)} spill-free timed kernels to fit; need more")
    coef, *_ = np.linalg.lstsq(np.array([features(r) for r in clean]), np.array([r["us"] for r in clean]),
                               rcond=None)
    return coef


def errors(rows: list[dict], coef: np.ndarray) -> dict:
    clean = [r for r in rows if r["stack_bytes"] == 0]
    if not clean:
        return {"n": 0}
    y = np.array([r["us"] for r in clean])
    pred = np.array([features(r) for r in clean]) @ coef
    rel = np.abs(pred - y) / y
    return {"n": len(clean), "r2": float(1 - ((y - pred) ** 2).sum() / ((y - y.mean()) ** 2).sum()),
            "median_rel_err": float(np.median(rel)), "p90_rel_err": float(np.quantile(rel, 0.9)),
            "max_rel_err": float(rel.max())}


def predict(rows: list[dict], coef: np.ndarray) -> list[dict]:
    return [{"case": r["case"], "kernel": r["kernel"], "sass_waits": r["sass_waits"],
             "round_trips": r.get("round_trips"), "stack_bytes": r["stack_bytes"],
             "predicted_us": float(np.dot(features(r), coef)), "spills": r["stack_bytes"] > 0} for r in rows]


def variant_ratios(rows: list[dict], coef: np.ndarray, base: str) -> list[dict]:
    """Each impl against `base`, case by case, predicted and measured: the sums of a case's spill-free
    timed kernels (µs), their ratio to `base`'s in the same case, and in how many cases the predicted
    ratio is on the measured one's side of 1 (`direction`)."""
    sums = collections.defaultdict(lambda: [0.0, 0.0])
    for r in rows:
        if r["stack_bytes"] == 0:
            case = case_key({**r["case"], "impl": None})
            s = sums[(case, r["case"]["impl"])]
            s[0] += float(np.dot(features(r), coef))
            s[1] += r["us"]
    out = []
    for impl in sorted({i for _, i in sums} - {base}):
        pairs = [(p / sums[(c, base)][0], u / sums[(c, base)][1]) for (c, i), (p, u) in sums.items()
                 if i == impl and (c, base) in sums]
        if pairs:
            pred, meas = np.array(pairs).T
            out.append({"impl": impl, "against": base, "cases": len(pairs),
                        "predicted_median": float(np.median(pred)), "measured_median": float(np.median(meas)),
                        "measured_range": [float(meas.min()), float(meas.max())],
                        "direction": int(((pred - 1) * (meas - 1) > 0).sum())})
    return out


def _pairs(specs: list[str]) -> list[tuple[str, str]]:
    out = []
    for s in specs:
        if ":" not in s:
            raise SystemExit(f"{s!r}: expected STATIC.json:PROFILE.json")
        out.append(tuple(s.split(":", 1)))
    return out


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--fit", nargs="+", required=True, metavar="STATIC:PROFILE")
    p.add_argument("--check", nargs="*", default=[], metavar="STATIC:PROFILE")
    p.add_argument("--predict", nargs="*", default=[], metavar="STATIC")
    p.add_argument("--max-tokens", type=int, default=8)
    p.add_argument("--against", metavar="IMPL",
                   help="with --check: every other impl's device time over this one's, predicted and measured")
    p.add_argument("--out")
    args = p.parse_args(argv)
    train = [r for s, f in _pairs(args.fit) for r in join(s, f, args.max_tokens)]
    coef = fit(train)
    result = {"model": dict(zip(FEATURES, map(float, coef))), "max_tokens": args.max_tokens,
              "fit": {"files": args.fit, **errors(train, coef)}, "checks": [], "predictions": []}
    print(f"device us = {coef[0]:.2f} + {coef[1]:.3f} x sass_waits + {coef[2]:.2f} x weight_us "
          f"(fit on {result['fit']['n']} kernels: R^2 {result['fit']['r2']:.3f}, "
          f"median error {result['fit']['median_rel_err']:.0%})")
    for s, f in _pairs(args.check):
        rows = join(s, f, args.max_tokens)
        e = {"files": f"{s}:{f}", **errors(rows, coef)}
        result["checks"].append(e)
        if e["n"]:
            print(f"check {f}: {e['n']} kernels, median error {e['median_rel_err']:.0%}, "
                  f"p90 {e['p90_rel_err']:.0%}, max {e['max_rel_err']:.0%}")
        else:
            print(f"check {f}: no spill-free timed kernels of <= {args.max_tokens} tokens")
        if args.against:
            e["variants"] = variant_ratios(rows, coef, args.against)
            for v in e["variants"]:
                lo, hi = v["measured_range"]
                print(f"  {v['impl']} over {v['against']} ({v['cases']} cases): predicted {v['predicted_median']:.2f}x, "
                      f"measured {v['measured_median']:.2f}x ({lo:.2f}-{hi:.2f}x), direction right in "
                      f"{v['direction']} of {v['cases']}")
    for s in args.predict:
        rows = predict([r for r in _rows(s) if int(r["case"]["tokens"]) <= args.max_tokens], coef)
        result["predictions"].append({"file": s, "rows": rows})
        for r in rows:
            c = r["case"]
            print(f"  {c['tokens']:>3} tok {c['h_in']}x{c['h_out']} r{c['rank']} {c['popularity']} {c['impl']}: "
                  f"{r['kernel']} {r['predicted_us']:.1f} us ({r['sass_waits']} waits"
                  f"{', spills: not modelled' if r['spills'] else ''})")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
        print(f"wrote {args.out}", file=sys.stderr)
    return result


if __name__ == "__main__":
    main()

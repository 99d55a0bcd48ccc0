"""Run a campaign of experiments on one GPU in one process, under a time budget; or combine summaries.

    python scripts/gpu_experiments.py CAMPAIGN.yaml --out DIR [--budget-s 510] [--systems a,b | --skip-systems a,b]
                                      [--only ENTRY,...] [--tag TAG] [--resume SUMMARY.json] [--smoke] [--records DIR]
    python scripts/gpu_experiments.py --combine SUMMARY.json [SUMMARY.json ...] --out DIR [--tag TAG]

Writes `<out>/<campaign>[_<tag>].json` (compact: one record per point with its
metrics, no per-request records; the targets evaluated) after every point,
and one PNG per experiment at the end (`<campaign>[_<tag>]_<experiment>.png`).
`--records DIR` also writes each point's full results folder there. Points
whose system is `hf_peft` run on transformers + peft (scripts/bench_hf_peft.py;
the model and its loaded adapters are reused by later points); run them in a
process of their own (`--systems hf_peft`): JAX would hold the GPU's memory.
See `slora_jax/experiment/campaign.py` for how points are warmed and budgeted,
and experiments/README.md for the commands of issue 6's campaign.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

START = time.monotonic()
# The engine's pool and the baselines' model copies are large: let JAX take most of the GPU (read when
# the backend starts, at the first device use).
os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.92")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # bench_hf_peft

import jax  # noqa: E402

from slora_jax.errors import ConfigError  # noqa: E402
from slora_jax.experiment import campaign as cp  # noqa: E402


def _names(text: str | None) -> set[str] | None:
    return None if text is None else {t.strip() for t in text.split(",") if t.strip()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("campaign", nargs="?", help="campaign YAML (experiments/campaigns/*.yaml)")
    ap.add_argument("--out", default=os.environ.get("OUT", "results/campaign"), help="where the summary and PNGs go")
    ap.add_argument("--budget-s", type=float, default=0.0,
                    help="seconds from process start after which no point starts and a running one is cut (0: none)")
    ap.add_argument("--reserve-s", type=float, default=20.0,
                    help="a point starts only with its time limit plus this much of the budget left")
    ap.add_argument("--systems", help="run only points of these systems (comma-separated)")
    ap.add_argument("--skip-systems", help="skip points of these systems")
    ap.add_argument("--only", help="run only these campaign entries (comma-separated names)")
    ap.add_argument("--tag", default="", help="suffix of the output names (several runs into one folder)")
    ap.add_argument("--resume", nargs="*", default=[], help="summaries whose ok/oom points are kept, not rerun")
    ap.add_argument("--smoke", action="store_true", help="the campaign's smoke overrides: tiny model, CPU, seconds")
    ap.add_argument("--records", default="", help="also write each point's full results folder under this folder")
    ap.add_argument("--work-dir", default="", help="random adapters are written (and reused) here (default: $TMPDIR/slora_jax_campaign)")
    ap.add_argument("--no-plots", action="store_true")
    ap.add_argument("--combine", nargs="+", help="summaries to merge into one (no runs), targets recomputed")
    args = ap.parse_args(argv)
    tag = f"_{args.tag}" if args.tag else ""

    if args.combine:
        summaries = [json.load(open(p)) for p in args.combine]
        name = f"{summaries[0]['campaign']}{tag or '_combined'}"
        combined = cp.combine(summaries, name)
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, f"{name}.json"), "w") as f:
            json.dump(combined, f, indent=1)
        if not args.no_plots:
            cp.write_plots(args.out, name, [r for r in combined["points"] if r.get("metrics") or r["status"] == "oom"])
        print(cp.targets_table(combined["targets"]))
        print(f"combined: {os.path.join(args.out, name + '.json')}")
        return 0
    if not args.campaign:
        ap.error("a campaign file (or --combine) is needed")

    try:
        campaign = cp.load_campaign(args.campaign, smoke=args.smoke)
    except ConfigError as e:
        print(f"gpu_experiments: config error: {e}", file=sys.stderr)
        return 2
    systems, skip, only = _names(args.systems), _names(args.skip_systems) or set(), _names(args.only)
    points = [p for p in campaign.points if (systems is None or p.exp.system in systems)
              and p.exp.system not in skip and (only is None or p.entry in only)]
    campaign = cp.Campaign(campaign.name + tag, campaign.path, points, campaign.targets)
    if not points:
        print("gpu_experiments: no points selected", file=sys.stderr)
        return 2

    factories, facts = {}, {"smoke": args.smoke}
    if any(p.exp.system == "hf_peft" for p in points):
        import bench_hf_peft  # torch: only when a point needs it

        factories["hf_peft"] = bench_hf_peft.HFModelCache().factory
        facts.update(bench_hf_peft.torch_facts())
        if all(p.exp.system == "hf_peft" for p in points):
            jax.config.update("jax_platforms", "cpu")  # keep JAX off the GPU: torch needs its memory
    resume = []
    for path in args.resume:
        if os.path.exists(path):
            resume += json.load(open(path))["points"]
        else:
            print(f"gpu_experiments: --resume {path}: no such file; its points run again", file=sys.stderr)
    summary = cp.run_campaign(campaign, args.out, budget_s=args.budget_s, reserve_s=args.reserve_s, start=START,
                              work_dir=args.work_dir, records_dir=args.records, factories=factories, resume=resume,
                              do_plots=not args.no_plots, facts=facts)
    return 0 if summary["points"] else 1


if __name__ == "__main__":
    sys.exit(main())

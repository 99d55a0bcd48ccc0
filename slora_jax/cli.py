"""`slora-jax`: run experiments from YAML configs and plot their results.

    slora-jax run CONFIG.yaml [key=value ...]      # e.g. adapters.n=100 mode=offline sweep.system=[slora,peft_merge]
    slora-jax plot RESULTS_DIR [RESULTS_DIR ...] [--out DIR]
"""

from __future__ import annotations

import argparse
import sys

from slora_jax.errors import ConfigError


def main(argv: list[str] | None = None) -> int:
    """The `slora-jax` command; returns the exit status (2 for a bad config or results folder)."""
    ap = argparse.ArgumentParser(prog="slora-jax", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    p_run = sub.add_parser("run", help="run an experiment config (and its sweep)")
    p_run.add_argument("config", help="YAML experiment config (experiments/configs/*.yaml)")
    p_run.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. adapters.n=100")
    p_plot = sub.add_parser("plot", help="redraw and compare results folders")
    p_plot.add_argument("results", nargs="+", help="results folders (runs or sweeps)")
    p_plot.add_argument("--out", default=None, help="where the PNGs go (default: <first folder>/compare)")
    args = ap.parse_args(argv)

    if args.command == "run":
        from slora_jax.experiment import load_experiment, run

        try:
            run(load_experiment(args.config, args.overrides))
        except ConfigError as e:
            print(f"slora-jax: config error: {e}", file=sys.stderr)
            return 2
        return 0
    from slora_jax.experiment import plots

    try:
        paths = plots.compare(args.results, args.out or f"{args.results[0].rstrip('/')}/compare")
    except FileNotFoundError as e:
        print(f"slora-jax: {e}", file=sys.stderr)
        return 2
    summaries = [s for r in args.results for s, _ in plots.load_results(r)]
    print(plots.metrics_table(summaries))
    print("\n".join(paths))
    return 0


if __name__ == "__main__":
    sys.exit(main())

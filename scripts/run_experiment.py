"""Run an experiment config; the same as `slora-jax run CONFIG.yaml [key=value ...]`.

    python scripts/run_experiment.py experiments/configs/quickstart.yaml workload.num_requests=32
"""

import sys

from slora_jax.cli import main

if __name__ == "__main__":
    sys.exit(main(["run", *sys.argv[1:]]))

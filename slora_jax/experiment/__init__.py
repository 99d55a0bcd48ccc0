"""Experiments from YAML configs: load and sweep configs, run them, plot results (`slora-jax run | plot`)."""

from slora_jax.experiment.config_io import load_experiment, parse_overrides, sweep_points
from slora_jax.experiment.runner import RunResult, run, run_point

__all__ = ["RunResult", "load_experiment", "parse_overrides", "run", "run_point", "sweep_points"]

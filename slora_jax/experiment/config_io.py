"""Experiment configs: YAML files plus dotted `key=value` overrides, typed by `ExperimentConfig` (draccus).

    name: s1
    system: slora
    adapters: {n: 100, ranks: [8]}
    sweep: {adapters.n: [5, 100, 1000]}

A sweep is a grid: one run per combination of its entries' values. An entry
whose key joins several keys with commas moves them together (a zip), e.g.
`"system,engine.num_pages": [[slora, 6000], [slora_no_unified, 4976]]`.

Overrides are `adapters.n=5`, `workload.input_len=[8,64]`, `sweep.system=[slora,peft_merge]`;
values are read as YAML. An override of a key the file sweeps over replaces
that sweep. Unknown keys and bad values raise `ConfigError` naming the field.
"""

from __future__ import annotations

import copy
import io
import itertools
import os
from typing import Any, Sequence

import draccus
import yaml

from slora_jax.config import ExperimentConfig
from slora_jax.errors import ConfigError


def parse_overrides(args: Sequence[str]) -> dict[str, Any]:
    """`["a.b=5", "c=[1, 2]"]` -> `{"a.b": 5, "c": [1, 2]}` (values parsed as YAML)."""
    out = {}
    for arg in args:
        key, eq, value = arg.partition("=")
        key = key.strip().removeprefix("--")
        if not eq or not key:
            raise ConfigError(f"override {arg!r} is not of the form key=value (e.g. adapters.n=100)")
        try:
            out[key] = yaml.safe_load(value)
        except yaml.YAMLError as e:
            raise ConfigError(f"override {arg!r}: the value is not valid YAML: {e}") from None
    return out


def _set(raw: dict, dotted: str, value: Any, source: str) -> None:
    *parents, leaf = dotted.split(".")
    node = raw
    for i, part in enumerate(parents):
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{source}: cannot set {dotted!r}: {'.'.join(parents[: i + 1])!r} is not a section")
    node[leaf] = value


def decode(raw: dict, source: str = "config") -> ExperimentConfig:
    """A typed, validated `ExperimentConfig` from a plain dict."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a mapping of config keys, got {type(raw).__name__}")
    try:
        return draccus.decode(ExperimentConfig, raw)
    except draccus.utils.ParsingError as e:
        cause = e.__cause__
        if isinstance(cause, ValueError) and " must be " in str(cause):  # a dataclass's own check, naming the field
            raise ConfigError(f"{source}: {cause}") from None
        raise ConfigError(f"{source}: {e} {cause or ''}") from None
    except draccus.utils.DecodingError as e:
        raise ConfigError(f"{source}: {e}") from None


def load_experiment(path: str | os.PathLike | None, overrides: Sequence[str] | dict[str, Any] = ()) -> ExperimentConfig:
    """The config in YAML file `path` (None: all defaults) with `overrides` applied."""
    source = os.fspath(path) if path is not None else "defaults"
    raw: Any = {}
    if path is not None:
        try:
            with open(path) as f:
                raw = yaml.safe_load(f) or {}
        except OSError as e:
            raise ConfigError(f"{source}: cannot read the config file: {e}") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"{source}: not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a mapping of config keys, got {type(raw).__name__}")
    overrides = parse_overrides(overrides) if not isinstance(overrides, dict) else overrides
    for key, value in overrides.items():
        if key.startswith("sweep."):
            raw.setdefault("sweep", {})[key.removeprefix("sweep.")] = value
            continue
        sweep = raw.get("sweep") or {}
        for entry in [e for e in sweep if key in e.split(",")]:  # a fixed value replaces a sweep over the key
            raise_if_zipped(entry, key, source)
            del sweep[entry]
        _set(raw, key, value, source)
    return decode(raw, source)


def raise_if_zipped(entry: str, key: str, source: str) -> None:
    if entry != key:
        raise ConfigError(f"{source}: {key!r} is swept together with others ({entry!r}); override that sweep entry")


def _entry_points(entry: str, values: list[Any]) -> list[dict[str, Any]]:
    keys = entry.split(",")
    if len(keys) == 1:
        return [{entry: v} for v in values]
    if not all(isinstance(v, (list, tuple)) and len(v) == len(keys) for v in values):
        raise ConfigError(f"sweep entry {entry!r}: each value must be a list of {len(keys)} values, one per key")
    return [dict(zip(keys, v)) for v in values]


def sweep_points(cfg: ExperimentConfig) -> list[tuple[dict[str, Any], ExperimentConfig]]:
    """One `(point, config)` per combination of the sweep's values (the grid), sweep cleared.

    `point` maps each swept key to its value there; without a sweep: `[({}, cfg)]`.
    """
    raw = draccus.encode(cfg)
    sweep = raw.pop("sweep")
    out = []
    for parts in itertools.product(*(_entry_points(k, v) for k, v in sweep.items())):
        point = {k: v for part in parts for k, v in part.items()}
        r = copy.deepcopy(raw)
        for key, value in point.items():
            _set(r, key, value, "sweep")
        out.append((point, decode(r, f"sweep point {point}")))
    return out


def point_label(point: dict[str, Any]) -> str:
    """A folder name for a sweep point: `system=slora,adapters.n=5`."""
    text = ",".join(f"{k}={_compact(v)}" for k, v in point.items()) or "run"
    return "".join(c if c.isalnum() or c in "=,.-_+" else "_" for c in text)


def _compact(v: Any) -> str:
    return "-".join(map(str, v)) if isinstance(v, (list, tuple)) else str(v)


def dump(cfg: ExperimentConfig) -> str:
    """The resolved config as YAML (what a results folder keeps)."""
    buf = io.StringIO()
    draccus.dump(cfg, buf)
    return buf.getvalue()

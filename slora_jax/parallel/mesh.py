"""The tensor-parallel mesh: one `tp` axis over `tp` devices, and what each device holds.

Megatron partition of a Llama layer over `tp` devices: each device owns
`N/tp` query heads, `K/tp` KV heads (their q/k/v columns, their rows of o, their
K/V in the cache) and `F/tp` of the MLP width (gate/up columns, down rows); the
vocabulary is split in `V/tp` contiguous ranges (embedding rows, lm_head
columns). Everything must divide evenly; `check_tp` says which count does not.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
from jax.sharding import Mesh

from slora_jax.compat import auto_mesh_1d
from slora_jax.config import LlamaConfig

TP_AXIS = "tp"


def check_tp(cfg: LlamaConfig, tp: int) -> None:
    """Raise `ValueError` naming every model dimension that `tp` does not divide."""
    if not isinstance(tp, int) or tp < 1:
        raise ValueError(f"tensor-parallel size must be a positive int, got {tp!r}")
    dims = {
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_key_value_heads,
        "intermediate_size": cfg.intermediate_size,
        "hidden_size": cfg.hidden_size,  # row-parallel LoRA B is split along the output
        "vocab_size": cfg.vocab_size,
    }
    bad = [f"{name}={n}" for name, n in dims.items() if n % tp]
    if bad:
        raise ValueError(
            f"tensor-parallel size {tp} must divide {', '.join(bad)}; "
            f"sizes that fit this model: {[t for t in range(1, 65) if all(n % t == 0 for n in dims.values())]}"
        )


def make_mesh(cfg: LlamaConfig, tp: int, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A 1-D mesh `("tp",)` over the first `tp` of `devices` (default `jax.devices()`)."""
    check_tp(cfg, tp)
    devices = list(jax.devices() if devices is None else devices)
    if tp > len(devices):
        raise ValueError(
            f"tensor-parallel size {tp} needs {tp} devices, only {len(devices)} available "
            "(on CPU: XLA_FLAGS=--xla_force_host_platform_device_count=N before JAX starts)"
        )
    return auto_mesh_1d(devices[:tp], TP_AXIS)


def tp_size(mesh: Mesh) -> int:
    return mesh.shape[TP_AXIS]


def local_config(cfg: LlamaConfig, tp: int) -> LlamaConfig:
    """The model as one device sees it: its share of the heads and of the MLP width.

    The decoder layers run unchanged on this config and the device's shards
    (hidden size, head_dim and vocab are whole; the vocab split is handled by
    the embedding and logits of the TP forward)."""
    check_tp(cfg, tp)
    return dataclasses.replace(
        cfg,
        num_attention_heads=cfg.num_attention_heads // tp,
        num_key_value_heads=cfg.num_key_value_heads // tp,
        intermediate_size=cfg.intermediate_size // tp,
    )

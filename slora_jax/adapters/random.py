"""Random LoRA adapters of real shapes, and writing any `LoraAdapter` as a PEFT folder.

Experiments need thousands of adapters without training any: `random_adapter`
draws them, `save_peft_adapter` writes them in the exact format `peft` saves
(so `peft` itself, and `load_adapter`, read them back).
"""

from __future__ import annotations

import json
import os
import re
from typing import Sequence

import numpy as np
from safetensors.numpy import save_file

from slora_jax.adapters.adapter import LoraAdapter, LoraModule
from slora_jax.adapters.peft import CONFIG_NAME, MAX_RANK, WEIGHTS_NAME, module_name
from slora_jax.config import PROJECTIONS, LlamaConfig


def random_adapter(
    cfg: LlamaConfig,
    rank: int,
    projections: Sequence[str] = ("q", "k", "v", "o"),
    alpha: float | None = None,
    seed: int = 0,
    name: str | None = None,
    use_rslora: bool = False,
) -> LoraAdapter:
    """An adapter of `rank` on `projections` of every layer, with random A and B.

    A ~ N(0, 1/in) and B ~ N(0, 1/r), so `(x @ A) @ B` keeps the scale of `x`;
    `alpha` defaults to `rank` (scale 1, or sqrt(rank) with rsLoRA).
    """
    if not 1 <= rank <= MAX_RANK:
        raise ValueError(f"rank must be in 1..{MAX_RANK}, got {rank}")
    unknown = set(projections) - set(PROJECTIONS)
    if unknown or not projections:
        raise ValueError(f"projections must be a non-empty subset of {PROJECTIONS}, got {list(projections)}")
    alpha = float(rank if alpha is None else alpha)
    scale = alpha / np.sqrt(rank) if use_rslora else alpha / rank
    rng = np.random.default_rng(seed)
    modules = {}
    for layer in range(cfg.num_hidden_layers):
        for proj in projections:
            h_in, h_out = cfg.projection_shape(proj)
            a = (rng.standard_normal((h_in, rank), np.float32) / np.sqrt(h_in)).astype(np.float32)
            b = (rng.standard_normal((rank, h_out), np.float32) / np.sqrt(rank)).astype(np.float32)
            modules[(layer, proj)] = LoraModule(a=a, b=b, scale=float(scale))
    peft_config = {"r": rank, "lora_alpha": alpha, "use_rslora": use_rslora}
    return LoraAdapter(name=name or f"random_r{rank}_s{seed}", path=None, modules=modules, peft_config=peft_config)


def save_peft_adapter(adapter: LoraAdapter, path: str | os.PathLike, base_model: str | None = None) -> None:
    """Write `adapter` as a PEFT LoRA folder (`adapter_config.json` + `adapter_model.safetensors`).

    Modules are listed by full name in `target_modules`, so any (layer,
    projection) subset round-trips; per-module ranks and scales that differ
    from the most common one go into `rank_pattern` / `alpha_pattern`.
    """
    if not adapter.modules:
        raise ValueError(f"adapter {adapter.name!r} has no modules")
    use_rslora = bool(adapter.peft_config.get("use_rslora", False))

    def alpha_of(m: LoraModule) -> float:
        return m.scale * (np.sqrt(m.rank) if use_rslora else m.rank)

    ranks = [m.rank for m in adapter.modules.values()]
    alphas = [alpha_of(m) for m in adapter.modules.values()]
    r = max(set(ranks), key=ranks.count)
    alpha = max(set(alphas), key=alphas.count)
    rank_pattern, alpha_pattern, tensors = {}, {}, {}
    for (layer, proj), m in sorted(adapter.modules.items()):
        key = module_name(layer, proj)
        # peft matches pattern keys as regexes anchored at a dot: escape the dots.
        if m.rank != r:
            rank_pattern[re.escape(key)] = m.rank
        if alpha_of(m) != alpha:
            alpha_pattern[re.escape(key)] = alpha_of(m)
        tensors[f"base_model.model.{key}.lora_A.weight"] = np.ascontiguousarray(m.a.T, np.float32)
        tensors[f"base_model.model.{key}.lora_B.weight"] = np.ascontiguousarray(m.b.T, np.float32)
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": r,
        "lora_alpha": alpha,
        "use_rslora": use_rslora,
        "target_modules": [module_name(layer, proj) for layer, proj in sorted(adapter.modules)],
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": False,
        "modules_to_save": None,
        "use_dora": False,
        "init_lora_weights": True,
        "layers_to_transform": None,
        "layers_pattern": None,
    }
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, CONFIG_NAME), "w") as f:
        json.dump(config, f, indent=2)
    save_file(tensors, os.path.join(path, WEIGHTS_NAME), metadata={"format": "pt"})

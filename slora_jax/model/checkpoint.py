"""Load a Hugging Face Llama folder (`config.json` + safetensors) into our parameter tree.

Tensors are memory-mapped and converted one stacked leaf at a time, so the host
holds at most one `[L, in, out]` leaf beyond the mapped files. Every problem is
a `CheckpointError` that names the file and the tensor.
"""

from __future__ import annotations

import functools
import json
import os
import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from slora_jax.config import HF_MODULE_NAMES, PROJECTIONS, LlamaConfig
from slora_jax.errors import CheckpointError
from slora_jax.model.llama import Params, param_shapes
from slora_jax.safetensors_io import SafetensorsFile

# HF tensor name -> (path in our tree, transpose?). HF kernels are [out, in]; ours [in, out].
_TOP_LEVEL = {
    "model.embed_tokens.weight": (("embed", "embedding"), False),
    "model.norm.weight": (("final_norm", "scale"), False),
    "lm_head.weight": (("lm_head", "kernel"), True),
}
_PER_LAYER = {
    "input_layernorm.weight": (("layers", "attn_norm", "scale"), False),
    "post_attention_layernorm.weight": (("layers", "mlp_norm", "scale"), False),
    **{f"{HF_MODULE_NAMES[p]}.weight": (("layers", p, "kernel"), True) for p in PROJECTIONS},
}
_LAYER_RE = re.compile(r"model\.layers\.(\d+)\.(.+)")
# Non-persistent buffers that some old checkpoints saved; recomputed from the config.
_IGNORED_RE = re.compile(r".*rotary_emb\.inv_freq$")


def read_config(path: str | os.PathLike) -> LlamaConfig:
    """`LlamaConfig` of a Hugging Face model folder's `config.json`."""
    cfg_path = os.path.join(path, "config.json")
    try:
        with open(cfg_path) as f:
            d = json.load(f)
    except FileNotFoundError:
        raise CheckpointError(f"{cfg_path}: not found (is {os.fspath(path)!r} a Hugging Face model folder?)") from None
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{cfg_path}: unreadable ({e})") from None
    if not isinstance(d, dict):
        raise CheckpointError(f"{cfg_path}: not a JSON object")
    return LlamaConfig.from_hf(d, source=cfg_path)


def _weight_files(path: str) -> list[str]:
    index = os.path.join(path, "model.safetensors.index.json")
    single = os.path.join(path, "model.safetensors")
    if os.path.exists(index):
        try:
            with open(index) as f:
                weight_map = json.load(f)["weight_map"]
            names = sorted(set(weight_map.values()))
            if not all(isinstance(n, str) for n in names):
                raise TypeError("weight_map values must be file names")
        except (OSError, json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
            raise CheckpointError(f"{index}: unreadable index ({e!r})") from None
        files = [os.path.join(path, n) for n in names]
        for f in files:
            if not os.path.exists(f):
                raise CheckpointError(f"{index}: names shard {os.path.basename(f)!r}, which does not exist")
        return files
    if os.path.exists(single):
        return [single]
    pickles = [n for n in sorted(os.listdir(path)) if n.endswith((".bin", ".pt", ".pth", ".ckpt"))]
    if pickles:
        raise CheckpointError(
            f"{os.path.join(path, pickles[0])}: pickle checkpoints are refused (loading them can run "
            "arbitrary code); convert the model to safetensors, e.g. "
            "`AutoModelForCausalLM.from_pretrained(dir).save_pretrained(dir, safe_serialization=True)`"
        )
    raise CheckpointError(f"{path}: no model.safetensors or model.safetensors.index.json found")


def _target(name: str, cfg: LlamaConfig) -> tuple[tuple[str, ...], int | None, bool] | None:
    """(tree path, layer index or None, transpose) of an HF tensor name; None if unknown."""
    if name in _TOP_LEVEL:
        tree_path, transpose = _TOP_LEVEL[name]
        return tree_path, None, transpose
    m = _LAYER_RE.fullmatch(name)
    if m and m.group(2) in _PER_LAYER and int(m.group(1)) < cfg.num_hidden_layers:
        tree_path, transpose = _PER_LAYER[m.group(2)]
        return tree_path, int(m.group(1)), transpose
    return None


def _hf_name(tree_path: tuple[str, ...], layer: int | None) -> str:
    table = _TOP_LEVEL if layer is None else _PER_LAYER
    suffix = next(n for n, (p, _) in table.items() if p == tree_path)
    return suffix if layer is None else f"model.layers.{layer}.{suffix}"


def load_checkpoint(
    path: str | os.PathLike, dtype: Any = jnp.bfloat16, shardings: Params | None = None
) -> tuple[LlamaConfig, Params]:
    """Read a Hugging Face Llama folder; returns `(config, params)` with params in `dtype`.

    `shardings`: optional tree of `jax.sharding.Sharding`s shaped like the params;
    each leaf then goes straight into its shards (every device receives only its
    slice of the host leaf), as the tensor-parallel loader needs.

    Accepts `model.safetensors` or a sharded `model.safetensors.index.json`;
    refuses pickle `.bin` files. Raises `CheckpointError` for a missing config,
    unsupported architecture or config field, unreadable file, missing or
    unexpected tensor, or shape mismatch.
    """
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise CheckpointError(f"{path}: not a directory")
    cfg = read_config(path)
    dtype = jnp.dtype(dtype)
    shapes = param_shapes(cfg, dtype)
    files = [SafetensorsFile(f, error_cls=CheckpointError) for f in _weight_files(path)]

    # Where each of our leaves (and each layer of a stacked leaf) comes from.
    sources: dict[tuple[tuple[str, ...], int | None], tuple[SafetensorsFile, str, bool]] = {}
    for sf in files:
        for name in sf.keys():
            if _IGNORED_RE.fullmatch(name):
                continue
            t = _target(name, cfg)
            if t is None or (t[0][0] == "lm_head" and cfg.tie_word_embeddings):
                if t is not None:  # a tied model that still saved lm_head: transformers ignores it too
                    continue
                raise CheckpointError(f"{sf.path}: unexpected tensor {name!r} for a {cfg.num_hidden_layers}-layer Llama")
            tree_path, layer, transpose = t
            if (tree_path, layer) in sources:
                raise CheckpointError(f"{sf.path}: tensor {name!r} also appears in {sources[(tree_path, layer)][0].path}")
            sources[(tree_path, layer)] = (sf, name, transpose)

    def leaf(tree_path: tuple[str, ...], spec: jax.ShapeDtypeStruct) -> jax.Array:
        stacked = tree_path[0] == "layers"
        layers = range(cfg.num_hidden_layers) if stacked else [None]
        out = np.empty(spec.shape, dtype)
        for layer in layers:
            key = (tree_path, layer)
            if key not in sources:
                where = ", ".join(os.path.basename(f.path) for f in files)
                raise CheckpointError(f"{path} ({where}): missing tensor {_hf_name(tree_path, layer)!r}")
            sf, name, transpose = sources[key]
            want = spec.shape[1:] if stacked else spec.shape
            want_hf = tuple(reversed(want)) if transpose else want
            if sf.shape(name) != want_hf:
                raise CheckpointError(
                    f"{sf.path}: tensor {name!r} has shape {list(sf.shape(name))}, expected {list(want_hf)}"
                )
            x = sf.get(name)
            dst = out[layer] if stacked else out
            dst[...] = x.T if transpose else x
        if shardings is None:
            return jnp.asarray(out)
        sharding = functools.reduce(lambda tree, key: tree[key], tree_path, shardings)
        return jax.make_array_from_callback(out.shape, sharding, lambda index: out[index])

    params = jax.tree_util.tree_map_with_path(lambda kp, s: leaf(tuple(k.key for k in kp), s), shapes)
    return cfg, params

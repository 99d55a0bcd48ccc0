"""Load and validate a PEFT LoRA adapter folder for a Llama base model.

A folder holds `adapter_config.json` and `adapter_model.safetensors` with
tensors named `base_model.model.<module>.lora_A.weight` (`[r, in]`) and
`...lora_B.weight` (`[out, r]`), where `<module>` is a transformers
`LlamaForCausalLM` module name such as `model.layers.3.self_attn.q_proj`.

The tensors decide which (layer, projection) pairs the adapter has; the config
must target each of them, and gives each one's rank and alpha. Which modules a
config targets and which `rank_pattern`/`alpha_pattern` key applies follow
peft's own rules (`peft.tuners.tuners_utils.check_target_module_exists`,
`peft.utils.other.get_pattern_key`), evaluated on those module names. A module
the config targets but the file lacks is simply absent, as peft leaves it at
its no-op initialisation. Anything that would make our output differ from
peft's (DoRA, biases, extra trained modules, other LoRA variants) is refused.
"""

from __future__ import annotations

import json
import math
import os
import re

import numpy as np

from slora_jax.adapters.adapter import LoraAdapter, LoraModule
from slora_jax.config import HF_MODULE_NAMES, LlamaConfig
from slora_jax.errors import AdapterError
from slora_jax.safetensors_io import SafetensorsFile

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_WEIGHTS_NAME = "adapter_model.bin"
MAX_RANK = 256

# peft's default target modules for model_type "llama", used when the config has none.
_LLAMA_DEFAULT_TARGETS = ["q_proj", "v_proj"]

# Config fields that, when set (truthy), change what the adapter computes in ways
# this system does not implement. (VeLoRA's `velora_config` only changes the
# backward pass, so it is accepted.)
_UNSUPPORTED_FIELDS = {
    "use_dora": "DoRA (weight-decomposed LoRA) is not supported",
    "modules_to_save": "fully trained copies of base modules (modules_to_save) are not supported",
    "lora_bias": "a bias on lora_B (lora_bias) is not supported",
    "use_qalora": "QA-LoRA input pooling (use_qalora) is not supported",
    "alora_invocation_tokens": "activated LoRA (alora_invocation_tokens) is not supported",
    "layer_replication": "layer_replication changes the base model's layers and is not supported",
    "trainable_token_indices": "trainable token embeddings (trainable_token_indices) are not supported",
    "target_parameters": "LoRA on raw parameters (target_parameters) is not supported",
    "use_bdlora": "block-diagonal LoRA (use_bdlora) is not supported",
    "monteclora_config": "Monte Carlo LoRA (monteclora_config) is not supported",
    "arrow_config": "Arrow adapter routing (arrow_config) is not supported",
    "kasa_config": "KaSA (kasa_config) modifies base weights and is not supported",
}

_TENSOR_RE = re.compile(r"base_model\.model\.(?P<module>.+)\.(?P<kind>lora_A|lora_B)\.weight")
_HF_TO_PROJ = {hf: proj for proj, hf in HF_MODULE_NAMES.items()}
_MODULE_RE = re.compile(r"model\.layers\.(?P<layer>\d+)\.(?P<hf>" + "|".join(map(re.escape, _HF_TO_PROJ)) + ")")


def module_name(layer: int, proj: str) -> str:
    """transformers `LlamaForCausalLM` name of a projection module, as peft matches it."""
    return f"model.layers.{layer}.{HF_MODULE_NAMES[proj]}"


def load_adapter(
    path: str | os.PathLike, base_config: LlamaConfig, name: str | None = None, dtype=np.float32
) -> LoraAdapter:
    """Read a PEFT LoRA folder into a `LoraAdapter` with `dtype` arrays (`a: [in, r]`, `b: [r, out]`).

    `name` defaults to the folder's name. Raises `AdapterError` naming the file and
    the problem for anything missing, malformed, unsupported or inconsistent with
    `base_config`.
    """
    path = os.fspath(path)
    cfg = _read_config(path)
    cfg_path = os.path.join(path, CONFIG_NAME)
    _check_supported(cfg, cfg_path)
    st = SafetensorsFile(os.path.join(path, WEIGHTS_NAME), error_cls=AdapterError)
    pairs = _parse_tensor_names(st, base_config)

    modules = {}
    for (layer, proj), names in sorted(pairs.items()):
        key = module_name(layer, proj)
        if not _targets(cfg, key):
            raise AdapterError(
                f"{st.path}: tensors for {key} are present but {cfg_path} does not target that module "
                f"(target_modules={cfg.get('target_modules')!r})"
            )
        for kind in ("lora_A", "lora_B"):
            if kind not in names:
                other = names["lora_B" if kind == "lora_A" else "lora_A"]
                raise AdapterError(f"{st.path}: tensor {other!r} has no matching {kind} tensor")
        r = _pattern_value(cfg.get("rank_pattern") or {}, key, cfg.get("r", 8))
        alpha = _pattern_value(cfg.get("alpha_pattern") or {}, key, cfg.get("lora_alpha", 8))
        h_in, h_out = base_config.projection_shape(proj)
        a_IxR = _read_transposed(st, names["lora_A"], (r, h_in), dtype)
        b_RxO = _read_transposed(st, names["lora_B"], (h_out, r), dtype)
        scale = alpha / math.sqrt(r) if cfg.get("use_rslora", False) else alpha / r
        modules[(layer, proj)] = LoraModule(a=a_IxR, b=b_RxO, scale=float(scale))
    if not modules:
        raise AdapterError(f"{st.path}: no LoRA tensors found")
    return LoraAdapter(
        name=name if name is not None else os.path.basename(os.path.normpath(path)),
        path=path,
        modules=modules,
        peft_config=cfg,
    )


def _read_config(path: str) -> dict:
    cfg_path = os.path.join(path, CONFIG_NAME)
    if not os.path.isfile(cfg_path):
        raise AdapterError(f"{cfg_path}: missing adapter config (is {path} a PEFT adapter folder?)")
    if not os.path.isfile(os.path.join(path, WEIGHTS_NAME)):
        if os.path.isfile(os.path.join(path, PICKLE_WEIGHTS_NAME)):
            raise AdapterError(
                f"{os.path.join(path, PICKLE_WEIGHTS_NAME)}: pickle weights are not loaded; convert the adapter "
                f"to safetensors (load it with peft and call save_pretrained(..., safe_serialization=True))"
            )
        raise AdapterError(f"{os.path.join(path, WEIGHTS_NAME)}: missing adapter weights")
    try:
        with open(cfg_path, encoding="utf-8") as f:
            cfg = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise AdapterError(f"{cfg_path}: unreadable JSON ({e})") from None
    if not isinstance(cfg, dict):
        raise AdapterError(f"{cfg_path}: expected a JSON object, got {type(cfg).__name__}")
    return cfg


def _check_supported(cfg: dict, cfg_path: str) -> None:
    """Refuse configs whose adapter computes something other than plain `scale * x @ A @ B`."""
    peft_type = cfg.get("peft_type")
    if peft_type != "LORA":
        raise AdapterError(f"{cfg_path}: peft_type {peft_type!r} is not supported; only 'LORA'")
    for field, why in _UNSUPPORTED_FIELDS.items():
        if cfg.get(field):
            raise AdapterError(f"{cfg_path}: {why} ({field}={cfg[field]!r})")
    if cfg.get("bias", "none") != "none":
        raise AdapterError(f"{cfg_path}: bias={cfg['bias']!r} (trained base biases) is not supported; only 'none'")
    # `fan_in_fan_out` is accepted and ignored: it describes Conv1D-style base
    # weights; for nn.Linear (all Llama projections) peft forces it False, and the
    # lora_A/lora_B layouts never depend on it.
    targets = cfg.get("target_modules")
    if targets is not None and not (isinstance(targets, str) or _is_str_list(targets)):
        raise AdapterError(f"{cfg_path}: target_modules must be a string or a list of strings, got {targets!r}")
    exclude = cfg.get("exclude_modules")
    if exclude is not None and not (isinstance(exclude, str) or _is_str_list(exclude)):
        raise AdapterError(f"{cfg_path}: exclude_modules must be a string or a list of strings, got {exclude!r}")
    # peft's LoraConfig raises on these combinations too.
    if isinstance(targets, str) and (cfg.get("layers_to_transform") is not None or cfg.get("layers_pattern")):
        raise AdapterError(
            f"{cfg_path}: layers_to_transform / layers_pattern cannot be used with a string target_modules"
        )
    layers_pattern = cfg.get("layers_pattern")
    if layers_pattern is not None and not (isinstance(layers_pattern, str) or _is_str_list(layers_pattern)):
        raise AdapterError(f"{cfg_path}: layers_pattern must be a string or a list of strings, got {layers_pattern!r}")
    layers = cfg.get("layers_to_transform")
    if layers is not None and not (_is_int(layers) or (isinstance(layers, list) and all(map(_is_int, layers)))):
        raise AdapterError(f"{cfg_path}: layers_to_transform must be an int or a list of ints, got {layers!r}")
    for field, default in (("r", 8), ("lora_alpha", 8)):
        v = cfg.get(field, default)
        if not _is_number(v):
            raise AdapterError(f"{cfg_path}: {field} must be a number, got {v!r}")
    _check_rank(cfg.get("r", 8), f"{cfg_path}: r")
    for field in ("rank_pattern", "alpha_pattern"):
        pattern = cfg.get(field) or {}
        if not isinstance(pattern, dict) or not all(map(_is_number, pattern.values())):
            raise AdapterError(f"{cfg_path}: {field} must map module patterns to numbers, got {pattern!r}")
    for key, r in (cfg.get("rank_pattern") or {}).items():
        _check_rank(r, f"{cfg_path}: rank_pattern[{key!r}]")
    regexes = [*(cfg.get("rank_pattern") or {}), *(cfg.get("alpha_pattern") or {})]
    regexes += [v for v in (targets, exclude) if isinstance(v, str)]
    regexes += [layers_pattern] if isinstance(layers_pattern, str) else layers_pattern or []
    for pattern in regexes:
        try:
            re.compile(pattern)
        except re.error as e:
            raise AdapterError(f"{cfg_path}: invalid regular expression {pattern!r} ({e})") from None


def _check_rank(r, what: str) -> None:
    if not _is_int(r) or not 1 <= r <= MAX_RANK:
        raise AdapterError(f"{what} is {r!r}; ranks must be integers in 1..{MAX_RANK}")


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _is_str_list(v) -> bool:
    return isinstance(v, list) and all(isinstance(s, str) for s in v)


def _parse_tensor_names(st: SafetensorsFile, base_config: LlamaConfig) -> dict[tuple[int, str], dict[str, str]]:
    """{(layer, proj): {"lora_A": tensor name, "lora_B": tensor name}}; refuses any other tensor."""
    pairs: dict[tuple[int, str], dict[str, str]] = {}
    for tname in st.keys():
        if "lora_magnitude_vector" in tname:
            raise AdapterError(f"{st.path}: tensor {tname!r} is a DoRA magnitude vector; DoRA is not supported")
        m = _TENSOR_RE.fullmatch(tname)
        if m is None:
            raise AdapterError(
                f"{st.path}: unexpected tensor {tname!r}; only base_model.model.<module>.lora_A.weight / "
                f"lora_B.weight of decoder projections are supported"
            )
        mm = _MODULE_RE.fullmatch(m["module"])
        if mm is None:
            raise AdapterError(
                f"{st.path}: tensor {tname!r} adapts {m['module']!r}, which is not one of the decoder "
                f"projections {sorted(_HF_TO_PROJ)}"
            )
        layer = int(mm["layer"])
        if layer >= base_config.num_hidden_layers:
            raise AdapterError(
                f"{st.path}: tensor {tname!r} is for layer {layer} but the base model has "
                f"{base_config.num_hidden_layers} layers"
            )
        pairs.setdefault((layer, _HF_TO_PROJ[mm["hf"]]), {})[m["kind"]] = tname
    return pairs


def _read_transposed(st: SafetensorsFile, tname: str, shape: tuple[int, int], dtype) -> np.ndarray:
    """Transpose of tensor `tname` (stored as `shape`) as an owned C-order `dtype` array; checks finiteness."""
    if st.shape(tname) != shape:
        raise AdapterError(
            f"{st.path}: tensor {tname!r} has shape {list(st.shape(tname))}, expected {list(shape)} "
            f"(from the config's rank and the base model's projection size)"
        )
    # One copy out of the memory map: cast and transpose together. Overflow to
    # Inf in the cast is reported below, so its warning is silenced.
    with np.errstate(over="ignore"):
        x = st.get(tname).T.astype(dtype, order="C")
    if not np.isfinite(x).all():
        raise AdapterError(f"{st.path}: tensor {tname!r} has NaN or Inf values (as {np.dtype(dtype).name})")
    return x


def _targets(cfg: dict, key: str) -> bool:
    """Whether peft would put LoRA on module `key` (peft's check_target_module_exists).

    `modules_to_save` is refused earlier, so its exclusion rule is not needed.
    """
    exclude = cfg.get("exclude_modules")
    if exclude:
        if isinstance(exclude, str):
            if re.fullmatch(exclude, key):
                return False
        elif key in exclude or any(key.endswith(f".{e}") for e in exclude):
            return False
    targets = cfg.get("target_modules")
    if targets is None:
        targets = _LLAMA_DEFAULT_TARGETS
    if isinstance(targets, str):
        # "all-linear" is every nn.Linear except the output head: all seven projections.
        return targets.lower() == "all-linear" or re.fullmatch(targets, key) is not None
    if key in targets:
        # An exact full name bypasses layers_to_transform in peft.
        return True
    if not any(key.endswith(f".{t}") for t in targets):
        return False
    layers = cfg.get("layers_to_transform")
    if layers is None or layers == []:
        return True
    pattern = cfg.get("layers_pattern")
    if not pattern:
        # Lazy `.*?`: the first numbered segment is the layer index.
        m = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", key)
    else:
        for p in [pattern] if isinstance(pattern, str) else pattern:
            m = re.match(rf"(?:^|.*?\.){p}\.(?P<idx>\d+)\.", key)
            if m is not None:
                break
    if m is None:
        return False
    idx = int(m["idx"])
    return idx == layers if isinstance(layers, int) else idx in layers


def _pattern_value(pattern: dict, key: str, default):
    """`rank_pattern`/`alpha_pattern` lookup as peft's get_pattern_key: the first key
    (in file order) that regex-matches a dotted suffix of the module name wins."""
    for p, value in pattern.items():
        if re.match(rf"(.*\.)?({p})$", key):
            return value
    return default

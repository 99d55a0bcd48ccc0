"""Test helpers: tiny transformers Llama models and real peft-made LoRA adapters.

`make_peft_adapter` returns the `PeftModel` it saved, so tests can compare our
loaded weights with peft's own modules (`peft_lora_modules`) or run it forward
as the reference for model-parity tests.
"""

from __future__ import annotations

import copy
import os
import re
import warnings

import torch
import transformers
from peft import LoraConfig, PeftModel, get_peft_model

from slora_jax.config import HF_MODULE_NAMES

TINY_HF_KWARGS = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
)

_HF_TO_PROJ = {hf: proj for proj, hf in HF_MODULE_NAMES.items()}


def tiny_hf_model(seed: int = 0, **overrides) -> transformers.LlamaForCausalLM:
    """A random fp32 `LlamaForCausalLM` with the tiny test shapes (GQA: 4 heads, 2 KV heads)."""
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(**{**TINY_HF_KWARGS, **overrides})
    return transformers.LlamaForCausalLM(cfg).to(torch.float32).eval()


def make_peft_adapter(
    base_model_dir_or_hf_model: str | os.PathLike | transformers.LlamaForCausalLM,
    out_dir: str | os.PathLike,
    r: int,
    target_modules,
    alpha: float,
    use_rslora: bool = False,
    seed: int = 0,
    **lora_kwargs,
) -> PeftModel:
    """Build a random LoRA adapter with peft on an fp32 base model and `save_pretrained` it to `out_dir`.

    `init_lora_weights=False` makes both A and B random (peft's default B = 0
    would make every adapter a no-op). The given model object is not modified
    (peft injects into a deep copy). `lora_kwargs` go to `LoraConfig`
    (rank_pattern, alpha_pattern, layers_to_transform, ...).
    """
    if isinstance(base_model_dir_or_hf_model, transformers.PreTrainedModel):
        base = copy.deepcopy(base_model_dir_or_hf_model)
    else:
        base = transformers.LlamaForCausalLM.from_pretrained(base_model_dir_or_hf_model, dtype=torch.float32)
    base = base.to(torch.float32).eval()
    config = LoraConfig(
        r=r,
        target_modules=target_modules,
        lora_alpha=alpha,
        use_rslora=use_rslora,
        init_lora_weights=False,
        **lora_kwargs,
    )
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        # peft calls a transformers 5 deprecated API (noise, not our concern).
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing", category=FutureWarning)
        model = get_peft_model(base, config)
    model.save_pretrained(os.fspath(out_dir))
    return model.eval()


def peft_lora_modules(model: PeftModel, adapter_name: str = "default") -> dict[tuple[int, str], tuple]:
    """{(layer, proj): (lora_A.weight [r, in], lora_B.weight [out, r], scaling)} as numpy, from peft's modules."""
    out = {}
    for name, module in model.named_modules():
        m = re.fullmatch(r".*\.layers\.(\d+)\.(self_attn\.\w+|mlp\.\w+)", name)
        if m is None or not hasattr(module, "lora_A") or adapter_name not in module.lora_A:
            continue
        out[(int(m[1]), _HF_TO_PROJ[m[2]])] = (
            module.lora_A[adapter_name].weight.detach().float().numpy(),
            module.lora_B[adapter_name].weight.detach().float().numpy(),
            module.scaling[adapter_name],
        )
    return out

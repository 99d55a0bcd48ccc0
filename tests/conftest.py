"""Shared fixtures: tiny random Llama models saved in Hugging Face format.

Weights use a larger init range than real models so logits are well spread and
greedy choices are not near-ties (fp32 rounding must not flip an argmax).
"""

from __future__ import annotations

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
# Four host CPU devices for the tensor-parallel tests (must precede JAX's backend start).
# Everything else still runs on device 0, as with one device.
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4").strip()
# CPU runs are compile-bound (tiny shapes; Pallas kernels in interpret mode): unoptimized LLVM code generation
# cut the suite's compile-heavy tests by 10-40% (session 18: the Pallas engine test 42.8 -> 38.5 s, a random
# engine workload 17.2 -> 10.3 s). GPU runs (JAX_PLATFORMS=cuda) keep XLA's default.
if os.environ["JAX_PLATFORMS"] == "cpu" and "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ["XLA_FLAGS"] + " --xla_backend_optimization_level=0").strip()

import jax
import pytest

jax.config.update("jax_numpy_rank_promotion", "raise")

# name -> transformers.LlamaConfig kwargs
TINY_MODELS = {
    # Llama-2 style: multi-head attention, default RoPE.
    "llama2_mha": dict(
        vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, rms_norm_eps=1e-5, rope_theta=10000.0,
    ),
    # Llama-3 style: GQA 4:1 and llama3 RoPE scaling (small original context so scaling bites);
    # head_dim 16 (q is 64 -> 128) so the Pallas attention kernel (head_dim >= 16) runs on it.
    "llama3_gqa": dict(
        vocab_size=160, hidden_size=64, intermediate_size=112, num_hidden_layers=3,
        num_attention_heads=8, num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-5, rope_theta=500000.0,
        rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                          original_max_position_embeddings=16),
        max_position_embeddings=512,
    ),
    # Tied embeddings and an explicit head_dim that is not hidden/heads.
    "tied_headdim": dict(
        vocab_size=96, hidden_size=48, intermediate_size=80, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=24, tie_word_embeddings=True,
        rms_norm_eps=1e-6,
    ),
}


def make_hf_model(name: str, seed: int = 0, **overrides):
    """A fp32 `transformers` LlamaForCausalLM of one of TINY_MODELS (fields `overrides` changed), in eval mode."""
    import torch
    import transformers

    torch.manual_seed(seed)
    kwargs = {**TINY_MODELS[name], **overrides}
    cfg = transformers.LlamaConfig(initializer_range=0.15, bos_token_id=1, eos_token_id=2, **kwargs)
    return transformers.LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="session")
def tiny_model_dirs(tmp_path_factory) -> dict[str, str]:
    """Every TINY_MODELS entry saved once per session; name -> folder."""
    root = tmp_path_factory.mktemp("tiny_models")
    dirs = {}
    for name in TINY_MODELS:
        d = root / name
        make_hf_model(name).save_pretrained(d)
        dirs[name] = str(d)
    return dirs

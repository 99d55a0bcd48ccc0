"""Random adapters written in PEFT format: `load_adapter` and `peft` itself read them back."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from peft import PeftModel

from conftest import make_hf_model
from slora_jax.adapters import LoraModule, load_adapter, pack_slots, random_adapter, save_peft_adapter
from slora_jax.model import LoraInputs, load_checkpoint, prefill
from test_model import hf_logits, pad, random_prompts, rel_err


def heterogeneous(cfg):
    """A random adapter with a few modules dropped, one module of another rank and one of another alpha."""
    ad = random_adapter(cfg, rank=8, projections=("q", "v", "o", "down"), alpha=16, seed=3, use_rslora=True)
    del ad.modules[(1, "o")]
    rng = np.random.default_rng(0)
    h_in, h_out = cfg.projection_shape("down")
    ad.modules[(0, "down")] = LoraModule(
        a=rng.standard_normal((h_in, 5), np.float32), b=rng.standard_normal((5, h_out), np.float32), scale=0.7
    )
    ad.modules[(2, "q")] = dataclasses.replace(ad.modules[(2, "q")], scale=2.5)
    return ad


def test_save_then_load_round_trips(tmp_path, tiny_model_dirs):
    cfg, _ = load_checkpoint(tiny_model_dirs["llama3_gqa"], dtype=jnp.float32)
    ad = heterogeneous(cfg)
    save_peft_adapter(ad, tmp_path / "ad")
    back = load_adapter(tmp_path / "ad", cfg)
    assert set(back.modules) == set(ad.modules)
    for key, m in ad.modules.items():
        np.testing.assert_array_equal(back.modules[key].a, m.a)
        np.testing.assert_array_equal(back.modules[key].b, m.b)
        assert back.modules[key].scale == pytest.approx(m.scale, rel=1e-6)


def test_peft_reads_saved_adapter_and_agrees(tmp_path, tiny_model_dirs):
    base_dir = tiny_model_dirs["llama3_gqa"]
    cfg, params = load_checkpoint(base_dir, dtype=jnp.float32)
    ad = heterogeneous(cfg)
    save_peft_adapter(ad, tmp_path / "ad")
    peft_model = PeftModel.from_pretrained(make_hf_model("llama3_gqa"), tmp_path / "ad").eval()
    prompt = random_prompts(cfg.vocab_size, [13], seed=11)
    toks, lens = pad(prompt)
    lora = LoraInputs(pack_slots([ad], cfg), jnp.zeros(toks.shape, jnp.int32))
    logits, _ = prefill(params, cfg, toks, lens, max_len=16, lora=lora)
    ref = hf_logits(peft_model, prompt[0])
    assert rel_err(ref, hf_logits(make_hf_model("llama3_gqa"), prompt[0])) > 1e-2
    assert rel_err(logits[0], ref) < 1e-4


def test_random_adapter_rejects_bad_arguments():
    from slora_jax.config import preset

    with pytest.raises(ValueError, match="rank"):
        random_adapter(preset("tiny"), rank=0)
    with pytest.raises(ValueError, match="projections"):
        random_adapter(preset("tiny"), rank=4, projections=("qkv",))

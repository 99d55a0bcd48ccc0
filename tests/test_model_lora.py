"""Mixed-adapter batches against `peft`: each row's logits and greedy tokens equal
peft's with that row's adapter active (or disabled for base-model rows)."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
import torch

from conftest import make_hf_model
from peft_utils import make_peft_adapter
from slora_jax.adapters import load_adapter, pack_slots
from slora_jax.model import LoraInputs, greedy_generate, load_checkpoint, prefill
from test_model import hf_logits, pad, random_prompts, rel_err

# Different ranks, target sets, scaling rules and layer subsets, on a GQA base.
ADAPTERS = {
    "qv_r8": dict(r=8, target_modules=["q_proj", "v_proj"], alpha=16),
    "all_r4_rslora": dict(
        r=4, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        alpha=8, use_rslora=True,
    ),
    "mixed_r16": dict(
        r=16, target_modules=["k_proj", "o_proj", "gate_proj", "down_proj"], alpha=24,
        layers_to_transform=[0, 2], rank_pattern={"down_proj": 6}, alpha_pattern={"o_proj": 40},
    ),
}
# Slot of each row (None: base model); rows sharing an adapter and base rows interleaved.
ROW_SLOTS = [0, 1, None, 2, 1, 0, None, 2]
ROW_LENS = [5, 12, 7, 1, 20, 3, 9, 14]


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_model_dirs):
    base_dir = tiny_model_dirs["llama3_gqa"]
    hf_base = make_hf_model("llama3_gqa")
    root = tmp_path_factory.mktemp("adapters")
    cfg, params = load_checkpoint(base_dir, dtype=jnp.float32)
    peft_models, adapters = [], []
    for i, (name, spec) in enumerate(ADAPTERS.items()):
        spec = dict(spec)
        peft_models.append(make_peft_adapter(hf_base, root / name, seed=10 + i, **spec))
        adapters.append(load_adapter(root / name, cfg, name=name))
    return cfg, params, hf_base, peft_models, adapters


def test_adapters_change_the_output(setup):
    """Guard: the adapters must matter, or the parity tests below prove nothing."""
    cfg, _, hf_base, peft_models, _ = setup
    p = random_prompts(cfg.vocab_size, [10], seed=7)[0]
    base = hf_logits(hf_base, p)
    for m in peft_models:
        assert rel_err(hf_logits(m, p), base) > 1e-2


def test_mixed_adapter_batch_logits_match_peft(setup):
    cfg, params, hf_base, peft_models, adapters = setup
    prompts = random_prompts(cfg.vocab_size, ROW_LENS, seed=8)
    toks, lens = pad(prompts)
    weights = pack_slots(adapters, cfg, dtype=jnp.float32)
    slot_B = np.array([-1 if s is None else s for s in ROW_SLOTS], np.int32)
    lora = LoraInputs(weights, jnp.asarray(np.repeat(slot_B[:, None], toks.shape[1], axis=1)))
    logits, _ = prefill(params, cfg, toks, lens, max_len=32, lora=lora)
    for row, (p, s) in enumerate(zip(prompts, ROW_SLOTS)):
        ref = hf_logits(hf_base if s is None else peft_models[s], p)
        assert rel_err(logits[row, : len(p)], ref) < 1e-4, (row, s)


def test_mixed_adapter_greedy_generation_matches_peft(setup):
    cfg, params, hf_base, peft_models, adapters = setup
    prompts = random_prompts(cfg.vocab_size, ROW_LENS, seed=9)
    weights = pack_slots(adapters, cfg, dtype=jnp.float32)
    ours = greedy_generate(params, cfg, prompts, max_new_tokens=10, lora_weights=weights, slots=ROW_SLOTS)
    for p, s, got in zip(prompts, ROW_SLOTS, ours):
        model = hf_base if s is None else peft_models[s]
        with torch.no_grad():
            out = model.generate(
                input_ids=torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                max_new_tokens=10, do_sample=False, pad_token_id=0,
            )
        assert got == out[0, len(p):].tolist(), s

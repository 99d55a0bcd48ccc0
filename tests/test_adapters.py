"""PEFT adapter loading (against real peft-made adapters), validation errors, slot packing."""

from __future__ import annotations

import json
import os
import shutil

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import safetensors.torch
import torch
from peft_utils import make_peft_adapter, peft_lora_modules, tiny_hf_model
from safetensors.numpy import load_file, save_file

from slora_jax.adapters import LoraAdapter, LoraModule, load_adapter, pack_slots
from slora_jax.adapters.peft import module_name
from slora_jax.config import PROJECTIONS, LlamaConfig
from slora_jax.errors import AdapterError
from slora_jax.ops.lora import lora_reference

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"


@pytest.fixture(scope="session")
def hf_model():
    return tiny_hf_model(seed=0)


@pytest.fixture(scope="session")
def base_config(hf_model) -> LlamaConfig:
    cfg = LlamaConfig.from_hf(hf_model.config.to_dict())
    assert cfg.num_key_value_heads < cfg.num_attention_heads  # GQA: k/v narrower than q
    return cfg


# name -> (make_peft_adapter kwargs, expected (layer, proj) set)
_ALL = {(layer, p) for layer in range(2) for p in PROJECTIONS}
LOAD_CASES = {
    "qv": (dict(r=4, target_modules=["q_proj", "v_proj"], alpha=8), {(0, "q"), (0, "v"), (1, "q"), (1, "v")}),
    "all_linear_rslora": (dict(r=8, target_modules="all-linear", alpha=16, use_rslora=True), _ALL),
    "regex": (
        dict(r=2, target_modules=r".*\.(k_proj|down_proj)", alpha=5),
        {(0, "k"), (0, "down"), (1, "k"), (1, "down")},
    ),
    # Pattern keys match a dotted suffix of the module name, as regexes.
    "rank_alpha_pattern": (
        dict(
            r=4,
            target_modules=["q_proj", "k_proj", "gate_proj", "down_proj"],
            alpha=8,
            rank_pattern={"gate_proj": 2, "k_proj": 1, r"layers\.1\.mlp\.down_\w+": 6},
            alpha_pattern={"q_proj": 3, "model.layers.0.mlp.down_proj": 20.5},
        ),
        {(layer, p) for layer in range(2) for p in ("q", "k", "gate", "down")},
    ),
    "layers_int": (
        dict(r=3, target_modules=["o_proj", "up_proj"], alpha=6, layers_to_transform=1),
        {(1, "o"), (1, "up")},
    ),
    "layers_list_pattern": (
        dict(
            r=1,
            target_modules=["q_proj", "k_proj", "v_proj"],
            alpha=2,
            layers_to_transform=[0],
            layers_pattern="layers",
        ),
        {(0, "q"), (0, "k"), (0, "v")},
    ),
    "full_names_exclude": (
        dict(
            r=5,
            target_modules=["model.layers.1.self_attn.q_proj", "mlp.up_proj", "v_proj"],
            alpha=10,
            exclude_modules=r".*layers\.0\.mlp\.up_proj",
        ),
        {(1, "q"), (1, "up"), (0, "v"), (1, "v")},
    ),
    "rank_256": (dict(r=256, target_modules=["o_proj"], alpha=256), {(0, "o"), (1, "o")}),
}


@pytest.mark.parametrize("case", list(LOAD_CASES))
def test_load_matches_peft(case, hf_model, base_config, tmp_path):
    kwargs, expected = LOAD_CASES[case]
    model = make_peft_adapter(hf_model, tmp_path / case, **kwargs)
    ref = peft_lora_modules(model)
    assert set(ref) == expected  # peft itself targets what the case intends

    ad = load_adapter(tmp_path / case, base_config)
    assert ad.name == case and set(ad.modules) == expected
    for key, (a_RxI, b_OxR, scaling) in ref.items():
        m = ad.modules[key]
        assert m.a.dtype == np.float32 and m.a.flags.c_contiguous and m.b.flags.c_contiguous
        np.testing.assert_array_equal(m.a, a_RxI.T)
        np.testing.assert_array_equal(m.b, b_OxR.T)
        assert m.scale == pytest.approx(scaling, rel=1e-12)
        h_in, h_out = base_config.projection_shape(key[1])
        assert m.a.shape == (h_in, m.rank) and m.b.shape == (m.rank, h_out)


def test_pattern_semantics(hf_model, base_config, tmp_path):
    kwargs, _ = LOAD_CASES["rank_alpha_pattern"]
    make_peft_adapter(hf_model, tmp_path / "p", **kwargs)
    ad = load_adapter(tmp_path / "p", base_config)
    assert [ad.rank(0, p) for p in ("q", "k", "gate", "down")] == [4, 1, 2, 4]
    assert [ad.rank(1, p) for p in ("q", "k", "gate", "down")] == [4, 1, 2, 6]
    assert ad.modules[(0, "q")].scale == 3 / 4 and ad.modules[(0, "down")].scale == 20.5 / 4
    assert ad.modules[(1, "down")].scale == 8 / 6
    kv = base_config.num_key_value_heads * base_config.head_dim
    assert ad.modules[(0, "k")].b.shape == (1, kv) and kv < base_config.hidden_size


def test_overlapping_rank_pattern_uses_file_order(hf_model, base_config, tmp_path):
    """The first matching key wins, in the order of the file. peft before 0.22 saved the
    config with sorted keys, so an adapter trained with overlapping keys could disagree
    with its own config (peft then failed to reload it too); in file order it loads.
    peft 0.22 keeps the keys' order, and such a folder loads as saved."""
    d = tmp_path / "a"
    pattern = {r"layers\.1\..*": 6, "gate_proj": 2}
    model = make_peft_adapter(hf_model, d, r=4, target_modules=["q_proj", "gate_proj"], alpha=8, rank_pattern=pattern)
    saved = list(json.loads((d / CONFIG).read_text())["rank_pattern"])
    assert saved in (["gate_proj", r"layers\.1\..*"], list(pattern))  # sorted (peft < 0.22) or as given
    if saved != list(pattern):
        with pytest.raises(AdapterError, match=r"layers.1.mlp.gate_proj.lora_A.weight' has shape \[6, 64\], expected \[2"):
            load_adapter(d, base_config)
        _edit_config(d, rank_pattern=pattern)
    ad = load_adapter(d, base_config)
    peft_ranks = {k: a_RxI.shape[0] for k, (a_RxI, _, _) in peft_lora_modules(model).items()}
    assert {k: m.rank for k, m in ad.modules.items()} == peft_ranks
    assert [ad.rank(0, "gate"), ad.rank(1, "gate"), ad.rank(1, "q")] == [2, 6, 6]


def test_adapter_properties(hf_model, base_config, tmp_path):
    make_peft_adapter(
        hf_model, tmp_path / "a", r=3, target_modules=["up_proj", "q_proj"], alpha=6, layers_to_transform=1
    )
    ad = load_adapter(tmp_path / "a", base_config, name="mine")
    assert ad.name == "mine" and ad.path == os.fspath(tmp_path / "a")
    assert ad.projections == ("q", "up") and ad.layers == (1,) and ad.max_rank == 3
    assert ad.rank(1, "up") == 3 and ad.rank(0, "up") == 0 and ad.rank(1, "v") == 0
    assert ad.nbytes == 4 * 3 * (64 + 64 + 64 + 96)
    assert ad.peft_config["r"] == 3 and ad.peft_config["peft_type"] == "LORA"


def test_hand_written_config_targets(hf_model, base_config, tmp_path):
    """Configs peft never writes itself but accepts: "all-linear" literally, and no target_modules (llama: q, v)."""
    d = tmp_path / "a"
    make_peft_adapter(hf_model, d, r=2, target_modules="all-linear", alpha=4)
    _edit_config(d, target_modules="ALL-LINEAR")
    assert set(load_adapter(d, base_config).modules) == _ALL
    make_peft_adapter(hf_model, d, r=2, target_modules=["q_proj", "v_proj"], alpha=4)
    _edit_config(d, target_modules=None, fan_in_fan_out=True)
    assert load_adapter(d, base_config).projections == ("q", "v")


def test_bf16_tensors(hf_model, base_config, tmp_path):
    d = tmp_path / "a"
    make_peft_adapter(hf_model, d, r=4, target_modules=["k_proj"], alpha=8)
    f32 = load_file(d / WEIGHTS)
    bf16 = {k: torch.from_numpy(v).to(torch.bfloat16) for k, v in f32.items()}
    safetensors.torch.save_file(bf16, d / WEIGHTS)
    a_ref = bf16[f"base_model.model.{module_name(1, 'k')}.lora_A.weight"].float().numpy().T
    ad = load_adapter(d, base_config)
    np.testing.assert_array_equal(ad.modules[(1, "k")].a, a_ref)
    ad16 = load_adapter(d, base_config, dtype=ml_dtypes.bfloat16)
    assert ad16.modules[(1, "k")].a.dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(ad16.modules[(1, "k")].a.astype(np.float32), a_ref)


def test_packed_reference_matches_peft_forward(hf_model, base_config, tmp_path):
    """load -> pack -> lora_reference reproduces each peft LoRA layer's delta (its output minus the base layer's)."""
    cases = ["rank_alpha_pattern", "all_linear_rslora"]
    models, adapters = [], []
    for case in cases:
        models.append(make_peft_adapter(hf_model, tmp_path / case, **LOAD_CASES[case][0]))
        adapters.append(load_adapter(tmp_path / case, base_config))
    packed = pack_slots(adapters, base_config)
    rng = np.random.default_rng(0)
    for s, model in enumerate(models):
        for layer, proj in peft_lora_modules(model):
            lin = model.get_submodule(f"base_model.model.{module_name(layer, proj)}")
            h_in, h_out = base_config.projection_shape(proj)
            x_TxI = rng.standard_normal((3, h_in)).astype(np.float32)
            with torch.no_grad():
                xt = torch.from_numpy(x_TxI)
                delta_ref = (lin(xt) - lin.base_layer(xt)).numpy()
            w = jax.tree.map(lambda t: t[layer], packed[proj])
            delta = lora_reference(jnp.zeros((3, h_out)), jnp.asarray(x_TxI), w, jnp.full((3,), s, jnp.int32))
            np.testing.assert_allclose(np.asarray(delta), delta_ref, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------- pack_slots


def _random_adapter(name, ranks: dict[tuple[int, str], int], cfg: LlamaConfig, seed: int) -> LoraAdapter:
    rng = np.random.default_rng(seed)
    modules = {}
    for (layer, proj), r in ranks.items():
        h_in, h_out = cfg.projection_shape(proj)
        a = rng.standard_normal((h_in, r)).astype(np.float32)
        b = rng.standard_normal((r, h_out)).astype(np.float32)
        modules[(layer, proj)] = LoraModule(a=a, b=b, scale=float(rng.uniform(0.5, 2.0)))
    return LoraAdapter(name=name, path=None, modules=modules, peft_config={})


@pytest.fixture
def three_adapters(base_config):
    return [
        _random_adapter("x", {(0, "q"): 4, (1, "q"): 4, (0, "k"): 4}, base_config, 0),
        _random_adapter("y", {(1, "q"): 2, (0, "down"): 3}, base_config, 1),
        _random_adapter("z", {(0, "q"): 8, (1, "k"): 1}, base_config, 2),
    ]


def test_pack_shapes_padding_scale(three_adapters, base_config):
    packed = pack_slots(three_adapters, base_config)
    assert sorted(packed) == ["down", "k", "q"]
    n_layers = base_config.num_hidden_layers
    for proj, r_max in (("q", 8), ("k", 4), ("down", 3)):
        h_in, h_out = base_config.projection_shape(proj)
        w = packed[proj]
        assert w.a.shape == (n_layers, 3, h_in, r_max) and w.b.shape == (n_layers, 3, r_max, h_out)
        assert w.a.dtype == jnp.float32 and w.ranks.dtype == jnp.int32 and w.ranks.shape == (n_layers, 3)
        a, b, ranks = map(np.asarray, w)
        for s, ad in enumerate(three_adapters):
            for layer in range(n_layers):
                m = ad.modules.get((layer, proj))
                r = 0 if m is None else m.rank
                assert ranks[layer, s] == r
                assert not a[layer, s, :, r:].any() and not b[layer, s, r:, :].any()
                if m is not None:
                    np.testing.assert_array_equal(a[layer, s, :, :r], m.a)
                    np.testing.assert_allclose(b[layer, s, :r], m.b * np.float32(m.scale), rtol=1e-6)


def test_pack_lora_reference_per_row(three_adapters, base_config):
    packed = pack_slots(three_adapters, base_config)
    rng = np.random.default_rng(3)
    slot_T = np.array([0, 1, 2, -1, 2, 0, 1], np.int32)
    for proj, w_L in packed.items():
        h_in, h_out = base_config.projection_shape(proj)
        for layer in range(base_config.num_hidden_layers):
            x_TxI = rng.standard_normal((len(slot_T), h_in)).astype(np.float32)
            y_TxO = rng.standard_normal((len(slot_T), h_out)).astype(np.float32)
            w = jax.tree.map(lambda t: t[layer], w_L)
            got = lora_reference(jnp.asarray(y_TxO), jnp.asarray(x_TxI), w, jnp.asarray(slot_T))
            want = y_TxO.copy()
            for t, s in enumerate(slot_T):
                m = three_adapters[s].modules.get((layer, proj)) if s >= 0 else None
                if m is not None:
                    want[t] += x_TxI[t] @ m.a @ m.b * m.scale
            np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-4)


def test_pack_max_rank_and_dtype(three_adapters, base_config):
    packed = pack_slots(three_adapters, base_config, dtype=jnp.bfloat16, max_rank=16)
    assert packed["k"].a.shape[-1] == 16 and packed["down"].b.shape[-2] == 16
    assert packed["q"].a.dtype == jnp.bfloat16 and packed["q"].b.dtype == jnp.bfloat16
    with pytest.raises(AdapterError, match=r"adapter 'z' layer 0 q: rank 8 exceeds max_rank 4"):
        pack_slots(three_adapters, base_config, max_rank=4)
    assert pack_slots([], base_config) == {}


def test_pack_rejects_wrong_shape(base_config):
    bad = _random_adapter("w", {(0, "v"): 2}, base_config, 0)
    bad.modules[(0, "k")] = LoraModule(a=np.zeros((64, 2), np.float32), b=np.zeros((2, 64), np.float32), scale=1.0)
    with pytest.raises(AdapterError, match=r"adapter 'w' layer 0 k: .* do not fit"):
        pack_slots([bad], base_config)


# ---------------------------------------------------------------------------- errors


@pytest.fixture(scope="session")
def good_dir(hf_model, tmp_path_factory):
    d = tmp_path_factory.mktemp("good") / "adapter"
    make_peft_adapter(hf_model, d, r=4, target_modules=["q_proj", "k_proj", "v_proj", "down_proj"], alpha=8)
    return d


def _edit_config(d, **changes):
    cfg = json.loads((d / CONFIG).read_text())
    cfg.update(changes)
    (d / CONFIG).write_text(json.dumps(cfg))


def _edit_tensors(fn):
    def mutate(d):
        tensors = load_file(d / WEIGHTS)
        fn(tensors)
        save_file(tensors, d / WEIGHTS)

    return mutate


def _config(**changes):
    return lambda d: _edit_config(d, **changes)


def _name(layer, proj, kind):
    return f"base_model.model.{module_name(layer, proj)}.{kind}.weight"


def _set(name, value):
    return _edit_tensors(lambda t: t.__setitem__(name, np.asarray(value, np.float32)))


def _poison(name, value):
    def fn(t):
        t[name] = t[name].copy()
        t[name][0, -1] = value

    return _edit_tensors(fn)


def _rename_layer(old, new):
    def fn(t):
        for k in [k for k in t if f".layers.{old}." in k]:
            t[k.replace(f".layers.{old}.", f".layers.{new}.")] = t.pop(k)

    return _edit_tensors(fn)


def _bin_only(d):
    os.remove(d / WEIGHTS)
    (d / "adapter_model.bin").write_bytes(b"pickle")


def _drop(name):
    return _edit_tensors(lambda t: t.pop(name))


_Q0_A, _Q0_B = _name(0, "q", "lora_A"), _name(0, "q", "lora_B")

# name -> (mutation of a good adapter folder, file named in the message, regex of the message)
ERROR_CASES = {
    "no_config": (lambda d: os.remove(d / CONFIG), CONFIG, "missing adapter config"),
    "no_weights": (lambda d: os.remove(d / WEIGHTS), WEIGHTS, "missing adapter weights"),
    "bin_only": (_bin_only, "adapter_model.bin", "convert the adapter to safetensors"),
    "broken_json": (lambda d: (d / CONFIG).write_text('{"r": 4,'), CONFIG, "unreadable JSON"),
    "json_not_object": (lambda d: (d / CONFIG).write_text("[1]"), CONFIG, "expected a JSON object"),
    "prefix_tuning": (_config(peft_type="PREFIX_TUNING"), CONFIG, "peft_type 'PREFIX_TUNING' is not supported"),
    "dora_config": (_config(use_dora=True), CONFIG, "DoRA"),
    "dora_tensor": (
        _set(_Q0_A.replace("lora_A.weight", "lora_magnitude_vector"), np.ones(64)),
        WEIGHTS,
        "lora_magnitude_vector' is a DoRA magnitude vector",
    ),
    "modules_to_save": (_config(modules_to_save=["lm_head"]), CONFIG, "modules_to_save"),
    "bias_all": (_config(bias="all"), CONFIG, "bias='all'"),
    "lora_bias": (_config(lora_bias=True), CONFIG, "lora_bias"),
    "embedding_lora": (
        _set("base_model.model.model.embed_tokens.lora_embedding_A", np.ones((4, 128))),
        WEIGHTS,
        "unexpected tensor .*lora_embedding_A",
    ),
    "lm_head_lora": (
        _set("base_model.model.lm_head.lora_A.weight", np.ones((4, 64))),
        WEIGHTS,
        "'lm_head'.* not one of",
    ),
    "missing_A": (_drop(_Q0_A), WEIGHTS, "q_proj.lora_B.weight' has no matching lora_A"),
    "missing_B": (_drop(_name(1, "down", "lora_B")), WEIGHTS, "down_proj.lora_A.weight' has no matching lora_B"),
    "A_wrong_shape": (
        _set(_Q0_A, np.ones((4, 32))),
        WEIGHTS,
        r"q_proj.lora_A.weight' has shape \[4, 32\], expected \[4, 64\]",
    ),
    "gqa_B_wrong_shape": (
        _set(_name(1, "k", "lora_B"), np.ones((64, 4))),
        WEIGHTS,
        r"k_proj.lora_B.weight' has shape \[64, 4\], expected \[32, 4\]",
    ),
    "rank_differs_from_config": (
        _config(r=8),
        WEIGHTS,
        r"lora_A.weight' has shape \[4, \d+\], expected \[8, \d+\]",
    ),
    "rank_pattern_differs": (
        _config(rank_pattern={"down_proj": 2}),
        WEIGHTS,
        r"down_proj.lora_A.weight' has shape \[4, 96\], expected \[2, 96\]",
    ),
    "rank_0": (_config(r=0), CONFIG, r"r is 0; ranks must be integers in 1..256"),
    "rank_300": (_config(r=300), CONFIG, r"r is 300; ranks must be"),
    "rank_pattern_300": (_config(rank_pattern={"q_proj": 300}), CONFIG, r"rank_pattern\['q_proj'\] is 300"),
    "rank_float": (_config(r=4.0), CONFIG, "ranks must be integers"),
    "nan": (_poison(_name(0, "v", "lora_B"), np.nan), WEIGHTS, "v_proj.lora_B.weight' has NaN or Inf"),
    "inf": (_poison(_name(1, "down", "lora_A"), np.inf), WEIGHTS, "down_proj.lora_A.weight' has NaN or Inf"),
    "layer_out_of_range": (_rename_layer(1, 5), WEIGHTS, "layer 5 but the base model has 2 layers"),
    "untargeted_module": (
        _config(target_modules=["q_proj", "k_proj", "v_proj"]),
        WEIGHTS,
        "mlp.down_proj are present but .* does not target",
    ),
    "layers_to_transform_excludes": (_config(layers_to_transform=[0]), WEIGHTS, "layers.1.* does not target"),
    "layers_pattern_no_match": (
        _config(layers_to_transform=[0, 1], layers_pattern=["h", "blocks"]),
        WEIGHTS,
        "layers.0.* does not target",
    ),
    "excluded_module": (
        _config(exclude_modules=["model.layers.0.self_attn.q_proj"]),
        WEIGHTS,
        "layers.0.self_attn.q_proj are present but .* does not target",
    ),
    "target_modules_not_str": (_config(target_modules=5), CONFIG, "target_modules must be a string or a list"),
    "regex_with_layers": (
        _config(target_modules=".*q_proj", layers_to_transform=[0]),
        CONFIG,
        "cannot be used with a string",
    ),
    "bad_regex": (_config(target_modules="(q_proj"), CONFIG, "invalid regular expression"),
    "no_tensors": (lambda d: save_file({}, d / WEIGHTS), WEIGHTS, "no LoRA tensors"),
    "garbage_safetensors": (lambda d: (d / WEIGHTS).write_bytes(b"\x01\x02"), WEIGHTS, "shorter than"),
}


@pytest.mark.parametrize("case", list(ERROR_CASES))
def test_load_errors(case, good_dir, base_config, tmp_path):
    mutate, filename, pattern = ERROR_CASES[case]
    d = tmp_path / "adapter"
    shutil.copytree(good_dir, d)
    mutate(d)
    with pytest.raises(AdapterError, match=pattern) as e:
        load_adapter(d, base_config)
    assert os.path.join(d, filename) in str(e.value)


def test_good_dir_loads(good_dir, base_config):
    """The error cases above start from a valid folder."""
    ad = load_adapter(good_dir, base_config)
    assert ad.projections == ("q", "k", "v", "down") and ad.max_rank == 4
    assert all(m.scale == 8 / 4 for m in ad.modules.values())

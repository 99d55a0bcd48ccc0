"""Malformed Hugging Face model folders: every problem is a `CheckpointError` naming the file.

Each test copies a good tiny model folder (see `conftest.tiny_model_dirs`) into
`tmp_path`, breaks one thing, and checks the error message names the offending
file and, where it applies, the tensor or config field.
"""

from __future__ import annotations

import json
import os
import shutil
import struct

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from slora_jax.config import LlamaConfig, RopeScaling
from slora_jax.errors import CheckpointError
from slora_jax.model.checkpoint import load_checkpoint, read_config

F32 = jnp.float32
UP1 = "model.layers.1.mlp.up_proj.weight"


# ----------------------------------------------------------------------------- helpers


def _copy(tiny_model_dirs, tmp_path, name: str = "llama2_mha") -> str:
    dst = tmp_path / name
    shutil.copytree(tiny_model_dirs[name], dst)
    return str(dst)


def _cfg_path(d: str) -> str:
    return os.path.join(d, "config.json")


def _read_cfg(d: str) -> dict:
    with open(_cfg_path(d)) as f:
        return json.load(f)


def _write_cfg(d: str, cfg) -> None:
    with open(_cfg_path(d), "w") as f:
        json.dump(cfg, f)


def _edit_cfg(d: str, **changes) -> dict:
    cfg = _read_cfg(d)
    for k, v in changes.items():
        if v is _DELETE:
            cfg.pop(k, None)
        else:
            cfg[k] = v
    _write_cfg(d, cfg)
    return cfg


_DELETE = object()


def _weights_path(d: str) -> str:
    return os.path.join(d, "model.safetensors")


def _tensors(d: str) -> dict[str, np.ndarray]:
    return load_file(_weights_path(d))


def _write_tensors(d: str, tensors: dict[str, np.ndarray]) -> None:
    save_file(tensors, _weights_path(d))


def _raises(match_parts, fn, *args, **kwargs) -> str:
    """Call fn, assert a CheckpointError whose message contains every part; return the message."""
    with pytest.raises(CheckpointError) as ei:
        fn(*args, **kwargs)
    msg = str(ei.value)
    for part in match_parts:
        assert part in msg, f"{part!r} not in error message {msg!r}"
    return msg


def _assert_trees_equal(a, b) -> None:
    la, ta = jax.tree_util.tree_flatten(a)
    lb, tb = jax.tree_util.tree_flatten(b)
    assert ta == tb
    for x, y in zip(la, lb):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


# ----------------------------------------------------------------------------- error class


def test_checkpoint_error_is_value_error():
    assert issubclass(CheckpointError, ValueError)
    with pytest.raises(ValueError):
        raise CheckpointError("x")


def test_value_error_catches_load_failures(tmp_path):
    with pytest.raises(ValueError):
        load_checkpoint(tmp_path / "nope", dtype=F32)


# ----------------------------------------------------------------------------- folder / config.json


def test_directory_missing(tmp_path):
    missing = tmp_path / "does_not_exist"
    _raises([str(missing)], load_checkpoint, missing, dtype=F32)


def test_read_config_directory_missing(tmp_path):
    missing = tmp_path / "does_not_exist"
    _raises([os.path.join(missing, "config.json")], read_config, missing)


def test_not_a_directory(tmp_path):
    f = tmp_path / "model.safetensors"
    f.write_bytes(b"\0" * 16)
    _raises([str(f), "not a directory"], load_checkpoint, f, dtype=F32)


def test_no_config_json(tiny_model_dirs, tmp_path):
    d = _copy(tiny_model_dirs, tmp_path)
    os.remove(_cfg_path(d))
    _raises([_cfg_path(d), "not found"], load_checkpoint, d, dtype=F32)


def test_config_not_json(tiny_model_dirs, tmp_path):
    d = _copy(tiny_model_dirs, tmp_path)
    with open(_cfg_path(d), "w") as f:
        f.write('{"hidden_size": 64,,, oops')
    _raises([_cfg_path(d)], load_checkpoint, d, dtype=F32)


def test_config_not_utf8(tiny_model_dirs, tmp_path):
    d = _copy(tiny_model_dirs, tmp_path)
    with open(_cfg_path(d), "wb") as f:
        f.write(b"\xff\xfe\x00garbage\x80\x81")
    _raises([_cfg_path(d)], load_checkpoint, d, dtype=F32)


def test_config_json_list(tiny_model_dirs, tmp_path):
    d = _copy(tiny_model_dirs, tmp_path)
    _write_cfg(d, [_read_cfg(d)])
    _raises([_cfg_path(d), "JSON object"], load_checkpoint, d, dtype=F32)


# ----------------------------------------------------------------------------- unsupported config values


@pytest.mark.parametrize(
    "changes",
    [
        dict(model_type="mistral", architectures=["MistralForCausalLM"]),
        dict(model_type="mistral"),
        dict(architectures=["MistralForCausalLM"]),
    ],
    ids=["both", "model_type", "architectures"],
)
def test_unsupported_architecture(tiny_model_dirs, tmp_path, changes):
    d = _copy(tiny_model_dirs, tmp_path)
    _edit_cfg(d, **changes)
    _raises([_cfg_path(d), "architectures"], load_checkpoint, d, dtype=F32)


@pytest.mark.parametrize(
    "field,value",
    [("attention_bias", True), ("mlp_bias", True), ("hidden_act", "gelu"), ("pretraining_tp", 2)],
)
def test_unsupported_field(tiny_model_dirs, tmp_path, field, value):
    d = _copy(tiny_model_dirs, tmp_path)
    _edit_cfg(d, **{field: value})
    _raises([_cfg_path(d), field], load_checkpoint, d, dtype=F32)
    _raises([_cfg_path(d), field], read_config, d)


_ROPE_TYPES = ["linear", "dynamic", "yarn"]


@pytest.mark.parametrize("rope_type", _ROPE_TYPES)
def test_unsupported_rope_type_v5(tiny_model_dirs, tmp_path, rope_type):
    d = _copy(tiny_model_dirs, tmp_path)
    _edit_cfg(d, rope_parameters={"rope_type": rope_type, "factor": 2.0, "rope_theta": 10000.0})
    _raises([_cfg_path(d), "rope_parameters", rope_type], load_checkpoint, d, dtype=F32)


@pytest.mark.parametrize("key", ["type", "rope_type"])
@pytest.mark.parametrize("rope_type", _ROPE_TYPES)
def test_unsupported_rope_type_v4(tiny_model_dirs, tmp_path, rope_type, key):
    d = _copy(tiny_model_dirs, tmp_path)
    _edit_cfg(d, rope_parameters=_DELETE, rope_theta=10000.0, rope_scaling={key: rope_type, "factor": 2.0})
    _raises([_cfg_path(d), "rope_scaling", rope_type], load_checkpoint, d, dtype=F32)


def test_llama3_rope_missing_low_freq_factor_v5(tiny_model_dirs, tmp_path):
    d = _copy(tiny_model_dirs, tmp_path, "llama3_gqa")
    rope = _read_cfg(d)["rope_parameters"]
    del rope["low_freq_factor"]
    _edit_cfg(d, rope_parameters=rope)
    _raises([_cfg_path(d), "rope_parameters", "low_freq_factor"], load_checkpoint, d, dtype=F32)


def test_llama3_rope_missing_low_freq_factor_v4(tiny_model_dirs, tmp_path):
    d = _copy(tiny_model_dirs, tmp_path, "llama3_gqa")
    rope = _read_cfg(d)["rope_parameters"]
    theta = rope.pop("rope_theta")
    del rope["low_freq_factor"]
    _edit_cfg(d, rope_parameters=_DELETE, rope_theta=theta, rope_scaling=rope)
    _raises([_cfg_path(d), "rope_scaling", "low_freq_factor"], load_checkpoint, d, dtype=F32)


@pytest.mark.parametrize(
    "field",
    [
        "hidden_size",
        "num_attention_heads",
        "vocab_size",
        "intermediate_size",
        "num_hidden_layers",
    ],
)
def test_missing_required_field(tiny_model_dirs, tmp_path, field):
    d = _copy(tiny_model_dirs, tmp_path)
    _edit_cfg(d, **{field: _DELETE})
    _raises([_cfg_path(d), field], load_checkpoint, d, dtype=F32)


def test_non_numeric_hidden_size(tiny_model_dirs, tmp_path):
    d = _copy(tiny_model_dirs, tmp_path)
    _edit_cfg(d, hidden_size="sixty-four")
    _raises([_cfg_path(d), "hidden_size"], load_checkpoint, d, dtype=F32)


def test_heads_not_multiple_of_kv_heads(tiny_model_dirs, tmp_path):
    d = _copy(tiny_model_dirs, tmp_path)
    _edit_cfg(d, num_key_value_heads=3)
    _raises([_cfg_path(d), "num_key_value_heads"], load_checkpoint, d, dtype=F32)


# ----------------------------------------------------------------------------- accepted config variants


def test_v4_llama3_config_matches_v5(tiny_model_dirs, tmp_path):
    d5 = tiny_model_dirs["llama3_gqa"]
    cfg5 = read_config(d5)
    assert cfg5.rope_scaling == RopeScaling(
        factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=16
    )
    assert cfg5.rope_theta == 500000.0

    for key in ("rope_type", "type"):
        d4 = str(tmp_path / key)
        shutil.copytree(d5, d4)
        rope = _read_cfg(d4)["rope_parameters"]
        theta = rope.pop("rope_theta")
        del rope["rope_type"]
        rope[key] = "llama3"
        _edit_cfg(d4, rope_parameters=_DELETE, rope_theta=theta, rope_scaling=rope)
        assert read_config(d4) == cfg5, key


def test_v4_default_rope_config_matches_v5(tiny_model_dirs, tmp_path):
    d5 = tiny_model_dirs["llama2_mha"]
    d4 = _copy(tiny_model_dirs, tmp_path)
    _edit_cfg(d4, rope_parameters=_DELETE, rope_theta=10000.0, rope_scaling=None)
    assert read_config(d4) == read_config(d5)


def test_llama1_config_without_kv_heads_is_mha(tiny_model_dirs, tmp_path):
    d = _copy(tiny_model_dirs, tmp_path)
    # Llama-1 configs: no num_key_value_heads, head_dim, rope_parameters/rope_theta, biases.
    _edit_cfg(
        d, num_key_value_heads=_DELETE, head_dim=_DELETE, rope_parameters=_DELETE,
        attention_bias=_DELETE, mlp_bias=_DELETE, pretraining_tp=_DELETE,
    )
    cfg = read_config(d)
    assert cfg.num_key_value_heads == cfg.num_attention_heads == 4
    assert cfg.head_dim == 16
    assert cfg.rope_theta == 10000.0 and cfg.rope_scaling is None
    cfg_loaded, params = load_checkpoint(d, dtype=F32)
    assert cfg_loaded == cfg
    _, ref = load_checkpoint(tiny_model_dirs["llama2_mha"], dtype=F32)
    _assert_trees_equal(params, ref)


def test_eos_token_id_list(tiny_model_dirs, tmp_path):
    d = _copy(tiny_model_dirs, tmp_path)
    _edit_cfg(d, eos_token_id=[2, 7, 9])
    assert read_config(d).eos_token_ids == (2, 7, 9)


def test_eos_token_id_int_and_null(tiny_model_dirs, tmp_path):
    d = _copy(tiny_model_dirs, tmp_path)
    assert read_config(d).eos_token_ids == (2,)
    _edit_cfg(d, eos_token_id=None)
    assert read_config(d).eos_token_ids == ()


def test_from_hf_direct_source_in_message():
    with pytest.raises(CheckpointError, match="my/config.json.*hidden_act"):
        LlamaConfig.from_hf({"hidden_act": "relu"}, source="my/config.json")


# ----------------------------------------------------------------------------- weight files


def test_only_pytorch_bin(tiny_model_dirs, tmp_path):
    d = _copy(tiny_model_dirs, tmp_path)
    os.remove(_weights_path(d))
    with open(os.path.join(d, "pytorch_model.bin"), "wb") as f:
        f.write(b"PK\x03\x04 not really a pickle")
    msg = _raises(["pytorch_model.bin", "pickle", "safetensors"], load_checkpoint, d, dtype=F32)
    assert os.path.join(d, "pytorch_model.bin") in msg


def test_no_weight_file(tiny_model_dirs, tmp_path):
    d = _copy(tiny_model_dirs, tmp_path)
    os.remove(_weights_path(d))
    _raises([d, "model.safetensors"], load_checkpoint, d, dtype=F32)


def _shard(d: str) -> tuple[str, dict]:
    """Split model.safetensors into two shards plus an index; returns (index path, index dict)."""
    tensors = _tensors(d)
    os.remove(_weights_path(d))
    names = sorted(tensors)
    half = len(names) // 2
    shards = {
        "model-00001-of-00002.safetensors": names[:half],
        "model-00002-of-00002.safetensors": names[half:],
    }
    weight_map = {}
    for fname, ns in shards.items():
        save_file({n: tensors[n] for n in ns}, os.path.join(d, fname))
        weight_map.update({n: fname for n in ns})
    index = {"metadata": {"total_size": 0}, "weight_map": weight_map}
    index_path = os.path.join(d, "model.safetensors.index.json")
    with open(index_path, "w") as f:
        json.dump(index, f)
    return index_path, index


def test_sharded_loads_same_as_single(tiny_model_dirs, tmp_path):
    d = _copy(tiny_model_dirs, tmp_path)
    _shard(d)
    cfg, params = load_checkpoint(d, dtype=F32)
    cfg_ref, ref = load_checkpoint(tiny_model_dirs["llama2_mha"], dtype=F32)
    assert cfg == cfg_ref
    _assert_trees_equal(params, ref)


def test_index_names_missing_shard(tiny_model_dirs, tmp_path):
    d = _copy(tiny_model_dirs, tmp_path)
    index_path, _ = _shard(d)
    os.remove(os.path.join(d, "model-00002-of-00002.safetensors"))
    _raises([index_path, "model-00002-of-00002.safetensors"], load_checkpoint, d, dtype=F32)


def test_index_not_json(tiny_model_dirs, tmp_path):
    d = _copy(tiny_model_dirs, tmp_path)
    index_path, _ = _shard(d)
    with open(index_path, "w") as f:
        f.write("{not json")
    _raises([index_path], load_checkpoint, d, dtype=F32)


def test_index_without_weight_map(tiny_model_dirs, tmp_path):
    d = _copy(tiny_model_dirs, tmp_path)
    index_path, _ = _shard(d)
    with open(index_path, "w") as f:
        json.dump({"metadata": {}}, f)
    _raises([index_path, "weight_map"], load_checkpoint, d, dtype=F32)


def test_index_weight_map_non_string_value(tiny_model_dirs, tmp_path):
    d = _copy(tiny_model_dirs, tmp_path)
    index_path, index = _shard(d)
    index["weight_map"] = {k: 1 for k in index["weight_map"]}
    with open(index_path, "w") as f:
        json.dump(index, f)
    _raises([index_path], load_checkpoint, d, dtype=F32)


# ----------------------------------------------------------------------------- tensors


def test_missing_tensor(tiny_model_dirs, tmp_path):
    d = _copy(tiny_model_dirs, tmp_path)
    t = _tensors(d)
    del t[UP1]
    _write_tensors(d, t)
    _raises(["model.safetensors", UP1, "missing"], load_checkpoint, d, dtype=F32)


def test_missing_tensor_in_sharded(tiny_model_dirs, tmp_path):
    d = _copy(tiny_model_dirs, tmp_path)
    t = _tensors(d)
    del t["model.norm.weight"]
    _write_tensors(d, t)
    _shard(d)
    _raises(
        ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors", "model.norm.weight"],
        load_checkpoint, d, dtype=F32,
    )


def test_missing_lm_head_untied(tiny_model_dirs, tmp_path):
    d = _copy(tiny_model_dirs, tmp_path)
    t = _tensors(d)
    del t["lm_head.weight"]
    _write_tensors(d, t)
    _raises(["model.safetensors", "lm_head.weight"], load_checkpoint, d, dtype=F32)


@pytest.mark.parametrize(
    "name,shape",
    [
        ("model.layers.0.self_attn.q_proj.bias", (64,)),
        ("model.layers.2.input_layernorm.weight", (64,)),  # llama2_mha has 2 layers
        ("model.layers.7.mlp.up_proj.weight", (96, 64)),
        ("model.some_new_thing.weight", (64,)),
    ],
)
def test_unexpected_tensor(tiny_model_dirs, tmp_path, name, shape):
    d = _copy(tiny_model_dirs, tmp_path)
    t = _tensors(d)
    t[name] = np.zeros(shape, np.float32)
    _write_tensors(d, t)
    _raises([_weights_path(d), name, "unexpected"], load_checkpoint, d, dtype=F32)


@pytest.mark.parametrize(
    "name",
    [UP1, "model.layers.0.self_attn.k_proj.weight", "model.embed_tokens.weight", "lm_head.weight"],
)
def test_transposed_kernel_shape_mismatch(tiny_model_dirs, tmp_path, name):
    d = _copy(tiny_model_dirs, tmp_path, "llama3_gqa")  # k_proj [16, 64]: not square
    t = _tensors(d)
    assert t[name].shape[0] != t[name].shape[1]
    t[name] = np.ascontiguousarray(t[name].T)
    _write_tensors(d, t)
    msg = _raises([_weights_path(d), name, "shape"], load_checkpoint, d, dtype=F32)
    assert str(list(t[name].shape)) in msg


def test_norm_shape_mismatch(tiny_model_dirs, tmp_path):
    d = _copy(tiny_model_dirs, tmp_path)
    t = _tensors(d)
    name = "model.layers.1.post_attention_layernorm.weight"
    t[name] = np.ones(63, np.float32)
    _write_tensors(d, t)
    _raises([_weights_path(d), name, "shape"], load_checkpoint, d, dtype=F32)


def test_truncated_safetensors(tiny_model_dirs, tmp_path):
    d = _copy(tiny_model_dirs, tmp_path)
    p = _weights_path(d)
    data = open(p, "rb").read()
    with open(p, "wb") as f:
        f.write(data[: len(data) // 2])
    _raises([p], load_checkpoint, d, dtype=F32)


def test_garbage_safetensors(tiny_model_dirs, tmp_path):
    d = _copy(tiny_model_dirs, tmp_path)
    p = _weights_path(d)
    with open(p, "wb") as f:
        f.write(np.random.default_rng(0).bytes(4096))
    _raises([p], load_checkpoint, d, dtype=F32)


def test_tiny_safetensors_file(tiny_model_dirs, tmp_path):
    d = _copy(tiny_model_dirs, tmp_path)
    p = _weights_path(d)
    with open(p, "wb") as f:
        f.write(b"abc")
    _raises([p, "8-byte"], load_checkpoint, d, dtype=F32)


def test_header_length_larger_than_file(tiny_model_dirs, tmp_path):
    d = _copy(tiny_model_dirs, tmp_path)
    p = _weights_path(d)
    data = bytearray(open(p, "rb").read())
    data[:8] = struct.pack("<Q", len(data) * 2)
    with open(p, "wb") as f:
        f.write(data)
    _raises([p, "header length"], load_checkpoint, d, dtype=F32)


def test_header_not_json(tiny_model_dirs, tmp_path):
    d = _copy(tiny_model_dirs, tmp_path)
    p = _weights_path(d)
    header = b"{this is not json}"
    with open(p, "wb") as f:
        f.write(struct.pack("<Q", len(header)) + header + b"\0" * 64)
    _raises([p], load_checkpoint, d, dtype=F32)


def test_header_json_list(tiny_model_dirs, tmp_path):
    d = _copy(tiny_model_dirs, tmp_path)
    p = _weights_path(d)
    header = b"[1, 2, 3]"
    with open(p, "wb") as f:
        f.write(struct.pack("<Q", len(header)) + header)
    _raises([p, "JSON object"], load_checkpoint, d, dtype=F32)


def test_header_unknown_dtype(tiny_model_dirs, tmp_path):
    d = _copy(tiny_model_dirs, tmp_path)
    p = _weights_path(d)
    header = json.dumps({"model.norm.weight": {"dtype": "F8_E9M9", "shape": [64], "data_offsets": [0, 64]}})
    with open(p, "wb") as f:
        f.write(struct.pack("<Q", len(header)) + header.encode() + b"\0" * 64)
    _raises([p, "model.norm.weight"], load_checkpoint, d, dtype=F32)


# ----------------------------------------------------------------------------- tolerated extras


def test_tied_model_with_lm_head_loads(tiny_model_dirs, tmp_path):
    d = _copy(tiny_model_dirs, tmp_path, "tied_headdim")
    t = _tensors(d)
    assert "lm_head.weight" not in t
    # A saved lm_head that differs from the embedding must be ignored, as transformers does.
    t["lm_head.weight"] = np.full_like(t["model.embed_tokens.weight"], 123.0)
    _write_tensors(d, t)
    cfg, params = load_checkpoint(d, dtype=F32)
    assert cfg.tie_word_embeddings
    _, ref = load_checkpoint(tiny_model_dirs["tied_headdim"], dtype=F32)
    _assert_trees_equal(params, ref)


def test_old_checkpoint_with_rotary_inv_freq_loads(tiny_model_dirs, tmp_path):
    d = _copy(tiny_model_dirs, tmp_path)
    t = _tensors(d)
    for i in range(2):
        t[f"model.layers.{i}.self_attn.rotary_emb.inv_freq"] = np.arange(8, dtype=np.float32)
    _write_tensors(d, t)
    _, params = load_checkpoint(d, dtype=F32)
    _, ref = load_checkpoint(tiny_model_dirs["llama2_mha"], dtype=F32)
    _assert_trees_equal(params, ref)


def test_tensor_in_two_shards(tiny_model_dirs, tmp_path):
    d = _copy(tiny_model_dirs, tmp_path)
    tensors = _tensors(d)
    index_path, index = _shard(d)
    first, second = sorted(set(index["weight_map"].values()))
    dup = next(n for n, f in index["weight_map"].items() if f == first)
    shard2 = os.path.join(d, second)
    save_file({**load_file(shard2), dup: tensors[dup]}, shard2)
    _raises([dup, "also appears"], load_checkpoint, d, dtype=F32)

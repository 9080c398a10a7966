"""ModelConfig: HF config.json in and out, validation errors, and the released presets' parameter counts."""

import json

import jax
import numpy as np
import pytest
from flax import nnx

from granite_jax import ConfigError, GraniteForCausalLM, ModelConfig, load_preset
from granite_jax.config import PRESETS_DIR

RELEASES = ["granite-4.0-h-small", "granite-4.0-h-tiny", "granite-4.0-h-micro", "granite-4.0-micro",
            "granite-4.0-h-1b", "granite-4.0-h-350m", "granite-4.0-1b", "granite-4.0-350m"]


def parameter_count(config: ModelConfig) -> int:
    abstract = nnx.eval_shape(lambda: GraniteForCausalLM(config, rngs=nnx.Rngs(0)))  # allocates nothing
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(abstract, nnx.Param)))


@pytest.mark.parametrize("name, expected", [
    ("granite-4.0-h-small", 32_207_337_984),  # IBM: 32.2B
    ("granite-4.0-350m", 352_379_904),  # published safetensors count, exact
])
def test_published_parameter_counts_exact(name, expected):
    assert parameter_count(load_preset(name)) == expected


@pytest.mark.parametrize("name, billions", [("granite-4.0-h-tiny", 6.94), ("granite-4.0-h-1b", 1.46)])
def test_published_parameter_counts_rounded(name, billions):
    assert round(parameter_count(load_preset(name)) / 1e9, 2) == billions


@pytest.mark.parametrize("name", RELEASES)
def test_release_presets_are_consistent(name):
    config = load_preset(name)
    assert config.vocab_size == 100352 and config.tie_word_embeddings
    assert config.attention_multiplier == 1.0 / config.attention_head_dim  # family-wide pattern
    if config.num_mamba_layers:
        assert config.position_embedding_type == "nope" and config.num_attention_layers == 4
    else:
        assert config.uses_rope


def test_hf_config_round_trip_through_transformers(tmp_path):
    from transformers import AutoConfig

    config = load_preset("granite-4.0-h-tiny")
    config.save_hf(tmp_path)
    hf = AutoConfig.from_pretrained(tmp_path)
    assert hf.model_type == "granitemoehybrid"
    assert [t in ("mamba", "linear_attention") for t in hf.layer_types] == [t == "mamba" for t in config.layer_types]
    assert hf.num_local_experts == 64 and hf.mamba_d_head == 64 and hf.tie_word_embeddings
    hf.save_pretrained(tmp_path / "again")
    assert ModelConfig.from_hf(tmp_path / "again") == config


def test_writes_legacy_layer_names_and_accepts_both():
    config = ModelConfig(num_hidden_layers=2, layer_types=["linear_attention", "full_attention"],
                         hidden_size=64, num_attention_heads=4, mamba_n_heads=8)
    assert config.layer_types == ("mamba", "attention")
    assert config.to_hf()["layer_types"] == ["mamba", "attention"]
    legacy = {**config.to_hf(), "layer_types": None, "layers_block_type": ["mamba", "attention"]}
    assert ModelConfig.from_hf(legacy) == config


def test_from_hf_accepts_dir_file_and_dict(tmp_path):
    config = load_preset("tiny-hybrid-moe")
    path = config.save_hf(tmp_path)
    assert (ModelConfig.from_hf(tmp_path) == ModelConfig.from_hf(path) == ModelConfig.from_hf(json.load(open(path)))
            == config)


def test_rope_parameters_of_transformers_5():
    raw = {**load_preset("tiny-dense-rope").to_hf(), "rope_parameters": {"rope_theta": 123.0, "rope_type": "default"}}
    del raw["rope_theta"]
    assert ModelConfig.from_hf(raw).rope_theta == 123.0


def test_extra_keys_survive_a_round_trip():
    raw = {**load_preset("tiny-hybrid-moe").to_hf(), "normalization_function": "rmsnorm", "torch_dtype": "bfloat16"}
    out = ModelConfig.from_hf(raw).to_hf()
    assert out["normalization_function"] == "rmsnorm" and out["torch_dtype"] == "bfloat16"
    assert "compute_dtype" not in out and "moe_impl" not in out


BASE = dict(hidden_size=64, num_hidden_layers=2, layer_types=["mamba", "attention"], num_attention_heads=4,
            num_key_value_heads=2, mamba_n_heads=8, mamba_d_head=16, num_local_experts=4, num_experts_per_tok=2,
            intermediate_size=32, shared_intermediate_size=32)


@pytest.mark.parametrize("change, message", [
    (dict(mamba_d_head=12),
     r"mamba_n_heads \* mamba_d_head = 8 \* 12 = 96 must equal mamba_expand \* hidden_size = 2 \* 64 = 128"),
    (dict(layer_types=["mamba"]), r"layer_types has 1 entries but num_hidden_layers=2"),
    (dict(layer_types=["mamba", "ssm"]), r"layer_types\[1\]='ssm' is not a known layer kind"),
    (dict(num_key_value_heads=3), r"num_attention_heads=4 is not divisible by num_key_value_heads=3"),
    (dict(num_experts_per_tok=5), r"num_experts_per_tok=5 must be between 1 and num_local_experts=4"),
    (dict(mamba_n_groups=3), r"mamba_n_heads=8 is not divisible by mamba_n_groups=3"),
    (dict(hidden_act="gelu"), r"hidden_act='gelu' is not supported"),
    (dict(compute_dtype="float64"), r"compute_dtype='float64' is not one of"),
    (dict(moe_impl="dense"), r"moe_impl='dense' is not one of"),
    (dict(remat_policy="some"), r"remat_policy='some' is not one of"),
    (dict(attention_block_size=0), r"attention_block_size=0 must be a positive integer"),
    (dict(hidden_size=0), r"hidden_size=0 must be a positive integer"),
    (dict(pad_token_id=40000), r"pad_token_id=40000 is outside the vocabulary"),
    (dict(time_step_limit=(1.0, 0.5)), r"time_step_limit=\(1.0, 0.5\) must be \(low, high\)"),
])
def test_validation_errors_name_the_field(change, message):
    with pytest.raises(ConfigError, match=message):
        ModelConfig(**{**BASE, **change})


def test_wrong_model_type_and_bad_json(tmp_path):
    with pytest.raises(ConfigError, match="model_type='llama'"):
        ModelConfig.from_hf({"model_type": "llama"})
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        ModelConfig.from_hf(tmp_path)
    with pytest.raises(FileNotFoundError):
        ModelConfig.from_hf(tmp_path / "missing")


def test_unknown_preset_and_unknown_yaml_keys(tmp_path):
    with pytest.raises(ConfigError, match="unknown model preset 'granite-9'.*available"):
        load_preset("granite-9")
    bad = tmp_path / "bad.yaml"
    bad.write_text("hidden_size: 64\nhiden_layers: 3\n")
    with pytest.raises(ConfigError, match=r"unknown model config keys \['hiden_layers'\]"):
        load_preset(str(bad))


def test_every_preset_loads():
    import os

    for name in sorted(os.listdir(PRESETS_DIR)):
        load_preset(name[:-5])

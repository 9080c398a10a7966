"""HF checkpoint import/export: round trips, sharding, and clear errors for bad checkpoints."""

import json
import os
import pickle

import numpy as np
import pytest
from conftest import forward, hf_logits, max_rel_error, random_ids
from flax import nnx
from safetensors.numpy import load_file, save_file

from granite_jax import CheckpointError, GraniteForCausalLM, ModelConfig, load_hf_checkpoint, save_hf_checkpoint
from granite_jax.convert.hf import safetensors_files


def _tensors(directory):
    out = {}
    for path in safetensors_files(str(directory)):
        out.update(load_file(path))
    return out


@pytest.mark.parametrize("overrides", [{}, dict(tie_word_embeddings=False, mamba_proj_bias=True, attention_bias=True)],
                         ids=["tied", "untied_biases"])
def test_hf_ours_hf_is_byte_identical(hf_checkpoint, tmp_path, overrides):
    directory, _ = hf_checkpoint(**overrides)
    save_hf_checkpoint(load_hf_checkpoint(directory), tmp_path / "out")
    original, written = _tensors(directory), _tensors(tmp_path / "out")
    assert sorted(original) == sorted(written)
    assert ("lm_head.weight" in written) == (not overrides.get("tie_word_embeddings", True))
    for name, value in original.items():
        assert written[name].dtype == value.dtype and written[name].shape == value.shape, name
        assert written[name].tobytes() == value.tobytes(), name


def test_bfloat16_checkpoint_round_trips_in_bfloat16(hf_checkpoint, tmp_path):
    import torch

    directory, hf_model = hf_checkpoint()
    hf_model.to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
    save_hf_checkpoint(load_hf_checkpoint(tmp_path / "bf16"), tmp_path / "out")
    original, written = _tensors(tmp_path / "bf16"), _tensors(tmp_path / "out")
    for name, value in original.items():
        assert str(written[name].dtype) == "bfloat16" and written[name].tobytes() == value.tobytes(), name


@pytest.mark.parametrize("preset_overrides", [dict(tie_word_embeddings=True), dict(tie_word_embeddings=False)])
def test_ours_to_transformers_gives_same_logits(tmp_path, preset_overrides):
    from transformers import AutoModelForCausalLM

    config = ModelConfig(vocab_size=96, hidden_size=32, intermediate_size=16, shared_intermediate_size=24,
                         num_hidden_layers=2, layer_types=("mamba", "attention"), num_attention_heads=2,
                         num_key_value_heads=1, mamba_n_heads=4, mamba_d_head=16, mamba_d_state=8,
                         mamba_chunk_size=4, num_local_experts=4, num_experts_per_tok=2, rms_norm_eps=1e-5,
                         embedding_multiplier=12.0, **preset_overrides)
    model = GraniteForCausalLM(config, rngs=nnx.Rngs(7))
    save_hf_checkpoint(model, tmp_path / "ours")
    hf_model = AutoModelForCausalLM.from_pretrained(tmp_path / "ours").eval()
    ids = random_ids(5, (2, 11), vocab=96)
    assert max_rel_error(forward(model, ids).logits, hf_logits(hf_model, ids)) <= 1e-4


def test_sharded_save_writes_an_index_and_loads_back(hf_checkpoint, tmp_path):
    directory, hf_model = hf_checkpoint()
    model = load_hf_checkpoint(directory)
    files = save_hf_checkpoint(model, tmp_path / "sharded", max_shard_size=20_000)
    assert len(files) > 3
    index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(_tensors(directory))
    for path in files:  # a shard exceeds the limit only when it holds a single larger tensor
        tensors = load_file(path)
        assert len(tensors) == 1 or sum(t.nbytes for t in tensors.values()) <= 20_000
    ids = random_ids(6, (1, 9))
    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "sharded").eval()
    sharded = forward(load_hf_checkpoint(tmp_path / "sharded"), ids).logits
    assert max_rel_error(sharded, hf_logits(hf_model, ids)) <= 1e-4
    assert max_rel_error(hf_logits(reloaded, ids), hf_logits(hf_model, ids)) <= 1e-6


def _rewrite(directory, change):
    path = os.path.join(directory, "model.safetensors")
    tensors = load_file(path)
    change(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def test_missing_tensor_is_named(hf_checkpoint):
    directory, _ = hf_checkpoint()
    _rewrite(directory, lambda t: t.pop("model.layers.0.mamba.A_log"))
    with pytest.raises(CheckpointError, match=r"missing tensors: \['model.layers.0.mamba.A_log'\]"):
        load_hf_checkpoint(directory)


def test_unexpected_tensor_is_named(hf_checkpoint):
    directory, _ = hf_checkpoint()
    _rewrite(directory, lambda t: t.update({"model.layers.0.extra.weight": np.zeros(3, np.float32)}))
    with pytest.raises(CheckpointError, match="unexpected tensors.*model.layers.0.extra.weight"):
        load_hf_checkpoint(directory)


def test_shape_mismatch_is_named(hf_checkpoint):
    directory, _ = hf_checkpoint()
    _rewrite(directory, lambda t: t.update({"model.norm.weight": np.ones(65, np.float32)}))
    with pytest.raises(CheckpointError, match=r"'model.norm.weight' has shape \(65,\); the config implies \(64,\)"):
        load_hf_checkpoint(directory)


def test_pickle_checkpoint_is_refused_without_being_unpickled(hf_checkpoint, tmp_path):
    directory, _ = hf_checkpoint()
    os.remove(os.path.join(directory, "model.safetensors"))

    class Explodes:
        def __reduce__(self):
            return (os.makedirs, (str(tmp_path / "pwned"),))

    with open(os.path.join(directory, "pytorch_model.bin"), "wb") as f:
        pickle.dump(Explodes(), f)
    with pytest.raises(CheckpointError, match="pickle.*refuses"):
        load_hf_checkpoint(directory)
    assert not (tmp_path / "pwned").exists()


def test_missing_directory_and_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_hf_checkpoint(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no \\*.safetensors"):
        load_hf_checkpoint(tmp_path / "empty")


def test_index_naming_absent_shard(hf_checkpoint):
    directory, _ = hf_checkpoint()
    with open(os.path.join(directory, "model.safetensors.index.json"), "w") as f:
        json.dump({"weight_map": {"model.norm.weight": "model-00002-of-00002.safetensors"}}, f)
    with pytest.raises(CheckpointError, match="model-00002-of-00002.safetensors"):
        load_hf_checkpoint(directory)


def test_load_accepts_dtype_names_and_objects(hf_checkpoint):
    import jax.numpy as jnp

    directory, _ = hf_checkpoint()
    assert load_hf_checkpoint(directory, dtype=jnp.bfloat16).config.compute_dtype == "bfloat16"
    with pytest.raises(ValueError, match="dtype='int8'"):
        load_hf_checkpoint(directory, dtype="int8")

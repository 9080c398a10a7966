"""LoRA runs read back and exported: `merge_lora` folds W + alpha/r·AB, `load_run_model` rebuilds a LoRA run's base
from its init_from, `convert export` writes the merged model (transformers gives our logits) and `--adapter` a
PEFT adapter directory (peft gives our adapted model's logits), and a missing base or a full run is named."""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import convert_cli, forward, hf_logits, max_rel_error, random_ids
from flax import nnx
from safetensors.numpy import load_file

from granite_jax import GraniteForCausalLM, ModelConfig, load_hf_checkpoint, save_hf_checkpoint
from granite_jax.model.lora import LORA_TARGETS, adapters, apply_lora, has_lora, merge_lora
from granite_jax.sources import RunDirectory
from granite_jax.train.checkpoint import RunCheckpoints
from granite_jax.train.config import RunConfig, apply_overrides
from granite_jax.train.step import TrainState
from granite_jax.tree import path_names

RANK, ALPHA = 2, 6.0  # scale 3
# Two layers (Mamba, attention), each with a shared MLP beside 4 routed experts: all 8 targets, 10 adapters.
N_ADAPTERS = 2 + 4 + 2 * 2
# The shape of every test's token ids (11: not a multiple of the Mamba chunk of 4), so that the tests share the
# forwards compiled for it (of the adapted model, of the plain one).
IDS_SHAPE = (2, 11)


def _config():
    return ModelConfig(vocab_size=96, hidden_size=32, intermediate_size=16, shared_intermediate_size=24,
                       num_hidden_layers=2, layer_types=("mamba", "attention"), num_attention_heads=2,
                       num_key_value_heads=1, mamba_n_heads=4, mamba_d_head=16, mamba_d_state=8,
                       mamba_chunk_size=4, num_local_experts=4, num_experts_per_tok=2, rms_norm_eps=1e-5,
                       embedding_multiplier=12.0, tie_word_embeddings=True)


def _with_trained_adapters(model, seed=1):
    """`model` with adapters on all 8 targets and B drawn at random (as if trained), so that the adapted model
    differs from the base."""
    apply_lora(model, rank=RANK, alpha=ALPHA, dropout=0.1, targets=list(LORA_TARGETS), rngs=nnx.Rngs(seed))
    rng = np.random.default_rng(seed)
    for _, module in adapters(model):
        module.lora.lora_b[...] = jnp.asarray(rng.normal(0, 0.05, module.lora.lora_b.shape), jnp.float32)
    return model


def _flat(model, kind=nnx.Param):
    return {".".join(path_names(p)): np.asarray(v[...]) for p, v in nnx.to_flat_state(nnx.state(model, kind))}


def _save_run(run_dir, model, run: dict):
    """Write `model`'s trainable part as training does: TrainState(step 1, params, AdamW state); a LoRA run
    (`run` has `lora`) saves only its adapters."""
    params = nnx.state(model, nnx.LoRAParam if run.get("lora") else nnx.Param)
    state = TrainState(jnp.asarray(1, jnp.int32), params, optax.adamw(1e-3).init(params))
    checkpoints = RunCheckpoints(str(run_dir), keep=1, async_save=False)
    checkpoints.save(1, state, {}, {"model": model.config.to_hf(), "run": run})
    checkpoints.close()
    return str(run_dir)


def _lora_run(root):
    """(run dir, base HF dir, the adapted model): a LoRA run over init_from=hf:BASE with nonzero adapters."""
    base = root / "base"
    save_hf_checkpoint(GraniteForCausalLM(_config(), rngs=nnx.Rngs(7)), base)
    model = _with_trained_adapters(load_hf_checkpoint(base))
    run = apply_overrides(RunConfig(), {"init_from": f"hf:{base}", "lora": {
        "rank": RANK, "alpha": ALPHA, "dropout": 0.1, "targets": list(LORA_TARGETS)}}).to_dict()
    return _save_run(root / "lora-run", model, run), str(base), model


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    """`_lora_run`, shared by the tests that only read it (the run, its base and the model): they also share
    the compiled forwards of the adapted and of the plain model (the merged ones, the base)."""
    return _lora_run(tmp_path_factory.mktemp("lora"))


@pytest.mark.slow
def test_merge_lora_folds_alpha_over_r_ab_into_the_kernels_and_leaves_the_model_unchanged(lora_run):
    _, base_dir, model = lora_run
    before = _flat(model)
    merged = merge_lora(model)
    assert type(merged) is GraniteForCausalLM and not has_lora(merged)
    assert not any(isinstance(v, nnx.LoRAParam) for _, v in nnx.to_flat_state(nnx.state(merged)))
    weights = _flat(merged)
    assert set(weights) == {n for n in before if ".lora." not in n}
    for path, _ in adapters(model):
        name = ".".join(path_names(path))
        expected = before[f"{name}.kernel"] + 3.0 * before[f"{name}.lora.lora_a"] @ before[f"{name}.lora.lora_b"]
        np.testing.assert_allclose(weights[f"{name}.kernel"], expected, rtol=1e-6, atol=1e-7, err_msg=name)
        assert np.abs(weights[f"{name}.kernel"] - before[f"{name}.kernel"]).max() > 1e-3, name
    for name in set(weights) - {".".join(path_names(p)) + ".kernel" for p, _ in adapters(model)}:
        np.testing.assert_array_equal(weights[name], before[name], err_msg=name)  # not adapted: the same weights
    assert all(np.array_equal(before[n], v) for n, v in _flat(model).items())  # the input is untouched
    ids = random_ids(3, IDS_SHAPE, vocab=96)
    adapted = np.asarray(forward(model, ids).logits)
    assert max_rel_error(adapted, forward(load_hf_checkpoint(base_dir), ids).logits) > 1e-3
    assert max_rel_error(forward(merged, ids).logits, adapted) <= 1e-5


def test_a_lora_run_loads_merged_or_with_its_adapters(lora_run):
    run_dir, base, model = lora_run
    ids = random_ids(4, IDS_SHAPE, vocab=96)
    adapted = np.asarray(forward(model, ids).logits)
    merged, run, step = RunDirectory(run_dir).load_with_run()
    assert step == 1 and run["lora"]["rank"] == RANK and not has_lora(merged)
    assert max_rel_error(forward(merged, ids).logits, adapted) <= 1e-5
    unmerged = RunDirectory(run_dir).load(merge=False)
    assert len(adapters(unmerged)) == N_ADAPTERS
    for name, value in _flat(model).items():  # the base from hf:BASE, the adapters from the checkpoint
        np.testing.assert_array_equal(_flat(unmerged)[name], value, err_msg=name)


@pytest.mark.slow
def test_a_qlora_run_reads_back_quantised_and_merges_over_the_dequantised_base(lora_run, tmp_path):
    """A QLoRA run's adapters were trained over dequant(quant(W)): read back, the base is quantised again (the
    trained model exactly), and merged, every kernel is dequant(W) (+ alpha/r·AB where adapted) in float32.
    (The LoRA run's base and adapted model, its base quantised.)"""
    from granite_jax.model.quantize import quantize_base, quantized_tensors

    _, base, float_model = lora_run
    model = quantize_base(nnx.clone(float_model), "int8")
    run = apply_overrides(RunConfig(), {"init_from": f"hf:{base}", "lora": {
        "rank": RANK, "alpha": ALPHA, "dropout": 0.1, "targets": list(LORA_TARGETS),
        "quantize_base": "int8"}}).to_dict()
    run_dir = _save_run(tmp_path / "qlora-run", model, run)
    ids = random_ids(5, IDS_SHAPE, vocab=96)
    trained = np.asarray(forward(model, ids).logits)
    unmerged = RunDirectory(run_dir).load(merge=False)
    assert len(quantized_tensors(unmerged)) == len(quantized_tensors(model)) > N_ADAPTERS  # experts too
    np.testing.assert_array_equal(forward(unmerged, ids).logits, trained)
    merged = RunDirectory(run_dir).load()
    assert not quantized_tensors(merged) and not has_lora(merged)
    assert {v.dtype for v in _flat(merged).values()} == {np.dtype(np.float32)}
    assert max_rel_error(forward(merged, ids).logits, trained) <= 1e-5
    float_merged = merge_lora(float_model)  # the float base: not what trained
    assert max_rel_error(forward(float_merged, ids).logits, trained) > 1e-4


def test_init_from_a_lora_run_gives_the_merged_weights(lora_run, tmp_path):
    from granite_jax.train.setup import build_run

    run_dir, _, model = lora_run
    config = apply_overrides(RunConfig(), {"init_from": f"run:{run_dir}", "run_dir": str(tmp_path / "next"),
                                           "data": {"seq_len": 16, "batch_size": 2, "validation": []}})
    run = build_run(config, jax.devices()[:1])  # the weights read onto the run's mesh (its shardings)
    start = {".".join(n for n in path_names(p) if n != "value"): np.asarray(x)
             for p, x in jax.tree_util.tree_leaves_with_path(run.state.params)}
    expected = _flat(merge_lora(model))
    assert start.keys() == expected.keys()  # a plain model: no adapters
    for name, value in start.items():
        np.testing.assert_array_equal(value, expected[name], err_msg=name)


def test_export_of_a_lora_run_is_the_merged_model_transformers_loads(lora_run, tmp_path):
    from transformers import AutoModelForCausalLM

    run_dir, _, model = lora_run
    code, out, err = convert_cli("export", run_dir, tmp_path / "merged")
    assert code == 0, err
    assert "exported merged LoRA run step 1" in out
    hf_model = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    ids = random_ids(5, IDS_SHAPE, vocab=96)
    assert max_rel_error(hf_logits(hf_model, ids), forward(model, ids).logits) <= 1e-4


def test_adapter_export_is_a_peft_adapter_with_our_logits(lora_run, tmp_path):
    import torch
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer
    from transformers import AutoModelForCausalLM

    run_dir, base, model = lora_run
    out = tmp_path / "adapter"
    code, stdout, err = convert_cli("export", run_dir, out, "--adapter")
    assert code == 0, err
    assert f"PEFT base (base_model_name_or_path): {os.path.abspath(base)}" in stdout
    config = json.loads((out / "adapter_config.json").read_text())
    assert (config["peft_type"], config["task_type"], config["r"], config["lora_alpha"], config["bias"]) == (
        "LORA", "CAUSAL_LM", RANK, ALPHA, "none")
    assert config["lora_dropout"] == 0.1 and config["base_model_name_or_path"] == os.path.abspath(base)
    assert len(config["target_modules"]) == N_ADAPTERS
    assert "model.layers.0.shared_mlp.input_linear" in config["target_modules"]
    assert not any("block_sparse_moe" in t for t in config["target_modules"])  # never the routed experts
    tensors = load_file(out / "adapter_model.safetensors")
    assert len(tensors) == 2 * N_ADAPTERS
    a = tensors["base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight"]
    assert a.shape == (RANK, 32)  # (r, in): ours transposed

    hf_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(config["base_model_name_or_path"]),
                                         out).eval()
    lora_layers = {name: m for name, m in hf_model.named_modules() if isinstance(m, LoraLayer)}
    assert sorted(n.removeprefix("base_model.model.") for n in lora_layers) == sorted(config["target_modules"])
    ours = _flat(model)
    for name, layer in lora_layers.items():  # every adapter loaded (peft only warns on missing keys)
        key = name.removeprefix("base_model.model.")
        assert layer.scaling["default"] == 3.0
        np.testing.assert_array_equal(layer.lora_A["default"].weight.detach().numpy(), ours[f"{key}.lora.lora_a"].T)
        np.testing.assert_array_equal(layer.lora_B["default"].weight.detach().numpy(), ours[f"{key}.lora.lora_b"].T)
    ids = random_ids(6, IDS_SHAPE, vocab=96)
    with torch.no_grad():
        peft_logits = hf_model(input_ids=torch.tensor(np.asarray(ids)), use_cache=False).logits.numpy()
    adapted = np.asarray(forward(model, ids).logits)
    assert max_rel_error(adapted, forward(load_hf_checkpoint(base), ids).logits) > 1e-3  # the adapters matter
    assert max_rel_error(peft_logits, adapted) <= 1e-4


def test_adapter_export_of_a_full_run_and_a_lora_run_without_its_base_are_named(tmp_path):
    run_dir, base, _ = _lora_run(tmp_path)  # its own: its base is moved away, then replaced
    full = _save_run(tmp_path / "full-run", GraniteForCausalLM(_config(), rngs=nnx.Rngs(0)), {})
    code, _, err = convert_cli("export", full, tmp_path / "out", "--adapter")
    assert code == 2 and err.strip() == (f"error: --adapter: {full!r} is not a LoRA run (its saved config has no "
                                         "lora:), so it has no adapters to export; export its whole model without "
                                         "--adapter")
    assert not (tmp_path / "out").exists()

    shutil.move(base, tmp_path / "moved")
    with pytest.raises(FileNotFoundError) as error:
        RunDirectory(run_dir).load()
    assert str(error.value).startswith(f"{run_dir!r} is a LoRA run: its checkpoints hold only the adapters, whose "
                                       f"base is init_from='hf:{base}', and '{base}' is not a directory")
    code, _, err = convert_cli("export", run_dir, tmp_path / "out")
    assert code == 2 and len(err.strip().splitlines()) == 1 and f"'{base}' is not a directory" in err

    # A base replaced by another model: named, not a shape error from deep inside the restore.
    save_hf_checkpoint(GraniteForCausalLM(_config().replace(shared_intermediate_size=40), rngs=nnx.Rngs(0)), base)
    with pytest.raises(ValueError, match="no longer holds the model the run trained on: "
                                         r"model.layers.0.shared_mlp.input_linear.kernel has shape \(32, 80\), the "
                                         r"run's model \(32, 48\)"):
        RunDirectory(run_dir).load()


def test_fp8_and_gguf_exports_of_a_lora_run_are_the_merged_model(lora_run, tmp_path):
    """`convert export --format fp8 | gguf` of a LoRA run writes the merged model (base + alpha/r·AB): the FP8
    directory reads back within FP8 rounding of the merged logits, the GGUF file holds the merged kernels;
    `--adapter` with either format, and an `--outtype` that does not exist, are one error line each (naming the
    valid outtypes), writing nothing."""
    from gguf import GGUFReader

    run_dir, _, model = lora_run
    ids = random_ids(4, IDS_SHAPE, vocab=96)
    merged = merge_lora(model)
    fp8 = convert_cli("export", run_dir, tmp_path / "fp8", "--format", "fp8")
    assert "merged LoRA run" in fp8.ok().stdout
    assert max_rel_error(forward(load_hf_checkpoint(tmp_path / "fp8"), ids).logits,
                         forward(merged, ids).logits) <= 0.02
    gguf = convert_cli("export", run_dir, tmp_path / "merged.gguf", "--format", "gguf", "--outtype", "f32")
    assert "merged LoRA run" in gguf.ok().stdout
    tensors = {t.name: np.asarray(t.data) for t in GGUFReader(tmp_path / "merged.gguf").tensors}
    for name, layer in [("blk.1.attn_v.weight", merged.model.layers[1].self_attn.v_proj),
                        ("blk.0.ssm_out.weight", merged.model.layers[0].mamba.out_proj)]:
        kernel = np.asarray(layer.kernel[...])  # (in, out); a GGUF matrix's rows are the outputs
        assert np.abs(kernel - np.asarray(model_kernel(model, name))).max() > 1e-3  # the adapters changed it
        np.testing.assert_array_equal(tensors[name].reshape(kernel.T.shape), kernel.T, err_msg=name)
    for argv, message in [(["--format", "gguf", "--adapter"], "--adapter writes a PEFT adapter directory"),
                          (["--format", "fp8", "--adapter"], "--adapter writes a PEFT adapter directory"),
                          (["--format", "gguf", "--outtype", "q5_k"], "--outtype 'q5_k': expected one of f32, f16, "
                                                                      "bf16, q8_0, q4_k_m")]:
        out = tmp_path / ("bad.gguf" if "gguf" in argv else "bad")
        assert message in convert_cli("export", run_dir, out, *argv).error_line()
        assert not out.exists()


def model_kernel(model, gguf_name: str):
    """The base kernel (adapters not folded in) of the LoRA model's layer that `gguf_name` names."""
    layer = model.model.layers[int(gguf_name.split(".")[1])]
    return (layer.self_attn.v_proj if "attn_v" in gguf_name else layer.mamba.out_proj).kernel[...]

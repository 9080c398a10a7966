"""FP8 (compressed-tensors FP8_DYNAMIC) export and import, checked against compressed-tensors itself.

The reference is what llm-compressor's `QuantizationModifier(targets="Linear", scheme="FP8_DYNAMIC",
ignore=["lm_head", "re:.*block_sparse_moe.router"])` writes, built from compressed-tensors' own pieces (llm-compressor
pins transformers <= 5.17): its config, its per-channel min-max scales (`calculate_qparams`), its compressor. Under
transformers 5.23 the routed experts are no `Linear`, so the reference quantizes them as llm-compressor 0.14 does
after linearizing them: each expert's gate, up and down projection as its own linear, written split per expert.
"""

import copy
import json
import os
import shutil

import ml_dtypes
import numpy as np
import pytest
from conftest import TINY_HF, forward, hf_logits, make_hf_model, max_rel_error, random_ids
from flax import nnx
from safetensors.numpy import load_file, save_file

from granite_jax import CheckpointError, load_hf_checkpoint, save_hf_checkpoint
from granite_jax.formats import fp8, hf

# The release shapes, tiny: hybrid MoE with a shared expert (h-small, h-tiny), dense hybrid (h-1b, h-micro),
# all-attention (350m, 1b, micro).
MODELS = {"hybrid_moe": {}, "dense_hybrid": dict(num_local_experts=0),
          "all_attention": dict(num_hidden_layers=2, layer_types=["attention", "attention"], num_local_experts=0)}
IDS = random_ids(4, (2, 12), vocab=TINY_HF["vocab_size"])
# Logits of a model dequantized from FP8 against the BF16 model: measured at most 0.8% (relative to the largest
# logit) on these models.
FP8_LOGITS_TOLERANCE = 0.02


def _reference(bf16_dir, out_dir):
    """compressed-tensors' FP8_DYNAMIC checkpoint of `bf16_dir`, routed experts split per expert (see above)."""
    import torch
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import (
        QuantizationArgs,
        QuantizationConfig,
        QuantizationScheme,
        apply_quantization_config,
    )
    from compressed_tensors.quantization.lifecycle.forward import quantize
    from compressed_tensors.quantization.quant_scheme import FP8_DYNAMIC
    from compressed_tensors.quantization.utils import calculate_qparams
    from safetensors.torch import load_file as load_torch
    from safetensors.torch import save_file as save_torch
    from transformers import AutoModelForCausalLM

    def qparams(weight, args: QuantizationArgs):  # llm-compressor's min-max observer, per output channel
        return calculate_qparams(weight.amin(-1, keepdim=True), weight.amax(-1, keepdim=True), args)[0]

    model = AutoModelForCausalLM.from_pretrained(bf16_dir)
    scheme = QuantizationScheme(targets=["Linear"], **FP8_DYNAMIC)
    apply_quantization_config(model, QuantizationConfig(config_groups={"group_0": scheme},
                                                        ignore=["lm_head", "re:.*block_sparse_moe.router"]))
    for module in model.modules():
        if getattr(module, "quantization_scheme", None) is not None:
            module.weight_scale.data.copy_(qparams(module.weight.data, scheme.weights))
    compressor = ModelCompressor.from_pretrained_model(model, quantization_format="float-quantized")
    compressor.compress_model(model)
    model.save_pretrained(out_dir)
    compressor.update_config(out_dir)

    path = os.path.join(out_dir, "model.safetensors")
    tensors = load_torch(path)
    for name in [n for n in tensors if ".block_sparse_moe." in n and "_linear.weight" in n]:
        stacked = tensors.pop(name)
        kinds = ["down"] if "output_linear" in name else ["gate", "up"]
        for e, expert in enumerate(stacked):
            for kind, weight in zip(kinds, expert.chunk(len(kinds))):
                split = name.replace(name.split(".")[-2], f"experts.{e}.{kind}_proj")
                tensors[f"{split}_scale"] = qparams(weight, scheme.weights)
                tensors[split] = quantize(weight, tensors[f"{split}_scale"], None, scheme.weights,
                                          dtype=torch.float8_e4m3fn)
    save_torch(tensors, path, metadata={"format": "pt"})


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """`checkpoints(kind)`: {"model": the BF16 transformers model, "bf16": its directory, "ours": our FP8 export of
    it, "reference": compressed-tensors' FP8 checkpoint of it}, made once per module."""
    import torch

    cache = {}

    def get(kind):
        if kind not in cache:
            root = tmp_path_factory.mktemp(kind)
            model = make_hf_model(0, **MODELS[kind]).to(torch.bfloat16)
            model.save_pretrained(root / "bf16")
            save_hf_checkpoint(load_hf_checkpoint(root / "bf16"), root / "ours", quantize="fp8")
            _reference(root / "bf16", root / "reference")
            cache[kind] = {"model": model, **{k: root / k for k in ("bf16", "ours", "reference")}}
        return cache[kind]

    return get


def _tensors(directory) -> dict[str, np.ndarray]:
    """Every tensor of a checkpoint directory as numpy (float8 and bfloat16 as ml_dtypes), read by safetensors'
    torch reader (its numpy reader has no float8)."""
    import torch
    from safetensors.torch import load_file as load_torch

    as_numpy = {torch.float8_e4m3fn: (torch.uint8, ml_dtypes.float8_e4m3fn),
                torch.bfloat16: (torch.int16, ml_dtypes.bfloat16)}
    out = {}
    for path in hf.safetensors_files(str(directory)):
        for name, t in load_torch(path).items():
            view, dtype = as_numpy.get(t.dtype, (None, None))
            out[name] = t.numpy() if view is None else t.view(view).numpy().view(dtype)
    return out


def _quantization_config(directory):
    return json.loads((directory / "config.json").read_text())["quantization_config"]


def _dequantized(tensors, name):
    return tensors[name].astype(np.float32) * tensors[f"{name}_scale"].astype(np.float32)


@pytest.mark.parametrize("kind", MODELS)
def test_export_is_what_compressed_tensors_writes(checkpoints, kind):
    """The same tensors, byte for byte (FP8 codes, BF16 scales, the BF16 tensors kept; our 3-D experts split per
    expert as the reference writes them), and the same quantization_config."""
    paths = checkpoints(kind)
    ours, reference = _tensors(paths["ours"]), _tensors(paths["reference"])
    quantized = {n.rsplit(".", 2)[-2] for n in ours if str(ours[n].dtype) == "float8_e4m3fn"}
    assert quantized == {"q_proj", "k_proj", "v_proj", "o_proj", "in_proj", "out_proj", "input_linear",
                         "output_linear"} - ({"in_proj", "out_proj"} if kind == "all_attention" else set())
    assert any(".block_sparse_moe.input_linear" in n for n in ours) == (kind == "hybrid_moe")
    _split_experts(ours)
    assert sorted(ours) == sorted(reference)
    for name, theirs in reference.items():
        assert ours[name].dtype == theirs.dtype and ours[name].tobytes() == theirs.tobytes(), name
    config, theirs = _quantization_config(paths["ours"]), _quantization_config(paths["reference"])
    assert config.pop("version") == fp8.COMPRESSED_TENSORS_VERSION and theirs.pop("version")
    assert config == theirs


@pytest.mark.parametrize("kind", MODELS)
def test_transformers_decompresses_our_dense_layers(checkpoints, kind):
    """compressed-tensors, as transformers 5.23 loads our file, gives each quantized Linear exactly codes x scale
    (within FP8's rounding of the BF16 weight); without routed experts its logits (activations not quantized)
    match our import's."""
    import torch
    from transformers import AutoModelForCausalLM

    paths = checkpoints(kind)
    ours, bf16 = _tensors(paths["ours"]), _tensors(paths["bf16"])
    model = AutoModelForCausalLM.from_pretrained(paths["ours"], dtype=torch.float32).eval()
    for module in model.modules():  # weights only: no fake-quantized activations (FP8_DYNAMIC's per token)
        module.quantization_enabled = False
    theirs = hf_logits(model, IDS)  # the first forward decompresses
    state = {k: v.numpy() for k, v in model.state_dict().items()}
    checked = 0
    for name in (n for n in ours if str(ours[n].dtype) == "float8_e4m3fn" and "block_sparse_moe" not in n):
        weight = _dequantized(ours, name)
        assert state[name].dtype == np.float32 and np.array_equal(state[name], weight), name
        original = bf16[name].astype(np.float32)  # E4M3 rounds to 3 mantissa bits; below 2^-6, steps of 2^-9
        bound = np.abs(original) / 16 + ours[f"{name}_scale"].astype(np.float32) / 512
        assert np.all(np.abs(weight - original) <= bound * (1 + 1e-6)), name
        checked += 1
    assert checked >= 4
    if kind != "hybrid_moe":  # transformers 5.23 leaves 3-D routed experts as raw FP8 codes
        assert max_rel_error(forward(load_hf_checkpoint(paths["ours"]), IDS).logits, theirs) <= 1e-4


@pytest.mark.parametrize("kind", MODELS)
def test_import_dequantizes_compressed_tensors_file(checkpoints, kind):
    """Our import of the reference (llm-compressor layout: split FP8 experts): every parameter is codes x scale,
    and the logits are within FP8's error of the BF16 model's."""
    paths = checkpoints(kind)
    reference = _tensors(paths["reference"])
    model = load_hf_checkpoint(paths["reference"])
    assert "quantization_config" not in model.config.extra
    params = {".".join(map(str, p)): np.asarray(v[...]) for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    for name in (n for n in reference if str(reference[n].dtype) == "float8_e4m3fn" and ".experts." not in n):
        ours = params[name.removesuffix(".weight") + ".kernel"]
        assert np.array_equal(ours, _dequantized(reference, name).T), name
    if kind == "hybrid_moe":
        prefix = "model.layers.1.block_sparse_moe"
        gate_up = params[f"{prefix}.input_linear"][2].T  # ours [E, in, out]; expert 2, [2F, H]
        expected = np.concatenate([_dequantized(reference, f"{prefix}.experts.2.{k}_proj.weight")
                                   for k in ("gate", "up")])
        assert np.array_equal(gate_up, expected)
    bf16 = forward(load_hf_checkpoint(paths["bf16"]), IDS).logits
    assert max_rel_error(forward(model, IDS).logits, bf16) <= FP8_LOGITS_TOLERANCE
    assert max_rel_error(bf16, hf_logits(copy.deepcopy(paths["model"]).float(), IDS)) <= 1e-4


def test_our_export_imports_alike_whole_split_and_sharded(checkpoints, tmp_path):
    """Our 3-D file and the same codes split per expert import to the same parameters (so our experts dequantize
    right), within FP8's error of the BF16 model; a load onto shardings reads the same, and a slice of a
    dequantized tensor is the slice of the whole."""
    from granite_jax.parallel.mesh import RULES, make_mesh, parameter_shardings

    paths = checkpoints("hybrid_moe")
    whole = load_hf_checkpoint(paths["ours"])
    assert max_rel_error(forward(whole, IDS).logits, forward(load_hf_checkpoint(paths["bf16"]), IDS).logits) <= (
        FP8_LOGITS_TOLERANCE)
    _changed_copy(paths, tmp_path / "split", _split_experts)
    mesh = make_mesh({"fsdp": 1})
    abstract = nnx.eval_shape(lambda: whole)
    shardings = parameter_shardings(nnx.state(abstract, nnx.Param), mesh, RULES["fsdp"])
    expected = nnx.to_flat_state(nnx.state(whole, nnx.Param))
    for model in (load_hf_checkpoint(tmp_path / "split"), load_hf_checkpoint(paths["ours"], shardings=shardings)):
        for (path, variable), (_, other) in zip(expected, nnx.to_flat_state(nnx.state(model, nnx.Param))):
            assert np.array_equal(np.asarray(variable[...]), np.asarray(other[...])), path

    wanted = {}  # what load_hf_checkpoint expects: {HF name: (path, variable, HF shape, from HF)}
    for path, variable in expected:
        name, to_hf, from_hf = hf.hf_tensor_name(path)
        wanted[name] = (path, variable, to_hf(np.empty(variable.shape, np.bool_)).shape, from_hf)
    for directory in (tmp_path / "split", paths["ours"]):
        located = fp8.locate_tensors(str(directory), hf.safetensors_files(str(directory)), wanted, whole.config)
        for name in ("model.layers.1.block_sparse_moe.input_linear.weight", "model.layers.0.mamba.in_proj.weight"):
            view = located[name]
            full = view.get_tensor()
            index = tuple(slice(n // 4, n - n // 3) for n in view.get_shape())
            assert np.array_equal(view.get_slice()[index], full[index]), (directory, name)


def test_bf16_export_of_an_fp8_import_is_plain(checkpoints, tmp_path):
    paths = checkpoints("dense_hybrid")
    save_hf_checkpoint(load_hf_checkpoint(paths["ours"]), tmp_path / "bf16")
    config = json.loads((tmp_path / "bf16" / "config.json").read_text())
    assert "quantization_config" not in config and config["torch_dtype"] == "bfloat16"
    assert {str(t.dtype) for t in load_file(tmp_path / "bf16" / "model.safetensors").values()} == {"bfloat16"}


def _split_experts(tensors):
    """Our 3-D routed experts (codes and scales) rewritten in the split layout of newer llm-compressor."""
    for name in [n for n in tensors if "_linear.weight" in n and ".block_sparse_moe." in n]:
        stacked = tensors.pop(name)
        kinds = ["down"] if "output_linear" in name else ["gate", "up"]
        base = name.removesuffix("_scale")
        for e, expert in enumerate(stacked):
            for kind, part in zip(kinds, np.split(expert, len(kinds))):
                tensors[base.replace(base.split(".")[-2], f"experts.{e}.{kind}_proj") + name[len(base):]] = part


def _changed_copy(paths, directory, change, config_change=None):
    """A copy of our export of `paths` with its tensors changed in place by `change`, its quantization_config by
    `config_change`."""
    shutil.copytree(paths["ours"], directory)
    tensors = _tensors(directory)
    change(tensors)
    save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})
    if config_change:
        config = json.loads((directory / "config.json").read_text())
        config_change(config["quantization_config"])
        (directory / "config.json").write_text(json.dumps(config))
    return directory


@pytest.mark.parametrize("case, match", [
    ("missing", r"model.safetensors: FP8 tensor 'model.layers.0.mamba.in_proj.weight' has no scale "
                r"'model.layers.0.mamba.in_proj.weight_scale'$"),
    ("shape", r"scale 'model.layers.0.mamba.in_proj.weight_scale' is BF16 \(296,\); expected a float \(296, 1\)"),
    ("expert", r"scale 'model.layers.1.block_sparse_moe.input_linear.weight_scale' is BF16 \(4, 64\); expected a "
               r"float \(4, 64, 1\)"),
    ("split", r"missing tensors: \['model.layers.1.block_sparse_moe.experts.3.up_proj.weight'\]$"),
    ("scheme", r"config.json: quantization_config: group 'group_0' is format='float-quantized', weights type='int'"),
], ids=["missing", "shape", "expert", "split", "scheme"])
def test_a_bad_scale_or_scheme_is_one_error_naming_it(checkpoints, tmp_path, case, match):
    name = ("model.layers.1.block_sparse_moe.input_linear.weight" if case == "expert"
            else "model.layers.0.mamba.in_proj.weight")

    def change(tensors):
        if case == "missing":
            del tensors[f"{name}_scale"]
        elif case in ("shape", "expert"):
            tensors[f"{name}_scale"] = tensors[f"{name}_scale"][..., 0]
        elif case == "split":
            _split_experts(tensors)
            del tensors["model.layers.1.block_sparse_moe.experts.3.up_proj.weight"]

    def scheme(quant):
        quant["config_groups"]["group_0"]["weights"]["type"] = "int"

    directory = _changed_copy(checkpoints("hybrid_moe"), tmp_path / "broken", change,
                              scheme if case == "scheme" else None)
    with pytest.raises(CheckpointError, match=match) as error:
        load_hf_checkpoint(directory)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_quantize_rounds_as_compressed_tensors(dtype):
    """Edge rows against compressed-tensors: all zeros (scale = the dtype's eps), an absmax whose scale rounds
    down (the code saturates at 448), subnormal codes; in the checkpoint's dtype."""
    import torch
    from compressed_tensors.quantization.lifecycle.forward import quantize
    from compressed_tensors.quantization.quant_scheme import FP8_DYNAMIC
    from compressed_tensors.quantization.utils import calculate_qparams

    rows = [[0.0, 0.0, 0.0, 0.0], [1.0, -3.0, 2.0, 0.1], [1e-4, 0.5, -0.25, 3e-3], [7e-3, -1e-5, 2e-6, 0.0]]
    weight = torch.tensor(rows, dtype=getattr(torch, dtype))
    args = FP8_DYNAMIC["weights"]
    scale = calculate_qparams(weight.amin(-1, keepdim=True), weight.amax(-1, keepdim=True), args)[0]
    codes = quantize(weight, scale, None, args, dtype=torch.float8_e4m3fn)
    ours, our_scale = fp8.quantize(np.asarray(weight.float().numpy(), getattr(ml_dtypes, dtype, None) or dtype))
    assert str(our_scale.dtype) == dtype and our_scale.shape == (4, 1)
    assert our_scale.astype(np.float32).tolist() == scale.float().tolist()
    assert ours.astype(np.float32).tolist() == codes.float().tolist()
    assert np.abs(ours.astype(np.float32)).max() == 448.0


@pytest.mark.slow
def test_training_starts_from_an_fp8_checkpoint_at_the_bf16_models_loss(tmp_path):
    """`init_from=hf:` of compressed-tensors' FP8 checkpoint (llm-compressor's split-expert layout) of a model
    trains: its first loss is the BF16 model's within FP8 rounding (8.36301 against 8.36297, 5e-6 relative, at
    this random initialisation; bound 1e-3), and
    the run records a plain model (no quantization_config) to export."""
    import json as json_

    from conftest import metrics, train_tiny

    from granite_jax import GraniteForCausalLM, load_preset
    from granite_jax.formats.run import checkpoint_meta

    config = load_preset("tiny-hybrid-moe").replace(num_hidden_layers=2, layer_types=("mamba", "attention"))
    save_hf_checkpoint(GraniteForCausalLM(config, rngs=nnx.Rngs(42)), tmp_path / "bf16", dtype="bfloat16")
    _reference(tmp_path / "bf16", tmp_path / "fp8")
    assert "quantization_config" in json_.loads((tmp_path / "fp8" / "config.json").read_text())
    first = {}
    for name in ("bf16", "fp8"):
        train_tiny(tmp_path / f"run-{name}", "steps=1", f"init_from=hf:{tmp_path / name}", "model_overrides={}")
        first[name] = metrics(tmp_path / f"run-{name}")[0]
    assert abs(first["fp8"] - first["bf16"]) <= 1e-3 * first["bf16"], first
    assert "quantization_config" not in checkpoint_meta(str(tmp_path / "run-fp8"))[1]["model"]

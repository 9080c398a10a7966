"""FP8 checkpoints in the compressed-tensors `float-quantized` layout (scheme FP8_DYNAMIC), as IBM's Granite 4.0
FP8 releases and llm-compressor write them.

On disk: every quantized linear weight `X.weight` is float8 E4M3 codes with a per-output-channel symmetric scale
`X.weight_scale` of shape `[..., out, 1]` in the checkpoint's dtype (bfloat16 for the releases), such that
`W = codes * scale`; activations are quantized dynamically per token at run time by the reader (nothing stored).
Quantized: attention q/k/v/o, Mamba in_proj/out_proj, the shared MLP and the routed experts. Kept in the
checkpoint dtype: embeddings, lm_head, the routers, conv1d, norms, A_log, D, dt_bias and biases.

Routed experts are written in the 3-D layout of IBM's releases: `block_sparse_moe.input_linear.weight` [E, 2F, H]
codes with `input_linear.weight_scale` [E, 2F, 1], `output_linear.weight` [E, H, F] with [E, H, 1] (each expert
row scaled alone: what llm-compressor's Granite 4 recipe gives by quantizing the experts as one [E*out, in] linear
and reshaping back). vLLM's GraniteMoeHybrid loader reads this layout (it splits `input_linear.weight` and
`.weight_scale` per expert); transformers 5.23 reads neither expert layout correctly (the dense layers it
decompresses exactly). Reading accepts this layout and the split one of newer llm-compressor
(`block_sparse_moe.experts.{e}.{gate,up,down}_proj.weight[_scale]`).

Writing: `save_hf_checkpoint(..., quantize="fp8")` (`granite_jax.formats.hf`). The codes and scales are computed
as compressed-tensors computes them (0.20.1, `calculate_qparams` + `quantize`), in the checkpoint dtype:
scale = absmax over the input axis / 448 rounded to that dtype (0 -> the dtype's eps), codes =
clamp(round_to_dtype(W / scale), -448, 448) rounded to E4M3 (nearest, ties to even).

Reading: `load_hf_checkpoint` of a directory whose config.json has a compressed-tensors `quantization_config`
dequantizes each FP8 tensor as `codes.astype(float32) * scale` (also when each process reads only its slices).
The dequantized weights are the model's parameters: there is no FP8 compute here (a QLoRA base kept in FP8 is
not supported); activations are not quantized.
"""

from __future__ import annotations

import json
import math
import os
import re
import struct

import ml_dtypes
import numpy as np

from granite_jax.formats.errors import CheckpointError, naming_file

FP8_MAX = 448.0  # the largest finite float8_e4m3fn
COMPRESSED_TENSORS_VERSION = "0.20.1"  # the compressed-tensors release whose config.json this module writes
# The linear weights that FP8_DYNAMIC quantizes (targets: Linear; ignored: lm_head and the routers).
QUANTIZED = ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight",
             "self_attn.o_proj.weight", "mamba.in_proj.weight", "mamba.out_proj.weight",
             "shared_mlp.input_linear.weight", "shared_mlp.output_linear.weight",
             "block_sparse_moe.input_linear.weight", "block_sparse_moe.output_linear.weight")


def is_quantized(hf_name: str) -> bool:
    return hf_name.endswith(QUANTIZED)


def stored_bytes(shape: tuple, itemsize: int) -> int:
    """On-disk bytes of a quantized weight whose parameter (ours, input axis second to last) has `shape`."""
    size = math.prod(shape)
    return size + size // shape[-2] * itemsize


def quantize(weight: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(float8_e4m3fn codes, scales [..., out, 1]) of an HF-layout weight [..., out, in], in its dtype, as
    compressed-tensors computes them (each operation in float32, rounded to the weight's dtype as torch does)."""
    codes = np.empty(weight.shape, ml_dtypes.float8_e4m3fn)
    scales = np.empty((*weight.shape[:-1], 1), weight.dtype)
    for index in np.ndindex(weight.shape[:-2]):  # an expert at a time: bounded temporaries
        codes[index], scales[index] = _quantize_2d(weight[index])
    return codes, scales


def _quantize_2d(weight: np.ndarray):
    dtype = weight.dtype
    absmax = np.max(np.abs(weight.astype(np.float32)), axis=-1, keepdims=True)
    scale = (absmax / np.float32(FP8_MAX)).astype(dtype)
    scale = np.where(scale.astype(np.float32) == 0, np.asarray(ml_dtypes.finfo(dtype).eps, dtype), scale)
    scaled = (weight.astype(np.float32) / scale.astype(np.float32)).astype(dtype).astype(np.float32)
    return np.clip(scaled, -FP8_MAX, FP8_MAX).astype(ml_dtypes.float8_e4m3fn), scale


def quantization_config(config) -> dict:
    """config.json's `quantization_config`, as compressed-tensors 0.20.1 writes it for llm-compressor's
    `QuantizationModifier(targets="Linear", scheme="FP8_DYNAMIC", ignore=["lm_head", "re:.*block_sparse_moe.router"])`
    on a GraniteMoeHybrid model (the ignore list spelled out in checkpoint names)."""
    def args(strategy, dynamic):
        return {"dynamic": dynamic, "group_size": None, "num_bits": 8, "strategy": strategy, "symmetric": True,
                "type": "float"}

    routers = [f"model.layers.{i}.block_sparse_moe.router.layer" for i in range(config.num_hidden_layers)
               if config.is_moe]
    return {
        "config_groups": {"group_0": {"format": "float-quantized", "input_activations": args("token", True),
                                      "output_activations": None, "targets": ["Linear"],
                                      "weights": args("channel", False)}},
        "format": "float-quantized", "global_compression_ratio": None, "ignore": [*routers, "lm_head"],
        "kv_cache_scheme": None, "moe_sparsity_config": None, "quant_method": "compressed-tensors",
        "quantization_status": "compressed", "sparsity_config": {}, "transform_config": {},
        "version": COMPRESSED_TENSORS_VERSION,
    }


# --------------------------------------------------------------------------------------------- reading
def strip_quantization(directory: str, config):
    """(config without its `quantization_config`, whether it had one). A quantization other than
    compressed-tensors' per-channel symmetric FP8 weights is a CheckpointError."""
    quant = config.extra.get("quantization_config")
    if quant is None:
        return config, False
    where = f"{os.path.join(directory, 'config.json')}: quantization_config"
    if not isinstance(quant, dict) or quant.get("quant_method") != "compressed-tensors":
        method = quant.get("quant_method") if isinstance(quant, dict) else quant
        raise CheckpointError(f"{where} has quant_method={method!r}; granite_jax reads only compressed-tensors FP8 "
                              "checkpoints (float-quantized, per-channel weights)")
    groups = quant.get("config_groups") or {}
    for name, group in groups.items():
        group = group or {}
        weights = group.get("weights") or {}
        fmt = group.get("format") or quant.get("format")
        scheme = (fmt, weights.get("type"), weights.get("num_bits"), weights.get("strategy"), weights.get("symmetric"))
        if scheme != ("float-quantized", "float", 8, "channel", True):
            raise CheckpointError(
                f"{where}: group {name!r} is format={fmt!r}, weights type={weights.get('type')!r}, "
                f"num_bits={weights.get('num_bits')!r}, strategy={weights.get('strategy')!r}, "
                f"symmetric={weights.get('symmetric')!r}; only float-quantized 8-bit float weights, per channel and "
                "symmetric (FP8_DYNAMIC), are supported")
    return config.replace(extra={k: v for k, v in config.extra.items() if k != "quantization_config"}), True


_SPLIT_EXPERT = re.compile(r"(.+\.block_sparse_moe)\.experts\.(\d+)\.(gate|up|down)_proj\.weight$")
_DTYPES = {"F8_E4M3": ml_dtypes.float8_e4m3fn, "BF16": ml_dtypes.bfloat16, "F16": np.float16, "F32": np.float32}


def locate_tensors(directory: str, files: list[str], expected: dict, config) -> dict:
    """`hf._locate_tensors` for a compressed-tensors directory: {HF name: file, or a `Dequantized` view for an FP8
    tensor or split experts}. A missing, unexpected or mis-shaped tensor or scale is a CheckpointError naming it."""
    headers = {}
    for file in files:
        with naming_file(file):
            headers.update({name: _Stored(file, *entry) for name, entry in _read_header(file).items()})
    located, unexpected, split = {}, [], {}
    for name, stored in headers.items():
        match = _SPLIT_EXPERT.match(name)
        if name.endswith(".weight_scale"):
            if name[: -len("_scale")] not in headers:
                unexpected.append(name)
        elif match:
            split[name] = match
        elif name not in expected:
            if not (name == "lm_head.weight" and config.tie_word_embeddings):
                unexpected.append(name)
        else:
            _check_shape(name, stored, expected[name][2])
            located[name] = _piece(name, headers)
    for target in _split_targets(split, expected, unexpected):
        if target in located:
            raise CheckpointError(f"{directory!r}: {target!r} is stored both whole and split per expert")
        located[target] = _stacked(target, headers, expected[target][2], directory)
    if unexpected:
        raise CheckpointError(f"{directory!r}: unexpected tensors not used by the model: {sorted(unexpected)}")
    missing = sorted(set(expected) - set(located))
    if missing:
        raise CheckpointError(f"{directory!r}: missing tensors: {missing}")
    return {name: source.file if isinstance(source, _Piece) and source.scale is None else
            Dequantized(source, expected[name][2]) for name, source in located.items()}


class _Stored:
    """One tensor of a safetensors file: its dtype, shape and bytes, read through a memory map (safetensors'
    numpy reader has no float8)."""

    def __init__(self, file, dtype, shape, offset):
        self.file, self.dtype, self.shape, self.offset = file, dtype, tuple(shape), offset

    def __getitem__(self, index):
        return np.memmap(self.file, _DTYPES[self.dtype], "r", self.offset, self.shape)[index]


def _read_header(file: str) -> dict:
    """{name: (dtype, shape, byte offset in the file)} from a safetensors header."""
    with open(file, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(length))
    header.pop("__metadata__", None)
    return {name: (entry["dtype"], entry["shape"], 8 + length + entry["data_offsets"][0])
            for name, entry in header.items()}


def _check_shape(name: str, stored: _Stored, shape: tuple) -> None:
    if stored.shape != tuple(shape):
        raise CheckpointError(f"{os.path.basename(stored.file)}: tensor {name!r} has shape {stored.shape}; the "
                              f"config implies {tuple(shape)}")


class _Piece:
    """A stored weight, and its scale if it is FP8 codes."""

    def __init__(self, weight: _Stored, scale: _Stored | None):
        self.weight, self.scale, self.file, self.shape = weight, scale, weight.file, weight.shape

    def read(self, index: tuple) -> np.ndarray:
        values = self.weight[index].astype(np.float32)
        if self.scale is None:
            return values
        return values * self.scale[(*index[:-1], slice(None))].astype(np.float32)


def _piece(name: str, headers: dict) -> _Piece:
    weight, scale = headers[name], headers.get(name + "_scale")
    where = os.path.basename(weight.file)
    if weight.dtype.startswith("F8_") and weight.dtype != "F8_E4M3":
        raise CheckpointError(f"{where}: tensor {name!r} is {weight.dtype}; the FP8 codes must be F8_E4M3")
    if weight.dtype != "F8_E4M3":
        if scale is not None:
            raise CheckpointError(f"{where}: {name!r} is {weight.dtype}, not FP8, but has a {name + '_scale'!r}")
        return _Piece(weight, None)
    if scale is None:
        raise CheckpointError(f"{where}: FP8 tensor {name!r} has no scale {name + '_scale'!r}")
    if scale.shape != (*weight.shape[:-1], 1) or scale.dtype == "F8_E4M3" or scale.dtype not in _DTYPES:
        raise CheckpointError(f"{os.path.basename(scale.file)}: scale {name + '_scale'!r} is {scale.dtype} "
                              f"{scale.shape}; expected a float {(*weight.shape[:-1], 1)} for {name!r} of shape "
                              f"{weight.shape} (per-output-channel FP8)")
    return _Piece(weight, scale)


def _split_targets(split: dict, expected: dict, unexpected: list) -> set[str]:
    """The 3-D HF names that split expert tensors make up; those of no expected parameter are unexpected."""
    targets = set()
    for name, match in split.items():
        target = f"{match[1]}.{'output' if match[3] == 'down' else 'input'}_linear.weight"
        if target not in expected or int(match[2]) >= expected[target][2][0]:
            unexpected.append(name)
        else:
            targets.add(target)
    return targets


def _stacked(target: str, headers: dict, shape: tuple, directory: str):
    """The per-expert pieces of a 3-D expert weight: [[gate, up] or [down] for each expert]."""
    prefix = target.rsplit(".", 2)[0]
    kinds = ("down",) if target.endswith("output_linear.weight") else ("gate", "up")
    names = [[f"{prefix}.experts.{e}.{kind}_proj.weight" for kind in kinds] for e in range(shape[0])]
    missing = [n for row in names for n in row if n not in headers]
    if missing:
        raise CheckpointError(f"{directory!r}: missing tensors: {missing}")
    rows = shape[1] // len(kinds)
    for n in (n for row in names for n in row):
        _check_shape(n, headers[n], (rows, shape[2]))
        if headers[n].dtype not in _DTYPES:
            raise CheckpointError(f"{os.path.basename(headers[n].file)}: tensor {n!r} is {headers[n].dtype}; "
                                  f"expected one of {sorted(_DTYPES)}")
    return [[_piece(n, headers) for n in row] for row in names]


class Dequantized:
    """One parameter's HF tensor in an FP8 directory, read as `load_hf_checkpoint` reads a safetensors file
    (`get_tensor`, or `get_slice(...)[index]` for the slices a process holds): FP8 codes times their scales in
    float32; split experts stacked into the 3-D tensor."""

    def __init__(self, source, shape: tuple):
        self.source, self.shape = source, tuple(shape)  # a _Piece, or [[_Piece]] per expert
        pieces = [source] if isinstance(source, _Piece) else [p for row in source for p in row]
        self.file = pieces[0].file
        self.dtype = "F8_E4M3" if any(p.scale is not None for p in pieces) else pieces[0].weight.dtype

    def __str__(self):  # the file that errors name
        return self.file

    def get_tensor(self, name=None) -> np.ndarray:
        return self[tuple(slice(None) for _ in self.shape)]

    def get_slice(self, name=None) -> Dequantized:
        return self

    def get_shape(self) -> list:
        return list(self.shape)

    def get_dtype(self) -> str:
        return self.dtype

    def __getitem__(self, index: tuple) -> np.ndarray:
        if isinstance(self.source, _Piece):
            return self.source.read(index)
        experts, rows, cols = (s.indices(n) for s, n in zip(index, self.shape))
        stacked = []
        for e in range(*experts):
            parts, start = [], 0
            for piece in self.source[e]:  # the expert's row blocks (gate then up), concatenated
                lo, hi = max(rows[0], start), min(rows[1], start + piece.shape[0])
                if lo < hi:
                    parts.append(piece.read((slice(lo - start, hi - start), slice(*cols))))
                start += piece.shape[0]
            stacked.append(np.concatenate(parts, axis=0))
        return np.stack(stacked)

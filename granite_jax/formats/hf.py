"""Hugging Face safetensors checkpoints ⇄ `GraniteForCausalLM`.

Names: our parameter path `model.layers.3.mamba.in_proj.kernel` is the on-disk `model.layers.3.mamba.in_proj.weight`
transposed; `hf_tensor_name` holds the few exceptions (router, experts, conv). Loading builds the model
abstractly and fills it one tensor at a time, so peak host memory stays near one copy of the model; given the
parameters' shardings on a mesh, each process reads only the slices of each tensor that its devices hold.
Pickle checkpoints (`*.bin`, `*.pt`, ...) are refused, never unpickled.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import errno
import json
import logging
import math
import os
from typing import Callable

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from granite_jax.config import ModelConfig
from granite_jax.formats import fp8
from granite_jax.formats.errors import CheckpointError, naming_file
from granite_jax.formats.signing import SIGNATURE_FILE, VerifySpec, verify_directory
from granite_jax.model.granite import GraniteForCausalLM

log = logging.getLogger("granite_jax.formats")

SAFE_INDEX = "model.safetensors.index.json"
SAFE_SINGLE = "model.safetensors"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
_NUMPY_DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}


# ---------------------------------------------------------------------------------------------- naming
def _transpose(a):
    return np.swapaxes(a, -1, -2)


def _conv_to_hf(kernel):  # (K, C) -> (C, 1, K)
    return np.ascontiguousarray(kernel.T[:, None, :])


def _conv_from_hf(weight):  # (C, 1, K) -> (K, C)
    return np.ascontiguousarray(weight[:, 0, :].T)


_identity = np.asarray


def _hf_index(from_hf: Callable, index: tuple) -> tuple:
    """The index of the on-disk tensor that holds the elements of our parameter's `index` (a tuple of slices),
    such that `from_hf(hf_tensor[_hf_index(from_hf, index)]) == parameter[index]`: every HF→ours transform is a
    permutation of axes, so a slice of ours is a slice of theirs (no tensor is split, fused or stacked)."""
    if from_hf is _transpose:
        return (*index[:-2], index[-1], index[-2])
    if from_hf is _conv_from_hf:  # ours (K, C) is theirs (C, 1, K)
        return (index[1], slice(None), index[0])
    if from_hf is _identity:
        return index
    raise ValueError(f"no slice mapping for the transform {from_hf.__name__}")


def hf_tensor_name(path: tuple) -> tuple[str, Callable, Callable]:
    """(HF name, ours→HF transform, HF→ours transform) for a parameter path of `GraniteForCausalLM`."""
    parts = [str(p) for p in path]
    name, leaf = ".".join(parts[:-1]), parts[-1]
    if parts[-2:] == ["conv1d", "kernel"]:
        return f"{name}.weight", _conv_to_hf, _conv_from_hf
    if parts[-2:] == ["router", "kernel"]:
        return f"{name}.layer.weight", _transpose, _transpose
    if parts[-2] == "block_sparse_moe" and leaf in ("input_linear", "output_linear"):
        return f"{name}.{leaf}.weight", _transpose, _transpose  # (E, in, out) <-> (E, out, in)
    if leaf == "kernel":
        return f"{name}.weight", _transpose, _transpose
    if leaf == "embed_tokens":
        return "model.embed_tokens.weight", _identity, _identity
    if leaf in ("bias", "weight"):
        return f"{name}.{leaf}", _identity, _identity
    return ".".join(parts), _identity, _identity  # dt_bias, A_log, D


# --------------------------------------------------------------------------------------------- loading
def _resolve_dtype(dtype) -> str:
    name = jnp.dtype(dtype).name if not isinstance(dtype, str) else dtype
    if name not in _NUMPY_DTYPES:
        raise ValueError(f"dtype={dtype!r}: expected one of {sorted(_NUMPY_DTYPES)}")
    return name


def safetensors_files(directory: str) -> list[str]:
    """The safetensors files of an HF checkpoint directory, from its index if it has one."""
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"checkpoint directory {directory!r} does not exist")
    index_path = os.path.join(directory, SAFE_INDEX)
    if os.path.isfile(index_path):
        with open(index_path) as f:
            weight_map = json.load(f).get("weight_map")
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{index_path}: no 'weight_map' mapping tensor names to files")
        for name in weight_map.values():
            _check_shard_name(index_path, name)
        files = sorted(set(weight_map.values()))
        missing = [f for f in files if not os.path.isfile(os.path.join(directory, f))]
        if missing:
            raise CheckpointError(f"{index_path} lists shard files that are not in {directory!r}: {missing}")
        return [os.path.join(directory, f) for f in files]
    entries = sorted(os.listdir(directory))
    shards = [e for e in entries if e.endswith(".safetensors")]
    if shards:
        return [os.path.join(directory, e) for e in shards]
    pickles = [e for e in entries if e.endswith(PICKLE_SUFFIXES)]
    if pickles:
        raise CheckpointError(
            f"{directory!r} holds only pickle checkpoint files {pickles}. Loading a pickle can execute arbitrary "
            "code, so granite_jax refuses it. Convert it once, in an environment you trust, with transformers: "
            "`AutoModelForCausalLM.from_pretrained(dir).save_pretrained(out_dir, safe_serialization=True)`.")
    raise CheckpointError(f"{directory!r} has no *.safetensors files (and no {SAFE_INDEX})")


def _check_shard_name(index_path: str, name) -> None:
    """A shard named by an index must be a plain file name in the checkpoint directory: `../x.safetensors`, a
    subdirectory or an absolute path would make loading read files the directory does not hold."""
    plain = (isinstance(name, str) and name not in ("", ".", "..") and "/" not in name and "\\" not in name
             and os.path.basename(name) == name and not os.path.isabs(name))
    if not plain:
        raise CheckpointError(f"{index_path}: shard entry {name!r} is not a plain file name inside the checkpoint "
                              "directory (paths such as '../x.safetensors', 'sub/x.safetensors' or absolute ones "
                              "are refused)")


def check_signature(directory: str, verify: VerifySpec | None) -> None:
    """Verify `directory` against `verify`; unverified loads of a signed directory say so once (quiet for
    unsigned ones), so users learn that they could verify it."""
    if verify is not None:
        verify_directory(directory, verify)
    elif os.path.isfile(os.path.join(directory, SIGNATURE_FILE)):
        log.warning("%s has a %s but was loaded unverified (pass a public key, certificate chain or Sigstore "
                    "identity to verify it)", directory, SIGNATURE_FILE)


@dataclasses.dataclass
class ReadStats:
    """What a sharded load read: `bytes_read`, the tensor bytes this process read from disk (a slice that several
    of its devices hold is read once), and `per_device`, device id → the bytes of the slices that device holds."""

    bytes_read: int = 0
    per_device: dict = dataclasses.field(default_factory=lambda: collections.defaultdict(int))


def load_hf_checkpoint(directory: str | os.PathLike, dtype="float32", *, param_dtype="float32",
                       verify: VerifySpec | None = None, shardings=None, stats: ReadStats | None = None,
                       **config_overrides) -> GraniteForCausalLM:
    """A ready `GraniteForCausalLM` from an HF directory (`config.json` + safetensors, single or sharded).

    `dtype` is the compute dtype (a dtype or its name); parameters are stored in `param_dtype` (float32 master
    weights by default; pass "bfloat16" to halve memory for inference). `verify`: check the directory's
    `model.sig` first (`granite_jax.formats.signing.VerifySpec`; `SignatureError` when it does not verify).

    `shardings`: NamedShardings like the model's parameters (`parameter_shardings` of its `nnx.Param` state).
    Each parameter is then a global array on those devices, and this process reads from disk only the slices of
    each tensor that its own devices hold (safetensors' lazy `get_slice`), so its host memory is bounded by its
    shard (plus one parameter's slices at a time). Every tensor is sliced; none is read whole. `stats`: a
    `ReadStats` that counts the bytes read.
    """
    directory = os.fspath(directory)
    files = safetensors_files(directory)
    check_signature(directory, verify)
    config = ModelConfig.from_hf(directory, compute_dtype=_resolve_dtype(dtype),
                                 param_dtype=_resolve_dtype(param_dtype), **config_overrides)
    config, quantized = fp8.strip_quantization(directory, config)  # FP8 weights are read dequantized
    abstract = nnx.eval_shape(lambda: GraniteForCausalLM(config, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    expected = {}
    for path, variable in nnx.to_flat_state(state):
        hf_name, to_hf, from_hf = hf_tensor_name(path)
        hf_shape = to_hf(np.empty(variable.shape, np.bool_)).shape
        expected[hf_name] = (path, variable, hf_shape, from_hf)
    located = (fp8.locate_tensors if quantized else _locate_tensors)(directory, files, expected, config)
    by_path = None if shardings is None else dict(nnx.to_flat_state(shardings))
    stats = ReadStats() if stats is None else stats
    with contextlib.ExitStack() as stack:
        readers = {}
        for name, file in located.items():
            path, variable, _, from_hf = expected[name]
            with naming_file(str(file)):
                if isinstance(file, str) and file not in readers:
                    readers[file] = stack.enter_context(safe_open(file, framework="numpy"))
                reader = readers[file] if isinstance(file, str) else file  # an fp8.Dequantized reads itself
                if by_path is None:
                    variable.set_value(jnp.asarray(from_hf(reader.get_tensor(name)), dtype=variable.dtype))
                else:
                    variable.set_value(_sharded_parameter(reader.get_slice(name), variable, from_hf,
                                                          _sharding_of(by_path, path), stats))
    return nnx.merge(graphdef, state)


def _locate_tensors(directory: str, files: list[str], expected: dict, config: ModelConfig) -> dict[str, str]:
    """{HF name: file} for every expected tensor, from the files' headers only; an unexpected tensor, a missing
    one or a shape other than the config implies is a CheckpointError naming it."""
    located, unexpected = {}, []
    for file in files:
        with naming_file(file), safe_open(file, framework="numpy") as reader:
            for name in reader.keys():
                if name not in expected:
                    if name == "lm_head.weight" and config.tie_word_embeddings:
                        continue  # a redundant copy of the tied embedding
                    unexpected.append(name)
                    continue
                hf_shape = expected[name][2]
                shape = tuple(reader.get_slice(name).get_shape())
                if shape != hf_shape:
                    raise CheckpointError(f"{os.path.basename(file)}: tensor {name!r} has shape {shape}; the "
                                          f"config implies {hf_shape}")
                located[name] = file
    if unexpected:
        raise CheckpointError(f"{directory!r}: unexpected tensors not used by the model: {sorted(unexpected)}")
    missing = sorted(set(expected) - set(located))
    if missing:
        raise CheckpointError(f"{directory!r}: missing tensors: {missing}")
    return located


def _sharding_of(by_path: dict, path: tuple):
    if path not in by_path:
        raise ValueError(f"shardings has no entry for parameter {'.'.join(map(str, path))}")
    return by_path[path]


def _sharded_parameter(tensor, variable, from_hf: Callable, sharding, stats: ReadStats) -> jax.Array:
    """`variable`'s value as a global array with `sharding`, built from the slices of the on-disk `tensor` (a
    safetensors slice handle) that this process's devices hold; each distinct slice is read once."""
    shape, dtype = tuple(variable.shape), variable.dtype
    slices = {}

    def read(index):
        bounds = _bounds(index, shape)
        if bounds not in slices:
            part = tensor[_hf_index(from_hf, tuple(slice(a, b) for a, b in bounds))]
            stats.bytes_read += part.nbytes
            slices[bounds] = np.asarray(from_hf(part), dtype=dtype)
        return slices[bounds]

    array = jax.make_array_from_callback(shape, sharding, read)
    itemsize = _ON_DISK_ITEMSIZE[tensor.get_dtype()]
    for device, index in sharding.addressable_devices_indices_map(shape).items():
        stats.per_device[device.id] += itemsize * math.prod(b - a for a, b in _bounds(index, shape))
    return array


_ON_DISK_ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1, "I64": 8, "I32": 4,
                     "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}  # bytes per element of safetensors' dtypes


def _bounds(index: tuple, shape: tuple) -> tuple:
    """((start, stop), ...) of a tuple of slices over `shape` (a hashable, normalized form)."""
    return tuple(slice_.indices(n)[:2] for slice_, n in zip(index, shape))


# ---------------------------------------------------------------------------------------------- saving
def _parse_size(size: int | str) -> int:
    if isinstance(size, int):
        return size
    units = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}
    text = size.strip().upper()
    for unit, factor in sorted(units.items(), key=lambda kv: -len(kv[0])):
        if text.endswith(unit):
            return int(float(text[: -len(unit)]) * factor)
    return int(text)


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def weight_files(directory: str) -> list[str]:
    """The names of `directory`'s safetensors files and index (what loading it reads)."""
    if not os.path.isdir(directory):
        return []
    return sorted(e for e in os.listdir(directory) if e == SAFE_INDEX or e.endswith(".safetensors"))


def remove_stale_weights(directory: str, keep: set[str]) -> list[str]:
    """Delete the safetensors files and index of `directory` that are not in `keep` (those just written):
    leftovers of an earlier save with another shard count would shadow or contradict the new one. Nothing
    else is touched. Returns the removed names."""
    stale = [name for name in weight_files(directory) if name not in keep]
    for name in stale:
        os.remove(os.path.join(directory, name))
    return stale


def _write_safetensors(arrays: dict, path: str) -> None:
    """safetensors' `save_file`, a failure (a full disk, a quota) as one CheckpointError naming the file."""
    try:
        save_file(arrays, path, metadata={"format": "pt"})
    except (SafetensorError, OSError) as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if "StorageFull" in reason or "code: 28" in reason or getattr(e, "errno", None) == errno.ENOSPC:
            reason = "no space left on the device"
        raise CheckpointError(f"could not write {path}: {reason}") from None


def _hf_named_parameters(model: GraniteForCausalLM) -> list[tuple]:
    """(HF name, ours→HF transform, parameter) for every parameter of `model`, in HF name order; nothing read."""
    params = nnx.to_flat_state(nnx.state(model, nnx.Param))
    return sorted(((*hf_tensor_name(path)[:2], v) for path, v in params), key=lambda t: t[0])


def _hf_array(to_hf: Callable, variable) -> np.ndarray:
    """One parameter on the host, in HF's layout and the parameter's dtype."""
    return np.ascontiguousarray(to_hf(np.asarray(jax.device_get(variable[...]))))


def hf_tensors(model: GraniteForCausalLM):
    """(HF name, numpy array in the parameter's dtype) for every parameter of `model`, in name order: the tensors
    `save_hf_checkpoint` writes, one in host memory at a time (for other writers, e.g. GGUF)."""
    for name, to_hf, variable in _hf_named_parameters(model):
        yield name, _hf_array(to_hf, variable)


def save_hf_checkpoint(model: GraniteForCausalLM, directory: str | os.PathLike, *, dtype=None,
                       max_shard_size: int | str = "5GB", quantize: str | None = None) -> list[str]:
    """Write `config.json` and safetensors that transformers' `from_pretrained` loads.

    dtype: tensor dtype on disk; default the `torch_dtype`/`dtype` recorded in the source config.json if any,
    else the parameters' dtype. Files hold at most `max_shard_size` bytes (more than one file adds
    `model.safetensors.index.json`). Files are readable as the umask allows (like any other written file).
    Safetensors files and an index that this save did not write are removed afterwards (they would shadow or
    contradict it); no other file is touched. Returns the written safetensors paths.
    quantize="fp8": the linear weights as compressed-tensors FP8_DYNAMIC (`granite_jax.formats.fp8`).
    """
    if quantize not in (None, "fp8"):
        raise ValueError(f"quantize={quantize!r}: expected None or 'fp8'")
    directory = os.fspath(directory)
    os.makedirs(directory, exist_ok=True)
    config = model.config
    if dtype is None:
        dtype = config.extra.get("torch_dtype") or config.extra.get("dtype") or config.param_dtype
    np_dtype = _NUMPY_DTYPES[_resolve_dtype(dtype)]
    limit = _parse_size(max_shard_size)

    tensors = _hf_named_parameters(model)

    def quantized(name):
        return quantize == "fp8" and fp8.is_quantized(name)

    shards, current, size = [], [], 0
    for name, to_hf, variable in tensors:
        nbytes = int(np.prod(variable.shape)) * np.dtype(np_dtype).itemsize
        if quantized(name):
            nbytes = fp8.stored_bytes(variable.shape, np.dtype(np_dtype).itemsize)
        if current and size + nbytes > limit:
            shards.append(current)
            current, size = [], 0
        current.append((name, to_hf, variable))
        size += nbytes
    if current:
        shards.append(current)

    weight_map, written, total = {}, [], 0
    for i, shard in enumerate(shards):
        filename = SAFE_SINGLE if len(shards) == 1 else f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        arrays = {}  # one shard in host memory at a time
        for name, to_hf, variable in shard:
            arrays[name] = _hf_array(to_hf, variable).astype(np_dtype)
            if quantized(name):
                arrays[name], arrays[f"{name}_scale"] = fp8.quantize(arrays[name])
        for name, array in arrays.items():
            weight_map[name] = filename
            total += array.nbytes
        _write_safetensors(arrays, os.path.join(directory, filename))
        os.chmod(os.path.join(directory, filename), 0o666 & ~_umask())  # safetensors writes 0600
        written.append(os.path.join(directory, filename))
    if len(shards) > 1:
        with open(os.path.join(directory, SAFE_INDEX), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2, sort_keys=True)
    index = {SAFE_INDEX} if len(shards) > 1 else set()
    remove_stale_weights(directory, {os.path.basename(p) for p in written} | index)
    # transformers 5 records the dtype as "dtype", 4.x as "torch_dtype"; 5 reads both.
    dtype_keys = {"torch_dtype"} | ({"dtype"} & set(config.extra))
    extra = {k: v for k, v in config.extra.items() if k != "quantization_config"}
    if quantize == "fp8":
        extra["quantization_config"] = fp8.quantization_config(config)
    hf_config = config.replace(extra={**extra, **{k: _resolve_dtype(dtype) for k in dtype_keys}})
    hf_config.save_hf(directory)
    return written

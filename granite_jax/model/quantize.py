"""QLoRA: the frozen base weights of a LoRA run stored quantised (int8 or 4-bit NormalFloat), dequantised on the fly.

`quantize_base(model, "int8" | "nf4")` replaces, in place, every large frozen matmul weight of the decoder layers by
a `QuantizedTensor`:

- the `kernel` of every `nnx.Linear` in the layers (attention q/k/v/o, Mamba in_proj/out_proj, the shared MLP's
  input_linear/output_linear), adapted by LoRA or not — a `LoRALinear`'s base kernel included;
- the routed experts' stacked (E, in, out) `input_linear` / `output_linear` (most of an MoE model's weights).

Not quantised: the router (E outputs, small, and its logits pick the experts), the embeddings and output head
(QLoRA and bitsandbytes keep them in float too), the Mamba conv, norms, A_log, D, dt_bias and biases.

A `QuantizedTensor` reads like the Variable it replaces: `w[...]` is the dequantised weight in the layer's compute
dtype, so `nnx.Linear.__call__` (hence `LoRALinear`'s base path) and `MoE.__call__` compute x @ dequant(W) with no
change to their code, and the dequantised copy only lives inside the step (one layer at a time under the scan).
Its `qvalue` keeps the weight's shape and logical axes (it shards exactly like the float kernel) and its `scale`
carries the same axis names (a dimension the scale does not split — size 1 — is simply not sharded).

Numerics are qwix's (`qwix.quantize` / `qwix.dequantize`, the maintained JAX quantisation library, the QArray
layout its providers use) rather than hand-written ones:

- int8: symmetric absmax, one float32 scale per output channel (per expert and output channel for the experts);
  |W - dequant(W)| <= scale / 2 = absmax(column) / 254.
- nf4: the QLoRA paper's NormalFloat-4 code book (Dettmers et al. 2023, appendix E) on blocks of `NF4_BLOCK` = 64
  consecutive input-axis elements, one float32 absmax scale per block and output channel, values stored as uint4
  (TPU and GPU XLA pack two per byte; XLA:CPU and `Array.nbytes` count one byte each). No double quantisation of
  the scales (0.5 bit per weight instead of QLoRA's 0.127).

The quantised Variables are `QuantizedValue` / `QuantizedScale`, not `nnx.Param`: a run only trains
`nnx.LoRAParam`s, so they are frozen by construction; without `lora` there is nothing to train them for, and
`lora.quantize_base` without `lora` is a configuration error.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import qwix
from flax import nnx

QUANTIZE_BASE = ("int8", "nf4")
NF4_BLOCK = 64  # input-axis elements per nf4 scale, as QLoRA
# Routed-expert weights: attribute names of the MoE module's stacked (E, in, out) Params.
EXPERT_WEIGHTS = ("input_linear", "output_linear")


class QuantizedValue(nnx.Variable):
    """The quantised integers (int8, or uint4 NF4 code-book indices) of a frozen weight."""


class QuantizedScale(nnx.Variable):
    """The float32 scales of a frozen quantised weight (per output channel, or per nf4 block)."""


def check_quantize_base(value, field: str = "lora.quantize_base") -> None:
    if value is not None and value not in QUANTIZE_BASE:
        raise ValueError(f"{field}={value!r} must be null, 'int8' or 'nf4'")


def quantization_axes(qtype: str, ndim: int) -> dict:
    """qwix's `channelwise_axes` / `tiled_axes` for a matmul weight (..., in, out): int8 one scale per output
    channel (and per expert), nf4 one per `NF4_BLOCK` inputs and output channel (and per expert)."""
    leading = tuple(range(ndim - 2))  # the experts' axis
    if qtype == "int8":
        return dict(channelwise_axes=leading + (ndim - 1,))
    return dict(channelwise_axes=leading + (ndim - 1,), tiled_axes={ndim - 2: NF4_BLOCK})


def quantize_array(w: jax.Array, qtype: str) -> qwix.QArray:
    """`w` (..., in, out) quantised by qwix, scales in w's dtype (float32 parameters: float32 scales)."""
    return qwix.quantize(w, jnp.int8 if qtype == "int8" else "nf4", **quantization_axes(qtype, w.ndim))


class QuantizedTensor(nnx.Module):
    """A frozen weight stored quantised. `self[...]` is `qwix.dequantize` of it in `dtype`: a stand-in for the
    Variable it replaces, for code that reads `variable[...]`."""

    def __init__(self, variable: nnx.Variable, qtype: str, dtype):
        w = variable[...]
        axes = variable.get_metadata().get("out_sharding") or (None,) * w.ndim
        q = quantize_array(w, qtype)
        self.qtype = qtype
        self.dtype = dtype
        self.axes = tuple(axes)
        self.qvalue = QuantizedValue(q.qvalue, out_sharding=self.axes, eager_sharding=False)
        self.scale = QuantizedScale(q.scale, out_sharding=self.axes, eager_sharding=False)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.qvalue.shape)

    def get_metadata(self) -> dict:
        """The logical axes of the weight, like the replaced Variable's metadata."""
        return {"out_sharding": self.axes}

    def dequantize(self, dtype=None) -> jax.Array:
        """The weight, dequantised in `dtype` (default: the layer's compute dtype)."""
        qarray = qwix.QArray(self.qvalue[...], self.scale[...].astype(dtype or self.dtype),
                             qtype=jnp.int8 if self.qtype == "int8" else "nf4")
        return qwix.dequantize(qarray)

    def __getitem__(self, index):
        return self.dequantize()[index]


def _compute_dtype(module, default):
    return getattr(module, "dtype", None) or default


def quantize_base(model: nnx.Module, qtype: str, *, field: str = "lora.quantize_base") -> nnx.Module:
    """Replace, in place, the decoder layers' `nnx.Linear` kernels (router excepted) and routed-expert weights by
    `QuantizedTensor`s of `qtype` ('int8' or 'nf4'); returns the model. See the module docstring. Training runs
    call it through `lora.quantize_frozen_base`, which requires adapters over the (then frozen) base."""
    check_quantize_base(qtype, field)
    if qtype is None:
        raise ValueError(f"{field}=None: nothing to quantise")
    from granite_jax.model.moe import MoE

    default_dtype = model.config.compute_dtype
    for path, module in list(model.iter_modules()):
        if "layers" not in path:
            continue  # the output head (an nnx.Linear when untied) stays in float
        if isinstance(module, nnx.Linear) and path[-1] != "router":
            _check_blocks(qtype, module.kernel.shape, path, field)
            module.kernel = QuantizedTensor(module.kernel, qtype, _compute_dtype(module, default_dtype))
        elif isinstance(module, MoE):
            for name in EXPERT_WEIGHTS:
                variable = getattr(module, name)
                _check_blocks(qtype, variable.shape, path + (name,), field)
                setattr(module, name, QuantizedTensor(variable, qtype, module.dtype))
    return model


def _check_blocks(qtype: str, shape, path, field: str) -> None:
    if qtype == "nf4" and shape[-2] % NF4_BLOCK:
        name = ".".join(str(p) for p in path)
        raise ValueError(f"{field}='nf4': {name} has {shape[-2]} inputs, not a multiple of the {NF4_BLOCK}-element "
                         "nf4 block; use 'int8'")


def quantized_tensors(model: nnx.Module) -> list[tuple[tuple, QuantizedTensor]]:
    return [(path, m) for path, m in model.iter_modules() if isinstance(m, QuantizedTensor)]


def storage_bits(dtype) -> int:
    """Bits per element as TPU/GPU XLA store it (uint4/int4 packed two per byte)."""
    dtype = jnp.dtype(dtype)
    if jnp.issubdtype(dtype, jnp.integer):
        return jnp.iinfo(dtype).bits
    if dtype == jnp.bool_:
        return 8
    return jnp.finfo(dtype).bits


def stored_bytes(shape, dtype) -> int:
    """Bytes of an array of `shape` and `dtype` as TPU/GPU XLA store it."""
    return -(-int(np.prod(shape)) * storage_bits(dtype) // 8)


def parameter_count(state) -> int:
    """The weights a State holds, counting a quantised weight once (its values, not its scales)."""
    return sum(int(np.prod(v.shape)) for _, v in nnx.to_flat_state(state)
               if not isinstance(v, QuantizedScale))

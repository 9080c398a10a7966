"""LoRA adapters on the model's dense projections, built on flax's `nnx.LoRA` (its `LoRAParam` A and B).

`apply_lora` replaces each targeted `nnx.Linear` by a `LoRALinear` that keeps the very same kernel and bias
Variables (their paths, e.g. `model.layers.0.self_attn.q_proj.kernel`, and logical axes unchanged) and adds
`lora.lora_a` (in, r) and `lora.lora_b` (r, out), sharded like the kernel's in and out dimensions:
y = x W (+ b) + alpha / r · dropout(x) A B, with B zero at the start, so the adapted model starts equal to the
base. Only `nnx.LoRAParam`s are trained (`train/setup.py`); the base weights are frozen.

Routed experts (`block_sparse_moe.input_linear` / `output_linear`, stacked (E, in, out) weights used by the
grouped matmuls) and the router are not adapted.

`merge_lora` folds trained adapters into their kernels (W' = W + alpha / r · A B): a plain `GraniteForCausalLM`
that computes what the adapted model computes (outside training, where there is no dropout), for evaluation,
generation, `convert export` and `init_from=run:` of a LoRA run.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from granite_jax.model.quantize import QuantizedTensor, quantize_base, quantized_tensors
from granite_jax.parallel import partitioned
from granite_jax.tree import path_names

# The projections an adapter can be put on, by their attribute (checkpoint) name. input_linear / output_linear
# are the shared MLP's (the whole FFN of a dense model); the routed experts' weights of the same names are not
# nnx.Linear modules and are never adapted.
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "in_proj", "out_proj", "input_linear", "output_linear")


class LoRADropoutKey(nnx.Variable):
    """The raw PRNG key data (uint32) of one adapter's dropout for the current step; set by `set_dropout_keys`."""


class LoRALinear(nnx.Linear):
    """An `nnx.Linear` (the base's own kernel and bias, frozen in training) plus an `nnx.LoRA` adapter scaled by
    alpha / rank, its input dropped out at `dropout` in training."""

    def __init__(self, base: nnx.Linear, *, rank: int, alpha: float, dropout: float, rngs: nnx.Rngs):
        # Adopt the base layer's Variables and settings as they are: no second kernel is allocated, and a model
        # already placed on a mesh (init_from) keeps its weights where they are.
        for name in ("kernel", "bias", "in_features", "out_features", "use_bias", "dtype", "param_dtype",
                     "precision", "dot_general", "promote_dtype", "preferred_element_type"):
            setattr(self, name, getattr(base, name))
        axes = base.kernel.get_metadata().get("out_sharding") or (None, None)
        self.lora = nnx.LoRA(
            base.in_features, rank, base.out_features, dtype=base.dtype, param_dtype=base.param_dtype,
            a_initializer=partitioned(nnx.initializers.he_uniform(), (axes[0], None)),
            b_initializer=partitioned(nnx.initializers.zeros, (None, axes[1])), rngs=rngs)
        self.scale = alpha / rank
        self.dropout = dropout
        self.deterministic = True  # no dropout outside the train step (`enable_dropout`)
        self.dropout_key = (LoRADropoutKey(jnp.zeros((2,), jnp.uint32)) if dropout > 0 else None)

    def __call__(self, x: jax.Array) -> jax.Array:
        y = super().__call__(x)
        if self.dropout_key is not None and not self.deterministic:
            keep = jax.random.bernoulli(jax.random.wrap_key_data(self.dropout_key[...]), 1.0 - self.dropout, x.shape)
            x = jnp.where(keep, x / (1.0 - self.dropout), 0).astype(x.dtype)
        return y + (self.lora(x) * self.scale).astype(y.dtype)


def adaptable_modules(model: nnx.Module) -> dict[str, list[tuple[tuple, nnx.Linear]]]:
    """{target name: [(path, module), ...]} of the model's projections that `LORA_TARGETS` name."""
    found: dict[str, list] = {}
    for path, module in model.iter_modules():
        names = path_names(path)
        if type(module) is nnx.Linear and names and names[-1] in LORA_TARGETS:
            found.setdefault(names[-1], []).append((path, module))
    return found


def apply_lora(model: nnx.Module, *, rank: int, alpha: float, dropout: float, targets, rngs: nnx.Rngs,
               field: str = "lora") -> nnx.Module:
    """Replace every projection named in `targets` by a `LoRALinear` over it, in place; returns the model.
    A target that names no projection of this model is a ValueError listing those it has."""
    check_lora(rank=rank, alpha=alpha, dropout=dropout, targets=targets, field=field)
    found = adaptable_modules(model)
    missing = [t for t in targets if t not in found]
    if missing:
        raise ValueError(f"{field}.targets: {missing} match no projection of this model; it has "
                         f"{sorted(found, key=LORA_TARGETS.index)}")
    for target in targets:
        for path, base in found[target]:
            parent = model
            for step in path[:-1]:
                parent = parent[step] if isinstance(step, int) else getattr(parent, step)
            setattr(parent, path[-1], LoRALinear(base, rank=rank, alpha=alpha, dropout=dropout, rngs=rngs))
    return model


def check_lora(*, rank, alpha, dropout, targets, field: str = "lora") -> None:
    """ValueErrors naming the field for a rank or alpha ≤ 0, a dropout outside [0, 1), or an unknown target."""
    if not isinstance(rank, int) or isinstance(rank, bool) or rank <= 0:
        raise ValueError(f"{field}.rank={rank!r} must be a positive integer")
    if not alpha > 0:
        raise ValueError(f"{field}.alpha={alpha!r} must be positive")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"{field}.dropout={dropout!r} is outside [0, 1)")
    if not targets:
        raise ValueError(f"{field}.targets is empty; valid targets: {list(LORA_TARGETS)}")
    unknown = [t for t in targets if t not in LORA_TARGETS]
    if unknown:
        raise ValueError(f"{field}.targets: {unknown} match no module; valid targets: {list(LORA_TARGETS)} "
                         "(routed experts and the router are not adapted)")
    if len(set(targets)) != len(targets):
        raise ValueError(f"{field}.targets={list(targets)} names a projection twice")


def enable_dropout(model: nnx.Module, key: jax.Array) -> None:
    """Turn on the adapters' dropout, each adapter with its own key for this step: `key` folded with the
    adapter's index in the model (q, k and v read the same input; one shared key would drop the same features
    of it in all three). A model is deterministic until this is called (evaluation, generation)."""
    adapters = [m for _, m in model.iter_modules() if isinstance(m, LoRALinear) and m.dropout_key is not None]
    for i, module in enumerate(adapters):
        module.deterministic = False
        # A new Variable, not an update of the one merged in: that one may belong to an outer trace (jit).
        module.dropout_key = LoRADropoutKey(jax.random.key_data(jax.random.fold_in(key, i)))


def has_lora(model: nnx.Module) -> bool:
    return any(isinstance(m, LoRALinear) for _, m in model.iter_modules())


def quantize_frozen_base(model: nnx.Module, qtype: str, *, field: str = "lora.quantize_base") -> nnx.Module:
    """QLoRA: the base weights under the adapters stored as `qtype` (`quantize.quantize_base`), in place. A model
    without adapters is refused: a quantised base is frozen, and only adapters can be trained over it."""
    if not has_lora(model):
        raise ValueError(f"{field}={qtype!r} needs LoRA adapters on the model (set lora.rank / lora.targets): "
                         "the quantised base weights are frozen")
    return quantize_base(model, qtype, field=field)


def adapters(model: nnx.Module) -> list[tuple[tuple, LoRALinear]]:
    """[(path, module), ...] of the model's `LoRALinear`s, in the model's module order."""
    return [(path, m) for path, m in model.iter_modules() if isinstance(m, LoRALinear)]


def merged_kernel(module: LoRALinear) -> jax.Array:
    """W + alpha / r · A B in the kernel's dtype and placement (A B is computed where the adapter lives, then
    moved to the kernel's devices: a base read onto a mesh keeps its sharding)."""
    kernel = (module.kernel.dequantize(jnp.float32) if isinstance(module.kernel, QuantizedTensor)
              else module.kernel[...])
    delta = module.scale * jnp.matmul(module.lora.lora_a[...].astype(jnp.float32),
                                      module.lora.lora_b[...].astype(jnp.float32),
                                      precision=jax.lax.Precision.HIGHEST)
    if isinstance(kernel, jax.Array) and not isinstance(kernel, jax.core.Tracer):
        delta = jax.device_put(delta, kernel.sharding)
    return (kernel.astype(jnp.float32) + delta).astype(kernel.dtype)


def merge_lora(model):
    """A new plain `GraniteForCausalLM` (no `LoRALinear`, no adapter Variables) whose adapted kernels are
    W + alpha / r · A B and whose other weights are the model's own arrays; `model` is left unchanged.

    The merged model computes what the adapted one computes without dropout (the adapter is linear in x:
    x W + s·x A B = x (W + s A B)), up to float rounding, so evaluation, generation and an HF export of it need
    no adapter code. A model without adapters comes back as a new model holding the same arrays.

    A QLoRA base (`lora.quantize_base`) is dequantised in float32: the merged model computes what was trained,
    dequant(W) + alpha / r · A B, as float weights."""
    from granite_jax.model.granite import GraniteForCausalLM  # granite.py does not import this module

    merged = {path + ("kernel",): merged_kernel(module) for path, module in adapters(model)}
    own = {path: variable[...] for path, variable in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    own.update({path: tensor.dequantize(jnp.float32) for path, tensor in quantized_tensors(model)
                if path not in merged})
    abstract = nnx.eval_shape(lambda: GraniteForCausalLM(model.config, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    for path, variable in nnx.to_flat_state(state):
        value = merged[path] if path in merged else own[path]
        variable.set_value(value.astype(variable.get_value().dtype))
    return nnx.merge(graphdef, state)

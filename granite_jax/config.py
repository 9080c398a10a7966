"""Model configuration: every field of HF's `GraniteMoeHybridConfig`, read and written as `config.json`.

`ModelConfig` is a frozen (hashable) dataclass so it can be a static argument of `jax.jit`. Field names are the
HF names; the fields HF does not have (`COMPUTE_FIELDS`: dtypes, MoE and attention implementation choices)
say how *we* compute, not what the model is, and are never written to `config.json`.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import numbers
import os
import types
import typing
from typing import Any, Mapping

import numpy as np
import yaml

from granite_jax.parallel.plan import ShardingPlan

MAMBA = "mamba"
ATTENTION = "attention"
# transformers 5 renames the released layer kinds; both spellings are accepted, the legacy ones are written
# (transformers 4.57 rejects the new names, transformers 5 remaps the old ones).
_LAYER_TYPE_ALIASES = {
    "mamba": MAMBA,
    "linear_attention": MAMBA,
    "attention": ATTENTION,
    "full_attention": ATTENTION,
}
_DTYPES = ("float32", "bfloat16", "float16")
MOE_IMPLS = ("auto", "ragged_dot", "megablox", "tiled", "pallas_gpu")  # see granite_jax/model/moe.py
ATTENTION_IMPLS = ("auto", "blockwise", "splash", "pallas_gpu")  # see granite_jax/model/attention.py
SSD_IMPLS = ("xla", "pallas")  # see granite_jax/model/ssd.py and pallas_ssd.py
# Fields that say how we compute, not what the model is: never written to config.json.
COMPUTE_FIELDS = ("compute_dtype", "param_dtype", "moe_impl", "attention_impl", "ssd_impl", "attention_block_size",
                  "remat_policy", "scan_layers", "subpiece_tokens", "sharding")
REMAT_POLICIES = ("none", "full", "save_dots")


class ConfigError(ValueError):
    """A model configuration value is missing, malformed or inconsistent with another one."""


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture of a Granite 4.0 (`granitemoehybrid`) model, in HF field names.

    Defaults are those of `transformers.GraniteMoeHybridConfig` (v5.23), except `layer_types`, which must be
    given (HF defaults to all-Mamba of `num_hidden_layers`; pass that explicitly if you want it).
    """

    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    shared_intermediate_size: int = 1024
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    hidden_act: str = "silu"
    max_position_embeddings: int = 2048
    initializer_range: float = 0.02
    rms_norm_eps: float = 1e-6
    use_cache: bool = True
    pad_token_id: int | None = None
    bos_token_id: int | None = 1
    eos_token_id: int | None = 2
    tie_word_embeddings: bool = False
    rope_theta: float = 10000.0
    attention_bias: bool = False
    attention_dropout: float = 0.0
    embedding_multiplier: float = 1.0
    logits_scaling: float = 1.0
    residual_multiplier: float = 1.0
    attention_multiplier: float = 1.0
    num_local_experts: int = 8
    num_experts_per_tok: int = 2
    output_router_logits: bool = False
    router_aux_loss_coef: float = 0.001
    position_embedding_type: str | None = None
    layer_types: tuple[str, ...] | None = None
    mamba_n_heads: int = 128
    mamba_n_groups: int = 1
    mamba_d_state: int = 256
    mamba_d_head: int | str = "auto"
    mamba_d_conv: int = 4
    mamba_expand: int = 2
    mamba_chunk_size: int = 256
    mamba_conv_bias: bool = True
    mamba_proj_bias: bool = False
    time_step_limit: tuple[float, float] = (0.0, math.inf)
    # --- ours, not HF's: how to compute -------------------------------------------------------------
    compute_dtype: str = "float32"  # dtype of activations and matmuls
    param_dtype: str = "float32"  # storage dtype of parameters (float32 master weights by default)
    # grouped matmul of the experts: "ragged_dot", "megablox" (Pallas TPU kernels), "tiled", "pallas_gpu"
    # (Pallas Triton kernels), or "auto" (megablox on TPU, pallas_gpu on GPU, tiled on CPU)
    moe_impl: str = "auto"
    # whole-row attention: "blockwise" (model/flash.py), "splash" (Pallas TPU kernel), "pallas_gpu" (Pallas
    # Triton kernel), "auto" (splash on TPU, else blockwise); rows split over `context` always use the
    # blockwise context-parallel attention
    attention_impl: str = "auto"
    # Mamba's SSD: "xla" (the chunked einsums of model/ssd.py) or "pallas" (model/pallas_ssd.py: forward and
    # backward Pallas kernels written for GPUs, Triton; interpret mode on CPU; refused on TPU)
    ssd_impl: str = "xla"
    attention_block_size: int = 512  # queries per block of the memory-bounded attention
    # Activation checkpointing of each decoder layer: "none" keeps every intermediate for the backward pass,
    # "full" keeps only layer inputs and recomputes the rest, "save_dots" also keeps matmul outputs.
    remat_policy: str = "none"
    # Training: run the stack as a `lax.scan` over repetitions of its layer pattern (the 40-layer releases repeat
    # 10 layers 4 times), so XLA compiles the pattern once. A stack with no repeating pattern runs unrolled.
    scan_layers: bool = False
    # Long rows: Mamba layers and the MoE/MLP block run the tokens each device holds (of every row, or of every
    # context piece) in sub-pieces of this many (Mamba carrying its conv inputs and SSM state from one to the
    # next), so that their working memory is one sub-piece's, not the whole row's. 0 = the whole row at once.
    subpiece_tokens: int = 0
    # How the model is laid out over the mesh it is traced under (rules for parameters and activations, the
    # MoE exchange): granite_jax/parallel/plan.py. Static, hashed with the rest of the config.
    sharding: ShardingPlan = ShardingPlan()
    # Keys of a config.json that are not fields (e.g. `torch_dtype`, `normalization_function`), kept so that
    # a round trip writes them back. Not part of equality or the hash.
    extra: Mapping[str, Any] = dataclasses.field(default_factory=dict, compare=False, hash=False)

    def __post_init__(self):
        set_ = lambda name, value: object.__setattr__(self, name, value)  # noqa: E731 (frozen dataclass)
        _check_scalar_types(self)
        if self.num_key_value_heads is None:
            set_("num_key_value_heads", self.num_attention_heads)
        if self.layer_types is None:
            set_("layer_types", (MAMBA,) * self.num_hidden_layers)
        layer_types = _as_list("layer_types", self.layer_types)
        set_("layer_types", tuple(_canonical_layer_type(i, t) for i, t in enumerate(layer_types)))
        if self.mamba_d_head == "auto":
            _require_positive("mamba_n_heads", self.mamba_n_heads)
            set_("mamba_d_head", self.mamba_expand * self.hidden_size // self.mamba_n_heads)
        set_("time_step_limit", tuple(_decode_float(v) for v in _as_list("time_step_limit", self.time_step_limit)))
        if isinstance(self.sharding, Mapping):
            set_("sharding", ShardingPlan(**self.sharding))
        self.validate()

    # ----------------------------------------------------------------------------------------- derived
    @property
    def attention_head_dim(self) -> int:
        """Per-head width of q/k/v: `head_dim` if the config sets it, else hidden_size // num_attention_heads."""
        return self.head_dim if self.head_dim is not None else self.hidden_size // self.num_attention_heads

    @property
    def mamba_d_inner(self) -> int:
        return self.mamba_expand * self.hidden_size

    @property
    def mamba_conv_dim(self) -> int:
        """Channels of the depthwise conv: x, B and C."""
        return self.mamba_d_inner + 2 * self.mamba_n_groups * self.mamba_d_state

    @property
    def mamba_in_proj_dim(self) -> int:
        """Output width of `in_proj`: [z | x | B | C | dt]."""
        return self.mamba_d_inner + self.mamba_conv_dim + self.mamba_n_heads

    @property
    def layer_period(self) -> int:
        """The length of the shortest pattern of layer kinds that `layer_types` repeats (its length if none)."""
        n = len(self.layer_types)
        return next(p for p in range(1, n + 1) if n % p == 0 and self.layer_types == self.layer_types[:p] * (n // p))

    @property
    def is_moe(self) -> bool:
        return self.num_local_experts > 0

    @property
    def uses_rope(self) -> bool:
        return self.position_embedding_type == "rope"

    @property
    def num_mamba_layers(self) -> int:
        return sum(t == MAMBA for t in self.layer_types)

    @property
    def num_attention_layers(self) -> int:
        return sum(t == ATTENTION for t in self.layer_types)

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    # ------------------------------------------------------------------------------------ validation
    def validate(self) -> None:
        """Raise `ConfigError` naming the field, its value and what was expected."""
        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                     "num_key_value_heads", "mamba_d_conv", "mamba_chunk_size", "mamba_expand"):
            _require_positive(name, getattr(self, name))
        for name in ("num_local_experts", "num_experts_per_tok", "intermediate_size"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name}={getattr(self, name)} must be >= 0")
        if len(self.layer_types) != self.num_hidden_layers:
            raise ConfigError(
                f"layer_types has {len(self.layer_types)} entries but num_hidden_layers={self.num_hidden_layers}; "
                "expected one entry per layer")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"num_attention_heads={self.num_attention_heads} is not divisible by "
                f"num_key_value_heads={self.num_key_value_heads}; GQA needs a whole number of query heads per KV head")
        if self.num_attention_layers and self.head_dim is None and self.hidden_size % self.num_attention_heads:
            raise ConfigError(
                f"hidden_size={self.hidden_size} is not divisible by num_attention_heads={self.num_attention_heads}; "
                "set head_dim explicitly")
        if self.position_embedding_type == "rope" and self.attention_head_dim % 2:
            raise ConfigError(f"RoPE needs an even head_dim, got {self.attention_head_dim}")
        if self.num_local_experts:
            _require_positive("intermediate_size", self.intermediate_size)
            if not 1 <= self.num_experts_per_tok <= self.num_local_experts:
                raise ConfigError(
                    f"num_experts_per_tok={self.num_experts_per_tok} must be between 1 and "
                    f"num_local_experts={self.num_local_experts}")
        _require_positive("shared_intermediate_size", self.shared_intermediate_size)
        if self.hidden_act != "silu":
            raise ConfigError(f"hidden_act={self.hidden_act!r} is not supported; Granite 4.0 uses 'silu'")
        if self.num_mamba_layers:
            for name in ("mamba_n_heads", "mamba_n_groups", "mamba_d_state", "mamba_d_head"):
                _require_positive(name, getattr(self, name))
            if self.mamba_n_heads * self.mamba_d_head != self.mamba_expand * self.hidden_size:
                raise ConfigError(
                    f"mamba_n_heads * mamba_d_head = {self.mamba_n_heads} * {self.mamba_d_head} = "
                    f"{self.mamba_n_heads * self.mamba_d_head} must equal mamba_expand * hidden_size = "
                    f"{self.mamba_expand} * {self.hidden_size} = {self.mamba_expand * self.hidden_size}")
            if self.mamba_n_heads % self.mamba_n_groups:
                raise ConfigError(
                    f"mamba_n_heads={self.mamba_n_heads} is not divisible by mamba_n_groups={self.mamba_n_groups}")
        lo, hi = self.time_step_limit
        if not (len(self.time_step_limit) == 2 and 0.0 <= lo < hi):
            raise ConfigError(f"time_step_limit={self.time_step_limit} must be (low, high) with 0 <= low < high")
        for name in ("compute_dtype", "param_dtype"):
            if getattr(self, name) not in _DTYPES:
                raise ConfigError(f"{name}={getattr(self, name)!r} is not one of {_DTYPES}")
        if self.moe_impl not in MOE_IMPLS:
            raise ConfigError(f"moe_impl={self.moe_impl!r} is not one of {MOE_IMPLS}")
        if self.attention_impl not in ATTENTION_IMPLS:
            raise ConfigError(f"attention_impl={self.attention_impl!r} is not one of {ATTENTION_IMPLS}")
        if self.ssd_impl not in SSD_IMPLS:
            raise ConfigError(f"ssd_impl={self.ssd_impl!r} is not one of {SSD_IMPLS}")
        _require_positive("attention_block_size", self.attention_block_size)
        if not isinstance(self.scan_layers, bool):
            raise ConfigError(f"scan_layers={self.scan_layers!r} must be true or false")
        if self.subpiece_tokens < 0 or 0 < self.subpiece_tokens < self.mamba_d_conv:
            raise ConfigError(f"subpiece_tokens={self.subpiece_tokens} must be 0 (off) or at least "
                              f"mamba_d_conv={self.mamba_d_conv}")
        if self.remat_policy not in REMAT_POLICIES:
            raise ConfigError(f"remat_policy={self.remat_policy!r} is not one of {REMAT_POLICIES}")
        if self.pad_token_id is not None and not 0 <= self.pad_token_id < self.vocab_size:
            raise ConfigError(f"pad_token_id={self.pad_token_id} is outside the vocabulary [0, {self.vocab_size})")

    # ------------------------------------------------------------------------------------ HF interop
    @classmethod
    def from_hf(cls, source: str | os.PathLike | Mapping[str, Any], **overrides) -> "ModelConfig":
        """Build from an HF checkpoint directory, a `config.json` path, or an already-parsed dict.

        `overrides` set our own fields (`compute_dtype`, `param_dtype`, ...) or replace HF ones.
        """
        if isinstance(source, Mapping):
            raw = dict(source)
        else:
            path = os.fspath(source)
            if os.path.isdir(path):
                path = os.path.join(path, "config.json")
            if not os.path.isfile(path):
                raise FileNotFoundError(f"no config.json at {path!r}")
            with open(path) as f:
                try:
                    raw = json.load(f)
                except json.JSONDecodeError as e:
                    raise ConfigError(f"{path}: not valid JSON ({e})") from None
        model_type = raw.get("model_type", "granitemoehybrid")
        if model_type != "granitemoehybrid":
            raise ConfigError(f"model_type={model_type!r}: expected 'granitemoehybrid' (Granite 4.0)")
        if isinstance(source, Mapping):
            return cls.from_dict({**raw, **overrides})
        try:
            return cls.from_dict({**raw, **overrides})
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from None

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> "ModelConfig":
        """Accepts HF's spellings (`layers_block_type`, v5 `rope_parameters`, `null` for unset values)."""
        raw = dict(raw)
        if "layers_block_type" in raw and raw.get("layer_types") is None:
            raw["layer_types"] = raw.pop("layers_block_type")
        raw.pop("layers_block_type", None)
        rope = raw.pop("rope_parameters", None)
        if isinstance(rope, Mapping) and "rope_theta" in rope:
            rope_type = rope.get("rope_type", "default")
            if rope_type != "default":
                raise ConfigError(f"rope_parameters.rope_type={rope_type!r}: only 'default' RoPE is supported")
            raw.setdefault("rope_theta", rope["rope_theta"])
        if raw.get("rope_scaling") not in (None, {}):
            raise ConfigError(f"rope_scaling={raw['rope_scaling']!r}: RoPE scaling is not supported")
        raw.pop("rope_scaling", None)
        if raw.get("time_step_limit") is None:
            raw.pop("time_step_limit", None)
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        known = {k: v for k, v in raw.items() if k in names}
        extra = {k: v for k, v in raw.items() if k not in names and k not in _HF_BOOKKEEPING}
        return cls(**known, extra=extra)

    def to_hf(self) -> dict[str, Any]:
        """A `config.json` dict that transformers 4.57 and 5.x load as `GraniteMoeHybridConfig`."""
        out: dict[str, Any] = dict(self.extra)
        for f in dataclasses.fields(self):
            if f.name == "extra" or f.name in COMPUTE_FIELDS:
                continue
            value = getattr(self, f.name)
            out[f.name] = list(value) if isinstance(value, tuple) else value
        if self.head_dim is None:
            del out["head_dim"]
        out["model_type"] = "granitemoehybrid"
        out["architectures"] = ["GraniteMoeHybridForCausalLM"]
        return out

    def save_hf(self, directory: str | os.PathLike) -> str:
        os.makedirs(directory, exist_ok=True)
        path = os.path.join(directory, "config.json")
        with open(path, "w") as f:
            json.dump(_json_safe(self.to_hf()), f, indent=2, sort_keys=True)
            f.write("\n")
        return path

    # --------------------------------------------------------------------------------------- presets
    @classmethod
    def from_yaml(cls, path: str | os.PathLike, **overrides) -> "ModelConfig":
        """A preset in `configs/models/*.yaml`: HF field names, plus optional compute fields (`COMPUTE_FIELDS`)."""
        with open(path) as f:
            raw = yaml.safe_load(f)
        if not isinstance(raw, Mapping):
            raise ConfigError(f"{path}: expected a mapping of config fields, got {type(raw).__name__}")
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        unknown = sorted(set(raw) - names)
        if unknown:
            raise ConfigError(f"{path}: unknown model config keys {unknown}")
        return cls.from_dict({**raw, **overrides})


# Keys transformers writes into every config.json; they carry no model information for us.
_HF_BOOKKEEPING = frozenset({
    "model_type", "architectures", "transformers_version", "_name_or_path", "output_hidden_states",
    "return_dict", "chunk_size_feed_forward", "is_encoder_decoder", "id2label", "label2id", "problem_type",
    "output_attentions",
})

PRESETS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "models")


def load_preset(name: str, **overrides) -> ModelConfig:
    """A model preset by name (`granite-4.0-h-small`, `tiny-hybrid-moe`, ...) or by YAML path."""
    path = name if name.endswith((".yaml", ".yml")) else os.path.join(PRESETS_DIR, f"{name}.yaml")
    if not os.path.isfile(path):
        available = sorted(p[:-5] for p in os.listdir(PRESETS_DIR) if p.endswith(".yaml"))
        raise ConfigError(f"unknown model preset {name!r}; available: {available}")
    return ModelConfig.from_yaml(path, **overrides)


_SCALAR_TYPES = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}


def _accepts(kind: type, value) -> bool:
    """JSON's types as Python reads them: a float field takes an integer too; a bool is no number."""
    if kind is bool:
        return isinstance(value, (bool, np.bool_))
    if isinstance(value, (bool, np.bool_)):
        return False
    if kind is int:
        return isinstance(value, numbers.Integral)
    if kind is float:
        return isinstance(value, numbers.Real)
    return isinstance(value, kind)


@functools.cache
def _scalar_fields() -> tuple[tuple[str, tuple[type, ...], bool], ...]:
    """(name, accepted scalar types, nullable) of every `ModelConfig` field typed int / float / bool / str (or
    `X | None`, `int | str`); tuples, mappings and `ShardingPlan` are checked where they are converted."""
    hints = typing.get_type_hints(ModelConfig)
    fields = []
    for field in dataclasses.fields(ModelConfig):
        hint = hints[field.name]
        options = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
        kinds = tuple(o for o in options if o in _SCALAR_TYPES)
        if kinds and all(o in _SCALAR_TYPES or o is type(None) for o in options):
            fields.append((field.name, kinds, type(None) in options))
    return tuple(fields)


def _check_scalar_types(config: "ModelConfig") -> None:
    """Every scalar field holds a value of its type, so a config.json with `"rms_norm_eps": "1e-5"` is a
    `ConfigError` naming the field, value and expected type, not a TypeError deep in the model."""
    for name, kinds, nullable in _scalar_fields():
        value = getattr(config, name)
        if (value is None and nullable) or any(_accepts(kind, value) for kind in kinds):
            continue
        expected = " or ".join(_SCALAR_TYPES[k] for k in kinds) + (" or null" if nullable else "")
        raise ConfigError(f"{name}={value!r} has type {type(value).__name__}; expected {expected}")


def _decode_float(value) -> float:
    """transformers 5 writes non-finite floats as {"__float__": "Infinity"} to keep config.json valid JSON."""
    if isinstance(value, Mapping) and "__float__" in value:
        return float(value["__float__"])
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"time_step_limit entry {value!r} is not a number") from None


def _json_safe(value):
    """Non-finite floats as transformers 5 writes them ({"__float__": "Infinity"}): strict JSON has no inf."""
    if isinstance(value, float) and not math.isfinite(value):
        return {"__float__": repr(value).replace("inf", "Infinity")}
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def _as_list(name: str, value) -> list:
    if isinstance(value, str) or not hasattr(value, "__iter__"):
        raise ConfigError(f"{name}={value!r} must be a list")
    return list(value)


def _canonical_layer_type(index: int, kind: Any) -> str:
    if not isinstance(kind, str) or kind not in _LAYER_TYPE_ALIASES:
        raise ConfigError(
            f"layer_types[{index}]={kind!r} is not a known layer kind; expected one of {sorted(_LAYER_TYPE_ALIASES)}")
    return _LAYER_TYPE_ALIASES[kind]


def _require_positive(name: str, value) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ConfigError(f"{name}={value!r} must be a positive integer")

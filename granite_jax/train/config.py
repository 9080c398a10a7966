"""Run configuration: YAML files in `configs/`, overridden from the command line as `key=value`.

    python train.py --config configs/pretrain-tiny.yaml steps=200 optimizer.lr=3e-4 data.batch_size=4

Values given as `key=value` are parsed as YAML (`3e-4`, `true`, `[a, b]`). Unknown keys and values of the
wrong type are errors that name the key. The resolved configuration is written to the run directory.
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from typing import Any

import yaml

from granite_jax import storage
from granite_jax.parallel.plan import ShardingPlan
from granite_jax.run_dir import RunDir
from granite_jax.sources import HFDirectory, Preset, SourceError, WeightSource, parse_init_from


class RunConfigError(ValueError):
    """A run configuration key is unknown or its value has the wrong type or range."""


@dataclasses.dataclass
class DataConfig:
    # "text": documents for pretraining; "chat": conversations for SFT (granite_jax.data.sft); "preference":
    # (prompt, chosen, rejected) lines for DPO (granite_jax.data.preference, the `dpo` section)
    format: str = "text"
    train: list[str] = dataclasses.field(default_factory=lambda: ["data/kjv/kjv.jsonl.gz"])
    validation: list[str] = dataclasses.field(default_factory=lambda: ["data/kjv/kjv-validation.jsonl.gz"])
    text_field: str = "text"
    # sentencepiece .model, tokenizer.json, or an HF directory; null: the tokenizer of init_from
    tokenizer: str | None = "data/tokenizer"
    seq_len: int = 256
    batch_size: int = 8  # global batch, rows per optimizer micro-step
    shuffle_seed: int = 0
    # Independent data streams (each its own shard of the files, batch_size / streams rows of each batch);
    # null: one per process. Fix it to resume a run on a different number of processes.
    streams: int | None = None
    # chat and preference: "auto" (the tokenizer's own template, else the built-in Granite 4.0 format), "builtin", or a
    # Jinja file.
    chat_template: str = "auto"
    # Any text data file (pretraining and chat): what to do with a malformed line — not UTF-8, not JSON, no
    # text field, a bad conversation: "error" (naming file and line) or "skip" (counted and printed; in a .txt
    # file the paragraph holding a non-UTF-8 line is skipped with it).
    bad_lines: str = "error"
    # chat and preference: with a sample (a pair) longer than a row ("truncate" or "drop", counted); how many
    # rows first-fit packing fills at once.
    overlong: str = "truncate"
    packing_bins: int = 16


@dataclasses.dataclass
class OptimizerConfig:
    lr: float = 3e-3
    min_lr_ratio: float = 0.1  # final learning rate as a fraction of lr
    schedule: str = "cosine"  # "cosine", "wsd" (warmup-stable-decay) or "constant"
    warmup_steps: int = 20
    decay_fraction: float = 0.2  # wsd: share of the steps spent decaying at the end
    weight_decay: float = 0.1
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    clip_norm: float = 1.0
    grad_accum_steps: int = 1


@dataclasses.dataclass
class CheckpointConfig:
    every_steps: int = 50
    keep: int = 3
    async_save: bool = True
    save_timeout_s: float = 3600.0  # a save that has not finished after this long stops the run with an error


@dataclasses.dataclass
class LoRAConfig:
    """LoRA adapters (`granite_jax/model/lora.py`): only they are trained, the base weights are frozen."""
    rank: int = 8
    alpha: float = 16.0  # the adapter's output is scaled by alpha / rank
    dropout: float = 0.0  # dropout on the adapter's input, in training
    # Projections to adapt, by name: q_proj k_proj v_proj o_proj (attention), in_proj out_proj (Mamba),
    # input_linear output_linear (the shared MLP). Routed experts and the router are not adapted.
    targets: list[str] = dataclasses.field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "in_proj", "out_proj"])
    # QLoRA: store the frozen base weights (every dense projection of the layers and the routed experts)
    # quantised, int8 (per output channel) or nf4 (blocks of 64); null: float (`granite_jax/model/quantize.py`).
    quantize_base: str | None = None


@dataclasses.dataclass
class DPOConfig:
    """Direct preference optimisation (`granite_jax/train/dpo.py`), for data.format=preference. The reference
    model is the run's starting weights: a frozen copy of them (one more float32 copy of the parameters), or
    with `lora` the same model with its adapters off (no copy)."""
    beta: float = 0.1  # strength of the KL regularisation towards the reference; rewards are beta * log-ratios
    label_smoothing: float = 0.0  # cDPO: the probability that a pair's labels are flipped (sigmoid loss only)
    loss: str = "sigmoid"  # "sigmoid" (DPO) or "ipo" (IPO on per-token mean log-ratios, as TRL computes it)


DPO_LOSSES = ("sigmoid", "ipo")


@dataclasses.dataclass
class RunConfig:
    model: str = "tiny-hybrid-moe"  # a preset name or a model YAML
    model_overrides: dict = dataclasses.field(default_factory=dict)  # e.g. {remat_policy: full}
    # Start from other weights: "hf:DIR" (an HF checkpoint directory) or "run:DIR" (the newest checkpoint of
    # one of our runs, e.g. runs/pretrain-tiny); the optimizer starts fresh.
    init_from: str | None = None
    # With init_from=hf:DIR: verify DIR's model.sig before loading it, e.g. {public_key: keys/granite.pub}, or
    # {certificate_chain: [ca.pem]}, or {identity: ..., issuer: ...} (Sigstore); null: not verified.
    init_verify: dict | None = None
    run_dir: str = "runs/pretrain-tiny"
    steps: int = 200
    seed: int = 0
    compute_dtype: str = "float32"
    z_loss: float = 0.0  # coefficient of mean(logsumexp(logits)^2)
    loss_chunk_tokens: int = 1024  # logits exist for about this many tokens per device at a time (a slice of its rows)
    # the head loss's gradient: "recompute" (chunks under jax.checkpoint) or "fused" (computed in the forward pass;
    # one head matmul per token fewer; see model/head.py: chunked_cross_entropy)
    loss_impl: str = "recompute"
    log_every: int = 10
    eval_every: int = 100
    eval_batches: int = 4
    peak_tflops: float | None = None  # MFU denominator; None: model/flops.py's PEAK_TFLOPS (else no MFU)
    # Device mesh sizes per axis (data, fsdp, tensor, expert, context); -1 = the remaining devices. context > 1
    # splits every row's tokens over that many devices (context parallelism).
    mesh: dict = dataclasses.field(default_factory=lambda: {"data": -1, "fsdp": 1, "tensor": 1, "expert": 1,
                                                            "context": 1})
    # Expert parallelism (when the rules' expert axis has > 1 device): copies one device may send to one expert
    # shard, as a multiple of its even share; null = dropless. Dropped copies are counted (moe_dropped).
    moe_capacity_factor: float | None = None
    # Expert parallelism's token exchange: auto (ragged_all_to_all on GPU/TPU, all_to_all on CPU) | all_to_all | ragged
    moe_exchange: str = "auto"
    # Context parallelism: which pieces of a row each context device holds. contiguous: shard r holds piece r of
    # N; zigzag: pieces r and 2N-1-r of 2N (balances causal attention's work over the shards for long documents).
    context_layout: str = "contiguous"
    sharding_rules: str = "fsdp_tp"  # a preset of granite_jax.parallel.mesh.RULES: fsdp_tp, fsdp, ep_over_data
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    optimizer: OptimizerConfig = dataclasses.field(default_factory=OptimizerConfig)
    checkpoint: CheckpointConfig = dataclasses.field(default_factory=CheckpointConfig)
    # LoRA: train adapters on the projections it names, the base weights frozen; null: train every weight.
    lora: LoRAConfig | None = None
    # DPO settings for data.format=preference; null there: the defaults (beta 0.1, sigmoid loss).
    dpo: DPOConfig | None = None

    def validate(self) -> None:
        for name, value in [("steps", self.steps), ("data.seq_len", self.data.seq_len),
                            ("data.batch_size", self.data.batch_size), ("log_every", self.log_every),
                            ("eval_every", self.eval_every), ("checkpoint.every_steps", self.checkpoint.every_steps),
                            ("checkpoint.keep", self.checkpoint.keep), ("loss_chunk_tokens", self.loss_chunk_tokens),
                            ("optimizer.grad_accum_steps", self.optimizer.grad_accum_steps),
                            ("data.packing_bins", self.data.packing_bins)]:
            if value <= 0:
                raise RunConfigError(f"{name}={value} must be positive")
        if self.data.seq_len > MAX_SEQ_LEN:
            raise RunConfigError(f"data.seq_len={self.data.seq_len:,} is longer than {MAX_SEQ_LEN:,} tokens, the "
                                 "longest row this project builds (a row's arrays are held on the host whole)")
        for axis, size in self.mesh.items():
            if isinstance(size, bool) or not isinstance(size, int):
                raise RunConfigError(f"mesh.{axis}={size!r} must be a whole number of devices (-1: the rest)")
        for name, value, interval in _ranges(self):
            if not interval.contains(value):
                raise RunConfigError(f"{name}={value} is outside {interval}")
        if self.data.streams is not None and self.data.streams <= 0:
            raise RunConfigError(f"data.streams={self.data.streams} must be positive (or null: one per process)")
        from granite_jax.config import ModelConfig  # the model's fields, for the keys of model_overrides

        model_fields = {f.name for f in dataclasses.fields(ModelConfig)} - {"extra"}
        unknown = sorted(set(self.model_overrides) - model_fields)
        if unknown:
            raise RunConfigError(f"model_overrides has unknown model config keys {unknown}; known keys: "
                                 f"{sorted(model_fields)}")
        if self.optimizer.schedule not in ("cosine", "wsd", "constant"):
            raise RunConfigError(f"optimizer.schedule={self.optimizer.schedule!r}: expected cosine, wsd or constant")
        self.weight_source  # noqa: B018 - parses init_from, raising on a malformed one
        self.init_verify_spec  # noqa: B018 - parses init_verify, raising on a malformed one
        choices = {"data.format": (self.data.format, ("text", "chat", "preference")),
                   "data.bad_lines": (self.data.bad_lines, ("error", "skip")),
                   "data.overlong": (self.data.overlong, ("truncate", "drop")),
                   "loss_impl": (self.loss_impl, ("recompute", "fused"))}
        for name, (value, allowed) in choices.items():
            if value not in allowed:
                raise RunConfigError(f"{name}={value!r}: expected one of {list(allowed)}")
        if self.data.tokenizer is None and self.init_from is None:
            raise RunConfigError("data.tokenizer is null (the tokenizer of init_from) but init_from is not set: "
                                 "give data.tokenizer or init_from=hf:DIR")
        try:
            self.sharding_plan  # noqa: B018 - validates the rules preset, MoE exchange and capacity, layout
        except ValueError as e:
            raise RunConfigError(str(e)) from None
        if not self.data.train:
            raise RunConfigError("data.train is empty: give at least one training file")
        if problem := storage.checkpoint_location_problem(self.run_dir):
            raise RunConfigError(f"run_dir={self.run_dir!r}: {problem}")
        if self.dpo is not None and self.data.format != "preference":
            raise RunConfigError(f"dpo is set but data.format={self.data.format!r}: DPO trains on "
                                 "data.format=preference")
        if self.preference_tuning is not None:
            check_dpo(self.preference_tuning)
        if self.lora is not None:
            from granite_jax.model.lora import check_lora
            from granite_jax.model.quantize import check_quantize_base

            try:
                check_lora(rank=self.lora.rank, alpha=self.lora.alpha, dropout=self.lora.dropout,
                           targets=self.lora.targets)
                check_quantize_base(self.lora.quantize_base)
            except ValueError as e:
                raise RunConfigError(str(e)) from None

    @property
    def preference_tuning(self) -> DPOConfig | None:
        """The DPO settings of a data.format=preference run (`dpo`, or its defaults when null); None otherwise."""
        if self.data.format != "preference":
            return None
        return self.dpo or DPOConfig()

    @property
    def weight_source(self) -> WeightSource:
        """Where the run's first weights come from: `init_from` (with `init_verify` for an HF directory), or the
        preset `model` with `model_overrides`, initialised from `seed`."""
        if self.init_from is None:
            return Preset(self.model, dict(self.model_overrides), self.seed)
        try:
            source = parse_init_from(self.init_from)
        except SourceError as e:
            raise RunConfigError(str(e)) from None
        return dataclasses.replace(source, verify=self.init_verify_spec) if isinstance(source, HFDirectory) else source

    @property
    def init_verify_spec(self):
        """`init_verify` parsed (a `granite_jax.formats.signing.VerifySpec`; None: no verification)."""
        if self.init_verify is None:
            return None
        from granite_jax.formats.signing import SignatureError, VerifySpec

        if self.init_from is None or not self.init_from.startswith("hf:"):
            raise RunConfigError(f"init_verify is set but init_from={self.init_from!r}: verification applies to "
                                 "init_from=hf:DIR")
        try:
            return VerifySpec.from_mapping(self.init_verify, where="init_verify")
        except SignatureError as e:
            raise RunConfigError(str(e)) from None

    @property
    def sharding_plan(self) -> ShardingPlan:
        """The plan the model is given: rules preset, MoE exchange and capacity, context layout."""
        return ShardingPlan(rules=self.sharding_rules, moe_capacity_factor=self.moe_capacity_factor,
                            moe_exchange=self.moe_exchange, context_layout=self.context_layout)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def check_dpo(dpo: DPOConfig, field: str = "dpo") -> None:
    """RunConfigErrors naming the field: beta ≤ 0, label_smoothing outside [0, 0.5), an unknown loss, label
    smoothing with the IPO loss (which has none)."""
    if not dpo.beta > 0:
        raise RunConfigError(f"{field}.beta={dpo.beta!r} must be positive")
    if not 0.0 <= dpo.label_smoothing < 0.5:
        raise RunConfigError(f"{field}.label_smoothing={dpo.label_smoothing!r} is outside [0, 0.5)")
    if dpo.loss not in DPO_LOSSES:
        raise RunConfigError(f"{field}.loss={dpo.loss!r}: expected one of {list(DPO_LOSSES)}")
    if dpo.loss == "ipo" and dpo.label_smoothing:
        raise RunConfigError(f"{field}.label_smoothing={dpo.label_smoothing!r} applies to loss=sigmoid only")


class Interval(typing.NamedTuple):
    """Bounds of a numeric field; `closed_low` / `closed_high` say whether the bound itself is allowed."""
    low: float
    high: float = float("inf")
    closed_low: bool = True
    closed_high: bool = False

    def contains(self, value: float) -> bool:
        above = value >= self.low if self.closed_low else value > self.low
        below = value <= self.high if self.closed_high else value < self.high
        return above and below

    def __str__(self) -> str:
        return f"{'[' if self.closed_low else '('}{self.low}, {self.high}{']' if self.closed_high else ')'}"


def _ranges(config: "RunConfig") -> list[tuple[str, float, Interval]]:
    """The numeric fields with a range, and the range. Values outside would train silently wrong (a negative
    lr ascends the loss, min_lr_ratio > 1 raises the lr as it "decays", eval_batches=0 reports a loss of 0)."""
    o = config.optimizer
    return [("optimizer.lr", o.lr, Interval(0.0)),
            ("optimizer.warmup_steps", o.warmup_steps, Interval(0)),
            ("optimizer.min_lr_ratio", o.min_lr_ratio, Interval(0.0, 1.0, closed_high=True)),
            ("optimizer.decay_fraction", o.decay_fraction, Interval(0.0, 1.0, closed_low=False, closed_high=True)),
            ("optimizer.weight_decay", o.weight_decay, Interval(0.0)),
            ("optimizer.b1", o.b1, Interval(0.0, 1.0)),
            ("optimizer.b2", o.b2, Interval(0.0, 1.0)),
            ("optimizer.eps", o.eps, Interval(0.0, closed_low=False)),
            ("optimizer.clip_norm", o.clip_norm, Interval(0.0, closed_low=False)),
            ("z_loss", config.z_loss, Interval(0.0)),
            ("eval_batches", config.eval_batches, Interval(1)),
            ("checkpoint.save_timeout_s", config.checkpoint.save_timeout_s, Interval(0.0, closed_low=False))]


MAX_SEQ_LEN = 2**24  # 16M tokens: 32x the 512K config; a row's host arrays stay under ~1.3 GB

# What a checkpoint's data position and optimizer state depend on. A resume with one of them changed would read
# the data from the wrong place (or another corpus) or fail to restore the optimizer state. (data.streams is
# checked against the stream count a checkpoint's data position carries, where it has one.)

RESUME_FIELDS = ("model", "data.format", "data.train", "data.text_field", "data.tokenizer", "data.seq_len",
                 "data.batch_size", "data.shuffle_seed", "data.streams", "data.chat_template", "data.packing_bins",
                 "data.overlong", "optimizer.grad_accum_steps", "lora")
_PATH_FIELDS = {"data.train", "data.tokenizer", "data.chat_template"}


def resume_differences(saved: dict, config: RunConfig, ignore: tuple[str, ...] = ()) -> list[str]:
    """["data.seq_len: 64 in the checkpoint, 128 now", ...]: the RESUME_FIELDS on which `saved` (a checkpoint's
    run configuration) and `config` differ. Paths compare by absolute path; `model` only when neither run
    started from other weights (init_from), whose model the checkpoint's parameter shapes then describe."""
    current, defaults = config.to_dict(), RunConfig().to_dict()
    differences = []
    for name in RESUME_FIELDS:
        if name in ignore:
            continue
        if name == "model" and (saved.get("init_from") or config.init_from):
            continue
        was, now = (_field(tree, name) for tree in (saved, current))
        if was is _MISSING:  # saved by a version without the field: it had the default's behaviour
            was = _field(defaults, name)
        if name in _PATH_FIELDS:
            was, now = _absolute(was), _absolute(now)
        if was != now:
            differences.append(f"{name}: {was!r} in the checkpoint, {now!r} now")
    return differences


_MISSING = object()


def _field(tree: dict, dotted: str):
    for part in dotted.split("."):
        if not isinstance(tree, dict) or part not in tree:
            return _MISSING
        tree = tree[part]
    return tree


def _absolute(value):
    if isinstance(value, list):
        return [_absolute(v) for v in value]
    return storage.absolute(value) if isinstance(value, str) and value not in ("auto", "builtin") else value


def _check_type(key: str, value: Any, annotation) -> Any:
    """Coerce ints to floats where a float is wanted; otherwise the value must already have the type."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(annotation)
        if value is None and type(None) in options:
            return None
        for option in options:
            if option is type(None):
                continue
            try:
                return _check_type(key, value, option)
            except RunConfigError:
                pass
        raise RunConfigError(f"{key}={value!r} has type {type(value).__name__}; expected {annotation}")
    if origin is list:
        if not isinstance(value, list):
            raise RunConfigError(f"{key}={value!r} must be a list")
        return [_check_type(f"{key}[{i}]", v, typing.get_args(annotation)[0]) for i, v in enumerate(value)]
    if annotation is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if annotation is float and isinstance(value, str):  # YAML 1.1 reads "1e-4" (no dot) as a string
        try:
            return float(value)
        except ValueError:
            pass
    if annotation is dict and isinstance(value, dict):
        return value
    if annotation in (int, float, str, bool) and (type(value) is annotation):
        return value
    expected = getattr(annotation, "__name__", annotation)
    raise RunConfigError(f"{key}={value!r} has type {type(value).__name__}; expected {expected}")


def _apply(obj, updates: dict, prefix: str = "") -> None:
    fields = {f.name: f for f in dataclasses.fields(obj)}
    types_ = typing.get_type_hints(type(obj))
    for key, value in updates.items():
        path = f"{prefix}{key}"
        if key not in fields:
            raise RunConfigError(f"unknown config key {path!r}; known keys here: {sorted(fields)}")
        current = getattr(obj, key)
        section = _optional_section(types_[key])
        if current is None and section is not None and isinstance(value, dict):
            current = section()  # an optional section (lora) given fields: its defaults, then the fields
            setattr(obj, key, current)
        if dataclasses.is_dataclass(current) and not (value is None and section is not None):
            if not isinstance(value, dict):
                raise RunConfigError(f"{path} must be a mapping of its fields, got {value!r}")
            _apply(current, value, prefix=f"{path}.")
        else:
            setattr(obj, key, _check_type(path, value, types_[key]))


def _optional_section(annotation):
    """The dataclass of an optional section (`LoRAConfig | None`), or None for any other annotation."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        options = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(options) == 1 and dataclasses.is_dataclass(options[0]):
            return options[0]
    return None


def apply_overrides(config: RunConfig, updates: dict) -> RunConfig:
    """Set the fields a nested mapping names (`{"data": {"seq_len": 64}}`) on `config`, checking every key and
    type, then validate it."""
    _apply(config, updates)
    config.validate()
    return config


def parse_overrides(pairs: list[str]) -> dict:
    """["a.b=1", "c=x"] → {"a": {"b": 1}, "c": "x"}; values parsed as YAML."""
    tree: dict = {}
    for pair in pairs:
        if "=" not in pair:
            raise RunConfigError(f"override {pair!r} is not of the form key=value")
        key, raw = pair.split("=", 1)
        try:
            value = _parse_yaml(raw, f"override {pair!r}", key) if raw else ""
        except yaml.YAMLError as e:
            raise RunConfigError(f"override {pair!r}: the value is not valid YAML ({_first_line(e)})") from None
        node = tree
        parts = key.split(".")
        for depth, part in enumerate(parts[:-1]):
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise RunConfigError(f"override {pair!r} sets a field of {'.'.join(parts[:depth + 1])}, which an "
                                     f"earlier override set to {node!r}: give one or the other")
        node[parts[-1]] = value
    return tree


class _DuplicateKey(yaml.YAMLError):
    def __init__(self, path: tuple, first: yaml.Mark, second: yaml.Mark):
        super().__init__(path, first, second)
        self.path, self.first, self.second = path, first, second


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses a key given twice in one mapping, at any depth (PyYAML keeps the last one
    silently). Keys a merge (`<<: *anchor`) brings in may be given again: that is how a merge is overridden."""

    def __init__(self, stream):
        super().__init__(stream)
        self._paths: dict[int, tuple] = {}  # id(node) -> the keys (list indices) leading to it from the root

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):  # checked before flatten_mapping brings merged keys in
            path, seen = self._paths.get(id(node), ()), {}
            for key_node, value_node in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    first = seen.setdefault(key, key_node)
                except TypeError:  # an unhashable key: construct_mapping refuses it
                    continue
                if first is not key_node:
                    raise _DuplicateKey((*path, key), first.start_mark, key_node.start_mark)
                self._paths.setdefault(id(value_node), (*path, key))
        return super().construct_mapping(node, deep=deep)

    def construct_sequence(self, node, deep=False):
        if isinstance(node, yaml.SequenceNode):
            path = self._paths.get(id(node), ())
            for index, child in enumerate(node.value):
                self._paths.setdefault(id(child), (*path, index))
        return super().construct_sequence(node, deep=deep)


def _parse_yaml(text, source: str, prefix: str = ""):
    """YAML text or a stream parsed as `yaml.safe_load` would, except that a key given twice in a mapping is a
    RunConfigError naming `source` (the file, or the override), the key's path (under `prefix`, an override's key)
    and both lines. Other YAML errors are raised as they are."""
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader)
    except _DuplicateKey as e:
        parts = [*([prefix] if prefix else []), *e.path]
        dotted = "".join(f"[{p}]" if isinstance(p, int) else f"{'.' if i else ''}{p}" for i, p in enumerate(parts))
        first, second = e.first.line + 1, e.second.line + 1
        where = f"line {first} and line {second}" if first != second else f"both on line {first}"
        raise RunConfigError(f"{source}: key {dotted!r} is given twice ({where}); the second would replace the "
                             "first: keep one") from None


def _first_line(error: Exception) -> str:
    return " ".join(str(error).split("\n")[:1])


def load_run_config(path: str | None = None, overrides: list[str] | tuple = ()) -> RunConfig:
    config = RunConfig()
    if path is not None:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"run config {path!r} does not exist")
        with open(path) as f:
            try:
                raw = _parse_yaml(f, path) or {}
            except yaml.YAMLError as e:
                raise RunConfigError(f"{path}: not valid YAML ({' '.join(str(e).split())})") from None
        if not isinstance(raw, dict):
            raise RunConfigError(f"{path}: expected a mapping at the top level")
        _apply(config, raw)
    _apply(config, parse_overrides(list(overrides)))
    config.validate()
    return config


def save_run_config(config: RunConfig, directory: str) -> str:
    return RunDir(directory).save_config(config.to_dict())

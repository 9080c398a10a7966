"""Where a model's weights come from: the one module that knows.

A weight source is one of
- `Preset`: a model of `configs/models/` (with a run's `model_overrides`) initialised from a seed;
- `HFDirectory`: a Hugging Face checkpoint directory (config.json + safetensors; compressed-tensors FP8 is
  read dequantized by `granite_jax.formats.hf`);
- `RunDirectory`: one of our training runs, its newest checkpoint unless a step is given. A LoRA run's
  checkpoints hold adapters only: its base is read again from the run's own source (`run_source` of its saved
  configuration), the adapters put on it and, unless `merge=False`, folded into the kernels.

Each answers the same three questions: its model configuration (no weights read), its tokenizer, and its
weights, loaded onto given shardings (each process reading only the slices its devices hold). Training
(`init_from`), evaluation (a checkpoint path), `convert export`/`import` and a LoRA run's base all come here;
`init_from` text (`hf:DIR`, `run:DIR`) is parsed here only (`parse_init_from`).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Union

import jax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from granite_jax import storage
from granite_jax.config import ModelConfig, load_preset
from granite_jax.formats import fp8
from granite_jax.formats.hf import load_hf_checkpoint
from granite_jax.formats.run import checkpoint_meta, restore_params, with_shardings
from granite_jax.model import GraniteForCausalLM
from granite_jax.model.lora import apply_lora, merge_lora, quantize_frozen_base
from granite_jax.run_dir import RunDir
from granite_jax.tree import path_names


class SourceError(ValueError):
    """A weight source is malformed (`init_from` text) or does not hold what it should."""


@dataclasses.dataclass(frozen=True)
class Preset:
    """A preset model (`configs/models/NAME.yaml`) with `overrides` on its fields, initialised from `seed`."""

    name: str
    overrides: dict = dataclasses.field(default_factory=dict)
    seed: int = 0

    def __str__(self) -> str:
        return self.name

    def describe(self) -> str:
        return f"the preset {self.name!r} initialised from seed {self.seed}"

    def check(self) -> None:
        """Presets always exist (an unknown name is an error of `model_config`)."""

    def model_config(self, **fields) -> ModelConfig:
        return load_preset(self.name, **{**self.overrides, **fields})

    def tokenizer(self) -> str | None:
        return None  # a preset comes with no tokenizer

    def load(self, shardings=None, **fields) -> GraniteForCausalLM:
        model = GraniteForCausalLM(self.model_config(**fields), rngs=nnx.Rngs(self.seed))
        if shardings is not None:
            params = nnx.state(model, nnx.Param)
            placed = [jax.device_put(x, s) for x, s in zip(jax.tree.leaves(params), jax.tree.leaves(shardings),
                                                            strict=True)]
            nnx.update(model, jax.tree.unflatten(jax.tree.structure(params), placed))
        return model


@dataclasses.dataclass(frozen=True)
class HFDirectory:
    """A Hugging Face checkpoint directory; `verify` (a `granite_jax.formats.signing.VerifySpec`): its
    `model.sig` must verify before anything is read."""

    path: str
    verify: object = None

    def __str__(self) -> str:  # as init_from names it
        return f"hf:{self.path}"

    def describe(self) -> str:
        return f"the HF checkpoint {self.path!r}"

    def check(self) -> None:
        if not os.path.isdir(self.path):
            raise FileNotFoundError(f"{self.path!r} is not a directory")

    def model_config(self, **fields) -> ModelConfig:
        """config.json's model; an FP8 checkpoint's `quantization_config` is dropped (its weights load
        dequantized), so that a run started from it records the model it trains."""
        return fp8.strip_quantization(self.path, ModelConfig.from_hf(self.path, **fields))[0]

    def tokenizer(self) -> str | None:
        """The directory itself when it holds a tokenizer.json (what `load_tokenizer` reads), else None."""
        return self.path if os.path.isfile(os.path.join(self.path, "tokenizer.json")) else None

    def load(self, shardings=None, *, param_dtype="float32", **fields) -> GraniteForCausalLM:
        """`fields`: `compute_dtype` (default float32) and other model config fields to set."""
        dtype = fields.pop("compute_dtype", "float32")
        return load_hf_checkpoint(self.path, dtype=dtype, param_dtype=param_dtype, verify=self.verify,
                                  shardings=shardings, **fields)


@dataclasses.dataclass(frozen=True)
class RunDirectory:
    """One of our training runs: its checkpoint at `step`, the newest when None."""

    path: str
    step: int | None = None

    def __str__(self) -> str:  # as init_from names it
        return f"run:{self.path}"

    def describe(self) -> str:
        return f"the run {self.path!r}"

    def check(self) -> None:
        if not RunDir(self.path).has_checkpoints():
            raise FileNotFoundError(f"{self.path!r} is not a run directory with checkpoints")

    def model_config(self, **fields) -> ModelConfig:
        """The model configuration saved with the checkpoint; no weights are read."""
        return ModelConfig.from_hf(checkpoint_meta(self.path, self.step)[1]["model"], **fields)

    def tokenizer(self) -> str | None:
        return RunDir(self.path).tokenizer()

    def load(self, shardings=None, *, merge: bool = True, **fields) -> GraniteForCausalLM:
        return self.load_with_run(shardings, merge=merge, **fields)[0]

    def load_with_run(self, shardings=None, *, merge: bool = True, **fields) -> tuple[GraniteForCausalLM, dict, int]:
        """(model, saved run config, step). Only the parameters are read (not the optimizer state), so a
        parameters-only checkpoint (`convert import`) loads too; `fields` set compute-only fields such as
        `compute_dtype`, `remat_policy` or `sharding`. `shardings`: NamedShardings like the model's parameters;
        each parameter is then restored straight onto its devices, every process reading only its shards.

        A LoRA run's base is read again from its own source (`lora_base`), its adapters restored over it and,
        with `merge` (what evaluation, generation, `convert export` and `init_from=run:` use), folded into the
        kernels (`merge_lora`): a plain model, exact up to float rounding since no dropout applies outside
        training. `merge=False` keeps the `LoRALinear`s (to export the adapters themselves)."""
        return _load_run(self.path, self.step, shardings, merge, fields, seen=())


WeightSource = Union[Preset, HFDirectory, RunDirectory]


def parse_init_from(text: str, *, verify=None) -> HFDirectory | RunDirectory:
    """`hf:DIR` or `run:DIR` as a source (`verify` applies to an HF directory); SourceError naming the text
    otherwise. HF directories are local (their safetensors slices are memory-mapped); runs may be gs:// URLs."""
    kind, _, path = text.partition(":")
    if kind not in ("hf", "run") or not path:
        raise SourceError(f"init_from={text!r}: expected 'hf:DIRECTORY' or 'run:RUN_DIR'")
    if kind == "hf" and storage.is_url(path):
        raise SourceError(f"init_from={text!r}: HF checkpoint directories are read from local paths only "
                          "(safetensors slices are memory-mapped); copy it to local disk, or import it once "
                          "(python -m granite_jax.convert import DIR gs://.../run) and use init_from=run:")
    if problem := storage.checkpoint_location_problem(path):
        raise SourceError(f"init_from={text!r}: {problem}")
    return HFDirectory(path, verify) if kind == "hf" else RunDirectory(path)


def run_source(run: dict) -> WeightSource:
    """The source a run (its saved configuration, as `RunConfig.to_dict` wrote it) started from: its
    `init_from`, or its preset with its model_overrides and seed."""
    if run.get("init_from"):
        return parse_init_from(run["init_from"])
    return Preset(run["model"], dict(run.get("model_overrides") or {}), run.get("seed", 0))


def checkpoint_source(path: str) -> HFDirectory | RunDirectory:
    """What a user points evaluation or export at: an HF directory (config.json) or a run directory
    (checkpoints/); SourceError naming the path otherwise."""
    if not storage.exists(path):
        raise SourceError(f"checkpoint {path!r} does not exist")
    if storage.is_url(path) and storage.isfile(storage.join(path, "config.json")):
        raise SourceError(f"checkpoint {path!r}: HF checkpoint directories are read from local paths only (copy "
                          "it to local disk, e.g. gcloud storage cp -r); training run directories may be gs:// URLs")
    if os.path.isfile(os.path.join(path, "config.json")):
        return HFDirectory(path)
    if RunDir(path).has_checkpoints():
        return RunDirectory(path)
    raise SourceError(f"checkpoint {path!r} is neither an HF directory (no config.json) nor a training run "
                      "directory (no checkpoints/)")


def hf_base_directory(run: dict) -> str | None:
    """The HF directory a LoRA run's adapters go on (PEFT's `base_model_name_or_path`), absolute: its
    init_from=hf:DIR's; None when the base is one of our runs or a preset (no HF directory until exported)."""
    source = run_source(run)
    return os.path.abspath(source.path) if isinstance(source, HFDirectory) else None


# ------------------------------------------------------------------------------------------ run checkpoints
def _load_run(run_dir, step, shardings, merge, fields, seen):
    step, meta = checkpoint_meta(run_dir, step)
    run = meta.get("run", {})
    if run.get("lora"):
        model = _lora_run_model(run_dir, step, meta, shardings, fields, seen)
        return (merge_lora(model) if merge else model), run, step
    config = ModelConfig.from_hf(meta["model"], **fields)
    abstract = nnx.eval_shape(lambda: GraniteForCausalLM(config, rngs=nnx.Rngs(0)))
    graphdef, params = nnx.split(abstract, nnx.Param)
    restored = restore_params(run_dir, step, params if shardings is None else with_shardings(params, shardings))
    return nnx.merge(graphdef, restored), run, step


def _lora_run_model(run_dir, step, meta, shardings, fields, seen) -> GraniteForCausalLM:
    """A LoRA run's model with its `LoRALinear`s: the base (`lora_base`) with the run's adapters (rank, alpha,
    dropout and targets as saved) restored from the checkpoint. With `shardings`, the adapters are replicated on
    the base's mesh (they are small)."""
    run = meta["run"]
    key = run_dir if storage.is_url(run_dir) else os.path.abspath(run_dir)
    if key in seen:
        raise SourceError(f"{run_dir!r}: its init_from chain of LoRA runs comes back to itself: {list(seen)}")
    model = lora_base(run_dir, run, meta["model"], shardings, fields, seen=(*seen, key))
    lora = run["lora"]
    apply_lora(model, rank=lora["rank"], alpha=lora["alpha"], dropout=lora.get("dropout", 0.0),
               targets=lora["targets"], rngs=nnx.Rngs(0))
    if lora.get("quantize_base"):  # QLoRA: the adapters were trained over dequant(quant(W)); quantise again
        quantize_frozen_base(model, lora["quantize_base"])
    replicated = None
    if shardings is not None:
        replicated = NamedSharding(jax.tree.leaves(shardings)[0].mesh, PartitionSpec())
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated),
                          nnx.state(model, nnx.LoRAParam))
    nnx.update(model, restore_params(run_dir, step, target))
    return model


def lora_base(run_dir: str, run: dict, saved_model: dict, shardings=None, fields=None, *,
              seen=()) -> GraniteForCausalLM:
    """The base weights a LoRA run (saved run config `run`, saved model config `saved_model`) trained its
    adapters over, read from its source as training read it (`run_source`; a run:DIR base that is a LoRA run
    too comes back merged). A base that is gone is a FileNotFoundError naming its path; one whose shapes are not
    those the run saved (replaced since) a SourceError. A base read again cannot be told from a changed one of
    the same shapes (e.g. a run:DIR that trained on): the adapters then apply to the weights found now."""
    fields = dict(fields or {})
    where = (f"{run_dir!r} is a LoRA run: its checkpoints hold only the adapters, whose base is "
             f"init_from={run.get('init_from')!r}")
    try:
        source = run_source(run)
        source.check()
    except SourceError as e:
        raise SourceError(f"{where}: {e}") from None
    except FileNotFoundError as e:
        raise FileNotFoundError(f"{where}, and {e} (a relative path is read from the current directory, as "
                                "training read it)") from None
    if isinstance(source, RunDirectory):
        base = _load_run(source.path, None, shardings, True, fields, seen)[0]
    else:
        base = source.load(shardings, **fields)
    _check_base_shapes(base, ModelConfig.from_hf(saved_model), where)
    return base


def _check_base_shapes(base: GraniteForCausalLM, saved: ModelConfig, where: str) -> None:
    """The base must have the parameter shapes of the model the run saved (the one its adapters were trained on)."""
    expected = nnx.eval_shape(lambda: GraniteForCausalLM(saved, rngs=nnx.Rngs(0)))
    want = {".".join(path_names(p)): tuple(v.shape) for p, v in nnx.to_flat_state(nnx.state(expected, nnx.Param))}
    have = {".".join(path_names(p)): tuple(v.shape) for p, v in nnx.to_flat_state(nnx.state(base, nnx.Param))}
    if want != have:
        differ = sorted(n for n in want.keys() | have.keys() if want.get(n) != have.get(n))
        raise SourceError(f"{where}, which no longer holds the model the run trained on: {differ[0]} has shape "
                          f"{have.get(differ[0])}, the run's model {want.get(differ[0])} ({len(differ)} parameters "
                          "differ)")

"""One run setup, shared by training (`train/loop.py`) and the dry run (`train/dry_run.py`): the mesh, the
sharding plan, the model (real, or abstract for a dry run), the optimizer, every sharding, and the compiled
train and eval steps.

The plan travels inside the model's configuration (`ModelConfig.sharding`), and the steps are traced under
`jax.set_mesh(run.mesh)` (`with run.activate():`), so nothing about the devices reaches the model through
hidden state: the mesh and the plan are both part of what jit compiles for.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from granite_jax.config import ModelConfig
from granite_jax.formats.run import with_shardings
from granite_jax.model import GraniteForCausalLM
from granite_jax.model.flops import training_flops_per_token
from granite_jax.model.lora import apply_lora, quantize_frozen_base
from granite_jax.model.quantize import parameter_count
from granite_jax.parallel.mesh import (
    batch_sharding,
    check_batch,
    check_model_fits_mesh,
    check_sequence,
    make_mesh,
    parameter_shardings,
)
from granite_jax.sources import Preset, RunDirectory, WeightSource
from granite_jax.train.config import RunConfig, RunConfigError
from granite_jax.train.dpo import PreferenceOptimization
from granite_jax.train.optim import make_optimizer
from granite_jax.train.step import LanguageModeling, TrainState, make_eval_step, make_train_step

BATCH_FIELDS = (("input_ids", jnp.int32), ("segment_ids", jnp.int32), ("positions", jnp.int32),
                ("targets", jnp.int32), ("loss_weights", jnp.float32))


@dataclasses.dataclass
class Run:
    """Everything a run computes with. `state` holds arrays placed on the mesh, or for an abstract run
    `jax.ShapeDtypeStruct`s carrying the same shardings."""

    config: RunConfig
    mesh: Mesh
    model_config: ModelConfig
    graphdef: Any
    state: TrainState
    state_shardings: TrainState
    data_sharding: NamedSharding
    tx: optax.GradientTransformation
    objective: Any  # `run_objective`: LanguageModeling or PreferenceOptimization
    _train_step: Callable
    _eval_step: Callable
    # The model state that is not trained (LoRA: the base weights, placed like `state.params` would be), and its
    # shardings; None when every weight is trained.
    frozen: Any = None
    frozen_shardings: Any = None
    # DPO without LoRA: the reference model's parameters, a frozen copy of the starting ones placed like
    # `state.params` (one more copy of the parameters in memory; no optimizer state). None otherwise.
    reference: Any = None
    # LoRA: how many adapter weights are trained (counted at setup: the loop hands `state` over to the step).
    adapter_parameters: int | None = None

    def _step_arguments(self) -> tuple:
        return self.frozen, self.reference

    def flops_per_token(self, keys_per_query: float | None = None) -> float:
        """`training_flops_per_token` of what this run's step computes: with LoRA the base frozen and the
        adapters trained, with DPO the reference's forward pass too."""
        return training_flops_per_token(self.model_config, self.config.data.seq_len, keys_per_query,
                                        adapters=self.adapter_parameters,
                                        reference=self.objective.uses_reference)

    def activate(self):
        """The context every step of this run is traced and run in: its mesh (`jax.set_mesh`)."""
        return jax.set_mesh(self.mesh)

    def train_step(self, state: TrainState, batch: dict):
        return self._train_step(self.graphdef, state, batch, *self._step_arguments())

    def eval_step(self, params, batch: dict):
        return self._eval_step(self.graphdef, params, batch, *self._step_arguments())

    @property
    def batch_shape(self) -> tuple[int, int]:
        """(rows, positions) of a global batch."""
        return self.config.data.batch_size, self.config.data.seq_len

    def abstract_batch(self) -> dict:
        return {name: jax.ShapeDtypeStruct(self.batch_shape, dtype, sharding=self.data_sharding)
                for name, dtype in BATCH_FIELDS}

    def lower_train_step(self):
        """The train step lowered for this run's (possibly abstract) state and a batch of the configured shape."""
        with self.activate():
            return self._train_step.lower(self.graphdef, self.state, self.abstract_batch(), *self._step_arguments())


def model_overrides(config: RunConfig) -> dict:
    """The compute fields a run sets on its model's configuration (on top of `model_overrides`)."""
    return dict(config.model_overrides, compute_dtype=config.compute_dtype, sharding=config.sharding_plan)


def checked_source(config: RunConfig) -> WeightSource:
    """`config.weight_source`, which must exist (an HF directory, a run directory with checkpoints)."""
    source = config.weight_source
    try:
        source.check()
    except FileNotFoundError as e:
        hint = (" (train it first, e.g. `python train.py` for runs/pretrain-tiny)"
                if isinstance(source, RunDirectory) else "")
        raise FileNotFoundError(f"init_from={str(source)!r}: {e}{hint}") from None
    return source


def resolve_model_config(config: RunConfig) -> ModelConfig:
    """The model's configuration without its weights: `init_from`'s (an HF directory's config.json or a run's
    saved model) or the preset's, with the run's compute fields."""
    return checked_source(config).model_config(**model_overrides(config))


def initial_model(config: RunConfig, shardings=None) -> GraniteForCausalLM:
    """A fresh model from the preset, or the weights named by `init_from` (hf:DIR or run:DIR). `shardings`
    (the parameters' NamedShardings, `initial_shardings`): read those weights straight onto their devices, each
    process reading only the shards its devices hold."""
    return checked_source(config).load(shardings, **model_overrides(config))


def with_lora(config: RunConfig, model: GraniteForCausalLM) -> GraniteForCausalLM:
    """The model with `config.lora`'s adapters on it (`granite_jax.model.lora`), its base quantised if
    `lora.quantize_base` says so (`granite_jax.model.quantize`), or unchanged without them."""
    lora = config.lora
    if lora is None:
        return model
    try:
        model = apply_lora(model, rank=lora.rank, alpha=lora.alpha, dropout=lora.dropout, targets=lora.targets,
                           rngs=nnx.Rngs(params=jax.random.fold_in(jax.random.key(config.seed), LORA_SEED_SALT)))
        # QLoRA: the frozen base stored quantised, after the adapters took their shapes and axes from it.
        return model if lora.quantize_base is None else quantize_frozen_base(model, lora.quantize_base)
    except ValueError as e:
        raise RunConfigError(str(e)) from None


# The adapters' initialisation and dropout draw from the run's seed folded with this, not from the streams
# that initialised a fresh base model from the same seed.
LORA_SEED_SALT = 0x10A


def initial_shardings(config: RunConfig, model_config: ModelConfig, mesh: Mesh):
    """Where the parameters of `init_from`'s weights will live on `mesh` (None for a fresh model, which is
    initialised whole and placed with the train state)."""
    if isinstance(config.weight_source, Preset):
        return None
    abstract = nnx.eval_shape(lambda: GraniteForCausalLM(model_config, rngs=nnx.Rngs(0)))
    return parameter_shardings(nnx.state(abstract, nnx.Param), mesh, config.sharding_plan.table)


def train_state_shardings(tx, params, mesh: Mesh, rules: dict) -> TrainState:
    """Shardings of the train state: parameters by the rules, every parameter-shaped part of the optimizer
    state (moments, accumulated gradients) like its parameter, everything else (step counts) replicated.
    `params` may be abstract."""
    param_shardings = parameter_shardings(params, mesh, rules)
    per_leaf = jax.tree.unflatten(jax.tree.structure(params), jax.tree.leaves(param_shardings))
    replicated = NamedSharding(mesh, PartitionSpec())
    opt_shardings = optax.tree_utils.tree_map_params(tx, lambda _, sharding: sharding, jax.eval_shape(tx.init, params),
                                                     per_leaf, transform_non_params=lambda _: replicated)
    return TrainState(replicated, param_shardings, opt_shardings)


def sharded_train_state(params, tx, mesh: Mesh, rules: dict) -> TrainState:
    """Step 0: parameters placed by the rules, optimizer moments (and accumulated gradients) sharded like
    their parameters — `jax.jit(tx.init)` alone would leave them on one device — and the step replicated."""
    shardings = train_state_shardings(tx, params, mesh, rules)
    params = jax.device_put(params, shardings.params)
    opt_state = jax.jit(tx.init, out_shardings=shardings.opt_state)(params)
    return TrainState(jax.device_put(jnp.zeros((), jnp.int32), shardings.step), params, opt_state)


def _abstract_train_state(params, tx, shardings: TrainState) -> TrainState:
    return TrainState(jax.ShapeDtypeStruct((), jnp.int32, sharding=shardings.step),
                      with_shardings(params, shardings.params),
                      with_shardings(jax.eval_shape(tx.init, params), shardings.opt_state))


def build_run(config: RunConfig, devices=None, *, abstract: bool = False) -> Run:
    """Set up `config`'s run over `devices` (default: this process's JAX devices). `abstract`: allocate
    nothing, read no weights (the dry run); the state is `jax.ShapeDtypeStruct`s with their shardings."""
    mesh = make_mesh(config.mesh, devices)
    plan = config.sharding_plan
    check_batch(config.data.batch_size, mesh, plan)
    model_config = resolve_model_config(config)  # checked before any weight is read
    check_model_fits_mesh(model_config, mesh, plan.table)
    check_sequence(config.data.seq_len, mesh, plan, model_config)
    if abstract:
        model = nnx.eval_shape(lambda: with_lora(config, GraniteForCausalLM(model_config,
                                                                            rngs=nnx.Rngs(config.seed))))
    else:
        model = with_lora(config, initial_model(config, initial_shardings(config, model_config, mesh)))
        model_config = model.config
    if config.lora is None:
        (graphdef, params), frozen = nnx.split(model, nnx.Param), None
    else:  # only the adapters are differentiated and have optimizer state; the base weights are frozen
        graphdef, params, frozen = nnx.split(model, nnx.LoRAParam, ...)
    del model
    tx = make_optimizer(config.optimizer, config.steps)
    shardings = train_state_shardings(tx, params, mesh, plan.table)
    state = (_abstract_train_state(params, tx, shardings) if abstract else
             sharded_train_state(params, tx, mesh, plan.table))
    frozen_shardings = None if frozen is None else parameter_shardings(frozen, mesh, plan.table)
    if frozen is not None:
        frozen = (with_shardings(frozen, frozen_shardings) if abstract else
                  jax.device_put(frozen, frozen_shardings))
    objective = run_objective(config, model_config)
    dropout_seed = None if config.lora is None or config.lora.dropout == 0 else config.seed
    reference = None
    if objective.uses_reference and frozen is None:  # the starting parameters, apart from the donated state
        reference = (state.params if abstract else
                     jax.jit(lambda p: jax.tree.map(jnp.copy, p), out_shardings=shardings.params)(state.params))
    return Run(config=config, mesh=mesh, model_config=model_config, graphdef=graphdef, state=state,
               state_shardings=shardings, data_sharding=batch_sharding(mesh, plan), tx=tx, objective=objective,
               _train_step=make_train_step(tx, objective, dropout_seed=dropout_seed),
               _eval_step=make_eval_step(objective), frozen=frozen, frozen_shardings=frozen_shardings,
               reference=reference, adapter_parameters=None if frozen is None else parameter_count(params))


def run_objective(config: RunConfig, model_config: ModelConfig):
    """What the run's step optimises, chosen once: DPO for preference data (`dpo`), else language modelling."""
    dpo = config.preference_tuning
    if dpo is None:
        return LanguageModeling(aux_coef=model_config.router_aux_loss_coef, z_loss=config.z_loss,
                                chunk=config.loss_chunk_tokens, loss_impl=config.loss_impl)
    return PreferenceOptimization(beta=dpo.beta, label_smoothing=dpo.label_smoothing, pair_loss=dpo.loss,
                                  aux_coef=model_config.router_aux_loss_coef, chunk=config.loss_chunk_tokens)

"""LoRA: adapters start equal to the base model (B = 0), split like their kernels, drop out in training only (a key
per adapter and step), shard and train on a mesh like on one device, and bad settings are refused naming the field.
Elsewhere: W + alpha/r·AB in test_lora_export.py (merge_lora, PEFT); training only the adapters from
init_from=hf:DIR in test_qlora.py (its float LoRA run); the bit-for-bit resume in test_train.py (SIGKILL)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import LORA_MESH, LORA_ON_A_MESH, TINY_MESH_RUN, eight_device_job, forward, metrics
from flax import nnx

from granite_jax import GraniteForCausalLM, load_preset
from granite_jax.model.lora import LORA_TARGETS, LoRALinear, apply_lora
from granite_jax.train.config import RunConfig, RunConfigError, apply_overrides, load_run_config
from granite_jax.tree import path_names

TINY = dict(num_hidden_layers=2, layer_types=("mamba", "attention"), mamba_chunk_size=8)


def _tiny_model(seed=0):
    return GraniteForCausalLM(load_preset("tiny-hybrid-moe").replace(**TINY), rngs=nnx.Rngs(seed))


def _ids(B=2, T=16, vocab=128, seed=0):
    return jnp.asarray(np.random.default_rng(seed).integers(0, vocab, (B, T)), jnp.int32)


def _unfused_logits(model, ids) -> np.ndarray:
    """The model's logits from one program compiled without XLA's fusion pass: every op its own kernel, as when
    run eagerly, so that two models' programs compute the ops they share bit for bit alike (with fusion, an extra
    op changes how its neighbours are fused and rounded), at the cost of one compile instead of one per op."""
    graphdef, state = nnx.split(model)
    logits = jax.jit(lambda state, ids: nnx.merge(graphdef, state)(ids)[0])
    compiled = logits.lower(state, ids).compile(compiler_options={"xla_disable_hlo_passes": "fusion"})
    return np.asarray(compiled(state, ids))


@pytest.mark.slow
def test_adapters_start_with_b_zero_equal_to_the_base_model_split_like_their_kernels():
    model = _tiny_model()
    ids = _ids(vocab=model.config.vocab_size)
    base_logits = _unfused_logits(model, ids)
    kernels = {".".join(path_names(p)): np.asarray(v[...]) for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}

    apply_lora(model, rank=4, alpha=8.0, dropout=0.1, targets=list(LORA_TARGETS), rngs=nnx.Rngs(1))
    adapted = [m for _, m in model.iter_modules() if isinstance(m, LoRALinear)]
    # 2 layers: q, k, v, o (1 attention layer) + in_proj, out_proj (1 Mamba layer) + 2 shared-MLP per layer
    assert len(adapted) == 4 + 2 + 2 * 2
    assert all(m.lora.lora_b[...].shape[0] == 4 and not np.any(m.lora.lora_b[...]) for m in adapted)
    for m in adapted:  # logical axes like the kernel's: A (its input axis, rank), B (rank, its output axis)
        kernel_in, kernel_out = m.kernel.get_metadata()["out_sharding"]
        assert m.lora.lora_a.get_metadata()["out_sharding"] == (kernel_in, None)
        assert m.lora.lora_b.get_metadata()["out_sharding"] == (None, kernel_out)
    # The base weights keep their paths: a converter or checkpoint reader sees the same names.
    names = {".".join(path_names(p)) for p, _ in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    assert set(kernels) < names and all("lora" in n for n in names - set(kernels))
    np.testing.assert_array_equal(_unfused_logits(model, ids), base_logits)  # B = 0: bit for bit


@pytest.mark.parametrize("override, message", [
    ("lora.rank=0", "lora.rank=0 must be a positive integer"),
    ("lora.rank=-2", "lora.rank=-2 must be a positive integer"),
    ("lora.alpha=0", "lora.alpha=0.0 must be positive"),
    ("lora.alpha=-1.5", "lora.alpha=-1.5 must be positive"),
    ("lora.dropout=1.0", "lora.dropout=1.0 is outside [0, 1)"),
    ("lora.dropout=-0.1", "lora.dropout=-0.1 is outside [0, 1)"),
    ("lora.targets=[q_proj, qkv]", "lora.targets: ['qkv'] match no module; valid targets: ['q_proj', 'k_proj', "
                                   "'v_proj', 'o_proj', 'in_proj', 'out_proj', 'input_linear', 'output_linear']"),
    ("lora.targets=[]", "lora.targets is empty"),
    ("lora={rank: 4, width: 2}", "unknown config key 'lora.width'"),
])
def test_bad_lora_settings_name_the_field(override, message):
    with pytest.raises(RunConfigError) as error:
        load_run_config(None, [override])
    assert message in str(error.value)


def test_lora_config_from_overrides_and_default_off():
    assert load_run_config(None, []).lora is None
    config = load_run_config(None, ["lora.rank=4"])
    assert (config.lora.rank, config.lora.alpha, config.lora.dropout) == (4, 16.0, 0.0)
    assert config.lora.targets == ["q_proj", "k_proj", "v_proj", "o_proj", "in_proj", "out_proj"]
    assert load_run_config(None, ["lora={rank: 2, targets: [o_proj]}", "lora=null"]).lora is None


def test_a_target_this_model_lacks_is_refused_listing_the_ones_it_has(tmp_path):
    from granite_jax.train.setup import build_run

    config = apply_overrides(RunConfig(), {"model": "tiny-dense-rope", "run_dir": str(tmp_path / "run"),
                                           "data": {"seq_len": 16, "batch_size": 2}, "lora": {"rank": 2}})
    with pytest.raises(RunConfigError) as error:  # a dense transformer has no Mamba in_proj / out_proj
        build_run(config, jax.devices()[:1], abstract=True)
    assert str(error.value) == ("lora.targets: ['in_proj', 'out_proj'] match no projection of this model; it has "
                                "['q_proj', 'k_proj', 'v_proj', 'o_proj', 'input_linear', 'output_linear']")


@pytest.mark.slow
def test_adapter_dropout_is_on_in_training_only_with_a_key_per_adapter_and_step():
    """Under the hardest layout for it: the layers' weights (the dropout keys with them) stacked under lax.scan,
    each layer recomputed in the backward pass (custom_vjp)."""
    from granite_jax.model.lora import enable_dropout
    from granite_jax.train.step import loss_fn

    stack = dict(TINY, num_hidden_layers=4, layer_types=("mamba", "attention") * 2, scan_layers=True,
                 remat_policy="full")
    model = GraniteForCausalLM(load_preset("tiny-hybrid-moe").replace(**stack), rngs=nnx.Rngs(0))
    apply_lora(model, rank=4, alpha=8.0, dropout=0.5, targets=list(LORA_TARGETS), rngs=nnx.Rngs(1))
    rng = np.random.default_rng(0)
    for _, module in model.iter_modules():
        if isinstance(module, LoRALinear):  # nonzero B, so that dropping the adapters' inputs changes the loss
            module.lora.lora_b[...] = jnp.asarray(rng.normal(0, 0.05, module.lora.lora_b.shape), jnp.float32)
    graphdef, params, frozen = nnx.split(model, nnx.LoRAParam, ...)
    ids = _ids(T=16, vocab=model.config.vocab_size)
    batch = dict(input_ids=ids, segment_ids=jnp.ones_like(ids), positions=None, targets=jnp.roll(ids, -1, 1),
                 loss_weights=jnp.ones(ids.shape, jnp.float32))
    # The frozen weights and the batch are arguments, as in the train step: closed over, they would be constants
    # of the program, which then takes twice as long to compile.
    loss = functools.partial(loss_fn, graphdef=graphdef, aux_coef=0.0, z_loss=0.0, chunk=64)
    loss_and_grad = jax.jit(lambda params, frozen, batch, key: jax.value_and_grad(
        lambda p: loss(p, batch=batch, frozen=frozen, dropout_key=key)[0])(params))

    one, grads = loss_and_grad(params, frozen, batch, jax.random.key(1))
    again, _ = loss_and_grad(params, frozen, batch, jax.random.key(1))
    other, _ = loss_and_grad(params, frozen, batch, jax.random.key(2))
    assert float(one) == float(again) and float(one) != float(other)
    assert all(np.isfinite(np.asarray(g)).all() and np.any(g) for g in jax.tree.leaves(grads))
    # outside training (no dropout key) nothing is dropped: the same logits twice, and their mean cross-entropy
    # (the loss without dropout, within 1e-6 of loss_fn's) is not the dropped-out losses (they differ by ~1e-2)
    logits = np.asarray(forward(model, ids)[0])
    np.testing.assert_array_equal(np.asarray(forward(model, ids)[0]), logits)
    from scipy.special import logsumexp  # SciPy: a dependency of JAX

    logits = logits.astype(np.float64)
    log_z = logsumexp(logits, axis=-1)
    plain = np.mean(log_z - np.take_along_axis(logits, np.asarray(batch["targets"])[..., None], -1)[..., 0])
    assert min(abs(float(one) - plain), abs(float(other) - plain)) > 1e-3, (float(one), float(other), plain)

    enable_dropout(model, jax.random.key(3))
    keys = [tuple(np.asarray(m.dropout_key[...])) for _, m in model.iter_modules() if isinstance(m, LoRALinear)]
    assert len(set(keys)) == len(keys)  # q, k and v read the same input: each drops its own features


@eight_device_job("lora_mesh")
@eight_device_job("lora mesh training")
def test_adapters_on_a_mesh_shard_like_their_kernels_and_train_like_one_device(eight_devices, reference_train):
    """On fsdp 2 x expert 2 x tensor 2 (8 virtual CPU devices): each adapter's A is split like its kernel's input
    dimension and B like its output dimension (the rank dimension whole), their AdamW moments like them; and a
    few steps with the adapters on every target give the 1-device run's losses and gradient norms."""
    result = eight_devices("lora_mesh")
    adapters, kernels, mu = result["adapters"], result["kernels"], result["mu"]
    assert result["mesh"] == {**LORA_MESH, "context": 1}
    # 2 layers: q, k, v, o + in_proj, out_proj + the shared MLP's input_linear, output_linear in both
    assert len(adapters) == 2 * (4 + 2 + 2 * 2), sorted(adapters)
    for name, spec in adapters.items():
        module, factor = name.rsplit(".lora.", 1)
        kernel_in, kernel_out = kernels[module]
        expected = [kernel_in, None] if factor.startswith("lora_a") else [None, kernel_out]
        assert spec == expected, (name, spec, kernels[module])
    # the attention and shared-MLP factors are split over fsdp x expert (input side) or tensor (output side)
    assert adapters["model.layers.1.self_attn.q_proj.lora.lora_a.value"] == [["fsdp", "expert", "context"], None]
    assert adapters["model.layers.1.self_attn.q_proj.lora.lora_b.value"] == [None, "tensor"]
    for name, spec in adapters.items():
        moment = [s for n, s in mu.items() if n.endswith(".mu." + name)]
        assert moment == [spec], (name, moment)

    reference, reference_dir = reference_train({**TINY_MESH_RUN, **LORA_ON_A_MESH})
    sharded_losses = eight_devices("lora mesh training")["lora mesh"]
    assert len(reference) == 2 and len(set(reference)) > 1
    np.testing.assert_allclose(sharded_losses, reference, rtol=2e-5)
    np.testing.assert_allclose(metrics(eight_devices.root("lora mesh training") / "loramesh", "grad_norm"),
                               metrics(reference_dir, "grad_norm"), rtol=1e-4)

"""LoRA: adapters start equal to the base model, compute W + alpha/r·AB, train alone (the base frozen, no optimizer
state for it), work from init_from=hf:DIR, reject bad settings naming the field, and resume bit for bit."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import LORA_MESH, LORA_ON_A_MESH, TINY_MESH_RUN, eight_device_job, forward, metrics, tiny_config
from flax import nnx

from granite_jax import GraniteForCausalLM, load_preset, save_hf_checkpoint
from granite_jax.model.lora import LORA_TARGETS, LoRALinear, apply_lora
from granite_jax.train.config import RunConfig, RunConfigError, apply_overrides, load_run_config
from granite_jax.tree import path_names

TINY = dict(num_hidden_layers=2, layer_types=("mamba", "attention"), mamba_chunk_size=8)


def _tiny_model(seed=0):
    return GraniteForCausalLM(load_preset("tiny-hybrid-moe").replace(**TINY), rngs=nnx.Rngs(seed))


def _ids(B=2, T=16, vocab=128, seed=0):
    return jnp.asarray(np.random.default_rng(seed).integers(0, vocab, (B, T)), jnp.int32)


@pytest.mark.slow
def test_zero_b_adapters_equal_the_base_model_and_nonzero_ones_add_alpha_over_r_ab():
    model = _tiny_model()
    ids = _ids(vocab=model.config.vocab_size)
    base_logits = np.asarray(model(ids)[0])
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
    np.testing.assert_array_equal(np.asarray(model(ids)[0]), base_logits)  # B = 0 (and no dropout outside training)

    # Nonzero B: the adapted model is the base model with every kernel W + alpha/r · A B (alpha/r = 2).
    rng = np.random.default_rng(1)
    merged = _tiny_model()
    for path, module in model.iter_modules():
        if isinstance(module, LoRALinear):
            module.lora.lora_b[...] = jnp.asarray(rng.normal(0, 0.02, module.lora.lora_b.shape), jnp.float32)
            target = merged
            for step in path:
                target = target[step] if isinstance(step, int) else getattr(target, step)
            target.kernel[...] = module.kernel[...] + 2.0 * module.lora.lora_a[...] @ module.lora.lora_b[...]
    adapted_logits = np.asarray(forward(model, ids)[0])  # jitted: compared within a tolerance
    assert np.abs(adapted_logits - base_logits).max() > 1e-3
    np.testing.assert_allclose(adapted_logits, np.asarray(forward(merged, ids)[0]), rtol=2e-4, atol=2e-4)


def _lora_run(tmp_path, **lora):
    """A run of the tiny model with adapters, its weights from an HF directory (init_from=hf:DIR)."""
    from granite_jax.train.setup import build_run

    hf_dir = tmp_path / "hf"
    save_hf_checkpoint(_tiny_model(seed=42), hf_dir)
    config = apply_overrides(RunConfig(), {
        "init_from": f"hf:{hf_dir}", "run_dir": str(tmp_path / "run"), "steps": 10,
        "data": {"seq_len": 16, "batch_size": 2, "validation": []},
        "optimizer": {"warmup_steps": 0, "lr": 1e-2, "schedule": "constant"},
        "lora": {"rank": 4, "alpha": 8.0, **lora}})
    return build_run(config, jax.devices()[:1]), hf_dir


def _batch(run, seed):
    B, T = run.batch_shape
    ids = np.random.default_rng(seed).integers(0, run.model_config.vocab_size, (B, T + 1))
    return dict(input_ids=jnp.asarray(ids[:, :-1], jnp.int32), segment_ids=jnp.ones((B, T), jnp.int32),
                positions=jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T)),
                targets=jnp.asarray(ids[:, 1:], jnp.int32), loss_weights=jnp.ones((B, T), jnp.float32))


@pytest.mark.slow
def test_train_steps_change_only_the_adapters_and_the_optimizer_holds_only_their_shapes(tmp_path):
    from granite_jax.formats import load_hf_checkpoint

    run, hf_dir = _lora_run(tmp_path, dropout=0.1, targets=["q_proj", "v_proj", "in_proj", "out_proj"])
    state = run.state
    trained = {".".join(path_names(p)): x.shape for p, x in jax.tree_util.tree_leaves_with_path(state.params)}
    assert trained and all(n.endswith(("lora.lora_a.value", "lora.lora_b.value")) for n in trained), trained
    assert len(trained) == 2 * (2 + 2)  # A and B of q, v (1 attention layer) and in_proj, out_proj (1 Mamba layer)
    # The optimizer state: Adam's two moments of each adapter, nothing the size of a base weight.
    moments = [x.shape for x in jax.tree.leaves(state.opt_state) if x.ndim > 0]
    assert sorted(moments) == sorted(list(trained.values()) * 2)

    # The frozen part is the HF checkpoint's weights as loaded (init_from=hf:DIR).
    loaded = nnx.state(load_hf_checkpoint(str(hf_dir), dtype="float32"), nnx.Param)
    frozen_before = {".".join(path_names(p)): np.asarray(x) for p, x in jax.tree_util.tree_leaves_with_path(run.frozen)}
    for path, x in jax.tree_util.tree_leaves_with_path(loaded):
        np.testing.assert_array_equal(frozen_before[".".join(path_names(path))], np.asarray(x))
    before = {n: np.asarray(x) for n, x in zip(trained, jax.tree.leaves(state.params))}

    with run.activate():
        losses = []
        for step in range(3):
            state, metrics = run.train_step(state, _batch(run, step))
            losses.append(float(metrics["loss"]))
    assert all(np.isfinite(losses)) and int(state.step) == 3
    after = {n: np.asarray(x) for n, x in zip(trained, jax.tree.leaves(state.params))}
    assert all(np.any(after[n] != before[n]) for n in trained)  # every adapter matrix moved (B first, then A)
    frozen_after = {".".join(path_names(p)): np.asarray(x) for p, x in jax.tree_util.tree_leaves_with_path(run.frozen)}
    assert frozen_after.keys() == frozen_before.keys()
    for name in frozen_before:
        np.testing.assert_array_equal(frozen_after[name], frozen_before[name], err_msg=name)  # bit-identical
    # The evaluation sees the trained adapters (deterministic: no dropout), and the loss they lower.
    with run.activate():
        sums, tokens = run.eval_step(state.params, _batch(run, 0))
    assert np.isfinite(float(sums["loss"])) and float(tokens) == 2 * 16


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
def test_a_lora_run_resumes_with_identical_losses(tmp_path):
    """Six steps straight, or three then a resume from the checkpoint at 3: the same losses, bit for bit (the
    adapters' dropout keys follow the step)."""
    from granite_jax.train.loop import train

    def config(run_dir, steps):
        return tiny_config(f"run_dir={run_dir}", f"steps={steps}", "optimizer.schedule=constant",
                           "optimizer.warmup_steps=1", "checkpoint.every_steps=3", "checkpoint.async_save=false",
                           "log_every=3", "lora={rank: 4, alpha: 8, dropout: 0.2, targets: [q_proj, o_proj, in_proj, "
                           "out_proj]}")

    straight = train(config(tmp_path / "straight", 6))
    first = train(config(tmp_path / "resumed", 3))
    second = train(config(tmp_path / "resumed", 6))
    assert len(straight) == 6 and len(first) == 3 and len(second) == 3
    assert first + second == straight
    assert len(set(straight)) > 1
    # Its checkpoints hold adapters only; read back (eval.py, export, init_from=run:), the base is the preset
    # initialised from the run's seed again, as training made it, with the trained adapters on it.
    from granite_jax.model.lora import has_lora, merge_lora
    from granite_jax.sources import RunDirectory
    from granite_jax.train.setup import initial_model

    model, _, step = RunDirectory(str(tmp_path / "resumed")).load_with_run(merge=False)
    assert step == 6 and has_lora(model)
    base = {".".join(path_names(p)): v for p, v in nnx.to_flat_state(nnx.state(initial_model(config(tmp_path, 6)),
                                                                               nnx.Param))}
    for path, variable in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        name = ".".join(path_names(path))
        if isinstance(variable, nnx.LoRAParam):
            assert name.endswith(("lora_a", "lora_b")) and np.any(variable[...]), name  # B trained away from 0
        else:
            np.testing.assert_array_equal(np.asarray(variable[...]), np.asarray(base[name][...]), err_msg=name)
    merged = RunDirectory(str(tmp_path / "resumed")).load()
    assert not has_lora(merged)
    for (path, a), (_, b) in zip(nnx.to_flat_state(nnx.state(merged, nnx.Param)),
                                 nnx.to_flat_state(nnx.state(merge_lora(model), nnx.Param))):
        np.testing.assert_array_equal(np.asarray(a[...]), np.asarray(b[...]), err_msg=".".join(path_names(path)))


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
    loss = functools.partial(loss_fn, graphdef=graphdef, batch=batch, aux_coef=0.0, z_loss=0.0, chunk=64,
                             frozen=frozen)
    loss_and_grad = jax.jit(lambda params, key: jax.value_and_grad(lambda p: loss(p, dropout_key=key)[0])(params))

    plain = jax.jit(lambda params: loss(params)[0])(params)
    one, grads = loss_and_grad(params, jax.random.key(1))
    again, _ = loss_and_grad(params, jax.random.key(1))
    other, _ = loss_and_grad(params, jax.random.key(2))
    assert float(one) == float(again) and float(one) != float(other) and float(one) != float(plain)
    assert all(np.isfinite(np.asarray(g)).all() and np.any(g) for g in jax.tree.leaves(grads))
    # outside training (no dropout key) nothing is dropped: the same logits twice
    np.testing.assert_array_equal(np.asarray(forward(model, ids)[0]), np.asarray(forward(model, ids)[0]))

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

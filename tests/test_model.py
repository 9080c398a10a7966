"""Model API, logical axis names, MoE grouped matmuls and input validation."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import forward
from flax import nnx

import granite_jax
from granite_jax import GraniteForCausalLM, load_preset
from granite_jax.model.moe import MoE, grouped_matmul
from granite_jax.parallel import LOGICAL_AXES


def test_public_api():
    for name in ("ModelConfig", "GraniteForCausalLM", "load_hf_checkpoint", "save_hf_checkpoint"):
        assert hasattr(granite_jax, name)
    config = load_preset("tiny-hybrid-moe")
    out = forward(GraniteForCausalLM(config, rngs=nnx.Rngs(0)), jnp.zeros((2, 5), jnp.int32))
    assert out.logits.shape == (2, 5, config.vocab_size) and out.aux_loss.shape == ()


@pytest.mark.parametrize("preset", ["tiny-hybrid-moe", "tiny-dense-rope"])
def test_every_parameter_has_logical_axes(preset):
    model = nnx.eval_shape(lambda: GraniteForCausalLM(load_preset(preset), rngs=nnx.Rngs(0)))
    for path, variable in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        names = variable.get_metadata().get("out_sharding")
        assert names is not None and len(names) == len(variable.shape), path
        assert all(n is None or n in LOGICAL_AXES for n in names), (path, names)
    assert model.model.embed_tokens.get_metadata()["out_sharding"] == ("vocab", "embed")
    if preset != "tiny-hybrid-moe":
        return
    layer = model.model.layers[0]
    assert layer.mamba.in_proj.kernel.get_metadata()["out_sharding"] == ("embed", "ssm_in_proj")
    assert layer.block_sparse_moe.input_linear.get_metadata()["out_sharding"] == ("expert", "embed", "mlp")


@pytest.mark.parametrize("impl", ["ragged_dot", "tiled", "megablox", "pallas_gpu"])
@pytest.mark.parametrize("empty_rows", [0, 7])
def test_grouped_matmul_matches_per_group_product(impl, empty_rows):
    """Each group of rows times its weight; rows past the groups (an exchange buffer's empty rows) are zero and
    take no gradient, forward and backward (megablox: the Pallas TPU kernels in interpret mode)."""
    rng = np.random.default_rng(0)
    sizes = np.array([5, 0, 17, 1, 9])
    x = jnp.asarray(rng.normal(size=(sizes.sum() + empty_rows, 6)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(5, 6, 3)), jnp.float32)

    def per_group(x, w):
        out = [x[s - n:s] @ w[g] for g, (n, s) in enumerate(zip(sizes, np.cumsum(sizes)))]
        return jnp.concatenate(out + [jnp.zeros((empty_rows, 3), x.dtype)])

    group_sizes = jnp.asarray(sizes, jnp.int32)
    out = grouped_matmul(x, w, group_sizes, impl=impl, tile=4)
    np.testing.assert_allclose(out, per_group(x, w), rtol=1e-5, atol=1e-5)
    loss = lambda fn: lambda x, w: jnp.sum(jnp.sin(fn(x, w)))  # noqa: E731
    grads = jax.grad(loss(lambda x, w: grouped_matmul(x, w, group_sizes, impl=impl, tile=4)), argnums=(0, 1))(x, w)
    expected = jax.grad(loss(per_group), argnums=(0, 1))(x, w)
    for g, e in zip(grads, expected):
        np.testing.assert_allclose(g, e, rtol=1e-4, atol=1e-4)


def test_moe_matches_a_loop_over_tokens():
    config = load_preset("tiny-hybrid-moe").replace(hidden_size=16, mamba_d_head=4, intermediate_size=8,
                                                    num_local_experts=4,
                                                    num_experts_per_tok=2, moe_impl="tiled")
    moe = MoE(config, rngs=nnx.Rngs(1))
    u = jnp.asarray(np.random.default_rng(2).normal(size=(2, 7, 16)), jnp.float32)
    out, stats = moe(u)
    w_r, w_in, w_out = (np.asarray(p[...]) for p in (moe.router.kernel, moe.input_linear, moe.output_linear))
    for token, expected in zip(np.asarray(u).reshape(-1, 16), np.asarray(out).reshape(-1, 16)):
        logits = token @ w_r
        top = np.argsort(-logits)[:2]
        gates = np.exp(logits[top] - logits[top].max())
        gates /= gates.sum()
        acc = np.zeros(16)
        for g, e in zip(gates, top):
            gate, up = np.split(token @ w_in[e], 2)
            acc += g * ((gate / (1 + np.exp(-gate)) * up) @ w_out[e])
        np.testing.assert_allclose(expected, acc, rtol=1e-4, atol=1e-5)
    assert float(stats.tokens) == 14 and float(stats.assignments.sum()) == 28


@pytest.mark.parametrize("impl", ["tiled", "megablox", "pallas_gpu"])
def test_moe_gradients_equal_a_dense_reference(impl):
    """The routed path moves rows with gathers whose backward pass is hand-written (model/permute.py): its
    output and gradients against every expert computed densely and masked by the router's choice, with the
    grouped matmul tiled or megablox's kernels (interpret mode)."""
    config = load_preset("tiny-hybrid-moe").replace(hidden_size=16, mamba_d_head=4, intermediate_size=8,
                                                    num_local_experts=4, num_experts_per_tok=2, moe_impl=impl)
    moe = MoE(config, rngs=nnx.Rngs(1))
    u = jnp.asarray(np.random.default_rng(2).normal(size=(2, 7, 16)), jnp.float32)
    params = (moe.router.kernel[...], moe.input_linear[...], moe.output_linear[...])

    def routed(moe, u):
        return jnp.sum(jnp.sin(moe(u)[0]))

    def dense(u, w_r, w_in, w_out):
        tokens = u.reshape(-1, 16)
        logits = tokens @ w_r
        top_logits, top = jax.lax.top_k(logits, 2)
        gates = jnp.sum(jax.nn.one_hot(top, 4) * jax.nn.softmax(top_logits)[..., None], axis=1)    # (n, E)
        gate, up = jnp.split(jnp.einsum("nh,ehf->enf", tokens, w_in), 2, axis=-1)
        every = jnp.einsum("enf,efh->enh", jax.nn.silu(gate) * up, w_out)
        return jnp.sum(jnp.sin(jnp.einsum("enh,ne->nh", every, gates)))

    np.testing.assert_allclose(nnx.jit(routed)(moe, u), jax.jit(dense)(u, *params), rtol=1e-5)
    d_moe, d_u = nnx.jit(nnx.grad(routed, argnums=(0, 1)))(moe, u)
    got = (d_u, d_moe["router"]["kernel"][...], d_moe["input_linear"][...], d_moe["output_linear"][...])
    want = jax.jit(jax.grad(dense, argnums=(0, 1, 2, 3)))(u, *params)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5)


def test_move_rows_backward_is_the_transpose_of_its_forward():
    from granite_jax.parallel.permute import inverse_permutation, move_rows

    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(5, 3)), jnp.float32)
    # Copies of 5 tokens x 2 slots into 12 buffer rows; copy (4, 1) dropped (12), rows 3, 7, 11 empty (10).
    slot_of_copy = jnp.asarray([0, 5, 1, 2, 4, 6, 8, 9, 10, 12], jnp.int32)
    copy_of_slot = jnp.full((13,), 10, jnp.int32).at[slot_of_copy].set(jnp.arange(10, dtype=jnp.int32))[:-1]
    token_of_slot = jnp.where(copy_of_slot < 10, copy_of_slot // 2, 5)
    naive = lambda x: jnp.zeros((13, 3)).at[slot_of_copy].set(jnp.repeat(x, 2, axis=0))[:-1]  # noqa: E731
    moved = lambda x: move_rows(x, token_of_slot[:, None], slot_of_copy.reshape(5, 2))  # noqa: E731
    np.testing.assert_array_equal(moved(x), naive(x))
    cotangent = jnp.asarray(rng.normal(size=(12, 3)), jnp.float32)
    np.testing.assert_allclose(jax.vjp(moved, x)[1](cotangent)[0], jax.vjp(naive, x)[1](cotangent)[0], rtol=1e-6)
    order = jnp.asarray([3, 0, 4, 1, 2])
    assert (inverse_permutation(order)[order] == jnp.arange(5)).all()


def test_moe_stats_skip_padding():
    config = load_preset("tiny-hybrid-moe").replace(hidden_size=16, mamba_d_head=4, intermediate_size=8)
    moe = MoE(config, rngs=nnx.Rngs(1))
    u = jnp.ones((1, 6, 16))
    mask = jnp.asarray([[True, True, True, False, False, False]])
    _, stats = moe(u, mask)
    assert float(stats.tokens) == 3 and float(stats.assignments.sum()) == 3 * config.num_experts_per_tok


@pytest.mark.parametrize("kwargs, message", [
    (dict(input_ids=jnp.zeros((5,), jnp.int32)), r"input_ids must have shape \(batch, seq_len\); got shape \(5,\)"),
    (dict(input_ids=jnp.zeros((1, 5))), "input_ids must be integers; got dtype float32"),
    (dict(input_ids=jnp.full((1, 5), 4096, jnp.int32)),
     r"input_ids has values in \[4096, 4096\]; expected \[0, 4096\)"),
    (dict(input_ids=jnp.zeros((1, 5), jnp.int32), segment_ids=jnp.zeros((1, 4), jnp.int32)),
     r"segment_ids has shape \(1, 4\); expected input_ids' shape \(1, 5\)"),
    (dict(input_ids=jnp.zeros((1, 5), jnp.int32), positions=jnp.zeros((1, 5))), "positions must be integers"),
])
def test_bad_inputs_are_reported(kwargs, message, dense_model):
    with pytest.raises(ValueError, match=message):
        dense_model(**kwargs)


@pytest.fixture(scope="module")
def dense_model():
    """The tiny dense preset, built once for the input checks (a check raises before it computes anything)."""
    return GraniteForCausalLM(load_preset("tiny-dense-rope"), rngs=nnx.Rngs(0))


@pytest.fixture(scope="module")
def remat_gradients():
    """`remat_gradients(policy)`: the loss and every parameter gradient of the tiny model's two layer kinds
    (Mamba, attention) on two packed rows with trailing padding, several chunks and attention blocks, and the
    MoE's aux loss, under that `remat_policy`; computed once per policy for this module's tests."""
    ids = jnp.asarray(np.random.default_rng(0).integers(0, 4096, (2, 21)), jnp.int32)
    segments = jnp.asarray([[1] * 9 + [2] * 8 + [0] * 4, [3] * 21])

    @functools.cache
    def gradients(remat_policy: str):
        config = load_preset("tiny-hybrid-moe").replace(
            num_hidden_layers=2, layer_types=("mamba", "attention"), mamba_chunk_size=8, attention_block_size=8,
            remat_policy=remat_policy)
        model = GraniteForCausalLM(config, rngs=nnx.Rngs(0))

        def loss(model):
            out = model(ids, segments)
            return jnp.mean(jax.nn.log_softmax(out.logits)[..., 0]) + out.aux_loss

        value, grads = nnx.jit(nnx.value_and_grad(loss))(model)
        return float(value), jax.tree.leaves(grads)

    return gradients


def test_gradients_are_finite_with_packing_and_padding(remat_gradients):
    value, grads = remat_gradients("none")
    assert np.isfinite(value)
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in grads)


@pytest.mark.slow
@pytest.mark.parametrize("policy", ["full", "save_dots"])
def test_remat_policies_change_memory_not_results(policy, remat_gradients):
    (value, grads), (expected_value, expected) = remat_gradients(policy), remat_gradients("none")
    np.testing.assert_allclose(value, expected_value, rtol=1e-6)
    for g, e in zip(grads, expected, strict=True):
        np.testing.assert_allclose(g, e, rtol=1e-5, atol=1e-7)


def test_training_flops_count_active_weights():
    from granite_jax.model.flops import active_matmul_params, mean_keys_per_query, training_flops_per_token

    config = load_preset("granite-4.0-h-small")
    # 10 of 72 experts per token: about IBM's "9B active" of the 32.2B total (8.8B counted here).
    assert 8.5e9 < active_matmul_params(config) < 9.5e9
    short, long = training_flops_per_token(config, 1024), training_flops_per_token(config, 131072)
    assert short >= 6 * active_matmul_params(config) and long > short  # attention grows with context
    # Attention counts the causal prefix of each token's own document: documents of 3 and 2 tokens see
    # (1+2+3 + 1+2) / 5 keys per token; a row that is one document about T/2.
    assert mean_keys_per_query(np.array([[1, 1, 1, 2, 2]])) == 1.8
    assert mean_keys_per_query(np.ones((2, 1024))) == 512.5
    packed = training_flops_per_token(config, 131072, mean_keys_per_query(np.repeat(np.arange(128), 1024)[None]))
    assert short < packed < long


def test_lora_and_dpo_steps_count_the_work_they_do():
    """LoRA: the frozen weights' backward pass computes input gradients only (4N, not 6N), the adapters count 6
    each; DPO: the reference model's forward pass is one more 2N, attention and SSD once more."""
    from granite_jax.model.flops import active_matmul_params, training_flops_per_token

    config = load_preset("granite-4.0-h-tiny")
    N = active_matmul_params(config)
    full = training_flops_per_token(config, 4096)
    mixers = full - 6 * N  # attention and SSD, forward + backward (3 passes)
    assert 0 < mixers < 0.1 * full
    assert training_flops_per_token(config, 4096, adapters=3_000_000) == pytest.approx(4 * N + 18e6 + mixers)
    assert training_flops_per_token(config, 4096, reference=True) == pytest.approx(8 * N + 4 / 3 * mixers)
    assert training_flops_per_token(config, 4096, adapters=0, reference=True) == pytest.approx(6 * N + 4 / 3 * mixers)


@pytest.mark.slow
def test_scanned_layer_pattern_equals_the_unrolled_stack():
    """scan_layers runs a stack that repeats a pattern of layers (here mamba, attention twice) as a lax.scan over
    the repetitions, under full rematerialisation as a long run has it: the loss, the router statistics and every
    parameter gradient equal the unrolled stack's (without remat, the cheaper program to compile: remat does not
    change results, test_remat_policies_change_memory_not_results)."""
    from granite_jax.train.step import loss_fn

    types = ["mamba", "attention"] * 2
    ids = jnp.asarray(np.random.default_rng(0).integers(1, 4000, (2, 48)), jnp.int32)
    batch = dict(input_ids=ids, segment_ids=jnp.asarray([[1] * 20 + [2] * 28] * 2, jnp.int32), positions=None,
                 targets=jnp.roll(ids, -1, axis=1), loss_weights=jnp.ones((2, 48), jnp.float32))
    results = {}
    for scan in (False, True):
        config = load_preset("tiny-hybrid-moe", num_hidden_layers=4, layer_types=types, scan_layers=scan,
                             mamba_chunk_size=16, remat_policy="full" if scan else "none")
        graphdef, params = nnx.split(GraniteForCausalLM(config, rngs=nnx.Rngs(0)), nnx.Param)

        def loss(p, graphdef=graphdef):
            return loss_fn(p, graphdef, batch, aux_coef=0.01, z_loss=0.0, chunk=32)

        results[scan] = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
    ((loss_unrolled, metrics_unrolled), grads_unrolled), ((loss_scanned, metrics_scanned), grads_scanned) = (
        results[False], results[True])
    assert config.layer_period == 2
    np.testing.assert_allclose(loss_scanned, loss_unrolled, rtol=1e-5)
    np.testing.assert_allclose(metrics_scanned["aux_loss"], metrics_unrolled["aux_loss"], rtol=1e-5)
    for a, b in zip(jax.tree.leaves(grads_scanned), jax.tree.leaves(grads_unrolled)):
        assert float(jnp.max(jnp.abs(a - b))) <= 1e-5 * float(jnp.max(jnp.abs(b))) + 1e-12


@pytest.mark.slow
def test_layers_in_subpieces_equal_the_whole_row(subpiece=16):
    """`subpiece_tokens`: Mamba layers run a row 16 tokens at a time (conv inputs and SSM state carried
    over, documents ending and starting inside and at sub-piece edges) and the MoE block token-chunked: the
    loss and every parameter gradient equal the whole row's. One Mamba layer: an attention layer's MoE block is
    chunked by the same code (DecoderLayer._ffn), and the attention itself is not cut."""
    rng = np.random.default_rng(0)
    ids = jnp.asarray(rng.integers(1, 4000, (2, 96)), jnp.int32)
    segments = jnp.asarray([[1] * 30 + [2] * 2 + [3] * 32 + [1] * 32, [5] * 96], jnp.int32)
    results = {}
    for sub in (0, subpiece):
        config = load_preset("tiny-hybrid-moe", num_hidden_layers=1, layer_types=["mamba"], mamba_chunk_size=8,
                             subpiece_tokens=sub)
        model = GraniteForCausalLM(config, rngs=nnx.Rngs(0))

        def loss(m):
            out = m(ids, segments)
            return jnp.mean(jnp.sin(out.logits)) + out.aux_loss

        results[sub] = nnx.jit(nnx.value_and_grad(loss))(model)
    (loss_whole, grads_whole), (loss_pieces, grads_pieces) = results[0], results[subpiece]
    np.testing.assert_allclose(loss_pieces, loss_whole, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(grads_pieces), jax.tree.leaves(grads_whole)):
        assert float(jnp.max(jnp.abs(a - b))) <= 1e-5 * float(jnp.max(jnp.abs(b))) + 1e-12

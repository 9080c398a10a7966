"""The one way the model makes a dense projection: `nnx.Linear` with logical axes and transformers' init."""

from __future__ import annotations

from flax import nnx

from granite_jax.parallel import partitioned


def make_linear(config, n_in: int, n_out: int, axes: tuple[str | None, str | None], *, use_bias: bool,
                rngs: nnx.Rngs) -> nnx.Linear:
    """y = x @ kernel (+ bias), kernel (n_in, n_out) ~ N(0, initializer_range), bias zeros.

    transformers stores the same weight as (n_out, n_in); conversion transposes it.
    """
    return nnx.Linear(
        n_in, n_out, use_bias=use_bias, dtype=config.compute_dtype, param_dtype=config.param_dtype,
        kernel_init=partitioned(nnx.initializers.normal(config.initializer_range), axes),
        bias_init=partitioned(nnx.initializers.zeros, axes[1:]), rngs=rngs)

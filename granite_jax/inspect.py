"""`python -m granite_jax.inspect [PRESET ...]`: parameter counts of model presets, and a working forward pass.

For every preset (default: all of `configs/models/`) the model is built abstractly with `nnx.eval_shape`, so
even the 32B release costs no memory, and its parameter counts are printed (total, and active per token for
MoE models). Then the tiny hybrid MoE runs a packed batch and is exported to and re-imported from an HF
safetensors directory, checking the logits survive the round trip.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from granite_jax.config import PRESETS_DIR, ModelConfig, load_preset
from granite_jax.formats import load_hf_checkpoint, save_hf_checkpoint
from granite_jax.model import GraniteForCausalLM
from granite_jax.runtime import configure_process


def parameter_counts(config: ModelConfig) -> tuple[int, int]:
    """(total, active per token): routed experts count k/E of their parameters as active."""
    abstract = nnx.eval_shape(lambda: GraniteForCausalLM(config, rngs=nnx.Rngs(0)))
    total = active = 0
    for path, variable in nnx.to_flat_state(nnx.state(abstract, nnx.Param)):
        n = int(np.prod(variable.shape))
        total += n
        routed = "block_sparse_moe" in path and path[-1] in ("input_linear", "output_linear")
        active += n * config.num_experts_per_tok // config.num_local_experts if routed else n
    return total, active


def _print_presets(names: list[str]) -> None:
    print(f"{'preset':24s} {'layers (mamba/attn)':>20s} {'parameters':>16s} {'active/token':>16s}")
    for name in names:
        config = load_preset(name)
        total, active = parameter_counts(config)
        layers = f"{config.num_hidden_layers} ({config.num_mamba_layers}/{config.num_attention_layers})"
        print(f"{name:24s} {layers:>20s} {total:>16,d} {active:>16,d}")


def _demo_forward_and_round_trip() -> None:
    config = load_preset("tiny-hybrid-moe")
    model = GraniteForCausalLM(config, rngs=nnx.Rngs(0))
    rng = np.random.default_rng(0)
    ids = jnp.asarray(rng.integers(0, config.vocab_size, (2, 96)), jnp.int32)
    segments = jnp.asarray(np.repeat([[1, 2, 3, 0], [4, 4, 5, 5]], [40, 30, 20, 6], axis=1), jnp.int32)
    forward = nnx.jit(lambda m, ids, seg: m(ids, seg))
    t0 = time.perf_counter()
    out = forward(model, ids, segments)
    print(f"\ntiny-hybrid-moe on a packed batch {tuple(ids.shape)}: logits {tuple(out.logits.shape)}, "
          f"aux loss {float(out.aux_loss):.4f} ({time.perf_counter() - t0:.1f}s incl. compile)")
    with tempfile.TemporaryDirectory() as directory:
        files = save_hf_checkpoint(model, directory)
        reloaded = load_hf_checkpoint(directory)
        error = float(jnp.max(jnp.abs(forward(reloaded, ids, segments).logits - out.logits)))
        print(f"exported to HF safetensors ({os.path.getsize(files[0]) / 2**20:.1f} MiB) and re-imported: "
              f"max |Δlogit| = {error:.2e}")
        if error != 0.0:
            sys.exit("round trip changed the logits")


def main(argv=None) -> None:
    available = sorted(p[:-5] for p in os.listdir(PRESETS_DIR) if p.endswith(".yaml"))
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("presets", nargs="*", default=available, help=f"presets to count; default all: {available}")
    parser.add_argument("--no-demo", action="store_true", help="only print the parameter counts")
    args = parser.parse_args(argv)
    configure_process()  # our XLA defaults, before the first JAX computation
    print(f"jax {jax.__version__} on {jax.default_backend()} ({jax.device_count()} device(s))\n")
    _print_presets(args.presets)
    if not args.no_demo:
        _demo_forward_and_round_trip()


if __name__ == "__main__":
    main()

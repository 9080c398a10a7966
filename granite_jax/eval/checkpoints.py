"""Open whatever a user points evaluation at: an HF checkpoint directory or one of our training runs."""

from __future__ import annotations

import os

from granite_jax.convert import load_hf_checkpoint
from granite_jax.data.tokenizer import load_tokenizer
from granite_jax.model import GraniteForCausalLM
from granite_jax.run_dir import RunDir


class EvalCheckpointError(ValueError):
    """The checkpoint or tokenizer given to evaluation is missing or does not fit."""


def load_for_eval(checkpoint: str, *, dtype: str = "float32", tokenizer: str | None = None, verify=None):
    """(model, tokenizer, tokenizer path) for `checkpoint`: an HF directory (`config.json` + safetensors) or a
    run directory (`checkpoints/`, newest step). The tokenizer defaults to the HF directory's own files or the
    run's own copy (RUN_DIR/tokenizer/). `verify` (a `VerifySpec`): check an HF directory's `model.sig` before
    loading."""
    if not os.path.exists(checkpoint):
        raise EvalCheckpointError(f"checkpoint {checkpoint!r} does not exist")
    if os.path.isfile(os.path.join(checkpoint, "config.json")):
        model = load_hf_checkpoint(checkpoint, dtype=dtype, verify=verify)
        default_tokenizer = checkpoint if os.path.isfile(os.path.join(checkpoint, "tokenizer.json")) else None
    elif RunDir(checkpoint).has_checkpoints():
        if verify is not None:
            raise EvalCheckpointError(f"checkpoint {checkpoint!r} is a training run directory; signature "
                                      "verification (--verify-*) applies to HF checkpoint directories")
        from granite_jax.train.checkpoint import load_run_model

        model, _, _ = load_run_model(checkpoint, compute_dtype=dtype)
        default_tokenizer = RunDir(checkpoint).tokenizer()
    else:
        raise EvalCheckpointError(f"checkpoint {checkpoint!r} is neither an HF directory (no config.json) nor a "
                                  "training run directory (no checkpoints/)")
    path = tokenizer or default_tokenizer
    if path is None:
        raise EvalCheckpointError(f"checkpoint {checkpoint!r} has no tokenizer files; pass --tokenizer")
    try:
        tok = load_tokenizer(path)
    except (FileNotFoundError, ValueError) as e:
        raise EvalCheckpointError(f"tokenizer: {e}") from None
    check_tokenizer_fits(model, tok, path)
    return model, tok, path


def check_tokenizer_fits(model: GraniteForCausalLM, tokenizer, origin: str) -> None:
    vocab = model.config.vocab_size
    if tokenizer.vocab_size > vocab:
        raise EvalCheckpointError(f"tokenizer {origin!r} has {tokenizer.vocab_size} tokens but the model's vocabulary "
                                  f"has {vocab}: they do not belong together (pass the model's own tokenizer)")
    eos = model.config.eos_token_id
    if eos is not None and tokenizer.eos_id != eos:
        raise EvalCheckpointError(f"tokenizer {origin!r} ends text with id {tokenizer.eos_id} but the model's "
                                  f"eos_token_id is {eos}: they do not belong together")

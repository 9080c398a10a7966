"""Open whatever a user points evaluation at: an HF checkpoint directory or one of our training runs."""

from __future__ import annotations

import dataclasses

from granite_jax.data.tokenizer import load_tokenizer
from granite_jax.model import GraniteForCausalLM
from granite_jax.sources import RunDirectory, SourceError, checkpoint_source


class EvalCheckpointError(ValueError):
    """The checkpoint or tokenizer given to evaluation is missing or does not fit."""


def load_for_eval(checkpoint: str, *, dtype: str = "float32", tokenizer: str | None = None, verify=None,
                  allow_vocab_mismatch: bool = False):
    """(model, tokenizer, tokenizer path) for `checkpoint`: an HF directory (`config.json` + safetensors) or a
    run directory (`checkpoints/`, newest step). The tokenizer defaults to the HF directory's own files or the
    run's own copy (RUN_DIR/tokenizer/); whichever it is, `check_tokenizer_fits` checks it against the model.
    `verify` (a `VerifySpec`): check an HF directory's `model.sig` before loading."""
    try:
        source = checkpoint_source(checkpoint)
    except SourceError as e:
        raise EvalCheckpointError(str(e)) from None
    if isinstance(source, RunDirectory) and verify is not None:
        raise EvalCheckpointError(f"checkpoint {checkpoint!r} is a training run directory; signature "
                                  "verification (--verify-*) applies to HF checkpoint directories")
    if verify is not None:
        source = dataclasses.replace(source, verify=verify)
    model = source.load(compute_dtype=dtype)
    default_tokenizer = source.tokenizer()
    path = tokenizer or default_tokenizer
    if path is None:
        raise EvalCheckpointError(f"checkpoint {checkpoint!r} has no tokenizer files; pass --tokenizer")
    try:
        tok = load_tokenizer(path)
    except (FileNotFoundError, ValueError) as e:
        raise EvalCheckpointError(f"tokenizer: {e}") from None
    check_tokenizer_fits(model, tok, path, allow_vocab_mismatch=allow_vocab_mismatch)
    return model, tok, path


def unused_ids_allowed(vocab_size: int) -> int:
    """How many of a model's `vocab_size` ids its tokenizer may leave unused. Released checkpoints pad the
    embedding beyond the tokenizer's last id to a multiple (64 to 1,024 ids); a larger gap — more than 1,024
    ids or 1/32 of the vocabulary, whichever is more — means the tokenizer is another model's."""
    return max(1024, vocab_size // 32)


def check_tokenizer_fits(model: GraniteForCausalLM, tokenizer, origin: str, *,
                         allow_vocab_mismatch: bool = False) -> None:
    """The tokenizer must be the model's: every id it can produce inside the model's vocabulary (always), no
    more unused model ids than padding explains (unless `allow_vocab_mismatch`), and the model's EOS id."""
    vocab = model.config.vocab_size
    if tokenizer.vocab_size > vocab:
        raise EvalCheckpointError(f"tokenizer {origin!r} has {tokenizer.vocab_size} tokens but the model's vocabulary "
                                  f"has {vocab}: they do not belong together (pass the model's own tokenizer)")
    unused = vocab - tokenizer.vocab_size
    if unused > unused_ids_allowed(vocab) and not allow_vocab_mismatch:
        raise EvalCheckpointError(
            f"tokenizer {origin!r} has {tokenizer.vocab_size} tokens but the model's vocabulary has {vocab}: "
            f"{unused} ids unused, more than the padding of a released checkpoint ({unused_ids_allowed(vocab)}), "
            "so it is probably another model's tokenizer (pass the model's own, or --allow-vocab-mismatch if "
            "this one is right)")
    eos = model.config.eos_token_id
    if eos is not None and tokenizer.eos_id != eos:
        raise EvalCheckpointError(f"tokenizer {origin!r} ends text with id {tokenizer.eos_id} but the model's "
                                  f"eos_token_id is {eos}: they do not belong together")

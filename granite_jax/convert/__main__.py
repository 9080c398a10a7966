"""`python -m granite_jax.convert export RUN_DIR OUT_DIR [--step N] [--dtype bfloat16]`

Exports the parameters of a training run's checkpoint (the newest, or `--step`) to a Hugging Face directory
(`config.json` + safetensors) that `transformers.AutoModelForCausalLM.from_pretrained` loads. When the run's
tokenizer is an HF tokenizer (a `tokenizer.json` or a checkpoint directory), its files are copied too.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys

import granite_jax  # noqa: F401  (sets XLA flags before JAX starts)
from granite_jax.convert.hf import save_hf_checkpoint
from granite_jax.run_dir import RunDir
from granite_jax.train.checkpoint import load_run_model

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
                   "merges.txt", "chat_template.jinja", "generation_config.json")


def export(run_dir: str, out_dir: str, *, step: int | None = None, dtype: str | None = None) -> str:
    model, run, step = load_run_model(run_dir, step)
    save_hf_checkpoint(model, out_dir, dtype=dtype)
    tokenizer = RunDir(run_dir).tokenizer(run)
    source = tokenizer if os.path.isdir(tokenizer) else os.path.dirname(tokenizer)
    copied = []
    if tokenizer.endswith(".json") or os.path.isdir(tokenizer):
        for name in TOKENIZER_FILES:
            if os.path.isfile(os.path.join(source, name)):
                shutil.copy(os.path.join(source, name), out_dir)
                copied.append(name)
    note = f"; tokenizer files copied: {copied}" if copied else (
        f"; the run's tokenizer {tokenizer!r} is not an HF tokenizer, so none was copied")
    return f"exported step {step} of {run_dir} to {out_dir}{note}"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m granite_jax.convert", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    ex = sub.add_parser("export", help="a run's checkpoint → an HF directory")
    ex.add_argument("run_dir")
    ex.add_argument("out_dir")
    ex.add_argument("--step", type=int, default=None)
    ex.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None)
    args = parser.parse_args(argv)
    try:
        print(export(args.run_dir, args.out_dir, step=args.step, dtype=args.dtype))
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

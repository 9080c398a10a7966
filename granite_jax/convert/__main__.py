"""`python -m granite_jax.convert export SOURCE OUT [--format hf|fp8|gguf] [--outtype TYPE] [--step N]
[--dtype bfloat16] [--overwrite] [--adapter] [--tokenizer PATH] [--sign-key KEY.pem [--sign-cert CERT.pem
--sign-cert-chain CA.pem ...]]`
`python -m granite_jax.convert import HF_DIR RUN_DIR [--dtype float32|bfloat16]`

`export` writes the parameters of a training run's checkpoint (the newest, or `--step`), or of an HF directory,
in one of the formats Granite ships in (docs/conversions.md):
- `--format hf` (default): a Hugging Face directory (`config.json` + safetensors) that
  `transformers.AutoModelForCausalLM.from_pretrained` loads;
- `--format fp8`: the same directory with the linear weights in compressed-tensors FP8_DYNAMIC (vLLM; IBM's FP8
  releases' layout);
- `--format gguf`: one `.gguf` file for llama.cpp (Ollama, LM Studio), `--outtype` f32, f16 (default), bf16,
  q8_0 or q4_k_m, with the vocabulary and chat template.
A LoRA run is exported merged: its base (read again from its own source) with the adapters folded into the
kernels, W + alpha/r·AB. `--adapter` exports a LoRA run's adapters alone as a PEFT adapter directory
(`adapter_config.json` + `adapter_model.safetensors`) for `peft.PeftModel.from_pretrained(base, OUT)`.

An output directory must be new or empty: one with files in it (e.g. the HF checkpoint the run started from) is
refused unless `--overwrite` is given, and then only the files the export writes are replaced; safetensors files
and an index that the new export does not name, and a `model.sig` (no longer valid), are removed and listed. A
GGUF file that exists is replaced only with `--overwrite`.

Tokenizer files are copied from `RUN_DIR/tokenizer/` (the run's own copy), the HF directory, or `--tokenizer PATH`
(an HF tokenizer directory or its `tokenizer.json`), never from a path recorded in the checkpoint; with none,
only the weights are exported. `--sign-key` writes `model.sig` (OpenSSF model signing) over all written files.

`import` writes an HF directory's weights (an FP8 one dequantized) as a run checkpoint (parameters only, step 0,
the model's config.json in its metadata) and copies its tokenizer files to RUN_DIR/tokenizer/, so that
`init_from=run:RUN_DIR` (and `export`, and eval) read it like any run. A RUN_DIR that already holds checkpoints
is refused.
"""

from __future__ import annotations

import argparse
import os
import sys

from granite_jax import storage
from granite_jax.data.tokenizer import HF_TOKENIZER_FILES
from granite_jax.formats.gguf import OUTTYPES as GGUF_OUTTYPES
from granite_jax.formats.gguf import save_gguf
from granite_jax.formats.hf import save_hf_checkpoint, weight_files
from granite_jax.formats.peft import save_peft_adapter
from granite_jax.formats.run import IMPORTED_FROM, checkpoint_meta
from granite_jax.formats.signing import SIGNATURE_FILE, check_signing_key, sign_directory
from granite_jax.run_dir import RunDir, RunDirError
from granite_jax.runtime import configure_process
from granite_jax.sources import HFDirectory, RunDirectory, checkpoint_source, hf_base_directory, run_source
from granite_jax.train.checkpoint import save_parameters


def check_output_dir(out_dir: str, overwrite: bool) -> None:
    """OUT_DIR may be new or empty; a non-empty directory only with `overwrite`; never a file."""
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise ValueError(f"output {out_dir!r} exists and is not a directory")
    if os.path.isdir(out_dir) and os.listdir(out_dir) and not overwrite:
        raise ValueError(f"output directory {out_dir!r} is not empty (it holds {sorted(os.listdir(out_dir))[:5]}"
                         f"{' ...' if len(os.listdir(out_dir)) > 5 else ''}); choose a new directory, or pass "
                         "--overwrite to replace the files the export writes")


def tokenizer_source(source: HFDirectory | RunDirectory, tokenizer: str | None) -> str | None:
    """The directory to copy tokenizer files from: the user's `--tokenizer` (a directory, or a tokenizer.json in
    one), else the run's own `RUN_DIR/tokenizer/` or the HF directory itself, else None. Paths stored in
    checkpoints are never used."""
    if tokenizer is not None:
        if os.path.isfile(tokenizer) and os.path.basename(tokenizer) == "tokenizer.json":
            return os.path.dirname(tokenizer) or "."
        if not os.path.isdir(tokenizer):
            raise ValueError(f"--tokenizer {tokenizer!r}: expected an HF tokenizer directory or its tokenizer.json")
        if not any(os.path.isfile(os.path.join(tokenizer, name)) for name in HF_TOKENIZER_FILES):
            raise ValueError(f"--tokenizer {tokenizer!r} holds none of the HF tokenizer files "
                             f"{list(HF_TOKENIZER_FILES)}")
        return tokenizer
    own = RunDir(source.path).tokenizer_dir if isinstance(source, RunDirectory) else source.path
    return own if storage.isdir(own) else None


def copy_tokenizer(source: str, out_dir: str) -> list[str]:
    """Copy the HF tokenizer files `source` holds into `out_dir` (either may be a URL); returns their names."""
    copied = []
    for name in HF_TOKENIZER_FILES:
        if storage.isfile(storage.join(source, name)):
            storage.copy_file(storage.join(source, name), storage.join(out_dir, name))
            copied.append(name)
    return copied


def _tokenizer_note(source: str | None, copied: list[str]) -> str:
    if source is None:
        return ("no tokenizer files: the run has no tokenizer/ directory and no --tokenizer was given, so only "
                "the weights were exported")
    if not copied:
        return f"no tokenizer files: {source} holds no HF tokenizer files (e.g. a sentencepiece model)"
    return f"tokenizer files copied from {source}: {copied}"


FORMATS = ("hf", "fp8", "gguf")


def export(source_path: str, out: str, *, step: int | None = None, dtype: str | None = None,
           overwrite: bool = False, tokenizer: str | None = None, sign_key: str | None = None,
           sign_cert: str | None = None, sign_cert_chain: tuple[str, ...] = (), adapter: bool = False,
           format: str = "hf", outtype: str | None = None) -> str:
    """Export a run's checkpoint (a LoRA run's merged; or with `adapter`, a LoRA run's adapters as a PEFT
    directory), or an HF directory's weights, in `format`: "hf" (safetensors), "fp8" (compressed-tensors
    FP8_DYNAMIC safetensors) or "gguf" (one llama.cpp file `out`, in `outtype`); then report what was written
    (and removed) in a few lines."""
    _check_export_options(format, outtype, adapter, sign_key, sign_cert, sign_cert_chain)
    source = checkpoint_source(source_path)
    if isinstance(source, HFDirectory) and (step is not None or adapter):
        raise ValueError(f"{source_path!r} is an HF directory: --step and --adapter apply to a training run")
    if format == "gguf":
        _check_output_file(out, overwrite)
    else:
        check_output_dir(out, overwrite)
    run = checkpoint_meta(source.path, step)[1].get("run", {}) if isinstance(source, RunDirectory) else {}
    if adapter and not run.get("lora"):
        raise ValueError(f"--adapter: {source_path!r} is not a LoRA run (its saved config has no lora:), so it has "
                         "no adapters to export; export its whole model without --adapter")
    tokenizer_dir = tokenizer_source(source, tokenizer)
    if sign_key is not None:
        check_signing_key(sign_key)
    if isinstance(source, RunDirectory):
        model, _, step = RunDirectory(source.path, step).load_with_run(merge=not adapter)
        what = (f"the LoRA adapters of step {step} of " if adapter else
                f"merged LoRA run step {step} of " if run.get("lora") else f"step {step} of ")
    else:
        model, what = source.load(), ""
    if format == "gguf":
        save_gguf(model, out, outtype=outtype or "f16", tokenizer_dir=tokenizer_dir)
        return (f"exported {what}{source_path} to {out} (GGUF for llama.cpp, {outtype or 'f16'}, "
                f"{os.path.getsize(out):,} bytes)\n" + _gguf_tokenizer_note(tokenizer_dir))
    before = set(weight_files(out))
    if adapter:
        lora, base = run["lora"], hf_base_directory(run)
        written = save_peft_adapter(model, out, rank=lora["rank"], alpha=lora["alpha"],
                                    dropout=lora.get("dropout", 0.0), base_model_name_or_path=base, dtype=dtype)
    else:
        written = save_hf_checkpoint(model, out, dtype=dtype, quantize="fp8" if format == "fp8" else None)
    kind = " (compressed-tensors FP8)" if format == "fp8" else ""
    lines = [f"exported {what}{source_path} to {out}{kind}: {[os.path.basename(p) for p in written]}"]
    if adapter:
        lines.append(_adapter_base_note(run, base))
    removed = sorted(before - set(weight_files(out)))
    stale_signature = os.path.join(out, SIGNATURE_FILE)
    if os.path.isfile(stale_signature):  # it signed the files just replaced
        os.remove(stale_signature)
        removed.append(SIGNATURE_FILE)
    if removed:
        lines.append(f"removed from {out} (left by an earlier checkpoint, not part of this export): {removed}")
    copied = copy_tokenizer(tokenizer_dir, out) if tokenizer_dir is not None else []
    lines.append(_tokenizer_note(tokenizer_dir, copied))
    if sign_key is not None:
        signature = sign_directory(out, sign_key, certificate=sign_cert, certificate_chain=tuple(sign_cert_chain))
        lines.append(f"signed: {signature}")
    return "\n".join(lines)


def _check_export_options(format, outtype, adapter, sign_key, sign_cert, sign_cert_chain) -> None:
    """Refuse option combinations that mean nothing, before anything is read or written."""
    if format not in FORMATS:
        raise ValueError(f"--format {format!r}: expected one of {', '.join(FORMATS)}")
    if outtype is not None and format != "gguf":
        raise ValueError(f"--outtype {outtype!r} applies to --format gguf; --format {format} writes --dtype")
    if outtype is not None and outtype not in GGUF_OUTTYPES:
        raise ValueError(f"--outtype {outtype!r}: expected one of {', '.join(GGUF_OUTTYPES)}")
    if adapter and format != "hf":
        raise ValueError(f"--adapter writes a PEFT adapter directory (safetensors), not --format {format}: export "
                         "the merged model (without --adapter) to get the adapters folded into the weights")
    if format == "gguf" and (sign_key is not None or sign_cert_chain):
        raise ValueError("--sign-key signs an export directory (--format hf or fp8), not a GGUF file")
    if sign_cert is not None and sign_key is None:
        raise ValueError("--sign-cert needs --sign-key (the certificate's private key)")
    for flag, path in [("--sign-key", sign_key), ("--sign-cert", sign_cert),
                       *[("--sign-cert-chain", c) for c in sign_cert_chain]]:
        if path is not None and not os.path.isfile(path):  # checked before anything is written
            raise ValueError(f"{flag} {path!r} is not a file")


def _check_output_file(out: str, overwrite: bool) -> None:
    """A GGUF export's OUT: a new file named *.gguf (an existing one only with `overwrite`)."""
    if not out.endswith(".gguf"):
        raise ValueError(f"--format gguf writes one file: give its path ending in .gguf, not {out!r}")
    if os.path.isdir(out):
        raise ValueError(f"output {out!r} is a directory; give the .gguf file's path")
    if os.path.exists(out) and not overwrite:
        raise ValueError(f"output {out!r} exists; choose a new file, or pass --overwrite to replace it")
    if not os.path.isdir(os.path.dirname(os.path.abspath(out))):
        raise ValueError(f"output {out!r}: its directory does not exist")


def _gguf_tokenizer_note(tokenizer_dir: str | None) -> str:
    if tokenizer_dir is None:
        return ("no vocabulary: the run has no tokenizer/ directory and no --tokenizer was given, so the file "
                "holds the weights only (llama.cpp then needs token ids)")
    return f"vocabulary and chat template from {tokenizer_dir}"


def _adapter_base_note(run: dict, base: str | None) -> str:
    """Where the adapters' base is, and, when it is no HF directory, how to get one."""
    if base is not None:
        return f"PEFT base (base_model_name_or_path): {base}"
    source = run_source(run)
    if isinstance(source, RunDirectory):
        return (f"base_model_name_or_path is null: the base is init_from={run['init_from']!r}; export it with "
                f"`python -m granite_jax.convert export {source.path} BASE_DIR` and load the adapter over BASE_DIR")
    return (f"base_model_name_or_path is null: the base is {source.describe()} (no HF directory); export the "
            "merged model without --adapter instead")


def check_import_target(run_dir: str) -> None:
    """RUN_DIR may be new, or a directory without checkpoints: an import never mixes with a run's own."""
    if storage.isfile(run_dir):
        raise ValueError(f"run directory {run_dir!r} exists and is not a directory")
    checkpoints = RunDir(run_dir).checkpoints
    if storage.isdir(checkpoints) and storage.listdir(checkpoints):
        raise ValueError(f"run directory {run_dir!r} already has checkpoints ({checkpoints}); import into a new "
                         "directory")


def import_checkpoint(hf_dir: str, run_dir: str, *, dtype: str = "float32") -> str:
    """Write HF_DIR's parameters (stored in `dtype`) as RUN_DIR's checkpoint at step 0 and copy its tokenizer
    files to RUN_DIR/tokenizer/; report what was written in a few lines. The metadata holds the model's
    config.json (`meta["model"]`, as training writes it), an empty run config and where the weights came from
    (`meta["imported_from"]`: training refuses to resume such a parameters-only checkpoint)."""
    check_import_target(run_dir)
    model = HFDirectory(hf_dir).load(param_dtype=dtype)  # the source is checked before RUN_DIR is created
    target = RunDir(run_dir)
    with target.lock():
        save_parameters(run_dir, model, {"model": model.config.to_hf(), "run": {},
                                         IMPORTED_FROM: os.path.abspath(hf_dir)})
        copied = copy_tokenizer(hf_dir, _fresh_dir(target.tokenizer_dir))
        if not copied and not storage.is_url(run_dir):  # under a URL, an empty prefix does not exist
            os.rmdir(target.tokenizer_dir)
    lines = [f"imported {hf_dir} into {run_dir} as step 0 ({dtype} parameters): {target.checkpoints}/0",
             f"tokenizer files copied to {target.tokenizer_dir}: {copied}" if copied else
             f"no tokenizer files: {hf_dir} holds none of {list(HF_TOKENIZER_FILES)}"]
    return "\n".join(lines)


def _fresh_dir(path: str) -> str:
    storage.makedirs(path)
    return path


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m granite_jax.convert", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    ex = sub.add_parser("export", help="a run's checkpoint (or an HF directory) → HF, FP8 or GGUF")
    ex.add_argument("run_dir", metavar="SOURCE", help="a training run directory, or an HF checkpoint directory")
    ex.add_argument("out_dir", metavar="OUT", help="the output directory (--format hf, fp8) or .gguf file (gguf)")
    ex.add_argument("--format", choices=FORMATS, default="hf",
                    help="hf: safetensors (default); fp8: compressed-tensors FP8_DYNAMIC safetensors (vLLM); "
                         "gguf: one file for llama.cpp")
    ex.add_argument("--outtype", default=None,
                    help=f"--format gguf: tensor type, one of {', '.join(GGUF_OUTTYPES)} (default f16)")
    ex.add_argument("--step", type=int, default=None)
    ex.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                    help="--format hf, fp8: the dtype of the tensors written (fp8: of its scales and the unquantized "
                         "tensors)")
    ex.add_argument("--overwrite", action="store_true",
                    help="export into a non-empty directory, replacing the files the export writes")
    ex.add_argument("--adapter", action="store_true",
                    help="a LoRA run's adapters alone, as a PEFT adapter directory (default: the merged model)")
    ex.add_argument("--tokenizer", default=None,
                    help="HF tokenizer directory (or tokenizer.json) to copy; default: RUN_DIR/tokenizer/")
    ex.add_argument("--sign-key", default=None, help="elliptic-curve private key (PEM): write OUT_DIR/model.sig")
    ex.add_argument("--sign-cert", default=None, help="with --sign-key: sign as this signing certificate (PEM)")
    ex.add_argument("--sign-cert-chain", nargs="+", default=[], help="with --sign-cert: the chain of trust (PEM)")
    im = sub.add_parser("import", help="an HF directory → a run checkpoint (step 0) for init_from=run:RUN_DIR")
    im.add_argument("hf_dir")
    im.add_argument("run_dir")
    im.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                    help="parameter storage dtype (default float32: the master weights training keeps)")
    args = parser.parse_args(argv)
    configure_process()  # our XLA defaults, before the first JAX computation
    try:
        if args.command == "import":
            print(import_checkpoint(args.hf_dir, args.run_dir, dtype=args.dtype))
            return 0
        print(export(args.run_dir, args.out_dir, step=args.step, dtype=args.dtype, overwrite=args.overwrite,
                     tokenizer=args.tokenizer, sign_key=args.sign_key, sign_cert=args.sign_cert,
                     sign_cert_chain=tuple(args.sign_cert_chain), adapter=args.adapter, format=args.format,
                     outtype=args.outtype))
    except (ValueError, OSError, RunDirError, ImportError) as e:  # OSError: e.g. a full disk while copying the
        # tokenizer; ImportError: --outtype q4_k_m without llama-cpp-python
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

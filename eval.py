"""Evaluate a Granite 4.0 checkpoint: an HF directory or one of our training runs (its newest checkpoint).

    python eval.py generate   --checkpoint runs/sft-tiny --chat --prompt "What is 12 + 30?"
    python eval.py perplexity --checkpoint runs/pretrain-tiny --data data/kjv/kjv-validation.jsonl.gz
    python eval.py choice     --checkpoint runs/pretrain-tiny --task data/eval/kjv-next-verse.jsonl
    XLA_FLAGS=--xla_force_host_platform_device_count=8 python eval.py perplexity --checkpoint runs/pretrain-tiny \
        --data data/kjv/kjv-validation.jsonl.gz --seq-len 65536 --batch-size 1 --mesh '{context: 8}'   # long windows
    python eval.py lm-eval    --checkpoint runs/sft-tiny --tasks kjv_next_verse --include-path data/eval/lm_eval

`generate` streams the tokens of a single prompt to the terminal (several --prompt flags are batched and
printed at the end). Results of `perplexity`, `choice` and `lm-eval` are printed as one JSON line.
"""

from __future__ import annotations

import argparse
import json
import math
import sys

import numpy as np

from granite_jax.runtime import configure_process


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, help="HF checkpoint directory or training run directory")
    parser.add_argument("--tokenizer", default=None, help="tokenizer (default: the checkpoint's own)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="compute dtype")
    parser.add_argument("--allow-vocab-mismatch", action="store_true",
                        help="accept a tokenizer that leaves more of the model's vocabulary unused than padding "
                             "explains (one with ids outside the vocabulary is always refused)")
    verify = parser.add_argument_group("signature verification of an HF checkpoint's model.sig (one of)")
    verify.add_argument("--verify-key", default=None, help="public key (PEM) of the key that signed")
    verify.add_argument("--verify-cert-chain", nargs="+", default=None, help="certificate chain (PEM files)")
    verify.add_argument("--verify-identity", default=None, help="Sigstore: the signer identity")
    verify.add_argument("--verify-issuer", default=None, help="Sigstore: the identity's OIDC issuer URL")


def _verify_spec(args):
    """The `VerifySpec` the --verify-* flags describe, or None when none was given."""
    from granite_jax.formats.signing import VerifySpec

    given = [args.verify_key, args.verify_cert_chain, args.verify_identity, args.verify_issuer]
    if all(v is None for v in given):
        return None
    return VerifySpec(public_key=args.verify_key, certificate_chain=tuple(args.verify_cert_chain or ()),
                      identity=args.verify_identity, issuer=args.verify_issuer)


def _load(args):
    """(model, tokenizer, tokenizer path) of --checkpoint / --tokenizer, checked against each other (and the
    checkpoint's signature when a --verify-* flag is given)."""
    from granite_jax.eval.checkpoints import load_for_eval

    return load_for_eval(args.checkpoint, dtype=args.dtype, tokenizer=args.tokenizer, verify=_verify_spec(args),
                         allow_vocab_mismatch=args.allow_vocab_mismatch)


def _generate(args) -> dict | None:
    from granite_jax.data.chat import Conversation
    from granite_jax.data.chat_template import chat_format
    from granite_jax.eval.generate import Generator, SamplingConfig

    model, tokenizer, tokenizer_path = _load(args)
    prompts = args.prompt
    if args.chat:
        formatter = chat_format("auto", tokenizer_path)
        messages = lambda p: ([{"role": "system", "content": args.system}] if args.system else []) + [  # noqa: E731
            {"role": "user", "content": p}]
        prompts = [formatter.render_text(Conversation(messages(p)), add_generation_prompt=True) for p in prompts]
    ids = [tokenizer.encode(p) for p in prompts]
    generator = Generator(model, pad_id=tokenizer.pad_id or 0)
    streamed: list[int] = []
    printed = [""]

    def stream(row: int, token: int) -> None:
        streamed.append(token)
        text = tokenizer.decode(streamed)
        if not text.endswith("\ufffd"):  # wait for the rest of a multi-byte character
            sys.stdout.write(text[len(printed[0]):])
            sys.stdout.flush()
            printed[0] = text

    sampling = SamplingConfig(args.temperature, args.top_k, args.top_p)
    result = generator.generate(ids, max_new_tokens=args.max_new_tokens, sampling=sampling,
                                eos_id=None if args.ignore_eos else tokenizer.eos_id, stop_strings=args.stop,
                                tokenizer=tokenizer, max_len=args.max_len, seed=args.seed,
                                on_token=stream if len(ids) == 1 and not args.stop else None)
    if len(ids) == 1 and not args.stop:
        print()
    else:
        for prompt, text in zip(args.prompt, result.texts):
            print(f"--- {prompt}\n{text}")
    return None


def _scorer_options(args) -> dict:
    """Rows, batch and, with --mesh, the device mesh and sharding plan a `Scorer` runs on."""
    options = dict(seq_len=args.seq_len, batch_size=args.batch_size)
    if args.mesh is None:
        return options
    import yaml

    from granite_jax.parallel.mesh import MeshError, make_mesh
    from granite_jax.parallel.plan import ShardingPlan

    sizes = yaml.safe_load(args.mesh)
    if not isinstance(sizes, dict):
        raise MeshError(f"--mesh {args.mesh!r}: expected a mapping of axis sizes, e.g. '{{context: 8}}'")
    return dict(options, mesh=make_mesh(sizes),
                plan=ShardingPlan(rules=args.sharding_rules, context_layout=args.context_layout))


def _perplexity(args) -> dict:
    from granite_jax.data.sources import BadLines
    from granite_jax.eval.scoring import Scorer, perplexity_of_files

    bad = BadLines(args.bad_lines, hint="pass --bad-lines skip to skip such lines")
    model, tokenizer, _ = _load(args)
    result = perplexity_of_files(Scorer(model, **_scorer_options(args)), args.data, tokenizer, args.text_field, bad)
    output = dict(documents=result.documents, windows=result.windows, tokens=result.tokens, bytes=result.bytes,
                  loss=result.loss, perplexity=result.perplexity, bits_per_byte=result.bits_per_byte,
                  skipped_lines=len(bad.skipped))
    if not math.isfinite(result.loss):
        output["notes"] = [f"the loss is {result.loss}: the model gave non-finite log-probabilities for the "
                           f"{result.tokens} scored tokens (NaN or infinite weights or logits; check the checkpoint "
                           "and --dtype)"]
    return output


def _choice(args) -> dict:
    from granite_jax.eval.scoring import Scorer, multiple_choice, read_choice_task

    model, tokenizer, _ = _load(args)
    result = multiple_choice(Scorer(model, **_scorer_options(args)), read_choice_task(args.task), tokenizer)
    return dict(task=args.task, questions=result.questions, accuracy=result.accuracy,
                accuracy_norm=result.accuracy_norm)


def _lm_eval(args) -> dict:
    import lm_eval
    from lm_eval.tasks import TaskManager

    from granite_jax.eval.lm_eval_adapter import GraniteLM

    model = GraniteLM(args.checkpoint, tokenizer=args.tokenizer, dtype=args.dtype, seq_len=args.seq_len,
                      batch_size=args.batch_size, verify=_verify_spec(args),
                      allow_vocab_mismatch=args.allow_vocab_mismatch)
    manager = TaskManager(include_path=args.include_path) if args.include_path else TaskManager()
    results = lm_eval.simple_evaluate(model=model, tasks=args.tasks.split(","), task_manager=manager,
                                      limit=args.limit, num_fewshot=args.num_fewshot, log_samples=False,
                                      bootstrap_iters=0)
    return {"results": results["results"]}


def _integer(minimum: int):
    """An argparse type: an integer >= `minimum`, else argparse's one-line error naming the flag."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{value} is below {minimum}")
        return value

    parse.__name__ = "integer"
    return parse


def _finite_nonnegative(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not (math.isfinite(value) and value >= 0):
        raise argparse.ArgumentTypeError(f"{text} is not a finite number >= 0")
    return value


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="generate text from prompts")
    _common(gen)
    gen.add_argument("--prompt", action="append", required=True, help="a prompt (repeat for a batch)")
    gen.add_argument("--chat", action="store_true", help="wrap each prompt as a user turn of the chat template")
    gen.add_argument("--system", default=None, help="with --chat: a system prompt")
    gen.add_argument("--max-new-tokens", type=_integer(1), default=128)
    gen.add_argument("--temperature", type=_finite_nonnegative, default=0.0, help="0 = greedy")
    gen.add_argument("--top-k", type=_integer(0), default=0, help="0 = off")
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    gen.add_argument("--ignore-eos", action="store_true", help="keep generating after the end-of-text token")
    gen.add_argument("--max-len", type=_integer(1), default=None,
                     help="cache capacity in tokens (default: just enough)")
    gen.add_argument("--seed", type=int, default=0)

    for name, help_text in [("perplexity", "perplexity and bits per byte of text / JSONL files"),
                            ("choice", "multiple-choice accuracy on a JSONL task"),
                            ("lm-eval", "run lm-eval tasks on the model")]:
        p = sub.add_parser(name, help=help_text)
        _common(p)
        p.add_argument("--seq-len", type=_integer(2), default=2048)
        p.add_argument("--batch-size", type=_integer(1), default=8)
        if name != "lm-eval":
            p.add_argument("--mesh", default=None, help="device mesh as a YAML mapping, e.g. '{context: 8}': "
                           "rows over data/fsdp, each row's tokens over context (long windows)")
            p.add_argument("--context-layout", default="contiguous", choices=["contiguous", "zigzag"])
            p.add_argument("--sharding-rules", default="fsdp_tp", help="rules preset (granite_jax/parallel/plan.py)")
        if name == "perplexity":
            p.add_argument("--data", nargs="+", required=True)
            p.add_argument("--text-field", default="text")
            p.add_argument("--bad-lines", choices=["error", "skip"], default="error",
                           help="a malformed line (not UTF-8, not JSON, no text field): stop, or skip and count it")
        elif name == "choice":
            p.add_argument("--task", required=True, help='JSONL of {"context", "choices", "answer"}')
        else:
            p.add_argument("--tasks", required=True, help="comma-separated lm-eval task names")
            p.add_argument("--include-path", default=None, help="a directory of extra lm-eval task YAMLs")
            p.add_argument("--limit", type=_integer(1), default=None)
            p.add_argument("--num-fewshot", type=_integer(0), default=None)

    args = parser.parse_args(argv)
    configure_process()  # our XLA defaults, before the first JAX computation
    run = {"generate": _generate, "perplexity": _perplexity, "choice": _choice, "lm-eval": _lm_eval}[args.command]
    try:
        result = run(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if result is not None:
        print(json_line(result))
    return 0


def _finite(value, where: str, notes: list[str]):
    """`value` with every non-finite float (NaN, ±inf: not JSON) replaced by None, each one noted."""
    if isinstance(value, dict):
        return {k: _finite(v, f"{where}.{k}" if where else str(k), notes) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v, f"{where}[{i}]", notes) for i, v in enumerate(value)]
    if isinstance(value, (float, np.floating)):
        if not math.isfinite(value):
            notes.append(f"{where} is {float(value)}, written as null")
            return None
        return float(value)
    return value


def json_line(result: dict) -> str:
    """`result` as one line of valid JSON: a non-finite number becomes null and `notes` (also printed to
    stderr) says which and, where the command knows, why."""
    notes: list[str] = []
    clean = _finite({k: v for k, v in result.items() if k != "notes"}, "", notes)
    notes = list(result.get("notes", [])) + notes
    if notes:
        clean["notes"] = notes
        for note in notes:
            print(f"warning: {note}", file=sys.stderr)
    return json.dumps(clean, allow_nan=False, default=_json_default)


def _json_default(value):
    """numpy scalars (lm-eval's results hold some) as Python numbers; anything else as its text."""
    if isinstance(value, np.integer):
        return int(value)
    return str(value)


if __name__ == "__main__":
    sys.exit(main())

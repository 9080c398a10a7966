"""Scoring (perplexity, multiple choice), the lm-eval adapter on local tasks, and `eval.py`'s command line."""

from __future__ import annotations

import json
import math
import os
import shutil

import jax.numpy as jnp
import numpy as np
import pytest
from conftest import ROOT, TOKENIZER, eval_cli, forward

from granite_jax.data.tokenizer import load_tokenizer
from granite_jax.eval.scoring import Request, Scorer, multiple_choice, perplexity, read_choice_task
from granite_jax.formats import load_hf_checkpoint

WITH_TOKENIZER = dict(vocab_size=4096, tie_word_embeddings=False, pad_token_id=0, bos_token_id=1, eos_token_id=1)
# The scorer shape of every test (and eval.py run) on that checkpoint: one compiled program, which the persistent
# compilation cache serves to each new Scorer after the first.
SEQ_LEN, BATCH_SIZE = 256, 4


@pytest.fixture
def checkpoint_with_tokenizer(hf_checkpoint):
    """A random tiny HF checkpoint with the bundled tokenizer's files beside it, as a released one has."""
    directory, _ = hf_checkpoint(**WITH_TOKENIZER)
    for name in os.listdir(TOKENIZER):
        shutil.copy(os.path.join(TOKENIZER, name), directory)
    return directory


def _padded_logits(model, tokens) -> np.ndarray:
    """The logits (len(tokens), vocab) of one plain forward pass. The row is padded to a multiple of 128 tokens
    (one compilation for every request of these tests): the model is causal, so what follows cannot change these
    logits."""
    ids = jnp.asarray([list(tokens) + [0] * (-len(tokens) % 128)], jnp.int32)
    return np.asarray(forward(model, ids).logits, np.float64)[0, :len(tokens)]


def _direct_logprob(model, context, continuation) -> float:
    """log p(continuation | context) from one plain forward pass, normalised in float64 with NumPy (JAX would
    compile its log-softmax and indexing again for every request length)."""
    from scipy.special import log_softmax  # SciPy: a dependency of JAX

    logprobs = log_softmax(_padded_logits(model, list(context) + list(continuation)), axis=-1)
    n = len(context)
    return float(sum(logprobs[n - 1 + i, t] for i, t in enumerate(continuation)))


@pytest.mark.slow
def test_packed_scores_equal_one_request_at_a_time(checkpoint_with_tokenizer):
    """Requests packed several to a row, over several batches, score as each alone; on the checkpoint (and the
    scorer shape, seq_len 32 x 2) of the perplexity test, whose programs it shares."""
    model = load_hf_checkpoint(checkpoint_with_tokenizer)
    rng = np.random.default_rng(0)
    requests = [Request(tuple(rng.integers(0, 128, rng.integers(1, 9)).tolist()),
                        tuple(rng.integers(0, 128, rng.integers(1, 7)).tolist())) for _ in range(11)]
    scorer = Scorer(model, seq_len=32, batch_size=2)
    scores = scorer.score(requests)  # several requests per row, several batches
    for request, (logprob, _) in zip(requests, scores):
        assert logprob == pytest.approx(_direct_logprob(model, request.context, request.continuation), rel=1e-4)
    # is_greedy: a continuation made of the argmax tokens is greedy.
    context = (5, 6, 7)
    greedy = int(np.argmax(_padded_logits(model, context)[-1]))
    assert scorer.score([Request(context, (greedy,))])[0][1] is True


@pytest.mark.slow
def test_perplexity_and_bits_per_byte(checkpoint_with_tokenizer):
    model = load_hf_checkpoint(checkpoint_with_tokenizer)
    tokenizer = load_tokenizer(checkpoint_with_tokenizer)
    documents = ["In the beginning God created the heaven and the earth.", "And God said, Let there be light."]
    result = perplexity(Scorer(model, seq_len=SEQ_LEN, batch_size=BATCH_SIZE), documents, tokenizer)
    expected = -sum(_direct_logprob(model, [tokenizer.eos_id], tokenizer.encode(d) + [tokenizer.eos_id])
                    for d in documents)
    assert result.nats == pytest.approx(expected, rel=1e-4)
    assert result.tokens == sum(len(tokenizer.encode(d)) + 1 for d in documents) and result.windows == 2
    assert result.bits_per_byte == pytest.approx(expected / math.log(2) / sum(len(d) for d in documents), rel=1e-4)
    # A document longer than the window is scored in several windows (the packing test's scorer shape).
    long = " ".join(documents * 3)
    assert len(tokenizer.encode(long)) > 32
    assert perplexity(Scorer(model, seq_len=32, batch_size=2), [long], tokenizer).windows > 1


def test_multiple_choice_accuracy(checkpoint_with_tokenizer):
    model = load_hf_checkpoint(checkpoint_with_tokenizer)
    tokenizer = load_tokenizer(checkpoint_with_tokenizer)
    items = read_choice_task(os.path.join(ROOT, "data", "eval", "kjv-next-verse.jsonl"))[:6]
    scorer = Scorer(model, seq_len=SEQ_LEN, batch_size=BATCH_SIZE)
    result = multiple_choice(scorer, items, tokenizer)
    right = norm_right = 0
    for item in items:
        context = [tokenizer.eos_id] + tokenizer.encode(item["context"])
        sums = [_direct_logprob(model, context, tokenizer.encode(c)) for c in item["choices"]]
        right += int(np.argmax(sums) == item["answer"])
        norm_right += int(np.argmax([s / len(c.encode()) for s, c in zip(sums, item["choices"])]) == item["answer"])
    assert result.questions == 6 and result.accuracy == right / 6 and result.accuracy_norm == norm_right / 6


def _task_dir(tmp_path):
    """The repository's lm-eval task YAMLs with their data paths made absolute (tests run from anywhere)."""
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    for name in ("kjv_next_verse.yaml", "kjv_complete.yaml"):
        text = open(os.path.join(ROOT, "data", "eval", "lm_eval", name)).read()
        (tasks / name).write_text(text.replace("test: data/eval/", f"test: {ROOT}/data/eval/"))
    return str(tasks)


@pytest.mark.slow
def test_lm_eval_adapter_runs_local_tasks(checkpoint_with_tokenizer, tmp_path, monkeypatch):
    """lm-eval's own evaluator drives our model through a local multiple-choice and a local generation task (their
    first 2 documents: each greedy generation runs 32 decode steps on the random model)."""
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    import lm_eval
    from lm_eval.tasks import TaskManager

    from granite_jax.eval.lm_eval_adapter import GraniteLM

    lm = GraniteLM(checkpoint_with_tokenizer, seq_len=SEQ_LEN, batch_size=BATCH_SIZE, max_gen_toks=8)
    # Our tasks only: indexing lm-eval's thousands of built-in task YAMLs took 20 of this test's 26 s.
    tasks = TaskManager(include_path=_task_dir(tmp_path), include_defaults=False)
    results = lm_eval.simple_evaluate(model=lm, tasks=["kjv_next_verse", "kjv_complete"], limit=2, task_manager=tasks,
                                      log_samples=True, bootstrap_iters=0)
    choice, generation = results["results"]["kjv_next_verse"], results["results"]["kjv_complete"]
    assert 0.0 <= choice["acc,none"] <= 1.0 and 0.0 <= choice["acc_norm,none"] <= 1.0
    assert generation["exact_match,none"] == 0.0  # a random model does not complete verses
    # The multiple-choice answers lm-eval scored are the ones our Scorer gives.
    tokenizer = load_tokenizer(checkpoint_with_tokenizer)
    items = read_choice_task(os.path.join(ROOT, "data", "eval", "kjv-next-verse.jsonl"))[:2]
    ours = multiple_choice(Scorer(load_hf_checkpoint(checkpoint_with_tokenizer), seq_len=SEQ_LEN,
                                  batch_size=BATCH_SIZE), items, tokenizer)
    assert choice["acc,none"] == ours.accuracy
    # Generations went through our generator: each is what greedy generation gives for the prompt.
    sample = results["samples"]["kjv_complete"][0]
    prompt = tokenizer.encode(sample["doc"]["prompt"])  # doc_to_text is "{{prompt}}"
    direct = lm.generator.generate([prompt], max_new_tokens=32,  # the task's max_gen_toks
                                   eos_id=tokenizer.eos_id, stop_strings=["\n"],
                                   tokenizer=tokenizer).texts[0]
    assert sample["resps"][0][0] == direct
    assert lm.loglikelihood_rolling([type("R", (), {"args": ("In the beginning",)})()])[0] < 0


@pytest.mark.slow
def test_eval_command_line(checkpoint_with_tokenizer, tmp_path, hf_checkpoint):
    # A cache of 96 tokens: the prefill and decode shapes of the lm-eval test's generation (64 + 32 new tokens).
    out = eval_cli("generate", "--checkpoint", checkpoint_with_tokenizer, "--chat", "--prompt", "What is 2 + 2?",
                "--max-new-tokens", "6", "--ignore-eos", "--max-len", "96")
    assert out.returncode == 0 and out.stdout.strip(), out.stderr[-2000:]
    out = eval_cli("perplexity", "--checkpoint", checkpoint_with_tokenizer, "--data",
                os.path.join(ROOT, "data", "eval", "kjv-complete.jsonl"), "--text-field", "prompt",
                "--seq-len", SEQ_LEN, "--batch-size", BATCH_SIZE)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert out.returncode == 0 and result["documents"] == 50 and result["bits_per_byte"] > 0
    # The task's first 8 questions (32 requests, 2 batches): running the model on all 100 took 17 of this
    # test's seconds. Every line of the task is read and checked by test_multiple_choice_accuracy.
    task = tmp_path / "next-verse.jsonl"
    with open(os.path.join(ROOT, "data", "eval", "kjv-next-verse.jsonl")) as f:
        task.write_text("".join(f.readlines()[:8]))
    out = eval_cli("choice", "--checkpoint", checkpoint_with_tokenizer, "--task", task, "--seq-len", SEQ_LEN,
                   "--batch-size", BATCH_SIZE)
    assert out.returncode == 0 and json.loads(out.stdout.strip().splitlines()[-1])["questions"] == 8

    missing = eval_cli("generate", "--checkpoint", str(tmp_path / "nope"), "--prompt", "x")
    assert missing.returncode == 2 and "does not exist" in missing.stderr
    other, _ = hf_checkpoint(name="vocab128")  # 128-token vocabulary: the bundled tokenizer does not fit it
    wrong = eval_cli("generate", "--checkpoint", other, "--tokenizer", TOKENIZER, "--prompt", "x")
    assert wrong.returncode == 2 and "has 4096 tokens but the model's vocabulary has 128" in wrong.stderr
    empty = eval_cli("generate", "--checkpoint", checkpoint_with_tokenizer, "--prompt", "")
    assert empty.returncode == 2 and "prompt 0 is empty" in empty.stderr
    long = eval_cli("generate", "--checkpoint", checkpoint_with_tokenizer, "--prompt", "word " * 50, "--max-len", "40")
    assert long.returncode == 2 and "but max_len=40" in long.stderr


_DATA = os.path.join(ROOT, "data", "eval", "kjv-complete.jsonl")


@pytest.mark.parametrize("argv, task, message", [
    (("generate", "--prompt", "x", "--temperature", "nan"), None, "--temperature: nan is not a finite number >= 0"),
    (("generate", "--prompt", "x", "--top-k", "-1"), None, "argument --top-k: -1 is below 0"),
    (("generate", "--prompt", "x", "--top-k", str(10**12)), None,
     "top_k=1000000000000 is more than the vocabulary's 4096 tokens"),
    (("generate", "--prompt", "x", "--stop", ""), None, "a stop string is empty"),
    (("perplexity", "--data", _DATA, "--seq-len", "0"), None, "argument --seq-len: 0 is below 2"),
    (("perplexity", "--data", _DATA, "--batch-size", "-1"), None, "argument --batch-size: -1 is below 1"),
    (("choice",), {"context": "q", "choices": ["a", "b"], "answer": True}, "index of the right choice (an integer)"),
    (("choice",), {"context": "q", "choices": ["a", "a", "b"], "answer": 0}, "choices ['a'] appear more than once"),
])
def test_eval_refuses_values_it_cannot_honour(checkpoint_with_tokenizer, tmp_path, argv, task, message):
    """Every such value is one error line naming it (exit 2), not a pad-token generation, a stop before the first
    token, a miscounted answer or a Python/JAX message."""
    if task is not None:
        (tmp_path / "task.jsonl").write_text(json.dumps(task) + "\n")
        argv = (*argv, "--task", str(tmp_path / "task.jsonl"))
    out = eval_cli(argv[0], "--checkpoint", checkpoint_with_tokenizer, *argv[1:])
    assert out.returncode == 2 and message in out.stderr, out.stderr[-2000:]

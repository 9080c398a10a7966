"""Log-likelihood scoring: perplexity / bits-per-byte of a corpus, and multiple-choice tasks.

Everything is built on one primitive, `Scorer.score(requests)`: for (context ids, continuation ids) pairs, the
summed log-probability of the continuation given the context and whether greedy decoding would have produced
it. Requests are packed several to a row (each its own document: `segment_ids`, no attention or SSM state
across them) into fixed-shape batches, so one compilation serves a whole task.

- perplexity: every document is scored as `<eos> + text + <eos>` (Granite's BOS is its EOS), so every token of
  the text and the closing EOS is predicted; a document longer than the row is scored in consecutive windows,
  each window starting fresh (reported as `windows`). Bits per byte = total nats / ln 2 / UTF-8 bytes.
- multiple choice: JSON lines `{"context": str, "choices": [str, ...], "answer": int}`; accuracy by summed
  log-likelihood and by log-likelihood per byte of the choice (lm-eval's `acc` and `acc_norm`).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from granite_jax.data.sources import BadLines, DataError, RecordError, json_records, read_documents
from granite_jax.model.context_layout import context_order, in_context_layout
from granite_jax.model.granite import GraniteForCausalLM
from granite_jax.model.head import chunked_token_scores
from granite_jax.parallel.mesh import check_batch, check_sequence, parameter_shardings
from granite_jax.parallel.plan import ShardingPlan


def _with_plan(model: GraniteForCausalLM, plan: ShardingPlan) -> GraniteForCausalLM:
    """The same weights in a model whose configuration carries `plan` (the plan is static, part of the graph)."""
    config = model.config.replace(sharding=plan)
    placed = nnx.eval_shape(lambda: GraniteForCausalLM(config, rngs=nnx.Rngs(0)))
    nnx.update(placed, nnx.state(model))
    return placed


@dataclasses.dataclass(frozen=True)
class Request:
    context: tuple[int, ...]  # at least one token (the first continuation token needs something to follow)
    continuation: tuple[int, ...]


def pack_requests(requests: Sequence[Request], seq_len: int) -> list[list[tuple[int, int]]]:
    """Group request indices into rows of at most `seq_len` input tokens (first fit, in order of length).
    Each entry is (request index, offset in the row). A request's input is context + continuation[:-1]."""
    order = sorted(range(len(requests)), key=lambda i: -_input_len(requests[i]))
    rows: list[list[tuple[int, int]]] = []
    fill: list[int] = []
    for index in order:
        length = _input_len(requests[index])
        if length > seq_len:
            raise DataError(f"request {index} needs {length} tokens, more than seq_len={seq_len}")
        for row, used in enumerate(fill):
            if used + length <= seq_len:
                rows[row].append((index, used))
                fill[row] += length
                break
        else:
            rows.append([(index, 0)])
            fill.append(length)
    return rows


def _input_len(request: Request) -> int:
    return len(request.context) + len(request.continuation) - 1


class Scorer:
    """Batched log-likelihoods of continuations; `batch_size` rows of `seq_len` tokens per forward pass.

    `mesh` (optional) spreads the model and the rows over devices with `plan`'s rules: parameters sharded as
    in training, rows over the batch axes and, with a `context` axis, every row's tokens over it (context
    parallelism; a 512K window fits where one device could not hold it). Per-token log-probabilities are
    computed `chunk_tokens` tokens per device at a time, so the logits of a long row never exist at once."""

    def __init__(self, model: GraniteForCausalLM, *, seq_len: int = 2048, batch_size: int = 8, mesh=None,
                 plan: ShardingPlan = ShardingPlan(), chunk_tokens: int = 8192):
        self.seq_len, self.batch_size, self.mesh = seq_len, batch_size, mesh
        if mesh is not None:
            check_batch(batch_size, mesh, plan)
            check_sequence(seq_len, mesh, plan, model.config)
            model = _with_plan(model, plan)
        graphdef, params = nnx.split(model)
        if mesh is not None:
            params = jax.device_put(params, parameter_shardings(params, mesh, plan.table))
        self.params = params
        config = model.config

        @jax.jit
        def token_scores(params, ids, segment_ids, targets):
            model = nnx.merge(graphdef, params)
            batch = in_context_layout(dict(input_ids=ids, segment_ids=segment_ids, positions=None, targets=targets),
                                      config.sharding)
            hidden, _ = model.model(batch["input_ids"], batch["segment_ids"], batch["positions"])
            chosen, greedy = chunked_token_scores(hidden, model.output_weight(), batch["targets"], chunk=chunk_tokens,
                                                  logits_scaling=config.logits_scaling, plan=config.sharding)
            order = context_order(ids.shape[1], config.sharding)
            if order is not None:  # back to row order
                chosen, greedy = (jnp.take(x, np.argsort(order), axis=1) for x in (chosen, greedy))
            return chosen, greedy

        self._token_scores = token_scores

    def _run(self, ids, segments, targets):
        if self.mesh is None:
            return self._token_scores(self.params, ids, segments, targets)
        with jax.set_mesh(self.mesh):
            return self._token_scores(self.params, ids, segments, targets)

    def score(self, requests: Sequence[Request]) -> list[tuple[float, bool]]:
        """(sum of log p(continuation | context), continuation is the greedy choice) per request."""
        for index, request in enumerate(requests):
            if not request.context or not request.continuation:
                raise DataError(f"request {index}: context and continuation must both have at least one token")
        rows = pack_requests(requests, self.seq_len)
        results: list[tuple[float, bool] | None] = [None] * len(requests)
        for first in range(0, len(rows), self.batch_size):
            batch = rows[first:first + self.batch_size]
            shape = (self.batch_size, self.seq_len)
            ids, segments, targets = np.zeros(shape, np.int32), np.zeros(shape, np.int32), np.zeros(shape, np.int32)
            for r, row in enumerate(batch):
                for segment, (index, offset) in enumerate(row, 1):
                    tokens = requests[index].context + requests[index].continuation
                    n = len(tokens) - 1
                    ids[r, offset:offset + n] = tokens[:-1]
                    targets[r, offset:offset + n] = tokens[1:]
                    segments[r, offset:offset + n] = segment
            chosen, greedy = jax.device_get(self._run(ids, segments, targets))
            for r, row in enumerate(batch):
                for index, offset in row:
                    request = requests[index]
                    end = offset + _input_len(request)
                    span = slice(end - len(request.continuation), end)
                    results[index] = (float(chosen[r, span].sum(dtype=np.float64)), bool(greedy[r, span].all()))
        return results  # type: ignore[return-value]


@dataclasses.dataclass
class PerplexityResult:
    documents: int
    windows: int
    tokens: int  # predicted tokens
    bytes: int
    nats: float

    @property
    def loss(self) -> float:
        return self.nats / max(self.tokens, 1)

    @property
    def perplexity(self) -> float:
        """exp(loss); inf where that overflows a float (a loss above ~709 nats per token)."""
        try:
            return math.exp(self.loss)
        except OverflowError:
            return math.inf

    @property
    def bits_per_byte(self) -> float:
        return self.nats / math.log(2) / max(self.bytes, 1)


def perplexity(scorer: Scorer, documents: Iterable[str], tokenizer) -> PerplexityResult:
    requests, n_docs, n_bytes = [], 0, 0
    window = scorer.seq_len
    for text in documents:
        ids = tokenizer.encode(text) + [tokenizer.eos_id]
        n_docs += 1
        n_bytes += len(text.encode("utf-8"))
        context = [tokenizer.eos_id]
        for start in range(0, len(ids), window):
            piece = ids[start:start + window]
            requests.append(Request(tuple(context), tuple(piece)))
            context = [piece[-1]]  # a fresh window: only the previous token as context
    if not requests:
        raise DataError("no documents to score")
    scores = scorer.score(requests)
    return PerplexityResult(documents=n_docs, windows=len(requests), tokens=sum(len(r.continuation) for r in requests),
                            bytes=n_bytes, nats=-sum(s for s, _ in scores))


def perplexity_of_files(scorer: Scorer, paths: Sequence[str], tokenizer, text_field: str = "text",
                        bad_lines: str | BadLines | None = None) -> PerplexityResult:
    """`perplexity` of the documents of `paths`; malformed lines (not UTF-8, not JSON, ...) go to `bad_lines`
    (`sources.read_documents`: an error by default; pass a `BadLines` to skip and count them)."""
    documents = (doc for path in paths for doc in read_documents(path, text_field, bad_lines) if doc.strip())
    return perplexity(scorer, documents, tokenizer)


@dataclasses.dataclass
class ChoiceResult:
    questions: int
    accuracy: float  # argmax of summed log-likelihood
    accuracy_norm: float  # argmax of log-likelihood per UTF-8 byte of the choice


def _choice_item(item) -> dict:
    """One multiple-choice question, checked (a `RecordError` says what is wrong)."""
    if not (isinstance(item, dict) and isinstance(item.get("context"), str)
            and isinstance(item.get("choices"), list) and len(item["choices"]) >= 2
            and all(isinstance(c, str) and c for c in item["choices"])
            and type(item.get("answer")) is int and 0 <= item["answer"] < len(item["choices"])):
        raise RecordError("expected {\"context\": str, \"choices\": [at least two non-empty strings], \"answer\": "
                          "index of the right choice (an integer)}")
    if len(set(item["choices"])) < len(item["choices"]):
        repeated = sorted({c for c in item["choices"] if item["choices"].count(c) > 1})
        raise RecordError(f"choices {repeated} appear more than once: identical choices score alike, so the answer "
                          "could never be picked alone")
    return item


def read_choice_task(path: str) -> list[dict]:
    """JSON lines of {"context": str, "choices": [str, ...], "answer": int}; errors name the line."""
    items = [item for _, _, item in json_records([path], _choice_item, BadLines("error", hint=""),
                                                  "JSON lines of questions (.jsonl, optionally .gz)")]
    if not items:
        raise DataError(f"{path}: no questions")
    return items


def multiple_choice(scorer: Scorer, items: Sequence[dict], tokenizer) -> ChoiceResult:
    requests = []
    for item in items:
        context = tuple([tokenizer.eos_id] + tokenizer.encode(item["context"]))
        for choice in item["choices"]:
            requests.append(Request(context, tuple(tokenizer.encode(choice))))
    scores = [s for s, _ in scorer.score(requests)]
    correct = correct_norm = 0
    position = 0
    for item in items:
        k = len(item["choices"])
        sums = scores[position:position + k]
        per_byte = [s / len(c.encode("utf-8")) for s, c in zip(sums, item["choices"])]
        correct += int(np.argmax(sums) == item["answer"])
        correct_norm += int(np.argmax(per_byte) == item["answer"])
        position += k
    return ChoiceResult(len(items), correct / len(items), correct_norm / len(items))

"""An lm-eval (`lm-eval` package) model backed by granite_jax, so that any lm-eval task runs on our model.

    python eval.py lm-eval --checkpoint runs/sft-tiny --tasks my_task --include-path path/to/task/yamls

`loglikelihood` and `loglikelihood_rolling` go through `Scorer` (packed rows, one compilation per task);
`generate_until` through `Generator` (prefill + cached decode). Registered as lm-eval model "granite_jax"
(`model_args="checkpoint=DIR,dtype=float32"`).
"""

from __future__ import annotations

from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model

from granite_jax.eval.checkpoints import load_for_eval
from granite_jax.eval.generate import Generator, SamplingConfig
from granite_jax.eval.scoring import Request, Scorer


@register_model("granite_jax")
class GraniteLM(TemplateLM):
    def __init__(self, checkpoint: str | None = None, *, model=None, tokenizer=None, dtype: str = "float32",
                 seq_len: int = 2048, batch_size: int | str = 8, max_gen_toks: int = 256, verify=None,
                 allow_vocab_mismatch: bool = False, **_ignored):
        super().__init__()
        if model is None:
            if checkpoint is None:
                raise ValueError("granite_jax lm-eval model: give model_args checkpoint=DIR")
            model, tokenizer, _ = load_for_eval(checkpoint, dtype=dtype, tokenizer=tokenizer, verify=verify,
                                                allow_vocab_mismatch=allow_vocab_mismatch)
        self.model, self.granite_tokenizer = model, tokenizer
        self.max_gen_toks = max_gen_toks
        self.scorer = Scorer(model, seq_len=seq_len, batch_size=int(batch_size))
        self.generator = Generator(model, pad_id=tokenizer.pad_id or 0)

    @property
    def eot_token_id(self) -> int:
        return self.granite_tokenizer.eos_id

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        return self.granite_tokenizer.encode(string)

    def tok_decode(self, tokens) -> str:
        return self.granite_tokenizer.decode(tokens)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        return self.scorer.score([Request(tuple(context), tuple(continuation))
                                  for _, context, continuation in requests])

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """The whole string, each token predicted (the first from EOS, Granite's BOS), in windows of seq_len."""
        window = self.scorer.seq_len
        scored, owners = [], []
        for index, request in enumerate(requests):
            (text,) = request.args
            ids = self.tok_encode(text)
            context = [self.eot_token_id]
            for start in range(0, len(ids), window):
                piece = ids[start:start + window]
                scored.append(Request(tuple(context), tuple(piece)))
                owners.append(index)
                context = [piece[-1]]
        totals = [0.0] * len(requests)
        for owner, (logprob, _) in zip(owners, self.scorer.score(scored) if scored else []):
            totals[owner] += logprob
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        outputs = []
        for request in requests:
            context, gen_kwargs = request.args
            gen_kwargs = dict(gen_kwargs or {})
            until = gen_kwargs.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(gen_kwargs.pop("max_gen_toks", self.max_gen_toks))
            do_sample = bool(gen_kwargs.pop("do_sample", False))
            temperature = float(gen_kwargs.pop("temperature", 0.0)) if do_sample else 0.0
            sampling = SamplingConfig(temperature=temperature, top_k=int(gen_kwargs.pop("top_k", 0) or 0),
                                      top_p=float(gen_kwargs.pop("top_p", 1.0) or 1.0))
            prompt = self.tok_encode(context) or [self.eot_token_id]
            result = self.generator.generate([prompt], max_new_tokens=max_new, sampling=sampling,
                                             eos_id=self.eot_token_id, stop_strings=until,
                                             tokenizer=self.granite_tokenizer)
            outputs.append(result.texts[0])
            self.cache_hook.add_partial("generate_until", request.args, result.texts[0])
        return outputs

"""granite-4.0-h-tiny's train step per token at 8K, 128K and 512K tokens per row: how FLOPs, collectives and
memory scale with the row length when the row is split over a `context` axis.

Reads the TPU-compiler dry runs of `benchmarks/recommended_meshes.py --long` (h-tiny at 8,192 tokens on
v5p-16 with expert 8; at 131,072 and 524,288 on v5p-128 with expert 8 x context 8), divides each chip's
figures by the tokens it holds, and sets the attention FLOPs of two kinds of rows next to them:
- packed KJV-like documents: one row of that length packed from the bundled corpus (`data/kjv`, the
  project's tokenizer) by the training pipeline, whose documents are far shorter than the row;
- one document filling the row.
The compiled program is the same for both (the block-sparse attention skips key blocks of other documents
at run time, in loops whose trip count the compiler cannot know); the attention's share therefore comes from
the model count (`granite_jax/model/flops.py`: q.k and p.v over each token's causal prefix in its document).

    python benchmarks/long_rows.py      # prints the markdown table (after recommended_meshes.py --long)
"""

from __future__ import annotations

import json
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "benchmarks", "results", "recommended_meshes.jsonl")
MODEL = "granite-4.0-h-tiny"
LENGTHS = (8192, 131072, 524288)


def packed_kjv_keys_per_query(seq_len: int) -> float:
    """Mean causal keys per token of one row of `seq_len` tokens packed from the bundled corpus."""
    from granite_jax.data.pipeline import pretraining_dataset
    from granite_jax.data.sources import load_documents
    from granite_jax.data.tokenizer import load_tokenizer
    from granite_jax.model.flops import mean_keys_per_query

    tokenizer = load_tokenizer(os.path.join(ROOT, "data", "tokenizer"))
    documents = load_documents([os.path.join(ROOT, "data", "kjv", "kjv.jsonl.gz")])
    row = next(iter(pretraining_dataset(documents, tokenizer, vocab_size=tokenizer.vocab_size, seq_len=seq_len,
                                        batch_size=1, seed=0)))
    return mean_keys_per_query(row["segment_ids"])


def table() -> str:
    from granite_jax import load_preset
    from granite_jax.model.flops import training_flops_per_token

    config = load_preset(MODEL)
    latest = {}
    for line in open(RESULTS):
        row = json.loads(line)
        tpu = row["topology"].startswith("v")  # the TPU compiler's rows (GPU rows of the same model exist too)
        if row["model"] == MODEL and tpu and row.get("seq_len") in LENGTHS and "error" not in row:
            latest[row["seq_len"]] = row
    lines = ["| row | pod, mesh | tokens / chip | compiled matmul FLOPs / token (attention key loops once) | "
             "model FLOPs / token: KJV-packed; one document | attention share: KJV-packed; one document | "
             "collective bytes / token | temporaries / chip |", "|---|---|---|---|---|---|---|---|"]
    for seq_len in LENGTHS:
        row = latest.get(seq_len)
        if row is None:
            continue
        tokens = row["tokens_per_device"]
        keys = {"KJV-packed": packed_kjv_keys_per_query(seq_len), "one document": seq_len / 2}
        model = {k: training_flops_per_token(config, seq_len, v) for k, v in keys.items()}
        without_attention = training_flops_per_token(config, seq_len, 0.0)
        share = {k: 1 - without_attention / v for k, v in model.items()}
        traffic = ", ".join(f"{kind} {size * 2**30 / tokens / 1e3:,.1f} KB"
                            for kind, size in sorted(row["collectives_gib"].items()))
        mesh = " × ".join(f"{k} {v}" for k, v in row["mesh"].items())
        compiled = "not recounted" if row["matmul_flops"] is None else (
            f"{row['matmul_flops'] / tokens / 1e9:.2f} GFLOP (attention key loops "
            f"{row['data_dependent_matmul_flops'] / tokens / 1e9:.3f})")
        lines.append(
            f"| {seq_len // 1024}K | {row['pod'].split(' (')[0]}, {mesh} | {tokens:,} | "
            f"{compiled} | "
            f"{model['KJV-packed'] / 1e9:.2f}; {model['one document'] / 1e9:.2f} GFLOP | "
            f"{share['KJV-packed']:.1%}; {share['one document']:.1%} (keys per token "
            f"{keys['KJV-packed']:,.0f}; {keys['one document']:,.0f}) | {traffic} | {row['temp_gib']:.1f} GiB |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(table())

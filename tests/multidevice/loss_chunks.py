"""Dry runs of a one-layer tiny model on fsdp 8 with 8-token and 512-token loss chunks: bytes moved (the head's
collectives do not depend on the layers)."""

from granite_jax.train import load_run_config
from granite_jax.train.dry_run import dry_run
from tests.multidevice import report


def main():
    moved = {}
    for chunk in (8, 512):
        report_ = dry_run(load_run_config("configs/pretrain-tiny.yaml", [
            "mesh={fsdp: 8}", "data.batch_size=8", "data.seq_len=512", f"loss_chunk_tokens={chunk}",
            "model_overrides={num_hidden_layers: 1, layer_types: [attention]}"]))
        moved[chunk] = sum(size for _, size in report_.collectives.values())
    report(moved)

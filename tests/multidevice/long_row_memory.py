"""The compiled train step of configs/pretrain-512k.yaml (the tiny hybrid MoE, rows of 524,288 tokens split over
8 context devices, sub-pieces, full remat), compiled as the config runs it: its temporaries per device."""

import jax

from granite_jax.train.config import load_run_config
from granite_jax.train.setup import build_run
from tests.multidevice import arguments, report


def main():
    config = load_run_config(arguments()["config"], [])
    run = build_run(config, jax.devices(), abstract=True)
    # XLA:CPU's default fusion emitters (what a run compiles with; the test processes' legacy ones compile
    # small programs faster): this program in 40 s of CPU.
    compiled = run.lower_train_step().compile(compiler_options={"xla_cpu_use_fusion_emitters": True})
    report({"seq_len": config.data.seq_len, "devices": len(jax.devices()),
            "temporaries": compiled.memory_analysis().temp_size_in_bytes})

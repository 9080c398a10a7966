"""The compiled train step of configs/pretrain-512k.yaml (the tiny hybrid MoE, rows split over 8 context
devices, sub-pieces, full remat) at two row lengths: its temporaries per device, whose growth per local token
is what a 512K row adds."""

import jax

from granite_jax.train.config import apply_overrides, load_run_config
from granite_jax.train.setup import build_run
from tests.multidevice import arguments, report


def main():
    args = arguments()
    temporaries = {}
    for seq_len in args["seq_lens"]:
        config = apply_overrides(load_run_config(args["config"], []), {"data": {"seq_len": seq_len}})
        run = build_run(config, jax.devices(), abstract=True)
        # XLA:CPU's default fusion emitters (what a run compiles with; the test processes' legacy ones compile
        # small programs faster): this program in 46 s of CPU instead of 54 s.
        compiled = run.lower_train_step().compile(compiler_options={"xla_cpu_use_fusion_emitters": True})
        temporaries[seq_len] = compiled.memory_analysis().temp_size_in_bytes
    report({"temporaries": temporaries, "devices": len(jax.devices())})

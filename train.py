"""Train a Granite 4.0 model. With no arguments: a tiny hybrid MoE on the bundled King James Bible, on CPU.

    python train.py                                           # configs/pretrain-tiny.yaml
    python train.py --config configs/pretrain-tiny.yaml steps=400 optimizer.lr=1e-3
    python train.py init_from=hf:path/to/granite-4.0-h-tiny    # continued pretraining from HF weights
    python train.py --config configs/sft-tiny.yaml            # SFT of runs/pretrain-tiny on the bundled chats
    python train.py --dry-run --simulate-devices 64 model=granite-4.0-h-small \\
        "mesh={data: 1, fsdp: 8, tensor: 1, expert: 8}" data.seq_len=4096 data.batch_size=64

Any `key=value` overrides a field of the run config (nested with dots). Re-running with the same run_dir
resumes from its newest checkpoint (refused if the data or optimizer settings it depends on changed, or if no
checkpoint restores: `--restart` moves the earlier run to RUN_DIR/previous/ and starts over). Exit codes: 0 done,
2 an error (one `error:` line), 130 / 143 stopped by SIGINT / SIGTERM after saving a checkpoint, 75 (several
processes) another process of the job was lost: re-submit the job to resume.

`--dry-run` compiles the train step for the mesh without allocating the model and prints per-device memory,
FLOPs and collectives: `--topology v5p:4x4x4` compiles with the TPU compiler for a TPU slice that is not here
(needs libtpu), `--topology h100:8` (or h100:8x8 for 8 hosts of 8, h200:8) with the GPU compiler for NVIDIA
GPUs that are not here (needs the CUDA plugin, no GPU), `--simulate-devices N` on N virtual CPU devices (an
estimate).

Several processes (e.g. two on one machine, each with its devices):
    python train.py --coordinator-address 127.0.0.1:8476 --num-processes 2 --process-id 0 ...   # and id 1
On a pod no flags: see scripts/launch/ (TPU VM slice, Slurm, Kubernetes) and docs/launching.md.
"""

import argparse
import logging
import os
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/pretrain-tiny.yaml", help="run config YAML")
    parser.add_argument("--dry-run", action="store_true",
                        help="compile the train step for the mesh and report per-device memory; no training")
    parser.add_argument("--simulate-devices", type=int, default=None, metavar="N",
                        help="run on N virtual CPU devices (to dry-run a pod's mesh on one machine)")
    parser.add_argument("--topology", default=None, metavar="TOPOLOGY",
                        help="dry-run for devices compiled without them: a TPU slice, e.g. v5p:4x4x4 (64 chips; "
                             "needs libtpu), or NVIDIA GPUs, e.g. h100:8 or h100:8x8 (8 hosts of 8; h200 too; "
                             "needs the CUDA plugin, no GPU)")
    parser.add_argument("--coordinator-address", default=None, metavar="HOST:PORT",
                        help="multi-process: the address of process 0 (with --num-processes, --process-id); "
                             "TPU VMs, Slurm srun, Open MPI mpirun and GRANITE_JAX_COORDINATOR / "
                             "GRANITE_JAX_NUM_PROCESSES (e.g. a Kubernetes indexed Job) need no flags")
    parser.add_argument("--num-processes", type=int, default=None)
    parser.add_argument("--process-id", type=int, default=None)
    parser.add_argument("--peer-timeout", type=int, default=60, metavar="SECONDS",
                        help="multi-process: a process silent this long is dead, and every other process exits "
                             "(non-zero; re-submit to resume from the last checkpoint)")
    parser.add_argument("--join-timeout", type=int, default=300, metavar="SECONDS",
                        help="multi-process: how long to wait for the coordinator and every process to join")
    parser.add_argument("--restart", action="store_true",
                        help="start over in a run_dir that has checkpoints, moving the earlier run to previous/")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. steps=100 optimizer.lr=1e-3")
    args = parser.parse_intermixed_args(argv)  # overrides may come before and after the flags
    if args.topology and args.simulate_devices:
        parser.error("--topology and --simulate-devices are two ways to stand in for the target; pick one")
    args.dry_run = args.dry_run or bool(args.topology)
    if argv is None:  # run as a script: in a job of several processes, under a parent that reports a lost peer
        from granite_jax.parallel import supervise

        if not supervise.supervised() and supervise.job_of_several(args.coordinator_address is not None):
            return supervise.run_supervised([sys.executable, *sys.orig_argv[1:]])
    if args.topology:  # the target's compiler is used through the topology; JAX itself stays on CPU
        os.environ["JAX_PLATFORMS"] = "cpu"
        os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # no TPU here to guard: several dry runs at once
    if args.simulate_devices:  # before JAX starts
        os.environ["JAX_PLATFORMS"] = "cpu"
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                                   f" --xla_force_host_platform_device_count={args.simulate_devices}").strip()

    from granite_jax.runtime import configure_process

    configure_process()  # our XLA defaults, before JAX starts its backends
    from granite_jax.train import TrainingStopped, load_run_config, train
    from granite_jax.train.checkpoint import CheckpointSaveError

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        from granite_jax.parallel.distributed import initialize

        joined = initialize(args.coordinator_address, args.num_processes, args.process_id,
                            peer_timeout_s=args.peer_timeout, join_timeout_s=args.join_timeout)
        if joined:
            import jax

            if jax.process_index() == 0:
                print(f"joined {jax.process_count()} processes ({joined}): {jax.device_count()} devices, "
                      f"{jax.local_device_count()} per process", flush=True)
        config = load_run_config(args.config, args.overrides)
        if args.dry_run:
            from granite_jax.parallel.topology import topology_devices
            from granite_jax.train.dry_run import dry_run

            devices = topology_devices(args.topology) if args.topology else None
            print(dry_run(config, devices).render())
        else:
            train(config, restart=args.restart)
    except TrainingStopped as stopped:
        print(stopped, flush=True)
        return stopped.exit_code
    except KeyboardInterrupt:
        print("interrupted before training started", file=sys.stderr)
        return 130
    except CheckpointSaveError as e:  # the save's threads may never return: leave without waiting for them
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(2)
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

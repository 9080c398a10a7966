"""Where a compiled train step's matmul FLOPs go: the dry run's count, split by the part of the model.

Compiles the train step exactly as `train.py --dry-run` does (`--topology v5p:2x2x2`: the TPU compiler for a
deviceless TPU topology, needs libtpu; `--simulate-devices N`: XLA:CPU on N virtual devices; neither: this
process's devices), walks the compiled per-device HLO like `train/dry_run.py:executed_matmul_flops` (every
`dot`, `convolution` and Pallas TPU kernel — by its cost estimate — once per execution, loop trip counts
included) and charges each instruction to the model's `jax.named_scope` it was traced in (innermost; its `op_name`),
which name the components of
`granite_jax/model/flops.py:training_flops_by_component` (mamba in_proj / conv / SSD / out_proj, attention
projections / core, shared MLP, router, routed experts, head), compared with the model's count for each;
the phase of each instruction (forward, the backward pass's recomputation, gradient) comes from JAX's
transform stack in its `op_name`; the source line (the innermost frame of its stack trace in `granite_jax/`, from
the HLO's `StackFrames` table; inside a custom VJP's backward, JAX gives the call site) is listed too.

    python benchmarks/flops_breakdown.py --topology v5p:2x2x2 model=granite-4.0-h-tiny "mesh={expert: 8}" \\
        data.seq_len=4096 data.batch_size=16 compute_dtype=bfloat16 moe_capacity_factor=1.25 \\
        "model_overrides={num_hidden_layers: 2, layer_types: [mamba, attention], remat_policy: full, \\
        scan_layers: true}" --save-hlo /tmp/step.hlo
    python benchmarks/flops_breakdown.py --hlo /tmp/step.hlo <the same overrides>   # re-read a saved module
    python benchmarks/flops_breakdown.py --simulate-devices 2 "mesh={expert: 2}"    # the tiny model, XLA:CPU

Overrides are `train.py`'s (on top of `--config`, default configs/pretrain-tiny.yaml). `--lines N` prints
the N largest source lines too; `--json` prints the figures as one JSON object.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_FRAME_ID = re.compile(r"stack_frame_id=(\d+)")
_OP_NAME = re.compile(r'op_name="([^"]*)"')
_SECTION = re.compile(r"^(FileNames|FunctionNames|FileLocations|StackFrames)\s*$")
_ENTRY = re.compile(r"^(\d+) (.*)$")
_FIELDS = re.compile(r"(\w+)=(\d+)")

COMPONENTS = ("mamba in_proj", "mamba conv", "mamba SSD", "mamba out_proj", "attention q/k/v/o", "attention core",
              "shared MLP", "router", "routed experts", "head", "other")


def stack_frames(hlo_text: str) -> dict[int, list[tuple[str, str, int]]]:
    """The HLO text's stack-frame table: frame id -> [(file, function, line)], innermost frame first."""
    tables: dict[str, dict[int, str]] = {}
    section = None
    for line in hlo_text.splitlines():
        if match := _SECTION.match(line):
            section = match.group(1)
            tables[section] = {}
        elif section and (match := _ENTRY.match(line)):
            tables[section][int(match.group(1))] = match.group(2)
        elif section and line.strip() and not _ENTRY.match(line):
            section = None
    files = {k: v.strip('"') for k, v in tables.get("FileNames", {}).items()}
    functions = {k: v.strip('"') for k, v in tables.get("FunctionNames", {}).items()}
    locations = {k: dict((f, int(n)) for f, n in _FIELDS.findall(v))
                 for k, v in tables.get("FileLocations", {}).items()}
    parents = {k: dict((f, int(n)) for f, n in _FIELDS.findall(v)) for k, v in tables.get("StackFrames", {}).items()}
    frames: dict[int, list[tuple[str, str, int]]] = {}
    for frame in parents:
        chain, seen, at = [], set(), frame
        while at in parents and at not in seen:
            seen.add(at)
            location = locations.get(parents[at]["file_location_id"], {})
            chain.append((files.get(location.get("file_name_id"), "?"),
                          functions.get(location.get("function_name_id"), "?"), location.get("line", 0)))
            at = parents[at].get("parent_frame_id", 0)
        frames[frame] = chain
    return frames


def source_of(chain: list[tuple[str, str, int]]) -> tuple[str, str, int]:
    """The innermost frame in this package (file relative to it), or the innermost frame."""
    for file, function, line in chain:
        if "/granite_jax/" in file:
            return "granite_jax/" + file.split("/granite_jax/", 1)[1], function, line
    return chain[0] if chain else ("?", "?", 0)


# The model's `jax.named_scope`s (granite.py, mamba.py, attention.py, moe.py, head.py) -> components;
# the innermost one in an instruction's op_name decides.
SCOPES = {"in_proj": "mamba in_proj", "conv": "mamba conv", "ssd": "mamba SSD", "out_proj": "mamba out_proj",
          "qkv_proj": "attention q/k/v/o", "o_proj": "attention q/k/v/o", "core": "attention core",
          "shared_mlp": "shared MLP", "router": "router", "experts": "routed experts",
          "combine": "routed experts", "head": "head"}
_WORD = re.compile(r"[A-Za-z_]+")


# Where the compiler left an instruction no op_name (XLA:CPU's fusions), its source file decides.
FILES = {"model/head.py": "head", "model/flash.py": "attention core", "model/pallas_attention.py": "attention core",
         "model/ssd.py": "mamba SSD", "model/pallas_ssd.py": "mamba SSD"}


def component(op_name: str, source_file: str = "") -> str:
    """The `training_flops_by_component` part an instruction belongs to, from the named scopes in its
    op_name (JAX writes them outermost first, transforms wrapped around them: `transpose(jvp(mamba))/ssd/…`),
    else from its source file."""
    scopes = [SCOPES[w] for w in _WORD.findall(op_name) if w in SCOPES]
    if scopes:
        return scopes[-1]
    return next((name for suffix, name in FILES.items() if source_file.endswith(suffix)), "other")


def phase(op_name: str) -> str:
    """forward, recompute (the forward run again inside the backward pass) or gradient, from JAX's transform
    stack: no `transpose(` is the forward pass; inside one, a `jvp(jvp(` (the layer's own `jax.vjp` in
    `_recomputed_in_backward`) or a `checkpoint`/`remat` scope with no second transpose is the recomputation."""
    if "transpose(" not in op_name:
        return "forward"
    inner = op_name.split("transpose(", 1)[1]
    if "transpose(" not in inner and ("jvp(jvp(" in inner or "rematted" in inner or "checkpoint" in inner):
        return "recompute"
    return "gradient"


def breakdown(hlo_text: str) -> list[dict]:
    """One record per executed matmul instruction of a compiled module: flops (times executed), component,
    phase, source (file:function:line), op_name, in_unknown_loop. The flops add up to
    `executed_matmul_flops(hlo_text)[0]`."""
    from granite_jax.hlo import PALLAS_TPU_CALL, HloModule, matmul_flops

    module = HloModule(hlo_text)
    frames = stack_frames(hlo_text)
    found, _ = module.executed(lambda line: " dot(" in line or " convolution(" in line or PALLAS_TPU_CALL in line)
    records = []
    for line, times, unknown in found:
        flops = times * matmul_flops(line, module.shapes)
        frame = _FRAME_ID.search(line)
        chain = frames.get(int(frame.group(1)), []) if frame else []
        source = source_of(chain)
        op = _OP_NAME.search(line)
        op_name = op.group(1) if op else ""
        if PALLAS_TPU_CALL in line and (name := re.search(r'kernel_name[\\"]*:[\\"]*([\w\-.]+)', line)):
            op_name += f" [kernel {name.group(1)}]"
        records.append({"flops": flops, "component": component(op_name, source[0]), "phase": phase(op_name),
                        "source": f"{source[0]}:{source[1]}:{source[2]}", "op_name": op_name,
                        "in_unknown_loop": unknown})
    return records


def summarize(records: list[dict], model: dict[str, float]) -> dict:
    """{component: {model, compiled, forward, recompute, gradient}} plus a "total" entry."""
    table = {name: collections.Counter() for name in COMPONENTS}
    for r in records:
        table[r["component"]]["compiled"] += r["flops"]
        table[r["component"]][r["phase"]] += r["flops"]
    for name in COMPONENTS:
        table[name]["model"] = model.get(name, 0.0)
    total = collections.Counter()
    for row in table.values():
        total.update(row)
    return {**{k: dict(v) for k, v in table.items()}, "total": dict(total)}


def render(summary: dict, records: list[dict], lines: int) -> str:
    out = ["| component | model | compiled | compiled / model | forward | recompute | gradient |",
           "|---|---|---|---|---|---|---|"]
    for name, row in summary.items():
        model, compiled = row.get("model", 0.0), row.get("compiled", 0.0)
        ratio = f"{compiled / model:.3f}" if model else "—"
        out.append(f"| {name} | {model:.3e} | {compiled:.3e} | {ratio} | {row.get('forward', 0):.3e} | "
                   f"{row.get('recompute', 0):.3e} | {row.get('gradient', 0):.3e} |")
    if lines:
        by_line = collections.Counter()
        for r in records:
            by_line[(r["component"], r["phase"], r["source"])] += r["flops"]
        out += ["", f"largest {lines} (component, phase, source line):"]
        out += [f"  {flops:.3e}  {c:18s} {p:9s} {s}" for (c, p, s), flops in by_line.most_common(lines)]
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("overrides", nargs="*", help="train.py overrides (key=value)")
    parser.add_argument("--config", default=os.path.join(ROOT, "configs", "pretrain-tiny.yaml"))
    parser.add_argument("--topology", default=None, help="deviceless TPU topology (TPU compiler, needs libtpu)")
    parser.add_argument("--simulate-devices", type=int, default=None, metavar="N", help="N virtual CPU devices")
    parser.add_argument("--hlo", default=None, help="read this saved compiled module instead of compiling")
    parser.add_argument("--save-hlo", default=None, help="write the compiled module's text here")
    parser.add_argument("--devices", type=int, default=None,
                        help="with --hlo: the devices it was compiled for (default: its num_partitions)")
    parser.add_argument("--lines", type=int, default=25, help="print the N largest source lines")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if args.topology:
        os.environ["JAX_PLATFORMS"] = "cpu"
        os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    if args.simulate_devices:
        os.environ["JAX_PLATFORMS"] = "cpu"
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                                   f" --xla_force_host_platform_device_count={args.simulate_devices}").strip()
    from granite_jax.runtime import configure_process

    configure_process()  # our XLA defaults, before the first JAX computation
    from granite_jax.model.flops import training_flops_by_component
    from granite_jax.train import load_run_config
    from granite_jax.train.setup import build_run, resolve_model_config

    config = load_run_config(args.config, args.overrides)
    run = None
    if args.hlo:
        hlo = open(args.hlo).read()
    else:
        devices = None
        if args.topology:
            from granite_jax.parallel.topology import tpu_topology_devices
            devices = tpu_topology_devices(args.topology)
        run = build_run(config, devices, abstract=True)
        compiled = run.lower_train_step().compile()
        memory = compiled.memory_analysis()
        print(f"temporaries per device: {memory.temp_size_in_bytes / 2**30:.2f} GiB", flush=True)
        hlo = compiled.as_text()
        if args.save_hlo:
            with open(args.save_hlo, "w") as f:
                f.write(hlo)
    model_config = run.model_config if run is not None else resolve_model_config(config)
    devices = run.mesh.devices.size if run is not None else (args.devices or _device_count(hlo))
    tokens = config.data.batch_size * config.data.seq_len / devices
    model = {k: v * tokens for k, v in training_flops_by_component(model_config, config.data.seq_len).items()}
    records = breakdown(hlo)
    summary = summarize(records, model)
    if args.json:
        print(json.dumps({"devices": devices, "tokens_per_device": tokens, "components": summary}))
    else:
        print(f"per device ({devices} devices, {tokens:,.0f} tokens each), matmul FLOPs per step:")
        print(render(summary, records, args.lines))


def _device_count(hlo_text: str) -> int:
    """The partitions the module was compiled for (`num_partitions=`), 1 when absent."""
    match = re.search(r"num_partitions=(\d+)", hlo_text)
    return int(match.group(1)) if match else 1


if __name__ == "__main__":
    main()

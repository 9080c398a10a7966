"""Reading an XLA HLO module's text (`compiled.as_text()`): its computations, the collectives it runs and the
bytes they move, and the matmul FLOPs it executes with loop trip counts taken into account (XLA's cost
analysis counts a loop body once). Used by the dry run (`train/dry_run.py`), the tests and the benchmarks."""

from __future__ import annotations

import functools
import math
import re

import numpy as np

# (ragged-all-to-all's bytes are its receive buffer's, an upper bound on what it moves)
COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "ragged-all-to-all", "all-to-all", "collective-permute")
_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "bf16": 2, "f16": 2, "s32": 4, "u32": 4, "f32": 4,
                "s64": 8, "u64": 8, "f64": 8}


_COMPUTATION = re.compile(r"^(?:ENTRY\s+)?%([\w.\-]+)\s.*\{\s*$")
_COLLECTIVE = re.compile(r"=\s*(\(?[^=]*?\)?)\s+(" + "|".join(COLLECTIVES) + r")(-start)?\(")
_CALLEE = re.compile(r"(?:calls|to_apply|body|condition)=%([\w.\-]+)|branch_computations=\{([^}]*)\}")
_WHILE = re.compile(r"\swhile\(.*condition=%([\w.\-]+), body=%([\w.\-]+)")
_WINDOW = re.compile(r"window=\{size=([\dx]+)[^}]*\}")
_PARAMETER = re.compile(r"([\w.\-]+): \w+\[([\d,]*)\]")
_INSTRUCTION = re.compile(r"\s*(?:ROOT\s+)?%([\w.\-]+)\s*=\s*\w+\[([\d,]*)\]")
_INSTRUCTION_NAME = re.compile(r"\s*(?:ROOT\s+)?%([\w.\-]+)\s*=")
_LOOP_BOUND = re.compile(r"compare\(%([\w.\-]+), %([\w.\-]+)\), direction=LT")


def _dims(text: str) -> list[int]:
    return [int(d) for d in text.split(",") if d]


def _result_bytes(shapes: str) -> int:
    size = 0
    for dtype, dims in re.findall(r"(\w+)\[([\d,]*)\]", shapes):
        if dtype in _DTYPE_BYTES:
            size += _DTYPE_BYTES[dtype] * int(np.prod([int(d) for d in dims.split(",") if d] or [1]))
    return size


def _definitions(lines: list[str]) -> dict[str, str]:
    return {m.group(1): line for line in lines if (m := _INSTRUCTION_NAME.match(line))}


def _constant(name: str, definitions: dict[str, str]) -> int | None:
    """The value of an integer scalar constant `name` (through copies), or None."""
    for _ in range(4):
        line = definitions.get(name, "")
        if m := re.search(r"= [su]\d+\[\]\S* constant\((-?\d+)\)", line):
            return int(m.group(1))
        if not (m := re.search(r"= [su]\d+\[\]\S* copy\(%([\w.\-]+)\)", line)):
            return None
        name = m.group(1)
    return None


def _operands(line: str, opcode: str) -> list[str]:
    """The operand names of `opcode(...)` in an instruction line."""
    if not (m := re.search(opcode + r"\(([^)]*)\)", line)):
        return []
    return [o.strip().split()[-1].lstrip("%") for o in re.sub(r"/\*[^*]*\*/", "", m.group(1)).split(",") if o.strip()]


def _trip_count(while_line: str, condition: list[str], body: list[str] = (), caller: list[str] = ()) -> int | None:
    """The iterations of a `while`: XLA's `known_trip_count` where it says it (XLA:CPU), else from its
    `i < N` condition with N a constant (the TPU compiler's loops): (N - start) / step, the counter's step read
    from the body's `i + step` and its start from the loop's initial tuple (JAX's scan and fori_loop counters
    start at 0 and step by 1; the TPU compiler's windowed einsums, which multiply by the shards of a weight as
    they arrive from the neighbours, step by 2, two shards per iteration)."""
    if match := re.search(r'"known_trip_count":\{"n":"(\d+)"', while_line):
        return int(match.group(1))
    defs = _definitions(condition)
    for line in condition:
        if "ROOT" not in line or not (m := _LOOP_BOUND.search(line)):
            continue
        bound = _constant(m.group(2), defs)
        index = re.search(r"get-tuple-element\(.*index=(\d+)", defs.get(m.group(1), ""))
        if bound is None:
            return None
        if index is None or not body:
            return bound
        i = int(index.group(1))
        body_defs, start, step = _definitions(body), 0, 1
        root = next((b for b in body if "ROOT" in b and " tuple(" in b), "")
        updates = _operands(root, "tuple")
        if i < len(updates) and " add(" in body_defs.get(updates[i], ""):
            steps = [_constant(o, body_defs) for o in _operands(body_defs[updates[i]], "add")]
            step = next((c for c in steps if c is not None), 1)
        initial = _operands(while_line, "while")
        if caller and initial:
            caller_defs = _definitions(caller)
            tuple_ops = _operands(caller_defs.get(initial[0], ""), "tuple")
            if i < len(tuple_ops):
                start = _constant(tuple_ops[i], caller_defs) or 0
        return max(0, -(-(bound - start) // step)) if step > 0 else None
    return None


class HloModule:
    """A compiled (per-device) HLO module's text, parsed into computations, to count what one run executes:
    an instruction inside a loop counts once per iteration (the trip count of a `while` from XLA's
    `known_trip_count` or its `i < N` condition; loops whose count depends on the data — the block-sparse
    attention's key loops — count once and are reported)."""

    def __init__(self, hlo_text: str):
        self.computations: dict[str, list[str]] = {}
        self.shapes: dict[str, list[int]] = {}  # array-valued instructions and parameters -> dimensions
        self.entry, current = None, None
        for line in hlo_text.splitlines():
            if match := _COMPUTATION.match(line):
                current = match.group(1)
                self.computations[current] = []
                self.entry = current if line.startswith("ENTRY") else self.entry
                self.shapes.update((name, _dims(dims)) for name, dims in _PARAMETER.findall(line.split("->")[0]))
            elif _END_OF_COMPUTATION.match(line):
                current = None
            elif current is not None and not line.startswith("  ") and self.computations[current]:
                # an attribute that spans lines (a Pallas kernel's backend config): part of the instruction
                self.computations[current][-1] += line
            elif current is not None:
                self.computations[current].append(line)
                if match := _INSTRUCTION.match(line):
                    self.shapes[match.group(1)] = _dims(match.group(2))

    @staticmethod
    def _callees(line: str) -> list[str]:
        return [name for callee, branches in _CALLEE.findall(line)
                for name in ([callee] if callee else [b.strip().lstrip("%") for b in branches.split(",")])]

    def executed(self, selected) -> tuple[list[tuple[str, int, bool]], int]:
        """Every executed line that `selected(line)` accepts, as (line, executions in one run, whether it sits
        in a loop of unknown trip count); and the number of such loops holding selected lines."""
        @functools.cache
        def holds(name: str) -> bool:
            return any(selected(line) or any(holds(c) for c in self._callees(line))
                       for line in self.computations.get(name, []))

        found, unknown_loops = [], 0

        def visit(name: str, times: int, in_unknown_loop: bool) -> None:
            nonlocal unknown_loops
            for line in self.computations.get(name, []):
                if selected(line):
                    found.append((line, times, in_unknown_loop))
                loop = _WHILE.search(line)
                trips = (_trip_count(line, self.computations.get(loop.group(1), []),
                                     self.computations.get(loop.group(2), []), self.computations.get(name, []))
                         if loop else None)
                unknown = bool(loop) and trips is None and holds(loop.group(2))
                unknown_loops += unknown
                for called in self._callees(line):
                    if holds(called):
                        in_body = bool(loop) and called == loop.group(2)
                        visit(called, times * (trips or 1) if in_body else times,
                              in_unknown_loop or (unknown and in_body))

        visit(self.entry, 1, False)
        return found, unknown_loops


def collective_traffic(hlo_text: str) -> tuple[dict[str, tuple[int, int]], int]:
    """The collectives a compiled (per-device) HLO module executes in one run, and the bytes of their results.

    Returns ({kind: (executions, bytes)}, number of loops whose trip count could not be read, counted once)."""
    found, unknown_loops = HloModule(hlo_text).executed(lambda line: bool(_COLLECTIVE.search(line)))
    traffic: dict[str, list[int]] = {}
    for line, times, _ in found:
        match = _COLLECTIVE.search(line)
        counts = traffic.setdefault(match.group(2), [0, 0])
        counts[0] += times
        counts[1] += times * _result_bytes(match.group(1))
    return {k: (v[0], v[1]) for k, v in traffic.items()}, unknown_loops


_END_OF_COMPUTATION = re.compile(r'\}(, execution_thread="[^"]*")?\s*$')
PALLAS_TPU_CALL = 'custom_call_target="tpu_custom_call"'
_KERNEL_FLOPS = re.compile(r'"cost_estimate":\{[^}]*?"flops":"(\d+)"')
_DOT = re.compile(r"=\s*\w+\[([\d,]*)\]\S*\s+dot\((?:\w+\[[\d,]*\]\S*\s+)?%([\w.\-]+),"
                  r".*lhs_contracting_dims=\{([\d,]*)\}")
_CONVOLUTION = re.compile(r"=\s*\w+\[([\d,]*)\]\S*\s+convolution\((?:\w+\[[\d,]*\]\S*\s+)?%([\w.\-]+),\s*"
                          r"(?:\w+\[[\d,]*\]\S*\s+)?%([\w.\-]+)\).*dim_labels=(\w+)_(\w+)->(\w+)")
_WINDOW_FIELD = re.compile(r"(size|stride|pad|lhs_dilate|rhs_dilate)=([\d_x\-]+)")


@functools.cache
def _taps_on_input(outputs: int, size: int, stride: int, pad_low: int, rhs_dilate: int, inputs: int,
                   lhs_dilate: int) -> int:
    """(output position, window tap) pairs of one spatial dimension whose tap lands on an input element, not on
    padding nor between the elements of a dilated input."""
    taps = np.arange(size, dtype=np.int64)[None, :] * rhs_dilate - pad_low
    last, count = (inputs - 1) * lhs_dilate, 0
    step = max(1, 4_000_000 // max(size, 1))
    for start in range(0, outputs, step):
        index = np.arange(start, min(outputs, start + step), dtype=np.int64)[:, None] * stride + taps
        count += int(np.count_nonzero((index >= 0) & (index <= last) & (index % lhs_dilate == 0)))
    return count


def matmul_flops(line: str, shapes: dict[str, list[int]]) -> float:
    """FLOPs of one HLO `dot` (2 x output elements x contracted size) or `convolution`, operand shapes looked
    up in `shapes`, or of a Pallas TPU kernel (a `tpu_custom_call`: the FLOPs of the cost estimate it was
    compiled with, e.g. megablox's 2·m·k·n); 0 for any other instruction. A convolution's output element
    multiplies the kernel's input features by the window taps that fall on input elements, not on padding
    nor between the elements of a dilated input (`lhs_dilate`) — the TPU compiler writes batched matmuls as
    "base-dilated" convolutions, their batch dimensions as windows holding one input element each, and some
    matmuls as convolutions of a size-1 spatial dimension padded to the window (`size=32 pad=31_31`), where
    one tap in 32 lands on the input."""
    if PALLAS_TPU_CALL in line:
        estimate = _KERNEL_FLOPS.search(line)
        return float(estimate.group(1)) if estimate else 0.0
    if match := _DOT.search(line):
        lhs = shapes[match.group(2)]
        return 2.0 * math.prod(_dims(match.group(1))) * math.prod(lhs[d] for d in _dims(match.group(3)))
    if match := _CONVOLUTION.search(line):
        out, lhs, kernel = _dims(match.group(1)), shapes[match.group(2)], shapes[match.group(3)]
        lhs_labels, kernel_labels, out_labels = match.group(4), match.group(5), match.group(6)
        flops = 2.0 * math.prod(out) * kernel[kernel_labels.index("i")]
        if window := _WINDOW.search(line):
            fields = dict(_WINDOW_FIELD.findall(window.group(0)))
            sizes = [int(n) for n in fields["size"].split("x")]
            per_dim = {key: [int(n) for n in fields[key].split("x")] if key in fields else [1] * len(sizes)
                       for key in ("stride", "lhs_dilate", "rhs_dilate")}
            pads = [int(p.split("_")[0]) for p in fields["pad"].split("x")] if "pad" in fields else [0] * len(sizes)
            for k, size in enumerate(sizes):  # spatial dimension k: the output positions times their taps
                outputs = out[out_labels.index(str(k))]
                taps = _taps_on_input(outputs, size, per_dim["stride"][k], pads[k], per_dim["rhs_dilate"][k],
                                      lhs[lhs_labels.index(str(k))], per_dim["lhs_dilate"][k])
                flops *= taps / outputs
        return flops
    return 0.0


def executed_matmul_flops(hlo_text: str) -> tuple[float, float]:
    """(matmul FLOPs one run of a compiled module executes, loop iterations included; the part of them in
    loops whose trip count depends on the data, counted there once per run of the loop)."""
    module = HloModule(hlo_text)
    found, _ = module.executed(lambda line: " dot(" in line or " convolution(" in line or PALLAS_TPU_CALL in line)
    flops = [(times * matmul_flops(line, module.shapes), in_unknown_loop) for line, times, in_unknown_loop in found]
    return sum(f for f, _ in flops), sum(f for f, unknown in flops if unknown)

"""Where step metrics go: a live console line and TensorBoard event files (no TensorFlow needed)."""

from __future__ import annotations

import sys
import time

import jax
from tensorboard.compat.proto import event_pb2, summary_pb2
from tensorboard.summary.writer.event_file_writer import EventFileWriter


class TensorBoardWriter:
    def __init__(self, log_dir: str):
        self._writer = EventFileWriter(log_dir)

    def scalars(self, step: int, values: dict[str, float], prefix: str = "") -> None:
        summary = summary_pb2.Summary(value=[summary_pb2.Summary.Value(tag=prefix + k, simple_value=float(v))
                                             for k, v in values.items()])
        self._writer.add_event(event_pb2.Event(wall_time=time.time(), step=step, summary=summary))
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()


def format_duration(seconds: float) -> str:
    seconds = int(seconds)
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s"


def console_line(step: int, total: int, metrics: dict[str, float], eta_s: float | None) -> str:
    parts = [f"step {step:>{len(str(total))}d}/{total}", f"loss {metrics['loss']:.4f}"]
    if "aux_loss" in metrics:
        parts.append(f"aux {metrics['aux_loss']:.3f}")
    if "reward_accuracy" in metrics:  # DPO
        parts.append(preference_part(metrics))
    parts += [f"gnorm {metrics['grad_norm']:.2f}", f"lr {metrics['lr']:.2e}", f"{metrics['tokens_per_s']:,.0f} tok/s"]
    if "mfu" in metrics:
        parts.append(f"MFU {100 * metrics['mfu']:.1f}%")
    if metrics.get("skipped_updates"):
        parts.append(f"skipped {metrics['skipped_updates']:,.0f} non-finite updates")
    if metrics.get("moe_dropped"):
        parts.append(f"dropped {metrics['moe_dropped']:,.0f} expert copies")
    if eta_s is not None:
        parts.append(f"eta {format_duration(eta_s)}")
    return " | ".join(parts)


def preference_part(metrics: dict[str, float]) -> str:
    """DPO's pair metrics for a console line: reward accuracy, chosen / rejected rewards, their margin."""
    return (f"reward acc {metrics['reward_accuracy']:.3f} chosen {metrics['reward_chosen']:+.3f} "
            f"rejected {metrics['reward_rejected']:+.3f} margin {metrics['reward_margin']:+.3f}")


def eval_line(metrics: dict[str, float]) -> str:
    """An evaluation's console text: the loss, and DPO's pair metrics when there are any."""
    text = f"loss {metrics['loss']:.4f}"
    return text + (" | " + preference_part(metrics) if "reward_accuracy" in metrics else "")


def print_line(text: str) -> None:
    """Console output, from the first process only (every process of a multi-host run would repeat it)."""
    if jax.process_index() == 0:
        print(text, file=sys.stdout, flush=True)

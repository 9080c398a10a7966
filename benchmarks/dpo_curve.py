"""The reward-accuracy curve of a DPO run (configs/dpo-tiny.yaml by default), from its metrics.jsonl: writes
benchmarks/results/dpo_reward_accuracy.jsonl (one JSON line per step) and the plot
benchmarks/results/dpo_reward_accuracy.png (reward accuracy per step and its 10-step moving mean, drawn with
Pillow).

    python train.py --config configs/dpo-tiny.yaml && python benchmarks/dpo_curve.py [--run runs/dpo-tiny]
"""

from __future__ import annotations

import argparse
import json
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIELDS = ("step", "loss", "reward_accuracy", "reward_chosen", "reward_rejected", "reward_margin", "pairs")


def read_metrics(path: str) -> list[dict]:
    """One record per step (the last line of a step wins, as after a resume), in step order."""
    by_step = {}
    with open(path) as f:
        for line in f:
            record = json.loads(line)
            by_step[record["step"]] = {k: record[k] for k in FIELDS if k in record}
    return [by_step[s] for s in sorted(by_step)]


def moving_mean(values: list[float], window: int) -> list[float]:
    return [sum(values[max(0, i - window + 1):i + 1]) / (i + 1 - max(0, i - window + 1)) for i in range(len(values))]


def plot(records: list[dict], path: str, title: str, size=(640, 360), margin=48) -> None:
    """Reward accuracy per step (dots) and its 10-step moving mean (line), drawn with Pillow (no matplotlib
    needed): x from the first to the last step, y from 0 to 1 with gridlines every 0.25."""
    from PIL import Image, ImageDraw

    width, height = size
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    steps = [r["step"] for r in records]
    accuracy = [r["reward_accuracy"] for r in records]
    low, high = min(steps), max(max(steps), min(steps) + 1)

    def point(step, value):
        return (margin + (step - low) / (high - low) * (width - 2 * margin),
                height - margin - value * (height - 2 * margin))

    for tick in (0.0, 0.25, 0.5, 0.75, 1.0):
        y = point(low, tick)[1]
        draw.line([(margin, y), (width - margin, y)], fill=(220, 220, 220))
        draw.text((8, y - 6), f"{tick:.2f}", fill="black")
    for step in (low, (low + high) // 2, high):
        x = point(step, 0)[0]
        draw.text((x - 8, height - margin + 6), str(step), fill="black")
    draw.rectangle([margin, margin, width - margin, height - margin], outline="black")
    for step, value in zip(steps, accuracy):
        x, y = point(step, value)
        draw.ellipse([x - 2, y - 2, x + 2, y + 2], fill=(120, 160, 220))
    draw.line([point(s, v) for s, v in zip(steps, moving_mean(accuracy, 10))], fill=(200, 60, 30), width=2)
    draw.text((margin, 12), f"DPO reward accuracy per step (dots) and 10-step mean (line): {title}", fill="black")
    draw.text((width // 2 - 12, height - 20), "step", fill="black")
    image.save(path)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", default=os.path.join(ROOT, "runs", "dpo-tiny"))
    parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results"))
    args = parser.parse_args(argv)
    records = read_metrics(os.path.join(args.run, "metrics.jsonl"))
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "dpo_reward_accuracy.jsonl"), "w") as f:
        for record in records:
            f.write(json.dumps(record) + "\n")
            print(json.dumps(record))

    plot(records, os.path.join(args.out, "dpo_reward_accuracy.png"), os.path.basename(args.run))


if __name__ == "__main__":
    main()

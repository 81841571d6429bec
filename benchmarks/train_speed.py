"""Training speed of the default benchmark cell (DiT-XS/4 on 16x16 digits, batch 32), today's trainer against the
one of an earlier commit, in one run with the variants interleaved.

    .venv/bin/python benchmarks/train_speed.py [--before 71054b0] [--rounds 3] [--steps 300]

The earlier trainer runs from a git worktree of ``--before`` (its own source, this virtualenv); each round trains
every variant once, in turn, in a fresh subprocess, and steps/s is read from the run's own log (the windows after
the first, so start-up and warm-up are left out). Writes benchmarks/results/train_speed_cpu.json.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
# Today's default cell, as the benchmark's recipe trained it before the quality issue (fp32, batch 32).
CELL = {"model": "DiT-XS/4", "image_size": 16, "batch_size": 32, "learning_rate": 1e-3, "ema_decay": 0.999}
VARIANTS = {
    "before (fp32)": {"source": "before", "options": {}},
    "now (fp32)": {"source": "now", "options": {}},
    "now (bf16 autocast)": {"source": "now", "options": {"mixed_precision": "bf16"}},
}
RUN = """
import json, sys, torch
torch.set_num_threads(2)
from dit_optimum.training import TrainConfig, train
train(TrainConfig(**json.loads(sys.argv[1])))
"""


def steps_per_second(output_dir: Path) -> float:
    with (output_dir / "train_log.csv").open() as stream:
        rows = list(csv.DictReader(stream))
    return statistics.median(float(row["steps_per_s"]) for row in rows[1:])


def train_once(source: Path, options: dict, steps: int) -> float:
    with tempfile.TemporaryDirectory() as folder:
        config = {**CELL, **options, "output_dir": folder, "steps": steps, "log_every": 50, "checkpoint_every": 10**6}
        environment = {**os.environ, "PYTHONPATH": str(source / "src"), "HF_HUB_OFFLINE": "1"}
        subprocess.run(
            [sys.executable, "-c", RUN, json.dumps(config)], check=True, env=environment, capture_output=True
        )
        return steps_per_second(Path(folder))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", default="71054b0", help="commit of the earlier trainer")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=300)
    args = parser.parse_args()
    from dit_optimum.evaluation.hardware import hardware_description
    from dit_optimum.utils import write_json_atomic

    with tempfile.TemporaryDirectory() as scratch:
        before = Path(scratch) / "before"
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(before), args.before], check=True)
        try:
            sources = {"before": before, "now": ROOT}
            speeds: dict[str, list[float]] = {name: [] for name in VARIANTS}
            for round_index in range(args.rounds):
                for name, variant in VARIANTS.items():
                    speeds[name].append(train_once(sources[variant["source"]], variant["options"], args.steps))
                    print(f"round {round_index + 1}: {name}: {speeds[name][-1]:.2f} steps/s", flush=True)
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(before)], check=True)
    reference = statistics.median(speeds["before (fp32)"])
    rows = [
        {
            "variant": name,
            "steps_per_s": statistics.median(values),
            "samples_per_s": statistics.median(values) * CELL["batch_size"],
            "speedup": statistics.median(values) / reference,
            "rounds": values,
        }
        for name, values in speeds.items()
    ]
    for row in rows:
        print(f"{row['variant']:22s} {row['steps_per_s']:6.2f} steps/s  {row['speedup']:.2f}x")
    write_json_atomic(
        RESULTS / "train_speed_cpu.json",
        {"hardware": hardware_description(), "cell": CELL, "before": args.before, "steps": args.steps, "rows": rows},
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

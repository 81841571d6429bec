"""Cost columns of every registered technique on one variant (default DiT-S/2 at 256 tokens, SD-VAE decode).

    .venv/bin/python benchmarks/speed_matrix.py [--variant DiT-S/2] [--latent-size 32] [--output-dir DIR]

Untrained models (speed, memory, size and GFLOPs do not depend on the weights): the benchmark's ``--speed-only``
mode, so it runs on a GPU machine without data. Writes results.json, results.csv and report.md into
``--output-dir`` (default benchmarks/results/speed_matrix_<device>).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from dit_optimum.benchmark import BenchmarkSettings, run_benchmark
from dit_optimum.benchmark.report import markdown_table, write_report
from dit_optimum.evaluation.efficiency import SpeedSettings
from dit_optimum.techniques.registry import TECHNIQUES

RESULTS = Path(__file__).parent / "results"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", default="DiT-S/2")
    parser.add_argument("--latent-size", type=int, default=32, help="32 = 256 px images, 256 tokens at patch 2")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--forward-batch-size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--techniques", help="comma-separated subset (default: every registered technique)")
    parser.add_argument("--output-dir", type=Path)
    args = parser.parse_args()
    device = "gpu" if torch.cuda.is_available() else "cpu"
    output_dir = args.output_dir or RESULTS / f"speed_matrix_{device}"
    # quanto last: on a fresh GPU machine it may first compile its kernels
    chosen = args.techniques.split(",") if args.techniques else list(TECHNIQUES)
    names = sorted(chosen, key=lambda name: name.startswith("quanto"))
    settings = BenchmarkSettings(
        output_dir=str(output_dir),
        variants=(args.variant,),
        techniques=tuple(names),
        image_size=args.latent_size,
        channels=4,
        speed=SpeedSettings(
            batch_size=args.batch_size,
            forward_batch_size=args.forward_batch_size,
            num_inference_steps=args.steps,
            warmup=2,
            repeats=args.repeats,
        ),
        speed_only=True,
    )
    start = time.perf_counter()
    rows = run_benchmark(
        settings, on_cell=lambda row: print(row["technique"], row["status"], row.get("error", ""), flush=True)
    )
    command = "python benchmarks/speed_matrix.py " + " ".join(
        f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if v is not None and k != "output_dir"
    )
    write_report(
        rows,
        output_dir,
        title=f"Cost of every technique, {args.variant}",
        notes=[f"Command: `{command}`", f"Wall time {time.perf_counter() - start:.0f} s."],
    )
    print(markdown_table(rows))


if __name__ == "__main__":
    main()

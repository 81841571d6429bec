"""Attention variants: parameters and GFLOPs per preset, and forward time at 256 and 1024 tokens vs SDPA.

    .venv/bin/python benchmarks/attention_variants.py [--batch-size 4] [--repeats 5]

Writes benchmarks/results/attention_variants_<device>.json and .md. All timings of one table come from one run
(variants interleaved round-robin), so the ratios to SDPA are comparable even on a noisy machine.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from dit_optimum.benchmark.architecture import architecture_benchmark, markdown_table
from dit_optimum.configs import PAPER_PRESETS
from dit_optimum.evaluation.hardware import hardware_description
from dit_optimum.utils import write_json_atomic

RESULTS = Path(__file__).parent / "results"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    accounting = architecture_benchmark(
        PAPER_PRESETS, sample_sizes=(32,), batch_size=args.batch_size, repeats=args.repeats
    )
    scaling = architecture_benchmark(
        ("DiT-S/2",), sample_sizes=(32, 64), batch_size=args.batch_size, repeats=args.repeats
    )
    hardware = hardware_description()
    device = "gpu" if torch.cuda.is_available() else "cpu"
    write_json_atomic(
        RESULTS / f"attention_variants_{device}.json", {"hardware": hardware, "presets": accounting, "scaling": scaling}
    )
    text = (
        f"# Attention variants ({device})\n\nHardware: {hardware}. fp32, batch {args.batch_size}, "
        f"median of {args.repeats} forwards after warm-up, random weights.\n\n"
        "## Presets at 32x32x4 input\n\n"
        + markdown_table(accounting)
        + "\n## DiT-S/2 at 256 and 1024 tokens\n\n"
        + markdown_table(scaling)
    )
    (RESULTS / f"attention_variants_{device}.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()

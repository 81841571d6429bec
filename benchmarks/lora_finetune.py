"""Adapting the default run's baseline to a new class set: the digits relabelled (class ``shift-k`` shows the digit
(k + 3) mod 10, names the base never saw), fine-tuned with LoRA, biases only and in full, each scored before and
after by the domain metrics of the relabelled data (a classifier trained on its labels), with the adapter's size.

    .venv/bin/python benchmarks/lora_finetune.py --baseline benchmark-results/models/DiT-XS-4/baseline/pipeline

One process, nothing else on the machine. Writes benchmarks/results/lora_finetune_cpu.json and prints a table.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image
from sklearn.datasets import load_digits

from dit_optimum import DiTOptimumPipeline
from dit_optimum.evaluation.hardware import hardware_description, hardware_text
from dit_optimum.evaluation.quality import QualitySettings, evaluate_quality
from dit_optimum.training import TrainConfig, train
from dit_optimum.utils import write_json_atomic

RESULTS = Path(__file__).parent / "results"
SHIFT = 3
MODES = {
    "lora r8 (attention + adaLN) + class table": {
        "finetune": "lora",
        "lora_rank": 8,
        "lora_targets": ["attention", "adaln"],
    },
    "biases only + class table": {"finetune": "bias_norm"},
    "full": {"finetune": "full"},
}


def relabelled_digits(folder: Path) -> Path:
    """The 1,797 digits as an image folder whose class ``shift-k`` holds the digit (k + SHIFT) mod 10."""
    digits = load_digits()
    for index, (image, digit) in enumerate(zip(digits.images, digits.target)):
        name = f"shift-{(int(digit) - SHIFT) % 10}"
        (folder / name).mkdir(parents=True, exist_ok=True)
        Image.fromarray((image * 255 / 16).astype(np.uint8)).save(folder / name / f"{index:04d}.png")
    return folder


def score(pipeline_dir: Path, quality: QualitySettings) -> dict:
    pipeline = DiTOptimumPipeline.from_pretrained(pipeline_dir)
    pipeline.set_progress_bar_config(disable=True)
    metrics = evaluate_quality(pipeline, quality).metrics
    keys = ("class_accuracy", "class_accuracy_interval", "fd_domain", "fd_domain_interval")
    return {key: metrics[key] for key in keys} | {"fd_domain_real": metrics["fd_domain_real"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--baseline", required=True, type=Path, help="the default run's trained baseline pipeline")
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--num-samples", type=int, default=300)
    parser.add_argument("--output", type=Path, default=RESULTS / "lora_finetune_cpu.json")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="lora-finetune-"))
    data = relabelled_digits(work / "digits-shifted")
    quality = QualitySettings(
        reference=str(data),
        reference_samples=500,
        num_samples=args.num_samples,
        num_inference_steps=10,
        guidance_scale=2.0,
        batch_size=100,
        metrics=("class_accuracy", "fd_domain"),
    )
    rows = [{"mode": "before (the baseline, classes read by index)", **score(args.baseline, quality)}]
    full_size = sum(f.stat().st_size for f in (args.baseline / "transformer").glob("*.safetensors"))
    for name, options in MODES.items():
        start = time.perf_counter()
        pipeline_dir = train(
            TrainConfig(
                output_dir=str(work / name.split()[0]),
                pretrained=str(args.baseline),
                data=str(data),
                image_size=16,
                channels=1,
                steps=args.steps,
                batch_size=32,
                learning_rate=2e-3,
                ema_decay=0.999,
                mixed_precision="bf16",
                log_every=50,
                checkpoint_every=args.steps,
                **options,
            )
        )
        row = {"mode": name, "train_wall_s": time.perf_counter() - start, **score(pipeline_dir, quality)}
        lora = pipeline_dir.parent / "lora" / "pytorch_lora_weights.safetensors"
        row["adapter_bytes"] = lora.stat().st_size if lora.is_file() else None
        rows.append(row)
    hardware = hardware_description()
    payload = {"hardware": hardware, "steps": args.steps, "full_transformer_bytes": full_size, "rows": rows}
    write_json_atomic(args.output, payload)
    print(f"{hardware_text(hardware)}; {args.steps} steps; N={args.num_samples}; full transformer {full_size} bytes")
    for row in rows:
        accuracy = [100 * v for v in row["class_accuracy_interval"]]
        print(
            f"{row['mode']:45s} class acc {100 * row['class_accuracy']:5.1f} [{accuracy[0]:.1f}, {accuracy[1]:.1f}]"
            f"  FD {row['fd_domain']:7.2f} [{row['fd_domain_interval'][0]:.2f}, {row['fd_domain_interval'][1]:.2f}]"
            f"  adapter {row.get('adapter_bytes')}  train {row.get('train_wall_s', 0):.0f} s"
        )


if __name__ == "__main__":
    main()

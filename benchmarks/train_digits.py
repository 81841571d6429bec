"""Train DiT-XS/2 on the embedded digits (16x16 pixels, 10 classes), then distill it into a smaller student.

    .venv/bin/python benchmarks/train_digits.py [--steps 1500] [--student-steps 500]

Writes benchmarks/results/train_digits_<device>.json, the loss curve train_digits_loss_<device>.png and a sample
grid train_digits_samples_<device>.png. The student (DiT-XS/2 with 3 of 6 blocks) is trained twice with the same
budget and seed: alone, and distilled from the teacher (alpha 0.5, feature loss on its last block).
"""

from __future__ import annotations

import argparse
import csv
import tempfile
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch

from dit_optimum import DiTOptimumPipeline
from dit_optimum.evaluation.hardware import hardware_description
from dit_optimum.training import TrainConfig, final_loss, train
from dit_optimum.utils import write_json_atomic

RESULTS = Path(__file__).parent / "results"


def read_log(folder: Path) -> list[dict[str, float]]:
    with (folder / "train_log.csv").open() as stream:
        return [{k: float(v) for k, v in row.items() if v != ""} for row in csv.DictReader(stream)]


def timed_train(config: TrainConfig) -> tuple[Path, float]:
    start = time.perf_counter()
    pipeline_dir = train(config)
    return pipeline_dir, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--student-steps", type=int, default=500)
    args = parser.parse_args()
    device = "gpu" if torch.cuda.is_available() else "cpu"
    result: dict = {"hardware": hardware_description()}
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        common = {"batch_size": 32, "log_every": 10, "learning_rate": 3e-4, "ema_decay": 0.999}
        teacher = TrainConfig(
            output_dir=str(root / "teacher"), model="DiT-XS/2", steps=args.steps, checkpoint_every=500, **common
        )
        teacher_dir, wall = timed_train(teacher)
        log = read_log(root / "teacher")
        result["teacher"] = {
            "model": "DiT-XS/2",
            "steps": args.steps,
            "batch_size": 32,
            "wall_s": wall,
            "final_loss": final_loss(root / "teacher"),
            "final_mse": sum(r["mse"] for r in log[-5:]) / 5,
        }
        print(result["teacher"], flush=True)

        figure, axis = plt.subplots(figsize=(6, 3.5))
        axis.plot([r["step"] for r in log], [r["loss"] for r in log], label="loss (mse + vb)")
        axis.plot([r["step"] for r in log], [r["mse"] for r in log], label="mse", alpha=0.7)
        axis.set(xlabel="step", ylabel="loss", yscale="log", title=f"DiT-XS/2 on digits 16x16, batch 32 ({device})")
        axis.legend()
        figure.tight_layout()
        figure.savefig(RESULTS / f"train_digits_loss_{device}.png", dpi=120)

        pipe = DiTOptimumPipeline.from_pretrained(teacher_dir)
        pipe.set_progress_bar_config(disable=True)
        images = pipe(
            list(range(10)) * 2,
            guidance_scale=2.0,
            num_inference_steps=50,
            generator=torch.manual_seed(0),
            output_type="np",
        ).images
        grid = images.reshape(2, 10, 16, 16).transpose(0, 2, 1, 3).reshape(32, 160)
        grid = grid.repeat(4, axis=0).repeat(4, axis=1)  # nearest-neighbour x4, readable at a glance
        plt.imsave(RESULTS / f"train_digits_samples_{device}.png", grid, cmap="gray")

        student_overrides = {"num_layers": 3}
        for name, extra in (
            ("student_alone", {}),
            ("student_distilled", {"teacher": str(teacher_dir), "alpha": 0.5, "feature_blocks": [2]}),
        ):
            config = TrainConfig(
                output_dir=str(root / name),
                model="DiT-XS/2",
                model_overrides=student_overrides,
                steps=args.student_steps,
                checkpoint_every=args.student_steps,
                **common,
                **extra,
            )
            _, wall = timed_train(config)
            log = read_log(root / name)
            last = log[-5:]
            result[name] = {
                "steps": args.student_steps,
                "wall_s": wall,
                "final_loss": final_loss(root / name),
                "final_mse": sum(r["mse"] for r in last) / len(last),
                **(
                    {
                        "final_distill": sum(r["distill"] for r in last) / len(last),
                        "final_feature": sum(r["feature"] for r in last) / len(last),
                    }
                    if extra
                    else {}
                ),
            }
            print(name, result[name], flush=True)
    write_json_atomic(RESULTS / f"train_digits_{device}.json", result)


if __name__ == "__main__":
    main()

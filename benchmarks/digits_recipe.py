"""The small-data training recipe: a short sweep on the digits, scored by the domain metrics at checkpoints.

    .venv/bin/python benchmarks/digits_recipe.py [--steps 1600] [--checkpoint-every 400] [--num-samples 300]

DiT-XS/4 on the 16x16 digits (the default benchmark cell), bf16 autocast. Each recipe is trained once; its EMA
weights at every checkpoint are scored (class accuracy and FD_domain with 95% intervals, N generated samples,
DDIM with a few step counts and guidance scales), and the recipe's wall time is recorded. One run, one process,
nothing else on the machine. Writes benchmarks/results/digits_recipe_cpu.json and prints a table.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from diffusers import DDIMScheduler
from safetensors.torch import load_file

from dit_optimum import DiTOptimumPipeline, DiTOptimumTransformer2DModel
from dit_optimum.evaluation.hardware import hardware_description
from dit_optimum.evaluation.quality import QualitySettings, evaluate_quality
from dit_optimum.training import TrainConfig, train
from dit_optimum.utils import write_json_atomic

RESULTS = Path(__file__).parent / "results"
CELL = {"model": "DiT-XS/4", "image_size": 16, "mixed_precision": "bf16"}
RECIPES = {
    "lr 1e-3": {"learning_rate": 1e-3, "warmup_steps": 0, "batch_size": 32},
    "lr 2e-3": {"learning_rate": 2e-3, "warmup_steps": 0, "batch_size": 32},
    "lr 2e-3, warm-up 100": {"learning_rate": 2e-3, "warmup_steps": 100, "batch_size": 32},
    "lr 3e-3, warm-up 100": {"learning_rate": 3e-3, "warmup_steps": 100, "batch_size": 32},
    "lr 2e-3, batch 64 (half the steps)": {
        "learning_rate": 2e-3,
        "warmup_steps": 0,
        "batch_size": 64,
        "steps_factor": 0.5,
    },
    "lr 2e-3, seed 1": {"learning_rate": 2e-3, "warmup_steps": 0, "batch_size": 32, "seed": 1},
    "lr 2e-3, cosine": {"learning_rate": 2e-3, "warmup_steps": 0, "batch_size": 32, "lr_schedule": "cosine"},
    "lr 3e-3, warm-up 50, cosine": {
        "learning_rate": 3e-3,
        "warmup_steps": 50,
        "batch_size": 32,
        "lr_schedule": "cosine",
    },
}
SAMPLERS = ({"steps": 10, "guidance": 1.5}, {"steps": 10, "guidance": 2.0}, {"steps": 10, "guidance": 3.0})


def ema_pipeline(run: Path, step: int) -> DiTOptimumPipeline:
    """The pipeline of a run with the EMA weights of its checkpoint at ``step``."""
    final = DiTOptimumPipeline.from_pretrained(run / "pipeline")
    model = DiTOptimumTransformer2DModel.from_config(final.transformer.config)
    model.load_state_dict(load_file(run / "checkpoints" / f"step_{step}" / "ema.safetensors"))
    pipeline = DiTOptimumPipeline(transformer=model.eval(), vae=None, scheduler=DDIMScheduler(), id2label=None)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1600)
    parser.add_argument("--checkpoint-every", type=int, default=400)
    parser.add_argument("--num-samples", type=int, default=300)
    parser.add_argument("--only", help="semicolon-separated recipe names")
    parser.add_argument("--output", type=Path, default=RESULTS / "digits_recipe_cpu.json")
    args = parser.parse_args()
    torch.set_num_threads(2)
    recipes = {name: RECIPES[name] for name in args.only.split(";")} if args.only else RECIPES
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        for name, recipe in recipes.items():
            run = Path(scratch) / name.replace(" ", "_").replace(",", "")
            options = {key: value for key, value in recipe.items() if key != "steps_factor"}
            factor = recipe.get("steps_factor", 1)  # a larger batch: the same samples in fewer steps
            steps, every = int(args.steps * factor), int(args.checkpoint_every * factor)
            config = TrainConfig(
                output_dir=str(run),
                steps=steps,
                checkpoint_every=every,
                keep_checkpoints=steps // every,
                log_every=50,
                **CELL,
                **options,
            )
            start = time.perf_counter()
            train(config)
            train_s = time.perf_counter() - start
            for step in range(every, steps + 1, every):
                pipeline = ema_pipeline(run, step)
                for sampler in SAMPLERS:
                    settings = QualitySettings(
                        num_samples=args.num_samples,
                        reference_samples=500,
                        num_inference_steps=sampler["steps"],
                        guidance_scale=sampler["guidance"],
                        batch_size=100,
                        metrics=("class_accuracy", "fd_domain"),
                        bootstrap=100,
                    )
                    start = time.perf_counter()
                    result = evaluate_quality(pipeline, settings).metrics
                    row = {
                        "recipe": name,
                        **recipe,
                        "step": step,
                        "train_s_total": train_s,
                        "sampler_steps": sampler["steps"],
                        "guidance": sampler["guidance"],
                        "quality_s": time.perf_counter() - start,
                        **{key: result[key] for key in result if key.startswith(("class_accuracy", "fd_domain"))},
                    }
                    rows.append(row)
                    print(
                        f"{name:34s} step {step:5d} | DDIM {sampler['steps']:2d} g {sampler['guidance']:.1f} | "
                        f"acc {100 * row['class_accuracy']:.1f} [{100 * row['class_accuracy_interval'][0]:.1f}, "
                        f"{100 * row['class_accuracy_interval'][1]:.1f}] | FD {row['fd_domain']:.2f} "
                        f"[{row['fd_domain_interval'][0]:.2f}, {row['fd_domain_interval'][1]:.2f}] "
                        f"(floor {row['fd_domain_real']:.2f}) | train {train_s:.0f} s",
                        flush=True,
                    )
            # after every recipe: an interrupted sweep keeps what it measured
            write_json_atomic(
                args.output,
                {"hardware": hardware_description(), "cell": CELL, "num_samples": args.num_samples, "rows": rows},
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

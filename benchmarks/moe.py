"""MoE: forward time vs the dense model with the same activated parameters, and load balance after training.

    .venv/bin/python benchmarks/moe.py [--steps 600]

Part 1 times one forward of DiT-S/2 (32x32x4, 256 tokens, batch 8) with an 8-expert top-2 MoE feed-forward in
every block (expert width = dense MLP width / 2, so each token activates the dense MLP's parameter count)
against the dense DiT-S/2, round-robin in one run. Part 2 trains DiT-XS/2-MoE on the digits (16x16 pixels)
and reports max/mean expert load on the last logged batch per MoE block. Writes benchmarks/results/moe_<device>.json.
"""

from __future__ import annotations

import argparse
import csv
import tempfile
import time
from pathlib import Path

import torch

from dit_optimum import DiTOptimumTransformer2DModel, count_gflops, count_parameters
from dit_optimum.evaluation.hardware import hardware_description
from dit_optimum.evaluation.inputs import example_inputs
from dit_optimum.evaluation.speed import interleaved_median_times
from dit_optimum.training import TrainConfig, train
from dit_optimum.utils import write_json_atomic

RESULTS = Path(__file__).parent / "results"
MOE = {"moe_num_experts": 8, "moe_top_k": 2, "moe_router_z_loss_weight": 0.001}


def active_parameters(model: DiTOptimumTransformer2DModel) -> int:
    """Parameters one token uses: all, minus the experts it is not routed to."""
    total = count_parameters(model)
    for block in model.transformer_blocks:
        ff = block.ff
        if hasattr(ff, "w_in"):
            per_expert = (ff.w_in.numel() + ff.b_in.numel() + ff.w_out.numel() + ff.b_out.numel()) // ff.num_experts
            total -= per_expert * (ff.num_experts - ff.top_k)
    return total


def timing(repeats: int, capacity_factors: tuple[float, ...] = (1.25, 1.0)) -> dict:
    torch.manual_seed(0)
    models = {"dense": DiTOptimumTransformer2DModel.from_preset("DiT-S/2").eval()}
    for factor in capacity_factors:
        models[f"moe cf {factor}"] = DiTOptimumTransformer2DModel.from_preset(
            "DiT-S/2", **MOE, moe_capacity_factor=factor
        ).eval()
    times = interleaved_median_times(models, example_inputs(models["dense"], 8), warmup=1, repeats=repeats)
    return {
        name: {
            "forward_s": times[name],
            "time_ratio": times[name] / times["dense"],
            "params_m": count_parameters(model) / 1e6,
            "active_params_m": active_parameters(model) / 1e6,
            "gflops": count_gflops(model),
        }
        for name, model in models.items()
    }


def balance_after_training(steps: int, output_dir: Path) -> dict:
    config = TrainConfig(
        output_dir=str(output_dir),
        model="DiT-XS/2",
        model_overrides=dict(MOE),
        steps=steps,
        batch_size=32,
        checkpoint_every=steps,
        log_every=10,
        learning_rate=3e-4,
    )
    start = time.perf_counter()
    train(config)
    wall = time.perf_counter() - start
    with (output_dir / "train_log.csv").open() as stream:
        rows = list(csv.DictReader(stream))
    last = rows[-1]
    per_block = {key.split("/")[0]: float(value) for key, value in last.items() if key.endswith("max_over_mean_load")}
    dropped = [float(value) for key, value in last.items() if key.endswith("dropped_fraction")]
    return {
        "steps": steps,
        "wall_s": wall,
        "final_loss": float(last["loss"]),
        "max_over_mean_load_last_batch": per_block,
        "worst_max_over_mean_load": max(per_block.values()),
        "mean_dropped_fraction": sum(dropped) / len(dropped),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    result = {"hardware": hardware_description(), "timing": timing(args.repeats)}
    print(result["timing"], flush=True)
    with tempfile.TemporaryDirectory() as folder:
        result["balance"] = balance_after_training(args.steps, Path(folder))
    print(result["balance"], flush=True)
    device = "gpu" if torch.cuda.is_available() else "cpu"
    write_json_atomic(RESULTS / f"moe_{device}.json", result)


if __name__ == "__main__":
    main()

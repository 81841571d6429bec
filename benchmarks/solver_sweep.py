"""Quality of sampler options on a trained pipeline: class accuracy and FD_domain (N samples, 95% intervals) of DDIM
at several step counts and of each solver configuration given, the benchmark's quality settings otherwise.

    .venv/bin/python benchmarks/solver_sweep.py PIPELINE [--num-samples 300] [--configs JSON]

``--configs``: a JSON list of ``[label, solver, steps, options]`` (solver ``"ddim"`` = the pipeline's own
scheduler at that step count; else a ``dit_optimum.techniques.SOLVERS`` name with extra scheduler options). Prints
one JSON line per configuration. Used to choose the options in ``techniques/solvers.py`` (BENCHMARKS.md, "Fewer
sampling steps").
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace

from dit_optimum import DiTOptimumPipeline
from dit_optimum.benchmark.settings import BenchmarkSettings
from dit_optimum.evaluation.quality import evaluate_quality
from dit_optimum.techniques.solvers import with_solver

DEFAULT_CONFIGS = [
    ["ddim-10", "ddim", 10, {}],
    ["ddim-50", "ddim", 50, {}],
    ["ddim-5", "ddim", 5, {}],
    ["dpmpp-2m-5", "dpmpp-2m", 5, {}],
    ["dpmpp-2m-5-no-lu", "dpmpp-2m", 5, {"use_lu_lambdas": False}],
    ["dpmpp-2m-5-karras", "dpmpp-2m", 5, {"use_lu_lambdas": False, "use_karras_sigmas": True}],
    ["dpmpp-2m-3", "dpmpp-2m", 3, {}],
    ["dpmpp-3m-5", "dpmpp-3m", 5, {}],
    ["unipc-5", "unipc", 5, {}],
    ["deis-5", "deis", 5, {}],
    ["euler-5", "euler", 5, {}],
    ["heun-3", "heun", 3, {}],
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "pipeline", help="a trained pipeline folder (e.g. <benchmark output>/models/DiT-XS-4/baseline/pipeline)"
    )
    parser.add_argument("--num-samples", type=int, default=300)
    parser.add_argument("--configs", type=json.loads, default=DEFAULT_CONFIGS)
    args = parser.parse_args()
    base = DiTOptimumPipeline.from_pretrained(args.pipeline)
    base.set_progress_bar_config(disable=True)
    settings = replace(BenchmarkSettings().quality, num_samples=args.num_samples)
    for label, solver, steps, options in args.configs:
        if solver == "ddim":
            pipe, quality = base, replace(settings, num_inference_steps=steps)
        else:
            pipe, quality = with_solver(base, solver, steps, **options), settings
        start = time.perf_counter()
        metrics = evaluate_quality(pipe, quality).metrics
        print(
            json.dumps(
                {
                    "label": label,
                    "steps": metrics["quality_settings"]["num_inference_steps"],
                    "class_accuracy": round(metrics["class_accuracy"], 4),
                    "class_accuracy_interval": [round(x, 4) for x in metrics["class_accuracy_interval"]],
                    "fd_domain": round(metrics["fd_domain"], 2),
                    "fd_domain_interval": [round(x, 2) for x in metrics["fd_domain_interval"]],
                    "num_samples": metrics["num_samples"],
                    "wall_s": round(time.perf_counter() - start, 1),
                }
            ),
            flush=True,
        )


if __name__ == "__main__":
    main()

"""`dit-optimum optimize` on the default baseline, timed, with an independent check of the chosen pipeline.

Runs the optimizer as a user would (a fresh process, an empty output folder) on the default run's trained baseline,
then judges the baseline and the chosen pipeline with a classifier neither ever saw: scikit-learn's RBF support
vector machine fitted on the original 8x8 digits (the package's metrics use its own CNN at the generated size).
Both sample N images of the same classes and seeds with their own recorded sampling; the check passes when the
chosen pipeline's accuracy lies inside the baseline's 95% bootstrap interval.

    .venv/bin/python benchmarks/optimize_default.py --baseline benchmark-results/models/DiT-XS-4/baseline/pipeline
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

RESULTS = Path(__file__).parent / "results"
QUALITY_KEYS = ("class_accuracy", "class_accuracy_interval", "fd_domain", "fd_domain_interval")


def independent_accuracy(pipeline, count: int, seed: int = 0) -> np.ndarray:
    """Per-sample correctness of ``count`` samples (class ``i % 10``, seed ``seed + i``) judged by an SVM fitted on
    the original 8x8 digits (resized down from the generated images)."""
    from PIL import Image

    labels = [index % 10 for index in range(count)]
    generators = [torch.Generator().manual_seed(seed + index) for index in range(count)]
    images = pipeline(class_labels=labels, generator=generators, output_type="np").images[..., 0]
    small = np.stack([np.asarray(Image.fromarray((255 * np.clip(x, 0, 1)).astype(np.uint8)).resize((8, 8),
                                                                                                Image.BILINEAR))
                      for x in images])  # fmt: skip
    features = small.reshape(count, -1) / 255.0 * 16.0  # the digits' own scale, 0..16
    return CLASSIFIER.predict(features) == np.asarray(labels)


def bootstrap(correct: np.ndarray, resamples: int = 2000, seed: int = 0) -> tuple[float, float]:
    rng = np.random.default_rng(seed)
    means = [correct[rng.integers(0, len(correct), len(correct))].mean() for _ in range(resamples)]
    return float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def fit_classifier():
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
    from sklearn.svm import SVC

    digits = load_digits()
    train_x, test_x, train_y, test_y = train_test_split(digits.data, digits.target, test_size=0.25, random_state=0)
    classifier = SVC(gamma=0.001, C=10).fit(train_x, train_y)
    return classifier, float(classifier.score(test_x, test_y))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", default="benchmark-results/models/DiT-XS-4/baseline/pipeline")
    parser.add_argument("--output-dir", default="/tmp/optimize-default")
    parser.add_argument("--num-samples", type=int, default=300)
    parser.add_argument("--extra", nargs="*", default=[], help="further `dit-optimum optimize` options")
    args = parser.parse_args()
    output = Path(args.output_dir)
    if output.exists():  # a fresh run is timed: never into (or by deleting) a folder that is already there
        print(f"--output-dir {str(output)!r} exists: give a new folder (the optimizer is timed from an empty one).")
        return 2
    command = [str(Path(sys.executable).parent / "dit-optimum"), "optimize", args.baseline, "--output-dir",
               str(output), *args.extra]  # fmt: skip
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        print(done.stderr[-4000:])
        return 1
    import dit_optimum  # noqa: F401
    from dit_optimum import DiTOptimumPipeline
    from dit_optimum.evaluation.hardware import hardware_description
    from dit_optimum.utils import write_json_atomic

    global CLASSIFIER
    CLASSIFIER, held_out = fit_classifier()
    rows = json.loads((output / "results.json").read_text())["rows"]
    base_row, row = rows
    log = json.loads((output / "search.json").read_text())
    checks = {}
    for name, folder in (("baseline", args.baseline), ("optimized", output / "pipeline")):
        pipeline = DiTOptimumPipeline.from_pretrained(folder)
        pipeline.set_progress_bar_config(disable=True)
        if name == "baseline":  # the benchmark's sampling of the baseline
            settings = base_row["quality_settings"]
            pipeline.set_sampling_defaults(
                num_inference_steps=settings["num_inference_steps"], guidance_scale=settings["guidance_scale"]
            )
        correct = independent_accuracy(pipeline, args.num_samples)
        checks[name] = {"accuracy": float(correct.mean()), "interval": bootstrap(correct), "num_samples": len(correct)}
    low, high = checks["baseline"]["interval"]
    result = {
        "command": " ".join(["dit-optimum", *command[1:]]),
        "hardware": hardware_description(),
        "wall_s": wall,
        "chosen": log["chosen"],
        "stopped": log.get("stopped"),
        "search_s": log["elapsed_s"],
        "candidates_tried": len(log["candidates"]),
        "candidates": [
            {key: record.get(key) for key in ("name", "status", "stage", "reason", "predicted", "score")}
            for record in log["candidates"]
        ],
        "sampling_speedup": row["sampling_speedup"],
        "sampling_speedup_range": row["sampling_speedup_range"],
        "size_share": row["size_bytes"] / base_row["size_bytes"],
        "runtime": row.get("runtime"),
        "quality": {key: row.get(key) for key in (*QUALITY_KEYS, "num_samples")},
        "baseline_quality": {key: base_row.get(key) for key in QUALITY_KEYS},
        "vs_baseline": row.get("vs_baseline"),
        "verdict": row.get("quality_verdict"),
        "independent_check": {
            "classifier": "scikit-learn SVC(gamma=0.001, C=10) on the original 8x8 digits",
            "classifier_held_out_accuracy": held_out,
            **checks,
            "within_baseline_interval": bool(low <= checks["optimized"]["accuracy"] <= high),
        },
    }
    cpu = result["hardware"]["cpu"].lower().replace("(r)", "").split()
    path = RESULTS / f"optimize_default_{'_'.join(cpu[:2])}.json"
    write_json_atomic(path, result)
    print(json.dumps({k: v for k, v in result.items() if k != "candidates"}, indent=1))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""``dit-optimum evaluate``: quality and cost of one saved pipeline (folder or Hub id), optionally as JSON."""

from __future__ import annotations

import argparse
import os

from ..errors import DiTOptimumError
from ..evaluation.quality import add_quality_arguments, quality_settings_from_arguments
from .common import output_path

NAME = "evaluate"
HELP = "FID/sFID/KID, GFLOPs, throughput, latency, peak memory and size of one saved pipeline."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("pipeline", help="pipeline folder or Hub id")
    add_quality_arguments(parser)
    parser.add_argument("--speed-batch-size", type=int, default=8)
    parser.add_argument("--no-speed", action="store_true", help="quality metrics only")
    parser.add_argument("--output", type=output_path, help="write the result as JSON here")


def run(args: argparse.Namespace) -> int:
    import json

    import torch
    from accelerate import PartialState

    from ..evaluation.efficiency import SpeedSettings, efficiency_metrics
    from ..evaluation.hardware import hardware_description
    from ..evaluation.quality import QualitySettings, evaluate_quality
    from ..files import check_writable
    from ..pipelines.dit import DiTOptimumPipeline
    from ..utils import write_json_atomic

    settings = quality_settings_from_arguments(args, QualitySettings())
    speed = SpeedSettings(
        batch_size=args.speed_batch_size,
        num_inference_steps=settings.num_inference_steps,
        guidance_scale=settings.guidance_scale,
    )
    settings.validate()
    speed.validate()
    if args.output is not None and os.path.isdir(args.output):
        raise DiTOptimumError(f"`--output`={str(args.output)!r} is a folder; give the path of a JSON file.")
    if args.output is not None:  # before the evaluation: a read-only or full folder fails now, not after it
        if os.path.lexists(args.output) and os.path.isdir(args.pipeline):  # never a file of the pipeline itself
            pipeline = os.path.realpath(args.pipeline)
            if os.path.commonpath([pipeline, os.path.realpath(args.output)]) == pipeline:
                raise DiTOptimumError(
                    f"`--output`={str(args.output)!r} is a file of the pipeline being evaluated: writing the result "
                    "there would replace it. Choose another path."
                )
        check_writable(args.output.parent, "--output")
    state = PartialState(cpu=not torch.cuda.is_available())  # one process per GPU under torchrun / accelerate
    pipeline = DiTOptimumPipeline.from_pretrained(args.pipeline).to(state.device)
    pipeline.set_progress_bar_config(disable=True)
    result = evaluate_quality(pipeline, settings, state=state).metrics
    if not result:  # not the main process
        return 0
    if not args.no_speed:
        result.update(efficiency_metrics(pipeline, speed))
    result.update(pipeline=args.pipeline, hardware=hardware_description())
    print(json.dumps(result, indent=2, default=str))
    if args.output:
        write_json_atomic(args.output, result)
    return 0

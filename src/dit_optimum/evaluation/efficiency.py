"""Cost of a pipeline: GFLOPs, parameters, saved size, forward and sampling throughput, latency, peak memory."""

from __future__ import annotations

import statistics
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch

from ..errors import DiTOptimumError
from ..models.transformer import outside_sampling
from ..pipelines.dit import MAX_GUIDANCE_SCALE
from ..utils import check_number, check_positive_integers
from .declarations import Metric, declare_metric
from .flops import count_gflops, count_parameters
from .inputs import example_inputs
from .memory import peak_memory_bytes
from .sampling import MAX_SAMPLING_STEPS, generate_images, sampling_options
from .size import saved_size_bytes
from .speed import interleaved_call_times


@dataclass
class SpeedSettings:
    """How speed is measured: batch sizes, sampling steps and guidance, warm-up and repeats (medians reported)."""

    batch_size: int = 8
    forward_batch_size: int = 64
    num_inference_steps: int = 50
    guidance_scale: float = 1.5
    warmup: int = 1
    repeats: int = 3

    def validate(self) -> None:
        names = ("batch_size", "forward_batch_size", "num_inference_steps", "repeats")
        check_positive_integers(**{name: getattr(self, name) for name in names})
        if not isinstance(self.warmup, int) or self.warmup < 0:
            raise DiTOptimumError(f"`warmup`={self.warmup!r} must be an integer >= 0.")
        check_number("guidance_scale", self.guidance_scale, 1, MAX_GUIDANCE_SCALE)
        if self.num_inference_steps > MAX_SAMPLING_STEPS:
            raise DiTOptimumError(
                f"`num_inference_steps`={self.num_inference_steps} must be at most {MAX_SAMPLING_STEPS}."
            )


def efficiency_metrics(pipeline, settings: SpeedSettings | None = None, reference=None) -> dict[str, Any]:
    """Cost of ``pipeline`` on its current device; every figure says what it was measured with.

    ``forward_images_per_s``: one transformer forward at ``forward_batch_size``; ``sampling_images_per_s``: full
    sampling (all steps, guidance, decode) at ``batch_size``; ``latency_s``: full sampling of one image;
    ``peak_memory_bytes``: peak above the loaded model during one sampling call at ``batch_size`` (CUDA allocator
    on GPU, resident-set growth on CPU; a VAE decode can dominate it); ``forward_peak_memory_bytes``: the same
    during one transformer forward at ``forward_batch_size``; ``size_bytes``: the saved transformer.

    With a ``reference`` pipeline (the baseline), both are timed round-robin in the same rounds and the paired
    ratios ``forward_speedup``, ``sampling_speedup`` and ``latency_ratio`` are added: on a noisy machine they are
    the numbers to compare, not absolute throughputs measured minutes apart.

    ``pipeline`` samples with its recorded sampling defaults where it has them (``sampling_options``: a few-step
    solver is timed at its own steps), the ``reference`` likewise (``settings``' steps and guidance unless it records
    its own); ``speed_settings``
    in the result records the candidate's.
    """
    settings = settings or SpeedSettings()
    settings.validate()
    steps, guidance = sampling_options(pipeline, settings.num_inference_steps, settings.guidance_scale)
    model = pipeline.transformer
    device = pipeline.device
    pipelines = {"candidate": pipeline} if reference is None else {"candidate": pipeline, "reference": reference}

    def forward_call(pipe) -> Callable[[], Any]:
        model = pipe.transformer
        inputs = example_inputs(model, settings.forward_batch_size)

        return lambda: model(*inputs)

    def sample_call(pipe, count: int) -> Callable[[], Any]:
        # each at its own recorded steps and guidance where it records them (a baseline that is itself a few-step
        # student samples as it was made to), else at the settings'
        own = sampling_options(pipe, settings.num_inference_steps, settings.guidance_scale)
        return lambda: generate_images(pipe, range(count), *own, seed=0)

    def timed(calls: dict[str, Callable[[], Any]]) -> dict[str, list[float]]:
        return interleaved_call_times(calls, device, settings.warmup, settings.repeats)

    with outside_sampling(model):  # a step cache has nothing to reuse in one forward: every block computes
        forward_times = timed({name: forward_call(pipe) for name, pipe in pipelines.items()})
    sampling_times = timed({name: sample_call(pipe, settings.batch_size) for name, pipe in pipelines.items()})
    latency_times = timed({name: sample_call(pipe, 1) for name, pipe in pipelines.items()})
    forward_s, sampling_s, latency_s = (
        {name: statistics.median(values) for name, values in times.items()}
        for times in (forward_times, sampling_times, latency_times)
    )
    forward_memory = sampling_memory = None
    if getattr(model, "runtime", None) is None:  # a runtime holds its buffers outside torch between calls: a call's
        with torch.no_grad():  # growth would read near zero, so its memory is not measured (n/a) rather than wrong
            with outside_sampling(model):
                forward_memory = peak_memory_bytes(forward_call(pipeline), device)
            sampling_memory = peak_memory_bytes(sample_call(pipeline, settings.batch_size), device)
    result = {
        "gflops": count_gflops(model),
        "params_m": count_parameters(model) / 1e6,
        "size_bytes": saved_size_bytes(model),
        "forward_images_per_s": settings.forward_batch_size / forward_s["candidate"],
        "sampling_images_per_s": settings.batch_size / sampling_s["candidate"],
        "latency_s": latency_s["candidate"],
        "dtype": str(model.dtype).replace("torch.", ""),
        "sampler": type(pipeline.scheduler).__name__,
        "runtime": model.runtime.describe() if getattr(model, "runtime", None) is not None else "torch",
        "speed_settings": {**asdict(settings), "num_inference_steps": steps, "guidance_scale": guidance},
    }
    if sampling_memory is not None:  # a runtime's memory is left out (n/a), never stored as null
        result.update(peak_memory_bytes=sampling_memory, forward_peak_memory_bytes=forward_memory)
    if reference is not None:
        for key, times, faster in (
            ("forward_speedup", forward_times, True),
            ("sampling_speedup", sampling_times, True),
            ("latency_ratio", latency_times, False),
        ):
            # per round: the two calls timed back to back; the median ratio and the range over rounds
            ratios = [
                (ref / cand if faster else cand / ref) for ref, cand in zip(times["reference"], times["candidate"])
            ]
            result[key] = statistics.median(ratios)
            result[f"{key}_range"] = [min(ratios), max(ratios)]
    return result


# Cost columns; speed ones are compared through their paired ratio to the baseline (timed in the same rounds).
for _metric in (
    Metric("gflops", "GFLOPs", "cost", format="{:.3f}", description="multiply-accumulates per image per forward"),
    Metric("params_m", "params (M)", "cost", better=None, description="parameters in millions"),
    Metric("size_bytes", "size (MB)", "cost", scale=1e-6, description="bytes of the saved transformer"),
    Metric(
        "forward_images_per_s",
        "fwd img/s",
        "cost",
        better="higher",
        format="{:.1f}",
        paired_ratio="forward_speedup",
        description="images per second of one transformer forward",
    ),
    Metric(
        "sampling_images_per_s",
        "sample img/s",
        "cost",
        better="higher",
        paired_ratio="sampling_speedup",
        description="images per second of full sampling (all steps and decode)",
    ),
    Metric(
        "latency_s",
        "latency (s)",
        "cost",
        format="{:.3f}",
        paired_ratio="latency_ratio",
        description="seconds to sample one image",
    ),
    Metric(
        "peak_memory_bytes",
        "sampling mem (MB)",
        "cost",
        format="{:.1f}",
        scale=1e-6,
        description="peak memory above the loaded model during one sampling call",
    ),
    Metric(
        "forward_peak_memory_bytes",
        "fwd mem (MB)",
        "cost",
        format="{:.1f}",
        scale=1e-6,
        description="peak memory above the loaded model during one forward",
    ),
):
    declare_metric(_metric)

"""Cost of a pipeline: GFLOPs, parameters, saved size, forward and sampling throughput, latency, peak memory."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch

from ..errors import DiTOptimumError
from ..utils import check_number, check_positive_integers
from .flops import count_gflops, count_parameters
from .inputs import example_inputs
from .memory import peak_memory_bytes
from .sampling import MAX_SAMPLING_STEPS, generate_images
from .size import saved_size_bytes
from .speed import interleaved_call_seconds


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
        check_number("guidance_scale", self.guidance_scale, 1)
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
    """
    settings = settings or SpeedSettings()
    settings.validate()
    model = pipeline.transformer
    device = pipeline.device
    pipelines = {"candidate": pipeline} if reference is None else {"candidate": pipeline, "reference": reference}

    def forward_call(pipe) -> Callable[[], Any]:
        inputs = example_inputs(pipe.transformer, settings.forward_batch_size)
        return lambda: pipe.transformer(*inputs)

    def sample_call(pipe, count: int) -> Callable[[], Any]:
        steps, guidance = settings.num_inference_steps, settings.guidance_scale
        return lambda: generate_images(pipe, range(count), steps, guidance, seed=0)

    def timed(calls: dict[str, Callable[[], Any]]) -> dict[str, float]:
        return interleaved_call_seconds(calls, device, settings.warmup, settings.repeats)

    forward_s = timed({name: forward_call(pipe) for name, pipe in pipelines.items()})
    sampling_s = timed({name: sample_call(pipe, settings.batch_size) for name, pipe in pipelines.items()})
    latency_s = timed({name: sample_call(pipe, 1) for name, pipe in pipelines.items()})
    with torch.no_grad():
        forward_memory = peak_memory_bytes(forward_call(pipeline), device)
        sampling_memory = peak_memory_bytes(sample_call(pipeline, settings.batch_size), device)
    result = {
        "gflops": count_gflops(model),
        "params_m": count_parameters(model) / 1e6,
        "size_bytes": saved_size_bytes(model),
        "forward_images_per_s": settings.forward_batch_size / forward_s["candidate"],
        "sampling_images_per_s": settings.batch_size / sampling_s["candidate"],
        "latency_s": latency_s["candidate"],
        "peak_memory_bytes": sampling_memory,
        "forward_peak_memory_bytes": forward_memory,
        "dtype": str(model.dtype).replace("torch.", ""),
        "sampler": type(pipeline.scheduler).__name__,
        "speed_settings": asdict(settings),
    }
    if reference is not None:
        result.update(
            forward_speedup=forward_s["reference"] / forward_s["candidate"],
            sampling_speedup=sampling_s["reference"] / sampling_s["candidate"],
            latency_ratio=latency_s["candidate"] / latency_s["reference"],
        )
    return result

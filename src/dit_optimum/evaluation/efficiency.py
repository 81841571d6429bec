"""Cost of a pipeline: GFLOPs, parameters, saved size, forward and sampling throughput, latency, peak memory."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch

from .flops import count_gflops, count_parameters
from .inputs import example_inputs
from .memory import peak_memory_bytes
from .sampling import generate_images
from .size import saved_size_bytes
from .speed import median_call_seconds, time_forward


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
        for name in ("batch_size", "forward_batch_size", "num_inference_steps", "repeats"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"`{name}`={value!r} must be a positive integer.")
        if not isinstance(self.warmup, int) or self.warmup < 0:
            raise ValueError(f"`warmup`={self.warmup!r} must be an integer >= 0.")


def efficiency_metrics(pipeline, settings: SpeedSettings | None = None) -> dict[str, Any]:
    """Cost of ``pipeline`` on its current device; every figure says what it was measured with.

    ``forward_images_per_s``: one transformer forward at ``forward_batch_size``; ``sampling_images_per_s``: full
    sampling (all steps, guidance, decode) at ``batch_size``; ``latency_s``: full sampling of one image;
    ``peak_memory_bytes``: peak above the loaded model during one sampling call at ``batch_size`` (CUDA allocator
    on GPU, resident-set growth on CPU; a VAE decode can dominate it); ``forward_peak_memory_bytes``: the same
    during one transformer forward at ``forward_batch_size``; ``size_bytes``: the saved transformer.
    """
    settings = settings or SpeedSettings()
    settings.validate()
    model = pipeline.transformer
    device = pipeline.device
    batch = range(settings.batch_size)

    def sample(indices: range) -> None:
        generate_images(pipeline, indices, settings.num_inference_steps, settings.guidance_scale, seed=0)

    forward_s = time_forward(model, settings.forward_batch_size, warmup=settings.warmup, repeats=settings.repeats)
    inputs = example_inputs(model, settings.forward_batch_size)
    with torch.no_grad():
        forward_memory = peak_memory_bytes(lambda: model(*inputs), device)
    sampling_s = median_call_seconds(lambda: sample(batch), device, settings.warmup, settings.repeats)
    latency_s = median_call_seconds(lambda: sample(range(1)), device, settings.warmup, settings.repeats)
    memory = peak_memory_bytes(lambda: sample(batch), device)
    return {
        "gflops": count_gflops(model),
        "params_m": count_parameters(model) / 1e6,
        "size_bytes": saved_size_bytes(model),
        "forward_images_per_s": settings.forward_batch_size / forward_s,
        "sampling_images_per_s": settings.batch_size / sampling_s,
        "latency_s": latency_s,
        "peak_memory_bytes": memory,
        "forward_peak_memory_bytes": forward_memory,
        "dtype": str(model.dtype).replace("torch.", ""),
        "speed_settings": asdict(settings),
    }

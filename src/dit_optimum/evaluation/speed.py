"""Wall-clock timing of one transformer forward: warm-up, then the median of repeated runs."""

from __future__ import annotations

import statistics
import time

import torch
from torch import nn


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_forward(
    model: nn.Module,
    batch_size: int = 8,
    sample_size: int | None = None,
    warmup: int = 2,
    repeats: int = 5,
) -> float:
    """Median seconds of one forward of ``model`` on a random batch (inference mode, device synchronised)."""
    if warmup < 0 or repeats < 1:
        raise ValueError(f"`warmup` must be >= 0 and `repeats` >= 1, got warmup={warmup}, repeats={repeats}.")
    config = model.config
    side = sample_size or config.sample_size
    parameter = next(model.parameters())
    sample = torch.randn(batch_size, config.in_channels, side, side, device=parameter.device, dtype=parameter.dtype)
    timestep = torch.full((batch_size,), 500, device=parameter.device, dtype=torch.long)
    labels = torch.zeros(batch_size, device=parameter.device, dtype=torch.long)
    times = []
    with torch.inference_mode():
        for index in range(warmup + repeats):
            _synchronize(parameter.device)
            start = time.perf_counter()
            model(sample, timestep=timestep, class_labels=labels)
            _synchronize(parameter.device)
            if index >= warmup:
                times.append(time.perf_counter() - start)
    return statistics.median(times)

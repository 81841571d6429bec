"""Random model inputs for accounting and timing: a sample batch, a mid-schedule timestep and class 0."""

from __future__ import annotations

import torch
from torch import nn


def example_inputs(model: nn.Module, batch_size: int = 1, sample_size: int | None = None) -> tuple[torch.Tensor, ...]:
    """``(sample, timestep, class_labels)`` on the model's device and dtype; ``sample_size`` defaults to the config."""
    config = model.config
    side = sample_size or config.sample_size
    parameter = next(model.parameters())
    sample = torch.randn(batch_size, config.in_channels, side, side, device=parameter.device, dtype=parameter.dtype)
    timestep = torch.full((batch_size,), 500, device=parameter.device, dtype=torch.long)
    labels = torch.zeros(batch_size, device=parameter.device, dtype=torch.long)
    return sample, timestep, labels

"""Exponential moving average of model weights (the weights DiT samples with)."""

from __future__ import annotations

import copy

import torch
from torch import nn


class EMA:
    """``shadow = decay * shadow + (1 - decay) * weights`` after every optimizer step; checkpointable."""

    def __init__(self, model: nn.Module, decay: float = 0.9999):
        if not 0 <= decay < 1:
            raise ValueError(f"`decay`={decay!r} must lie in [0, 1).")
        self.decay = decay
        self.model = copy.deepcopy(model).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        for shadow, weight in zip(self.model.parameters(), model.parameters()):
            shadow.lerp_(weight.detach().to(shadow.dtype), 1 - self.decay)
        for shadow, buffer in zip(self.model.buffers(), model.buffers()):
            shadow.copy_(buffer)

    def state_dict(self) -> dict:
        return {"decay": self.decay, "model": self.model.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.decay = state["decay"]
        self.model.load_state_dict(state["model"])

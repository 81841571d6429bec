"""Exponential moving average of model weights (the weights DiT samples with)."""

from __future__ import annotations

import copy

import torch
from torch import nn

from ..errors import DiTOptimumError
from ..utils import check_number, is_integer


class EMA:
    """``shadow = d * shadow + (1 - d) * weights`` after every optimizer step; checkpointable.

    With ``warmup`` the decay is ``min(decay, (1 + n) / (10 + n))`` at update n, so short runs are not dominated by
    the random initial weights (at DiT's 0.9999, 20% of the initial weights would remain after 16K steps).
    """

    def __init__(self, model: nn.Module, decay: float = 0.9999, warmup: bool = True):
        check_number("decay", decay, 0, 1, include_maximum=False)
        self.decay, self.warmup, self.updates = decay, warmup, 0
        self.model = copy.deepcopy(model).eval().requires_grad_(False)

    def current_decay(self) -> float:
        return min(self.decay, (1 + self.updates) / (10 + self.updates)) if self.warmup else self.decay

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        decay = self.current_decay()
        for shadow, weight in zip(self.model.parameters(), model.parameters()):
            shadow.lerp_(weight.detach().to(shadow.dtype), 1 - decay)
        for shadow, buffer in zip(self.model.buffers(), model.buffers()):
            shadow.copy_(buffer)
        self.updates += 1

    def state_dict(self) -> dict:
        """The counters (plain numbers, JSON-safe) and, under ``"model"``, the averaged weights."""
        return {"decay": self.decay, "warmup": self.warmup, "updates": self.updates, "model": self.model.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        """Restore a ``state_dict``; counters of the wrong type or range are refused, naming them."""
        check_number("decay", state["decay"], 0, 1, include_maximum=False)
        if not isinstance(state["warmup"], bool):
            raise DiTOptimumError(f"`warmup`={state['warmup']!r} must be True or False.")
        if not is_integer(state["updates"]) or state["updates"] < 0:
            raise DiTOptimumError(f"`updates`={state['updates']!r} must be an integer >= 0.")
        self.model.load_state_dict(state["model"])
        self.decay, self.warmup, self.updates = state["decay"], state["warmup"], state["updates"]

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
        self._tracked: nn.Module | None = None

    def current_decay(self) -> float:
        return min(self.decay, (1 + self.updates) / (10 + self.updates)) if self.warmup else self.decay

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """One averaging step: a single foreach lerp over all weights and one foreach copy of the buffers."""
        if self._tracked is not model:  # the tensor lists are gathered once per tracked model, not every step
            self._tracked = model
            self._shadows = [*self.model.parameters()], [*self.model.buffers()]
            self._sources = [*model.parameters()], [*model.buffers()]  # read under no_grad, in place
        (shadows, shadow_buffers), (weights, buffers) = self._shadows, self._sources
        if any(shadow.dtype != weight.dtype for shadow, weight in zip(shadows, weights)):
            weights = [weight.to(shadow.dtype) for shadow, weight in zip(shadows, weights)]
        torch._foreach_lerp_(shadows, weights, 1 - self.current_decay())
        if shadow_buffers:
            torch._foreach_copy_(shadow_buffers, buffers)
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

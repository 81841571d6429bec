"""A per-step, per-block reuse schedule (Learning-to-Cache style) as a diffusers ``ModelHook`` on each DiT block.

At a step the schedule marks, a block skips its computation and adds the residual (output minus input) it computed
at the last step it ran. The schedule is part of the model's config (``block_cache_schedule``), so a saved pipeline
reloads with it. A pipeline that sets no cache context (diffusers' stock ``DiTPipeline``) runs every block.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from diffusers.hooks import HookRegistry
from diffusers.hooks.hooks import BaseState, ModelHook, StateManager

from ..errors import DiTOptimumError

BLOCK_SCHEDULE_HOOK = "dit_optimum_block_schedule"


@dataclass(frozen=True)
class BlockCacheSchedule:
    """``reuse[s]`` lists the blocks that reuse their last residual at denoising step ``s`` of
    ``num_inference_steps``; a run with another step count maps each step to the nearest scheduled one."""

    num_inference_steps: int
    reuse: tuple[tuple[int, ...], ...]

    @classmethod
    def from_dict(cls, data: Any, num_layers: int | None = None) -> BlockCacheSchedule:
        """Read (and check) the form saved in a model config: ``{"num_inference_steps": S, "reuse": [[...], ...]}``."""
        if not isinstance(data, dict) or set(data) != {"num_inference_steps", "reuse"}:
            raise DiTOptimumError(
                f"`block_cache_schedule` must be a mapping with keys num_inference_steps and reuse, got {data!r}."
            )
        steps, reuse = data["num_inference_steps"], data["reuse"]
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise DiTOptimumError(f"`block_cache_schedule.num_inference_steps`={steps!r} must be a positive integer.")
        if not isinstance(reuse, (list, tuple)) or len(reuse) != steps:
            raise DiTOptimumError(f"`block_cache_schedule.reuse` must list the reused blocks of each of {steps} steps.")
        highest = (num_layers - 1) if num_layers is not None else None
        rows = []
        for step, blocks in enumerate(reuse):
            valid = isinstance(blocks, (list, tuple)) and all(
                isinstance(b, int) and not isinstance(b, bool) and b >= 0 and (highest is None or b <= highest)
                for b in blocks
            )
            if not valid:
                allowed = f"block indices 0..{highest}" if highest is not None else "block indices"
                raise DiTOptimumError(f"`block_cache_schedule.reuse[{step}]`={blocks!r} must list {allowed}.")
            rows.append(tuple(sorted(set(blocks))))
        if rows[0]:
            raise DiTOptimumError("`block_cache_schedule.reuse[0]` must be empty: the first step has nothing to reuse.")
        return cls(steps, tuple(rows))

    def to_dict(self) -> dict[str, Any]:
        return {"num_inference_steps": self.num_inference_steps, "reuse": [list(row) for row in self.reuse]}

    def reused_at(self, step_index: int, num_inference_steps: int | None) -> tuple[int, ...]:
        """Blocks reused at ``step_index`` of a run of ``num_inference_steps`` (nearest scheduled step)."""
        total = num_inference_steps or self.num_inference_steps
        if total <= 1 or step_index <= 0:
            return ()
        scheduled = round(step_index * (self.num_inference_steps - 1) / (total - 1))
        return self.reuse[min(max(scheduled, 1), self.num_inference_steps - 1)]

    def reuse_fraction(self, num_blocks: int) -> float:
        """Fraction of a ``num_blocks`` model's block computations after the first step that the schedule skips."""
        return sum(len(row) for row in self.reuse) / max(1, (self.num_inference_steps - 1) * num_blocks)


class _ResidualState(BaseState):
    def __init__(self) -> None:
        self.residual: torch.Tensor | None = None

    def reset(self) -> None:
        self.residual = None


class BlockScheduleHook(ModelHook):
    """Runs one block, or reuses its last residual when the schedule says so at the current step."""

    _is_stateful = True

    def __init__(self, schedule: BlockCacheSchedule, index: int):
        super().__init__()
        self.schedule, self.index = schedule, index
        self.state_manager = StateManager(_ResidualState)

    def new_forward(self, module: torch.nn.Module, hidden_states: torch.Tensor, *args: Any, **kwargs: Any):
        context = self.state_manager._context
        if context is None or context.step_index is None:  # no denoising loop around this call: compute
            return self.fn_ref.original_forward(hidden_states, *args, **kwargs)
        state = self.state_manager.get_state()
        reuse = self.index in self.schedule.reused_at(context.step_index, context.num_inference_steps)
        if reuse and state.residual is not None and state.residual.shape == hidden_states.shape:
            return hidden_states + state.residual
        output = self.fn_ref.original_forward(hidden_states, *args, **kwargs)
        state.residual = output - hidden_states
        return output

    def reset_state(self, module: torch.nn.Module) -> torch.nn.Module:
        self.state_manager.reset()
        return module


def apply_block_schedule(blocks: Sequence[torch.nn.Module], schedule: BlockCacheSchedule) -> None:
    """Register the schedule's hook on each block (a block the schedule never reuses gets none)."""
    reused = {index for row in schedule.reuse for index in row}
    for index, block in enumerate(blocks):
        if index in reused:
            HookRegistry.check_if_exists_or_initialize(block).register_hook(
                BlockScheduleHook(schedule, index), BLOCK_SCHEDULE_HOOK
            )

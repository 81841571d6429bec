"""Mixture-of-Experts feed-forward: top-k token-choice routing, capacity, balance and z losses, routing statistics.

Dispatch sorts the (token, expert) assignments by expert and scatters them into fixed-capacity expert slots, so
every expert runs as one batched matmul: no Python loop over tokens, no host synchronisation in the forward.
Assignments beyond an expert's capacity are dropped (their token keeps its residual and any shared expert).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from diffusers.models.attention import FeedForward
from torch import nn


def switch_balance_loss(router_probs: torch.Tensor, expert_index: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Switch Transformer balance loss without its weight: ``E * sum_i f_i * P_i``.

    ``f_i``: fraction of (token, choice) assignments sent to expert i; ``P_i``: mean router probability of
    expert i over tokens. Equals 1 for perfectly uniform routing. router_probs (T, E), expert_index (T, k).
    """
    counts = torch.zeros(num_experts, device=router_probs.device, dtype=router_probs.dtype)
    counts = counts.index_add(
        0, expert_index.reshape(-1), torch.ones_like(expert_index.reshape(-1), dtype=counts.dtype)
    )
    # max(1, ...): no tokens route nothing and cost nothing (0, not 0/0)
    fraction = counts / max(1, expert_index.numel())
    return num_experts * torch.sum(fraction * router_probs.sum(dim=0) / max(1, len(router_probs)))


def router_z_loss(logits: torch.Tensor) -> torch.Tensor:
    """ST-MoE router z-loss: mean squared log-sum-exp of the router logits (keeps logits small)."""
    return torch.logsumexp(logits, dim=-1).pow(2).sum() / max(1, len(logits))  # no tokens: 0, not 0/0


class MoEFeedForward(nn.Module):
    """E experts (GELU-tanh MLPs, weights stacked for batched matmuls), a softmax router and optional shared experts.

    After each forward, ``aux_loss`` holds the weighted balance + z loss (add it to the training loss) and
    ``last_stats`` the routing statistics of that batch as tensors; ``routing_counts`` (a saved buffer) accumulates
    assignments per expert during training.
    """

    def __init__(
        self,
        dim: int,
        num_experts: int,
        expert_dim: int,
        top_k: int = 2,
        num_shared_experts: int = 0,
        capacity_factor: float = 1.25,
        balance_loss_weight: float = 0.01,
        router_z_loss_weight: float = 0.0,
    ):
        super().__init__()
        self.num_experts, self.top_k, self.capacity_factor = num_experts, top_k, capacity_factor
        self.balance_loss_weight, self.router_z_loss_weight = balance_loss_weight, router_z_loss_weight
        self.router = nn.Linear(dim, num_experts, bias=False)
        scale = 1 / math.sqrt(dim)
        self.w_in = nn.Parameter(torch.empty(num_experts, dim, expert_dim).uniform_(-scale, scale))
        self.b_in = nn.Parameter(torch.zeros(num_experts, expert_dim))
        scale = 1 / math.sqrt(expert_dim)
        self.w_out = nn.Parameter(torch.empty(num_experts, expert_dim, dim).uniform_(-scale, scale))
        self.b_out = nn.Parameter(torch.zeros(num_experts, dim))
        self.shared = (
            FeedForward(dim, activation_fn="gelu-approximate", inner_dim=expert_dim * num_shared_experts)
            if num_shared_experts > 0
            else None
        )
        self.register_buffer("routing_counts", torch.zeros(num_experts), persistent=True)
        self.aux_loss: torch.Tensor | None = None
        self.last_stats: dict[str, torch.Tensor] = {}

    def capacity(self, num_tokens: int) -> int:
        """Slots per expert for a batch of ``num_tokens`` tokens: at most ``num_tokens`` (a token picks an expert at
        most once, so more slots would stay empty; a huge factor neither allocates them nor overflows)."""
        if self.capacity_factor * self.top_k >= self.num_experts:  # every assignment fits
            return max(1, num_tokens)
        return max(1, min(num_tokens, math.ceil(self.capacity_factor * num_tokens * self.top_k / self.num_experts)))

    def experts(self, slots: torch.Tensor) -> torch.Tensor:
        # slots: (E, C, D) -> (E, C, D), every expert at once
        # bmm + broadcast add: baddbmm would first materialise the bias expanded to (E, C, H).
        hidden = F.gelu(torch.bmm(slots, self.w_in) + self.b_in.unsqueeze(1), approximate="tanh")
        return torch.bmm(hidden, self.w_out) + self.b_out.unsqueeze(1)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        # hidden_states: (B, N, D) -> (B, N, D)
        shape = hidden_states.shape
        tokens = hidden_states.reshape(-1, shape[-1])  # (T, D)
        num_tokens, experts, k = tokens.shape[0], self.num_experts, self.top_k
        logits = self.router(tokens).float()  # (T, E)
        probs = logits.softmax(dim=-1)
        gate, expert_index = probs.topk(k, dim=-1)  # (T, k)
        if k > 1:
            gate = gate / gate.sum(dim=-1, keepdim=True)

        # Sort the T*k assignments by expert (stable: earlier tokens get the slots first).
        flat_expert = expert_index.reshape(-1)
        order = torch.argsort(flat_expert, stable=True)
        sorted_expert = flat_expert[order]
        counts = torch.bincount(flat_expert, minlength=experts)
        starts = torch.cumsum(counts, 0) - counts
        position = torch.arange(order.numel(), device=tokens.device) - starts[sorted_expert]
        capacity = self.capacity(num_tokens)
        kept = position < capacity
        dummy = experts * capacity  # dropped assignments land in one extra slot that is ignored
        slot = torch.where(kept, sorted_expert * capacity + position, torch.full_like(position, dummy))
        source_token = order // k
        buffer = tokens.new_zeros(dummy + 1, shape[-1]).index_copy(0, slot, tokens[source_token])
        expert_out = self.experts(buffer[:dummy].view(experts, capacity, -1)).reshape(dummy, -1)
        # Dropped assignments read any valid row and get weight 0.
        weights = gate.reshape(-1)[order].to(tokens.dtype) * kept.to(tokens.dtype)
        gathered = expert_out.index_select(0, slot.clamp(max=dummy - 1)) * weights[:, None]
        # under autocast the experts' matmuls may return another dtype than the tokens: sum in theirs, then cast
        output = gathered.new_zeros(tokens.shape).index_add(0, source_token, gathered)
        if self.shared is not None:
            output = output + self.shared(tokens)
        output = output.to(tokens.dtype)

        balance = switch_balance_loss(probs, expert_index, experts)
        self.aux_loss = self.balance_loss_weight * balance + self.router_z_loss_weight * router_z_loss(logits)
        load = counts.float() / max(1, flat_expert.numel())  # no tokens: zero load, nothing dropped (not NaN)
        self.last_stats = {
            "load": load,
            "load_entropy": (-load * torch.log(load.clamp_min(1e-12))).sum(),
            "max_over_mean_load": load.max() * experts,
            "dropped_fraction": (~kept).float().sum() / max(1, kept.numel()),
            "balance_loss": balance.detach(),
        }
        if self.training:
            self.routing_counts += counts.to(self.routing_counts.dtype)
        return output.reshape(shape)

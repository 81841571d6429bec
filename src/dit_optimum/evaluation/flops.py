"""Parameter and FLOP accounting in the DiT paper's convention (multiply-accumulates per image per forward)."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from ..models.runtimes import paused
from ..models.transformer import is_quantized, outside_sampling
from .inputs import example_inputs

_PROJECTIONS = ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0")


def count_parameters(model: nn.Module) -> int:
    """Number of parameters (buffers such as the fixed positional embedding excluded)."""
    return sum(parameter.numel() for parameter in model.parameters())


def _float_twin(model: nn.Module) -> nn.Module:
    # Quantized linears hide their matmuls from the FLOP counter; MACs do not depend on the number format, so a
    # freshly initialised float model of the same config (widths, depth, attention, experts) is counted instead.
    config = {key: value for key, value in model.config.items() if key != "quantization_config"}
    return type(model).from_config(config).eval()


def gflops_breakdown(model: nn.Module, sample_size: int | None = None, batch_size: int = 1) -> dict[str, float]:
    """GMACs per image of one forward: ``total``, ``attention`` (attention modules) and ``attention_core``.

    ``attention_core`` is the attention maths without the q/k/v/out projections. Counting runs under the math
    SDPA backend: the fused CPU kernel is invisible to ``torch.utils.flop_counter``. That counter reports 2 FLOPs
    per MAC; values here are divided by two (DiT-S/2 at 32x32x4: 6.06). Quantized models count as their float
    architecture.
    """
    if is_quantized(model):
        model = _float_twin(model)
    sample, timestep, labels = example_inputs(model, batch_size, sample_size)
    counter = FlopCounterMode(display=False)
    # torch's forward (an exported runtime's graph is invisible to the counter; it computes the same operations)
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), counter, outside_sampling(model), paused(model):
        model(sample, timestep=timestep, class_labels=labels)
    per_module = {name: sum(counts.values()) for name, counts in counter.get_flop_counts().items()}
    attention = projections = 0
    for name, flops in per_module.items():
        if name.endswith(".attn1"):
            attention += flops
        elif name.endswith(_PROJECTIONS):
            projections += flops
    scale = 2 * 1e9 * batch_size
    return {
        "total": counter.get_total_flops() / scale,
        "attention": attention / scale,
        "attention_core": (attention - projections) / scale,
    }


def count_gflops(model: nn.Module, sample_size: int | None = None) -> float:
    """GMACs per image of one transformer forward, attention matmuls included (DiT paper convention)."""
    return gflops_breakdown(model, sample_size)["total"]

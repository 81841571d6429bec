"""Mixture of experts: dispatch against a dense masked reference, capacity drops, losses, statistics, model wiring."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from conftest import model_inputs, tiny_config, tiny_model
from dit_optimum import DiTOptimumTransformer2DModel, prune
from dit_optimum.models.moe import MoEFeedForward, router_z_loss, switch_balance_loss


def make_moe(seed=0, **kwargs) -> MoEFeedForward:
    torch.manual_seed(seed)
    options = {"num_experts": 4, "expert_dim": 16, "top_k": 2, "capacity_factor": 4.0, **kwargs}
    moe = MoEFeedForward(32, **options)
    with torch.no_grad():
        for parameter in moe.parameters():
            parameter.normal_(0, 0.3)
    return moe


def dense_reference(moe: MoEFeedForward, x: torch.Tensor, capacity: int | None = None) -> torch.Tensor:
    """Every expert applied to every token, combined with top-k masks (and, with capacity, first-come slots)."""
    tokens = x.reshape(-1, x.shape[-1])
    probs = moe.router(tokens).float().softmax(-1)
    gate, index = probs.topk(moe.top_k, dim=-1)
    gate = gate / gate.sum(-1, keepdim=True) if moe.top_k > 1 else gate
    all_outputs = torch.stack(
        [
            F.gelu(tokens @ moe.w_in[e] + moe.b_in[e], approximate="tanh") @ moe.w_out[e] + moe.b_out[e]
            for e in range(moe.num_experts)
        ],
        dim=1,
    )  # (T, E, D)
    weights = torch.zeros(tokens.shape[0], moe.num_experts)
    used = [0] * moe.num_experts
    for token in range(tokens.shape[0]):
        for choice in range(moe.top_k):
            expert = int(index[token, choice])
            if capacity is None or used[expert] < capacity:
                weights[token, expert] += gate[token, choice]
            used[expert] += 1
    # assignments are served in token order within each expert (argsort is stable over token-major order)
    out = (all_outputs * weights[:, :, None]).sum(1)
    if moe.shared is not None:
        out = out + moe.shared(tokens)
    return out.reshape(x.shape)


@pytest.mark.parametrize(("top_k", "shared"), [(1, 0), (2, 0), (2, 1), (4, 0)])
def test_dispatch_equals_dense_masked_reference(top_k, shared):
    moe = make_moe(top_k=top_k, num_shared_experts=shared, capacity_factor=4.0 / top_k * 4)
    x = torch.randn(2, 9, 32, generator=torch.Generator().manual_seed(1))
    output = moe(x)
    torch.testing.assert_close(output, dense_reference(moe, x), rtol=1e-5, atol=1e-5)
    assert moe.last_stats["dropped_fraction"].item() == 0
    output.sum().backward()
    assert moe.w_in.grad is not None and moe.router.weight.grad is not None


def test_capacity_drops_late_assignments_like_the_reference():
    moe = make_moe(top_k=1, capacity_factor=0.5)
    x = torch.randn(1, 16, 32, generator=torch.Generator().manual_seed(2))
    capacity = moe.capacity(16)
    assert capacity == 2
    output = moe(x)
    torch.testing.assert_close(output, dense_reference(moe, x, capacity=capacity), rtol=1e-5, atol=1e-5)
    dropped = moe.last_stats["dropped_fraction"].item()
    assert dropped == pytest.approx(1 - min(16, capacity * 4) / 16, abs=0.5) and dropped > 0


def test_balance_loss_has_the_published_values():
    experts = 4
    uniform_probs = torch.full((8, experts), 1 / experts)
    round_robin = torch.arange(8).remainder(experts)[:, None]
    assert switch_balance_loss(uniform_probs, round_robin, experts).item() == pytest.approx(1.0)
    collapsed_probs = torch.zeros(8, experts)
    collapsed_probs[:, 0] = 1
    assert switch_balance_loss(collapsed_probs, torch.zeros(8, 1, dtype=torch.long), experts).item() == pytest.approx(
        4.0
    )
    # f = (0.5, 0.5, 0, 0), P = (0.25, 0.25, 0.25, 0.25): 4 * (0.125 + 0.125) = 1
    half = torch.tensor([0, 1] * 4)[:, None]
    assert switch_balance_loss(uniform_probs, half, experts).item() == pytest.approx(1.0)
    logits = torch.zeros(3, experts)
    assert router_z_loss(logits).item() == pytest.approx(math.log(experts) ** 2)


def test_aux_loss_and_statistics():
    moe = make_moe(balance_loss_weight=0.01, router_z_loss_weight=0.001)
    moe.train()
    x = torch.randn(2, 8, 32)
    moe(x)
    stats = moe.last_stats
    assert stats["load"].sum().item() == pytest.approx(1.0)
    assert stats["max_over_mean_load"].item() >= 1.0
    assert 0 <= stats["load_entropy"].item() <= math.log(4) + 1e-6
    expected = 0.01 * stats["balance_loss"] + 0.001 * router_z_loss(moe.router(x.reshape(-1, 32)).float())
    torch.testing.assert_close(moe.aux_loss, expected)
    assert moe.routing_counts.sum().item() == 2 * 8 * 2


def test_moe_transformer_runs_saves_and_reports(tmp_path):
    model = tiny_model(moe_num_experts=4, moe_top_k=2, moe_every=2, num_layers=4)
    assert [model.is_moe_layer(i) for i in range(4)] == [False, True, False, True]
    inputs = model_inputs(model)
    with torch.no_grad():
        out = model(*inputs).sample
    assert out.shape == (3, 8, 8, 8) and model.moe_aux_loss().item() > 0
    assert set(model.routing_statistics()) == {"block_1", "block_3"}
    model.save_pretrained(tmp_path)
    reloaded = DiTOptimumTransformer2DModel.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        assert torch.equal(reloaded(*inputs).sample, out)
    dense = tiny_model()
    assert dense.moe_aux_loss().item() == 0 and dense.routing_statistics() == {}
    assert set(tiny_model(moe_num_experts=2).routing_statistics()["block_0"]) == {"cumulative_load"}
    pruned = prune(model, heads=0.5, depth=0.25)
    assert pruned.config.moe_num_experts == 4
    with pytest.raises(ValueError, match="MoE"):
        prune(model, mlp=0.5)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"moe_num_experts": -1}, "moe_num_experts"),
        ({"moe_num_experts": 4, "moe_top_k": 5}, r"moe_top_k.*1\.\.4"),
        ({"moe_num_experts": 4, "moe_capacity_factor": 0}, "moe_capacity_factor"),
        ({"moe_num_experts": 4, "moe_every": 3}, r"moe_every.*1\.\.2"),
        ({"moe_num_experts": 4, "moe_balance_loss_weight": -1}, "moe_balance_loss_weight"),
        ({"moe_num_experts": 4, "layer_mlp_dims": [8, 8]}, "layer_mlp_dims"),
    ],
)
def test_bad_moe_configs(overrides, message):
    with pytest.raises(ValueError, match=message):
        DiTOptimumTransformer2DModel(**tiny_config(**overrides))


def test_moe_trains_under_bf16_autocast_on_cpu():
    """As the trainer's bf16 step runs it: a DiT with MoE blocks, forward and backward under CPU autocast."""
    from conftest import model_inputs, tiny_model

    model = tiny_model(moe_num_experts=4, moe_top_k=2, moe_num_shared_experts=1).train()
    sample, timestep, labels = model_inputs(model)
    reference = model(sample, timestep, labels).sample
    with torch.autocast("cpu", dtype=torch.bfloat16):
        output = model(sample, timestep, labels).sample
        loss = output.float().pow(2).mean() + model.moe_aux_loss()
    assert output.shape == reference.shape
    # bf16 may flip a few top-k choices (large weights here): close on average, not everywhere
    assert (output.float() - reference).abs().mean() < 0.1 * reference.abs().mean()
    loss.backward()
    gradient = model.transformer_blocks[0].ff.w_in.grad
    assert gradient is not None and torch.isfinite(gradient).all()

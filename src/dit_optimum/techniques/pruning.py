"""Structured pruning of DiT: attention heads, MLP width and whole blocks, really removed (no masks).

The pruned model is rebuilt from its config (``num_layers``, ``layer_heads``, ``layer_mlp_dims``) and loaded
strictly from the sliced weights, so ``from_pretrained`` reconstructs it exactly. Slicing is done here rather
than with Torch-Pruning: DiT's groups (q/k/v rows + output columns per head, fc1 rows + fc2 columns per unit,
depthwise-conv channels per head) are few and fixed, and a strict reload proves the result consistent.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler

from ..errors import DiTOptimumError
from ..models.attention import GROUPED_TYPES, SINGLE_KV_TYPES
from ..models.moe import MoEFeedForward
from ..models.resources import check_resources
from ..models.transformer import DiTOptimumTransformer2DModel
from ..pipelines.dit import DiTOptimumPipeline
from .common import rewrap, unwrap

logger = logging.getLogger(__name__)

IMPORTANCE_CRITERIA: tuple[str, ...] = ("l1", "l2", "taylor", "random")
SCOPES: tuple[str, ...] = ("layer", "global")


def _check_ratio(name: str, value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
        raise DiTOptimumError(f"`{name}`={value!r} must be a fraction in [0, 1).")


# Rows of `data` checked for finite values at a time (an expanded tensor is never materialised whole).
_CHECK_ROWS = 4096


def _check_taylor_inputs(
    model: DiTOptimumTransformer2DModel, importance: str, data: torch.Tensor | None, labels: torch.Tensor | None
) -> None:
    """``data`` / ``labels`` as the Taylor criterion reads them, else an error naming the parameter and what is
    allowed: float latents (N, in_channels, sample_size, sample_size) of finite values, with N class indices."""
    if data is None and labels is None:
        return
    if importance != "taylor":
        raise DiTOptimumError(
            f"`data` / `labels` only feed importance='taylor' (got `importance`={importance!r}); leave them out."
        )
    if data is None or labels is None:
        missing = "labels" if data is not None else "data"
        raise DiTOptimumError(f"`{missing}` is missing: importance='taylor' with data needs both `data` and `labels`.")
    config = model.config
    shape = (config.in_channels, config.sample_size, config.sample_size)
    expected = f"(N, {', '.join(map(str, shape))}) with N >= 1"
    if not isinstance(data, torch.Tensor) or not data.is_floating_point():
        kind = f"a {data.dtype} tensor" if isinstance(data, torch.Tensor) else type(data).__name__
        raise DiTOptimumError(f"`data` must be a float tensor of latents {expected}, got {kind}.")
    if data.dim() != 4 or tuple(data.shape[1:]) != shape or len(data) < 1:
        raise DiTOptimumError(
            f"`data` has shape {tuple(data.shape)}; the model takes latents {expected} (in_channels, sample_size)."
        )
    if data.device.type == "meta" or not all(torch.isfinite(rows).all() for rows in data.split(_CHECK_ROWS)):
        raise DiTOptimumError(
            "`data` holds NaN or infinite values (or no values: a meta tensor): the Taylor scores would be NaN and "
            "the heads removed arbitrary; give finite latents."
        )
    classes = config.num_embeds_ada_norm
    if not isinstance(labels, torch.Tensor) or labels.dtype.is_floating_point or labels.dtype.is_complex:
        kind = f"a {labels.dtype} tensor" if isinstance(labels, torch.Tensor) else type(labels).__name__
        raise DiTOptimumError(f"`labels` must be an integer tensor of {len(data)} class indices, got {kind}.")
    if labels.dtype == torch.bool or labels.dim() != 1 or len(labels) != len(data) or labels.device.type == "meta":
        raise DiTOptimumError(
            f"`labels` has shape {tuple(labels.shape)} ({labels.dtype}); it must hold one integer class index per "
            f"`data` row: shape ({len(data)},)."
        )
    low, high = int(labels.min()), int(labels.max())
    if low < 0 or high >= classes:
        raise DiTOptimumError(
            f"`labels` holds {low if low < 0 else high}; allowed values: 0..{classes - 1} (the model's classes)."
        )


def _check_scores(scores: dict[str, list[torch.Tensor] | torch.Tensor], importance: str) -> None:
    # a NaN score ranks arbitrarily: the groups removed would be arbitrary
    tensors = [*scores["heads"], *scores["mlp"], scores["blocks"]]
    if not all(torch.isfinite(tensor).all() for tensor in tensors):
        cause = "gradients (the data or the loss)" if importance == "taylor" else "weights"
        raise DiTOptimumError(
            f"`importance`={importance!r} gives NaN or infinite scores: the model's {cause} are not finite, so "
            "which groups to remove is undefined; check the model's weights (and `data`), or use another criterion "
            f"({', '.join(IMPORTANCE_CRITERIA)})."
        )


def _group_norm(weights: Sequence[torch.Tensor], groups: int, order: int) -> torch.Tensor:
    # Each tensor: (groups * width, ...) along dim 0 -> per-group norm of all its entries, summed over tensors.
    total = torch.zeros(groups)  # scores live on the CPU whatever the model's device
    for tensor in weights:
        per_group = tensor.detach().float().reshape(groups, -1)
        total += (per_group.abs().sum(1) if order == 1 else per_group.pow(2).sum(1)).cpu()
    return total if order == 1 else total.sqrt()


def head_units(attn) -> tuple[int, bool]:
    """(prunable head units of an attention module, whether its K/V rows are pruned with them).

    A unit is one query head, or for grouped attention one K/V head with its query heads; a single K/V head
    shared by all query heads (multi-query) is kept whole.
    """
    if attn.attention_type in GROUPED_TYPES:
        return attn.kv_heads, True
    return attn.heads, attn.attention_type not in SINGLE_KV_TYPES


def _block_tensors(block) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """(head-unit-grouped tensors, MLP-unit-grouped tensors) of one block, each with the group along dim 0."""
    attn = block.attn1
    head_tensors = [attn.to_q.weight, attn.to_out[0].weight.t()]
    head_tensors += [attn.to_q.bias] if attn.to_q.bias is not None else []
    if head_units(attn)[1]:
        head_tensors += [
            t for t in (attn.to_k.weight, attn.to_v.weight, attn.to_k.bias, attn.to_v.bias) if t is not None
        ]
    if isinstance(block.ff, MoEFeedForward):
        return head_tensors, []
    fc1, fc2 = block.ff.net[0].proj, block.ff.net[2]
    unit_tensors = [fc1.weight, fc1.bias, fc2.weight.t()]
    return head_tensors, unit_tensors


def _mlp_units(block) -> int:
    return 0 if isinstance(block.ff, MoEFeedForward) else block.ff.net[2].in_features


def _taylor_gradients(
    model: DiTOptimumTransformer2DModel, data: torch.Tensor | None, labels: torch.Tensor | None, batches: int, seed: int
) -> None:
    """Accumulate gradients of the noise-prediction loss (the DiT training objective) into ``.grad``."""
    config = model.config
    generator = torch.Generator().manual_seed(seed)
    scheduler = DDPMScheduler(num_train_timesteps=1000)
    model.zero_grad(set_to_none=True)
    for _ in range(batches):
        if data is None:
            sample = torch.randn(8, config.in_channels, config.sample_size, config.sample_size, generator=generator)
            label = torch.randint(0, config.num_embeds_ada_norm, (8,), generator=generator)
        else:
            index = torch.randint(0, len(data), (min(8, len(data)),), generator=generator)
            sample, label = data[index], labels[index]
        noise = torch.randn(sample.shape, generator=generator)
        timestep = torch.randint(0, 1000, (len(sample),), generator=generator)
        sample, noise, timestep, label = (v.to(model.device) for v in (sample, noise, timestep, label))
        noisy = scheduler.add_noise(sample, noise, timestep)
        prediction = model(noisy, timestep, label).sample[:, : config.in_channels]
        F.mse_loss(prediction, noise).backward()


def _taylor(tensors: Sequence[torch.Tensor], groups: int) -> torch.Tensor:
    total = torch.zeros(groups)
    for tensor in tensors:
        grad = tensor.grad if tensor.grad is not None else torch.zeros_like(tensor)
        total += (tensor.detach() * grad).abs().float().reshape(groups, -1).sum(1).cpu()
    return total


def _taylor_params(block) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    # Parameters (not transposed views) with their grads, grouped like _block_tensors.
    attn = block.attn1
    head_params = [attn.to_q.weight, attn.to_k.weight, attn.to_v.weight] if head_units(attn)[1] else [attn.to_q.weight]
    if isinstance(block.ff, MoEFeedForward):
        return head_params, []
    return head_params, [block.ff.net[0].proj.weight, block.ff.net[0].proj.bias]


def importance_scores(
    model: DiTOptimumTransformer2DModel,
    importance: str = "l1",
    data: torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
    batches: int = 4,
    seed: int = 0,
) -> dict[str, list[torch.Tensor] | torch.Tensor]:
    """Scores per head (``heads``: one tensor per layer), per MLP unit (``mlp``) and per block (``blocks``).

    ``l1``/``l2``: norms of each group's weights; blocks by the norm of their adaLN gate rows (the gates scale a
    block's residual contribution). ``taylor``: ``|w * dL/dw|`` summed per group, from the noise-prediction loss
    on ``data`` (latents, with ``labels``) or, without data, on Gaussian samples. ``random``: seeded uniform.
    """
    if importance not in IMPORTANCE_CRITERIA:
        raise DiTOptimumError(f"Unknown `importance`={importance!r}; allowed values: {', '.join(IMPORTANCE_CRITERIA)}.")
    check_resources(seed=seed, parameter="seed")
    if isinstance(batches, bool) or not isinstance(batches, int) or not 1 <= batches <= 10_000:
        raise DiTOptimumError(f"`batches`={batches!r} must be an integer in 1..10000.")
    _check_taylor_inputs(model, importance, data, labels)
    scores = _importance_scores(model, importance, data, labels, batches, seed)
    _check_scores(scores, importance)
    return scores


def _importance_scores(
    model: DiTOptimumTransformer2DModel,
    importance: str,
    data: torch.Tensor | None,
    labels: torch.Tensor | None,
    batches: int,
    seed: int,
) -> dict[str, list[torch.Tensor] | torch.Tensor]:
    blocks = model.transformer_blocks
    dim = model.inner_dim
    if importance == "random":
        generator = torch.Generator().manual_seed(seed)
        return {
            "heads": [torch.rand(head_units(b.attn1)[0], generator=generator) for b in blocks],
            "mlp": [torch.rand(_mlp_units(b), generator=generator) for b in blocks],
            "blocks": torch.rand(len(blocks), generator=generator),
        }
    if importance == "taylor":
        with torch.enable_grad():
            _taylor_gradients(model, data, labels, batches, seed)
        heads, units, block_scores = [], [], []
        for block in blocks:
            head_params, unit_params = _taylor_params(block)
            heads.append(_taylor(head_params, head_units(block.attn1)[0]))
            units.append(_taylor(unit_params, _mlp_units(block)))
            block_scores.append(sum(_taylor([p], 1)[0] for p in block.parameters()))
        model.zero_grad(set_to_none=True)
        return {"heads": heads, "mlp": units, "blocks": torch.stack(block_scores)}
    order = 1 if importance == "l1" else 2
    heads, units, block_scores = [], [], []
    for block in blocks:
        head_tensors, unit_tensors = _block_tensors(block)
        heads.append(_group_norm(head_tensors, head_units(block.attn1)[0], order))
        units.append(_group_norm(unit_tensors, _mlp_units(block), order))
        linear = block.norm1.linear  # rows: shift, scale, gate (msa) | shift, scale, gate (mlp)
        gates = torch.cat([linear.weight[2 * dim : 3 * dim], linear.weight[5 * dim :]], 0)
        gate_bias = torch.cat([linear.bias[2 * dim : 3 * dim], linear.bias[5 * dim :]], 0)
        block_scores.append(_group_norm([gates, gate_bias], 1, order)[0])
    return {"heads": heads, "mlp": units, "blocks": torch.stack(block_scores)}


def _select(scores: list[torch.Tensor], ratio: float, scope: str, what: str, layer_names: list[int]) -> list[list[int]]:
    """Indices kept per layer, in their original order."""
    if ratio == 0:
        return [list(range(len(s))) for s in scores]
    total = sum(len(s) for s in scores)
    if (round(ratio * total) if scope == "global" else sum(round(ratio * len(s)) for s in scores)) == 0:
        logger.warning(
            "`%s`=%s removes nothing: the layers have too few %s groups for this fraction.", what, ratio, what
        )
    if scope == "layer":
        kept = []
        for layer, layer_scores in zip(layer_names, scores):
            remove = round(ratio * len(layer_scores))
            if remove >= len(layer_scores):
                raise DiTOptimumError(
                    f"Pruning {what}={ratio} removes every one of the {len(layer_scores)} {what} of layer {layer}; "
                    f"use a smaller `{what}` ratio (below {(len(layer_scores) - 0.5) / len(layer_scores):.3f})."
                )
            order = torch.argsort(layer_scores, descending=True)[: len(layer_scores) - remove]
            kept.append(sorted(order.tolist()))
        return kept
    # global: rank all groups together; each layer keeps at least its best group.
    flat = torch.cat(scores)
    owner = torch.cat([torch.full((len(s),), i) for i, s in enumerate(scores)])
    local = torch.cat([torch.arange(len(s)) for s in scores])
    protected = torch.zeros(len(flat), dtype=torch.bool)
    offset = 0
    for layer_scores in scores:
        protected[offset + int(torch.argmax(layer_scores))] = True
        offset += len(layer_scores)
    remove = min(round(ratio * len(flat)), len(flat) - len(scores))
    candidates = torch.nonzero(~protected).squeeze(1)
    removed = candidates[torch.argsort(flat[candidates])[:remove]]
    keep_mask = torch.ones(len(flat), dtype=torch.bool)
    keep_mask[removed] = False
    return [sorted(local[(owner == i) & keep_mask].tolist()) for i in range(len(scores))]


def _rows(indices: list[int], width: int) -> torch.Tensor:
    return torch.tensor([i * width + j for i in indices for j in range(width)], dtype=torch.long)


def _sliced_state_dict(
    model: DiTOptimumTransformer2DModel,
    kept_blocks: list[int],
    kept_heads: list[list[int]],
    kept_units: list[list[int]],
) -> dict[str, torch.Tensor]:
    state = model.state_dict()
    sliced = {k: v for k, v in state.items() if not k.startswith("transformer_blocks.")}
    for new_index, (old_index, heads, units) in enumerate(zip(kept_blocks, kept_heads, kept_units)):
        old, new = f"transformer_blocks.{old_index}.", f"transformer_blocks.{new_index}."
        attn = model.transformer_blocks[old_index].attn1
        num_units, kv_pruned = head_units(attn)
        heads_pruned = len(heads) < num_units
        query_rows = _rows(heads, attn.to_q.out_features // num_units)
        kv_rows = _rows(heads, attn.to_k.out_features // num_units) if kv_pruned else None
        unit_rows = torch.tensor(units, dtype=torch.long)
        for key, tensor in state.items():
            if not key.startswith(old):
                continue
            name = key[len(old) :]
            query_rows, unit_rows = query_rows.to(tensor.device), unit_rows.to(tensor.device)
            kv_rows = None if kv_rows is None else kv_rows.to(tensor.device)
            if heads_pruned and name.startswith("attn1.to_q."):
                tensor = tensor.index_select(0, query_rows)
            elif heads_pruned and name == "attn1.to_out.0.weight":
                tensor = tensor.index_select(1, query_rows)
            elif heads_pruned and kv_pruned and name.startswith(("attn1.to_k.", "attn1.to_v.", "attn1.dwconv.conv.")):
                tensor = tensor.index_select(0, kv_rows)
            elif name.startswith("ff.net.0.proj."):
                tensor = tensor.index_select(0, unit_rows)
            elif name == "ff.net.2.weight":
                tensor = tensor.index_select(1, unit_rows)
            sliced[new + name] = tensor.clone()
    return sliced


def prune(
    pipe_or_model: DiTOptimumPipeline | DiTOptimumTransformer2DModel,
    heads: float = 0.0,
    mlp: float = 0.0,
    depth: float = 0.0,
    importance: str = "l1",
    scope: str = "layer",
    data: torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
    seed: int = 0,
) -> DiTOptimumPipeline | DiTOptimumTransformer2DModel:
    """Remove a fraction of attention heads, MLP units and blocks; returns a new, smaller pipeline or model.

    ``scope="layer"`` prunes the same fraction in every block; ``"global"`` ranks groups across blocks (each
    block keeps at least one head and one unit). ``depth`` drops whole blocks by block importance. ``data`` /
    ``labels`` feed the Taylor criterion. Scores come from the unpruned model; the input is left unchanged.
    """
    for name, value in (("heads", heads), ("mlp", mlp), ("depth", depth)):
        _check_ratio(name, value)
    if scope not in SCOPES:
        raise DiTOptimumError(f"Unknown `scope`={scope!r}; allowed values: {', '.join(SCOPES)}.")
    if importance not in IMPORTANCE_CRITERIA:
        raise DiTOptimumError(f"Unknown `importance`={importance!r}; allowed values: {', '.join(IMPORTANCE_CRITERIA)}.")
    check_resources(seed=seed, parameter="seed")
    model = unwrap(pipe_or_model)
    _check_taylor_inputs(model, importance, data, labels)  # before the model is copied
    model.check_unfused("pruning")
    is_moe = model.config.moe_num_experts > 0
    if is_moe and mlp > 0:
        raise DiTOptimumError(
            "`mlp` pruning does not apply to MoE models (`moe_num_experts` > 0); prune `heads` or `depth`."
        )
    importance_scores_ = importance_scores(copy.deepcopy(model).eval(), importance, data, labels, seed=seed)
    num_layers = len(model.transformer_blocks)
    remove_blocks = min(round(depth * num_layers), num_layers - 1)
    block_order = torch.argsort(importance_scores_["blocks"], descending=True)
    kept_blocks = sorted(block_order[: num_layers - remove_blocks].tolist())
    kept_heads = _select([importance_scores_["heads"][i] for i in kept_blocks], heads, scope, "heads", kept_blocks)
    kept_units = _select([importance_scores_["mlp"][i] for i in kept_blocks], mlp, scope, "mlp", kept_blocks)

    config = dict(model.config)
    config = {k: v for k, v in config.items() if not k.startswith("_") and k != "quantization_config"}
    config.update(
        num_layers=len(kept_blocks),
        layer_heads=[
            len(h) * model.transformer_blocks[b].attn1.heads // head_units(model.transformer_blocks[b].attn1)[0]
            for h, b in zip(kept_heads, kept_blocks)
        ],
        layer_mlp_dims=[len(u) for u in kept_units],
        block_cache_schedule=None,  # a reuse schedule is calibrated for the unpruned blocks
    )
    if is_moe:
        config["layer_mlp_dims"] = None
        config["moe_layers"] = [new for new, old in enumerate(kept_blocks) if model.is_moe_layer(old)]
    if all(h == model.config.num_attention_heads for h in config["layer_heads"]):
        config["layer_heads"] = None
    pruned = DiTOptimumTransformer2DModel(**config)
    pruned.load_state_dict(_sliced_state_dict(model, kept_blocks, kept_heads, kept_units), strict=True)
    pruned = pruned.to(device=model.device, dtype=model.dtype).eval()
    return rewrap(pipe_or_model, pruned)


def teacher_and_student(
    pipe_or_model: DiTOptimumPipeline | DiTOptimumTransformer2DModel, **prune_options
) -> tuple[DiTOptimumTransformer2DModel, DiTOptimumTransformer2DModel]:
    """What recovery fine-tuning needs: the frozen unpruned teacher (eval, no grad) and the pruned student."""
    model = unwrap(pipe_or_model)
    student = prune(model, **prune_options)
    teacher = copy.deepcopy(model).eval().requires_grad_(False)
    return teacher, student.train().requires_grad_(True)

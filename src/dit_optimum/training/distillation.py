"""Knowledge distillation as one named piece of the trainer: the frozen teacher (checked against the student), the
output loss (MSE to the teacher's prediction), and the optional feature loss on chosen student blocks against
proportionally mapped teacher blocks, through learned projections when the widths differ."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import DiTOptimumError
from ..models.transformer import DiTOptimumTransformer2DModel
from ..pipelines.dit import DiTOptimumPipeline
from .config import TrainConfig


class FeatureTaps:
    """Forward hooks that keep the outputs of chosen transformer blocks."""

    def __init__(self, model: DiTOptimumTransformer2DModel, blocks: list[int]):
        self.outputs: dict[int, torch.Tensor] = {}
        self.handles = [model.transformer_blocks[index].register_forward_hook(self._hook(index)) for index in blocks]

    def _hook(self, index: int):
        def keep(_module, _inputs, output):
            self.outputs[index] = output

        return keep


def teacher_block(student_index: int, student_layers: int, teacher_layers: int) -> int:
    """Proportional depth mapping: the last student block pairs with the last teacher block."""
    return round((student_index + 1) * teacher_layers / student_layers) - 1


def load_teacher(config: TrainConfig, student: DiTOptimumTransformer2DModel) -> DiTOptimumTransformer2DModel:
    """The frozen teacher of ``config.teacher``; it must share the student's input space and classes."""
    try:
        teacher = DiTOptimumPipeline.from_pretrained(config.teacher).transformer
    except DiTOptimumError as error:
        raise DiTOptimumError(f"`teacher`={str(config.teacher)!r} (--teacher) cannot be loaded: {error}") from error
    for key in ("sample_size", "in_channels", "num_embeds_ada_norm"):
        if teacher.config[key] != student.config[key]:
            raise DiTOptimumError(
                f"Teacher and student differ in `{key}` ({teacher.config[key]} vs {student.config[key]}): "
                "distillation needs the same input space and classes."
            )
    return teacher.eval().requires_grad_(False)


class Distillation:
    """A distillation run's teacher, taps and projections; ``loss`` turns the diffusion loss into the distilled one.

    ``projections`` (one per feature block: identity, or a linear map to the teacher's width) train with the
    student and are checkpointed with it.
    """

    def __init__(self, config: TrainConfig, student: DiTOptimumTransformer2DModel):
        self.teacher = load_teacher(config, student)
        self.alpha, self.feature_weight = config.alpha, config.feature_weight
        self.projections = nn.ModuleDict()
        self.student_taps: FeatureTaps | None = None
        self.teacher_taps: FeatureTaps | None = None
        self.teacher_map: dict[int, int] = {}  # student block -> teacher block of the feature loss
        if config.feature_blocks:
            patches = (student.config.patch_size, self.teacher.config.patch_size)
            if patches[0] != patches[1]:  # block outputs are compared token by token
                raise DiTOptimumError(
                    f"`feature_blocks` (--feature-blocks) compares block outputs token by token: the student's "
                    f"`patch_size`={patches[0]} gives other tokens than the teacher's `patch_size`={patches[1]}. Use "
                    "a teacher of the same patch size, or distill the outputs only (no --feature-blocks)."
                )
            width, teacher_width = student.inner_dim, self.teacher.inner_dim
            for index in config.feature_blocks:
                projection = nn.Identity() if width == teacher_width else nn.Linear(width, teacher_width)
                self.projections[str(index)] = projection
            layers, teacher_layers = student.config.num_layers, self.teacher.config.num_layers
            self.teacher_map = {i: teacher_block(i, layers, teacher_layers) for i in config.feature_blocks}
            self.student_taps = FeatureTaps(student, config.feature_blocks)
            self.teacher_taps = FeatureTaps(self.teacher, sorted(set(self.teacher_map.values())))

    def to(self, device: torch.device) -> Distillation:
        self.teacher.to(device)
        return self

    def loss(
        self,
        diffusion_loss: torch.Tensor,
        output: torch.Tensor,
        x_t: torch.Tensor,
        t: torch.Tensor,
        y: torch.Tensor,
        projections: nn.Module,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``alpha * diffusion + (1 - alpha) * output MSE (+ feature_weight * feature MSE)``, and the logged terms;
        ``projections`` is the (possibly process-wrapped) projection module the optimizer trains."""
        with torch.no_grad():
            teacher_output = self.teacher(x_t, t, y).sample.float()
        shared = min(output.shape[1], teacher_output.shape[1])
        distill = F.mse_loss(output.float()[:, :shared], teacher_output[:, :shared])
        loss = self.alpha * diffusion_loss + (1 - self.alpha) * distill
        logged = {"distill": distill.detach()}
        if self.student_taps is not None:
            losses = [
                F.mse_loss(
                    projections[str(i)](self.student_taps.outputs[i]).float(), self.teacher_taps.outputs[j].float()
                )
                for i, j in self.teacher_map.items()
            ]
            feature = sum(losses) / len(losses)
            loss = loss + self.feature_weight * feature
            logged["feature"] = feature.detach()
        return loss, logged

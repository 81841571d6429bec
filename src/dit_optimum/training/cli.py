"""Command line shared by scripts/train.py, train_moe.py, distill.py, train_lora.py and extract_features.py."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from ..errors import DiTOptimumError
from .config import FINETUNE_MODES, MIXED_PRECISION, TrainConfig
from .trainer import train

MODES = ("base", "moe", "distill", "lora")


def _ints(value: str) -> list[int]:
    try:
        return [int(item) for item in value.split(",") if item.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a comma-separated list of integers, e.g. 0,3") from None


def _names(value: str) -> list[str]:
    return [item.strip() for item in value.split(",") if item.strip()]


def _model_config(text: str) -> dict:
    """``--model-config``: a JSON object of model config keys, else one error naming the option."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise DiTOptimumError(f"`--model-config`={text!r} is not valid JSON ({error}).") from None
    if not isinstance(value, dict):
        raise DiTOptimumError(
            f"`--model-config`={text!r} must be a JSON object of model config keys, e.g. '{{\"num_layers\": 2}}'."
        )
    return value


def build_parser(mode: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description={
            "base": "Train a DiT.",
            "moe": "Train a mixture-of-experts DiT.",
            "distill": "Distill a teacher DiT pipeline into a student.",
            "lora": "Fine-tune a pretrained DiT pipeline on new data and classes (LoRA, biases only, or full).",
        }[mode]
    )
    parser.add_argument("--output-dir", required=True)
    parser.add_argument("--model", default="DiT-XS/2", help="preset, e.g. DiT-S/2")
    parser.add_argument("--attention-type", default=None, help="sdpa, gqa, mqa, shallow, mediated, focused, ...")
    parser.add_argument("--num-kv-heads", type=int, default=None)
    parser.add_argument("--model-config", default="{}", help='JSON object of model config keys, e.g. {"num_layers": 2}')
    parser.add_argument("--data", default="digits", help="digits | imagefolder dir | latents dir | datasets id")
    parser.add_argument("--image-size", type=int, default=16)
    parser.add_argument("--channels", type=int, default=1)
    parser.add_argument(
        "--skip-corrupt", action="store_true", help="skip unreadable images (counted) instead of failing"
    )
    parser.add_argument("--max-samples", type=int, default=None, help="train on the first N samples only")
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=32, help="global batch, split across processes")
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--warmup-steps", type=int, default=0, help="linear learning-rate warm-up from 0")
    parser.add_argument("--lr-schedule", default="constant", help="constant | cosine (decays to 0 at --steps)")
    parser.add_argument("--weight-decay", type=float, default=0.0)
    parser.add_argument("--ema-decay", type=float, default=0.9999)
    parser.add_argument("--no-ema-warmup", action="store_true", help="constant EMA decay from step 0 (as fast-DiT)")
    parser.add_argument("--max-grad-norm", type=float, default=None)
    parser.add_argument("--mixed-precision", choices=MIXED_PRECISION, default="no")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--compile", action="store_true", help="run the model's forward through torch.compile")
    parser.add_argument("--checkpoint-every", type=int, default=500)
    parser.add_argument("--keep-checkpoints", type=int, default=2)
    parser.add_argument("--resume", action="store_true", help="continue from the last checkpoint in --output-dir")
    parser.add_argument("--log-every", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tensorboard", action="store_true")
    if mode == "moe":
        parser.add_argument("--moe-num-experts", type=int, default=8)
        parser.add_argument("--moe-top-k", type=int, default=2)
        parser.add_argument("--moe-num-shared-experts", type=int, default=0)
        parser.add_argument("--moe-capacity-factor", type=float, default=1.25)
        parser.add_argument("--moe-every", type=int, default=1)
        parser.add_argument("--moe-expert-dim", type=int, default=None)
        parser.add_argument("--moe-balance-loss-weight", type=float, default=0.01)
        parser.add_argument("--moe-router-z-loss-weight", type=float, default=0.001)
    if mode == "lora":
        parser.add_argument("--pretrained", required=True, help="the pipeline to adapt (folder or Hub id)")
        parser.add_argument("--finetune", choices=FINETUNE_MODES, default="lora", help="what trains")
        parser.add_argument("--lora-rank", type=int, default=8)
        parser.add_argument("--lora-alpha", type=float, default=None, help="LoRA scale alpha / rank (default: rank)")
        parser.add_argument(
            "--lora-targets", type=_names, default=["attention"], help="comma-separated: attention, mlp, adaln"
        )
    if mode == "distill":
        parser.add_argument("--teacher", required=True, help="teacher pipeline folder")
        parser.add_argument(
            "--alpha", type=float, default=0.5, help="weight of the diffusion loss (1 - alpha: teacher)"
        )
        parser.add_argument("--feature-blocks", type=_ints, default=[], help="student blocks for the feature loss")
        parser.add_argument("--feature-weight", type=float, default=1.0)
    return parser


def config_from_args(args: argparse.Namespace, mode: str) -> TrainConfig:
    """The ``TrainConfig`` of parsed arguments (``--model-config`` and the attention / MoE flags become overrides)."""
    overrides = _model_config(args.model_config)
    if args.attention_type is not None:
        overrides["attention_type"] = args.attention_type
    if args.num_kv_heads is not None:
        overrides["num_kv_heads"] = args.num_kv_heads
    if mode == "moe":
        for key in (
            "num_experts",
            "top_k",
            "num_shared_experts",
            "capacity_factor",
            "every",
            "expert_dim",
            "balance_loss_weight",
            "router_z_loss_weight",
        ):
            overrides[f"moe_{key}"] = getattr(args, f"moe_{key}")
    distill = {}
    if mode == "distill":
        distill = {
            "teacher": args.teacher,
            "alpha": args.alpha,
            "feature_blocks": args.feature_blocks,
            "feature_weight": args.feature_weight,
        }
    finetune = {}
    if mode == "lora":
        finetune = {
            "pretrained": args.pretrained,
            "finetune": args.finetune,
            "lora_rank": args.lora_rank,
            "lora_alpha": args.lora_alpha,
            "lora_targets": args.lora_targets,
        }
    return TrainConfig(
        output_dir=args.output_dir,
        model=args.model,
        model_overrides=overrides,
        data=args.data,
        image_size=args.image_size,
        channels=args.channels,
        skip_corrupt=args.skip_corrupt,
        max_samples=args.max_samples,
        steps=args.steps,
        batch_size=args.batch_size,
        learning_rate=args.lr,
        warmup_steps=args.warmup_steps,
        lr_schedule=args.lr_schedule,
        weight_decay=args.weight_decay,
        ema_decay=args.ema_decay,
        ema_warmup=not args.no_ema_warmup,
        max_grad_norm=args.max_grad_norm,
        mixed_precision=args.mixed_precision,
        gradient_checkpointing=args.gradient_checkpointing,
        compile=args.compile,
        checkpoint_every=args.checkpoint_every,
        keep_checkpoints=args.keep_checkpoints,
        resume=args.resume,
        log_every=args.log_every,
        seed=args.seed,
        tensorboard=args.tensorboard,
        **distill,
        **finetune,
    )


def main(mode: str = "base", argv: Sequence[str] | None = None) -> int:
    """Parse arguments for ``mode`` (base, moe, distill, lora), train, and print where the pipeline was saved."""
    if mode not in MODES:
        raise DiTOptimumError(f"Unknown `mode`={mode!r}; allowed values: {', '.join(MODES)}.")
    args = build_parser(mode).parse_args(argv)
    try:
        pipeline_dir = train(config_from_args(args, mode))
    except DiTOptimumError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"Saved pipeline to {pipeline_dir}")
    return 0


def extract_main(argv: Sequence[str] | None = None) -> int:
    """Encode a dataset to VAE latents once (``scripts/extract_features.py``)."""
    from ..data import load_training_data
    from .data import extract_latents

    parser = argparse.ArgumentParser(description="Encode images to scaled VAE latents for training.")
    parser.add_argument("--data", default="digits", help="digits | imagefolder dir | datasets id")
    parser.add_argument("--vae", required=True, help="AutoencoderKL folder or Hub id")
    parser.add_argument("--output-dir", required=True)
    parser.add_argument("--overwrite", action="store_true", help="write into a folder that holds other files")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--channels", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--skip-corrupt", action="store_true", help="skip unreadable images, listing them")
    args = parser.parse_args(argv)
    try:
        data = load_training_data(args.data, args.image_size, args.channels, args.skip_corrupt)
        out = extract_latents(data, args.vae, args.output_dir, args.batch_size, overwrite=args.overwrite)
    except DiTOptimumError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    skipped = f" ({data.skipped} unreadable image(s) skipped)" if data.skipped else ""
    print(f"Saved {len(data.labels)} latents to {out}{skipped}")
    return 0

"""Command line shared by scripts/train.py, train_moe.py, distill.py, distill_steps.py, train_lora.py and
extract_features.py."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..errors import DiTOptimumError, error_line
from .checkpoints import checkpoint_folders
from .config import TrainConfig
from .trainer import train

MODES = ("base", "moe", "distill", "lora", "steps")


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


# Options of the model config (not of training): they become `model_overrides` keys, beside --model-config.
MODEL_OPTIONS = {
    "base": {
        "attention_type": (str, None, "sdpa, gqa, mqa, shallow, mediated, focused, ..."),
        "num_kv_heads": (int, None, ""),
    },
    "moe": {
        "moe_num_experts": (int, 8, ""),
        "moe_top_k": (int, 2, ""),
        "moe_num_shared_experts": (int, 0, ""),
        "moe_capacity_factor": (float, 1.25, ""),
        "moe_every": (int, 1, ""),
        "moe_expert_dim": (int, None, ""),
        "moe_balance_loss_weight": (float, 0.01, ""),
        "moe_router_z_loss_weight": (float, 0.001, ""),
    },
}
DESCRIPTIONS = {
    "base": "Train a DiT.",
    "moe": "Train a mixture-of-experts DiT.",
    "distill": "Distill a teacher DiT pipeline into a student.",
    "lora": "Fine-tune a pretrained DiT pipeline on new data and classes (LoRA, biases only, or full).",
    "steps": "Step-distill a pretrained DiT pipeline: a student that samples in --student-steps unguided DDIM steps.",
}
_PARSERS = {int: int, float: float, str: str, list[int]: _ints, list[str]: _names}


def _model_options(mode: str) -> dict[str, tuple[type, Any, str]]:
    """The model options the ``mode`` script offers: attention type and K/V heads, plus the MoE shape for ``moe``."""
    return {**MODEL_OPTIONS["base"], **(MODEL_OPTIONS["moe"] if mode == "moe" else {})}


def _config_options(mode: str) -> list[dataclasses.Field]:
    """The ``TrainConfig`` fields the ``mode`` script offers (every field declares its option)."""
    return [f for f in dataclasses.fields(TrainConfig) if f.metadata["modes"] is None or mode in f.metadata["modes"]]


def build_parser(mode: str) -> argparse.ArgumentParser:
    """The script's options, generated from ``TrainConfig``'s fields (one home per training option) plus the model
    options of ``mode`` (attention type, K/V heads, MoE shape)."""
    parser = argparse.ArgumentParser(description=DESCRIPTIONS[mode])
    hints = typing.get_type_hints(TrainConfig)
    for f in _config_options(mode):
        meta = f.metadata
        flag = meta["flag"] or "--" + f.name.replace("_", "-")
        default = f.default_factory() if f.default is dataclasses.MISSING else f.default
        default = meta["cli_default"] if meta["cli_default"] is not None else default
        kind = hints[f.name]
        if f.name == "model_overrides":
            parser.add_argument(flag, dest=f.name, default="{}", help=meta["help"])  # parsed with the config
        elif kind is bool:  # a flag; `--no-...` turns a default-on setting off
            action = "store_false" if flag.startswith("--no-") else "store_true"
            parser.add_argument(flag, dest=f.name, action=action, help=meta["help"])
        else:
            optional = [arg for arg in typing.get_args(kind) if arg is not type(None)]
            base = optional[0] if type(None) in typing.get_args(kind) else kind
            parser.add_argument(
                flag,
                dest=f.name,
                type=_PARSERS[base],
                default=default,
                required=meta["required"],
                help=meta["help"] + ("" if default in (None, [], {}) else f" (default: {default})"),
            )
    for name, (kind, default, help_text) in _model_options(mode).items():
        parser.add_argument("--" + name.replace("_", "-"), type=kind, default=default, help=help_text or None)
    return parser


def config_from_args(args: argparse.Namespace, mode: str) -> TrainConfig:
    """The ``TrainConfig`` of parsed arguments: its own fields by name, the model options as overrides."""
    values = {f.name: getattr(args, f.name) for f in _config_options(mode)}
    overrides = _model_config(values.pop("model_overrides"))
    for name in _model_options(mode):
        value = getattr(args, name)
        if value is not None or name in MODEL_OPTIONS["moe"]:  # the MoE shape is always explicit
            overrides[name] = value
    return TrainConfig(**values, model_overrides=overrides)


def main(mode: str = "base", argv: Sequence[str] | None = None) -> int:
    """Parse arguments for ``mode`` (base, moe, distill, lora, steps), train, and print where the pipeline was saved."""
    if mode not in MODES:
        raise DiTOptimumError(f"Unknown `mode`={mode!r}; allowed values: {', '.join(MODES)}.")
    args = build_parser(mode).parse_args(argv)
    try:
        config = config_from_args(args, mode)
        if config.resume and config.output_dir and not checkpoint_folders(Path(config.output_dir)):
            # the API's resume=True starts fresh in an empty folder (the benchmark relies on it); a user who typed
            # --resume meant to continue a run, and a mistyped folder must not silently start over
            raise DiTOptimumError(
                f"`--resume`: `--output-dir`={config.output_dir!r} holds no checkpoint to continue from; check the "
                "folder, or leave out --resume to start a new run."
            )
        pipeline_dir = train(config)
    except DiTOptimumError as error:
        print(error_line(error), file=sys.stderr)
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
        print(error_line(error), file=sys.stderr)
        return 2
    skipped = f" ({data.skipped} unreadable image(s) skipped)" if data.skipped else ""
    print(f"Saved {len(data.labels)} latents to {out}{skipped}")
    return 0

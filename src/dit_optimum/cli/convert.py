"""``dit-optimum convert``: an original DiT checkpoint or a stock diffusers DiT folder as a dit-optimum pipeline."""

from __future__ import annotations

import argparse

from .common import add_overwrite_argument, output_path

NAME = "convert"
HELP = "Convert an original DiT checkpoint or a stock diffusers DiT folder."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("source_format", choices=["original", "diffusers"])
    parser.add_argument("source", help="checkpoint file (original) or pipeline folder / Hub id (diffusers)")
    parser.add_argument("output_dir", type=output_path)
    parser.add_argument("--model", dest="model_name", help="preset name to check against, e.g. DiT-XL/2")
    parser.add_argument("--sample-size", type=int, help="input side, if the checkpoint has no pos_embed")
    parser.add_argument("--num-classes", type=int, help="class count (default: class table rows - 1)")
    parser.add_argument("--num-heads", type=int, help="attention heads (default: from --model or the matching preset)")
    parser.add_argument("--vae", help="AutoencoderKL folder or Hub id for latent models")
    parser.add_argument("--id2label", help="JSON file mapping class index to name")
    parser.add_argument("--transformer-only", action="store_true", help="save only the transformer folder")
    add_overwrite_argument(parser)
    parser.add_argument(
        "--original-timestep-embedding",
        action="store_true",
        help="(diffusers) use the original DiT sinusoid the released weights were trained with",
    )


def run(args: argparse.Namespace) -> int:
    from ..conversion import convert_diffusers_pipeline, convert_original_checkpoint

    if args.source_format == "original":
        out = convert_original_checkpoint(
            args.source,
            args.output_dir,
            model_name=args.model_name,
            sample_size=args.sample_size,
            num_classes=args.num_classes,
            num_heads=args.num_heads,
            vae=args.vae,
            id2label=args.id2label,
            transformer_only=args.transformer_only,
            overwrite=args.overwrite,
        )
    else:
        out = convert_diffusers_pipeline(
            args.source, args.output_dir, args.original_timestep_embedding, overwrite=args.overwrite
        )
    print(f"Saved {out}")
    return 0

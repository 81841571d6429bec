"""Which modules to leave in float: forward error and saved size of DiT-S/2 for three keep-float choices.

    .venv/bin/python benchmarks/keep_float.py

Random weights (no trained DiT is available offline), so the error is a numeric-fidelity measure: relative L2
error of one forward (batch 8, several timesteps and classes) against fp32. Writes
benchmarks/results/keep_float_<device>.md.
"""

from __future__ import annotations

from pathlib import Path

import torch

from dit_optimum import DiTOptimumTransformer2DModel, quantize
from dit_optimum.evaluation.size import saved_size_bytes
from dit_optimum.techniques import DEFAULT_KEEP_FLOAT

RESULTS = Path(__file__).parent / "results"


def main() -> None:
    torch.manual_seed(0)
    model = DiTOptimumTransformer2DModel.from_preset("DiT-S/2").eval()
    adaln = tuple(f"transformer_blocks.{i}.norm1.linear" for i in range(model.config.num_layers))
    choices = {
        "nothing kept (all linear layers quantized)": (),
        "default: embeddings + final layer kept": DEFAULT_KEEP_FLOAT,
        "default + adaLN modulation kept": DEFAULT_KEEP_FLOAT + adaln,
    }
    generator = torch.Generator().manual_seed(1)
    sample = torch.randn(8, 4, 32, 32, generator=generator)
    timestep = torch.linspace(0, 999, 8).long()
    labels = torch.randint(0, 1000, (8,), generator=generator)
    with torch.no_grad():
        reference = model(sample, timestep, labels).sample
    fp32_size = saved_size_bytes(model)
    lines = ["| backend | kept in float | rel. error | size vs fp32 |", "|---|---|---:|---:|"]
    for backend in ("torchao", "quanto"):
        for label, keep in choices.items():
            quantized = quantize(model, backend=backend, weights="int8", keep_float=keep)
            cast = sample.to(quantized.dtype)
            with torch.no_grad():
                output = quantized(cast, timestep, labels).sample.float()
            error = ((output - reference).norm() / reference.norm()).item()
            size = saved_size_bytes(quantized)
            lines.append(f"| {backend} int8 | {label} | {error:.4f} | {size / fp32_size:.1%} |")
    text = "# Keep-float choices, DiT-S/2, int8 weights\n\n" + "\n".join(lines) + "\n"
    device = "gpu" if torch.cuda.is_available() else "cpu"
    (RESULTS / f"keep_float_{device}.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()

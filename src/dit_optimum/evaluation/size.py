"""Model size: bytes on disk of the saved transformer (safetensors weights, and an exported runtime's graph)."""

from __future__ import annotations

import tempfile
from pathlib import Path

from torch import nn

from ..models.runtimes import RUNTIMES
from ..models.transformer import UNSERIALIZABLE_ATTRIBUTE


def saved_size_bytes(model: nn.Module) -> int:
    """Bytes of ``model.save_pretrained`` output (a runtime's graph is saved beside the float32 weights it is exported
    from: both count, the graph by its weight files); a model that cannot be saved as a diffusers folder (quanto static
    activations) is measured as its own state dict in one safetensors file, which is how quanto stores it."""
    with tempfile.TemporaryDirectory() as folder:
        if hasattr(model, UNSERIALIZABLE_ATTRIBUTE):
            from safetensors.torch import save_file

            state = {k: v.contiguous() for k, v in model.state_dict().items() if v is not None}
            save_file(state, f"{folder}/model.safetensors")
        else:
            model.save_pretrained(folder)
        graph_files = {name for declaration in RUNTIMES.values() for name in declaration.weight_files}
        return sum(
            f.stat().st_size for f in Path(folder).rglob("*") if f.suffix == ".safetensors" or f.name in graph_files
        )

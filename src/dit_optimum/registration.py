"""Make this package something diffusers knows: a component library, so that
``DiffusionPipeline.from_pretrained("org/repo")`` downloads repositories whose ``model_index.json`` names
``["dit_optimum", ...]`` components, and a transformer block diffusers' block-level cache hooks can wrap.

diffusers downloads a Hub repository only if each component's library is in its ``LOADABLE_CLASSES`` (or the repo
ships the component's code as ``<component>/<library>.py`` remote code); local folders skip that check. Its cache
hooks (FirstBlockCache, ...) find blocks by class in ``TransformerBlockRegistry``. Importing ``dit_optimum`` adds
both entries.
"""

from __future__ import annotations

from diffusers.pipelines import pipeline_loading_utils

LIBRARY = "dit_optimum"


def register_with_diffusers() -> None:
    """Add ``dit_optimum`` to diffusers' loadable libraries and its block to the block registry (idempotent)."""
    from diffusers.hooks._helpers import TransformerBlockMetadata, TransformerBlockRegistry

    from .models.transformer import DiTBlock

    pipeline_loading_utils.LOADABLE_CLASSES.setdefault(LIBRARY, {"ModelMixin": ["save_pretrained", "from_pretrained"]})
    # a DiT block takes `hidden_states` and returns the new hidden states as one tensor (no index into a tuple)
    TransformerBlockRegistry.register(DiTBlock, TransformerBlockMetadata())

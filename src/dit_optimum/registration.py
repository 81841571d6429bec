"""Make this package a component library diffusers knows, so that ``DiffusionPipeline.from_pretrained("org/repo")``
downloads repositories whose ``model_index.json`` names ``["dit_optimum", ...]`` components.

diffusers downloads a Hub repository only if each component's library is in its ``LOADABLE_CLASSES`` (or the repo
ships the component's code as ``<component>/<library>.py`` remote code); local folders skip that check. Importing
``dit_optimum`` adds it there, with the same save/load methods as diffusers' own models.
"""

from __future__ import annotations

from diffusers.pipelines import pipeline_loading_utils

LIBRARY = "dit_optimum"


def register_with_diffusers() -> None:
    """Add ``dit_optimum`` to diffusers' loadable libraries (idempotent)."""
    pipeline_loading_utils.LOADABLE_CLASSES.setdefault(LIBRARY, {"ModelMixin": ["save_pretrained", "from_pretrained"]})

"""Taking benchmark results to the Hub: model cards that carry the measured numbers (``cards``), one release folder
per finished cell (``releases``), upload with ``huggingface_hub`` (``upload``), the demo page (``demo``) and a
ready Space (``space``)."""

from .cards import card_numbers, model_card, repo_name
from .releases import Release, release
from .upload import push

__all__ = ["Release", "card_numbers", "model_card", "push", "release", "repo_name"]

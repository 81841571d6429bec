"""Hugging Face Space: DiT techniques side by side on the same class and seed (``dit-optimum export-space``).

The pipelines come from ``space_config.json`` beside this file, or from ``DIT_OPTIMUM_DEMO_PIPELINES`` (comma-
separated repo ids or folders) when set, e.g. to try local release folders.
"""

import json
import os
from pathlib import Path

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

from dit_optimum.hub.demo import build_demo

CONFIG = json.loads(Path(__file__).with_name("space_config.json").read_text())
PIPELINES = [p for p in os.environ.get("DIT_OPTIMUM_DEMO_PIPELINES", "").split(",") if p] or CONFIG["pipelines"]
demo = build_demo(PIPELINES, CONFIG["title"])

if __name__ == "__main__":
    demo.launch()

"""The Gradio demo: techniques side by side on the same class and seed, each image with its latency measured live
and the numbers its card carries. Pipelines are repo ids or local folders; one that fails to load says so in the
page. ``demo/app.py`` and every exported Space launch ``build_demo``."""

from __future__ import annotations

import math
import numbers
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from ..errors import DiTOptimumError
from ..models.resources import check_resources
from ..pipelines.dit import DiTOptimumPipeline
from ..schemas import RELEASE_RESULTS, markdown_text, read_json_file
from ..techniques.caching import enable_cache_recipe
from ..techniques.registry import sampling_cache
from .cards import RESULTS_FILE, card_numbers, pick_row

# Card numbers the page shows beside each image: (metric key, column header).
CARD_COLUMNS = (
    ("class_accuracy", "class acc (%)"),
    ("fd_domain", "FD_domain"),
    ("fid", "FID"),
    ("sampling_images_per_s", "card sample img/s"),
    ("size_bytes", "size (MB)"),
)
TABLE_HEADERS = ["pipeline", "latency (s)", *(header for _key, header in CARD_COLUMNS)]
# The page's ranges (its sliders): a request through the API is held to them too.
STEPS_RANGE = (1, 50)
GUIDANCE_RANGE = (1.0, 6.0)


@dataclass
class LoadedPipeline:
    """A pipeline of the page (or why it could not be loaded), with its card's numbers."""

    source: str
    pipeline: DiTOptimumPipeline | None = None
    error: str | None = None
    numbers: dict[str, float] = field(default_factory=dict)


def _release_file(source: str, name: str) -> Path | None:
    # A file beside the pipeline: in a local folder, or downloaded from the Hub repository (None if absent).
    folder = Path(source)
    if folder.is_dir():
        return folder / name if (folder / name).exists() else None  # a FIFO there is refused when read
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    try:
        return Path(hf_hub_download(source, name))
    except EntryNotFoundError:
        return None


def load_pipeline(source: str) -> LoadedPipeline:
    """Load ``source`` in the dtype it was released in, with its card's numbers; failures become a message."""
    try:
        dtype, cache = torch.float32, None
        results = _release_file(source, RESULTS_FILE)
        if results is not None:
            row = pick_row(read_json_file(results, RELEASE_RESULTS), results)  # dtype and technique validated
            dtype = getattr(torch, row.get("dtype", "float32"))
            cache = sampling_cache(row["technique"])
        pipeline = DiTOptimumPipeline.from_pretrained(source, torch_dtype=dtype)
        if cache is not None and not pipeline.transformer.is_cache_enabled:  # set at run time, as its card says
            enable_cache_recipe(pipeline, cache)
        pipeline.set_progress_bar_config(disable=True)
        numbers = {}
        card = _release_file(source, "README.md")
        if card is not None:
            from huggingface_hub import ModelCard

            numbers = card_numbers(ModelCard.load(card))
        return LoadedPipeline(source, pipeline, numbers=numbers)
    except Exception as error:  # shown in the page: the demo must keep working for the other pipelines
        message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        return LoadedPipeline(source, error=f"could not load: {message}")


class DemoModels:
    """The page's pipelines, loaded once each (on first use). Requests may come from several threads at once (Gradio
    serves them concurrently): a pipeline is loaded once, and each pipeline samples one request at a time (its
    ``call_lock``), so every request gets the images it would get alone."""

    def __init__(self, sources: Sequence[str]):
        if not sources:
            raise DiTOptimumError("`pipelines` is empty: give at least one repo id or pipeline folder.")
        self.sources = list(dict.fromkeys(sources))
        self._loaded: dict[str, LoadedPipeline] = {}
        self._loading = threading.Lock()

    def get(self, source: str) -> LoadedPipeline:
        with self._loading:
            if source not in self._loaded:
                self._loaded[source] = load_pipeline(source)
            return self._loaded[source]

    def class_names(self) -> list[str]:
        """Class names of the first pipeline that loads (its ``id2label``), else class indices as text."""
        for source in self.sources:
            loaded = self.get(source)
            if loaded.pipeline is not None:
                labels = loaded.pipeline.labels
                if labels:
                    return sorted(labels, key=lambda name: labels[name])
                return [str(index) for index in range(loaded.pipeline.transformer.config.num_embeds_ada_norm)]
        return []

    def generate(
        self, class_name: str, steps: int, guidance: float, seed: int, chosen: Sequence[str]
    ) -> tuple[list[tuple[Any, str]], list[list[str]]]:
        """One image per chosen pipeline (same class and seed), and the table of latency and card numbers.

        Every input is checked first, as the page offers it (a request through the API may send anything): ``chosen``
        among the page's own ``sources`` (never another path or repo id), ``steps`` and ``guidance`` within the
        sliders' ranges, ``seed`` a torch seed and ``class_name`` one of the page's classes."""
        chosen = self._check_chosen(chosen)
        steps = _whole_number(steps)
        if not (_is_integer(steps) and STEPS_RANGE[0] <= steps <= STEPS_RANGE[1]):
            raise DiTOptimumError(
                f"`steps`={steps!r} must be an integer in {STEPS_RANGE[0]}..{STEPS_RANGE[1]} (the page's range)."
            )
        if not (
            isinstance(guidance, numbers.Real)
            and not isinstance(guidance, bool)
            and math.isfinite(guidance)
            and GUIDANCE_RANGE[0] <= guidance <= GUIDANCE_RANGE[1]
        ):
            raise DiTOptimumError(
                f"`guidance`={guidance!r} must be a number in [{GUIDANCE_RANGE[0]:g}, {GUIDANCE_RANGE[1]:g}] (the "
                "page's range; 1 disables guidance)."
            )
        seed = _whole_number(seed)  # a number field may send 3.0
        check_resources(seed=seed, parameter="seed")
        names = self.class_names()
        if not isinstance(class_name, str) or (names and class_name not in names):
            shown = ", ".join(names[:40]) + (", ..." if len(names) > 40 else "")
            allowed = f"one of the page's classes: {shown}" if names else "a class name or index (a string)"
            raise DiTOptimumError(f"`class_name`={class_name!r} must be {allowed}.")
        images, table = [], []
        for source in chosen:
            loaded = self.get(source)
            if loaded.pipeline is None:
                table.append([source, loaded.error or "could not load", *(["n/a"] * len(CARD_COLUMNS))])
                continue
            try:
                label = loaded.pipeline.get_label_ids(class_name) if loaded.pipeline.labels else [int(class_name)]
                generator = torch.Generator().manual_seed(seed)
                with loaded.pipeline.call_lock:  # timed alone: another request's call waits outside the timing
                    start = time.perf_counter()
                    image = loaded.pipeline(
                        label, num_inference_steps=int(steps), guidance_scale=float(guidance), generator=generator
                    ).images[0]
                    latency = time.perf_counter() - start
            except Exception as error:  # one failing pipeline must not take the page down
                table.append([source, f"failed: {str(error).splitlines()[0]}", *(["n/a"] * len(CARD_COLUMNS))])
                continue
            shown_image = image.resize((image.width * 8, image.height * 8), Image.NEAREST)  # crisp tiny images
            images.append((shown_image, f"{source}: {latency:.3f} s"))
            shown = [_card_value(key, loaded.numbers.get(key)) for key, _header in CARD_COLUMNS]
            table.append([source, f"{latency:.3f}", *shown])
        return images, table

    def _check_chosen(self, chosen: Any) -> list[str]:
        # only the page's own pipelines: an API client could otherwise make the server load any path or repo id
        allowed = ", ".join(repr(source) for source in self.sources)
        if isinstance(chosen, (str, bytes)) or not isinstance(chosen, Sequence):
            raise DiTOptimumError(f"`chosen`={chosen!r} must be a list of the page's pipelines ({allowed}).")
        if not chosen:
            raise DiTOptimumError(f"Choose at least one pipeline (`chosen` is empty; allowed: {allowed}).")
        unknown = [source for source in chosen if not isinstance(source, str) or source not in self.sources]
        if unknown:
            raise DiTOptimumError(
                f"`chosen` names {', '.join(map(repr, unknown[:5]))}, not among the page's pipelines; allowed: "
                f"{allowed}."
            )
        return list(dict.fromkeys(chosen))


def _is_integer(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _whole_number(value: Any) -> Any:
    # a number field or slider may send 3.0 for 3; anything else is left for the check to name
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def _card_value(key: str, value: float | None) -> str:
    if value is None:
        return "n/a"
    return f"{value:.1f}" if key != "fd_domain" else f"{value:.2f}"


def build_demo(sources: Sequence[str], title: str = "dit-optimum: DiT techniques side by side"):
    """The Gradio Blocks app over ``sources`` (repo ids or folders; the first two are chosen at start)."""
    import gradio as gr

    models = DemoModels(sources)
    names = models.class_names()

    def run(class_name, steps, guidance, seed, chosen):
        try:
            return models.generate(class_name, steps, guidance, seed, chosen)
        except DiTOptimumError as error:
            raise gr.Error(str(error)) from None

    with gr.Blocks(title=title) as demo:
        gr.Markdown(
            f"# {markdown_text(title)}\nThe same class and seed through each chosen pipeline: the image, its "
            "latency measured now on this machine, and the quality and throughput its model card reports."
        )
        with gr.Row():
            class_name = gr.Dropdown(names, value=names[0] if names else None, label="Class", elem_id="class")
            steps = gr.Slider(*STEPS_RANGE, value=10, step=1, label="Steps", elem_id="steps")
            guidance = gr.Slider(*GUIDANCE_RANGE, value=2.0, step=0.5, label="Guidance", elem_id="guidance")
            seed = gr.Number(0, precision=0, label="Seed", elem_id="seed")
        chosen = gr.CheckboxGroup(
            models.sources, value=models.sources[:2], label="Pipelines (repo ids or folders)", elem_id="pipelines"
        )
        button = gr.Button("Generate", variant="primary", elem_id="generate")
        gallery = gr.Gallery(label="Samples", columns=4, object_fit="scale-down", height="auto", elem_id="images")
        table = gr.Dataframe(headers=TABLE_HEADERS, label="Latency now and the card's numbers", elem_id="numbers")
        button.click(run, [class_name, steps, guidance, seed, chosen], [gallery, table], api_name="generate")
    return demo

"""Model cards from benchmark results: ``huggingface_hub``'s ``ModelCard`` whose ``model-index`` carries every
measured number (quality with N, interval, floor and reference; cost with hardware, dtype and batch), rendered
from ``templates/model_card.md``, and parsed back by ``card_numbers``."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from ..benchmark.report import floor_lines, markdown_deltas, markdown_table, measurement_line
from ..benchmark.significance import WEAK_BASELINE, WEAK_BASELINE_ADVICE
from ..errors import DiTOptimumError
from ..evaluation.declarations import Metric, all_metrics
from ..evaluation.hardware import hardware_text
from ..schemas import DTYPE, QUALITY_SETTINGS, RESULT_ROW, RESULTS, Object, check_repo_id, markdown_text, validate
from ..techniques.registry import TECHNIQUES, sampling_cache
from ..techniques.solvers import scales_initial_noise

CARD_TEMPLATE = Path(__file__).with_name("templates") / "model_card.md"
# The results file a release carries next to its pipeline: the benchmark's format, its own rows only.
RESULTS_FILE = "dit_optimum_results.json"
SAMPLE_GRID = "samples.png"
LICENSE = "apache-2.0"
# The Hub has no class-conditional pipeline tag: the nearest one, with a `class-conditional` tag beside it.
PIPELINE_TAG = "unconditional-image-generation"
TASK_NAME = "Class-conditional image generation"
DATA_NAMES = {"digits": "scikit-learn digits (8x8, upscaled)"}
# What the "Use it" snippet reads from a row: each value checked before it becomes Python source.
_SNIPPET_ROW = Object(
    optional={
        "dtype": DTYPE,
        "quality_settings": QUALITY_SETTINGS,
        "sampler": RESULT_ROW.optional["sampler"],
        "sampling_defaults": RESULT_ROW.optional["sampling_defaults"],
        "runtime": RESULT_ROW.optional["runtime"],
    }
)
# Row fields of free text that the card's Markdown shows (the others are numbers or checked names).
_FREE_TEXT = ("description", "device", "sampler", "quality_verdict")


def repo_name(variant: str, technique: str) -> str:
    """The repository name of one benchmark cell: ``DiT-XS/4`` + ``int8`` -> ``dit-xs4-int8``."""
    base = variant.lower().replace("/", "")
    name = f"{base}-{technique.lower()}"
    return "".join(char if char.isalnum() or char in "-._" else "-" for char in name)


def hub_datasets(data: str) -> list[str] | None:
    """``[data]`` when the training data was a Hub dataset id (``namespace/name``, not a local folder), else None:
    the card's ``datasets`` lists only what the Hub can link to."""
    if re.fullmatch(r"[\w.-]+/[\w.-]+", data) and not Path(data).expanduser().exists():
        return [data]
    return None


def _shown(metric: Metric, value: float) -> float:
    # in the table's unit, to 8 significant digits (what the card shows and parses back)
    return float(f"{float(value) * metric.scale:.8g}")


def eval_results(row: Mapping[str, Any], data: str) -> list[EvalResult]:
    """One ``EvalResult`` per measured metric of ``row``: quality ones with N, interval, floor and sampler; cost
    ones with the hardware, dtype and (for speed) batch and steps. Values in the units the tables show."""
    quality = row.get("quality_settings", {})
    speed = row.get("speed_settings", {})
    reference = quality.get("reference", data)
    common = {
        "task_type": PIPELINE_TAG,
        "task_name": TASK_NAME,
        "dataset_type": str(reference),
        "dataset_name": DATA_NAMES.get(str(reference), str(reference)),
        "dataset_split": quality.get("reference_split"),
    }
    results = []
    for metric in all_metrics():
        value = row.get(metric.key)
        if value is None:
            continue
        if metric.kind == "quality":
            interval = row.get(f"{metric.key}_interval")
            args = {
                "num_samples": row.get("num_samples"),
                "reference_samples": row.get("reference_samples"),
                "interval_95": None if interval is None else [_shown(metric, bound) for bound in interval],
                "real_vs_real_floor": None
                if row.get(f"{metric.key}_real") is None
                else _shown(metric, row[f"{metric.key}_real"]),
                "sampler": row.get("sampler"),
                "num_inference_steps": quality.get("num_inference_steps"),
                "guidance_scale": quality.get("guidance_scale"),
            }
        else:
            hardware = hardware_text(row.get("hardware"))
            args = {"hardware": hardware, "device": row.get("device"), "dtype": row.get("dtype")}
            if metric.paired_ratio or metric.key == "latency_s":
                args.update(
                    batch_size=1
                    if metric.key == "latency_s"
                    else speed.get("forward_batch_size" if metric.key.startswith("forward") else "batch_size"),
                    num_inference_steps=speed.get("num_inference_steps"),
                    guidance_scale=speed.get("guidance_scale"),
                )
        results.append(
            EvalResult(
                **common,
                metric_type=metric.key,
                metric_name=metric.header,
                metric_value=_shown(metric, value),
                metric_args={key: value for key, value in args.items() if value is not None},
            )
        )
    return results


def pick_row(
    results: Mapping[str, Any], source: str | Path, technique: str | None = None, variant: str | None = None
) -> dict[str, Any]:
    """The finished row of ``results`` for ``technique`` (and ``variant``), by default the one a release's results
    file names; anything but exactly one match is refused naming ``source`` and the finished cells."""
    validate(results, RESULTS, repr(str(source)))
    identity = results.get("release") or {}
    technique = technique or identity.get("technique")
    variant = variant or identity.get("variant")
    if technique is None:
        raise DiTOptimumError(f"{str(source)!r} holds several cells: pass `technique` (and `variant`) to pick one.")
    rows = [
        row
        for row in results["rows"]
        if row.get("status") == "ok" and row["technique"] == technique and variant in (None, row["variant"])
    ]
    if len(rows) != 1:
        finished = [row for row in results["rows"] if row.get("status") == "ok"]
        choices = sorted({f"{row['variant']} / {row['technique']}" for row in finished})
        raise DiTOptimumError(
            f"`technique`={technique!r}"
            + (f" with `variant`={variant!r}" if variant else "")
            + f" names {len(rows)} finished cells in {str(source)!r}; allowed: {', '.join(choices) or 'none'}."
        )
    return rows[0]


def card_numbers(card: ModelCard) -> dict[str, float]:
    """The numbers of a card's ``model-index`` by metric key (what ``eval_results`` wrote, parsed back)."""
    return {result.metric_type: result.metric_value for result in card.data.eval_results or []}


def _comment(text: str) -> str:
    # free text inside a Python comment of a Markdown code block: one line, printable, no backticks, bounded
    text = "".join(char if char.isprintable() else " " for char in text).replace("`", "")
    return text if len(text) <= 300 else text[:297] + "..."


def _uses_torchao(options: Any) -> bool:
    if isinstance(options, Mapping):
        return options.get("backend") == "torchao" or any(_uses_torchao(value) for value in options.values())
    if isinstance(options, (list, tuple)):
        return any(_uses_torchao(value) for value in options)
    return False


def _searched_stack(row: Mapping[str, Any]) -> dict[str, Any]:
    """The forward path's options and the saved cache of an optimizer's row (``optimize.stack``), read only from the
    declarations (a path name is looked up, a cache kept only when it is one a saved pipeline carries): nothing of
    the file reaches the card's code but a declared name."""
    from ..techniques.caching import SAVED_CACHE_METHODS
    from ..techniques.runtimes import FORWARD_PATHS

    stack = (row.get("optimize") or {}).get("stack") if isinstance(row.get("optimize"), Mapping) else None
    stack = stack if isinstance(stack, Mapping) else {}
    path = FORWARD_PATHS.get(stack.get("path")) if isinstance(stack.get("path"), str) else None
    cache = stack.get("cache") if isinstance(stack.get("cache"), Mapping) else {}
    method = cache.get("method")
    return {
        "chosen": bool(stack),
        "path": dict(path[1]) if path else {},
        "cache": {"method": method} if isinstance(method, str) and method in SAVED_CACHE_METHODS else None,
    }


def loading_code(repo_id: str, row: Mapping[str, Any], needs_package: str | None = "") -> str:
    """The lines a user types to load and sample this release (run as written by the tests). Every value is
    checked (a Hub id, a torch dtype name, numbers) before it becomes Python source.

    ``needs_package``: None for a release in diffusers' own format (plain diffusers loads it, no dit-optimum
    import); a reason (``stock_format_problem``) for one in this package's format, shown above ``import
    dit_optimum``; "" (the default) for the package format without a stated reason.

    A release whose pipeline records its own sampling defaults (row ``sampling_defaults``: a few-step solver, a
    step-distilled student) gets a comment naming its scheduler (row ``sampler``) and steps above the call, which
    passes them: plain diffusers' ``DiTPipeline`` ignores the recorded ones. A scheduler that starts from scaled
    noise (Euler, Heun) loads with ``DiTOptimumPipeline``: the stock pipeline does not scale it."""
    check_repo_id(repo_id)
    validate(row, _SNIPPET_ROW, "`row`")
    dtype = row.get("dtype", "float32")
    technique = TECHNIQUES.get(str(row.get("technique")))
    searched = _searched_stack(row)
    # diffusers loads torchao models in bfloat16 unless told otherwise; stock DiTPipeline then decodes bfloat16
    # latents with the VAE's dtype: the dtype is always named for torchao releases
    torchao = (technique is not None and _uses_torchao(technique.options)) or _uses_torchao(searched["path"])
    steps = int(row.get("quality_settings", {}).get("num_inference_steps", 10))
    guidance = float(row.get("quality_settings", {}).get("guidance_scale", 2.0))
    cache = sampling_cache(str(row.get("technique"))) or searched["cache"]
    sampler = row.get("sampler")
    recorded = row.get("sampling_defaults") or {}
    steps = int(recorded.get("num_inference_steps", steps))  # what the benchmark sampled it with, as recorded
    guidance = float(recorded.get("guidance_scale", guidance))
    noise_scaled = sampler is not None and scales_initial_noise(sampler)
    # This package's pipeline class where the stock DiTPipeline would sample otherwise: it does not scale the initial
    # noise (Euler, Heun), sets no cache context, and ignores recorded sampling defaults (the optimizer's choice is
    # called without them, as it was judged).
    own_class = noise_scaled or cache is not None or searched["chosen"]
    loader_class = "DiTOptimumPipeline" if own_class else "DiffusionPipeline"
    dtype_argument = f", torch_dtype=torch.{dtype}" if dtype != "float32" or torchao else ""
    loader = f"{loader_class}.from_pretrained({json.dumps(repo_id)}{dtype_argument})"
    imports = "from dit_optimum import DiTOptimumPipeline" if own_class else "from diffusers import DiffusionPipeline"
    cache_lines = []
    sampling_lines = []
    if recorded:
        what = f"{sampler} at {steps} steps" if sampler else f"{steps} steps"
        sampling_lines = [
            f"# this release samples with {what}, guidance {guidance!r} (recorded in its model_index.json; "
            "diffusers' DiTPipeline ignores the recorded values, so they are passed here)"
        ]
    if noise_scaled and cache is None:
        sampling_lines.insert(
            0, f"# DiTOptimumPipeline scales the initial noise as {sampler} needs (DiTPipeline does not)"
        )
    if cache is not None:
        method = cache.pop("method")
        if method == "block-schedule":
            cache_lines = ["# the block reuse schedule is saved with the model: DiTOptimumPipeline samples with it"]
        else:
            imports = "from dit_optimum import DiTOptimumPipeline, enable_step_cache"
            arguments = "".join(f", {name}={value!r}" for name, value in cache.items())
            cache_lines = [
                "# this release samples with a step cache, which is set at run time:",
                f'enable_step_cache(pipe, "{method}"{arguments})',
            ]
    package = []  # a release in diffusers' own format loads without dit-optimum (unless it samples with a cache)
    if (needs_package is not None or cache is not None or noise_scaled) and not searched["chosen"]:
        package.append("import dit_optimum  # noqa: F401  (registers the dit-optimum components with diffusers)")
    runtime = str(row.get("runtime") or "torch")
    if runtime != "torch":  # the exported graph is saved in transformer/; its runtime is an extra
        backend = runtime.split()[0]
        package.insert(
            0,
            f"# its transformer runs with {runtime} (the graph saved in transformer/, no export at load): "
            f"pip install 'dit-optimum[{backend}]'",
        )
    if needs_package:
        package.insert(0, f"# dit-optimum is needed to load this release: {_comment(needs_package)}")
    call = f"num_inference_steps={steps}, guidance_scale={guidance!r}, "
    if searched["chosen"]:  # the optimizer's pipeline samples as it was judged from its recorded defaults alone
        sampling_lines = [f"# samples with the {steps} steps and guidance {guidance!r} it was judged with (recorded)"]
        call = ""
    return "\n".join(
        [
            "import torch",
            *package,
            imports,
            "",
            f"pipe = {loader}",
            *cache_lines,
            *sampling_lines,
            "generator = torch.Generator().manual_seed(0)",
            f"images = pipe(class_labels=[0, 1, 2, 3], {call}generator=generator).images",
            'images[0].save("sample.png")',
        ]
    )


def reproduce_command(settings: Mapping[str, Any], technique: str) -> str:
    """The benchmark command that measures this technique and its baseline again with the recorded settings."""
    from ..benchmark.settings import preset_settings

    techniques = "baseline" if technique == "baseline" else f"baseline,{technique}"
    for preset in ("default", "paper"):
        if preset_settings(preset).comparable() == dict(settings):
            option = "" if preset == "default" else " --preset paper"
            return f"dit-optimum benchmark{option} --techniques {techniques} --output-dir results"
    return (
        f"dit-optimum benchmark --techniques {techniques} --output-dir results  "
        f"# with the options recorded under `settings` in {RESULTS_FILE}"
    )


def _limits(row: Mapping[str, Any], settings: Mapping[str, Any], baseline: Mapping[str, Any] | None = None) -> str:
    data = DATA_NAMES.get(str(settings.get("data"))) or markdown_text(settings.get("data"))
    training = settings.get("training", {})
    lines = [
        f"- Data: {data} at {settings.get('image_size')}x{settings.get('image_size')}; "
        f"the model is a {row['variant']} trained {training.get('steps')} steps. It generates this data's classes "
        "only.",
    ]
    if row.get("num_samples") is not None:
        lines.append(
            f"- Quality: N={row['num_samples']} generated vs {row.get('reference_samples')} real images; the "
            "intervals are 95% bootstrap intervals at that N and the floor is the real-vs-real value at the same N. "
            "The domain metrics rank techniques on this data; they are not ImageNet FIDs."
        )
    weak = (baseline or row).get("baseline_weak")
    if weak or row.get("quality_verdict") == WEAK_BASELINE:
        why = f" ({markdown_text(weak)})" if weak else ""
        lines.append(
            f"- Weak baseline: this run's baseline is far from its real-vs-real floors{why}, so the quality "
            f'comparisons against it say nothing yet and the verdict reads "{WEAK_BASELINE}". To fix: '
            f"{WEAK_BASELINE_ADVICE}."
        )
    lines.append(
        f"- Speed and memory: measured on {row.get('device')} ({hardware_text(row.get('hardware'))}) in "
        f"{row.get('dtype')}; "
        "other hardware gives other numbers, and the ratios against the baseline travel better than the absolute "
        "values."
    )
    return "\n".join(lines)


def model_card(
    results: Mapping[str, Any],
    technique_row: Mapping[str, Any],
    repo_id: str,
    base_model: str | None = None,
    sample_grid: str | None = SAMPLE_GRID,
    needs_package: str | None = "",
) -> ModelCard:
    """The card of one released cell: ``results`` is a benchmark results file (``settings`` and ``rows``; the
    row's baseline among them), ``base_model`` the baseline's repository for a derived model, ``needs_package``
    why the release needs dit-optimum to load (None: it is in diffusers' own format; see ``loading_code``)."""
    # every value the card renders is checked (registered technique, dtype, finite numbers, Hub ids) or escaped
    validate(results, RESULTS, "`results`")
    validate(technique_row, RESULT_ROW, "`technique_row`")
    check_repo_id(repo_id)
    if base_model is not None:
        check_repo_id(base_model, "base_model")
    settings = results.get("settings") or {}
    row = dict(technique_row)
    if row.get("status") != "ok":
        raise DiTOptimumError(f"The cell {row.get('variant')} / {row.get('technique')} did not finish: no card.")
    baseline = next(
        (r for r in results["rows"] if r["variant"] == row["variant"] and r["technique"] == "baseline"), None
    )
    rows = [row] if baseline is None or row["technique"] == "baseline" else [baseline, row]
    shown = [_markdown_row(r) for r in rows]  # the rows as the card's Markdown shows them
    technique = TECHNIQUES.get(row["technique"])
    explanation = (technique.apply.__doc__ or "").strip().split("\n")[0] if technique else ""
    tags = ["dit", "class-conditional", "dit-optimum", row["technique"], str(row.get("dtype", "float32"))]
    data = ModelCardData(
        library_name="diffusers",
        pipeline_tag=PIPELINE_TAG,
        license=LICENSE,
        tags=tags,
        base_model=base_model,
        model_name=repo_id.split("/")[-1],
        datasets=hub_datasets(str(settings.get("data", ""))),
        eval_results=eval_results(row, str(settings.get("data", ""))) or None,
    )
    summary = (
        f"A class-conditional Diffusion Transformer ({row['variant']}) for diffusers, released from a "
        f"dit-optimum benchmark run: the `{row['technique']}` cell, "
        "with every number it was measured at."
    )
    verdict = "the baseline" if row["technique"] == "baseline" else row.get("quality_verdict", "not measured")
    return ModelCard.from_template(
        data,
        template_path=str(CARD_TEMPLATE),
        repo_id=repo_id,
        summary=summary,
        technique=row["technique"],
        description=markdown_text(row.get("description", "")),
        explanation=explanation,
        loading_code=loading_code(repo_id, row, needs_package),
        loading_note=_loading_note(needs_package),
        measurement=measurement_line(shown[-1]).strip(),
        results_table=markdown_table(shown),
        floor=floor_lines(shown),
        change_table=markdown_deltas(shown),
        verdict=verdict,
        base_model=base_model,
        sample_grid=sample_grid,
        reproduce=reproduce_command(settings, row["technique"]),
        results_file=RESULTS_FILE,
        limits=_limits(shown[-1], settings, baseline=shown[0]),
    )


def _loading_note(needs_package: str | None) -> str:
    """The sentence under the card's loading code: which classes the repository holds and what loading needs."""
    if needs_package is None:
        return (
            "The repository holds diffusers' own classes (`DiTPipeline`, `DiTTransformer2DModel`, its VAE and "
            "scheduler): plain diffusers loads it, dit-optimum is not needed."
        )
    reason = f" It needs dit-optimum for: {markdown_text(_comment(needs_package))}." if needs_package else ""
    return (
        "`import dit_optimum` registers this package's components with diffusers (install it with `pip install "
        f"dit-optimum`), so that diffusers downloads and loads the repository.{reason}"
    )


def _markdown_row(row: Mapping[str, Any]) -> dict[str, Any]:
    """``row`` with its free text (description, device, sampler, hardware, reference) escaped for Markdown."""
    shown = dict(row)
    for key in _FREE_TEXT:
        if isinstance(shown.get(key), str):
            shown[key] = markdown_text(shown[key])
    for key in ("hardware", "quality_settings", "speed_settings"):
        if isinstance(row.get(key), Mapping):
            shown[key] = {name: markdown_text(v) if isinstance(v, str) else v for name, v in row[key].items()}
    return shown

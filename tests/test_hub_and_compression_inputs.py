"""Inputs an outside tester sent to the hub and compression APIs: each is refused with a ``DiTOptimumError`` naming
the parameter, file or field and the allowed values, before anything is written, loaded or computed.

- results files (``RESULTS`` / ``RELEASE_RESULTS``): metrics within their declared ranges, ordered intervals, sampling
  settings a pipeline accepts, each cell once; ``release`` names settings that are missing;
- the demo: only the page's own pipelines, steps / guidance within the page's ranges, a class of the page;
- quantization calibration through the package's resource check; pruning's Taylor data, labels, seed and scores.
"""

from __future__ import annotations

import copy
import json
import math
import re
from pathlib import Path
from typing import Any

import pytest
import torch

from conftest import tiny_model, tiny_pixel_pipeline
from dit_optimum import CalibrationSettings, DiTOptimumError, prune, quantize
from dit_optimum.cli import main as cli
from dit_optimum.hub.cards import loading_code, model_card, pick_row
from dit_optimum.hub.demo import DemoModels
from dit_optimum.hub.releases import release
from dit_optimum.hub.upload import push
from dit_optimum.schemas import RELEASE_RESULTS, RESULTS, SchemaError, validate
from dit_optimum.techniques.pruning import importance_scores

REPO = Path(__file__).resolve().parents[1]
RELEASE = json.loads((REPO / "model_cards" / "dit_optimum_results.json").read_text())
MODEL_INDEX = {"transformer": ["dit_optimum", "DiTOptimumTransformer2DModel"]}


def edited(edit) -> dict[str, Any]:
    content = copy.deepcopy(RELEASE)
    edit(content)
    return content


def int8_row(content: dict[str, Any]) -> dict[str, Any]:
    return next(row for row in content["rows"] if row["technique"] == "int8")


def write_json(path: Path, content: Any) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(content))
    return path


def refused(call, pattern: str) -> DiTOptimumError:
    with pytest.raises(DiTOptimumError) as raised:
        call()
    assert re.search(pattern, str(raised.value), re.S), f"{pattern!r} not in {raised.value}"
    return raised.value


# --- results files: the one schema behind push, release, cards, the demo and the benchmark's resume -------------

OUT_OF_RANGE = [
    ("class_accuracy", 7.5, r"rows\[1\]\.class_accuracy must be a finite number in \[0, 1\] \(a share"),
    ("class_accuracy", 55.0, r"rows\[1\]\.class_accuracy must be a finite number in \[0, 1\].*got 55\.0"),
    ("class_accuracy_real", 1.5, r"rows\[1\]\.class_accuracy_real must be a finite number in \[0, 1\]"),
    ("latency_s", -3.0, r"rows\[1\]\.latency_s must be a finite number in \[0, 1e\+15\], got -3\.0"),
    ("size_bytes", -5, r"rows\[1\]\.size_bytes must be a finite number in \[0, 1e\+15\], got -5"),
    ("fid", -2.0, r"rows\[1\]\.fid must be a finite number in \[0, 1e\+15\], got -2\.0"),
    ("fd_domain_real", -0.5, r"rows\[1\]\.fd_domain_real must be a finite number in \[0,"),
    ("sampling_images_per_s", -1.0, r"rows\[1\]\.sampling_images_per_s must be a finite number in \[0,"),
    ("peak_memory_bytes", -1, r"rows\[1\]\.peak_memory_bytes must be a finite number in \[0,"),
    ("latency_ratio", -0.1, r"rows\[1\]\.latency_ratio must be a finite number in \[0,"),
    ("build_wall_s", -1.0, r"rows\[1\]\.build_wall_s must be a finite number in \[0,"),
    ("fid_interval", [10.0, 1.0], r"rows\[1\]\.fid_interval must be a list of 2 values \[low, high\] with low <= "),
    ("fd_domain_interval", [5.0, 4.0], r"rows\[1\]\.fd_domain_interval must be .*got \[5\.0, 4\.0\] \(low > high\)"),
    ("latency_ratio_range", [1.2, 0.8], r"rows\[1\]\.latency_ratio_range must be .*low <= high"),
    (
        "vs_baseline",
        {"fid": {"difference": 1.0, "interval": [2.0, -2.0], "significant": True}},
        r"rows\[1\]\.vs_baseline\.fid\.interval must be .*\(low > high\)",
    ),
    (
        "quality_settings",
        {"guidance_scale": 0.0},
        r"rows\[1\]\.quality_settings\.guidance_scale must be a finite number in \[1, 65504\], got 0\.0",
    ),
    (
        "quality_settings",
        {"num_inference_steps": 100000},
        r"rows\[1\]\.quality_settings\.num_inference_steps must be an integer >= 1 and <= 1000, got 100000",
    ),
    ("speed_settings", {"guidance_scale": 1e6}, r"rows\[1\]\.speed_settings\.guidance_scale must be .*\[1, 65504\]"),
]


@pytest.mark.parametrize(("key", "value", "message"), OUT_OF_RANGE, ids=[f"{c[0]}={c[1]}" for c in OUT_OF_RANGE])
def test_a_results_row_out_of_its_declared_range_is_refused_everywhere(tmp_path, key, value, message):
    content = edited(lambda c: int8_row(c).__setitem__(key, value))
    for schema in (RESULTS, RELEASE_RESULTS):
        with pytest.raises(SchemaError, match=message):
            validate(content, schema, "'r.json'")
    refused(lambda: model_card(content, int8_row(content), "org/x"), r"`results`: " + message)
    refused(lambda: pick_row(content, "r.json"), r"'r\.json': " + message)
    # push: refused naming the file, nothing staged
    pipeline = tmp_path / "pipe"
    write_json(pipeline / "model_index.json", MODEL_INDEX)
    write_json(pipeline / "dit_optimum_results.json", content)
    refused(lambda: push(pipeline, "org/x", dry_run=tmp_path / "dry"), r"`results`=.*dit_optimum_results\.json.*")
    assert not (tmp_path / "dry").exists()
    # the benchmark's own results folder: release refuses it before writing
    write_json(tmp_path / "bench" / "results.json", content)
    refused(lambda: release(tmp_path / "bench", "org", tmp_path / "out"), message)
    assert not (tmp_path / "out").exists()


def test_values_inside_the_declared_ranges_are_accepted():
    def inside(content):
        row = int8_row(content)
        row.update(class_accuracy=0.0, class_accuracy_real=1.0, fid=0.0, latency_s=0.0, size_bytes=0)
        row.update(kid=-0.0004)  # KID is an unbiased estimate: slightly negative when the sets match
        row.update(fid_interval=[0.0, 0.0], class_accuracy_interval=[0.99, 1.003])  # re-centred: may pass 1
        row["quality_settings"].update(guidance_scale=1.0, num_inference_steps=1000)
        row["speed_settings"].update(guidance_scale=65504.0, num_inference_steps=1)

    content = edited(inside)
    validate(content, RELEASE_RESULTS, "r.json")
    card = model_card(content, int8_row(content), "org/x")
    table = [line for line in card.text.splitlines() if line.startswith("| DiT-XS/4 | int8")]
    assert "| 0.0 [99.0, 100.3] | 137.97 [91.76, 182.94] | 0.00 [0.00, 0.00] | -0.40 |" in table[0]
    assert "-0.00" not in table[0]
    assert "num_inference_steps=1000, guidance_scale=1.0" in card.text


def test_the_card_snippet_refuses_settings_the_pipeline_would_refuse():
    for settings, field in (
        ({"guidance_scale": 0.0}, r"guidance_scale must be a finite number in \[1, 65504\]"),
        ({"guidance_scale": 0.5}, r"guidance_scale"),
        ({"guidance_scale": 1e9}, r"guidance_scale"),
        ({"num_inference_steps": 100000}, r"num_inference_steps must be an integer >= 1 and <= 1000"),
        ({"num_inference_steps": 0}, r"num_inference_steps"),
    ):
        refused(lambda s=settings: loading_code("org/x", {"quality_settings": s}), rf"`row`: quality_settings\.{field}")
    code = loading_code("org/x", {"quality_settings": {"guidance_scale": 1.0, "num_inference_steps": 1000}})
    assert "num_inference_steps=1000, guidance_scale=1.0" in code


def test_the_cli_push_of_the_testers_row_is_refused_naming_the_field(tmp_path, capsys):
    pipeline = tmp_path / "pipe"
    tiny_pixel_pipeline().save_pretrained(pipeline)
    row = {"variant": "DiT-XS/4", "technique": "baseline", "status": "ok", "dtype": "float32"}
    bad = {**row, "class_accuracy": 7.5, "latency_s": -3, "size_bytes": -5, "fid": -2}
    results = write_json(tmp_path / "bad" / "results.json", {"settings": {}, "rows": [bad]})
    arguments = ["push", str(pipeline), "org/x", "--results", str(results), "--technique", "baseline"]
    assert cli([*arguments, "--dry-run", str(tmp_path / "staged")]) == 2
    assert re.search(r"rows\[0\]\.class_accuracy must be a finite number in \[0, 1\]", capsys.readouterr().err)
    assert not (tmp_path / "staged").exists()
    # the same row with sane numbers renders them as measured
    good = {**row, "class_accuracy": 0.75, "latency_s": 3.0, "size_bytes": 5_000_000, "fid": 2.0}
    results = write_json(tmp_path / "good" / "results.json", {"settings": {}, "rows": [good]})
    arguments[4] = str(results)
    assert cli([*arguments, "--dry-run", str(tmp_path / "staged")]) == 0
    table = [line for line in (tmp_path / "staged" / "README.md").read_text().splitlines() if line.startswith("| DiT")]
    assert table[0] == "| DiT-XS/4 | baseline | 75.0 | 2.00 | 5.00 | 3.000 |"


def test_a_cell_twice_is_refused_naming_both_rows(tmp_path):
    content = edited(lambda c: c["rows"].append({**c["rows"][0], "class_accuracy": 0.9}))
    message = r"rows\[2\] repeats the cell DiT-XS/4 / baseline of rows\[0\]: each cell \(variant, technique\)"
    for schema in (RESULTS, RELEASE_RESULTS):
        with pytest.raises(SchemaError, match=message):
            validate(content, schema, "r.json")
    write_json(tmp_path / "bench" / "results.json", content)
    refused(lambda: release(tmp_path / "bench", "org", tmp_path / "out"), message)
    assert not (tmp_path / "out").exists()
    failed_twice = edited(lambda c: c["rows"].append({"variant": "DiT-XS/4", "technique": "int8", "status": "failed"}))
    with pytest.raises(SchemaError, match=r"rows\[2\] repeats the cell DiT-XS/4 / int8 of rows\[1\]"):
        validate(failed_twice, RESULTS, "r.json")


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({key: value for key, value in RELEASE["settings"].items() if key != "quality"}, r"lacks `settings\.quality`"),
        (
            {key: value for key, value in RELEASE["settings"].items() if key not in ("quality", "speed")},
            r"lacks `settings\.quality`, `settings\.speed`",
        ),
        ({}, r"lacks `settings\.data`, `settings\.image_size`"),
        (None, r"records no `settings`"),
    ],
    ids=["no quality", "no quality nor speed", "empty", "null"],
)
def test_release_names_the_settings_a_results_file_lacks(tmp_path, capsys, settings, message):
    rows = [{"variant": "DiT-XS/4", "technique": "baseline", "status": "ok", "class_accuracy": 0.5}]
    write_json(tmp_path / "bench" / "results.json", {"settings": settings, "rows": rows})
    error = refused(lambda: release(tmp_path / "bench", "org", tmp_path / "out"), message)
    assert "cannot read" not in str(error)
    assert "data, image_size, channels, training, quality, speed" in str(error)
    assert not (tmp_path / "out").exists()
    assert cli(["release", str(tmp_path / "bench"), "org", "--dry-run", str(tmp_path / "out")]) == 2
    assert re.search(message, capsys.readouterr().err)
    assert not (tmp_path / "out").exists()


# --- the demo ----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def demo_source(tmp_path_factory) -> str:
    folder = tmp_path_factory.mktemp("demo") / "pipe"
    tiny_pixel_pipeline().save_pretrained(folder)
    return str(folder)


def test_the_demo_generates_from_its_own_pipelines(demo_source):
    models = DemoModels([demo_source])
    assert models.class_names() == [str(index) for index in range(10)]
    images, table = models.generate("3", 2, 1.0, 0, [demo_source])
    assert len(images) == 1 and table[0][0] == demo_source and float(table[0][1]) > 0
    images, _ = models.generate("3", 2.0, 1, 0.0, (demo_source,))  # a slider or number field may send 2.0
    assert len(images) == 1


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"chosen": ["/etc"]}, r"`chosen` names '/etc', not among the page's pipelines; allowed: '.*pipe'"),
        ({"chosen": ["org/other-model"]}, r"`chosen` names 'org/other-model', not among the page's pipelines"),
        ({"chosen": "SOURCE"}, r"`chosen`=.* must be a list of the page's pipelines"),
        ({"chosen": None}, r"`chosen`=None must be a list of the page's pipelines"),
        ({"chosen": [5]}, r"`chosen` names 5, not among"),
        ({"chosen": []}, r"Choose at least one pipeline .*allowed: '.*pipe'"),
        ({"steps": 2.7}, r"`steps`=2\.7 must be an integer in 1\.\.50"),
        ({"steps": 0}, r"`steps`=0 must be an integer in 1\.\.50"),
        ({"steps": 10**9}, r"`steps`=1000000000 must be an integer in 1\.\.50"),
        ({"steps": math.nan}, r"`steps`=nan must be an integer"),
        ({"steps": True}, r"`steps`=True must be an integer"),
        ({"steps": "2"}, r"`steps`='2' must be an integer"),
        ({"guidance": "inf"}, r"`guidance`='inf' must be a number in \[1, 6\]"),
        ({"guidance": math.inf}, r"`guidance`=inf must be a number in \[1, 6\]"),
        ({"guidance": 0.5}, r"`guidance`=0\.5 must be a number in \[1, 6\]"),
        ({"guidance": None}, r"`guidance`=None must be a number"),
        ({"seed": -1}, r"`seed`=-1 must be an integer in 0\.\.18446744073709551615"),
        ({"seed": 2**64}, r"`seed`=18446744073709551616 must be an integer"),
        ({"seed": 1.5}, r"`seed`=1\.5 must be an integer"),
    ],
    ids=lambda value: str(value)[:40] if isinstance(value, dict) else "",
)
def test_demo_inputs_are_refused_before_anything_is_loaded(demo_source, arguments, message):
    models = DemoModels([demo_source])
    call = {"class_name": "3", "steps": 2, "guidance": 1.0, "seed": 0, "chosen": [demo_source], **arguments}
    if call["chosen"] == "SOURCE":
        call["chosen"] = demo_source  # a string, not a list of them
    refused(lambda: models.generate(**call), message)
    assert models._loaded == {}  # nothing loaded: not the page's pipelines, not a path it was sent


@pytest.mark.parametrize(
    ("class_name", "message"),
    [
        (None, r"`class_name`=None must be one of the page's classes: 0, 1, 2, .*9"),
        ("zzz", r"`class_name`='zzz' must be one of the page's classes: 0, 1"),
        (3, r"`class_name`=3 must be one of the page's classes"),
        ("10", r"`class_name`='10' must be one of"),
    ],
)
def test_demo_class_names_are_the_pages_own(demo_source, class_name, message):
    models = DemoModels([demo_source])
    refused(lambda: models.generate(class_name, 2, 1.0, 0, [demo_source]), message)


# --- quantization calibration --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("calibration", "message"),
    [
        (
            CalibrationSettings(num_batches=1, batch_size=10**9, num_inference_steps=1),
            r"`calibration\.batch_size`=1000000000 images .* available \(allowed here: 1\.\.\d+\)",
        ),
        (CalibrationSettings(num_batches=10**9, batch_size=1), r"`calibration\.num_batches`=1000000000 .*1\.\.1000"),
        (CalibrationSettings(num_batches=0), r"`calibration\.num_batches`=0 must be an integer in 1\.\.1000"),
        (CalibrationSettings(num_batches=2.5), r"`calibration\.num_batches`=2\.5 must be an integer"),
        (CalibrationSettings(num_inference_steps=0), r"`calibration\.num_inference_steps`=0 .* 1\.\.1000"),
        (CalibrationSettings(num_inference_steps=10**6), r"`calibration\.num_inference_steps`=1000000 .*1\.\.1000"),
        (CalibrationSettings(guidance_scale=math.nan), r"`calibration\.guidance_scale`=nan must be a finite number"),
        (CalibrationSettings(guidance_scale=0.5), r"`calibration\.guidance_scale`=0\.5 .*\[1, 65504\]"),
        (CalibrationSettings(seed=-1), r"`calibration\.seed`=-1 must be an integer in 0\.\.18446744073709551615"),
        (CalibrationSettings(seed=2**70), r"`calibration\.seed`=1180591620717411303424 must be an integer"),
        (CalibrationSettings(batch_size=0), r"`calibration\.batch_size`=0 must be a positive integer"),
        ({"num_batches": 1}, r"`calibration` must be a CalibrationSettings \(.*num_batches.*\) or None, got a dict"),
        ("fast", r"`calibration` must be a CalibrationSettings .* got str"),
    ],
    ids=lambda value: repr(value)[:60],
)
def test_quantize_refuses_calibration_it_cannot_run(calibration, message):
    pipeline = tiny_pixel_pipeline()
    before = {name: tensor.clone() for name, tensor in pipeline.transformer.state_dict().items()}
    refused(
        lambda: quantize(pipeline, backend="quanto", weights="int8", activations="int8", calibration=calibration),
        message,
    )
    after = pipeline.transformer.state_dict()
    assert all(torch.equal(before[name], after[name]) for name in before)


def test_quantize_calibrates_with_valid_settings_and_on_a_bare_model():
    settings = CalibrationSettings(num_batches=1, batch_size=2, num_inference_steps=2, seed=2**64 - 1)
    quantized = quantize(
        tiny_pixel_pipeline(), backend="quanto", weights="int8", activations="int8", calibration=settings
    )
    images = quantized([1, 2], num_inference_steps=2, guidance_scale=1.0, output_type="np").images
    assert images.shape == (2, 8, 8, 1) and torch.isfinite(torch.as_tensor(images)).all()
    refused(
        lambda: quantize(tiny_model(), backend="quanto", weights="int8", activations="int8", calibration={}),
        r"got a dict",
    )


# --- pruning -----------------------------------------------------------------------------------------------------

DATA, LABELS = torch.randn(4, 1, 8, 8), torch.tensor([0, 1, 2, 9])


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"data": torch.full((2, 1, 8, 8), math.nan), "labels": torch.tensor([1, 2])}, r"`data` holds NaN or infinite"),
        ({"data": torch.full((2, 1, 8, 8), math.inf), "labels": torch.tensor([1, 2])}, r"`data` holds NaN or infinite"),
        (
            {"data": torch.full((1, 1, 8, 8), math.nan).expand(10**6, 1, 8, 8), "labels": torch.zeros(10**6).long()},
            r"`data` holds NaN",
        ),
        (
            {"data": torch.zeros(2, 3, 5, 5), "labels": torch.tensor([1, 2])},
            r"`data` has shape \(2, 3, 5, 5\).*\(N, 1, 8, 8\)",
        ),
        ({"data": torch.zeros(8, 8), "labels": torch.tensor([1, 2])}, r"`data` has shape \(8, 8\)"),
        (
            {"data": torch.zeros(0, 1, 8, 8), "labels": torch.zeros(0).long()},
            r"`data` has shape \(0, 1, 8, 8\).*N >= 1",
        ),
        (
            {"data": torch.zeros(2, 1, 8, 8, dtype=torch.long), "labels": torch.tensor([1, 2])},
            r"`data` must be a float",
        ),
        ({"data": [[0.0]], "labels": torch.tensor([1])}, r"`data` must be a float tensor .* got list"),
        ({"data": DATA, "labels": torch.tensor([100, -1, 0, 0])}, r"`labels` holds -?\d+; allowed values: 0\.\.9"),
        ({"data": DATA, "labels": torch.tensor([0, 1, 2, 10])}, r"`labels` holds 10; allowed values: 0\.\.9"),
        ({"data": DATA, "labels": torch.tensor([0, 1])}, r"`labels` has shape \(2,\).*shape \(4,\)"),
        ({"data": DATA, "labels": DATA[:, 0, 0, 0]}, r"`labels` must be an integer tensor of 4 class indices"),
        ({"data": DATA, "labels": torch.tensor([True, False, True, False])}, r"`labels` has shape .*torch\.bool"),
        ({"data": DATA}, r"`labels` is missing"),
        ({"labels": LABELS}, r"`data` is missing"),
        ({"data": DATA, "labels": LABELS, "importance": "l1"}, r"`data` / `labels` only feed importance='taylor'"),
        ({"importance": "random", "seed": 2**70}, r"`seed`=1180591620717411303424 must be an integer in 0\.\."),
        ({"importance": "random", "seed": -1}, r"`seed`=-1 must be an integer in 0\.\.18446744073709551615"),
        ({"seed": 1.5}, r"`seed`=1\.5 must be an integer"),
        ({"importance": "magnitude"}, r"Unknown `importance`='magnitude'; allowed values: l1, l2, taylor, random"),
    ],
    ids=lambda value: ",".join(sorted(value)) if isinstance(value, dict) else "",
)
def test_prune_refuses_inputs_naming_the_parameter(options, message):
    pipeline = tiny_pixel_pipeline()
    options = {"importance": "taylor", **options}
    refused(lambda: prune(pipeline, heads=0.5, **options), message)
    assert all(parameter.grad is None for parameter in pipeline.transformer.parameters())


def test_non_finite_importance_scores_are_refused_not_ranked():
    model = tiny_model(in_channels=1, out_channels=2)
    with torch.no_grad():
        model.transformer_blocks[0].attn1.to_q.weight[0, 0] = math.nan
    for importance in ("l1", "l2", "taylor"):
        refused(lambda i=importance: prune(model, heads=0.5, importance=i), rf"`importance`='{importance}' gives NaN")
        refused(lambda i=importance: importance_scores(model, i), rf"`importance`='{importance}' gives NaN")
    # random scores do not read the weights: they stay a valid (seeded) choice
    assert prune(model, heads=0.5, importance="random", seed=3).config.layer_heads == [2, 2]


def test_prune_with_valid_taylor_data_and_seed():
    pipeline = tiny_pixel_pipeline()
    pruned = prune(pipeline, heads=0.5, importance="taylor", data=DATA, labels=LABELS, seed=2**64 - 1)
    assert pruned.transformer.config.layer_heads == [2, 2]
    images = pruned([1, 2], num_inference_steps=2, guidance_scale=1.0, output_type="np").images
    assert torch.isfinite(torch.as_tensor(images)).all()

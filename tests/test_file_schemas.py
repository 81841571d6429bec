"""Every file kind the package reads, hostile: wrong types, missing keys, NaN tokens, huge numbers, injection strings
and FIFOs give a ``DiTOptimumError`` naming the file and the field (never a KeyError, TypeError or AttributeError,
never a hang), and values rendered into cards, snippets, READMEs and Space configs are validated or escaped.

Property tests (hypothesis) feed each reader arbitrary JSON and mutations of a valid file: a reader either returns
content that satisfies its schema or refuses it with ``DiTOptimumError``."""

from __future__ import annotations

import copy
import json
import math
import os
import re
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import tiny_model
from dit_optimum import DiTOptimumError, DiTOptimumPipeline, DiTOptimumTransformer2DModel
from dit_optimum.benchmark import load_results
from dit_optimum.cli import main as cli
from dit_optimum.conversion import _load_id2label
from dit_optimum.data import LATENTS_METADATA, _read_latents_metadata
from dit_optimum.hub.cards import loading_code, model_card, pick_row
from dit_optimum.hub.demo import load_pipeline
from dit_optimum.hub.releases import release
from dit_optimum.hub.space import export_space, release_repo_ids
from dit_optimum.hub.upload import push
from dit_optimum.pipelines.dit import _check_model_index
from dit_optimum.schemas import (
    CLASSIFIER_METADATA,
    CONFIG,
    ID2LABEL_FILE,
    MAX_JSON_BYTES,
    MODEL_INDEX,
    RELEASE_RESULTS,
    RESULTS,
    TRAINER_STATE,
    InvalidJSONError,
    SchemaError,
    markdown_text,
    read_config_file,
    read_json_file,
    read_regular_file,
    repo_id_problem,
    validate,
)
from dit_optimum.schemas import (
    LATENTS_METADATA as LATENTS_SCHEMA,
)
from dit_optimum.training.checkpoints import TENSOR_FILES, _read_run_state

REPO = Path(__file__).resolve().parents[1]
# A real release file (the example card's): the valid base every hostile variant below starts from.
RELEASE = json.loads((REPO / "model_cards" / "dit_optimum_results.json").read_text())
INJECTION = "float16)\nimport os; os.system('touch /tmp/pwned')\n#"
MARKUP = "x](javascript:alert(1)) <script>alert(1)</script> | **bold** `code`"
NOT_OURS = (KeyError, TypeError, AttributeError, IndexError, RecursionError, UnicodeDecodeError, OverflowError)


def write(path: Path, content: Any) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists() and not path.is_file():  # never open a FIFO of an earlier step for writing: it would block
        path.unlink()
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    return path


def finishes(call: Callable[[], Any], seconds: float = 60) -> Any:
    """``call()``'s result or exception, run in a thread that must end within ``seconds`` (a blocked read fails)."""
    outcome: dict[str, Any] = {}

    def run():
        try:
            outcome["value"] = call()
        except BaseException as error:
            outcome["error"] = error

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"still running after {seconds} s (blocked on a FIFO?)"
    return outcome


def refused(call: Callable[[], Any], *patterns: str) -> DiTOptimumError:
    """``call()`` raises DiTOptimumError whose message matches every pattern; nothing else, no hang."""
    outcome = finishes(call)
    error = outcome.get("error")
    assert isinstance(error, DiTOptimumError), f"expected DiTOptimumError, got {error!r} / {outcome.get('value')!r}"
    for pattern in patterns:
        assert re.search(pattern, str(error), re.S), f"{pattern!r} not in {error}"
    return error


def fifo(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists():
        path.unlink()
    os.mkfifo(path)
    return path


def release_with(edit: Callable[[dict], Any]) -> dict:
    content = copy.deepcopy(RELEASE)
    edit(content)
    return content


def row_of(content: dict, technique: str = "int8") -> dict:
    return next(row for row in content["rows"] if row["technique"] == technique)


def set_row(technique: str, key: str, value: Any) -> Callable[[dict], None]:
    return lambda content: row_of(content, technique).__setitem__(key, value)


# --- the reading layer -------------------------------------------------------------------------------------------


def test_a_fifo_device_or_folder_is_refused_at_once_naming_it(tmp_path):
    pipe = fifo(tmp_path / "results.json")
    refused(lambda: read_regular_file(pipe), r"results\.json' is a FIFO, not a regular file")
    refused(lambda: read_json_file(tmp_path), r"is a folder, not a regular file")
    refused(lambda: read_json_file("/dev/null"), r"'/dev/null' is a device, not a regular file")
    refused(lambda: read_json_file(tmp_path / "missing.json"), r"missing\.json' does not exist")


def test_a_json_file_above_the_cap_is_refused_before_it_is_read(tmp_path):
    big = tmp_path / "big.json"
    with big.open("wb") as stream:  # sparse: nothing is written, yet fstat says 64 MiB + 1
        stream.truncate(MAX_JSON_BYTES + 1)
    refused(lambda: read_json_file(big), rf"big\.json' is {MAX_JSON_BYTES + 1} bytes, above the {MAX_JSON_BYTES}")
    small = write(tmp_path / "small.json", '{"a": "' + "x" * 200 + '"}')
    refused(lambda: read_json_file(small, max_bytes=100), r"small\.json' is 2\d\d bytes, above the 100 bytes")


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ('{"a": NaN}', r"NaN is not a JSON number"),
        ('{"a": Infinity}', r"Infinity is not a JSON number"),
        ("[-Infinity]", r"-Infinity is not a JSON number"),
        ('{"a": 1e400}', r"too large \(it overflows to infinity\)"),
        ("9" * 5000, r"not valid JSON"),  # more digits than Python converts
        ("[" * 200_000 + "]" * 200_000, r"not valid JSON \(nested too deeply\)"),
        ('{"a": 1', r"not valid JSON \(Expecting"),
        ("", r"not valid JSON"),
    ],
    ids=["nan", "infinity", "minus-infinity", "overflow", "huge-integer", "deep", "truncated", "empty"],
)
def test_strict_json_refuses_what_is_not_finite_json_naming_the_file(tmp_path, text, problem):
    path = write(tmp_path / "kind.json", text)
    error = refused(lambda: read_json_file(path), r"kind\.json' is ", problem)
    assert isinstance(error, InvalidJSONError)


def test_invalid_utf8_is_refused_naming_the_file(tmp_path):
    path = tmp_path / "latin.json"
    path.write_bytes(b'{"a": "caf\xe9"}')
    refused(lambda: read_json_file(path), r"latin\.json' is not UTF-8 text")


def test_schema_errors_name_the_file_and_the_field_path(tmp_path):
    content = release_with(set_row("int8", "class_accuracy", "x"))
    content["rows"] = [content["rows"][0]] * 3 + content["rows"]
    path = write(tmp_path / "results.json", content)
    error = refused(lambda: read_json_file(path, RESULTS))
    assert isinstance(error, SchemaError) and error.field == "rows[4].class_accuracy"
    assert str(error) == (
        f"{str(path)!r}: rows[4].class_accuracy must be a finite number in [0, 1] (a share, shown x100 in %), got 'x'"
    )
    missing = write(tmp_path / "missing.json", release_with(lambda c: c["rows"][1].pop("technique")))
    refused(lambda: read_json_file(missing, RESULTS), r"missing\.json': rows\[1\] needs \"technique\"")


# --- results.json: the benchmark's resume, release, push ---------------------------------------------------------

HOSTILE_RESULTS = [
    ("a list", [], r"not a dit-optimum results file: the top level must be an object, got a list"),
    ("a string", '"rows"', r"not a dit-optimum results file: the top level must be an object, got 'rows'"),
    ("rows an object", {"rows": {"0": {}}}, r"rows must be a list"),
    ("no rows", {"settings": {}}, r"needs \"rows\""),
    ("row a list", {"rows": [[1, 2]]}, r"rows\[0\] must be an object"),
    ("no technique", release_with(lambda c: c["rows"][0].pop("technique")), r"rows\[0\] needs \"technique\""),
    (
        "unknown technique",
        release_with(set_row("int8", "technique", "rm -rf")),
        r"rows\[1\]\.technique must be a "
        r"registered technique \(allowed values: baseline",
    ),
    ("variant injection", release_with(set_row("int8", "variant", "DiT-XS/4\n# hi")), r"rows\[1\]\.variant"),
    (
        "dtype injection",
        release_with(set_row("int8", "dtype", INJECTION)),
        r"rows\[1\]\.dtype must be a torch float "
        r"dtype name \(allowed values: float32",
    ),
    ("dtype an attribute", release_with(set_row("int8", "dtype", "load")), r"rows\[1\]\.dtype"),
    ("status", release_with(set_row("int8", "status", True)), r"rows\[1\]\.status must be a cell status"),
    ("metric text", release_with(set_row("int8", "fd_domain", "x")), r"rows\[1\]\.fd_domain must be a finite number"),
    ("metric huge", release_with(set_row("int8", "fd_domain", 1e300)), r"rows\[1\]\.fd_domain must be a finite"),
    ("metric NaN", json.dumps(release_with(set_row("int8", "fd_domain", math.nan))), r"NaN is not a JSON number"),
    (
        "interval",
        release_with(set_row("int8", "fd_domain_interval", [1])),
        r"rows\[1\]\.fd_domain_interval must be "
        r"a list of 2 values",
    ),
    ("hardware a list", release_with(set_row("int8", "hardware", ["AMD"])), r"rows\[1\]\.hardware must be an object"),
    (
        "settings a list",
        release_with(set_row("int8", "quality_settings", [])),
        r"rows\[1\]\.quality_settings must "
        r"be an object",
    ),
    (
        "steps injection",
        release_with(lambda c: row_of(c)["quality_settings"].__setitem__("num_inference_steps", "10); import os")),
        r"rows\[1\]\.quality_settings\.num_inference_steps must be an "
        r"integer",
    ),
    (
        "sample grid outside",
        release_with(set_row("int8", "sample_grid", "../../../etc/passwd")),
        r"rows\[1\]\.sample_grid must be a PNG in the samples folder",
    ),
    ("verdict markup", release_with(set_row("int8", "quality_verdict", MARKUP)), r"rows\[1\]\.quality_verdict"),
    (
        "sampler code",
        release_with(set_row("int8", "sampler", "DDIM()\nimport os")),
        r"rows\[1\]\.sampler must be a "
        r"Python identifier",
    ),
    (
        "count negative",
        release_with(set_row("int8", "num_samples", -1)),
        r"rows\[1\]\.num_samples must be an "
        r"integer >= 0",
    ),
    ("boolean count", release_with(set_row("int8", "num_samples", True)), r"rows\[1\]\.num_samples"),
    (
        "vs_baseline",
        release_with(set_row("int8", "vs_baseline", {"fd_domain": {"difference": 1}})),
        r"rows\[1\]\.vs_baseline\.fd_domain needs \"interval\"",
    ),
    (
        "settings data",
        release_with(lambda c: c["settings"].__setitem__("image_size", "16")),
        r"settings\.image_size must be an integer >= 1",
    ),
    (
        "release repo id",
        release_with(lambda c: c["release"].__setitem__("repo_id", "org/x)<script>")),
        r"release\.repo_id must be a Hub repository id",
    ),
    (
        "release base model",
        release_with(lambda c: c["release"].__setitem__("base_model", "javascript:alert(1)")),
        r"release\.base_model must be a Hub repository id",
    ),
]


@pytest.mark.parametrize(("content", "message"), [c[1:] for c in HOSTILE_RESULTS], ids=[c[0] for c in HOSTILE_RESULTS])
def test_a_hostile_results_file_stops_the_benchmark_resume_naming_file_and_field(tmp_path, content, message):
    write(tmp_path / "results.json", content)
    refused(lambda: load_results(tmp_path), r"The results file .*results\.json", message)


@pytest.mark.parametrize(("content", "message"), [c[1:] for c in HOSTILE_RESULTS], ids=[c[0] for c in HOSTILE_RESULTS])
def test_a_hostile_results_file_is_refused_by_push_before_anything_is_staged(tmp_path, content, message):
    pipeline = tmp_path / "pipe"
    write(pipeline / "model_index.json", {"transformer": ["dit_optimum", "DiTOptimumTransformer2DModel"]})
    write(pipeline / "dit_optimum_results.json", content)
    refused(
        lambda: push(pipeline, "org/x", dry_run=tmp_path / "dry"), r"`results`=.*dit_optimum_results\.json", message
    )
    assert not (tmp_path / "dry").exists()


@pytest.mark.parametrize(
    ("content", "message"),
    [c[1:] for c in HOSTILE_RESULTS[:8]] + [(HOSTILE_RESULTS[12][1], HOSTILE_RESULTS[12][2])],
    ids=[c[0] for c in HOSTILE_RESULTS[:8]] + [HOSTILE_RESULTS[12][0]],
)
def test_a_hostile_results_folder_is_refused_by_release_before_anything_is_written(tmp_path, content, message):
    write(tmp_path / "bench" / "results.json", content)
    refused(lambda: release(tmp_path / "bench", "org", tmp_path / "out"), message)
    assert not (tmp_path / "out").exists()


def test_a_fifo_in_place_of_a_results_file_is_refused_not_waited_on(tmp_path):
    fifo(tmp_path / "bench" / "results.json")
    refused(lambda: load_results(tmp_path / "bench"), r"results\.json.* is damaged \(a FIFO, not a regular file\)")
    refused(lambda: release(tmp_path / "bench", "org", tmp_path / "out"), r"a FIFO, not a regular file")
    pipeline = tmp_path / "pipe"
    write(pipeline / "model_index.json", {"transformer": ["dit_optimum", "DiTOptimumTransformer2DModel"]})
    fifo(pipeline / "dit_optimum_results.json")
    refused(lambda: push(pipeline, "org/x", dry_run=tmp_path / "dry"), r"a FIFO, not a regular file")
    assert not (tmp_path / "dry").exists() and not (tmp_path / "out").exists()


def test_the_cli_reports_a_hostile_results_file_as_one_line(tmp_path, capsys):
    write(tmp_path / "bench" / "results.json", release_with(set_row("int8", "dtype", INJECTION)))
    assert cli(["release", str(tmp_path / "bench"), "org", "--dry-run", str(tmp_path / "out")]) == 2
    error = capsys.readouterr().err
    assert "rows[1].dtype must be a torch float dtype name" in error and "Traceback" not in error


# --- release files: export-space, the demo -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ([], r"the top level must be an object, got a list"),
        ({"rows": []}, r"needs \"release\""),
        (release_with(lambda c: c.pop("release")), r"needs \"release\""),
        (
            release_with(lambda c: c["release"].__setitem__("repo_id", "org/x)\n<script>alert(1)</script>")),
            r"release\.repo_id must be a Hub repository id",
        ),
        (release_with(lambda c: c["release"].__setitem__("repo_id", "[x](javascript:alert(1))")), r"release\.repo_id"),
        (
            release_with(lambda c: c["release"].__setitem__("technique", "nope")),
            r"release\.technique must be a "
            r"registered technique",
        ),
        (release_with(lambda c: c["release"].__setitem__("repo_id", ["org/x"])), r"release\.repo_id"),
        (json.dumps(release_with(set_row("int8", "latency_s", math.inf))), r"Infinity is not a JSON number"),
    ],
)
def test_a_hostile_release_file_is_refused_by_export_space_before_anything_is_written(tmp_path, content, message):
    write(tmp_path / "releases" / "dit-xs4-int8" / "dit_optimum_results.json", content)
    refused(
        lambda: release_repo_ids(tmp_path / "releases"),
        r"dit_optimum_results\.json.* is not a release's "
        r"results file",
        message,
    )
    refused(lambda: export_space(tmp_path / "releases", tmp_path / "space"), message)
    assert not (tmp_path / "space").exists()


def test_export_space_validates_its_title_and_escapes_it_in_the_readme(tmp_path):
    write(tmp_path / "releases" / "dit-xs4-int8" / "dit_optimum_results.json", RELEASE)
    assert release_repo_ids(tmp_path / "releases") == ["dit-optimum/dit-xs4-int8"]
    for title in ("two\nlines", "", "x" * 201, 3):
        refused(lambda t=title: export_space(tmp_path / "releases", tmp_path / "space", title=t), r"`title`=")
    assert not (tmp_path / "space").exists()
    export_space(tmp_path / "releases", tmp_path / "space", title=MARKUP)
    readme = (tmp_path / "space" / "README.md").read_text()
    body = readme.split("---", 2)[2]
    assert "<script>" not in body and "&lt;script&gt;" in body and r"x\](javascript:" in body
    from huggingface_hub import SpaceCard

    assert SpaceCard(readme).data.title == MARKUP  # the front matter holds it as written, YAML-quoted
    config = json.loads((tmp_path / "space" / "space_config.json").read_text())
    assert config == {"title": MARKUP, "pipelines": ["dit-optimum/dit-xs4-int8"]}


def test_the_demo_names_a_hostile_release_file_instead_of_loading_it(tmp_path):
    folder = tmp_path / "release"
    write(folder / "dit_optimum_results.json", release_with(set_row("int8", "dtype", "load")))
    loaded = finishes(lambda: load_pipeline(str(folder)))["value"]
    assert loaded.pipeline is None and "rows[1].dtype must be a torch float dtype name" in loaded.error
    fifo(folder / "dit_optimum_results.json")
    loaded = finishes(lambda: load_pipeline(str(folder)))["value"]
    assert loaded.pipeline is None and "a FIFO, not a regular file" in loaded.error


# --- cards and snippets: every rendered value validated or escaped -----------------------------------------------


def test_the_card_snippet_refuses_injected_values():
    settings = {"num_inference_steps": 10, "guidance_scale": 2.0}
    good = loading_code("my-org/dit-xs4-int8", {"dtype": "bfloat16", "quality_settings": settings})
    assert 'DiffusionPipeline.from_pretrained("my-org/dit-xs4-int8", torch_dtype=torch.bfloat16)' in good
    compile(good, "card", "exec")  # the snippet is Python as printed
    for row, field in (
        ({"dtype": INJECTION}, "dtype"),
        ({"dtype": "load"}, "dtype"),
        ({"quality_settings": {"num_inference_steps": "10); import os"}}, "num_inference_steps"),
        ({"quality_settings": {"guidance_scale": math.nan}}, "guidance_scale"),
        ({"quality_settings": {"guidance_scale": "2.0, generator=__import__('os')"}}, "guidance_scale"),
    ):
        refused(lambda r=row: loading_code("org/x", r), rf"`row`: .*{field}")
    for repo_id in ('org/x")\nimport os', "org/x y", "../x", "org/"):
        refused(lambda r=repo_id: loading_code(r, {}), r"`repo_id`=")


def test_a_card_refuses_unknown_techniques_non_finite_numbers_and_bad_ids():
    int8 = row_of(RELEASE)
    card = model_card(RELEASE, int8, "org/dit-xs4-int8", "org/dit-xs4-baseline")
    assert card.data.base_model == "org/dit-xs4-baseline"
    for key, value in (("class_accuracy", math.nan), ("fd_domain", math.inf), ("latency_s", -math.inf)):
        refused(
            lambda k=key, v=value: model_card(RELEASE, {**int8, k: v}, "org/x"),
            rf"`technique_row`: {key} must "
            r"be a finite number",
        )
    refused(lambda: model_card(RELEASE, {**int8, "technique": "pwn"}, "org/x"), r"technique must be a registered")
    nan_baseline = release_with(set_row("baseline", "fd_domain", math.nan))
    refused(lambda: model_card(nan_baseline, int8, "org/x"), r"`results`: rows\[0\]\.fd_domain must be a finite")
    refused(lambda: model_card(RELEASE, int8, "org/x", base_model="javascript:alert(1)"), r"`base_model`=")
    refused(lambda: model_card(RELEASE, int8, "org/x)[a](b"), r"`repo_id`=")
    refused(
        lambda: pick_row(release_with(set_row("int8", "technique", "pwn")), "file.json"), r"'file\.json': rows\[1\]"
    )


def test_free_text_of_a_row_reaches_the_card_escaped():
    def hostile(content):
        for row in content["rows"]:
            row["hardware"] = {**row["hardware"], "cpu": MARKUP, "gpu": "<img src=x onerror=alert(1)>"}
            row["description"] = MARKUP
            row["quality_settings"] = {**row["quality_settings"], "reference": "[evil](javascript:alert(1))"}
        content["settings"]["data"] = "<b>data</b>\n# heading"

    content = release_with(hostile)
    card = model_card(content, row_of(content), "org/dit-xs4-int8")
    body = card.text
    assert "<script>" not in body and "<img" not in body and "<b>" not in body and "\n# heading" not in body
    assert "&lt;script&gt;" in body and r"\[evil\](javascript:alert(1))" in body
    # the YAML keeps the raw text, quoted by the dumper: it parses back as written
    from huggingface_hub import ModelCard

    parsed = ModelCard(str(card))
    speed = {result.metric_type: result for result in parsed.data.eval_results}["latency_s"]
    assert MARKUP in speed.metric_args["hardware"]


def test_markdown_text_leaves_no_markup():
    text = markdown_text("a\nb\r\n# c *d* _e_ [f](g) <h> `i` | j ~k~ $l$ \\ !m \x00")
    assert "\n" not in text and "<" not in text and "\x00" not in text
    assert text == r"a b \# c \*d\* \_e\_ \[f\](g) &lt;h&gt; \`i\` \| j \~k\~ \$l\$ \\ \!m"
    assert markdown_text("x" * 1000).endswith("...") and len(markdown_text("x" * 1000)) == 300


def test_push_validates_the_base_model_before_anything_is_staged(tmp_path, capsys):
    pipeline = tmp_path / "pipe"
    write(pipeline / "model_index.json", {"transformer": ["dit_optimum", "DiTOptimumTransformer2DModel"]})
    write(pipeline / "dit_optimum_results.json", RELEASE)
    for base in ("javascript:alert(1)", "org/x)\n[a](b)", "a/b/c", ""):
        refused(lambda b=base: push(pipeline, "org/x", dry_run=tmp_path / "dry", base_model=b), r"`base_model`=")
    code = cli(["push", str(pipeline), "org/x", "--dry-run", str(tmp_path / "dry"), "--base-model", "<x>/y"])
    assert code == 2 and "`base_model`='<x>/y' is not a valid Hub repository id" in capsys.readouterr().err
    assert not (tmp_path / "dry").exists()


# --- checkpoint state, latents and classifier metadata, configs, model index, id2label -------------------------

VALID_STATE = {
    "format": 1,
    "step": 3,
    "processes": 1,
    "config": {"steps": 5},
    "history": {"config": {"steps": 5}, "resumes": []},
    "inputs": {"data": {"samples": 8, "shape": [1, 8, 8], "classes": 10, "sha256": "0" * 64}, "teacher": None},
    "ema": {"decay": 0.9, "warmup": True, "updates": 3},
    "optimizer": {"param_groups": [{"lr": 0.001}], "scalars": {"0": {"step": 3}}},
    "grad_scaler": None,
}


def checkpoint(folder: Path, state: Any) -> Path:
    step = folder / "checkpoints" / "step_3"
    for name in (*TENSOR_FILES, "rng_state_0.safetensors"):
        write(step / name, "")
    write(step / "trainer_state.json", state)
    return step


def with_state(**changes: Any) -> dict:
    return {**copy.deepcopy(VALID_STATE), **changes}


@pytest.mark.parametrize(
    ("state", "message"),
    [
        ([], r"not a trainer state of checkpoint format 1"),
        ("7", r"not a trainer state of checkpoint format 1"),
        (with_state(processes="1"), r"processes must be an integer >= 1 and <= 65536, got '1'"),
        (with_state(processes=10**12), r"processes must be an integer"),
        (with_state(ema={"decay": 0.9, "warmup": True}), r"ema needs \"updates\""),
        (with_state(ema={"decay": "0.9", "warmup": True, "updates": 1}), r"ema\.decay must be a finite number"),
        (
            with_state(history={"config": {}, "resumes": [{"start_step": 1}]}),
            r"history\.resumes\[0\] needs "
            r"\"changed\"",
        ),
        (with_state(inputs={"data": {"samples": 8}}), r"inputs\.data needs \"shape\""),
        (with_state(optimizer={"param_groups": [], "scalars": {"x": {}}}), r"optimizer\.scalars\.x \(a key\) must"),
        (json.dumps(with_state(ema={"decay": math.nan, "warmup": True, "updates": 1})), r"NaN is not a JSON number"),
        (with_state(step=4), r"step 4 in the folder of step 3"),
    ],
)
def test_a_hostile_trainer_state_is_named_never_a_raw_error(tmp_path, state, message):
    step = checkpoint(tmp_path, state)
    refused(lambda: _read_run_state(step), r"Cannot resume from .*step_3/trainer_state\.json'", message)


def test_a_valid_trainer_state_reads_back_as_written(tmp_path):
    assert _read_run_state(checkpoint(tmp_path, VALID_STATE)) == VALID_STATE


@pytest.mark.parametrize("name", ["trainer_state.json", "model.safetensors", "rng_state_0.safetensors"])
def test_a_fifo_in_a_checkpoint_stops_the_resume_instead_of_blocking_it(tmp_path, name):
    from dit_optimum.training.checkpoints import resume_point
    from dit_optimum.training.config import TrainConfig

    step = checkpoint(tmp_path, VALID_STATE)
    fifo(step / name)
    config = TrainConfig(output_dir=str(tmp_path), resume=True, steps=5)
    refused(lambda: resume_point(config, tmp_path), rf"Cannot resume from .*step_3.*{re.escape(name)}.*not a regular")


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ([], r"the top level must be an object, got a list"),
        ({"vae": ""}, r"vae must be the VAE's folder or Hub id"),
        ({"vae": ["x"]}, r"vae must be"),
        ({"vae": "v", "id2label": ["a"]}, r"id2label must be an object"),
        ({"vae": "v", "id2label": {"0": 1}}, r"id2label\[\"0\"\] must be a class name"),
        ({"vae": "v", "id2label": {"-1": "a"}}, r"id2label\[\"-1\"\] \(a key\) must be a class index"),
        ('{"vae": "v", "id2label": {"0": NaN}}', r"NaN is not a JSON number"),
    ],
)
def test_hostile_latents_metadata_is_named(tmp_path, content, message):
    path = write(tmp_path / LATENTS_METADATA, content)
    refused(lambda: _read_latents_metadata(path), rf"Latents metadata .*{LATENTS_METADATA}", message)


def test_a_fifo_in_a_latents_folder_is_refused(tmp_path):
    from dit_optimum.data import load_training_data

    fifo(tmp_path / "latents" / LATENTS_METADATA)
    refused(lambda: load_training_data(str(tmp_path / "latents")), r"a FIFO, not a regular file")
    write(tmp_path / "latents" / LATENTS_METADATA, {"vae": "v"})
    fifo(tmp_path / "latents" / "state.json")
    refused(lambda: load_training_data(str(tmp_path / "latents")), r"latents/state\.json' is a FIFO")


@pytest.mark.parametrize(
    "content",
    [
        [],
        {"num_classes": "10", "held_out_accuracy": 1, "held_out_samples": 1},
        {"num_classes": 10},
        {"num_classes": 10, "held_out_accuracy": 2.0, "held_out_samples": 1},
        '{"num_classes": NaN}',
    ],
)
def test_hostile_classifier_metadata_is_named(tmp_path, content):
    path = write(tmp_path / "classifier.json", content)
    refused(lambda: read_json_file(path, CLASSIFIER_METADATA), r"classifier\.json'")


def test_an_unreadable_classifier_cache_is_retrained_with_a_warning_not_waited_on(tmp_path, monkeypatch):
    from dit_optimum.evaluation.domain import ClassifierRecipe, classifier_cache_path, domain_classifier
    from dit_optimum.evaluation.reference import real_split

    monkeypatch.setenv("DIT_OPTIMUM_CACHE", str(tmp_path / "cache"))
    split, recipe = real_split("digits", "train", 40, 20), ClassifierRecipe(epochs=1)
    first = domain_classifier(split, 8, recipe)
    path = classifier_cache_path(split, 8, recipe).with_suffix(".json")

    def retrain():
        with pytest.warns(UserWarning, match=r"Domain classifier cache .* unreadable"):
            return domain_classifier(split, 8, recipe)

    for damage in ("fifo", '{"num_classes": 10, "held_out_accuracy": "high", "held_out_samples": 1}'):
        if damage == "fifo":
            fifo(path)
        else:
            write(path, damage)
        outcome = finishes(retrain)
        assert "error" not in outcome, outcome.get("error")
        assert outcome["value"].num_classes == first.num_classes and path.is_file()


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("[1, 2]", r"config\.json' must hold a JSON object \(the transformer config\): the top level must be"),
        ('"x"', r"config\.json' must hold a JSON object"),
        ("3", r"config\.json' must hold a JSON object"),
        ('{"num_layers": NaN}', r"config\.json' is not a valid JSON file \(not valid JSON \(NaN"),
        ('{"_class_name": ["x"]}', r"_class_name must be"),
    ],
)
def test_a_hostile_model_config_is_named(tmp_path, content, message):
    tiny_model().save_pretrained(tmp_path / "transformer")
    (tmp_path / "transformer" / "config.json").write_text(content)
    refused(lambda: DiTOptimumTransformer2DModel.from_pretrained(tmp_path / "transformer"), message)


def saved_pipeline(folder: Path) -> Path:
    from diffusers import DDIMScheduler

    DiTOptimumPipeline(transformer=tiny_model(), scheduler=DDIMScheduler()).save_pretrained(folder)
    return folder


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda index: [index], r"does not describe a DiT pipeline \(the top level must be"),
        (lambda index: {**index, "id2label": ["zero"]}, r"id2label must be an object"),
        (lambda index: {**index, "id2label": {"zero": "0"}}, r"id2label\.zero \(a key\) must be a class index"),
        (lambda index: {**index, "transformer": "evil"}, r"transformer must be a list of 2 values"),
        (
            lambda index: {**index, "transformer": ["os", "system()"]},
            r"transformer\[1\] must be a library or class name",
        ),
        (lambda index: {k: v for k, v in index.items() if k != "transformer"}, r"needs \"transformer\""),
    ],
)
def test_a_hostile_model_index_is_named(tmp_path, edit, message):
    folder = saved_pipeline(tmp_path / "pipe")
    index = json.loads((folder / "model_index.json").read_text())
    write(folder / "model_index.json", edit(index))
    refused(lambda: DiTOptimumPipeline.from_pretrained(folder), r"model_index\.json", message)


@pytest.mark.parametrize(
    "name",
    [
        "model_index.json",
        "transformer/config.json",
        "transformer/diffusion_pytorch_model.safetensors",
        "scheduler/scheduler_config.json",
    ],
)
def test_a_fifo_in_a_pipeline_folder_is_refused_not_waited_on(tmp_path, name):
    folder = saved_pipeline(tmp_path / "pipe")
    fifo(folder / name)
    refused(lambda: DiTOptimumPipeline.from_pretrained(folder), rf"{re.escape(name)}'.* a FIFO, not a regular file")


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("[1, 2]", r"must hold a JSON object mapping class index to name.*the top level must be an object"),
        ('{"x": "cat"}', r"JSON object mapping class index.*x \(a key\) must be a class index"),
        ('{"0": null}', r"\[\"0\"\] must be a class name"),
        ('{"0": NaN}', r"is not valid JSON \(NaN is not a JSON number"),
        ('{"0": 1e999}', r"overflows to infinity"),
    ],
)
def test_a_hostile_id2label_file_is_named(tmp_path, content, message):
    path = write(tmp_path / "labels.json", content)
    refused(lambda: _load_id2label(str(path)), r"`id2label` file .*labels\.json'", message)
    fifo(path)
    refused(lambda: _load_id2label(str(path)), r"a FIFO, not a regular file")


# --- property tests: arbitrary and mutated JSON, each reader returns valid content or refuses it ----------------

SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(10**30), max_value=10**30)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=12)
    | st.sampled_from([INJECTION, MARKUP, "float16", "baseline", "org/x", "../x", "DiT-XS/4", "0", "ok", ""])
)
JSON_VALUES = st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=16,
)


def paths_of(value: Any, prefix: tuple = ()) -> list[tuple]:
    found = [prefix]
    if isinstance(value, dict):
        for key, item in value.items():
            found += paths_of(item, (*prefix, key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            found += paths_of(item, (*prefix, index))
    return found


@st.composite
def file_texts(draw, base: Any) -> str:
    """The text of a file: arbitrary JSON, or ``base`` with one value replaced or removed (sometimes by NaN)."""
    if draw(st.integers(0, 4)) == 0:
        return json.dumps(draw(JSON_VALUES))
    content = copy.deepcopy(base)
    path = draw(st.sampled_from(paths_of(content)))
    if not path:
        return json.dumps(draw(JSON_VALUES))
    parent = content
    for key in path[:-1]:
        parent = parent[key]
    action = draw(st.sampled_from(["replace", "remove", "nan"]))
    if action == "remove" and isinstance(parent, dict):
        del parent[path[-1]]
    else:
        parent[path[-1]] = math.nan if action == "nan" else draw(JSON_VALUES)
    return json.dumps(content)


def run_reader(read: Callable[[], Any]) -> Any:
    """The reader's result, or None when it refused with DiTOptimumError; any other exception fails the test."""
    try:
        return read()
    except DiTOptimumError:
        return None
    except NOT_OURS as error:  # pragma: no cover - what the schemas exist to prevent
        raise AssertionError(f"raw {type(error).__name__}: {error}") from error


PROPERTY = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@PROPERTY
@given(st.data())
def test_results_readers_return_valid_results_or_refuse(data):
    text = data.draw(file_texts(RELEASE))
    with tempfile.TemporaryDirectory() as folder:
        path = write(Path(folder) / "results.json", text)
        results = run_reader(lambda: load_results(folder))
        if results is not None:
            validate(results, RESULTS, "results")
            rows = [row for row in results["rows"] if row["status"] == "ok"]
            # a valid file renders a card for each finished row with a valid release identity, or refuses it
            for row in rows[:2]:
                card = run_reader(lambda r=row: model_card(results, r, "org/x"))
                if card is not None:
                    assert "<script>" not in card.text
                    assert all(math.isfinite(result.metric_value) for result in card.data.eval_results or [])
        assert run_reader(lambda: pick_row(read_json_file(path, RELEASE_RESULTS), path)) is None or results


@PROPERTY
@given(st.data())
def test_release_file_readers_return_valid_ids_or_refuse(data):
    text = data.draw(file_texts(RELEASE))
    with tempfile.TemporaryDirectory() as folder:
        write(Path(folder) / "dit-xs4-int8" / "dit_optimum_results.json", text)
        ids = run_reader(lambda: release_repo_ids(folder))
        if ids is not None:
            assert ids and all(repo_id_problem(repo_id) is None for repo_id in ids)
            validate(json.loads(text), RELEASE_RESULTS, "release")


@PROPERTY
@given(st.data())
def test_the_trainer_state_reader_returns_a_valid_state_or_refuses(data):
    text = data.draw(file_texts(VALID_STATE))
    with tempfile.TemporaryDirectory() as folder:
        state = run_reader(lambda: _read_run_state(checkpoint(Path(folder), text)))
        if state is not None:
            validate(state, TRAINER_STATE, "state")
            assert state["step"] == 3 and state["processes"] == 1


@PROPERTY
@given(st.data())
def test_the_small_file_readers_return_valid_content_or_refuse(data):
    kinds = [
        ("latents", {"vae": "some/vae", "id2label": {"0": "a", "1": "b"}}, _read_latents_metadata, LATENTS_SCHEMA),
        (
            "classifier",
            {"num_classes": 10, "held_out_accuracy": 0.9, "held_out_samples": 80},
            lambda path: read_json_file(path, CLASSIFIER_METADATA),
            CLASSIFIER_METADATA,
        ),
        ("config", {"_class_name": "DiTOptimumTransformer2DModel", "num_layers": 2}, read_config_file, CONFIG),
        ("id2label", {"0": "tench", "1": 7}, lambda path: _load_id2label(str(path)), ID2LABEL_FILE),
    ]
    name, base, read, schema = data.draw(st.sampled_from(kinds))
    text = data.draw(file_texts(base))
    with tempfile.TemporaryDirectory() as folder:
        path = write(Path(folder) / f"{name}.json", text)
        content = run_reader(lambda: read(path))
        if content is not None:
            validate(content, schema, name)


@PROPERTY
@given(st.data())
def test_the_model_index_check_accepts_valid_indices_only(data):
    base = {
        "_class_name": "DiTPipeline",
        "transformer": ["dit_optimum", "DiTOptimumTransformer2DModel"],
        "vae": ["dit_optimum", "IdentityAutoencoder"],
        "scheduler": ["diffusers", "DDIMScheduler"],
        "id2label": {"0": "zero"},
    }
    text = data.draw(file_texts(base))
    with tempfile.TemporaryDirectory() as folder:
        write(Path(folder) / "model_index.json", text)
        checked = run_reader(lambda: _check_model_index(Path(folder)) or True)
        if checked:
            validate(json.loads(text), MODEL_INDEX, "index")


@PROPERTY
@given(st.data())
def test_a_card_from_any_row_is_refused_or_carries_only_finite_escaped_values(data):
    row = json.loads(data.draw(file_texts(row_of(RELEASE))))  # NaN stays a float here, as in a row built in memory
    results = {**RELEASE, "rows": [RELEASE["rows"][0], row]}
    card = run_reader(lambda: model_card(results, row, "org/dit-xs4-int8"))
    if card is not None:
        validate(row, RESULTS.required["rows"].item, "row")
        assert "<script>" not in card.text and "\nimport os" not in card.text
        assert all(math.isfinite(result.metric_value) for result in card.data.eval_results or [])


def test_a_fifo_named_like_an_image_is_never_read(tmp_path):
    from PIL import Image

    from dit_optimum.data import image_folder_data, load_image

    for name in ("a/one.png", "b/two.png"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        Image.new("L", (8, 8), 128).save(tmp_path / name)
    pipe = fifo(tmp_path / "b" / "three.png")
    refused(lambda: load_image(pipe, 8, 1), r"Unreadable image .*three\.png.*a FIFO, not a regular file")
    outcome = finishes(lambda: image_folder_data(tmp_path, 8, 1, skip_corrupt=True))
    assert "error" not in outcome, outcome.get("error")
    data = outcome["value"]  # left out (ignored or skipped, named), never opened
    assert len(data.labels) == 2 and pipe in [*data.ignored_files, *data.skipped_files]

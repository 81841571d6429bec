"""The Space demo: exported folder layout, the app over real release folders through gradio_client, and an
end-to-end run in a real headless Chromium (Debian's `chromium` driven by Playwright) with a screenshot."""

from __future__ import annotations

import importlib
import os
import socket
import sys
from pathlib import Path

import pytest
import yaml
from huggingface_hub import SpaceCard
from PIL import Image

from dit_optimum.cli import main as cli
from dit_optimum.errors import DiTOptimumError
from dit_optimum.hub.demo import TABLE_HEADERS, DemoModels, build_demo
from dit_optimum.hub.space import export_space, space_requirements

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))  # demo_screenshot.py drives the browser for the test and the docs


@pytest.fixture(scope="module")
def sources(released) -> list[str]:
    return [str(released / "dit-xs4-baseline"), str(released / "dit-xs4-int8"), str(released / "dit-xs4-moe")]


@pytest.fixture(scope="module")
def app_url(sources, tmp_path_factory):
    broken = tmp_path_factory.mktemp("broken")
    (broken / "model_index.json").write_text("{not json")
    demo = build_demo([*sources, str(broken)])
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    demo.launch(server_name="127.0.0.1", server_port=port, share=False, prevent_thread_lock=True, quiet=True)
    yield f"http://127.0.0.1:{port}/"
    demo.close()


def test_the_models_generate_side_by_side_with_card_numbers_and_name_a_broken_one(sources, tmp_path):
    (tmp_path / "model_index.json").write_text("{not json")
    models = DemoModels([*sources[:2], str(tmp_path)])
    assert models.class_names() == [str(digit) for digit in range(10)]
    images, table = models.generate("7", 3, 2.0, 5, [*sources[:2], str(tmp_path)])
    assert len(images) == 2 and images[0][0].size == (64, 64)
    assert [row[0] for row in table] == [*sources[:2], str(tmp_path)]
    assert float(table[0][1]) > 0 and table[0][2] != "n/a"  # latency measured now; the card's class accuracy
    assert table[2][1].startswith("could not load: ") and "not valid JSON" in table[2][1]
    again, _ = models.generate("7", 3, 2.0, 5, sources[:1])
    assert list(again[0][0].getdata()) == list(images[0][0].getdata())  # same class and seed: same image
    with pytest.raises(DiTOptimumError, match="at least one pipeline"):
        models.generate("7", 3, 2.0, 5, [])
    with pytest.raises(DiTOptimumError, match="`pipelines` is empty"):
        DemoModels([])


def test_the_launched_app_answers_gradio_client(app_url, sources):
    from gradio_client import Client

    gallery, table = Client(app_url, verbose=False).predict("3", 2, 2.0, 1, sources[:2], api_name="/generate")
    assert len(gallery) == 2 and all(Path(item["image"]).is_file() for item in gallery)
    assert table["headers"] == TABLE_HEADERS and len(table["data"]) == 2


def test_the_page_in_a_real_browser_generates_and_shows_images_and_latencies(app_url, tmp_path):
    screenshot_script = importlib.import_module("demo_screenshot")
    shot = tmp_path / "page.png"
    latencies = screenshot_script.drive_demo(app_url, "7", 3, shot, len(TABLE_HEADERS))
    assert len(latencies) == 2 and all(value > 0 for value in latencies)  # the two chosen pipelines, timed now
    width, height = Image.open(shot).size
    assert width == 1280 and height > 600


def test_export_space_writes_a_ready_space(released, tmp_path):
    folder = export_space(released, tmp_path / "space")
    names = sorted(path.name for path in folder.iterdir())
    # the Space's files, and the package's record of what it wrote there (it replaces only those on a new export)
    expected = [".dit_optimum.manifest.json", "README.md", "app.py", "dit_optimum", "requirements.txt"]
    assert names == [*expected, "space_config.json"]
    card = SpaceCard.load(folder / "README.md")
    assert card.data.sdk == "gradio" and card.data.app_file == "app.py"
    assert card.data.sdk_version == __import__("gradio").__version__
    assert card.data.models[0] == "org/dit-xs4-baseline" and "org/dit-xs4-int8" in card.data.models
    requirements = (folder / "requirements.txt").read_text().split()
    assert requirements == space_requirements() and all("==" in line for line in requirements)
    assert any(line.startswith("gradio==") for line in requirements)
    assert any(line.startswith("torch==") for line in requirements)
    assert (folder / "dit_optimum" / "hub" / "demo.py").is_file()
    assert (folder / "app.py").read_text() == (ROOT / "demo" / "app.py").read_text()
    # a second export into the same folder updates it; a foreign folder is refused
    export_space(released, tmp_path / "space")
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "notes.txt").write_text("mine")
    assert cli(["export-space", str(released), str(tmp_path / "foreign")]) == 2
    assert cli(["export-space", str(tmp_path), str(tmp_path / "x")]) == 2


def test_the_repository_demo_folder_is_a_space(tmp_path):
    front = yaml.safe_load((ROOT / "demo" / "README.md").read_text().split("---")[1])
    assert front["sdk"] == "gradio" and front["app_file"] == "app.py" and front["models"]
    assert front["sdk_version"] == __import__("gradio").__version__
    lines = (ROOT / "demo" / "requirements.txt").read_text().split("\n")
    pinned = [line for line in lines if line and not line.startswith("#")]
    assert pinned[:-1] == space_requirements() and pinned[-1].startswith(".")


def test_a_step_cache_release_samples_with_its_cache_in_the_demo(released):
    loaded = DemoModels([str(released / "dit-xs4-cache-first-block-0.5")]).get(
        str(released / "dit-xs4-cache-first-block-0.5")
    )
    assert loaded.error is None and loaded.pipeline.transformer.is_cache_enabled
    plain = DemoModels([str(released / "dit-xs4-baseline")]).get(str(released / "dit-xs4-baseline"))
    assert not plain.pipeline.transformer.is_cache_enabled

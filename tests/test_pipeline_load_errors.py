"""A damaged pipeline folder fails ``DiTOptimumPipeline.from_pretrained`` with the exception type diffusers' own
``DiffusionPipeline.from_pretrained`` raises for the same folder: a missing, unreadable or unparseable file is an
``OSError`` (a ``ModelFileError``, also a ``DiTOptimumError``) naming the file; a file that parses but holds a bad
value is a ``ValueError``, never an ``OSError``."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from diffusers import DDIMScheduler, DiffusionPipeline, DiTPipeline

from conftest import stock_model, tiny_autoencoder
from dit_optimum import DiTOptimumPipeline
from dit_optimum.errors import DiTOptimumError, ModelFileError


@pytest.fixture(scope="module")
def stock_folder(tmp_path_factory) -> Path:
    """A stock ``DiTPipeline`` folder (diffusers' own classes) with tiny components."""
    folder = tmp_path_factory.mktemp("stock") / "pipe"
    vae = tiny_autoencoder(channels=1)
    DiTPipeline(transformer=stock_model(), vae=vae, scheduler=DDIMScheduler()).save_pretrained(folder)
    return folder


def _folder_in_place_of(path: Path) -> None:
    path.unlink()
    path.mkdir()


def _edit(path: Path, **values) -> None:
    path.write_text(json.dumps({**json.loads(path.read_text()), **values}))


# case -> (the file named, how it is damaged)
DAMAGED_FILES = {
    "config bad json": ("transformer/config.json", lambda path: path.write_text("{not json")),
    "config empty": ("transformer/config.json", lambda path: path.write_text("")),
    "config a list": ("transformer/config.json", lambda path: path.write_text("[1, 2]")),
    "config a folder": ("transformer/config.json", _folder_in_place_of),
    "index bad json": ("model_index.json", lambda path: path.write_text("{not json")),
    "index empty": ("model_index.json", lambda path: path.write_text("")),
    "index a folder": ("model_index.json", _folder_in_place_of),
    "index missing": ("model_index.json", Path.unlink),
    "scheduler config bad json": ("scheduler/scheduler_config.json", lambda path: path.write_text("{not json")),
    "scheduler config a list": ("scheduler/scheduler_config.json", lambda path: path.write_text("[1]")),
    "vae config bad json": ("vae/config.json", lambda path: path.write_text("x")),
    "vae config a list": ("vae/config.json", lambda path: path.write_text("[1]")),
}


def damaged(stock_folder: Path, tmp_path: Path, file: str, damage) -> Path:
    folder = tmp_path / "pipe"
    shutil.copytree(stock_folder, folder)
    damage(folder / file)
    return folder


def _base_type(error: BaseException) -> type:
    return OSError if isinstance(error, OSError) else ValueError if isinstance(error, ValueError) else type(error)


@pytest.mark.parametrize("case", list(DAMAGED_FILES))
def test_a_damaged_file_is_an_oserror_as_in_diffusers(stock_folder, tmp_path, case):
    file, damage = DAMAGED_FILES[case]
    folder = damaged(stock_folder, tmp_path, file, damage)
    with pytest.raises(OSError) as stock:
        DiffusionPipeline.from_pretrained(folder)
    with pytest.raises(OSError) as ours:
        DiTOptimumPipeline.from_pretrained(folder)
    assert _base_type(ours.value) is _base_type(stock.value) is OSError
    assert isinstance(ours.value, ModelFileError) and isinstance(ours.value, DiTOptimumError)
    assert Path(file).name in str(ours.value), str(ours.value)
    if file != "model_index.json":  # (a missing index is named by its folder and file name)
        assert str(folder / file) in str(ours.value), str(ours.value)


@pytest.mark.parametrize("damage", [lambda folder: (folder / "scheduler_config.json").unlink(), shutil.rmtree])
def test_a_missing_component_file_met_inside_diffusers_loader_stays_an_oserror(stock_folder, tmp_path, damage):
    # found missing by diffusers itself (not by the package's checks first): its OSError keeps its type
    folder = tmp_path / "pipe"
    shutil.copytree(stock_folder, folder)
    damage(folder / "scheduler")
    with pytest.raises(OSError):
        DiffusionPipeline.from_pretrained(folder)
    with pytest.raises(ModelFileError, match=r"scheduler_config\.json"):
        DiTOptimumPipeline.from_pretrained(folder)


def test_an_index_that_is_no_json_object_is_an_oserror(stock_folder, tmp_path):
    # diffusers 0.42.1 fails deep inside with a TypeError ("pop expected at most 1 argument"); the file is damaged,
    # so the package raises what diffusers raises for an unparseable index: an OSError naming it
    folder = damaged(stock_folder, tmp_path, "model_index.json", lambda path: path.write_text("[1]"))
    with pytest.raises(TypeError):
        DiffusionPipeline.from_pretrained(folder)
    with pytest.raises(ModelFileError, match=r"model_index\.json' does not describe a DiT pipeline"):
        DiTOptimumPipeline.from_pretrained(folder)


# A file that parses but holds a bad value: diffusers fails on it building the component (or not at all), never
# with an OSError; the package refuses it first with a ValueError naming the file and the key.
BAD_VALUES = {
    "negative scheduler steps": ("scheduler/scheduler_config.json", {"num_train_timesteps": -5}, RuntimeError),
    "zero VAE norm groups": ("vae/config.json", {"norm_num_groups": 0}, ZeroDivisionError),
}


@pytest.mark.parametrize("case", list(BAD_VALUES))
def test_a_bad_value_is_a_value_error_not_an_oserror(stock_folder, tmp_path, case):
    file, values, stock_type = BAD_VALUES[case]
    folder = damaged(stock_folder, tmp_path, file, lambda path: _edit(path, **values))
    with pytest.raises(stock_type) as stock:
        DiffusionPipeline.from_pretrained(folder)
    assert not isinstance(stock.value, OSError)
    with pytest.raises(DiTOptimumError) as ours:
        DiTOptimumPipeline.from_pretrained(folder)
    assert isinstance(ours.value, ValueError) and not isinstance(ours.value, OSError)
    assert file in str(ours.value) and next(iter(values)) in str(ours.value), str(ours.value)

"""Image and dataset loaders: imagefolder conventions (hidden entries, nested images, empty classes, non-images),
every PIL mode to [0, 1], unreadable images and decompression bombs, source dispatch, latents folders, and the
latent extraction command."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import tiny_vae
from dit_optimum.data import (
    LATENTS_METADATA,
    image_folder_data,
    list_image_files,
    load_image,
    load_training_data,
    pil_to_tensor,
)
from dit_optimum.errors import DiTOptimumError, MissingPathError
from dit_optimum.training.cli import extract_main
from dit_optimum.training.data import extract_latents


def solid(path, value, size=(6, 6), mode="RGB"):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, value).save(path)
    return path


def pixels(tensor: torch.Tensor) -> np.ndarray:
    """[-1, 1] model input back to [0, 1]."""
    return ((tensor + 1) / 2).numpy()


def test_hidden_entries_are_skipped_and_do_not_shift_labels(tmp_path):
    solid(tmp_path / ".ipynb_checkpoints" / "a-checkpoint.png", (0, 0, 0))
    solid(tmp_path / "cat" / "a.png", (255, 0, 0))
    solid(tmp_path / "cat" / ".hidden.png", (0, 0, 255))
    solid(tmp_path / "cat" / ".cache" / "b.png", (0, 0, 255))
    solid(tmp_path / "dog" / "b.png", (0, 255, 0))
    data = image_folder_data(tmp_path, image_size=6, channels=3)
    assert data.id2label == {0: "cat", 1: "dog"}
    assert data.labels.tolist() == [0, 1]
    assert pixels(data.samples[0])[:, 0, 0].tolist() == [1, 0, 0]  # cat is red
    assert pixels(data.samples[1])[:, 0, 0].tolist() == [0, 1, 0]  # dog is green
    assert data.skipped_files == [] and data.ignored_files == []


def test_images_in_nested_folders_belong_to_their_class(tmp_path):
    solid(tmp_path / "cat" / "a.png", (255, 255, 255))
    solid(tmp_path / "cat" / "2024" / "june" / "b.png", (255, 255, 255))
    solid(tmp_path / "dog" / "c.png", (0, 0, 0))
    data = image_folder_data(tmp_path, image_size=4, channels=1)
    assert data.labels.tolist() == [0, 0, 1] and data.samples.shape == (3, 1, 4, 4)


def test_a_16_bit_grey_png_keeps_its_values(tmp_path):
    values = (np.arange(16, dtype=np.uint16).reshape(4, 4) * 4369).astype(np.uint16)  # 0 .. 65535
    Image.fromarray(values).save(tmp_path / "grey16.png")
    with Image.open(tmp_path / "grey16.png") as image:
        assert image.mode.startswith("I")
    grey = load_image(tmp_path / "grey16.png", image_size=4, channels=1)
    np.testing.assert_allclose(pixels(grey)[0], values / 65535, atol=1e-6)
    rgb = load_image(tmp_path / "grey16.png", image_size=4, channels=3)
    assert rgb.shape == (3, 4, 4) and torch.equal(rgb[0], rgb[2])
    np.testing.assert_allclose(pixels(rgb)[1], values / 65535, atol=1e-6)


def two_rows(row) -> np.ndarray:
    """A 2 x 2 array whose rows both hold ``row`` (square, so that no resize mixes the pixels)."""
    return np.array([row, row])


def palette_image() -> Image.Image:
    image = Image.fromarray(two_rows([0, 1]).astype(np.uint8), mode="P")
    image.putpalette([255, 0, 0, 0, 0, 255])
    return image


@pytest.mark.parametrize(
    ("image", "expected_rgb"),
    [
        (Image.fromarray(two_rows([False, True])), [[0, 0, 0], [1, 1, 1]]),
        (Image.fromarray(two_rows([0, 65535]).astype(np.int32)), [[0, 0, 0], [1, 1, 1]]),  # mode I
        (Image.fromarray(two_rows([0.25, 2.0]).astype(np.float32)), [[0.25] * 3, [1, 1, 1]]),  # mode F, clipped
        (Image.fromarray(two_rows([51, 255]).astype(np.uint8)), [[0.2] * 3, [1, 1, 1]]),  # L
        (palette_image(), [[1, 0, 0], [0, 0, 1]]),
        (Image.merge("LA", [Image.new("L", (2, 2), 102), Image.new("L", (2, 2), 0)]), [[0.4] * 3] * 2),
        (Image.new("RGBA", (2, 2), (255, 0, 0, 0)), [[1, 0, 0]] * 2),  # alpha dropped, as torchvision's loader
        (Image.new("CMYK", (2, 2), (0, 255, 0, 0)), [[1, 0, 1]] * 2),  # magenta ink only
    ],
    ids=["1-bit", "I", "F", "L", "P", "LA", "RGBA", "CMYK"],
)
def test_every_pil_mode_converts_to_the_unit_range(image, expected_rgb):
    rgb = pixels(pil_to_tensor(image, image_size=2, channels=3))  # (3, 2, 2)
    np.testing.assert_allclose(rgb[:, 0].T, expected_rgb, atol=1e-6)
    np.testing.assert_allclose(rgb[:, 1], rgb[:, 0])


def test_colour_to_grey_uses_luma():
    image = Image.new("RGB", (2, 2), (255, 0, 0))
    grey = pixels(pil_to_tensor(image, image_size=2, channels=1))
    np.testing.assert_allclose(grey, 0.299, atol=1e-6)


def test_empty_class_folders_are_refused_by_name(tmp_path):
    solid(tmp_path / "cat" / "a.png", (1, 2, 3))
    (tmp_path / "empty").mkdir()
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "readme.txt").write_text("no images here")
    with (
        pytest.warns(UserWarning, match=r"Ignored 1 file\(s\).*notes/readme\.txt"),
        pytest.raises(DiTOptimumError, match=r"class folder\(s\) without images \(\.bmp.*\): 'empty', 'notes'"),
    ):
        image_folder_data(tmp_path, image_size=4)


def test_non_image_files_are_ignored_and_reported(tmp_path):
    solid(tmp_path / "cat" / "a.png", (1, 2, 3))
    (tmp_path / "cat" / "labels.csv").write_text("a,cat")
    (tmp_path / "README.md").write_text("my data")
    solid(tmp_path / "stray.png", (1, 2, 3))  # not in a class folder
    with pytest.warns(UserWarning, match=r"Ignored 3 file\(s\).*README\.md, cat/labels\.csv, stray\.png"):
        data = image_folder_data(tmp_path, image_size=4)
    assert data.ignored_files == [tmp_path / "README.md", tmp_path / "cat" / "labels.csv", tmp_path / "stray.png"]
    assert len(data.labels) == 1


def test_list_image_files_is_sorted_recursive_and_skips_hidden(tmp_path):
    for name in ("b/2.JPG", "a/1.png", "a/deep/3.webp", ".git/4.png", "a/.5.png"):
        solid(tmp_path / name, (0, 0, 0), mode="RGB")
    (tmp_path / "a" / "6.txt").write_text("x")
    (tmp_path / "a" / "loop").symlink_to(tmp_path, target_is_directory=True)  # a link loop is listed once
    listing = list_image_files(tmp_path)
    assert [p.relative_to(tmp_path).as_posix() for p in listing.images] == ["a/1.png", "a/deep/3.webp", "b/2.JPG"]
    assert listing.ignored == [tmp_path / "a" / "6.txt"]


def test_unreadable_images_name_the_file_or_are_skipped_and_listed(tmp_path):
    solid(tmp_path / "cat" / "a.png", (10, 20, 30))
    solid(tmp_path / "dog" / "b.png", (10, 20, 30))
    (tmp_path / "dog" / "broken.png").write_bytes(b"not an image")
    (tmp_path / "dog" / "truncated.png").write_bytes((tmp_path / "dog" / "b.png").read_bytes()[:40])
    with pytest.raises(DiTOptimumError, match=r"Unreadable image .*broken\.png.*skip_corrupt"):
        image_folder_data(tmp_path, image_size=4)
    with pytest.warns(UserWarning, match=r"Skipped 2 unreadable image\(s\).*dog/broken\.png.*dog/truncated\.png"):
        data = image_folder_data(tmp_path, image_size=4, skip_corrupt=True)
    assert data.skipped_files == [tmp_path / "dog" / "broken.png", tmp_path / "dog" / "truncated.png"]
    assert data.skipped == 2 and data.labels.tolist() == [0, 1]


def test_a_class_with_only_unreadable_images_is_refused(tmp_path):
    solid(tmp_path / "cat" / "a.png", (10, 20, 30))
    (tmp_path / "dog").mkdir()
    (tmp_path / "dog" / "broken.png").write_bytes(b"not an image")
    with pytest.warns(UserWarning, match="Skipped 1"), pytest.raises(DiTOptimumError, match=r"no readable.*'dog'"):
        image_folder_data(tmp_path, image_size=4, skip_corrupt=True)


def test_decompression_bombs_are_unreadable_images(tmp_path, monkeypatch):
    solid(tmp_path / "cat" / "small.png", (0, 0, 0), size=(4, 4))
    solid(tmp_path / "cat" / "warns.png", (0, 0, 0), size=(12, 12))  # 144 px: above the limit (warning)
    solid(tmp_path / "cat" / "bomb.png", (0, 0, 0), size=(20, 20))  # 400 px: above twice the limit (error)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    with pytest.raises(DiTOptimumError, match=r"Unreadable image .*bomb\.png.*decompression bomb"):
        load_image(tmp_path / "cat" / "bomb.png", 4, 1)
    with pytest.raises(DiTOptimumError, match=r"Unreadable image .*warns\.png.*decompression bomb"):
        load_image(tmp_path / "cat" / "warns.png", 4, 1)
    with pytest.warns(UserWarning, match=r"Skipped 2 unreadable"):
        data = image_folder_data(tmp_path, image_size=4, skip_corrupt=True)
    assert [p.name for p in data.skipped_files] == ["bomb.png", "warns.png"] and len(data.labels) == 1


def test_sources_that_are_neither_digits_a_folder_nor_an_offline_dataset(tmp_path):
    for missing in (str(tmp_path / "nope"), "./images", "~/no-such-folder-here", "data/train/images"):
        with pytest.raises(MissingPathError, match=r"`data`=.* does not exist"):
            load_training_data(missing)
    with pytest.raises(DiTOptimumError, match=r"`data`='someone/no-such-set' is neither a local folder nor a dataset"):
        load_training_data("someone/no-such-set")
    (tmp_path / "file.zip").write_bytes(b"zip")
    with pytest.raises(DiTOptimumError, match=r"`data`=.*file\.zip.* is a file"):
        load_training_data(str(tmp_path / "file.zip"))
    with pytest.raises(DiTOptimumError, match="no class sub-folders"):
        load_training_data(str(tmp_path))


def write_latents(folder, metadata):
    from datasets import Dataset

    Dataset.from_dict({"latents": np.zeros((3, 4, 2, 2), np.float32), "label": [0, 1, 1]}).save_to_disk(str(folder))
    if metadata is not None:
        (folder / LATENTS_METADATA).write_text(metadata)
    return folder


def test_latents_folders_load_or_name_their_bad_metadata(tmp_path):
    good = write_latents(tmp_path / "good", json.dumps({"vae": "some/vae", "id2label": {"0": "a", "1": "b"}}))
    data = load_training_data(str(good))
    assert data.samples.shape == (3, 4, 2, 2) and data.labels.tolist() == [0, 1, 1]
    assert data.vae == "some/vae" and data.id2label == {0: "a", 1: "b"}
    missing = write_latents(tmp_path / "missing", None)
    with pytest.raises(DiTOptimumError, match=rf"no {LATENTS_METADATA}"):
        load_training_data(str(missing))
    for name, text, message in (
        ("truncated", '{"vae": "some', "not valid JSON"),
        ("novae", json.dumps({"id2label": {}}), r"needs \"vae\""),
        ("badlabels", json.dumps({"vae": "v", "id2label": {"x": 1}}), "id2label"),
    ):
        folder = write_latents(tmp_path / name, text)
        with pytest.raises(DiTOptimumError, match=rf"{LATENTS_METADATA}.*{message}"):
            load_training_data(str(folder))
    (tmp_path / "good" / "state.json").unlink()
    with pytest.raises(DiTOptimumError, match=r"good.*not a readable latents folder"):
        load_training_data(str(good))


def test_extract_command_names_a_bad_vae_and_needs_overwrite_for_a_foreign_folder(tmp_path, capsys):
    for label in ("a", "b"):
        solid(tmp_path / "images" / label / "x.png", 128, size=(8, 8), mode="L")
    common = ["--data", str(tmp_path / "images"), "--image-size", "8", "--channels", "1"]
    assert extract_main([*common, "--vae", str(tmp_path / "no-vae"), "--output-dir", str(tmp_path / "out")]) == 2
    assert "`vae`=" in (err := capsys.readouterr().err) and "no-vae' does not exist" in err
    with pytest.raises(MissingPathError, match="`vae`="):
        extract_latents(load_training_data("digits", 8), str(tmp_path / "no-vae"), tmp_path / "out")
    assert extract_main([*common, "--vae", "someone/no-such-vae", "--output-dir", str(tmp_path / "out")]) == 2
    assert "Could not load `vae`='someone/no-such-vae'" in capsys.readouterr().err
    vae = str(tiny_vae(tmp_path / "vae"))
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "mine.txt").write_text("keep me")
    assert extract_main([*common, "--vae", vae, "--output-dir", str(tmp_path / "out")]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert extract_main([*common, "--vae", vae, "--output-dir", str(tmp_path / "out"), "--overwrite"]) == 0
    assert (tmp_path / "out" / "mine.txt").read_text() == "keep me"
    latents = load_training_data(str(tmp_path / "out"))
    assert latents.samples.shape == (2, 4, 4, 4) and latents.vae == vae and latents.id2label == {0: "a", 1: "b"}

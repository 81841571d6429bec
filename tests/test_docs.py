"""The documentation runs: every Python and shell block of README.md and docs/*.md, and the site builds.

How a block runs is written in its page, in an HTML comment right above it (a reader of the rendered page does not
see it; a reader of the source does):

    <!-- docs-test: replace "DiT-S/2" "DiT-XS/4"; setup pipeline runs/xs2/pipeline -->

- ``replace OLD NEW``: the block runs with every OLD replaced by NEW. The page shows the real sizes (DiT-S/2, 25
  steps, 1,500 training steps); the test runs the same lines small. OLD must occur in the block: a substitution
  that no longer applies fails instead of silently running the large example.
- ``setup NAME ARGS...``: before the block, ``PREPARERS[NAME]`` prepares what the block expects (a saved pipeline, an
  image folder, a VAE, a finished benchmark run), or serves it while the block runs (a local Hub, an HfApi double
  that records uploads).
- ``process``: a Python block that runs as a script in its own process (it reads its environment at import).
- ``skip REASON``: the block is not run. Every skip must be listed in ``EXCLUDED`` (with its reason, printed), so
  that exclusions stay deliberate and few.

Each page runs top to bottom in a fresh temporary folder (its working directory, holding links to the checkout's
``scripts/`` and ``benchmarks/`` as a reader's checkout has them), offline (``HF_HUB_OFFLINE=1``). Its Python blocks
share one namespace and run in this process; its shell blocks run in bash (``-euo pipefail``) with this
interpreter's ``bin`` (the ``.venv``) first on ``PATH`` and ``$DOCS_REPO`` set to the checkout. The README's ``make
benchmark`` / ``make test`` lines run as ``make -n -C $DOCS_REPO ...``: dry runs that check the targets exist and
print their commands (running them here would start the whole suite again, or the 13-minute benchmark, which the
benchmark page's blocks run at small sizes); ``test_make_targets_are_what_the_readme_says`` checks what they run.
A fenced block in another language must be one of ``INERT_LANGUAGES`` (an untagged fence is refused, so that no
example escapes the run by accident).
"""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SHELL_LANGUAGES = ("bash", "shell", "sh", "console")
RUN_LANGUAGES = ("python", *SHELL_LANGUAGES)
INERT_LANGUAGES = ("text", "yaml", "json", "toml", "ini", "csv")
# (page, first line of the block) -> why it is not run. Keep this short: prefer a `setup` or a `replace`.
EXCLUDED: dict[tuple[str, str], str] = {}
# The folders of the checkout a documented command refers to by relative path.
CHECKOUT_LINKS = ("scripts", "benchmarks")
SHELL_TIMEOUT_S = 600

_FENCE = re.compile(r"^(`{3,})\s*([\w+-]*)\s*$")
_DIRECTIVE_START = "<!-- docs-test:"


@dataclass
class Block:
    page: Path
    line: int  # 1-based line of the block's first code line
    language: str
    code: str
    directives: list[list[str]] = field(default_factory=list)

    @property
    def where(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"

    def named(self, name: str) -> list[list[str]]:
        return [directive[1:] for directive in self.directives if directive[0] == name]

    def code_to_run(self) -> str:
        code = self.code
        for arguments in self.named("replace"):
            assert len(arguments) == 2, f"{self.where}: `replace` takes OLD NEW, got {arguments}"
            old, new = arguments
            assert old in code, f"{self.where}: `replace {old!r}` does not occur in the block (update the comment)"
            code = code.replace(old, new)
        return code


def _directives(text: str, where: str) -> list[list[str]]:
    """``name arguments...`` directives, separated by ``;`` or by line ends; arguments quoted as in a shell."""
    directives = []
    for line in text.splitlines():
        lexer = shlex.shlex(line, posix=True, punctuation_chars=";")
        lexer.whitespace_split = True
        current: list[str] = []
        for token in [*lexer, ";"]:
            if token == ";":
                if current:
                    directives.append(current)
                current = []
            else:
                current.append(token)
    for directive in directives:
        assert directive[0] in ("replace", "setup", "process", "skip"), f"{where}: unknown directive {directive}"
    return directives


def parse_blocks(page: Path) -> list[Block]:
    """Every fenced block of ``page`` with the directives of the comment right above it."""
    lines = page.read_text().splitlines()
    blocks, pending, index = [], None, 0
    while index < len(lines):
        line = lines[index]
        if line.startswith(_DIRECTIVE_START):
            start = index
            text = line[len(_DIRECTIVE_START) :]
            while "-->" not in text:
                index += 1
                assert index < len(lines), f"{page.name}:{start + 1}: unclosed docs-test comment"
                text += "\n" + lines[index]
            pending = (start + 1, _directives(text[: text.index("-->")], f"{page.name}:{start + 1}"))
            index += 1
            assert index < len(lines) and _FENCE.match(lines[index]), (
                f"{page.name}:{start + 1}: a docs-test comment must stand right above a fenced block"
            )
            continue
        match = _FENCE.match(line)
        if match:
            fence, language = match.groups()
            end = index + 1
            while end < len(lines) and lines[end].strip() != fence:
                end += 1
            assert end < len(lines), f"{page.name}:{index + 1}: unclosed code block"
            directives = pending[1] if pending is not None else []
            blocks.append(
                Block(page, index + 2, language.lower(), "\n".join(lines[index + 1 : end]) + "\n", directives)
            )
            pending, index = None, end + 1
            continue
        index += 1
    return blocks


# --- what a block may ask to have prepared ------------------------------------------------------------------------


@dataclass
class Page:
    """One page's run: its working folder, the environment of its shell blocks, pytest's request for fixtures."""

    workdir: Path
    env: dict[str, str]
    request: pytest.FixtureRequest
    prepared: Path  # what preparers build once for every page


def _digits_pipeline_folder(cache: Path) -> Path:
    """A small random DiTOptimumPipeline shaped for the digits (DiT-XS/2 with 2 blocks for 16x16 images, one channel,
    ten classes), built once."""
    folder = cache / "digits-pipeline"
    if not folder.is_dir():
        from dit_optimum import DiTOptimumPipeline, DiTOptimumTransformer2DModel

        torch.manual_seed(0)
        model = DiTOptimumTransformer2DModel.from_preset(
            "DiT-XS/2", sample_size=16, in_channels=1, num_classes=10, num_layers=2
        )
        with torch.no_grad():  # keep samples in range, away from the zero-initialised output of a fresh DiT
            for parameter in model.parameters():
                parameter.normal_(0, 0.02)
        pipeline = DiTOptimumPipeline(transformer=model.eval(), id2label={index: str(index) for index in range(10)})
        pipeline.save_pretrained(folder)
    return folder


@contextlib.contextmanager
def prepare_pipeline(page: Page, path: str) -> Iterator[dict[str, str]]:
    """``setup pipeline PATH``: a small random pipeline for the digits' shape (DiT-XS/2 with 2 blocks, 16x16, 1
    channel, 10 classes): what `scripts/train.py --model DiT-XS/2` saves, untrained."""
    shutil.copytree(_digits_pipeline_folder(page.prepared), page.workdir / path)
    yield {}


@contextlib.contextmanager
def prepare_images(page: Page, path: str, per_class: str = "10", mode: str = "gray") -> Iterator[dict[str, str]]:
    """``setup images PATH PER_CLASS [rgb]``: an image folder of the scikit-learn digits, one sub-folder per class
    (``0`` .. ``9``), PER_CLASS 16x16 PNG images in each."""
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    for label in range(10):
        folder = page.workdir / path / str(label)
        folder.mkdir(parents=True)
        images = digits.images[digits.target == label][: int(per_class)]
        for number, pixels in enumerate(images):
            image = Image.fromarray((pixels * 255 / 16).astype("uint8"), "L").resize((16, 16))
            (image.convert("RGB") if mode == "rgb" else image).save(folder / f"{number}.png")
    yield {}


@contextlib.contextmanager
def prepare_vae(page: Page, path: str, channels: str = "3") -> Iterator[dict[str, str]]:
    """``setup vae PATH [CHANNELS]``: a tiny random AutoencoderKL (4 latent channels, downsampling by 2)."""
    from conftest import tiny_vae

    tiny_vae(page.workdir / path, channels=int(channels))
    yield {}


@contextlib.contextmanager
def prepare_latents(page: Page, path: str, vae: str, images: str) -> Iterator[dict[str, str]]:
    """``setup latents PATH VAE IMAGES``: the RGB image folder IMAGES encoded with VAE, as extract_features.py does."""
    from dit_optimum.training.cli import extract_main

    arguments = ["--data", images, "--vae", vae, "--output-dir", path, "--image-size", "16", "--channels", "3"]
    assert extract_main(arguments) == 0
    yield {}


@contextlib.contextmanager
def prepare_benchmark_results(page: Page, path: str) -> Iterator[dict[str, str]]:
    """``setup benchmark-results PATH``: a finished tiny benchmark run with its trained models (conftest's
    ``results_dir``: DiT-XS/4 at 8x8, baseline, attention-mediated, moe, distill, int8, prune-heads-50 and a cache)."""
    shutil.copytree(page.request.getfixturevalue("results_dir"), page.workdir / path)
    yield {}


@contextlib.contextmanager
def prepare_stock_pipeline(page: Page, path: str) -> Iterator[dict[str, str]]:
    """``setup stock-pipeline PATH``: a tiny stock diffusers DiTPipeline folder (DiTTransformer2DModel with an
    embedder copy in every block, an AutoencoderKL, DDIM), as diffusers itself saves one."""
    from diffusers import DDIMScheduler, DiTPipeline

    from conftest import stock_model, tiny_autoencoder

    vae = tiny_autoencoder(channels=3, levels=1, seed=1)
    transformer = stock_model(num_embeds_ada_norm=1000)
    DiTPipeline(transformer=transformer, vae=vae, scheduler=DDIMScheduler()).save_pretrained(page.workdir / path)
    yield {}


@contextlib.contextmanager
def prepare_original_checkpoint(page: Page, path: str) -> Iterator[dict[str, str]]:
    """``setup original-checkpoint PATH``: an original-layout (``models.py``) DiT-XS/4 checkpoint for 8x8 latents and
    1000 classes, with ``model`` and ``ema`` state dicts as fast-DiT saves them."""
    from original_dit import random_original_dit

    original = random_original_dit(input_size=8, patch_size=4, hidden=256, depth=6, heads=4, num_classes=1000)
    state = original.state_dict()
    torch.save({"model": state, "ema": state}, page.workdir / path)
    yield {}


@contextlib.contextmanager
def prepare_domain_classifier(
    page: Page, dataset: str, resolution: str, reference_samples: str, num_samples: str
) -> Iterator[dict[str, str]]:
    """``setup domain-classifier DATASET RESOLUTION REFERENCE_SAMPLES NUM_SAMPLES``: the domain classifier that the
    domain metrics of that split train on first use (60 epochs: minutes of CPU), trained for 1 epoch instead and
    cached where they look for it (``$DIT_OPTIMUM_CACHE``); the metrics then run as written, on a weaker classifier."""
    from dit_optimum.evaluation.domain import ClassifierRecipe, classifier_cache_path, domain_classifier
    from dit_optimum.evaluation.reference import real_split

    split = real_split(dataset, "train", int(reference_samples), int(num_samples))
    target = classifier_cache_path(split, int(resolution), ClassifierRecipe())
    if not target.is_file():
        quick = ClassifierRecipe(epochs=1)
        domain_classifier(split, int(resolution), quick)
        source = classifier_cache_path(split, int(resolution), quick)
        for suffix in (".json", ".safetensors"):  # the weights last: they are what marks the entry present
            shutil.copyfile(source.with_suffix(suffix), target.with_suffix(suffix))
    yield {}


_HUB_DOUBLE = '''
"""An HfApi double for the docs' upload commands (tests/test_docs.py): repositories and uploads are recorded under
$DOCS_HUB_UPLOADS, nothing is sent anywhere."""
import os
import shutil
from pathlib import Path

import huggingface_hub

_UPLOADS = Path(os.environ["DOCS_HUB_UPLOADS"])


def _create_repo(self, repo_id, **kwargs):
    (_UPLOADS / repo_id).mkdir(parents=True, exist_ok=True)
    return f"https://huggingface.co/{repo_id}"


def _upload_folder(self, *, folder_path, repo_id, ignore_patterns=None, **kwargs):
    patterns = [pattern.split("/")[-1] for pattern in ignore_patterns or []]
    ignore = shutil.ignore_patterns(*patterns)
    shutil.copytree(folder_path, _UPLOADS / repo_id, ignore=ignore, dirs_exist_ok=True)
    return f"https://huggingface.co/{repo_id}/commit/docs-test"


huggingface_hub.HfApi.create_repo = _create_repo
huggingface_hub.HfApi.upload_folder = _upload_folder
'''


@contextlib.contextmanager
def prepare_hub_double(page: Page) -> Iterator[dict[str, str]]:
    """``setup hub-double``: the block's processes upload to an HfApi double (a ``sitecustomize`` on PYTHONPATH that
    replaces ``HfApi.create_repo`` / ``upload_folder``, like test_hub's RecordingApi) with a dummy token; afterwards
    every repository the block created must have received files."""
    site = page.workdir.parent / f"{page.workdir.name}-hub-double"
    uploads = site / "uploads"
    uploads.mkdir(parents=True)
    (site / "sitecustomize.py").write_text(_HUB_DOUBLE)
    yield {
        "PYTHONPATH": os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")])),
        "DOCS_HUB_UPLOADS": str(uploads),
        "HF_TOKEN": "hf_docs_test_not_a_token",
        "HF_HUB_OFFLINE": "0",  # the upload refuses offline mode; the double sends nothing
    }
    repos = [folder for folder in uploads.glob("*/*") if folder.is_dir()]
    assert repos and all(any(folder.iterdir()) for folder in repos), f"uploads recorded: {repos}"


@contextlib.contextmanager
def prepare_local_hub(page: Page, *repos: str) -> Iterator[dict[str, str]]:
    """``setup local-hub ORG/NAME=FOLDER ...``: a real Hub-compatible server on 127.0.0.1 (olah, as test_hub uses)
    serving each FOLDER as repository ORG/NAME while the block runs; the block's process talks to it."""
    from local_hub import local_hub

    served = {}
    for entry in repos:
        repo_id, _, folder = entry.partition("=")
        served[repo_id] = page.workdir / folder
    hub = page.workdir.parent / f"{page.workdir.name}-hub"
    with local_hub(hub, served) as url:
        yield {"HF_ENDPOINT": url, "HF_HUB_OFFLINE": "0", "HF_HOME": str(hub / "hf_home")}


PREPARERS = {
    "pipeline": prepare_pipeline,
    "images": prepare_images,
    "vae": prepare_vae,
    "latents": prepare_latents,
    "benchmark-results": prepare_benchmark_results,
    "domain-classifier": prepare_domain_classifier,
    "stock-pipeline": prepare_stock_pipeline,
    "original-checkpoint": prepare_original_checkpoint,
    "hub-double": prepare_hub_double,
    "local-hub": prepare_local_hub,
}

# --- running a page -------------------------------------------------------------------------------------------------


def _run_shell(block: Block, code: str, page: Page, env: dict[str, str]) -> None:
    if block.language == "console":  # `$ command` lines; the rest is output
        code = "\n".join(line[2:] for line in code.splitlines() if line.startswith("$ ")) + "\n"
    result = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", code],
        cwd=page.workdir,
        env={**page.env, **env},
        capture_output=True,
        text=True,
        timeout=SHELL_TIMEOUT_S,
    )
    print(f"--- {block.where} (shell)\n{code}{result.stdout[-3000:]}{result.stderr[-3000:]}")
    assert result.returncode == 0, (
        f"{block.where}: the shell block failed (exit {result.returncode}):\n{code}\n"
        f"stdout:\n{result.stdout[-4000:]}\nstderr:\n{result.stderr[-6000:]}"
    )


def _run_python_process(block: Block, code: str, page: Page, env: dict[str, str]) -> None:
    script = page.workdir.parent / f"{page.workdir.name}-block-{block.line}.py"
    script.write_text(code)
    result = subprocess.run(
        [sys.executable, str(script)],
        cwd=page.workdir,
        env={**page.env, **env},
        capture_output=True,
        text=True,
        timeout=SHELL_TIMEOUT_S,
    )
    assert result.returncode == 0, f"{block.where}: the Python block failed in its process:\n{result.stderr[-6000:]}"


def _run_python(block: Block, code: str, namespace: dict, monkeypatch: pytest.MonkeyPatch, env: dict[str, str]) -> None:
    print(f"--- {block.where} (python)\n{code}")
    with monkeypatch.context() as patch:
        for name, value in env.items():
            patch.setenv(name, value)
        # blank lines first: a traceback names the page and the line of the page
        exec(compile("\n" * (block.line - 1) + code, str(block.page), "exec"), namespace)


def run_page(page_path: Path, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from dit_optimum.techniques.registry import TECHNIQUES

    workdir = tmp_path / "work"
    workdir.mkdir()
    for name in CHECKOUT_LINKS:
        (workdir / name).symlink_to(ROOT / name, target_is_directory=True)
    cache = request.getfixturevalue("docs_cache")
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        "DOCS_REPO": str(ROOT),
        "HF_HUB_OFFLINE": "1",
        "HF_HOME": str(tmp_path / "hf_home"),
        "DIT_OPTIMUM_CACHE": str(cache),
        "MPLBACKEND": "Agg",
        "NO_MKDOCS_2_WARNING": "1",
    }
    page = Page(workdir, env, request, request.getfixturevalue("docs_prepared"))
    monkeypatch.chdir(workdir)
    monkeypatch.setenv("DIT_OPTIMUM_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    namespace: dict = {"__name__": "__docs__"}
    registered = dict(TECHNIQUES)  # a page may register techniques: they leave with it
    try:
        for block in parse_blocks(page_path):
            if block.language not in RUN_LANGUAGES:
                continue
            skipped = block.named("skip")
            if skipped:
                key = (str(page_path.relative_to(ROOT)), block.code.splitlines()[0])
                assert key in EXCLUDED, f"{block.where}: skipped ({skipped}) but not listed in EXCLUDED"
                print(f"--- {block.where}: not run: {EXCLUDED[key]}")
                continue
            code = block.code_to_run()
            start = time.perf_counter()
            with contextlib.ExitStack() as stack:
                extra: dict[str, str] = {}
                for name, *arguments in block.named("setup"):
                    assert name in PREPARERS, f"{block.where}: unknown setup {name!r}; known: {', '.join(PREPARERS)}"
                    extra.update(stack.enter_context(PREPARERS[name](page, *arguments)))
                if block.language in SHELL_LANGUAGES:
                    _run_shell(block, code, page, extra)
                elif block.named("process"):
                    _run_python_process(block, code, page, extra)
                else:
                    _run_python(block, code, namespace, monkeypatch, extra)
            print(f"--- {block.where}: {time.perf_counter() - start:.1f} s")
    finally:
        TECHNIQUES.clear()
        TECHNIQUES.update(registered)


# --- the tests ------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def docs_cache(tmp_path_factory) -> Path:
    """One DIT_OPTIMUM_CACHE for every page: the digit classifier and real features are computed once."""
    return tmp_path_factory.mktemp("dit-optimum-cache")


@pytest.fixture(scope="module")
def docs_prepared(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("docs-prepared")


def _page_id(page: Path) -> str:
    return str(page.relative_to(ROOT))


@pytest.mark.parametrize("page", PAGES, ids=_page_id)
def test_every_block_of_the_page_runs(page, request, monkeypatch, tmp_path):
    run_page(page, request, monkeypatch, tmp_path)


@pytest.mark.parametrize("page", PAGES, ids=_page_id)
def test_every_block_is_run_or_inert_and_every_directive_is_attached(page):
    for block in parse_blocks(page):
        assert block.language in RUN_LANGUAGES + INERT_LANGUAGES, (
            f"{block.where}: a ```{block.language or '(no language)'} block: tag it python, bash, ... (it runs) or "
            f"one of {', '.join(INERT_LANGUAGES)}"
        )
        if block.language in INERT_LANGUAGES:
            assert not block.directives, f"{block.where}: docs-test directives on a block that does not run"
        elif not block.named("skip"):
            block.code_to_run()  # every replace applies


def test_excluded_blocks_are_listed_with_their_reason(capsys):
    skipped = {
        (str(block.page.relative_to(ROOT)), block.code.splitlines()[0])
        for page in PAGES
        for block in parse_blocks(page)
        if block.named("skip")
    }
    assert skipped == set(EXCLUDED), f"skipped blocks {sorted(skipped)} vs EXCLUDED {sorted(EXCLUDED)}"
    with capsys.disabled():
        for (page, first_line), reason in EXCLUDED.items():
            print(f"\ndocs block not run: {page}: {first_line!r}: {reason}")


def test_make_targets_are_what_the_readme_says():
    """`make benchmark` runs the main job and `make test` the test suite (.ci/run calls `make test`)."""
    # as a user runs them, also when this suite itself runs under `make test` (a nested make would print its
    # directory and inherit the parent's flags)
    env = {key: value for key, value in os.environ.items() if key not in ("MAKELEVEL", "MAKEFLAGS", "MFLAGS")}
    dry_runs = {
        target: subprocess.run(
            ["make", "--no-print-directory", "-n", target],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
            env=env,
        )
        .stdout.strip()
        .splitlines()
        for target in ("benchmark", "test", "docs", "setup")
    }
    assert dry_runs["benchmark"][-1].strip() == ".venv/bin/dit-optimum benchmark"
    assert dry_runs["test"][-1].strip() == ".venv/bin/python -m pytest -q tests"
    assert dry_runs["docs"][-1].strip().endswith(".venv/bin/mkdocs build --strict")
    makefile = (ROOT / "Makefile").read_text()
    assert '-e ".[dev,fid,demo,docs,openvino,onnxruntime]"' in makefile
    assert "make test" in (ROOT / ".ci" / "run").read_text()


def _nav_pages(nav) -> list[str]:
    pages = []
    for entry in nav:
        value = next(iter(entry.values())) if isinstance(entry, dict) else entry
        pages.extend(_nav_pages(value) if isinstance(value, list) else [value])
    return pages


def test_every_docs_page_is_in_the_nav():
    import yaml

    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text())
    nav = _nav_pages(config["nav"])
    pages = sorted(path.name for path in (ROOT / "docs").glob("*.md"))
    assert [page for page in pages if page not in nav] == []
    # BENCHMARKS.md is added to the site from the repository's root by docs/hooks.py
    assert [page for page in nav if page not in pages] == ["BENCHMARKS.md"]


_LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")


def _without_code(text: str) -> str:
    text = re.sub(r"^(`{3,}).*?^\1\s*$", "", text, flags=re.S | re.M)  # fenced blocks
    return re.sub(r"`[^`\n]*`", "", text)  # inline code


@pytest.mark.parametrize("page", PAGES, ids=_page_id)
def test_every_relative_link_resolves(page):
    broken = []
    for target in _LINK.findall(_without_code(page.read_text())):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target) or target.startswith("#"):
            continue  # a URL or an anchor in the page
        path = target.split("#", 1)[0]
        if not (page.parent / path).exists():
            broken.append(target)
    assert broken == [], f"{_page_id(page)}: links that resolve to nothing: {broken}"


def test_the_site_builds_strict(tmp_path):
    result = subprocess.run(
        [str(Path(sys.executable).parent / "mkdocs"), "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=ROOT,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, (result.stdout + result.stderr)[-6000:]
    api = (tmp_path / "site" / "api" / "index.html").read_text()
    for name in ("dit_optimum.quantize", "dit_optimum.DiTOptimumPipeline", "dit_optimum.training.TrainConfig"):
        assert f'id="{name}"' in api, f"the API reference lacks {name}"

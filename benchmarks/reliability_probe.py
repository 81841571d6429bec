"""Reliability probe: hundreds of bad inputs and faults, each run as a user would, each outcome classified.

    .venv/bin/python benchmarks/reliability_probe.py [--only GROUP] [--timeout 120]

Every case runs in a fresh workspace holding a sentinel file, in this process (CLI commands through their
``main``), under a time limit. Outcomes:

- ``clean``: refused with the package's own one-line error (CLI: exit 2 and one ``error:`` line on stderr, or
  argparse's usage error), or handled correctly as the case's check demands;
- ``traceback``: any other exception escaped (or a CLI exit code other than 0/2);
- ``silent``: bad input accepted, or a wrong result (the case's check says what);
- ``vague``: refused with the package's error, but not naming the parameter or file the case demands;
- ``refused_valid``: a valid input refused;
- ``data_loss``: a file the case did not ask to replace is gone or changed;
- ``secret_copied``: a secret (a token file, a file outside the folder) landed in a folder staged for upload;
- ``hang``: the time limit passed;
- ``code_execution``: a payload planted in a user file ran.

Each case has a fault class (``klass``, by default from its group); the fault-injection cases of the reliability
issue (symlinks, full and read-only disks, NaN, hostile files, FIFOs, LoRA files, ...) live in ``probe_faults.py``.

Writes benchmarks/results/reliability_probe.json (every case) and prints the counts per outcome, group and class.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")

from diffusers import DDIMScheduler  # noqa: E402
from PIL import Image  # noqa: E402

from conftest import tiny_config, tiny_model  # noqa: E402
from dit_optimum import DiTOptimumError, DiTOptimumPipeline, DiTOptimumTransformer2DModel, quantize  # noqa: E402
from dit_optimum.cli import main as cli_main  # noqa: E402
from dit_optimum.evaluation.hardware import hardware_description  # noqa: E402
from dit_optimum.training.cli import extract_main  # noqa: E402
from dit_optimum.training.cli import main as train_main  # noqa: E402
from dit_optimum.utils import write_json_atomic  # noqa: E402
from original_dit import random_original_dit  # noqa: E402

sys.modules.setdefault("reliability_probe", sys.modules[__name__])  # one module for probe_faults.py, run as a script
RESULTS = ROOT / "benchmarks" / "results"
OUTCOMES = (
    "clean",
    "traceback",
    "silent",
    "vague",
    "refused_valid",
    "data_loss",
    "secret_copied",
    "hang",
    "code_execution",
)
MARKER = "PWNED"
SENTINEL = "keep/precious.txt"


class Accepted(Exception):
    """Raised by stand-ins for long work: the arguments were accepted."""


class Timeout(Exception):
    pass


# The fault class of the older groups (the groups of probe_faults.py are named after their class).
GROUP_CLASSES = {
    "save": "data_loss",
    "pickle": "hostile_files",
    "data": "hostile_files",
    "damaged folder": "hostile_files",
    "convert": "hostile_files",
    "cache": "hostile_files",
    "files": "environment",
}


@dataclass
class Case:
    group: str
    name: str
    run: Callable[[Path], Any]
    # "error": must be refused; "ok": must work (and pass `check`); "either": a clean refusal, or working and
    # passing `check`
    expect: str = "error"
    check: Callable[[Path, Any], str | None] | None = None  # a problem description, or None
    klass: str = ""  # the fault class; default: from the group (GROUP_CLASSES, else "options")
    names: tuple[str, ...] = ()  # a refusal must name one of these (the parameter or file), else it is vague
    timeout: float | None = None  # seconds before a hang, when shorter than the probe's --timeout

    def __post_init__(self):
        self.klass = self.klass or GROUP_CLASSES.get(self.group, "options")


# Checks and cleanups a case registers while it runs (probe_faults.py): each is called once after the case, in
# order; a check returns (outcome, detail), e.g. a data loss or a copied secret, a cleanup returns None.
AFTER_CASE: list[Callable[[], tuple[str, str] | None]] = []


class Payload:
    """Unpickling this writes the marker file: proof that a user file ran code."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (Path.write_text, (Path(self.marker), "code ran"))


# --- shared fixtures, built once ------------------------------------------------------------------------------


class Fixtures:
    def __init__(self, root: Path):
        self.root = root
        self.pipeline = root / "pipeline"
        DiTOptimumPipeline(transformer=tiny_model(), scheduler=DDIMScheduler()).save_pretrained(self.pipeline)
        self.pixel = root / "pixel"
        pixel_model = tiny_model(in_channels=1, out_channels=2)
        DiTOptimumPipeline(transformer=pixel_model, scheduler=DDIMScheduler()).save_pretrained(self.pixel)
        self.checkpoint = root / "original.pt"
        torch.save(random_original_dit(input_size=8, in_channels=1).state_dict(), self.checkpoint)
        self.run = root / "trained"
        code = train_main(
            "base", [*TINY_TRAIN, "--output-dir", str(self.run), "--steps", "3", "--checkpoint-every", "2"]
        )
        assert code == 0, "the probe's own training fixture failed"


TINY_TRAIN = [
    "--model",
    "DiT-XS/4",
    "--model-config",
    '{"num_layers": 2}',
    "--image-size",
    "8",
    "--batch-size",
    "8",
    "--max-samples",
    "16",
    "--log-every",
    "1",
]


def cli(*argv: Any) -> int:
    """``dit-optimum`` in-process; a clean refusal is exit 2 with one ``error:`` line (or argparse's usage)."""
    return _run_main(lambda: cli_main([str(a) for a in argv]))


def train(*argv: Any, mode: str = "base") -> int:
    return _run_main(lambda: train_main(mode, [str(a) for a in argv]))


def extract(*argv: Any) -> int:
    return _run_main(lambda: extract_main([str(a) for a in argv]))


def _run_main(call: Callable[[], int]) -> int:
    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
            code = call()
    except SystemExit as exit_:  # argparse usage errors
        code = exit_.code
        if code == 2 and "error:" in stderr.getvalue():
            raise DiTOptimumError(stderr.getvalue().strip().splitlines()[-1]) from None
        raise
    if code == 2:
        lines = [line for line in stderr.getvalue().strip().splitlines() if line.startswith("error:")]
        if len(lines) != 1:
            raise AssertionError(f"exit 2 without exactly one error line: {stderr.getvalue()[-500:]!r}")
        raise DiTOptimumError(lines[0])
    if code not in (0, None):
        raise AssertionError(f"exit code {code}: {stderr.getvalue()[-500:]!r}")
    return code


# --- helpers for cases ----------------------------------------------------------------------------------------


@contextlib.contextmanager
def stand_in(module: Any, name: str):
    """Replace the long work ``module.name`` with a function raising ``Accepted``: only the checks run."""

    def accept(*args, **kwargs):
        raise Accepted

    original = getattr(module, name)
    setattr(module, name, accept)
    try:
        yield
    finally:
        setattr(module, name, original)


def copy_of(source: Path, workspace: Path, name: str = "copy") -> Path:
    target = workspace / name
    shutil.copytree(source, target)
    return target


def write_png(path: Path, value: int, mode: str = "L", size: tuple[int, int] = (8, 8)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    dtype = np.uint16 if mode == "I;16" else np.uint8
    Image.fromarray(np.full(size[::-1], value, dtype=dtype), mode=mode if mode != "I;16" else None).save(path)


def image_folder(workspace: Path, classes=("a", "b"), per_class: int = 2) -> Path:
    root = workspace / "images"
    for index, name in enumerate(classes):
        for number in range(per_class):
            write_png(root / name / f"{number}.png", 40 + 100 * index)
    return root


def loaded_data(root: Path, **kwargs):
    from dit_optimum.data import load_training_data

    return load_training_data(str(root), 8, 1, **kwargs)


def pipe() -> DiTOptimumPipeline:
    pipeline = DiTOptimumPipeline(transformer=tiny_model(), scheduler=DDIMScheduler(), id2label={0: "zero"})
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


# --- the cases --------------------------------------------------------------------------------------------------


def save_cases(fx: Fixtures) -> list[Case]:
    def foreign(ws):
        folder = ws / "work"
        (folder / "sub").mkdir(parents=True)
        (folder / "sub" / "data.bin").write_bytes(b"user data")
        return folder

    def untouched(folder_name):
        def check(ws, _):
            return None if (ws / folder_name / "sub" / "data.bin").read_bytes() == b"user data" else "user file lost"

        return check

    def a_file(ws):
        path = ws / "model.safetensors"
        path.write_bytes(b"user file")
        return path

    def earlier_save_keeps_user_file(ws):
        target = copy_of(fx.pipeline, ws, "pipe")
        (target / "notes.txt").write_text("mine")
        pipe().save_pretrained(target)
        return target

    def cwd(ws, argv):
        previous = os.getcwd()
        os.chdir(ws)
        try:
            (ws / "ck.pt").write_bytes(fx.checkpoint.read_bytes())
            return cli(*argv)
        finally:
            os.chdir(previous)

    return [
        Case("save", "pipeline into a file", lambda ws: pipe().save_pretrained(a_file(ws))),
        Case(
            "save",
            "pipeline into a foreign folder",
            lambda ws: pipe().save_pretrained(foreign(ws)),
            check=untouched("work"),
        ),
        Case("save", "model into a foreign folder", lambda ws: tiny_model().save_pretrained(foreign(ws))),
        Case("save", "model into a file", lambda ws: tiny_model().save_pretrained(a_file(ws))),
        Case(
            "save",
            "pipeline over an earlier save keeps the user's file",
            earlier_save_keeps_user_file,
            expect="ok",
            check=lambda ws, t: None if (t / "notes.txt").read_text() == "mine" else "user file lost",
        ),
        Case(
            "save",
            "foreign folder with overwrite keeps the user's files",
            lambda ws: pipe().save_pretrained(foreign(ws), overwrite=True),
            expect="ok",
            check=untouched("work"),
        ),
        Case(
            "save", "pickle serialization asked", lambda ws: pipe().save_pretrained(ws / "p", safe_serialization=False)
        ),
        Case("save", "push_to_hub asked", lambda ws: pipe().save_pretrained(ws / "p", push_to_hub=True)),
        Case("save", "parent path is a file", lambda ws: pipe().save_pretrained(a_file(ws) / "inside")),
        Case(
            "save",
            "convert original into .",
            lambda ws: cwd(ws, ["convert", "original", "ck.pt", ".", "--num-heads", "4"]),
        ),
        Case(
            "save",
            "convert original into a file",
            lambda ws: cli("convert", "original", fx.checkpoint, a_file(ws), "--num-heads", "4"),
        ),
        Case(
            "save",
            "convert --transformer-only into a foreign folder",
            lambda ws: cli("convert", "original", fx.checkpoint, foreign(ws), "--num-heads", "4", "--transformer-only"),
        ),
        Case("save", "quantize into a foreign folder", lambda ws: cli("quantize", fx.pipeline, foreign(ws))),
        Case(
            "save", "prune into a foreign folder", lambda ws: cli("prune", fx.pipeline, foreign(ws), "--heads", "0.5")
        ),
        Case(
            "save",
            "quantize onto its own source",
            lambda ws: cli("quantize", copy_of(fx.pipeline, ws), ws / "copy"),
        ),
        Case(
            "save",
            "extract latents into a foreign folder",
            lambda ws: extract("--vae", fx.pipeline / "vae", "--output-dir", foreign(ws), "--image-size", "8"),
        ),
    ]


def pickle_cases(fx: Fixtures) -> list[Case]:
    def planted(name):
        def run(ws):
            run_dir = copy_of(fx.run, ws, "run")
            last = sorted((run_dir / "checkpoints").iterdir())[-1]
            torch.save(Payload(ws / MARKER), last / name)
            return train(*TINY_TRAIN, "--output-dir", run_dir, "--steps", "5", "--resume")

        return run

    def truncated(name):
        def run(ws):
            run_dir = copy_of(fx.run, ws, "run")
            last = sorted((run_dir / "checkpoints").iterdir())[-1]
            target = next(p for p in last.iterdir() if p.name.endswith(name))
            target.write_bytes(target.read_bytes()[: max(1, target.stat().st_size // 3)])
            return train(*TINY_TRAIN, "--output-dir", run_dir, "--steps", "5", "--resume")

        return run

    def pickled_original(ws):
        path = ws / "evil.pt"
        torch.save({"model": {"w": torch.zeros(1)}, "hook": Payload(ws / MARKER)}, path)
        return cli("convert", "original", path, ws / "out")

    def bin_weights(ws):
        folder = copy_of(fx.pipeline, ws)
        weights = folder / "transformer" / "diffusion_pytorch_model.safetensors"
        weights.unlink()
        torch.save(Payload(ws / MARKER), weights.with_suffix(".bin"))
        return DiTOptimumPipeline.from_pretrained(folder)

    cases = [
        Case("pickle", f"resume with planted {name}", planted(name))
        for name in ("custom_checkpoint_0.pkl", "optimizer.bin", "random_states_0.pkl", "model.pt", "extra.json.pkl")
    ]
    cases += [
        Case("pickle", f"resume with a truncated {name}", truncated(name))
        for name in ("model.safetensors", "optimizer.safetensors", "trainer_state.json")
    ]
    cases += [
        Case("pickle", "convert a checkpoint carrying code", pickled_original),
        Case("pickle", "load a pipeline whose weights are a pickle", bin_weights),
    ]
    return cases


def training_option_cases(fx: Fixtures) -> list[Case]:
    bad = [
        ("--max-grad-norm", "-1"),
        ("--max-grad-norm", "0"),
        ("--max-grad-norm", "nan"),
        ("--max-grad-norm", "inf"),
        ("--lr", "0"),
        ("--lr", "-1"),
        ("--lr", "nan"),
        ("--lr", "inf"),
        ("--weight-decay", "-1"),
        ("--weight-decay", "nan"),
        ("--ema-decay", "1"),
        ("--ema-decay", "-0.1"),
        ("--ema-decay", "nan"),
        ("--batch-size", "0"),
        ("--batch-size", "-4"),
        ("--steps", "0"),
        ("--steps", "-5"),
        ("--checkpoint-every", "0"),
        ("--keep-checkpoints", "0"),
        ("--log-every", "0"),
        ("--image-size", "0"),
        ("--image-size", "-8"),
        ("--image-size", "15"),
        ("--channels", "2"),
        ("--channels", "0"),
        ("--max-samples", "0"),
        ("--model", "DiT-Q/2"),
        ("--model-config", "[1, 2]"),
        ("--model-config", '{"foo": 1}'),
        ("--model-config", '{"num_layers": "2"}'),
        ("--model-config", "{bad json"),
        ("--model-config", "3"),
        ("--model-config", '{"sample_size": 32}'),
        ("--attention-type", "flash"),
        ("--num-kv-heads", "3"),
        ("--seed", "-1"),
        ("--mixed-precision", "fp8"),
        ("--data", "./no/such/folder"),
        ("--data", "no-such-dataset-xyz"),
        ("--batch-size", "10000000000"),
    ]
    cases = [
        Case(
            "train options",
            f"{option} {value}",
            lambda ws, o=option, v=value: train(*TINY_TRAIN, "--output-dir", ws / "r", "--steps", "2", o, v),
        )
        for option, value in bad
    ]
    moe = [("--moe-top-k", "9"), ("--moe-num-experts", "-1"), ("--moe-capacity-factor", "0")]
    cases += [
        Case(
            "train options",
            f"moe {option} {value}",
            lambda ws, o=option, v=value: train(
                *TINY_TRAIN, "--output-dir", ws / "r", "--steps", "2", o, v, mode="moe"
            ),
        )
        for option, value in moe
    ]
    distill = [
        ("--alpha", "1.5", str(fx.pixel)),
        ("--feature-blocks", "9", str(fx.pixel)),
        ("--feature-blocks", "a", str(fx.pixel)),
        ("--feature-weight", "-1", str(fx.pixel)),
        ("--alpha", "0.5", "./no/teacher"),
        ("--alpha", "0.5", str(fx.pipeline)),  # 4-channel teacher for 1-channel digits
    ]
    cases += [
        Case(
            "train options",
            f"distill {option} {value} teacher={Path(teacher).name}",
            lambda ws, o=option, v=value, t=teacher: train(
                *TINY_TRAIN, "--output-dir", ws / "r", "--steps", "2", "--teacher", t, o, v, mode="distill"
            ),
        )
        for option, value, teacher in distill
    ]

    def resume_with(*changes):
        def run(ws):
            run_dir = copy_of(fx.run, ws, "run")
            argv = [*TINY_TRAIN, "--output-dir", run_dir, "--steps", "3", "--resume"]
            for option, value in zip(changes[::2], changes[1::2]):
                if option in argv:
                    argv[argv.index(option) + 1] = value
                else:
                    argv += [option, value]
            return train(*argv)

        return run

    for changes in (
        ("--lr", "0.01"),
        ("--batch-size", "16"),
        ("--seed", "3"),
        ("--model-config", '{"num_layers": 3}'),
        ("--steps", "1"),
        ("--ema-decay", "0.5"),
        ("--max-grad-norm", "1"),
    ):
        cases.append(Case("train resume", f"resume with {' '.join(changes)}", resume_with(*changes)))
    cases.append(
        Case(
            "train resume",
            "resume with more steps continues",
            resume_with("--steps", "5"),
            expect="ok",
            check=lambda ws, _: None if (ws / "run" / "checkpoints" / "step_5").is_dir() else "did not reach step 5",
        )
    )
    cases.append(
        Case(
            "train resume",
            "resume without --resume on a used folder",
            lambda ws: train(*TINY_TRAIN, "--output-dir", copy_of(fx.run, ws, "run"), "--steps", "5"),
        )
    )

    def concurrent(ws):
        run_dir = ws / "busy"
        holder = subprocess.Popen(
            [
                sys.executable,
                "-c",
                "import time; from dit_optimum.utils import folder_lock\n"
                f"with folder_lock({str(run_dir)!r}, 'training'):\n    print('locked', flush=True); time.sleep(60)",
            ],
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            holder.stdout.readline()
            return train(*TINY_TRAIN, "--output-dir", run_dir, "--steps", "2")
        finally:
            holder.kill()
            holder.wait()

    cases.append(Case("train resume", "a second training on a busy folder", concurrent))

    # fine-tuning a pretrained pipeline (scripts/train_lora.py)
    base = ["--image-size", "8", "--batch-size", "8", "--max-samples", "16", "--steps", "1"]
    pipeline = fx.run / "pipeline"
    for extra in (
        ["--pretrained", "./no/pipeline"],
        ["--pretrained", str(pipeline), "--lora-rank", "0"],
        ["--pretrained", str(pipeline), "--lora-rank", "-2"],
        ["--pretrained", str(pipeline), "--lora-alpha", "nan"],
        ["--pretrained", str(pipeline), "--lora-alpha", "0"],
        ["--pretrained", str(pipeline), "--lora-targets", "qkv"],
        ["--pretrained", str(pipeline), "--lora-targets", ","],
        ["--pretrained", str(pipeline), "--finetune", "dora"],
        ["--pretrained", str(pipeline), "--model-config", '{"num_layers": 1}'],
        ["--pretrained", str(pipeline), "--image-size", "16"],
        ["--pretrained", str(fx.checkpoint)],
    ):
        argv = [*base, *extra] if "--image-size" not in extra else [*base[2:], *extra]
        cases.append(
            Case(
                "fine-tune",
                " ".join(a if len(a) < 30 else "PIPE" for a in extra),
                lambda ws, a=argv: train("--output-dir", ws / "run", *a, mode="lora"),
            )
        )
    cases.append(
        Case(
            "fine-tune",
            "LoRA fine-tune of a trained pipeline works",
            lambda ws: train("--output-dir", ws / "run", *base, "--pretrained", str(pipeline), mode="lora"),
            expect="ok",
            check=lambda ws, _: (
                None if (ws / "run" / "lora" / "pytorch_lora_weights.safetensors").is_file() else "no adapter saved"
            ),
        )
    )
    return cases


def data_cases(fx: Fixtures) -> list[Case]:
    def labels_of(root):
        data = loaded_data(root)
        return data

    def hidden_folder(ws):
        root = image_folder(ws)
        write_png(root / ".ipynb_checkpoints" / "x.png", 200)
        return labels_of(root)

    def sixteen_bit(ws):
        root = ws / "images"
        write_png(root / "a" / "x.png", 32768, mode="I;16")
        write_png(root / "b" / "x.png", 0)
        return labels_of(root)

    def nested(ws):
        root = image_folder(ws)
        write_png(root / "a" / "deeper" / "y.png", 40)
        return labels_of(root)

    def corrupt(ws, skip=False):
        root = image_folder(ws)
        (root / "a" / "broken.png").write_bytes(b"\x89PNG not really")
        return loaded_data(root, skip_corrupt=skip)

    def bomb(ws, skip=False):
        root = image_folder(ws)
        write_png(root / "a" / "huge.png", 10, size=(64, 64))  # 4096 pixels: over twice the limit set below
        previous = Image.MAX_IMAGE_PIXELS
        Image.MAX_IMAGE_PIXELS = 1000
        try:
            return loaded_data(root, skip_corrupt=skip)
        finally:
            Image.MAX_IMAGE_PIXELS = previous

    def non_image(ws):
        root = image_folder(ws)
        (root / "a" / "notes.txt").write_text("hello")
        return loaded_data(root)

    def empty_class(ws):
        root = image_folder(ws)
        (root / "c").mkdir()
        return loaded_data(root)

    def no_classes(ws):
        root = ws / "flat"
        write_png(root / "x.png", 10)
        return loaded_data(root)

    def truncated_png(ws):
        root = image_folder(ws)
        path = root / "b" / "0.png"
        path.write_bytes(path.read_bytes()[:30])
        return loaded_data(root)

    return [
        Case(
            "data",
            "hidden folder does not shift labels",
            hidden_folder,
            expect="ok",
            check=lambda ws, d: (
                None
                if sorted(d.id2label.values()) == ["a", "b"] and set(d.labels.tolist()) == {0, 1}
                else f"labels {d.id2label}"
            ),
        ),
        Case(
            "data",
            "16-bit grey PNG keeps its value",
            sixteen_bit,
            expect="ok",
            check=lambda ws, d: (
                None
                if abs(float(d.samples[0].mean()) - 0.0) < 0.01
                else f"mean {float(d.samples[0].mean()):.3f} (expected 0.0 in [-1, 1])"
            ),
        ),
        Case(
            "data",
            "nested images count for their class",
            nested,
            expect="ok",
            check=lambda ws, d: None if len(d.labels) == 5 else f"{len(d.labels)} images",
        ),
        Case("data", "a corrupt image is named", corrupt),
        Case(
            "data",
            "a corrupt image is skipped and named with skip_corrupt",
            lambda ws: corrupt(ws, True),
            expect="ok",
            check=lambda ws, d: None if any("broken.png" in str(p) for p in d.skipped_files) else "not named",
        ),
        Case("data", "a decompression bomb is named", bomb),
        Case(
            "data",
            "a decompression bomb is skipped with skip_corrupt",
            lambda ws: bomb(ws, True),
            expect="ok",
            check=lambda ws, d: None if [p.name for p in d.skipped_files] == ["huge.png"] else str(d.skipped_files),
        ),
        Case(
            "data",
            "a non-image file is ignored",
            non_image,
            expect="ok",
            check=lambda ws, d: None if len(d.labels) == 4 else f"{len(d.labels)} images",
        ),
        Case("data", "an empty class folder is refused", empty_class),
        Case("data", "a folder without class folders is refused", no_classes),
        Case("data", "a truncated PNG is named", truncated_png),
        Case("data", "a file as data", lambda ws: loaded_data(Path(fx.checkpoint))),
    ]


def model_config_cases() -> list[Case]:
    bad = [
        {"num_layers": 0},
        {"num_layers": -2},
        {"num_layers": 2.0},
        {"num_layers": "2"},
        {"num_layers": None},
        {"sample_size": 0},
        {"sample_size": -8},
        {"sample_size": "8"},
        {"sample_size": 7},
        {"patch_size": 0},
        {"patch_size": -2},
        {"patch_size": 3},
        {"num_attention_heads": 0},
        {"num_attention_heads": 3, "attention_head_dim": 3},
        {"attention_head_dim": 0},
        {"attention_head_dim": 1.5},
        {"in_channels": 0},
        {"out_channels": 0},
        {"out_channels": -1},
        {"mlp_ratio": 0},
        {"mlp_ratio": -1},
        {"mlp_ratio": float("nan")},
        {"mlp_ratio": float("inf")},
        {"mlp_ratio": 1e-4},
        {"attention_type": "mediated", "num_mediators": 0},
        {"attention_type": "mediated", "num_mediators": 3},
        {"attention_type": "mediated", "num_mediators": 25},
        {"attention_type": "focused", "focusing_factor": float("inf")},
        {"attention_type": "focused", "focusing_factor": 0.5},
        {"attention_type": "focused", "focused_variant": "x"},
        {"attention_type": "gqa", "num_kv_heads": 2.0},
        {"attention_type": "gqa", "num_kv_heads": 3},
        {"attention_type": "mqa", "num_kv_heads": 2},
        {"attention_type": "shallow", "attention_compression": 3},
        {"attention_type": "flash"},
        {"activation_fn": "relu6"},
        {"dropout": 1.0},
        {"dropout": -0.1},
        {"norm_eps": 0},
        {"class_dropout_prob": 1},
        {"attention_bias": "yes"},
        {"num_embeds_ada_norm": True},
        {"num_embeds_ada_norm": 0},
        {"moe_num_experts": 4, "moe_top_k": 5},
        {"moe_num_experts": 4, "moe_capacity_factor": float("inf")},
        {"moe_num_experts": 4, "moe_layers": 1},
        {"moe_num_experts": -1},
        {"layer_heads": [4, "4"]},
        {"layer_heads": [4]},
        {"layer_mlp_dims": [0, 4]},
        {"norm_type": "layer_norm"},
        {"dwconv_kernel_size": 2, "attention_type": "mediated"},
        {"num_layers": 10**7, "num_attention_heads": 64, "attention_head_dim": 64},
    ]
    cases = [
        Case(
            "model config",
            str(overrides)[:70],
            lambda ws, o=overrides: DiTOptimumTransformer2DModel(**tiny_config(**o)),
        )
        for overrides in bad
    ]

    def wrong_layer_count(ws, layers):
        tiny_model().save_pretrained(ws / "m")
        path = ws / "m" / "config.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), "num_layers": layers}))
        return DiTOptimumTransformer2DModel.from_pretrained(ws / "m")

    cases += [
        Case("model config", f"config.json says {n} layers, weights have 2", lambda ws, n=n: wrong_layer_count(ws, n))
        for n in (1, 3)
    ]
    return cases


DAMAGES = {
    "no model_index.json": lambda f: (f / "model_index.json").unlink(),
    "model_index.json not JSON": lambda f: (f / "model_index.json").write_text("{oops"),
    "model_index.json a list": lambda f: (f / "model_index.json").write_text("[1, 2]"),
    "no transformer config": lambda f: (f / "transformer" / "config.json").unlink(),
    "transformer config not JSON": lambda f: (f / "transformer" / "config.json").write_text("{"),
    "no transformer weights": lambda f: (f / "transformer" / "diffusion_pytorch_model.safetensors").unlink(),
    "truncated weights": lambda f: (f / "transformer" / "diffusion_pytorch_model.safetensors").write_bytes(
        (f / "transformer" / "diffusion_pytorch_model.safetensors").read_bytes()[:100]
    ),
    "empty weights": lambda f: (f / "transformer" / "diffusion_pytorch_model.safetensors").write_bytes(b""),
    "vae config not JSON": lambda f: (f / "vae" / "config.json").write_text("x"),
    "no scheduler": lambda f: shutil.rmtree(f / "scheduler"),
}


def damaged_folder_cases(fx: Fixtures) -> list[Case]:
    def damaged(ws, how):
        folder = copy_of(fx.pipeline, ws)
        DAMAGES[how](folder)
        return folder

    cases = []
    for how in DAMAGES:
        cases.append(
            Case("damaged folder", f"load: {how}", lambda ws, h=how: DiTOptimumPipeline.from_pretrained(damaged(ws, h)))
        )
        cases.append(
            Case(
                "damaged folder",
                f"prune: {how}",
                lambda ws, h=how: cli("prune", damaged(ws, h), ws / "out", "--heads", "0.5"),
            )
        )
        cases.append(
            Case(
                "damaged folder",
                f"evaluate: {how}",
                lambda ws, h=how: cli(
                    "evaluate", damaged(ws, h), "--no-speed", "--num-samples", "4", "--reference-samples", "4"
                ),
            )
        )
    cases.append(
        Case("damaged folder", "load a missing path", lambda ws: DiTOptimumPipeline.from_pretrained(ws / "missing"))
    )
    cases.append(
        Case("damaged folder", "quantize a missing path", lambda ws: cli("quantize", ws / "missing", ws / "out"))
    )
    return cases


def convert_cases(fx: Fixtures) -> list[Case]:
    def checkpoint(ws, content: bytes | None = None, state=None):
        path = ws / "ck.pt"
        if state is not None:
            torch.save(state, path)
        else:
            path.write_bytes(content)
        return path

    def labels_file(ws, text):
        path = ws / "labels.json"
        path.write_text(text)
        return path

    truncated = fx.checkpoint.read_bytes()[:300]
    return [
        Case("convert", "missing checkpoint", lambda ws: cli("convert", "original", ws / "none.pt", ws / "out")),
        Case(
            "convert",
            "truncated checkpoint",
            lambda ws: cli("convert", "original", checkpoint(ws, truncated), ws / "out"),
        ),
        Case("convert", "empty checkpoint", lambda ws: cli("convert", "original", checkpoint(ws, b""), ws / "out")),
        Case(
            "convert",
            "text file as checkpoint",
            lambda ws: cli("convert", "original", checkpoint(ws, b"hello"), ws / "out"),
        ),
        Case(
            "convert",
            "not a DiT state dict",
            lambda ws: cli("convert", "original", checkpoint(ws, state={"w": torch.zeros(2)}), ws / "out"),
        ),
        Case(
            "convert",
            "wrong shapes",
            lambda ws: cli(
                "convert",
                "original",
                checkpoint(
                    ws,
                    state={
                        "x_embedder.proj.weight": torch.zeros(3),
                        "y_embedder.embedding_table.weight": torch.zeros(2, 2),
                        "final_layer.linear.weight": torch.zeros(4, 4),
                    },
                ),
                ws / "out",
            ),
        ),
        Case(
            "convert",
            "a list instead of a state dict",
            lambda ws: cli("convert", "original", checkpoint(ws, state=[1, 2]), ws / "out"),
        ),
        Case(
            "convert",
            "--model mismatch",
            lambda ws: cli("convert", "original", fx.checkpoint, ws / "out", "--model", "DiT-XL/2"),
        ),
        Case(
            "convert",
            "--model unknown",
            lambda ws: cli("convert", "original", fx.checkpoint, ws / "out", "--model", "DiT-Q/2"),
        ),
        Case(
            "convert",
            "--num-heads 0",
            lambda ws: cli("convert", "original", fx.checkpoint, ws / "out", "--num-heads", "0"),
        ),
        Case(
            "convert",
            "--num-heads 7",
            lambda ws: cli("convert", "original", fx.checkpoint, ws / "out", "--num-heads", "7"),
        ),
        Case(
            "convert",
            "--num-classes 3",
            lambda ws: cli("convert", "original", fx.checkpoint, ws / "out", "--num-classes", "3"),
        ),
        Case(
            "convert",
            "--id2label missing",
            lambda ws: cli(
                "convert", "original", fx.checkpoint, ws / "out", "--num-heads", "4", "--id2label", ws / "none.json"
            ),
        ),
        Case(
            "convert",
            "--id2label malformed",
            lambda ws: cli(
                "convert",
                "original",
                fx.checkpoint,
                ws / "out",
                "--num-heads",
                "4",
                "--id2label",
                labels_file(ws, "{bad"),
            ),
        ),
        Case(
            "convert",
            "--id2label a list",
            lambda ws: cli(
                "convert",
                "original",
                fx.checkpoint,
                ws / "out",
                "--num-heads",
                "4",
                "--id2label",
                labels_file(ws, "[1, 2]"),
            ),
        ),
        Case(
            "convert",
            "--id2label duplicate names",
            lambda ws: cli(
                "convert",
                "original",
                fx.checkpoint,
                ws / "out",
                "--num-heads",
                "4",
                "--id2label",
                labels_file(ws, '{"0": "cat", "1": "cat"}'),
            ),
        ),
        Case(
            "convert",
            "--id2label key out of range",
            lambda ws: cli(
                "convert",
                "original",
                fx.checkpoint,
                ws / "out",
                "--num-heads",
                "4",
                "--id2label",
                labels_file(ws, '{"99": "x"}'),
            ),
        ),
        Case(
            "convert",
            "--vae missing",
            lambda ws: cli("convert", "original", fx.checkpoint, ws / "out", "--num-heads", "4", "--vae", "./no/vae"),
        ),
        Case(
            "convert", "diffusers source missing", lambda ws: cli("convert", "diffusers", "/missing/pipe", ws / "out")
        ),
        Case(
            "convert",
            "diffusers source not a pipeline",
            lambda ws: cli("convert", "diffusers", fx.pipeline / "transformer", ws / "out"),
        ),
        Case(
            "convert",
            "diffusers source a Hub id offline",
            lambda ws: cli("convert", "diffusers", "facebook/DiT-XL-2-256", ws / "out"),
        ),
    ]


def compression_cases(fx: Fixtures) -> list[Case]:
    quantize_bad = [
        ("--backend", "tensorrt"),
        ("--weights", "int3"),
        ("--activations", "int4"),
        ("--weights", "int4"),  # torchao int4 needs CUDA
        ("--weights", "float8"),
        ("--backend", "torch", "--weights", "int8"),
        ("--backend", "quanto", "--activations", "int8"),
        ("--keep-float", "proj_out"),
        ("--dtype", "float64"),
        ("--backend", "quanto", "--weights", "int8", "--activations", "int8", "--calibration-batches", "0"),
    ]
    prune_bad = [
        ("--heads", "1.5"),
        ("--heads", "-0.1"),
        ("--heads", "nan"),
        ("--mlp", "1.0"),
        ("--depth", "1.0"),
        ("--mlp", "inf"),
        ("--importance", "l3"),
        ("--scope", "local"),
    ]
    cases = [
        Case("quantize/prune", f"quantize {' '.join(a)}", lambda ws, a=a: cli("quantize", fx.pipeline, ws / "out", *a))
        for a in quantize_bad
    ]
    cases += [
        Case("quantize/prune", f"prune {' '.join(a)}", lambda ws, a=a: cli("prune", fx.pipeline, ws / "out", *a))
        for a in prune_bad
    ]

    def twice(ws):
        cli("quantize", fx.pipeline, ws / "q", "--backend", "torchao", "--weights", "int8", "--dtype", "float32")
        return cli("quantize", ws / "q", ws / "q2")

    cases.append(Case("quantize/prune", "quantize a quantized pipeline", twice))
    cases.append(
        Case(
            "quantize/prune",
            "quantize with --keep-float , (keep nothing)",
            lambda ws: cli("quantize", fx.pipeline, ws / "out", "--keep-float", ","),
            expect="ok",
        )
    )
    cases.append(
        Case(
            "quantize/prune",
            "prune --depth 0.99 keeps one block",
            lambda ws: cli("prune", fx.pipeline, ws / "out", "--depth", "0.99"),
            expect="ok",
            check=lambda ws, _: (
                None
                if json.loads((ws / "out" / "transformer" / "config.json").read_text())["num_layers"] == 1
                else "wrong depth"
            ),
        )
    )
    cases.append(
        Case(
            "quantize/prune",
            "quantize with dtype name",
            lambda ws: quantize(tiny_model(), dtype="float32"),
            expect="ok",
        )
    )
    cases.append(
        Case(
            "quantize/prune",
            "quantize keep_float as a string",
            lambda ws: quantize(tiny_model(), keep_float="pos_embed"),
        )
    )
    return cases


def benchmark_cases(fx: Fixtures) -> list[Case]:
    bad = [
        ["--techniques", ","],
        ["--techniques", "nope"],
        ["--variants", ","],
        ["--variants", "DiT-M/2"],
        ["--preset", "huge"],
        ["--preset", "paper"],
        ["--train-steps", "0"],
        ["--train-steps", "-1"],
        ["--train-batch-size", "0"],
        ["--learning-rate", "-1"],
        ["--learning-rate", "nan"],
        ["--channels", "2"],
        ["--channels", "4"],
        ["--image-size", "15"],
        ["--image-size", "0"],
        ["--image-size", "4096"],
        ["--metrics", "kid", "--num-samples", "10000000"],
        ["--num-samples", "100000000"],
        ["--num-samples", "1"],
        ["--reference-samples", "1"],
        ["--reference-samples", "100000"],
        ["--speed-batch-size", "0"],
        ["--speed-batch-size", "100000000"],
        ["--batch-size", "100000000"],
        ["--steps", "0"],
        ["--steps", "1001"],
        ["--guidance-scale", "0.5"],
        ["--guidance-scale", "nan"],
        ["--metrics", "fid"],
        ["--metrics", "is"],
        ["--metrics", ","],
        ["--pretrained", "DiT-XS/4"],
        ["--pretrained", "DiT-XS/4=./no/pipe"],
        ["--pretrained", "DiT-S/2=" + str(fx.pipeline)],
        ["--data", "./no/such"],
        ["--reference", "/no/such"],
        ["--inception-weights", "/no/weights.pt"],
    ]

    def run(ws, argv):
        import dit_optimum.benchmark as package

        with stand_in(package, "run_benchmark"):
            return cli("benchmark", *argv, "--output-dir", ws / "b")

    cases = [Case("benchmark", " ".join(argv)[:60], lambda ws, a=argv: run(ws, a)) for argv in bad]

    def damaged_results(ws, text):
        (ws / "b").mkdir()
        (ws / "b" / "results.json").write_text(text)
        return cli("benchmark", "--techniques", "baseline", "--output-dir", ws / "b")

    cases.append(Case("benchmark", "truncated results.json", lambda ws: damaged_results(ws, '{"rows": [')))
    cases.append(Case("benchmark", "results.json of another tool", lambda ws: damaged_results(ws, "[]")))

    def busy(ws):
        holder = subprocess.Popen(
            [
                sys.executable,
                "-c",
                "import time; from dit_optimum.utils import folder_lock\n"
                f"with folder_lock({str(ws / 'b')!r}, 'benchmark'):\n    print('locked', flush=True); time.sleep(60)",
            ],
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            holder.stdout.readline()
            return cli("benchmark", "--techniques", "baseline", "--output-dir", ws / "b")
        finally:
            holder.kill()
            holder.wait()

    cases.append(Case("benchmark", "a second run on a busy folder", busy))
    return cases


def evaluate_cases(fx: Fixtures) -> list[Case]:
    base = ["--no-speed", "--num-samples", "4", "--reference-samples", "4", "--metrics", "kid", "--steps", "2"]

    def evaluate(ws, *extra):
        import dit_optimum.evaluation.quality as quality

        with stand_in(quality, "sample_features"):
            return cli("evaluate", fx.pixel, *base, *extra)

    bad = [
        ["--num-samples", "0"],
        ["--num-samples", "10000000"],
        ["--reference", "./no/images"],
        ["--reference-samples", "5000"],
        ["--metrics", "is"],
        ["--inception-weights", "/no/weights.pt"],
        ["--steps", "0"],
        ["--guidance-scale", "nan"],
        ["--batch-size", "0"],
        ["--speed-batch-size", "0"],
        ["--metrics", "fid"],
    ]
    cases = [Case("evaluate", " ".join(argv), lambda ws, a=argv: evaluate(ws, *a)) for argv in bad]
    cases.append(
        Case(
            "evaluate",
            "output path is a folder",
            lambda ws: (ws / "o").mkdir() or cli("evaluate", fx.pixel, *base, "--output", ws / "o"),
        )
    )
    return cases


def hub_cases(fx: Fixtures) -> list[Case]:
    """release / push / export-space with bad folders, ids, results files and no token."""
    import dit_optimum.hub.upload as push_module

    def results(ws: Path, payload: Any) -> Path:
        folder = ws / "results"
        folder.mkdir(exist_ok=True)
        path = folder / "results.json"
        path.write_text(payload if isinstance(payload, str) else json.dumps(payload))
        return path

    one_row = {"settings": {}, "rows": [{"variant": "DiT-XS/4", "technique": "baseline", "status": "ok"}]}

    def without_token(ws: Path) -> int:
        original = push_module.get_token
        push_module.get_token = lambda: None
        try:
            return cli("push", fx.pipeline, "org/x", "--results", results(ws, one_row), "--technique", "baseline")
        finally:
            push_module.get_token = original

    cases = [
        ("release: no such folder", lambda ws: cli("release", ws / "missing", "org", "--dry-run", ws / "out")),
        ("release: folder without results.json", lambda ws: cli("release", ws, "org", "--dry-run", ws / "out")),
        ("release: bad org", lambda ws: cli("release", results(ws, one_row).parent, "bad org", "--dry-run", ws / "o")),
        ("release: org ending in '-'", lambda ws: cli("release", results(ws, one_row).parent, "org-", "--dry-run", ws)),
        ("release: damaged results.json", lambda ws: cli("release", results(ws, "{x").parent, "org", "--dry-run", ws)),
        (
            "release: speed-only results",
            lambda ws: cli(
                "release", results(ws, {"settings": {"speed_only": True}, "rows": []}).parent, "org", "--dry-run", ws
            ),
        ),
        (
            "release: unknown technique",
            lambda ws: cli("release", results(ws, one_row).parent, "org", "--dry-run", ws / "o", "--techniques", "x"),
        ),
        ("push: not a pipeline", lambda ws: cli("push", ws, "org/x", "--dry-run", ws / "out")),
        ("push: pipeline without results", lambda ws: cli("push", fx.pipeline, "org/x", "--dry-run", ws / "out")),
        ("push: repo id without namespace", lambda ws: cli("push", fx.pipeline, "x", "--dry-run", ws / "out")),
        ("push: repo id with two slashes", lambda ws: cli("push", fx.pipeline, "a/b/c", "--dry-run", ws / "out")),
        (
            "push: results file is text",
            lambda ws: cli("push", fx.pipeline, "org/x", "--results", results(ws, "hello"), "--dry-run", ws / "o"),
        ),
        (
            "push: results without that technique",
            lambda ws: cli(
                "push", fx.pipeline, "org/x", "--results", results(ws, one_row), "--technique", "int8", "--dry-run", ws
            ),
        ),
        ("push: no token", without_token),
        ("push: dry run into a foreign folder", lambda ws: cli("push", fx.pipeline, "org/x", "--dry-run", ws)),
        ("export-space: no such folder", lambda ws: cli("export-space", ws / "missing", ws / "space")),
        ("export-space: folder without releases", lambda ws: cli("export-space", ws, ws / "space")),
    ]
    return [Case("hub", name, run) for name, run in cases]


def architecture_cases() -> list[Case]:
    bad = [
        ["--sample-sizes", "0"],
        ["--sample-sizes", "-8"],
        ["--sample-sizes", "4096"],
        ["--sample-sizes", "15"],
        ["--sample-sizes", "a"],
        ["--batch-size", "0"],
        ["--repeats", "0"],
        ["--presets", "DiT-Q/2"],
        ["--attention-types", "flash"],
        ["--presets", ","],
    ]

    def run(ws, argv):
        import dit_optimum.benchmark.architecture as module

        with stand_in(module, "_architecture_rows"):
            return cli(
                "architecture",
                *argv,
                "--presets" if "--presets" not in argv else "--repeats",
                "DiT-XS/8" if "--presets" not in argv else "1",
                "--output-dir",
                ws / "a",
            )

    return [Case("architecture", " ".join(argv), lambda ws, a=argv: run(ws, a)) for argv in bad]


def speed_cases() -> list[Case]:
    """The speed issue's surface: step caches, their saved schedule, fused projections, attention backends."""
    from dit_optimum import enable_step_cache

    def cached(method, **options):
        return enable_step_cache(pipe(), method, **options)

    def schedule_config(ws, schedule):
        model = tiny_model()
        model.save_pretrained(ws / "model")
        config = json.loads((ws / "model" / "config.json").read_text())
        config["block_cache_schedule"] = schedule
        (ws / "model" / "config.json").write_text(json.dumps(config))
        return DiTOptimumTransformer2DModel.from_pretrained(ws / "model")

    def fused_save(ws):
        model = tiny_model()
        model.fuse_qkv_projections()
        model.save_pretrained(ws / "fused")

    bad = [
        ("unknown method", lambda ws: cached("lru")),
        ("unknown option", lambda ws: cached("pab", threshold=0.1)),
        ("missing steps", lambda ws: cached("magcache")),
        ("negative threshold", lambda ws: cached("first-block", threshold=-1)),
        ("reuse fraction 1", lambda ws: cached("block-schedule", num_inference_steps=4, reuse_fraction=1.0)),
        ("string option", lambda ws: cached("taylorseer", cache_interval="3")),
        ("bool option", lambda ws: cached("pab", skip_range=True)),
        ("reversed range", lambda ws: cached("faster", timestep_range=(500, 100))),
        ("not a pipeline", lambda ws: enable_step_cache(tiny_model(), "first-block")),
        ("two caches", lambda ws: enable_step_cache(cached("first-block"), "pab")),
        ("schedule block out of range", lambda ws: schedule_config(ws, {"num_inference_steps": 2, "reuse": [[], [9]]})),
        ("schedule wrong length", lambda ws: schedule_config(ws, {"num_inference_steps": 3, "reuse": [[], [1]]})),
        ("schedule reuses at step 0", lambda ws: schedule_config(ws, {"num_inference_steps": 2, "reuse": [[0], []]})),
        ("schedule not a mapping", lambda ws: schedule_config(ws, [[0]])),
        ("save a fused model", fused_save),
        ("unknown attention backend", lambda ws: tiny_model().set_attention_backend("fastest")),
    ]
    cases = [Case("speed", name, run) for name, run in bad]
    cases.append(
        Case(
            "speed",
            "a saved schedule reloads and samples",
            lambda ws: schedule_config(ws, {"num_inference_steps": 2, "reuse": [[], [1]]}),
            expect="ok",
            check=lambda ws, model: None if model.is_cache_enabled else "the saved schedule is not enabled",
        )
    )
    return cases


def pipeline_call_cases() -> list[Case]:
    def call(**kwargs):
        kwargs.setdefault("num_inference_steps", 2)
        kwargs.setdefault("output_type", "np")
        return pipe()(**kwargs).images

    bad = [
        {"class_labels": 10},
        {"class_labels": -1},
        {"class_labels": "eight"},
        {"class_labels": []},
        {"class_labels": 2.5},
        {"class_labels": [1, None]},
        {"class_labels": [1], "guidance_scale": float("nan")},
        {"class_labels": [1], "guidance_scale": float("inf")},
        {"class_labels": [1], "guidance_scale": 0.5},
        {"class_labels": [1], "guidance_scale": "a"},
        {"class_labels": [1], "num_inference_steps": 0},
        {"class_labels": [1], "num_inference_steps": 1001},
        {"class_labels": [1], "num_inference_steps": 2.5},
        {"class_labels": [1], "num_inference_steps": "a"},
        {"class_labels": [1], "output_type": "jpeg"},
    ]
    cases = [Case("pipeline call", str(kwargs), lambda ws, k=kwargs: call(**k)) for kwargs in bad]
    good = [
        {"class_labels": np.int64(3)},
        {"class_labels": np.array([1, 2])},
        {"class_labels": torch.tensor([[1], [2]])},
        {"class_labels": ["zero", 1]},
    ]
    cases += [
        Case(
            "pipeline call",
            f"valid {kwargs}",
            lambda ws, k=kwargs: call(**k),
            expect="ok",
            check=lambda ws, images: None if np.isfinite(images).all() else "non-finite images",
        )
        for kwargs in good
    ]
    cases.append(
        Case(
            "pipeline call",
            "duplicate id2label names",
            lambda ws: DiTOptimumPipeline(transformer=tiny_model(), id2label={0: "cat", 1: "cat"}),
        )
    )
    return cases


def cache_cases(fx: Fixtures) -> list[Case]:
    from conftest import TinyFeatureExtractor
    from dit_optimum.evaluation.reference import real_cache_path, real_features, real_split

    def reference_features(root: str, resolution: int, count: int, extractor) -> dict:
        return real_features(real_split(root, "train", count, 0), "reference", resolution, extractor)

    def reference_cache_path(root: str, resolution: int, count: int, extractor) -> Path:
        return real_cache_path(real_split(root, "train", count, 0), "reference", resolution, extractor)

    def with_cache(ws):
        os.environ["DIT_OPTIMUM_CACHE"] = str(ws / "cache")
        return image_folder(ws, per_class=3)

    def replaced(ws):
        root = with_cache(ws)
        before = reference_features(str(root), 8, 4, TinyFeatureExtractor())["pool"]
        for path in root.rglob("*.png"):
            write_png(path, 250)
        return before, reference_features(str(root), 8, 4, TinyFeatureExtractor())["pool"]

    def damaged_cache(ws, how):
        root = with_cache(ws)
        first = reference_features(str(root), 8, 4, TinyFeatureExtractor())["pool"]
        path = reference_cache_path(str(root), 8, 4, TinyFeatureExtractor())
        path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2] if how == "truncated" else b"")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            again = reference_features(str(root), 8, 4, TinyFeatureExtractor())["pool"]
        return first, again, caught

    return [
        Case(
            "cache",
            "replaced reference images are not served from the cache",
            replaced,
            expect="ok",
            check=lambda ws, r: None if not np.allclose(r[0], r[1]) else "stale features",
        ),
        Case(
            "cache",
            "a truncated cache entry is recomputed with a warning",
            lambda ws: damaged_cache(ws, "truncated"),
            expect="ok",
            check=lambda ws, r: None if np.allclose(r[0], r[1]) and r[2] else "not recomputed or no warning",
        ),
        Case(
            "cache",
            "an empty cache entry is recomputed with a warning",
            lambda ws: damaged_cache(ws, "empty"),
            expect="ok",
            check=lambda ws, r: None if np.allclose(r[0], r[1]) and r[2] else "not recomputed or no warning",
        ),
    ]


def permission_cases(fx: Fixtures) -> list[Case]:
    def modes(ws):
        previous = os.umask(0o022)
        try:
            pipe().save_pretrained(ws / "p")
            write_json_atomic(ws / "r.json", {})
        finally:
            os.umask(previous)
        return {
            "index": (ws / "p" / "model_index.json").stat().st_mode & 0o777,
            "folder": (ws / "p").stat().st_mode & 0o777,
            "results": (ws / "r.json").stat().st_mode & 0o777,
        }

    return [
        Case(
            "files",
            "saved pipeline and results follow the umask",
            modes,
            expect="ok",
            check=lambda ws, m: (
                None
                if m == {"index": 0o644, "folder": 0o755, "results": 0o644}
                else str({k: oct(v) for k, v in m.items()})
            ),
        ),
    ]


# --- running ----------------------------------------------------------------------------------------------------


def _after_case() -> list[tuple[str, str]]:
    """Run every registered check and cleanup once; the checks' verdicts, in order."""
    verdicts = []
    while AFTER_CASE:
        try:
            verdict = AFTER_CASE.pop(0)()
        except Exception as failed:  # the probe's own check: shown, and the run goes on
            verdict = ("traceback", f"the probe's after-case check failed: {type(failed).__name__}: {failed}")
        if verdict is not None:
            verdicts.append(verdict)
    return verdicts


def classify(case: Case, workspace: Path, timeout: float) -> tuple[str, str]:
    sentinel = workspace / SENTINEL
    sentinel.parent.mkdir(parents=True)
    sentinel.write_text("precious")
    AFTER_CASE.clear()
    timeout = min(timeout, case.timeout or timeout)

    def on_alarm(signum, frame):
        raise Timeout

    signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, timeout)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            result = case.run(workspace)
        error = None
    except Timeout:
        _after_case()
        return "hang", f"still running after {timeout:.0f} s"
    except DiTOptimumError as refused:
        result, error = None, ("clean", str(refused).splitlines()[0][:300])
    except Accepted:
        result, error = None, ("accepted", "")
    except Exception as crashed:
        frame = traceback.extract_tb(crashed.__traceback__)[-1]
        result, error = (
            None,
            (
                "traceback",
                f"{type(crashed).__name__}: {str(crashed)[:200]} ({Path(frame.filename).name}:{frame.lineno})",
            ),
        )
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
    verdicts = _after_case()
    if (workspace / MARKER).exists():
        return "code_execution", "a planted payload ran"
    if not sentinel.is_file() or sentinel.read_text() != "precious":
        return "data_loss", "the sentinel file is gone or changed"
    if verdicts:
        return verdicts[0]
    if error is not None and error[0] == "traceback":
        return error
    named = (
        not case.names or error is None or error[0] != "clean" or any(n.lower() in error[1].lower() for n in case.names)
    )
    if not named:
        return "vague", f"{error[1]} (names none of {', '.join(case.names)})"
    if case.expect == "error":
        if error is not None and error[0] == "clean":
            problem = case.check(workspace, None) if case.check else None
            return ("data_loss", problem) if problem else error
        return "silent", "accepted" if error is None or error[0] == "accepted" else ""
    if case.expect == "either":
        if error is not None and error[0] == "clean":
            return error
        problem = case.check(workspace, result) if case.check else None
        return ("silent", problem) if problem else ("clean", "handled correctly")
    if error is not None and error[0] == "clean":
        return "refused_valid", error[1]
    if error is not None and error[0] == "accepted":
        return "clean", "accepted"
    problem = case.check(workspace, result) if case.check else None
    return ("silent", problem) if problem else ("clean", "handled correctly")


def all_cases(fx: Fixtures) -> list[Case]:
    from probe_faults import fault_cases

    return [
        *save_cases(fx),
        *pickle_cases(fx),
        *training_option_cases(fx),
        *data_cases(fx),
        *model_config_cases(),
        *damaged_folder_cases(fx),
        *convert_cases(fx),
        *compression_cases(fx),
        *benchmark_cases(fx),
        *evaluate_cases(fx),
        *hub_cases(fx),
        *architecture_cases(),
        *pipeline_call_cases(),
        *cache_cases(fx),
        *speed_cases(),
        *permission_cases(fx),
        *fault_cases(fx),
    ]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", help="run only the cases of this group")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds before a case counts as a hang")
    parser.add_argument("--output", type=Path, default=RESULTS / "reliability_probe.json")
    args = parser.parse_args()
    from probe_faults import FAULT_GROUPS

    torch.set_num_threads(min(2, torch.get_num_threads()))
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="dit-probe-") as scratch:
        scratch = Path(scratch)
        cache = os.environ.get("DIT_OPTIMUM_CACHE")
        fx = Fixtures(scratch / "fixtures")
        cases = [c for c in all_cases(fx) if args.only is None or args.only in (c.group, c.klass)]
        rows = []
        for index, case in enumerate(cases):
            workspace = scratch / f"case-{index}"
            workspace.mkdir()
            outcome, detail = classify(case, workspace, args.timeout)
            if cache is None:
                os.environ.pop("DIT_OPTIMUM_CACHE", None)
            else:
                os.environ["DIT_OPTIMUM_CACHE"] = cache
            rows.append(
                {
                    "group": case.group,
                    "class": case.klass,
                    "new": case.group in FAULT_GROUPS,
                    "case": case.name,
                    "expect": case.expect,
                    "outcome": outcome,
                    "detail": detail,
                }
            )
            mark = "." if outcome == "clean" else f"\n  {outcome.upper()}: [{case.group}] {case.name}: {detail}\n"
            print(mark, end="", flush=True)
            shutil.rmtree(workspace, ignore_errors=True)
    counts = Counter(row["outcome"] for row in rows)
    by: dict[str, dict[str, Counter]] = {"group": {}, "class": {}, "class (new cases)": {}, "class (old cases)": {}}
    for row in rows:
        by["group"].setdefault(row["group"], Counter())[row["outcome"]] += 1
        by["class"].setdefault(row["class"], Counter())[row["outcome"]] += 1
        age = "class (new cases)" if row["new"] else "class (old cases)"
        by[age].setdefault(row["class"], Counter())[row["outcome"]] += 1
    summary = {outcome: counts.get(outcome, 0) for outcome in OUTCOMES}
    print(f"\n{len(rows)} cases in {time.perf_counter() - start:.0f} s: {summary}")
    for kind, table in by.items():
        print(f"per {kind}:")
        for name, name_counts in table.items():
            print(f"  {name:16s} {sum(name_counts.values()):4d} {dict(name_counts)}")
    write_json_atomic(
        args.output,
        {
            "hardware": hardware_description(),
            "cases": len(rows),
            "new_cases": sum(row["new"] for row in rows),
            "outcomes": summary,
            "groups": {group: dict(c) for group, c in by["group"].items()},
            "classes": {klass: dict(c) for klass, c in by["class"].items()},
            "classes_new": {klass: dict(c) for klass, c in by["class (new cases)"].items()},
            "classes_old": {klass: dict(c) for klass, c in by["class (old cases)"].items()},
            "rows": rows,
            "wall_s": time.perf_counter() - start,
        },
    )
    return 0 if counts.get("clean", 0) == len(rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())

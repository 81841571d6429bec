"""Fault-injection cases of the reliability probe (``reliability_probe.py`` runs them with its own cases).

One list of cases per fault class of the reliability issue, each run as a careless, unlucky or hostile user would:

- ``data_loss``: overwrites next to weight variants and user files, saves into their own source, fixed-name files
  over a user's, an empty output path, symlinks planted where the package writes or locks;
- ``secrets``: symlinks to a token (or any file outside the folder), hidden files and a token in the environment,
  which ``push`` / ``release`` / ``export-space`` must never put in a folder staged for upload;
- ``non_finite``: NaN and inf in weights, LoRA files, sampling and LoRA scales, scheduler configs, training,
  benchmark rows and results files;
- ``hostile_files``: results, release, model_index, config and checkpoint-state files with wrong types, missing keys
  and injection strings, plus seeded random mutations of each kind (a fixed seed: the same cases every run);
- ``environment``: a full disk and a read-only file system (a tiny tmpfs when this process may mount one, else an
  injected ``ENOSPC`` / ``EROFS``), over-long names, files where folders are needed, a token while offline;
- ``unbounded``: huge label lists, calibration counts, LoRA ranks, image sizes and seeds (under a memory cap), and
  FIFOs where the package reads a file (a watchdog unblocks them after the time limit);
- ``lora``: damaged, foreign and mismatched LoRA files through the model and the pipeline loaders, adapters saved
  unfused, LoRA files under another format's name;
- ``smaller``: benchmark variants that do not match their pretrained folders or name one model twice, ``--resume``
  of nothing, one pipeline shared by concurrent calls, config files of the wrong JSON type, an empty scheduler.

Every case must leave the workspace's sentinel and the user files it registers (``protect``) byte for byte, and
anything staged for upload free of the planted secret (``no_secret``); these checks run after the case
(``reliability_probe.AFTER_CASE``), whatever its outcome. Long work is replaced by stand-ins (benchmark cells,
the architecture rows, the evaluation) so that every case ends in seconds.
"""

from __future__ import annotations

import builtins
import contextlib
import errno
import io
import json
import math
import os
import random
import resource
import shutil
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch
from diffusers import DDIMScheduler
from safetensors.torch import load_file, save_file

import reliability_probe as rp
from conftest import tiny_model
from dit_optimum import DiTOptimumError, DiTOptimumPipeline, DiTOptimumTransformer2DModel
from reliability_probe import (
    AFTER_CASE,
    SENTINEL,
    TINY_TRAIN,
    Accepted,
    Case,
    Fixtures,
    cli,
    copy_of,
    extract,
    pipe,
    train,
)

SECRET = "hf_probeSECRETtoken0123456789abcdef"
WEIGHTS = "diffusion_pytorch_model.safetensors"
LORA_FILE = "pytorch_lora_weights.safetensors"
LONG = "n" * 300  # one path component over NAME_MAX (255)
ROW = {"variant": "DiT-XS/4", "technique": "baseline", "status": "ok", "dtype": "float32"}
FAULT_GROUPS = ("data_loss", "secrets", "non_finite", "hostile_files", "environment", "unbounded", "lora", "smaller")
SHORT = 30.0  # seconds before a hang, for the cases that would otherwise run until the probe's limit


# --- checks and cleanups run after each case ------------------------------------------------------------------


def _check(verdict: Callable[[], tuple[str, str] | None]) -> None:
    """Register a check: it runs after the case, before every cleanup."""
    first_cleanup = next((i for i, f in enumerate(AFTER_CASE) if getattr(f, "cleanup", False)), len(AFTER_CASE))
    AFTER_CASE.insert(first_cleanup, verdict)


def _cleanup(action: Callable[[], Any]) -> None:
    """Register a cleanup: cleanups run after the checks, the last registered first."""

    def run() -> None:
        action()

    run.cleanup = True  # type: ignore[attr-defined]
    first_cleanup = next((i for i, f in enumerate(AFTER_CASE) if getattr(f, "cleanup", False)), len(AFTER_CASE))
    AFTER_CASE.insert(first_cleanup, run)


def _snapshot(path: Path) -> dict[str, bytes | None]:
    """Every file under ``path`` (or ``path`` itself) by relative name, with its bytes (None: a symlink's target)."""
    if path.is_symlink() or path.is_file():
        return {"": path.read_bytes() if not path.is_symlink() else os.readlink(path).encode()}
    found = {}
    for folder, _dirs, files in os.walk(path):
        for name in files + [d for d in _dirs if os.path.islink(os.path.join(folder, d))]:
            full = Path(folder) / name
            key = str(full.relative_to(path))
            found[key] = os.readlink(full).encode() if full.is_symlink() else full.read_bytes()
    return found


def protect(*paths: Path) -> None:
    """The files under ``paths`` (as they are now) must be there, byte for byte, after the case."""
    for path in paths:
        before = _snapshot(path)

        def verdict(path=path, before=before):
            for key, content in before.items():
                file = path / key if key else path
                now = (os.readlink(file).encode() if file.is_symlink() else file.read_bytes()) if _exists(file) else 0
                if now != content:
                    what = "gone" if now == 0 else "changed"
                    return "data_loss", f"the user's {file.name or path.name} is {what} ({_short(file)})"
            return None

        _check(verdict)


def untouched_folder(folder: Path) -> None:
    """Nothing may be added to, removed from or changed in ``folder`` (a folder outside the output)."""
    before = _snapshot(folder)

    def verdict():
        after = _snapshot(folder) if folder.is_dir() else {}
        if after != before:
            changed = sorted(set(after) ^ set(before)) or sorted(k for k in after if after[k] != before.get(k))
            return "data_loss", f"wrote through a symlink into a folder outside the output: {changed[:3]}"
        return None

    _check(verdict)


def _exists(path: Path) -> bool:
    return path.is_symlink() or path.exists()


def _short(path: Path) -> str:
    parts = Path(path).parts
    return "/".join(parts[-3:])


def no_secret(folder: Path) -> None:
    """Nothing under ``folder`` (staged for upload) may be a symlink or hold the planted secret."""

    def verdict():
        if not folder.exists():
            return None
        for base, dirs, files in os.walk(folder):
            for name in dirs + files:
                path = Path(base) / name
                if path.is_symlink():
                    return "secret_copied", f"a symlink was staged for upload: {_short(path)}"
                if path.is_file() and SECRET.encode() in path.read_bytes():
                    return "secret_copied", f"the token landed in the staged {_short(path)}"
        return None

    _check(verdict)


def token_file(ws: Path) -> Path:
    """A Hub token outside every folder the case stages (``ws/secrets/token``)."""
    path = ws / "secrets" / "token"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(SECRET)
    return path


def user_files(folder: Path, *names: str) -> Path:
    """A folder of the user's with files of these names (protected)."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(f"the user's own {name}\n")
    protect(*(folder / name for name in names))
    return folder


def user_json(path: Path, payload: Any) -> Path:
    """A user's own JSON file (protected)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload))
    protect(path)
    return path


def sentinel(ws: Path) -> Path:
    return ws / SENTINEL


def link(path: Path, target: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if _exists(path):
        shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
    path.symlink_to(target)
    return path


def set_env(**values: str | None) -> None:
    """Set (None: unset) environment variables for the case."""
    previous = {name: os.environ.get(name) for name in values}
    for name, value in values.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value

    def restore():
        for name, value in previous.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value

    _cleanup(restore)


def in_folder(folder: Path) -> None:
    """Run the rest of the case with ``folder`` as the current folder."""
    previous = os.getcwd()
    os.chdir(folder)
    _cleanup(lambda: os.chdir(previous))


def _capped(run: Callable[[Path], Any]) -> Callable[[Path], Any]:
    """``run`` under ``memory_cap``."""

    def wrapped(ws: Path) -> Any:
        memory_cap()
        return run(ws)

    return wrapped


def memory_cap(headroom: int = 2 << 30) -> None:
    """Cap this process's address space at its current size plus ``headroom`` for the case: an unbounded
    allocation fails at once instead of swapping the machine."""
    size = 0
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmSize:"):
                size = int(line.split()[1]) * 1024
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    resource.setrlimit(resource.RLIMIT_AS, (size + headroom, hard))
    _cleanup(lambda: resource.setrlimit(resource.RLIMIT_AS, (soft, hard)))


# The helper of `fifo`: after a delay, open the FIFO read-write and close it again, every half second.
_UNBLOCK = """
import os, sys, time
time.sleep(float(sys.argv[2]))
while True:
    try:
        os.close(os.open(sys.argv[1], os.O_RDWR | os.O_NONBLOCK))
    except OSError:
        pass
    time.sleep(0.5)
"""


def fifo(path: Path) -> Path:
    """A FIFO at ``path`` (no writer: a reader blocks). After the case's time limit a helper process opens and
    closes it, so that a reader blocked in native code (which retries the open) wakes up and the case ends."""
    if _exists(path):
        path.unlink()
    path.parent.mkdir(parents=True, exist_ok=True)
    os.mkfifo(path)
    remaining = signal.getitimer(signal.ITIMER_REAL)[0] or SHORT
    helper = subprocess.Popen(
        [sys.executable, "-c", _UNBLOCK, str(path), f"{remaining + 1:.1f}"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )

    def stop():
        helper.kill()
        helper.wait()

    _cleanup(stop)
    return path


# --- full and read-only disks ---------------------------------------------------------------------------------

_MOUNT: dict[str, bool] = {}


def can_mount() -> bool:
    """Whether this process may mount a tmpfs (root with CAP_SYS_ADMIN): then disks really fill up and really are
    read-only; otherwise the errors are injected."""
    if "ok" not in _MOUNT:
        import tempfile

        folder = Path(tempfile.mkdtemp(prefix="dit-probe-mount-"))
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16k", "tmpfs", str(folder)], capture_output=True)
        _MOUNT["ok"] = done.returncode == 0
        if _MOUNT["ok"]:
            subprocess.run(["umount", str(folder)], capture_output=True)
        folder.rmdir()
    return _MOUNT["ok"]


def _mount(folder: Path, size_kb: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    options = f"size={size_kb}k,mode=755"
    subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)], check=True, capture_output=True)
    _cleanup(lambda: subprocess.run(["umount", "-l", str(folder)], capture_output=True))


def full_disk(ws: Path, content: Callable[[Path], Any] | None = None, free_kb: int = 0) -> Path:
    """``ws/disk``: a file system with ``free_kb`` KiB left after ``content(disk)`` was written (a tmpfs filled by
    a filler file), or, without mount rights, a folder where every write fails with ENOSPC."""
    disk = ws / "disk"
    if can_mount():
        _mount(disk, 1024)
        if content is not None:
            content(disk)
        with open(disk / ".filler", "wb", buffering=0) as filler, contextlib.suppress(OSError):
            while True:
                filler.write(b"\0" * 4096)
        if free_kb:
            os.truncate(disk / ".filler", max(0, (disk / ".filler").stat().st_size - free_kb * 1024))
        return disk
    disk.mkdir()
    if content is not None:
        content(disk)
    inject_error(errno.ENOSPC, disk)
    return disk


def read_only(ws: Path, content: Callable[[Path], Any] | None = None) -> Path:
    """``ws/ro``: a read-only file system holding ``content(ro)`` (a tmpfs remounted read-only; root's writes fail
    too), or, without mount rights, a folder where every write fails with EROFS."""
    folder = ws / "ro"
    if can_mount():
        _mount(folder, 2048)
        if content is not None:
            content(folder)
        subprocess.run(["mount", "-o", "remount,ro", str(folder)], check=True, capture_output=True)
        return folder
    folder.mkdir()
    if content is not None:
        content(folder)
    inject_error(errno.EROFS, folder)
    return folder


def inject_error(code: int, under: Path) -> None:
    """Every write under ``under`` (open for writing, mkdir, rename into it, safetensors saves) raises
    ``OSError(code)`` for the case: the stand-in for a full or read-only disk where no tmpfs can be mounted."""
    import safetensors.torch

    root = os.path.abspath(under)

    def hit(path: Any) -> bool:
        try:
            full = os.path.abspath(os.fsdecode(path))
        except TypeError:
            return False
        return full == root or full.startswith(root + os.sep)

    def fail(path: Any):
        raise OSError(code, os.strerror(code), os.fsdecode(path))

    real_open, real_os_open = builtins.open, os.open
    real_mkdir, real_replace, real_rename = os.mkdir, os.replace, os.rename
    real_save = safetensors.torch.save_file

    def open_(file, mode="r", *args, **kwargs):
        if isinstance(file, (str, bytes, os.PathLike)) and any(c in mode for c in "wax+") and hit(file):
            fail(file)
        return real_open(file, mode, *args, **kwargs)

    def os_open(path, flags, *args, **kwargs):
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT) and hit(path):
            fail(path)
        return real_os_open(path, flags, *args, **kwargs)

    def mkdir(path, *args, **kwargs):
        if hit(path) and os.path.abspath(os.fsdecode(path)) != root:
            fail(path)
        return real_mkdir(path, *args, **kwargs)

    def replace(source, target, *args, **kwargs):
        if hit(target):
            fail(target)
        return real_replace(source, target, *args, **kwargs)

    def rename(source, target, *args, **kwargs):
        if hit(target):
            fail(target)
        return real_rename(source, target, *args, **kwargs)

    def save(tensors, filename, *args, **kwargs):
        if hit(filename):
            fail(filename)
        return real_save(tensors, filename, *args, **kwargs)

    patched = [(builtins, "open", open_), (io, "open", open_), (os, "open", os_open), (os, "mkdir", mkdir)]
    patched += [(os, "replace", replace), (os, "rename", rename)]
    patched += [
        (module, "save_file", save)
        for module in list(sys.modules.values())
        if module is not None and getattr(module, "save_file", None) is real_save
    ]
    originals = [(module, name, getattr(module, name)) for module, name, _ in patched]
    for module, name, value in patched:
        setattr(module, name, value)

    def restore():
        for module, name, value in originals:
            setattr(module, name, value)

    _cleanup(restore)


# --- stand-ins for long work ----------------------------------------------------------------------------------


@contextlib.contextmanager
def fake_cells(record: list | None = None, status: str = "failed", **metrics: Any) -> Iterator[None]:
    """Benchmark cells that return at once: the runner's own checks, locks and writes run, nothing is trained or
    measured. Each cell's (variant, technique) goes to ``record``; ``metrics`` go into an ``ok`` row."""
    import dit_optimum.benchmark.runner as runner

    def cell(*args, **kwargs):
        context, name = args[1], args[2]
        if record is not None:
            record.append((context.variant, name))
        row = {"variant": context.variant, "technique": name, "description": "probe stand-in", "cell_wall_s": 0.0}
        if status == "ok":
            row.update(status="ok", **{**MEASURED, **metrics})
        else:
            row.update(status="failed", error="probe stand-in: not measured")
        return row

    original = runner._run_cell
    runner._run_cell = cell
    try:
        yield
    finally:
        runner._run_cell = original


# What a finished cell measures (the stand-in's numbers).
MEASURED = {
    "class_accuracy": 0.5,
    "sampling_images_per_s": 10.0,
    "latency_s": 0.01,
    "gflops": 0.1,
    "forward_peak_memory_bytes": 1000,
    "size_bytes": 1000,
    "dtype": "float32",
}


class _Measuring(BaseException):
    """Raised where a benchmark cell starts measuring (not an ``Exception``: the runner's handler lets it through)."""


@contextlib.contextmanager
def first_cell_builds() -> Iterator[None]:
    """The benchmark's first cell builds its pipeline for real (a pretrained baseline is loaded and checked) and
    stops where measuring would start: a cell that failed becomes a refusal naming its error, a cell that got to
    measuring raises ``Accepted``."""
    import dit_optimum.benchmark.runner as runner

    original_cell, original_quality = runner._run_cell, runner.evaluate_quality

    def measuring(*args, **kwargs):
        raise _Measuring

    def cell(*args, **kwargs):
        try:
            row = original_cell(*args, **kwargs)
        except _Measuring:
            raise Accepted from None
        if row.get("status") != "ok":
            raise DiTOptimumError(f"the cell failed: {row.get('error')}")
        raise Accepted

    runner._run_cell, runner.evaluate_quality = cell, measuring
    try:
        yield
    finally:
        runner._run_cell, runner.evaluate_quality = original_cell, original_quality


ARCHITECTURE_ROW = {
    "preset": "DiT-XS/8",
    "attention_type": "sdpa",
    "tokens": 4,
    "params_m": 1.0,
    "gflops": 0.1,
    "attention_core_gflops": 0.01,
    "forward_s": 0.001,
    "time_ratio": 1.0,
}


@contextlib.contextmanager
def fake_architecture() -> Iterator[None]:
    import dit_optimum.benchmark.architecture as module

    original = module._architecture_rows
    module._architecture_rows = lambda *args, **kwargs: [dict(ARCHITECTURE_ROW)]
    try:
        yield
    finally:
        module._architecture_rows = original


def bench(ws: Path, *argv: Any, record: list | None = None, status: str = "failed", **metrics: Any) -> int:
    """``dit-optimum benchmark`` with stand-in cells (exit 1 for its failed stand-in cells counts as finished)."""
    with fake_cells(record, status, **metrics):
        return cli_finished("benchmark", "--techniques", "baseline", *argv)


def cli_finished(*argv: Any) -> int:
    """``cli``, where exit 1 (failed benchmark cells: the stand-ins') counts as a finished run."""
    from dit_optimum.cli import main as cli_main

    def call() -> int:
        code = cli_main([str(a) for a in argv])
        return 0 if code == 1 else code

    return rp._run_main(call)


def architecture(*argv: Any) -> int:
    with fake_architecture():
        return cli("architecture", "--presets", "DiT-XS/8", "--repeats", "1", *argv)


def evaluate(ws: Path, pipeline: Path, *argv: Any, before: bool = False) -> int:
    """``dit-optimum evaluate`` with a stand-in evaluation returning at once; with ``before``, a refusal that comes
    only after the evaluation ran is reported (an unwritable output must fail before the long work)."""
    import dit_optimum.evaluation.quality as quality

    ran = []

    def stand_in_evaluation(*args, **kwargs):
        ran.append(True)
        return SimpleNamespace(metrics={"kid": 0.1})

    if before:
        _check(lambda: ("silent", "refused only after the whole evaluation ran") if ran else None)
    original = quality.evaluate_quality
    quality.evaluate_quality = stand_in_evaluation
    try:
        return cli("evaluate", pipeline, "--no-speed", "--num-samples", "4", "--reference-samples", "4", *argv)
    finally:
        quality.evaluate_quality = original


# --- shared inputs, built once per probe run -----------------------------------------------------------------

_BUILT: dict[str, Path] = {}


def lora_folder(fx: Fixtures) -> Path:
    """A LoRA adapter (random, non-zero) of the probe's tiny model, saved by the package as a pipeline-level file
    (keys under ``transformer.``): it loads with ``pipe.load_lora_weights`` and ``transformer.load_lora_adapter``."""
    if "lora" not in _BUILT:
        from dit_optimum.pipelines.lora import save_lora_weights_of

        model = lora_model()
        save_lora_weights_of(model, fx.root / "lora")
        _BUILT["lora"] = fx.root / "lora"
    return _BUILT["lora"]


def lora_model(**overrides: Any) -> DiTOptimumTransformer2DModel:
    from dit_optimum.models.lora import lora_config

    model = tiny_model(**overrides)
    model.add_adapter(lora_config(model, rank=4))
    torch.manual_seed(1)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_" in name:
                parameter.normal_(0, 0.1)
    return model


def xs4_pipeline(fx: Fixtures) -> Path:
    """A (random) DiT-XS/4 pixel pipeline at 8 px: the pretrained baseline of the tiny results folder."""
    if "xs4" not in _BUILT:
        torch.manual_seed(0)
        model = DiTOptimumTransformer2DModel.from_preset("DiT-XS/4", sample_size=8, in_channels=1, num_classes=10)
        DiTOptimumPipeline(transformer=model.eval(), scheduler=DDIMScheduler()).save_pretrained(fx.root / "xs4")
        _BUILT["xs4"] = fx.root / "xs4"
    return _BUILT["xs4"]


def results_settings(fx: Fixtures) -> dict[str, Any]:
    from dit_optimum.benchmark.settings import BenchmarkSettings

    settings = BenchmarkSettings(pretrained={"DiT-XS/4": str(xs4_pipeline(fx))}, image_size=8, channels=1)
    return settings.comparable()


def results_folder(ws: Path, fx: Fixtures, rows: Any = None, settings: Any = "default", raw: str | None = None) -> Path:
    """A benchmark results folder ``release`` can ship: its baseline is the pretrained tiny pixel pipeline."""
    folder = ws / "results"
    folder.mkdir(exist_ok=True)
    payload = {"settings": results_settings(fx) if settings == "default" else settings}
    payload["rows"] = [dict(ROW)] if rows is None else rows
    if settings is None:
        del payload["settings"]
    (folder / "results.json").write_text(raw if raw is not None else json.dumps(payload))
    return folder


def results_file(ws: Path, rows: Any = None, raw: str | None = None, **extra: Any) -> Path:
    """A results file ``push --results`` reads."""
    path = ws / "given" / "results.json"
    path.parent.mkdir(exist_ok=True)
    payload = {"settings": {}, "rows": [dict(ROW)] if rows is None else rows, **extra}
    path.write_text(raw if raw is not None else json.dumps(payload))
    return path


def push_dry(ws: Path, pipeline: Path, results: Path | None, *extra: Any, out: Path | None = None) -> int:
    out = out if out is not None else ws / "staged"
    given = ["--results", results, "--technique", "baseline"] if results is not None else []
    return cli("push", pipeline, "org/x", *given, "--dry-run", out, *extra)


def released(fx: Fixtures) -> Path:
    """A release folder (``dit-optimum release --dry-run``) of the tiny results folder."""
    if "released" not in _BUILT:
        folder = fx.root / "release-input"
        folder.mkdir(exist_ok=True)
        cli("release", results_folder(folder, fx), "org", "--dry-run", fx.root / "released", "--overwrite")
        _BUILT["released"] = fx.root / "released"
    return _BUILT["released"]


def one_release(ws: Path, fx: Fixtures) -> Path:
    """A copy of the released baseline folder, to edit."""
    return copy_of(released(fx) / "dit-xs4-baseline", ws / "releases", "dit-xs4-baseline")


def edit_json(path: Path, change: Callable[[Any], Any] | dict) -> Path:
    data = json.loads(path.read_text())
    if callable(change):
        result = change(data)
        data = data if result is None else result
    else:
        data.update(change)
    path.write_text(json.dumps(data))
    return path


def drop(*keys: str) -> Callable[[Any], None]:
    """An ``edit_json`` change deleting the key at ``keys`` (a path into the document)."""

    def change(data: Any) -> None:
        for key in keys[:-1]:
            data = data[key]
        del data[keys[-1]]

    return change


def poison(path: Path, value: float, key: str | None = None) -> Path:
    """Set one element of one floating tensor (``key``, else the first) of a safetensors file to ``value``."""
    tensors = load_file(path)
    name = key or next(k for k, t in tensors.items() if t.is_floating_point())
    tensors[name] = tensors[name].clone()
    tensors[name].view(-1)[0] = value
    save_file(tensors, path)
    return path


def finite_images(ws: Path, images: Any) -> str | None:
    array = np.asarray(images)
    return None if np.isfinite(array).all() else "non-finite images (NaN/inf) returned without an error"


def sample(pipeline: DiTOptimumPipeline, labels=(1, 2), **kwargs: Any) -> np.ndarray:
    pipeline.set_progress_bar_config(disable=True)
    kwargs.setdefault("num_inference_steps", 2)
    kwargs.setdefault("guidance_scale", 1.0)
    generator = torch.Generator().manual_seed(0)
    return pipeline(list(labels), generator=generator, output_type="np", **kwargs).images


def strict_json(text: str) -> Any:
    def refuse(token: str):
        raise ValueError(f"non-standard JSON token {token}")

    return json.loads(text, parse_constant=refuse)


# --- data loss --------------------------------------------------------------------------------------------------


def data_loss_cases(fx: Fixtures) -> list[Case]:
    def earlier_save(ws: Path, extra: str | None = None, subfolder: str = "transformer") -> Path:
        folder = copy_of(fx.pipeline, ws, "out")
        if extra:
            shutil.copyfile(folder / "transformer" / WEIGHTS, folder / subfolder / extra)
            protect(folder / subfolder / extra)
        return folder

    def model_save(ws: Path, extra: str) -> Path:
        folder = copy_of(fx.pipeline / "transformer", ws, "model")
        shutil.copyfile(folder / WEIGHTS, folder / extra)
        protect(folder / extra)
        tiny_model(seed=3).save_pretrained(folder, overwrite=True)
        return folder

    def convert_into(ws: Path, extra: str) -> int:
        folder = earlier_save(ws, extra)
        return cli("convert", "original", fx.checkpoint, folder, "--num-heads", "4", "--overwrite")

    cases = []
    for extra in ("diffusion_pytorch_model.fp16.safetensors", "diffusion_pytorch_model.ema.safetensors"):
        kind = extra.split(".")[1]
        cases += [
            Case(
                "data_loss",
                f"pipeline save overwrite=True keeps the {kind} variant",
                lambda ws, e=extra: pipe().save_pretrained(earlier_save(ws, e), overwrite=True),
                expect="ok",
            ),
            Case(
                "data_loss",
                f"pipeline save over an earlier save keeps the {kind} variant",
                lambda ws, e=extra: pipe().save_pretrained(earlier_save(ws, e)),
                expect="ok",
            ),
            Case(
                "data_loss",
                f"model save overwrite=True keeps the {kind} variant",
                lambda ws, e=extra: model_save(ws, e),
                expect="ok",
            ),
            Case(
                "data_loss",
                f"convert --overwrite keeps the {kind} variant",
                lambda ws, e=extra: convert_into(ws, e),
                expect="ok",
            ),
        ]
    cases += [
        Case(
            "data_loss",
            "quantize --overwrite keeps the fp16 variant",
            lambda ws: cli(
                "quantize", fx.pipeline, earlier_save(ws, "diffusion_pytorch_model.fp16.safetensors"), "--overwrite"
            ),
            expect="ok",
        ),
        Case(
            "data_loss",
            "prune --overwrite keeps the ema variant",
            lambda ws: cli(
                "prune",
                fx.pipeline,
                earlier_save(ws, "diffusion_pytorch_model.ema.safetensors"),
                "--overwrite",
                "--heads",
                "0.5",
            ),
            expect="ok",
        ),
        Case(
            "data_loss",
            "pipeline save overwrite=True keeps a user file in transformer/",
            lambda ws: pipe().save_pretrained(
                user_files(earlier_save(ws) / "transformer", "notes.txt").parent, overwrite=True
            ),
            expect="ok",
        ),
    ]

    # saving into its own source
    def own_source(ws: Path) -> Path:
        source = copy_of(fx.pipeline, ws, "src")
        protect(source)
        return source

    def resave_same(ws: Path, model_only: bool = False) -> Any:
        source = copy_of(fx.pipeline, ws, "src")
        if model_only:
            model = DiTOptimumTransformer2DModel.from_pretrained(source / "transformer")
            model.save_pretrained(source / "transformer")
        else:
            DiTOptimumPipeline.from_pretrained(source).save_pretrained(source)
        return source

    def same_as_fixture(ws: Path, _result: Any) -> str | None:
        before = load_file(fx.pipeline / "transformer" / WEIGHTS)
        try:
            after = DiTOptimumTransformer2DModel.from_pretrained(ws / "src" / "transformer").state_dict()
        except Exception as error:
            return f"the source no longer loads: {type(error).__name__}: {str(error)[:120]}"
        if any(not torch.equal(after[k], v) for k, v in before.items()):
            return "the source's weights changed"
        return None

    cases += [
        Case(
            "data_loss",
            "pipeline save into its source's transformer/ (overwrite=True)",
            lambda ws: DiTOptimumPipeline.from_pretrained(own_source(ws)).save_pretrained(
                ws / "src" / "transformer", overwrite=True
            ),
        ),
        Case(
            "data_loss",
            "pipeline save into its source's vae/ (overwrite=True)",
            lambda ws: DiTOptimumPipeline.from_pretrained(own_source(ws)).save_pretrained(
                ws / "src" / "vae", overwrite=True
            ),
        ),
        Case(
            "data_loss",
            "prune src src/transformer --overwrite",
            lambda ws: cli("prune", own_source(ws), ws / "src" / "transformer", "--overwrite", "--heads", "0.5"),
        ),
        Case(
            "data_loss",
            "quantize src src/transformer --overwrite",
            lambda ws: cli("quantize", own_source(ws), ws / "src" / "transformer", "--overwrite"),
        ),
        Case(
            "data_loss",
            "quantize src src/scheduler --overwrite",
            lambda ws: cli("quantize", own_source(ws), ws / "src" / "scheduler", "--overwrite"),
        ),
        Case(
            "data_loss",
            "model save into its source's parent pipeline folder (overwrite=True)",
            lambda ws: DiTOptimumTransformer2DModel.from_pretrained(own_source(ws) / "transformer").save_pretrained(
                ws / "src" / "transformer" / "inner", overwrite=True
            ),
            expect="either",
        ),
        Case(
            "data_loss",
            "pipeline re-saved into the folder it was loaded from",
            resave_same,
            expect="either",
            check=same_as_fixture,
        ),
        Case(
            "data_loss",
            "model re-saved into the folder it was loaded from",
            lambda ws: resave_same(ws, model_only=True),
            expect="either",
            check=same_as_fixture,
        ),
    ]

    # fixed-name files over a user's files, in a folder the package did not create
    def train_into(ws: Path, *names: str) -> int:
        folder = user_files(ws / "mine", *names)
        return train(*TINY_TRAIN, "--output-dir", folder, "--steps", "2")

    def space_into(ws: Path) -> int:
        folder = user_files(ws / "mine", "app.py", "requirements.txt", "README.md")
        return cli("export-space", released(fx), folder)

    cases += [
        Case(
            "data_loss",
            "benchmark into a folder with the user's report.md",
            lambda ws: bench(ws, "--output-dir", user_files(ws / "mine", "report.md", "notes.txt")),
        ),
        Case(
            "data_loss",
            "benchmark into a folder with the user's results.json",
            lambda ws: bench(ws, "--output-dir", user_json(ws / "mine" / "results.json", {"rows": []}).parent),
        ),
        Case(
            "data_loss",
            "benchmark into a folder with the user's results.csv",
            lambda ws: bench(ws, "--output-dir", user_files(ws / "mine", "results.csv")),
        ),
        Case(
            "data_loss",
            "benchmark into a folder with the user's plots/ and samples/",
            lambda ws: bench(ws, "--output-dir", user_files(ws / "mine", "plots/pareto.png", "samples/a.png")),
            expect="either",
        ),
        Case(
            "data_loss",
            "train into a folder with the user's train_log.csv",
            lambda ws: train_into(ws, "train_log.csv"),
        ),
        Case(
            "data_loss",
            "train into a folder with the user's train_log.config.json",
            lambda ws: train_into(ws, "train_log.config.json"),
        ),
        Case(
            "data_loss",
            "architecture into a folder with the user's report.md",
            lambda ws: architecture("--output-dir", user_files(ws / "mine", "report.md")),
        ),
        Case(
            "data_loss",
            "architecture into a folder with the user's architecture.json",
            lambda ws: architecture("--output-dir", user_files(ws / "mine", "architecture.json")),
        ),
        Case("data_loss", "export-space into a folder with the user's app.py", space_into),
        Case(
            "data_loss",
            "pipeline save into a folder with another tool's model_index.json",
            lambda ws: pipe().save_pretrained(user_files(ws / "mine", "model_index.json", "unet/config.json")),
        ),
        Case(
            "data_loss",
            "model save into a folder with another tool's config.json",
            lambda ws: tiny_model().save_pretrained(user_files(ws / "mine", "config.json", "vocab.txt")),
        ),
        Case(
            "data_loss",
            "push --dry-run over an earlier staged folder keeps the user's notes",
            lambda ws: (
                push_dry(ws, fx.pipeline, results_file(ws))
                or push_dry(
                    ws, fx.pipeline, results_file(ws), "--overwrite", out=user_files(ws / "staged", "notes.txt")
                )
            ),
            expect="ok",
        ),
    ]

    # an empty output path: the current folder
    def in_workspace(ws: Path) -> None:
        # the current folder holds only an unrelated file of the user's: an empty path taken as "." is accepted
        user_files(ws, "notes.txt")
        in_folder(ws)

    empty = [
        ("benchmark --output-dir ''", lambda ws: bench(ws, "--output-dir", "")),
        ("architecture --output-dir ''", lambda ws: architecture("--output-dir", "")),
        ("train --output-dir ''", lambda ws: train(*TINY_TRAIN, "--output-dir", "", "--steps", "2")),
        ("extract --output-dir ''", lambda ws: extract("--vae", fx.pipeline / "vae", "--output-dir", "")),
        ("push --dry-run ''", lambda ws: push_dry(ws, fx.pipeline, results_file(ws), out="")),
        ("release --dry-run ''", lambda ws: cli("release", results_folder(ws, fx), "org", "--dry-run", "")),
        ("export-space into ''", lambda ws: cli("export-space", released(fx), "")),
        ("evaluate --output ''", lambda ws: evaluate(ws, fx.pixel, "--output", "")),
        ("quantize into ''", lambda ws: cli("quantize", fx.pipeline, "")),
        ("prune into ''", lambda ws: cli("prune", fx.pipeline, "", "--heads", "0.5")),
        ("convert into ''", lambda ws: cli("convert", "original", fx.checkpoint, "", "--num-heads", "4")),
        ("pipeline save_pretrained('')", lambda ws: pipe().save_pretrained("")),
        ("model save_pretrained('')", lambda ws: tiny_model().save_pretrained("")),
    ]
    cases += [
        Case("data_loss", name, lambda ws, run=run: in_workspace(ws) or run(ws), names=("empty",))
        for name, run in empty
    ]

    # symlinks planted where the package writes, locks or stages, pointing at the sentinel (or a folder) outside
    def planted(ws: Path, folder: Path, name: str) -> Path:
        folder.mkdir(parents=True, exist_ok=True)
        link(folder / name, sentinel(ws))
        return folder

    def train_resume_with(ws: Path, name: str, to_folder: bool = False) -> int:
        run = copy_of(fx.run, ws, "run")
        if to_folder:
            untouched_folder(sentinel(ws).parent)
            link(run / name, sentinel(ws).parent)
        else:
            link(run / name, sentinel(ws))
        return train(*TINY_TRAIN, "--output-dir", run, "--steps", "4", "--checkpoint-every", "2", "--resume")

    def staged_twice(ws: Path) -> int:
        push_dry(ws, fx.pipeline, results_file(ws))
        link(ws / "staged" / "README.md", sentinel(ws))
        return push_dry(ws, fx.pipeline, results_file(ws))

    def space_twice(ws: Path) -> int:
        cli("export-space", released(fx), ws / "space")
        link(ws / "space" / "app.py", sentinel(ws))
        return cli("export-space", released(fx), ws / "space")

    def release_into_linked_folder(ws: Path) -> int:
        untouched_folder(sentinel(ws).parent)
        link(ws / "rel" / "dit-xs4-baseline", sentinel(ws).parent)
        return cli("release", results_folder(ws, fx), "org", "--dry-run", ws / "rel", "--overwrite")

    def save_into_linked_component(ws: Path) -> None:
        out = copy_of(fx.pipeline, ws, "out")
        outside = copy_of(fx.pipeline / "transformer", ws, "outside")
        untouched_folder(outside)
        link(out / "transformer", outside)
        DiTOptimumPipeline(transformer=tiny_model(seed=7), scheduler=DDIMScheduler()).save_pretrained(out)

    symlinks = [
        (
            "benchmark: .dit_optimum.lock -> a file outside",
            lambda ws: bench(ws, "--output-dir", planted(ws, ws / "b", ".dit_optimum.lock")),
        ),
        (
            "train: .dit_optimum.lock -> a file outside",
            lambda ws: train(*TINY_TRAIN, "--output-dir", planted(ws, ws / "r", ".dit_optimum.lock"), "--steps", "2"),
        ),
        (
            "release: results/.dit_optimum.lock -> a file outside",
            lambda ws: cli(
                "release", planted(ws, results_folder(ws, fx), ".dit_optimum.lock"), "org", "--dry-run", ws / "rel"
            ),
        ),
        (
            "benchmark: report.md -> a file outside",
            lambda ws: bench(ws, "--output-dir", planted(ws, ws / "b", "report.md")),
        ),
        (
            "benchmark: results.csv -> a file outside",
            lambda ws: bench(ws, "--output-dir", planted(ws, ws / "b", "results.csv")),
        ),
        (
            "architecture: report.md -> a file outside",
            lambda ws: architecture("--output-dir", planted(ws, ws / "a", "report.md")),
        ),
        (
            "architecture: architecture.json -> a file outside",
            lambda ws: architecture("--output-dir", planted(ws, ws / "a", "architecture.json")),
        ),
        ("train --resume: train_log.csv -> a file outside", lambda ws: train_resume_with(ws, "train_log.csv")),
        (
            "train --resume: train_log.config.json -> a file outside",
            lambda ws: train_resume_with(ws, "train_log.config.json"),
        ),
        (
            "train --resume: checkpoint staging .step_4.tmp -> a folder outside",
            lambda ws: train_resume_with(ws, "checkpoints/.step_4.tmp", to_folder=True),
        ),
        (
            "pipeline save: model_index.json -> a file outside",
            lambda ws: pipe().save_pretrained(planted(ws, copy_of(fx.pipeline, ws, "out"), "model_index.json")),
        ),
        (
            "pipeline save: transformer weights -> a file outside",
            lambda ws: pipe().save_pretrained(
                planted(ws, copy_of(fx.pipeline, ws, "out") / "transformer", WEIGHTS).parent
            ),
        ),
        (
            "pipeline save: the manifest -> a file outside",
            lambda ws: pipe().save_pretrained(
                planted(ws, copy_of(fx.pipeline, ws, "out"), ".dit_optimum.manifest.json")
            ),
        ),
        ("pipeline save: transformer/ -> a folder outside", save_into_linked_component),
        ("push --dry-run again: README.md -> a file outside", staged_twice),
        ("export-space again: app.py -> a file outside", space_twice),
        ("release --overwrite: the release folder -> a folder outside", release_into_linked_folder),
    ]
    cases += [Case("data_loss", name, run, expect="either") for name, run in symlinks]
    return cases


# --- secrets ----------------------------------------------------------------------------------------------------


def secrets_cases(fx: Fixtures) -> list[Case]:
    def with_link(ws: Path, name: str, to_folder: bool = False) -> Path:
        folder = copy_of(fx.pipeline, ws, "pipe")
        token = token_file(ws)
        link(folder / name, token.parent if to_folder else token)
        return folder

    def hidden(ws: Path, name: str) -> Path:
        folder = copy_of(fx.pipeline, ws, "pipe")
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(f"HF_TOKEN={SECRET}\n")
        return folder

    def staged(ws: Path, folder: Path, results: Path | None = None) -> int:
        no_secret(ws / "staged")
        return push_dry(ws, folder, results if results is not None else results_file(ws))

    def grid_row(ws: Path, where: str) -> dict:
        token = token_file(ws)
        grid = str(token) if where == "absolute" else os.path.relpath(token, ws / "given")
        return {**ROW, "sample_grid": grid}

    def release_with_grid(ws: Path, how: str) -> int:
        token = token_file(ws)
        folder = results_folder(ws, fx)
        if how == "relative":
            grid = os.path.relpath(token, folder)
        else:
            link(folder / "samples" / "grid.png", token)
            grid = "samples/grid.png"
        results_folder(ws, fx, rows=[{**ROW, "sample_grid": grid}])
        no_secret(ws / "rel")
        return cli("release", folder, "org", "--dry-run", ws / "rel")

    def token_in_environment(ws: Path, command: str) -> int:
        set_env(HF_TOKEN=SECRET)
        if command == "push":
            return staged(ws, fx.pipeline)
        no_secret(ws / "rel")
        return cli("release", results_folder(ws, fx), "org", "--dry-run", ws / "rel")

    def push_release_with_link(ws: Path) -> int:
        folder = one_release(ws, fx)
        link(folder / "extra.json", token_file(ws))
        no_secret(ws / "staged")
        return cli("push", folder, "org/dit-xs4-baseline", "--dry-run", ws / "staged")

    def space_with_link(ws: Path) -> int:
        folder = one_release(ws, fx)
        link(folder / "token.txt", token_file(ws))
        no_secret(ws / "space")
        return cli("export-space", folder.parent, ws / "space")

    def linked_component(ws: Path) -> int:
        folder = copy_of(fx.pipeline, ws, "pipe")
        outside = ws / "secrets" / "transformer"
        shutil.move(folder / "transformer", outside)
        token_file(ws)
        shutil.copyfile(ws / "secrets" / "token", outside / "token")
        link(folder / "transformer", outside)
        return staged(ws, folder)

    cases = [
        ("push: a symlink to the token file", lambda ws: staged(ws, with_link(ws, "token"))),
        (
            "push: a symlink inside transformer/ to the token",
            lambda ws: staged(ws, with_link(ws, "transformer/extra.safetensors")),
        ),
        ("push: a symlinked subfolder holding the token", lambda ws: staged(ws, with_link(ws, "docs", True))),
        ("push: samples.png -> the token", lambda ws: staged(ws, with_link(ws, "samples.png"))),
        ("push: a hidden .env with the token", lambda ws: staged(ws, hidden(ws, ".env"))),
        (
            "push: a hidden .cache/huggingface/token",
            lambda ws: staged(ws, hidden(ws, ".cache/huggingface/token")),
        ),
        (
            "push: results row's sample_grid -> ../secrets/token",
            lambda ws: staged(ws, fx.pipeline, results_file(ws, rows=[grid_row(ws, "relative")])),
        ),
        (
            "push: results row's sample_grid is the token's absolute path",
            lambda ws: staged(ws, fx.pipeline, results_file(ws, rows=[grid_row(ws, "absolute")])),
        ),
        ("push: transformer/ is a symlink to a folder with the token", linked_component),
        ("push: HF_TOKEN set, dry run", lambda ws: token_in_environment(ws, "push")),
        ("push of a release folder with a symlink to the token", push_release_with_link),
        ("release: row's sample_grid -> the token (relative)", lambda ws: release_with_grid(ws, "relative")),
        ("release: samples/grid.png -> the token", lambda ws: release_with_grid(ws, "link")),
        ("release: HF_TOKEN set, dry run", lambda ws: token_in_environment(ws, "release")),
        ("export-space: a release folder with a symlink to the token", space_with_link),
    ]

    def staged_loads(ws: Path, _result: Any) -> str | None:
        """What push staged (when it staged anything) is the whole pipeline: a skipped component is no fix."""
        if not (ws / "staged" / "model_index.json").is_file():
            return None
        try:
            DiTOptimumPipeline.from_pretrained(ws / "staged")
        except DiTOptimumError as error:
            return f"the staged upload is not a loadable pipeline: {str(error)[:150]}"
        return None

    return [Case("secrets", name, run, expect="either", check=staged_loads) for name, run in cases]


# --- non-finite numbers -----------------------------------------------------------------------------------------


def non_finite_cases(fx: Fixtures) -> list[Case]:
    def poisoned(ws: Path, value: float, source: Path | None = None) -> Path:
        folder = copy_of(source or fx.pipeline, ws, "pipe")
        poison(folder / "transformer" / WEIGHTS, value)
        return folder

    def poisoned_lora(ws: Path, value: float) -> Path:
        folder = copy_of(lora_folder(fx), ws, "lora")
        poison(folder / LORA_FILE, value)
        return folder

    def with_adapter() -> DiTOptimumPipeline:
        pipeline = pipe()
        pipeline.load_lora_weights(lora_folder(fx))
        return pipeline

    def fused(scale: float) -> DiTOptimumPipeline:
        pipeline = with_adapter()
        pipeline.fuse_lora(lora_scale=scale)
        return pipeline

    def weights_finite(ws: Path, pipeline: Any) -> str | None:
        bad = [n for n, p in pipeline.transformer.named_parameters() if not torch.isfinite(p).all()]
        return f"non-finite weights accepted ({bad[0]})" if bad else None

    def scheduler_edit(ws: Path, change: dict) -> np.ndarray:
        folder = copy_of(fx.pixel, ws, "pipe")
        edit_json(folder / "scheduler" / "scheduler_config.json", change)
        return sample(DiTOptimumPipeline.from_pretrained(folder))

    def trained_finite(ws: Path, _result: Any) -> str | None:
        import csv

        with (ws / "r" / "train_log.csv").open() as stream:
            losses = [float(row["loss"]) for row in csv.DictReader(stream)]
        if not all(math.isfinite(loss) for loss in losses):
            return f"training diverged (loss {losses[-1]}) and ended without an error"
        weights = load_file(ws / "r" / "pipeline" / "transformer" / WEIGHTS)
        if not all(torch.isfinite(t).all() for t in weights.values() if t.is_floating_point()):
            return "a pipeline with non-finite weights was saved"
        return None

    def strict_results(key: str) -> Callable[[Path, Any], str | None]:
        """results.json is strict JSON, and the baseline row whose ``key`` measured a non-finite number is not
        recorded as finished (with null or any other stand-in value)."""

        def check(ws: Path, _result: Any) -> str | None:
            path = ws / "b" / "results.json"
            if not path.is_file():
                return None
            try:
                rows = strict_json(path.read_text())["rows"]
            except ValueError as error:
                return f"results.json is not strict JSON: {error}"
            for row in rows:
                value = row.get(key)
                finite = isinstance(value, (int, float)) and math.isfinite(value)
                if row.get("technique") == "baseline" and row.get("status") == "ok" and not finite:
                    return f"a cell that measured a non-finite {key} is recorded ok ({key}={value!r})"
            return None

        return check

    def resumed_nan(ws: Path) -> int:
        bench(ws, "--output-dir", ws / "b", status="ok")  # a finished baseline, then hand-edited to NaN
        edit_json(ws / "b" / "results.json", lambda d: d["rows"][0].update(class_accuracy=math.nan))
        return bench(ws, "--output-dir", ws / "b", "--techniques", "baseline,bf16")

    def staged_finite(ws: Path, _result: Any) -> str | None:
        folder = ws / "staged" if (ws / "staged").exists() else ws / "rel" / "dit-xs4-baseline"
        for name in ("README.md", "dit_optimum_results.json"):
            path = folder / name
            if path.is_file():
                text = path.read_text()
                for token in (".nan", "NaN", ".inf", "Infinity"):
                    if token in text:
                        return f"{name} carries a non-finite number ({token!r})"
        return None

    def config_edit(ws: Path, change: dict) -> Any:
        folder = copy_of(fx.pipeline / "transformer", ws, "model")
        edit_json(folder / "config.json", change)
        return DiTOptimumTransformer2DModel.from_pretrained(folder)

    def nan_row(**values: float) -> dict:
        return {**ROW, "class_accuracy": 0.5, **values}

    base = [*TINY_TRAIN, "--output-dir"]
    lora = ["--image-size", "8", "--batch-size", "8", "--max-samples", "16", "--steps", "3"]
    return [
        Case(
            "non_finite",
            "model load: NaN in the weights",
            lambda ws: DiTOptimumTransformer2DModel.from_pretrained(poisoned(ws, math.nan) / "transformer"),
        ),
        Case(
            "non_finite",
            "model load: inf in the weights",
            lambda ws: DiTOptimumTransformer2DModel.from_pretrained(poisoned(ws, math.inf) / "transformer"),
        ),
        Case(
            "non_finite",
            "pipeline load: NaN in the transformer weights",
            lambda ws: DiTOptimumPipeline.from_pretrained(poisoned(ws, math.nan)),
        ),
        Case(
            "non_finite",
            "pipeline load: -inf in the weights",
            lambda ws: DiTOptimumPipeline.from_pretrained(poisoned(ws, -math.inf)),
        ),
        Case("non_finite", "quantize a NaN pipeline", lambda ws: cli("quantize", poisoned(ws, math.nan), ws / "q")),
        Case(
            "non_finite",
            "evaluate a NaN pipeline",
            lambda ws: evaluate(ws, poisoned(ws, math.nan, fx.pixel)),
        ),
        Case(
            "non_finite",
            "fine-tune a NaN pipeline",
            lambda ws: train(
                "--output-dir",
                ws / "r",
                "--image-size",
                "8",
                "--batch-size",
                "8",
                "--max-samples",
                "16",
                "--steps",
                "1",
                "--pretrained",
                poisoned(ws, math.nan, fx.run / "pipeline"),
                mode="lora",
            ),
        ),
        Case(
            "non_finite",
            "pipeline LoRA load: NaN in the LoRA file",
            lambda ws: pipe().load_lora_weights(poisoned_lora(ws, math.nan)),
        ),
        Case(
            "non_finite",
            "pipeline LoRA load: inf in the LoRA file",
            lambda ws: pipe().load_lora_weights(poisoned_lora(ws, math.inf)),
        ),
        Case(
            "non_finite",
            "model LoRA load: NaN in the LoRA file",
            lambda ws: tiny_model().load_lora_adapter(poisoned_lora(ws, math.nan), weight_name=LORA_FILE),
        ),
        Case(
            "non_finite",
            "guidance_scale 1e300",
            lambda ws: sample(pipe(), guidance_scale=1e300),
            expect="either",
            check=finite_images,
        ),
        Case(
            "non_finite",
            "guidance_scale float max",
            lambda ws: sample(pipe(), guidance_scale=sys.float_info.max),
            expect="either",
            check=finite_images,
        ),
        Case(
            "non_finite",
            "guidance_scale 10**400 (an int)",
            lambda ws: sample(pipe(), guidance_scale=10**400),
            expect="either",
            check=finite_images,
        ),
        Case("non_finite", "guidance_scale numpy NaN", lambda ws: sample(pipe(), guidance_scale=np.float32("nan"))),
        Case("non_finite", "fuse_lora lora_scale NaN", lambda ws: fused(math.nan)),
        Case("non_finite", "fuse_lora lora_scale inf", lambda ws: fused(math.inf)),
        Case(
            "non_finite",
            "fuse_lora lora_scale 1e300",
            lambda ws: fused(1e300),
            expect="either",
            check=weights_finite,
        ),
        Case(
            "non_finite",
            "pipeline set_adapters weight NaN",
            lambda ws: with_adapter().set_adapters(["default_0"], [math.nan]),
        ),
        Case(
            "non_finite",
            "transformer set_adapters weight inf",
            lambda ws: with_adapter().transformer.set_adapters(["default_0"], weights=[math.inf]),
        ),
        Case(
            "non_finite",
            "scheduler beta_start NaN",
            lambda ws: scheduler_edit(ws, {"beta_start": math.nan}),
            expect="either",
            check=finite_images,
        ),
        Case(
            "non_finite",
            "scheduler beta_end Infinity",
            lambda ws: scheduler_edit(ws, {"beta_end": math.inf}),
            expect="either",
            check=finite_images,
        ),
        Case(
            "non_finite",
            "scheduler trained_betas with NaN",
            lambda ws: scheduler_edit(ws, {"trained_betas": [math.nan] + [0.01] * 999}),
            expect="either",
            check=finite_images,
        ),
        Case(
            "non_finite",
            "scheduler beta_end 1e300",
            lambda ws: scheduler_edit(ws, {"beta_end": 1e300, "beta_schedule": "linear"}),
            expect="either",
            check=finite_images,
        ),
        Case(
            "non_finite",
            "train --lr 1e30",
            lambda ws: train(*base, ws / "r", "--steps", "3", "--lr", "1e30"),
            expect="either",
            check=trained_finite,
        ),
        Case(
            "non_finite",
            "train --lr 1e300",
            lambda ws: train(*base, ws / "r", "--steps", "3", "--lr", "1e300"),
            expect="either",
            check=trained_finite,
        ),
        Case(
            "non_finite",
            "train --weight-decay 1e30",
            lambda ws: train(*base, ws / "r", "--steps", "3", "--weight-decay", "1e30"),
            expect="either",
            check=trained_finite,
        ),
        Case(
            "non_finite",
            "train_lora --lora-alpha 1e300",
            lambda ws: train(
                "--output-dir",
                ws / "r",
                *lora,
                "--pretrained",
                fx.run / "pipeline",
                "--lora-alpha",
                "1e300",
                mode="lora",
            ),
            expect="either",
            check=trained_finite,
        ),
        Case(
            "non_finite",
            "benchmark --guidance-scale 1e300",
            lambda ws: bench(ws, "--output-dir", ws / "b", "--guidance-scale", "1e300"),
            names=("guidance",),
        ),
        Case(
            "non_finite",
            "benchmark --learning-rate 1e30",
            lambda ws: bench(ws, "--output-dir", ws / "b", "--learning-rate", "1e30"),
            names=("learning_rate", "learning-rate"),
        ),
        Case(
            "non_finite",
            "evaluate --guidance-scale 1e300",
            lambda ws: evaluate(ws, fx.pixel, "--guidance-scale", "1e300"),
            names=("guidance",),
        ),
        Case(
            "non_finite",
            "evaluate --guidance-scale inf",
            lambda ws: evaluate(ws, fx.pixel, "--guidance-scale", "inf"),
            names=("guidance",),
        ),
        Case(
            "non_finite",
            "benchmark: a cell measuring NaN accuracy",
            lambda ws: bench(ws, "--output-dir", ws / "b", status="ok", class_accuracy=math.nan),
            expect="either",
            check=strict_results("class_accuracy"),
        ),
        Case(
            "non_finite",
            "benchmark: a cell measuring inf latency",
            lambda ws: bench(ws, "--output-dir", ws / "b", status="ok", latency_s=math.inf),
            expect="either",
            check=strict_results("latency_s"),
        ),
        Case(
            "non_finite",
            "benchmark resumes a results.json holding NaN",
            resumed_nan,
            expect="either",
            check=strict_results("class_accuracy"),
        ),
        Case(
            "non_finite",
            "push: results row with a NaN metric",
            lambda ws: push_dry(ws, fx.pipeline, results_file(ws, rows=[nan_row(class_accuracy=math.nan)])),
            expect="either",
            check=staged_finite,
        ),
        Case(
            "non_finite",
            "push: results row with an Infinity size",
            lambda ws: push_dry(ws, fx.pipeline, results_file(ws, rows=[nan_row(size_bytes=math.inf)])),
            expect="either",
            check=staged_finite,
        ),
        Case(
            "non_finite",
            "release: results row with a NaN metric",
            lambda ws: cli(
                "release",
                results_folder(ws, fx, rows=[nan_row(class_accuracy=math.nan)]),
                "org",
                "--dry-run",
                ws / "rel",
            ),
            expect="either",
            check=staged_finite,
        ),
        Case("non_finite", "config.json mlp_ratio NaN", lambda ws: config_edit(ws, {"mlp_ratio": math.nan})),
        Case("non_finite", "config.json norm_eps Infinity", lambda ws: config_edit(ws, {"norm_eps": math.inf})),
        Case(
            "non_finite",
            "config.json class_dropout_prob NaN",
            lambda ws: config_edit(ws, {"class_dropout_prob": math.nan}),
        ),
    ]


def _finite(value: Any) -> bool:
    return not isinstance(value, float) or math.isfinite(value)


# --- hostile or hand-edited files --------------------------------------------------------------------------------

INJECTION = "float16)\nimport os; os.system('touch PWNED')  #"


def hostile_files_cases(fx: Fixtures) -> list[Case]:
    def push_rows(rows: Any, *extra: Any, settings: Any = None, technique: str = "baseline"):
        def run(ws: Path) -> int:
            payload = {"settings": {} if settings is None else settings, "rows": rows}
            path = results_file(ws, raw=json.dumps(payload))
            out = ws / "staged"
            return cli(
                "push", fx.pipeline, "org/x", "--results", path, "--technique", technique, "--dry-run", out, *extra
            )

        return run

    def card_lacks(*texts: str):
        def check(ws: Path, _result: Any) -> str | None:
            for base, _dirs, files in os.walk(ws):
                for name in files:
                    if name in ("README.md", "space_config.json", "app.py"):
                        content = (Path(base) / name).read_text(errors="replace")
                        for text in texts:
                            if text in content:
                                return f"{text!r} from a hostile file reached {name} unvalidated"
            return None

        return check

    push = [
        ("push: rows hold a number", push_rows([1]), "error", None),
        ("push: row without a variant", push_rows([{"technique": "baseline", "status": "ok"}]), "error", None),
        ("push: row without a technique", push_rows([{"variant": "DiT-XS/4", "status": "ok"}]), "error", None),
        ("push: row variant is a list", push_rows([{**ROW, "variant": ["DiT-XS/4"]}]), "error", None),
        ("push: settings is a string", push_rows([ROW], settings="fast"), "error", None),
        ("push: row quality_settings a string", push_rows([{**ROW, "quality_settings": "x"}]), "error", None),
        ("push: row speed_settings a list", push_rows([{**ROW, "speed_settings": [1]}]), "error", None),
        ("push: row sample_grid a number", push_rows([{**ROW, "sample_grid": 5}]), "error", None),
        ("push: row hardware a list", push_rows([{**ROW, "hardware": [1, 2]}]), "either", None),
        (
            "push: dtype carrying Python code",
            push_rows([{**ROW, "dtype": INJECTION}]),
            "either",
            card_lacks("os.system"),
        ),
        (
            "push: a technique that does not exist",
            push_rows([{**ROW, "technique": "no-such-technique"}], technique="no-such-technique"),
            "error",
            None,
        ),
        (
            "push: description carrying a script",
            push_rows([{**ROW, "description": "</td><script>alert(1)</script>"}]),
            "either",
            card_lacks("<script>"),
        ),
        (
            "push: --base-model with a newline",
            push_rows([ROW], "--base-model", "org/base\nlicense: other"),
            "error",
            None,
        ),
        ("push: --base-model a path", push_rows([ROW], "--base-model", "../../etc/passwd"), "error", None),
        (
            "push: --base-model with markup",
            push_rows([ROW], "--base-model", "org/x)](javascript:alert(1))"),
            "error",
            None,
        ),
    ]

    def release_rows(rows: Any = None, settings: Any = "default", technique: str | None = None):
        def run(ws: Path) -> int:
            folder = results_folder(ws, fx, rows=rows, settings=settings)
            extra = ["--techniques", technique] if technique else []
            return cli("release", folder, "org", "--dry-run", ws / "rel", *extra)

        return run

    def settings_with(**changes: Any) -> dict:
        settings = results_settings(fx)
        for key, value in changes.items():
            if isinstance(value, dict) and isinstance(settings.get(key), dict):
                settings[key] = {**settings[key], **value}
            else:
                settings[key] = value
        return settings

    release = [
        ("release: no settings", release_rows(settings=None), "error", None),
        (
            "release: settings.training steps a string",
            release_rows(settings=settings_with(training={"steps": "1"})),
            "either",
            None,
        ),
        (
            "release: settings.pretrained a path outside",
            release_rows(settings=settings_with(pretrained={"DiT-XS/4": "../../nowhere"})),
            "error",
            None,
        ),
        ("release: settings.quality a list", release_rows(settings=settings_with(quality=[1])), "error", None),
        ("release: rows hold a number", release_rows(rows=[1]), "error", None),
        ("release: row variant unknown", release_rows(rows=[{**ROW, "variant": "DiT-Q/2"}]), "error", None),
        (
            "release: row variant carrying YAML",
            release_rows(rows=[{**ROW, "variant": "DiT-XS/4\n---\ninjected: true"}]),
            "error",
            None,
        ),
        ("release: row technique unknown", release_rows(rows=[{**ROW, "technique": "nope"}]), "error", None),
        ("release: row technique a number", release_rows(rows=[{**ROW, "technique": 5}]), "error", None),
        ("release: row size_bytes a string", release_rows(rows=[{**ROW, "size_bytes": "big"}]), "error", None),
        (
            "release: dtype carrying Python code",
            release_rows(rows=[{**ROW, "dtype": INJECTION}]),
            "either",
            card_lacks("os.system"),
        ),
    ]

    def space_with(change: Callable[[dict], Any]):
        def run(ws: Path) -> int:
            folder = one_release(ws, fx)
            edit_json(folder / "dit_optimum_results.json", change)
            return cli("export-space", folder.parent, ws / "space")

        return run

    def valid_space_ids(ws: Path, _result: Any) -> str | None:
        from huggingface_hub.utils import HFValidationError, validate_repo_id

        path = ws / "space" / "space_config.json"
        if not path.is_file():
            return None
        for repo in json.loads(path.read_text()).get("pipelines", []):
            try:
                validate_repo_id(repo)
            except (HFValidationError, TypeError, ValueError):
                return f"invalid repo id {repo!r} from a release file reached the Space"
        return card_lacks("javascript:", "<script")(ws, _result)

    def set_identity(key: str, value: Any):
        def change(data: dict) -> None:
            data["release"][key] = value

        return change

    space = [
        ("export-space: release identity missing", space_with(drop("release")), "error", None),
        ("export-space: release identity a list", space_with(lambda d: d.update(release=[1])), "error", None),
        (
            "export-space: technique missing",
            space_with(drop("release", "technique")),
            "either",
            valid_space_ids,
        ),
        (
            "export-space: repo_id with a javascript link",
            space_with(set_identity("repo_id", "org/x)](javascript:alert(1))")),
            "either",
            valid_space_ids,
        ),
        (
            "export-space: repo_id with YAML",
            space_with(set_identity("repo_id", "org/x\nsdk: docker")),
            "either",
            valid_space_ids,
        ),
        ("export-space: repo_id a number", space_with(set_identity("repo_id", 5)), "either", valid_space_ids),
        ("export-space: results file a list", space_with(lambda d: [d]), "error", None),
    ]

    def index_with(change: Callable[[dict], Any]):
        def run(ws: Path) -> Any:
            folder = copy_of(fx.pipeline, ws, "pipe")
            edit_json(folder / "model_index.json", change)
            return DiTOptimumPipeline.from_pretrained(folder)

        return run

    def set_key(key: str, value: Any):
        return lambda data: data.__setitem__(key, value)

    index = [
        ("model_index: transformer os.system", index_with(set_key("transformer", ["os", "system"])), "error"),
        ("model_index: transformer builtins.eval", index_with(set_key("transformer", ["builtins", "eval"])), "error"),
        (
            "model_index: transformer an unknown class",
            index_with(set_key("transformer", ["dit_optimum", "NoSuchModel"])),
            "error",
        ),
        ("model_index: transformer a string", index_with(set_key("transformer", "x")), "error"),
        ("model_index: transformer null", index_with(set_key("transformer", None)), "error"),
        (
            "model_index: scheduler an unknown class",
            index_with(set_key("scheduler", ["diffusers", "NoSuchScheduler"])),
            "error",
        ),
        ("model_index: vae torch.load", index_with(set_key("vae", ["torch", "load"])), "error"),
        ("model_index: id2label a string", index_with(set_key("id2label", "cats")), "error"),
        ("model_index: id2label a list", index_with(set_key("id2label", ["a", "b"])), "error"),
        ("model_index: id2label values are objects", index_with(set_key("id2label", {"0": {"a": 1}})), "error"),
        ("model_index: _class_name os.system", index_with(set_key("_class_name", "os.system")), "either"),
    ]

    def config_with(change: dict):
        def run(ws: Path) -> Any:
            folder = copy_of(fx.pipeline / "transformer", ws, "model")
            edit_json(folder / "config.json", change)
            return DiTOptimumTransformer2DModel.from_pretrained(folder)

        return run

    config = [
        ("config.json num_layers 10**18", config_with({"num_layers": 10**18})),
        ("config.json sample_size 2**40", config_with({"sample_size": 2**40})),
        ("config.json attention_head_dim 1e308", config_with({"attention_head_dim": 1e308})),
        ("config.json num_attention_heads 2**63", config_with({"num_attention_heads": 2**63})),
        ("config.json num_embeds_ada_norm 10**12", config_with({"num_embeds_ada_norm": 10**12})),
        ("config.json in_channels true", config_with({"in_channels": True})),
        ("config.json patch_size a list", config_with({"patch_size": [2, 2]})),
    ]

    def state_with(change: Callable[[dict], Any]):
        def run(ws: Path) -> int:
            folder = copy_of(fx.run, ws, "run")
            last = sorted((folder / "checkpoints").iterdir(), key=lambda p: int(p.name[5:]))[-1]
            edit_json(last / "trainer_state.json", change)
            return train(*TINY_TRAIN, "--output-dir", folder, "--steps", "3", "--resume")

        return run

    def nested(*keys: str, value: Any):
        def change(data: dict) -> None:
            target = data
            for key in keys[:-1]:
                target = target[key]
            target[keys[-1]] = value

        return change

    state = [
        ("trainer_state: step a string", state_with(set_key("step", "2"))),
        ("trainer_state: step 2**70", state_with(set_key("step", 2**70))),
        ("trainer_state: processes 0", state_with(set_key("processes", 0))),
        ("trainer_state: processes 10**9", state_with(set_key("processes", 10**9))),
        ("trainer_state: config a list", state_with(set_key("config", []))),
        ("trainer_state: history resumes a string", state_with(nested("history", "resumes", value="x"))),
        ("trainer_state: optimizer groups a string", state_with(nested("optimizer", "param_groups", value="x"))),
        ("trainer_state: optimizer scalars keyed by text", state_with(nested("optimizer", "scalars", value={"a": 1}))),
        ("trainer_state: ema empty", state_with(set_key("ema", {}))),
        ("trainer_state: ema counters strings", state_with(lambda d: d.update(ema={k: "x" for k in d["ema"]}))),
    ]

    cases = [Case("hostile_files", n, r, expect=e, check=c) for n, r, e, c in push + release + space]
    cases += [Case("hostile_files", n, r, expect=e) for n, r, e in index]
    cases += [Case("hostile_files", n, _capped(r)) for n, r in config]
    cases += [Case("hostile_files", n, r) for n, r in state]
    cases += fuzz_cases(fx)
    return cases


# Values a hand edit or an attacker might leave in a JSON file.
JUNK: list[Any] = [
    None,
    True,
    -1,
    0,
    2**64,
    1e308,
    -1e-308,
    "",
    "x" * 5,
    "../../etc/passwd",
    "float16)\nimport os",
    [],
    {},
    [1, "a", None],
    {"a": {"b": []}},
    "NaN",
]


def _mutate(document: Any, rng: random.Random) -> Any:
    """One random edit of a JSON document: a value replaced by junk, a key deleted, a list emptied or the type of
    a container changed (seeded: the same edit every run)."""
    document = json.loads(json.dumps(document))
    paths: list[tuple[Any, ...]] = []

    def walk(value: Any, path: tuple[Any, ...]) -> None:
        paths.append(path)
        if isinstance(value, dict):
            for key, item in value.items():
                walk(item, (*path, key))
        elif isinstance(value, list):
            for index, item in enumerate(value[:3]):
                walk(item, (*path, index))

    walk(document, ())
    path = rng.choice(paths[1:] or paths)
    action = rng.choice(("replace", "replace", "delete", "wrap"))
    if not path:
        return rng.choice(JUNK)
    parent = document
    for key in path[:-1]:
        parent = parent[key]
    key = path[-1]
    if action == "delete" and isinstance(parent, dict):
        del parent[key]
    elif action == "wrap":
        parent[key] = [parent[key]] if not isinstance(parent[key], list) else {"0": parent[key]}
    else:
        parent[key] = rng.choice(JUNK)
    return document


def fuzz_cases(fx: Fixtures) -> list[Case]:
    """Seeded random edits of every file kind the package reads, each through the command that reads it: anything
    but a traceback, a hang or a data loss is clean (a clean refusal or correct handling)."""

    def push_kind(document: Any):
        def run(ws: Path) -> int:
            return push_dry(ws, fx.pipeline, results_file(ws, raw=json.dumps(document)))

        return run

    def release_kind(document: Any):
        def run(ws: Path) -> int:
            folder = results_folder(ws, fx, raw=json.dumps(document))
            return cli("release", folder, "org", "--dry-run", ws / "rel")

        return run

    def identity_kind(document: Any):
        def run(ws: Path) -> int:
            folder = one_release(ws, fx)
            (folder / "dit_optimum_results.json").write_text(json.dumps(document))
            return cli("export-space", folder.parent, ws / "space")

        return run

    def pushed_release_kind(document: Any):
        def run(ws: Path) -> int:
            folder = one_release(ws, fx)
            (folder / "dit_optimum_results.json").write_text(json.dumps(document))
            return cli("push", folder, "org/dit-xs4-baseline", "--dry-run", ws / "staged")

        return run

    def folder_kind(relative: str, load: Callable[[Path], Any], source: Path):
        def make(document: Any):
            def run(ws: Path) -> Any:
                folder = copy_of(source, ws, "pipe")
                (folder / relative).write_text(json.dumps(document))
                return load(folder)

            return run

        return make

    def state_kind(document: Any):
        def run(ws: Path) -> int:
            folder = copy_of(fx.run, ws, "run")
            last = sorted((folder / "checkpoints").iterdir(), key=lambda p: int(p.name[5:]))[-1]
            (last / "trainer_state.json").write_text(json.dumps(document))
            return train(*TINY_TRAIN, "--output-dir", folder, "--steps", "3", "--resume")

        return run

    def valid_results() -> dict:
        return {"settings": {}, "rows": [dict(ROW)]}

    def valid_release_results() -> dict:
        return {"settings": results_settings(fx), "rows": [dict(ROW)]}

    def saved(path: Path) -> Callable[[], Any]:
        return lambda: json.loads(path.read_text())

    def release_identity() -> Any:
        return json.loads((released(fx) / "dit-xs4-baseline" / "dit_optimum_results.json").read_text())

    def last_state() -> Any:
        last = sorted((fx.run / "checkpoints").iterdir(), key=lambda p: int(p.name[5:]))[-1]
        return json.loads((last / "trainer_state.json").read_text())

    load_pipeline = DiTOptimumPipeline.from_pretrained

    def load_and_sample(folder: Path) -> Any:
        return sample(DiTOptimumPipeline.from_pretrained(folder))

    kinds = [
        ("push results.json", valid_results, push_kind, 6),
        ("release results.json", valid_release_results, release_kind, 5),
        ("release dit_optimum_results.json (export-space)", release_identity, identity_kind, 4),
        ("release dit_optimum_results.json (push)", release_identity, pushed_release_kind, 4),
        (
            "model_index.json",
            saved(fx.pipeline / "model_index.json"),
            folder_kind("model_index.json", load_pipeline, fx.pipeline),
            4,
        ),
        (
            "transformer config.json",
            saved(fx.pipeline / "transformer" / "config.json"),
            folder_kind("transformer/config.json", load_pipeline, fx.pipeline),
            5,
        ),
        (
            "scheduler_config.json",
            saved(fx.pixel / "scheduler" / "scheduler_config.json"),
            folder_kind("scheduler/scheduler_config.json", load_and_sample, fx.pixel),
            4,
        ),
        ("trainer_state.json", last_state, state_kind, 4),
    ]
    cases = []
    for seed, (kind, valid, make, count) in enumerate(kinds):
        rng = random.Random(1000 + seed)
        for number in range(count):
            edit_seed = rng.randrange(2**32)
            cases.append(
                Case(
                    "hostile_files",
                    f"fuzz {kind} #{number}",
                    lambda ws, v=valid, m=make, r=edit_seed: m(_mutate(v(), random.Random(r)))(ws),
                    expect="either",
                )
            )
    return cases


# --- the environment failing --------------------------------------------------------------------------------------


def environment_cases(fx: Fixtures) -> list[Case]:
    mode = "tmpfs" if can_mount() else "injected"

    def earlier(disk: Path) -> None:
        shutil.copytree(fx.pipeline, disk / "p")

    def over_earlier(ws: Path, how: Callable) -> None:
        folder = how(ws, earlier) / "p"
        protect(folder)
        DiTOptimumPipeline(transformer=tiny_model(seed=5), scheduler=DDIMScheduler()).save_pretrained(folder)

    def lora_into(path: Path) -> None:
        lora_model().save_lora_adapter(path)

    def targets(where: Callable[[Path], Path], label: str, before_eval: bool = True) -> list[tuple[str, Callable]]:
        """One case per writer of the package, each writing to ``where(ws)``."""
        return [
            (f"{label}: pipeline save", lambda ws: pipe().save_pretrained(where(ws))),
            (f"{label}: model save", lambda ws: tiny_model().save_pretrained(where(ws))),
            (f"{label}: LoRA adapter save", lambda ws: lora_into(where(ws))),
            (f"{label}: quantize", lambda ws: cli("quantize", fx.pipeline, where(ws))),
            (
                f"{label}: convert",
                lambda ws: cli("convert", "original", fx.checkpoint, where(ws), "--num-heads", "4"),
            ),
            (f"{label}: train", lambda ws: train(*TINY_TRAIN, "--output-dir", where(ws), "--steps", "2")),
            (f"{label}: benchmark", lambda ws: bench(ws, "--output-dir", where(ws))),
            (f"{label}: architecture", lambda ws: architecture("--output-dir", where(ws))),
            (
                f"{label}: evaluate --output (before the evaluation)",
                lambda ws: evaluate(ws, fx.pixel, "--output", where(ws) / "result.json", before=before_eval),
            ),
            (f"{label}: push --dry-run", lambda ws: push_dry(ws, fx.pipeline, results_file(ws), out=where(ws))),
            (
                f"{label}: release --dry-run",
                lambda ws: cli("release", results_folder(ws, fx), "org", "--dry-run", where(ws)),
            ),
            (f"{label}: export-space", lambda ws: cli("export-space", released(fx), where(ws))),
        ]

    cases = []
    full = targets(lambda ws: full_disk(ws) / "out", f"full disk ({mode})")
    cases += [Case("environment", n, r, names=("disk/out",)) for n, r in full]
    cases.append(
        Case(
            "environment",
            f"full disk ({mode}): a save over an earlier save leaves it intact",
            lambda ws: over_earlier(ws, full_disk),
        )
    )
    read = targets(lambda ws: read_only(ws) / "out", f"read-only ({mode})")
    cases += [Case("environment", n, r, names=("ro/out",)) for n, r in read]
    cases.append(
        Case(
            "environment",
            f"read-only ({mode}): a save over an earlier save",
            lambda ws: over_earlier(ws, read_only),
        )
    )
    long = targets(lambda ws: ws / LONG, "name too long", before_eval=True)
    cases += [Case("environment", n, r, names=(LONG[:40],)) for n, r in long]
    cases.append(
        Case(
            "environment",
            "name too long: LoRA weight_name",
            lambda ws: lora_model().save_lora_adapter(ws / "l", weight_name=LONG + ".safetensors"),
        )
    )

    def a_file(ws: Path) -> Path:
        path = ws / "taken"
        path.write_text("the user's file\n")
        protect(path)
        return path

    file_targets = [
        ("benchmark", lambda ws: bench(ws, "--output-dir", a_file(ws))),
        ("architecture", lambda ws: architecture("--output-dir", a_file(ws))),
        ("push --dry-run", lambda ws: push_dry(ws, fx.pipeline, results_file(ws), out=a_file(ws))),
        ("release --dry-run", lambda ws: cli("release", results_folder(ws, fx), "org", "--dry-run", a_file(ws))),
        ("export-space", lambda ws: cli("export-space", released(fx), a_file(ws))),
        ("extract latents", lambda ws: extract("--vae", fx.pipeline / "vae", "--output-dir", a_file(ws))),
    ]
    cases += [Case("environment", f"output is an existing file: {n}", r, names=("taken",)) for n, r in file_targets]
    parent_targets = [
        ("benchmark", lambda ws: bench(ws, "--output-dir", a_file(ws) / "x")),
        ("architecture", lambda ws: architecture("--output-dir", a_file(ws) / "x")),
        ("train", lambda ws: train(*TINY_TRAIN, "--output-dir", a_file(ws) / "x", "--steps", "2")),
        ("push --dry-run", lambda ws: push_dry(ws, fx.pipeline, results_file(ws), out=a_file(ws) / "x")),
        (
            "release --dry-run",
            lambda ws: cli("release", results_folder(ws, fx), "org", "--dry-run", a_file(ws) / "x"),
        ),
        ("export-space", lambda ws: cli("export-space", released(fx), a_file(ws) / "x")),
        (
            "evaluate --output (before the evaluation)",
            lambda ws: evaluate(ws, fx.pixel, "--output", a_file(ws) / "x.json", before=True),
        ),
        ("model save", lambda ws: tiny_model().save_pretrained(a_file(ws) / "x")),
        ("LoRA adapter save", lambda ws: lora_into(a_file(ws) / "x")),
    ]
    cases += [Case("environment", f"parent is a file: {n}", r, names=("taken",)) for n, r in parent_targets]

    def offline(ws: Path, command: str) -> int:
        set_env(HF_TOKEN=SECRET, HF_HUB_OFFLINE="1")
        if command == "push":
            return cli("push", fx.pipeline, "org/x", "--results", results_file(ws), "--technique", "baseline")
        return cli("release", results_folder(ws, fx), "org")

    cases += [
        Case(
            "environment",
            f"{command} with HF_TOKEN set while HF_HUB_OFFLINE=1",
            lambda ws, c=command: offline(ws, c),
            names=("offline", "HF_HUB_OFFLINE"),
        )
        for command in ("push", "release")
    ]
    return cases


# --- unbounded work ---------------------------------------------------------------------------------------------


def unbounded_cases(fx: Fixtures) -> list[Case]:
    from dit_optimum import enable_step_cache

    capped = _capped

    def resume_with_fifo(ws: Path, name: str) -> int:
        folder = copy_of(fx.run, ws, "run")
        last = sorted((folder / "checkpoints").iterdir(), key=lambda p: int(p.name[5:]))[-1]
        fifo(last / name)
        return train(*TINY_TRAIN, "--output-dir", folder, "--steps", "3", "--resume")

    def pipeline_fifo(ws: Path, name: str) -> Any:
        folder = copy_of(fx.pipeline, ws, "pipe")
        fifo(folder / name)
        return DiTOptimumPipeline.from_pretrained(folder)

    def benchmark_fifo(ws: Path) -> int:
        fifo(ws / "b" / "results.json")
        return bench(ws, "--output-dir", ws / "b")

    def release_fifo(ws: Path) -> int:
        folder = results_folder(ws, fx)
        fifo(folder / "results.json")
        return cli("release", folder, "org", "--dry-run", ws / "rel")

    def lora_fifo(ws: Path) -> Any:
        fifo(ws / "lora" / LORA_FILE)
        return pipe().load_lora_weights(ws / "lora")

    def image_fifo(ws: Path) -> Any:
        from reliability_probe import image_folder, loaded_data

        root = image_folder(ws)
        fifo(root / "a" / "blocked.png")
        return loaded_data(root)

    lora = ["--image-size", "8", "--batch-size", "8", "--max-samples", "16", "--steps", "1"]

    def sized(side: int) -> list[str]:
        argv = list(TINY_TRAIN)
        argv[argv.index("--image-size") + 1] = str(side)
        return [*argv, "--steps", "1"]

    cases = [
        ("pipeline call with [1] * 10**8 labels", capped(lambda ws: pipe()([1] * 10**8, num_inference_steps=1))),
        (
            "magcache calibration_images=10**8",
            capped(lambda ws: enable_step_cache(pipe(), "magcache", num_inference_steps=2, calibration_images=10**8)),
        ),
        (
            "block-schedule calibration_images=10**8",
            capped(
                lambda ws: enable_step_cache(pipe(), "block-schedule", num_inference_steps=2, calibration_images=10**8)
            ),
        ),
        (
            "train_lora --lora-rank 1000000",
            capped(
                lambda ws: train(
                    "--output-dir",
                    ws / "r",
                    *lora,
                    "--pretrained",
                    fx.run / "pipeline",
                    "--lora-rank",
                    "1000000",
                    mode="lora",
                )
            ),
        ),
        (
            "train --image-size 1000000",
            capped(lambda ws: train(*sized(1000000), "--output-dir", ws / "r")),
        ),
        (
            "train --image-size 65536",
            capped(lambda ws: train(*sized(65536), "--output-dir", ws / "r")),
        ),
        ("train --seed 2**70", lambda ws: train(*TINY_TRAIN, "--output-dir", ws / "r", "--seed", str(2**70))),
        (
            "magcache seed=2**70",
            lambda ws: enable_step_cache(pipe(), "magcache", num_inference_steps=2, seed=2**70),
        ),
        (
            "block-schedule seed=2**70",
            lambda ws: enable_step_cache(pipe(), "block-schedule", num_inference_steps=2, seed=2**70),
        ),
        ("FIFO as a checkpoint's model.safetensors", lambda ws: resume_with_fifo(ws, "model.safetensors")),
        ("FIFO as a checkpoint's trainer_state.json", lambda ws: resume_with_fifo(ws, "trainer_state.json")),
        ("FIFO as a checkpoint's rng_state_0.safetensors", lambda ws: resume_with_fifo(ws, "rng_state_0.safetensors")),
        ("FIFO as the benchmark's results.json", benchmark_fifo),
        ("FIFO as release's results.json", release_fifo),
        ("FIFO as push --results", lambda ws: push_dry(ws, fx.pipeline, fifo(ws / "given" / "results.json"))),
        ("FIFO as model_index.json", lambda ws: pipeline_fifo(ws, "model_index.json")),
        ("FIFO as transformer/config.json", lambda ws: pipeline_fifo(ws, "transformer/config.json")),
        ("FIFO as the transformer weights", lambda ws: pipeline_fifo(ws, f"transformer/{WEIGHTS}")),
        ("FIFO as a LoRA file", lora_fifo),
        ("FIFO as an image of the training data", image_fifo),
    ]
    return [Case("unbounded", name, run, timeout=SHORT) for name, run in cases]


# --- LoRA files -------------------------------------------------------------------------------------------------


def lora_cases(fx: Fixtures) -> list[Case]:
    def damaged(ws: Path, how: str) -> Path:
        folder = copy_of(lora_folder(fx), ws, "lora")
        path = folder / LORA_FILE
        data = path.read_bytes()
        if how == "truncated":
            path.write_bytes(data[: len(data) // 2])
        elif how == "empty":
            path.write_bytes(b"")
        elif how == "random":
            path.write_bytes(np.random.default_rng(0).bytes(len(data)))
        else:
            tensors = load_file(path)
            if how == "wrong size":
                tensors = {k: torch.randn(*(2 * s for s in t.shape)) for k, t in tensors.items()}
            elif how == "unet keys":
                tensors = {k.replace("transformer.", "unet.", 1): t for k, t in tensors.items()}
            elif how == "a block the model lacks":
                tensors = {
                    k.replace("transformer_blocks.0.", "transformer_blocks.9.", 1): t for k, t in tensors.items()
                }
            elif how == "rank mismatch":
                tensors = {k: (t[:2] if "lora_A" in k else t) for k, t in tensors.items()}
            elif how == "integer tensors":
                tensors = {k: (t * 100).to(torch.int64) for k, t in tensors.items()}
            elif how == "NaN":
                tensors = {k: torch.full_like(t, math.nan) for k, t in tensors.items()}
            save_file(tensors, path, metadata=_metadata(path))
        return folder

    def by_pipeline(how: str) -> Callable[[Path], Any]:
        return lambda ws: pipe().load_lora_weights(damaged(ws, how))

    def by_model(how: str) -> Callable[[Path], Any]:
        return lambda ws: tiny_model().load_lora_adapter(damaged(ws, how), weight_name=LORA_FILE)

    def saved_unfused(ws: Path, model_only: bool) -> Any:
        pipeline = pipe()
        pipeline.load_lora_weights(lora_folder(fx))
        before = sample(pipeline)
        if model_only:
            pipeline.transformer.save_pretrained(ws / "m")  # a refusal here is clean
        else:
            pipeline.save_pretrained(ws / "p")
        try:  # a save that succeeded must load back
            if model_only:
                again = DiTOptimumPipeline(transformer=DiTOptimumTransformer2DModel.from_pretrained(ws / "m"))
            else:
                again = DiTOptimumPipeline.from_pretrained(ws / "p")
        except DiTOptimumError as error:
            return f"saved, then its own loader refused it: {str(error)[:150]}"
        return before, sample(again)

    def same_images(ws: Path, result: Any) -> str | None:
        if isinstance(result, str):
            return result
        before, after = result
        return None if np.allclose(before, after, atol=1e-5) else "the reloaded pipeline samples other images"

    def bin_name(ws: Path, pipeline_level: bool) -> Any:
        model = lora_model()
        if pipeline_level:  # a refusal of the name when saving is clean
            from peft.utils import get_peft_model_state_dict

            DiTOptimumPipeline.save_lora_weights(
                ws / "l", transformer_lora_layers=get_peft_model_state_dict(model), weight_name="a.bin"
            )
        else:
            model.save_lora_adapter(ws / "l", weight_name="a.bin")
        try:  # a file that was saved must load back with its own loader
            if pipeline_level:
                pipe().load_lora_weights(ws / "l", weight_name="a.bin")
            else:
                tiny_model().load_lora_adapter(ws / "l", weight_name="a.bin")
        except DiTOptimumError as error:
            return f"saved a.bin, then its own loader refused it: {str(error)[:150]}"
        return None

    def loads_back(ws: Path, result: Any) -> str | None:
        return result if isinstance(result, str) else None

    def twice(ws: Path) -> Any:
        pipeline = pipe()
        pipeline.load_lora_weights(lora_folder(fx), adapter_name="style")
        return pipeline.load_lora_weights(lora_folder(fx), adapter_name="style")

    def two_files(ws: Path) -> Any:
        folder = copy_of(lora_folder(fx), ws, "lora")
        shutil.copyfile(folder / LORA_FILE, folder / "other.safetensors")
        return pipe().load_lora_weights(folder)

    def bad_metadata(ws: Path) -> Any:
        folder = copy_of(lora_folder(fx), ws, "lora")
        path = folder / LORA_FILE
        save_file(load_file(path), path, metadata={"format": "pt", "lora_adapter_metadata": "{not json"})
        return pipe().load_lora_weights(folder)

    def wrong_metadata(ws: Path) -> Any:
        folder = copy_of(lora_folder(fx), ws, "lora")
        path = folder / LORA_FILE
        metadata = json.loads(_metadata(path)["lora_adapter_metadata"])
        metadata = {k: (100000 if k.endswith(".r") else v) for k, v in metadata.items()}
        save_file(load_file(path), path, metadata={"format": "pt", "lora_adapter_metadata": json.dumps(metadata)})
        return pipe().load_lora_weights(folder)

    cases = []
    for how in ("truncated", "empty", "random", "wrong size", "unet keys"):
        cases.append(Case("lora", f"pipeline loader: {how} LoRA file", by_pipeline(how), names=(LORA_FILE, "lora")))
        cases.append(Case("lora", f"model loader: {how} LoRA file", by_model(how), names=(LORA_FILE, "lora")))
    cases += [
        Case("lora", "model loader: NaN LoRA file", by_model("NaN")),
        Case("lora", "pipeline loader: LoRA for a block the model lacks", by_pipeline("a block the model lacks")),
        Case("lora", "pipeline loader: A and B ranks differ", by_pipeline("rank mismatch")),
        Case("lora", "pipeline loader: integer LoRA tensors", by_pipeline("integer tensors")),
        Case("lora", "pipeline loader: metadata not JSON", bad_metadata, expect="either"),
        Case("lora", "pipeline loader: metadata rank 100000", wrong_metadata),
        Case("lora", "pipeline loader: a missing folder", lambda ws: pipe().load_lora_weights(ws / "none")),
        Case("lora", "pipeline loader: two safetensors files", two_files, expect="either"),
        Case("lora", "the same adapter name loaded twice", twice),
        Case(
            "lora",
            "pipeline saved with an unfused adapter reloads",
            lambda ws: saved_unfused(ws, False),
            expect="either",
            check=same_images,
        ),
        Case(
            "lora",
            "model saved with an unfused adapter reloads",
            lambda ws: saved_unfused(ws, True),
            expect="either",
            check=same_images,
        ),
        Case(
            "lora",
            "save_lora_adapter(weight_name='a.bin') loads back",
            lambda ws: bin_name(ws, False),
            expect="either",
            check=loads_back,
        ),
        Case(
            "lora",
            "save_lora_weights(weight_name='a.bin') loads back",
            lambda ws: bin_name(ws, True),
            expect="either",
            check=loads_back,
        ),
    ]
    return cases


def _metadata(path: Path) -> dict[str, str]:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as handle:
        return dict(handle.metadata() or {})


# --- smaller ----------------------------------------------------------------------------------------------------


def smaller_cases(fx: Fixtures) -> list[Case]:
    def pretrained(ws: Path, folder: Path, *extra: str) -> int:
        with first_cell_builds():
            return cli(
                "benchmark",
                "--techniques",
                "baseline",
                "--pretrained",
                f"DiT-XS/4={folder}",
                *extra,
                "--output-dir",
                ws / "b",
            )

    def once_each(ws: Path, record: list) -> str | None:
        from dit_optimum.configs import parse_preset_name

        measured = [(parse_preset_name(v), t) for v, t in record]
        return None if len(set(measured)) == len(measured) else f"one cell measured twice: {record}"

    def matrix(*argv: str) -> Case:
        record: list = []

        def run(ws: Path) -> list:
            record.clear()
            bench(ws, "--output-dir", ws / "b", *argv, record=record)
            return record

        return Case(
            "smaller",
            f"benchmark {' '.join(argv)}",
            run,
            expect="either",
            check=lambda ws, result: once_each(ws, result or []),
        )

    def concurrent(ws: Path, threads: int, guidance: float) -> tuple[list, list]:
        pipeline = pipe()
        steps = [3 + 4 * i for i in range(threads)]

        def one(i: int) -> np.ndarray:
            return sample(pipeline, labels=(i,), num_inference_steps=steps[i], guidance_scale=guidance)

        alone = [one(i) for i in range(threads)]
        together: list = [None] * threads
        errors: list = []
        barrier = threading.Barrier(threads)

        def work(i: int) -> None:
            barrier.wait()
            try:
                for _ in range(3):
                    result = one(i)
                    if together[i] is None or not np.array_equal(result, alone[i]):
                        together[i] = result
            except Exception as error:  # raised again in the case's own thread below (a refusal is clean)
                errors.append(error)

        workers = [threading.Thread(target=work, args=(i,), daemon=True) for i in range(threads)]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
        if errors:
            raise errors[0]
        return alone, together

    def same_as_alone(ws: Path, result: Any) -> str | None:
        alone, together = result
        differ = [i for i, (a, b) in enumerate(zip(alone, together)) if b is None or not np.allclose(a, b, atol=1e-6)]
        return f"concurrent calls {differ} gave other images than alone" if differ else None

    def demo_concurrent(ws: Path) -> tuple[list, list]:
        from dit_optimum.hub.demo import DemoModels

        models = DemoModels([str(fx.pixel)])
        models.get(str(fx.pixel))

        def one(steps: int) -> np.ndarray:
            images, table = models.generate("1", steps, 2.0, 0, [str(fx.pixel)])
            if not images:
                raise AssertionError(f"the demo failed: {table}")
            return np.asarray(images[0][0])

        alone = [one(3), one(9)]
        together: list = [None, None]
        barrier = threading.Barrier(2)

        errors: list = []

        def work(i: int, steps: int) -> None:
            barrier.wait()
            try:
                for _ in range(3):
                    result = one(steps)
                    if together[i] is None or not np.array_equal(result, alone[i]):
                        together[i] = result
            except Exception as error:  # raised again in the case's own thread below
                errors.append(error)

        workers = [threading.Thread(target=work, args=(i, s), daemon=True) for i, s in enumerate((3, 9))]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
        if errors:
            raise errors[0]
        return alone, together

    def json_as(relative: str, text: str, load: Callable[[Path], Any], source: Path, load_from: str = ""):
        def run(ws: Path) -> Any:
            folder = copy_of(source, ws, "pipe")
            (folder / relative).write_text(text)
            return load(folder / load_from)

        return run

    def scheduler_steps(value: Any):
        def run(ws: Path) -> Any:
            folder = copy_of(fx.pixel, ws, "pipe")
            edit_json(folder / "scheduler" / "scheduler_config.json", {"num_train_timesteps": value})
            return sample(DiTOptimumPipeline.from_pretrained(folder))

        return run

    model_load = DiTOptimumTransformer2DModel.from_pretrained
    lora = ["--image-size", "8", "--batch-size", "8", "--max-samples", "16", "--steps", "1"]
    return [
        Case(
            "smaller",
            "benchmark --pretrained DiT-XS/4=<another architecture>",
            lambda ws: pretrained(ws, fx.pixel, "--image-size", "8"),
            names=("pretrained",),
        ),
        Case(
            "smaller",
            "benchmark --pretrained DiT-XS/4=<a 4-channel latent pipeline>",
            lambda ws: pretrained(ws, fx.pipeline),
            names=("pretrained",),
        ),
        Case(
            "smaller",
            "benchmark --pretrained DiT-XS/4=<8 px pipeline> --image-size 16",
            lambda ws: pretrained(ws, fx.run / "pipeline", "--image-size", "16"),
            names=("pretrained",),
        ),
        Case(
            "smaller",
            "benchmark --pretrained DiT-XS/4=<a DiT-XS/4 at 8 px> --image-size 8 is measured",
            lambda ws: pretrained(ws, xs4_pipeline(fx), "--image-size", "8"),
            expect="ok",
        ),
        matrix("--variants", "DiT-XS/4,dit-xs/4"),
        matrix("--variants", "DiT-XS/4,DiT-XS/4"),
        matrix("--techniques", "baseline,baseline"),
        Case(
            "smaller",
            "train --resume into a new folder",
            lambda ws: train(*TINY_TRAIN, "--output-dir", ws / "new", "--steps", "2", "--resume"),
            names=("resume",),
        ),
        Case(
            "smaller",
            "train --resume into a folder without checkpoints",
            lambda ws: train(
                *TINY_TRAIN, "--output-dir", user_files(ws / "mine", "notes.txt"), "--steps", "2", "--resume"
            ),
            names=("resume", "checkpoint"),
        ),
        Case(
            "smaller",
            "train_lora --resume into a new folder",
            lambda ws: train(
                "--output-dir", ws / "new", *lora, "--pretrained", fx.run / "pipeline", "--resume", mode="lora"
            ),
            names=("resume",),
        ),
        Case(
            "smaller",
            "two threads share one pipeline (3 and 7 steps)",
            lambda ws: concurrent(ws, 2, 1.0),
            expect="either",
            check=same_as_alone,
        ),
        Case(
            "smaller",
            "three threads share one pipeline, guided",
            lambda ws: concurrent(ws, 3, 2.0),
            expect="either",
            check=same_as_alone,
        ),
        Case(
            "smaller",
            "two demo requests at once (3 and 9 steps)",
            demo_concurrent,
            expect="either",
            check=same_as_alone,
        ),
        Case(
            "smaller",
            "config.json is a list",
            json_as("transformer/config.json", "[1, 2]", model_load, fx.pipeline, "transformer"),
            names=("config.json",),
        ),
        Case(
            "smaller",
            "config.json is a string",
            json_as("transformer/config.json", '"DiT"', model_load, fx.pipeline, "transformer"),
            names=("config.json",),
        ),
        Case(
            "smaller",
            "pipeline whose config.json is a list",
            json_as("transformer/config.json", "[1, 2]", DiTOptimumPipeline.from_pretrained, fx.pipeline),
            names=("config.json",),
        ),
        Case(
            "smaller",
            "model_index.json is a string",
            json_as("model_index.json", '"DiT"', DiTOptimumPipeline.from_pretrained, fx.pipeline),
            names=("model_index.json",),
        ),
        Case(
            "smaller",
            "scheduler_config.json is a list",
            json_as("scheduler/scheduler_config.json", "[]", DiTOptimumPipeline.from_pretrained, fx.pixel),
            names=("scheduler",),
        ),
        Case(
            "smaller",
            "scheduler with 0 train timesteps",
            scheduler_steps(0),
            names=("num_train_timesteps", "scheduler"),
        ),
        Case(
            "smaller",
            "scheduler with -3 train timesteps",
            scheduler_steps(-3),
            names=("num_train_timesteps", "scheduler"),
        ),
        Case(
            "smaller",
            "scheduler with '1000' train timesteps",
            scheduler_steps("1000"),
            names=("num_train_timesteps", "scheduler"),
        ),
    ]


def fault_cases(fx: Fixtures) -> list[Case]:
    """Every fault-injection case, by class (the shared inputs are built now, outside every case)."""
    for build in (lora_folder, xs4_pipeline, released):  # a build that fails now is retried by its cases
        with contextlib.suppress(Exception):
            build(fx)
    cases = [
        *data_loss_cases(fx),
        *secrets_cases(fx),
        *non_finite_cases(fx),
        *hostile_files_cases(fx),
        *environment_cases(fx),
        *unbounded_cases(fx),
        *lora_cases(fx),
        *smaller_cases(fx),
    ]
    for case in cases:
        case.klass = case.group
    return cases

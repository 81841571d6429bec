"""Training checkpoints: the trainer's own format, safetensors and JSON only, so nothing is unpickled on resume.

A checkpoint folder ``checkpoints/step_<n>`` holds the model, EMA, projection and optimizer tensors (safetensors),
one RNG state per process, and ``trainer_state.json`` (step, settings, run history, input fingerprints, optimizer
groups, EMA counters). A resume refuses any other file before reading anything, and refuses settings or inputs
that would change what is trained.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import shutil
import stat
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from ..data import TrainingData
from ..errors import DiTOptimumError, OutputPathError
from ..files import os_errors, strict_json
from ..models.transformer import DiTOptimumTransformer2DModel
from ..schemas import TRAINER_STATE, FileContentError, read_json_file, require_regular_file, validate
from ..utils import public_config
from .config import TrainConfig
from .ema import EMA

# Settings that do not change what is trained: a resumed run may change them (README: `--steps 3000 --resume`).
# `data` and `teacher` may name another path (a moved folder): their content is compared instead.
RESUMABLE_CHANGES = (
    "output_dir",
    "steps",
    "checkpoint_every",
    "keep_checkpoints",
    "log_every",
    "tensorboard",
    "gradient_checkpointing",
    "skip_corrupt",
    "data",
    "teacher",
)
CHECKPOINT_FORMAT = 1
STATE_FILE = "trainer_state.json"  # step, settings, history, input fingerprints, optimizer groups, EMA counters
TENSOR_FILES = ("model.safetensors", "ema.safetensors", "projections.safetensors", "optimizer.safetensors")
_RNG_FILE = re.compile(r"rng_state_\d+\.safetensors")  # one per process
_STEP_FOLDER = re.compile(r"step_\d+")


@dataclass
class RunState:
    """What a checkpoint holds: the objects whose state continues the run, and its settings, history and data."""

    model: nn.Module
    projections: nn.Module
    optimizer: torch.optim.Optimizer
    ema: EMA
    scaler: Any  # accelerate's gradient scaler (fp16), or None
    settings: dict[str, Any]
    record: dict[str, Any]  # train_log.config.json: the settings the run started with, then each resume
    inputs: dict[str, Any]  # the content of data and teacher: data_fingerprint, model_fingerprint


def checkpoint_folders(output_dir: Path) -> list[Path]:
    """The run's finished checkpoint folders (``checkpoints/step_<n>``), oldest first."""
    folder = output_dir / "checkpoints"
    if folder.is_symlink():  # checkpoints are written, renamed and deleted here: never through a planted link
        raise OutputPathError(
            f"{str(folder)!r} is a symbolic link; dit-optimum does not write or delete checkpoints through links. "
            "Remove it, or train into a new output folder."
        )
    if not folder.is_dir():
        return []
    in_the_way = [p.name for p in folder.iterdir() if _STEP_FOLDER.fullmatch(p.name) and not p.is_dir()]
    if in_the_way:  # a checkpoint of that step could never be renamed into place
        raise OutputPathError(
            f"{str(folder)!r} holds {', '.join(in_the_way[:4])}, named like checkpoint folders but not folders; "
            "remove them, or train into a new output folder."
        )
    found = [p for p in folder.iterdir() if _STEP_FOLDER.fullmatch(p.name) and p.is_dir() and not p.is_symlink()]
    return sorted(found, key=lambda p: int(p.name[5:]))


def save_checkpoint(accelerator: Accelerator, output_dir: Path, step: int, keep: int, run: RunState) -> None:
    """Write into a staging folder, then rename it: a killed run never leaves a half-written checkpoint.

    The main process writes the shared state, every process its own RNG state.
    """
    final = output_dir / "checkpoints" / f"step_{step}"
    staging = output_dir / "checkpoints" / f".step_{step}.tmp"
    if accelerator.is_main_process:
        if staging.is_symlink():  # the trainer's own temporary name: a link planted there is removed, not followed
            staging.unlink()
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
    accelerator.wait_for_everyone()
    try:  # a full or read-only disk: one line naming the folder, the staging folder removed, earlier checkpoints kept
        with os_errors(staging.parent, "output_dir"):
            rng = _rng_state(accelerator.device)
            _write_tensors(staging / f"rng_state_{accelerator.process_index}.safetensors", rng)
            if accelerator.is_main_process:
                _write_run_state(staging, step, accelerator.num_processes, run)
    except OutputPathError:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        os.replace(staging, final)
        for old in checkpoint_folders(output_dir)[:-keep]:
            if _holds_only_checkpoint_files(old):  # a folder of the user's named like a checkpoint stays
                shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()


def _holds_only_checkpoint_files(folder: Path) -> bool:
    names = [path.name for path in folder.iterdir()]
    known = all(name in (STATE_FILE, *TENSOR_FILES) or _RNG_FILE.fullmatch(name) for name in names)
    return known and all(stat.S_ISREG(os.lstat(folder / name).st_mode) for name in names)


def _write_run_state(folder: Path, step: int, processes: int, run: RunState) -> None:
    ema = run.ema.state_dict()
    optimizer_tensors, optimizer = _split_optimizer_state(run.optimizer.state_dict())
    _write_tensors(folder / "model.safetensors", run.model.state_dict())
    _write_tensors(folder / "ema.safetensors", ema.pop("model"))
    _write_tensors(folder / "projections.safetensors", run.projections.state_dict())
    _write_tensors(folder / "optimizer.safetensors", optimizer_tensors)
    state = {
        "format": CHECKPOINT_FORMAT,
        "step": step,
        "processes": processes,
        "config": run.settings,
        "history": run.record,
        "inputs": run.inputs,
        "ema": ema,
        "optimizer": optimizer,
        "grad_scaler": None if run.scaler is None else run.scaler.state_dict(),
    }
    (folder / STATE_FILE).write_text(strict_json(state, repr(str(folder / STATE_FILE))))  # a fresh staging folder


def _write_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    save_file({name: tensor.detach().cpu().contiguous() for name, tensor in tensors.items()}, path)


def _split_optimizer_state(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """An optimizer state dict as tensors named ``<parameter index>.<name>``, and the rest (groups, scalars)."""
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for index, values in state["state"].items():
        for name, value in values.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{index}.{name}"] = value
            else:
                scalars.setdefault(str(index), {})[name] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _join_optimizer_state(tensors: dict[str, torch.Tensor], rest: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for key, tensor in tensors.items():
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = tensor
    for index, values in rest["scalars"].items():
        state.setdefault(int(index), {}).update(values)
    return {"state": state, "param_groups": rest["param_groups"]}


def _rng_state(device: torch.device) -> dict[str, torch.Tensor]:
    """This process's global torch RNG states (CPU, and its GPU) as uint8 tensors: model dropout draws from them."""
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict[str, torch.Tensor], device: torch.device) -> None:
    torch.set_rng_state(state["cpu"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def resume_point(config: TrainConfig, output_dir: Path) -> tuple[Path | None, dict[str, Any] | None]:
    """The checkpoint to continue from and its state, or ``(None, None)`` for a fresh run.

    Refuses foreign files (before reading anything), a damaged state and settings that changed.
    """
    checkpoints = checkpoint_folders(output_dir)
    if checkpoints and not config.resume:
        raise DiTOptimumError(
            f"`output_dir`={str(output_dir)!r} already holds checkpoints ({checkpoints[-1].name}): pass resume=True "
            "(--resume) to continue, or choose another folder."
        )
    if not checkpoints:
        return None, None
    folder = checkpoints[-1]
    _check_checkpoint_files(folder)
    state = _read_run_state(folder)
    _check_same_settings(config, state, folder)
    return folder, state


def _check_checkpoint_files(folder: Path) -> None:
    """A checkpoint may hold only the files the trainer writes: anything else (a pickle, an accelerate checkpoint
    of an older version) is refused unread, since loading it could run code."""
    names = sorted(path.name for path in folder.iterdir())
    foreign = [name for name in names if name not in (STATE_FILE, *TENSOR_FILES) and not _RNG_FILE.fullmatch(name)]
    if foreign:
        raise DiTOptimumError(
            f"Refusing to resume from {str(folder)!r}: it holds {', '.join(map(repr, foreign))}, which the trainer "
            "does not write, and such a file is not loaded because it could run code (pickle). A checkpoint holds "
            f"only {STATE_FILE}, {', '.join(TENSOR_FILES)} and rng_state_<process>.safetensors; checkpoints of "
            "older versions cannot be resumed. Remove the foreign files, or train into a new output folder."
        )
    missing = [name for name in (STATE_FILE, *TENSOR_FILES) if name not in names]
    if missing:
        raise _damaged(folder, f"missing {', '.join(missing)}")
    for name in names:  # before any is opened: a FIFO would block the read forever
        try:
            require_regular_file(folder / name)
        except DiTOptimumError as error:
            raise _damaged(folder / name, getattr(error, "problem", "not a regular file")) from None


def _damaged(path: Path, problem: str) -> DiTOptimumError:
    return DiTOptimumError(
        f"Cannot resume from {str(path)!r}: {problem}. The checkpoint is damaged or not this trainer's: delete "
        "its folder to resume from the one before, or train into a new output folder."
    )


@contextmanager
def _reading(path: Path) -> Iterator[None]:
    """Turn a checkpoint file that cannot be read or applied (truncated, corrupt, another run's) into one error
    naming it."""
    try:
        yield
    except (OSError, ValueError, KeyError, IndexError, TypeError, RuntimeError, SafetensorError) as error:
        details = " ".join(f"{type(error).__name__}: {error}".split())
        raise _damaged(path, details[:500]) from error


def _read_run_state(folder: Path) -> dict[str, Any]:
    """``trainer_state.json``, checked to be this trainer's format for this step, with its RNG files present."""
    path = folder / STATE_FILE
    try:  # a regular file of strict JSON, of this format, matching the trainer state's schema
        state = read_json_file(path)
        if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
            raise _damaged(path, f"not a trainer state of checkpoint format {CHECKPOINT_FORMAT}")
        validate(state, TRAINER_STATE, repr(str(path)))
    except FileContentError as error:
        raise _damaged(path, error.problem) from None
    if state["step"] != int(folder.name[5:]):
        raise _damaged(path, f"step {state['step']} in the folder of step {folder.name[5:]}")
    ranks = sorted(int(path.name[10:-12]) for path in folder.iterdir() if _RNG_FILE.fullmatch(path.name))
    if len(ranks) != state["processes"] or ranks != list(range(len(ranks))):
        expected = f"rng_state_0..{state['processes'] - 1}.safetensors (one per process of the run)"
        raise _damaged(folder, f"expected {expected}, found the RNG states of ranks {ranks}")
    return state


def _check_same_settings(config: TrainConfig, state: dict[str, Any], folder: Path) -> None:
    """Refuse a resume whose settings change what is trained (all but ``RESUMABLE_CHANGES``), or fewer steps."""
    step = state["step"]
    if config.steps < step:
        raise DiTOptimumError(
            f"`steps`={config.steps} is below the step of the checkpoint to resume ({str(folder)!r}, step {step}): "
            f"pass steps >= {step}, or train into a new output folder."
        )
    changes = _changed_settings(state["config"], config.settings())
    # a cosine schedule ends at `steps`: changing them changes every later learning rate
    resumable = [name for name in RESUMABLE_CHANGES if not (name == "steps" and config.lr_schedule != "constant")]
    refused = [
        f"{name}: {json.dumps(old)} -> {json.dumps(new)}"
        for name, (old, new) in changes.items()
        if name not in resumable
    ]
    if refused:
        raise DiTOptimumError(
            f"Refusing to resume {str(folder)!r} with settings that change what is trained ({'; '.join(refused)}): "
            "resume with the same settings as the checkpoint, or train into a new output folder. Settings that "
            f"may change on resume: {', '.join(RESUMABLE_CHANGES)} (data and teacher: a path to the same content)."
        )


def _setting_defaults() -> dict[str, Any]:
    # What a setting a checkpoint does not record (it predates the setting) was: the field's default.
    defaults = {}
    for option in dataclasses.fields(TrainConfig):
        if option.default is not dataclasses.MISSING:
            defaults[option.name] = option.default
        elif option.default_factory is not dataclasses.MISSING:
            defaults[option.name] = option.default_factory()
    return json.loads(json.dumps(defaults))


def _changed_settings(old: dict[str, Any], new: dict[str, Any]) -> dict[str, list[Any]]:
    # `resume` is how a run continues, not a change of it; settings newer than the checkpoint count as defaults.
    defaults = _setting_defaults()
    recorded = {name: old.get(name, defaults.get(name)) for name in new}
    changed = {name: value for name, value in new.items() if name != "resume" and recorded[name] != value}
    return {name: [recorded[name], value] for name, value in changed.items()}


def run_record(settings: dict[str, Any], state: dict[str, Any] | None) -> dict[str, Any]:
    """``train_log.config.json``: the settings the run started with, and each resume with its start step and the
    settings it changed."""
    if state is None:
        return {"config": settings, "resumes": []}
    resume = {"start_step": state["step"], "changed": _changed_settings(state["config"], settings)}
    return {"config": state["history"]["config"], "resumes": [*state["history"]["resumes"], resume]}


def _digest(tensors: Iterable[torch.Tensor], text: str) -> str:
    """SHA-256 of ``text`` and the bytes of ``tensors``: identifies data or weights by content, not by path."""
    digest = hashlib.sha256(text.encode())
    for tensor in tensors:
        digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def data_fingerprint(data: TrainingData) -> dict[str, Any]:
    """Sample count and shape, classes, and a digest of samples, labels and class names."""
    return {
        "samples": len(data.labels),
        "shape": list(data.samples.shape[1:]),
        "classes": data.num_classes,
        "sha256": _digest([data.samples, data.labels], json.dumps(data.id2label, sort_keys=True)),
    }


def model_fingerprint(model: DiTOptimumTransformer2DModel | None) -> dict[str, Any] | None:
    """A digest of a model's config and weights (the teacher, the pretrained base; None without one)."""
    if model is None:
        return None
    state = model.state_dict()
    config = public_config(model.config)  # not _name_or_path: where it was loaded from
    text = json.dumps({"config": config, "keys": sorted(state)}, sort_keys=True, default=str)
    return {"sha256": _digest((state[name] for name in sorted(state)), text)}


def check_same_content(name: str, value: Any, saved: Any, current: Any, folder: Path) -> None:
    """Refuse a resume whose data or teacher differ in content from what the checkpoint was trained with."""
    if saved != current:

        def describe(fingerprint: Any) -> str:
            if not isinstance(fingerprint, dict):
                return "none"
            size = f"{fingerprint['samples']} samples of {fingerprint['shape']}, " if "samples" in fingerprint else ""
            return f"{size}sha256 {str(fingerprint.get('sha256'))[:12]}"

        raise DiTOptimumError(
            f"`{name}`={value!r} now gives different content than {str(folder)!r} was trained with "
            f"({describe(saved)} -> {describe(current)}): resume with the same {name}, or train into a new output "
            "folder."
        )


def load_checkpoint(folder: Path, state: dict[str, Any], run: RunState, accelerator: Accelerator) -> None:
    """Restore weights, EMA, optimizer, gradient scaler and this process's RNG state (every process reads)."""
    loaders = {
        "model.safetensors": run.model.load_state_dict,
        "projections.safetensors": run.projections.load_state_dict,
        "ema.safetensors": lambda tensors: run.ema.load_state_dict({**state["ema"], "model": tensors}),
        "optimizer.safetensors": lambda tensors: run.optimizer.load_state_dict(
            _join_optimizer_state(tensors, state["optimizer"])
        ),
    }
    rank = accelerator.process_index
    if rank < state["processes"]:  # a process the checkpointed run did not have keeps its seeded RNG
        loaders[f"rng_state_{rank}.safetensors"] = lambda tensors: _set_rng_state(tensors, accelerator.device)
    for name, load in loaders.items():
        with _reading(folder / name):
            load(load_file(folder / name))
    if run.scaler is not None:
        with _reading(folder / STATE_FILE):
            run.scaler.load_state_dict(state["grad_scaler"])


def remove_staging_folders(output_dir: Path) -> None:
    # Checkpoint writes a killed run left unfinished: never read, removed under the folder lock.
    for staging in (output_dir / "checkpoints").glob(".step_*.tmp"):
        shutil.rmtree(staging, ignore_errors=True)

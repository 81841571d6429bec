"""Run diffusers' own model contracts (its tester mixins) on DiTOptimumTransformer2DModel, for every attention type
and for a mixture-of-experts model, and write a passed / failed / skipped table per mixin and per type.

    .venv/bin/python benchmarks/diffusers_contracts.py --diffusers-tests /tmp/diffusers_src

``--diffusers-tests`` is a folder holding diffusers' ``tests/`` tree (a clone of huggingface/diffusers, or just the
files used: ``tests/models/testing_utils/{common,attention,lora,cache,compile}.py``; ``tests/testing_utils.py`` may
be left out, a stand-in built on the installed ``diffusers.utils.testing_utils`` then takes its place). No diffusers
test code lives in this repository. The mixins are those diffusers applies to its DiT
(``tests/models/transformers/test_models_dit_transformer2d.py``): the same init dict and dummy inputs (batch 4,
4 x 8 x 8 latents, 8 classes), with two layers instead of one (FirstBlockCache needs a second block) and
``attention_type`` / MoE keys added. A package ``__init__`` of the mixins' folder is not run (it imports every
quantization backend); each mixin module is imported on its own, and one that fails to import (an API the installed
diffusers lacks) is reported as skipped with the import error.

Writes ``benchmarks/results/diffusers_contracts.md`` and ``.json`` (``--output`` changes the stem; ``--note`` adds
lines to the report, e.g. which versions of the files were used). CPU only by default; ``--device`` runs where
diffusers' tests would (``DIFFUSERS_TEST_DEVICE``), e.g. ``cuda`` for the torch.compile mixin, which diffusers skips
without an accelerator. About 3 minutes on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import re
import sys
import tempfile
import time
import types
from collections import defaultdict
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).parent / "results"
DEFAULT_OUTPUT = RESULTS / "diffusers_contracts"

# mixin label -> (module under tests/models/testing_utils, class name)
MIXINS: dict[str, tuple[str, str]] = {
    "Model": ("common", "ModelTesterMixin"),
    "Attention": ("attention", "AttentionTesterMixin"),
    "LoRA": ("lora", "LoraTesterMixin"),
    "FirstBlockCache": ("cache", "FirstBlockCacheTesterMixin"),
    "PyramidAttentionBroadcast": ("cache", "PyramidAttentionBroadcastTesterMixin"),
    "FasterCache": ("cache", "FasterCacheTesterMixin"),
    "TaylorSeerCache": ("cache", "TaylorSeerCacheTesterMixin"),
    "MagCache": ("cache", "MagCacheTesterMixin"),
    "SeaCache": ("cache", "SeaCacheTesterMixin"),
    "TorchCompile": ("compile", "TorchCompileTesterMixin"),
}

# diffusers' DiT tester init dict (test_models_dit_transformer2d.py), with two layers
BASE_INIT = {
    "in_channels": 4,
    "out_channels": 8,
    "activation_fn": "gelu-approximate",
    "num_attention_heads": 2,
    "attention_head_dim": 4,
    "attention_bias": True,
    "num_layers": 2,
    "norm_type": "ada_norm_zero",
    "num_embeds_ada_norm": 8,
    "patch_size": 2,
    "sample_size": 8,
}
MOE_KEYS = {"moe_num_experts": 4, "moe_top_k": 2}


def variants() -> dict[str, dict[str, Any]]:
    """Variant name -> extra init keys: every attention type, and MoE (sdpa attention, every block MoE)."""
    from dit_optimum import ATTENTION_TYPES

    found = {name: {"attention_type": name} for name in ATTENTION_TYPES}
    found["moe"] = dict(MOE_KEYS)
    return found


def _tests_folder(path: Path) -> Path:
    for candidate in (path / "tests", path):
        if (candidate / "models" / "testing_utils").is_dir():
            return candidate
    raise SystemExit(f"--diffusers-tests {str(path)!r} holds no tests/models/testing_utils folder.")


def _package(name: str, folder: Path) -> None:
    module = types.ModuleType(name)
    module.__path__ = [str(folder)]  # a namespace for the submodules; the folder's __init__ is not run
    module.__package__ = name
    sys.modules[name] = module


def _stand_in_testing_utils() -> types.ModuleType:
    """``tests.testing_utils`` for a tree without it: the installed ``diffusers.utils.testing_utils`` plus the few
    helpers the mixins import that it lacks (a tolerance check and pytest marks)."""
    import diffusers.utils.testing_utils as installed
    import pytest
    import torch
    from diffusers.utils import is_torch_version

    module = types.ModuleType("tests.testing_utils")
    module.__dict__.update({key: value for key, value in vars(installed).items() if not key.startswith("__")})

    def assert_tensors_close(actual, expected, atol=1e-5, rtol=1e-5, msg=""):
        if actual.shape != expected.shape:
            raise AssertionError(f"{msg} Shape mismatch: actual {actual.shape} vs expected {expected.shape}")
        if not torch.allclose(actual, expected, atol=atol, rtol=rtol):
            difference = (actual - expected).abs().max().item()
            raise AssertionError(f"{msg} Tensors not close: max abs difference {difference:.3e}")

    module.assert_tensors_close = assert_tensors_close
    module.is_torch_version = is_torch_version
    for mark in ("attention", "lora", "cache", "memory", "training", "compile", "quantization"):
        setattr(module, f"is_{mark}", getattr(pytest.mark, mark))
    # The installed requirement decorators are unittest's, which pytest ignores on a plain class (the mixins'
    # class-level `@require_accelerator`): pytest marks instead, as diffusers' own tests/testing_utils.py has them.
    device = os.environ.get("DIFFUSERS_TEST_DEVICE", installed.torch_device)
    module.torch_device = device

    def version_above(package: str, wanted: str) -> bool:
        from importlib.metadata import version

        from packaging.version import parse

        return parse(parse(version(package)).base_version) > parse(wanted)

    accelerators = torch.cuda.device_count() if device == "cuda" else 0
    module.require_accelerator = pytest.mark.skipif(device == "cpu", reason="test requires a hardware accelerator")
    module.require_torch_accelerator = pytest.mark.skipif(device == "cpu", reason="test requires accelerator+PyTorch")
    module.require_torch_multi_accelerator = pytest.mark.skipif(
        accelerators < 2, reason="test requires multiple hardware accelerators"
    )
    module.require_peft_backend = pytest.mark.skipif(not installed.USE_PEFT_BACKEND, reason="test requires PEFT")
    module.require_peft_version_greater = lambda wanted: pytest.mark.skipif(
        not version_above("peft", wanted), reason=f"test requires peft > {wanted}"
    )
    module.require_torch_version_greater = lambda wanted: pytest.mark.skipif(
        not version_above("torch", wanted), reason=f"test requires torch > {wanted}"
    )
    module.skip_mps = pytest.mark.skipif(device == "mps", reason="test requires non 'mps' device")
    return module


def install_diffusers_tests(path: Path) -> list[str]:
    """Make ``tests.models.testing_utils.<module>`` importable from ``path``; returns notes on stand-ins used."""
    tests = _tests_folder(path)
    notes = []
    sys.path.insert(0, str(tests.parent))
    _package("tests", tests)
    _package("tests.models", tests / "models")
    _package("tests.models.testing_utils", tests / "models" / "testing_utils")
    if (tests / "testing_utils.py").is_file():
        importlib.import_module("tests.testing_utils")
    else:
        sys.modules["tests.testing_utils"] = _stand_in_testing_utils()
        notes.append("tests/testing_utils.py absent: stand-in built on diffusers.utils.testing_utils")
    return notes


def build_test_classes(device: str) -> tuple[dict[str, type], dict[str, str]]:
    """``Test<label>__<variant>`` classes (config + mixin) and, per mixin that could not be imported, the reason."""
    import torch
    from diffusers.utils.torch_utils import randn_tensor

    from dit_optimum import DiTOptimumTransformer2DModel

    common = importlib.import_module("tests.models.testing_utils.common")
    missing: dict[str, str] = {}
    mixins: dict[str, type] = {}
    for label, (module_name, class_name) in MIXINS.items():
        try:
            mixins[label] = getattr(importlib.import_module(f"tests.models.testing_utils.{module_name}"), class_name)
        except (ImportError, AttributeError) as error:  # an API the installed diffusers lacks
            missing[label] = f"{module_name}.{class_name} not importable with diffusers installed here: {error}"

    classes: dict[str, type] = {}
    for variant, extra in variants().items():

        class Config(common.BaseModelTesterConfig):
            _extra = extra

            @property
            def model_class(self):
                return DiTOptimumTransformer2DModel

            @property
            def main_input_name(self) -> str:
                return "hidden_states"

            @property
            def output_shape(self) -> tuple:
                return (8, 8, 8)

            @property
            def generator(self):
                return torch.Generator("cpu").manual_seed(0)

            def get_init_dict(self) -> dict:
                return {**BASE_INIT, **self._extra}

            def get_dummy_inputs(self, batch_size: int = 4) -> dict:
                return {
                    "hidden_states": randn_tensor((batch_size, 4, 8, 8), generator=self.generator, device=device),
                    "timestep": torch.randint(0, 1000, size=(batch_size,), generator=self.generator).to(device),
                    "class_labels": torch.randint(0, 4, size=(batch_size,), generator=self.generator).to(device),
                }

        for label, mixin in mixins.items():
            name = f"Test{label}__{variant}"
            reason = _unsupported_config(mixin)
            extra_attributes = {} if reason is None else {"setup_method": _skipper(reason)}
            classes[name] = type(name, (Config, mixin), extra_attributes)
    return classes, missing


def _unsupported_config(mixin: type) -> str | None:
    """Why a cache mixin cannot run here: its config takes options the installed diffusers lacks (the fetched
    mixins may be newer than diffusers); None when it builds."""
    build = getattr(mixin, "_get_cache_config", None)
    if build is None:
        return None
    try:
        build(mixin.__new__(mixin))
    except TypeError as error:
        import diffusers

        return f"the mixin's cache config is not accepted by diffusers {diffusers.__version__} ({error})"
    return None


def _skipper(reason: str):
    def setup_method(self) -> None:
        import pytest

        pytest.skip(reason)

    return setup_method


class Collector:
    """pytest plugin: one record per test (its outcome, and the reason of a failure or skip)."""

    def __init__(self) -> None:
        self.records: dict[str, dict[str, Any]] = {}

    def pytest_runtest_logreport(self, report) -> None:
        record = self.records.setdefault(report.nodeid, {"outcome": "passed", "reason": ""})
        if report.when == "call" and hasattr(report, "wasxfail"):
            outcome = "passed" if report.passed else "skipped"
            reason = "" if report.passed else f"xfail: {report.wasxfail}"
            record.update(outcome=outcome, reason=reason)
        elif report.failed:
            record.update(outcome="failed", reason=_failure_line(report))
        elif report.skipped and record["outcome"] != "failed":
            reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
            record.update(outcome="skipped", reason=reason.removeprefix("Skipped: "))


def _failure_line(report) -> str:
    crash = getattr(report.longrepr, "reprcrash", None)
    text = crash.message if crash is not None else str(report.longrepr)
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    line = " ".join(lines[:3]) if lines else "failed"
    prefix = "" if report.when == "call" else f"[{report.when}] "
    return prefix + (line if len(line) <= 300 else line[:297] + "...")


def run(path: Path, device: str, select: str | None) -> dict[str, Any]:
    import pytest

    os.environ["DIFFUSERS_TEST_DEVICE"] = device
    notes = install_diffusers_tests(path)
    classes, missing = build_test_classes(device)
    from diffusers.utils.testing_utils import enable_full_determinism

    enable_full_determinism()  # as diffusers' DiT test module does
    module = types.ModuleType("_dit_contract_classes")
    module.__dict__.update(classes)
    sys.modules[module.__name__] = module
    collector = Collector()
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="dit-contracts-") as scratch:
        (Path(scratch) / "test_contracts.py").write_text("from _dit_contract_classes import *  # noqa: F403\n")
        (Path(scratch) / "pytest.ini").write_text(
            "[pytest]\nfilterwarnings =\n    ignore::DeprecationWarning\n    ignore::FutureWarning\n"
            "markers =\n    attention\n    lora\n    cache\n    compile\n    memory\n    training\n"
        )
        arguments = [str(Path(scratch) / "test_contracts.py"), "-q", "-p", "no:cacheprovider", "--rootdir", scratch]
        arguments += ["-c", str(Path(scratch) / "pytest.ini"), "-W", "ignore::UserWarning"]
        if select:
            arguments += ["-k", select]
        pytest.main(arguments, plugins=[collector])
    return {
        "diffusers_tests": str(path),
        "device": device,
        "seconds": round(time.perf_counter() - started, 1),
        "notes": notes,
        "missing_mixins": missing,
        "records": collector.records,
    }


def _normalized(reason: str) -> str:
    """A reason without the parts that differ per test (temporary paths, generated class names)."""
    reason = re.sub(r"/tmp/pytest-of-[^/]+/pytest-\d+/[^/'\s]+", "<tmp>", reason)
    return re.sub(r"Test(\w+?)__\w+", r"<\1 test class>", reason)


def _parse(nodeid: str) -> tuple[str, str, str]:
    class_name, test = nodeid.split("::")[-2:]
    label, variant = class_name.removeprefix("Test").split("__")
    return label, variant, test


def summarize(result: dict[str, Any]) -> dict[str, Any]:
    """Counts per mixin and variant, and the distinct (test, outcome, reason) rows with the variants they hit."""
    names = list(variants())
    counts: dict[str, dict[str, dict[str, int]]] = defaultdict(
        lambda: {v: {"passed": 0, "failed": 0, "skipped": 0} for v in names}
    )
    reasons: dict[tuple[str, str, str, str], list[str]] = defaultdict(list)
    for nodeid, record in result["records"].items():
        label, variant, test = _parse(nodeid)
        counts[label][variant][record["outcome"]] += 1
        if record["outcome"] != "passed":
            reasons[(label, test, record["outcome"], _normalized(record["reason"]))].append(variant)
    for label, reason in result["missing_mixins"].items():
        reasons[(label, "(whole mixin)", "skipped", reason)] = names
    return {"variants": names, "counts": counts, "reasons": reasons}


def render(result: dict[str, Any], summary: dict[str, Any]) -> str:
    names = summary["variants"]
    lines = [
        "# diffusers' model contracts on DiTOptimumTransformer2DModel",
        "",
        f"diffusers' tester mixins (from `{result['diffusers_tests']}`), run by `benchmarks/diffusers_contracts.py` "
        f"on {result['device']} in {result['seconds']} s: DiT tester config (two layers), per attention type and MoE. "
        "Cells are passed / failed / skipped.",
        "",
        "| mixin | " + " | ".join(names) + " |",
        "|---|" + "---:|" * len(names),
    ]
    totals = {v: [0, 0, 0] for v in names}
    for label in MIXINS:
        if label not in summary["counts"]:
            lines.append(f"| {label} | " + " | ".join("not run" for _ in names) + " |")
            continue
        cells = []
        for variant in names:
            cell = summary["counts"][label][variant]
            cells.append(f"{cell['passed']} / {cell['failed']} / {cell['skipped']}")
            for index, key in enumerate(("passed", "failed", "skipped")):
                totals[variant][index] += cell[key]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines.append("| **total** | " + " | ".join(" / ".join(map(str, totals[v])) for v in names) + " |")
    lines += ["", "## Failures and skips", "", "| mixin | test | outcome | variants | reason |"]
    lines.append("|---|---|---|---|---|")
    for (label, test, outcome, reason), hit in sorted(summary["reasons"].items(), key=lambda item: item[0][:3]):
        where = "all" if sorted(hit) == sorted(names) else ", ".join(hit)
        shown = reason.replace("|", "\\|").replace("\n", " ")
        lines.append(f"| {label} | `{test}` | {outcome} | {where} | {shown} |")
    if result["notes"]:
        lines += ["", "Notes:", "", *(f"- {note}" for note in result["notes"])]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--diffusers-tests", type=Path, required=True, help="folder holding diffusers' tests/ tree")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help="output path without suffix")
    parser.add_argument("--device", default="cpu", help="torch device the tests run on (default: cpu)")
    parser.add_argument("-k", dest="select", default=None, help="pytest -k expression to run a subset")
    parser.add_argument("--note", action="append", default=[], help="a line for the report (e.g. file versions)")
    args = parser.parse_args(argv)
    result = run(args.diffusers_tests, args.device, args.select)
    result["notes"] = [*args.note, *result["notes"]]
    summary = summarize(result)
    text = render(result, summary)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.with_suffix(".md").write_text(text)
    serialisable = {
        **{key: value for key, value in result.items() if key != "records"},
        "counts": summary["counts"],
        "tests": result["records"],
    }
    args.output.with_suffix(".json").write_text(json.dumps(serialisable, indent=2, sort_keys=True) + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Exported CPU runtimes for the transformer's forward: OpenVINO and ONNX Runtime, declared once in ``RUNTIMES``.

A model with a runtime (``DiTOptimumTransformer2DModel.enable_runtime``; the config key ``runtime``) keeps its float32
torch weights, the source of every export: forwards without gradients run the exported graph, training runs torch.
The graph is exported once with a dynamic batch, compiled once per batch size (OpenVINO), saved beside the weights
with a manifest (``runtime.json``: the digests of the weights it came from and of its own files), so that a reload
does not export again; a graph whose files or source weights do not match (edited, replaced, truncated) is exported
again from the weights, with a warning. Changing the weights after the export (an optimizer step, ``load_state_dict``,
a cast) is noticed before the next forward, which exports again.

The graph is the whole forward, so step caches, which skip work inside it, do not compose with a runtime, and
neither does torch quantization or compilation: the runtime chooses its own precision. ``RuntimeDeclaration``
says what each backend stacks with; the registry and ``enable_runtime`` refuse the rest.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import importlib.metadata
import io
import logging
import tempfile
import threading
import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import DiTOptimumError

logger = logging.getLogger(__name__)

MANIFEST_NAME = "runtime.json"
MANIFEST_FORMAT = 1
INPUT_NAMES = ("hidden_states", "timestep", "class_labels")
# The largest manifest read (it lists a few digests): a bigger file is not one this package wrote.
MAX_MANIFEST_BYTES = 65536
# Batch sizes kept compiled at once (OpenVINO, about 0.3 s each to compile): a server seeing many sizes stays bounded.
MAX_COMPILED_SHAPES = 8


@dataclass(frozen=True)
class RuntimeDeclaration:
    """One backend: its precisions, the Python package it needs (and the extra that installs it), the files its
    graph saves as (``weight_files``: those holding its weights, which the size counts; OpenVINO's XML topology names
    nodes by a per-process trace counter, so its bytes vary between exports of one model), and which technique parts
    stack with it (``composes_with``; the rest are refused)."""

    backend: str
    precisions: tuple[str, ...]
    package: str
    extra: str
    files: tuple[str, ...]
    weight_files: tuple[str, ...]
    description: str
    composes_with: tuple[str, ...] = ("base", "solver")

    def check_precision(self, precision: Any) -> str:
        if precision not in self.precisions:
            raise DiTOptimumError(
                f"`precision`={precision!r} is not supported by the {self.backend} runtime; allowed values: "
                f"{', '.join(self.precisions)}."
            )
        return precision


RUNTIMES: dict[str, RuntimeDeclaration] = {
    "openvino": RuntimeDeclaration(
        "openvino",
        ("bf16", "f32", "int8"),
        "openvino",
        "openvino",
        ("openvino_model.xml", "openvino_model.bin"),
        ("openvino_model.bin",),
        "OpenVINO CPU plugin (`openvino.convert_model`); bf16 runs in bfloat16 where the CPU has it (AMX, AVX-512 "
        "BF16), else float32; int8 is NNCF int8 weight compression with bf16 (or float32) compute",
    ),
    "onnxruntime": RuntimeDeclaration(
        "onnxruntime",
        ("fp32", "int8"),
        "onnxruntime",
        "onnxruntime",
        ("model.onnx",),
        ("model.onnx",),
        "ONNX Runtime CPU execution provider (`torch.onnx.export`, opset 18), float32; int8 is ONNX Runtime's dynamic "
        "quantization (int8 weights, activations quantized per call)",
    ),
}


def runtime_declaration(backend: Any) -> RuntimeDeclaration:
    """The declaration of ``backend``; an unknown one raises, listing the allowed values."""
    if backend not in RUNTIMES:
        raise DiTOptimumError(f"`backend`={backend!r} is not a runtime; allowed values: {', '.join(RUNTIMES)}.")
    return RUNTIMES[backend]


def check_runtime_spec(spec: Any) -> dict[str, str]:
    """A config's ``runtime`` entry as ``{"backend": ..., "precision": ...}``, or an error naming what is wrong."""
    if not isinstance(spec, Mapping) or set(spec) != {"backend", "precision"}:
        raise DiTOptimumError(
            f"The config's `runtime`={spec!r} must be null or {{'backend': ..., 'precision': ...}} with backend one "
            f"of {', '.join(RUNTIMES)}."
        )
    declaration = runtime_declaration(spec["backend"])
    return {"backend": declaration.backend, "precision": declaration.check_precision(spec["precision"])}


def import_runtime_package(backend: str) -> Any:
    """The backend's Python package, or an error saying how to install it (or how to load without it)."""
    declaration = runtime_declaration(backend)
    try:
        return importlib.import_module(declaration.package)
    except ImportError as error:
        raise DiTOptimumError(
            f"The {backend} runtime is not installed: pip install 'dit-optimum[{declaration.extra}]'. A saved model "
            "whose config names it loads in torch with `runtime=None`: DiTOptimumPipeline.from_pretrained(path, "
            "runtime=None), or DiTOptimumTransformer2DModel.from_pretrained(path, runtime=None)."
        ) from error


def weights_digest(model: nn.Module) -> str:
    """SHA-256 of the model's parameters and buffers (names, dtypes, shapes, bytes): which weights a graph holds."""
    digest = hashlib.sha256()
    for name, tensor in sorted({**dict(model.named_parameters()), **dict(model.named_buffers())}.items()):
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


# Elements of each tensor summed into the per-forward stamp: an edit through ``.data`` (an EMA update, older training
# code) bumps no version counter, but changes these sums unless it spares every sampled element.
_STAMP_SAMPLES = 64


def _stamp(model: nn.Module) -> tuple:
    """Cheap per-forward check that no tensor was replaced or changed since the export: storage, version counter
    and a strided sample of each tensor's values (bytes, so NaN compares equal to itself)."""
    tensors = [t.detach() for t in (*model.parameters(), *model.buffers())]
    identity = tuple((t.data_ptr(), t._version) for t in tensors)
    samples = [t.reshape(-1)[:: max(1, t.numel() // _STAMP_SAMPLES)].double().sum() for t in tensors if t.numel()]
    return identity, torch.stack(samples).numpy().tobytes() if samples else b""


class _Forward(nn.Module):
    """The model's forward as the graph sees it: (hidden_states, float timestep, class labels) -> sample."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, hidden_states: torch.Tensor, timestep: torch.Tensor, class_labels: torch.Tensor) -> torch.Tensor:
        return self.model(hidden_states, timestep=timestep, class_labels=class_labels, return_dict=False)[0]


def example_inputs(model: nn.Module, batch_size: int = 2) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inputs the export traces with (their batch dimension is left dynamic)."""
    config = model.config
    generator = torch.Generator().manual_seed(0)
    sample = torch.randn(batch_size, config.in_channels, config.sample_size, config.sample_size, generator=generator)
    return sample, torch.full((batch_size,), 500.0), torch.zeros(batch_size, dtype=torch.long)


class ExportedRuntime:
    """A backend's graph of one model's forward: export, save, load, run. Thread-safe (one call at a time)."""

    def __init__(self, backend: str, precision: str):
        self.declaration = runtime_declaration(backend)
        self.precision = self.declaration.check_precision(precision)
        self.package = import_runtime_package(backend)
        self._lock = threading.RLock()
        self._graph: Any = None  # the backend's in-memory graph
        self._source_digest: str | None = None
        self._stamp: tuple | None = None
        self._compiled: dict[int, Any] = {}

    @property
    def spec(self) -> dict[str, str]:
        return {"backend": self.declaration.backend, "precision": self.precision}

    def describe(self) -> str:
        """What runs, in words (for cards, reports and logs)."""
        return f"{self.declaration.backend} {self.precision}"

    def __deepcopy__(self, memo: dict) -> ExportedRuntime:
        # The graph is immutable and shared; the copy's weights are checked against it before its first forward.
        copied = type(self).__new__(type(self))
        copied.__dict__.update(self.__dict__)
        copied._lock, copied._compiled, copied._stamp = threading.RLock(), {}, None
        return copied

    # --- the graph -----------------------------------------------------------------------------------------------

    def _ensure_graph(self, model: nn.Module) -> None:
        stamp = _stamp(model)
        if self._graph is not None and stamp == self._stamp:
            return
        digest = weights_digest(model)
        if self._graph is None or digest != self._source_digest:
            if self._graph is not None:
                logger.info("The weights changed since the %s export: exporting again.", self.describe())
            self.export(model, digest)
        self._stamp = stamp

    def export(self, model: nn.Module, digest: str | None = None) -> None:
        """Export ``model``'s forward (float32, CPU) to the backend's graph, replacing any earlier one."""
        check_exportable(model)
        with self._lock, torch.no_grad(), paused(model), warnings.catch_warnings():
            # the tracer's notes on Python-level branches: each is on a shape, fixed but for the dynamic batch
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            try:
                graph = self._export(_Forward(model).eval(), example_inputs(model))
            except DiTOptimumError:
                raise
            except Exception as error:  # the converters raise their own types
                raise DiTOptimumError(
                    f"Could not export the transformer to {self.declaration.backend}: {type(error).__name__}: "
                    f"{str(error).splitlines()[0] if str(error) else ''}"
                ) from error
            self._graph, self._compiled = graph, {}
            self._source_digest = digest or weights_digest(model)
            self._stamp = _stamp(model)

    def run(self, model: nn.Module, hidden_states: torch.Tensor, timestep: Any, class_labels: Any) -> torch.Tensor:
        """One forward through the graph (exported first if need be); float32 out, on the CPU."""
        batch = hidden_states.shape[0]
        timestep = torch.as_tensor(timestep).to(torch.float32).reshape(-1)
        if timestep.numel() == 1:
            timestep = timestep.expand(batch)
        class_labels = torch.as_tensor(class_labels).to(torch.long).reshape(-1)
        inputs = [t.detach().contiguous().numpy() for t in (hidden_states.float(), timestep, class_labels)]
        with self._lock:
            self._ensure_graph(model)
            return torch.from_numpy(self._infer(inputs, batch).copy())

    # --- files ---------------------------------------------------------------------------------------------------

    def save(self, model: nn.Module, folder: Path) -> None:
        """Write the graph's files and the manifest into ``folder`` (a save's staging folder), exporting first if
        the weights changed since the last export."""
        from ..files import staged_file, write_json

        with self._lock:
            if self._graph is None or weights_digest(model) != self._source_digest:  # a full check before writing
                self.export(model)
            with tempfile.TemporaryDirectory() as scratch:
                self._save(Path(scratch))
                digests = {}
                for name in self.declaration.files:
                    data = (Path(scratch) / name).read_bytes()
                    digests[name] = hashlib.sha256(data).hexdigest()
                    with staged_file(folder, name, "save_directory", overwrite=True) as temporary:
                        temporary.write_bytes(data)
            manifest = {
                "format": MANIFEST_FORMAT,
                **self.spec,
                "weights_sha256": self._source_digest,
                "files_sha256": digests,
                "exported_with": {self.declaration.package: package_version(self.declaration.package)},
            }
            write_json(folder, MANIFEST_NAME, manifest, parameter="save_directory", overwrite=True)

    def load(self, model: nn.Module, folder: Path) -> bool:
        """Take the graph saved in ``folder`` when its manifest matches this backend, precision, its files and
        ``model``'s weights; else warn and leave the export to the first forward. True when loaded."""
        problem = self._saved_graph_problem(model, folder)
        if problem is None:
            try:
                with self._lock:
                    self._graph, self._compiled = self._load(folder), {}
                    self._stamp = _stamp(model)
                return True
            except Exception as error:  # the backends' parsers raise their own types
                lines = [line.strip() for line in str(error).splitlines() if line.strip()]
                problem = f"it could not be read ({type(error).__name__}: {' '.join(lines[:3])[:300]})"
        if problem != "no saved graph":
            logger.warning(
                "The %s graph saved in %s is not used: %s. It is exported again from the weights before the first "
                "forward.",
                self.describe(),
                folder,
                problem,
            )
        return False

    def _saved_graph_problem(self, model: nn.Module, folder: Path) -> str | None:
        from ..files import file_sha256
        from ..schemas import RUNTIME_MANIFEST, FileContentError, read_json_file

        manifest_path = folder / MANIFEST_NAME
        if manifest_path.is_symlink():
            return f"{MANIFEST_NAME} is a symbolic link (the graph's files are read from the folder itself only)"
        if not manifest_path.is_file():
            return "no saved graph"
        try:
            manifest = read_json_file(manifest_path, RUNTIME_MANIFEST, MANIFEST_NAME, MAX_MANIFEST_BYTES)
        except FileContentError as error:
            return str(error).rstrip(".")
        if {"backend": manifest["backend"], "precision": manifest["precision"]} != self.spec:
            return f"it is a {manifest['backend']} {manifest['precision']} graph, not {self.describe()}"
        files = manifest["files_sha256"]
        if set(files) != set(self.declaration.files):
            return f"{MANIFEST_NAME} does not list the graph's files {list(self.declaration.files)}"
        for name in self.declaration.files:
            path = folder / name
            if path.is_symlink() or not path.is_file():
                return f"{name} is missing or not a regular file"
            if file_sha256(path) != files[name]:
                return f"{name} does not match its digest in {MANIFEST_NAME} (edited or damaged)"
        digest = weights_digest(model)
        if manifest["weights_sha256"] != digest:
            return "it was exported from other weights than the folder's"
        self._source_digest = digest
        return None

    # --- per backend ---------------------------------------------------------------------------------------------

    def _export(self, module: nn.Module, example: tuple[torch.Tensor, ...]) -> Any:
        raise NotImplementedError

    def _save(self, scratch: Path) -> None:
        raise NotImplementedError

    def _load(self, folder: Path) -> Any:
        raise NotImplementedError

    def _infer(self, inputs: list, batch: int) -> Any:
        raise NotImplementedError


class OpenVINORuntime(ExportedRuntime):
    """OpenVINO's CPU plugin: one IR with a dynamic batch, compiled per batch size (static shapes ran about 7%
    faster than one dynamic compile for DiT-S/2, and compiling takes about 0.3 s)."""

    def _export(self, module: nn.Module, example: tuple[torch.Tensor, ...]) -> Any:
        ov = self.package
        sample = example[0]
        shapes = [
            (ov.PartialShape([-1, *sample.shape[1:]]), ov.Type.f32),
            (ov.PartialShape([-1]), ov.Type.f32),
            (ov.PartialShape([-1]), ov.Type.i64),
        ]
        graph = ov.convert_model(module, example_input=example, input=shapes)
        for port, name in zip(graph.inputs, INPUT_NAMES):
            port.get_tensor().set_names({name})
        if self.precision == "int8":
            graph = _compress_weights_int8(graph)
        return graph

    def _save(self, scratch: Path) -> None:
        # the weights as exported (float32, or NNCF's int8): a reload runs the same graph, bit for bit
        self.package.save_model(self._graph, str(scratch / "openvino_model.xml"), compress_to_fp16=False)

    def _load(self, folder: Path) -> Any:
        return self.package.Core().read_model(str(folder / "openvino_model.xml"), str(folder / "openvino_model.bin"))

    def _request_for(self, batch: int) -> Any:
        """The infer request of the graph compiled for ``batch`` (compiled now if need be, least recently used out)."""
        request = self._compiled.pop(batch, None)
        if request is not None:
            self._compiled[batch] = request  # most recently used last
        else:
            while len(self._compiled) >= MAX_COMPILED_SHAPES:  # the least recently used batch size goes
                self._compiled.pop(next(iter(self._compiled)))
            graph = self._graph.clone()
            graph.reshape({name: [batch, *graph.input(name).get_partial_shape()[1:]] for name in INPUT_NAMES})
            hint = "f32" if self.precision == "f32" else "bf16"
            compiled = self.package.Core().compile_model(
                graph, "CPU", {"INFERENCE_PRECISION_HINT": hint, "PERFORMANCE_HINT": "LATENCY"}
            )
            request = self._compiled[batch] = compiled.create_infer_request()
        return request

    def _infer(self, inputs: list, batch: int) -> Any:
        request = self._request_for(batch)
        request.infer(dict(zip(INPUT_NAMES, inputs)))
        return request.get_output_tensor(0).data


class ONNXRuntimeSession(ExportedRuntime):
    """ONNX Runtime's CPU execution provider: ``torch.onnx.export`` (TorchScript exporter, opset 18) with a dynamic
    batch; one session runs every batch size, with as many threads as torch uses."""

    def _export(self, module: nn.Module, example: tuple[torch.Tensor, ...]) -> Any:
        buffer = io.BytesIO()
        torch.onnx.export(
            module,
            example,
            buffer,
            dynamo=False,
            opset_version=18,
            input_names=list(INPUT_NAMES),
            output_names=["sample"],
            dynamic_axes={name: {0: "batch"} for name in (*INPUT_NAMES, "sample")},
        )
        if self.precision == "int8":
            return _quantize_dynamic_int8(buffer.getvalue())
        return buffer.getvalue()

    def _save(self, scratch: Path) -> None:
        (scratch / "model.onnx").write_bytes(self._graph)

    def _load(self, folder: Path) -> Any:
        data = (folder / "model.onnx").read_bytes()
        self._session_for(data)  # parse now: a damaged file is found at load, not at the first forward
        return data

    def _session_for(self, graph: bytes) -> Any:
        session = self._compiled.get(0)
        if session is None:
            options = self.package.SessionOptions()
            options.intra_op_num_threads = torch.get_num_threads()
            # no busy-waiting between runs: in a sampling loop torch runs the scheduler step and the VAE in between,
            # on the same cores
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
            session = self._compiled[0] = self.package.InferenceSession(
                graph, options, providers=["CPUExecutionProvider"]
            )
        return session

    def _infer(self, inputs: list, batch: int) -> Any:
        return self._session_for(self._graph).run(["sample"], dict(zip(INPUT_NAMES, inputs)))[0]


_CLASSES: dict[str, type[ExportedRuntime]] = {"openvino": OpenVINORuntime, "onnxruntime": ONNXRuntimeSession}


def make_runtime(spec: Mapping[str, Any]) -> ExportedRuntime:
    """The runtime a config's ``runtime`` entry names (its package imported, or an install hint)."""
    spec = check_runtime_spec(spec)
    return _CLASSES[spec["backend"]](spec["backend"], spec["precision"])


def check_exportable(model: nn.Module) -> None:
    """Refuse what a whole-forward graph cannot hold or would silently drop: a step cache, LoRA layers, quantized or
    non-float32 weights, a device other than the CPU, a compiled forward."""
    from .lora import check_no_lora_layers

    problems = []
    if getattr(model, "is_cache_enabled", False):
        problems.append("a step cache is on (a cache skips work inside the forward; the graph is the whole forward)")
    if model.config.get("quantization_config") is not None or getattr(model, "_dit_optimum_unserializable", None):
        problems.append("the weights are quantized in torch (the runtime chooses its own precision: `precision`)")
    if model.device.type != "cpu":
        problems.append(f"the model is on {model.device} (the runtimes here run on the CPU)")
    dtypes = {p.dtype for p in model.parameters()}
    if dtypes - {torch.float32}:
        problems.append(
            f"its weights are {sorted(map(str, dtypes))} (float32 weights are exported; the runtime chooses its "
            "compute precision: cast back with .float(), or `disable_runtime()` to run torch at that dtype)"
        )
    if getattr(model, "_compiled_call_impl", None) is not None:
        problems.append("its forward is compiled with torch.compile")
    if problems:
        raise DiTOptimumError("A runtime cannot run this transformer: " + "; ".join(problems) + ".")
    check_no_lora_layers(model)


@contextmanager
def paused(model: nn.Module) -> Iterator[None]:
    """Forwards inside run in torch even when the model has a runtime (exporting, FLOP counting, comparing)."""
    previous = model.__dict__.get("_runtime_paused", False)
    model.__dict__["_runtime_paused"] = True
    try:
        yield
    finally:
        model.__dict__["_runtime_paused"] = previous


def _compress_weights_int8(graph: Any) -> Any:
    """NNCF's int8 weight compression (asymmetric, per output channel), without its progress bar and table."""
    import nncf

    previous = logging.getLogger("nncf").level
    logging.getLogger("nncf").setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            return nncf.compress_weights(graph)
    finally:
        logging.getLogger("nncf").setLevel(previous)


def _quantize_dynamic_int8(graph: bytes) -> bytes:
    """ONNX Runtime's dynamic quantization of an ONNX graph (int8 weights of MatMul / Gemm, activations quantized per
    call), through files as its API takes them."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    class _PreprocessingAdvice(logging.Filter):  # its advice to run a shape-inference pass first, on the root logger
        def filter(self, record: logging.LogRecord) -> bool:
            return "pre-processing before quantization" not in record.getMessage()

    advice = _PreprocessingAdvice()
    logging.getLogger().addFilter(advice)
    try:
        with tempfile.TemporaryDirectory() as scratch:
            source, target = Path(scratch) / "float.onnx", Path(scratch) / "int8.onnx"
            source.write_bytes(graph)
            quantize_dynamic(str(source), str(target), weight_type=QuantType.QInt8)
            return target.read_bytes()
    finally:
        logging.getLogger().removeFilter(advice)


def package_version(package: str) -> str | None:
    """The installed version of ``package``, or None when it is not installed."""
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None

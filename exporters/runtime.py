"""Load an artifact and run it: ``load(artifact, threads=N).predict(batch) -> logits``.

Four predictors:

- ``onnx-portable`` and ``onnx-trt`` run in one stock ONNX Runtime session.
- ``onnx`` (fast) splits the graph: maximal runs of standard ops become ONNX Runtime
  sessions (or numpy evaluations, when the float work is small: :mod:`exporters.numpy_ops`),
  and every ``bitfleet`` node (binary conv / dense, with batch norm and shortcut folded in)
  runs as a native XNOR-popcount kernel (:mod:`exporters.kernels`, C built at install time,
  the CPU's best instruction set chosen at run time) between them.
- ``tensorrt`` runs its engine on the GPU (:mod:`exporters.tensorrt_engine`).
- ``tflite`` runs in LiteRT's interpreter (``ai-edge-litert``), or ``tflite-runtime``'s where
  that is what the device has.

Why split the graph rather than register a custom op with onnxruntime-extensions? Importing
onnxruntime-extensions alone adds ~250 MB of resident memory on this class of machine, more
than a Raspberry Pi can spare, and its Python custom ops cost ~20 us a call anyway. After
folding, a Bi-Real-18 has only a handful of float islands (stem, downsampling shortcuts, head),
so the split costs a few session calls per inference, and the device pays only for numpy,
onnxruntime (not even that for a small model) and a 100 KB kernel library: the graph is read
and cut by
:mod:`exporters.onnx_proto` (not the 16 MB ``onnx`` package), and nothing is compiled at run
time.

Nothing here imports torch: a device that only serves a model never loads it.
"""

from __future__ import annotations

import os
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from . import numpy_ops, onnx_proto
from .artifact import ArtifactError, open_artifact
from .conventions import (
    BINARY_CONV_OP,
    CUSTOM_DOMAIN,
    CUSTOM_OPS,
    FORMAT_PORTABLE,
    FORMAT_TENSORRT,
    FORMAT_TFLITE,
    FORMAT_TRT,
    from_onnx_pads,
)

__all__ = ["Predictor", "TFLitePredictor", "load", "RuntimeLoadError", "CUSTOM_OPS"]


class RuntimeLoadError(ArtifactError):
    """An artifact the runtime cannot run (unknown custom op, bad graph, wrong input)."""


def _session(model_bytes: bytes, threads: int | None, spinning: bool = True) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    if not spinning:
        # Segments of the fast flavour alternate with the native kernels on the same cores: idle
        # ORT workers must sleep, not spin, or they steal the cores the kernels run on.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if threads is not None:
        options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.log_severity_level = 3
    return ort.InferenceSession(model_bytes, options, providers=["CPUExecutionProvider"])


class Predictor(ABC):
    """A loaded artifact, ready to predict.

    ``predict`` takes a float32 (N, C, H, W) batch of model inputs (already normalised as
    ``manifest['input']['normalisation']`` says) and returns logits.
    """

    def __init__(self, root: Path, manifest: dict[str, Any], threads: int | None) -> None:
        self.root = root
        self.manifest = manifest
        self.threads = threads
        spec = manifest["input"]
        self.input_shape: tuple[int, ...] = tuple(spec["shape"][1:])
        self.labels: list[str] = list(manifest.get("labels") or [])

    @property
    def format(self) -> str:
        return str(self.manifest["format"])

    def _check(self, batch: np.ndarray) -> np.ndarray:
        array = np.asarray(batch)
        if array.ndim == len(self.input_shape):
            array = array[None]
        if array.ndim != len(self.input_shape) + 1 or tuple(array.shape[1:]) != self.input_shape:
            expected = "x".join(str(d) for d in self.input_shape)
            raise ValueError(
                f"input of shape {tuple(array.shape)} does not fit this model, which takes "
                f"(N, {', '.join(map(str, self.input_shape))}) batches ({expected} images)"
            )
        if not np.issubdtype(array.dtype, np.number):
            raise ValueError(f"input must be numeric, got dtype {array.dtype}")
        return np.ascontiguousarray(array, dtype=np.float32)

    def predict(self, batch: np.ndarray) -> np.ndarray:
        """Logits for a batch (or a single image) of normalised float inputs."""
        return self._run(self._check(batch))

    def normalise(self, images: np.ndarray) -> np.ndarray:
        """Apply the manifest's normalisation to images on the [0, 1] scale."""
        norm = self.manifest["input"].get("normalisation") or {}
        mean = np.asarray(norm.get("mean", [0.0]), np.float32).reshape(-1, 1, 1)
        std = np.asarray(norm.get("std", [1.0]), np.float32).reshape(-1, 1, 1)
        return (np.asarray(images, np.float32) - mean) / std

    @abstractmethod
    def _run(self, x: np.ndarray) -> np.ndarray:
        """Logits for a checked float32 batch."""


class PortablePredictor(Predictor):
    """``onnx-portable`` and ``onnx-trt``: standard ops, one stock ONNX Runtime session."""

    def __init__(self, root: Path, manifest: dict[str, Any], threads: int | None) -> None:
        super().__init__(root, manifest, threads)
        model_bytes = (root / manifest["model_file"]).read_bytes()
        try:
            self._session = _session(model_bytes, threads)
        except Exception as err:  # noqa: BLE001 - ORT raises many types; all mean "cannot load"
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise RuntimeLoadError(f"ONNX Runtime cannot load {root}: {first}") from None
        self._input = self._session.get_inputs()[0].name

    def _run(self, x: np.ndarray) -> np.ndarray:
        return self._session.run(None, {self._input: x})[0]


class TensorRTPredictor(Predictor):
    """The ``tensorrt`` flavour: the artifact's engine on this machine's GPU."""

    def __init__(self, root: Path, manifest: dict[str, Any], threads: int | None) -> None:
        super().__init__(root, manifest, threads)
        from .tensorrt_engine import EngineRunner, TensorRTUnavailable

        try:
            self._runner = EngineRunner((root / manifest["model_file"]).read_bytes(), manifest)
        except TensorRTUnavailable as err:
            raise RuntimeLoadError(f"{root} is a TensorRT engine: {err}") from None

    def _run(self, x: np.ndarray) -> np.ndarray:
        return self._runner(x)


TFLITE_RUNTIMES = ("ai_edge_litert.interpreter", "tflite_runtime.interpreter")
"""Where a TFLite interpreter is looked for, in order: LiteRT, then the older tflite-runtime."""


def tflite_interpreter_class() -> Any:
    """The ``Interpreter`` class of the first TFLite runtime installed, or a one-line error."""
    import importlib

    for module in TFLITE_RUNTIMES:
        try:
            return importlib.import_module(module).Interpreter
        except ImportError:
            continue
    raise RuntimeLoadError(
        "running a tflite artifact needs a TFLite interpreter: pip install 'bitfleet[tflite]' "
        "(ai-edge-litert), or tflite-runtime where its wheel exists"
    )


class TFLitePredictor(Predictor):
    """The ``tflite`` flavour: one TFLite interpreter, resized when the batch size changes."""

    def __init__(self, root: Path, manifest: dict[str, Any], threads: int | None) -> None:
        super().__init__(root, manifest, threads)
        interpreter = tflite_interpreter_class()
        try:
            self._interpreter = interpreter(
                model_content=(root / manifest["model_file"]).read_bytes(), num_threads=threads
            )
            self._interpreter.allocate_tensors()
        except (RuntimeError, ValueError) as err:
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise RuntimeLoadError(f"the TFLite interpreter cannot load {root}: {first}") from None
        self._input = self._interpreter.get_input_details()[0]["index"]
        self._output = self._interpreter.get_output_details()[0]["index"]
        self._batch = 1

    def _run(self, x: np.ndarray) -> np.ndarray:
        if x.shape[0] != self._batch:
            self._interpreter.resize_tensor_input(self._input, list(x.shape), strict=False)
            self._interpreter.allocate_tensors()
            self._batch = x.shape[0]
        self._interpreter.set_tensor(self._input, x)
        self._interpreter.invoke()
        return self._interpreter.get_tensor(self._output).copy()


@dataclass
class _Step:
    """One step of the fast plan: an ORT session over standard ops, or one binary kernel."""

    inputs: list[str]
    outputs: list[str]
    run: Callable[[list[np.ndarray]], list[np.ndarray]]
    kind: str
    name: str = ""
    release: list[str] = field(default_factory=list)


class FastPredictor(Predictor):
    """The ``onnx`` flavour: ORT sessions for standard ops, native kernels for binary nodes."""

    def __init__(
        self,
        root: Path,
        manifest: dict[str, Any],
        threads: int | None,
        float_ops: str = "auto",
    ) -> None:
        super().__init__(root, manifest, threads)
        try:
            model = onnx_proto.read_model((root / manifest["model_file"]).read_bytes())
        except onnx_proto.ProtoError as err:
            raise RuntimeLoadError(
                f"{root} holds a model this runtime cannot read: {err}"
            ) from None
        unknown = sorted(
            {
                f"{n.domain}.{n.op_type}"
                for n in model.nodes
                if n.domain not in ("", "ai.onnx")
                and (n.domain != CUSTOM_DOMAIN or n.op_type not in CUSTOM_OPS)
            }
        )
        if unknown:
            raise RuntimeLoadError(
                f"{root} uses custom ops this runtime lacks: {', '.join(unknown)}; "
                f"it provides {', '.join(f'{CUSTOM_DOMAIN}.{op}' for op in CUSTOM_OPS)}. "
                f"Upgrade bitfleet or export with --format {FORMAT_PORTABLE}"
            )
        from . import kernels  # the native library: loaded only by the fast flavour

        self.kernels_isa = kernels.backend()
        self._input = model.inputs[0]
        self._output = model.outputs[0]
        self.layer_times: dict[str, float] = {}
        self.float_ops = _float_ops_choice(model, float_ops, root)
        self._steps = _plan(model, threads, kernels, numpy_floats=self.float_ops == "numpy")
        if float_ops == "auto" and self.float_ops == "numpy":
            # a dry run on one zero image measures the float work; above the limit ORT is
            # worth its memory (and an artifact with no binary node gains nothing here)
            self._run(np.zeros((1, *self.input_shape), np.float32))
            work = sum(getattr(step.run, "macs", 0) or 0 for step in self._steps)
            if work > NUMPY_FLOAT_MACS:
                self.float_ops = "onnxruntime"
                self._steps = _plan(model, threads, kernels, numpy_floats=False)

    def _run(self, x: np.ndarray, profile: bool = False) -> np.ndarray:
        values: dict[str, np.ndarray] = {self._input: x}
        for step in self._steps:
            started = time.perf_counter() if profile else 0.0
            results = step.run([values[name] for name in step.inputs])
            if profile:
                self.layer_times[step.name] = self.layer_times.get(step.name, 0.0) + (
                    time.perf_counter() - started
                )
            values.update(zip(step.outputs, results, strict=True))
            for name in step.release:
                values.pop(name, None)
        return values[self._output]

    def profile(self, batch: np.ndarray) -> dict[str, float]:
        """Seconds spent in each step (ORT segments and kernels) for one ``predict``."""
        self.layer_times = {}
        self._run(self._check(batch), profile=True)
        return dict(self.layer_times)

    @property
    def steps(self) -> list[tuple[str, str]]:
        """(kind, name) of every step, in order."""
        return [(s.kind, s.name) for s in self._steps]


def _kernel_step(
    node: onnx_proto.Node,
    inits: dict[str, onnx_proto.Initializer],
    threads: int | None,
    kernels: Any,
) -> _Step:
    attrs = node.attributes
    try:
        packed, multiplier, bias = (inits[name].array() for name in node.inputs[1:4])
    except KeyError as err:
        raise RuntimeLoadError(
            f"binary node {node.name or node.outputs[0]} reads {err} which is not an initializer"
        ) from None
    if node.op_type == BINARY_CONV_OP:
        prepared = kernels.prepare_conv_weight(
            packed,
            in_channels=int(attrs["in_channels"]),
            kernel_size=tuple(attrs["kernel_shape"]),
            stride=tuple(attrs["strides"]),
            padding=from_onnx_pads(attrs["pads"]),
            dilation=tuple(attrs["dilations"]),
            multiplier=multiplier,
            bias=bias,
        )
        has_residual = len(node.inputs) > 4 and node.inputs[4] != ""

        def run_conv(args: list[np.ndarray]) -> list[np.ndarray]:
            # the kernel broadcasts the residual to its output shape, as ONNX Add would
            residual = args[1] if has_residual else None
            return [prepared(args[0], residual, threads=threads)]

        inputs = [node.inputs[0]] + ([node.inputs[4]] if has_residual else [])
        return _Step(inputs, [node.outputs[0]], run_conv, "binary", node.outputs[0])
    prepared_dense = kernels.prepare_linear_weight(
        packed, in_features=int(attrs["in_features"]), multiplier=multiplier, bias=bias
    )

    def run_dense(args: list[np.ndarray]) -> list[np.ndarray]:
        x = args[0].reshape(args[0].shape[0], -1)
        return [prepared_dense(x, threads=threads)]

    return _Step([node.inputs[0]], [node.outputs[0]], run_dense, "binary", node.outputs[0])


_ELEM_TYPES = {
    "tensor(float)": 1,
    "tensor(uint8)": 2,
    "tensor(int8)": 3,
    "tensor(int32)": 6,
    "tensor(int64)": 7,
    "tensor(bool)": 9,
    "tensor(float16)": 10,
    "tensor(double)": 11,
}
"""ONNX Runtime's type strings as TensorProto element types (segment boundaries)."""


def _boundary(
    model: onnx_proto.Model, nodes: list[onnx_proto.Node], needed_later: set[str]
) -> tuple[list[str], list[str]]:
    """A segment's inputs (read, not produced inside, not initializers) and outputs (read later)."""
    produced = {out for node in nodes for out in node.outputs}
    consumed = [name for node in nodes for name in node.inputs if name]
    inputs = list(
        dict.fromkeys(n for n in consumed if n not in produced and n not in model.initializers)
    )
    return inputs, [name for name in dict.fromkeys(produced) if name in needed_later]


def _segment_step(
    model: onnx_proto.Model,
    nodes: list[onnx_proto.Node],
    needed_later: set[str],
    known: dict[str, int],
) -> _Step:
    """An ORT session over ``nodes`` (standard ops); records its outputs' element types."""
    inputs, outputs = _boundary(model, nodes, needed_later)
    # int8 float parts: dequantize their weights once, here, so ORT sees float initializers
    # it can prepack (a DequantizeLinear per run cost 0.8 ms on a 1000-class classifier).
    # Not in a quantized (QDQ) network: ORT fuses its Q/DQ pairs into int8 kernels, whose
    # rounding the PyTorch model reproduces.
    weight_only = not any(node.op_type == "QuantizeLinear" for node in model.nodes)
    dequantized: dict[str, np.ndarray] = {}
    kept = []
    for node in nodes:
        constant = all(n in model.initializers for n in node.inputs if n)
        if weight_only and node.op_type == "DequantizeLinear" and constant:
            args = [model.initializers[n].array() if n else None for n in node.inputs]
            dequantized[node.outputs[0]] = numpy_ops.run(node, args)
        else:
            kept.append(node)
    sub_model = onnx_proto.segment_model(
        model,
        kept,
        [(n, known.get(n, onnx_proto.ELEM_FLOAT)) for n in inputs],
        outputs,
        f"segment_{nodes[0].name or nodes[0].outputs[0]}",
        extra_initializers=dequantized,
    )
    # One thread per segment: the binary kernels get the cores. Measured on Bi-Real-18 at
    # 224x224 with 2 threads (numba kernels then): 5.2 ms with single-threaded segments, 8-9 ms
    # when ORT's pool and the kernels' spinning workers took turns on two cores.
    try:
        session = _session(sub_model, 1, spinning=False)
    except Exception as err:  # noqa: BLE001 - ORT raises many types; all mean "cannot load"
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise RuntimeLoadError(
            f"ONNX Runtime cannot load a segment of the model: {first}"
        ) from None
    for output in session.get_outputs():
        known[output.name] = _ELEM_TYPES.get(output.type, onnx_proto.ELEM_FLOAT)

    def run(args: list[np.ndarray]) -> list[np.ndarray]:
        return session.run(outputs, dict(zip(inputs, args, strict=True)))

    label = f"ort[{nodes[0].op_type}..{nodes[-1].op_type}]x{len(nodes)}"
    return _Step(inputs, outputs, run, "ort", label)


FLOAT_OPS = ("auto", "numpy", "onnxruntime")

NUMPY_FLOAT_MACS = 4_000_000
"""Float work per image up to which ``auto`` keeps a fast artifact's float nodes in numpy.

A trade of memory for speed, measured on the 2-core x86 machine of BENCHMARKS.md: LeNet-5
(0.8 M multiply-accumulates) predicts in 0.16 ms in numpy against 0.04 ms in ORT, and the
agent serving it holds 43 MB instead of 71 MB; Bi-Real-18 at width 0.125 on 32x32 (0.6 M),
0.32 ms against 0.15 ms. Above a few million the gap grows with the work (the full-width
Bi-Real-18 on 32x32, 16 M: 1.9 ms against 0.7 ms), so ORT is worth its ~30 MB there.
"""


def _float_ops_choice(model: onnx_proto.Model, wanted: str, root: Path) -> str:
    """``numpy`` or ``onnxruntime`` for ``wanted``; refuses ``numpy`` for nodes it lacks."""
    if wanted == "onnxruntime":
        return wanted
    missing = sorted(
        {n.op_type for n in model.nodes if n.domain != CUSTOM_DOMAIN and not numpy_ops.supported(n)}
    )
    if not missing:
        return "numpy"
    if wanted == "numpy":
        raise RuntimeLoadError(
            f"{root} has float nodes the numpy path does not evaluate ({', '.join(missing)}); "
            "load it with float_ops='onnxruntime' (or 'auto')"
        )
    return "onnxruntime"


class _NumpySegment:
    """A run of standard nodes evaluated by :mod:`exporters.numpy_ops` (no ORT session).

    ``macs`` holds the multiply-accumulates of the first call (the load's dry run).
    """

    def __init__(
        self,
        model: onnx_proto.Model,
        nodes: list[onnx_proto.Node],
        inputs: list[str],
        outputs: list[str],
    ) -> None:
        self.inputs = inputs
        self.outputs = outputs
        used = {name for node in nodes for name in node.inputs}
        self.constants = {
            name: init.array() for name, init in model.initializers.items() if name in used
        }
        # nodes of constants only (int8 float parts' DequantizeLinear) are evaluated once here
        self.nodes = []
        for node in nodes:
            if all(name in self.constants for name in node.inputs if name):
                args = [self.constants[name] if name else None for name in node.inputs]
                self.constants[node.outputs[0]] = numpy_ops.run(node, args)
            else:
                self.nodes.append(node)
        self.macs: int | None = None

    def __call__(self, args: list[np.ndarray]) -> list[np.ndarray]:
        values: dict[str, Any] = {**self.constants, **dict(zip(self.inputs, args, strict=True))}
        counting, total = self.macs is None, 0
        for node in self.nodes:
            ins = [values[name] if name else None for name in node.inputs]
            out = numpy_ops.run(node, ins)
            if counting:
                total += numpy_ops.macs(node, ins, out)
            values[node.outputs[0]] = out
        if counting:
            self.macs = total
        return [values[name] for name in self.outputs]


def _numpy_step(
    model: onnx_proto.Model, nodes: list[onnx_proto.Node], needed_later: set[str]
) -> _Step:
    inputs, outputs = _boundary(model, nodes, needed_later)
    segment = _NumpySegment(model, nodes, inputs, outputs)
    label = f"numpy[{nodes[0].op_type}..{nodes[-1].op_type}]x{len(nodes)}"
    return _Step(inputs, outputs, segment, "numpy", label)


def _plan(
    model: onnx_proto.Model, threads: int | None, kernels: Any, numpy_floats: bool = False
) -> list[_Step]:
    """Cut the graph into float segments and kernel steps, in topological order.

    Float segments are ORT sessions, or numpy evaluations when ``numpy_floats``.
    """
    nodes = list(model.nodes)
    is_custom = [n.domain == CUSTOM_DOMAIN for n in nodes]
    # which tensors each position still needs later (for segment outputs and freeing memory)
    final = set(model.outputs)
    groups: list[tuple[bool, list[onnx_proto.Node]]] = []
    for node, custom in zip(nodes, is_custom, strict=True):
        if custom or not groups or groups[-1][0]:
            groups.append((custom, [node]))
        else:
            groups[-1][1].append(node)
    known: dict[str, int] = {model.inputs[0]: onnx_proto.ELEM_FLOAT}
    steps: list[_Step] = []
    for index, (custom, group) in enumerate(groups):
        later = set(final)
        for _, rest in groups[index + 1 :]:
            later.update(name for node in rest for name in node.inputs)
        if custom:
            steps.append(_kernel_step(group[0], model.initializers, threads, kernels))
        elif numpy_floats:
            steps.append(_numpy_step(model, group, later))
        else:
            steps.append(_segment_step(model, group, later, known))
    # free each intermediate after its last reader
    last_use: dict[str, int] = {}
    for i, step in enumerate(steps):
        for name in step.inputs:
            last_use[name] = i
    for name, i in last_use.items():
        if name not in final:
            steps[i].release.append(name)
    return steps


def load(
    artifact: str | os.PathLike[str], threads: int | None = None, *, float_ops: str = "auto"
) -> Predictor:
    """Verify and load an artifact (directory or .tar) for inference with ``threads`` threads.

    ``float_ops`` (fast flavour): where its float nodes run. ``auto`` evaluates them in numpy
    when they are all of :mod:`exporters.numpy_ops` and their work is small (at most
    :data:`NUMPY_FLOAT_MACS` multiply-accumulates per image), so that a small model never
    loads onnxruntime (about 30 MB on a device); otherwise ``onnxruntime`` runs them.
    ``numpy`` and ``onnxruntime`` force one.
    """
    if float_ops not in FLOAT_OPS:
        raise ValueError(f"float_ops must be one of {', '.join(FLOAT_OPS)}, got {float_ops!r}")
    if threads is not None and threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    root, manifest = open_artifact(artifact)
    if manifest["format"] in (FORMAT_PORTABLE, FORMAT_TRT):  # standard ops: one ORT session
        return PortablePredictor(root, manifest, threads)
    if manifest["format"] == FORMAT_TENSORRT:
        return TensorRTPredictor(root, manifest, threads)
    if manifest["format"] == FORMAT_TFLITE:
        return TFLitePredictor(root, manifest, threads)
    return FastPredictor(root, manifest, threads, float_ops)

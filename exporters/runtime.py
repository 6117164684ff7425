"""Load an artifact and run it: ``load(artifact, threads=N).predict(batch) -> logits``.

Two predictors, one per flavour:

- ``onnx-portable`` runs in one stock ONNX Runtime session.
- ``onnx`` (fast) splits the graph: maximal runs of standard ops become ONNX Runtime
  sessions, and every ``bitfleet`` node (binary conv / dense, with batch norm and shortcut
  folded in) runs as a native XNOR-popcount kernel (:mod:`exporters.kernels`, C built at
  install time, the CPU's best instruction set chosen at run time) between them.

Why split the graph rather than register a custom op with onnxruntime-extensions? Importing
onnxruntime-extensions alone adds ~250 MB of resident memory on this class of machine, more
than a Raspberry Pi can spare, and its Python custom ops cost ~20 us a call anyway. After
folding, a Bi-Real-18 has only a handful of float islands (stem, downsampling shortcuts, head),
so the split costs a few session calls per inference, and the device pays only for numpy,
onnx (to read and cut the graph), onnxruntime and a 100 KB kernel library; nothing is compiled
at run time.

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

from bitfleet.errors import require

from .artifact import ArtifactError, open_artifact
from .conventions import BINARY_CONV_OP, CUSTOM_DOMAIN, CUSTOM_OPS, FORMAT_PORTABLE, from_onnx_pads

__all__ = ["Predictor", "load", "RuntimeLoadError", "CUSTOM_OPS"]


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
    """The ``onnx-portable`` flavour: one stock ONNX Runtime session."""

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

    def __init__(self, root: Path, manifest: dict[str, Any], threads: int | None) -> None:
        super().__init__(root, manifest, threads)
        # the fast flavour's parts come with the `fast` extra; a serving-only device may lack them
        onnx = require("onnx", "fast", f"the fast {manifest['format']!r} flavour of {root}")

        model = onnx.load(str(root / manifest["model_file"]))
        unknown = sorted(
            {
                f"{n.domain}.{n.op_type}"
                for n in model.graph.node
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

        self._kernels = kernels
        self.kernels_isa = kernels.backend()
        self._steps = _plan(model, threads, kernels)
        self._input = model.graph.input[0].name
        self._output = model.graph.output[0].name
        self.layer_times: dict[str, float] = {}

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


def _attrs(node: Any) -> dict[str, Any]:
    from onnx import helper

    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _kernel_step(
    node: Any, inits: dict[str, np.ndarray], threads: int | None, kernels: Any
) -> _Step:
    attrs = _attrs(node)
    try:
        packed, multiplier, bias = (inits[name] for name in node.input[1:4])
    except KeyError as err:
        raise RuntimeLoadError(
            f"binary node {node.name or node.output[0]} reads {err} which is not an initializer"
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
        has_residual = len(node.input) > 4 and node.input[4] != ""

        def run_conv(args: list[np.ndarray]) -> list[np.ndarray]:
            # the kernel broadcasts the residual to its output shape, as ONNX Add would
            residual = args[1] if has_residual else None
            return [prepared(args[0], residual, threads=threads)]

        inputs = [node.input[0]] + ([node.input[4]] if has_residual else [])
        return _Step(inputs, [node.output[0]], run_conv, "binary", node.output[0])
    prepared_dense = kernels.prepare_linear_weight(
        packed, in_features=int(attrs["in_features"]), multiplier=multiplier, bias=bias
    )

    def run_dense(args: list[np.ndarray]) -> list[np.ndarray]:
        x = args[0].reshape(args[0].shape[0], -1)
        return [prepared_dense(x, threads=threads)]

    return _Step([node.input[0]], [node.output[0]], run_dense, "binary", node.output[0])


def _segment_step(
    model: Any, nodes: list[Any], needed_later: set[str], known: dict[str, int]
) -> _Step:
    """An ORT session over ``nodes`` (standard ops), with typed boundary tensors."""
    import onnx
    from onnx import helper

    graph = model.graph
    produced = {out for node in nodes for out in node.output}
    init_names = {init.name for init in graph.initializer}
    consumed = [name for node in nodes for name in node.input if name]
    inputs = list(dict.fromkeys(n for n in consumed if n not in produced and n not in init_names))
    outputs = [name for name in dict.fromkeys(produced) if name in needed_later]
    used_inits = [init for init in graph.initializer if init.name in set(consumed)]
    sub = helper.make_graph(
        nodes,
        f"segment_{nodes[0].name or nodes[0].output[0]}",
        [
            helper.make_tensor_value_info(n, known.get(n, onnx.TensorProto.FLOAT), None)
            for n in inputs
        ],
        [helper.make_empty_tensor_value_info(n) for n in outputs],
        initializer=used_inits,
    )
    sub_model = helper.make_model(
        sub, opset_imports=[o for o in model.opset_import if o.domain in ("", "ai.onnx")]
    )
    sub_model.ir_version = model.ir_version
    inferred = onnx.shape_inference.infer_shapes(sub_model)
    types = {vi.name: vi.type.tensor_type.elem_type for vi in inferred.graph.value_info}
    types.update(
        {
            vi.name: vi.type.tensor_type.elem_type
            for vi in inferred.graph.output
            if vi.type.tensor_type.elem_type
        }
    )
    del sub_model.graph.output[:]
    for name in outputs:
        elem = types.get(name, onnx.TensorProto.FLOAT)
        known[name] = elem
        sub_model.graph.output.append(helper.make_tensor_value_info(name, elem, None))
    # One thread per segment: the binary kernels get the cores. Measured on Bi-Real-18 at
    # 224x224 with 2 threads (numba kernels then): 5.2 ms with single-threaded segments, 8-9 ms
    # when ORT's pool and the kernels' spinning workers took turns on two cores.
    session = _session(sub_model.SerializeToString(), 1, spinning=False)

    def run(args: list[np.ndarray]) -> list[np.ndarray]:
        return session.run(outputs, dict(zip(inputs, args, strict=True)))

    label = f"ort[{nodes[0].op_type}..{nodes[-1].op_type}]x{len(nodes)}"
    return _Step(inputs, outputs, run, "ort", label)


def _plan(model: Any, threads: int | None, kernels: Any) -> list[_Step]:
    """Cut the graph into ORT segments and kernel steps, in topological order."""
    from onnx import numpy_helper

    graph = model.graph
    inits = {init.name: numpy_helper.to_array(init) for init in graph.initializer}
    nodes = list(graph.node)
    is_custom = [n.domain == CUSTOM_DOMAIN for n in nodes]
    # which tensors each position still needs later (for segment outputs and freeing memory)
    final = {o.name for o in graph.output}
    groups: list[tuple[bool, list[Any]]] = []
    for node, custom in zip(nodes, is_custom, strict=True):
        if custom or not groups or groups[-1][0]:
            groups.append((custom, [node]))
        else:
            groups[-1][1].append(node)
    known: dict[str, int] = {graph.input[0].name: 1}
    steps: list[_Step] = []
    for index, (custom, group) in enumerate(groups):
        later = set(final)
        for _, rest in groups[index + 1 :]:
            later.update(name for node in rest for name in node.input)
        if custom:
            steps.append(_kernel_step(group[0], inits, threads, kernels))
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


def load(artifact: str | os.PathLike[str], threads: int | None = None) -> Predictor:
    """Verify and load an artifact (directory or .tar) for inference with ``threads`` threads."""
    if threads is not None and threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    root, manifest = open_artifact(artifact)
    if manifest["format"] == FORMAT_PORTABLE:
        return PortablePredictor(root, manifest, threads)
    return FastPredictor(root, manifest, threads)

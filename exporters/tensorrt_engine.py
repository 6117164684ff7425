"""TensorRT engines (format ``tensorrt``): built from the ``onnx-trt`` graph, run on the GPU.

An engine is compiled for one GPU and one TensorRT version, so it is built where it will run
(a Jetson, or a desktop with the same GPU): ``bitfleet export --format tensorrt`` on that
machine. The artifact keeps the ``onnx-trt`` graph it came from (``model.onnx``), so a device
with another TensorRT can rebuild it (``trtexec --onnx=model.onnx --int8 --fp16``).

Precision: INT8 for the binary layers, whose Q/DQ pairs at scale 1 make them exact (explicit
quantization: no calibration data), and FP16 where the GPU has fast FP16, for the float parts.
One optimisation profile covers batches 1..``max_batch`` (optimised for batch 1, a device's
usual request). The workspace is capped (``workspace_mb``): a Jetson shares its memory with
the CPU.

Neither tensorrt nor a GPU can be installed where bitfleet is developed: the calls below
follow TensorRT 8.5-10's Python API and were not run here (the tests that need them skip,
saying why). Without tensorrt every entry point raises :class:`TensorRTUnavailable`, one line
that says how to get it.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from bitfleet.errors import BitfleetError

__all__ = ["ENGINE_FILE", "TensorRTUnavailable", "EngineError", "build_engine", "EngineRunner"]

ENGINE_FILE = "model.engine"

HOW_TO_GET_IT = (
    "NVIDIA's tensorrt Python package and a CUDA GPU: on a Jetson it comes with JetPack "
    "(apt install python3-libnvinfer; Dockerfile.jetson has it), on a desktop `pip install "
    "tensorrt cuda-python`; elsewhere export --format onnx-trt and build the engine on the "
    "device (trtexec --onnx=model.onnx --int8 --fp16)"
)


class TensorRTUnavailable(BitfleetError, RuntimeError):
    """tensorrt (or the CUDA runtime, or a GPU) is missing on this machine."""


class EngineError(BitfleetError, RuntimeError):
    """TensorRT refused the model or could not build or run its engine."""


def _tensorrt(purpose: str) -> Any:
    try:
        import tensorrt
    except ImportError:
        raise TensorRTUnavailable(f"{purpose} needs {HOW_TO_GET_IT}") from None
    return tensorrt


def _cudart(purpose: str) -> Any:
    """The CUDA runtime API of cuda-python (either of its module layouts)."""
    try:
        from cuda.bindings import runtime as cudart
    except ImportError:
        try:
            from cuda import cudart
        except ImportError:
            raise TensorRTUnavailable(f"{purpose} needs {HOW_TO_GET_IT}") from None
    return cudart


def build_engine(
    onnx_model: bytes,
    input_shape: tuple[int, int, int],
    *,
    max_batch: int = 8,
    workspace_mb: int = 1024,
) -> tuple[bytes, dict[str, Any]]:
    """Serialized engine for an ``onnx-trt`` model, and what the manifest records of it."""
    trt = _tensorrt("building a TensorRT engine")
    if max_batch < 1 or workspace_mb < 1:
        raise ValueError("max_batch and workspace_mb must be >= 1")
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 0
    explicit = getattr(trt.NetworkDefinitionCreationFlag, "EXPLICIT_BATCH", None)
    if explicit is not None:  # TensorRT 8 needs it; 10 is always explicit-batch
        flags |= 1 << int(explicit)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(onnx_model):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise EngineError(f"TensorRT's ONNX parser refused the model: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_mb << 20)
    config.set_flag(trt.BuilderFlag.INT8)  # Q/DQ in the graph: no calibrator
    precision = ["int8"]
    if builder.platform_has_fast_fp16:
        config.set_flag(trt.BuilderFlag.FP16)
        precision.append("fp16")
    profile = builder.create_optimization_profile()
    channels, height, width = input_shape
    profile.set_shape(
        network.get_input(0).name,
        (1, channels, height, width),
        (1, channels, height, width),
        (max_batch, channels, height, width),
    )
    config.add_optimization_profile(profile)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise EngineError("TensorRT could not build an engine for this model (its log says why)")
    info = {
        "version": trt.__version__,
        "precision": precision,
        "max_batch": max_batch,
        "workspace_mb": workspace_mb,
    }
    return bytes(serialized), info


def _check(result: Any, what: str) -> Any:
    """cuda-python returns (error, value...); raise on an error code, return the values."""
    error, *values = result if isinstance(result, tuple) else (result,)
    if int(error) != 0:
        raise EngineError(f"CUDA {what} failed: {error}")
    return values[0] if len(values) == 1 else values


class EngineRunner:
    """A deserialized engine with device buffers, run synchronously on one CUDA stream."""

    def __init__(self, engine: bytes, manifest: dict[str, Any]) -> None:
        trt = _tensorrt("running a TensorRT engine")
        self._cudart = _cudart("running a TensorRT engine")
        built = (manifest.get("tensorrt") or {}).get("version")
        if built and built != trt.__version__:
            raise EngineError(
                f"the engine was built by TensorRT {built}, this device has {trt.__version__}: "
                "rebuild it here (bitfleet export --format tensorrt, or trtexec "
                "--onnx=model.onnx --int8 --fp16)"
            )
        self._runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self._engine = self._runtime.deserialize_cuda_engine(engine)
        if self._engine is None:
            raise EngineError("TensorRT could not load the engine (another GPU or version?)")
        self._context = self._engine.create_execution_context()
        names = [self._engine.get_tensor_name(i) for i in range(self._engine.num_io_tensors)]
        modes = {name: self._engine.get_tensor_mode(name) for name in names}
        self._input = next(n for n in names if modes[n] == trt.TensorIOMode.INPUT)
        self._output = next(n for n in names if modes[n] == trt.TensorIOMode.OUTPUT)
        self._stream = _check(self._cudart.cudaStreamCreate(), "stream creation")
        self._buffers: dict[str, tuple[int, int]] = {}  # name -> (device pointer, bytes)

    def _buffer(self, name: str, nbytes: int) -> int:
        pointer, size = self._buffers.get(name, (0, 0))
        if size < nbytes:
            if pointer:
                _check(self._cudart.cudaFree(pointer), "free")
            pointer = int(_check(self._cudart.cudaMalloc(nbytes), "allocation"))
            self._buffers[name] = (pointer, nbytes)
        return pointer

    def __call__(self, x: np.ndarray) -> np.ndarray:
        cudart = self._cudart
        x = np.ascontiguousarray(x, dtype=np.float32)
        self._context.set_input_shape(self._input, tuple(x.shape))
        out_shape = tuple(self._context.get_tensor_shape(self._output))
        out = np.empty(out_shape, np.float32)
        source = self._buffer(self._input, x.nbytes)
        target = self._buffer(self._output, out.nbytes)
        self._context.set_tensor_address(self._input, source)
        self._context.set_tensor_address(self._output, target)
        to_device = cudart.cudaMemcpyKind.cudaMemcpyHostToDevice
        to_host = cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
        _check(
            cudart.cudaMemcpyAsync(source, x.ctypes.data, x.nbytes, to_device, self._stream),
            "copy to the GPU",
        )
        if not self._context.execute_async_v3(self._stream):
            raise EngineError("TensorRT failed to run the engine")
        _check(
            cudart.cudaMemcpyAsync(out.ctypes.data, target, out.nbytes, to_host, self._stream),
            "copy from the GPU",
        )
        _check(cudart.cudaStreamSynchronize(self._stream), "synchronisation")
        return out

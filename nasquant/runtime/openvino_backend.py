"""OpenVINO execution of an exported YOLO-NAS graph on the CPU: the ``.onnx`` itself (FP32 or INT8
Q/DQ) or its OpenVINO IR (``.xml`` + ``.bin``, written by :func:`nasquant.export.openvino.export_openvino`).

OpenVINO's CPU plugin chooses its own inference precision: bf16 on CPUs with AVX-512 BF16 or AMX,
which moves boxes by pixels and scores by 1e-2. Here it is pinned — f32 unless bf16 (or f16) is asked
for, and then labelled (:attr:`OpenVINOBackend.inference_precision`, :meth:`~OpenVINOBackend.describe`)
— and read back from the compiled model, because a CPU without native f16 runs an f16 request as bf16
without a word. One stream in latency mode runs one request at a time on ``threads`` threads, so
timings are reproducible, like ONNX Runtime's sequential mode.

An ONNX graph is opened through OpenVINO's converter, as the IR export does (:mod:`nasquant.openvino`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from nasquant.artifacts import IR_SUFFIX, KEY_PRECISION, ONNX_SUFFIX, read_metadata
from nasquant.errors import NasquantError
from nasquant.openvino import convert_onnx, import_openvino, message, read_ir
from nasquant.runtime.base import Backend, contract_outputs, float32_outputs, parse_device

#: what ``inference_precision`` may be: OpenVINO's names for the CPU plugin's compute precisions
INFERENCE_PRECISIONS = ("f32", "bf16", "f16")
_PURPOSE = "the OpenVINO backend"


class OpenVINOBackend(Backend):
    """Runs an exported ``.onnx`` or OpenVINO ``.xml`` IR with OpenVINO on the CPU; ``run`` follows
    the :class:`Backend` contract.

    ``device``: ``None``/``"auto"``/``"cpu"``; anything else is refused. ``threads``: inference threads
    (``None``: OpenVINO's default, one per core). ``inference_precision``: ``f32`` (default), or ``bf16``
    / ``f16`` where the CPU computes in them, a separate, labelled choice.
    """

    name = "openvino"

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        device: str | None = None,
        threads: int | None = None,
        inference_precision: str = "f32",
    ) -> None:
        self.path = Path(path)
        self.device = _cpu_device(device)
        if inference_precision not in INFERENCE_PRECISIONS:
            raise NasquantError(
                f"unknown OpenVINO inference precision {inference_precision!r}; "
                f"expected one of {', '.join(INFERENCE_PRECISIONS)}"
            )
        if threads is not None and threads < 1:
            raise NasquantError(f"threads must be at least 1, got {threads}")
        suffix = self.path.suffix.lower()
        if suffix not in (ONNX_SUFFIX, IR_SUFFIX):
            raise NasquantError(
                f"{self.path}: OpenVINO runs {ONNX_SUFFIX} graphs and {IR_SUFFIX} IR, "
                f"not {suffix or 'a file without a suffix'}"
            )
        if not self.path.is_file():
            raise NasquantError(f"OpenVINO model not found: {self.path}")
        ov = import_openvino(_PURPOSE)
        model, self.metadata = self._load()
        self.precision: str = self.metadata.get(KEY_PRECISION) or _graph_precision(model)

        shape = model.inputs[0].get_partial_shape()
        if shape.rank.is_dynamic or shape.rank.get_length() != 4:
            raise NasquantError(f"{self.path}: expected a (N, 3, H, W) image input, found shape {shape}")
        dims = [d.get_length() if d.is_static else None for d in shape]
        self.batch_size, self.input_size = dims[0], dims[2]
        self.input_shape = tuple(dims[1:])
        self._output_names, self.end_to_end = contract_outputs(
            [output.get_any_name() for output in model.outputs], self.path
        )

        hint = ov.properties.hint
        config: dict[Any, Any] = {
            hint.inference_precision: inference_precision,
            hint.performance_mode: hint.PerformanceMode.LATENCY,
            ov.properties.num_streams: 1,
        }
        if threads is not None:
            config[ov.properties.inference_num_threads] = threads
        try:
            #: OpenVINO's compiled model: its properties say how it runs (freed by :meth:`close`)
            self.compiled_model = ov.Core().compile_model(model, "CPU", config)
        except RuntimeError as exc:
            raise NasquantError(f"OpenVINO cannot compile {self.path}: {message(exc)}") from None
        actual = self.compiled_model.get_property(hint.inference_precision).get_type_name()
        if actual != inference_precision:
            raise NasquantError(
                f"this CPU runs OpenVINO inference precision {inference_precision} as {actual}; "
                f"ask for {actual} or f32"
            )
        #: what OpenVINO computes in (``f32``, ``bf16``, ``f16``), read back from the compiled model
        self.inference_precision = actual
        self._outputs = [self.compiled_model.output(name) for name in self._output_names]
        self._request = self.compiled_model.create_infer_request()

    def _load(self) -> tuple[Any, dict[str, str]]:
        """The OpenVINO model and the file's metadata (an ONNX graph's ``metadata_props``, an IR's
        ``rt_info`` entry written by the IR export)."""
        if self.path.suffix.lower() == IR_SUFFIX:
            model = read_ir(self.path, _PURPOSE)
            return model, read_metadata(self.path)
        # Read first: a file that is not ONNX fails here in one line, before the converter tries every
        # frontend it has on it (and logs each failure).
        metadata = read_metadata(self.path)
        return convert_onnx(self.path, _PURPOSE), metadata

    def run(self, images: np.ndarray) -> tuple[np.ndarray, ...]:
        images, count = self.checked_batch(images)
        # share_inputs: OpenVINO reads the batch in place (it stays alive through this synchronous call);
        # the outputs are copies, so the next run does not overwrite what this one returned.
        results = self._request.infer({0: images}, share_inputs=True)
        return float32_outputs([results[output] for output in self._outputs], count)

    def describe(self) -> str:
        """``openvino int8 on cpu``; a compute precision other than f32 is named, so a bf16 row is never
        read as an f32 one: ``openvino fp32 on cpu (bf16 compute)``."""
        described = super().describe()
        return (
            described
            if self.inference_precision == "f32"
            else f"{described} ({self.inference_precision} compute)"
        )

    def _release(self) -> None:
        # OpenVINO frees a compiled model and its request with their last references.
        del self._request, self._outputs, self.compiled_model


def _cpu_device(device: str | None) -> str:
    kind, _ = parse_device(device) or ("cpu", None)
    if kind != "cpu":
        raise NasquantError(
            f"the OpenVINO backend runs on the CPU only, not {device!r}; use cpu "
            "(ONNX Runtime or TensorRT for CUDA)"
        )
    return "cpu"


def _graph_precision(model: Any) -> str:
    # OpenVINO reads ONNX Q/DQ pairs (and keeps them in an IR) as FakeQuantize operations.
    return "int8" if any(op.get_type_name() == "FakeQuantize" for op in model.get_ops()) else "fp32"

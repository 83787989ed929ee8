from __future__ import annotations

import gc

import numpy as np
import pytest
import torch

from nasquant.bench import BenchmarkResult, LatencyStats, benchmark, benchmark_end_to_end, benchmark_model
from nasquant.data.preprocess import Preprocess
from nasquant.errors import NasquantError
from nasquant.eval.postprocess import NMSSettings
from nasquant.models import yolo_nas
from nasquant.report import ReportRow
from nasquant.runtime import Backend, TorchBackend

IMGSZ = 64


class CountingBackend(Backend):
    """Delegates to a real backend and records the shape of every batch it is given, and whether Python's
    garbage collector was on during the call."""

    def __init__(self, inner: Backend) -> None:
        self.inner = inner
        self.name, self.precision, self.device = inner.name, inner.precision, inner.device
        self.shapes: list[tuple[int, ...]] = []
        self.collector_on: list[bool] = []

    def run(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        self.shapes.append(images.shape)
        self.collector_on.append(gc.isenabled())
        return self.inner.run(images)

    def _release(self) -> None:
        self.inner.close()


@pytest.fixture(scope="module")
def backend() -> TorchBackend:
    torch.manual_seed(0)
    return TorchBackend(yolo_nas("yolo_nas_s", num_classes=6).eval().fuse(), device="cpu")


@pytest.fixture
def images() -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.integers(0, 256, size, dtype=np.uint8) for size in ((48, 80, 3), (100, 60, 3))]


def _assert_consistent(stats: LatencyStats, *, batch: int, warmup: int, iterations: int) -> None:
    assert (stats.batch, stats.warmup, stats.iterations) == (batch, warmup, iterations)
    assert 0 < stats.min_ms <= stats.p50_ms <= stats.p90_ms <= stats.p99_ms
    assert stats.min_ms <= stats.mean_ms
    assert stats.images_per_s == pytest.approx(batch * 1000 / stats.p50_ms, rel=1e-12)


def test_summary_statistics_are_numpy_linear_percentiles() -> None:
    stats = LatencyStats.from_durations(
        [5_000_000, 1_000_000, 4_000_000, 2_000_000, 3_000_000], batch=4, warmup=2
    )
    assert stats == LatencyStats(
        batch=4,
        iterations=5,
        warmup=2,
        p50_ms=3.0,
        p90_ms=pytest.approx(4.6),
        p99_ms=pytest.approx(4.96),
        mean_ms=3.0,
        min_ms=1.0,
        images_per_s=pytest.approx(4000 / 3),
    )


def test_model_only_benchmark_of_a_real_backend(backend: TorchBackend) -> None:
    counting = CountingBackend(backend)
    stats = benchmark_model(counting, imgsz=IMGSZ, batch=2, warmup=2, iterations=5, progress=False)
    _assert_consistent(stats, batch=2, warmup=2, iterations=5)
    assert counting.shapes == [(2, 3, IMGSZ, IMGSZ)] * 7
    # no collection can land inside a timed call; the warm-up runs as usual and the collector is back on
    assert counting.collector_on == [True] * 2 + [False] * 5 and gc.isenabled()


def test_end_to_end_benchmark_preprocesses_one_image_per_call(
    backend: TorchBackend, images: list[np.ndarray]
) -> None:
    counting = CountingBackend(backend)
    spec = Preprocess.from_protocol("sg", IMGSZ)
    stats = benchmark_end_to_end(
        counting, images, spec, nms=NMSSettings(), warmup=1, iterations=4, progress=False
    )
    _assert_consistent(stats, batch=1, warmup=1, iterations=4)
    assert counting.shapes == [(1, 3, IMGSZ, IMGSZ)] * 5


def test_benchmark_result_feeds_a_report_row(backend: TorchBackend, images: list[np.ndarray]) -> None:
    result = benchmark(backend, imgsz=IMGSZ, warmup=1, iterations=3, images=images, progress=False)
    assert isinstance(result, BenchmarkResult) and result.end_to_end is not None
    assert (result.imgsz, result.device) == (IMGSZ, "cpu")
    fields = result.row_fields()
    row = ReportRow(name="torch FP32", backend=backend.name, precision=backend.precision, **fields)
    assert (row.p50_ms, row.p90_ms, row.images_per_s) == (
        result.model.p50_ms,
        result.model.p90_ms,
        result.model.images_per_s,
    )
    assert row.extra["p99_ms"] == result.model.p99_ms
    assert row.extra["e2e_p50_ms"] == result.end_to_end.p50_ms
    assert (row.extra["bench_imgsz"], row.extra["bench_batch"], row.extra["bench_iterations"]) == (
        IMGSZ,
        1,
        3,
    )
    assert result.to_dict()["model"]["p50_ms"] == result.model.p50_ms
    assert benchmark(backend, imgsz=IMGSZ, warmup=0, iterations=1, progress=False).end_to_end is None


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"iterations": 0}, "iterations must be at least 1"),
        ({"warmup": -1}, "warm-up iterations must be 0 or more"),
        ({"batch": 0}, "batch size must be at least 1"),
        ({"imgsz": 0}, "image size must be a positive"),
    ],
)
def test_bad_model_benchmark_settings_are_clear_errors(
    backend: TorchBackend, kwargs: dict, message: str
) -> None:
    with pytest.raises(NasquantError, match=message):
        benchmark_model(backend, **{"imgsz": IMGSZ, **kwargs}, progress=False)


def test_bad_end_to_end_inputs_are_clear_errors(backend: TorchBackend, images: list[np.ndarray]) -> None:
    spec = Preprocess.from_protocol("sg", IMGSZ)
    with pytest.raises(NasquantError, match="at least one image"):
        benchmark_end_to_end(backend, [], spec, nms=NMSSettings(), progress=False)
    with pytest.raises(NasquantError, match="produces 96px inputs but the benchmark size is 64px"):
        benchmark(
            backend,
            imgsz=IMGSZ,
            warmup=0,
            iterations=1,
            images=images,
            spec=Preprocess.from_protocol("sg", 96),
            progress=False,
        )

"""Latency of any :class:`~nasquant.runtime.base.Backend`: model-only and end-to-end.

Model-only timing asks the backend to time itself (``Backend.timed_run``): the host clock around
``run`` for torch and ONNX Runtime, whose ``run`` returns numpy arrays (so the copy back synchronises
CUDA and the clock is honest), and CUDA events around copy-in, execution and copy-out for TensorRT.
End-to-end timing (pre + model + post) is host work and uses the host clock.
"""

from __future__ import annotations

import gc
import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from time import perf_counter_ns
from typing import Any

import numpy as np
from tqdm import tqdm

from nasquant.bench.contention import CONTENDED_SHARE, other_cpu_share
from nasquant.data.preprocess import Preprocess, preprocess
from nasquant.errors import NasquantError
from nasquant.eval.postprocess import detect
from nasquant.runtime.base import Backend
from nasquant.settings import PREDICT_NMS, NMSSettings


@dataclass(frozen=True)
class LatencyStats:
    """Per-call latency over ``iterations`` timed calls of ``batch`` images, after ``warmup`` calls.

    Percentiles are numpy's default ``method="linear"`` (interpolated between the two nearest
    samples); ``images_per_s`` is the median throughput, ``batch * 1000 / p50_ms``.
    """

    batch: int
    iterations: int
    warmup: int
    p50_ms: float
    p90_ms: float
    p99_ms: float
    mean_ms: float
    min_ms: float
    images_per_s: float

    @classmethod
    def from_durations(cls, durations_ns: Sequence[int], *, batch: int, warmup: int) -> LatencyStats:
        """Summarise the wall-clock durations (nanoseconds) of individual calls."""
        if len(durations_ns) == 0:
            raise ValueError("no timed iterations to summarise")
        ms = np.asarray(durations_ns, dtype=np.float64) / 1e6
        p50, p90, p99 = np.percentile(ms, [50, 90, 99], method="linear")
        return cls(
            batch=batch,
            iterations=len(ms),
            warmup=warmup,
            p50_ms=float(p50),
            p90_ms=float(p90),
            p99_ms=float(p99),
            mean_ms=float(ms.mean()),
            min_ms=float(ms.min()),
            images_per_s=batch * 1000.0 / float(p50),
        )


@dataclass(frozen=True)
class BenchmarkResult:
    """The timings of one artifact: model-only (the report's latency columns) and optionally end-to-end."""

    imgsz: int
    device: str
    model: LatencyStats
    end_to_end: LatencyStats | None = None
    other_cpu_share: float | None = None
    """Other processes' share of this process's CPUs while the model-only block ran (None: unknown)."""
    attempts: int = 1
    """Model-only blocks timed: a contended one is timed again (bounded) and the quietest kept."""

    def row_fields(self) -> dict[str, Any]:
        """Keyword arguments for :class:`nasquant.report.ReportRow`: ``p50_ms``, ``p90_ms``,
        ``images_per_s`` from the model-only run, everything else under ``extra``."""
        extra: dict[str, Any] = {
            "p99_ms": self.model.p99_ms,
            "mean_ms": self.model.mean_ms,
            "min_ms": self.model.min_ms,
            "bench_imgsz": self.imgsz,
            "bench_batch": self.model.batch,
            "bench_iterations": self.model.iterations,
            "bench_warmup": self.model.warmup,
            "device": self.device,
            "other_cpu_share": self.other_cpu_share,
            "contended": self.other_cpu_share is not None and self.other_cpu_share > CONTENDED_SHARE,
            "bench_attempts": self.attempts,
        }
        if self.end_to_end is not None:
            extra.update(
                e2e_p50_ms=self.end_to_end.p50_ms,
                e2e_p90_ms=self.end_to_end.p90_ms,
                e2e_images_per_s=self.end_to_end.images_per_s,
            )
        return {
            "p50_ms": self.model.p50_ms,
            "p90_ms": self.model.p90_ms,
            "images_per_s": self.model.images_per_s,
            "extra": extra,
        }

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _check_counts(warmup: int, iterations: int) -> None:
    if warmup < 0:
        raise NasquantError(f"warm-up iterations must be 0 or more, got {warmup}")
    if iterations < 1:
        raise NasquantError(f"benchmark iterations must be at least 1, got {iterations}")


@contextmanager
def _quiet_gc() -> Iterator[None]:
    # As timeit does: a garbage collection landing inside one timed call would show up as a
    # latency outlier that belongs to Python, not to the backend. No collection beforehand (timeit
    # has none either): with the collector off none can land inside, and a full one costs 0.3-0.4 s
    # in a process that has imported torch, ModelOpt and ONNX Runtime, at every timed row.
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def _time_calls(
    timed_call: Callable[[int], int], *, warmup: int, iterations: int, desc: str, progress: bool
) -> list[int]:
    """Run ``timed_call(i)`` (which returns its own duration in ns) ``warmup`` times, then return the
    durations of ``iterations`` calls."""
    for index in range(warmup):
        timed_call(index)
    with _quiet_gc(), tqdm(range(iterations), desc=desc, unit="it", disable=not progress) as bar:
        # As a context manager the bar is closed when an error or a signal ends the loop, so the error
        # line starts on a line of its own instead of after a half-drawn bar.
        return [timed_call(warmup + index) for index in bar]


def _host_timed(call: Callable[[int], object]) -> Callable[[int], int]:
    """``call`` timed with the host clock."""

    def timed(index: int) -> int:
        start = perf_counter_ns()
        call(index)
        return perf_counter_ns() - start

    return timed


def benchmark_model(
    backend: Backend,
    *,
    imgsz: int,
    batch: int = 1,
    warmup: int = 10,
    iterations: int = 50,
    progress: bool = True,
) -> LatencyStats:
    """Latency of ``backend.run`` alone, on one fixed random ``(batch, 3, imgsz, imgsz)`` input."""
    if imgsz < 1:
        raise NasquantError(f"image size must be a positive number of pixels, got {imgsz}")
    if batch < 1:
        raise NasquantError(f"batch size must be at least 1, got {batch}")
    _check_counts(warmup, iterations)
    _check_input_fits(batch, imgsz)
    # A fixed seed, so every artifact of a run is timed on the very same input.
    images = np.random.default_rng(0).random((batch, 3, imgsz, imgsz), dtype=np.float32)
    # The backend times itself: the host clock around run(), or CUDA events on a GPU backend.
    durations = _time_calls(
        lambda _: backend.timed_run(images),
        warmup=warmup,
        iterations=iterations,
        desc=f"bench {backend.describe()}",
        progress=progress,
    )
    return LatencyStats.from_durations(durations, batch=batch, warmup=warmup)


def _check_input_fits(batch: int, imgsz: int) -> None:
    """Refuse a batch whose float32 input alone would take half of this machine's memory: allocating it
    fails (or wakes the OOM killer) after minutes of set-up, and the network needs many times more."""
    needed = batch * 3 * imgsz * imgsz * 4
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):  # no sysconf (Windows): allocation errors still say it
        return
    if needed > total // 2:
        raise NasquantError(
            f"a batch of {batch} at {imgsz}px is {needed / 2**30:.1f} GiB of input alone; this machine has "
            f"{total / 2**30:.1f} GiB: use a smaller batch"
        )


def benchmark_end_to_end(
    backend: Backend,
    images: Sequence[np.ndarray],
    spec: Preprocess,
    *,
    nms: NMSSettings,
    warmup: int = 10,
    iterations: int = 50,
    progress: bool = True,
) -> LatencyStats:
    """Latency of preprocess + ``run`` + post-process for one already decoded RGB image per call.

    Calls cycle through ``images``; file reading and decoding are left out, since they depend on the
    storage and the codec rather than on the artifact.
    """
    if len(images) == 0:
        raise NasquantError("end-to-end benchmark needs at least one image")
    _check_counts(warmup, iterations)

    def call(index: int) -> None:
        tensor, _ = preprocess(images[index % len(images)], spec)
        detect(backend, tensor[None], nms)

    durations = _time_calls(
        _host_timed(call),
        warmup=warmup,
        iterations=iterations,
        desc=f"bench e2e {backend.describe()}",
        progress=progress,
    )
    return LatencyStats.from_durations(durations, batch=1, warmup=warmup)


def benchmark(
    backend: Backend,
    *,
    imgsz: int,
    batch: int = 1,
    warmup: int = 10,
    iterations: int = 50,
    images: Sequence[np.ndarray] | None = None,
    spec: Preprocess | None = None,
    nms: NMSSettings = PREDICT_NMS,
    progress: bool = True,
    retries: int = 2,
) -> BenchmarkResult:
    """Model-only timings, plus end-to-end timings when ``images`` are given.

    The model-only block records other processes' share of the CPUs while it ran; a contended block
    (above :data:`CONTENDED_SHARE`) is timed again up to ``retries`` times and the quietest is kept,
    still marked contended when none was quiet. End-to-end uses ``spec`` (default: the ``sg`` protocol
    at ``imgsz``) and the interactive post-processing thresholds, what a deployed detector runs.
    """
    attempts: list[tuple[float | None, LatencyStats]] = []
    while True:
        with other_cpu_share() as share:
            model = benchmark_model(
                backend, imgsz=imgsz, batch=batch, warmup=warmup, iterations=iterations, progress=progress
            )
        attempts.append((share.others, model))
        if not share.contended or len(attempts) > retries:
            break
    quietest = min(attempts, key=lambda attempt: -1.0 if attempt[0] is None else attempt[0])
    end_to_end = None
    if images is not None:
        spec = spec or Preprocess.from_protocol("sg", imgsz)
        if spec.imgsz != imgsz:
            raise NasquantError(
                f"preprocessing produces {spec.imgsz}px inputs but the benchmark size is {imgsz}px"
            )
        end_to_end = benchmark_end_to_end(
            backend, images, spec, nms=nms, warmup=warmup, iterations=iterations, progress=progress
        )
    return BenchmarkResult(
        imgsz=imgsz,
        device=backend.device,
        model=quietest[1],
        end_to_end=end_to_end,
        other_cpu_share=quietest[0],
        attempts=len(attempts),
    )


@dataclass(frozen=True)
class PairedRatio:
    """``reference`` time / ``candidate`` time, both timed in every round back to back (which goes first
    alternates), so a slow spell of the machine slows both: the median and quartiles of the per-round
    ratios, and other processes' CPU share over the rounds."""

    median: float
    q1: float
    q3: float
    rounds: int
    other_cpu_share: float | None

    def extra_fields(self) -> dict[str, Any]:
        """The report row's ``extra`` entries for this measurement."""
        return {
            "speedup_paired": self.median,
            "speedup_paired_q1": self.q1,
            "speedup_paired_q3": self.q3,
            "speedup_paired_rounds": self.rounds,
            "speedup_paired_other_cpu_share": self.other_cpu_share,
        }


#: Timed calls per model per round, after one untimed call. Alternating single calls is biased: the
#: other session's threads are still spinning and the caches hold the other model (measured on the
#: shapes graphs at 640: 2.20x with quartiles 1.51-3.08, against 2.63x, 2.47-2.71, in blocks of 1 + 2,
#: and 2.72x from two separate runs of 30 calls).
CALLS_PER_ROUND = 2


def paired_speedup(
    reference: Backend,
    candidate: Backend,
    *,
    imgsz: int,
    batch: int = 1,
    warmup: int = 5,
    rounds: int = 16,
    progress: bool = True,
) -> PairedRatio:
    """How much faster ``candidate`` runs than ``reference`` (an INT8 graph vs its FP32 graph), timed in
    rounds on the same fixed input: in each, both models run one untimed call and
    :data:`CALLS_PER_ROUND` timed ones, one model after the other, and the round's ratio is of their
    means. The speedup a report can state on a shared machine."""
    _check_counts(warmup, rounds)
    _check_input_fits(batch, imgsz)
    images = np.random.default_rng(0).random((batch, 3, imgsz, imgsz), dtype=np.float32)
    for _ in range(warmup):
        reference.timed_run(images)
        candidate.timed_run(images)

    def block(backend: Backend) -> float:
        backend.timed_run(images)  # settles: the other model's threads and cache lines go
        return float(np.mean([backend.timed_run(images) for _ in range(CALLS_PER_ROUND)]))

    ratios = []
    steps = tqdm(range(rounds), desc=f"paired {candidate.describe()}", unit="round", disable=not progress)
    with _quiet_gc(), other_cpu_share() as share, steps:
        for index in steps:
            if index % 2:
                reference_ns = block(reference)
                candidate_ns = block(candidate)
            else:
                candidate_ns = block(candidate)
                reference_ns = block(reference)
            ratios.append(reference_ns / max(candidate_ns, 1.0))
    q1, median, q3 = np.percentile(ratios, [25, 50, 75], method="linear")
    return PairedRatio(float(median), float(q1), float(q3), rounds, share.others)

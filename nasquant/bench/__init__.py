"""Latency of any backend (model-only and end-to-end) and the host it was measured on."""

from nasquant.bench.host import host_info, package_version, set_threads
from nasquant.bench.latency import (
    BenchmarkResult,
    LatencyStats,
    benchmark,
    benchmark_end_to_end,
    benchmark_model,
)

__all__ = [
    "BenchmarkResult",
    "LatencyStats",
    "benchmark",
    "benchmark_end_to_end",
    "benchmark_model",
    "host_info",
    "package_version",
    "set_threads",
]

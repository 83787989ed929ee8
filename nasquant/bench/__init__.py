"""Latency of any backend (model-only and end-to-end) and the host it was measured on."""

from nasquant.bench.contention import CONTENDED_SHARE, CpuShare, other_cpu_share
from nasquant.bench.host import host_info, package_version, set_threads
from nasquant.bench.latency import (
    BenchmarkResult,
    LatencyStats,
    PairedRatio,
    benchmark,
    benchmark_end_to_end,
    benchmark_model,
    paired_speedup,
)

__all__ = [
    "CONTENDED_SHARE",
    "BenchmarkResult",
    "CpuShare",
    "LatencyStats",
    "PairedRatio",
    "other_cpu_share",
    "paired_speedup",
    "benchmark",
    "benchmark_end_to_end",
    "benchmark_model",
    "host_info",
    "package_version",
    "set_threads",
]

"""Other processes' CPU share over a timing block, and the speedup timed in paired rounds."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import numpy as np
import pytest

from nasquant.bench import other_cpu_share, paired_speedup
from nasquant.bench.latency import CALLS_PER_ROUND
from nasquant.runtime.base import Backend

needs_proc = pytest.mark.skipif(not os.path.exists("/proc/stat"), reason="needs Linux /proc")


@needs_proc
def test_busy_processes_on_our_cpus_show_as_contention() -> None:
    with other_cpu_share() as quiet:
        time.sleep(0.5)
    cpus = len(os.sched_getaffinity(0))
    spinners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(cpus)]
    try:
        time.sleep(0.3)  # let them start
        with other_cpu_share() as busy:
            time.sleep(1.0)
    finally:
        for spinner in spinners:
            spinner.kill()
            spinner.wait()
    assert busy.others is not None and busy.contended
    # measured against the same block with only this machine's usual load, where that leaves room for
    # the rise (beside another heavy job the CPUs are full before the spinners start)
    quiet_share = quiet.others or 0.0
    assert quiet_share > 0.5 or busy.others > quiet_share + 0.3


class _Clocked(Backend):
    """Durations from a shared machine clock: every call takes ``cost`` times the machine's current
    slowness, which changes from round to round as on a shared machine."""

    name, precision, device = "fake", "fp32", "cpu"

    def __init__(self, cost: float, slowness: list[float]) -> None:
        self.cost, self.slowness, self.calls = cost, slowness, 0

    def run(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        raise NotImplementedError

    def timed_run(self, images: np.ndarray) -> int:
        self.calls += 1
        return int(self.cost * self.slowness[(self.calls - 1) % len(self.slowness)])

    def _release(self) -> None:
        pass


def test_paired_rounds_cancel_a_slow_spell_that_separate_runs_would_report() -> None:
    # the machine's slowness, call by call: both models see the same spell in a round
    spells = [1.0, 1.0, 1.0, 4.0, 4.0, 4.0, 1.0, 1.0, 1.0, 3.0, 2.0, 3.0]
    reference, candidate = _Clocked(10e6, spells), _Clocked(4e6, spells)
    ratio = paired_speedup(reference, candidate, imgsz=32, warmup=0, rounds=4, progress=False)
    assert ratio.rounds == 4 and reference.calls == candidate.calls == 4 * (CALLS_PER_ROUND + 1)
    assert ratio.median == ratio.q1 == ratio.q3 == pytest.approx(2.5)

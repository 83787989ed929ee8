"""How much of this process's CPUs other processes used while a timing block ran.

A latency measured while another job runs is that job's latency too (measured here: the same S INT8
graph timed 254 ms inside a pipeline run while another job ran, 66 ms alone). Every timing block
records the share, so a report can repeat or mark what was timed on a busy machine.

The share is read from Linux's ``/proc/stat`` (busy ticks of the CPUs this process may run on) minus
this process's own ticks (``/proc/self/stat``, children included), over the block's elapsed ticks.
Elsewhere it is unknown (None).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

#: Other processes' share of our CPUs above which a timing is called contended (a tenth of the
#: machine: on 2 cores, one busy thread elsewhere is 0.5).
CONTENDED_SHARE = 0.10

_PROC_STAT = Path("/proc/stat")
_PROC_SELF_STAT = Path("/proc/self/stat")
# /proc/stat columns after the cpu name: user nice system idle iowait irq softirq steal guest guest_nice.
# guest time is already counted in user/nice, so the sum of the first eight is the total.
_IDLE_COLUMNS = (3, 4)


@dataclass
class CpuShare:
    """Filled when the block ends: ``others`` is a fraction of the usable CPUs' capacity (0..1)."""

    others: float | None = None

    @property
    def contended(self) -> bool:
        return self.others is not None and self.others > CONTENDED_SHARE


def _cpu_ticks(cpus: set[int]) -> tuple[int, int] | None:
    """(busy, total) ticks summed over ``cpus``."""
    try:
        lines = _PROC_STAT.read_text().splitlines()
    except OSError:
        return None
    busy = total = 0
    for line in lines:
        name, *columns = line.split()
        if not name.startswith("cpu") or name == "cpu" or int(name[3:]) not in cpus:
            continue
        ticks = [int(value) for value in columns[:8]]
        total += sum(ticks)
        busy += sum(ticks) - sum(ticks[i] for i in _IDLE_COLUMNS)
    return (busy, total) if total else None


def _own_ticks() -> int | None:
    try:
        text = _PROC_SELF_STAT.read_text()
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parentheses: count fields after its closing ')'.
    fields = text[text.rindex(")") + 2 :].split()
    return sum(int(value) for value in fields[11:15])  # utime stime cutime cstime


def _usable_cpus() -> set[int]:
    try:
        return set(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return set(range(os.cpu_count() or 1))


@contextmanager
def other_cpu_share() -> Iterator[CpuShare]:
    """Measure other processes' share of this process's CPUs over the ``with`` block."""
    share = CpuShare()
    cpus = _usable_cpus()
    start, own_start = _cpu_ticks(cpus), _own_ticks()
    yield share
    end, own_end = _cpu_ticks(cpus), _own_ticks()
    if None in (start, end, own_start, own_end) or end[1] <= start[1]:
        return
    others = (end[0] - start[0]) - (own_end - own_start)
    share.others = round(min(max(others / (end[1] - start[1]), 0.0), 1.0), 3)

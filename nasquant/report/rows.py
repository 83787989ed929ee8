"""One report row per artifact, the derived columns (ΔmAP, speedup), and the CI accuracy gate."""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from nasquant.artifacts import IR_SUFFIX, IR_WEIGHTS_SUFFIX
from nasquant.checks import is_finite_number, quoted
from nasquant.errors import NasquantError

SKIPPED_PREFIX = "skipped: "

_NUMERIC_FIELDS = (
    "map50_95",
    "map50",
    "delta_map50_95",
    "p50_ms",
    "p90_ms",
    "images_per_s",
    "speedup",
    "size_mb",
)

#: ``extra`` keys written by :func:`finalize_rows`, dropped and recomputed on every call
_DERIVED_EXTRA = ("delta_reference", "speedup_reference", "speedup_method", "speedup_note")

# Differences below this many mAP points are float noise from subtracting two fractions
# (0.47 - 0.475 is -0.0050000000000000044), not a real drop past the threshold.
_POINTS_TOLERANCE = 1e-9


@dataclass
class ReportRow:
    """One artifact's accuracy, latency and size; mAP as fractions (0.475), latency in milliseconds.

    ``status`` is ``"ok"`` or ``"skipped: <reason>"``; a skipped row carries no measurements.
    ``delta_map50_95`` and ``speedup`` are derived by :func:`finalize_rows`.
    """

    name: str
    backend: str
    precision: str
    flavor: str | None = None
    skipped_layers: list[str] = field(default_factory=list)
    map50_95: float | None = None
    map50: float | None = None
    delta_map50_95: float | None = None
    p50_ms: float | None = None
    p90_ms: float | None = None
    images_per_s: float | None = None
    speedup: float | None = None
    size_mb: float | None = None
    status: str = "ok"
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.status != "ok" and not (
            self.status.startswith(SKIPPED_PREFIX) and self.status[len(SKIPPED_PREFIX) :].strip()
        ):
            raise ValueError(
                f"row {self.name!r}: status must be 'ok' or 'skipped: <reason>', got {self.status!r}"
            )
        for name in _NUMERIC_FIELDS:
            value = getattr(self, name)
            if value is None:
                continue
            if self.skipped:
                raise ValueError(f"row {self.name!r} is {self.status!r} but has a measured {name}")
            # NaN or infinity would be written as invalid JSON and poison every derived column.
            if not math.isfinite(value):
                raise ValueError(f"row {self.name!r}: {name} must be a finite number, got {value}")

    @classmethod
    def skipped_row(
        cls, name: str, backend: str, precision: str, reason: str, *, flavor: str | None = None
    ) -> ReportRow:
        """A row for an artifact that could not be built or run here, e.g. ``tensorrt not installed``."""
        return cls(
            name=name, backend=backend, precision=precision, flavor=flavor, status=SKIPPED_PREFIX + reason
        )

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    @property
    def skipped(self) -> bool:
        return self.status.startswith(SKIPPED_PREFIX)

    @property
    def skip_reason(self) -> str | None:
        return self.status[len(SKIPPED_PREFIX) :] if self.skipped else None

    def to_dict(self) -> dict[str, Any]:
        # asdict keeps the field order, which is the report.json contract's key order, and deep-copies
        # the list and dict, so a serialised report never aliases the live row.
        return asdict(self)


def _reference_map_row(rows: list[ReportRow]) -> ReportRow | None:
    """The FP32 row accuracy is compared with: torch FP32 when present, else the first FP32 row."""
    candidates = [row for row in rows if row.ok and row.precision == "fp32" and row.map50_95 is not None]
    torch_rows = [row for row in candidates if row.backend == "torch"]
    return (torch_rows or candidates or [None])[0]


def _same_backend_fp32(rows: list[ReportRow], backend: str) -> ReportRow | None:
    for row in rows:
        if row.ok and row.backend == backend and row.precision == "fp32" and row.p50_ms:
            return row
    return None


def finalize_rows(rows: list[ReportRow]) -> list[ReportRow]:
    """New rows with ``delta_map50_95`` and ``speedup`` filled in; the inputs are not modified.

    ``delta_map50_95`` = mAP50-95 minus the reference FP32 row's (torch FP32 when present, else the
    first ok FP32 row). ``speedup`` compares with the FP32 row *on the same backend* (an ONNX Runtime
    INT8 model with ONNX Runtime FP32, never with torch): ``extra["speedup_paired"]`` (the median of
    interleaved rounds) where measured, else that row's p50 divided by this row's p50.
    When a backend has no FP32 row (e.g. TensorRT built only in FP16/INT8) ``speedup`` stays null
    and ``extra["speedup_note"]`` says why. Running it twice gives the same rows.
    """
    reference = _reference_map_row(rows)
    finalized = []
    for row in rows:
        extra = {key: value for key, value in row.extra.items() if key not in _DERIVED_EXTRA}
        delta = speedup = None
        if row.ok and reference is not None and row.map50_95 is not None:
            delta = row.map50_95 - reference.map50_95
            extra["delta_reference"] = reference.name
        if row.ok and row.p50_ms:
            base = _same_backend_fp32(rows, row.backend)
            if base is None:
                extra["speedup_note"] = f"no fp32 {row.backend} row to compare with"
            else:
                # Timed back to back with the FP32 graph when the pipeline could (paired rounds);
                # else the ratio of two p50s measured apart.
                paired = row.extra.get("speedup_paired") if row is not base else None
                speedup = paired if paired else base.p50_ms / row.p50_ms
                extra["speedup_reference"] = base.name
                extra["speedup_method"] = "paired" if paired else "p50"
        finalized.append(
            replace(
                row,
                skipped_layers=list(row.skipped_layers),
                delta_map50_95=delta,
                speedup=speedup,
                extra=extra,
            )
        )
    return finalized


def check_drop(report: dict[str, Any], max_drop_points: float) -> list[str]:
    """CI gate: a message for every INT8 row that fails it; an empty list when the gate passes.

    The gate fails closed. An INT8 row fails when its mAP50-95 fell more than ``max_drop_points``
    (mAP *points*: 0.5 means 0.005 as a fraction; a drop exactly at the threshold passes), when its
    mAP or its drop is missing, NaN or not a number, or when it is marked anything but ``ok`` or
    ``skipped: <reason>`` (a row marked failed). A report with no measured INT8 row fails too: a gate
    that checked nothing must not pass. Skipped INT8 rows (no TensorRT here, no GPU) are not failures.
    """
    if not is_finite_number(max_drop_points) or max_drop_points < 0:
        raise NasquantError(f"maximum mAP drop must be a number of points >= 0, got {max_drop_points!r}")
    failures = []
    checked = 0
    for row in report.get("rows", []):
        if row.get("precision") != "int8":
            continue
        name, status = row.get("name"), row.get("status")
        if isinstance(status, str) and status.startswith(SKIPPED_PREFIX):
            continue
        checked += 1
        if status != "ok":
            failures.append(f"{name}: the row is marked {status!r}, not measured")
            continue
        value, delta = row.get("map50_95"), row.get("delta_map50_95")
        if not is_finite_number(value):
            failures.append(f"{name}: mAP50-95 is {quoted(value)}, not a measured number")
        elif delta is None:
            failures.append(f"{name}: no FP32 reference row to measure its mAP drop against")
        elif not is_finite_number(delta):
            failures.append(f"{name}: its mAP drop vs FP32 is {quoted(delta)}, not a number")
        elif -delta * 100 > max_drop_points + _POINTS_TOLERANCE:
            failures.append(
                f"{name}: mAP50-95 dropped {-delta * 100:.2f} points vs FP32 (allowed {max_drop_points:g})"
            )
    if checked == 0:
        failures.append("no INT8 row with a measured mAP50-95 in the report: nothing to check")
    return failures


def artifact_size_mb(path: str | os.PathLike) -> float:
    """Size on disk in MB (10^6 bytes) of a file (an OpenVINO IR's ``.xml`` with its ``.bin``), or of
    every file under a folder (an ONNX model with external weights, a ModelOpt checkpoint directory)."""
    path = Path(path)
    if path.is_file() and path.suffix.lower() == IR_SUFFIX:
        weights = path.with_suffix(IR_WEIGHTS_SUFFIX)
        return (path.stat().st_size + (weights.stat().st_size if weights.is_file() else 0)) / 1e6
    if path.is_file():
        return path.stat().st_size / 1e6
    if path.is_dir():
        return sum(item.stat().st_size for item in path.rglob("*") if item.is_file()) / 1e6
    raise NasquantError(f"artifact not found: {path}")

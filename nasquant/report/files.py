"""A run's report on disk: ``report.json`` (the contract), ``report.md`` and ``accuracy_latency.png``."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from nasquant.artifacts import REPORT_JSON, REPORT_MD, REPORT_PNG
from nasquant.errors import NasquantError
from nasquant.io import atomic_path, write_json
from nasquant.report.markdown import render_comparison, render_markdown
from nasquant.report.plot import plot_accuracy_latency
from nasquant.report.rows import ReportRow, finalize_rows


def write_report(
    run_dir: str | os.PathLike,
    *,
    recipe: dict[str, Any],
    host: dict[str, Any],
    rows: list[ReportRow],
    title: str,
) -> dict[str, Path]:
    """Write the three report files into ``run_dir``, each atomically; returns ``{"md", "json", "png"}``.

    Rows go through :func:`finalize_rows` first (it is idempotent), so ΔmAP and speedup on disk
    always agree with the measurements next to them. ``report.json`` is written last: when it is
    there, the Markdown and the plot of the same run are too.
    """
    run_dir = Path(run_dir)
    payload = {"recipe": recipe, "host": host, "rows": [row.to_dict() for row in finalize_rows(rows)]}
    paths = {"md": run_dir / REPORT_MD, "png": run_dir / REPORT_PNG, "json": run_dir / REPORT_JSON}
    with atomic_path(paths["png"]) as tmp:
        plot_accuracy_latency(payload, tmp, title=title)
    with atomic_path(paths["md"]) as tmp:
        tmp.write_text(render_markdown(payload, title), encoding="utf-8")
    write_json(paths["json"], payload)
    return paths


def load_report(path_or_run_dir: str | os.PathLike) -> dict[str, Any]:
    """Read a ``report.json``, given itself or the run folder holding it."""
    path = Path(path_or_run_dir)
    if path.is_dir():
        path = path / REPORT_JSON
    if not path.is_file():
        raise NasquantError(f"report not found: {path}")
    try:
        report = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise NasquantError(f"{path} is not a valid report.json: {str(exc)[:200]}") from None
    problem = _shape_problem(report)
    if problem is not None:
        raise NasquantError(f"{path} is not a nasquant report: {problem}")
    return report


# The fields every consumer (the Markdown views, the CI gate) reads without checking each time.
_ROW_STRINGS = ("name", "backend", "precision", "status")


def _shape_problem(report: Any) -> str | None:
    """What makes ``report`` unusable as a report dict, or None. Values are not judged here: a NaN
    or a string where an mAP belongs is shown as invalid, and fails the CI gate, not the reading."""
    if not isinstance(report, dict) or not isinstance(report.get("rows"), list):
        return "it has no list of rows"
    for key in ("recipe", "host"):
        if not isinstance(report.get(key, {}), dict):
            return f"its {key!r} is not an object"
    for index, row in enumerate(report["rows"]):
        if not isinstance(row, dict):
            return f"row #{index} is not an object"
        missing = [key for key in _ROW_STRINGS if not isinstance(row.get(key), str)]
        if missing:
            return f"row #{index} has no {missing[0]!r} text"
        if not isinstance(row.get("extra", {}), dict) or not isinstance(row.get("skipped_layers", []), list):
            return f"row #{index} ({row['name']}): 'extra' must be an object and 'skipped_layers' a list"
        if row.get("flavor") is not None and not isinstance(row["flavor"], str):
            return f"row #{index} ({row['name']}): 'flavor' must be text"
    return None


def compare_reports(run_dirs: Sequence[str | os.PathLike]) -> str:
    """Markdown comparing two or more runs row by row (artifacts matched by name)."""
    if len(run_dirs) < 2:
        raise NasquantError(f"comparing reports needs at least two runs, got {len(run_dirs)}")
    return render_comparison([(os.fspath(run_dir), load_report(run_dir)) for run_dir in run_dirs])

"""Markdown views of report dicts (the ``report.json`` payload): one run, or several side by side.

Everything here reads plain dicts rather than :class:`ReportRow`, so a ``report.md`` can be
re-rendered from any ``report.json``, including one written by an older nasquant.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from nasquant.checks import is_finite_number
from nasquant.report.rows import SKIPPED_PREFIX

_NONE = "—"

_TABLE_COLUMNS = (
    "artifact",
    "backend",
    "precision",
    "mAP50-95",
    "mAP50",
    "ΔmAP vs FP32",
    "p50 ms",
    "p90 ms",
    "img/s",
    "speedup",
    "size MB",
    "status",
)


#: shown for a value a report.json holds where a number belongs but that is none (NaN, text, ...)
_INVALID = "invalid"


def _fmt(value: Any, spec: str, suffix: str = "", *, scale: float = 1.0) -> str:
    if value is None:
        return _NONE
    return f"{value * scale:{spec}}{suffix}" if is_finite_number(value) else _INVALID


def percent(fraction: Any) -> str:
    """mAP fraction -> percentage with 2 decimals: ``0.475 -> "47.50"``."""
    return _fmt(fraction, ".2f", scale=100)


def points(delta: Any) -> str:
    """mAP difference (fractions) -> signed points: ``-0.0021 -> "-0.21"``."""
    return _fmt(delta, "+.2f", scale=100)


def _cell(text: Any) -> str:
    # A "|" in an artifact name or a reason would split the cell; a newline would end the table.
    return str(text).replace("|", "\\|").replace("\n", " ")


def _table(header: Sequence[str], body: Sequence[Sequence[Any]]) -> list[str]:
    lines = ["| " + " | ".join(_cell(h) for h in header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in body]
    return lines


def host_summary(host: dict[str, Any]) -> str:
    """One line: host name, OS, CPU (cores), GPUs with driver/CUDA, Python and key package versions."""
    parts = [host.get("hostname"), host.get("os")]
    cpu = host.get("cpu") or {}
    if cpu.get("model"):
        cores = [
            f"{cpu['physical_cores']} cores" if cpu.get("physical_cores") else None,
            f"{cpu['logical_cores']} threads" if cpu.get("logical_cores") else None,
        ]
        counts = " / ".join(c for c in cores if c)
        parts.append(f"{cpu['model']} ({counts})" if counts else cpu["model"])
    gpus = host.get("gpus") or []
    for gpu in gpus:
        details = ", ".join(
            label + " " + str(gpu[key])
            for key, label in (("driver", "driver"), ("cuda", "CUDA"))
            if gpu.get(key)
        )
        parts.append(f"{gpu.get('name')} ({details})" if details else gpu.get("name"))
    if "gpus" in host and not gpus:
        parts.append("no CUDA GPU")
    if host.get("python"):
        parts.append(f"Python {host['python']}")
    versions = host.get("versions") or {}
    for key, label in (
        ("torch", "torch"),
        ("onnxruntime", "onnxruntime"),
        ("openvino", "OpenVINO"),
        ("tensorrt", "TensorRT"),
    ):
        if versions.get(key):
            parts.append(f"{label} {versions[key]}")
    threads = (host.get("threads") or {}).get("torch")
    if threads:
        parts.append(f"{threads} torch threads")
    return " · ".join(str(p) for p in parts if p) or "unknown host"


def hardware_summary(host: dict[str, Any]) -> str:
    """CPU model and GPU names only, short enough for a plot title."""
    names = [(host.get("cpu") or {}).get("model")] + [gpu.get("name") for gpu in host.get("gpus") or []]
    return " + ".join(str(n) for n in names if n) or "unknown hardware"


def _precision(row: dict[str, Any]) -> str:
    return f"{row['precision']} ({row['flavor']})" if row.get("flavor") else row["precision"]


def _status(row: dict[str, Any]) -> str:
    # The reason gets its own line under the table; the column only says the row was skipped.
    return "skipped" if str(row.get("status", "")).startswith(SKIPPED_PREFIX) else row.get("status", "")


def _table_row(row: dict[str, Any]) -> list[str]:
    return [
        row["name"],
        row["backend"],
        _precision(row),
        percent(row.get("map50_95")),
        percent(row.get("map50")),
        points(row.get("delta_map50_95")),
        _fmt(row.get("p50_ms"), ".2f") + (" ‡" if (row.get("extra") or {}).get("contended") else ""),
        _fmt(row.get("p90_ms"), ".2f"),
        _fmt(row.get("images_per_s"), ".1f"),
        _fmt(row.get("speedup"), ".2f", "×"),
        _fmt(row.get("size_mb"), ".1f"),
        _status(row),
    ]


def _legend(rows: list[dict[str, Any]]) -> list[str]:
    extras = [row.get("extra") or {} for row in rows]
    reference = next((e["delta_reference"] for e in extras if e.get("delta_reference")), None)
    lines = [
        "mAP in % (pycocotools); ΔmAP in mAP points"
        + (f" vs **{_cell(reference)}**" if reference else "")
        + "; speedup = time of the same backend's FP32 row / time of the row: the median over rounds"
        " timed back to back (paired) where the run measured it, else the ratio of the two p50s."
    ]
    contended = [e for e in extras if e.get("contended")]
    if contended:
        worst = max(e.get("other_cpu_share") or 0.0 for e in contended)
        lines.append(
            f"‡ timed while other processes used up to {worst:.0%} of this run's CPUs, after "
            f"{max(e.get('bench_attempts') or 1 for e in contended)} attempt(s): that latency is not the quiet"
            " machine's (the paired speedup, timed back to back, is the one to trust)."
        )
    bench = next((e for e in extras if "bench_iterations" in e), None)
    if bench is not None:
        lines.append(
            f"Latency: model-only `run()` on a {bench.get('bench_batch')}×3×{bench.get('bench_imgsz')}²"
            f" input, {bench['bench_iterations']} timed calls after {bench.get('bench_warmup')} warm-up;"
            " percentiles by linear interpolation."
        )
    return lines


def render_markdown(report: dict[str, Any], title: str) -> str:
    """``report.md``: title, host line, the table, kept-in-float layers of INT8 rows, skip reasons."""
    rows = report.get("rows", [])
    lines = [f"# {title}", "", f"Host: {host_summary(report.get('host') or {})}", ""]
    lines += _table(_TABLE_COLUMNS, [_table_row(row) for row in rows])
    lines.append("")
    for line in _legend(rows):
        lines += [line, ""]

    int8_rows = [row for row in rows if row["precision"] == "int8" and row.get("status") == "ok"]
    if int8_rows:
        lines += ["## Layers kept in floating point", ""]
        for row in int8_rows:
            label = f"**{_cell(row['name'])}**" + (f" ({row['flavor']})" if row.get("flavor") else "")
            layers = row.get("skipped_layers") or []
            kept = (
                ", ".join(f"`{layer}`" for layer in layers)
                if layers
                else "none (every quantizable layer is INT8)"
            )
            reason = (row.get("extra") or {}).get("fp_reason")
            lines.append(f"- {label}: {kept}" + (f" ({reason})" if reason else ""))
        lines.append("")

    skipped = [row for row in rows if str(row.get("status", "")).startswith(SKIPPED_PREFIX)]
    if skipped:
        lines += ["## Skipped", ""]
        lines += [f"- **{_cell(r['name'])}**: {r['status'][len(SKIPPED_PREFIX) :]}" for r in skipped]
        lines.append("")

    notes = [
        f"- **{_cell(r['name'])}**: speedup not computed, {r['extra']['speedup_note']}"
        for r in rows
        if (r.get("extra") or {}).get("speedup_note")
    ] + [
        f"- **{_cell(r['name'])}**: not timed, {r['extra']['untimed']}"
        for r in rows
        if (r.get("extra") or {}).get("untimed")
    ]
    if notes:
        lines += ["## Notes", "", *notes, ""]
    return "\n".join(lines).rstrip("\n") + "\n"


def _by_name(report: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {row["name"]: row for row in report.get("rows", [])}


def _measured(row: dict[str, Any] | None, key: str) -> Any:
    return None if row is None or row.get("status") != "ok" else row.get(key)


def _side_by_side(
    rows: list[dict[str, Any] | None], key: str, show: Callable[[float | None], str]
) -> list[str]:
    return [
        "skipped" if row is not None and row.get("status") != "ok" else show(_measured(row, key))
        for row in rows
    ]


def _relative(base: Any, value: Any) -> str:
    if not (is_finite_number(base) and is_finite_number(value)) or base == 0:
        return _NONE
    return f"{(value / base - 1) * 100:+.1f}%"


def _difference(value: Any, base: Any) -> str:
    return points(value - base) if is_finite_number(value) and is_finite_number(base) else _NONE


def render_comparison(reports: Sequence[tuple[str, dict[str, Any]]]) -> str:
    """Markdown comparing labelled reports row by row (matched by artifact name): mAP50-95 and p50
    side by side, then each later run's ΔmAP (points) and Δp50 (%) against the first."""
    labels = [f"#{index}" for index in range(1, len(reports) + 1)]
    lines = ["# Report comparison", ""]
    lines += _table(
        ("run", "report", "host"),
        [
            (label, f"`{source}`", host_summary(report.get("host") or {}))
            for label, (source, report) in zip(labels, reports, strict=True)
        ],
    )
    tables = [_by_name(report) for _, report in reports]
    names = list(dict.fromkeys(name for table in tables for name in table))
    later = labels[1:]
    header = (
        ["artifact"]
        + [f"mAP50-95 {label}" for label in labels]
        + [f"ΔmAP {label}" for label in later]
        + [f"p50 ms {label}" for label in labels]
        + [f"Δp50 {label}" for label in later]
    )
    body = []
    for name in names:
        rows = [table.get(name) for table in tables]
        maps = [_measured(row, "map50_95") for row in rows]
        p50s = [_measured(row, "p50_ms") for row in rows]
        body.append(
            [name]
            + _side_by_side(rows, "map50_95", percent)
            + [_difference(m, maps[0]) for m in maps[1:]]
            + _side_by_side(rows, "p50_ms", lambda v: _fmt(v, ".2f"))
            + [_relative(p50s[0], p) for p in p50s[1:]]
        )
    lines += ["", *_table(header, body), ""]
    lines.append(
        f"mAP in %, ΔmAP in mAP points and Δp50 in % relative to {labels[0]}; {_NONE}: the artifact is "
        "missing from that run. Latencies only compare when the hosts match."
    )
    return "\n".join(lines) + "\n"

"""``accuracy_latency.png``: mAP50-95 against p50 latency, one labelled point per measured artifact.

Drawn on an explicit Agg canvas without ``pyplot``, so it never looks for a display, never touches
the global backend of a program that embeds nasquant, and leaks no figures.
"""

from __future__ import annotations

import itertools
import os
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import ScalarFormatter

from nasquant.report.markdown import hardware_summary

# Fixed colours per backend so the same runtime looks the same in every report.
_BACKEND_COLOURS = {
    "torch": "tab:orange",
    "onnxruntime": "tab:blue",
    "openvino": "tab:purple",
    "tensorrt": "tab:green",
}
_OTHER_COLOURS = ("tab:purple", "tab:brown", "tab:pink", "tab:olive", "tab:cyan", "tab:red")
_PRECISION_MARKERS = {"fp32": "o", "fp16": "s", "int8": "^"}
_OTHER_MARKER = "D"

# Latencies spanning more than this factor (e.g. torch CPU next to a TensorRT engine) are drawn
# on a log axis, where a linear one would squash the fast artifacts into one corner.
_LOG_SCALE_RATIO = 10.0


def _colours(backends: list[str]) -> dict[str, str]:
    others = itertools.cycle(_OTHER_COLOURS)
    return {b: _BACKEND_COLOURS.get(b) or next(others) for b in backends}


def plot_accuracy_latency(report: dict[str, Any], path: str | os.PathLike, *, title: str) -> None:
    """Write the PNG for ``report`` (the report.json payload) to ``path``."""
    points = [
        row
        for row in report.get("rows", [])
        if row.get("status") == "ok" and row.get("p50_ms") and row.get("map50_95") is not None
    ]
    figure = Figure(figsize=(8, 5.5), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    colours = _colours(list(dict.fromkeys(row["backend"] for row in points)))
    # Labels alternate above and below in latency order, so neighbouring points rarely collide.
    by_latency = sorted(points, key=lambda row: row["p50_ms"])
    for rank, row in enumerate(by_latency):
        x, y = row["p50_ms"], row["map50_95"] * 100
        axes.scatter(
            x,
            y,
            s=70,
            color=colours[row["backend"]],
            marker=_PRECISION_MARKERS.get(row["precision"], _OTHER_MARKER),
            edgecolors="black",
            linewidths=0.5,
            zorder=3,
        )
        above = rank % 2 == 0
        axes.annotate(
            row["name"],
            (x, y),
            xytext=(6, 5 if above else -5),
            textcoords="offset points",
            va="bottom" if above else "top",
            fontsize=8,
        )
    latencies = [row["p50_ms"] for row in points]
    if latencies and max(latencies) / min(latencies) > _LOG_SCALE_RATIO:
        axes.set_xscale("log")
        axes.xaxis.set_major_formatter(ScalarFormatter())  # "20" reads better than "2×10¹" for ms
    axes.margins(x=0.15, y=0.15)  # room for the labels right of the outermost points
    if not points:
        axes.text(0.5, 0.5, "no measured artifacts", ha="center", va="center", transform=axes.transAxes)
    axes.set_xlabel("p50 latency (ms, model only)")
    axes.set_ylabel("mAP50-95 (%)")
    axes.grid(True, which="both", alpha=0.3)
    axes.set_title(f"{title}\n{hardware_summary(report.get('host') or {})}", fontsize=10)
    if points:
        backend_handles = [
            Line2D([], [], linestyle="", marker="o", color=colour, label=backend)
            for backend, colour in colours.items()
        ]
        precision_handles = [
            Line2D(
                [], [], linestyle="", color="grey", label=p, marker=_PRECISION_MARKERS.get(p, _OTHER_MARKER)
            )
            for p in dict.fromkeys(row["precision"] for row in points)
        ]
        # Outside the axes, where they can never hide a point.
        figure.legend(handles=backend_handles, title="backend", loc="outside right upper", fontsize=8)
        figure.legend(handles=precision_handles, title="precision", loc="outside right lower", fontsize=8)
    figure.savefig(path, format="png", dpi=120)

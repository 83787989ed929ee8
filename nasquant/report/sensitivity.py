"""Evidence of a sensitivity analysis: ``sensitivity.json``, ``sensitivity.md``, ``sensitivity.png``."""

from __future__ import annotations

import os
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from nasquant.artifacts import SENSITIVITY_JSON, SENSITIVITY_MD, SENSITIVITY_PNG
from nasquant.io import atomic_path, write_json
from nasquant.quant.sensitivity import SensitivityResult


def write_sensitivity(
    run_dir: str | os.PathLike, result: SensitivityResult, *, title: str
) -> dict[str, Path]:
    """Write the three evidence files into ``run_dir``; return their paths by kind."""
    run_dir = Path(run_dir)
    kept = set(result.search["chosen"]) if result.search else set()
    paths = {
        "json": write_json(run_dir / SENSITIVITY_JSON, result.to_dict()),
        "md": run_dir / SENSITIVITY_MD,
        "png": run_dir / SENSITIVITY_PNG,
    }
    with atomic_path(paths["md"]) as tmp:
        tmp.write_text(render_sensitivity(result, title=title, kept=kept))
    _plot(result, paths["png"], title=title, kept=kept)
    return paths


def _db(value: float) -> str:
    return "∞" if value == float("inf") else f"{value:.2f}"


def render_sensitivity(result: SensitivityResult, *, title: str, kept: set[str]) -> str:
    lines = [
        f"# {title}",
        "",
        f"SQNR against FP32 on {result.samples} validation images (boxes / class logits, dB; higher is closer).",
        f"All layers INT8: {_db(result.all_int8_boxes_db)} / {_db(result.all_int8_logits_db)} dB.",
        "**Recovery**: dB gained over all-INT8 when only that layer stays in floating point (mean of boxes"
        " and logits). **Only**: SQNR with only that layer INT8 (lower = more damage).",
        f"Analysis wall time {result.seconds:.0f} s.",
        "",
    ]
    if result.map50_95_fp32 is not None:
        subset = f"{result.map_images} validation images" if result.map_images else "the validation subset"
        lines += [
            f"mAP50-95 on {subset}: FP32 {result.map50_95_fp32:.4f}, all INT8 "
            f"{result.map50_95_int8:.4f}; the top layers by recovery also show mAP with only them kept in FP.",
            "",
        ]
    if result.search is not None:
        search = result.search
        budget = []
        if search["max_map_drop"] is not None:
            budget.append(f"mAP drop ≤ {search['max_map_drop']:.4f}")
        if search["max_fp_layers"] is not None:
            budget.append(f"≤ {search['max_fp_layers']} FP layers")
        verdict = "met" if search["met"] else "NOT met (best prefix tried kept)"
        lines += [
            "## Search (`skip: auto`)",
            "",
            f"Budget {' and '.join(budget)}: {verdict} with {len(search['chosen'])} layer(s) in FP, "
            f"mAP50-95 {search['map50_95']:.4f} (drop {search['drop']:+.4f}).",
            "",
            "| FP layers | mAP50-95 | drop |",
            "|---|---|---|",
            *(f"| {len(t['fp_layers'])} | {t['map50_95']:.4f} | {t['drop']:+.4f} |" for t in search["tried"]),
            "",
        ]
    lines += [
        "## Layers ranked by recovery",
        "",
        "| # | layer | recovery dB | only INT8: boxes / logits dB | all but it: boxes / logits dB | mAP kept FP | kept |",
        "|---|---|---|---|---|---|---|",
    ]
    for rank, layer in enumerate(result.layers, 1):
        map_cell = "" if layer.map50_95_kept_float is None else f"{layer.map50_95_kept_float:.4f}"
        lines.append(
            f"| {rank} | `{layer.name}` | {layer.recovery_db:+.3f} | {_db(layer.only_boxes_db)} / "
            f"{_db(layer.only_logits_db)} | {_db(layer.all_but_boxes_db)} / {_db(layer.all_but_logits_db)} | "
            f"{map_cell} | {'FP' if layer.name in kept else ''} |"
        )
    return "\n".join(lines) + "\n"


def _plot(result: SensitivityResult, path: Path, *, title: str, kept: set[str]) -> None:
    layers = result.layers
    figure = Figure(figsize=(10, max(4.0, 0.16 * len(layers) + 1.5)))
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    positions = range(len(layers))
    colours = ["tab:red" if layer.name in kept else "tab:blue" for layer in layers]
    axes.barh(list(positions), [layer.recovery_db for layer in layers], color=colours)
    axes.set_yticks(list(positions), [layer.name for layer in layers], fontsize=6)
    axes.invert_yaxis()
    axes.set_xlabel("SQNR recovery when kept in FP (dB, mean of boxes and logits)")
    axes.set_title(f"{title}\nred: kept in floating point" if kept else title, fontsize=9)
    figure.tight_layout()
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=110)

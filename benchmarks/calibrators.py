"""The calibrator race: which activation calibrator, with or without bias correction and distillation,
loses least mAP?

    .venv/bin/python -m benchmarks.calibrators [--methods max percentile:99.99 ...] [--bias-correction both]
        [--finetune-steps 0 100] [--draws 3] [--graphs NAME ...] [--append]

On the shapes fixture, for each calibrator (ModelOpt's ``max``, ``percentile`` at a few percentiles,
``entropy``, ``mse``) and bias correction off/on (:mod:`nasquant.quant.bias_correction`), over three
calibration draws (the recipe's 256 images, and two seeded halves of them: one draw alone cannot show a
0.1-point difference, ``benchmarks/skip_lists.md``), the shipped skip list (the box branch) and
quantize-everything are exported as the pipeline exports them, and validated on the whole validation
set: the CPU flavour on ONNX Runtime (integer kernels, unsigned grids) and on OpenVINO, the TensorRT
flavour on ONNX Runtime (TensorRT's signed grids; TensorRT itself does not run here). Mean and spread
over the draws, Δ vs FP32 in mAP points. No timing: a calibrator changes ranges, not kernels.
``--finetune-steps`` distils each calibrated model first (:mod:`nasquant.quant.distill`, the recipe's
``finetune`` defaults otherwise), as the pipeline's ``finetune`` stage does; several step counts
(``--finetune-steps 0 100``) distil the same calibrations, and the record then also gives each distilled
row's effect paired draw by draw with its undistilled twin (mean ± standard error): a lever's effect is
resolved only where it exceeds that error. ``--draws N`` adds seeded halves (seeds 3, 4, ...) to the
three draws, ``--graphs`` validates only the named graphs (and distils only the models they need).
``--agreement`` also measures how far each quantized model's head outputs are from the FP32 model's on
the validation images (the distillation's own loss, no labels read; the fake-quantized model with the
TensorRT flavour's bias correction): whether distillation brings the model closer to FP32 on images it
never saw, draw by draw, whatever mAP can resolve.
Writes ``benchmarks/calibrators.md`` and ``.json``; ``--append`` adds the rows to that record.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import shlex
import statistics
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

from torch import nn

from nasquant import NAS
from nasquant.bench import host_info
from nasquant.data.calibration import select_calibration_images
from nasquant.data.datasets import iter_batches, load_dataset
from nasquant.eval.validate import validate
from nasquant.export import export_onnx, write_cpu_flavor
from nasquant.io import write_json
from nasquant.quant import calibrate, correct_biases, keep_in_float
from nasquant.quant.distill import distill, mean_distillation_loss
from nasquant.recipe import FinetuneSection, load_recipe
from nasquant.report.markdown import host_summary
from nasquant.runtime import OnnxRuntimeBackend
from nasquant.settings import BOX_BRANCH_LAYERS

HERE = Path(__file__).resolve().parent
RECIPE = HERE.parent / "recipes" / "shapes_s_int8.yaml"
#: The recipe's images, then seeded halves of them (seeds 1, 2, ...), three draws by default.
DEFAULT_DRAWS = 3
DEFAULT_METHODS = ("max", "percentile:99.9", "percentile:99.99", "percentile:99.999", "entropy", "mse")
#: The graphs each configuration is validated as (name -> skip list, flavour, runtime).
GRAPHS = {
    "selective, CPU flavour, ORT": ("selective", "cpu", "onnxruntime"),
    "selective, CPU flavour, OpenVINO": ("selective", "cpu", "openvino"),
    "selective, TensorRT flavour, ORT": ("selective", "trt", "onnxruntime"),
    "all layers, CPU flavour, ORT": ("all", "cpu", "onnxruntime"),
}


@dataclass
class Result:
    method: str
    bias_correction: bool
    finetune_steps: int = 0
    """Quantization-aware distillation steps before export (0 = none)."""
    range_learning_rate: float = 0.0
    """The distillation's rate for the quantizers' ranges (0 = the calibrated ranges are kept)."""
    draws: dict[str, dict[str, float]] = field(default_factory=dict)
    """draw -> graph -> mAP50-95 (fraction)."""
    agreement: dict[str, dict[str, float]] = field(default_factory=dict)
    """draw -> model ("selective" / "all") -> distillation loss vs FP32 on the validation images
    (``--agreement``; empty without)."""


def _draws(count: int) -> list[tuple[str, int | None, int]]:
    """(label, images or None for all of them, seed) of the first ``count`` draws."""
    if count < 1:
        sys.exit(f"--draws must be at least 1, got {count}")
    return [("recipe's 256", None, 0)] + [(f"half, seed {seed}", 128, seed) for seed in range(1, count)]


def _parse_method(text: str) -> tuple[str, float]:
    name, _, percentile = text.partition(":")
    return name, float(percentile) if percentile else 99.99


def _validate(path: Path, runtime: str, validation, spec) -> float:
    if runtime == "openvino":
        from nasquant.runtime import OpenVINOBackend

        backend = OpenVINOBackend(path, threads=2)
    else:
        backend = OnnxRuntimeBackend(path, threads=2)
    with backend:
        return validate(backend, validation, spec, batch_size=1, progress=False)["map50_95"]


def _flavours(
    model, skip: str, bias_correction: bool, batches, work: Path, imgsz: int
) -> tuple[dict[str, Path], nn.Module]:
    """Both INT8 flavours of ``model``, as the pipeline writes them, and the model of the TensorRT flavour;
    with bias correction, each measured on its own flavour's grids (the CPU flavour from a graph of the
    CPU-corrected biases)."""
    trt_model = cpu_model = model
    if bias_correction:
        signed = correct_biases(model, batches, progress=False)
        trt_model = signed.model
        cpu_model = correct_biases(
            model, batches, unsigned_quantizers=signed.nonnegative_quantizers, progress=False
        ).model
    trt = export_onnx(trt_model, work / f"{skip}.trt.onnx", imgsz=imgsz, simplify=True)
    source = trt
    if cpu_model is not trt_model:
        source = export_onnx(cpu_model, work / f"{skip}.cpu-source.onnx", imgsz=imgsz, simplify=True)
    return {"trt": trt, "cpu": write_cpu_flavor(source, work / f"{skip}.cpu.onnx")}, trt_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", default=list(DEFAULT_METHODS), help="name or percentile:P")
    parser.add_argument("--bias-correction", choices=("off", "on", "both"), default="both")
    parser.add_argument(
        "--finetune-steps",
        type=int,
        nargs="+",
        default=[0],
        help="distil each INT8 model this many steps first (0 = no); several: one row each, same calibrations",
    )
    parser.add_argument("--finetune-lr", type=float, default=FinetuneSection().learning_rate)
    parser.add_argument(
        "--finetune-range-lr",
        type=float,
        default=0.0,
        help="the distillation also learns the quantizers' ranges at this rate (0 = keeps them)",
    )
    parser.add_argument(
        "--draws",
        type=int,
        default=DEFAULT_DRAWS,
        help="calibration draws: the recipe's images, then seeded halves",
    )
    parser.add_argument("--graphs", nargs="+", choices=list(GRAPHS), help="validate only these graphs")
    parser.add_argument(
        "--agreement",
        action="store_true",
        help="also measure each model's distillation loss vs FP32 on the validation images",
    )
    parser.add_argument("--output", type=Path, default=HERE / "calibrators")
    parser.add_argument(
        "--append", action="store_true", help="add these rows to the record at --output (same FP32, draws)"
    )
    args = parser.parse_args()
    recipe = load_recipe(RECIPE)
    nas = NAS(recipe.resolve_path(recipe.model.checkpoint)).fuse()
    spec = nas.preprocessing(recipe.validation.protocol, recipe.input.size)
    validation = load_dataset(recipe.resolve_path(recipe.validation.data))
    source = load_dataset(recipe.resolve_path(recipe.calibration.data), kind=recipe.calibration.format)
    graphs = {
        name: g
        for name, g in GRAPHS.items()
        if (g[2] != "openvino" or importlib.util.find_spec("openvino")) and name in (args.graphs or GRAPHS)
    }
    skips = {g[0] for g in graphs.values()}
    draws = _draws(args.draws)
    corrections = {"off": (False,), "on": (True,), "both": (False, True)}[args.bias_correction]
    finetune = FinetuneSection()
    distilling = any(args.finetune_steps)
    heldout = (
        [b.images for b in iter_batches(validation, spec, finetune.batch_size)] if args.agreement else []
    )
    with tempfile.TemporaryDirectory(prefix="nasquant-calibrators-") as folder:
        work = Path(folder)
        fp32 = export_onnx(nas.model, work / "model.fp32.onnx", imgsz=spec.imgsz)
        fp32_map = _validate(fp32, "onnxruntime", validation, spec)
        results = [
            Result(m, bc, steps, args.finetune_range_lr if steps else 0.0)
            for m in args.methods
            for steps in args.finetune_steps
            for bc in corrections
        ]
        for draw, count, seed in draws:
            chosen = select_calibration_images(source, num_images=count or len(source), seed=seed)
            batches = [b.images for b in iter_batches(chosen, spec, recipe.calibration.batch_size)]
            # the distillation's batches, once per draw whatever the step counts (none without one)
            train = [b.images for b in iter_batches(chosen, spec, finetune.batch_size)] if distilling else []
            for method_text in args.methods:
                method, percentile = _parse_method(method_text)
                calibrated = calibrate(
                    nas.model, batches, method=method, percentile=percentile, progress=False
                )
                calibrated_models = {
                    "all": calibrated,
                    "selective": keep_in_float(calibrated, list(BOX_BRANCH_LAYERS))[0],
                }
                for steps in args.finetune_steps:
                    models = {skip: calibrated_models[skip] for skip in skips}
                    if steps:
                        for skip, model in models.items():
                            models[skip] = distill(
                                model,
                                nas.model,
                                train,
                                steps=steps,
                                learning_rate=args.finetune_lr,
                                range_learning_rate=args.finetune_range_lr or None,
                                seed=finetune.seed,
                                progress=False,
                            ).model
                    chosen_results = (
                        r for r in results if r.method == method_text and r.finetune_steps == steps
                    )
                    for result in chosen_results:
                        scores = result.draws.setdefault(draw, {})
                        for skip, model in models.items():
                            files, trt_model = _flavours(
                                model, skip, result.bias_correction, batches, work, spec.imgsz
                            )
                            if heldout:
                                result.agreement.setdefault(draw, {})[skip] = mean_distillation_loss(
                                    trt_model, nas.model, heldout
                                )
                            for name, (graph_skip, flavor, runtime) in graphs.items():
                                if graph_skip == skip:
                                    scores[name] = _validate(files[flavor], runtime, validation, spec)
                        line = ", ".join(f"{n} {100 * (m - fp32_map):+.3f}" for n, m in scores.items())
                        line += "".join(
                            f", {skip} agreement loss {loss:.3e}"
                            for skip, loss in result.agreement.get(draw, {}).items()
                        )
                        print(f"[{draw}] {_configuration(asdict(result))}: {line}", flush=True)
    command = shlex.join(["python", "-m", "benchmarks.calibrators", *sys.argv[1:]])
    record = {
        "commands": [command],
        "host": host_info(ort_threads=2),
        "recipe": str(RECIPE),
        "fp32_map50_95": fp32_map,
        "draws": [d[0] for d in draws],
        "graphs": list(graphs),
        "results": [asdict(r) for r in results],
    }
    if args.append:
        record = _appended(json.loads(args.output.with_suffix(".json").read_text()), record)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    write_json(args.output.with_suffix(".json"), record)
    args.output.with_suffix(".md").write_text(_markdown(record))
    print(f"wrote {args.output.with_suffix('.md')}")


def _appended(previous: dict, new: dict) -> dict:
    """``previous`` (a record written on this host) with ``new``'s results and command added; a
    configuration measured again replaces its earlier row (a fixed calibrator is rerun, not listed twice)."""
    for key in ("fp32_map50_95", "draws", "graphs"):
        if previous[key] != new[key]:
            sys.exit(f"cannot append: the record's {key} differs ({previous[key]} vs {new[key]})")
    rerun = {_configuration(result) for result in new["results"]}
    kept = [result for result in previous["results"] if _configuration(result) not in rerun]
    return {**previous, "commands": previous["commands"] + new["commands"], "results": kept + new["results"]}


def _configuration(result: dict) -> str:
    distillation = f", distilled {_distillation(result)}" if result.get("finetune_steps") else ""
    return f"{result['method']}, bias correction {'on' if result['bias_correction'] else 'off'}{distillation}"


def _distillation(result: dict) -> str:
    """How a result was distilled: its steps, and the ranges' rate when they learned."""
    steps = result.get("finetune_steps", 0)
    if not steps:
        return "off"
    rate = result.get("range_learning_rate", 0.0)
    return f"{steps} steps" + (f", ranges learned at {rate:g}" if rate else "")


def _markdown(record: dict) -> str:
    fp32 = record["fp32_map50_95"]
    graphs = record["graphs"]
    lines = [
        "# Calibrator race: activation calibrators × bias correction × distillation, shapes fixture",
        "",
        f"Host: {host_summary(record['host'])}. FP32 {100 * fp32:.2f} mAP50-95 (ONNX Runtime, whole validation "
        f"set at 320). Each cell: mean Δ vs FP32 in mAP points over {len(record['draws'])} calibration draws "
        f"({'; '.join(record['draws'])}), ± the spread (max − min). "
        + "; ".join(f"`{command.strip()}`" for command in record["commands"])
        + ".",
        "",
        *_header(graphs),
    ]
    for result in record["results"]:
        cells = []
        for graph in graphs:
            deltas = [100 * (scores[graph] - fp32) for scores in result["draws"].values() if graph in scores]
            cells.append(
                f"{statistics.mean(deltas):+.3f} ± {max(deltas) - min(deltas):.2f}" if deltas else "—"
            )
        lines.append(_row(result, cells))
    lines += _paired_markdown(record)
    lines += _agreement_markdown(record)
    lines.append("")
    return "\n".join(lines)


def _header(graphs: list[str]) -> list[str]:
    """A table's heading and rule: the configuration's three columns, then one per graph."""
    return [
        "| calibrator | bias correction | distillation | " + " | ".join(graphs) + " |",
        "|---|---|---|" + "---|" * len(graphs),
    ]


def _row(result: dict, cells: list[str]) -> str:
    """A table row: the configuration's three columns, then ``cells``."""
    correction = "on" if result["bias_correction"] else "off"
    return f"| {result['method']} | {correction} | {_distillation(result)} | " + " | ".join(cells) + " |"


def _undistilled_twins(results: list[dict]) -> dict[tuple[str, bool], dict]:
    """The undistilled results by (calibrator, bias correction): each distilled row's twin."""
    return {(r["method"], r["bias_correction"]): r for r in results if not r.get("finetune_steps")}


def _paired_markdown(record: dict) -> list[str]:
    """Each distilled row's effect, paired draw by draw with the same calibration undistilled: the mean
    difference in mAP points ± its standard error (empty when no row has an undistilled twin)."""
    graphs = record["graphs"]
    twins = _undistilled_twins(record["results"])
    lines = []
    for result in record["results"]:
        twin = twins.get((result["method"], result["bias_correction"]))
        if not result.get("finetune_steps") or twin is None:
            continue
        cells = []
        for graph in graphs:
            differences = [
                100 * (scores[graph] - twin["draws"][draw][graph])
                for draw, scores in result["draws"].items()
                if graph in scores and graph in twin["draws"].get(draw, {})
            ]
            if len(differences) < 2:
                cells.append("—")
                continue
            error = statistics.stdev(differences) / len(differences) ** 0.5
            cells.append(f"{statistics.mean(differences):+.3f} ± {error:.3f} (n={len(differences)})")
        lines.append(_row(result, cells))
    if not lines:
        return []
    return [
        "",
        "## What distillation changes, paired draw by draw",
        "",
        "Each cell: the distilled row minus the same calibration undistilled, in mAP points, mean over the "
        "draws ± its standard error (n draws). An effect smaller than about twice its error is not resolved.",
        "",
        *_header(graphs),
        *lines,
    ]


def _agreement_markdown(record: dict) -> list[str]:
    """Each row's distillation loss vs FP32 on the validation images (``--agreement``), and each
    distilled row's change of it, paired with its undistilled twin draw by draw (empty without)."""
    results = [r for r in record["results"] if r.get("agreement")]
    models = [
        m for m in ("selective", "all") if any(m in a for r in results for a in r["agreement"].values())
    ]
    if not models:
        return []
    twins = _undistilled_twins(results)
    lines = [
        "",
        "## Agreement with FP32 on the validation images",
        "",
        "Each cell: the distillation loss (class-logit KL + score-weighted DFL KL, `nasquant.quant.distill`) "
        "of the fake-quantized model (TensorRT grids, bias-corrected when the row says so) against the FP32 "
        "model's head outputs on the validation images, mean over the draws; for a distilled row, then its "
        "change relative to the same calibration undistilled, mean ± standard error, and on how many draws "
        "it came closer. No label is read: it says whether distillation generalises, not what mAP does.",
        "",
        *_header(models),
    ]
    for result in results:
        twin = twins.get((result["method"], result["bias_correction"]))
        cells = []
        for model in models:
            losses = {d: a[model] for d, a in result["agreement"].items() if model in a}
            if not losses:
                cells.append("—")
                continue
            cell = f"{statistics.mean(losses.values()):.2e}"
            if result.get("finetune_steps") and twin is not None:
                changes = [
                    100 * (loss / twin["agreement"][d][model] - 1)
                    for d, loss in losses.items()
                    if model in twin["agreement"].get(d, {})
                ]
                if len(changes) >= 2:
                    error = statistics.stdev(changes) / len(changes) ** 0.5
                    closer = sum(change < 0 for change in changes)
                    cell += f", {statistics.mean(changes):+.1f} % ± {error:.1f} ({closer} of {len(changes)} closer)"
            cells.append(cell)
        lines.append(_row(result, cells))
    return lines


if __name__ == "__main__":
    sys.exit(main())

"""``nasquant quantize RECIPE``: load → fuse → FP32 eval → calibrate → select → export → validate → bench → report.

Every stage's result is recorded in ``stages.json`` with a hash of its inputs, so ``--resume`` reuses
finished stages whose inputs hash the same. Every file is written under a temporary name and
renamed when complete, so an interrupted run never leaves a half-written artifact under a final name.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from nasquant._version import __version__
from nasquant.api import NAS
from nasquant.artifacts import (
    CALIBRATION_LIST_NAME,
    KEY_FLAVOR,
    KEY_FP_LAYERS,
    KEY_RECIPE_HASH,
    TIMINGS_NAME,
    sidecar_path,
)
from nasquant.bench import benchmark, host_info, set_threads
from nasquant.cuda import tensorrt_unavailable
from nasquant.data.calibration import check_no_overlap, select_calibration_images, write_image_list
from nasquant.data.datasets import DetectionDataset, iter_batches, load_dataset
from nasquant.data.preprocess import Preprocess, read_image
from nasquant.errors import NasquantError
from nasquant.eval.validate import validate
from nasquant.export import export_onnx, write_cpu_flavor
from nasquant.export.tensorrt import (
    EngineSettings,
    EngineSource,
    build_engine,
    default_engine_path,
    engine_settings,
)
from nasquant.io import describe_holder, remove_stale_parts, run_lock, write_json
from nasquant.quant import calibrate, keep_in_float, load_calibration, save_calibration
from nasquant.quant.sensitivity import SensitivityResult, analyze, search_fp_layers
from nasquant.recipe import Recipe
from nasquant.report import ReportRow, artifact_size_mb, load_report, write_report
from nasquant.report.deploy import DEPLOY_MD, render_deploy_guide, write_deploy_guide
from nasquant.report.files import REPORT_JSON, REPORT_MD, REPORT_PNG
from nasquant.report.sensitivity import SENSITIVITY_JSON, write_sensitivity
from nasquant.runtime import Backend, TorchBackend, open_backend
from nasquant.settings import NMSSettings

Log = Callable[[str], None]

#: The files that describe a finished run's models: removed when a new run into the folder starts.
PREVIOUS_RUN_REPORT = (REPORT_JSON, REPORT_MD, REPORT_PNG, DEPLOY_MD)
#: Real images cycled through for the end-to-end (read-free pre + model + post) timing.
END_TO_END_IMAGES = 8


def _hash(*parts: object) -> str:
    # The nasquant version is part of every stage's inputs: a newer version may calibrate, export or
    # measure differently, so --resume never mixes its stages with an older version's results.
    payload = json.dumps([__version__, *parts], sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def _file_hash(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


class StageCache:
    """``stages.json``: per stage, the hash of its inputs and its (JSON) result."""

    def __init__(self, run_dir: Path, *, resume: bool) -> None:
        self.path = run_dir / "stages.json"
        self.entries: dict = self._read() if resume and self.path.exists() else {}
        self.resume = resume

    def _read(self) -> dict:
        try:
            entries = json.loads(self.path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
            problem = f"not JSON ({str(exc)[:120]})"
        else:
            valid = isinstance(entries, dict) and all(
                isinstance(entry, dict) and isinstance(entry.get("key"), str) and "result" in entry
                for entry in entries.values()
            )
            if valid:
                return entries
            problem = "not a record of stages"
        raise NasquantError(
            f"{self.path} is {problem}, so nothing can be reused: run without --resume to start over"
        )

    def get(self, stage: str, key: str, outputs: list[Path] = ()) -> dict | None:
        entry = self.entries.get(stage)
        if self.resume and entry and entry["key"] == key and all(p.exists() for p in outputs):
            return entry["result"]
        return None

    def put(self, stage: str, key: str, result: dict) -> dict:
        self.entries[stage] = {"key": key, "result": result}
        write_json(self.path, self.entries)
        return result


@dataclass
class Artifact:
    """One model file (or the torch module) that gets validated and benchmarked as a report row."""

    name: str
    backend: str
    precision: str
    flavor: str | None
    path: Path | None
    skipped_layers: list[str]
    bench_path: Path | None = None
    fp_reason: str | None = None
    """Why ``skipped_layers`` are the float layers (recipe list, search result), for the report."""


class QuantizePipeline:
    """The ``quantize`` / ``sensitivity`` job on one run folder, which it holds locked until
    :meth:`close` (use it as a context manager)."""

    def __init__(
        self,
        recipe: Recipe,
        *,
        output: str | os.PathLike | None = None,
        resume: bool = False,
        progress: bool = True,
        log: Log = print,
    ) -> None:
        self.recipe = recipe
        recipe.require("calibration.data", "validation.data", purpose="to quantize")
        self.run_dir = Path(output) if output else recipe.output_dir
        self.progress = progress
        self.log = log
        self.timings: list[dict] = []
        self._held = contextlib.ExitStack()
        # Nothing in the folder is touched before the lock is held: another live run may be writing there.
        lock = self._held.enter_context(run_lock(self.run_dir))
        try:
            if lock.previous is not None:
                log(
                    f"[run] took over {self.run_dir} from a run that stopped without releasing it "
                    f"({describe_holder(lock.previous)})"
                )
            self.cache = StageCache(self.run_dir, resume=resume)
            # Temporary files an earlier run left when it was killed (SIGKILL, power loss): never results.
            stale = [
                path
                for folder in (self.run_dir, self.run_dir / "bench")
                for path in remove_stale_parts(folder)
            ]
            if stale:
                log(f"[run] removed {len(stale)} partial file(s) an interrupted run left in {self.run_dir}")
            # A report describes the models of the run that wrote it: once this run may replace any of
            # them, the old one goes, so an interrupted run never leaves a report beside other models.
            old_report = [name for name in PREVIOUS_RUN_REPORT if (self.run_dir / name).is_file()]
            for name in old_report:
                (self.run_dir / name).unlink()
            if old_report:
                log(f"[run] removed the previous report ({', '.join(old_report)}): this run writes its own")
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Release the run folder."""
        self._held.close()

    def __enter__(self) -> QuantizePipeline:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _stage(self, name: str, summary: str, started: float, cached: bool) -> None:
        seconds = time.perf_counter() - started
        note = " (reused)" if cached else ""
        self.log(f"[{name}] {summary} — {seconds:.1f} s{note}")
        # Rewritten after every stage, so a run that fails or is stopped still says where time went.
        self.timings.append(
            {"stage": name, "summary": summary, "seconds": round(seconds, 3), "reused": cached}
        )
        write_json(self.run_dir / TIMINGS_NAME, {"stages": self.timings})

    def run(self) -> dict:
        recipe = self.recipe
        recipe.dump(self.run_dir)
        set_threads(recipe.benchmark.threads)
        nas, spec, model_key, validation, val_subset, nms = self._load()
        quantized = self._calibrate(nas, spec, validation, model_key)
        calibrated, skipped, fp_reason = self._select(nas, spec, quantized, validation, val_subset, nms)
        artifacts = self._export(nas, spec, calibrated, skipped, fp_reason, model_key)
        engines, skipped_rows = self._engines(artifacts)
        rows = [self._evaluate(artifact, nas, spec, val_subset, nms) for artifact in artifacts + engines]
        rows += skipped_rows
        self._deploy_guide(nas, spec, artifacts, nms)
        files = write_report(
            self.run_dir,
            recipe=self.recipe.to_dict(),
            host=host_info(ort_threads=recipe.benchmark.threads),
            rows=rows,
            title=f"{recipe.name}: FP32 vs INT8 ({nas.variant}, {validation.name})",
        )
        self.log(f"[report] {files['md']}")
        report = load_report(files["json"])
        report["run_dir"] = str(self.run_dir)
        return report

    def sensitivity(self) -> dict:
        """Load, calibrate (reusing a finished calibration) and analyse: the ``nasquant sensitivity`` job."""
        recipe = self.recipe
        recipe.dump(self.run_dir)
        set_threads(recipe.benchmark.threads)
        nas, spec, model_key, validation, val_subset, nms = self._load()
        quantized = self._calibrate(nas, spec, validation, model_key)
        return self._sensitivity(nas, spec, quantized, validation, val_subset, nms)

    def _load(self):
        """The fused model, its preprocessing, its cache key, the validation set, its subset and NMS."""
        recipe = self.recipe
        started = time.perf_counter()
        nas = NAS(
            recipe.resolve_path(recipe.model.checkpoint),
            variant=recipe.model.variant,
            sha256=recipe.model.sha256,
        ).fuse()
        if recipe.model.class_names:
            if len(recipe.model.class_names) != nas.model.num_classes:
                raise NasquantError(
                    f"model.class_names lists {len(recipe.model.class_names)} names but the model has "
                    f"{nas.model.num_classes} classes"
                )
            nas.names = list(recipe.model.class_names)
        spec = nas.preprocessing(recipe.validation.protocol, recipe.input.size)
        model_key = _hash(nas.checkpoint.sha256, spec)
        self._stage(
            "load",
            f"{nas.variant}, {nas.model.num_classes} classes, input {spec.imgsz}, fused",
            started,
            False,
        )

        validation = load_dataset(recipe.resolve_path(recipe.validation.data), kind=recipe.validation.format)
        val_subset = validation.first(recipe.validation.max_images)
        nms = recipe.validation.nms
        return nas, spec, model_key, validation, val_subset, nms

    def _calibration_images(self, validation: DetectionDataset) -> DetectionDataset:
        """The calibration images, none showing a validation image, their names written to the run
        folder: the recipe's ``image_list``, or (without one) the seeded draw, pinned in the resolved
        recipe so a rerun of it reproduces the run even if the folder gains or loses images."""
        recipe, section = self.recipe, self.recipe.calibration
        data = recipe.resolve_path(section.data)
        image_list = Path(recipe.resolve_path(section.image_list)) if section.image_list else None
        if image_list is not None and not image_list.is_file():
            raise NasquantError(
                f"{recipe.label}: calibration.image_list {image_list} does not exist; for COCO make it with "
                f"`python calibration/make_coco_list.py <COCO>/annotations/instances_train2017.json --count "
                f"{section.num_images} --out {image_list}` (nasquant repository), or drop "
                f"calibration.image_list to draw {section.num_images} images of {data} by seed"
            )
        source = load_dataset(data, kind=section.format)
        chosen = select_calibration_images(
            source, num_images=section.num_images, seed=section.seed, image_list=image_list
        )
        check_no_overlap(chosen.image_paths, validation.image_paths, allow=section.allow_overlap)
        # Absolute: the resolved recipe resolves relative paths against its own folder, not the cwd.
        written = (self.run_dir / CALIBRATION_LIST_NAME).resolve()
        if image_list is not None:
            if image_list.resolve() != written:
                write_image_list(written, chosen, header=f"The first {len(chosen)} images of {image_list}")
            return chosen
        write_image_list(
            written,
            chosen,
            header=f"{len(chosen)} of the {len(source)} images in {source.name}, drawn with seed {section.seed}\n"
            "(nasquant.data.calibration.select_calibration_images: sorted names, seeded permutation)",
        )
        self.recipe = replace(recipe, calibration=replace(section, image_list=str(written)))
        self.recipe.dump(self.run_dir)
        self.log(
            f"[calibrate] drew {len(chosen)} of {len(source)} images (seed {section.seed}, no calibration."
            f"image_list); to calibrate on these again: --set calibration.image_list={written}"
        )
        return chosen

    def _calibrate(self, nas: NAS, spec, validation: DetectionDataset, model_key: str):
        recipe, section = self.recipe, self.recipe.calibration
        started = time.perf_counter()
        chosen = self._calibration_images(validation)
        path = self.run_dir / "calibration.safetensors"
        # The images themselves are in the key, not the settings that chose them (image_list, seed,
        # num_images): a rerun of recipe.resolved.yaml, whose list pins the draw, reuses the ranges.
        settings = {
            name: value
            for name, value in recipe.to_dict()["calibration"].items()
            if name not in ("image_list", "seed", "num_images")
        }
        key = _hash(
            model_key,
            settings,
            recipe.quantization.per_channel_weights,
            [str(p) for p in chosen.image_paths],
        )
        cached = self.cache.get("calibrate", key, [path]) is not None
        if cached:
            quantized = load_calibration(nas.model, path)
        else:
            batches = (b.images for b in iter_batches(chosen, spec, section.batch_size))
            quantized = calibrate(
                nas.model,
                batches,
                method=section.method,
                percentile=section.percentile,
                per_channel_weights=recipe.quantization.per_channel_weights,
                progress=self.progress,
                total=-(-len(chosen) // section.batch_size),
            )
            save_calibration(
                quantized,
                path,
                settings={
                    "method": section.method,
                    "percentile": section.percentile,
                    "per_channel_weights": recipe.quantization.per_channel_weights,
                    "num_images": len(chosen),
                },
            )
            self.cache.put("calibrate", key, {"images": [str(p) for p in chosen.image_paths]})
        self._stage("calibrate", f"{len(chosen)} images, {section.method}", started, cached)
        return quantized

    def _select(self, nas: NAS, spec, quantized, validation, val_subset, nms):
        """The layers kept in floating point, and why: the recipe's patterns, or the sensitivity search's
        choice (written back into the resolved recipe, so a rerun reproduces it without searching)."""
        section = self.recipe.quantization
        if section.skip == "auto":
            search = self._sensitivity(nas, spec, quantized, validation, val_subset, nms)["search"]
            self.recipe = replace(self.recipe, quantization=replace(section, skip=list(search["chosen"])))
            self.recipe.dump(self.run_dir)
            budget = f"mAP drop {search['drop']:+.4f} ({'within' if search['met'] else 'NOT within'} budget)"
            fp_reason = f"chosen by the sensitivity search: {budget}; see sensitivity.md"
        else:
            fp_reason = "from the recipe's quantization.skip"
        selective, skipped = keep_in_float(quantized, self.recipe.quantization.skip)
        self.log(f"[select] kept in floating point ({len(skipped)}): {', '.join(skipped) or 'none'}")
        return (quantized, selective), skipped, fp_reason

    def _sensitivity(self, nas: NAS, spec, quantized, validation, val_subset, nms) -> dict:
        """Per-layer sensitivity (and, for ``skip: auto``, the search), with the three evidence files.

        Analysis and search are cached apart: a new budget reuses the measured layers.
        """
        recipe, section = self.recipe, self.recipe.quantization
        started = time.perf_counter()
        sample = select_calibration_images(
            validation,
            num_images=min(section.sensitivity_images, len(validation)),
            seed=recipe.calibration.seed,
        )
        key = _hash(
            self.cache.entries.get("calibrate", {}).get("key"),
            section.sensitivity_images,
            section.sensitivity_top_k,
            section.sensitivity_val_images,
            recipe.section_hash("validation"),
            [p.name for p in sample.image_paths],
        )

        map_subset = val_subset.first(section.sensitivity_val_images)

        def evaluate(model) -> float:
            backend = TorchBackend(model, device="cpu")
            batch = recipe.validation.batch_size
            return validate(backend, map_subset, spec, nms=nms, batch_size=batch, progress=False)["map50_95"]

        evidence = self.run_dir / SENSITIVITY_JSON
        cached = self.cache.get("sensitivity", key, [evidence]) is not None
        if cached:
            try:
                analysis = SensitivityResult.from_dict(json.loads(evidence.read_text(encoding="utf-8")))
            except (ValueError, KeyError, TypeError) as exc:
                raise NasquantError(
                    f"{evidence} is damaged ({type(exc).__name__}: {str(exc)[:120]}); run without --resume"
                ) from None
        else:
            images = np.concatenate(
                [b.images for b in iter_batches(sample, spec, recipe.validation.batch_size)]
            )
            analysis = analyze(
                nas.model,
                quantized,
                images,
                evaluate=evaluate,
                top_k=section.sensitivity_top_k,
                progress=self.progress,
            )
            analysis.map_images = len(map_subset)
            self.cache.put("sensitivity", key, {"ranked": analysis.ranked(), "seconds": analysis.seconds})
        ranked = analysis.ranked()
        summary = f"{len(ranked)} convs on {len(sample)} images, top: {ranked[0]}"
        self._stage("sensitivity", summary, started, cached)

        analysis.search = None
        if section.skip == "auto":
            started = time.perf_counter()
            search_key = _hash(key, section.max_map_drop, section.max_fp_layers)
            analysis.search = self.cache.get("search", search_key)
            searched = analysis.search is not None
            if not searched:
                analysis.search = self.cache.put(
                    "search",
                    search_key,
                    search_fp_layers(
                        quantized,
                        analysis,
                        evaluate,
                        max_map_drop=section.max_map_drop,
                        max_fp_layers=section.max_fp_layers,
                        log=self.log,
                    ),
                )
            chosen = analysis.search["chosen"]
            self._stage(
                "search", f"{len(chosen)} layer(s) in FP, met: {analysis.search['met']}", started, searched
            )
        write_sensitivity(self.run_dir, analysis, title=f"{recipe.name}: per-layer INT8 sensitivity")
        return {"ranked": ranked, "search": analysis.search, "seconds": analysis.seconds}

    def _metadata(
        self, nas: NAS, spec: Preprocess, flavor: str | None, fp_layers: list[str]
    ) -> dict[str, str]:
        """The model's own metadata plus where this graph came from (export adds version, precision, size)."""
        return {
            **nas.onnx_metadata(self.recipe.validation.protocol, spec.imgsz),
            KEY_RECIPE_HASH: self.recipe.section_hash(
                "model", "input", "calibration", "quantization", "export"
            ),
            KEY_FLAVOR: flavor or "",
            KEY_FP_LAYERS: json.dumps(fp_layers),
        }

    def _export(
        self, nas: NAS, spec, calibrated, skipped: list[str], fp_reason: str, model_key: str
    ) -> list[Artifact]:
        recipe = self.recipe
        started = time.perf_counter()
        all_layers, selective = calibrated
        bench_size = recipe.benchmark.size or spec.imgsz
        # Graphs have a static input size: timing at another size needs its own copies, same weights.
        folders = {spec.imgsz: self.run_dir}
        if bench_size != spec.imgsz:
            folders[bench_size] = self.run_dir / "bench"
        variants = [("ORT FP32", nas.model, "fp32", "model.fp32", [])]
        variants.append(("ORT INT8 selective", selective, "int8", "model.int8", skipped))
        reasons = {"model.int8": fp_reason, "model.int8-all": "quantize-everything baseline"}
        if recipe.quantization.quantize_all_baseline:
            variants.append(("ORT INT8 all-layers", all_layers, "int8", "model.int8-all", []))

        artifacts = [Artifact("torch FP32", "torch", "fp32", None, None, [])]
        for name, _, precision, stem, fp_layers in variants:
            for flavor in [None] if precision == "fp32" else ["cpu", "trt"]:
                file = f"{stem}.{flavor}.onnx" if flavor else f"{stem}.onnx"
                label = f"{name} (trt flavor)" if flavor == "trt" else name
                artifacts.append(
                    Artifact(
                        label,
                        "onnxruntime",
                        precision,
                        flavor,
                        self.run_dir / file,
                        fp_layers,
                        folders[bench_size] / file,
                        reasons.get(stem),
                    )
                )
        outputs = [p for a in artifacts[1:] for p in (a.path, a.bench_path)]
        key = _hash(
            model_key,
            self.cache.entries.get("calibrate", {}).get("key"),
            recipe.section_hash("export"),
            recipe.quantization.skip,
            bench_size,
        )
        cached = self.cache.get("export", key, outputs) is not None
        if not cached:
            for _, module, precision, stem, fp_layers in variants:
                for size, folder in folders.items():
                    self._export_variant(module, nas, spec, precision, folder / stem, fp_layers, size)
            self.cache.put("export", key, {"files": sorted({str(p) for p in outputs})})
        self._stage(
            "export", f"{len(artifacts) - 1} ONNX graphs (opset {recipe.export.opset})", started, cached
        )
        return artifacts

    def _export_variant(
        self, module, nas: NAS, spec, precision: str, stem: Path, fp_layers: list[str], size: int
    ) -> None:
        """Write ``stem.onnx`` (FP32) or ``stem.trt.onnx`` + ``stem.cpu.onnx`` (INT8, one calibration)."""
        section = self.recipe.export
        target = stem.with_name(f"{stem.name}.onnx" if precision == "fp32" else f"{stem.name}.trt.onnx")
        export_onnx(
            module,
            target,
            imgsz=size,
            batch=self.recipe.benchmark.batch_sizes[0],
            dynamic_batch=section.dynamic_batch,
            opset=section.opset,
            simplify=section.simplify,
            metadata=self._metadata(nas, spec, None if precision == "fp32" else "trt", fp_layers),
        )
        if precision == "int8":
            write_cpu_flavor(target, stem.with_name(f"{stem.name}.cpu.onnx"))

    def _engines(self, artifacts: list[Artifact]) -> tuple[list[Artifact], list[ReportRow]]:
        """TensorRT engines built from the exported graphs (FP16/FP32 from the FP32 graph, INT8 from the
        selective QDQ graph), or one skipped row per precision saying why none could be built here."""
        section = self.recipe.engines
        if not section.enabled:
            return [], []
        reason = tensorrt_unavailable()
        if reason is not None:
            rows = [
                ReportRow.skipped_row(f"TRT {p.upper()}", "tensorrt", p, reason) for p in section.precisions
            ]
            return [], rows
        sources: dict[str, Artifact] = {}
        for artifact in artifacts:  # the first FP32 graph, the first (selective) TensorRT-flavour INT8
            if artifact.backend == "onnxruntime" and artifact.flavor in (None, "trt"):
                sources.setdefault(artifact.precision, artifact)
        engines = []
        for precision in section.precisions:
            source = sources["int8" if precision == "int8" else "fp32"]
            started = time.perf_counter()
            pairs = {source.path: default_engine_path(source.path, precision)}
            if source.bench_path != source.path:
                pairs[source.bench_path] = default_engine_path(source.bench_path, precision)
            stage = f"engine {precision}"
            key = _hash([_file_hash(onnx) for onnx in pairs], self.recipe.section_hash("engines"), precision)
            outputs = [p for engine in pairs.values() for p in (engine, sidecar_path(engine))]
            cached = self.cache.get(stage, key, outputs) is not None
            if not cached:
                for onnx, engine in pairs.items():
                    build_engine(onnx, engine, self._engine_settings(onnx, precision)[0], log=self.log)
                self.cache.put(stage, key, {"engines": [str(p) for p in pairs.values()]})
            self._stage(stage, f"{', '.join(p.name for p in pairs.values())}", started, cached)
            engine, *bench = pairs.values()
            engines.append(
                Artifact(
                    f"TRT {precision.upper()}",
                    "tensorrt",
                    precision,
                    None,
                    engine,
                    source.skipped_layers if precision == "int8" else [],
                    bench[0] if bench else engine,
                    source.fp_reason if precision == "int8" else None,
                )
            )
        return engines, []

    def _engine_settings(self, onnx_path: Path, precision: str) -> tuple[EngineSettings, EngineSource]:
        """The recipe's engine settings for one exported graph (its size and batch kind decide the profile)."""
        source = EngineSource.inspect(onnx_path)
        settings = engine_settings(
            self.recipe.engines,
            precision=precision,
            imgsz=source.imgsz,
            batch=source.batch or self.recipe.input.batch,
            dynamic_batch=source.batch is None,
        )
        return settings, source

    def _deploy_guide(self, nas: NAS, spec: Preprocess, artifacts: list[Artifact], nms: NMSSettings) -> None:
        fp32 = next(a for a in artifacts if a.backend == "onnxruntime" and a.precision == "fp32")
        int8 = next(a for a in artifacts if a.flavor == "trt")
        settings, source = self._engine_settings(fp32.path, "int8")
        guide = render_deploy_guide(
            fp32_onnx=Path(fp32.path.name),  # the guide sits beside the files it names
            int8_onnx=Path(int8.path.name),
            settings=settings,
            spec=spec,
            nms=nms,
            class_names=list(nas.names),
            skipped_layers=int8.skipped_layers,
            fixed_batch=source.batch,
        )
        self.log(f"[deploy] {write_deploy_guide(self.run_dir, guide)}")

    def _backend(self, artifact: Artifact, nas: NAS, path: Path | None) -> Backend:
        if artifact.backend == "torch":
            return TorchBackend(nas.model, device="cpu")
        return open_backend(path, threads=self.recipe.benchmark.threads)

    def _evaluate(
        self, artifact: Artifact, nas: NAS, spec: Preprocess, dataset: DetectionDataset, nms: NMSSettings
    ) -> ReportRow:
        recipe = self.recipe
        started = time.perf_counter()
        identity = _file_hash(artifact.path) if artifact.path else _hash(nas.checkpoint.sha256, "torch-fused")
        key = _hash(identity, recipe.section_hash("validation", "benchmark"), spec)
        stage = f"evaluate {artifact.name}"
        result = self.cache.get(stage, key)
        cached = result is not None
        if not cached:
            # A static-batch graph runs only the batch it was exported with.
            static = artifact.backend != "torch" and not recipe.export.dynamic_batch
            batch = recipe.benchmark.batch_sizes[0] if static else recipe.validation.batch_size
            with self._backend(artifact, nas, artifact.path) as backend:
                metrics = validate(backend, dataset, spec, nms=nms, batch_size=batch, progress=self.progress)
            bench_size = recipe.benchmark.size or spec.imgsz
            samples = [read_image(p) for p in dataset.image_paths[:END_TO_END_IMAGES]]
            with self._backend(artifact, nas, artifact.bench_path) as backend:
                timing = benchmark(
                    backend,
                    imgsz=bench_size,
                    batch=recipe.benchmark.batch_sizes[0],
                    warmup=recipe.benchmark.warmup,
                    iterations=recipe.benchmark.iterations,
                    progress=self.progress,
                    images=samples if recipe.benchmark.end_to_end else None,
                    spec=nas.preprocessing(recipe.validation.protocol, bench_size),
                )
            fields = timing.row_fields()
            result = self.cache.put(
                stage,
                key,
                {
                    "map50_95": metrics["map50_95"],
                    "map50": metrics["map50"],
                    **{k: fields[k] for k in ("p50_ms", "p90_ms", "images_per_s")},
                    "extra": {"map75": metrics["map75"], **fields["extra"]},
                },
            )
        self._stage(
            stage,
            f"mAP50-95 {result['map50_95']:.4f}, p50 {result['p50_ms']:.1f} ms "
            f"@{result['extra']['bench_imgsz']}px",
            started,
            cached,
        )
        if artifact.fp_reason:
            result = {**result, "extra": {**result["extra"], "fp_reason": artifact.fp_reason}}
        return ReportRow(
            name=artifact.name,
            backend=artifact.backend,
            precision=artifact.precision,
            flavor=artifact.flavor,
            skipped_layers=artifact.skipped_layers,
            size_mb=artifact_size_mb(artifact.path) if artifact.path else None,
            **result,
        )


def run_quantize(
    recipe: Recipe,
    *,
    output: str | os.PathLike | None = None,
    resume: bool = False,
    progress: bool = True,
    log: Log = print,
) -> dict:
    """Run the whole pipeline for ``recipe``; return the report dict (``report.json`` plus ``run_dir``)."""
    with QuantizePipeline(recipe, output=output, resume=resume, progress=progress, log=log) as pipeline:
        return pipeline.run()


def run_sensitivity(
    recipe: Recipe,
    *,
    output: str | os.PathLike | None = None,
    resume: bool = False,
    progress: bool = True,
    log: Log = print,
) -> dict:
    """Calibrate ``recipe``'s model and write its per-layer sensitivity evidence into the run folder."""
    with QuantizePipeline(recipe, output=output, resume=resume, progress=progress, log=log) as pipeline:
        return pipeline.sensitivity()

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import pytest
import yaml

from nasquant.artifacts import RESOLVED_NAME
from nasquant.errors import NasquantError
from nasquant.models import CONFIGS, VARIANTS
from nasquant.recipe import load_recipe, recipe_from_dict
from tests.shared import shared_dir

PROJECT_ROOT = Path(__file__).resolve().parent.parent
RECIPES = sorted((PROJECT_ROOT / "recipes").glob("*.yaml"))
SKIP_LIST = ["heads.head*.reg_convs.*", "heads.head*.reg_pred"]


def write(folder: Path, text: str, name: str = "r.yaml") -> Path:
    path = folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def error_of(path: Path, overrides: tuple[str, ...] = ()) -> str:
    with pytest.raises(NasquantError) as caught:
        load_recipe(path, overrides)
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith(f"{path}: ")
    return message


@pytest.fixture(autouse=True)
def _no_coco_root(monkeypatch: pytest.MonkeyPatch) -> None:
    # The shipped recipes read $COCO_ROOT; the developer's own setting must not change what we assert.
    monkeypatch.delenv("COCO_ROOT", raising=False)


def test_every_variant_a_recipe_accepts_has_an_architecture() -> None:
    assert tuple(CONFIGS) == VARIANTS


# --- shipped recipes ---------------------------------------------------------------------------


def test_the_promised_recipes_are_shipped() -> None:
    assert {"s_int8.yaml", "m_int8.yaml", "l_int8.yaml", "shapes_s_int8.yaml"} <= {p.name for p in RECIPES}


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_shipped_recipe_loads_and_accepts_set(path: Path) -> None:
    recipe = load_recipe(path)
    assert recipe.name == path.stem
    assert recipe.source == path
    assert recipe.quantization.skip == SKIP_LIST
    assert recipe.calibration.data is not None and recipe.validation.data is not None
    recipe.require("calibration.data", "validation.data", purpose="to quantize")

    changed = load_recipe(path, ["calibration.num_images=16", "benchmark.batch_sizes=[1, 2]"])
    assert changed.calibration.num_images == 16
    assert changed.benchmark.batch_sizes == [1, 2]
    assert dataclasses.replace(changed, calibration=recipe.calibration, benchmark=recipe.benchmark) == recipe


@pytest.mark.parametrize("variant", ["s", "m", "l"])
def test_coco_recipes(variant: str, monkeypatch: pytest.MonkeyPatch) -> None:
    path = PROJECT_ROOT / "recipes" / f"{variant}_int8.yaml"
    recipe = load_recipe(path)
    assert recipe.model.checkpoint == recipe.model.variant == f"yolo_nas_{variant}"
    assert recipe.input.size == 640
    assert recipe.validation.protocol == "sg"
    assert recipe.calibration.method == "max"
    # Without $COCO_ROOT: datasets/coco in the project root (the recipe says ../datasets/coco).
    assert recipe.calibration.data == str(PROJECT_ROOT / "datasets/coco/train2017")
    # No committed list: the run draws the images by seed and pins them in its own folder.
    assert recipe.calibration.image_list is None and recipe.calibration.num_images == 512
    assert recipe.validation.data == str(PROJECT_ROOT / "datasets/coco/annotations/instances_val2017.json")

    monkeypatch.setenv("COCO_ROOT", "/data/coco")
    recipe = load_recipe(path)
    assert recipe.calibration.data == "/data/coco/train2017"
    assert recipe.validation.data == "/data/coco/annotations/instances_val2017.json"


def test_shapes_recipe_points_at_the_shared_fixture() -> None:
    recipe = load_recipe(PROJECT_ROOT / "recipes" / "shapes_s_int8.yaml")
    shared = PROJECT_ROOT.parent / "shared"
    assert recipe.model.checkpoint == str(shared / "fixtures/yolo_nas_s_shapes.pt")
    assert recipe.calibration.data == str(shared / "data/shapes/calib")
    assert recipe.validation.data == str(shared / "data/shapes/val/annotations.json")
    assert (recipe.calibration.format, recipe.calibration.num_images) == ("images", 256)
    assert recipe.input.size == 320
    assert (recipe.benchmark.size, recipe.benchmark.batch_sizes, recipe.benchmark.threads) == (640, [1], 2)
    if os.environ.get("NASQUANT_SHARED") is None:
        shared_dir()  # skips with the reason when ../shared is absent
        for value in (recipe.model.checkpoint, recipe.calibration.data, recipe.validation.data):
            assert Path(value).exists(), value


# --- defaults, paths, environment --------------------------------------------------------------


def test_defaults(tmp_path: Path) -> None:
    recipe = load_recipe(write(tmp_path, "model:\n  checkpoint: yolo_nas_s\n", "tiny.yaml"))
    assert recipe.name == "tiny"
    assert recipe.model == type(recipe.model)(checkpoint="yolo_nas_s")
    assert (recipe.input.size, recipe.input.batch) == (None, 1)
    c = recipe.calibration
    assert (c.data, c.format, c.image_list, c.num_images, c.batch_size, c.seed) == (
        None,
        "auto",
        None,
        512,
        8,
        0,
    )
    assert (c.method, c.percentile, c.allow_overlap) == ("max", 99.99, False)
    q = recipe.quantization
    assert (q.per_channel_weights, q.skip, q.quantize_all_baseline) == (True, [], True)
    assert (recipe.export.opset, recipe.export.dynamic_batch, recipe.export.simplify) == (17, False, True)
    e = recipe.engines
    assert (e.enabled, e.precisions, e.workspace_mb, e.optimization_level) == (
        True,
        ["fp16", "int8"],
        4096,
        3,
    )
    assert (e.timing_cache, e.min_batch, e.opt_batch, e.max_batch, e.dla_core) == (None,) * 5
    assert (e.hardware_compatibility, e.typing, e.gpu_fallback, e.verbose) == ("none", "auto", True, False)
    v = recipe.validation
    assert (v.data, v.format, v.protocol, v.conf, v.iou) == (None, "auto", "sg", 0.01, 0.7)
    assert (v.top_k, v.max_det, v.batch_size, v.max_images) == (1000, 300, 8, None)
    b = recipe.benchmark
    assert (b.warmup, b.iterations, b.batch_sizes, b.threads, b.size, b.end_to_end) == (
        10,
        50,
        [1],
        None,
        None,
        True,
    )
    assert (recipe.output.dir, recipe.output.fail_on_drop) == (None, None)
    assert recipe.output_dir == Path("runs/tiny")


def test_empty_section_means_defaults(tmp_path: Path) -> None:
    recipe = load_recipe(write(tmp_path, "model:\n  checkpoint: a.pt\nbenchmark:\n"), ["benchmark.warmup=0"])
    assert recipe.benchmark.warmup == 0


def test_relative_paths_resolve_against_the_recipe_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = tmp_path / "recipes"
    path = write(
        folder,
        "model:\n  checkpoint: ../weights/model.pt\n"
        "calibration:\n  data: calib\n  image_list: /abs/list.txt\n"
        "validation:\n  data: https://example.com/val.json\n"
        "engines:\n  timing_cache: ~/trt.cache\n"
        "output:\n  dir: out/run\n",
    )
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    recipe = load_recipe(path)
    assert recipe.model.checkpoint == str(tmp_path / "weights/model.pt")
    assert recipe.calibration.data == str(folder / "calib")
    assert recipe.calibration.image_list == "/abs/list.txt"
    assert recipe.validation.data == "https://example.com/val.json"
    assert recipe.engines.timing_cache == os.path.expanduser("~/trt.cache")
    # Results go where the user works, not beside the recipe.
    assert recipe.output_dir == Path("out/run")
    assert recipe.resolve_path("x/y.json") == str(folder / "x/y.json")
    assert recipe.resolve_path("yolo_nas_m") == "yolo_nas_m"

    # --set values come from a command line: relative to the current directory.
    recipe = load_recipe(path, ["calibration.data=mine", "calibration.image_list=null"])
    assert recipe.calibration.data == str(elsewhere / "mine")
    assert recipe.calibration.image_list is None


def test_alias_unless_a_file_of_that_name_is_beside_the_recipe(tmp_path: Path) -> None:
    path = write(tmp_path, "model:\n  checkpoint: yolo_nas_s\n")
    assert load_recipe(path).model.checkpoint == "yolo_nas_s"
    (tmp_path / "yolo_nas_s").mkdir()
    assert load_recipe(path).model.checkpoint == str(tmp_path / "yolo_nas_s")
    # Ultralytics' names are aliases too: the weights file and the sample datasets
    ultralytics = write(
        tmp_path, "model:\n  checkpoint: yolo_nas_m.pt\nvalidation:\n  data: coco8.yaml\n", "u.yaml"
    )
    recipe = load_recipe(ultralytics)
    assert (recipe.model.checkpoint, recipe.validation.data) == ("yolo_nas_m.pt", "coco8.yaml")


def test_environment_expansion(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write(
        tmp_path,
        "model:\n  checkpoint: ${WEIGHTS}/s.pt\n"
        "calibration:\n  data: ${NQ_UNSET:-/fallback}/train\n  method: ${NQ_METHOD:-max}\n"
        "validation:\n  data: ${NQ_EMPTY:-/empty-default}/val.json\n"
        "quantization:\n  skip: ['${NQ_LAYER}.*']\n",
    )
    monkeypatch.setenv("WEIGHTS", "/w")
    monkeypatch.delenv("NQ_UNSET", raising=False)
    monkeypatch.setenv("NQ_METHOD", "entropy")
    monkeypatch.setenv("NQ_EMPTY", "")
    monkeypatch.setenv("NQ_LAYER", "heads")
    recipe = load_recipe(path)
    assert recipe.model.checkpoint == "/w/s.pt"
    assert recipe.calibration.data == "/fallback/train"
    assert recipe.calibration.method == "entropy"
    assert recipe.validation.data == "/empty-default/val.json"
    assert recipe.quantization.skip == ["heads.*"]

    monkeypatch.delenv("WEIGHTS")
    message = error_of(path)
    assert "model.checkpoint: environment variable WEIGHTS is not set" in message
    assert "${WEIGHTS:-default}" in message


def test_a_default_may_hold_references_and_is_expanded_only_when_used(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write(
        tmp_path,
        "model:\n  checkpoint: ${NQ_A:-${NQ_B:-/nested}}/s.pt\n"
        "calibration:\n  data: ${NQ_C:-${NQ_UNSET_TOO}}/train\n",  # the default is never needed
    )
    for name in ("NQ_A", "NQ_B", "NQ_UNSET_TOO"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NQ_C", "/c")
    monkeypatch.setenv("NQ_B", "/b")
    recipe = load_recipe(path)
    assert recipe.model.checkpoint == "/b/s.pt"  # not "${NQ_B:-/nested}" or "/nested}"
    assert recipe.calibration.data == "/c/train"
    monkeypatch.delenv("NQ_B")
    assert load_recipe(path).model.checkpoint == "/nested/s.pt"
    unset = write(tmp_path, "model:\n  checkpoint: ${NQ_A:-${NQ_B}}/s.pt\n", "unset.yaml")
    assert "model.checkpoint: environment variable NQ_B is not set" in error_of(unset)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("${NQ_A:-${B}", "has a ${...} without its closing brace"),
        ("${1X}", "is not ${VAR} or ${VAR:-default}"),
        ("${A B}", "is not ${VAR} or ${VAR:-default}"),
    ],
)
def test_malformed_references_are_named(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, text: str, expected: str
) -> None:
    monkeypatch.delenv("NQ_A", raising=False)
    monkeypatch.setenv("B", "b")
    assert expected in error_of(write(tmp_path, f"model:\n  checkpoint: '{text}'\n"))


def test_the_default_name_is_the_file_stem_made_valid(tmp_path: Path) -> None:
    # "my recipe.yaml" used to fail on a `name` key nobody wrote.
    assert load_recipe(write(tmp_path, MINIMAL, "my recipe (v2).yaml")).name == "my_recipe_v2_"
    assert load_recipe(write(tmp_path, MINIMAL, "s_int8.yaml")).name == "s_int8"
    assert load_recipe(write(tmp_path, MINIMAL, "...yaml")).name == "recipe"


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        (
            "calibration:\n  allow_overlap: yes\n",
            "calibration.allow_overlap: expected true or false, got 'yes'",
        ),
        (
            "calibration:\n  allow_overlap: on\n",
            "calibration.allow_overlap: expected true or false, got 'on'",
        ),
        ("export:\n  simplify: No\n", "export.simplify: expected true or false, got 'No'"),
        ("calibration:\n  seed: -1\n", "calibration.seed: must be at least 0, got -1"),
        ("export:\n  opset: 99\n", "export.opset: must be at most 20, got 99"),
        ("input:\n  size: 16384\n", "input.size: must be at most 8192, got 16384"),
        ("benchmark:\n  iterations: 1:30\n", "benchmark.iterations: expected an integer, got '1:30'"),
        ("validation:\n  conf: 0\n", "validation.conf: must be greater than 0, got 0.0"),
        ("finetune:\n  steps: 0\n", "finetune.steps: must be at least 1, got 0"),
        ("finetune:\n  device: tpu\n", "finetune.device"),
    ],
)
def test_values_are_range_checked_when_read(tmp_path: Path, line: str, expected: str) -> None:
    assert expected in error_of(write(tmp_path, MINIMAL + line))


def test_yaml_1_2_numbers(tmp_path: Path) -> None:
    # YAML 1.1 (PyYAML) reads 0512 as octal 330 and 1e-3 as a string; recipes read them as written.
    recipe = load_recipe(
        write(tmp_path, MINIMAL + "calibration:\n  num_images: 0512\n  percentile: 1e+2\n  seed: 0x10\n")
    )
    assert (recipe.calibration.num_images, recipe.calibration.percentile, recipe.calibration.seed) == (
        512,
        100.0,
        16,
    )
    assert load_recipe(write(tmp_path, MINIMAL), ["calibration.allow_overlap=true"]).calibration.allow_overlap
    assert "expected true or false, got 'y'" in error_of(
        write(tmp_path, MINIMAL), ("calibration.allow_overlap=y",)
    )


# --- --set -------------------------------------------------------------------------------------


def test_set_values_are_yaml_typed(tmp_path: Path) -> None:
    path = write(tmp_path, "model:\n  checkpoint: a.pt\ninput:\n  size: 320\n")
    recipe = load_recipe(
        path,
        [
            "calibration.num_images=128",
            "quantization.skip=[heads.*, backbone.stem.*]",
            "input.size=null",
            "export.simplify=false",
            "calibration.percentile=99.9",
            "engines.precisions=[int8]",
            "name=other",
            "output.fail_on_drop=0.5",
        ],
    )
    assert recipe.calibration.num_images == 128
    assert recipe.quantization.skip == ["heads.*", "backbone.stem.*"]
    assert recipe.input.size is None
    assert recipe.export.simplify is False
    assert recipe.calibration.percentile == 99.9
    assert recipe.engines.precisions == ["int8"]
    assert recipe.name == "other"
    assert recipe.output.fail_on_drop == 0.5
    # A whole section can be set as a mapping; the last --set of a key wins.
    recipe = load_recipe(path, ["benchmark={warmup: 1, iterations: 2}", "benchmark.iterations=3"])
    assert (recipe.benchmark.warmup, recipe.benchmark.iterations) == (1, 3)


# --- errors ------------------------------------------------------------------------------------

MINIMAL = "model:\n  checkpoint: a.pt\n"


@pytest.mark.parametrize(
    ("text", "overrides", "expected"),
    [
        (
            MINIMAL + "calibraton:\n  num_images: 8\n",
            (),
            "unknown key 'calibraton' (did you mean 'calibration'? allowed: name, model, input, calibration,",
        ),
        (
            MINIMAL + "calibration:\n  methd: max\n",
            (),
            "unknown key 'calibration.methd' (did you mean 'calibration.method'? allowed: data, format,",
        ),
        (
            MINIMAL + "calibration:\n  method: maxx\n",
            (),
            "calibration.method: 'maxx' is not one of max, percentile, entropy, mse",
        ),
        (MINIMAL + "input:\n  size: big\n", (), "input.size: expected an integer, got 'big'"),
        (
            MINIMAL + "calibration:\n  num_images: 12.0\n",
            (),
            "calibration.num_images: expected an integer, got 12.0",
        ),
        (
            MINIMAL + "export:\n  simplify: 'true'\n",
            (),
            "export.simplify: expected true or false, got 'true'",
        ),
        (MINIMAL + "export:\n  simplify: 1\n", (), "export.simplify: expected true or false, got 1"),
        (MINIMAL + "calibration:\n  method: true\n", (), "calibration.method: true is not one of max,"),
        (MINIMAL + "input:\n  size: [640]\n", (), "input.size: expected an integer, got a list"),
        ("model:\n  checkpoint: [a.pt]\n", (), "model.checkpoint: expected a string, got a list"),
        (
            MINIMAL + "quantization:\n  skip: heads.*\n",
            (),
            "quantization.skip: expected a list, got 'heads.*'",
        ),
        (MINIMAL + "quantization:\n  skip: [a, 3]\n", (), "quantization.skip[1]: expected a string, got 3"),
        (
            MINIMAL + "engines:\n  precisions: [fp16, int4]\n",
            (),
            "engines.precisions[1]: 'int4' is not one of",
        ),
        (MINIMAL + "engines:\n  precisions: []\n", (), "engines.precisions: must not be empty"),
        (
            MINIMAL + "benchmark:\n  batch_sizes: [1, 0]\n",
            (),
            "benchmark.batch_sizes[1]: must be at least 1, got 0",
        ),
        (MINIMAL + "benchmark:\n  batch_sizes: [1, 1]\n", (), "benchmark.batch_sizes: lists 1 twice"),
        (MINIMAL + "input:\n  size: 300\n", (), "input.size: must be a multiple of 32, got 300"),
        (
            MINIMAL + "calibration:\n  percentile: 0\n",
            (),
            "calibration.percentile: must be greater than 0, got 0",
        ),
        (
            MINIMAL + "calibration:\n  percentile: .nan\n",
            (),
            "calibration.percentile: expected a number, got nan",
        ),
        (MINIMAL + "export:\n  opset: 11\n", (), "export.opset: must be at least 13, got 11"),
        (
            MINIMAL + "engines:\n  optimization_level: 6\n",
            (),
            "engines.optimization_level: must be at most 5",
        ),
        (
            MINIMAL + "engines:\n  min_batch: 4\n  opt_batch: 2\n",
            (),
            "engines.opt_batch: 2 is below min_batch 4",
        ),
        (MINIMAL + "name: my run\n", (), "name: 'my run' must be letters, digits, '.', '_' and '-'"),
        (
            "model:\n  checkpoint: a.pt\n  sha256: abc\n",
            (),
            "model.sha256: 'abc' must be 64 hexadecimal characters",
        ),
        (MINIMAL + "model:\n  variant: yolo_nas_x\n", (), "duplicate key 'model'"),
        (
            "model:\n  checkpoint: a.pt\n  variant: yolo_nas_x\n",
            (),
            "model.variant: 'yolo_nas_x' is not one of",
        ),
        ("model:\n  checkpoint: ''\n", (), "model.checkpoint: must not be empty"),
        ("model:\n  variant: yolo_nas_s\n", (), "missing required key 'model.checkpoint'"),
        ("input:\n  size: 640\n", (), "missing required key 'model.checkpoint'"),
        (MINIMAL + "input: 640\n", (), "input: expected a mapping, got 640"),
        (
            MINIMAL,
            ("calibration.methd=max",),
            "unknown key 'calibration.methd' in --set (did you mean 'calibration.method'?",
        ),
        (
            MINIMAL,
            ("calibraton.method=max",),
            "unknown key 'calibraton' in --set (did you mean 'calibration'?",
        ),
        (MINIMAL, ("calibration.method=maxx",), "--set calibration.method: 'maxx' is not one of max,"),
        (MINIMAL, ("input.size=big",), "--set input.size: expected an integer, got 'big'"),
        (MINIMAL, ("quantization.skip=heads.*",), "--set quantization.skip: expected a list, got 'heads.*'"),
        (MINIMAL, ("quantization.skip=heads.*",), "or 'heads.*' is not one of auto"),
        (MINIMAL, ("quantization.skip=auto",), "quantization.skip: auto needs a budget: set max_map_drop"),
        (MINIMAL, ("quantization.max_map_drop=2",), "quantization.max_map_drop: must be at most 1, got 2"),
        (MINIMAL, ("calibration={methd: max}",), "unknown key 'calibration.methd' in --set"),
        (
            MINIMAL,
            ("calibration.method.x=1",),
            "--set calibration.method.x: calibration.method is a value, not a",
        ),
        (MINIMAL, ("calibration.num_images",), "--set expects KEY=VALUE"),
        (
            MINIMAL,
            ("input.size=[1",),
            "--set input.size: cannot parse '[1' at line 1, column 3: expected ',' or ']'",
        ),
    ],
)
def test_error_names_file_and_key(
    tmp_path: Path, text: str, overrides: tuple[str, ...], expected: str
) -> None:
    assert expected in error_of(write(tmp_path, text), overrides)


def test_file_errors(tmp_path: Path) -> None:
    assert error_of(tmp_path / "absent.yaml").endswith("no such recipe file")
    assert "is a folder" in error_of(tmp_path)
    assert "invalid YAML at line 3, column 1: expected ',' or ']'" in error_of(
        write(tmp_path, "model:\n  checkpoint: [a\n", "bad.yaml")
    )
    assert "expected a mapping of sections (model, input, ...), got a list" in error_of(
        write(tmp_path, "- model\n", "list.yaml")
    )
    assert "got nothing" in error_of(write(tmp_path, "# only a comment\n", "empty.yaml"))
    assert "got 'model'" in error_of(write(tmp_path, "model\n", "scalar.yaml"))


def test_require_names_the_key(tmp_path: Path) -> None:
    recipe = load_recipe(write(tmp_path, MINIMAL))
    with pytest.raises(NasquantError, match=r"r\.yaml: calibration\.data is required to quantize \(.*--set"):
        recipe.require("calibration.data", purpose="to quantize")


def test_recipe_from_dict_errors() -> None:
    with pytest.raises(NasquantError, match=r"^recipe: missing required key 'name'$"):
        recipe_from_dict({"model": {"checkpoint": "a.pt"}})
    with pytest.raises(NasquantError, match=r"^recipe: expected a mapping of sections"):
        recipe_from_dict(["model"])  # type: ignore[arg-type]


# --- round trips and hashes --------------------------------------------------------------------

CUSTOM = """
name: custom
model:
  checkpoint: w/s.pt
  variant: yolo_nas_s
  class_names: [a, b]
  sha256: 0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef
input: {size: 416, batch: 2}
calibration: {data: calib, format: images, num_images: 64, method: percentile, percentile: 99.9}
quantization: {skip: [heads.*], per_channel_weights: false}
export: {opset: 13, dynamic_batch: true}
engines: {precisions: [int8], min_batch: 1, opt_batch: 4, max_batch: 8, hardware_compatibility: ampere_plus}
validation: {data: val.json, max_images: 10, conf: 0.001}
benchmark: {batch_sizes: [1, 4], threads: 3, size: 640}
output: {dir: somewhere, fail_on_drop: 1}
"""


@pytest.mark.parametrize("path", [*RECIPES, "custom"], ids=lambda p: getattr(p, "stem", p))
def test_to_dict_round_trip_is_identity(path: Path | str, tmp_path: Path) -> None:
    recipe = load_recipe(write(tmp_path, CUSTOM) if path == "custom" else path)
    data = recipe.to_dict()
    assert list(data) == ["name", "model", "input", "calibration", "quantization", "finetune", "export", "engines", "openvino",
                          "validation", "benchmark", "output"]  # fmt: skip
    assert yaml.safe_load(yaml.safe_dump(data)) == data == json.loads(json.dumps(data))
    again = recipe_from_dict(data)
    assert again == recipe
    assert again.to_dict() == data


def test_custom_values_survive(tmp_path: Path) -> None:
    recipe = load_recipe(write(tmp_path, CUSTOM))
    assert recipe.output.fail_on_drop == 1.0 and isinstance(recipe.output.fail_on_drop, float)
    assert recipe.validation.conf == 0.001
    assert recipe.model.class_names == ["a", "b"]
    assert recipe.output_dir == Path("somewhere")


def test_dump_loads_back_equal_from_anywhere(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    recipe = load_recipe(write(tmp_path / "recipes", CUSTOM), ["calibration.seed=7"])
    written = recipe.dump(tmp_path / "runs" / "custom")
    assert written == tmp_path / "runs" / "custom" / RESOLVED_NAME
    assert [p.name for p in written.parent.iterdir()] == [RESOLVED_NAME]  # no temporary file left
    monkeypatch.chdir(tmp_path / "runs")
    again = load_recipe(written)
    assert again == recipe
    assert again.source == written
    assert again.calibration.seed == 7
    assert recipe.dump(tmp_path / "copy.yml") == tmp_path / "copy.yml"
    assert load_recipe(tmp_path / "copy.yml") == recipe


def test_section_hash(tmp_path: Path) -> None:
    path = write(tmp_path, CUSTOM)
    recipe = load_recipe(path)
    base = recipe.section_hash("model", "calibration")
    assert len(base) == 64
    assert recipe.section_hash("calibration", "model") == base
    assert load_recipe(path).section_hash("model", "calibration") == base
    assert load_recipe(path, ["calibration.num_images=65"]).section_hash("model", "calibration") != base
    assert load_recipe(path, ["model.class_names=[a, c]"]).section_hash("model", "calibration") != base
    other_section = load_recipe(path, ["benchmark.iterations=7", "export.opset=18"])
    assert other_section.section_hash("model", "calibration") == base
    assert other_section.section_hash() != recipe.section_hash()
    assert recipe.section_hash("model") != base
    with pytest.raises(ValueError, match="no recipe section 'calib'"):
        recipe.section_hash("calib")


def test_recipe_is_frozen(tmp_path: Path) -> None:
    recipe = load_recipe(write(tmp_path, MINIMAL))
    with pytest.raises(dataclasses.FrozenInstanceError):
        recipe.calibration.num_images = 3  # type: ignore[misc]

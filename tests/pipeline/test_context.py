"""The pipeline's shared floor: recipe fields a stage may read, stage keys, the one cache helper."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from nasquant.errors import NasquantError
from nasquant.pipeline.context import (
    STAGES_NAME,
    RunContext,
    StageCache,
    UndeclaredRead,
    cached_stage,
    stage_key,
)
from nasquant.recipe import ExportSection, recipe_from_dict


@pytest.fixture
def ctx(tmp_path: Path) -> RunContext:
    recipe = recipe_from_dict({"model": {"checkpoint": "s.pt"}}, source=tmp_path / "r.yaml")
    return RunContext(recipe, tmp_path, StageCache(tmp_path, resume=True), log=lambda _: None)


def test_a_stage_reads_only_what_it_declared(ctx: RunContext) -> None:
    fields = ctx.fields("export", "benchmark.iterations")
    assert isinstance(fields.export, ExportSection)  # a whole section is the section itself
    assert fields.benchmark.iterations == 50
    with pytest.raises(UndeclaredRead, match="benchmark.warmup"):
        fields.benchmark.warmup  # noqa: B018 - reading is the check
    with pytest.raises(UndeclaredRead, match="'calibration'"):
        fields.calibration  # noqa: B018
    assert set(fields.values) == {"export", "benchmark.iterations"}


def test_the_key_follows_declared_fields_only(ctx: RunContext) -> None:
    def key(recipe) -> str:
        return stage_key(replace(ctx, recipe=recipe).fields("export.opset").values)

    base = key(ctx.recipe)
    assert key(replace(ctx.recipe, export=replace(ctx.recipe.export, opset=16))) != base
    assert key(replace(ctx.recipe, export=replace(ctx.recipe.export, simplify=False))) == base


def test_a_stage_computes_once_and_again_when_its_key_or_output_changes(ctx: RunContext) -> None:
    calls: list[int] = []
    output = ctx.run_dir / "out.bin"

    def compute() -> dict:
        calls.append(1)
        output.write_bytes(b"x")
        return {"n": len(calls)}

    def run(key: str):
        return cached_stage(ctx, "demo", key, compute, summary=lambda r: f"n={r['n']}", outputs=[output])

    first, again = run("k1"), run("k1")
    assert (first.reused, again.reused, again.result, len(calls)) == (False, True, {"n": 1}, 1)
    assert run("k2").result == {"n": 2}
    output.unlink()
    assert run("k2").reused is False and len(calls) == 3
    timings = json.loads((ctx.run_dir / "timings.json").read_text())["stages"]
    assert [t["reused"] for t in timings] == [False, True, False, False]
    assert json.loads((ctx.run_dir / STAGES_NAME).read_text())["demo"]["key"] == "k2"


def test_without_resume_nothing_is_reused(ctx: RunContext) -> None:
    fresh = replace(ctx, cache=StageCache(ctx.run_dir, resume=False))
    fresh.cache.put("demo", "k", {"n": 1})
    assert cached_stage(fresh, "demo", "k", lambda: {"n": 2}, summary=str).result == {"n": 2}


def test_a_damaged_stage_record_is_one_clear_error(tmp_path: Path) -> None:
    (tmp_path / STAGES_NAME).write_text('{"calibrate": {"result": 1}}')
    with pytest.raises(NasquantError, match="not a record of stages.*run without --resume"):
        StageCache(tmp_path, resume=True)

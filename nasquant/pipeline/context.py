"""What every stage shares: the run folder's context, the one cache helper, and stage keys.

A stage's cache key is built from everything it reads: the recipe fields it declares (it can read no
other: :class:`RecipeFields` raises), the keys of the stages it builds on, the files it reads, and the
nasquant version. ``--resume`` then reruns exactly the stages whose inputs changed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nasquant._version import __version__
from nasquant.artifacts import STAGES_NAME, TIMINGS_NAME, ArtifactLayout, file_sha256
from nasquant.errors import NasquantError
from nasquant.io import write_json
from nasquant.recipe import Recipe

Log = Callable[[str], None]


def stage_key(*parts: object) -> str:
    """A short, stable hash of ``parts`` (JSON; dataclasses as dicts, paths as strings).

    The nasquant version is part of every key: a newer version may calibrate, export or measure
    differently, so ``--resume`` never mixes its stages with an older version's results.
    """
    payload = json.dumps([__version__, *parts], sort_keys=True, default=_plain)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def file_key(path: Path) -> str:
    """The content hash of a file a stage reads (short, like every key)."""
    return file_sha256(path)[:16]


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    return str(value)


class UndeclaredRead(AttributeError):
    """A stage read a recipe field it did not declare: its cache key would miss that field."""


class RecipeFields:
    """The recipe fields one stage reads, and nothing else.

    ``fields.export.opset`` works when the stage declared ``"export"`` (then ``fields.export`` is the
    section itself) or ``"export.opset"``; any other field raises :class:`UndeclaredRead`. The stage's key hashes :attr:`values`, so it covers every
    recipe value the stage can use, by construction.
    """

    def __init__(self, recipe: Recipe, paths: Sequence[str]) -> None:
        self._recipe, self._paths = recipe, tuple(paths)
        self.values = {path: _value(recipe, path) for path in self._paths}

    def allows(self, section: str, name: str | None = None) -> bool:
        return section in self._paths or (name is not None and f"{section}.{name}" in self._paths)

    def __getattr__(self, section: str) -> Any:
        if section.startswith("_") or not any(p.split(".")[0] == section for p in self._paths):
            raise UndeclaredRead(f"the stage did not declare recipe section {section!r}")
        if section in self._paths:  # the whole section is read (and keyed): the section itself
            return getattr(self._recipe, section)
        return _SectionFields(self, section, getattr(self._recipe, section))

    def resolve_path(self, value: str) -> str:
        return self._recipe.resolve_path(value)

    @property
    def label(self) -> str:
        """How messages name the recipe (not an input: the file's name)."""
        return self._recipe.label


class _SectionFields:
    def __init__(self, fields: RecipeFields, name: str, section: object) -> None:
        self._fields, self._name, self._section = fields, name, section

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_") or not self._fields.allows(self._name, name):
            raise UndeclaredRead(f"the stage did not declare recipe field {self._name}.{name}")
        return getattr(self._section, name)


def _value(recipe: Recipe, path: str) -> Any:
    section, _, name = path.partition(".")
    value = getattr(recipe, section)
    return getattr(value, name) if name else value


class StageCache:
    """``stages.json``: per stage, the key of its inputs and its (JSON) result."""

    def __init__(self, run_dir: Path, *, resume: bool) -> None:
        self.path = run_dir / STAGES_NAME
        self.resume = resume
        self.entries: dict = self._read() if resume and self.path.exists() else {}

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

    def get(self, stage: str, key: str, outputs: Iterable[Path] = ()) -> dict | None:
        entry = self.entries.get(stage)
        if self.resume and entry and entry["key"] == key and all(p.exists() for p in outputs):
            return entry["result"]
        return None

    def put(self, stage: str, key: str, result: dict) -> dict:
        self.entries[stage] = {"key": key, "result": result}
        write_json(self.path, self.entries)
        return result


@dataclass
class RunContext:
    """One run folder, built once per run: the recipe as given, the stage cache and the log."""

    recipe: Recipe
    run_dir: Path
    cache: StageCache
    log: Log = print
    progress: bool = True
    timings: list[dict] = field(default_factory=list)

    @property
    def layout(self) -> ArtifactLayout:
        """Every file name of the run folder."""
        return ArtifactLayout(self.run_dir)

    def fields(self, *paths: str) -> RecipeFields:
        return RecipeFields(self.recipe, paths)

    def finished(self, stage: str, summary: str, started: float, *, reused: bool = False) -> None:
        """Log a stage's line and rewrite ``timings.json`` (so a stopped run still says where time went)."""
        seconds = time.perf_counter() - started
        self.log(f"[{stage}] {summary} — {seconds:.1f} s" + (" (reused)" if reused else ""))
        self.timings.append(
            {"stage": stage, "summary": summary, "seconds": round(seconds, 3), "reused": reused}
        )
        write_json(self.run_dir / TIMINGS_NAME, {"stages": self.timings})


@dataclass(frozen=True)
class StageRecord:
    """A cached stage's outcome: its key, its JSON result, and whether it came from the cache."""

    key: str
    result: dict
    reused: bool


def cached_stage(
    ctx: RunContext,
    stage: str,
    key: str,
    compute: Callable[[], dict],
    *,
    summary: Callable[[dict], str],
    outputs: Iterable[Path] = (),
) -> StageRecord:
    """The one place a stage is looked up, computed, recorded, timed and logged: ``compute`` runs only
    when ``stages.json`` holds no result for ``key`` (or a file in ``outputs`` is missing)."""
    started = time.perf_counter()
    outputs = list(outputs)
    result = ctx.cache.get(stage, key, outputs)
    reused = result is not None
    if result is None:
        result = ctx.cache.put(stage, key, compute())
    ctx.finished(stage, summary(result), started, reused=reused)
    return StageRecord(key, result, reused)

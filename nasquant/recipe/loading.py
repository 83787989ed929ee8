"""Reading a recipe: YAML (with ``${VAR}`` expansion and ``--set`` overrides) validated into the typed
sections by one generic walker over their type hints; every problem is one line naming file and key."""

from __future__ import annotations

import dataclasses
import difflib
import functools
import math
import os
import re
from collections.abc import Sequence
from dataclasses import MISSING, dataclass
from pathlib import Path
from types import NoneType, UnionType
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

from nasquant.errors import NasquantError
from nasquant.recipe.sections import Recipe, _label, _resolve_path, _yaml_fields
from nasquant.safe_yaml import load_yaml

_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def load_recipe(path: str | os.PathLike, overrides: Sequence[str] = ()) -> Recipe:
    """Read, override and validate a recipe file; every problem is one line naming the file and key.


    ``overrides`` are ``"dotted.key=value"`` strings (``--set``), applied on top of the file.
    """
    label = os.fspath(path)
    source = Path(os.path.abspath(path))
    data = _read_yaml(source, label)
    overridden = []
    for override in overrides:
        key, value = _parse_override(override, label)
        _set_dotted(data, key, value, label)
        overridden.append(key)
    return _validate(data, source, _Context(label, source.parent, frozenset(overridden)))


def recipe_from_dict(data: dict, *, source: Path | None = None) -> Recipe:
    """Validate a mapping shaped like a recipe file; relative paths resolve against ``source``'s folder.


    Without ``source`` they resolve against the current directory, and ``name`` is required.
    """
    source = Path(os.path.abspath(source)) if source is not None else None
    label = _label(source)
    data = _top_mapping(data, label)
    return _validate(data, source, _Context(label, source.parent if source is not None else Path.cwd()))


def _validate(data: dict, source: Path | None, context: _Context) -> Recipe:
    if source is not None:
        data = {"name": _name_from_file(source), **data}
    return dataclasses.replace(_build(Recipe, data, "", context), source=source)


def check_value(section: type, name: str, value: Any) -> Any:
    """``value`` checked against the recipe field ``section.name`` (type and bounds), for a command-line
    option that mirrors it: the recipe field is the one place its limits are written. The error message
    is the field's own, without a file or key (the caller names the option)."""
    fields = {f.name: f for f in _yaml_fields(section)}
    context = _Context(label="", base=Path.cwd())
    return _field_value(value, _hints(section)[name], fields[name].metadata, "", context)


def _name_from_file(source: Path) -> str:
    """The default run name: the file's stem with what a name may not hold (spaces, ...) made ``_``."""
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", source.stem).lstrip("._-")
    return name or "recipe"


@dataclass(frozen=True)
class _Context:
    """What error messages and path resolution need to know while one recipe is validated."""

    label: str
    base: Path
    overridden: frozenset[str] = frozenset()

    def from_set(self, key: str) -> bool:
        return any(key == k or key.startswith((f"{k}.", f"{k}[")) for k in self.overridden)

    def error(self, key: str, message: str) -> NasquantError:
        origin = "--set " if self.from_set(key) else ""
        where = ": ".join(part for part in (self.label, f"{origin}{key}") if part)
        return NasquantError(f"{where}: {message}" if where else message)


def _read_yaml(source: Path, label: str) -> dict:
    try:
        text = source.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise NasquantError(f"{label}: no such recipe file") from None
    except IsADirectoryError:
        raise NasquantError(f"{label}: is a folder, not a recipe file") from None
    except UnicodeDecodeError:
        raise NasquantError(f"{label}: not a UTF-8 text file") from None
    except OSError as exc:
        raise NasquantError(f"{label}: cannot read it: {exc.strerror or exc}") from None
    return _top_mapping(load_yaml(text, label), label)


def _top_mapping(data: Any, label: str) -> dict:
    if not isinstance(data, dict):
        got = "nothing" if data is None else _describe(data)
        raise NasquantError(f"{label}: expected a mapping of sections (model, input, ...), got {got}")
    return data


def _parse_override(override: str, label: str) -> tuple[str, Any]:
    key, sep, text = override.partition("=")
    key = key.strip()
    if not sep or not key:
        raise NasquantError(
            f"{label}: --set expects KEY=VALUE (e.g. calibration.num_images=128), got {override!r}"
        )
    cls: Any = Recipe
    parts = key.split(".")
    for depth, part in enumerate(parts):
        dotted = ".".join(parts[: depth + 1])
        if not (isinstance(cls, type) and dataclasses.is_dataclass(cls)):
            parent = ".".join(parts[:depth])
            raise NasquantError(f"{label}: --set {key}: {parent} is a value, not a section")
        names = [f.name for f in _yaml_fields(cls)]
        if part not in names:
            raise NasquantError(_unknown_key(label, dotted, names, " in --set"))
        cls = _hints(cls)[part]
    return key, load_yaml(text, f"{label}: --set {key}", failure=f"cannot parse {_describe(text)}")


def _set_dotted(data: dict, key: str, value: Any, label: str) -> None:
    *sections, leaf = key.split(".")
    node = data
    for depth, part in enumerate(sections):
        # An empty section in the file (all its fields commented out) reads as null: all defaults.
        if node.get(part) is None:
            node[part] = {}
        node = node[part]
        if not isinstance(node, dict):
            dotted = ".".join(sections[: depth + 1])
            raise NasquantError(f"{label}: {dotted}: expected a mapping, got {_describe(node)}")
    node[leaf] = value


def _build(cls: type, raw: Any, key: str, context: _Context) -> Any:
    """Validate ``raw`` against the dataclass ``cls`` field by field, recursing into sections."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise context.error(key, f"expected a mapping, got {_describe(raw)}")
    fields = _yaml_fields(cls)
    names = [f.name for f in fields]
    # Unknown keys first: a misspelt section would otherwise surface as a confusing "missing" error.
    for name in raw:
        if name not in names:
            dotted = f"{key}.{name}" if key else str(name)
            origin = " in --set" if context.from_set(dotted) else ""
            raise NasquantError(_unknown_key(context.label, dotted, names, origin))
    hints = _hints(cls)
    values = {}
    for f in fields:
        dotted = f"{key}.{f.name}" if key else f.name
        if f.name in raw:
            values[f.name] = _field_value(raw[f.name], hints[f.name], f.metadata, dotted, context)
        elif dataclasses.is_dataclass(hints[f.name]):
            # An absent section is an empty one: its defaults, or an error naming its required key.
            values[f.name] = _build(hints[f.name], {}, dotted, context)
        elif f.default is MISSING and f.default_factory is MISSING:
            raise NasquantError(f"{context.label}: missing required key '{dotted}'")
    built = cls(**values)
    # Checks between fields of one section (e.g. min_batch <= opt_batch) live on the section itself.
    cross_checks = getattr(built, "_cross_checks", None)
    for name, message in cross_checks() if cross_checks else []:
        raise context.error(f"{key}.{name}", message)
    return built


def _field_value(value: Any, hint: Any, metadata: Any, key: str, context: _Context) -> Any:
    value = _convert(value, hint, key, context)
    _check(value, metadata, key, context)
    if metadata.get("path") and value is not None:
        value = _resolve_path(value, Path.cwd() if context.from_set(key) else context.base)
    return value


def _convert(value: Any, hint: Any, key: str, context: _Context) -> Any:
    """``value`` checked against the type hint ``hint``; no coercion except int -> float."""
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, key, context)
    origin, args = get_origin(hint), get_args(hint)
    if origin in (Union, UnionType):
        if value is None:
            return None
        alternatives = [arg for arg in args if arg is not NoneType]
        if len(alternatives) == 1:
            return _convert(value, alternatives[0], key, context)
        # e.g. ``list[str] | Literal["auto"]``: a list value is checked as the list alternative (its
        # error names the bad item); anything else against each alternative in turn.
        if isinstance(value, list):
            listed = [arg for arg in alternatives if get_origin(arg) is list]
            if len(listed) == 1:
                return _convert(value, listed[0], key, context)
        problems = []
        for alternative in alternatives:
            try:
                return _convert(value, alternative, key, context)
            except NasquantError as exc:
                problems.append(str(exc).rsplit(": ", 1)[-1])
        raise context.error(key, " or ".join(problems))
    if origin is list:
        if not isinstance(value, list):
            raise context.error(key, f"expected a list, got {_describe(value)}")
        return [_convert(item, args[0], f"{key}[{i}]", context) for i, item in enumerate(value)]
    if isinstance(value, str):
        value = _expand_env(value, key, context)
    if origin is Literal:
        if value not in args:
            raise context.error(key, f"{_describe(value)} is not one of {', '.join(map(str, args))}")
    elif hint is bool:
        if not isinstance(value, bool):
            raise context.error(key, f"expected true or false, got {_describe(value)}")
    elif hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise context.error(key, f"expected an integer, got {_describe(value)}")
    elif hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise context.error(key, f"expected a number, got {_describe(value)}")
        value = float(value)
    elif hint is str:
        if not isinstance(value, str):
            raise context.error(key, f"expected a string, got {_describe(value)}")
    else:
        raise TypeError(f"recipe field {key} has a type the validator does not handle: {hint!r}")
    return value


def _check(value: Any, metadata: Any, key: str, context: _Context) -> None:
    """The field's constraints from :func:`_constrained`."""
    if value is None:
        return
    if metadata.get("nonempty") and isinstance(value, (str, list)) and not value:
        raise context.error(key, "must not be empty")
    if metadata.get("unique") and isinstance(value, list) and len(set(value)) != len(value):
        duplicate = next(item for i, item in enumerate(value) if item in value[:i])
        raise context.error(key, f"lists {_describe(duplicate)} twice")
    pattern = metadata.get("pattern")
    if pattern and not re.fullmatch(pattern[0], value):
        raise context.error(key, f"{_describe(value)} must be {pattern[1]}")
    for i, number in enumerate(value if isinstance(value, list) else [value]):
        where = f"{key}[{i}]" if isinstance(value, list) else key
        if not isinstance(number, (int, float)) or isinstance(number, bool):
            continue
        if metadata.get("ge") is not None and number < metadata["ge"]:
            raise context.error(where, f"must be at least {metadata['ge']}, got {number}")
        if metadata.get("gt") is not None and number <= metadata["gt"]:
            raise context.error(where, f"must be greater than {metadata['gt']}, got {number}")
        if metadata.get("le") is not None and number > metadata["le"]:
            raise context.error(where, f"must be at most {metadata['le']}, got {number}")
        if metadata.get("multiple_of") and number % metadata["multiple_of"]:
            raise context.error(where, f"must be a multiple of {metadata['multiple_of']}, got {number}")


def _expand_env(text: str, key: str, context: _Context) -> str:
    """``${VAR}`` and ``${VAR:-default}`` expanded as the shell does; the default may itself hold
    references (``${A:-${B:-x}}``) and is only expanded when it is used."""
    expanded, _ = _expand_until(text, 0, key, context, closing=False, evaluate=True)
    return expanded


def _expand_until(
    text: str, pos: int, key: str, context: _Context, *, closing: bool, evaluate: bool
) -> tuple[str, int]:
    """Expand ``text`` from ``pos`` to its end, or (``closing``) to the ``}`` that ends a default;
    returns the expansion and the position of that ``}`` (or the end)."""
    parts = []
    while pos < len(text):
        if text.startswith("${", pos):
            value, pos = _expand_reference(text, pos + 2, key, context, evaluate=evaluate)
            parts.append(value)
        elif closing and text[pos] == "}":
            return "".join(parts), pos
        else:
            parts.append(text[pos])
            pos += 1
    if closing:
        raise context.error(key, f"{_describe(text)} has a ${{...}} without its closing brace")
    return "".join(parts), pos


def _expand_reference(text: str, pos: int, key: str, context: _Context, *, evaluate: bool) -> tuple[str, int]:
    """One reference whose ``${`` ends before ``pos``; returns its value and the position after ``}``."""
    match = _ENV_NAME.match(text, pos)
    after = match.end() if match else pos
    if match is None or not text.startswith(("}", ":-"), after):
        raise context.error(
            key, f"{_describe(text)} has a ${{...}} that is not ${{VAR}} or ${{VAR:-default}}"
        )
    name = match.group(0)
    value = os.environ.get(name) if evaluate else ""
    if text.startswith(":-", after):
        # ``:-`` also covers a variable that is set but empty, as in the shell.
        default, end = _expand_until(
            text, after + 2, key, context, closing=True, evaluate=evaluate and not value
        )
        return (value or default), end + 1
    if value is None:
        raise context.error(
            key, f"environment variable {name} is not set (write ${{{name}:-default}} to give a default)"
        )
    return value, after + 1


def _unknown_key(label: str, dotted: str, allowed: list[str], origin: str) -> str:
    parent, _, name = dotted.rpartition(".")
    close = difflib.get_close_matches(name, allowed, n=1)
    suggestion = f"did you mean '{f'{parent}.' if parent else ''}{close[0]}'? " if close else ""
    return f"{label}: unknown key '{dotted}'{origin} ({suggestion}allowed: {', '.join(allowed)})"


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return get_type_hints(cls)


def _describe(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "a mapping"
    text = repr(value)
    return text if len(text) <= 80 else f"{text[:77]}..."

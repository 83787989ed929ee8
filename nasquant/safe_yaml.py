"""The one YAML reader for recipes, ``--set`` values and data yamls: safe, strict and bounded.

It is ``yaml.SafeLoader`` (no arbitrary objects) with four changes:

* **YAML 1.2 core scalars.** PyYAML implements YAML 1.1, where ``yes``/``no``/``on``/``off`` are
  booleans, ``0512`` is octal 330, ``1:30`` is 90 and ``1e-3`` is a string. Here booleans are only
  ``true``/``false`` (any case form YAML 1.2 allows), integers are decimal, ``0o`` octal or ``0x``
  hexadecimal, and floats follow YAML 1.2 (``1e-3`` is a number). Anything else stays a string, so
  ``allow_overlap: yes`` is refused by the recipe validator instead of being read as true.
* **Duplicate keys are refused** (YAML would silently keep the last one).
* **Aliases are bounded.** Anchors and aliases are allowed, but a document may not expand to more
  than :data:`MAX_NODES` nodes when every alias is counted in full, nor refer to itself: a few
  hundred bytes of nested aliases otherwise become gigabytes when a message prints them.
* **Errors are one line** naming the file, line and column, as a :class:`NasquantError`.
"""

from __future__ import annotations

import re
from collections.abc import Hashable
from typing import Any

import yaml

from nasquant.errors import NasquantError

#: Nodes a document may expand to (a recipe has ~100, an LVIS data yaml ~1,300).
MAX_NODES = 100_000
#: Nesting a document may have (recipes and data yamls nest 3-4 deep).
MAX_DEPTH = 64
# Integers beyond this many digits are typos or attacks; int() refuses 4,300 digits with a traceback.
_MAX_DIGITS = 100

_BOOL = re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$")
_INT = re.compile(r"^(?:[-+]?[0-9]+|0o[0-7]+|0x[0-9a-fA-F]+)$")
_FLOAT = re.compile(
    r"^(?:[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?"
    r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"
)


class _Loader(yaml.SafeLoader):
    """SafeLoader with YAML 1.2 core scalars, no duplicate keys and bounded alias expansion."""

    # A copy of SafeLoader's resolver table without its YAML 1.1 bool, int and float entries.
    yaml_implicit_resolvers = {
        first: [
            (tag, regexp)
            for tag, regexp in resolvers
            if tag not in ("tag:yaml.org,2002:bool", "tag:yaml.org,2002:int", "tag:yaml.org,2002:float")
        ]
        for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
    }

    def compose_document(self) -> yaml.Node:
        node = super().compose_document()
        _check_expansion(node)
        return node


_Loader.add_implicit_resolver("tag:yaml.org,2002:bool", _BOOL, list("tTfF"))
_Loader.add_implicit_resolver("tag:yaml.org,2002:int", _INT, list("-+0123456789"))
_Loader.add_implicit_resolver("tag:yaml.org,2002:float", _FLOAT, list("-+.0123456789"))


def _construct_bool(loader: _Loader, node: yaml.ScalarNode) -> bool:
    return loader.construct_scalar(node).lower() == "true"


def _construct_int(loader: _Loader, node: yaml.ScalarNode) -> int:
    text = loader.construct_scalar(node)
    if len(text) > _MAX_DIGITS:
        raise yaml.constructor.ConstructorError(
            None, None, f"an integer of {len(text)} digits", node.start_mark
        )
    if text.startswith("0o"):
        return int(text[2:], 8)
    if text.startswith("0x"):
        return int(text[2:], 16)
    return int(text, 10)  # "0512" is 512 in YAML 1.2, not octal


def _construct_float(loader: _Loader, node: yaml.ScalarNode) -> float:
    text = loader.construct_scalar(node).lower()
    if text.endswith((".inf", ".nan")):  # YAML spells them with a dot, Python without
        return float(text.replace(".", ""))
    return float(text)


def _construct_mapping(loader: _Loader, node: yaml.MappingNode) -> dict:
    loader.flatten_mapping(node)
    seen: set = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node)
        # Unhashable keys are left to construct_mapping, which refuses them with its own message.
        if not isinstance(key, Hashable):
            continue
        if key in seen:
            raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
        seen.add(key)
    return loader.construct_mapping(node)


_Loader.add_constructor("tag:yaml.org,2002:bool", _construct_bool)
_Loader.add_constructor("tag:yaml.org,2002:int", _construct_int)
_Loader.add_constructor("tag:yaml.org,2002:float", _construct_float)
_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    if isinstance(node, yaml.MappingNode):
        return [part for pair in node.value for part in pair]
    return []


def _check_expansion(root: yaml.Node | None) -> None:
    """Refuse a node graph that refers to itself or expands (aliases counted in full) past the limits.

    Iterative, with the size of each shared node computed once, so the check itself is linear.
    """
    if root is None:
        return
    size: dict[int, int] = {}
    depth: dict[int, int] = {}
    on_path: set[int] = set()
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, done = stack.pop()
        key = id(node)
        if done:
            on_path.discard(key)
            children = _children(node)
            size[key] = 1 + sum(size[id(child)] for child in children)
            depth[key] = 1 + max((depth[id(child)] for child in children), default=0)
            if size[key] > MAX_NODES:
                raise yaml.composer.ComposerError(
                    None, None, f"aliases expand the document past {MAX_NODES:,} nodes", node.start_mark
                )
            if depth[key] > MAX_DEPTH:
                raise yaml.composer.ComposerError(
                    None, None, f"the document nests more than {MAX_DEPTH} deep", node.start_mark
                )
            continue
        if key in size:
            continue
        if key in on_path:
            raise yaml.composer.ComposerError(None, None, "an alias refers to itself", node.start_mark)
        on_path.add(key)
        stack.append((node, True))
        stack.extend((child, False) for child in _children(node) if id(child) not in size)


def load_yaml(text: str, label: str, *, failure: str = "invalid YAML") -> Any:
    """Parse one YAML document with the rules above; an error is one line: ``label: failure where: what``."""
    try:
        return yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as exc:
        raise NasquantError(f"{label}: {failure}{_yaml_problem(exc)}") from None
    except RecursionError:
        # PyYAML composes nested collections recursively; thousands of "[" exhaust the stack first.
        raise NasquantError(f"{label}: {failure}: the document nests more than {MAX_DEPTH} deep") from None


def _yaml_problem(exc: yaml.YAMLError) -> str:
    """``: <what>`` plus where, in one line (PyYAML's own text spans several, quoting the source)."""
    if not isinstance(exc, yaml.MarkedYAMLError) or exc.problem is None:
        return f": {' '.join(str(exc).split())}"
    mark = exc.problem_mark
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    return f"{where}: {' '.join(exc.problem.split())}"

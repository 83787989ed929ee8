"""The package's floors, read from its own source: no import circle, nothing reaches upward, and the
ground floor (the artifact contract) stays light enough for the CLI to load without torch."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "nasquant"

#: The ground floor: what producers and consumers share. It imports nothing above itself.
GROUND = {"nasquant.errors", "nasquant._version", "nasquant.io", "nasquant.artifacts", "nasquant.checks"}
#: What each floor may not import (directly or from a function body).
FORBIDDEN = {
    "nasquant.runtime": (
        "nasquant.export",
        "nasquant.quant",
        "nasquant.pipeline",
        "nasquant.api",
        "nasquant.cli",
    ),
    "nasquant.eval": (
        "nasquant.export",
        "nasquant.quant",
        "nasquant.pipeline",
        "nasquant.api",
        "nasquant.cli",
    ),
    "nasquant.export": ("nasquant.runtime", "nasquant.pipeline", "nasquant.api", "nasquant.cli"),
    "nasquant.quant": (
        "nasquant.export",
        "nasquant.runtime",
        "nasquant.pipeline",
        "nasquant.api",
        "nasquant.cli",
    ),
    "nasquant.models": ("nasquant.weights", "nasquant.quant", "nasquant.export", "nasquant.pipeline"),
}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _import_graph() -> dict[str, set[str]]:
    modules = {_module_name(path): path for path in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        targets: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if (
                isinstance(node, ast.ImportFrom)
                and node.level == 0
                and (node.module or "").startswith("nasquant")
            ):
                for alias in node.names:
                    submodule = f"{node.module}.{alias.name}"
                    targets.add(submodule if submodule in modules else node.module)
            elif isinstance(node, ast.Import):
                targets.update(a.name for a in node.names if a.name.startswith("nasquant"))
        graph[name] = targets - {name}
    return graph


GRAPH = _import_graph()


def _cycle_through(start: str) -> list[str] | None:
    """A path of imports from ``start`` back to itself, if there is one (depth-first)."""
    stack = [(start, [start])]
    seen: set[str] = set()
    while stack:
        module, path = stack.pop()
        for target in GRAPH.get(module, ()):
            if target == start:
                return [*path, start]
            if target not in seen:
                seen.add(target)
                stack.append((target, [*path, target]))
    return None


@pytest.mark.parametrize("module", sorted(m for m in GRAPH if m != "nasquant"))
def test_no_import_circle(module: str) -> None:
    # The package root only re-exports NAS lazily; a cycle through it is not a layering one.
    cycle = _cycle_through(module)
    assert cycle is None or "nasquant" in cycle, " -> ".join(cycle)


def test_the_ground_floor_imports_only_itself() -> None:
    for module in GROUND:
        assert GRAPH[module] <= GROUND, f"{module} imports {sorted(GRAPH[module] - GROUND)}"


def test_no_floor_reaches_upward() -> None:
    problems = [
        f"{module} imports {target}"
        for module, targets in GRAPH.items()
        for floor, above in FORBIDDEN.items()
        if module == floor or module.startswith(floor + ".")
        for target in targets
        if target.startswith(above)
    ]
    # the package root (the lazy facade) is the top: nothing inside imports it or the CLI
    problems += [
        f"{module} imports {target}"
        for module, targets in GRAPH.items()
        for target in targets
        if (target == "nasquant" and module != "nasquant")
        or (target.startswith("nasquant.cli") and not module.startswith("nasquant.cli"))
    ]
    assert problems == []


def test_the_artifact_contract_loads_without_torch_onnx_or_opencv() -> None:
    code = (
        "import sys, nasquant.artifacts, nasquant.recipe\n"
        "heavy = sorted({'torch', 'onnx', 'cv2', 'onnxruntime'} & set(sys.modules))\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)

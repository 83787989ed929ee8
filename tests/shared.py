"""The one place tests find ``../shared`` (or ``$NASQUANT_SHARED``), skipping with a reason when absent."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

_PROJECT_ROOT = Path(__file__).resolve().parent.parent


def shared_dir() -> Path:
    override = os.environ.get("NASQUANT_SHARED")
    root = Path(override) if override else _PROJECT_ROOT.parent / "shared"
    if not root.is_dir():
        pytest.skip(f"shared test data not found at {root} (set NASQUANT_SHARED)")
    return root


def shared_path(*parts: str) -> Path:
    path = shared_dir().joinpath(*parts)
    if not path.exists():
        pytest.skip(f"shared test data is missing {path}")
    return path

"""The one YAML reader: YAML 1.2 scalars, no duplicate keys, bounded aliases, one-line errors."""

from __future__ import annotations

import pytest

from nasquant.errors import NasquantError
from nasquant.safe_yaml import MAX_NODES, load_yaml
from tests import crafted


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("true", True),
        ("False", False),
        ("yes", "yes"),  # YAML 1.1 booleans stay text: the validator then names them
        ("off", "off"),
        ("0512", 512),  # not octal 330
        ("0o17", 15),
        ("0x1F", 31),
        ("1:30", "1:30"),  # not sexagesimal 90
        ("1e-3", 0.001),  # a number, as YAML 1.2 (PyYAML: a string)
        ("-2.5", -2.5),
        (".inf", float("inf")),
        ("~", None),
        ("[a, 1, no]", ["a", 1, "no"]),
    ],
)
def test_yaml_1_2_core_scalars(text: str, value: object) -> None:
    assert load_yaml(text, "t") == value


def test_nan_reads_as_nan() -> None:
    loaded = load_yaml(".nan", "t")
    assert loaded != loaded


def test_shared_aliases_within_bounds_are_fine() -> None:
    assert load_yaml("a: &x [1, 2]\nb: *x\n", "t") == {"a": [1, 2], "b": [1, 2]}


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        (crafted.yaml_alias_bomb(), f"aliases expand the document past {MAX_NODES:,} nodes"),
        ("a: &x [1, *x]\n", "an alias refers to itself"),
        ("a: " + "[" * 100 + "]" * 100, "nests more than 64 deep"),
        ("a: " + "[" * 20000 + "]" * 20000, "nests more than 64 deep"),
        ("a: 1\na: 2\n", "duplicate key 'a'"),
        ("a: " + "9" * 200, "an integer of 200 digits"),
    ],
)
def test_malformed_documents_are_one_line(text: str, problem: str) -> None:
    with pytest.raises(NasquantError) as caught:
        load_yaml(text, "data.yaml")
    message = str(caught.value)
    assert message.startswith("data.yaml: invalid YAML") and problem in message and "\n" not in message
    assert len(message) < 300

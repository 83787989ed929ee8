"""Ultralytics-style ``key=value`` arguments and ``--debug`` anywhere: the rewritten line and what argparse
makes of it (no model is loaded)."""

from __future__ import annotations

import argparse

import pytest

from nasquant.cli import build_parser
from nasquant.cli.ultralytics_args import SYNONYMS, translate_key_values


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (
            ["val", "model=x.pt", "data=shapes.yaml", "imgsz=320", "conf=0.01"],
            ["val", "--model=x.pt", "--data=shapes.yaml", "--imgsz=320", "--conf=0.01"],
        ),
        (["val", "max_det=300", "top_k=5"], ["val", "--max-det=300", "--top-k=5"]),
        (["val", "model=x.pt", "--data", "y.yaml"], ["val", "--model=x.pt", "--data", "y.yaml"]),
        # an option's value is the user's, '=' or not: an abbreviated option's too
        (["val", "--model", "a=b.pt", "--mod", "c=d.pt"], ["val", "--model", "a=b.pt", "--mod", "c=d.pt"]),
        (["predict", "source=img.jpg", "conf=0.3"], ["predict", "--source=img.jpg", "--conf=0.3"]),
        (["predict", "source=-odd.jpg"], ["predict", "--source=-odd.jpg"]),  # one token: not an option
        (
            ["export", "format=onnx", "half=True", "int8=true", "dynamic=1", "nms=True"],
            ["export", "--format=onnx", "--fp16", "--int8", "--dynamic-batch", "--nms"],
        ),
        (["export", "half=False", "nms=false", "int8=0", "model=x.pt"], ["export", "--model=x.pt"]),
        # a setting that is on by default is turned off by its --no- form
        (
            ["predict", "multi_label=False", "agnostic_nms=True"],
            ["predict", "--no-multi-label", "--agnostic"],
        ),
        (["val", "multi_label=true"], ["val", "--multi-label"]),
        (
            ["quantize", "recipes/a=b.yaml", "--set", "calibration.num_images=128", "resume=True"],
            ["quantize", "recipes/a=b.yaml", "--set", "calibration.num_images=128", "--resume"],
        ),
        (["sensitivity", "r=1.yaml", "output=runs/x"], ["sensitivity", "r=1.yaml", "--output=runs/x"]),
        (
            ["engine", "build", "m.onnx", "half=True", "max_batch=8"],
            ["engine", "build", "m.onnx", "--fp16", "--max-batch=8"],
        ),
        (
            ["report", "runs/a=1", "b=2", "fail_on_drop=0.5"],
            ["report", "runs/a=1", "b=2", "--fail-on-drop=0.5"],
        ),
        (["val", "--", "model=x"], ["val", "--", "model=x"]),
        (["--debug", "model=x"], ["--debug", "model=x"]),  # not a subcommand: argparse refuses it
    ],
)
def test_key_values_become_the_options_they_name(argv: list[str], expected: list[str]) -> None:
    assert translate_key_values(build_parser(), argv) == expected


def test_key_value_and_flag_forms_parse_to_the_same_arguments() -> None:
    parser = build_parser()
    ultralytics = parser.parse_args(
        ["val", "model=x.pt", "data=y.yaml", "imgsz=320", "conf=0.01", "max_det=300", "batch=4"]
    )
    flags = parser.parse_args(
        ["val", "--model", "x.pt", "--data", "y.yaml", "--imgsz", "320", "--conf", "0.01", "--max-det", "300"]
        + ["--batch", "4"]
    )
    assert vars(ultralytics) == vars(flags)
    assert (ultralytics.imgsz, ultralytics.conf, ultralytics.max_det, ultralytics.batch) == (
        320,
        0.01,
        300,
        4,
    )
    export = parser.parse_args(["export", "model=x.pt", "half=True", "dynamic=True", "format=openvino"])
    assert export.fp16 and export.dynamic_batch and not export.int8 and export.format == "openvino"


def _usage_error(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    with pytest.raises(SystemExit) as exited:
        build_parser().parse_args(argv)
    assert exited.value.code == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1, lines
    return lines[0]


def test_an_unknown_key_is_one_line_naming_the_command_and_its_keys(
    capsys: pytest.CaptureFixture[str],
) -> None:
    line = _usage_error(["val", "model=x.pt", "data=y.yaml", "foo=1"], capsys)
    assert line.startswith("nasquant val: error: unknown argument 'foo=1'; val takes model, variant, ")
    assert ", max_det, " in line and ", help" not in line
    assert line.endswith("(see nasquant val --help)")
    # a synonym only where its option exists: val has no --fp16
    assert "unknown argument 'half=True'" in _usage_error(["val", "half=True"], capsys)
    # once quantize has its recipe, a key=value is no longer read as the recipe path
    line = _usage_error(["quantize", "r.yaml", "imgsz=320"], capsys)
    assert "unknown argument 'imgsz=320'; quantize takes set, output, resume" in line
    line = _usage_error(["engine", "command", "m.onnx", "foo=2"], capsys)
    assert line.startswith("nasquant engine command: error:") and "; engine command takes fp32, " in line


def test_a_switch_takes_only_true_or_false(capsys: pytest.CaptureFixture[str]) -> None:
    line = _usage_error(["export", "model=x.pt", "nms=maybe"], capsys)
    assert line.startswith("nasquant export: error: 'nms=maybe': nms is a switch, give nms=True or nms=False")


@pytest.mark.parametrize(
    ("argv", "debug"),
    [
        (["val", "--model", "x", "--data", "y", "--debug"], True),
        (["val", "--debug", "--model", "x", "--data", "y"], True),
        (["--debug", "val", "--model", "x", "--data", "y"], True),
        (["val", "model=x", "data=y", "debug=True"], True),
        (["engine", "build", "m.onnx", "--debug"], True),
        (["report", "runs/a", "--debug"], True),
        (["val", "--model", "x", "--data", "y"], False),
    ],
)
def test_debug_is_read_anywhere_on_the_line(argv: list[str], debug: bool) -> None:
    assert build_parser().parse_args(argv).debug is debug


def test_every_synonym_names_an_option_and_the_help_explains_the_form() -> None:
    parser = build_parser()
    subcommands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    options = {option for command in subcommands.values() for option in command._option_string_actions}
    assert set(SYNONYMS.values()) <= options
    text = " ".join(parser.format_help().split())
    assert "key=value" in text and "half means --fp16" in text and "--debug may come anywhere" in text

"""Quantization recipes: typed dataclasses loaded from YAML and validated strictly.

A recipe is everything ``nasquant quantize RECIPE`` needs: which weights, which calibration and
validation data, how to quantize, export, build engines and benchmark, and where results go. It is
read once, validated once, and from then on is plain attributes, so a typo fails at load time with
the file and the dotted key instead of deep inside a stage.

Rules that apply to every field (enforced by one generic walker over the dataclass type hints, not
per field):

* YAML is read by :mod:`nasquant.safe_yaml` (YAML 1.2 scalars: ``yes`` is a string, ``0512`` is 512;
  duplicate keys and alias bombs refused).
* Types are exact: booleans are YAML ``true``/``false`` (not ``"yes"``), integers are not floats,
  a list where a scalar is expected (or the reverse) is an error, enumerations list their values.
  Numbers are range-checked when read (sizes multiples of 32, seeds >= 0, opset 13..20, ...).
* ``${VAR}`` and ``${VAR:-default}`` in string values expand from the environment (``:-`` also
  covers a variable that is set but empty, as in the shell; the default may hold references itself,
  ``${A:-${B:-x}}``); an unset ``${VAR}`` is an error.
* ``name`` defaults to the file's stem, with characters a run name cannot hold replaced by ``_``.
* Relative paths the recipe reads (checkpoint, data, image list, timing cache) resolve against the
  recipe file's folder, so a recipe works from any current directory; URLs and the aliases
  ``yolo_nas_s|m|l`` stay as written. Values given with ``--set`` are typed on a command line, so
  their relative paths mean the current directory. ``output.dir`` is the exception: results go
  where the user works, so it is relative to the current directory (default ``runs/<name>``).
* ``--set key=value`` values are parsed by the same YAML reader (``=128`` is an int, ``=[a, b]`` a
  list, ``=null`` None) and then validated exactly like file values.
"""

from nasquant.recipe.loading import check_value, load_recipe, recipe_from_dict
from nasquant.recipe.sections import (
    BenchmarkSection,
    CalibrationSection,
    EnginesSection,
    ExportSection,
    FinetuneSection,
    InputSection,
    ModelSection,
    OpenVINOSection,
    OutputSection,
    QuantizationSection,
    Recipe,
    ValidationSection,
)

__all__ = [
    "BenchmarkSection",
    "CalibrationSection",
    "EnginesSection",
    "ExportSection",
    "FinetuneSection",
    "InputSection",
    "ModelSection",
    "OpenVINOSection",
    "OutputSection",
    "QuantizationSection",
    "Recipe",
    "ValidationSection",
    "check_value",
    "load_recipe",
    "recipe_from_dict",
]

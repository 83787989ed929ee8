"""Ultralytics-style ``key=value`` arguments (``nasquant val model=x.pt imgsz=320``), rewritten into
the options the chosen subcommand declares, before argparse reads the line. What a subcommand takes is
read from the parser's own tables (argparse's ``_actions``), so a new option needs nothing here."""

from __future__ import annotations

import argparse
import math
import re
from collections.abc import Sequence

#: Ultralytics keys whose meaning is one of our options under another name; used only where the
#: subcommand has that option (``half`` on ``export`` and ``engine``, ``dynamic`` on ``export``).
SYNONYMS = {"half": "--fp16", "dynamic": "--dynamic-batch", "agnostic_nms": "--agnostic"}

_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_TRUE, _FALSE = {"true", "1"}, {"false", "0"}


def _option(parser: argparse.ArgumentParser, text: str) -> argparse.Action | None:
    """The option ``text`` (``--name`` or ``--name=value``) names, an unambiguous prefix included as
    argparse accepts it, so the value that follows it is recognised as a value."""
    name = text.split("=", 1)[0]
    actions = parser._option_string_actions
    if name in actions or not (parser.allow_abbrev and name.startswith("--")):
        return actions.get(name)
    matches = {action for option, action in actions.items() if option.startswith(name)}
    return matches.pop() if len(matches) == 1 else None


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser] | None:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action.choices
    return None


def _positional_slots(parser: argparse.ArgumentParser) -> float:
    """How many bare words the parser's positionals take (``math.inf`` for ``nargs='+'``)."""
    counts = {None: 1, argparse.OPTIONAL: 1}
    return sum(
        counts.get(action.nargs, action.nargs if isinstance(action.nargs, int) else math.inf)
        for action in parser._actions
        if not action.option_strings
    )


def _flag(parser: argparse.ArgumentParser, key: str) -> str | None:
    """The option ``key`` names in ``parser``: ``max_det`` → ``--max-det``, or a synonym's option."""
    for flag in (f"--{key.replace('_', '-')}", SYNONYMS.get(key)):
        if flag in parser._option_string_actions:
            return flag
    return None


def _keys(parser: argparse.ArgumentParser) -> list[str]:
    """The ``key=value`` keys ``parser`` takes: its long options, ``--max-det`` as ``max_det``."""
    return [
        option[2:].replace("-", "_")
        for action in parser._actions
        if not isinstance(action, argparse._HelpAction)
        for option in action.option_strings[:1]
        if option.startswith("--")
    ]


def translate_key_values(parser: argparse.ArgumentParser, argv: Sequence[str]) -> list[str]:
    """``argv`` with each ``key=value`` after the subcommand turned into ``--key=value`` (``max_det=300``
    → ``--max-det=300``; a switch: ``nms=True`` → ``--nms``, ``nms=False`` dropped). Left alone: option
    values (``--set a.b=1``), words a positional takes (a recipe path may hold ``=``) and everything
    after ``--``. An unknown key ends the program through ``parser.error``: one line, exit code 2."""
    words = list(argv)
    translated: list[str] = []
    current, free = parser, _positional_slots(parser)
    while words:
        word = words.pop(0)
        if word == "--":
            return [*translated, word, *words]
        if word.startswith("-"):
            translated.append(word)
            option = _option(current, word)
            if option is not None and option.nargs != 0 and "=" not in word and words:
                translated.append(words.pop(0))
            continue
        choices = _subcommands(current)
        if choices is not None:  # the subcommand (a wrong one is argparse's to refuse)
            translated.append(word)
            if word in choices:
                current = choices[word]
                free = _positional_slots(current)
            continue
        key, equals, value = word.partition("=")
        pair = bool(equals) and _KEY.fullmatch(key) is not None
        flag = _flag(current, key) if pair else None
        if flag is None and (not pair or free > 0):  # a positional's word: a recipe path may hold "="
            free -= 1
            translated.append(word)
        elif flag is None:
            name = current.prog.removeprefix(f"{parser.prog} ")
            current.error(f"unknown argument {word!r}; {name} takes {', '.join(_keys(current))}")
        elif current._option_string_actions[flag].nargs != 0:
            translated.append(f"{flag}={value}")
        elif value.lower() in _TRUE:
            translated.append(flag)
        elif value.lower() not in _FALSE:
            current.error(f"{word!r}: {key} is a switch, give {key}=True or {key}=False")
        elif isinstance(current._option_string_actions[flag], argparse.BooleanOptionalAction):
            translated.append(f"--no-{flag[2:]}")  # False overrides an on-by-default setting
    return translated

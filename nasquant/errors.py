"""The one exception type that means "the user gave us bad input".

The CLI turns it into a single line on stderr and exit code 2; everything else is a bug and keeps
its traceback.
"""


class NasquantError(Exception):
    """Bad input from the user: a missing or corrupt file, a wrong variant, an unknown key."""


def first_line(exc: BaseException) -> str:
    """A library exception as one line for a :class:`NasquantError` message: its first line, or its
    type's name when it says nothing (ONNX and protobuf errors run to many lines)."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__

"""The one exception type that means "the user gave us bad input".

The CLI turns it into a single line on stderr and exit code 2; everything else is a bug and keeps
its traceback.
"""


class NasquantError(Exception):
    """Bad input from the user: a missing or corrupt file, a wrong variant, an unknown key."""

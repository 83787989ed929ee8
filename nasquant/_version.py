"""The installed nasquant's version, in a module of its own: files record it, and modules of every
floor read it without importing the package root."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("nasquant")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0+unknown"

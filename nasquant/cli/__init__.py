"""``nasquant`` command line: ``info``, ``val``, ``predict``, ``quantize``, ``sensitivity``, ``bench``,
``engine``, ``report``.

Options take ``--flag value`` or Ultralytics' ``key=value`` (:mod:`nasquant.cli.ultralytics_args`). Bad
input exits with code 2 and one line on stderr; ``--debug``, anywhere on the line, shows the traceback.
"""

from __future__ import annotations

import signal
import sys
import traceback
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

from nasquant.cli.commands import COMMANDS
from nasquant.cli.parser import build_parser
from nasquant.errors import NasquantError

__all__ = ["COMMANDS", "EXIT_INTERRUPTED", "EXIT_TERMINATED", "build_parser", "main"]


class _Terminated(BaseException):
    """SIGTERM (what CI runners and ``timeout`` send), raised in the main thread like Ctrl-C's
    KeyboardInterrupt, so the same cleanup runs: every ``atomic_path`` removes its temporary file."""


#: Conventional exit codes of a process ended by SIGINT / SIGTERM (128 + the signal number).
EXIT_INTERRUPTED = 128 + signal.SIGINT
EXIT_TERMINATED = 128 + signal.SIGTERM


@contextmanager
def _sigterm_raises() -> Iterator[None]:
    def handle(signum: int, frame: object) -> None:
        # A second SIGTERM must not cut the cleanup the first one started.
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raise _Terminated

    try:
        previous = signal.signal(signal.SIGTERM, handle)
    except ValueError:  # not the main thread (main() called from a worker): leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _out_of_memory(exc: BaseException) -> bool:
    # torch reports a failed allocation as a RuntimeError (CPU) or torch.OutOfMemoryError (CUDA);
    # matched by name so the CLI does not import torch to recognise it.
    return (
        isinstance(exc, MemoryError)
        or type(exc).__name__ == "OutOfMemoryError"
        or (isinstance(exc, RuntimeError) and "can't allocate memory" in str(exc))
    )


def _close_progress_bars() -> None:
    """End every progress bar still open, so the error line starts on its own line. Bars are context
    managers and close on errors, except one whose constructor was interrupted (a signal right after
    its first draw): it is registered with tqdm but no ``with`` owns it yet."""
    tqdm_module = sys.modules.get("tqdm")  # nothing to close when tqdm was never imported
    if tqdm_module is not None:
        for bar in list(tqdm_module.tqdm._instances):
            bar.close()


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # a usage error (2), --help or --version (0): argparse printed it
        return exc.code if isinstance(exc.code, int) else 2

    def fail(message: str, code: int, *, signalled: bool = False) -> int:
        if args.debug:
            traceback.print_exc()
        _close_progress_bars()
        # A signal can land half-way through a bar's draw, after part of its line reached stderr and
        # before the bar exists to be closed: the line must not start after that fragment.
        fresh_line = "\n" if signalled else ""
        print(f"{fresh_line}nasquant: {message}", file=sys.stderr)
        return code

    try:
        with _sigterm_raises():
            return COMMANDS[args.command](args) or 0
    except NasquantError as exc:
        return fail(f"error: {exc}", 2)
    except KeyboardInterrupt:
        return fail("interrupted", EXIT_INTERRUPTED, signalled=True)
    except _Terminated:
        return fail("terminated", EXIT_TERMINATED, signalled=True)
    except OSError as exc:  # disk full, permission denied, ...: the environment, not our bug
        return fail(f"error: {exc}", 1)
    except (MemoryError, RuntimeError) as exc:
        if not _out_of_memory(exc):
            raise
        first = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
        return fail(f"error: out of memory ({first[:200]}); use a smaller batch or input size", 1)

"""The one skeleton of every command-line tool: `main(argv) -> int`, one-line errors, exit codes, Ctrl-C.

Every CLI of the project (`engine.run`, `engine.synthesize`, `engine.align`, `engine.metrics`,
`engine.cache`, `reference.train`, `export.*`, `kernels.inspect`) builds its parser with
`ArgumentParser` and runs its body through `run_cli`:
- exit 0 on success, 1 when some inputs failed (the body says so), 2 for a usage, checkpoint or
  file error (`PSPError`, `OSError`: one line on stderr, no traceback), 130 when interrupted;
- SIGTERM is handled like Ctrl-C (`KeyboardInterrupt`), so `kill` and a scheduler's stop leave the
  same state as Ctrl-C: finished work recorded, no temp file left;
- a warning (e.g. a checkpoint loaded with --trust-pickle) prints as one line;
- a mistyped option is reported as unrecognized, with the closest real option, before any
  "required argument" complaint.

Source: Python `argparse`, `signal`; exit code 130 = 128 + SIGINT, as shells report it.
"""

from __future__ import annotations

import argparse
import contextlib
import difflib
import signal
import sys
import threading
import warnings
from typing import Callable, Sequence

from .errors import PSPError

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


def say(msg: str) -> None:
    """Print one message to stderr (white space folded to one line for errors), flushed."""
    print(msg, file=sys.stderr, flush=True)


def plural(n: int, word: str, words: str | None = None) -> str:
    """`"1 image"`, `"2 images"`: a count with its noun (`words` for an irregular plural)."""
    return f"{n} {word if n == 1 else (words or word + 's')}"


class ArgumentParser(argparse.ArgumentParser):
    """`argparse.ArgumentParser` that reports unknown options first, with a close match.

    Python's parser checks required arguments before it reports unknown ones, so
    `--inptu x --output y` says "--input is required"; this one says
    "unrecognized argument --inptu (did you mean --input?)".
    """

    def parse_known_args(self, args=None, namespace=None):  # noqa: D102 - argparse API
        argv = list(sys.argv[1:] if args is None else args)
        known = [s for a in self._actions for s in a.option_strings]
        for token in argv:
            if token == "--":
                break
            if token.startswith("--") and len(token) > 2:
                name = token.split("=", 1)[0]
                if name not in known and not any(k.startswith(name) for k in known):
                    close = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
                    hint = f" (did you mean {close[0]}?)" if close else ""
                    self.error(f"unrecognized argument {name}{hint}")
        return super().parse_known_args(argv, namespace)


def int_at_least(minimum: int):
    """An argparse `type=`: an integer >= `minimum`, else a one-line "expected ..." error."""
    what = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected {what}, got {value}")
        return value

    return parse


def argparse_type(parse: Callable[[str], object], what: str):
    """An argparse `type=` from a parser raising PSPError/ValueError: a one-line "expected ..." error."""

    def wrapped(text: str):
        try:
            return parse(text)
        except (PSPError, ValueError) as e:
            raise argparse.ArgumentTypeError(str(e) if isinstance(e, PSPError) else f"expected {what}, got {text!r}") from None

    return wrapped


def usage_error(e: BaseException) -> int:
    """Report a usage, checkpoint or file error in one line; the exit code 2."""
    say("error: " + " ".join(str(e).split()))
    return EXIT_USAGE


@contextlib.contextmanager
def sigterm_as_interrupt():
    """Within the block, SIGTERM raises `KeyboardInterrupt` in the main thread (as Ctrl-C does)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def one_line_warnings():
    """Within the block, a warning prints as one line, "warning: <message>" (no file, line or source)."""

    def show(message, category, filename, lineno, file=None, line=None):
        say("warning: " + " ".join(str(message).split()))

    with warnings.catch_warnings():
        warnings.showwarning = show
        yield


def run_cli(parser: argparse.ArgumentParser, body: Callable[[argparse.Namespace], int],
            argv: Sequence[str] | None = None, interrupted: str = "rerun the same command to resume",
            errors: tuple[type[BaseException], ...] = (PSPError, OSError)) -> int:
    """Parse `argv` and run `body(args)`; the exit code.

    Args:
        parser: the CLI's parser (`ArgumentParser`).
        body: the work; returns 0 or 1 (some inputs failed), may raise `errors`.
        argv: arguments without the program name (default `sys.argv[1:]`).
        interrupted: what to do after an interruption, printed after "interrupted: ".
        errors: exceptions reported in one line with exit code 2.

    Returns:
        0, 1, 2 (argparse usage error or `errors`), or 130 (Ctrl-C or SIGTERM).
    """
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # argparse: 2 on a usage error, 0 after --help
        return int(e.code or 0)
    try:
        with sigterm_as_interrupt(), one_line_warnings():
            return body(args)
    except errors as e:
        return usage_error(e)
    except KeyboardInterrupt:
        say(f"interrupted: {interrupted}")
        return EXIT_INTERRUPTED

"""How every command line answers bad input, and where third-party console noise goes.

Bad input: a tool raises `UsageError(input, problem, fix)` (or the library's `ValueError`, which by
the project's convention names the values and the fix) before any work is done, and
`run_cli(main)` turns it into ONE line on stderr, `error: <input>: <problem>; <fix>`, with exit
status 2 and no traceback. `ArgumentParser` does the same for argparse's own errors (argparse
prints a usage block instead). `OPDLM_TRACEBACK=1` re-raises instead, for debugging.

Third-party noise: megatron-core, Apex/Transformer Engine fallbacks and torch.distributed print
warnings at import and at every model build (`Apex is not installed`, deprecations,
FutureWarnings). They say nothing about the user's run, so `run_cli` keeps them off the console:
with `OPDLM_THIRD_PARTY_LOG=FILE` they are appended to FILE (the demo puts it in its run
directory), with `OPDLM_THIRD_PARTY_LOG=-` they stay on the console, and unset they are dropped.
Errors logged by torch or megatron (level ERROR and above) always reach the console, and so do
warnings raised from this package's own files.

Usage in a tool:

    from megatron_opdlm.cli_errors import run_cli
    if __name__ == "__main__":
        run_cli(main)          # main(argv) -> int exit status
        # or, to import the tool's module only after the noise is routed:
        run_cli("megatron_opdlm.training.cli:main")
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn

EXIT_USAGE = 2
TRACEBACK_ENV = "OPDLM_TRACEBACK"
THIRD_PARTY_LOG_ENV = "OPDLM_THIRD_PARTY_LOG"
_PACKAGE_DIR = str(Path(__file__).resolve().parent)
# loggers of the libraries whose warnings are noise on our console
_THIRD_PARTY_LOGGERS = ("torch", "megatron", "transformers", "transformer_engine")


class UsageError(ValueError):
    """Bad user input, reported as `<input>: <problem>; <fix>` (a ValueError, so library code that
    catches ValueError keeps working)."""

    def __init__(self, input: str, problem: str, fix: str):
        self.input, self.problem, self.fix = input, problem, fix
        super().__init__(f"{input}: {problem}; {fix}")


# What counts as bad input when it escapes main(): the library raises ValueError for it; the OS
# errors are files the user named that cannot be read.
BAD_INPUT_ERRORS = (ValueError, FileNotFoundError, IsADirectoryError, NotADirectoryError,
                    PermissionError)  # fmt: skip


def one_line(exc: BaseException) -> str:
    """The message of `exc` on one line (multi-line messages are joined with spaces)."""
    text = " ".join(str(exc).split())
    if isinstance(exc, OSError) and exc.filename is not None and str(exc.filename) not in text:
        text = f"{exc.filename}: {text}"
    return text or type(exc).__name__


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose errors are a one-line UsageError (argparse itself prints a usage block)."""

    def error(self, message: str) -> NoReturn:
        raise UsageError("command line", message, f"see {self.prog} --help")


class _Sink:
    """A text stream for third-party output: a file, the console, or nowhere."""

    def __init__(self, target: str | None):
        self._file = None
        self._console = target == "-"
        if target and target != "-":
            Path(target).parent.mkdir(parents=True, exist_ok=True)
            self._file = open(target, "a", encoding="utf-8", buffering=1)  # noqa: SIM115

    def write(self, text: str) -> int:
        if self._console:
            return sys.__stderr__.write(text)
        if self._file is not None:
            return self._file.write(text)
        return len(text)

    def flush(self) -> None:
        if self._file is not None:
            self._file.flush()


_routed = False


def _below_error(record: logging.LogRecord) -> bool:
    return record.levelno < logging.ERROR


def route_third_party_output(target: str | None = None) -> None:
    """Send third-party warnings (Python warnings from files outside this package, and records
    below ERROR of the torch/megatron/transformers loggers) to the sink of `target`, default
    $OPDLM_THIRD_PARTY_LOG. Call before importing torch (a tool's first statement)."""
    global _routed
    if _routed:
        return
    _routed = True
    sink = _Sink(target if target is not None else os.environ.get(THIRD_PARTY_LOG_ENV))
    show_original = warnings.showwarning

    def showwarning(message, category, filename, lineno, file=None, line=None):
        if str(filename).startswith(_PACKAGE_DIR):
            show_original(message, category, filename, lineno, file, line)
        else:
            sink.write(warnings.formatwarning(message, category, filename, lineno, line))

    warnings.showwarning = showwarning
    import torch  # noqa: F401  (torch._logging installs its handlers on import; replaced below)

    for name in _THIRD_PARTY_LOGGERS:
        logger = logging.getLogger(name)
        formatter = next((h.formatter for h in logger.handlers if h.formatter), None)
        for handler in list(logger.handlers):
            logger.removeHandler(handler)
        quiet = logging.StreamHandler(sink)
        quiet.addFilter(_below_error)
        loud = logging.StreamHandler(sys.stderr)
        loud.setLevel(logging.ERROR)
        for handler in (quiet, loud):
            if formatter is not None:
                handler.setFormatter(formatter)
            logger.addHandler(handler)
        logger.propagate = False


def report_usage_error(exc: BaseException) -> int:
    """Print `error: <one line>` to stderr; the exit status of bad input."""
    print(f"error: {one_line(exc)}", file=sys.stderr, flush=True)
    return EXIT_USAGE


def run_cli(main: Callable[..., int | None] | str, argv: list[str] | None = None) -> NoReturn:
    """Run a tool's main(argv) and exit with its status; bad input -> one line, exit 2.
    `main` may be "module:function", imported after the third-party output is routed."""
    route_third_party_output()
    if isinstance(main, str):
        module, _, name = main.partition(":")
        main = getattr(importlib.import_module(module), name)
    try:
        status = main(argv)
    except BAD_INPUT_ERRORS as exc:
        if os.environ.get(TRACEBACK_ENV):
            raise
        status = report_usage_error(exc)
    sys.exit(0 if status is None else int(status))

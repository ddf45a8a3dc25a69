"""Helpers shared by the command-line entry points."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from deepspec.errors import DeepSpecError, as_user_error


def error_line(exc: BaseException) -> str:
    """``error: ...`` for a user error: exactly one line, whatever the message holds."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return f"error: {text}"


class ArgumentParser(argparse.ArgumentParser):
    """``argparse`` that reports a bad argument as one ``error:`` line (no usage block)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        text = " ".join(message.split())
        self.exit(2, f"error: {self.prog}: {text} (see --help)\n")


def run_main(main: Callable[[], int | None]) -> None:
    """Run ``main`` and exit; user errors become one ``error:`` line and a non-zero code.

    User errors are :class:`DeepSpecError` and what :func:`deepspec.errors.as_user_error`
    recognises (a full or read-only disk, a truncated file, a failed compile). Bugs (any
    other exception) keep their traceback. Ctrl-C exits with 130 and no trace.
    """
    try:
        code = main()
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    except Exception as exc:  # noqa: BLE001 - sorted into user errors and bugs below
        user = as_user_error(exc)
        if user is None:
            raise
        print(error_line(user), file=sys.stderr)
        sys.exit(user.exit_code if isinstance(user, DeepSpecError) else 2)
    sys.exit(code or 0)

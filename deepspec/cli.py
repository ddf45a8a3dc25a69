"""Helpers shared by the command-line entry points."""

from __future__ import annotations

import sys
from collections.abc import Callable

from deepspec.errors import DeepSpecError


def run_main(main: Callable[[], int | None]) -> None:
    """Run ``main`` and exit; user errors become one ``error:`` line and a non-zero code.

    Bugs (any other exception) keep their traceback. Ctrl-C exits with 130 and no trace.
    """
    try:
        code = main()
    except DeepSpecError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    sys.exit(code or 0)

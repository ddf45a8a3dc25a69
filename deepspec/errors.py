"""User-facing error types.

Every problem a user can fix (a bad config key, a malformed data file, a target that
cannot be resolved, a full disk) raises a subclass of :class:`DeepSpecError` whose message
is one line naming the thing and the fix. Entry points turn it into ``error: <message>`` on
stderr and a non-zero exit (see :func:`deepspec.cli.run_main`); :func:`as_user_error` turns
the environment's own exceptions (``OSError``, JSON and safetensors errors, compiler
failures) into the same kind of line.
"""

from __future__ import annotations

import errno
import json
import math


class DeepSpecError(Exception):
    """Base class for errors caused by user input or environment, not by a bug."""

    exit_code = 2


class ConfigError(DeepSpecError, ValueError):
    """An unknown config key, a value of the wrong type, or an invalid value."""


class DataError(DeepSpecError, ValueError):
    """A malformed or missing data file (JSONL rows, eval prompts, caches)."""


class TargetError(DeepSpecError, ValueError):
    """A target model that cannot be resolved, loaded or is not supported."""


class NumericalError(DeepSpecError, ValueError):
    """NaN or infinite logits/probabilities, or a distribution with no mass, met at run time."""


class EnvironmentProblem(DeepSpecError):
    """The machine cannot do what was asked: a full disk, a read-only directory, no compiler."""


class Preempted(DeepSpecError):
    """A run stopped by SIGTERM or Ctrl-C after saving a checkpoint; the same command resumes."""

    exit_code = 75  # EX_TEMPFAIL: a scheduler reruns the job, it is not finished


_OS_FIXES = {
    errno.ENOSPC: "free disk space or choose another output directory",
    errno.EDQUOT: "free disk space or choose another output directory",
    errno.EFBIG: "a file-size limit was reached (see `ulimit -f` and the file system's limit): raise "
    "it or choose another output directory",
    errno.EROFS: "the file system is read-only: choose a writable output directory",
    errno.EACCES: "check its permissions or choose another path",
    errno.EPERM: "check its permissions or choose another path",
    errno.ENOENT: "check the path",
    errno.ENOTDIR: "a part of the path is a file, not a directory: check the path",
    errno.EISDIR: "it is a directory: pass a file",
    errno.EADDRINUSE: "the port is taken: choose another port or stop the process using it",
    errno.ECONNREFUSED: "nothing listens there: start the server or check the address",
}


def describe_os_error(exc: OSError, what: str = "") -> str:
    """One line for an ``OSError``: what failed, on which file, and the usual fix."""
    name = exc.filename if exc.filename is not None else what
    reason = exc.strerror or str(exc) or type(exc).__name__
    fix = _OS_FIXES.get(exc.errno or -1, "")
    where = f" {name}" if name else ""
    return f"{reason}:{where}" + (f" ({fix})" if fix else "")


def as_user_error(exc: BaseException) -> DeepSpecError | None:
    """The :class:`DeepSpecError` an environment exception stands for, or None for a bug.

    Covered: ``OSError`` (disk full, read-only or missing paths, ports), JSON decoding
    errors, safetensors header/format errors, and ``torch.compile`` failures (usually no
    working C++ compiler on CPU)."""
    if isinstance(exc, DeepSpecError):
        return exc
    if isinstance(exc, OSError):
        return EnvironmentProblem(describe_os_error(exc))
    if isinstance(exc, json.JSONDecodeError):
        return DataError(
            f"invalid JSON at line {exc.lineno} column {exc.colno}: {exc.msg} (fix or remove the file)"
        )
    kind = f"{type(exc).__module__}.{type(exc).__name__}"
    if kind.startswith("safetensors") or type(exc).__name__ == "SafetensorError":
        return DataError(
            f"unreadable safetensors file ({str(exc).splitlines()[0] if str(exc) else kind}): it is truncated "
            "or not a safetensors file; copy or write it again"
        )
    if kind.startswith(("torch._dynamo", "torch._inductor")) or "InductorError" in kind:
        first = next((ln for ln in str(exc).splitlines() if ln.strip()), type(exc).__name__)
        return EnvironmentProblem(
            f"torch.compile failed ({first.strip()[:200]}); install a working C++ compiler (g++) or "
            "run with --opts train.torch_compile=false"
        )
    return None


def check_number(
    name: str,
    value: float,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
) -> float:
    """``value`` if finite and inside the range, else a :class:`ConfigError` naming ``name``.

    Used for every numeric command-line argument (``--temperature nan`` must not decode)."""
    ok = isinstance(value, (int, float)) and math.isfinite(value)
    if ok and low is not None:
        ok = value > low if low_open else value >= low
    if ok and high is not None:
        ok = value < high if high_open else value <= high
    if not ok:
        lo = "" if low is None else f"{'>' if low_open else '>='} {low:g}"
        hi = "" if high is None else f"{'<' if high_open else '<='} {high:g}"
        rng = " and ".join(p for p in (lo, hi) if p)
        raise ConfigError(f"{name} must be a finite number{' ' + rng if rng else ''}, got {value!r}")
    return value

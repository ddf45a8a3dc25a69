"""User-facing error types.

Every problem a user can fix (a bad config key, a malformed data file, a target that
cannot be resolved) raises a subclass of :class:`DeepSpecError` whose message is one line
naming the thing and the fix. Entry points turn it into ``error: <message>`` on stderr
and a non-zero exit (see :func:`deepspec.cli.run_main`).
"""

from __future__ import annotations


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


class NotBuiltYetError(DeepSpecError):
    """A pipeline stage that this version of deepspec does not provide yet."""

    exit_code = 3

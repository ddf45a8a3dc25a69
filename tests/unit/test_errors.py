"""deepspec.errors: environment exceptions become one-line user errors; numbers are checked."""

from __future__ import annotations

import errno
import json
import math

import pytest

from deepspec.cli import error_line
from deepspec.errors import (
    ConfigError,
    DataError,
    EnvironmentProblem,
    Preempted,
    as_user_error,
    check_number,
)


@pytest.mark.parametrize(
    ("code", "fragment"),
    [
        (errno.ENOSPC, "free disk space"),
        (errno.EROFS, "read-only"),
        (errno.EACCES, "permissions"),
        (errno.EADDRINUSE, "port is taken"),
    ],
)
def test_os_errors_name_the_file_and_the_fix(code, fragment):
    exc = as_user_error(OSError(code, "boom", "/some/out/file.bin"))
    assert isinstance(exc, EnvironmentProblem)
    assert "/some/out/file.bin" in str(exc) and fragment in str(exc)


def test_json_and_safetensors_errors_are_data_errors(tmp_path):
    with pytest.raises(json.JSONDecodeError) as info:
        json.loads('{"a": 1,\n "b": ')
    exc = as_user_error(info.value)
    assert isinstance(exc, DataError) and "line 2" in str(exc)

    from safetensors.torch import load_file

    bad = tmp_path / "model.safetensors"
    bad.write_bytes(b'\x10\x00\x00\x00\x00\x00\x00\x00{"a":')
    with pytest.raises(Exception) as info:  # noqa: B017 - the library's own error type
        load_file(str(bad))
    exc = as_user_error(info.value)
    assert isinstance(exc, DataError) and "safetensors" in str(exc)


def test_bugs_stay_bugs():
    assert as_user_error(KeyError("x")) is None
    assert as_user_error(ZeroDivisionError()) is None


def test_error_line_is_always_one_line():
    assert error_line(DataError("a\nb\n  c")) == "error: a b c"


def test_preempted_has_its_own_exit_code():
    assert Preempted.exit_code not in (0, 1, 2, 130)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf, -0.5, 2.5])
def test_check_number_refuses_non_finite_and_out_of_range(bad):
    with pytest.raises(ConfigError, match="--temperature"):
        check_number("--temperature", bad, low=0, high=2)


def test_check_number_bounds():
    assert check_number("--p", 0.0, low=0, high=1) == 0.0
    assert check_number("--p", 1.0, low=0, high=1) == 1.0
    with pytest.raises(ConfigError, match="> 0"):
        check_number("--p", 0.0, low=0, low_open=True)

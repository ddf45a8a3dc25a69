"""Helpers for the bad-input suite (``tests/cli/test_bad_inputs_*.py``).

Every case runs a real entry point as a subprocess and asserts what a user must see: a
non-zero exit, exactly one ``error:`` line on stderr, no Python traceback, and that no input
or earlier output changed (files compared by SHA-256 before and after).
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys

from tests.conftest import ROOT

PY = sys.executable


def run_cli(
    args: list[str],
    *,
    env: dict[str, str] | None = None,
    timeout: float = 300,
    cwd: str = ROOT,
    stdin: str | None = None,
) -> subprocess.CompletedProcess:
    """Run ``args`` (``python`` prepended when the first item is a ``.py`` path or ``-m``)."""
    if args and (args[0].endswith(".py") or args[0] == "-m"):
        args = [PY, *args]
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_WAIT_POLICY": "PASSIVE", **(env or {})}
    return subprocess.run(
        args, cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout, input=stdin
    )


def error_lines(proc: subprocess.CompletedProcess) -> list[str]:
    return [line for line in proc.stderr.splitlines() if line.startswith("error:")]


def assert_one_error(proc: subprocess.CompletedProcess, *fragments: str, code: int | None = None) -> str:
    """Non-zero exit, exactly one ``error:`` line containing every fragment, no traceback.

    Returns the error line."""
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0, f"exit 0 for a bad input:\n{output[-3000:]}"
    if code is not None:
        assert proc.returncode == code, f"exit {proc.returncode}, expected {code}:\n{output[-3000:]}"
    assert "Traceback (most recent call last)" not in output, output[-5000:]
    lines = error_lines(proc)
    assert len(lines) == 1, f"expected one error line, got {lines}:\n{output[-3000:]}"
    for fragment in fragments:
        assert fragment.lower() in lines[0].lower(), f"{fragment!r} not in {lines[0]!r}"
    return lines[0]


def digest_tree(*paths: str) -> dict[str, str]:
    """SHA-256 of every file under ``paths`` (files or directories), keyed by path."""
    out: dict[str, str] = {}
    for path in paths:
        files = (
            [path]
            if os.path.isfile(path)
            else [os.path.join(d, f) for d, _, names in os.walk(path) for f in names]
        )
        for file in sorted(files):
            with open(file, "rb") as fh:
                out[file] = hashlib.sha256(fh.read()).hexdigest()
    return out


def assert_unchanged(before: dict[str, str], *paths: str) -> None:
    """No file under ``paths`` was lost or changed since ``before = digest_tree(*paths)``."""
    after = digest_tree(*paths)
    lost = sorted(set(before) - set(after))
    changed = sorted(k for k in before if k in after and before[k] != after[k])
    assert not lost and not changed, f"lost {lost}, changed {changed}"


def unwritable_dir(tmp_path) -> str:
    """An existing directory in which this process cannot create anything: a ``chmod 555``
    folder, or, for root (who writes through mode bits), ``/sys`` (sysfs refuses new
    entries). Skips the test when neither refuses."""
    import pytest

    locked = tmp_path / "read-only"
    locked.mkdir(exist_ok=True)
    locked.chmod(0o555)
    for candidate in (str(locked), "/sys"):
        probe = os.path.join(candidate, ".deepspec-probe")
        try:
            os.mkdir(probe)
        except OSError:
            return candidate
        os.rmdir(probe)
    locked.chmod(0o755)
    pytest.skip("no directory refuses writes for this user")


def rewrite_draft_weights(path, tensors: dict) -> None:
    """Save ``tensors`` as the draft checkpoint's ``model.safetensors`` and record their
    checksum in its ``config.json``, as a writer that saved bad weights (a diverged run, a
    wrong shape) would have: the checks after the checksum must catch them."""
    import json

    from safetensors.torch import save_file

    from deepspec.drafts.saving import CONFIG_NAME, WEIGHTS_CHECKSUM, WEIGHTS_NAME, weights_checksum

    path = os.fspath(path)
    save_file(tensors, os.path.join(path, WEIGHTS_NAME), metadata={"format": "pt"})
    config_path = os.path.join(path, CONFIG_NAME)
    with open(config_path, encoding="utf-8") as fh:
        config = json.load(fh)
    config[WEIGHTS_CHECKSUM] = weights_checksum(path)
    with open(config_path, "w", encoding="utf-8") as fh:
        json.dump(config, fh, indent=2)

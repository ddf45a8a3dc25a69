"""Exclusive locks that name their holder, and temporary directories that can tell whether
the process that made them is still alive.

Locks are ``flock`` s: the kernel drops them when the holding process dies, so a killed run
never leaves a stale lock behind, and the lock file itself (which holds the holder's pid,
for the error message) may stay on disk.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
from collections.abc import Iterator

LOCK_NAME = ".deepspec.lock"


class Busy(Exception):
    """The lock is held by another process (``pid``, when it could be read)."""

    def __init__(self, path: str, pid: int | None) -> None:
        super().__init__(path)
        self.path = path
        self.pid = pid


def _holder(path: str) -> int | None:
    try:
        with open(path, encoding="utf-8") as fh:
            text = fh.read().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


@contextlib.contextmanager
def exclusive_lock(path: str) -> Iterator[None]:
    """Hold an exclusive lock on the file ``path`` (created; it records this pid) for the
    body; raise :class:`Busy` at once when another process holds it."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise Busy(path, _holder(path)) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        try:
            yield
        finally:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, 0)
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def directory_lock(directory: str, what: str, fix: str) -> contextlib.AbstractContextManager[None]:
    """:func:`exclusive_lock` on ``directory/.deepspec.lock``, refusing with one
    :class:`~deepspec.errors.EnvironmentProblem` line (``what`` is in use by pid N; ``fix``)."""
    from deepspec.errors import EnvironmentProblem

    @contextlib.contextmanager
    def held() -> Iterator[None]:
        created = not os.path.isdir(directory)
        lock = os.path.join(directory, LOCK_NAME)
        new_file = not os.path.lexists(lock)
        try:
            with exclusive_lock(lock):
                try:
                    yield
                finally:  # leave nothing behind that was not there: the lock file (still
                    with contextlib.suppress(OSError):  # held) and a directory left empty
                        if new_file:
                            os.unlink(lock)
                        if created:
                            os.rmdir(directory)  # only when the run wrote nothing there
        except Busy as busy:
            who = f"pid {busy.pid}" if busy.pid else "another process"
            raise EnvironmentProblem(f"{what} is in use by {who} ({busy.path}); {fix}") from None

    return held()


# -- temporary directories owned by a live process -------------------------------------------


def hold_directory(path: str) -> int:
    """Lock the directory ``path`` itself for as long as the returned descriptor stays open
    (a rename keeps the lock: it is on the inode). :func:`remove_abandoned` skips it."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    fcntl.flock(fd, fcntl.LOCK_EX)
    return fd


def remove_abandoned(parent: str, prefix: str) -> list[str]:
    """Delete the directories ``parent/<prefix>*`` whose maker is gone (nobody holds
    :func:`hold_directory` on them); return their paths. Live ones are left alone."""
    removed = []
    try:
        names = os.listdir(parent)
    except OSError:
        return removed
    for name in names:
        path = os.path.join(parent, name)
        if not name.startswith(prefix) or os.path.islink(path) or not os.path.isdir(path):
            continue
        try:
            fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        except OSError:
            continue
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue  # its maker is still writing it
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
        finally:
            os.close(fd)
    return removed

"""Exclusive locks that name their holder, and temporary directories that can tell whether
the process that made them is still alive.

Locks are ``flock`` s: the kernel drops them when the holding process dies, so a killed run
never leaves a stale lock behind, and the lock file itself (which holds the holder's pid
and host, for the error message) may stay on disk. On a file system without ``flock``
(Lustre mounted ``noflock``, NFS without a lock daemon) the lock is skipped with a
warning rather than refusing the work.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import shutil
import socket
import warnings
from collections.abc import Iterator

from deepspec.errors import EnvironmentProblem

LOCK_NAME = ".deepspec.lock"
_NO_FLOCK = (errno.ENOSYS, errno.ENOLCK, errno.EOPNOTSUPP, errno.EINVAL)


class Busy(Exception):
    """The lock is held by another process (``holder``: "pid N on host H", when readable)."""

    def __init__(self, path: str, holder: str | None) -> None:
        super().__init__(path)
        self.path = path
        self.holder = holder


def _holder(path: str) -> str | None:
    try:
        with open(path, encoding="utf-8") as fh:
            pid, _, host = fh.read().strip().partition("@")
    except OSError:
        return None
    if not pid.isdigit():
        return None
    return f"pid {pid}" + (f" on {host}" if host and host != socket.gethostname() else "")


def _try_flock(fd: int, what: str) -> bool:
    """``LOCK_EX | LOCK_NB`` on ``fd``: True when taken, False when another process holds it.
    A file system without flock gives True after a warning (no lock is possible there)."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    except OSError as exc:
        if exc.errno not in _NO_FLOCK:
            raise
        warnings.warn(f"{what}: the file system does not support locks; going on without one", stacklevel=3)
    return True


@contextlib.contextmanager
def exclusive_lock(path: str) -> Iterator[None]:
    """Hold an exclusive lock on the file ``path`` (created; it records this pid and host)
    for the body; raise :class:`Busy` at once when another process holds it."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        if not _try_flock(fd, path):
            os.close(fd)
            raise Busy(path, _holder(path))
        try:  # the holder before us may have deleted the file: then lock the one there now
            same = os.path.samestat(os.fstat(fd), os.stat(path))
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}@{socket.gethostname()}\n".encode(), 0)
        try:
            yield
        finally:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, 0)
    finally:
        os.close(fd)  # releases the lock


def directory_lock(directory: str, what: str, fix: str) -> contextlib.AbstractContextManager[None]:
    """:func:`exclusive_lock` on ``directory/.deepspec.lock``, refusing with one
    :class:`~deepspec.errors.EnvironmentProblem` line (``what`` is in use by pid N; ``fix``).
    Leaves nothing behind that was not there: the lock file it created, and the directory
    when the body wrote nothing into it."""

    @contextlib.contextmanager
    def held() -> Iterator[None]:
        created = not os.path.isdir(directory)
        lock = os.path.join(directory, LOCK_NAME)
        new_file = not os.path.lexists(lock)
        try:
            with exclusive_lock(lock):
                try:
                    yield
                finally:  # deleted while still held: a waiter re-checks it (exclusive_lock)
                    with contextlib.suppress(OSError):
                        if new_file:
                            os.unlink(lock)
                        if created:
                            os.rmdir(directory)  # only when the run wrote nothing there
        except Busy as busy:
            raise EnvironmentProblem(
                f"{what} is in use by {busy.holder or 'another process'} ({busy.path}); {fix}"
            ) from None
        except OSError as exc:
            raise EnvironmentProblem(
                f"cannot lock {what} ({exc.strerror or exc}: {exc.filename or lock}); check its permissions "
                "or choose another directory"
            ) from None

    return held()


# -- temporary directories owned by a live process -------------------------------------------


def hold_directory(path: str) -> int:
    """Lock the directory ``path`` itself for as long as the returned descriptor stays open
    (a rename keeps the lock: it is on the inode). :func:`remove_abandoned` skips it."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        _try_flock(fd, path)
    except BaseException:
        os.close(fd)
        raise
    return fd


def remove_abandoned(parent: str, prefix: str, restore_to: str | None = None) -> list[str]:
    """Delete the directories ``parent/<prefix>*`` whose maker is gone (nobody holds
    :func:`hold_directory` on them); return their paths. Live ones are left alone, and so
    is everything where locks cannot be taken. An abandoned directory holding ``old`` (an
    earlier output moved aside by a swap that was killed half-way) is put back at
    ``restore_to`` when nothing is there."""
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
            except OSError:
                continue  # its maker is still writing it (or locks are unavailable here)
            old = os.path.join(path, "old")
            if restore_to and os.path.isdir(old) and not os.path.lexists(restore_to):
                os.rename(old, restore_to)
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
        finally:
            os.close(fd)
    return removed

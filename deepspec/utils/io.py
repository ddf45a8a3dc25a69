"""Atomic writes: a reader sees the old file (or directory) or the complete new one, never a part."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator
from typing import IO, Any

from deepspec.errors import ConfigError, DataError, EnvironmentProblem
from deepspec.utils.locks import hold_directory, remove_abandoned


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike[str], mode: str = "w", **kwargs: Any) -> Iterator[IO[Any]]:
    """Open a temporary file beside ``path``; on success fsync and rename it over ``path``.

    On any exception the temporary file is removed and ``path`` is left untouched.
    """
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=directory)
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the file normal permissions
    try:
        with os.fdopen(fd, mode, **kwargs) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if isinstance(exc, OSError) and exc.filename is None:
            exc.filename = path  # a failed write() names no file: name the one being written
        raise
    fsync_dir(directory)


@contextlib.contextmanager
def writing(path: str | os.PathLike[str]) -> Iterator[None]:
    """Name ``path`` in what fails while the body writes it: an ``OSError`` gets it as its
    filename; a library's own write error (safetensors, ``torch.save``) becomes an
    ``OSError`` (when it carries an OS error code) or an
    :class:`~deepspec.errors.EnvironmentProblem` naming the file and the usual fix."""
    import re

    path = os.fspath(path)
    try:
        yield
    except OSError as exc:
        if exc.filename is None:
            exc.filename = path
        raise
    except Exception as exc:  # noqa: BLE001 - sorted below: a library's write error or a bug
        kind = f"{type(exc).__module__}.{type(exc).__name__}"
        text = " ".join(str(exc).split())
        library = "safetensors" in kind.lower() or isinstance(exc, RuntimeError)
        if not (library and ("serializ" in text.lower() or "writ" in text.lower())):
            raise
        code = re.search(r"(?:os error|code:|errno) ?(\d+)", text)
        if code:
            num = int(code.group(1))
            raise OSError(num, os.strerror(num), path) from None
        raise EnvironmentProblem(
            f"writing {path} failed ({text[:200]}); is the disk full? free disk space or choose "
            "another output directory"
        ) from None


def save_tensors(tensors: dict[str, Any], path: str, metadata: dict[str, str] | None = None) -> None:
    """``safetensors`` ``save_file`` whose write errors name ``path`` (:func:`writing`)."""
    from safetensors.torch import save_file

    with writing(path):
        save_file(tensors, path, metadata=metadata)
        os.chmod(path, 0o666 & ~_umask())  # safetensors writes 0600; give it a config's mode


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def make_dir_public(path: str | os.PathLike[str]) -> None:
    """``mkdtemp`` makes 0700 directories; give them normal permissions."""
    os.chmod(path, 0o777 & ~_umask())


def fsync_dir(directory: str | os.PathLike[str]) -> None:
    """Make a rename inside ``directory`` durable (no-op where unsupported)."""
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


TMP_MARK = ".deepspec-tmp-"


def _temp_prefix(path: str) -> str:
    return f".{os.path.basename(path)}{TMP_MARK}"


def check_replaceable(
    path: str | os.PathLike[str],
    flag: str,
    *,
    ours: Callable[[str], bool],
    what: str,
    protect: Iterable[str] = (),
) -> str:
    """``path`` made absolute, when deepspec may write a directory there: it does not exist,
    is an empty directory, or is ``what`` deepspec wrote earlier (``ours(path)``). Refused in
    one :class:`~deepspec.errors.ConfigError` line: an empty name, a path that contains the
    working directory or one of ``protect`` (what the command reads), anything else that
    exists. ``flag`` names the option."""
    raw = os.fspath(path)
    if not raw.strip():
        raise ConfigError(f"{flag} is empty; name the directory to write")
    path = os.path.abspath(os.path.expanduser(raw))
    real = os.path.realpath(path)

    def inside(other: str) -> bool:
        other = os.path.realpath(other)
        return other == real or other.startswith(real.rstrip(os.sep) + os.sep)

    if inside(os.getcwd()):
        raise ConfigError(
            f"{flag} {raw} contains the working directory {os.getcwd()}, which replacing it would "
            "delete; choose a new directory"
        )
    for kept in protect:
        if inside(kept):
            raise ConfigError(
                f"{flag} {raw} contains {kept}, which this command reads; choose a new directory"
            )
    if os.path.lexists(path):
        empty = os.path.isdir(path) and not os.path.islink(path) and not os.listdir(path)
        if not (empty or (os.path.isdir(path) and not os.path.islink(path) and ours(path))):
            raise ConfigError(
                f"{flag} {raw} already exists and is not {what}; deepspec replaces only what it "
                "wrote itself: choose a new path or remove it yourself"
            )
    return path


@contextlib.contextmanager
def atomic_directory(
    path: str | os.PathLike[str],
    *,
    flag: str = "output directory",
    ours: Callable[[str], bool],
    what: str,
    protect: Iterable[str] = (),
) -> Iterator[str]:
    """Yield a fresh directory beside ``path`` to fill; on success it replaces ``path`` (a
    reader sees the old directory or the complete new one). On any exception it is removed
    and ``path`` is left untouched.

    Only what :func:`check_replaceable` allows is replaced (checked before and after the
    work). The temporary directory is locked while it is filled, so leftovers of killed
    runs (``.<name>.deepspec-tmp-*``) are recognised and removed by the next run."""
    path = check_replaceable(path, flag, ours=ours, what=what, protect=protect)
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    remove_abandoned(parent, _temp_prefix(path), restore_to=path)
    tmp = tempfile.mkdtemp(prefix=_temp_prefix(path), dir=parent)
    held: list[int] = []
    try:
        held.append(hold_directory(tmp))
        make_dir_public(tmp)
        yield tmp
        check_replaceable(path, flag, ours=ours, what=what, protect=protect)
        if os.path.lexists(path):  # move the old one aside, put the new one in, then delete
            aside = tempfile.mkdtemp(prefix=_temp_prefix(path), dir=parent)
            held.append(hold_directory(aside))  # killed half-way: the next run puts it back
            old = os.path.join(aside, "old")
            os.rename(path, old)
            try:
                os.rename(tmp, path)
            except BaseException:
                os.rename(old, path)  # the old one goes back where it was
                raise
            shutil.rmtree(aside, ignore_errors=True)
        else:
            os.rename(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        for fd in held:
            os.close(fd)
    fsync_dir(parent)


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    with atomic_open(path, "w", encoding="utf-8") as fh:
        fh.write(text)


def _json_default(obj: Any) -> Any:
    """numpy scalars/arrays and tensors → plain Python for json.dumps."""
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if hasattr(obj, "item"):
        return obj.item()
    raise TypeError(f"Object of type {type(obj).__name__} is not JSON serializable")


def atomic_write_json(path: str | os.PathLike[str], obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")


def same_file(a: str, b: str) -> bool:
    """``a`` and ``b`` name the same file (through symlinks or hard links too)."""
    if os.path.realpath(a) == os.path.realpath(b):
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def check_writable_dir(directory: str, flag: str, fix: str = "choose a writable directory") -> None:
    """Refuse, before any work, a ``directory`` that is a file, lies under a file, or cannot
    take new files. Creates nothing: the nearest existing folder on the path is probed with
    a temporary file. ``flag`` names the option in the one-line error, ``fix`` the way out."""
    path = os.path.abspath(os.path.expanduser(directory))
    probe = path
    while not os.path.exists(probe) and os.path.dirname(probe) != probe:
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe):
        where = "is a file" if probe == path else f"lies under {probe}, which is a file"
        raise ConfigError(f"{flag} {directory} {where}, not a directory; choose a directory")
    try:
        fd, tmp = tempfile.mkstemp(prefix=".deepspec-write-test-", dir=probe)
    except OSError as exc:
        raise EnvironmentProblem(
            f"{flag} {directory}: cannot write in {probe} ({exc.strerror or exc}); {fix}"
        ) from None
    os.close(fd)
    os.unlink(tmp)


def read_json_object(path: str, fix: str, error: type[Exception] | None = None) -> dict[str, Any]:
    """The JSON object in ``path``. A torn, non-UTF-8 or non-object file raises ``error``
    (default :class:`~deepspec.errors.DataError`) as one line naming the file and ``fix``;
    a missing file raises ``FileNotFoundError`` for the caller to word."""
    error = error or DataError
    try:
        with open(path, encoding="utf-8") as fh:
            value = json.load(fh)
    except json.JSONDecodeError as exc:
        raise error(
            f"{path} is not valid JSON (line {exc.lineno} column {exc.colno}: {exc.msg}): the file is "
            f"truncated or damaged; {fix}"
        ) from None
    except UnicodeDecodeError:
        raise error(f"{path} is not UTF-8 text: the file is damaged; {fix}") from None
    if not isinstance(value, dict):
        raise error(f"{path} must hold a JSON object, not {type(value).__name__}; {fix}")
    return value


def unreadable_safetensors(
    path: str, exc: Exception, fix: str, error: type[Exception] | None = None
) -> Exception:
    """The one-line error for a safetensors file that does not open (``raise`` it); an
    ``OSError`` is returned unchanged (the entry point words it)."""
    if isinstance(exc, OSError):
        return exc
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return (error or DataError)(
        f"{path} is unreadable ({first}): it is truncated or not a safetensors file; {fix}"
    )

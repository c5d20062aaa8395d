"""Atomic writes, directory locks and disk-space checks.

A file or a directory appears under its final name complete, or not at all; a directory that is
replaced is renamed aside first (`.NAME.lfm_mlx-old`) and `recover` puts it back (or drops it) after a kill.
A run or output directory is locked with an OS file lock (flock), which dies with its holder.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import glob
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from lfm_mlx.errors import DirectoryBusy, DiskFull, InvalidInput

LOCK_NAME = ".lfm_mlx.lock"
BACKUP_SUFFIX = ".lfm_mlx-old"  # distinctive: recovery renames these back, and must never take a user's `.X.old`
# What tempfile names our temporaries: `.NAME.tmp-` + 8 random characters (+ a writer's suffix).
_TEMPORARY = re.compile(r"^\..+\.tmp-[a-z0-9_]{8}(\.[a-z]+)?$")


# ---------------------------------------------------------------- locks


def check_directory_path(directory: Path) -> None:
    """InvalidInput when `directory`, or a folder it would be made in, is an existing file."""
    for path in (directory, *directory.parents):
        if path.exists():
            if not path.is_dir():
                raise InvalidInput(f"{path} is a file, not a directory, so {directory} cannot be made there; "
                                   "choose another path")
            return


@contextlib.contextmanager
def locked(directory: str | Path, sibling: bool = False) -> Iterator[Path]:
    """Hold an exclusive lock on `directory` for the block; another process gets DirectoryBusy.

    The lock file is `directory`/.lfm_mlx.lock, or `.NAME.lock` beside it when `sibling` (for an
    output that is replaced as a whole, whose own files would be renamed away). The OS drops the
    lock when the holder exits or is killed, so a stale lock file never blocks anyone.
    """
    directory = Path(directory)
    check_directory_path(directory.parent if sibling else directory)
    if sibling:
        directory.parent.mkdir(parents=True, exist_ok=True)
        lock = directory.parent / f".{directory.name}.lock"
    else:
        directory.mkdir(parents=True, exist_ok=True)
        lock = directory / LOCK_NAME
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise DirectoryBusy(
                f"{directory} is in use by another lfm-mlx process (PID {holder}, lock {lock}); wait for it "
                f"to finish or stop it, or use another directory") from None
        with contextlib.suppress(FileNotFoundError):
            if os.fstat(fd).st_ino == os.stat(lock).st_ino:
                break  # still the file at that path: not one a finishing holder just removed
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield lock
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(lock)  # while still holding it: a process that opened it meanwhile retries
        os.close(fd)  # closing the descriptor releases the lock


# ---------------------------------------------------------------- disk space


def _existing_ancestor(path: Path) -> Path:
    path = Path(path).absolute()
    while not path.exists():
        path = path.parent
    return path


def check_free_space(target: str | Path, needed: int, what: str) -> None:
    """Raise DiskFull when the filesystem of `target` has fewer than `needed` bytes free."""
    where = _existing_ancestor(Path(target))
    free = shutil.disk_usage(where).free
    if needed > free:
        raise DiskFull(f"{target}: {what} needs {needed:,} bytes but only {free:,} are free on the disk of "
                       f"{where}; free some space or write to another disk")


def is_disk_full(err: BaseException) -> bool:
    """An OSError ENOSPC / EDQUOT, or MLX's "[write] Unable to write N bytes to file." (no path, no errno)."""
    if isinstance(err, DiskFull):
        return False
    if isinstance(err, OSError):
        return err.errno in (errno.ENOSPC, errno.EDQUOT)
    return isinstance(err, RuntimeError) and "Unable to write" in str(err)


def _disk_full(target: Path, err: BaseException) -> DiskFull:
    free = shutil.disk_usage(_existing_ancestor(target)).free
    return DiskFull(f"{target}: the disk filled up while writing it ({free:,} bytes free now; {err}); nothing was "
                    f"replaced; free some space or write to another disk")


# ---------------------------------------------------------------- atomic writes


def _fsync_tree(root: Path) -> None:
    for path in sorted(root.rglob("*")):
        if path.is_file():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
    _fsync_dir(root)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def backup_of(final: str | Path) -> Path:
    """Where `atomic_dir` keeps the old `final` while the new one is renamed in."""
    final = Path(final)
    return final.parent / f".{final.name}{BACKUP_SUFFIX}"


def recover(final: str | Path) -> None:
    """Finish what a killed write of `final` left: the old directory goes back when `final` is
    missing (killed between the two renames of a replace), else its backup is dropped; temporaries
    of killed writes (`.NAME.tmp-*`) are removed. Call it while holding the lock of `final`."""
    final = Path(final)
    backup = backup_of(final)
    if backup.exists():
        if final.exists():
            _remove(backup)
        else:
            os.replace(backup, final)
            _fsync_dir(final.parent)
    if final.parent.is_dir():
        for stale in final.parent.glob(f".{glob.escape(final.name)}.tmp-*"):
            if _TEMPORARY.match(stale.name):
                _remove(stale)


def recover_directory(directory: str | Path) -> None:
    """`recover` everything killed writes left in `directory`: `.X.lfm_mlx-old` backups put back or dropped,
    every `.*.tmp-*` temporary removed (an 8B mid-group checkpoint is ~25 GB). Only while holding
    the directory's lock: a live writer's temporaries look the same."""
    directory = Path(directory)
    if not directory.is_dir():
        return
    for backup in directory.glob(f".*{BACKUP_SUFFIX}"):
        recover(directory / backup.name[1:-len(BACKUP_SUFFIX)])
    for stale in directory.glob(".*.tmp-*"):
        if _TEMPORARY.match(stale.name):
            _remove(stale)


@contextlib.contextmanager
def atomic_dir(final: str | Path, replace: bool = True) -> Iterator[Path]:
    """Yield a temporary sibling directory; on success fsync it and rename it to `final`.

    On any exception the temporary directory is removed and `final` keeps its previous content. A
    replaced `final` is renamed to `.NAME.lfm_mlx-old` before the new one is renamed in; a kill between the
    two renames leaves it there, and `recover` (run first here) puts it back.
    """
    final = Path(final)
    check_directory_path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    recover(final)
    if final.exists() and not replace:
        raise FileExistsError(f"{final} already exists; remove it or choose another output path")
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    os.chmod(tmp, 0o755)  # mkdtemp makes 0700; the result is an ordinary shared directory
    try:
        try:
            yield tmp
            _fsync_tree(tmp)
        except (OSError, RuntimeError) as err:
            if is_disk_full(err):
                raise _disk_full(final, err) from None
            raise
        if final.exists():
            backup = backup_of(final)
            os.replace(final, backup)
            os.replace(tmp, final)
            _fsync_dir(final.parent)
            _remove(backup)
        else:
            os.replace(tmp, final)
            _fsync_dir(final.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def atomic_file(final: str | Path, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary sibling path to write; on success fsync it and rename it to `final`.

    On any exception the temporary file is removed and `final` keeps its previous content.
    `suffix` keeps an extension some writers insist on (mx.save_safetensors).
    """
    final = Path(final)
    check_directory_path(final.parent)
    if final.is_dir():
        raise InvalidInput(f"{final} is a directory; pass a file path (e.g. {final / 'model.gguf'})")
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.tmp-", suffix=suffix, dir=final.parent)
    os.close(fd)
    os.chmod(tmp, 0o644)  # mkstemp makes 0600; the result is an ordinary file
    try:
        try:
            yield Path(tmp)
            with open(tmp, "rb") as handle:
                os.fsync(handle.fileno())
        except (OSError, RuntimeError) as err:
            if is_disk_full(err):
                raise _disk_full(final, err) from None
            raise
        os.replace(tmp, final)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write text to `path` through a temporary file, fsync and rename."""
    with atomic_file(path) as tmp:
        tmp.write_text(text)


def atomic_write_json(path: str | Path, data) -> None:
    """Write `data` as indented JSON, atomically."""
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=False) + "\n")


def refuse_overlap(output: str | Path, sources: dict[str, str | Path]) -> None:
    """Raise InvalidInput when `output` is, holds or lies inside one of the `sources` (name -> path):
    writing it would replace or change what is being read. Sources that are not local paths (hub ids)
    are skipped."""
    out = Path(output).resolve()
    for name, source in sources.items():
        path = Path(source)
        if not path.exists():
            continue
        path = path.resolve()
        if out == path or path.is_relative_to(out) or out.is_relative_to(path):
            raise InvalidInput(f"{output}: the output is, holds or lies inside the {name} {source}; "
                               f"write it to a directory outside {source}")

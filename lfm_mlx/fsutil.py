"""Atomic writes: a file or a directory appears under its final name complete, or not at all."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator


def _fsync_tree(root: Path) -> None:
    for path in sorted(root.rglob("*")):
        if path.is_file():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
    fd = os.open(root, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_dir(final: str | Path, replace: bool = True) -> Iterator[Path]:
    """Yield a temporary sibling directory; on success fsync it and rename it to `final`.

    On any exception (or a kill) the temporary directory is removed or left under a dot-name that
    no reader picks up, and `final` keeps its previous content.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    if final.exists() and not replace:
        raise FileExistsError(f"{final} already exists; remove it or choose another output path")
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    os.chmod(tmp, 0o755)  # mkdtemp makes 0700; the result is an ordinary shared directory
    try:
        yield tmp
        _fsync_tree(tmp)
        if final.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{final.name}.old-", dir=final.parent))
            os.replace(final, old / final.name)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
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
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.tmp-", suffix=suffix, dir=final.parent)
    os.close(fd)
    os.chmod(tmp, 0o644)  # mkstemp makes 0600; the result is an ordinary file
    try:
        yield Path(tmp)
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
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
    """Raise ValueError when `output` is, holds or lies inside one of the `sources` (name -> path):
    writing it would replace or change what is being read. Sources that are not local paths (hub ids)
    are skipped."""
    out = Path(output).resolve()
    for name, source in sources.items():
        path = Path(source)
        if not path.exists():
            continue
        path = path.resolve()
        if out == path or path.is_relative_to(out) or out.is_relative_to(path):
            raise ValueError(f"{output}: the output is, holds or lies inside the {name} {source}; "
                             f"write it to a directory outside {source}")

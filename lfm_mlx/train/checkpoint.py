"""Atomic training checkpoints and resume state for grouped MoE training.

A checkpoint is a directory `RUN_DIR/checkpoints/ckpt-GGGGGGGG-PPPP` (global step, phase) written
through `fsutil.atomic_dir`: files go to a dot-named temporary sibling, are fsynced, and the
directory is renamed into place. A reader only lists names without a leading dot and only accepts
a directory whose `state.json` lists files that exist with the recorded sizes, so a checkpoint
cut off by a kill is never picked up. No pickle: arrays are safetensors, the rest is JSON.

Contents:
  state.json              step, phase, data order, RNG rule, config hash, counters, file sizes
  weights.safetensors     MoE parameters (experts, routers) of every layer trained so far, exact dtypes
  group_start.safetensors the active group's int8 experts as they were when the group began
  optimizer.safetensors   the active group's optimizer state (absent at a group boundary)
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten, tree_map_with_path

from lfm_mlx.fsutil import atomic_dir, atomic_file, check_free_space

FORMAT = "lfm_mlx.checkpoint/1"
CHECKPOINTS = "checkpoints"
_NAME = re.compile(r"^ckpt-(\d{8})-(\d{4})$")
_ARRAY_FILES = ("weights", "group_start", "optimizer")


@dataclass
class Checkpoint:
    """A loaded checkpoint: its directory, JSON state and the array groups that were saved."""

    path: Path
    state: dict
    weights: dict[str, mx.array]
    group_start: dict[str, mx.array]
    optimizer: dict[str, mx.array] | None


def config_hash(config: dict) -> str:
    """sha256 of a config dict in canonical JSON (sorted keys): what a checkpoint must match."""
    text = json.dumps(config, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def checkpoint_name(global_step: int, phase: int) -> str:
    """Names sort in training order: a group-boundary checkpoint after step s has phase + 1."""
    return f"ckpt-{global_step:08d}-{phase:04d}"


def _save_arrays(path: Path, arrays: dict[str, mx.array]) -> None:
    mx.eval(list(arrays.values()))
    mx.save_safetensors(str(path), arrays, metadata={"format": FORMAT})


class ParkedArrays:
    """Arrays parked in a safetensors file while nothing reads them, instead of in memory (the
    group's int8 start copy while the group trains: 1.5 GB at group 4 of the 8B), read back by
    `load`. `path` None keeps them in memory."""

    def __init__(self, arrays: dict[str, mx.array], path: str | Path | None = None):
        self.path = None if path is None else Path(path)
        self._arrays: dict[str, mx.array] | None = arrays
        if self.path is not None:
            check_free_space(self.path, sum(v.nbytes for v in arrays.values()), "the parked group start copy")
            with atomic_file(self.path, suffix=".safetensors") as tmp:
                _save_arrays(tmp, arrays)
            self._arrays = None  # the caller's references are the last ones left

    def load(self) -> dict[str, mx.array]:
        """The arrays (from the file when parked)."""
        return self._arrays if self._arrays is not None else mx.load(str(self.path))

    def write(self, target: Path) -> None:
        """Save the arrays to `target` as `_save_arrays` does. A parked file is linked (or copied
        where it cannot be): its bytes are already that file's, and reading them back would hold
        them in memory again. It is never rewritten in place (`atomic_file` renames), so a link
        keeps its content when the parked file is later discarded."""
        if self.path is None:
            _save_arrays(target, self._arrays)
            return
        try:
            os.link(self.path, target)
        except OSError:  # another filesystem, or no hard links there
            shutil.copyfile(self.path, target)

    def discard(self) -> None:
        """Forget the arrays and remove the file."""
        self._arrays = None
        if self.path is not None:
            self.path.unlink(missing_ok=True)


def _bytes_to_write(arrays: dict, root: Path) -> int:
    """What a checkpoint writes: its arrays, and a parked copy where it cannot be linked."""
    total = 0
    for group in arrays.values():
        if isinstance(group, ParkedArrays) and group.path is None:
            total += sum(value.nbytes for value in group.load().values())
        elif isinstance(group, ParkedArrays):
            same_disk = group.path.exists() and root.exists() and group.path.stat().st_dev == root.stat().st_dev
            total += 0 if same_disk else group.path.stat().st_size
        elif group:
            total += sum(getattr(value, "nbytes", 0) for value in group.values())  # a bad value fails in the save
    return total


def save_checkpoint(run_dir: str | Path, state: dict, weights: dict[str, mx.array],
                    group_start: dict[str, mx.array] | ParkedArrays | None = None,
                    optimizer_state: dict | None = None, keep: int = 2) -> Path:
    """Write a checkpoint atomically and prune all but the newest `keep` (0 keeps all).

    `state` must hold integer `global_step` and `phase`; `optimizer_state` is an optimizer's
    (nested) state tree, flattened to dotted names.
    """
    for key in ("global_step", "phase"):
        if not isinstance(state.get(key), int):
            raise ValueError(f"checkpoint state needs an integer {key!r}, got {state.get(key)!r}")
    root = Path(run_dir) / CHECKPOINTS
    final = root / checkpoint_name(state["global_step"], state["phase"])
    arrays = {"weights": weights, "group_start": {} if group_start is None else group_start,
              "optimizer": dict(tree_flatten(optimizer_state)) if optimizer_state else None}
    check_free_space(final, _bytes_to_write(arrays, root), f"checkpoint {final.name}")
    with atomic_dir(final) as tmp:
        files = {}
        for name, group in arrays.items():
            if group is None:
                continue
            target = tmp / f"{name}.safetensors"
            if isinstance(group, ParkedArrays):
                group.write(target)  # a parked start copy: linked, not read back
            else:
                _save_arrays(target, group)
            files[target.name] = target.stat().st_size
        record = {**state, "format": FORMAT, "files": files}
        (tmp / "state.json").write_text(json.dumps(record, indent=2, sort_keys=True))
    if keep > 0:
        for old in list_checkpoints(run_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def _is_complete(path: Path) -> bool:
    """True when state.json parses, has our format tag and every listed file has its size."""
    try:
        state = json.loads((path / "state.json").read_text())
    except (OSError, json.JSONDecodeError):
        return False
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        return False
    for name, size in state.get("files", {}).items():
        file = path / name
        if not file.is_file() or file.stat().st_size != size:
            return False
    return True


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first (dot-named temporaries are never listed)."""
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        match = _NAME.match(path.name)
        if match and path.is_dir() and _is_complete(path):
            found.append(((int(match[1]), int(match[2])), path))
    return [path for _, path in sorted(found)]


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest complete checkpoint of a run, or None."""
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def load_checkpoint(path: str | Path) -> Checkpoint:
    """Read a checkpoint directory written by `save_checkpoint`."""
    path = Path(path)
    if not _is_complete(path):
        raise ValueError(
            f"{path} is not a complete lfm_mlx checkpoint (state.json missing, unreadable or listing "
            f"files that are absent or truncated); delete it and resume from an earlier one"
        )
    state = json.loads((path / "state.json").read_text())
    loaded = {}
    for name in _ARRAY_FILES:
        file = path / f"{name}.safetensors"
        loaded[name] = mx.load(str(file)) if file.name in state["files"] else None
    return Checkpoint(path=path, state=state, weights=loaded["weights"] or {},
                      group_start=loaded["group_start"] or {}, optimizer=loaded["optimizer"])


def restore_tree(template: dict, flat: dict[str, mx.array], what: str) -> dict:
    """Fill `template` (a nested tree, e.g. a freshly initialised optimizer state) leaf by leaf
    from `flat` (dotted names -> arrays); names and shapes must match exactly."""
    expected = {name for name, _ in tree_flatten(template)}
    if expected != set(flat):
        missing, extra = sorted(expected - set(flat)), sorted(set(flat) - expected)
        raise ValueError(
            f"{what}: saved entries do not match this run (missing {missing[:5]}, unexpected "
            f"{extra[:5]}); the checkpoint belongs to a different group or optimizer"
        )

    def pick(name: str, value: mx.array) -> mx.array:
        saved = flat[name]
        if saved.shape != value.shape:
            raise ValueError(f"{what}: {name} has shape {saved.shape} in the checkpoint, {value.shape} here")
        return saved

    return tree_map_with_path(pick, template)

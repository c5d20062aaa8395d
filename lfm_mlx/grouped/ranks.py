"""The grouped trainer's data-parallel pieces (`lfm_mlx.train.distributed`, under `mlx.launch`): rank 0
holds the run directory and reads its checkpoints for every rank, each rank trains its slice of the
global micro-batches, and a memory hard stop on any rank stops them all after one checkpoint."""

from __future__ import annotations

import contextlib
import tempfile
from pathlib import Path
from typing import Callable

import mlx.core as mx

from lfm_mlx import console
from lfm_mlx.data import Batch, Example, make_batch
from lfm_mlx.fsutil import locked, recover_directory, refuse_overlap
from lfm_mlx.grouped.config import ConfigError
from lfm_mlx.memory import MemoryHardStop
from lfm_mlx.train.checkpoint import CHECKPOINTS, Checkpoint, latest_checkpoint, load_checkpoint
from lfm_mlx.train.distributed import World, cost_model


def claim_run_dir(world: World, run_dir: Path, model: str, stack: contextlib.ExitStack) -> None:
    """Rank 0 locks run_dir for the whole job (the lock leaves with `stack`) and cleans what killed
    writes left; an error there stops every rank."""
    def claim() -> None:
        refuse_overlap(run_dir, {"model": model})  # run_dir/model would replace it
        stack.enter_context(locked(run_dir))
        recover_directory(run_dir)  # what killed writes left: temporaries, a half-replaced model
        recover_directory(run_dir / CHECKPOINTS)

    world.on_main(claim)


def read_resume(world: World, run_dir: Path, config_hash: str,
                config_changes: Callable[[Checkpoint], dict]) -> tuple[Checkpoint | None, dict]:
    """The newest checkpoint and the config changes resuming it makes (`config_changes` checks
    them), as rank 0 reads them, on every rank (arrays bit for bit); (None, {}) for a fresh run. A
    checkpoint of another world size is refused: its data order was cut for that size."""
    def read() -> tuple[Checkpoint | None, dict]:
        latest = latest_checkpoint(run_dir)
        resume = None if latest is None else load_checkpoint(latest)
        return resume, config_changes(resume) if resume and resume.state.get("config_hash") != config_hash else {}

    resume, changes = world.on_main(read) or (None, {})
    if world.size > 1:
        head = world.broadcast_json(None if resume is None else [str(resume.path), resume.state, changes])
        if head is None:
            return None, {}
        arrays = {name: world.broadcast_tree(getattr(resume, name) if world.main else None)
                  for name in ("weights", "group_start", "optimizer")}
        resume, changes = Checkpoint(Path(head[0]), head[1], arrays["weights"] or {}, arrays["group_start"] or {},
                                     arrays["optimizer"]), head[2]
    saved = 1 if resume is None else resume.state.get("world_size", 1)
    if saved != world.size:
        raise ConfigError(f"{resume.path} was written by a job of {saved} process(es) and this launch has "
                          f"{world.size}; resume with the same count (mlx.launch -n {saved}), or use a new run_dir")
    return resume, changes


def local_batch(world: World, examples: list[Example], indices: list[int], pad_id: int) -> Batch:
    """This rank's slice of a global micro-batch. A rank left without examples (fewer than ranks)
    gets one whose loss mask is all False: zero gradients of the same dtypes as the others'."""
    mine = world.shard(indices)
    batch = make_batch([examples[i] for i in mine or indices[:1]], pad_id)
    return batch if mine else batch._replace(loss_mask=mx.zeros_like(batch.loss_mask), row_ids=[])


def park_dir(world: World, run_dir: Path, scratch: list) -> Path:
    """Where this rank parks its group start copy: run_dir on rank 0, a private temporary elsewhere."""
    if world.main:
        return run_dir
    if not scratch:
        scratch.append(tempfile.TemporaryDirectory(prefix=f"lfm_mlx-rank{world.rank}-"))
    return Path(scratch[0].name)


class PeerMemoryStop(MemoryHardStop):
    """Another rank reached its memory hard stop: this one stops with it (after the checkpoint)."""

    def __init__(self, message: str):
        RuntimeError.__init__(self, message)


def agree_on_stop(world: World, stop: MemoryHardStop | None, step: int) -> MemoryHardStop | None:
    """Every rank learns whether any rank hit its hard stop this step (one small all-reduce)."""
    if world.size == 1:
        return stop
    stopped = world.sum(mx.zeros((world.size,), mx.int32).at[world.rank].add(int(stop is not None))).tolist()
    if stop is None and any(stopped):
        stop = PeerMemoryStop(f"memory hard stop at step {step} on rank {stopped.index(1)} of {world.size} (its "
                              f"message says why); every rank stops after the checkpoint")
    return stop


def say_cost(world: World, now: bool, what: str) -> None:
    """The communication cost line, from the bytes the step just reduced (rank 0, several ranks)."""
    if now and world.main and world.size > 1:
        console.say("train", cost_model(world.reduce_bytes, world.size, what))

"""How a run's steps map to groups and micro-batches (steps per group, the batch stream, per-step
seeds), and what a run returns or stops with."""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from pathlib import Path

from lfm_mlx.data import Batch, Example, batch_order, make_batch
from lfm_mlx.grouped.config import TrainConfig
from lfm_mlx.model.moe import expert_kernel


class NonFiniteStop(RuntimeError):
    """Too many consecutive steps with a non-finite loss or gradient, or an update that made the
    trained weights non-finite."""

    exit_code = 65  # EX_DATAERR: look at the logged example ids

    def __init__(self, step: int, skips: int, row_ids: list[str], learning_rate: float, what: str):
        self.step, self.skips, self.row_ids = step, skips, row_ids
        super().__init__(
            f"stopped at step {step}: {what} (last examples: {', '.join(row_ids)}); the newest checkpoint holds the "
            f"last good weights; see metrics.jsonl 'skipped' records. Fix those rows, or lower the learning rate and "
            f"resume: lfm-mlx train CONFIG --set learning_rate={_lower(learning_rate):g} "
            "--allow-config-change learning_rate")


class UndoStep(Exception):
    """Step `step`'s update made the trained weights non-finite: the trainer replays the run from its
    newest checkpoint (as a resume does, bit for bit) with that step skipped."""

    def __init__(self, step: int):
        self.step = step
        super().__init__(f"undo step {step}")


def _lower(learning_rate: float) -> float:
    """A learning rate to suggest after non-finite steps: a tenth, or the default for an absurd one."""
    return learning_rate / 10 if 0 < learning_rate < 1 else 1e-5


@dataclass
class TrainResult:
    """What a finished run left behind."""

    run_dir: Path
    model_dir: Path
    steps: int
    skipped_steps: int
    initial_valid_loss: float | None
    final_valid_loss: float | None
    expert_kernel: str
    groups: list[dict]

    @property
    def frozen_path(self) -> str:
        """`expert_kernel` by its name before issue 28."""
        return self.expert_kernel

    @classmethod
    def from_record(cls, record: dict, **fields) -> "TrainResult":
        """From a summary.json's "result" (one written before issue 28 says frozen_path, "batched" for "blocks")."""
        record = dict(record)
        if "frozen_path" in record:
            record["expert_kernel"] = expert_kernel(record.pop("frozen_path"), warn=False)
        return cls(**{**record, **fields})


def steps_per_group(n_train: int, config: TrainConfig, n_groups: int, world_size: int = 1) -> int:
    """Optimizer steps of every phase (see the `lfm_mlx.grouped` package docstring); `batch_size`
    is per rank, so `world_size` ranks take world_size x batch_size examples a micro-batch."""
    if isinstance(config.steps_per_group, int):
        return config.steps_per_group
    per_epoch = math.ceil(math.ceil(n_train / (config.batch_size * world_size)) / config.grad_accumulation)
    if config.steps_per_group == "epoch":
        return per_epoch
    return max(1, math.ceil(per_epoch / n_groups))


class BatchStream:
    """Micro-batch m of the endless stream of shuffled passes over the training set."""

    def __init__(self, examples: list[Example], batch_size: int, seed: int, sort_by_length: bool, pad_id: int):
        self.examples, self.batch_size, self.seed = examples, batch_size, seed
        self.sort_by_length, self.pad_id = sort_by_length, pad_id
        self.lengths = [e.n_tokens for e in examples]
        self._pass, self._order = -1, []

    def indices(self, m: int) -> list[int]:
        n = math.ceil(len(self.examples) / self.batch_size)
        p, j = divmod(m, n)
        if p != self._pass:
            self._pass = p
            self._order = batch_order(self.lengths, self.batch_size, self.seed, p, self.sort_by_length)
        return self._order[j]

    def batch(self, m: int) -> Batch:
        return make_batch([self.examples[i] for i in self.indices(m)], self.pad_id)

    def row_ids(self, m: int) -> list[str]:
        return [self.examples[i].row_id for i in self.indices(m)]


def _step_seed(seed: int, step: int) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}/step/{step}".encode()).digest()[:4], "little")

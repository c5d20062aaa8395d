"""A group's start and end: its int8 start copy parked on disk, then requantized against on the way out."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim

from lfm_mlx.checkpoint import ParkedArrays
from lfm_mlx.grouped.config import GROUP_START, TrainConfig
from lfm_mlx.grouped.experts import requantize_group
from lfm_mlx.grouped.optimizer import FusedAdamW


def park_group_start(start: dict[str, mx.array], config: TrainConfig, directory: str | Path) -> ParkedArrays:
    """The group's int8 start copy (`moe_params` before `activate_group`), parked in
    `directory`/GROUP_START while the group trains when `offload_group_start`, else kept in memory.
    Call once the activated group is evaluated: its dequantization reads those arrays."""
    return ParkedArrays(start, Path(directory) / GROUP_START if config.offload_group_start else None)


def end_group(model: nn.Module, layers: list[int], start: ParkedArrays, frozen: str,
              optimizer: optim.Optimizer | None, stochastic_key: Callable[[str], mx.array] | None = None) -> dict:
    """The group's end: split masters merged back into whole float32 masters, the group requantized
    from them against its start copy (`requantize_group`, whose retention it returns), the copy dropped."""
    if isinstance(optimizer, FusedAdamW):
        optimizer.merge_masters(model)
    retention = requantize_group(model, layers, start.load(), frozen, stochastic_key)
    start.discard()
    return retention

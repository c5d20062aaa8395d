"""Memory budget for grouped MoE training: estimate before allocating, watch while training.

`estimate_peak` predicts the peak of one training step from the model config, per component, so a
run that cannot fit is refused before any weight loads (`MemoryWatchdog.admit`). During training
`MemoryWatchdog.check` samples MLX and process memory: at the soft limit it clears MLX's cache and
warns; at the hard limit (or when the growth rate says the next sample would pass it) it raises
`MemoryHardStop`, so the trainer can checkpoint and exit before Metal or the OS kills the process
(`mx.set_memory_limit` is a guideline, not a cap).

What a sample reports (`StepMemoryReader`, the default reader): the peak since the previous sample
of the memory the budget is about. On unified memory (CPU backend, Apple silicon) MLX buffers are
process memory and a step returns its large buffers to the OS before the watchdog looks, so RSS
read after the step misses the step's high point: the reader takes the OS peak RSS, reset at each
sample (Linux), or elsewhere the non-MLX part of RSS plus MLX's own peak. On CUDA it is MLX's peak.

Units: GB = 1e9 bytes throughout. A "64 GB" Mac has 64 GiB (68.7 GB), so the defaults keep extra
headroom for the OS and other processes.

The package, one concern per module: `estimate` (StepShape, estimate_peak, MemoryEstimate, the model's
parameter counts), `budget` (MemoryBudget, the budget's errors and suggestions), `watchdog` (readings,
StepMemoryReader, MemoryWatchdog).
"""

from __future__ import annotations

from lfm_mlx.memory.estimate import (
    BACKWARD, BLOCK_PADDING, GB, PERSISTENT, UPDATE, MemoryEstimate, StepShape, estimate_peak, model_shapes,
    parameter_counts, weights_bytes,
)
from lfm_mlx.memory.budget import (
    MemoryBudget, MemoryBudgetExceeded, MemoryHardStop, MemorySoftLimitWarning,
)
from lfm_mlx.memory.watchdog import (
    MemoryReading, MemorySample, MemoryWatchdog, StepMemoryReader, peak_rss, read_memory, reset_peak_rss,
    runtime_baseline, unified_memory,
)

__all__ = [
    "BACKWARD", "BLOCK_PADDING", "GB", "PERSISTENT", "UPDATE", "MemoryEstimate", "StepShape", "estimate_peak",
    "model_shapes", "parameter_counts", "weights_bytes", "MemoryBudget", "MemoryBudgetExceeded", "MemoryHardStop",
    "MemorySoftLimitWarning", "MemoryReading", "MemorySample", "MemoryWatchdog", "StepMemoryReader", "peak_rss",
    "read_memory", "reset_peak_rss", "runtime_baseline", "unified_memory",
]

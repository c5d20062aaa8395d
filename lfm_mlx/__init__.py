"""lfm_mlx: fine-tune LiquidAI LFM2 / LFM2.5 models (above all LFM2.5-8B-A1B) for tool calling with MLX."""

from __future__ import annotations

import importlib

from lfm_mlx import cpu_blas

# Before anything imports mlx.core: the Linux CPU wheel's reference BLAS is ~13x slower (cpu_blas.py).
cpu_blas.preload()

__version__ = "0.1.0"

# Public name -> module. Imported on first use, so `import lfm_mlx` stays fast and light.
_EXPORTS = {
    "load": "lfm_mlx.model.io",
    "write_synthetic_model": "lfm_mlx.model.synthetic",
    "mix": "lfm_mlx.mixed",
    "GroupSchedule": "lfm_mlx.train.schedules",
    "MemoryBudget": "lfm_mlx.memory",
    "MemoryWatchdog": "lfm_mlx.memory",
    "MemoryBudgetExceeded": "lfm_mlx.memory",
    "MemoryHardStop": "lfm_mlx.memory",
    "GroupedMoETrainer": "lfm_mlx.grouped",
    "TrainConfig": "lfm_mlx.grouped",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'lfm_mlx' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)

"""`python -m lfm_mlx.sweep`: which group size fits, measured before a long run.

For each group size, smallest first, the sweep
1. estimates the step's peak with `grouped.estimate_for_config`, with the settings the step really uses
   (frozen-expert path, gradient checkpointing, the attention kind this backend runs, compute and
   master dtypes), and adds the runtime baseline measured at start;
2. asks a `MemoryWatchdog` to admit it: an estimate over the hard stop ends the sweep unrun;
3. runs a few real grouped-training steps (lfm_mlx.grouped's `activate_group`, `make_loss_and_grad`,
   `accumulate_gradients`, `apply_update`, `end_group`) on the FIRST `size` MoE layers, the
   worst case for the backward pass, with the watchdog checking after every step: a hard stop
   ends the sweep;
and records MLX peak memory, process RSS, step time and tokens/s against the estimate.

Estimate vs measurement. `estimate_peak` counts the MLX buffers of one step; the budget is about
the memory the process really takes. On unified memory (CPU backend, Apple silicon) that is the
process's peak during the step (Linux: peak RSS, reset before each step; elsewhere: the non-MLX
part of RSS plus MLX's peak), on CUDA the device memory MLX holds. The sweep's watchdog decides on
that figure ("measured"). "Predicted" is the estimate plus the runtime's fixed cost (interpreter,
libraries, kernels), read once before any weight exists. On a tiny model that baseline is most of
the memory, so the step's own error (estimate vs MLX peak) is reported as well.

Calibration (`--calibrate fit`, the default). Three terms of the estimate are not byte counts:
how much of the activation-side components (activations, logits, attention, frozen dequant) MLX
holds at once on this backend, the optimizer update's transient (clipped gradients, new
parameters and moments: a multiple of the group's trainable bytes), and the runtime's overhead
during a step (memory outside MLX's accounting: allocator arenas, scratch). Each size's prediction
uses only the sizes measured before it (a factor and an overhead averaged, the update as a line
in trainable bytes); the first size that runs calibrates itself and is not counted as a test, so
every later size is a true test of the model. `--calibrate none` reports the raw model;
`--calibrate FACTOR` applies a given global factor (e.g. from an earlier sweep on this machine).

The package, one concern per module: `config` (SweepConfig, constants), `machine` (backend, versions,
runtime baseline), `inputs` (model and batch), `calibration` (estimate, calibration, errors),
`measure` (one size run for real and admitted), `run` (prepare, every size, the recommendation),
`report` (table and plot from the JSON), `cli` (main).
"""

from __future__ import annotations

from lfm_mlx.sweep.config import (
    DEFAULT_SIZES, EXIT_BAD_INPUT, EXIT_NOTHING_FITS, PLOT_NAME, REPORT_NAME, TOLERANCE, SweepConfig,
)
from lfm_mlx.sweep.machine import backend_name, machine_info, measure_baseline, predicted_used
from lfm_mlx.sweep.inputs import build_preset, data_batch, load_model_dir, synthetic_batch
from lfm_mlx.sweep.calibration import (
    apply_calibration, calibration_point, estimate_for, fit_calibration, given_calibration,
)
from lfm_mlx.sweep.measure import run_size
from lfm_mlx.sweep.run import prepare, recommend, run_sweep, sweep_size
from lfm_mlx.sweep.report import format_table, plot_sweep
from lfm_mlx.sweep.cli import main

__all__ = [
    "DEFAULT_SIZES", "EXIT_BAD_INPUT", "EXIT_NOTHING_FITS", "PLOT_NAME", "REPORT_NAME", "TOLERANCE", "SweepConfig",
    "backend_name", "machine_info", "measure_baseline", "predicted_used", "build_preset", "data_batch",
    "load_model_dir", "synthetic_batch", "apply_calibration", "calibration_point", "estimate_for", "fit_calibration",
    "given_calibration", "run_size", "prepare", "recommend", "run_sweep", "sweep_size", "format_table", "plot_sweep",
    "main",
]

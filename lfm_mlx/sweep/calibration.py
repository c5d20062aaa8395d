"""The estimate of one size, its calibration from the sizes measured before it, and its errors."""

from __future__ import annotations

from dataclasses import replace

from lfm_mlx.grouped import TrainConfig, estimate_for_config
from lfm_mlx.memory import BACKWARD, PERSISTENT, UPDATE, MemoryEstimate
from lfm_mlx.sweep.config import TOLERANCE
from lfm_mlx.sweep.machine import predicted_used


def estimate_for(config: dict, size: int, seq_len: int, train: TrainConfig, frozen: str,
                 attention: str) -> MemoryEstimate:
    """`estimate_peak` with the settings the grouped step runs (as `GroupedMoETrainer` admits it)."""
    return estimate_for_config(config, train, frozen, seq_len, group_size=size, attention=attention)


def calibration_point(raw: MemoryEstimate, measured: dict, baseline: dict, size: int) -> dict:
    """What one measured size says about the three terms that are not byte counts (each of them
    independent of the group size, or linear in its trainable bytes):
    - `activation_factor`: the backward phase's MLX peak above the persistent components, over the
      estimate's activation-side components (how much of them MLX holds at once on this backend);
    - `update`: the update phase's MLX peak above the persistent components (clipped gradients, new
      parameters and moments), against the group's `trainable` bytes;
    - `runtime_overhead`: what the measured figure holds beyond the baseline and MLX's peak
      (allocator arenas and scratch outside MLX's accounting; on CPU it grows with the tokens)."""
    parts = raw.components()
    persistent = sum(parts[n] for n in PERSISTENT)
    return {"size": size, "trainable": parts["optimizer_update"],
            "activation_factor": max(measured["backward_peak"] - persistent, 0) / sum(parts[n] for n in BACKWARD),
            "update": max(measured["update_peak"] - persistent, 0),
            "runtime_overhead": measured["used"] - predicted_used(measured["mlx_peak"], baseline)}


def fit_calibration(points: list[dict]) -> dict:
    """Calibration from the sizes measured so far: mean activation factor and runtime overhead; the
    update transient as a line in trainable bytes (least squares; through the origin from one size)."""
    n = len(points)
    xs, ys = [p["trainable"] for p in points], [p["update"] for p in points]
    mean_x, mean_y = sum(xs) / n, sum(ys) / n
    spread = sum((x - mean_x) ** 2 for x in xs)
    if spread > 0:
        slope = sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys)) / spread
        intercept = mean_y - slope * mean_x
    else:
        slope, intercept = mean_y / mean_x, 0.0
    return {"mode": "fitted", "from_sizes": [p["size"] for p in points],
            "activation_factor": sum(p["activation_factor"] for p in points) / n,
            "update_per_trainable_byte": slope, "update_intercept": intercept,
            "runtime_overhead": int(round(sum(p["runtime_overhead"] for p in points) / n))}


def given_calibration(factor: float) -> dict:
    return {"mode": "given", "factor": factor, "runtime_overhead": 0}


def apply_calibration(raw: MemoryEstimate, fit: dict | None) -> MemoryEstimate:
    """The raw estimate with a calibration applied: a fitted one scales the activation-side
    components and replaces the update transient by its fitted line; a given one is a global factor."""
    if fit is None:
        return raw
    if fit["mode"] == "given":
        return replace(raw, calibration=fit["factor"])
    scales = dict(raw.scales)
    for name in BACKWARD:
        scales[name] = scales.get(name, 1.0) * fit["activation_factor"]
    trainable = raw.components()["optimizer_update"]
    update = max(fit["update_intercept"] + fit["update_per_trainable_byte"] * trainable, 0.0)
    scales["optimizer_update"] = 1.0
    return replace(raw, scales=scales, optimizer_update=int(round(update)))


def _errors(predicted: MemoryEstimate, raw: MemoryEstimate, measured: dict, baseline: dict,
            predicted_used_bytes: int) -> dict:
    """Relative errors (estimate - measured) / measured: `error` on the watchdog's figure (runtime
    included), `step_error` on MLX's peak alone, `raw_*` before calibration, and per phase (MLX
    peak of the backward pass and of the optimizer update against persistent + that phase)."""
    def rel(a: float, b: float) -> float:
        return (a - b) / b

    parts = predicted.components()
    persistent = sum(parts[n] for n in PERSISTENT)
    error = rel(predicted_used_bytes, measured["used"])
    return {
        "error": error, "within_tolerance": abs(error) <= TOLERANCE,
        "raw_error": rel(predicted_used(raw.total, baseline), measured["used"]),
        "step_error": rel(predicted.total, measured["mlx_peak"]),
        "raw_step_error": rel(raw.total, measured["mlx_peak"]),
        "phase_errors": {
            "backward": rel(persistent + sum(parts[n] for n in BACKWARD), measured["backward_peak"]),
            "update": rel(persistent + sum(parts[n] for n in UPDATE), measured["update_peak"]),
        },
    }

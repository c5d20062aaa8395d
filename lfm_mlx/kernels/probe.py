"""What the start-up probes of the custom CUDA kernels share: timing both ways, and the choice,
which takes a kernel only when its outputs matched MLX's bit for bit and it was faster."""

from __future__ import annotations

import time

import mlx.core as mx


def best_seconds(fn, repeats: int = 5) -> float:
    """The fastest of `repeats` timed evaluations of `fn()`, after one untimed (kernel builds)."""
    mx.eval(fn())
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        mx.eval(fn())
        best = min(best, time.perf_counter() - start)
    return best


def begin(record: dict | None) -> tuple[dict, bool]:
    """A probe's record reset to MLX's path (the caller's dict, so the run's record fills in place),
    and whether there is a CUDA backend to probe at all."""
    record = {} if record is None else record
    record.clear()
    record["choice"] = "mlx"
    on_cuda = mx.default_device() == mx.gpu and mx.cuda.is_available()
    if not on_cuda:
        record["reason"] = "not the CUDA backend"
    return record, on_cuda


def choose(record: dict, differing: int, what: str) -> dict:
    """Complete a probe's `record`, which holds `kernel_s` and `mlx_s`: choice "kernel" when no
    element differed and the kernel was faster, else "mlx", with the reason."""
    if differing:
        record.update(choice="mlx", reason=f"{differing} {what} differ from MLX's")
    elif record["kernel_s"] < record["mlx_s"]:
        record.update(choice="kernel", reason="bit-identical, faster")
    else:
        record.update(choice="mlx", reason="bit-identical, not faster")
    return record

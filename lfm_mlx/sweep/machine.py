"""The machine and the runtime: backend, CPU, versions, and the runtime's memory before any weight."""

from __future__ import annotations

import gc
import importlib.metadata
import os
import platform
import sys
from pathlib import Path

import mlx.core as mx
import psutil

import lfm_mlx
from lfm_mlx.memory import read_memory


def backend_name() -> str:
    """'cuda', 'metal' or 'cpu': where MLX runs by default here."""
    if mx.default_device() == mx.cpu:
        return "cpu"
    if mx.metal.is_available():
        return "metal"
    return "cuda" if mx.cuda.is_available() else "gpu"


def _cpu_name() -> str:
    if Path("/proc/cpuinfo").exists():
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    if sys.platform == "darwin":
        import subprocess

        try:
            return subprocess.run(["sysctl", "-n", "machdep.cpu.brand_string"], capture_output=True,
                                  text=True, timeout=5).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            pass
    return platform.processor() or platform.machine()


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def machine_info() -> dict:
    """Platform, CPU, RAM, MLX backend and device (GPU name when there is one), and versions."""
    backend = backend_name()
    try:
        info = mx.device_info()
    except (AttributeError, RuntimeError):  # older MLX, or a backend that cannot describe its device
        info = {}
    return {
        "platform": platform.platform(), "machine": platform.machine(), "cpu": _cpu_name(),
        "cpu_count": os.cpu_count(), "ram_bytes": psutil.virtual_memory().total,
        "backend": backend, "device": str(mx.default_device()),
        "gpu": info.get("device_name") if backend != "cpu" else None,
        "device_info": {k: v for k, v in info.items() if isinstance(v, (int, float, str))},
        "versions": {"mlx": mx.__version__, "mlx-lm": _version("mlx-lm") or _version("mlx_lm"),
                     "lfm_mlx": _version("lfm_mlx") or lfm_mlx.__version__,
                     "python": platform.python_version()},
    }


def measure_baseline() -> dict:
    """The runtime's fixed memory before any weight exists: process RSS and MLX active + cache.

    On the CPU backend and Apple's unified memory MLX buffers are process memory, so a step's
    buffers add to the RSS baseline; on CUDA they live on the device, apart from the host RSS."""
    gc.collect()
    mx.clear_cache()
    reading = read_memory(reset_peak=False)
    return {"rss": reading.rss, "mlx": reading.active + reading.cache, "unified": backend_name() != "cuda"}


def predicted_used(step_bytes: int, baseline: dict, overhead: int = 0) -> int:
    """The watchdog's decision figure a step of `step_bytes` MLX memory should produce, given the
    runtime baseline and the runtime's `overhead` during a step (memory outside MLX's accounting)."""
    if baseline["unified"]:
        return baseline["rss"] + overhead + step_bytes
    return max(baseline["rss"], baseline["mlx"] + overhead + step_bytes)

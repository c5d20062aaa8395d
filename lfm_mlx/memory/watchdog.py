"""Memory while training: readings from MLX and the process, the step reader, and the watchdog that
admits an estimate before loading and checks every step against the budget."""

from __future__ import annotations

import dataclasses
import gc
import warnings
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import mlx.core as mx
import psutil

from lfm_mlx.memory.budget import (
    MemoryBudget, MemoryBudgetExceeded, MemoryHardStop, MemorySoftLimitWarning, _suggest,
)
from lfm_mlx.memory.estimate import GB, MemoryEstimate


@dataclass
class MemoryReading:
    """One raw reading in bytes: MLX active / peak (since the last reading) / cache, process RSS."""

    active: int
    peak: int
    cache: int
    rss: int


def read_memory(reset_peak: bool = True) -> MemoryReading:
    """Read MLX and process memory, `peak` being MLX's own peak (not the process's: see
    `StepMemoryReader`); reset MLX's peak so the next reading reports its own interval."""
    reading = MemoryReading(
        active=mx.get_active_memory(), peak=mx.get_peak_memory(), cache=mx.get_cache_memory(),
        rss=psutil.Process().memory_info().rss,
    )
    if reset_peak:
        mx.reset_peak_memory()
    return reading


def unified_memory() -> bool:
    """Whether MLX buffers are process memory here (CPU backend, Apple silicon), not CUDA device memory."""
    return mx.default_device() == mx.cpu or not mx.cuda.is_available()


def peak_rss() -> int | None:
    """The process's peak RSS in bytes since the last `reset_peak_rss` (Linux VmHWM), or None elsewhere."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def reset_peak_rss() -> bool:
    """Reset Linux's peak-RSS mark to the current RSS (clear_refs 5); False where that is impossible.
    The mark is per process: one reader per process should reset it."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def runtime_baseline() -> int:
    """The runtime's fixed memory in bytes (process RSS after freeing MLX's cache), to read before
    any weight exists and pass to `estimate_peak(baseline=...)` on unified memory."""
    gc.collect()
    mx.clear_cache()
    return read_memory(reset_peak=False).rss


class StepMemoryReader:
    """The default watchdog reader: a `MemoryReading` whose `peak` is the peak since the previous
    reading of the memory the budget is about. On unified memory that is the process's peak (the
    OS peak RSS where it can be reset per reading, i.e. Linux, else the non-MLX part of RSS plus
    MLX's peak); on CUDA MLX's peak. `reset()` starts an interval; `end_phase(name)` records MLX's
    peak of a phase (backward, update) in `last`, with the figures of the latest reading."""

    def __init__(self, unified: bool | None = None):
        self.unified = unified_memory() if unified is None else unified
        self.os_peak = self.unified and reset_peak_rss() and peak_rss() is not None
        self.phases: dict[str, int] = {}
        self.last: dict = {}
        self.reset()

    def reset(self) -> None:
        """Start an interval: MLX's peak and the OS peak RSS count from now on."""
        mx.reset_peak_memory()
        if self.os_peak:
            reset_peak_rss()
        self.phases = {"active_before": mx.get_active_memory()}

    def end_phase(self, name: str) -> None:
        """Record MLX's peak of the phase that just ended and start the next phase's."""
        self.phases[name] = mx.get_peak_memory()
        mx.reset_peak_memory()

    def __call__(self) -> MemoryReading:
        r = read_memory(reset_peak=False)
        mlx_peak = max([r.peak] + [v for k, v in self.phases.items() if k != "active_before"])
        peak, process_peak, composed = mlx_peak, None, None
        if self.unified:
            # RSS holds MLX's buffers here: swap its current MLX part for MLX's peak.
            composed = max(r.rss - r.active - r.cache, 0) + mlx_peak
            peak = process_peak = peak_rss() if self.os_peak else composed
        self.last = {"mlx_peak": mlx_peak, "process_peak": process_peak, "composed_peak": composed,
                     **{k if k == "active_before" else f"{k}_peak": v for k, v in self.phases.items()}}
        self.reset()
        return MemoryReading(active=r.active, peak=peak, cache=r.cache, rss=r.rss)


@dataclass
class MemorySample:
    """A watchdog sample: the reading, the figure decisions use, and what the watchdog did."""

    step: int
    active: int
    peak: int
    cache: int
    rss: int
    used: int
    predicted_next: int
    level: str  # "ok", "soft" or "hard"
    cleared: bool

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


class MemoryWatchdog:
    """Admission check before training and memory sampling during it.

    `reader` returns a `MemoryReading` (default: a `StepMemoryReader`, whose interval starts when
    the watchdog is made: call `start()` just before the first step so loading is not counted in
    it); `clear_cache` defaults to `mx.clear_cache`. Both are injectable so a test can simulate a leak.
    """

    def __init__(self, budget: MemoryBudget | None = None, sample_every: int = 1,
                 reader: Callable[[], MemoryReading] | None = None,
                 clear_cache: Callable[[], None] | None = None, growth_window: int = 3):
        if sample_every < 1 or growth_window < 1:
            raise ValueError(f"sample_every={sample_every} and growth_window={growth_window} must be >= 1")
        self.budget = budget or MemoryBudget()
        self.sample_every = sample_every
        self.reader = reader or StepMemoryReader()
        self.clear_cache = clear_cache or mx.clear_cache
        self.growth_window = growth_window
        self.max_used = 0
        self._resting: deque[int] = deque(maxlen=growth_window + 1)
        self._above_soft = False

    def start(self) -> None:
        """Start the first sample's interval now (resets the reader's peaks when it has `reset`)."""
        reset = getattr(self.reader, "reset", None)
        if callable(reset):
            reset()

    def admit(self, estimate: MemoryEstimate) -> None:
        """Refuse (MemoryBudgetExceeded, with settings that fit) when the estimate passes the hard
        stop; warn when it passes the soft limit."""
        if estimate.total > self.budget.hard_bytes:
            raise MemoryBudgetExceeded(estimate, self.budget, _suggest(estimate, self.budget.hard_bytes))
        if estimate.total > self.budget.soft_bytes:
            warnings.warn(
                f"estimated peak {estimate.total / GB:.2f} GB is above the soft limit "
                f"{self.budget.soft_gb:.2f} GB (hard stop {self.budget.hard_gb:.2f} GB)",
                MemorySoftLimitWarning, stacklevel=2,
            )

    def check(self, step: int) -> MemorySample | None:
        """Sample memory every `sample_every` steps (None in between); clear caches and warn at the
        soft limit; raise MemoryHardStop at the hard limit or when the next sample would pass it."""
        if step % self.sample_every:
            return None
        reading = self.reader()
        # Decision figure. On Apple unified memory and on the CPU backend MLX buffers are process
        # memory, so RSS already includes active + cache; on CUDA they live on the device and RSS
        # misses them. max() is right in both cases without double counting. The reading's peak
        # since the last one catches the high point inside the step (activations are freed by now).
        resting = max(reading.rss, reading.active + reading.cache)
        used = max(resting, reading.peak)
        self._resting.append(resting)
        history = list(self._resting)
        deltas = [b - a for a, b in zip(history, history[1:])]
        # Predict only from sustained growth (a leak), not from one long example's jump.
        growth = 0
        if len(deltas) == self.growth_window and all(d > 0 for d in deltas):
            growth = sum(deltas) // len(deltas)
        predicted = used + growth
        self.max_used = max(self.max_used, used)

        sample = MemorySample(step=step, active=reading.active, peak=reading.peak, cache=reading.cache,
                              rss=reading.rss, used=used, predicted_next=predicted, level="ok", cleared=False)
        if used >= self.budget.soft_bytes or predicted >= self.budget.hard_bytes:
            self.clear_cache()
            sample.cleared = True
            sample.level = "soft"
        if used >= self.budget.hard_bytes or predicted >= self.budget.hard_bytes:
            sample.level = "hard"
            reason = "at the hard limit" if used >= self.budget.hard_bytes else (
                f"growing {growth / GB:.3f} GB per sample, the next sample would pass the hard limit")
            raise MemoryHardStop(sample, self.budget, reason)
        if used >= self.budget.soft_bytes:
            if not self._above_soft:
                warnings.warn(
                    f"step {step}: memory {used / GB:.2f} GB crossed the soft limit "
                    f"{self.budget.soft_gb:.2f} GB; cleared the MLX cache (hard stop at "
                    f"{self.budget.hard_gb:.2f} GB)",
                    MemorySoftLimitWarning, stacklevel=2,
                )
            self._above_soft = True
        else:
            self._above_soft = False
        return sample

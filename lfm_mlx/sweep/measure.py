"""One group size run for real (`ActiveGroup`, the watchdog after every step) and admitted before it."""

from __future__ import annotations

import gc
import math
import statistics
import time
import warnings

import mlx.core as mx
import mlx.nn as nn

from lfm_mlx.data import Batch
from lfm_mlx.grouped import ActiveGroup, TrainConfig, ranks
from lfm_mlx.kernels.choices import KernelChoices
from lfm_mlx.memory import (
    GB, MemoryBudget, MemoryBudgetExceeded, MemoryEstimate, MemoryHardStop, MemorySoftLimitWarning, MemoryWatchdog,
    StepMemoryReader,
)
from lfm_mlx.sweep.machine import predicted_used
from lfm_mlx.train.distributed import World


def run_size(model: nn.Module, layers: list[int], batch: Batch, train: TrainConfig, steps: int,
             watchdog: MemoryWatchdog, reader: StepMemoryReader, frozen: str,
             kernels: KernelChoices | None = None, world: World | None = None, park_dir: str | None = None) -> dict:
    """`steps` real grouped-training steps on `layers`, the trainer's own (`ActiveGroup`), the
    watchdog checking after each step as in training. With `world` of several ranks (each on the
    same batch) the gradients are all-summed as in data-parallel training, the steps' all-reduce
    bytes and seconds recorded, and a hard stop on any rank stops all.

    Returns per-step seconds and memory samples. Raises MemoryHardStop (with the samples taken so
    far in `err.sweep_samples`). The group is requantized afterwards, so the model is as before."""
    world = world or World()
    group = ActiveGroup(model, layers, train, steps, frozen, park_dir or train.run_dir,  # parked as the trainer
                        kernels=kernels)
    samples = []

    def end_phase(name: str, grads) -> None:
        if name in ("backward", "update"):
            reader.end_phase(name)

    try:
        for step in range(steps):
            reader.reset()
            tick = time.perf_counter()
            # every update applied (even when not finite: memory is the point); mean-loss gradients
            # alone, summed-loss ones (the trainer's) when the ranks sum them
            result = group.step([batch], mean=world.size == 1, on_phase=end_phase, world=world)
            seconds = time.perf_counter() - tick
            loss, norm = result.loss, result.norm
            record = {"step": step, "seconds": seconds, "loss": loss if math.isfinite(loss) else str(loss),
                      "grad_norm": norm if math.isfinite(norm) else str(norm), **world.reduce_record()}
            stop = None
            try:
                sample = watchdog.check(step + 1)
            except MemoryHardStop as err:
                sample, stop = err.sample, err
            stop = ranks.agree_on_stop(world, stop, step + 1)  # one rank's stop stops all (alone: unchanged)
            if stop is not None:
                stop.sweep_samples = samples + [{**record, **sample.to_dict(), **reader.last}]
                raise stop
            samples.append({**record, **sample.to_dict(), **reader.last})
    finally:
        group.close()
        del group
        gc.collect()
        mx.clear_cache()
    return {"samples": samples}


def _measured(samples: list[dict], tokens: int) -> dict:
    """Memory maxima over every step (the warm-up too: it must fit as well) and the median time
    of the steps after the warm-up (all steps when there is only one)."""
    timed = [s["seconds"] for s in samples[1:]] or [s["seconds"] for s in samples]
    step_s = statistics.median(timed) if timed else None
    process = [s["process_peak"] for s in samples if s.get("process_peak") is not None]
    return {
        "mlx_peak": max(s["mlx_peak"] for s in samples), "process_peak": max(process) if process else None,
        "backward_peak": max(s.get("backward_peak", 0) for s in samples),
        "update_peak": max(s.get("update_peak", 0) for s in samples),
        "active_before": max(s.get("active_before", 0) for s in samples),
        "rss": max(s["rss"] for s in samples),
        "used": max(s["used"] for s in samples), "active_after": samples[-1]["active"],
        "step_s": step_s, "timed_steps": len(samples) - 1 if len(samples) > 1 else 0,
        "tokens_per_s": tokens / step_s if step_s else None,
    }


def rank_record(world: World, measured: dict, samples: list[dict]) -> dict:
    """Collective (several ranks): every rank's peak memory (the watchdog's figure, and MLX's peak),
    gathered on every rank, and this rank's all-reduce bytes and median seconds per step."""
    mine = mx.zeros((world.size, 2), mx.int64).at[world.rank].add(mx.array([measured["used"], measured["mlx_peak"]],
                                                                             mx.int64))
    peaks = world.sum(mine).tolist()
    timed = [s["allreduce_s"] for s in samples[1:]] or [s["allreduce_s"] for s in samples]
    return {"world_size": world.size, "rank_used": [u for u, _ in peaks], "rank_mlx_peak": [p for _, p in peaks],
            "allreduce_bytes": samples[-1]["allreduce_bytes"], "allreduce_s": statistics.median(timed)}


def _overhead(fit: dict | None) -> int:
    return fit["runtime_overhead"] if fit else 0


def _estimate_record(estimate: MemoryEstimate, baseline: dict, fit: dict | None) -> dict:
    record = estimate.to_dict()
    record["inputs"] = {k: v for k, v in record["inputs"].items() if k != "config"}
    record["runtime_overhead"] = _overhead(fit)
    record["predicted_used"] = predicted_used(estimate.total, baseline, _overhead(fit))
    return record


def _admit(estimate: MemoryEstimate, baseline: dict, budget: MemoryBudget,
           overhead: int = 0) -> tuple[str | None, list[str]]:
    """Admission of one size: (refusal text or None, warnings). The step lives in what the budget
    leaves after the runtime (baseline and overhead), so the watchdog admits against that room."""
    fixed = predicted_used(0, baseline, overhead)
    head = (f"runtime {fixed / GB:.3f} GB + estimated step {estimate.total / GB:.3f} GB = "
            f"{predicted_used(estimate.total, baseline, overhead) / GB:.3f} GB against the hard stop "
            f"{budget.hard_gb:g} GB")
    if fixed / GB >= budget.soft_gb:
        return f"{head}: the runtime alone is over the soft limit {budget.soft_gb:g} GB", []
    room = MemoryBudget(total_gb=budget.total_gb - fixed / GB, soft_gb=budget.soft_gb - fixed / GB,
                        hard_gb=budget.hard_gb - fixed / GB)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", MemorySoftLimitWarning)
        try:
            MemoryWatchdog(room).admit(estimate)
        except MemoryBudgetExceeded as err:
            return f"{head} (room for the step {room.hard_gb:.3f} GB): {err}", []
    return None, [f"{head}: {w.message}" for w in caught if issubclass(w.category, MemorySoftLimitWarning)]

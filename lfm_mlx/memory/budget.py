"""The memory budget (soft limit, hard stop) and the errors and warnings of crossing it; the refusal
names the settings that would fit."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from lfm_mlx.memory.estimate import GB, MemoryEstimate, estimate_peak

if TYPE_CHECKING:  # only an annotation: the watchdog imports this module
    from lfm_mlx.memory.watchdog import MemorySample


@dataclass(frozen=True)
class MemoryBudget:
    """Memory limits in GB (1e9 bytes): warn and clear caches at `soft_gb`, stop at `hard_gb`."""

    total_gb: float = 64.0
    soft_gb: float = 54.0
    hard_gb: float = 60.0

    def __post_init__(self) -> None:
        if not 0 < self.soft_gb < self.hard_gb <= self.total_gb:
            raise ValueError(
                f"MemoryBudget(total_gb={self.total_gb}, soft_gb={self.soft_gb}, hard_gb={self.hard_gb}) "
                "needs 0 < soft_gb < hard_gb <= total_gb"
            )

    @property
    def soft_bytes(self) -> int:
        return int(self.soft_gb * GB)

    @property
    def hard_bytes(self) -> int:
        return int(self.hard_gb * GB)


class MemoryBudgetExceeded(RuntimeError):
    """The estimated peak exceeds the hard stop: refused before training starts."""

    def __init__(self, estimate: MemoryEstimate, budget: MemoryBudget, suggestions: list[str]):
        self.estimate, self.budget, self.suggestions = estimate, budget, suggestions
        fixes = "\n".join(f"  - {line}" for line in suggestions) or "  - none of the usual fixes fits"
        super().__init__(
            f"estimated peak memory {estimate.total / GB:.2f} GB exceeds the hard stop "
            f"{budget.hard_gb:.2f} GB (budget {budget.total_gb:g} GB):\n{estimate.as_table()}\n"
            f"settings that fit (smaller group size, shorter token cap, adafactor, checkpointing):\n{fixes}"
        )


class MemoryHardStop(RuntimeError):
    """Memory reached (or is about to reach) the hard stop during training: checkpoint and exit."""

    exit_code = 75  # EX_TEMPFAIL: the run can resume from its checkpoint with a smaller setting

    def __init__(self, sample: "MemorySample", budget: MemoryBudget, reason: str):
        self.sample, self.budget, self.reason = sample, budget, reason
        super().__init__(
            f"memory hard stop at step {sample.step}: {reason} (used {sample.used / GB:.2f} GB, "
            f"predicted next {sample.predicted_next / GB:.2f} GB, hard stop {budget.hard_gb:.2f} GB; "
            f"MLX active {sample.active / GB:.2f} GB, peak {sample.peak / GB:.2f} GB, cache "
            f"{sample.cache / GB:.2f} GB, process RSS {sample.rss / GB:.2f} GB). Resume from the "
            "checkpoint with a smaller group size, a shorter token cap or adafactor."
        )


class MemorySoftLimitWarning(UserWarning):
    """Memory crossed the soft limit; MLX's cache was cleared."""


def _suggest(estimate: MemoryEstimate, hard_bytes: int) -> list[str]:
    """Settings that bring `estimate` under `hard_bytes`, re-estimated from its own inputs."""
    base = dict(estimate.inputs)
    config = base.pop("config", None)
    base.pop("baseline", None)
    if not config:
        return []

    def total(**change) -> int:
        return estimate_peak(config, **{**base, **change}, calibration=estimate.calibration,
                             scales=estimate.scales, baseline=estimate.baseline).total

    def largest(name: str, below: int, **change) -> int | None:
        """Largest value of `name` in 1..below that fits (the estimate grows with it), or None."""
        if below < 1 or total(**{name: 1}, **change) > hard_bytes:
            return None
        low, high = 1, below + 1
        while high - low > 1:
            middle = (low + high) // 2
            low, high = (middle, high) if total(**{name: middle}, **change) <= hard_bytes else (low, middle)
        return low

    def gb(**change) -> str:
        return f"(est. {total(**change) / GB:.2f} GB)"

    lines = []
    if size := largest("group_size", base["group_size"] - 1):
        lines.append(f"group size {size} {gb(group_size=size)}")
    if cap := largest("seq_len", base["seq_len"] - 1):
        lines.append(f"token cap {cap} {gb(seq_len=cap)}")
    if base["optimizer"] == "adamw" and total(optimizer="adafactor") <= hard_bytes:
        lines.append(f"optimizer adafactor {gb(optimizer='adafactor')}")
    if not base["grad_checkpoint"] and total(grad_checkpoint=True) <= hard_bytes:
        lines.append(f"gradient checkpointing on {gb(grad_checkpoint=True)}")
    if lines:
        return lines
    # No single change is enough: combine the cheap ones, then shrink the group, then the cap.
    cheap = dict(optimizer="adafactor", grad_checkpoint=True)
    if size := largest("group_size", base["group_size"], **cheap):
        return [f"adafactor + checkpointing + group size {size} {gb(group_size=size, **cheap)}"]
    if cap := largest("seq_len", base["seq_len"] - 1, group_size=1, **cheap):
        return [f"adafactor + checkpointing + group size 1 + token cap {cap} "
                f"{gb(seq_len=cap, group_size=1, **cheap)}"]
    return []

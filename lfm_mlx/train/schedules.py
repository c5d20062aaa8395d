"""A run's schedules: which MoE layers train together (`GroupSchedule`, plain data) and the learning
rate of each step (`warmup_cosine`, the one warmup + cosine of grouped training and LoRA).

Groups start at the first MoE layer and step by `stride`; each holds `size` layers, clipped at the
last MoE layer, and the last group ends exactly there. With stride < size the groups overlap (the
seed run used size 4, stride 3 over layers 2-23 of LFM2.5-8B-A1B); stride > size would leave layers
that are never trained, so it is refused.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Callable

import mlx.core as mx
import mlx.optimizers as optim


@dataclass(frozen=True)
class GroupSchedule:
    """Overlapping groups of consecutive MoE layers, `first_layer`..`last_layer` inclusive."""

    size: int
    stride: int
    first_layer: int
    last_layer: int

    def __post_init__(self) -> None:
        problems = []
        for name in ("size", "stride", "first_layer", "last_layer"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool):
                problems.append(f"{name}={value!r} must be an integer")
        if problems:
            raise ValueError("invalid GroupSchedule:\n  " + "\n  ".join(problems))
        if self.size < 1:
            problems.append(f"size={self.size} must be >= 1 (layers per group)")
        if self.stride < 1:
            problems.append(f"stride={self.stride} must be >= 1 (layers between group starts)")
        if self.first_layer < 0:
            problems.append(f"first_layer={self.first_layer} must be >= 0")
        if self.last_layer < self.first_layer:
            problems.append(
                f"layer range {self.first_layer}..{self.last_layer} is empty: last_layer must be "
                f">= first_layer"
            )
        if not problems and self.stride > self.size:
            untrained = sorted(set(range(self.first_layer, self.last_layer + 1)) - self._covered())
            problems.append(
                f"stride={self.stride} > size={self.size} leaves MoE layers {_ranges(untrained)} "
                f"never trained; use stride <= size (e.g. stride={self.size})"
            )
        if problems:
            raise ValueError("invalid GroupSchedule:\n  " + "\n  ".join(problems))

    def _starts(self) -> list[int]:
        starts = [self.first_layer]
        while starts[-1] + self.size - 1 < self.last_layer:
            starts.append(starts[-1] + self.stride)
        return starts

    def _covered(self) -> set[int]:
        return {layer for group in self.groups for layer in group}

    @property
    def groups(self) -> list[list[int]]:
        """Layer indices of each group, in training order."""
        return [
            list(range(start, min(start + self.size - 1, self.last_layer) + 1))
            for start in self._starts()
        ]

    @property
    def layers(self) -> list[int]:
        """Every MoE layer the schedule covers."""
        return list(range(self.first_layer, self.last_layer + 1))

    def __len__(self) -> int:
        return len(self._starts())

    def __str__(self) -> str:
        groups = self.groups
        lines = [
            f"GroupSchedule: size {self.size}, stride {self.stride}, MoE layers "
            f"{self.first_layer}-{self.last_layer} ({len(self.layers)} layers), {len(groups)} groups",
            f"{'group':>5}  {'layers':<9} {'n':>2}  shared with previous",
        ]
        previous: list[int] = []
        for i, group in enumerate(groups):
            shared = sorted(set(group) & set(previous))
            span = f"{group[0]}-{group[-1]}" if len(group) > 1 else str(group[0])
            lines.append(f"{i:>5}  {span:<9} {len(group):>2}  {_ranges(shared) or '-'}")
            previous = group
        return "\n".join(lines)

    def to_dict(self) -> dict:
        """The four fields, for a run config."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "GroupSchedule":
        """Build from `to_dict` output; unknown or missing keys are errors."""
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - names)
        missing = sorted(names - set(data))
        if unknown or missing:
            raise ValueError(
                f"GroupSchedule keys: unknown {unknown}, missing {missing}; expected exactly {sorted(names)}"
            )
        return cls(**{name: data[name] for name in names})

    @classmethod
    def for_model(cls, config: dict | str | Path, size: int, stride: int) -> "GroupSchedule":
        """Schedule over a model's MoE layers: num_dense_layers .. num_hidden_layers - 1.

        `config` is a config dict, a config.json path or a model directory.
        """
        source = "config"
        if isinstance(config, (str, Path)):
            path = Path(config)
            path = path / "config.json" if path.is_dir() else path
            source = str(path)
            config = json.loads(path.read_text())
        missing = [k for k in ("num_experts", "num_hidden_layers") if k not in config]
        if missing:
            raise ValueError(
                f"{source}: missing {missing}; GroupSchedule needs an LFM2-MoE config "
                f"(model_type lfm2_moe), got model_type={config.get('model_type')!r}"
            )
        first = int(config.get("num_dense_layers", 0))
        return cls(size=size, stride=stride, first_layer=first, last_layer=int(config["num_hidden_layers"]) - 1)


def _ranges(layers: list[int]) -> str:
    """[2, 3, 4, 7] -> '2-4, 7'."""
    spans: list[list[int]] = []
    for layer in layers:
        if spans and layer == spans[-1][1] + 1:
            spans[-1][1] = layer
        else:
            spans.append([layer, layer])
    return ", ".join(f"{a}-{b}" if a != b else str(a) for a, b in spans)


def warmup_cosine(peak: float, steps: int, warmup: int, end_ratio: float, warmup_start: float | None = None,
                  cosine: bool = True) -> Callable:
    """Linear warmup from `warmup_start` (default peak / (warmup + 1)) to `peak` over `warmup` steps, then
    cosine decay to end_ratio x peak over the remaining `steps - warmup` (or `peak` held: not `cosine`)."""
    if cosine:
        main = optim.cosine_decay(peak, max(steps - warmup, 1), end=peak * end_ratio)
    else:
        main = lambda step: mx.array(peak, dtype=mx.float32)  # noqa: E731
    if warmup == 0:
        return main
    start = peak / (warmup + 1) if warmup_start is None else warmup_start
    return optim.join_schedules([optim.linear_schedule(start, peak, warmup), main], [warmup])

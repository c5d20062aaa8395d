"""What a sweep runs: its settings (`SweepConfig`, checked into one error) and constants."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from lfm_mlx import console
from lfm_mlx.memory import MemoryBudget
from lfm_mlx.model.moe import EXPERT_KERNEL_DEPRECATION, EXPERT_KERNELS, expert_kernel
from lfm_mlx.model.synthetic import PRESETS


DEFAULT_SIZES = (1, 2, 4, 6, 8, 11)
TOLERANCE = 0.15  # |predicted - measured| / measured allowed for every size that ran
EXIT_BAD_INPUT, EXIT_NOTHING_FITS = 2, 3
REPORT_NAME, PLOT_NAME = "sweep.json", "sweep.png"
_SELF = "itself (the calibration point, not a test)"


@dataclass
class SweepConfig:
    """What to sweep: a model (`model` dir or synthetic `preset`), the batch (`data` rows, or random
    tokens of `seq_len`; with data, `seq_len` is the token cap), sizes, steps and training settings."""

    model: str | None = None
    preset: str | None = None
    data: str | None = None
    seq_len: int = 10240
    group_sizes: list[int] = field(default_factory=lambda: list(DEFAULT_SIZES))
    steps: int = 3
    optimizer: str = "adamw"
    master_dtype: str = "split"
    expert_kernel: str = "auto"
    calibrate: str = "fit"  # "fit", "none" or a factor such as "0.9"
    budget: MemoryBudget = field(default_factory=MemoryBudget)
    out: str = "runs/sweep"
    seed: int = 0
    frozen_path: str | None = None  # expert_kernel's name before issue 28 (moved there, with one warning)

    def __post_init__(self):
        if self.frozen_path is not None:
            console.deprecated("expert_kernel", EXPERT_KERNEL_DEPRECATION)
            self.expert_kernel, self.frozen_path = self.frozen_path, None
        self.expert_kernel = expert_kernel(self.expert_kernel)

    def check(self) -> None:
        """Raise one ValueError listing every bad setting (name, value, fix)."""
        problems = []
        if (self.model is None) == (self.preset is None):
            problems.append(f"give exactly one of --model DIR or --preset NAME (got model={self.model!r}, "
                            f"preset={self.preset!r})")
        if self.preset is not None and PRESETS.get(self.preset, {}).get("model_type") != "lfm2_moe":
            moe = sorted(name for name, spec in PRESETS.items() if spec.get("model_type") == "lfm2_moe")
            problems.append(f"--preset {self.preset!r} is not an MoE preset; use one of {moe}")
        if self.data is not None and not Path(self.data).is_file():
            problems.append(f"--data {self.data}: no such file (a JSONL file of chat rows)")
        if self.seq_len < 2:
            problems.append(f"--seq-len {self.seq_len} must be >= 2")
        if not self.group_sizes or any(s < 1 for s in self.group_sizes):
            problems.append(f"--group-sizes {self.group_sizes}: give positive sizes, e.g. 1,2,4")
        if self.steps < 1:
            problems.append(f"--steps {self.steps} must be >= 1 (the first is a warm-up when there are more)")
        if self.optimizer not in ("adamw", "adafactor"):
            problems.append(f"--optimizer {self.optimizer!r}: use adamw or adafactor")
        if self.master_dtype not in ("split", "float32", "compute", "compute-stochastic"):
            problems.append(f"--master-dtype {self.master_dtype!r}: use split, float32, compute or "
                            "compute-stochastic")
        if self.expert_kernel not in ("auto", *EXPERT_KERNELS):
            problems.append(f"--expert-kernel {self.expert_kernel!r}: use auto, qmm, dequant or blocks")
        if self.calibrate not in ("fit", "none"):
            try:
                if float(self.calibrate) <= 0:
                    raise ValueError
            except ValueError:
                problems.append(f"--calibrate {self.calibrate!r}: use fit, none or a factor > 0 such as 0.9")
        if problems:
            raise ValueError("lfm-mlx sweep: " + "; ".join(problems))

"""TrainConfig and MemorySettings (YAML, --set overrides, validation that lists every problem), and the
settings derived from a config that the trainer, the sweep and the memory estimate share."""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Literal

import mlx.core as mx
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from lfm_mlx.errors import UserError
from lfm_mlx.memory import MemoryBudget, MemoryEstimate, StepShape, estimate_peak
from lfm_mlx import console
from lfm_mlx.model.io import compute_dtype
from lfm_mlx.model.moe import EXPERT_KERNEL_DEPRECATION, expert_kernel
from lfm_mlx.train.yamlfile import read_yaml


# Keys a resume may change with --allow-config-change (the optimizer's step size, not what is trained).
CHANGEABLE_ON_RESUME = ("learning_rate", "min_lr_ratio", "warmup_steps", "weight_decay", "grad_clip", "eps", "betas")
GROUP_START = "group_start.safetensors"  # in the run dir: the training group's int8 start copy (offload_group_start)
# Renamed keys (issue 28): old key -> new key; the old one is still read, with one warning a process.
RENAMED_KEYS = {"frozen_path": "expert_kernel"}
# How training_hash_dict spells a renamed key and its values: as before the rename, so a run dir
# started before it has the same hash and still resumes.
HASHED_AS = {"expert_kernel": ("frozen_path", {"blocks": "batched"})}


class ConfigError(UserError, ValueError):
    """A training config with problems; the message lists every one of them."""


class MemorySettings(BaseModel):
    """Memory budget in GB (1e9 bytes): warn and clear caches at soft_gb, checkpoint and stop at hard_gb."""

    model_config = ConfigDict(extra="forbid")
    total_gb: float = 64.0
    soft_gb: float = 54.0
    hard_gb: float = 60.0
    sample_every: int = Field(1, ge=1)
    above_physical: bool = Field(False, description="allow total_gb above this machine's physical memory (the "
                                                    "hard stop could then never fire before the OS kills the run)")

    @model_validator(mode="after")
    def _ordered(self) -> "MemorySettings":
        if not 0 < self.soft_gb < self.hard_gb <= self.total_gb:
            raise ValueError(f"needs 0 < soft_gb ({self.soft_gb}) < hard_gb ({self.hard_gb}) "
                             f"<= total_gb ({self.total_gb})")
        return self

    def budget(self) -> MemoryBudget:
        return MemoryBudget(total_gb=self.total_gb, soft_gb=self.soft_gb, hard_gb=self.hard_gb)


# memory_preset -> the settings it stands for; a key the user sets explicitly wins over the preset.
MEMORY_PRESETS: dict[str, dict] = {
    # LFM2.5-8B-A1B grouped training at 4,096 tokens inside a 32 GB Mac (estimate_peak, bf16, fused
    # attention: 21.6 GB with the dequant expert kernel, 24.1 GB with blocks; the exact default 34.6 / 37.0):
    # an int8 first moment with a float32 second one, the float32 master kept exact (split), groups
    # of two MoE layers (no overlap), cross-entropy 512 tokens at a time, and every saving already on
    # by default kept on (checkpointing, lean gradients, the group's start copy parked on disk).
    "frugal": dict(optimizer_state="int8-first", master_dtype="split", group_size=2, group_stride=2,
                   loss_chunk=512, grad_checkpoint=True, offload_group_start=True, keep_expert_activations=False,
                   fused_update=True, optimizer="adamw"),
}


def apply_memory_preset(data: dict) -> dict:
    """`data` (a raw config mapping) with its memory_preset's settings filled in where the user set
    none; a preset group_stride is capped at the group size (a user's smaller group stays valid)."""
    preset = data.get("memory_preset")
    if preset not in MEMORY_PRESETS:
        return data  # None, or an unknown name the field's validation reports
    filled = dict(data)
    for key, value in MEMORY_PRESETS[preset].items():
        if key not in data:
            filled[key] = value
    if "group_stride" not in data and isinstance(filled.get("group_size"), int):
        filled["group_stride"] = min(filled["group_stride"], filled["group_size"])
    return filled


class TrainConfig(BaseModel):
    """Everything a grouped training run needs; `lfm-mlx train CONFIG.yaml` reads the same type."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(description="mixed (int8-expert) or bf16/HF model directory, or hub id")
    data: list[str] = Field(min_length=1, description="JSONL files of chat rows")
    run_dir: str = Field(description="checkpoints, metrics.jsonl, resolved config, final model")
    # data
    max_tokens: int = Field(10240, ge=2, description="per-example token cap")
    splits: tuple[float, float, float] = (0.9, 0.05, 0.05)
    skip_invalid: bool = False
    sort_by_length: bool = False
    # schedule
    group_size: int = Field(4, ge=1)
    group_stride: int = Field(3, ge=1)
    epochs: int = Field(3, ge=1)
    steps_per_group: int | Literal["split", "epoch"] = "split"
    batch_size: int = Field(1, ge=1)
    grad_accumulation: int = Field(1, ge=1)
    # optimizer
    optimizer: Literal["adamw", "adafactor"] = "adamw"
    # finite and below 1: `.inf` or 1e38 once passed and wrote non-finite or huge weights
    learning_rate: float = Field(1e-5, gt=0, lt=1, allow_inf_nan=False)
    min_lr_ratio: float = Field(0.1, ge=0, le=1)
    warmup_steps: int = Field(10, ge=0, description="per phase; capped at half the phase's steps")
    weight_decay: float = Field(0.0, ge=0, allow_inf_nan=False)
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = Field(1e-8, gt=0, allow_inf_nan=False)
    grad_clip: float | None = Field(1.0, gt=0, allow_inf_nan=False)
    memory_preset: Literal["frugal"] | None = Field(
        None, description="a set of memory-saving settings in one key (MEMORY_PRESETS); frugal: 8B-A1B at 4,096 "
                          "tokens inside a 32 GB Mac; keys set explicitly win over the preset")
    # numerics
    train_routers: bool = True
    master_dtype: Literal["split", "float32", "compute", "compute-stochastic"] = Field(
        "split", description="the trained experts' and routers' copies; split: a float32 master held as the "
                             "bfloat16 weights the model computes with plus their 16 low bits in the optimizer "
                             "(float32's math and memory, no casts; with the fused AdamW and bf16 compute, else "
                             "float32); compute: in the compute dtype; compute-stochastic: there too, each update "
                             "rounded stochastically to bfloat16 (unbiased, half a float32 master's memory; other "
                             "math, fused AdamW only)")
    optimizer_state: Literal["float32", "int8", "int8-first"] = Field(
        "float32", description="AdamW moments of the fused update; int8: both as int8 codes, 1.125 bytes an "
                               "element instead of 4 (other math); int8-first: the first moment int8, the second "
                               "float32 (Unsloth's choice: an int8 second moment diverged there)")
    fused_update: bool = Field(True, description="AdamW as one compiled kernel per tensor, float32 moments "
                                                 "(mlx.optimizers.AdamW's math); false: mlx.optimizers.AdamW itself")
    loss_chunk: int = Field(1024, ge=0, description="tokens per cross-entropy chunk (logits recomputed in the "
                                                    "backward pass); 0: the whole batch's logits at once")
    grad_checkpoint: bool = True
    offload_group_start: bool = Field(True, description=f"keep the group's int8 start copy (requantization's "
                                      f"and retention's reference) in run_dir/{GROUP_START} while the group trains, "
                                      "not in memory (1.5 GB at group 4 of the 8B)")
    keep_expert_activations: bool = Field(False, description="frozen expert blocks above the group keep their "
                                          "gate and up projections from the forward pass, so the backward pass "
                                          "skips their recomputation (padded-block path, layer walk; more memory)")
    expert_kernel: Literal["auto", "qmm", "dequant", "blocks"] = Field(
        "auto", description="how the frozen int8 experts run: qmm (int8 gather_qmm), dequant (dequantized just in "
                            "time, gather_mm), blocks (every MoE block as padded expert blocks through batched "
                            "matmuls), auto (measured at start-up); was frozen_path, with 'batched' for blocks")
    stop_gradient: bool = True
    stochastic_rounding: bool = False
    # control
    seed: int = 0
    checkpoint_every: int = Field(50, ge=0, description="steps; 0: only at group boundaries")
    keep_checkpoints: int = Field(2, ge=0)
    max_consecutive_skips: int = Field(5, ge=1, description="steps in a row skipped before the run stops (exit 65): "
                                       "not applied for a non-finite loss or gradient or a learning rate outside "
                                       "(0, 1), or undone when the update made the trained weights non-finite")
    eval_each_group: bool = True
    progress: bool = True
    memory: MemorySettings = Field(default_factory=MemorySettings)

    @field_validator("model", "run_dir", mode="before")
    @classmethod
    def _path_to_str(cls, value):
        return str(value) if isinstance(value, Path) else value

    @field_validator("data", mode="before")
    @classmethod
    def _paths_to_list(cls, value):
        if isinstance(value, (str, Path)):
            value = [value]
        return [str(v) if isinstance(v, Path) else v for v in value] if isinstance(value, (list, tuple)) else value

    @model_validator(mode="before")
    @classmethod
    def _preset(cls, data):
        return apply_memory_preset(_renamed(data)) if isinstance(data, dict) else data

    @model_validator(mode="after")
    def _cross_checks(self) -> "TrainConfig":
        problems = []
        if isinstance(self.steps_per_group, int) and self.steps_per_group < 1:
            problems.append(f"steps_per_group={self.steps_per_group} must be >= 1, 'split' or 'epoch'")
        if self.group_stride > self.group_size:
            problems.append(f"group_stride={self.group_stride} > group_size={self.group_size} leaves layers untrained")
        if any(f < 0 for f in self.splits) or abs(sum(self.splits) - 1) > 1e-6:
            problems.append(f"splits={list(self.splits)} must be three fractions >= 0 summing to 1")
        if self.optimizer_state != "float32" and not (self.optimizer == "adamw" and self.fused_update):
            problems.append(f"optimizer_state={self.optimizer_state!r} needs the fused AdamW (optimizer=adamw, fused_update=true), "
                            f"not optimizer={self.optimizer}, fused_update={str(self.fused_update).lower()}")
        if self.master_dtype == "compute-stochastic" and not (self.optimizer == "adamw" and self.fused_update):
            problems.append(f"master_dtype='compute-stochastic' needs the fused AdamW (optimizer=adamw, "
                            f"fused_update=true), not optimizer={self.optimizer}, "
                            f"fused_update={str(self.fused_update).lower()}")
        if not all(0 <= b < 1 for b in self.betas):
            problems.append(f"betas={list(self.betas)} must lie in [0, 1)")
        if problems:
            raise ValueError("; ".join(problems))
        return self

    @classmethod
    def from_dict(cls, data: dict, source: str = "config") -> "TrainConfig":
        """Validate a dict; every problem is reported in one ConfigError naming `source` and the key."""
        try:
            return cls.model_validate(data)
        except ValidationError as err:
            lines = []
            for problem in err.errors():
                key = ".".join(str(part) for part in problem["loc"]) or "(top level)"
                given = f" (got {problem['input']!r})" if problem["type"] != "missing" else ""
                if problem["type"] == "extra_forbidden":
                    fields = list(_settings_at(cls, problem["loc"][:-1]).model_fields)
                    near = difflib.get_close_matches(str(problem["loc"][-1]), fields + list(RENAMED_KEYS), n=1)
                    near = [RENAMED_KEYS.get(name, name) for name in near]  # an old name's new one
                    given = (f" (did you mean {'.'.join([*map(str, problem['loc'][:-1]), near[0]])!r}?)" if near
                             else f" (not a key here; keys: {', '.join(fields)})")
                lines.append(f"  {key}: {problem['msg']}{given}")
            raise ConfigError(f"{source}: {len(lines)} problem(s) in the training config:\n" + "\n".join(lines)
                              + f"\nfix these keys (fields: {', '.join(cls.model_fields)})") from None

    @classmethod
    def from_yaml(cls, path: str | Path, overrides: dict | None = None) -> "TrainConfig":
        """Read a YAML file (relative paths are relative to the file), apply `overrides` (CLI > YAML)."""
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"training config {path} does not exist")
        data = read_yaml(path, "training config") or {}
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of keys, got {type(data).__name__}")
        base = path.parent
        if isinstance(data.get("data"), (str, Path)):
            data["data"] = [data["data"]]
        if isinstance(data.get("data"), list):
            data["data"] = [str(base / p) if isinstance(p, str) and not Path(p).is_absolute() else p
                            for p in data["data"]]
        if isinstance(data.get("run_dir"), str) and not Path(data["run_dir"]).is_absolute():
            data["run_dir"] = str(base / data["run_dir"])
        model = data.get("model")
        if isinstance(model, str) and not Path(model).is_absolute() and (base / model).exists():
            data["model"] = str(base / model)  # else a hub id or a path relative to the working directory
        for key, value in (overrides or {}).items():  # command-line values: relative to the working directory
            _set_dotted(data, key, value)
        return cls.from_dict(data, source=str(path))

    def check_paths(self) -> None:
        """Raise one ConfigError naming every data file that is missing (and a missing local model)."""
        problems = [f"  data: {path} is a directory; list its JSONL files" if Path(path).is_dir() else
                    f"  data: {path} does not exist" for path in self.data if not Path(path).is_file()]
        model = Path(self.model).expanduser()
        if not model.exists() and (self.model.startswith((".", "/", "~")) or self.model.count("/") != 1):
            problems.append(f"  model: {self.model} does not exist (a local directory or an owner/name hub id)")
        if problems:
            raise ConfigError("training config paths:\n" + "\n".join(problems))

    def settings(self, compute: mx.Dtype) -> "StepSettings":
        """The settings this config implies on `compute` (master dtypes, lean gradients, the step's shape)."""
        return StepSettings(self, compute)

    def training_hash_dict(self) -> dict:
        """The fields that change what training computes (a resumed run must match them)."""
        ignore = {"run_dir", "progress", "checkpoint_every", "keep_checkpoints", "max_consecutive_skips",
                  "eval_each_group", "memory"}
        hashed = {}
        for key, value in self.model_dump(mode="json").items():
            if key not in ignore:
                name, values = HASHED_AS.get(key, (key, {}))
                hashed[name] = values.get(value, value) if isinstance(value, str) else value
        return hashed


def describe_change(name: str, before, after) -> str:
    """`key: before -> after` for a key of training_hash_dict, in the config's own spelling (HASHED_AS
    reversed), for messages."""
    for key, (hashed, spellings) in HASHED_AS.items():
        if hashed == name:
            current = {spelled: value for value, spelled in spellings.items()}
            name, before, after = key, current.get(before, before), current.get(after, after)
    return f"{name}: {before!r} -> {after!r}"


def _renamed(data: dict) -> dict:
    """`data` with renamed keys (RENAMED_KEYS) and the expert kernel's old value "batched" in today's
    spelling, saying so once per process; both spellings of one key at once is an error."""
    data = dict(data)
    for old, new in RENAMED_KEYS.items():
        if old in data:
            if new in data:
                raise ValueError(f"{old} and {new} are both set: {old} is the old name of {new}; keep only {new}")
            console.deprecated("expert_kernel", EXPERT_KERNEL_DEPRECATION)
            data[new] = data.pop(old)
    if isinstance(data.get("expert_kernel"), str):
        data["expert_kernel"] = expert_kernel(data["expert_kernel"])
    return data


def _settings_at(model: type[BaseModel], loc: tuple) -> type[BaseModel]:
    """The settings class at a nested key path (("memory",) -> MemorySettings), for did-you-mean."""
    for part in loc:
        annotation = model.model_fields[part].annotation if part in model.model_fields else None
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return model
        model = annotation
    return model


def _set_dotted(data: dict, key: str, value) -> None:
    parts = key.split(".")
    node = data
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {key}: {part} is not a mapping")
    node[parts[-1]] = value


class StepSettings:
    """What a TrainConfig's step does on a compute dtype, derived in one place for the trainer, the
    sweep, the benchmark and the memory estimate (`TrainConfig.settings(compute)`)."""

    def __init__(self, config: TrainConfig, compute: mx.Dtype):
        self.config, self.compute = config, compute

    @property
    def fused_adamw(self) -> bool:
        """The grouped trainer's FusedAdamW (one compiled kernel per tensor) runs the update."""
        return self.config.optimizer == "adamw" and self.config.fused_update

    @property
    def lean_gradients(self) -> bool:
        """Whether the experts' gradients may stay in the compute dtype: when the fused AdamW reads them
        (in float32) and no micro-batch sum needs float32 (the same values as float32 gradients)."""
        return self.fused_adamw and self.config.grad_accumulation == 1

    @property
    def split_master(self) -> bool:
        """Whether master_dtype "split" applies: the fused AdamW holds the low bits, and a bfloat16
        compute dtype has low bits to hold (float32 compute: the weights are the float32 master)."""
        return self.config.master_dtype == "split" and self.fused_adamw and self.compute == mx.bfloat16

    @property
    def master(self) -> mx.Dtype:
        """The dtype of the group's trained experts (`activate_group`) for the config's master_dtype."""
        if self.config.master_dtype == "split":
            return self.compute if self.split_master else mx.float32
        return mx.float32 if self.config.master_dtype == "float32" else self.compute

    @property
    def router_master(self) -> mx.Dtype:
        """The dtype of the group's trained routers: float32 with a float32 or split master (a router
        is small, and its scores are then computed in float32 as with a float32 master), else compute."""
        return mx.float32 if self.config.master_dtype in ("float32", "split") else self.compute

    def step_shape(self, model_config: dict, frozen: str, seq_len: int, group_size: int | None = None,
                   attention: str = "materialized") -> StepShape:
        """What the step holds (its master, optimizer state, loss chunking, checkpointing) with expert
        kernel `frozen` at `seq_len` tokens per example, for `estimate_peak`."""
        cfg, quant = self.config, model_config.get("quantization") or {}
        return StepShape(
            group_size=group_size or cfg.group_size, seq_len=seq_len, batch_size=cfg.batch_size,
            optimizer=cfg.optimizer, expert_bits=int(quant.get("bits", 8)),
            group_bits_size=int(quant.get("group_size", 64)), compute_dtype_bytes=2 if self.compute == mx.bfloat16 else 4,
            grad_checkpoint=cfg.grad_checkpoint, expert_kernel=expert_kernel(frozen), attention=attention,
            grad_accumulation=cfg.grad_accumulation, master=cfg.master_dtype, fused_update=self.fused_adamw,
            lean_gradients=self.lean_gradients, loss_chunk=cfg.loss_chunk,
            moment_bits=8 if self.fused_adamw and cfg.optimizer_state in ("int8", "int8-first") else 32,
            second_moment_bits=8 if self.fused_adamw and cfg.optimizer_state == "int8" else 32,
            keep_expert_activations=cfg.keep_expert_activations)


# The free functions the settings replaced, kept for callers of the old names.
def lean_gradients(config: TrainConfig) -> bool:
    """`StepSettings.lean_gradients` (independent of the compute dtype)."""
    return config.settings(mx.float32).lean_gradients


def split_master_in_use(config: TrainConfig, compute: mx.Dtype) -> bool:
    """`StepSettings.split_master`."""
    return config.settings(compute).split_master


def router_master_of(config: TrainConfig, compute: mx.Dtype) -> mx.Dtype:
    """`StepSettings.router_master`."""
    return config.settings(compute).router_master


def master_of(config: TrainConfig, compute: mx.Dtype) -> mx.Dtype:
    """`StepSettings.master`."""
    return config.settings(compute).master


def estimate_for_config(model_config: dict, config: TrainConfig, frozen: str, seq_len: int,
                        group_size: int | None = None, attention: str = "materialized") -> MemoryEstimate:
    """`estimate_peak` for what a TrainConfig's step holds on the model of `model_config` (its compute
    dtype) with expert kernel `frozen`, at `seq_len` tokens per example."""
    settings = config.settings(compute_dtype(model_config))
    return estimate_peak(model_config, settings.step_shape(model_config, frozen, seq_len, group_size, attention))

"""GroupedMoETrainer: grouped semi-full-gradient training of LFM2-MoE experts and routers.

The model is a mixed checkpoint: experts int8 (affine), everything else bf16. Training walks a
`GroupSchedule` of consecutive MoE layers. For the active group the experts are dequantized into
trainable `SwitchLinear` weights (float32 master weights by default: on bf16 compute held as the
bf16 weights plus their low bits in the optimizer, `master_bits`), the group's routers are made
trainable, everything else is frozen (the group's int8 start copy waits on disk); after the
group's steps the experts are requantized to int8 (same bits and group size) and the next group
starts with a fresh optimizer.

How steps map to groups. Training runs `epochs x len(groups)` phases: each epoch walks every
group once, in schedule order. Every phase runs the same number of optimizer steps
(`steps_per_group`): "split" (default) divides one pass over the training set among the groups,
ceil(ceil(ceil(n_train / batch) / accumulation) / n_groups) steps, so each epoch shows every
example about once and each group sees its share (as in the seed run: 582 examples, 3 epochs,
about 1,750 steps); "epoch" gives every group a whole pass (n_groups times the compute); an integer fixes it.
Micro-batches come in order from one endless stream of passes over the training set, pass k
shuffled by (seed, k) (`data.batch_order`); step s of phase p consumes micro-batches
(p * steps_per_group + s) * accumulation onwards. The learning rate warms up and decays (cosine,
to `min_lr_ratio`) within each phase, matching the fresh optimizer state of each group.

Everything a step does is a pure function of (config, data, phase, step), and the MLX RNG is
reseeded from (seed, step) before every step, which is what makes resume after a kill exact.
"""

from __future__ import annotations

import argparse
import difflib
import functools
import hashlib
import json
import math
import shutil
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Literal

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
from mlx.utils import tree_flatten, tree_map, tree_map_with_path, tree_unflatten
from mlx_lm.models.base import create_attention_mask, create_ssm_mask
from mlx_lm.models.switch_layers import QuantizedSwitchLinear, SwitchLinear
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from tqdm import tqdm

from lfm_mlx import adamw_kernel, dequant_kernel, moments, row_gather
from lfm_mlx.checkpoint import (
    CHECKPOINTS, Checkpoint, ParkedArrays, config_hash, latest_checkpoint, list_checkpoints, load_checkpoint,
    restore_tree, save_checkpoint,
)
from lfm_mlx.data import Batch, Example, batch_order, build_dataset, make_batch, masked_loss
from lfm_mlx.errors import UserError, debugging
from lfm_mlx.expert_batch import BatchedSwitchGLU
from lfm_mlx.fsutil import (
    atomic_dir, atomic_write_json, atomic_write_text, check_free_space, locked, recover_directory, refuse_overlap,
)
from lfm_mlx.master_bits import join_master, split_master
from lfm_mlx.memory import (
    GB, MemoryBudget, MemoryBudgetExceeded, MemoryEstimate, MemoryHardStop, MemoryReading, MemoryWatchdog,
    estimate_peak,
)
from lfm_mlx.moments import (
    MOMENT_GROUP, V_FLOOR, WEIGHT_STREAM, pack_codes, pack_moment, pack_moment_noisy, round_to_bfloat16, unpack_moment,
)
from lfm_mlx.mixed import quantize_experts
from lfm_mlx.models import compute_dtype, load, read_config, resolve_model_path, save_model_dir, weight_files
from lfm_mlx.schedule import GroupSchedule
from lfm_mlx.yamlfile import read_yaml

PROJECTIONS = ("gate_proj", "up_proj", "down_proj")
STORAGE_DTYPE = mx.bfloat16  # what save_model_dir writes for scales, biases and routers
EXIT_CONFIG, EXIT_OVER_BUDGET = 2, 3
# Keys a resume may change with --allow-config-change (the optimizer's step size, not what is trained).
CHANGEABLE_ON_RESUME = ("learning_rate", "min_lr_ratio", "warmup_steps", "weight_decay", "grad_clip", "eps", "betas")
GROUP_START = "group_start.safetensors"  # in the run dir: the training group's int8 start copy (offload_group_start)


# ---------------------------------------------------------------- config


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
    # numerics
    train_routers: bool = True
    master_dtype: Literal["split", "float32", "compute", "compute-stochastic"] = Field(
        "split", description="the trained experts' and routers' copies; split: a float32 master held as the "
                             "bfloat16 weights the model computes with plus their 16 low bits in the optimizer "
                             "(float32's math and memory, no casts; with the fused AdamW and bf16 compute, else "
                             "float32); compute: in the compute dtype; compute-stochastic: there too, each update "
                             "rounded stochastically to bfloat16 (unbiased, half a float32 master's memory; other "
                             "math, fused AdamW only)")
    optimizer_state: Literal["float32", "int8"] = Field("float32", description="AdamW moments of the fused update; "
                                                        "int8: 1.125 bytes an element instead of 4 (other math)")
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
    frozen_path: Literal["auto", "qmm", "dequant", "batched"] = "auto"
    stop_gradient: bool = True
    stochastic_rounding: bool = False
    # control
    seed: int = 0
    checkpoint_every: int = Field(50, ge=0, description="steps; 0: only at group boundaries")
    keep_checkpoints: int = Field(2, ge=0)
    max_consecutive_skips: int = Field(5, ge=1, description="steps in a row skipped (not applied) for a non-finite "
                                       "loss or gradient or a learning rate outside (0, 1) before the run stops; "
                                       "trained weights non-finite after an update stop it at once, unsaved")
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

    @model_validator(mode="after")
    def _cross_checks(self) -> "TrainConfig":
        problems = []
        if isinstance(self.steps_per_group, int) and self.steps_per_group < 1:
            problems.append(f"steps_per_group={self.steps_per_group} must be >= 1, 'split' or 'epoch'")
        if self.group_stride > self.group_size:
            problems.append(f"group_stride={self.group_stride} > group_size={self.group_size} leaves layers untrained")
        if any(f < 0 for f in self.splits) or abs(sum(self.splits) - 1) > 1e-6:
            problems.append(f"splits={list(self.splits)} must be three fractions >= 0 summing to 1")
        if self.optimizer_state == "int8" and not (self.optimizer == "adamw" and self.fused_update):
            problems.append(f"optimizer_state='int8' needs the fused AdamW (optimizer=adamw, fused_update=true), "
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
                    near = difflib.get_close_matches(str(problem["loc"][-1]), fields, n=1)
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

    def training_hash_dict(self) -> dict:
        """The fields that change what training computes (a resumed run must match them)."""
        ignore = {"run_dir", "progress", "checkpoint_every", "keep_checkpoints", "max_consecutive_skips",
                  "eval_each_group", "memory"}
        return {k: v for k, v in self.model_dump(mode="json").items() if k not in ignore}


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


# ---------------------------------------------------------------- expert modules


def after(arrays: list, dependency: mx.array) -> list:
    """`arrays`, made to wait for `dependency` in MLX's evaluation order. MLX runs a graph breadth
    first, so work whose inputs exist early (casting a master copy) could run long before its
    consumer and stay in memory meanwhile; this keeps it just in time. (Tying the frozen experts'
    dequantization the same way saved 0.24 GB on CUDA: not done.)"""
    return mx.depends(arrays, [dependency])


def cast_keeping_gradient_dtype(w: mx.array, dtype: mx.Dtype) -> mx.array:
    """`w.astype(dtype)`, whose gradient stays in `dtype` instead of being cast back to w's dtype.
    The values are the same (a bf16 gradient cast to float32 is exact); the gradients of a float32
    master take half the memory until an update that reads them in float32 anyway."""
    cast = mx.custom_function(lambda a: a.astype(dtype))

    @cast.vjp
    def _(primals, cotangent, output):
        return cotangent

    return cast(w)


class TrainableSwitchLinear(SwitchLinear):
    """Dequantized experts being trained: master weights (float32 by default) cast to the
    activation dtype at each call, so bf16 compute does not round small updates away.
    `lean_gradients`: their gradients stay in the activation dtype (`cast_keeping_gradient_dtype`)."""

    def __init__(self, weight: mx.array, group_size: int, bits: int, mode: str, lean_gradients: bool = False):
        super().__init__(1, 1, 1, bias=False)
        self.weight = weight
        self.group_size, self.bits, self.mode = group_size, bits, mode
        self.lean_gradients = lean_gradients

    def weight_for(self, x: mx.array) -> mx.array:
        """The experts' weights in x's dtype, cast just in time for x."""
        w = after([self["weight"]], x)[0]
        if w.dtype != x.dtype:
            w = cast_keeping_gradient_dtype(w, x.dtype) if self.lean_gradients else w.astype(x.dtype)
        return w

    def __call__(self, x, indices, sorted_indices=False):
        return mx.gather_mm(x, self.weight_for(x).swapaxes(-1, -2), rhs_indices=indices,
                            sorted_indices=sorted_indices)


class DequantSwitchLinear(QuantizedSwitchLinear):
    """Frozen int8 experts dequantized just in time and run through gather_mm (same parameters as
    QuantizedSwitchLinear): much faster than gather_qmm's backward on CUDA, more transient memory."""

    def weight_for(self, x: mx.array) -> mx.array:
        """The experts dequantized to x's dtype."""
        w = dequant_kernel.dequantize(self["weight"], self["scales"], self.get("biases"), self.group_size,
                                      self.bits, self.mode)
        return w.astype(x.dtype)

    def __call__(self, x, indices, sorted_indices=False):
        return mx.gather_mm(x, self.weight_for(x).swapaxes(-1, -2), rhs_indices=indices,
                            sorted_indices=sorted_indices)


# Expert paths -> the frozen experts' module. On "batched" every MoE block (trained experts
# included) runs as padded expert blocks through batched matmuls (`expert_batch`), else gather_mm.
FROZEN_CLASSES = {"qmm": QuantizedSwitchLinear, "dequant": DequantSwitchLinear, "batched": DequantSwitchLinear}


def make_quantized(cls: type, weight: mx.array, scales: mx.array, biases: mx.array | None,
                   group_size: int, bits: int, mode: str = "affine") -> QuantizedSwitchLinear:
    """A frozen quantized expert stack of class `cls` holding the given arrays."""
    module = cls(group_size, 1, 1, bias=False, group_size=group_size, bits=bits, mode=mode)  # tiny init
    module.weight, module.scales, module.biases = weight, scales, biases
    module.freeze()
    return module


def _ff(model: nn.Module, layer: int) -> nn.Module:
    return model.model.layers[layer].feed_forward


def moe_layers(model: nn.Module) -> list[int]:
    """Indices of the layers whose feed-forward is a routed MoE block."""
    return [i for i, layer in enumerate(model.model.layers) if hasattr(layer.feed_forward, "switch_mlp")]


def moe_params(model: nn.Module, layers: list[int]) -> dict[str, mx.array]:
    """Every parameter (experts, router, expert_bias) of the given layers' MoE blocks, by full name."""
    out = {}
    for i in layers:
        for name, value in tree_flatten(_ff(model, i).parameters()):
            out[f"model.layers.{i}.feed_forward.{name}"] = value
    return out


def _layer_of(name: str) -> int:
    return int(name.split(".")[2])


def set_frozen_path(model: nn.Module, path: str, skip: list[int] = ()) -> None:
    """Switch every frozen expert stack (outside `skip`) to the `qmm`, `dequant` or `batched` path
    (`batched` also runs the trained experts as padded expert blocks: `expert_batch`)."""
    cls = FROZEN_CLASSES[path]
    for i in moe_layers(model):
        ff = _ff(model, i)
        if path == "batched" and not isinstance(ff.switch_mlp, BatchedSwitchGLU):
            ff.switch_mlp = BatchedSwitchGLU(ff.switch_mlp)
        elif path != "batched" and isinstance(ff.switch_mlp, BatchedSwitchGLU):
            ff.switch_mlp = ff.switch_mlp.unbatched()
        if i in skip:
            continue
        switch = ff.switch_mlp
        for proj in PROJECTIONS:
            m = getattr(switch, proj)
            if isinstance(m, QuantizedSwitchLinear) and type(m) is not cls:
                setattr(switch, proj, make_quantized(cls, m.weight, m.scales, m.get("biases"), m.group_size,
                                                     m.bits, m.mode))


def activate_group(model: nn.Module, layers: list[int], master: mx.Dtype, train_routers: bool = True,
                   lean_gradients: bool = False, router_master: mx.Dtype | None = None) -> None:
    """Dequantize the group's experts into trainable weights of dtype `master`; freeze all else but
    them (and the routers, in `router_master`, default `master`).
    `lean_gradients`: the experts' gradients come in the compute dtype (see `lean_gradients`)."""
    for i in layers:
        switch = _ff(model, i).switch_mlp
        for proj in PROJECTIONS:
            q = getattr(switch, proj)
            if not isinstance(q, QuantizedSwitchLinear):
                raise TypeError(f"model.layers.{i}.feed_forward.switch_mlp.{proj} is {type(q).__name__}, "
                                "expected quantized experts (a mixed checkpoint)")
            w = mx.dequantize(q.weight, q.scales, q.get("biases"), group_size=q.group_size, bits=q.bits, mode=q.mode)
            setattr(switch, proj, TrainableSwitchLinear(w.astype(master), q.group_size, q.bits, q.mode,
                                                        lean_gradients))
    model.freeze()
    for i in layers:
        ff = _ff(model, i)
        for proj in PROJECTIONS:
            getattr(ff.switch_mlp, proj).unfreeze()
        if train_routers:
            ff.gate.weight = ff.gate.weight.astype(router_master or master)
            ff.gate.unfreeze()  # expert_bias stays frozen: it is selection-only, not trained by gradient


# ---------------------------------------------------------------- requantization and retention


def quantize_affine(w: mx.array, group_size: int, bits: int, storage: mx.Dtype = STORAGE_DTYPE,
                    key: mx.array | None = None) -> tuple[mx.array, mx.array, mx.array]:
    """Affine quantization in mx.quantize's layout, with scales and biases rounded to the storage
    dtype first and codes chosen against those, so the in-memory model equals the saved one.
    With `key` codes round stochastically (unbiased: E[dequantized] = w inside the range)."""
    if bits not in (2, 4, 8):
        if key is not None:
            raise ValueError(f"stochastic rounding supports 2, 4 and 8-bit experts, not {bits}-bit")
        wq, scales, biases = mx.quantize(w, group_size, bits)
        return wq, scales.astype(storage), biases.astype(storage)
    _, scales, biases = mx.quantize(w, group_size, bits)  # mlx's choice of range per group
    scales, biases = scales.astype(storage), biases.astype(storage)
    s = scales.astype(mx.float32)[..., None]
    b = biases.astype(mx.float32)[..., None]
    groups = w.astype(mx.float32).reshape(*w.shape[:-1], w.shape[-1] // group_size, group_size)
    x = (groups - b) / mx.where(s == 0, 1.0, s)
    offset = 0.5 if key is None else mx.random.uniform(shape=x.shape, key=key)
    codes = mx.clip(mx.floor(x + offset), 0, 2**bits - 1).reshape(w.shape)
    return pack_codes(codes, bits), scales, biases


def unpack_codes(packed: mx.array, bits: int) -> mx.array:
    """The inverse of `pack_codes`."""
    per = 32 // bits
    shifts = mx.arange(per, dtype=mx.uint32) * bits
    codes = (packed[..., None] >> shifts) & (2**bits - 1)
    return codes.reshape(*packed.shape[:-1], packed.shape[-1] * per)


def update_stats(start: mx.array, trained: mx.array, kept: mx.array,
                 codes: tuple[mx.array, mx.array] | None = None) -> dict[str, float]:
    """Sums that define update retention for one tensor (all in float32):
    d = trained - start (the update), k = kept - start (what survived storage).
    `codes` = (start codes, new codes) counts the int8 codes that changed."""
    d = trained.astype(mx.float32) - start.astype(mx.float32)
    k = kept.astype(mx.float32) - start.astype(mx.float32)
    sums = [(d * d).sum(), (k * k).sum(), (d * k).sum(), ((k - d) ** 2).sum(), (k != 0).sum()]
    sums.append((codes[0] != codes[1]).sum() if codes is not None else mx.array(-1))
    mx.eval(sums)
    dd, kk, dk, err, changed, codes_changed = (s.item() for s in sums)
    return {"dd": dd, "kk": kk, "dk": dk, "err": err, "changed": changed, "codes_changed": codes_changed,
            "n": start.size}


def summarize_stats(parts: list[dict[str, float]]) -> dict[str, float | None]:
    """Retention figures from summed `update_stats`:

    retention   = <k, d> / |d|^2  share of the update, projected on its direction, that was kept
    cosine      = <k, d> / (|k| |d|)
    norm_ratio  = |k| / |d|       above 1 when rounding noise outweighs the update
    rel_error   = |k - d| / |d|
    changed     = share of weights whose stored (dequantized) value changed; requantization
                  re-derives each group's scale and bias, so this is near 1 once a group moved
    codes_changed = share of int8 codes that changed (None for tensors stored as floats)
    update_rms  = sqrt(|d|^2 / n)
    """
    dd, kk, dk, err = (sum(p[key] for p in parts) for key in ("dd", "kk", "dk", "err"))
    n, changed = sum(p["n"] for p in parts), sum(p["changed"] for p in parts)
    coded = [p["codes_changed"] for p in parts if p["codes_changed"] >= 0]
    out = {"retention": None, "cosine": None, "norm_ratio": None, "rel_error": None,
           "changed": changed / n if n else 0.0,
           "codes_changed": sum(coded) / n if coded and len(coded) == len(parts) else None, "update_rms": 0.0}
    if dd > 0:
        out.update(retention=dk / dd, cosine=dk / math.sqrt(dd * kk) if kk else 0.0, norm_ratio=math.sqrt(kk / dd),
                   rel_error=math.sqrt(err / dd), update_rms=math.sqrt(dd / n))
    return out


def requantize_group(model: nn.Module, layers: list[int], start: dict[str, mx.array], frozen: str,
                     stochastic_key: Callable[[str], mx.array] | None = None) -> dict:
    """Requantize the group's trained experts (and round its routers to bf16), in place.

    `start` holds the group's parameters at the start of the group (`moe_params`). Returns the
    update retention of experts and routers, per layer and for the group.
    """
    cls = FROZEN_CLASSES[frozen]
    expert_parts, router_parts, per_layer = [], [], {}
    for i in layers:
        prefix = f"model.layers.{i}.feed_forward"
        ff = _ff(model, i)
        layer_parts = []
        for proj in PROJECTIONS:
            name = f"{prefix}.switch_mlp.{proj}"
            m = getattr(ff.switch_mlp, proj)
            key = stochastic_key(name) if stochastic_key else None
            wq, scales, biases = quantize_affine(m.weight, m.group_size, m.bits, STORAGE_DTYPE, key)
            scales, biases = scales.astype(start[f"{name}.scales"].dtype), biases.astype(start[f"{name}.scales"].dtype)
            w0 = mx.dequantize(start[f"{name}.weight"], start[f"{name}.scales"], start.get(f"{name}.biases"),
                               group_size=m.group_size, bits=m.bits, mode=m.mode)
            kept = mx.dequantize(wq, scales, biases, group_size=m.group_size, bits=m.bits, mode=m.mode)
            codes = None
            if m.bits in (2, 4, 8):
                codes = (unpack_codes(start[f"{name}.weight"], m.bits), unpack_codes(wq, m.bits))
            layer_parts.append(update_stats(w0, m.weight, kept, codes))
            setattr(ff.switch_mlp, proj, make_quantized(cls, wq, scales, biases, m.group_size, m.bits, m.mode))
            mx.eval(getattr(ff.switch_mlp, proj).parameters())
        expert_parts += layer_parts
        router0 = start[f"{prefix}.gate.weight"]
        stored = ff.gate.weight.astype(STORAGE_DTYPE).astype(router0.dtype)
        router_parts.append(update_stats(router0, ff.gate.weight, stored))
        ff.gate.weight = stored
        per_layer[str(i)] = summarize_stats(layer_parts)
    mx.eval(model.parameters())
    return {"experts": summarize_stats(expert_parts), "routers": summarize_stats(router_parts),
            "per_layer": per_layer}


# ---------------------------------------------------------------- forward and loss


def recompute_in_backward(fn: Callable) -> Callable:
    """Gradient checkpointing of `fn(*arrays) -> array`: only the inputs are kept; the backward
    pass recomputes `fn` once the gradient of its output has arrived.

    mx.checkpoint ties the recomputation to the forward output only, and MLX evaluates graphs
    breadth first, so the recomputations of every checkpointed layer are ready, and may run,
    together at the start of the backward pass, holding what checkpointing was meant to free
    (measured on CUDA, 8B shapes, 2,048 tokens, group 4: backward peak 42.8 GB, mx.checkpoint 44.9 GB)."""
    wrapped = mx.custom_function(fn)

    @wrapped.vjp
    def backward(primals, cotangent, output):
        primals = mx.depends(list(primals) if isinstance(primals, tuple) else [primals], [cotangent])
        _, grads = mx.vjp(fn, primals, [cotangent])
        return tuple(grads)

    return wrapped


def _checkpointed(layer: nn.Module, h: mx.array, mask) -> mx.array:
    """Run `layer` under `recompute_in_backward`: its activations are recomputed in the backward pass."""
    flat = tree_flatten(layer.trainable_parameters())
    names, arrays = [name for name, _ in flat], [value for _, value in flat]

    def run(x, *params):
        layer.update(tree_unflatten(list(zip(names, params))))
        return layer(x, mask)

    return recompute_in_backward(run)(h, *arrays)


def forward_hidden(model: nn.Module, inputs: mx.array, first_active: int | None = None,
                   grad_checkpoint: bool = False, stop_gradient: bool = True) -> mx.array:
    """The mlx-lm LFM2-MoE forward (no cache) up to the final norm, with gradient hooks from
    `first_active` up: stop_gradient on the hidden state entering it (nothing below trains) and
    `recompute_in_backward` around every layer from it to the top (the layers backward runs through)."""
    inner = model.model
    h = inner.embed_tokens(inputs)
    attn_mask = create_attention_mask(h, None)
    conv_mask = create_ssm_mask(h, None)
    for i, layer in enumerate(inner.layers):
        mask = attn_mask if layer.is_attention_layer else conv_mask
        if first_active is not None and i >= first_active:
            if i == first_active and stop_gradient:
                h = mx.stop_gradient(h)
            if grad_checkpoint:
                h = _checkpointed(layer, h, mask)
                continue
        h = layer(h, mask)
    return inner.embedding_norm(h)


def forward_logits(model: nn.Module, inputs: mx.array, first_active: int | None = None,
                   grad_checkpoint: bool = False, stop_gradient: bool = True) -> mx.array:
    """`forward_hidden` through the (tied) LM head: the logits."""
    hidden = forward_hidden(model, inputs, first_active, grad_checkpoint, stop_gradient)
    return model.model.embed_tokens.as_linear(hidden)


def _cross_entropy(logits: mx.array, targets: mx.array) -> mx.array:
    """Per-token cross-entropy in float32; MLX's fused kernel (float32 accumulation without a
    float32 copy of the logits) where this MLX has it."""
    if hasattr(mx.fast, "cross_entropy"):
        return mx.fast.cross_entropy(logits, targets)
    return nn.losses.cross_entropy(logits.astype(mx.float32), targets, reduction="none")


def chunked_masked_loss(model: nn.Module, hidden: mx.array, targets: mx.array, mask: mx.array,
                        chunk: int) -> tuple[mx.array, mx.array]:
    """`data.masked_loss` of the LM head on `hidden`, `chunk` tokens at a time: neither the full
    (tokens x vocabulary) logits nor their gradient ever exist at once.

    A custom vjp walks the chunks in order, each chunk's logits recomputed and its gradient
    taken only after the previous chunk's is done (a plain per-chunk checkpoint would let MLX's
    breadth-first evaluation recompute every chunk at once)."""
    embed = model.model.embed_tokens
    dims = hidden.shape[-1]
    targets, mask = targets.reshape(-1), mask.reshape(-1).astype(mx.bool_)
    bounds = [(start, min(start + chunk, targets.size)) for start in range(0, targets.size, chunk)]

    def piece(h: mx.array, start: int, end: int) -> mx.array:
        losses = _cross_entropy(embed.as_linear(h), targets[start:end])
        return mx.where(mask[start:end], losses, 0.0).sum()

    def forward(h):
        total, previous = mx.array(0.0, dtype=mx.float32), None
        for start, end in bounds:
            part = h[start:end] if previous is None else mx.depends([h[start:end]], [previous])[0]
            previous = piece(part, start, end)
            total = total + previous
        return total

    loss = mx.custom_function(forward)

    @loss.vjp
    def backward(primals, cotangent, output):
        h, parts, previous = primals, [], cotangent  # one primal: MLX passes the array itself
        for start, end in bounds:
            part = mx.depends([h[start:end]], [previous])[0]
            _, (grad,) = mx.vjp(lambda v: piece(v, start, end), [part], [cotangent])
            parts.append(grad)
            previous = grad
        return mx.concatenate(parts, axis=0)

    return loss(hidden.reshape(-1, dims)), mask.sum()


def evaluate_loss(model: nn.Module, examples: list[Example], batch_size: int = 1, pad_id: int = 0) -> float | None:
    """Mean masked cross-entropy per trained token over `examples` (None when there are none)."""
    total, count = 0.0, 0
    for start in range(0, len(examples), batch_size):
        batch = make_batch(examples[start:start + batch_size], pad_id)
        loss, n = masked_loss(model(batch.inputs), batch.targets, batch.loss_mask)
        mx.eval(loss, n)
        total, count = total + loss.item(), count + n.item()
    return total / count if count else None


def _head_loss(model: nn.Module, h: mx.array, targets: mx.array, mask: mx.array,
               loss_chunk: int) -> tuple[mx.array, mx.array]:
    """The summed masked loss of the last layer's output `h`: final norm, tied LM head, cross-entropy."""
    hidden = model.model.embedding_norm(h)
    if loss_chunk:
        return chunked_masked_loss(model, hidden, targets, mask, loss_chunk)
    return masked_loss(model.model.embed_tokens.as_linear(hidden), targets, mask)


def _layer_vjp(layer: nn.Module, x: mx.array, mask, cotangent: mx.array) -> tuple[mx.array, dict[str, mx.array]]:
    """The layer's forward recomputed from its input `x`, then its backward for `cotangent`:
    (gradient of x, gradients of the layer's trainable parameters by name within the layer)."""
    flat = tree_flatten(layer.trainable_parameters())
    names, arrays = [name for name, _ in flat], [value for _, value in flat]

    def run(x, *params):
        layer.update(tree_unflatten(list(zip(names, params))))
        return layer(x, mask)

    _, grads = mx.vjp(run, [x, *arrays], [cotangent])
    layer.update(tree_unflatten(list(zip(names, arrays))))  # the layer holds its own arrays again
    return grads[0], dict(zip(names, grads[1:]))


def _one_ahead(work, in_flight):
    """Start `work` on the device, then wait for `in_flight` (the previous layer's): Python builds
    the next layer's graph while the device runs this one, and at most two layers' temporaries
    exist at once (an unbounded async_eval held 20.6 GB of them at the 8B shapes; waiting for each
    layer in turn cost 13% more time)."""
    mx.async_eval(work)
    if in_flight is not None:
        mx.eval(in_flight)
    return work


SPECULATION = {"passes": 0, "redone": 0}  # the walk's forward passes on guessed capacities, and how many fell short


def _speculation_held(switches: dict[int, BatchedSwitchGLU]) -> bool:
    """After a forward pass with speculated capacities, already evaluated: whether every guess held.
    One host read for all blocks; each block's next guess follows what it needed."""
    guessed = [switch for switch in switches.values() if switch.needed is not None]
    if not guessed:
        return True
    needs = mx.stack([switch.needed for switch in guessed]).tolist()
    held = all(need <= switch.capacity_hint for switch, need in zip(guessed, needs))
    for switch, need in zip(guessed, needs):
        switch.hint_from(need)
    SPECULATION["passes"] += 1
    SPECULATION["redone"] += not held
    return held


def walk_loss_and_grad(model: nn.Module, inputs: mx.array, targets: mx.array, mask: mx.array, first_active: int,
                       loss_chunk: int = 0, keep_expert_activations: bool = False) -> tuple[tuple[mx.array, mx.array], dict]:
    """((loss sum, trained tokens), grads) like `nn.value_and_grad` of the summed masked loss, by
    walking the layers: a forward pass that keeps only each layer's input from `first_active` up,
    then the backward pass one layer at a time, top down, each layer's forward recomputed in its
    own `mx.vjp` and evaluated before the next.

    Expert blocks (`BatchedSwitchGLU`) read nothing back: the forward pass lays them out for the
    capacity each needed last step (with headroom), checked once at its end (the pass is redone
    with exact layouts when a guess fell short), and the recomputation reuses those layouts.
    `keep_expert_activations`: frozen expert blocks above `first_active` also keep their gate and up
    projections from the forward pass, and the recomputation runs only their backward matmuls.

    The math is per-layer gradient checkpointing, but MLX evaluates one layer's work at a time:
    one graph for the whole step lets its breadth-first evaluation start the recomputation (and
    dequantization) of many layers at once, which held 17.7 GB beyond the weights at the 8B shapes
    (2,048 tokens, group 4). Layers below `first_active` hold nothing trainable: the walk stops there."""
    inner = model.model
    walked = range(first_active, len(inner.layers))
    switches = {i: layer.feed_forward.switch_mlp for i, layer in enumerate(inner.layers)
                if isinstance(getattr(layer.feed_forward, "switch_mlp", None), BatchedSwitchGLU)}
    try:
        for i, switch in switches.items():
            switch.keep_layout = i >= first_active
            switch.keep_activations = keep_expert_activations and not tree_flatten(switch.trainable_parameters())
        for speculate in (True, False):
            for switch in switches.values():
                switch.speculate, switch.needed = speculate, None
                switch.forget()
            h = inner.embed_tokens(inputs)
            masks = {True: create_attention_mask(h, None), False: create_ssm_mask(h, None)}
            kept, in_flight = {}, None
            for i, layer in enumerate(inner.layers):
                if i >= first_active:
                    kept[i] = h
                h = _one_ahead(layer(h, masks[layer.is_attention_layer]), in_flight)
                in_flight = h
            (loss,), (cotangent,) = mx.vjp(lambda x: _head_loss(model, x, targets, mask, loss_chunk)[0], [h],
                                           [mx.array(1.0, dtype=mx.float32)])
            trained = mask.astype(mx.bool_).sum()
            mx.eval(loss, trained, cotangent)
            if _speculation_held(switches):
                break
        flat = {}
        for i in reversed(walked):
            layer = inner.layers[i]
            previous = cotangent
            cotangent, grads = _layer_vjp(layer, kept.pop(i), masks[layer.is_attention_layer], cotangent)
            if i in switches:
                switches[i].forget()  # the graph holds what it needs now
            _one_ahead([cotangent, grads], previous)
            flat.update({f"model.layers.{i}.{name}": g for name, g in grads.items()})
    finally:
        for switch in switches.values():
            switch.keep_layout, switch.speculate, switch.keep_activations, switch.needed = False, False, False, None
            switch.forget()
    return (loss, trained), tree_map_with_path(lambda path, _: flat[path], model.trainable_parameters())


def make_loss_and_grad(model: nn.Module, first_active: int, grad_checkpoint: bool = True,
                       stop_gradient: bool = True, loss_chunk: int = 0, walk: bool = True,
                       keep_expert_activations: bool = False) -> Callable:
    """value_and_grad of the summed masked loss over the model's trainable parameters:
    f(model, inputs, targets, mask) -> ((loss sum, trained tokens), grads).
    `loss_chunk` > 0 computes the cross-entropy that many tokens at a time (`chunked_masked_loss`).
    With `grad_checkpoint` (and `stop_gradient`) the gradients come from `walk_loss_and_grad`;
    `walk=False` builds one graph for the step instead (checkpointed by `recompute_in_backward`)."""
    if grad_checkpoint and stop_gradient and walk:
        return lambda m, inputs, targets, mask: walk_loss_and_grad(m, inputs, targets, mask, first_active, loss_chunk,
                                                                   keep_expert_activations)

    def loss_fn(m, inputs, targets, mask):
        if loss_chunk:
            hidden = forward_hidden(m, inputs, first_active, grad_checkpoint, stop_gradient)
            return chunked_masked_loss(m, hidden, targets, mask, loss_chunk)
        return masked_loss(forward_logits(m, inputs, first_active, grad_checkpoint, stop_gradient), targets, mask)

    return nn.value_and_grad(model, loss_fn)


def accumulate_gradients(model: nn.Module, loss_and_grad: Callable, batches: list[Batch],
                         mean: bool = True) -> tuple[float, int, dict]:
    """Gradients of several micro-batches, token-weighted: (loss sum, trained tokens, grads), the
    grads of the mean loss, or with `mean=False` of the summed loss (divide by the trained tokens
    later, e.g. inside the fused update, which saves a pass over them).
    Each micro-batch is evaluated before the next, so memory holds one batch's activations.
    Sums are float32 (bfloat16 gradients of split masters included)."""
    grads, loss_sum, trained = None, 0.0, 0
    for batch in batches:
        (loss, n), g = loss_and_grad(model, batch.inputs, batch.targets, batch.loss_mask)
        grads = g if grads is None else tree_map(lambda a, b: a.astype(mx.float32) + b, grads, g)
        mx.eval(grads, loss, n)
        loss_sum, trained = loss_sum + loss.item(), trained + n.item()
    if not mean:
        return loss_sum, trained, grads
    return loss_sum, trained, tree_map(lambda g: g / max(trained, 1), grads)


def global_norm(grads: dict) -> float:
    """The L2 norm of all gradients (float32); inf or nan when any gradient is. At most two tensors'
    float32 squares at a time (`_one_ahead`): all at once would double the gradients' memory, one
    at a time left the device idle between them (8-10 ms of a 0.25 s step at the 8B shapes)."""
    total, in_flight = mx.array(0.0, dtype=mx.float32), None
    for _, g in tree_flatten(grads):
        total = total + _square_sum(g)
        in_flight = _one_ahead(total, in_flight)
    return math.sqrt(total.item())


# Compiled: the same value, 3.8 ms instead of 6.5 for 12 expert-stack gradients on an H200 (the
# float32 squares are still written: all tensors in one graph peaked 4.2 GB higher).
_square_sum = mx.compile(lambda g: g.astype(mx.float32).square().sum())


def trained_weight_norm(model: nn.Module) -> float:
    """The L2 norm of the trainable weights (float32): inf or nan when one is non-finite or their
    squares overflow (|w| above ~1e19, as a 1e38 learning rate leaves). One pass over them."""
    return global_norm(model.trainable_parameters())


def apply_update(model: nn.Module, optimizer: optim.Optimizer, grads: dict, grad_clip: float | None,
                 scale: float = 1.0, norm: float | None = None) -> None:
    """Clip (optionally) and apply one optimizer step, evaluating parameters and optimizer state.

    The step's gradients are `grads` x `scale` (scale 1 / trained tokens turns summed-loss
    gradients into mean-loss ones); `norm` is their global norm when the caller has it already.
    Clipping as optim.clip_grad_norm: x min(1, grad_clip / (norm + 1e-6)). A FusedAdamW takes the
    factor into its kernel; other optimizers get the gradients scaled first."""
    factor = scale
    if grad_clip is not None:
        if norm is None:
            norm = global_norm(grads) * scale
        factor = scale * min(1.0, grad_clip / (norm + 1e-6))
    if isinstance(optimizer, FusedAdamW):
        optimizer.grad_scale = mx.array(factor, dtype=mx.float32)
    elif factor != 1.0:
        grads = tree_map(lambda g: (g * factor).astype(g.dtype), grads)
    optimizer.update(model, grads)
    mx.eval(model.trainable_parameters(), optimizer.state)


# ---------------------------------------------------------------- fused AdamW


UPDATE_CHUNK = 1 << 25  # elements of one tensor updated at a time with int8 moments (their float32 copies scale with it)


def _adamw_math(g, p, m, v, lr, scale, b1, b2, eps, wd):
    """mlx.optimizers.AdamW's arithmetic (no bias correction, eps outside the sqrt) in float32:
    the new weights, first and second moments, all float32."""
    g = g.astype(mx.float32) * scale
    m32 = b1 * m.astype(mx.float32) + (1 - b1) * g
    v32 = b2 * v.astype(mx.float32) + (1 - b2) * g * g
    p32 = p.astype(mx.float32) * (1 - lr * wd) - lr * m32 / (mx.sqrt(v32) + eps)
    return p32, m32, v32


def _adamw_dense(g, p, m, v, lr, scale, b1, b2, eps, wd):
    p32, m32, v32 = _adamw_math(g, p, m, v, lr, scale, b1, b2, eps, wd)
    return p32.astype(p.dtype), m32.astype(m.dtype), v32.astype(v.dtype)


def _adamw_split(g, high, low, m, v, lr, scale, b1, b2, eps, wd):
    """_adamw_dense on a master split into bfloat16 weights and their low bits (`master_bits`):
    the float32 master's update, bit for bit, and the new halves."""
    p32, m32, v32 = _adamw_math(g, join_master(high, low), m, v, lr, scale, b1, b2, eps, wd)
    return (*split_master(p32), m32, v32)


def _adamw_dense_rounded(g, p, m, v, lr, scale, seed, b1, b2, eps, wd):
    """_adamw_dense with the new bfloat16 weights rounded stochastically (`round_to_bfloat16`)."""
    p32, m32, v32 = _adamw_math(g, p, m, v, lr, scale, b1, b2, eps, wd)
    return round_to_bfloat16(p32, seed + WEIGHT_STREAM), m32.astype(m.dtype), v32.astype(v.dtype)


def _adamw_int8_math(g, p, m, v, lr, scale, seed, b1, b2, eps, wd, rounded):
    """_adamw_math on int8 moments: the new weights (bfloat16 rounded stochastically when
    `rounded`), the new first moment and the logarithm of the new second moment (float32), for
    `_adamw_int8_state` to pack."""
    p32, m32, v32 = _adamw_math(g, p, unpack_moment(m), mx.exp(unpack_moment(v)) - V_FLOOR, lr, scale,
                                b1, b2, eps, wd)
    p = round_to_bfloat16(p32, seed + WEIGHT_STREAM) if rounded else p32.astype(p.dtype)
    return p, m32, mx.log(v32 + V_FLOOR)


def _adamw_int8_split_math(g, high, low, m, v, lr, scale, seed, b1, b2, eps, wd):
    """_adamw_int8_math on a split master: its new halves, then the moments for packing."""
    p32, m32, log_v32 = _adamw_int8_math(g, join_master(high, low), m, v, lr, scale, seed, b1, b2, eps, wd, False)
    return (*split_master(p32), m32, log_v32)


def _adamw_int8_state(g, master: tuple, m, v, lr, scale, seed, b1, b2, eps, wd, rounded=False) -> tuple:
    """_adamw_math on int8 moments, each stored rounded stochastically (unbiased): the first
    moment linearly, the second as its logarithm (its values span orders of magnitude within a
    group; a linear code would round small ones to zero and blow their step up). One noise draw
    serves both, as u and 1 - u: each moment's rounding is still unbiased, at half the draws.
    `master`: (weights,) or a split master's (bfloat16 weights, low bits); returns the new master's
    arrays, then the packed moments."""
    if len(master) == 2:
        kernel = _adamw_int8_split_kernel
    else:
        kernel = _adamw_int8_rounded_kernel if rounded else _adamw_int8_kernel
    *new_master, m32, log_v32 = kernel(g, *master, m, v, lr, scale, seed, b1, b2, eps, wd)
    return (*new_master, pack_moment_noisy(m32, seed), pack_moment_noisy(log_v32, seed, flip=True))


_adamw_kernel = mx.compile(_adamw_dense)
_adamw_split_kernel = mx.compile(_adamw_split)
_adamw_rounded_kernel = mx.compile(_adamw_dense_rounded)
_adamw_int8_kernel = mx.compile(functools.partial(_adamw_int8_math, rounded=False))
_adamw_int8_rounded_kernel = mx.compile(functools.partial(_adamw_int8_math, rounded=True))
_adamw_int8_split_kernel = mx.compile(_adamw_int8_split_math)
_join_kernel = mx.compile(join_master)


def _leaves(tree, path: tuple = ()):
    """(path, container, key) of every array in a nested dict / list tree."""
    items = list(tree.items()) if isinstance(tree, dict) else list(enumerate(tree))
    for key, value in items:
        if isinstance(value, (dict, list)):
            yield from _leaves(value, path + (key,))
        elif isinstance(value, mx.array):
            yield path + (key,), tree, key


def _at(tree, path: tuple):
    for key in path:
        tree = tree[key]
    return tree


def _set(tree, path: tuple, value) -> None:
    _at(tree, path[:-1])[path[-1]] = value


def _rows(tree, start: int, end: int):
    """Rows start:end (first axis) of every array in a nested dict."""
    return tree_map(lambda a: a[start:end], tree)


class FusedAdamW(optim.Optimizer):
    """AdamW with mlx.optimizers.AdamW's math (defaults: no bias correction), as one compiled
    kernel per tensor (float32 arithmetic) instead of a chain of separate passes, with the
    gradient's scale (mean over tokens, clipping) folded in through `grad_scale`. Moments are
    float32 whatever the parameters' dtype (mlx.optimizers keep them in the parameters' dtype).

    `split_master`: a bfloat16 parameter is the upper half of a float32 master whose 16 low bits
    the optimizer holds (state "low", `master_bits`): the update is the float32 master's, bit for
    bit, and `merge_masters` writes the whole masters back into the model.
    `state_bits=8` (other math, checked against the float32 step's loss by the benchmark) keeps
    both moments as int8 codes (`pack_moment`; 1.125 bytes an element instead of 4) for tensors
    whose last axis is a multiple of MOMENT_GROUP; large tensors then go UPDATE_CHUNK
    elements (whole rows of the first axis) at a time."""

    def __init__(self, learning_rate, betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0,
                 state_bits: int = 32, stochastic_weights: bool = False, split_master: bool = False):
        super().__init__()
        if state_bits not in (8, 32):
            raise ValueError(f"state_bits={state_bits}: use 32 (float32 moments) or 8 (int8 moments)")
        self._maybe_schedule("learning_rate", learning_rate)
        self.betas, self.eps, self.weight_decay = (float(betas[0]), float(betas[1])), float(eps), float(weight_decay)
        self.state_bits = state_bits
        self.stochastic_weights = stochastic_weights
        self.split_master = split_master
        self.grad_scale = mx.array(1.0, dtype=mx.float32)

    def init_single(self, parameter: mx.array, state: dict):
        zeros = mx.zeros(parameter.shape, dtype=mx.float32)
        if self.state_bits == 8 and parameter.shape[-1] % MOMENT_GROUP == 0:
            state["m"] = pack_moment(zeros)
            state["v"] = pack_moment(mx.log(zeros + V_FLOOR))
        else:
            state["m"], state["v"] = zeros, mx.zeros(parameter.shape, dtype=mx.float32)
        if self.split_master and parameter.dtype == mx.bfloat16:
            state["low"] = mx.zeros(parameter.shape, dtype=mx.uint16)  # the master starts at the weights

    def merge_masters(self, model: nn.Module) -> None:
        """Replace every split parameter in `model` by its whole float32 master (after the last
        step, before the group is requantized from it); the low bits leave the state."""
        for path, holder, key in list(_leaves(self.state)):
            if key == "low":
                _set(model, path[:-1], _join_kernel(_at(model, path[:-1]), holder.pop(key)))

    def update(self, model: nn.Module, gradients: dict) -> None:
        """As Optimizer.update, but one tensor at a time, each evaluated before the next, and each
        gradient dropped from `gradients` once applied (the caller's tree is emptied): the update
        then holds one tensor's temporaries instead of all of them (MLX evaluates breadth first)."""
        if not self._initialized:
            self.init(gradients)
        for name, scheduler in self._schedulers.items():
            self.state[name] = scheduler(self.step)
        self.state["step"] = self.step + 1
        for path, holder, key in _leaves(gradients):
            gradient = holder[key]
            holder[key] = None  # the caller's reference goes: the gradient is freed once used
            new = self._update_tensor(gradient, _at(model, path), _at(self.state, path))
            del gradient
            _set(model, path, new)  # into the model at once: the old weights go now, not after every tensor

    def _update_tensor(self, gradient: mx.array, parameter: mx.array, state: dict) -> mx.array:
        """The new weights of one tensor (its moments replaced in `state`), a block of rows at a time."""
        rows = parameter.shape[0] if parameter.ndim > 1 else 1  # a vector is one row
        per_block = max(1, UPDATE_CHUNK // max(parameter.size // rows, 1))
        # Float32 moments: the compiled update holds nothing beyond its outputs, so the whole tensor
        # goes at once (blocks and their concatenation moved the data twice). Int8 moments unpack
        # to float32 first, and that temporary scales with the block.
        if rows <= per_block or not isinstance(state["m"], dict):
            new = self.apply_single(gradient, parameter, state)
            mx.eval(new, state)
            return new
        pieces, moments = [], {name: [] for name in state}  # m, v (and a split master's low bits)
        for start in range(0, rows, per_block):
            end = min(start + per_block, rows)
            part = {name: _rows(value, start, end) for name, value in state.items()}
            pieces.append(self.apply_single(gradient[start:end], parameter[start:end], part))
            mx.eval(pieces[-1], part)
            for name in moments:
                moments[name].append(part[name])
        for name, parts in moments.items():
            state[name] = (mx.concatenate(parts) if isinstance(parts[0], mx.array)
                           else {k: mx.concatenate([p[k] for p in parts]) for k in parts[0]})
        new = mx.concatenate(pieces)
        mx.eval(new, state)
        return new

    def apply_single(self, gradient: mx.array, parameter: mx.array, state: dict):
        lr = self.learning_rate.astype(mx.float32)
        (b1, b2), eps, wd = self.betas, self.eps, self.weight_decay
        rounded = self.stochastic_weights and parameter.dtype == mx.bfloat16
        if isinstance(state["m"], dict) or rounded:
            seed = mx.random.randint(0, 1 << 31, (1,)).astype(mx.uint32)  # from the step's seeded RNG
        if "low" in state and isinstance(state["m"], dict):
            p, state["low"], state["m"], state["v"] = _adamw_int8_state(
                gradient, (parameter, state["low"]), state["m"], state["v"], lr, self.grad_scale, seed, b1, b2, eps, wd)
        elif "low" in state:
            p, state["low"], state["m"], state["v"] = adamw_kernel.update(
                _adamw_split_kernel, gradient, (parameter, state["low"]), state["m"], state["v"], lr, self.grad_scale,
                b1, b2, eps, wd)
        elif isinstance(state["m"], dict):
            p, state["m"], state["v"] = _adamw_int8_state(gradient, (parameter,), state["m"], state["v"], lr,
                                                          self.grad_scale, seed, b1, b2, eps, wd, rounded)
        elif rounded:
            p, state["m"], state["v"] = _adamw_rounded_kernel(gradient, parameter, state["m"], state["v"], lr,
                                                              self.grad_scale, seed, b1, b2, eps, wd)
        else:
            p, state["m"], state["v"] = adamw_kernel.update(_adamw_kernel, gradient, (parameter,), state["m"],
                                                            state["v"], lr, self.grad_scale, b1, b2, eps, wd)
        return p


# ---------------------------------------------------------------- a group's start and end


def park_group_start(start: dict[str, mx.array], config: TrainConfig, directory: str | Path) -> ParkedArrays:
    """The group's int8 start copy (`moe_params` before `activate_group`), parked in
    `directory`/GROUP_START while the group trains when `offload_group_start`, else kept in memory.
    Call once the activated group is evaluated: its dequantization reads those arrays."""
    return ParkedArrays(start, Path(directory) / GROUP_START if config.offload_group_start else None)


def end_group(model: nn.Module, layers: list[int], start: ParkedArrays, frozen: str,
              optimizer: optim.Optimizer | None, stochastic_key: Callable[[str], mx.array] | None = None) -> dict:
    """The group's end: split masters merged back into whole float32 masters, the group requantized
    from them against its start copy (`requantize_group`, whose retention it returns), the copy dropped."""
    if isinstance(optimizer, FusedAdamW):
        optimizer.merge_masters(model)
    retention = requantize_group(model, layers, start.load(), frozen, stochastic_key)
    start.discard()
    return retention


# ---------------------------------------------------------------- frozen-path measurement


def _time(fn: Callable, *args, repeats: int = 3) -> float:
    mx.eval(fn(*args))  # warm-up (and kernel compilation)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        mx.eval(fn(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def probe_dequant_kernel(model: nn.Module, layer: int) -> dict:
    """`dequant_kernel.probe` on one MoE layer's frozen gate projection: whether just-in-time
    dequantization uses the custom CUDA kernel (bit-identical, faster) or mx.dequantize."""
    q = _ff(model, layer).switch_mlp.gate_proj
    if not isinstance(q, QuantizedSwitchLinear):
        return {"choice": "mx.dequantize", "reason": f"layer {layer}'s experts are not quantized"}
    return dequant_kernel.probe(q.weight, q.scales, q.get("biases"), q.group_size, q.bits, q.mode)


def probe_row_gather(model: nn.Module, tokens: int) -> dict:
    """`row_gather.probe` at this model's expert-block shapes for `tokens` tokens: whether the
    rows move between tokens and expert blocks through the CUDA kernels or MLX's gather."""
    args = model.model.args
    choices = args.num_experts_per_tok
    return row_gather.probe(tokens, choices, tokens * choices * 3 // 2, args.hidden_size,
                            model.model.embed_tokens.weight.dtype)


def measure_frozen_paths(model: nn.Module, layer: int, seq_len: int, dtype: mx.Dtype,
                         seed: int = 0) -> dict[str, float]:
    """Seconds for forward + input-gradient of one frozen MoE block on (1, seq_len) tokens, with
    experts through int8 gather_qmm ("qmm"), dequantized just in time ("dequant"), or as padded
    expert blocks ("batched"), each as the layer walk runs it: the blocks' layout known beforehand
    (the walk's forward pass guesses it on the device, the backward reuses it), not computed on the
    host. (Timed with a host read per call, the blocks lost the choice to "dequant" by 5% in one of
    three H200 runs, while the whole step ran 1.8x faster on them: 0.139 against 0.246 s.)"""
    block = _ff(model, layer)
    x = mx.random.normal((1, seq_len, model.model.args.hidden_size), key=mx.random.key(seed)).astype(dtype)
    times = {}
    for path in FROZEN_CLASSES:
        set_frozen_path(model, path)
        switch = block.switch_mlp
        grad = mx.grad(lambda v: block(v).astype(mx.float32).sum())
        if isinstance(switch, BatchedSwitchGLU):
            switch.keep_layout = True  # the untimed first call lays the blocks out; the timed ones reuse it
        try:
            times[path] = _time(grad, x)
        finally:
            if isinstance(switch, BatchedSwitchGLU):
                switch.keep_layout = False
                switch.forget()
    return times


def probe_attention(heads: int, head_dim: int, dtype: mx.Dtype, seq_len: int = 1024) -> dict:
    """Which attention backward this backend runs, measured: 'materialized' when forward + backward
    of causal sdpa holds at least half a float32 score matrix (B*H*S*S*4) more than its inputs,
    'fused' when it holds far less (flash-style kernels keep O(S * head_dim) per head)."""
    key = mx.random.key(0)
    q, k, v = (mx.random.normal((1, heads, seq_len, head_dim), key=kk).astype(dtype) for kk in mx.random.split(key, 3))
    mx.eval(q, k, v)

    def loss(q, k, v):
        out = mx.fast.scaled_dot_product_attention(q, k, v, scale=head_dim ** -0.5, mask="causal")
        return out.astype(mx.float32).sum()

    grad = mx.grad(loss, argnums=(0, 1, 2))
    mx.eval(grad(q, k, v))  # warm-up: kernels, caches
    before = mx.get_active_memory()
    mx.reset_peak_memory()
    mx.eval(grad(q, k, v))
    transient = mx.get_peak_memory() - before
    scores = heads * seq_len * seq_len * 4
    del q, k, v
    mx.clear_cache()
    ratio = transient / scores
    return {"kind": "materialized" if ratio >= 0.5 else "fused", "transient_over_scores": round(ratio, 3),
            "probe": {"heads": heads, "head_dim": head_dim, "seq_len": seq_len, "dtype": str(dtype)}}


# ---------------------------------------------------------------- settings shared with the sweep

PROBE_TOKENS = 1024  # tokens of the start-up expert-path probe (at most the longest example)


def lean_gradients(config: TrainConfig) -> bool:
    """Whether the experts' gradients may stay in the compute dtype: when the fused AdamW reads them
    (in float32) and no micro-batch sum needs float32 (the same values as float32 gradients)."""
    return config.optimizer == "adamw" and config.fused_update and config.grad_accumulation == 1


def split_master_in_use(config: TrainConfig, compute: mx.Dtype) -> bool:
    """Whether master_dtype "split" applies: the fused AdamW holds the low bits, and a bfloat16
    compute dtype has low bits to hold (float32 compute: the weights are the float32 master)."""
    return config.master_dtype == "split" and config.optimizer == "adamw" and config.fused_update and \
        compute == mx.bfloat16


def router_master_of(config: TrainConfig, compute: mx.Dtype) -> mx.Dtype:
    """The dtype of the group's trained routers: float32 with a float32 or split master (a router
    is small, and its scores are then computed in float32 as with a float32 master), else compute."""
    return mx.float32 if config.master_dtype in ("float32", "split") else compute


def master_of(config: TrainConfig, compute: mx.Dtype) -> mx.Dtype:
    """The dtype of the group's trained experts (`activate_group`) for a config's master_dtype."""
    if config.master_dtype == "split":
        return compute if split_master_in_use(config, compute) else mx.float32
    return mx.float32 if config.master_dtype == "float32" else compute


def estimate_for_config(model_config: dict, config: TrainConfig, frozen: str, seq_len: int,
                        group_size: int | None = None, attention: str = "materialized") -> MemoryEstimate:
    """`estimate_peak` for what a TrainConfig's step holds (its master, optimizer state, loss
    chunking, checkpointing) on expert path `frozen`, at `seq_len` tokens per example."""
    quant = model_config.get("quantization") or {}
    cb = 2 if compute_dtype(model_config) == mx.bfloat16 else 4
    fused = config.optimizer == "adamw" and config.fused_update
    return estimate_peak(
        model_config, group_size=group_size or config.group_size, seq_len=seq_len, batch_size=config.batch_size,
        optimizer=config.optimizer, expert_bits=int(quant.get("bits", 8)),
        group_bits_size=int(quant.get("group_size", 64)), compute_dtype_bytes=cb,
        grad_checkpoint=config.grad_checkpoint, frozen_path=frozen, attention=attention,
        grad_accumulation=config.grad_accumulation, master=config.master_dtype,
        fused_update=fused, lean_gradients=lean_gradients(config), loss_chunk=config.loss_chunk,
        moment_bits=8 if fused and config.optimizer_state == "int8" else 32,
        keep_expert_activations=config.keep_expert_activations,
    )


# ---------------------------------------------------------------- the trainer


class NonFiniteStop(RuntimeError):
    """Too many consecutive steps with a non-finite loss or gradient, or an update that made the
    trained weights non-finite."""

    exit_code = 65  # EX_DATAERR: look at the logged example ids

    def __init__(self, step: int, skips: int, row_ids: list[str], learning_rate: float, what: str):
        self.step, self.skips, self.row_ids = step, skips, row_ids
        super().__init__(
            f"stopped at step {step}: {what} (last examples: {', '.join(row_ids)}); the newest checkpoint holds the "
            f"last good weights; see metrics.jsonl 'skipped' records. Fix those rows, or lower the learning rate and "
            f"resume: lfm-mlx train CONFIG --set learning_rate={_lower(learning_rate):g} "
            "--allow-config-change learning_rate")


def _lower(learning_rate: float) -> float:
    """A learning rate to suggest after non-finite steps: a tenth, or the default for an absurd one."""
    return learning_rate / 10 if 0 < learning_rate < 1 else 1e-5


@dataclass
class TrainResult:
    """What a finished run left behind."""

    run_dir: Path
    model_dir: Path
    steps: int
    skipped_steps: int
    initial_valid_loss: float | None
    final_valid_loss: float | None
    frozen_path: str
    groups: list[dict]


def steps_per_group(n_train: int, config: TrainConfig, n_groups: int) -> int:
    """Optimizer steps of every phase (see the module docstring)."""
    if isinstance(config.steps_per_group, int):
        return config.steps_per_group
    per_epoch = math.ceil(math.ceil(n_train / config.batch_size) / config.grad_accumulation)
    if config.steps_per_group == "epoch":
        return per_epoch
    return max(1, math.ceil(per_epoch / n_groups))


def lr_schedule(config: TrainConfig, steps: int) -> Callable:
    """Linear warmup then cosine decay to min_lr_ratio x learning_rate, over one phase."""
    peak = config.learning_rate
    warmup = min(config.warmup_steps, steps // 2)
    cosine = optim.cosine_decay(peak, max(steps - warmup, 1), end=peak * config.min_lr_ratio)
    if warmup == 0:
        return cosine
    ramp = optim.linear_schedule(peak / (warmup + 1), peak, warmup)
    return optim.join_schedules([ramp, cosine], [warmup])


def make_optimizer(config: TrainConfig, steps: int) -> optim.Optimizer:
    schedule = lr_schedule(config, steps)
    if config.optimizer == "adamw" and config.fused_update:
        return FusedAdamW(learning_rate=schedule, betas=config.betas, eps=config.eps,
                          weight_decay=config.weight_decay, state_bits=8 if config.optimizer_state == "int8" else 32,
                          stochastic_weights=config.master_dtype == "compute-stochastic",
                          split_master=config.master_dtype == "split")
    if config.optimizer == "adamw":
        return optim.AdamW(learning_rate=schedule, betas=list(config.betas), eps=config.eps,
                           weight_decay=config.weight_decay)
    return optim.Adafactor(learning_rate=schedule, relative_step=False, scale_parameter=False,
                           weight_decay=config.weight_decay)


class BatchStream:
    """Micro-batch m of the endless stream of shuffled passes over the training set."""

    def __init__(self, examples: list[Example], batch_size: int, seed: int, sort_by_length: bool, pad_id: int):
        self.examples, self.batch_size, self.seed = examples, batch_size, seed
        self.sort_by_length, self.pad_id = sort_by_length, pad_id
        self.lengths = [e.n_tokens for e in examples]
        self._pass, self._order = -1, []

    def indices(self, m: int) -> list[int]:
        n = math.ceil(len(self.examples) / self.batch_size)
        p, j = divmod(m, n)
        if p != self._pass:
            self._pass = p
            self._order = batch_order(self.lengths, self.batch_size, self.seed, p, self.sort_by_length)
        return self._order[j]

    def batch(self, m: int) -> Batch:
        return make_batch([self.examples[i] for i in self.indices(m)], self.pad_id)

    def row_ids(self, m: int) -> list[str]:
        return [self.examples[i].row_id for i in self.indices(m)]


def _step_seed(seed: int, step: int) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}/step/{step}".encode()).digest()[:4], "little")


def _model_fingerprint(model_dir: Path) -> dict:
    return {"config_sha256": hashlib.sha256((model_dir / "config.json").read_bytes()).hexdigest(),
            "weights": {p.name: p.stat().st_size for p in weight_files(model_dir)}}


class GroupedMoETrainer:
    """Train a mixed LFM2-MoE checkpoint group by group (see the module docstring).

    Hooks (Python API only): `memory_reader` replaces the watchdog's MLX/psutil reader;
    `grad_hook(step, grads) -> grads` sees the accumulated gradients of every step before the
    finiteness check (e.g. to inject a fault in a test).
    """

    def __init__(self, config: TrainConfig, memory_reader: Callable[[], MemoryReading] | None = None,
                 grad_hook: Callable[[int, dict], dict] | None = None, allow_config_change: tuple[str, ...] = ()):
        self.config = config
        self.allow_config_change = tuple(allow_config_change)
        self.run_dir = Path(config.run_dir)
        self.memory_reader = memory_reader
        self.grad_hook = grad_hook
        self.metrics_path = self.run_dir / "metrics.jsonl"
        self.n_records = 0
        self.optimizer: optim.Optimizer | None = None  # the active group's, fresh per group

    # ------------------------------------------------------------ bookkeeping

    def _log(self, record: dict) -> None:
        with open(self.metrics_path, "a") as handle:
            handle.write(json.dumps(record) + "\n")
        self.n_records += 1

    def _truncate_metrics(self, keep: int) -> None:
        """Keep the first `keep` records: later ones come from steps redone after the resume."""
        lines = self.metrics_path.read_text().splitlines() if self.metrics_path.exists() else []
        kept = lines[:keep]
        atomic_write_text(self.metrics_path, "".join(line + "\n" for line in kept))
        self.n_records = len(kept)

    def _checkpoint(self, state: dict, layers_done: set[int], active: list[int], start: ParkedArrays | None,
                    optimizer: optim.Optimizer | None) -> Path:
        state = {**state, "metrics_records": self.n_records}
        touched = sorted(layers_done | set(active))
        # An optimizer that never applied a step holds only its scalars (maybe a non-finite rate): nothing to keep.
        applied = optimizer is not None and not {k for k, _ in tree_flatten(optimizer.state)} <= {"step",
                                                                                                 "learning_rate"}
        return save_checkpoint(self.run_dir, state, moe_params(self.model, touched),
                               group_start=start if active else None,
                               optimizer_state=optimizer.state if applied and active else None,
                               keep=self.config.keep_checkpoints)

    # ------------------------------------------------------------ setup

    def _prepare(self, restart: bool):
        cfg = self.config
        cfg.check_paths()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.model_dir = resolve_model_path(cfg.model)
        model_config = read_config(self.model_dir)
        if model_config["model_type"] != "lfm2_moe":
            raise ConfigError(f"{self.model_dir}: model_type {model_config['model_type']!r} has no experts; "
                              "grouped training needs an LFM2-MoE model (lfm2_moe)")
        n_moe = int(model_config["num_hidden_layers"]) - int(model_config.get("num_dense_layers", 0))
        if cfg.group_size > n_moe:
            raise ConfigError(f"group_size: {cfg.group_size} is more than the {n_moe} MoE layers of {self.model_dir}; "
                              f"use group_size <= {n_moe} (group_size: {n_moe} trains them all as one group)")
        self._check_physical_memory()
        self.schedule = GroupSchedule.for_model(model_config, cfg.group_size, cfg.group_stride)
        from mlx_lm.tokenizer_utils import load as load_tokenizer  # lazy: pulls in transformers (~1 s)

        self.tokenizer = load_tokenizer(self.model_dir, eos_token_ids=model_config.get("eos_token_id"))
        self.dataset = build_dataset(cfg.data, self.tokenizer, cfg.max_tokens, tuple(cfg.splits), cfg.seed,
                                     cfg.skip_invalid)
        self.dataset.write_manifest(self.run_dir / "data_manifest.json")
        self.pad_id = int(model_config.get("pad_token_id") or 0)
        self.spg = steps_per_group(len(self.dataset.train), cfg, len(self.schedule))
        self.n_phases = cfg.epochs * len(self.schedule)
        data_fingerprint = {"sources": self.dataset.manifest["sources"],
                            "split_row_ids": self.dataset.manifest["split_row_ids"]}
        self.identity = {"model": _model_fingerprint(self.model_dir), "data": data_fingerprint}
        self.hash = config_hash({"config": cfg.training_hash_dict(), **self.identity})
        if restart:
            for old in list_checkpoints(self.run_dir):
                shutil.rmtree(old)
            self.metrics_path.unlink(missing_ok=True)
            (self.run_dir / "summary.json").unlink(missing_ok=True)
        return model_config

    def _check_physical_memory(self) -> None:
        """memory.total_gb above the machine's RAM: the hard stop would never fire before the OS kills the run."""
        import psutil

        physical = psutil.virtual_memory().total / GB
        memory = self.config.memory
        if memory.total_gb <= physical * 1.02 or memory.above_physical:  # 2%: vendors round their figures
            return
        if "total_gb" not in memory.model_fields_set:  # the 64 GB default on a smaller machine: say so, go on
            print(f"lfm-mlx train: warning: memory.total_gb defaults to {memory.total_gb:g} GB but this machine has "
                  f"{physical:.1f} GB; set memory.total_gb, soft_gb and hard_gb for it so the hard stop can fire",
                  file=sys.stderr)
            return
        raise ConfigError(
            f"memory.total_gb: {memory.total_gb:g} is above this machine's physical memory ({physical:.1f} GB "
            f"measured), so memory.hard_gb ({memory.hard_gb:g}) could never stop the run before the OS kills it; "
            f"set memory.total_gb to at most {physical:.0f} (and soft_gb < hard_gb below it), or set "
            "memory.above_physical: true to accept it")

    def _config_changes(self, resume: Checkpoint) -> dict:
        """The keys a resume changes ({key: [before, after]}) when --allow-config-change allows them
        all and nothing else (model, data, other keys) differs; else a ConfigError."""
        refused = ConfigError(
            f"{self.run_dir} holds checkpoint {resume.path.name} of a different run (config, model or data changed: "
            f"its resolved config is in {self.run_dir / 'train_config.json'}); use a new run_dir, or --restart to "
            f"discard the old checkpoints")
        before = resume.state.get("training_config")
        if before is None:  # checkpoints from before training_config was saved in them
            resolved = self.run_dir / "train_config.json"
            before = json.loads(resolved.read_text()).get("config", {}) if resolved.exists() else None
        if not isinstance(before, dict):
            raise refused
        now = self.config.training_hash_dict()
        before = {k: before.get(k) for k in now}
        if config_hash({"config": before, **self.identity}) != resume.state.get("config_hash"):
            raise refused  # the model or the data changed, or the record does not match the checkpoint
        changes = {k: [before[k], now[k]] for k in now if json.dumps(before[k]) != json.dumps(now[k])}
        allowed = set(self.allow_config_change) & set(CHANGEABLE_ON_RESUME)
        if not changes or not set(changes) <= allowed:
            listed = ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in changes.items())
            changeable = [k for k in changes if k in CHANGEABLE_ON_RESUME]
            hint = (f"; to resume with it, add --allow-config-change {' --allow-config-change '.join(changeable)}"
                    if changeable and len(changeable) == len(changes) else
                    f"; only {', '.join(CHANGEABLE_ON_RESUME)} may change on a resume (--allow-config-change KEY)")
            raise ConfigError(f"{self.run_dir} holds checkpoint {resume.path.name} of a different run ({listed})"
                              f"{hint}; or use a new run_dir, or --restart to discard the old checkpoints")
        return changes

    def _admit(self, model_config: dict, frozen: str) -> dict:
        longest = max(e.n_tokens for e in self.dataset.train) - 1
        estimate = estimate_for_config(model_config, self.config, frozen, longest,
                                       attention=self.attention["kind"])
        self.watchdog.admit(estimate)
        return estimate.to_dict()

    def _probe_attention(self, model_config: dict) -> dict:
        """Whether this backend's attention backward holds the score matrix (the estimate needs
        it: at 10K tokens that is tens of GB) or is fused; a short measurement, before any weight.
        Not measured on the CPU, whose sdpa backward always holds it (the probe takes seconds there)."""
        if mx.default_device() == mx.cpu:
            return {"kind": "materialized", "reason": "CPU backend: sdpa's backward holds the scores"}
        heads = int(model_config["num_attention_heads"])
        seq = min(1024, max(e.n_tokens for e in self.dataset.train))
        return probe_attention(heads, int(model_config["hidden_size"]) // heads, compute_dtype(model_config), seq)

    def _load_model(self, model_config: dict) -> dict:
        model, _, config = load(self.model_dir, with_tokenizer=False, return_config=True)
        if not isinstance(_ff(model, moe_layers(model)[0]).switch_mlp.gate_proj, QuantizedSwitchLinear):
            config = quantize_experts(model, config)  # a bf16 / HF model: make the int8-expert mix in memory
            mx.eval(model.parameters())
        self.model = model
        self.dtype = compute_dtype(config)
        self.master = master_of(self.config, self.dtype)
        return config

    def _choose_frozen_path(self, model_config: dict, resumed: dict | None) -> dict:
        """The recorded choice on resume (bit-exact replay); else forced, or measured."""
        cfg = self.config
        # Bit-identical either way, so a resumed run may probe again.
        # Long enough that the kernels' launch costs weigh as in a real step; capped so the probe stays short.
        seq = min(PROBE_TOKENS, max(e.n_tokens for e in self.dataset.train))
        kernels = {"dequant_kernel": probe_dequant_kernel(self.model, self.schedule.groups[0][0]),
                   "row_gather_kernel": probe_row_gather(self.model, seq)}
        if resumed is not None:
            return {"choice": resumed["frozen_path"], "reason": "recorded when the run started"} | kernels
        if cfg.frozen_path != "auto":
            return {"choice": cfg.frozen_path, "reason": "set in the config"} | kernels
        layer = self.schedule.groups[0][0]
        times = measure_frozen_paths(self.model, layer, seq, self.dtype, cfg.seed)
        choice = min(times, key=times.get)
        record = {"choice": choice, "reason": "faster forward+backward of one MoE block",
                  "seconds": times, "seq_len": seq, "layer": layer, "device": str(mx.default_device())} | kernels
        if choice != "qmm":
            try:
                record[f"estimate_{choice}"] = self._admit(model_config, choice)
            except MemoryBudgetExceeded as err:
                record.update(choice="qmm", reason=f"{choice} is faster but over budget: {str(err).splitlines()[0]}")
        return record

    # ------------------------------------------------------------ training

    def _micro_ids(self, phase: int) -> list[list[str]]:
        """Row ids of every micro-batch of a phase: the data order a checkpoint records."""
        return [self.stream.row_ids(m) for step in range(self.spg) for m in self._batches(phase, step)]

    def _batches(self, phase: int, step: int) -> list[int]:
        """Stream indices of the micro-batches of step `step` of phase `phase`."""
        acc = self.config.grad_accumulation
        first = (phase * self.spg + step) * acc
        return list(range(first, first + acc))

    def train(self, restart: bool = False) -> TrainResult:
        """Run (or resume) training; returns where the trained model is. The run directory is locked
        for the whole run: a second process on it gets DirectoryBusy."""
        self.config.check_paths()  # before the lock creates run_dir
        refuse_overlap(self.run_dir, {"model": self.config.model})  # run_dir/model would replace it
        with locked(self.run_dir):
            recover_directory(self.run_dir)  # what killed writes left: temporaries, a half-replaced model
            recover_directory(self.run_dir / CHECKPOINTS)
            return self._train(restart)

    def _train(self, restart: bool) -> TrainResult:
        cfg = self.config
        model_config = self._prepare(restart)
        summary_path = self.run_dir / "summary.json"
        if summary_path.exists():
            summary = json.loads(summary_path.read_text())
            if summary.get("config_hash") == self.hash and summary.get("complete"):
                return TrainResult(**{**summary["result"], "run_dir": self.run_dir,
                                      "model_dir": Path(summary["result"]["model_dir"])})
        self.watchdog = MemoryWatchdog(cfg.memory.budget(), cfg.memory.sample_every, reader=self.memory_reader)
        self.attention = self._probe_attention(model_config)
        admission_path = "dequant" if cfg.frozen_path == "dequant" else "qmm"
        estimate = self._admit(model_config, admission_path)

        resume, changes = None, {}
        latest = latest_checkpoint(self.run_dir)
        if latest is not None:
            resume = load_checkpoint(latest)
            if resume.state.get("config_hash") != self.hash:
                changes = self._config_changes(resume)
        model_config = self._load_model(model_config)
        frozen = self._choose_frozen_path(model_config, resume.state if resume else None)
        self.frozen = frozen["choice"]
        self.stream = BatchStream(self.dataset.train, cfg.batch_size, cfg.seed, cfg.sort_by_length, self.pad_id)
        groups = self.schedule.groups
        resolved = {
            "config": cfg.model_dump(mode="json"), "config_hash": self.hash, "model_dir": str(self.model_dir),
            "schedule": self.schedule.to_dict(), "groups": groups, "steps_per_group": self.spg,
            "phases": self.n_phases, "total_steps": self.n_phases * self.spg,
            "warmup_steps_effective": min(cfg.warmup_steps, self.spg // 2),
            "compute_dtype": str(self.dtype), "master_dtype": str(self.master), "frozen_path": frozen,
            "memory_estimate": estimate, "attention": self.attention, "train_examples": len(self.dataset.train),
            "valid_examples": len(self.dataset.valid),
        }
        atomic_write_json(self.run_dir / "train_config.json", resolved)
        atomic_write_json(self.run_dir / "frozen_path.json", frozen)

        # ---- state: fresh or restored
        state = {"phase": 0, "step_in_phase": 0, "global_step": 0, "skipped_steps": 0, "consecutive_skips": 0,
                 "tokens_seen": 0, "history": [], "initial_valid_loss": None, "layers_done": [], "config_changes": []}
        set_frozen_path(self.model, self.frozen)
        if resume is None:
            self._truncate_metrics(0)
            valid = evaluate_loss(self.model, self.dataset.valid, cfg.batch_size, self.pad_id) if (
                cfg.eval_each_group and self.dataset.valid) else None
            state["initial_valid_loss"] = valid
            self._log({"kind": "start", "step": 0, "valid_loss": valid, "frozen_path": frozen,
                       "estimate_gb": estimate["total"] / GB, "steps_per_group": self.spg,
                       "total_steps": self.n_phases * self.spg})
        else:
            state.update({k: resume.state.get(k, state[k]) for k in state})
            self._truncate_metrics(resume.state["metrics_records"])
            active = groups[state["phase"] % len(groups)] if state["step_in_phase"] else []
            done = {k: v for k, v in resume.weights.items() if _layer_of(k) not in active}
            self.model.load_weights(list(done.items()) + list(resume.group_start.items()), strict=False)
            set_frozen_path(self.model, self.frozen)
            self._log({"kind": "resume", "step": state["global_step"], "checkpoint": resume.path.name})
            if changes:  # allowed by --allow-config-change: kept in the run's history and every later checkpoint
                state["config_changes"].append({"step": state["global_step"], "checkpoint": resume.path.name,
                                                "changes": changes})
                state["consecutive_skips"] = 0
                self._log({"kind": "config_change", "step": state["global_step"], "changes": changes})

        progress = _progress(self.n_phases * self.spg, state["global_step"], cfg.progress)
        self.watchdog.start()  # the first sample counts the first step, not the model loading before it
        try:
            for phase in range(state["phase"], self.n_phases):
                self._run_phase(phase, state, resume, progress)
                resume = None
        finally:
            progress.close()
        return self._finish(state, model_config, frozen)

    def _run_phase(self, phase: int, state: dict, resume, progress) -> None:
        cfg = self.config
        groups = self.schedule.groups
        epoch, index = divmod(phase, len(groups))
        layers = groups[index]
        start = moe_params(self.model, layers)
        activate_group(self.model, layers, self.master, cfg.train_routers, lean_gradients(cfg),
                       router_master_of(cfg, self.dtype))
        optimizer = self.optimizer = make_optimizer(cfg, self.spg)
        schedule = lr_schedule(cfg, self.spg)  # the optimizer's own, to check a step's rate before applying it
        first = 0
        if resume is not None and state["step_in_phase"]:
            trained = {k: v for k, v in resume.weights.items() if _layer_of(k) in layers}
            self.model.load_weights(list(trained.items()), strict=False)
            optimizer.init(self.model.trainable_parameters())
            if not set(resume.optimizer or {}) <= {"step", "learning_rate"}:  # else no step of it was applied yet
                optimizer.state = restore_tree(optimizer.state, resume.optimizer or {}, f"{resume.path}/optimizer")
            first = state["step_in_phase"]
        mx.eval(self.model.parameters())
        # The int8 start copy waits on disk until the group ends (requantization, retention, checkpoints).
        start = park_group_start(start, cfg, self.run_dir)
        order = self._micro_ids(phase)
        if resume is not None and state["step_in_phase"] and resume.state.get("data_order") != order:
            raise ConfigError(f"{resume.path}: the data order of phase {phase} differs from the checkpoint's; "
                              "the training data or its split changed; use a new run_dir")
        loss_and_grad = make_loss_and_grad(self.model, layers[0], cfg.grad_checkpoint, cfg.stop_gradient,
                                           cfg.loss_chunk, keep_expert_activations=cfg.keep_expert_activations)
        phase_start = time.perf_counter()

        def snapshot(step_in_phase: int) -> dict:
            return {**state, "phase": phase, "step_in_phase": step_in_phase, "config_hash": self.hash,
                    "training_config": cfg.training_hash_dict(),
                    "frozen_path": self.frozen, "data_order": order, "epoch": epoch, "group": index,
                    "rng": {"rule": "mx.random.seed(sha256(f'{seed}/step/{step}')[:4]) before every step",
                            "seed": cfg.seed}}

        for step in range(first, self.spg):
            global_step = phase * self.spg + step
            mx.random.seed(_step_seed(cfg.seed, global_step))
            tick = time.perf_counter()
            micro = self._batches(phase, step)
            # Gradients of the summed loss: the division by the trained tokens happens inside the
            # update (one pass over the gradients fewer); the norm is that of the mean-loss gradients.
            loss_sum, trained, grads = accumulate_gradients(self.model, loss_and_grad,
                                                            [self.stream.batch(m) for m in micro], mean=False)
            scale = 1.0 / max(trained, 1)
            if self.grad_hook is not None:
                grads, scale = self.grad_hook(global_step, tree_map(lambda g: g * scale, grads)), 1.0
            ids = [row for m in micro for row in self.stream.row_ids(m)]
            tokens = sum(self.dataset.train[i].n_tokens - 1 for m in micro for i in self.stream.indices(m))
            norm = global_norm(grads) * scale
            loss = loss_sum / max(trained, 1)
            # The step's learning rate too: one the config would refuse (an API caller can skip
            # validation) would write non-finite or ~1e38 weights, so such a step is not applied.
            step_lr = schedule(optimizer.step).item()
            finite = math.isfinite(loss) and math.isfinite(norm) and 0 < step_lr < 1
            state["global_step"] = global_step + 1
            if not finite:
                state["skipped_steps"] += 1
                state["consecutive_skips"] += 1
                self._log({"kind": "skipped", "step": global_step + 1, "phase": phase, "row_ids": ids,
                           "loss": loss if math.isfinite(loss) else str(loss), "grad_norm": str(norm),
                           "lr": step_lr if math.isfinite(step_lr) else str(step_lr)})
                if state["consecutive_skips"] >= cfg.max_consecutive_skips:
                    self._checkpoint(snapshot(step + 1), set(state["layers_done"]), layers, start, optimizer)
                    raise NonFiniteStop(global_step + 1, state["consecutive_skips"], ids, cfg.learning_rate,
                                        f"{state['consecutive_skips']} consecutive steps had a non-finite loss or "
                                        f"gradient, or a learning rate outside (0, 1) (now {step_lr:g}); none was "
                                        "applied")
                progress.update(1)
                continue
            apply_update(self.model, optimizer, grads, cfg.grad_clip, scale=scale, norm=norm)
            del grads
            weight_norm = trained_weight_norm(self.model)
            if not math.isfinite(weight_norm):
                # The update freed the old weights as it went (memory stays flat), so it is undone by
                # stopping unsaved: the newest checkpoint keeps the last good weights.
                state["skipped_steps"] += 1
                state["consecutive_skips"] += 1
                self._log({"kind": "skipped", "step": global_step + 1, "phase": phase, "row_ids": ids, "loss": loss,
                           "grad_norm": norm, "weight_norm": str(weight_norm),
                           "reason": "after the update the trained weights are non-finite or overflow float32"})
                raise NonFiniteStop(global_step + 1, state["consecutive_skips"], ids, cfg.learning_rate,
                                    f"after the update the trained weights are non-finite or overflow float32 (norm "
                                    f"{weight_norm}, learning rate {step_lr:g}); nothing was saved")
            state["consecutive_skips"] = 0
            seconds = time.perf_counter() - tick
            state["tokens_seen"] += tokens
            stop = None
            try:
                sample = self.watchdog.check(global_step + 1)
            except MemoryHardStop as err:
                sample, stop = err.sample, err
            self._log({"kind": "step", "step": global_step + 1, "epoch": epoch, "phase": phase, "group": index,
                       "layers": layers, "loss": loss, "lr": optimizer.learning_rate.item(),
                       "grad_norm": norm, "weight_norm": weight_norm, "tokens": tokens, "trained_tokens": trained,
                       "tokens_per_s": tokens / seconds, "step_s": seconds,
                       "peak_memory_gb": (sample.peak if sample else mx.get_peak_memory()) / GB,
                       "active_memory_gb": (sample.active if sample else mx.get_active_memory()) / GB})
            progress.update(1)
            progress.set_postfix(loss=f"{loss:.4f}", group=f"{index}/{len(self.schedule)}", epoch=epoch)
            if stop is not None:  # the step is done and logged: save it, then stop before memory runs out
                self._checkpoint(snapshot(step + 1), set(state["layers_done"]), layers, start, optimizer)
                raise stop
            last = step == self.spg - 1
            if cfg.checkpoint_every and (global_step + 1) % cfg.checkpoint_every == 0 and not last:
                self._checkpoint(snapshot(step + 1), set(state["layers_done"]), layers, start, optimizer)

        def rounding_key(name: str) -> mx.array:  # per tensor and phase: a resumed run draws the same noise
            digest = hashlib.sha256(f"{cfg.seed}/{phase}/{name}".encode()).digest()
            return mx.random.key(int.from_bytes(digest[:4], "little"))

        retention = end_group(self.model, layers, start, self.frozen, optimizer,
                              rounding_key if cfg.stochastic_rounding else None)
        valid = evaluate_loss(self.model, self.dataset.valid, cfg.batch_size, self.pad_id) if (
            cfg.eval_each_group and self.dataset.valid) else None
        record = {"kind": "group_end", "step": state["global_step"], "epoch": epoch, "phase": phase,
                  "group": index, "layers": layers, "retention": retention, "valid_loss": valid,
                  "seconds": time.perf_counter() - phase_start}
        if cfg.optimizer_state == "int8":
            record["moment_kernel"] = dict(moments.KERNEL)  # how the int8 moments were packed
        elif cfg.optimizer == "adamw" and cfg.fused_update:
            record["adamw_kernel"] = {layout: dict(kernel) for layout, kernel in adamw_kernel.KERNELS.items()}
        self._log(record)
        state["history"].append({k: record[k] for k in ("phase", "group", "layers", "valid_loss", "retention")})
        state["layers_done"] = sorted(set(state["layers_done"]) | set(layers))
        state.update(phase=phase + 1, step_in_phase=0)
        self._checkpoint({**snapshot(0), "phase": phase + 1, "data_order": []}, set(state["layers_done"]), [],
                         None, None)

    def _finish(self, state: dict, model_config: dict, frozen: dict) -> TrainResult:
        out = self.run_dir / "model"
        stored = [v.size * 2 if v.dtype in (mx.float32, mx.float16, mx.bfloat16) else v.nbytes  # floats go as bf16
                  for _, v in tree_flatten(self.model.parameters())]
        check_free_space(out, sum(stored), "the trained model")
        with atomic_dir(out) as tmp:
            save_model_dir(self.model, model_config, self.model_dir, tmp)
        final = state["history"][-1]["valid_loss"] if state["history"] else None
        result = TrainResult(run_dir=self.run_dir, model_dir=out, steps=state["global_step"],
                             skipped_steps=state["skipped_steps"], initial_valid_loss=state["initial_valid_loss"],
                             final_valid_loss=final, frozen_path=self.frozen, groups=state["history"])
        record = {k: (str(v) if isinstance(v, Path) else v) for k, v in result.__dict__.items()}
        self._log({"kind": "end", "step": state["global_step"], "valid_loss": final,
                   "skipped_steps": state["skipped_steps"], "model_dir": str(out)})
        atomic_write_json(self.run_dir / "summary.json",
                          {"complete": True, "config_hash": self.hash, "result": record,
                           "config_changes": state["config_changes"],
                           "tokens_seen": state["tokens_seen"], "frozen_path": frozen})
        return result


def _progress(total: int, initial: int, enabled: bool):
    # disable=None: a bar on a terminal only; a log file gets no carriage-return refreshes
    return tqdm(total=total, initial=initial, disable=None if enabled else True, desc="train", unit="step",
                dynamic_ncols=True)


# ---------------------------------------------------------------- command line


def _parse_overrides(items: list[str]) -> dict:
    import yaml

    overrides = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: use KEY=VALUE, e.g. --set learning_rate=2e-5 "
                              "or --set memory.hard_gb=50")
        key, value = item.split("=", 1)
        overrides[key.strip()] = yaml.safe_load(value)
    return overrides


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="lfm-mlx train", description="Grouped MoE training of an LFM2-MoE mixed checkpoint from a YAML config.",
        epilog="Resumes from the newest checkpoint in run_dir when there is one. Exit codes: 0 done, "
               f"{EXIT_CONFIG} bad config or data, {EXIT_OVER_BUDGET} refused by the memory admission check, "
               f"{NonFiniteStop.exit_code} too many non-finite steps, {MemoryHardStop.exit_code} memory hard stop "
               "(checkpoint saved; resume with a smaller setting).")
    parser.add_argument("config", help="YAML file with TrainConfig keys (model, data, run_dir, ...)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key (repeatable; nested keys with dots: memory.hard_gb=50)")
    parser.add_argument("--restart", action="store_true", help="discard run_dir's checkpoints and start over")
    parser.add_argument("--allow-config-change", action="append", default=[], metavar="KEY",
                        choices=CHANGEABLE_ON_RESUME,
                        help="resume although KEY changed (repeatable; recorded in metrics.jsonl, the checkpoints "
                             f"and summary.json): {', '.join(CHANGEABLE_ON_RESUME)}")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--print-config", action="store_true", help="print the validated config and exit")
    args = parser.parse_args(argv)
    try:
        overrides = _parse_overrides(args.overrides)
        if args.no_progress:
            overrides["progress"] = False
        config = TrainConfig.from_yaml(args.config, overrides)
    except UserError as err:
        if debugging():
            raise
        print(f"lfm-mlx train: {err}", file=sys.stderr)
        return EXIT_CONFIG
    if args.print_config:
        print(json.dumps(config.model_dump(mode="json"), indent=2))
        return 0
    try:
        result = GroupedMoETrainer(config, allow_config_change=args.allow_config_change).train(restart=args.restart)
    except (UserError, FileNotFoundError) as err:  # a user's mistake: one message, exit 2
        if debugging():
            raise
        print(f"lfm-mlx train: {err}", file=sys.stderr)
        return EXIT_CONFIG
    except MemoryBudgetExceeded as err:
        print(f"lfm-mlx train: refused: {err}", file=sys.stderr)
        return EXIT_OVER_BUDGET
    except (MemoryHardStop, NonFiniteStop) as err:
        print(f"lfm-mlx train: {err}", file=sys.stderr)
        return err.exit_code
    manifest = json.loads((result.run_dir / "data_manifest.json").read_text())
    dropped = {reason: n for reason, n in manifest["dropped"].items() if n}
    rows = f"rows {manifest['kept']} of {manifest['rows_read']}" + (
        f", dropped {dropped} (run_dir/data_manifest.json lists them)" if dropped else "")
    print(f"trained model: {result.model_dir}  (steps {result.steps}, skipped {result.skipped_steps}, "
          f"valid loss {result.initial_valid_loss} -> {result.final_valid_loss}; {rows})")
    return 0


if __name__ == "__main__":
    sys.exit(main())

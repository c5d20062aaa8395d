"""Where an LFM2-MoE model's experts are: the MoE layers, their feed-forward blocks, the expert
projections' names and the parameter paths that belong to them (mlx-lm's stacked `switch_mlp` layout)."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from lfm_mlx import console

PROJECTIONS = ("gate_proj", "up_proj", "down_proj")  # the stacked experts of a `switch_mlp`
EXPERT_SUFFIXES = tuple(f"switch_mlp.{proj}" for proj in PROJECTIONS)  # their module paths end so

# How the frozen int8 experts run (README glossary: expert kernel): int8 gather_qmm, dequantized just in
# time through gather_mm, or every MoE block as padded expert blocks (`kernels.expert_blocks`).
EXPERT_KERNELS = ("qmm", "dequant", "blocks")
RENAMED_EXPERT_KERNELS = {"batched": "blocks"}  # old value -> its name now (issue 28)
EXPERT_KERNEL_DEPRECATION = ("config key 'frozen_path' is deprecated; use 'expert_kernel' (same values; "
                             "'batched' is now 'blocks')")


def expert_kernel(name: str, warn: bool = True) -> str:
    """`name` with an old spelling ("batched") mapped to today's ("blocks"), saying so once per process
    when `warn` (not for names a run recorded itself: a resumed run reads them silently)."""
    if name in RENAMED_EXPERT_KERNELS:
        if warn:
            console.deprecated("expert_kernel", f"expert kernel {name!r} is deprecated; use "
                                                f"{RENAMED_EXPERT_KERNELS[name]!r} (config key expert_kernel)")
        return RENAMED_EXPERT_KERNELS[name]
    return name


def is_expert(path: str) -> bool:
    return path.endswith(EXPERT_SUFFIXES)


def expert_layers(model: nn.Module) -> list[str]:
    """Paths of the expert projection modules of a loaded model (`moe_layers` gives layer indices)."""
    return [name for name, module in model.named_modules() if is_expert(name)]


def feed_forward(model: nn.Module, layer: int) -> nn.Module:
    return model.model.layers[layer].feed_forward


def moe_layers(model: nn.Module) -> list[int]:
    """Indices of the layers whose feed-forward is a routed MoE block."""
    return [i for i, layer in enumerate(model.model.layers) if hasattr(layer.feed_forward, "switch_mlp")]


def moe_params(model: nn.Module, layers: list[int]) -> dict[str, mx.array]:
    """Every parameter (experts, router, expert_bias) of the given layers' MoE blocks, by full name."""
    out = {}
    for i in layers:
        for name, value in tree_flatten(feed_forward(model, i).parameters()):
            out[f"model.layers.{i}.feed_forward.{name}"] = value
    return out


def layer_of(name: str) -> int:
    """The layer index of a parameter path `model.layers.N....`."""
    return int(name.split(".")[2])

"""Where an LFM2-MoE model's experts are: the MoE layers, their feed-forward blocks, the expert
projections' names and the parameter paths that belong to them (mlx-lm's stacked `switch_mlp` layout)."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

PROJECTIONS = ("gate_proj", "up_proj", "down_proj")  # the stacked experts of a `switch_mlp`
EXPERT_SUFFIXES = tuple(f"switch_mlp.{proj}" for proj in PROJECTIONS)  # their module paths end so


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

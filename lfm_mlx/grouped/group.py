"""A group's life, written once for the trainer, the sweep and the benchmark (`ActiveGroup`): its
experts dequantized and trainable, a fresh optimizer, the int8 start copy parked on disk, steps, and
the end (requantized against the start copy, retention returned)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
from mlx.utils import tree_map

from lfm_mlx.data import Batch
from lfm_mlx.grouped.config import GROUP_START, TrainConfig
from lfm_mlx.grouped.experts import activate_group, requantize_group
from lfm_mlx.grouped.optimizer import FusedAdamW, lr_schedule, make_optimizer
from lfm_mlx.grouped.step import accumulate_gradients, apply_update, global_norm, make_loss_and_grad, speculation_counts
from lfm_mlx.kernels.choices import KernelChoices
from lfm_mlx.model.moe import layer_of, moe_params
from lfm_mlx.train.checkpoint import Checkpoint, ParkedArrays, restore_tree
from lfm_mlx.train.distributed import World


def park_group_start(start: dict[str, mx.array], config: TrainConfig, directory: str | Path) -> ParkedArrays:
    """The group's int8 start copy (`moe_params` before `activate_group`), parked in
    `directory`/GROUP_START while the group trains when `offload_group_start`, else kept in memory.
    Call once the activated group is evaluated: its dequantization reads those arrays."""
    return ParkedArrays(start, Path(directory) / GROUP_START if config.offload_group_start else None)


def end_group(model: nn.Module, layers: list[int], start: ParkedArrays, frozen: str,
              optimizer: optim.Optimizer | None, stochastic_key: Callable[[str], mx.array] | None = None,
              kernels: KernelChoices | None = None) -> dict:
    """The group's end: split masters merged back into whole float32 masters, the group requantized
    from them against its start copy (`requantize_group`, whose retention it returns), the copy dropped."""
    if isinstance(optimizer, FusedAdamW):
        optimizer.merge_masters(model)
    retention = requantize_group(model, layers, start.load(), frozen, stochastic_key, kernels)
    start.discard()
    return retention


@dataclass
class StepResult:
    """One optimizer step of a group: the mean loss, the trained tokens, the norm of the mean-loss
    gradients, and whether the update was applied (`accept` may refuse it)."""

    loss: float
    loss_sum: float
    trained: int
    norm: float
    applied: bool


class ActiveGroup:
    """One group of MoE layers while it trains. Made: the start copy taken (`moe_params`), the
    group activated (`activate_group`), a fresh optimizer and learning-rate schedule for `steps`
    steps, a checkpoint's weights and optimizer state restored (`resume`), everything evaluated, the
    start copy parked in `park_dir`. Then `step()` as often as needed, and `close()` -> retention.
    `kernels`: the run's `KernelChoices` (the requantized experts' and the optimizer's kernels);
    `speculation` counts the layer walk's guessed expert-block capacities."""

    def __init__(self, model: nn.Module, layers: list[int], config: TrainConfig, steps: int, frozen: str,
                 park_dir: str | Path, compute: mx.Dtype | None = None, resume: Checkpoint | None = None,
                 kernels: KernelChoices | None = None):
        self.model, self.layers, self.config, self.frozen = model, layers, config, frozen
        self.kernels = kernels or KernelChoices()
        self.speculation = speculation_counts()
        settings = config.settings(compute or model.model.embed_tokens.weight.dtype)  # the model's compute dtype
        start = moe_params(model, layers)
        activate_group(model, layers, settings.master, config.train_routers, settings.lean_gradients,
                       settings.router_master)
        self.optimizer = make_optimizer(config, steps, self.kernels)
        self.schedule = lr_schedule(config, steps)  # the optimizer's own: a step's rate, checked before applying it
        if resume is not None:
            self._restore(resume)
        mx.eval(model.parameters())
        # The int8 start copy waits on disk until the group ends (requantization, retention, checkpoints).
        self.start = park_group_start(start, config, park_dir)
        self.loss_and_grad = make_loss_and_grad(model, layers[0], config.grad_checkpoint, config.stop_gradient,
                                                config.loss_chunk, keep_expert_activations=config.keep_expert_activations,
                                                speculation=self.speculation)

    def _restore(self, checkpoint: Checkpoint) -> None:
        """The group's trained weights and its optimizer's state from a checkpoint written mid-group."""
        trained = {k: v for k, v in checkpoint.weights.items() if layer_of(k) in self.layers}
        self.model.load_weights(list(trained.items()), strict=False)
        self.optimizer.init(self.model.trainable_parameters())
        if not set(checkpoint.optimizer or {}) <= {"step", "learning_rate"}:  # else no step of it was applied yet
            self.optimizer.state = restore_tree(self.optimizer.state, checkpoint.optimizer or {},
                                                f"{checkpoint.path}/optimizer")

    def next_learning_rate(self) -> float:
        """The learning rate the next step would apply."""
        return self.schedule(self.optimizer.step).item()

    def step(self, batches: list[Batch], mean: bool = False, grad_hook: Callable[[dict], dict] | None = None,
             accept: Callable[[float, float], bool] | None = None,
             on_phase: Callable[[str, dict | None], None] | None = None, world: World | None = None) -> StepResult:
        """One optimizer step over the micro-batches `batches`.

        `mean=False` (the trainer's): gradients of the summed loss, the division by the trained tokens
        folded into the update (one pass over the gradients fewer); `mean=True`: mean-loss gradients first.
        `grad_hook(grads) -> grads` sees the mean-loss gradients; `accept(loss, norm)` may refuse the
        update (not applied); `on_phase(name, grads)` is called after "backward" (with the gradients),
        "norm" and "update" (a reader of per-phase memory or time). With `world` (several ranks, each
        passing its slice of every micro-batch) the summed-loss gradients, loss and tokens are summed
        over the ranks before the norm: every rank clips and applies the same update."""
        loss_sum, trained, grads = accumulate_gradients(self.model, self.loss_and_grad, batches, mean=mean)
        if world is not None and world.size > 1:
            assert not mean, "ranks sum summed-loss gradients; mean=True would average means of unequal shards"
            grads = world.all_sum_tree(grads)
            loss_sum, trained = world.sum_scalars(loss_sum, trained)
            trained = int(trained)
        scale = 1.0 if mean else 1.0 / max(trained, 1)
        if on_phase is not None:
            on_phase("backward", grads)
        if grad_hook is not None:
            grads, scale = grad_hook(tree_map(lambda g: g * scale, grads)), 1.0
        norm = global_norm(grads) * scale
        loss = loss_sum / max(trained, 1)
        if on_phase is not None:
            on_phase("norm", None)
        applied = accept is None or accept(loss, norm)
        if applied:
            apply_update(self.model, self.optimizer, grads, self.config.grad_clip, scale=scale, norm=norm)
        del grads
        if on_phase is not None:
            on_phase("update", None)
        return StepResult(loss, loss_sum, trained, norm, applied)

    def close(self, stochastic_key: Callable[[str], mx.array] | None = None) -> dict:
        """The group's end (`end_group`): requantized to int8 against its start copy; returns the retention."""
        return end_group(self.model, self.layers, self.start, self.frozen, self.optimizer, stochastic_key,
                         self.kernels)

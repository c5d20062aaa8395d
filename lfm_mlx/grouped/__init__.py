"""GroupedMoETrainer: grouped semi-full-gradient training of LFM2-MoE experts and routers.

The model is a mixed checkpoint: experts int8 (affine), everything else bf16. Training walks a
`GroupSchedule` of consecutive MoE layers. For the active group the experts are dequantized into
trainable `SwitchLinear` weights (float32 master weights by default: on bf16 compute held as the
bf16 weights plus their low bits in the optimizer, `kernels.master_bits`), the group's routers are made
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

The package, one concern per module: `config` (TrainConfig and derived settings), `experts` (expert
modules, activate and requantize a group), `step` (forward, loss, the layer walk, the update),
`optimizer` (fused AdamW, schedule), `group` (ActiveGroup: a group's life from activation to
requantization), `probes` (start-up measurements), `setup` (model loading and the expert-path choice
shared with the sweep), `run` (steps, batches, results), `trainer` (GroupedMoETrainer), `cli` (main).
"""

from __future__ import annotations

from lfm_mlx.grouped.config import (
    CHANGEABLE_ON_RESUME, GROUP_START, ConfigError, MemorySettings, StepSettings, TrainConfig, estimate_for_config,
    lean_gradients, master_of, router_master_of, split_master_in_use,
)
from lfm_mlx.grouped.experts import (
    EXPERT_KERNEL_CLASSES, FROZEN_CLASSES, DequantSwitchLinear, TrainableSwitchLinear, activate_group, after, cast_keeping_gradient_dtype,
    make_quantized, requantize_group, set_expert_kernel, set_frozen_path, summarize_stats, update_stats,
)
from lfm_mlx.grouped.step import (
    accumulate_gradients, apply_update, chunked_masked_loss, evaluate_loss, forward_hidden, forward_logits,
    global_norm, make_loss_and_grad, recompute_in_backward, speculation_counts, trained_weight_norm, walk_loss_and_grad,
)
from lfm_mlx.grouped.optimizer import FusedAdamW, lr_schedule, make_optimizer
from lfm_mlx.grouped.group import ActiveGroup, StepResult, end_group, park_group_start
from lfm_mlx.grouped.probes import (
    PROBE_TOKENS, measure_expert_kernels, measure_frozen_paths, probe_attention, probe_dequant_kernel, probe_layout_kernel, probe_row_gather,
)
from lfm_mlx.grouped.setup import choose_expert_path, load_mixed_model, probe_kernels
from lfm_mlx.grouped.run import BatchStream, NonFiniteStop, TrainResult, steps_per_group
from lfm_mlx.grouped.trainer import GroupedMoETrainer
from lfm_mlx.grouped.cli import EXIT_CONFIG, EXIT_OVER_BUDGET, main
# Importable from here before the split (they live in lfm_mlx.kernels and lfm_mlx.model).
from lfm_mlx.kernels.int8_moments import pack_moment, unpack_moment
from lfm_mlx.model.moe import PROJECTIONS, moe_layers, moe_params
from lfm_mlx.model.quant import STORAGE_DTYPE, pack_codes, quantize_affine, unpack_codes

__all__ = [
    "CHANGEABLE_ON_RESUME", "GROUP_START", "ConfigError", "MemorySettings", "StepSettings", "TrainConfig",
    "estimate_for_config",
    "lean_gradients", "master_of", "router_master_of", "split_master_in_use", "EXPERT_KERNEL_CLASSES", "FROZEN_CLASSES", "PROJECTIONS",
    "STORAGE_DTYPE", "DequantSwitchLinear", "TrainableSwitchLinear", "activate_group", "after",
    "cast_keeping_gradient_dtype", "make_quantized", "moe_layers", "moe_params", "quantize_affine",
    "requantize_group", "set_expert_kernel", "set_frozen_path", "summarize_stats", "unpack_codes", "update_stats", "speculation_counts",
    "accumulate_gradients", "apply_update", "chunked_masked_loss", "evaluate_loss", "forward_hidden",
    "forward_logits", "global_norm", "make_loss_and_grad", "recompute_in_backward", "trained_weight_norm",
    "walk_loss_and_grad", "FusedAdamW", "lr_schedule", "make_optimizer", "ActiveGroup", "StepResult", "end_group",
    "park_group_start", "choose_expert_path", "load_mixed_model", "probe_kernels",
    "PROBE_TOKENS", "measure_expert_kernels", "measure_frozen_paths", "probe_attention", "probe_dequant_kernel", "probe_layout_kernel", "probe_row_gather",
    "BatchStream", "NonFiniteStop", "TrainResult", "steps_per_group", "GroupedMoETrainer", "EXIT_CONFIG",
    "EXIT_OVER_BUDGET", "main", "pack_codes", "pack_moment", "unpack_moment",
]

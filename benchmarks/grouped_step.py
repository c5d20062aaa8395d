"""One grouped MoE training step, measured beside PyTorch + transformers and mlx-lm LoRA in one run.

    python benchmarks/grouped_step.py --preset lfm2.5-8b-a1b --seq 2048 --group-size 4   # the GPU run
    python benchmarks/grouped_step.py --preset tiny-moe --seq 128 --steps 10             # CPU, CI-sized

Random weights of the preset's shapes are built in memory (no model directory), experts int8.
The MLX side is the trainer's own step (`lfm_mlx.grouped` functions) on the first group of
`--group-size` MoE layers (backward runs through every layer above it), in variants:

- `straightforward`: the step without the speed levers: a float32 master copy of the group's
  experts, mlx.optimizers.AdamW (float32 moments, separate passes for the mean, the norm and the
  clipping), full-vocabulary logits at once, per-layer gradient checkpointing as one graph, the
  experts through gather_mm dequantized by mx.dequantize;
- `default`: TrainConfig's defaults (the fused AdamW update, chunked cross-entropy);
- one variant per lever, each the default with one setting changed (see VARIANTS).
Every other variant runs the experts on the path the start-up probe picks (as the trainer does),
or on the one it names (`gather-experts`, `batched-experts`).

Each variant reports step time (median of `--steps` after `--warmup`), tokens/s, the MLX peak of
the backward and update phases, and what occupies memory (arrays by kind: measured, not
estimated). The default also gets an MFU estimate (FLOP model in `flop_model`). Then: the loss
after `--loss-steps` steps on a fixed synthetic set, straightforward against default (and the
straightforward step on another data order, for the noise); `--long-seq` tokens at group size 4
and the largest group size whose peak stays inside `--long-budget-gb`; mlx-lm's LoRA (rank 16,
every layer). Every loss curve starts from the same weights (restored before each). PyTorch runs `Lfm2MoeForCausalLM` from the same config (bf16 on CUDA, float32 on
CPU) with the experts and routers of the same layers trainable (AdamW).

Results go to `--out` (default benchmarks/results/grouped_step-PRESET-DEVICE.json), rewritten after
every part; when the environment variable OUT names a directory (the device tool), there.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import functools
import gc
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
import traceback
from dataclasses import replace
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten

import lfm_mlx.grouped as grouped
import lfm_mlx.grouped.group as grouped_group
import lfm_mlx.grouped.step as grouped_step
from lfm_mlx.kernels.choices import KernelChoices
from lfm_mlx.data import Batch, masked_loss
from lfm_mlx.fsutil import atomic_write_json
from lfm_mlx.grouped import (
    PROBE_TOKENS, ActiveGroup, StepSettings, TrainConfig, accumulate_gradients, apply_update, estimate_for_config,
    measure_frozen_paths, moe_layers, probe_dequant_kernel, probe_row_gather, set_frozen_path,
)
from lfm_mlx.mixed import parameter_bytes, quantize_experts
from lfm_mlx.model.io import build_model, cast_floats, compute_dtype
from lfm_mlx.model.synthetic import hf_config

GB = 1e9
PARKING = Path(tempfile.mkdtemp(prefix="grouped_step-"))  # where a group's start copy waits (removed after each group)
atexit.register(shutil.rmtree, PARKING, ignore_errors=True)  # and the folder with the run
SPECULATION = grouped.speculation_counts()  # over every group this benchmark ran
H100_BF16_DENSE_TFLOPS = 989.4  # NVIDIA H100 SXM datasheet, dense bf16 tensor-core peak

# name -> settings changed from TrainConfig's defaults
STRAIGHTFORWARD = dict(master_dtype="float32", fused_update=False, loss_chunk=0, offload_group_start=False)
VARIANTS: dict[str, dict] = {
    "straightforward": STRAIGHTFORWARD,
    "default": {},
    "unfused-update": dict(fused_update=False),
    "no-loss-chunk": dict(loss_chunk=0),
    "no-checkpoint": dict(grad_checkpoint=False),  # exact too; more memory
    "one-graph": {},  # the default, the step as one graph (checkpointed by recompute_in_backward), no layer walk
    "mx-checkpoint": {},  # one-graph, checkpointed with plain mx.checkpoint (see `mx_checkpointed`)
    "float32-gradients": dict(master_dtype="float32"),  # a float32 master, its gradients cast back to float32
    # A float32 master array cast to bf16 at every use (the default splits it: bf16 weights + low bits).
    "float32-master": dict(master_dtype="float32"),
    # The group's int8 start copy held in memory while it trains (the default parks it in a file).
    "start-in-memory": dict(offload_group_start=False),
    # Frozen expert blocks keep their gate/up projections from the forward pass (no recomputation).
    "keep-activations": dict(keep_expert_activations=True),
    # The expert paths, forced (the default takes the start-up probe's choice): gather_mm over
    # just-in-time dequantized experts, and padded expert blocks through batched matmuls.
    "gather-experts": dict(frozen_path="dequant"),
    "batched-experts": dict(frozen_path="batched"),
    # Other math (not defaults): a bf16 master copy; Adafactor's factored second moment.
    "master-compute": dict(master_dtype="compute"),
    "adafactor": dict(optimizer="adafactor"),
    # AdamW's moments as int8 codes (other math, its loss checked): 8 GB less at group 4, 8B shapes.
    "int8-moments": dict(optimizer_state="int8"),
    # bf16 trained copies whose updates are rounded stochastically (unbiased), alone and with int8 moments.
    "stochastic-master": dict(master_dtype="compute-stochastic"),
    "frugal": dict(master_dtype="compute-stochastic", optimizer_state="int8"),
}
OTHER_MATH = ("master-compute", "int8-moments", "stochastic-master", "frugal")  # loss curves beside the straightforward one
MID = {  # 8B widths, 4 layers (2 MoE), small vocabulary: memory and kernels at full width on a CPU
    "model_type": "lfm2_moe", "vocab_size": 8192, "hidden_size": 2048, "intermediate_size": 7168,
    "moe_intermediate_size": 1792, "num_hidden_layers": 4, "attention_layers": [2],
    "num_attention_heads": 32, "num_key_value_heads": 8, "num_dense_layers": 2, "num_experts": 32,
    "num_experts_per_tok": 4,
}


def preset_config(preset: str) -> dict:
    return hf_config(MID if preset == "mid" else preset)


def build_mlx(preset: str, seed: int) -> tuple[nn.Module, dict]:
    """The preset's mlx-lm model with random weights, compute dtype, experts int8 (group 64)."""
    mx.random.seed(seed)
    config = preset_config(preset)
    model = build_model(config)  # mlx-lm's random initialisation, still lazy
    cast_floats(model, compute_dtype(config))
    config = quantize_experts(model, config, bits=8, group_size=64)
    for layer in model.model.layers:  # materialise layer by layer: bounded transient memory
        mx.eval(layer.parameters())
    mx.eval(model.parameters())
    return model, config


def random_batch(vocab: int, batch: int, seq: int, seed: int) -> Batch:
    ids = mx.random.randint(0, vocab, (batch, seq + 1), key=mx.random.key(seed)).astype(mx.int32)
    return Batch(ids[:, :-1], ids[:, 1:], mx.ones((batch, seq), dtype=mx.bool_), [])


def mlx_sync_reset() -> None:
    mx.synchronize()
    mx.reset_peak_memory()


def tree_bytes(tree) -> int:
    return sum(v.nbytes for _, v in tree_flatten(tree) if isinstance(v, mx.array))


def model_bytes_by_kind(model: nn.Module) -> dict[str, int]:
    """Bytes of the model's arrays: int8 expert stacks (codes, scales, biases), trainable arrays
    (the group's offsets or masters, routers), embeddings, and everything else."""
    trainable = {name for name, _ in tree_flatten(model.trainable_parameters())}
    out = {"int8_experts": 0, "trainable": 0, "embeddings": 0, "other_weights": 0}
    for name, value in tree_flatten(model.parameters()):
        if name in trainable:
            out["trainable"] += value.nbytes
        elif ".switch_mlp." in name:
            out["int8_experts"] += value.nbytes
        elif "embed_tokens" in name:
            out["embeddings"] += value.nbytes
        else:
            out["other_weights"] += value.nbytes
    return out


# ---------------------------------------------------------------- FLOP model


def flop_model(config: dict, tokens: int, seq: int, first_active: int, group: list[int],
               grad_checkpoint: bool) -> dict:
    """FLOPs of one grouped step (2 per multiply-add), from the config.

    forward: every layer (conv: in_proj 3D^2 + out_proj D^2 + depthwise K*D; attention: q/o D^2,
    k/v D*kv_dim, and causal scores + values at 2*S*D per token; dense MLP 3*D*I; MoE: router D*E
    and k experts of 3*D*M) plus the tied LM head D*V. Backward: input gradients through every layer
    from the first active one up and the head (as many FLOPs as their forward); weight gradients
    for the group's experts (k per token) and routers only. `model` counts those; `hardware` adds
    the forward recomputed by per-layer checkpointing (the LM head chunks' recompute is left out)."""
    D, M, E, k, V = (config[key] for key in ("hidden_size", "moe_intermediate_size", "num_experts",
                                              "num_experts_per_tok", "vocab_size"))
    I, K = config["intermediate_size"], config.get("conv_L_cache", 3)
    heads, kv = config["num_attention_heads"], config["num_key_value_heads"]
    kv_dim = D // heads * kv
    attention = [i for i, kind in enumerate(config["layer_types"]) if kind == "full_attention"]
    per_layer = []
    for i in range(config["num_hidden_layers"]):
        if i in attention:
            mixer = 2 * (2 * D * D + 2 * D * kv_dim) + 2 * seq * D
        else:
            mixer = 2 * (4 * D * D + K * D)
        ffn = 2 * 3 * D * I if i < config["num_dense_layers"] else 2 * (D * E + k * 3 * D * M)
        per_layer.append((mixer + ffn) * tokens)
    head = 2 * D * V * tokens
    forward = sum(per_layer) + head
    window = sum(per_layer[first_active:])
    weight_grads = len(group) * 2 * (k * 3 * D * M + D * E) * tokens
    model = forward + window + head + weight_grads
    return {"forward": forward, "input_grads": window + head, "weight_grads": weight_grads, "model": model,
            "recompute": window if grad_checkpoint else 0, "hardware": model + (window if grad_checkpoint else 0)}


def mfu(flops: dict, step_s: float, peak_tflops: float) -> dict:
    return {"model_tflops_per_s": flops["model"] / step_s / 1e12,
            "mfu": flops["model"] / step_s / (peak_tflops * 1e12),
            "hfu": flops["hardware"] / step_s / (peak_tflops * 1e12), "peak_tflops": peak_tflops}


# ---------------------------------------------------------------- MLX variants


def train_config(changes: dict, steps: int, lr: float = 1e-5) -> TrainConfig:
    return TrainConfig(model="-", data=["-"], run_dir="-", learning_rate=lr, warmup_steps=0,
                       steps_per_group=steps, **changes)


class GroupStep:
    """The trainer's step on one group (`ActiveGroup`): activate, step (timed, memory by phase), requantize."""

    def __init__(self, model: nn.Module, layers: list[int], cfg: TrainConfig, path: str, steps: int,
                 kernels: KernelChoices, straightforward: bool = False):
        self.model, self.straightforward = model, straightforward
        # The straightforward step dequantizes by mx.dequantize (the kernel is a lever).
        kernels = replace(kernels, dequant=False) if straightforward else kernels
        set_frozen_path(model, path, kernels=kernels)
        tick = time.perf_counter()
        # As the trainer: the group's int8 start copy waits in a file (offload_group_start).
        self.group = ActiveGroup(model, layers, cfg, steps, path, PARKING, kernels=kernels)
        self.activate_s = time.perf_counter() - tick
        self.optimizer = self.group.optimizer
        self.phases: dict = {}

    def step(self, batch: Batch) -> float:
        """One optimizer step; records the backward and update peaks and the gradients' bytes.
        Straightforward: mean gradients first, as the trainer ran it before; else summed-loss
        gradients with 1 / tokens folded into the update, as the trainer runs it now."""
        mlx_sync_reset()
        ticks = [time.perf_counter()]  # each phase ends in a host read or an evaluation: wall time is device time
        seen = {}

        def on_phase(name: str, grads) -> None:
            if name == "backward":  # read before the update: a fused update consumes the gradients
                seen.update(backward=mx.get_peak_memory(), grad_bytes=tree_bytes(grads))
            ticks.append(time.perf_counter())
            if name == "norm":
                mx.reset_peak_memory()

        result = self.group.step([batch], mean=self.straightforward, on_phase=on_phase)
        update = mx.get_peak_memory()
        self.phases = {"backward_peak": seen["backward"], "update_peak": update, "gradients": seen["grad_bytes"],
                       "grad_norm": result.norm,
                       "seconds": dict(zip(("gradients", "norm", "update"), np.diff(ticks).tolist()))}
        return result.loss_sum / result.trained

    def finish(self) -> dict:
        tick = time.perf_counter()
        for name, count in self.group.speculation.items():  # forward passes on guessed capacities, redone
            SPECULATION[name] += count
        retention = self.group.close()
        out = {"activate_s": self.activate_s, "requantize_s": time.perf_counter() - tick,
               "retention": retention["experts"]["retention"]}
        del self.optimizer, self.group
        gc.collect()
        mx.clear_cache()
        return out


def memory_breakdown(model: nn.Module, optimizer: optim.Optimizer, phases: dict) -> dict:
    """What occupies memory at each phase's peak: arrays held for the whole step (by kind, their
    bytes), the gradients (held from the end of the backward pass through the update), and the
    rest of the peak (activations, logits, dequantized stacks, update temporaries)."""
    kinds = model_bytes_by_kind(model)
    state = tree_bytes(optimizer.state)
    held = sum(kinds.values()) + state
    backward = phases["backward_peak"]
    update = phases["update_peak"]
    grads = phases["gradients"]
    table = {**{k: v / GB for k, v in kinds.items()}, "optimizer_state": state / GB,
             "gradients": grads / GB,
             "backward_transient (activations, logits, dequantized experts; gradients as they appear)":
                 (backward - held) / GB,
             "update_transient (new weights and moments, float32 temporaries)": (update - held - grads) / GB}
    return {"gb": table, "held_gb": held / GB, "backward_peak_gb": backward / GB, "update_peak_gb": update / GB,
            "peak_phase": "backward" if backward >= update else "update"}


def mx_checkpointed(layer: nn.Module, h: mx.array, mask) -> mx.array:
    """The trainer's per-layer checkpoint before `grouped.recompute_in_backward`: mx.checkpoint."""
    def run(params, x):
        layer.update(params)
        return layer(x, mask)

    return mx.checkpoint(run)(layer.trainable_parameters(), h)


@contextlib.contextmanager
def swapped(module, attribute: str, replacement):
    """`module.attribute` replaced for the duration (a lever swapped back for its predecessor)."""
    kept = getattr(module, attribute)
    setattr(module, attribute, replacement)
    try:
        yield
    finally:
        setattr(module, attribute, kept)


# variant -> (module, attribute, replacement): the default with one piece swapped back
ONE_GRAPH = (grouped_group, "make_loss_and_grad", functools.partial(grouped.make_loss_and_grad, walk=False))
# The straightforward step also runs its experts the plain way: gather_mm over experts dequantized
# by mx.dequantize (the padded expert blocks and the dequantization kernel are levers).
STRAIGHTFORWARD_PATH = "dequant"
SWAPS = {
    "straightforward": [ONE_GRAPH],
    "one-graph": [ONE_GRAPH],
    "mx-checkpoint": [ONE_GRAPH, (grouped_step, "_checkpointed", mx_checkpointed)],
    "float32-gradients": [(StepSettings, "lean_gradients", property(lambda settings: False))],
}


def run_variant(model: nn.Module, layers: list[int], batch: Batch, args, name: str, changes: dict, path: str,
                flops: dict | None) -> dict:
    with contextlib.ExitStack() as stack:
        for module, attribute, replacement in SWAPS.get(name, []):
            stack.enter_context(swapped(module, attribute, replacement))
        return _run_variant(model, layers, batch, args, name, changes, path, flops)


def _run_variant(model: nn.Module, layers: list[int], batch: Batch, args, name: str, changes: dict, path: str,
                 flops: dict | None) -> dict:
    cfg = train_config(changes, args.warmup + args.steps)
    runner = GroupStep(model, layers, cfg, path, args.warmup + args.steps, args.kernels,
                       straightforward=name == "straightforward")
    losses, times, phases = [], [], []
    for i in range(args.warmup + args.steps):
        tick = time.perf_counter()
        losses.append(runner.step(batch))
        if i >= args.warmup:
            times.append(time.perf_counter() - tick)
            phases.append(runner.phases["seconds"])
    result = {"step_s": statistics.median(times), "step_s_all": times,
              "phase_s": {name: statistics.median(p[name] for p in phases) for name in phases[0]},
              "loss_first": losses[0],
              "loss_last": losses[-1], "expert_path": path,
              "settings": {k: v for k, v in cfg.model_dump().items()
                           if k in ("master_dtype", "optimizer", "fused_update", "loss_chunk",
                                    "grad_checkpoint", "optimizer_state", "keep_expert_activations",
                                    "offload_group_start")},
              "peak_memory_gb": max(runner.phases["backward_peak"], runner.phases["update_peak"]) / GB,
              "memory": memory_breakdown(model, runner.optimizer, runner.phases)}
    result["tokens_per_s"] = batch.inputs.size / result["step_s"]
    if flops is not None:
        result["flops"] = flop_model(preset_config(args.preset), batch.inputs.size, batch.inputs.shape[1],
                                     layers[0], layers, cfg.grad_checkpoint)
        result["mfu"] = mfu(result["flops"], result["step_s"], args.peak_tflops)
    estimate = estimate_for_config(args.mixed_config, cfg, path, batch.inputs.shape[1], len(layers),
                                   attention=args.attention)
    result["estimate_gb"] = {k: v / GB for k, v in estimate.components().items()}
    result["estimate_total_gb"] = estimate.total / GB
    result.update(runner.finish())
    return result


# ---------------------------------------------------------------- loss after N steps


def loss_curve(model: nn.Module, layers: list[int], batches: list[Batch], changes: dict, path: str, steps: int,
               order: list[int], lr: float, start: dict, kernels: KernelChoices) -> dict:
    """From the weights `start` (name -> array), `steps` steps cycling over `batches` in `order`;
    the mean loss over all batches afterwards."""
    model.update(tree_unflatten(list(start.items())))  # every curve from the same weights
    cfg = train_config(changes, steps, lr)
    straightforward = changes is STRAIGHTFORWARD
    with contextlib.ExitStack() as stack:
        for module, attribute, replacement in SWAPS["straightforward"] if straightforward else []:
            stack.enter_context(swapped(module, attribute, replacement))
        runner = GroupStep(model, layers, cfg, STRAIGHTFORWARD_PATH if straightforward else path, steps, kernels,
                           straightforward=straightforward)
        losses = [runner.step(batches[order[s % len(order)]]) for s in range(steps)]
    total, count = 0.0, 0
    for batch in batches:  # the trained model, before requantization (as the step sees it)
        loss, n = masked_loss(model(batch.inputs), batch.targets, batch.loss_mask)
        total, count = total + loss.item(), count + n.item()
    runner.finish()
    return {"final_loss": total / count, "step_losses": losses, "order": order}


def loss_comparison(model, layers, dtype, args, path: str) -> dict:
    """Straightforward against default from the same weights, with yardsticks: the straightforward
    step again (the backend's run-to-run nondeterminism) and on another data order (noise), and
    with a 10% higher learning rate (a change of the math the comparison must be able to see)."""
    vocab = model.model.embed_tokens.weight.shape[0]
    batches = [random_batch(vocab, args.batch, args.seq, 1000 + i) for i in range(args.loss_batches)]
    order_a = list(range(args.loss_batches))
    order_b = order_a[::-1]
    start = dict(tree_flatten(model.parameters()))  # the same arrays: no copy
    runs = {"straightforward": (STRAIGHTFORWARD, order_a, args.loss_lr), "default": ({}, order_a, args.loss_lr),
            **{name: (VARIANTS[name], order_a, args.loss_lr) for name in OTHER_MATH},
            "straightforward_again": (STRAIGHTFORWARD, order_a, args.loss_lr),
            "straightforward_other_order": (STRAIGHTFORWARD, order_b, args.loss_lr),
            "straightforward_lr_plus_10pct": (STRAIGHTFORWARD, order_a, 1.1 * args.loss_lr)}
    out = {"steps": args.loss_steps, "batches": args.loss_batches, "learning_rate": args.loss_lr, "expert_path": path}
    for name, (changes, order, lr) in runs.items():
        out[name] = loss_curve(model, layers, batches, changes, path, args.loss_steps, order, lr, start, args.kernels)
    model.update(tree_unflatten(list(start.items())))
    a, b = out["straightforward"]["final_loss"], out["default"]["final_loss"]
    repeat = abs(out["straightforward_again"]["final_loss"] - a)
    noise = max(repeat, abs(out["straightforward_other_order"]["final_loss"] - a))
    lr_effect = abs(out["straightforward_lr_plus_10pct"]["final_loss"] - a)
    out["other_math"] = {name: {"difference": out[name]["final_loss"] - a,
                                "within_noise": abs(out[name]["final_loss"] - a) <= noise} for name in OTHER_MATH}
    out.update(difference=b - a, relative_difference=(b - a) / a, repeat_noise=repeat, noise=noise,
               lr_10pct_effect=lr_effect,
               within_noise=abs(b - a) <= noise, below_lr_effect=abs(b - a) < lr_effect)
    return out


# ---------------------------------------------------------------- long sequences


def long_sequence(model, args, default_path: str) -> dict:
    """The default step at `--long-seq` tokens: group size 4, then the largest group size whose
    measured peak stays inside `--long-budget-gb` (the estimate, scaled by group 4's measured over
    estimated peak, proposes the size; measured sizes move it)."""
    vocab = model.model.embed_tokens.weight.shape[0]
    batch = random_batch(vocab, 1, args.long_seq, 7)
    moe = moe_layers(model)
    cfg = train_config({}, 2)
    out = {"seq": args.long_seq, "budget_gb": args.long_budget_gb, "sizes": {}}

    def measure(size: int) -> dict:
        layers = moe[:size]
        runner = GroupStep(model, layers, cfg, default_path, 2, args.kernels)
        times = []
        for _ in range(2):
            tick = time.perf_counter()
            runner.step(batch)
            times.append(time.perf_counter() - tick)
        peak = max(runner.phases["backward_peak"], runner.phases["update_peak"]) / GB
        estimate = estimate_for_config(args.mixed_config, cfg, default_path, args.long_seq, size,
                                       attention=args.attention).total / GB
        record = {"peak_memory_gb": peak, "step_s": times[-1], "tokens_per_s": args.long_seq / times[-1],
                  "estimate_gb": estimate, "fits": peak <= args.long_budget_gb,
                  "memory": memory_breakdown(model, runner.optimizer, runner.phases)}
        runner.finish()
        out["sizes"][str(size)] = record
        return record

    base = measure(args.group_size)
    ratio = base["peak_memory_gb"] / base["estimate_gb"]
    fits = [size for size in range(1, len(moe) + 1)
            if estimate_for_config(args.mixed_config, cfg, default_path, args.long_seq, size,
                                   attention=args.attention).total / GB * ratio
            <= args.long_budget_gb * 0.97]
    size = max(fits) if fits else 1
    best = args.group_size if base["fits"] else None
    for _ in range(5):  # at most five more measurements
        if size < 1 or str(size) in out["sizes"]:
            break
        record = measure(size)
        if record["fits"]:
            best = max(best or 0, size)
            if size == len(moe):
                break
            size += 1
        else:
            size -= 1
    out["largest_group_inside_budget"] = best
    out["estimate_ratio_at_group"] = {"size": args.group_size, "measured_over_estimated": ratio}
    return out


# ---------------------------------------------------------------- baselines


def timed_steps(step, n_warmup: int, n_steps: int, peak_reset, peak_read) -> dict:
    losses, times = [], []
    for i in range(n_warmup + n_steps):
        if i == n_warmup:
            peak_reset()
        start = time.perf_counter()
        losses.append(step())
        if i >= n_warmup:
            times.append(time.perf_counter() - start)
    return {"step_s": statistics.median(times), "step_s_all": times, "peak_memory_gb": peak_read(),
            "loss_first": losses[0], "loss_last": losses[-1]}


def run_lora(model: nn.Module, batch: Batch, args) -> dict:
    """mlx-lm's LoRA (rank 16 on every linear / expert layer of every block), AdamW, on the same model."""
    from mlx_lm.tuner.utils import linear_to_lora_layers

    set_frozen_path(model, "qmm")  # LoRASwitchLinear wraps mlx-lm's own QuantizedSwitchLinear and SwitchGLU
    model.freeze()
    linear_to_lora_layers(model, len(model.model.layers), {"rank": 16, "scale": 20.0, "dropout": 0.0})
    mx.eval(model.parameters())
    trainable = sum(v.size for _, v in tree_flatten(model.trainable_parameters()))
    loss_and_grad = nn.value_and_grad(model, lambda m, x, t, k: masked_loss(m(x), t, k))
    opt = optim.AdamW(learning_rate=1e-5, weight_decay=0.0)

    def step() -> float:
        loss_sum, trained, grads = accumulate_gradients(model, loss_and_grad, [batch])
        apply_update(model, opt, grads, 1.0)
        return loss_sum / trained

    result = timed_steps(step, args.warmup, args.steps, mlx_sync_reset, lambda: mx.get_peak_memory() / GB)
    result["trainable_parameters"] = trainable
    result["tokens_per_s"] = batch.inputs.size / result["step_s"]
    return result


def run_torch(config: dict, layers: list[int], args) -> dict:
    """transformers' Lfm2MoeForCausalLM, experts + routers of `layers` trainable, AdamW."""
    import torch
    import transformers
    from transformers import Lfm2MoeConfig, Lfm2MoeForCausalLM

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32  # float32 on CPU, as MLX there
    torch.manual_seed(args.seed)
    keys = {k: v for k, v in config.items() if k not in ("architectures", "torch_dtype", "quantization",
                                                           "quantization_config", "model_type")}
    hf = Lfm2MoeConfig(**keys)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = Lfm2MoeForCausalLM(hf)
    finally:
        torch.set_default_dtype(default)
    model.to(dtype)
    model.train()
    prefixes = tuple(f"model.layers.{i}.feed_forward." for i in layers)
    params = []
    for name, p in model.named_parameters():
        p.requires_grad_(name.startswith(prefixes))
        if p.requires_grad:
            params.append(p)
    opt = torch.optim.AdamW(params, lr=1e-5, weight_decay=0.0)
    ids = torch.randint(0, hf.vocab_size, (args.batch, args.seq), device=device)

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    def step() -> float:
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync()
        return out.loss.item()

    def reset():
        sync()
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()

    def read():
        return torch.cuda.max_memory_allocated() / GB if device == "cuda" else None

    result = timed_steps(step, args.warmup, args.steps, reset, read)
    result.update(device=device, dtype=str(dtype), torch=torch.__version__, transformers=transformers.__version__,
                  trainable_parameters=sum(p.numel() for p in params),
                  experts_implementation=getattr(model.config, "_experts_implementation", None),
                  attn_implementation=getattr(model.config, "_attn_implementation", None),
                  gpu=torch.cuda.get_device_name() if device == "cuda" else None)
    result["tokens_per_s"] = args.batch * args.seq / result["step_s"]
    return result


def release_torch_memory() -> None:
    """After run_torch has returned (its model and optimizer gone with its frame): hand PyTorch's
    cached GPU memory back, so that MLX's runs get the whole GPU."""
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ---------------------------------------------------------------- driver


def _section(results: dict, name: str, out: Path, fn, *args):
    """Run one part; on failure keep its error in the results and go on (one try on the GPU box)."""
    print(f"[grouped_step] {name} ...", flush=True)
    tick = time.perf_counter()
    try:
        results[name] = fn(*args)
    except Exception as err:  # a part's failure must not lose the other numbers
        results[name] = {"error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc()[-3000:]}
    if isinstance(results[name], dict):
        results[name]["section_s"] = time.perf_counter() - tick
    atomic_write_json(out, results)
    return results[name]


def print_table(results: dict, variants: list[str], baselines: list[str]) -> None:
    print(f"\n{'run':<24}{'step s':>9}{'tokens/s':>10}{'peak GB':>9}{'vs torch':>10}")
    torch_tps = results.get("torch", {}).get("tokens_per_s")
    rows = [(f"mlx {v}", results["mlx"].get(v, {})) for v in variants] + [(b, results.get(b, {})) for b in baselines]
    for name, part in rows:
        if "step_s" not in part:
            print(f"{name:<24}  {str(part.get('error', part.get('skipped', 'not run')))[:80]}")
            continue
        peak = part.get("peak_memory_gb")
        ratio = f"{part['tokens_per_s'] / torch_tps:.2f}x" if torch_tps else "-"
        print(f"{name:<24}{part['step_s']:>9.3f}{part['tokens_per_s']:>10.0f}"
              f"{'n/a' if peak is None else f'{peak:.2f}':>9}{ratio:>10}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="lfm2.5-8b-a1b", choices=["lfm2.5-8b-a1b", "tiny-moe", "mid"])
    parser.add_argument("--seq", type=int, default=None, help="tokens per sequence (2048 for 8B, 128 for tiny)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--group-size", type=int, default=4)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per measurement")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--variants", default="all", help=f"comma list of {','.join(VARIANTS)} or 'all'")
    parser.add_argument("--baselines", default="torch,lora", help="comma list of torch, lora (or 'none')")
    parser.add_argument("--loss-steps", type=int, default=50, help="steps of the loss comparison (0: skip)")
    parser.add_argument("--loss-batches", type=int, default=4)
    parser.add_argument("--loss-lr", type=float, default=1e-5)
    parser.add_argument("--long-seq", type=int, default=0, help="tokens of the long-sequence part (0: skip)")
    parser.add_argument("--long-budget-gb", type=float, default=60.0)
    parser.add_argument("--peak-tflops", type=float, default=H100_BF16_DENSE_TFLOPS,
                        help="the accelerator's dense bf16 peak for MFU (default: H100 SXM datasheet)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", help="result JSON (default benchmarks/results/grouped_step-PRESET-DEVICE.json)")
    args = parser.parse_args(argv)
    args.seq = args.seq or (2048 if args.preset == "lfm2.5-8b-a1b" else 128)
    variants = list(VARIANTS) if args.variants == "all" else [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        parser.error(f"unknown variants {unknown}; choose from {', '.join(VARIANTS)}")
    baselines = [] if args.baselines == "none" else [b.strip() for b in args.baselines.split(",") if b.strip()]

    device = "gpu" if mx.default_device() == mx.gpu else "cpu"
    name = f"grouped_step-{args.preset}-{device}.json"
    out = Path(args.out or Path(__file__).parent / "results" / name)
    if not args.out and os.environ.get("OUT") and Path(os.environ["OUT"]).is_dir():  # the device tool's folder
        out = Path(os.environ["OUT"]) / name
    results: dict = {
        "benchmark": "grouped_step", "preset": args.preset, "seq": args.seq, "batch": args.batch,
        "group_size": args.group_size, "steps": args.steps, "warmup": args.warmup,
        "tokens_per_step": args.seq * args.batch, "mlx_device": str(mx.default_device()),
        "mlx_version": mx.__version__, "python": sys.version.split()[0], "machine": platform.machine(),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S"), "command": " ".join(sys.argv),
        "variants_defined": VARIANTS,
    }
    config = preset_config(args.preset)
    first_moe = config["num_dense_layers"]
    layers = list(range(first_moe, min(first_moe + args.group_size, config["num_hidden_layers"])))
    results["group_layers"] = layers

    if "torch" in baselines:  # first, so MLX's buffer cache cannot crowd it out
        _section(results, "torch", out, run_torch, config, layers, args)
        release_torch_memory()

    from lfm_mlx.grouped import probe_attention  # what the trainer's admission measures

    heads = config["num_attention_heads"]
    results["attention"] = probe_attention(heads, config["hidden_size"] // heads, compute_dtype(config),
                                           min(1024, args.seq))
    args.attention = results["attention"]["kind"]
    tick = time.perf_counter()
    model, mixed = build_mlx(args.preset, args.seed)
    args.mixed_config = mixed
    dtype = compute_dtype(mixed)
    results.update(mlx_build_s=time.perf_counter() - tick, mlx_model_gb=parameter_bytes(model) / GB,
                   compute_dtype=str(dtype))
    batch = random_batch(config["vocab_size"], args.batch, args.seq, args.seed)
    mx.eval(batch.inputs, batch.targets)

    # What the trainer does at start-up (PROBE_TOKENS, or fewer), and the same at the full length.
    probe_len = min(PROBE_TOKENS, args.seq)
    results["dequant_kernel"] = probe_dequant_kernel(model, layers[0])
    results["row_gather_kernel"] = probe_row_gather(model, args.seq)
    args.kernels = KernelChoices.from_records(results)  # the run's kernels, as the trainer's
    probe = _section(results, "expert_path_probe", out, lambda: {
        "seq_len": probe_len, "seconds": measure_frozen_paths(model, layers[0], probe_len, dtype, args.seed,
                                                                   args.kernels)})
    _section(results, "block_timings_full_seq", out, lambda: {
        f"{k}_ms": v * 1000 for k, v in measure_frozen_paths(model, moe_layers(model)[-1], args.seq, dtype,
                                                                   kernels=args.kernels).items()})
    seconds = probe.get("seconds", {"qmm": 1.0})
    chosen = min(seconds, key=seconds.get)
    results["expert_path_choice"] = chosen

    results["mlx"] = {}
    for name in variants:
        changes = VARIANTS[name]
        path = STRAIGHTFORWARD_PATH if name == "straightforward" else changes.get("frozen_path", chosen)
        print(f"[grouped_step] mlx {name} ({path}) ...", flush=True)
        try:
            results["mlx"][name] = run_variant(model, layers, batch, args, name, changes, path,
                                               flops=True if name in ("default", "straightforward") else None)
        except Exception as err:  # keep the other variants' numbers
            results["mlx"][name] = {"error": f"{type(err).__name__}: {err}",
                                    "traceback": traceback.format_exc()[-3000:]}
            gc.collect()
            mx.clear_cache()
        atomic_write_json(out, results)

    results["speculated_capacities"] = dict(SPECULATION)  # forward passes on guessed capacities, redone
    results["moment_kernel"] = dict(args.kernels.update.moments)  # decided at the int8 moments' first update, if any ran
    results["adamw_kernel"] = {layout: dict(record) for layout, record in args.kernels.update.adamw.items()}  # per layout
    if args.loss_steps:
        _section(results, "loss_comparison", out, loss_comparison, model, layers, dtype, args, chosen)
    if args.long_seq:
        _section(results, "long_sequence", out, long_sequence, model, args, chosen)
    if "lora" in baselines:  # last: it rewrites the model's layers
        _section(results, "lora", out, run_lora, model, batch, args)

    ours = results["mlx"].get("default", {})
    ratios = {}
    for mine in ("default", "int8-moments", "frugal"):
        measured = results["mlx"].get(mine, {})
        for base in baselines + ["straightforward"]:
            theirs = results["mlx"].get(base, {}) if base == "straightforward" else results.get(base, {})
            if "tokens_per_s" in measured and "tokens_per_s" in theirs:
                ratios[f"mlx_{mine}_vs_{base}_tokens_per_s"] = measured["tokens_per_s"] / theirs["tokens_per_s"]
                if measured.get("peak_memory_gb") and theirs.get("peak_memory_gb"):
                    ratios[f"mlx_{mine}_vs_{base}_peak_memory"] = measured["peak_memory_gb"] / theirs["peak_memory_gb"]
    if "torch" in results and "step_s" in results["torch"] and "flops" in ours:
        results["torch"]["mfu"] = mfu(ours["flops"] | {"hardware": ours["flops"]["model"]},
                                      results["torch"]["step_s"], args.peak_tflops)
    results["ratios"] = ratios
    results["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S")
    atomic_write_json(out, results)
    print_table(results, variants, baselines)
    print(json.dumps(ratios, indent=2))
    if "loss_comparison" in results and "difference" in results["loss_comparison"]:
        lc = results["loss_comparison"]
        print(f"loss after {lc['steps']} steps: straightforward {lc['straightforward']['final_loss']:.4f}, default "
              f"{lc['default']['final_loss']:.4f}, again {lc['straightforward_again']['final_loss']:.4f}, "
              f"other order {lc['straightforward_other_order']['final_loss']:.4f}, "
              f"lr +10% {lc['straightforward_lr_plus_10pct']['final_loss']:.4f}, "
              + ", ".join(f"{name} {lc[name]['final_loss']:.4f}" for name in OTHER_MATH))
    if "long_sequence" in results and "sizes" in results["long_sequence"]:
        ls = results["long_sequence"]
        print(f"{ls['seq']} tokens: " + ", ".join(f"group {k}: {v['peak_memory_gb']:.1f} GB"
                                                 for k, v in ls["sizes"].items())
              + f"; largest inside {ls['budget_gb']} GB: {ls.get('largest_group_inside_budget')}")
    print(f"results: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

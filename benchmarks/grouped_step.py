"""One grouped MoE training step, measured beside PyTorch + transformers and mlx-lm LoRA in one run.

    python benchmarks/grouped_step.py --preset lfm2.5-8b-a1b --seq 2048 --group-size 4   # the GPU run
    python benchmarks/grouped_step.py --preset tiny-moe --seq 128 --steps 10             # CPU, CI-sized
    bash benchmarks/grouped_step_gpu.sh speed|frugal                                     # issue 32's GPU runs

Random weights of the preset's shapes are built in memory (no model directory), experts int8.
The MLX side is the trainer's own step (`lfm_mlx.grouped` functions) on the first group of
`--group-size` MoE layers (backward runs through every layer above it), in variants:

- `straightforward`: the step without the speed levers: a float32 master copy of the group's
  experts, mlx.optimizers.AdamW (float32 moments, separate passes for the mean, the norm and the
  clipping), full-vocabulary logits at once, per-layer gradient checkpointing as one graph, the
  experts through gather_mm dequantized by mx.dequantize;
- `default`: TrainConfig's defaults (the fused AdamW update, chunked cross-entropy);
- one variant per lever, each the default with one setting changed (see VARIANTS); `frugal` is
  TrainConfig's `memory_preset: frugal`, timed at the preset's own group size.
Every other variant runs the experts on the path the start-up probe picks (as the trainer does),
or on the one it names (`gather-experts`, `batched-experts` (the blocks kernel), or `--expert-kernel`).

Each variant reports step time (median of `--steps` after `--warmup`), tokens/s, the MLX peak of
the backward and update phases, and what occupies memory (arrays by kind: measured, not
estimated). The default also gets an MFU estimate (FLOP model in `flop_model`, the peak assumed in
`peak_flops_assumed`) and a profile of where its step's time goes (`profile_step`: an isolated-part
estimate by layer kind, against the measured step); the plain PyTorch baseline's first run times
the same feed-forward parts on transformers' modules (`torch_ffn_parts`), so each part has its peer. `--repeats N` then runs N interleaved rounds of
the default and every PyTorch baseline (`repeats`: each run, medians and spreads; `ratios`: paired
by round). Then: the loss after `--loss-steps` steps on a fixed synthetic set, the reference
(`--loss-reference`) against the default and `--loss-variants` (and the reference on another data
order and again, for the noise); at `--long-seq` tokens the largest group size whose peak stays
inside each of `--long-budget-gb` for each of `--long-variants`; mlx-lm's LoRA (rank 16, every
layer). Every loss curve starts from the same weights (restored before each).

PyTorch runs `Lfm2MoeForCausalLM` from the same config (bf16 on CUDA, float32 on CPU) with the
experts and routers of the same layers trainable, as `torch` (AdamW, bf16 moments), `torch-fused`
(AdamW(fused=True)) and `torch-fp32-master` (float32 masters and moments: our default's math).

Results go to `--out` (default benchmarks/results/grouped_step-PRESET-DEVICE[-TAG].json), rewritten
after every part; when the environment variable OUT names a directory (the device tool), there.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import functools
import gc
import importlib.util
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
from mlx_lm.models.base import create_attention_mask, create_ssm_mask

import lfm_mlx.grouped as grouped
import lfm_mlx.grouped.group as grouped_group
import lfm_mlx.grouped.step as grouped_step
from lfm_mlx.kernels.choices import KernelChoices
from lfm_mlx.data import Batch, masked_loss
from lfm_mlx.fsutil import atomic_write_json
from lfm_mlx.grouped import (
    PROBE_TOKENS, ActiveGroup, StepSettings, TrainConfig, accumulate_gradients, apply_update, estimate_for_config,
    measure_expert_kernels, moe_layers, probe_dequant_kernel, probe_layout_kernel, probe_row_gather,
    set_expert_kernel,
)
from lfm_mlx.mixed import parameter_bytes, quantize_experts
from lfm_mlx.model.io import build_model, cast_floats, compute_dtype
from lfm_mlx.model.synthetic import hf_config

GB = 1e9
PARKING = Path(tempfile.mkdtemp(prefix="grouped_step-"))  # where a group's start copy waits (removed after each group)
atexit.register(shutil.rmtree, PARKING, ignore_errors=True)  # and the folder with the run
SPECULATION = grouped.speculation_counts()  # over every group this benchmark ran
H100_BF16_DENSE_TFLOPS = 989.4  # NVIDIA H100 SXM datasheet, dense bf16 tensor-core peak (H200 SXM: the same)
# GPU name fragment -> (dense bf16 TFLOP/s, source); first match wins (PCIe and NVL cards run slower clocks)
PEAK_BF16_DENSE_TFLOPS = (
    ("H100 PCIe", 756.0, "NVIDIA H100 PCIe datasheet, dense bf16 (1,513 with sparsity)"),
    ("H100 NVL", 835.0, "NVIDIA H100 NVL datasheet, dense bf16 (1,671 with sparsity)"),
    ("H200 NVL", 835.0, "NVIDIA H200 NVL datasheet, dense bf16 (1,671 with sparsity)"),
    ("H200", 989.4, "NVIDIA H200 SXM datasheet, dense bf16 (1,979 with sparsity)"),
    ("H100", 989.4, "NVIDIA H100 SXM datasheet, dense bf16 (1,979 with sparsity)"),
)


def assumed_peak(given: float | None) -> dict:
    """The dense bf16 peak MFU divides by: `--peak-tflops` if given, else by the GPU's name (via
    PyTorch, when it sees a CUDA device), else the H100 SXM figure, labelled as a placeholder."""
    if given is not None:
        return {"tflops": given, "source": "--peak-tflops"}
    name = None
    try:
        import torch

        name = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    except Exception:  # no PyTorch: the name is unknown
        name = None
    for fragment, tflops, source in PEAK_BF16_DENSE_TFLOPS:
        if name and fragment in name:
            return {"tflops": tflops, "source": source, "gpu": name}
    return {"tflops": H100_BF16_DENSE_TFLOPS, "gpu": name,
            "source": "placeholder: H100 SXM dense bf16 (no known GPU seen; MFU is not meaningful here)"}

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
    "gather-experts": dict(expert_kernel="dequant"),
    "batched-experts": dict(expert_kernel="blocks"),  # the name of the results before issue 28
    # Other math (not defaults): a bf16 master copy; Adafactor's factored second moment.
    "master-compute": dict(master_dtype="compute"),
    "adafactor": dict(optimizer="adafactor"),
    # AdamW's moments as int8 codes (other math, its loss checked): 8 GB less at group 4, 8B shapes.
    "int8-moments": dict(optimizer_state="int8"),
    # bf16 trained copies whose updates are rounded stochastically (unbiased), alone and with int8 moments.
    "stochastic-master": dict(master_dtype="compute-stochastic"),
    "stochastic-int8": dict(master_dtype="compute-stochastic", optimizer_state="int8"),
    # Only AdamW's first moment as int8 codes, the second float32 (Unsloth's choice).
    "int8-first-moment": dict(optimizer_state="int8-first"),
    # TrainConfig's memory_preset "frugal" (MEMORY_PRESETS): timed and measured at the preset's group size.
    "frugal": dict(memory_preset="frugal"),
    # The default with the device layouts from speculative_layout's MLX ops even where the probe chose the kernel.
    "mlx-layout": {},
}
KERNELS_OFF = {"mlx-layout": "layout"}  # variant -> the KernelChoices field it turns off
# loss curves beside the reference one (`--loss-variants` picks among them)
OTHER_MATH = ("master-compute", "int8-moments", "stochastic-master", "stochastic-int8", "int8-first-moment", "frugal")
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
        set_expert_kernel(model, path, kernels=kernels)
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
                flops: dict | None, profile: bool = False) -> dict:
    with contextlib.ExitStack() as stack:
        for module, attribute, replacement in SWAPS.get(name, []):
            stack.enter_context(swapped(module, attribute, replacement))
        return _run_variant(model, layers, batch, args, name, changes, path, flops, profile)


def variant_layers(model: nn.Module, layers: list[int], cfg: TrainConfig, changes: dict) -> list[int]:
    """The group a variant trains: the benchmark's, or, for a variant that sets the group size (a
    memory preset), that many layers from the same first one."""
    if "memory_preset" not in changes and "group_size" not in changes:
        return layers
    return list(range(layers[0], min(layers[0] + cfg.group_size, len(model.model.layers))))


def _run_variant(model: nn.Module, layers: list[int], batch: Batch, args, name: str, changes: dict, path: str,
                 flops: dict | None, profile: bool = False) -> dict:
    cfg = train_config(changes, args.warmup + args.steps)
    layers = variant_layers(model, layers, cfg, changes)
    kernels = args.kernels
    if name in KERNELS_OFF:
        kernels = replace(kernels, **{KERNELS_OFF[name]: False})
    runner = GroupStep(model, layers, cfg, path, args.warmup + args.steps, kernels,
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
              "loss_last": losses[-1], "expert_path": path, "group_layers": layers,
              "settings": {k: v for k, v in cfg.model_dump().items()
                           if k in ("master_dtype", "optimizer", "fused_update", "loss_chunk",
                                    "grad_checkpoint", "optimizer_state", "keep_expert_activations",
                                    "offload_group_start", "group_size", "group_stride", "memory_preset")},
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
    if profile:  # while the group is active: its layers are the trained ones
        try:
            result["profile"] = profile_step(model, layers, batch, cfg, result, args)
        except Exception as err:  # the timings above stand without it
            result["profile"] = {"error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc()[-3000:]}
    result.update(runner.finish())
    return result


# ---------------------------------------------------------------- where the step's time goes


def _median_seconds(work, repeats: int, sync=mx.synchronize) -> float:
    """Median wall time of `work()` (which evaluates its arrays; `sync` waits for the device) over
    `repeats` runs after one warmup."""
    work()
    sync()
    times = []
    for _ in range(repeats):
        tick = time.perf_counter()
        work()
        sync()
        times.append(time.perf_counter() - tick)
    return statistics.median(times)


def _part_timings(module: nn.Module, fn, x: mx.array, cotangent: mx.array, repeats: int) -> dict:
    """Forward, and forward + backward (input gradient, and the module's trainable parameters'
    gradients), of `fn(x)` with `module`'s trainable arrays as inputs, each evaluated alone."""
    flat = tree_flatten(module.trainable_parameters())
    names, arrays = [name for name, _ in flat], [value for _, value in flat]

    def run(x, *params):
        module.update(tree_unflatten(list(zip(names, params))))
        return fn(x)

    try:
        forward = _median_seconds(lambda: mx.eval(run(x, *arrays)), repeats)
        both = _median_seconds(lambda: mx.eval(mx.vjp(run, [x, *arrays], [cotangent])), repeats)
    finally:
        module.update(tree_unflatten(list(zip(names, arrays))))  # the module holds its own arrays again
    return {"forward_ms": forward * 1000, "forward_backward_ms": both * 1000, "trainable_arrays": len(arrays)}


def profile_step(model: nn.Module, layers: list[int], batch: Batch, cfg: TrainConfig, measured: dict, args) -> dict:
    """Where the default step's time goes, as an isolated-part estimate: one layer part of each kind
    (attention, short conv, dense MLP, frozen MoE experts, trained MoE experts, with their norms) and
    the embedding + loss head, each run alone on the step's shapes (forward, then forward + backward,
    evaluated and synchronized, median of `--profile-repeats`), scaled by how often the step runs it:
    layers below the group forward only; layers from the group up forward, then (checkpointed, the
    layer walk) forward again + backward. Norm and update are the step's own measured phases. MLX
    overlaps and fuses work inside a real step, so the sum differs from the measured step: the
    remainder is reported, not hidden."""
    inner = model.model
    first = layers[0]
    moe = set(moe_layers(model))
    h = inner.embed_tokens(batch.inputs)
    cotangent = (mx.random.normal(h.shape, key=mx.random.key(11)) * 1e-3).astype(h.dtype)
    mx.eval(h, cotangent)
    masks = {True: create_attention_mask(h, None), False: create_ssm_mask(h, None)}

    def kind_of_ffn(i: int) -> str:
        if i not in moe:
            return "dense_mlp"
        return "trained_experts" if i in layers else "frozen_experts"

    counts: dict[str, dict[str, int]] = {}
    examples: dict[str, int] = {}  # kind -> the layer whose part is timed (the first of its kind in the window)
    for i, layer in enumerate(inner.layers):
        in_window = i >= first
        for kind in ("attention" if layer.is_attention_layer else "short_conv", kind_of_ffn(i)):
            count = counts.setdefault(kind, {"forward_only": 0, "forward_and_backward": 0})
            count["forward_and_backward" if in_window else "forward_only"] += 1
            if kind not in examples or (in_window and examples[kind] < first):
                examples[kind] = i

    repeats = args.profile_repeats
    parts = {}
    for kind, i in examples.items():
        # Each part differentiates only its own trainable arrays (a mixer in the group's layer would
        # otherwise also produce zero gradients for the layer's experts).
        layer = inner.layers[i]
        if kind == "attention":
            parts[kind] = _part_timings(layer.self_attn, lambda x, l=layer: l.self_attn(l.operator_norm(x),
                                                                                         mask=masks[True]),
                                        h, cotangent, repeats)
        elif kind == "short_conv":
            parts[kind] = _part_timings(layer.conv, lambda x, l=layer: l.conv(l.operator_norm(x), mask=masks[False]),
                                        h, cotangent, repeats)
        else:
            parts[kind] = _part_timings(layer.feed_forward, lambda x, l=layer: l.feed_forward(l.ffn_norm(x)),
                                        h, cotangent, repeats)
        parts[kind]["timed_layer"] = i
    embed = _median_seconds(lambda: mx.eval(inner.embed_tokens(batch.inputs)), repeats)
    one = mx.array(1.0, dtype=mx.float32)
    head = _median_seconds(lambda: mx.eval(mx.vjp(
        lambda x: grouped_step._head_loss(model, x, batch.targets, batch.loss_mask, cfg.loss_chunk)[0], [h], [one])),
        repeats)
    parts["embedding_and_loss_head"] = {"embedding_forward_ms": embed * 1000, "head_forward_backward_ms": head * 1000}

    by_kind = {}
    for kind, count in counts.items():
        part = parts[kind]
        # checkpointed walk: the first forward pass, then each window layer recomputed inside its backward
        per_window_layer = part["forward_ms"] + part["forward_backward_ms"] if cfg.grad_checkpoint \
            else part["forward_backward_ms"]
        seconds = (count["forward_only"] * part["forward_ms"] + count["forward_and_backward"] * per_window_layer) / 1000
        by_kind[kind] = {**count, "estimated_s": seconds}
    by_kind["embedding_and_loss_head"] = {"estimated_s": embed + head}
    gradients_estimate = sum(v["estimated_s"] for v in by_kind.values())
    phases = measured["phase_s"]
    explained = gradients_estimate + phases["norm"] + phases["update"]
    return {
        "method": "isolated-part estimate: each part timed alone (forward; forward + backward) on the step's "
                  "shapes, scaled by its count in the step; norm and update are the step's measured phases; "
                  "the parts leave out residual adds and the walk's bookkeeping, and a real step overlaps work",
        "repeats": repeats, "grad_checkpoint": cfg.grad_checkpoint, "first_active_layer": first,
        "parts_ms": parts,
        "gradients_by_kind": by_kind,
        "gradients_phase": {"estimated_s": gradients_estimate, "measured_s": phases["gradients"],
                            "unexplained_s": phases["gradients"] - gradients_estimate},
        "norm_s": phases["norm"], "update_s": phases["update"],
        "step": {"measured_s": measured["step_s"], "explained_s": explained,
                 "unexplained_s": measured["step_s"] - explained},
        "share_of_measured_step": {**{kind: v["estimated_s"] / measured["step_s"] for kind, v in by_kind.items()},
                                   "norm": phases["norm"] / measured["step_s"],
                                   "update": phases["update"] / measured["step_s"],
                                   "unexplained": (measured["step_s"] - explained) / measured["step_s"]},
    }


# ---------------------------------------------------------------- loss after N steps


def loss_curve(model: nn.Module, layers: list[int], batches: list[Batch], changes: dict, path: str, steps: int,
               order: list[int], lr: float, start: dict, kernels: KernelChoices) -> dict:
    """From the weights `start` (name -> array), `steps` steps cycling over `batches` in `order`;
    the mean loss over all batches afterwards."""
    model.update(tree_unflatten(list(start.items())))  # every curve from the same weights
    mx.random.seed(0)  # and the same random stream (stochastic rounding), whatever curves ran before
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
    """The reference step (`--loss-reference`: straightforward, or the exact default) against the
    default and the `--loss-variants` from the same weights, with yardsticks: the reference again
    (the backend's run-to-run nondeterminism), on another data order (noise), and with a 10% higher
    learning rate (a change of the math the comparison must be able to see). Every curve trains the
    same layers (the group of --group-size): a preset's group size changes which layers train at
    once, not a step's math."""
    vocab = model.model.embed_tokens.weight.shape[0]
    batches = [random_batch(vocab, args.batch, args.seq, 1000 + i) for i in range(args.loss_batches)]
    order_a = list(range(args.loss_batches))
    order_b = order_a[::-1]
    start = dict(tree_flatten(model.parameters()))  # the same arrays: no copy
    reference = args.loss_reference
    reference_changes = STRAIGHTFORWARD if reference == "straightforward" else VARIANTS[reference]
    runs = {reference: (reference_changes, order_a, args.loss_lr)}
    if reference != "default":
        runs["default"] = ({}, order_a, args.loss_lr)
    runs.update({name: (VARIANTS[name], order_a, args.loss_lr) for name in args.loss_variants})
    runs.update({f"{reference}_again": (reference_changes, order_a, args.loss_lr),
                 f"{reference}_other_order": (reference_changes, order_b, args.loss_lr),
                 f"{reference}_lr_plus_10pct": (reference_changes, order_a, 1.1 * args.loss_lr)})
    out = {"steps": args.loss_steps, "batches": args.loss_batches, "learning_rate": args.loss_lr, "expert_path": path,
           "seq": args.seq, "reference": reference, "group_layers": layers}
    for name, (changes, order, lr) in runs.items():
        out[name] = loss_curve(model, layers, batches, changes, path, args.loss_steps, order, lr, start, args.kernels)
    model.update(tree_unflatten(list(start.items())))
    a, b = out[reference]["final_loss"], out["default"]["final_loss"]
    repeat = abs(out[f"{reference}_again"]["final_loss"] - a)
    noise = max(repeat, abs(out[f"{reference}_other_order"]["final_loss"] - a))
    lr_effect = abs(out[f"{reference}_lr_plus_10pct"]["final_loss"] - a)
    out["other_math"] = {name: {"difference": out[name]["final_loss"] - a,
                                "within_noise": abs(out[name]["final_loss"] - a) <= noise,
                                "below_lr_effect": abs(out[name]["final_loss"] - a) < lr_effect}
                         for name in args.loss_variants}
    out.update(difference=b - a, relative_difference=(b - a) / a, repeat_noise=repeat, noise=noise,
               lr_10pct_effect=lr_effect,
               within_noise=abs(b - a) <= noise, below_lr_effect=abs(b - a) < lr_effect)
    return out


# ---------------------------------------------------------------- long sequences


def long_sequence(model, args, default_path: str) -> dict:
    """At `--long-seq` tokens, for each of `--long-variants`: the largest group size whose measured
    peak stays inside each of `--long-budget-gb` (group 4 first; the estimate, scaled by its measured
    over estimated peak, proposes a size; measured sizes move it; every size measured once)."""
    vocab = model.model.embed_tokens.weight.shape[0]
    batch = random_batch(vocab, 1, args.long_seq, 7)
    out = {"seq": args.long_seq, "budgets_gb": args.long_budgets, "variants": {}}
    for name in args.long_variants:
        out["variants"][name] = {}  # filled as it goes: a failure keeps what was measured
        try:
            largest_groups(model, args, default_path, batch, VARIANTS[name], out["variants"][name])
        except Exception as err:  # the other variants still run
            out["variants"][name]["error"] = f"{type(err).__name__}: {err}"
            out["variants"][name]["traceback"] = traceback.format_exc()[-3000:]
            gc.collect()
            mx.clear_cache()
    return out


def largest_groups(model, args, path: str, batch: Batch, changes: dict, out: dict) -> None:
    moe = moe_layers(model)
    cfg = train_config(changes, 2)
    seq = batch.inputs.shape[1]
    sizes = out.setdefault("sizes", {})
    out["settings"] = changes

    def estimate(size: int) -> float:
        return estimate_for_config(args.mixed_config, cfg, path, seq, size, attention=args.attention).total / GB

    def measure(size: int) -> float:
        """The measured peak of `size` layers from the first MoE one (cached)."""
        if str(size) in sizes:
            return sizes[str(size)]["peak_memory_gb"]
        runner = GroupStep(model, moe[:size], cfg, path, 2, args.kernels)
        times = []
        for _ in range(2):
            tick = time.perf_counter()
            runner.step(batch)
            times.append(time.perf_counter() - tick)
        peak = max(runner.phases["backward_peak"], runner.phases["update_peak"]) / GB
        sizes[str(size)] = {"peak_memory_gb": peak, "step_s": times[-1], "tokens_per_s": seq / times[-1],
                            "estimate_gb": estimate(size), "memory": memory_breakdown(model, runner.optimizer,
                                                                                      runner.phases)}
        runner.finish()
        return peak

    start = min(args.group_size, len(moe))
    ratio = measure(start) / estimate(start)
    out["estimate_ratio_at_group"] = {"size": start, "measured_over_estimated": ratio}
    out["largest_group_inside_budget"] = {}
    for budget in sorted(args.long_budgets):
        fits = [size for size in range(1, len(moe) + 1) if estimate(size) * ratio <= budget * 0.97]
        size = max(fits) if fits else 1
        largest, complete = None, False
        for _ in range(6):  # at most six measurements a budget (peaks grow with the group size)
            if measure(size) <= budget:
                largest = size
                if size == len(moe) or (str(size + 1) in sizes and measure(size + 1) > budget):
                    complete = True
                    break
                size += 1
            else:
                if size == 1 or (str(size - 1) in sizes and measure(size - 1) <= budget):
                    largest, complete = (size - 1 if size > 1 else None), True
                    break
                size -= 1
        out["largest_group_inside_budget"][str(budget)] = largest
        if not complete:
            out.setdefault("search_incomplete", []).append(budget)


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

    set_expert_kernel(model, "qmm")  # LoRASwitchLinear wraps mlx-lm's own QuantizedSwitchLinear and SwitchGLU
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


TORCH_BASELINES = ("torch", "torch-fused", "torch-fp32-master")


def torch_ffn_parts(model, layers: list[int], args, device: str, dtype, sync) -> dict:
    """The feed-forward parts of `profile_step` on transformers' modules, for a part-by-part comparison:
    a dense MLP, a frozen and a trained MoE block (`experts_implementation` as the model runs it), each
    alone on the step's shapes: forward, and forward + backward (the input gradient and the part's own
    trainable parameters' gradients), median of `--profile-repeats` after one warm-up."""
    import torch

    inner = model.model
    first, dense = layers[0], model.config.num_dense_layers
    h = torch.randn(args.batch, args.seq, model.config.hidden_size, device=device, dtype=dtype,
                    generator=torch.Generator(device).manual_seed(11))
    cotangent = torch.randn_like(h) * 1e-3
    examples = {"dense_mlp": 0, "trained_experts": first,
                "frozen_experts": next((i for i in range(first, len(inner.layers)) if i >= dense and i not in layers), None)}

    parts = {}
    for kind, i in examples.items():
        if i is None:
            continue
        layer = inner.layers[i]
        x = h.detach().requires_grad_(True)
        trainable = [p for p in layer.feed_forward.parameters() if p.requires_grad]

        def backward(layer=layer, x=x, trainable=trainable):
            layer.feed_forward(layer.ffn_norm(x)).backward(cotangent)
            x.grad = None
            for p in trainable:
                p.grad = None

        forward = _median_seconds(lambda layer=layer, x=x: layer.feed_forward(layer.ffn_norm(x)), args.profile_repeats,
                                  sync)
        parts[kind] = {"forward_ms": forward * 1000,
                       "forward_backward_ms": _median_seconds(backward, args.profile_repeats, sync) * 1000,
                       "trainable_arrays": len(trainable), "timed_layer": i}
    return parts


def run_torch(config: dict, layers: list[int], args, kind: str = "torch", profile_parts: bool = False) -> dict:
    """transformers' Lfm2MoeForCausalLM, experts + routers of `layers` trainable, AdamW, as `kind`:
    `torch`: bf16 parameters, gradients and moments, torch.optim.AdamW's default implementation;
    `torch-fused`: the same with AdamW(fused=True) (CUDA; on CPU foreach, recorded);
    `torch-fp32-master`: bf16 compute with float32 master copies and float32 moments of the trainable
    parameters (our default's math): each step casts the bf16 gradients into the masters, clips them,
    runs AdamW (fused on CUDA) on the masters and copies them back into the bf16 parameters.
    On CPU every kind computes in float32 (as MLX there), so the masters only duplicate the weights."""
    import torch
    import transformers
    from transformers import Lfm2MoeConfig, Lfm2MoeForCausalLM

    if kind not in TORCH_BASELINES:
        raise ValueError(f"unknown PyTorch baseline {kind!r}; choose from {TORCH_BASELINES}")
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
    # The fused kernel exists for CUDA tensors; elsewhere the fused kinds run foreach (and say so).
    implementation = "default"
    if kind != "torch":
        implementation = "fused" if device == "cuda" else "foreach"
    options = {"fused": True} if implementation == "fused" else {"foreach": True} if implementation == "foreach" else {}
    masters = []
    if kind == "torch-fp32-master":
        masters = [torch.nn.Parameter(p.detach().float().clone()) for p in params]
    trained = masters or params  # what AdamW updates (its moments take these tensors' dtype)
    opt = torch.optim.AdamW(trained, lr=1e-5, weight_decay=0.0, **options)
    ids = torch.randint(0, hf.vocab_size, (args.batch, args.seq), device=device)

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    def step() -> float:
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        for p, master in zip(params, masters):  # bf16 gradients into the float32 masters, then dropped
            master.grad = p.grad.float()
            p.grad = None
        torch.nn.utils.clip_grad_norm_(trained, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        with torch.no_grad():
            for p, master in zip(params, masters):  # the model computes with the masters' bf16 rounding
                p.copy_(master)
        sync()
        return out.loss.item()

    def reset():
        sync()
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()

    def read():
        return torch.cuda.max_memory_allocated() / GB if device == "cuda" else None

    result = timed_steps(step, args.warmup, args.steps, reset, read)
    if profile_parts:  # after the timed steps, so they do not see its allocations
        opt.zero_grad(set_to_none=True)
        result["parts_ms"] = torch_ffn_parts(model, layers, args, device, dtype, sync)
    result.update(kind=kind, device=device, dtype=str(dtype), torch=torch.__version__,
                  transformers=transformers.__version__,
                  trainable_parameters=sum(p.numel() for p in params),
                  adamw_implementation=implementation + (" (fused asked for; the fused AdamW is run on CUDA only "
                                                         "here, foreach on CPU)" if implementation == "foreach" else ""),
                  master_dtype="float32" if masters else str(dtype), moments_dtype=str(trained[0].dtype),
                  experts_implementation=getattr(model.config, "_experts_implementation", None),
                  attn_implementation=getattr(model.config, "_attn_implementation", None),
                  gpu=torch.cuda.get_device_name() if device == "cuda" else None)
    if device == "cpu" and masters:
        result["note"] = "CPU: the model computes in float32, so the float32 masters duplicate the weights"
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


def spread(values: list[float]) -> dict:
    """Median, min and max of `values` (and the values themselves)."""
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "values": values}


def _guarded(fn, *args, **kwargs) -> dict:
    """fn's result, or its error as a record (one run's failure must not lose the others)."""
    try:
        return fn(*args, **kwargs)
    except Exception as err:
        gc.collect()
        mx.clear_cache()
        return {"error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc()[-3000:]}


def run_repeats(results: dict, out: Path, model, layers: list[int], batch: Batch, args, path: str,
                torch_baselines: list[str], config: dict, kernels_off: list[str] = ()) -> None:
    """`--repeats` rounds in this process, each: every PyTorch baseline, then the MLX default, then
    each requested variant of `KERNELS_OFF` (interleaved, so a drift of the machine reaches all
    alike). Writes results["repeats"] (each run's record, and median / min / max of step time,
    tokens/s, peak GB and, for the default, MFU) after every run; the ratios pair round r's default
    with round r's baseline."""
    order = [*torch_baselines, "mlx_default", *(f"mlx_{name}" for name in kernels_off)]
    runs: dict[str, list[dict]] = {name: [] for name in order}
    record = results["repeats"] = {"rounds": args.repeats, "order": order, "runs": runs}
    for round_index in range(args.repeats):
        for name in torch_baselines:
            print(f"[grouped_step] repeat {round_index + 1}/{args.repeats}: {name} ...", flush=True)
            gc.collect()
            mx.clear_cache()  # MLX's cached buffers go back before PyTorch allocates
            first_plain = name == "torch" and round_index == 0  # its feed-forward parts beside the default's profile
            runs[name].append(_guarded(run_torch, config, layers, args, name, profile_parts=args.profile and first_plain))
            release_torch_memory()
            atomic_write_json(out, results)
        print(f"[grouped_step] repeat {round_index + 1}/{args.repeats}: mlx default ...", flush=True)
        runs["mlx_default"].append(_guarded(run_variant, model, layers, batch, args, "default", {}, path, flops=True))
        atomic_write_json(out, results)
        for name in kernels_off:
            print(f"[grouped_step] repeat {round_index + 1}/{args.repeats}: mlx {name} ...", flush=True)
            runs[f"mlx_{name}"].append(_guarded(run_variant, model, layers, batch, args, name, {}, path, flops=None))
            atomic_write_json(out, results)
    summary = {}
    for name, records in runs.items():
        done = [r for r in records if "step_s" in r]
        summary[name] = {"runs_ok": len(done), "runs": len(records)}
        for key in ("step_s", "tokens_per_s", "peak_memory_gb"):
            values = [r[key] for r in done if r.get(key) is not None]
            if values:
                summary[name][key] = spread(values)
        mfus = [r["mfu"]["mfu"] for r in done if "mfu" in r]
        if mfus:
            summary[name]["mfu"] = spread(mfus)
    record["summary"] = summary
    atomic_write_json(out, results)


def paired_ratios(mine: list[dict], theirs: list[dict], key: str) -> dict | None:
    """mine[r][key] / theirs[r][key] over the rounds where both ran, as a spread (None if none)."""
    values = [a[key] / b[key] for a, b in zip(mine, theirs) if a.get(key) and b.get(key)]
    return spread(values) if values else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="lfm2.5-8b-a1b", choices=["lfm2.5-8b-a1b", "tiny-moe", "mid"])
    parser.add_argument("--seq", type=int, default=None, help="tokens per sequence (2048 for 8B, 128 for tiny)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--group-size", type=int, default=4)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per measurement")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--variants", default="all", help=f"comma list of {','.join(VARIANTS)} or 'all' or 'none'")
    parser.add_argument("--baselines", default="torch,lora",
                        help=f"comma list of {', '.join(TORCH_BASELINES)}, lora (or 'none')")
    parser.add_argument("--repeats", type=int, default=None,
                        help="rounds of the MLX default and every PyTorch baseline, interleaved, for medians and "
                             "spreads (default: 3 on a GPU, 0 on the CPU; 0: each baseline once, first)")
    parser.add_argument("--profile", action=argparse.BooleanOptionalAction, default=True,
                        help="the default's isolated-part profile (where the step's time goes)")
    parser.add_argument("--profile-repeats", type=int, default=5)
    parser.add_argument("--block-timings", action=argparse.BooleanOptionalAction, default=True,
                        help="the expert paths timed on one MoE layer at the full length")
    parser.add_argument("--expert-kernel", "--expert-path", dest="expert_path", default="auto",
                        choices=["auto", "qmm", "dequant", "blocks", "batched"],
                        help="auto: the start-up probe picks (as the trainer); else that kernel, probe skipped "
                             "(--expert-path and 'batched': the names before issue 28)")
    parser.add_argument("--loss-steps", type=int, default=50, help="steps of the loss comparison (0: skip)")
    parser.add_argument("--loss-batches", type=int, default=4)
    parser.add_argument("--loss-lr", type=float, default=1e-5)
    parser.add_argument("--loss-reference", default="straightforward", choices=["straightforward", "default"],
                        help="the step the loss comparison measures its noise on and compares against")
    parser.add_argument("--loss-variants", default="all", help=f"comma list of {','.join(OTHER_MATH)}, 'all' or 'none'")
    parser.add_argument("--long-seq", type=int, default=0, help="tokens of the long-sequence part (0: skip)")
    parser.add_argument("--long-budget-gb", default="60", help="comma list of budgets in GB (1e9 bytes)")
    parser.add_argument("--long-variants", default="default", help="comma list of variants for the long part")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="the accelerator's dense bf16 peak for MFU (default: by the GPU's name; H100 SXM 989.4)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tag", default="", help="added to the default result file's name")
    parser.add_argument("--out", help="result JSON (default benchmarks/results/grouped_step-PRESET-DEVICE.json)")
    args = parser.parse_args(argv)
    args.seq = args.seq or (2048 if args.preset == "lfm2.5-8b-a1b" else 128)

    def names(text: str, known, what: str) -> list[str]:
        chosen = list(known) if text == "all" else [] if text == "none" else [v.strip() for v in text.split(",") if v.strip()]
        unknown = sorted(set(chosen) - set(known))
        if unknown:
            parser.error(f"unknown {what} {unknown}; choose from {', '.join(known)}")
        return chosen

    variants = names(args.variants, VARIANTS, "variants")
    baselines = names(args.baselines, [*TORCH_BASELINES, "lora"], "baselines")
    torch_baselines = [b for b in baselines if b in TORCH_BASELINES]
    args.loss_variants = names(args.loss_variants, OTHER_MATH, "loss variants")
    args.long_variants = names(args.long_variants, VARIANTS, "long variants")
    args.long_budgets = [float(v) for v in args.long_budget_gb.split(",") if v.strip()]

    device = "gpu" if mx.default_device() == mx.gpu else "cpu"
    if args.repeats is None:
        args.repeats = 3 if device == "gpu" else 0
    name = f"grouped_step-{args.preset}-{device}{'-' + args.tag if args.tag else ''}.json"
    out = Path(args.out or Path(__file__).parent / "results" / name)
    if not args.out and os.environ.get("OUT") and Path(os.environ["OUT"]).is_dir():  # the device tool's folder
        out = Path(os.environ["OUT"]) / name
    peak = assumed_peak(args.peak_tflops)
    args.peak_tflops = peak["tflops"]
    results: dict = {
        "benchmark": "grouped_step", "preset": args.preset, "seq": args.seq, "batch": args.batch,
        "group_size": args.group_size, "steps": args.steps, "warmup": args.warmup, "repeat_rounds": args.repeats,
        "tokens_per_step": args.seq * args.batch, "mlx_device": str(mx.default_device()),
        "mlx_version": mx.__version__, "python": sys.version.split()[0], "machine": platform.machine(),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S"), "command": " ".join(sys.argv),
        "peak_flops_assumed": peak, "variants_defined": VARIANTS,
    }
    if importlib.util.find_spec("torch") is None:  # no PyTorch: its baselines cannot run
        if torch_baselines:
            results["torch_skipped"] = "PyTorch is not installed here: the PyTorch baselines were skipped"
            print(f"[grouped_step] {results['torch_skipped']}", flush=True)
        torch_baselines = []
        baselines = [b for b in baselines if b not in TORCH_BASELINES]
    config = preset_config(args.preset)
    first_moe = config["num_dense_layers"]
    layers = list(range(first_moe, min(first_moe + args.group_size, config["num_hidden_layers"])))
    results["group_layers"] = layers

    if torch_baselines and not args.repeats:  # first, so MLX's buffer cache cannot crowd them out
        for base in torch_baselines:
            _section(results, base, out, run_torch, config, layers, args, base, args.profile and base == "torch")
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
    results["layout_kernel"] = probe_layout_kernel(model, layers[0], args.seq)
    args.kernels = KernelChoices.from_records(results)  # the run's kernels, as the trainer's
    if args.expert_path == "auto":
        probe = _section(results, "expert_path_probe", out, lambda: {
            "seq_len": probe_len, "seconds": measure_expert_kernels(model, layers[0], probe_len, dtype, args.seed,
                                                                       args.kernels)})
        seconds = probe.get("seconds", {"qmm": 1.0})
        chosen = min(seconds, key=seconds.get)
    else:
        chosen = "blocks" if args.expert_path == "batched" else args.expert_path
        results["expert_path_probe"] = {"skipped": f"--expert-kernel {chosen}"}
    if args.block_timings:
        _section(results, "block_timings_full_seq", out, lambda: {
            f"{k}_ms": v * 1000 for k, v in measure_expert_kernels(model, moe_layers(model)[-1], args.seq, dtype,
                                                                       kernels=args.kernels).items()})
    results["expert_path_choice"] = chosen

    results["mlx"] = {}
    for name in variants:
        changes = VARIANTS[name]
        path = STRAIGHTFORWARD_PATH if name == "straightforward" else changes.get("expert_kernel", chosen)
        print(f"[grouped_step] mlx {name} ({path}) ...", flush=True)
        tick = time.perf_counter()
        results["mlx"][name] = _guarded(run_variant, model, layers, batch, args, name, changes, path,
                                        flops=True if name in ("default", "straightforward", "frugal") else None,
                                        profile=args.profile and name == "default")
        results["mlx"][name]["section_s"] = time.perf_counter() - tick
        atomic_write_json(out, results)

    if args.repeats and ("default" in variants or torch_baselines):
        tick = time.perf_counter()
        try:
            run_repeats(results, out, model, layers, batch, args, chosen, torch_baselines, config,
                        [name for name in variants if name in KERNELS_OFF])
        except Exception as err:  # keep what the rounds wrote
            results.setdefault("repeats", {})["error"] = f"{type(err).__name__}: {err}"
            results["repeats"]["traceback"] = traceback.format_exc()[-3000:]
        results["repeats"]["section_s"] = time.perf_counter() - tick
        for base in torch_baselines:  # each baseline's first round, where a single record is read
            results[base] = results["repeats"]["runs"][base][0] if results["repeats"]["runs"].get(base) else {
                "error": "no round ran"}
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

    results["ratios"] = ratios = compute_ratios(results, baselines)
    ours = results["mlx"].get("default", {})
    for base in torch_baselines:  # the PyTorch step's MFU on the same FLOP model (no recomputation counted)
        if "step_s" in results.get(base, {}) and "flops" in ours:
            results[base]["mfu"] = mfu(ours["flops"] | {"hardware": ours["flops"]["model"]},
                                       results[base]["step_s"], args.peak_tflops)
    results["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S")
    atomic_write_json(out, results)
    print_table(results, variants, baselines)
    print(json.dumps({k: (v["median"], v["min"], v["max"]) for k, v in ratios.items()}, indent=1))
    summary = results.get("repeats", {}).get("summary", {})
    for name, part in summary.items():
        if "tokens_per_s" in part:
            t, m = part["tokens_per_s"], part.get("peak_memory_gb")
            print(f"repeats {name}: tokens/s {t['median']:.0f} ({t['min']:.0f}-{t['max']:.0f})"
                  + (f", peak {m['median']:.2f} GB ({m['min']:.2f}-{m['max']:.2f})" if m else "")
                  + (f", MFU {part['mfu']['median']:.3f}" if "mfu" in part else ""))
    profile = ours.get("profile", {})
    if "step" in profile:
        shares = ", ".join(f"{k} {v:.0%}" for k, v in profile["share_of_measured_step"].items())
        print(f"profile (isolated-part estimate) of the default step {profile['step']['measured_s']:.3f} s: {shares}")
    theirs = results.get("torch", {}).get("parts_ms", {})
    for kind, part in profile.get("parts_ms", {}).items():  # the same part, MLX and PyTorch
        if kind in theirs:
            print(f"part {kind} (ms, forward / forward + backward): MLX {part['forward_ms']:.2f} / "
                  f"{part['forward_backward_ms']:.2f}, PyTorch {theirs[kind]['forward_ms']:.2f} / "
                  f"{theirs[kind]['forward_backward_ms']:.2f}")
    if "loss_comparison" in results and "difference" in results["loss_comparison"]:
        lc = results["loss_comparison"]
        ref = lc["reference"]
        versus = f", default {lc['default']['final_loss']:.4f}" if ref != "default" else ""
        print(f"loss after {lc['steps']} steps at {lc['seq']} tokens: {ref} {lc[ref]['final_loss']:.4f}{versus}, "
              f"noise {lc['noise']:.4f}, lr +10% effect {lc['lr_10pct_effect']:.4f}; "
              + ", ".join(f"{n} {lc[n]['final_loss']:.4f} ({'within' if v['within_noise'] else 'OUTSIDE'} noise)"
                          for n, v in lc["other_math"].items()))
    for name, part in results.get("long_sequence", {}).get("variants", {}).items():
        print(f"{results['long_sequence']['seq']} tokens, {name}: "
              + ", ".join(f"group {k}: {v['peak_memory_gb']:.1f} GB" for k, v in sorted(
                  part.get("sizes", {}).items(), key=lambda kv: int(kv[0])))
              + f"; largest inside budget: {part.get('largest_group_inside_budget')}"
              + (f"; error {part['error']}" if "error" in part else ""))
    print(f"results: {out}")
    return 0


def compute_ratios(results: dict, baselines: list[str]) -> dict:
    """`mlx_VARIANT_vs_BASE_{tokens_per_s,peak_memory}` as {median, min, max, values}: for the default
    against the PyTorch baselines from the repeated rounds (paired by round) when they ran, else
    from the single runs (one value)."""
    ratios = {}
    runs = results.get("repeats", {}).get("runs", {})
    for mine in ("default", "int8-moments", "int8-first-moment", "frugal"):
        measured = results["mlx"].get(mine, {})
        for base in baselines + ["straightforward"]:
            key = f"mlx_{mine}_vs_{base.replace('-', '_')}"
            if mine == "default" and base in runs and runs.get("mlx_default"):
                for metric, suffix in (("tokens_per_s", "tokens_per_s"), ("peak_memory_gb", "peak_memory")):
                    paired = paired_ratios(runs["mlx_default"], runs[base], metric)
                    if paired:
                        ratios[f"{key}_{suffix}"] = {**paired, "from": f"{len(paired['values'])} paired rounds"}
                continue
            theirs = results["mlx"].get(base, {}) if base == "straightforward" else results.get(base, {})
            if "tokens_per_s" in measured and "tokens_per_s" in theirs:
                ratios[f"{key}_tokens_per_s"] = {**spread([measured["tokens_per_s"] / theirs["tokens_per_s"]]),
                                                 "from": "single runs"}
                if measured.get("peak_memory_gb") and theirs.get("peak_memory_gb"):
                    ratios[f"{key}_peak_memory"] = {**spread([measured["peak_memory_gb"] / theirs["peak_memory_gb"]]),
                                                    "from": "single runs"}
    for name in KERNELS_OFF:  # the default's kernels against the same step without one, paired by round
        if runs.get(f"mlx_{name}") and runs.get("mlx_default"):
            paired = paired_ratios(runs["mlx_default"], runs[f"mlx_{name}"], "tokens_per_s")
            if paired:
                ratios[f"mlx_default_vs_{name.replace('-', '_')}_tokens_per_s"] = {
                    **paired, "from": f"{len(paired['values'])} paired rounds"}
    return ratios


if __name__ == "__main__":
    sys.exit(main())

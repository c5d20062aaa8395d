"""Start-up measurements: the expert paths' speed, the dequantization and row-gather kernels, and
whether attention's backward holds the score matrix."""

from __future__ import annotations

import json
import os
import statistics
import time
from pathlib import Path
from typing import Callable

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx_lm.models.switch_layers import QuantizedSwitchLinear

from lfm_mlx.fsutil import atomic_write_json
from lfm_mlx.grouped.experts import EXPERT_KERNEL_CLASSES, set_expert_kernel
from lfm_mlx.kernels import block_layout, dequant, row_gather
from lfm_mlx.kernels.choices import KernelChoices
from lfm_mlx.kernels.expert_blocks import BatchedSwitchGLU, _round_up, speculative_layout
from lfm_mlx.model.moe import feed_forward


PROBE_TOKENS = 1024  # tokens of the start-up expert-path probe (at most the longest example)


def expert_kernel_cache() -> Path:
    """Where `expert_kernel: auto` keeps its measured choices: one per machine and shape, so two fresh runs
    of one config on one machine take the same path (the paths sum in other orders: other weights)."""
    root = os.environ.get("LFM_MLX_CACHE") or Path.home() / ".cache" / "lfm_mlx"
    return Path(root) / "expert_kernel.json"  # frozen_path.json before issue 28: measured again


def expert_kernel_key(model: nn.Module, layer: int, seq_len: int, dtype: mx.Dtype) -> str:
    """What the measurement depends on: the device, the MoE block's shape, the dtype and the probe."""
    args = model.model.args
    shape = (args.hidden_size, args.moe_intermediate_size, args.num_experts, args.num_experts_per_tok)
    return f"{mx.default_device()} | moe {shape} | {dtype} | {seq_len} tokens | layer {layer}"


def remembered_expert_kernel(key: str) -> dict | None:
    """The record measured earlier on this machine for `key`, or None (absent or unreadable cache)."""
    try:
        return json.loads(expert_kernel_cache().read_text()).get(key)
    except (OSError, ValueError, AttributeError):
        return None


def auto_expert_kernel(model: nn.Module, layer: int, seq_len: int, dtype: mx.Dtype, seed: int,
                     kernels: KernelChoices | None = None) -> dict:
    """`expert_kernel: auto`'s record: the choice measured earlier on this machine for this shape, else
    measured now (`measure_expert_kernels`) and kept for the next run."""
    key = expert_kernel_key(model, layer, seq_len, dtype)
    record = remembered_expert_kernel(key)
    if record is not None:
        return record | {"reason": f"{record['reason']}, measured on this machine before (kept in "
                                   f"{expert_kernel_cache()}; delete it to measure again)"}
    times = measure_expert_kernels(model, layer, seq_len, dtype, seed, kernels)
    record = {"choice": min(times, key=times.get), "reason": "faster forward+backward of one MoE block",
              "seconds": times, "seq_len": seq_len, "layer": layer, "device": str(mx.default_device())}
    remember_expert_kernel(key, record)
    return record


def remember_expert_kernel(key: str, record: dict) -> None:
    """Keep `record` for later runs; a cache that cannot be written only costs a new measurement."""
    path = expert_kernel_cache()
    try:
        known = json.loads(path.read_text()) if path.exists() else {}
        atomic_write_json(path, {**(known if isinstance(known, dict) else {}), key: record})
    except (OSError, ValueError):
        pass


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
    q = feed_forward(model, layer).switch_mlp.gate_proj
    if not isinstance(q, QuantizedSwitchLinear):
        return {"choice": "mx.dequantize", "reason": f"layer {layer}'s experts are not quantized"}
    return dequant.probe(q.weight, q.scales, q.get("biases"), q.group_size, q.bits, q.mode)


def probe_row_gather(model: nn.Module, tokens: int) -> dict:
    """`row_gather.probe` at this model's expert-block shapes for `tokens` tokens: whether the
    rows move between tokens and expert blocks through the CUDA kernels or MLX's gather."""
    args = model.model.args
    choices = args.num_experts_per_tok
    return row_gather.probe(tokens, choices, tokens * choices * 3 // 2, args.hidden_size,
                            model.model.embed_tokens.weight.dtype)


def probe_layout_kernel(model: nn.Module, layer: int, tokens: int) -> dict:
    """`block_layout.probe` at this model's routing shape for `tokens` tokens: whether the walk lays
    the expert blocks out with the one-kernel counting sort or `speculative_layout`'s MLX ops. A
    kernel the probe chose must then give `layer`'s MoE block, called as the walk calls it, the same
    output and input gradient bit for bit (`layout_in_block`), or MLX's layout stays."""
    args = model.model.args
    record = block_layout.probe(args.num_experts, args.num_experts_per_tok, tokens, speculative_layout)
    return layout_in_block(model, layer, tokens, record) if record["choice"] == "kernel" else record


def layout_in_block(model: nn.Module, layer: int, tokens: int, record: dict) -> dict:
    """`record` kept when `layer`'s experts on a guessed layout (the walk's forward and its input
    gradient) match bit for bit with the kernel's layout and with MLX's; else MLX's layout, and why."""
    args = model.model.args
    key = mx.random.key(1)
    x = mx.random.normal((1, tokens, args.hidden_size), key=key).astype(model.model.embed_tokens.weight.dtype)
    indices = block_layout.skewed_routing(tokens, args.num_experts, args.num_experts_per_tok, key)
    busiest = int(np.bincount(np.array(indices).reshape(-1), minlength=args.num_experts).max())
    cotangent = mx.random.normal((1, tokens, args.num_experts_per_tok, args.hidden_size), key=key).astype(x.dtype)
    results = []
    try:
        for layout in (False, True):
            block = BatchedSwitchGLU(feed_forward(model, layer).switch_mlp, KernelChoices(layout=layout))
            block.speculate, block.capacity_hint = True, _round_up(busiest + busiest // 4)  # a guess that holds
            (out,), (d_x,) = mx.vjp(lambda v: block(v, indices), [x], [cotangent])
            results.append((out, d_x))
        differing = sum((a.view(mx.uint8) != b.view(mx.uint8)).sum().item() for a, b in zip(*results))
    except Exception as err:  # a launch or shape failure in the block leaves MLX's layout in place
        return {**record, "choice": "mlx", "reason": f"failed in the MoE block: {type(err).__name__}: {err}"}
    if differing:
        return {**record, "choice": "mlx", "reason": f"{differing} bytes of the MoE block's output or gradient differ"}
    return {**record, "reason": f"{record['reason']}; the same MoE block output and input gradient"}


def measure_expert_kernels(model: nn.Module, layer: int, seq_len: int, dtype: mx.Dtype,
                         seed: int = 0, kernels: KernelChoices | None = None) -> dict[str, float]:
    """Seconds for forward + input-gradient of one frozen MoE block on (1, seq_len) tokens, with
    experts through int8 gather_qmm ("qmm"), dequantized just in time ("dequant"), or as padded
    expert blocks ("blocks"), each as the layer walk runs it: the blocks' layout known beforehand
    (the walk's forward pass guesses it on the device, the backward reuses it), not computed on the
    host. (Timed with a host read per call, the blocks lost the choice to "dequant" by 5% in one of
    three H200 runs, while the whole step ran 1.8x faster on them: 0.139 against 0.246 s.)"""
    block = feed_forward(model, layer)
    x = mx.random.normal((1, seq_len, model.model.args.hidden_size), key=mx.random.key(seed)).astype(dtype)
    times = {}
    for path in EXPERT_KERNEL_CLASSES:
        set_expert_kernel(model, path, kernels=kernels)
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


measure_frozen_paths = measure_expert_kernels  # the name before issue 28


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

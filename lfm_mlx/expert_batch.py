"""Mixture-of-experts feed-forward as one batched matmul per projection over equal-size expert blocks.

mlx-lm's `SwitchGLU` runs the routed experts through `gather_mm` (or `gather_qmm`): rows sorted
by expert, one variable-size matmul per expert. On MLX's CUDA backend that kernel reaches a small
share of the GPU's matmul rate, and its weight gradient is slower still. Here the (token, choice)
rows are laid out in per-expert blocks padded to the largest expert's count, so every projection
is an ordinary batched matmul (`[experts, capacity, in] @ [experts, in, out]`) whose forward and
both gradients run on the backend's dense matmul.

The math is unchanged: padding rows copy a real token, their outputs are never read, so their
gradients are exactly zero and they add nothing to the weight gradients. The rows move between
tokens and blocks through `row_gather` (CUDA kernels where they are faster than MLX's gather).

The layout is computed on the host from the routing, which costs one read of the expert indices
per call; the layer walk keeps each block's layout from the forward pass (`keep_layout`), so its
recomputation in the backward pass reads nothing back. Measured on an H200 at the LFM2.5-8B-A1B
shapes (2,048 tokens, group 4), the walk went from 163 to 139 ms with the kernels and kept layouts.

The padding is what this costs: the largest expert's count over the mean was 1.2-4.2x across the
layers of a random-weight 8B model. Overflow blocks for the busiest experts (copies of their
weights) cut the rows to 1.2-1.7x, but the walk took 146-156 ms against 139: measured and dropped.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx_lm.models.switch_layers import QuantizedSwitchLinear, SwitchGLU

from lfm_mlx.dequant_kernel import dequantize
from lfm_mlx.row_gather import MISSING, gather_rows, sum_rows

CAPACITY_MULTIPLE = 16  # capacity rounded up to this: fewer distinct matmul shapes, aligned tiles


@dataclass(frozen=True)
class ExpertLayout:
    """Where each (token, choice) row goes: expert e's block is block rows [e * capacity, (e + 1) * capacity)."""

    source_token: mx.array  # [experts * capacity]: the token feeding each block row
    block_row: mx.array  # [tokens, k]: the block row holding each choice
    block_choice: mx.array  # [experts * capacity]: the choice each block row holds (MISSING: a spare row)
    capacity: int

    def to_blocks(self, x: mx.array) -> mx.array:
        """Token rows `x` [tokens, dims] -> block rows [experts * capacity, dims]. Its gradient
        sums each token's k block rows (a spare row's gradient is exactly zero: never read)."""
        gather = mx.custom_function(lambda v: gather_rows(v, self.source_token))

        @gather.vjp
        def backward(primals, cotangent, output):
            return sum_rows(cotangent, self.block_row)

        return gather(x)

    def from_blocks(self, out: mx.array) -> mx.array:
        """Block rows `out` [experts * capacity, dims] -> one row per choice [tokens * k, dims].
        Its gradient is a gather too: each block row takes its choice's row (spare rows: zero)."""
        gather = mx.custom_function(lambda v: gather_rows(v, self.block_row.reshape(-1)))

        @gather.vjp
        def backward(primals, cotangent, output):
            return gather_rows(cotangent, self.block_choice)

        return gather(out)


def expert_layout(indices: mx.array, num_experts: int) -> ExpertLayout:
    """The block layout for top-k choices `indices` (any leading shape, k last), computed on the
    host: one read of the indices (the matmul shapes must be known)."""
    k = indices.shape[-1]
    flat = np.array(indices.reshape(-1)).astype(np.int64)
    n = flat.size
    order = np.argsort(flat, kind="stable")  # choice ids, grouped by expert
    counts = np.bincount(flat, minlength=num_experts)
    starts = np.cumsum(counts) - counts
    capacity = -(-max(int(counts.max()), 1) // CAPACITY_MULTIPLE) * CAPACITY_MULTIPLE

    sorted_experts = flat[order]
    block_row = np.empty(n, dtype=np.int64)
    block_row[order] = sorted_experts * capacity + np.arange(n) - starts[sorted_experts]
    # each block row's token; spare rows repeat the expert's last real row (any row when it has none)
    rows = np.minimum(np.arange(capacity), np.maximum(counts - 1, 0)[:, None])
    position = np.minimum(starts[:, None] + rows, n - 1).reshape(-1)
    block_choice = np.full(position.size, MISSING, dtype=np.uint32)
    block_choice[block_row] = np.arange(n)
    return ExpertLayout(mx.array((order[position] // k).astype(np.uint32)),
                        mx.array(block_row.reshape(-1, k).astype(np.uint32)), mx.array(block_choice), capacity)


def expert_weight(projection: nn.Module, dtype: mx.Dtype, like: mx.array) -> mx.array:
    """A projection's expert weights `[experts, out, in]` in `dtype`, dequantized when quantized.
    `like`: the activation the weights are used with; a module may tie its weight's preparation
    to it (`weight_for`) so the preparation runs just in time."""
    if hasattr(projection, "weight_for"):
        return projection.weight_for(like)
    if isinstance(projection, QuantizedSwitchLinear):
        w = dequantize(projection["weight"], projection["scales"], projection.get("biases"),
                       projection.group_size, projection.bits, projection.mode)
        return w.astype(dtype)
    return projection["weight"].astype(dtype)


def _apply(projection: nn.Module, blocks: mx.array) -> mx.array:
    """`blocks` [experts, capacity, in] through each expert's own weights: [experts, capacity, out]."""
    w = expert_weight(projection, blocks.dtype, blocks)
    out = blocks @ w.swapaxes(-1, -2)
    if "bias" in projection:
        out = out + mx.expand_dims(projection["bias"], -2).astype(out.dtype)
    return out


class BatchedSwitchGLU(nn.Module):
    """mlx-lm's SwitchGLU (same parameters, same names, same results) computed over padded
    expert blocks by batched matmuls. Its projections may be trainable, quantized or plain.

    `keep_layout`: remember the next call's layout (`kept_layout`) and reuse it on later calls
    until `kept_layout` is cleared: the walk's recomputation routes as its forward pass did
    without reading the indices back."""

    def __init__(self, glu: SwitchGLU):
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj = glu.gate_proj, glu.up_proj, glu.down_proj
        self.activation = glu.activation
        self.keep_layout = False
        self.kept_layout: ExpertLayout | None = None

    def num_experts(self) -> int:
        return self.gate_proj["weight"].shape[0]

    def __call__(self, x: mx.array, indices: mx.array) -> mx.array:
        dims, experts = x.shape[-1], self.num_experts()
        layout = self.kept_layout
        if layout is None:
            layout = expert_layout(mx.stop_gradient(indices), experts)
            if self.keep_layout:
                self.kept_layout = layout
        blocks = layout.to_blocks(x.reshape(-1, dims)).reshape(experts, layout.capacity, dims)
        hidden = self.activation(_apply(self.up_proj, blocks), _apply(self.gate_proj, blocks))
        out = _apply(self.down_proj, hidden)
        return layout.from_blocks(out.reshape(-1, dims)).reshape(*indices.shape, dims)

    def unbatched(self) -> SwitchGLU:
        """The same projections back in a plain SwitchGLU."""
        glu = SwitchGLU(1, 1, 1)
        glu.gate_proj, glu.up_proj, glu.down_proj = self.gate_proj, self.up_proj, self.down_proj
        glu.activation = self.activation
        return glu

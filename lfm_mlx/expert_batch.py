"""Mixture-of-experts feed-forward as one batched matmul per projection over equal-size expert blocks.

mlx-lm's `SwitchGLU` runs the routed experts through `gather_mm` (or `gather_qmm`): rows sorted
by expert, one variable-size matmul per expert. On MLX's CUDA backend that kernel reaches a small
share of the GPU's matmul rate, and its weight gradient is slower still. Here the (token, choice)
rows are laid out in per-expert blocks padded to the largest expert's count, so every projection
is an ordinary batched matmul (`[experts, capacity, in] @ [experts, in, out]`) whose forward and
both gradients run on the backend's dense matmul.

The math is unchanged: padding rows copy a real token, their outputs are never read, so their
gradients are exactly zero and they add nothing to the weight gradients. The cost is the padding
(the largest expert's count over the mean, measured at 2,048 tokens, 32 experts, top 4: 288-304
rows against 256 on random inputs, 336-1,072 across the layers of a random-weight model whose
deeper layers route unevenly) and one host read per call (the capacity), which is why the trainer
measures this path against the others at start-up rather than assuming it. Measured on an H200 at the
LFM2.5-8B-A1B shapes: one frozen block's forward + input gradient 3.5 ms against 6.6 ms.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.switch_layers import QuantizedSwitchLinear, SwitchGLU

from lfm_mlx.dequant_kernel import dequantize

CAPACITY_MULTIPLE = 16  # capacity rounded up to this: fewer distinct matmul shapes, aligned tiles


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


def expert_layout(indices: mx.array, num_experts: int) -> tuple[mx.array, mx.array, int]:
    """For top-k choices `indices` (any leading shape, k last): (the token feeding each padded
    block row [experts * capacity], the block row of each choice [indices.size], capacity).

    Rows sorted by expert form expert e's block at e * capacity; a block's spare rows repeat a
    real token (any will do: their outputs are never read)."""
    k = indices.shape[-1]
    flat = indices.reshape(-1)
    n = flat.size
    order = mx.argsort(flat)  # choice ids, grouped by expert
    counts = (mx.expand_dims(flat, 1) == mx.arange(num_experts)).sum(axis=0)
    most = counts.max().item()  # the one host read: matmul shapes must be known
    capacity = -(-most // CAPACITY_MULTIPLE) * CAPACITY_MULTIPLE
    starts = mx.cumsum(counts) - counts
    sorted_experts = flat[order]
    block_row_sorted = sorted_experts * capacity + (mx.arange(n) - starts[sorted_experts])
    block_row = block_row_sorted[mx.argsort(order)]
    within = mx.minimum(mx.expand_dims(starts, 1) + mx.arange(capacity), n - 1)
    source_token = (order[within.reshape(-1)] // k).astype(mx.uint32)
    return source_token, block_row.astype(mx.uint32), capacity


class BatchedSwitchGLU(nn.Module):
    """mlx-lm's SwitchGLU (same parameters, same names, same results) computed over padded
    expert blocks by batched matmuls. Its projections may be trainable, quantized or plain."""

    def __init__(self, glu: SwitchGLU):
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj = glu.gate_proj, glu.up_proj, glu.down_proj
        self.activation = glu.activation

    def num_experts(self) -> int:
        return self.gate_proj["weight"].shape[0]

    def __call__(self, x: mx.array, indices: mx.array) -> mx.array:
        indices = mx.stop_gradient(indices)
        dims, experts = x.shape[-1], self.num_experts()
        source_token, block_row, capacity = expert_layout(indices, experts)
        blocks = x.reshape(-1, dims)[source_token].reshape(experts, capacity, dims)
        hidden = self.activation(_apply(self.up_proj, blocks), _apply(self.gate_proj, blocks))
        out = _apply(self.down_proj, hidden)
        return out.reshape(-1, dims)[block_row].reshape(*indices.shape, dims)

    def unbatched(self) -> SwitchGLU:
        """The same projections back in a plain SwitchGLU."""
        glu = SwitchGLU(1, 1, 1)
        glu.gate_proj, glu.up_proj, glu.down_proj = self.gate_proj, self.up_proj, self.down_proj
        glu.activation = self.activation
        return glu

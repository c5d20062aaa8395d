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

A layout needs the busiest expert's count before the matmuls can be shaped. Called plainly, a
block computes it on the host (`expert_layout`: one read of the expert indices, which waits for
every layer before it). In the trainer's layer walk nothing is read back: the forward pass lays
each block out on the device for a capacity guessed from the last step (`speculative_layout`),
checked once at the pass's end, and the backward pass reuses the forward's layouts
(`keep_layout`). Measured on an H200 at the LFM2.5-8B-A1B shapes (2,048 tokens, group 4): the walk
went from 163 to 139 ms with the row kernels and kept layouts, and the step's gradients from 135
to 97-115 ms with the guessed capacities.

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

from lfm_mlx.kernels import block_layout
from lfm_mlx.kernels.choices import KernelChoices
from lfm_mlx.kernels.dequant import dequantize
from lfm_mlx.kernels.row_gather import MISSING, gather_rows, sum_rows

CAPACITY_MULTIPLE = 16  # capacity rounded up to this: fewer distinct matmul shapes, aligned tiles
# A speculated capacity is the last need times this: routing drifts between steps (the routers
# train), and a guess that falls short costs the walk's forward pass again; a few rows more cost
# only matmul work (H200 benchmark runs: 1.25 without the slow shrink redid 10 of 47 passes, with it 5 of 61).
SPECULATION_HEADROOM = 1.25
SPECULATION_SHRINK = 0.9  # the most a guess shrinks in one step


def _round_up(rows: int) -> int:
    return -(-max(rows, 1) // CAPACITY_MULTIPLE) * CAPACITY_MULTIPLE


@dataclass(frozen=True)
class ExpertLayout:
    """Where each (token, choice) row goes: expert e's block is block rows [e * capacity, (e + 1) * capacity)."""

    source_token: mx.array  # [experts * capacity]: the token feeding each block row
    block_row: mx.array  # [tokens, k]: the block row holding each choice
    block_choice: mx.array  # [experts * capacity]: the choice each block row holds (MISSING: a spare row)
    capacity: int
    kernel: bool = False  # rows moved by the row-gather kernels (`KernelChoices.row_gather`)

    def to_blocks(self, x: mx.array) -> mx.array:
        """Token rows `x` [tokens, dims] -> block rows [experts * capacity, dims]. Its gradient
        sums each token's k block rows (a spare row's gradient is exactly zero: never read)."""
        gather = mx.custom_function(lambda v: gather_rows(v, self.source_token, self.kernel))

        @gather.vjp
        def backward(primals, cotangent, output):
            return sum_rows(cotangent, self.block_row, self.kernel)

        return gather(x)

    def from_blocks(self, out: mx.array) -> mx.array:
        """Block rows `out` [experts * capacity, dims] -> one row per choice [tokens * k, dims].
        Its gradient is a gather too: each block row takes its choice's row (spare rows: zero)."""
        gather = mx.custom_function(lambda v: gather_rows(v, self.block_row.reshape(-1), self.kernel))

        @gather.vjp
        def backward(primals, cotangent, output):
            return gather_rows(cotangent, self.block_choice, self.kernel)

        return gather(out)


def expert_layout(indices: mx.array, num_experts: int, kernel: bool = False) -> ExpertLayout:
    """The block layout for top-k choices `indices` (any leading shape, k last), computed on the
    host: one read of the indices (the matmul shapes must be known)."""
    k = indices.shape[-1]
    flat = np.array(indices.reshape(-1)).astype(np.int64)
    n = flat.size
    order = np.argsort(flat, kind="stable")  # choice ids, grouped by expert
    counts = np.bincount(flat, minlength=num_experts)
    starts = np.cumsum(counts) - counts
    capacity = _round_up(int(counts.max()))

    sorted_experts = flat[order]
    block_row = np.empty(n, dtype=np.int64)
    block_row[order] = sorted_experts * capacity + np.arange(n) - starts[sorted_experts]
    # each block row's token; spare rows repeat the expert's last real row (any row when it has none)
    rows = np.minimum(np.arange(capacity), np.maximum(counts - 1, 0)[:, None])
    position = np.minimum(starts[:, None] + rows, n - 1).reshape(-1)
    block_choice = np.full(position.size, MISSING, dtype=np.uint32)
    block_choice[block_row] = np.arange(n)
    return ExpertLayout(mx.array((order[position] // k).astype(np.uint32)),
                        mx.array(block_row.reshape(-1, k).astype(np.uint32)), mx.array(block_choice), capacity,
                        kernel)


def speculative_layout(indices: mx.array, num_experts: int, capacity: int,
                       kernel: bool = False, layout_kernel: bool = False) -> tuple[ExpertLayout, mx.array]:
    """`expert_layout` computed on the device for a capacity guessed in advance: no host read, so
    the device need not finish the layers before it first. Returns the layout and the rows the
    busiest expert needed (lazy); when that exceeds `capacity` the layout is wrong (choices past the
    capacity land in the next expert's block) and the caller must discard it. `layout_kernel`: the
    same indices from one CUDA kernel (`block_layout`; the probe chose it: `KernelChoices.layout`)."""
    if layout_kernel:
        source_token, block_row, block_choice, needed = block_layout.layout_arrays(indices, num_experts, capacity)
        return ExpertLayout(source_token, block_row, block_choice, capacity, kernel), needed
    k = indices.shape[-1]
    flat = indices.reshape(-1).astype(mx.uint32)
    n = flat.size
    order = mx.argsort(flat)  # choice ids, grouped by expert
    counts = (mx.expand_dims(flat, 1) == mx.arange(num_experts, dtype=mx.uint32)).sum(axis=0)
    starts = mx.cumsum(counts) - counts
    sorted_experts = flat[order]
    row_sorted = sorted_experts * capacity + mx.arange(n) - starts[sorted_experts]
    block_row = mx.minimum(row_sorted[mx.argsort(order)], num_experts * capacity - 1)  # in range even when wrong
    slot = mx.arange(capacity)
    rows = mx.minimum(mx.expand_dims(slot, 0), mx.expand_dims(mx.maximum(counts - 1, 0), 1))
    choice = order[mx.minimum(mx.expand_dims(starts, 1) + rows, n - 1)]
    block_choice = mx.where(mx.expand_dims(slot, 0) < mx.expand_dims(counts, 1), choice, MISSING)
    layout = ExpertLayout((choice // k).reshape(-1).astype(mx.uint32), block_row.reshape(-1, k).astype(mx.uint32),
                          block_choice.reshape(-1).astype(mx.uint32), capacity, kernel)
    return layout, counts.max()


def expert_weight(projection: nn.Module, dtype: mx.Dtype, like: mx.array, kernel: bool = False) -> mx.array:
    """A projection's expert weights `[experts, out, in]` in `dtype`, dequantized when quantized
    (by the dequantization kernel when `kernel`: `KernelChoices.dequant`).
    `like`: the activation the weights are used with; a module may tie its weight's preparation
    to it (`weight_for`) so the preparation runs just in time."""
    if hasattr(projection, "weight_for"):
        return projection.weight_for(like)
    if isinstance(projection, QuantizedSwitchLinear):
        w = dequantize(projection["weight"], projection["scales"], projection.get("biases"),
                       projection.group_size, projection.bits, projection.mode, kernel)
        return w.astype(dtype)
    return projection["weight"].astype(dtype)


def _apply(projection: nn.Module, blocks: mx.array, kernel: bool = False) -> mx.array:
    """`blocks` [experts, capacity, in] through each expert's own weights: [experts, capacity, out]."""
    w = expert_weight(projection, blocks.dtype, blocks, kernel)
    out = blocks @ w.swapaxes(-1, -2)
    if "bias" in projection:
        out = out + mx.expand_dims(projection["bias"], -2).astype(out.dtype)
    return out


class BatchedSwitchGLU(nn.Module):
    """mlx-lm's SwitchGLU (same parameters, same names, same results) computed over padded
    expert blocks by batched matmuls. Its projections may be trainable, quantized or plain.

    `keep_layout`: remember the next call's layout (`kept_layout`) and reuse it on later calls
    until `kept_layout` is cleared: the walk's recomputation routes as its forward pass did
    without reading the indices back.
    `speculate`: lay out on the device for `capacity_hint` rows per expert (the last call's need
    with SPECULATION_HEADROOM) instead of reading the indices back; `needed` then holds the rows
    the busiest expert needed (lazy), which the caller checks before trusting the result.
    `keep_activations` (frozen projections only, with `keep_layout`): also remember the call's
    gate and up projections and its output (`kept_activations`); later calls return that output
    and their gradient is the backward pass alone (`_replay`): the walk's recomputation skips the
    block's forward matmuls.
    `kernels`: the run's `KernelChoices` (row gathers, dequantization of frozen projections)."""

    def __init__(self, glu: SwitchGLU, kernels: KernelChoices | None = None):
        super().__init__()
        self.kernels = kernels or KernelChoices()
        self.gate_proj, self.up_proj, self.down_proj = glu.gate_proj, glu.up_proj, glu.down_proj
        self.activation = glu.activation
        self.keep_layout, self.speculate, self.keep_activations = False, False, False
        self.kept_layout: ExpertLayout | None = None
        self.kept_activations: tuple[mx.array, mx.array, mx.array] | None = None
        self.capacity_hint: int | None = None
        self.needed: mx.array | None = None

    def num_experts(self) -> int:
        return self.gate_proj["weight"].shape[0]

    def hint_from(self, needed: int) -> None:
        """The capacity to guess next time: the rows the busiest expert needed this time with
        headroom, shrinking by at most a tenth a step (a block whose need swings between steps
        keeps the larger guess instead of falling short every other step)."""
        shrunk = int(self.capacity_hint * SPECULATION_SHRINK) if self.capacity_hint else 0
        self.capacity_hint = _round_up(max(int(needed * SPECULATION_HEADROOM), shrunk))

    def forget(self) -> None:
        """Drop what earlier calls kept (the layout and activations)."""
        self.kept_layout, self.kept_activations = None, None

    def __call__(self, x: mx.array, indices: mx.array) -> mx.array:
        dims, experts = x.shape[-1], self.num_experts()
        if self.kept_activations is not None:
            return self._replay(x)
        layout = self.kept_layout
        if layout is None:
            indices = mx.stop_gradient(indices)
            if self.speculate and self.capacity_hint:
                layout, self.needed = speculative_layout(indices, experts, self.capacity_hint,
                                                         self.kernels.row_gather, self.kernels.layout)
            else:
                layout = expert_layout(indices, experts, self.kernels.row_gather)
                self.hint_from(layout.capacity)
            if self.keep_layout:
                self.kept_layout = layout
        blocks = layout.to_blocks(x.reshape(-1, dims)).reshape(experts, layout.capacity, dims)
        dequant = self.kernels.dequant
        up, gate = _apply(self.up_proj, blocks, dequant), _apply(self.gate_proj, blocks, dequant)
        out = _apply(self.down_proj, self.activation(up, gate), dequant)
        out = layout.from_blocks(out.reshape(-1, dims)).reshape(*indices.shape, dims)
        if self.keep_activations and self.keep_layout:
            self.kept_activations = (up, gate, out)
        return out

    def _replay(self, x: mx.array) -> mx.array:
        """The kept output, as a function of `x` whose gradient is computed from the kept gate and
        up projections: the same operations as autodiff of `__call__` on frozen projections, less
        the forward matmuls (each weight is dequantized once, just in time for its gradient)."""
        up, gate, out = self.kept_activations
        layout, dims = self.kept_layout, x.shape[-1]
        replay = mx.custom_function(lambda v: out)

        @replay.vjp
        def backward(primals, cotangent, output):
            dequant = self.kernels.dequant
            d_out = gather_rows(cotangent.reshape(-1, dims), layout.block_choice, layout.kernel)
            d_out = d_out.reshape(*up.shape[:-1], dims)
            d_hidden = d_out @ expert_weight(self.down_proj, d_out.dtype, d_out, dequant)
            _, (d_up, d_gate) = mx.vjp(self.activation, [up, gate], [d_hidden])
            d_blocks = (d_up @ expert_weight(self.up_proj, d_up.dtype, d_up, dequant)
                        + d_gate @ expert_weight(self.gate_proj, d_gate.dtype, d_gate, dequant))
            return sum_rows(d_blocks.reshape(-1, dims), layout.block_row, layout.kernel).reshape(x.shape)

        return replay(x)

    def unbatched(self) -> SwitchGLU:
        """The same projections back in a plain SwitchGLU."""
        glu = SwitchGLU(1, 1, 1)
        glu.gate_proj, glu.up_proj, glu.down_proj = self.gate_proj, self.up_proj, self.down_proj
        glu.activation = self.activation
        return glu

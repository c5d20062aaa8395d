"""The expert block layout on the device in one CUDA kernel, used where a start-up probe finds it
equal to `expert_blocks.speculative_layout` in every index and faster.

`speculative_layout` builds the layout from about twenty small MLX ops (two argsorts, a one-hot
count, a cumulative sum, gathers); measured on an H200 at 2,048 tokens it took 0.32-0.69 ms a MoE
layer, and a counting sort in MLX ops was slower still (0.63 ms: `benchmarks/layout_dequant_alternatives.py`).
Here one thread block does a stable counting sort: each warp counts its slice of the choices per
expert (`__match_any_sync` groups a warp's equal experts, so a choice's rank among them is a popcount),
a scan over the warps and the experts gives every choice its block row, and a last pass fills each
block row's choice and token as `speculative_layout` does, spare rows included.
"""

from __future__ import annotations

import mlx.core as mx

from lfm_mlx.kernels.probe import best_seconds, choose

LAYERS_TIMED = 8  # the probe times this many layouts in one evaluation, as the walk lays out its layers
WARPS = 32  # one block of 1,024 threads: the whole layout in one launch, no grid-wide sync

_SOURCE = """
    const unsigned lane = threadIdx.x & 31u, warp = threadIdx.x >> 5, threads = blockDim.x;
    const unsigned n = sizes[0], capacity = sizes[1], k = sizes[2];
    if (n == 0) {  // no choices: nothing to lay out (and no last choice for the spare rows to repeat)
        if (threadIdx.x == 0) { needed[0] = 0; }
        return;
    }
    __shared__ unsigned rank_base[WARPS][E];  // per warp and expert: first its counts, then its offset
    __shared__ unsigned counts_[E], starts_[E];
    for (unsigned e = lane; e < E; e += 32) { rank_base[warp][e] = 0; }
    __syncwarp();
    const unsigned per_warp = (n + WARPS - 1) / WARPS;
    const unsigned first = min(warp * per_warp, n), last = min(first + per_warp, n);
    for (unsigned base = first; base < last; base += 32) {  // count: a leader per group of equal experts
        const unsigned i = base + lane;
        const unsigned e = i < last ? flat[i] : 0xffffffffu;
        const unsigned peers = __match_any_sync(0xffffffffu, e);
        if (i < last && lane == __ffs(peers) - 1) { rank_base[warp][e] += __popc(peers); }
        __syncwarp();
    }
    __syncthreads();
    if (warp == 0) {  // each expert's warps in order: a stable sort
        for (unsigned e = lane; e < E; e += 32) {
            unsigned running = 0;
            for (unsigned w = 0; w < WARPS; ++w) { const unsigned c = rank_base[w][e]; rank_base[w][e] = running; running += c; }
            counts_[e] = running;
        }
        __syncwarp();
        if (lane == 0) {
            unsigned start = 0, busiest = 0;
            for (unsigned e = 0; e < E; ++e) { starts_[e] = start; start += counts_[e]; busiest = max(busiest, counts_[e]); }
            needed[0] = busiest;
        }
    }
    __syncthreads();
    for (unsigned base = first; base < last; base += 32) {  // each choice's slot, in its expert's order
        const unsigned i = base + lane;
        const unsigned e = i < last ? flat[i] : 0xffffffffu;
        const unsigned peers = __match_any_sync(0xffffffffu, e);
        if (i < last) {
            const unsigned slot = rank_base[warp][e] + __popc(peers & ((1u << lane) - 1u));
            block_row[i] = min(e * capacity + slot, E * capacity - 1);  // in range even when the guess fell short
            order[starts_[e] + slot] = i;
        }
        __syncwarp();
        if (i < last && lane == __ffs(peers) - 1) { rank_base[warp][e] += __popc(peers); }
        __syncwarp();
    }
    __syncthreads();  // order[] complete (global writes of this block are visible after the barrier)
    for (unsigned r = threadIdx.x; r < E * capacity; r += threads) {  // block rows: spare ones repeat the last
        const unsigned e = r / capacity, slot = r % capacity, count = counts_[e];
        const unsigned position = min(starts_[e] + min(slot, max(count, 1u) - 1u), n - 1);
        const unsigned choice = order[position];
        block_choice[r] = slot < count ? choice : 0xffffffffu;  // row_gather.MISSING
        source_token[r] = choice / k;
    }
"""

_kernel = None


def _build():
    global _kernel
    if _kernel is None:
        _kernel = mx.fast.cuda_kernel(name="lfm_expert_block_layout", input_names=["flat", "sizes"],
                                      output_names=["block_row", "block_choice", "source_token", "order", "needed"],
                                      source=_SOURCE)
    return _kernel


def layout_arrays(indices: mx.array, num_experts: int, capacity: int) -> tuple[mx.array, ...]:
    """(source_token [experts * capacity], block_row [choices, k], block_choice [experts * capacity], needed)
    as `speculative_layout` computes them, from one kernel launch. The sizes go in as an array: a
    template value per capacity would compile the kernel again for every guess."""
    k = indices.shape[-1]
    flat = indices.reshape(-1).astype(mx.uint32)
    rows = num_experts * capacity
    block_row, block_choice, source_token, _, needed = _build()(
        inputs=[flat, mx.array([flat.size, capacity, k], dtype=mx.uint32)],
        template=[("E", num_experts), ("WARPS", WARPS)],
        grid=(32 * WARPS, 1, 1), threadgroup=(32 * WARPS, 1, 1),
        output_shapes=[(flat.size,), (rows,), (rows,), (flat.size,), (1,)], output_dtypes=[mx.uint32] * 5)
    return source_token, block_row.reshape(-1, k), block_choice, needed[0]


def skewed_routing(tokens: int, num_experts: int, choices: int, key: mx.array) -> mx.array:
    """Top-`choices` expert indices [1, tokens, choices] (a batch, as the model routes) from random
    logits with a random bias per expert: some experts busier than others, as trained routers are."""
    logits = mx.random.normal((tokens, num_experts), key=key) + mx.random.normal((num_experts,), key=key)
    return mx.argpartition(-logits, kth=choices - 1, axis=-1)[None, :, :choices].astype(mx.uint32)


def _arrays(layout, needed: mx.array) -> tuple[mx.array, ...]:
    return layout.source_token, layout.block_row, layout.block_choice, needed


def probe(num_experts: int, choices: int, tokens: int, speculative) -> dict:
    """Decide whether the walk's device layouts use the kernel: on skewed random routing of `tokens`
    tokens (top-`choices` of `num_experts`), at a capacity that holds and at one that falls short,
    every index array must equal `speculative(indices, num_experts, capacity)`'s (the MLX layout) in
    shape and value, and the kernel must be faster. Timed as the walk runs layouts, several in one
    evaluation (one each timed the evaluation's own cost, ~0.3 ms on an H100, as much as a layout).
    Returns the record: the choice ("kernel" or "mlx"), why."""
    if mx.default_device() != mx.gpu or not mx.cuda.is_available():
        return {"choice": "mlx", "reason": "not the CUDA backend"}
    indices = skewed_routing(tokens, num_experts, choices, mx.random.key(0))
    busiest = int(mx.max(mx.sum(mx.expand_dims(indices.reshape(-1), 1) == mx.arange(num_experts), axis=0)).item())
    holds, short = -(-busiest * 5 // 4 // 16) * 16, max(16, busiest // 2 // 16 * 16)
    layers = [(indices + shift) % num_experts for shift in range(LAYERS_TIMED)]  # as many routings as layers
    record = {"tokens": tokens, "busiest": busiest, "layouts_timed_together": LAYERS_TIMED}
    try:
        differing = 0
        for capacity in (holds, short):
            mine = layout_arrays(indices, num_experts, capacity)
            theirs = _arrays(*speculative(indices, num_experts, capacity))
            differing += sum(a.size if a.shape != b.shape else (a != b.astype(a.dtype)).sum().item()
                             for a, b in zip(mine, theirs))
        record["kernel_s"] = best_seconds(lambda: [layout_arrays(i, num_experts, holds) for i in layers])
        record["mlx_s"] = best_seconds(lambda: [_arrays(*speculative(i, num_experts, holds)) for i in layers])
    except Exception as err:  # a build or launch failure leaves MLX's layout in place
        return {"choice": "mlx", "reason": f"kernel failed: {type(err).__name__}: {err}"}
    return {"choice": "mlx", **choose(record, differing, "layout indices")}

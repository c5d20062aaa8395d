"""Row gathers between tokens and expert blocks, through CUDA kernels where a start-up probe finds
them bit-identical to MLX's own ops and faster.

An expert block's forward gathers every (token, choice) row into its block and gathers the outputs
back; its backward does the reverse. MLX's gather and its gradient (a scatter-add) move whole rows
through per-element indexing; measured on an H200 at the LFM2.5-8B-A1B shapes they reached about
0.15 TB/s, which made the row copies cost more than the block matmuls. The kernels here copy rows
with 16-byte loads and stores, and the backward of the token-to-block gather becomes a gather too
(each token sums its k block rows; the spare rows' gradients are exactly zero), so nothing scatters.

`gather_rows(src, index)`: out[r] = src[index[r]], a zero row where index[r] is MISSING.
`sum_rows(src, index)`: out[t] = sum over j of src[index[t, j]], in float32, rounded once.
"""

from __future__ import annotations

import mlx.core as mx

from lfm_mlx.kernels.probe import best_seconds, choose

MISSING = 0xFFFFFFFF  # an index that gathers a zero row
VECTOR_BYTES = 16  # one uint4 per thread

_GATHER_SOURCE = """
    const size_t item = blockIdx.x * (size_t)blockDim.x + threadIdx.x;
    if (item >= rows[0] * (size_t)ROW_VECTORS) {
        return;
    }
    const size_t row = item / ROW_VECTORS, column = item % ROW_VECTORS;
    const uint32_t from = index[row];
    uint4 value = make_uint4(0, 0, 0, 0);
    if (from != 0xFFFFFFFFu) {
        value = reinterpret_cast<const uint4*>(src)[(size_t)from * ROW_VECTORS + column];
    }
    reinterpret_cast<uint4*>(out)[item] = value;
"""

_SUM_SOURCE = """
    const size_t item = blockIdx.x * (size_t)blockDim.x + threadIdx.x;
    if (item >= rows[0] * (size_t)ROW_VECTORS) {
        return;
    }
    const size_t row = item / ROW_VECTORS, column = item % ROW_VECTORS;
    float total[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
    for (int j = 0; j < K; ++j) {
        const uint4 packed = reinterpret_cast<const uint4*>(src)[(size_t)index[row * K + j] * ROW_VECTORS + column];
        const __nv_bfloat16* values = reinterpret_cast<const __nv_bfloat16*>(&packed);
#pragma unroll
        for (int e = 0; e < 8; ++e) {
            total[e] += __bfloat162float(values[e]);
        }
    }
    __align__(16) __nv_bfloat16 result[8];
#pragma unroll
    for (int e = 0; e < 8; ++e) {
        result[e] = __float2bfloat16(total[e]);
    }
    reinterpret_cast<uint4*>(out)[item] = *reinterpret_cast<const uint4*>(result);
"""

_kernels: dict[str, object] = {}


def _kernel(name: str, source: str):
    if name not in _kernels:
        _kernels[name] = mx.fast.cuda_kernel(name=f"lfm_{name}", input_names=["src", "index", "rows"],
                                             output_names=["out"], source=source)
    return _kernels[name]


def _launch(name: str, source: str, src: mx.array, index: mx.array, rows: int, template: list) -> mx.array:
    """The row count goes in as an array, not a template value: the blocks' capacity changes from
    call to call, and each template value is a kernel compilation (measured: a 6 s first step)."""
    row_vectors = src.shape[-1] * src.dtype.size // VECTOR_BYTES
    (out,) = _kernel(name, source)(inputs=[src, index, mx.array([rows], dtype=mx.uint32)],
                                   template=[("ROW_VECTORS", row_vectors), *template],
                                   grid=(rows * row_vectors, 1, 1), threadgroup=(256, 1, 1),
                                   output_shapes=[(rows, src.shape[-1])], output_dtypes=[src.dtype])
    return out


def _fits(src: mx.array, for_sum: bool) -> bool:
    return (src.ndim == 2 and (src.shape[-1] * src.dtype.size) % VECTOR_BYTES == 0
            and (not for_sum or src.dtype == mx.bfloat16))


def gather_rows_mlx(src: mx.array, index: mx.array) -> mx.array:
    present = index != MISSING
    rows = src[mx.where(present, index, 0)]
    return mx.where(mx.expand_dims(present, -1), rows, mx.zeros((), dtype=src.dtype))


def sum_rows_mlx(src: mx.array, index: mx.array) -> mx.array:
    rows = src[index.reshape(-1)].reshape(*index.shape, src.shape[-1]).astype(mx.float32)
    total = rows[:, 0]
    for j in range(1, index.shape[1]):  # in order, as the kernel adds
        total = total + rows[:, j]
    return total.astype(src.dtype)


def gather_rows(src: mx.array, index: mx.array, kernel: bool = False) -> mx.array:
    """Rows of `src` [N, D] at `index` [M] (uint32; MISSING gives a zero row): [M, D]; through the
    kernel when `kernel` (the probe chose it: `KernelChoices.row_gather`) and the rows fit."""
    if kernel and _fits(src, False):
        return _launch("gather_rows", _GATHER_SOURCE, src, index, index.size, [])
    return gather_rows_mlx(src, index)


def sum_rows(src: mx.array, index: mx.array, kernel: bool = False) -> mx.array:
    """For `index` [T, K] (uint32): out[t] = sum of src[index[t, j]] over j, accumulated in float32: [T, D]."""
    if kernel and _fits(src, True):
        return _launch("sum_rows", _SUM_SOURCE, src, index.reshape(-1), index.shape[0], [("K", index.shape[1])])
    return sum_rows_mlx(src, index)


def probe(tokens: int, choices: int, rows: int, dims: int, dtype: mx.Dtype) -> dict:
    """Decide whether the row gathers use the kernels, on random data of the expert blocks' shapes
    (`tokens` x `choices` rows gathered into `rows` block rows of `dims`): both kernels must match
    MLX's ops bit for bit and be faster together. Returns the record: the choice ("kernel" or "mlx"), why."""
    if mx.default_device() != mx.gpu or not mx.cuda.is_available():
        return {"choice": "mlx", "reason": "not the CUDA backend"}
    if dtype != mx.bfloat16 or (dims * 2) % VECTOR_BYTES:
        return {"choice": "mlx", "reason": f"rows of {dims} {dtype} values"}
    key = mx.random.key(0)
    x = mx.random.normal((tokens, dims), key=key).astype(dtype)
    blocks = mx.random.normal((rows, dims), key=key).astype(dtype)
    source = mx.random.randint(0, tokens, (rows,), key=key).astype(mx.uint32)
    source = mx.where(mx.arange(rows) % 7 == 3, MISSING, source).astype(mx.uint32)
    picks = mx.random.randint(0, rows, (tokens, choices), key=key).astype(mx.uint32)
    ops = {"gather": (lambda: _launch("gather_rows", _GATHER_SOURCE, x, source, rows, []),
                      lambda: gather_rows_mlx(x, source)),
           "sum": (lambda: _launch("sum_rows", _SUM_SOURCE, blocks, picks.reshape(-1), tokens, [("K", choices)]),
                   lambda: sum_rows_mlx(blocks, picks))}
    record = {"rows": rows, "dims": dims}
    try:
        for name, (mine, theirs) in ops.items():
            differing = (mine().view(mx.uint16) != theirs().view(mx.uint16)).sum().item()
            record[f"{name}_differing"] = differing
            record[f"{name}_kernel_s"] = best_seconds(mine)
            record[f"{name}_mlx_s"] = best_seconds(theirs)
    except Exception as err:  # a build or launch failure leaves MLX's ops in place
        return {"choice": "mlx", "reason": f"kernel failed: {type(err).__name__}: {err}"}
    record.update(kernel_s=record["gather_kernel_s"] + record["sum_kernel_s"],
                  mlx_s=record["gather_mlx_s"] + record["sum_mlx_s"])
    return {"choice": "mlx", **choose(record, record["gather_differing"] + record["sum_differing"], "rows")}

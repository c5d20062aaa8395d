"""AdamW moments as 8-bit codes (the fused AdamW's `state_bits=8`): packing with stochastic
rounding, unpacking, and on CUDA a custom packing kernel chosen when it is bit-identical.

A moment is stored per MOMENT_GROUP elements as 8-bit affine codes (mx.dequantize's layout) with
a float32 scale and bias spanning exactly the group's [min, max]. Rounding is stochastic, from
noise that is a hash of each element's index and a per-call seed (`moment_noise`): the same
numbers on every backend and in the kernel, and far cheaper than MLX's counter-based generator.

Measured on an H200 (one 33M-element block): MLX's packing graph took 3.3-3.9 ms, most of the
int8 update (28.8 ms for a 117M-element expert stack against 2.7 ms with float32 moments); the
kernel computes the same codes one group per thread in 0.20 ms (the stack's update: 6.2 ms).
"""

from __future__ import annotations

import math

import mlx.core as mx

from lfm_mlx.kernels.probe import begin, best_seconds, choose
from lfm_mlx.model.quant import pack_codes

MOMENT_GROUP = 64  # elements per scale / bias pair of an int8 moment
V_FLOOR = 1e-20  # added to the second moment before its logarithm: sqrt(1e-20) is 1e-10, far under eps


def _mix(i: mx.array) -> mx.array:
    """A 32-bit integer hash (the "lowbias32" constants): wrapping uint32 arithmetic."""
    i = i ^ (i >> 16)
    i = i * mx.array(0x7FEB352D, dtype=mx.uint32)
    i = i ^ (i >> 15)
    i = i * mx.array(0x846CA68B, dtype=mx.uint32)
    return i ^ (i >> 16)


def moment_noise(shape: tuple[int, ...], seed: mx.array) -> mx.array:
    """Uniform [0, 1) float32 noise of `shape`, a hash of each element's flat index and `seed`
    (a uint32 scalar array): 24 random bits per element."""
    index = mx.arange(math.prod(shape), dtype=mx.uint32).reshape(shape)
    bits = _mix(_mix(index ^ seed) + seed) >> 8
    return bits.astype(mx.float32) * (1.0 / (1 << 24))


WEIGHT_STREAM = 0x9E3779B9  # added to a seed for the weights' rounding noise: not the moments' bits


def round_to_bfloat16(x: mx.array, seed: mx.array) -> mx.array:
    """float32 `x` rounded stochastically to bfloat16: up with probability equal to the distance
    to the lower neighbour over the gap, so the result is unbiased (its expectation is x).

    bfloat16 keeps the top 16 bits of the float32 encoding; adding 16 random bits (a hash of each
    element's index and `seed`) to the 16 dropped ones carries into the kept part with exactly that
    probability, for either sign (the encoding is sign and magnitude)."""
    index = mx.arange(x.size, dtype=mx.uint32).reshape(x.shape)
    noise = _mix(_mix(index ^ seed) + seed) >> 16
    kept = (x.astype(mx.float32).view(mx.uint32) + noise) & mx.array(0xFFFF0000, dtype=mx.uint32)
    return kept.view(mx.float32).astype(mx.bfloat16)  # exact: the dropped bits are zero


def pack_moment(x: mx.array, offset: mx.array | float = 0.5) -> dict[str, mx.array]:
    """A float32 moment as 8-bit codes (see the module). `offset` 0.5 rounds to nearest; uniform
    noise in [0, 1) of x's shape rounds stochastically: the stored value is then unbiased and
    within one code of x. (mx.quantize may pin the larger-magnitude end and clip the other: a bias.)"""
    groups = x.reshape(*x.shape[:-1], x.shape[-1] // MOMENT_GROUP, MOMENT_GROUP)
    low = groups.min(axis=-1)
    scale = (groups.max(axis=-1) - low) / 255
    units = (groups - low[..., None]) / mx.where(scale == 0, 1.0, scale)[..., None]
    if not isinstance(offset, float):
        offset = offset.reshape(units.shape)
    codes = mx.clip(mx.floor(units + offset), 0, 255).reshape(x.shape)
    return {"codes": pack_codes(codes, 8), "scales": scale, "biases": low}


def unpack_moment(packed: dict[str, mx.array]) -> mx.array:
    return mx.dequantize(packed["codes"], packed["scales"], packed["biases"], group_size=MOMENT_GROUP, bits=8)


# ---------------------------------------------------------------- the CUDA packing kernel

_SOURCE = """
    const size_t group = blockIdx.x * (size_t)blockDim.x + threadIdx.x;
    if (group >= GROUPS) {
        return;
    }
    const float4* source = reinterpret_cast<const float4*>(x) + group * 16;
    float values[64];
    float low = __int_as_float(0x7f800000), high = -low;  // +inf, -inf
#pragma unroll
    for (int j = 0; j < 16; ++j) {
        const float4 f = source[j];
        values[4 * j] = f.x; values[4 * j + 1] = f.y; values[4 * j + 2] = f.z; values[4 * j + 3] = f.w;
        low = fminf(low, fminf(fminf(f.x, f.y), fminf(f.z, f.w)));
        high = fmaxf(high, fmaxf(fmaxf(f.x, f.y), fmaxf(f.z, f.w)));
    }
    const float scale = (high - low) / 255.0f;
    const float divisor = scale == 0.0f ? 1.0f : scale;
    const uint32_t s = seed[0];
    uint32_t* target = codes + group * 16;
#pragma unroll
    for (int w = 0; w < 16; ++w) {
        uint32_t word = 0;
#pragma unroll
        for (int b = 0; b < 4; ++b) {
            const int j = 4 * w + b;
            uint32_t h = static_cast<uint32_t>(group * 64 + j) ^ s;  // moment_noise, same bits
            h ^= h >> 16; h *= 0x7FEB352Du; h ^= h >> 15; h *= 0x846CA68Bu; h ^= h >> 16;
            h += s;
            h ^= h >> 16; h *= 0x7FEB352Du; h ^= h >> 15; h *= 0x846CA68Bu; h ^= h >> 16;
            const float u = static_cast<float>(h >> 8) * (1.0f / 16777216.0f);
            const float offset = FLIP ? 1.0f - u : u;
            const float units = (values[j] - low) / divisor;
            const float code = fminf(fmaxf(floorf(units + offset), 0.0f), 255.0f);
            word |= static_cast<uint32_t>(code) << (8 * b);
        }
        target[w] = word;
    }
    scales[group] = scale;
    biases[group] = low;
"""

_kernel = None
PROBE_ELEMENTS = 1 << 20  # the probe waits for a moment this large: small ones time launch costs


def unprobed() -> dict:
    """A run's record of the packing probe before it ran (`KernelChoices.update.moments`); choice
    "kernel" once the probe chose the CUDA kernel."""
    return {"choice": None, "reason": f"not probed yet: MLX's packing until a moment of {PROBE_ELEMENTS} elements"}


def _kernel_pack(x: mx.array, seed: mx.array, flip: bool) -> dict[str, mx.array]:
    global _kernel
    if _kernel is None:
        _kernel = mx.fast.cuda_kernel(name="lfm_pack_moment", input_names=["x", "seed"],
                                      output_names=["codes", "scales", "biases"], source=_SOURCE)
    groups = x.size // MOMENT_GROUP
    group_shape = (*x.shape[:-1], x.shape[-1] // MOMENT_GROUP)
    codes, scales, biases = _kernel(
        inputs=[x.astype(mx.float32), seed.reshape(1)],
        template=[("GROUPS", groups), ("FLIP", flip)],
        grid=(groups, 1, 1), threadgroup=(128, 1, 1),
        output_shapes=[(*x.shape[:-1], x.shape[-1] // 4), group_shape, group_shape],
        output_dtypes=[mx.uint32, mx.float32, mx.float32])
    return {"codes": codes, "scales": scales, "biases": biases}


# MLX's own graph, compiled (its elementwise steps fused): the path off CUDA.
_pack = mx.compile(lambda x, seed: pack_moment(x, moment_noise(x.shape, seed)))
_pack_flipped = mx.compile(lambda x, seed: pack_moment(x, 1 - moment_noise(x.shape, seed)))


def pack_moment_noisy(x: mx.array, seed: mx.array, flip: bool = False, record: dict | None = None) -> dict[str, mx.array]:
    """`pack_moment` of x rounded stochastically with `moment_noise(x.shape, seed)` (1 - noise
    with `flip`): through the CUDA kernel once the probe (on the run's first moment of PROBE_ELEMENTS
    or more, into the run's `record`) found it identical and faster; without a record, MLX's graph."""
    if record is not None and record["choice"] is None and x.size >= PROBE_ELEMENTS:
        probe(x, seed, record)
    if record is not None and record["choice"] == "kernel":
        return _kernel_pack(x, seed, flip)
    return (_pack_flipped if flip else _pack)(x, seed)


def probe(x: mx.array, seed: mx.array, record: dict | None = None) -> dict:
    """Decide on a real moment `x` whether packing uses the kernel (same codes, scales and biases
    bit for bit as MLX's graph, with and without flipped noise, and faster); records in `record`."""
    record, on_cuda = begin(record)
    if not on_cuda:
        return record
    if x.shape[-1] % MOMENT_GROUP:
        record["reason"] = f"last axis {x.shape[-1]} is not a multiple of {MOMENT_GROUP}"
        return record

    def reference(flip: bool) -> dict:
        return (_pack_flipped if flip else _pack)(x, seed)

    try:
        differing = 0
        for flip in (False, True):
            mine, theirs = _kernel_pack(x, seed, flip), reference(flip)
            for name in ("codes", "scales", "biases"):
                a, b = mine[name], theirs[name]
                if name != "codes":
                    a, b = a.view(mx.uint32), b.view(mx.uint32)
                differing += (a != b).sum().item()
    except Exception as err:  # a build or launch failure leaves MLX's graph in place
        record["reason"] = f"kernel failed: {type(err).__name__}: {err}"
        return record
    record.update(elements=x.size, differing=differing, mlx_s=best_seconds(lambda: reference(False)),
                  kernel_s=best_seconds(lambda: _kernel_pack(x, seed, False)))
    choose(record, differing, "codes, scales or biases")
    return record

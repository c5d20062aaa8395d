"""Int8 expert dequantization on CUDA through a custom kernel, used where a start-up probe finds it
bit-identical to `mx.dequantize` and faster.

The frozen experts are dequantized just in time, twice per layer and step (the forward pass and
its recomputation in the backward pass), so this copy is on the step's critical path. MLX's own
CUDA kernel writes one element per thread; measured on an H200 at the LFM2.5-8B-A1B shapes it
moved about 0.6 TB/s (0.58 ms for one 117M-element expert stack). This kernel has each thread
read 16 codes in one 16-byte load and write them in two 16-byte stores.

It computes what MLX's kernel computes, `scale * code + bias` rounded once to bfloat16 (MLX's
bfloat16 multiply and add compile to one fused multiply-add; here the product and sum are exact in
float64, then rounded). Rounding the product first instead changed half of the 117M elements.
The probe checks the outputs bit for bit and keeps `mx.dequantize` on any difference, on any
other backend, dtype or bit width, and whenever the kernel cannot be built.
"""

from __future__ import annotations

import mlx.core as mx

from lfm_mlx.kernels.probe import best_seconds

CODES_PER_THREAD = 16  # one 16-byte load of packed 8-bit codes

_SOURCE = """
    const size_t chunk = blockIdx.x * (size_t)blockDim.x + threadIdx.x;
    if (chunk >= CHUNKS) {
        return;
    }
    const uint4 packed = reinterpret_cast<const uint4*>(w)[chunk];
    const size_t group = chunk / (GROUP_SIZE / 16);
    const float scale = static_cast<float>(scales[group]);  // bf16 values: exact in float and double
    const double bias = static_cast<double>(static_cast<float>(biases[group]));
    const uint32_t words[4] = {packed.x, packed.y, packed.z, packed.w};
    __align__(16) __nv_bfloat16 values[16];
#pragma unroll
    for (int j = 0; j < 16; ++j) {
        const double code = static_cast<double>((words[j / 4] >> (8 * (j % 4))) & 0xffu);
        values[j] = __double2bfloat16(static_cast<double>(scale) * code + bias);  // exact, then one rounding
    }
    uint4* target = reinterpret_cast<uint4*>(out) + 2 * chunk;
    target[0] = reinterpret_cast<const uint4*>(values)[0];
    target[1] = reinterpret_cast<const uint4*>(values)[1];
"""

_kernel = None


def _build():
    global _kernel
    if _kernel is None:
        _kernel = mx.fast.cuda_kernel(name="lfm_dequantize_int8_bf16", input_names=["w", "scales", "biases"],
                                      output_names=["out"], source=_SOURCE)
    return _kernel


def _fits(w: mx.array, scales: mx.array, biases: mx.array | None, group_size: int, bits: int, mode: str) -> bool:
    """Whether the kernel handles these arrays: 8-bit affine codes, bf16 scales and biases, whole
    16-code chunks inside each quantization group."""
    return (bits == 8 and mode == "affine" and biases is not None and scales.dtype == mx.bfloat16
            and biases.dtype == mx.bfloat16 and w.dtype == mx.uint32 and group_size % CODES_PER_THREAD == 0)


def _kernel_dequantize(w: mx.array, scales: mx.array, biases: mx.array, group_size: int) -> mx.array:
    elements = w.size * 4
    chunks = elements // CODES_PER_THREAD
    (out,) = _build()(inputs=[w, scales, biases], template=[("CHUNKS", chunks), ("GROUP_SIZE", group_size)],
                      grid=(chunks, 1, 1), threadgroup=(256, 1, 1),
                      output_shapes=[(*w.shape[:-1], w.shape[-1] * 4)], output_dtypes=[mx.bfloat16])
    return out


def dequantize(w: mx.array, scales: mx.array, biases: mx.array | None, group_size: int, bits: int,
               mode: str = "affine", kernel: bool = False) -> mx.array:
    """`mx.dequantize`, through the custom kernel when `kernel` (the probe chose it: `KernelChoices.dequant`)
    and the arrays fit."""
    if kernel and _fits(w, scales, biases, group_size, bits, mode):
        return _kernel_dequantize(w, scales, biases, group_size)
    return mx.dequantize(w, scales, biases, group_size=group_size, bits=bits, mode=mode)


def probe(w: mx.array, scales: mx.array, biases: mx.array | None, group_size: int, bits: int,
          mode: str = "affine") -> dict:
    """Decide, on these (real) arrays, whether `dequantize` should use the kernel; returns the record:
    the choice ("kernel" or "mx.dequantize"), why, and the timings when both ran."""
    if mx.default_device() != mx.gpu or not mx.cuda.is_available():
        return {"choice": "mx.dequantize", "reason": "not the CUDA backend"}
    if not _fits(w, scales, biases, group_size, bits, mode):
        return {"choice": "mx.dequantize", "reason": f"not 8-bit affine with bf16 scales (bits={bits}, mode={mode})"}
    try:
        mine = _kernel_dequantize(w, scales, biases, group_size)
        theirs = mx.dequantize(w, scales, biases, group_size=group_size, bits=bits, mode=mode)
        differing = (mine.view(mx.uint16) != theirs.view(mx.uint16)).sum().item()
    except Exception as err:  # a build or launch failure leaves MLX's own kernel in place
        return {"choice": "mx.dequantize", "reason": f"kernel failed: {type(err).__name__}: {err}"}
    record = {"elements": theirs.size, "differing_elements": differing,
              "kernel_s": best_seconds(lambda: _kernel_dequantize(w, scales, biases, group_size)),
              "mx_dequantize_s": best_seconds(lambda: mx.dequantize(w, scales, biases, group_size=group_size,
                                                                bits=bits, mode=mode))}
    if differing:
        return record | {"choice": "mx.dequantize", "reason": f"{differing} elements differ from mx.dequantize"}
    faster = record["kernel_s"] < record["mx_dequantize_s"]
    return record | {"choice": "kernel" if faster else "mx.dequantize",
                     "reason": "bit-identical, " + ("faster" if faster else "not faster")}

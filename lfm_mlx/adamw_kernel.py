"""The fused AdamW update with float32 moments and a float32 master as one CUDA kernel, used where
a start-up probe finds it bit-identical to the compiled MLX update and faster.

The update reads a bf16 gradient and float32 weights and moments and writes them back: 26 bytes
an element, 1.41B elements at group 4 of the 8B model. MLX's compiled kernel moved them at about
1.8 TB/s on an H200 (23-25 ms a step); this one has each thread update four elements with 16-byte
loads and stores. Each operation is rounded as MLX's graph rounds it (no contraction into fused
multiply-adds), in the graph's order; the probe compares every output bit for bit and keeps MLX's
update on any difference, on any other backend or dtype, and whenever the kernel cannot be built.
"""

from __future__ import annotations

import mlx.core as mx

from lfm_mlx.kernel_probe import best_seconds, choose

PROBE_ELEMENTS = 1 << 20  # the probe waits for a tensor this large: small ones time launch costs

_SOURCE = """
    const size_t item = blockIdx.x * (size_t)blockDim.x + threadIdx.x;
    if (item >= count[0]) {
        return;
    }
    const float rate = lr[0], factor = scale[0];
    const float b1 = constants[0], one_minus_b1 = constants[1], b2 = constants[2], one_minus_b2 = constants[3];
    const float eps = constants[4], decay = __fsub_rn(1.0f, __fmul_rn(rate, constants[5]));
    const float4 weights = reinterpret_cast<const float4*>(p)[item];
    const float4 first = reinterpret_cast<const float4*>(m)[item];
    const float4 second = reinterpret_cast<const float4*>(v)[item];
    const uint2 packed = reinterpret_cast<const uint2*>(g)[item];
    const __nv_bfloat16* grads = reinterpret_cast<const __nv_bfloat16*>(&packed);
    const float w_in[4] = {weights.x, weights.y, weights.z, weights.w};
    const float m_in[4] = {first.x, first.y, first.z, first.w};
    const float v_in[4] = {second.x, second.y, second.z, second.w};
    float w_out[4], m_out[4], v_out[4];
#pragma unroll
    for (int j = 0; j < 4; ++j) {
        const float grad = __fmul_rn(__bfloat162float(grads[j]), factor);
        m_out[j] = __fadd_rn(__fmul_rn(b1, m_in[j]), __fmul_rn(one_minus_b1, grad));
        v_out[j] = __fadd_rn(__fmul_rn(b2, v_in[j]), __fmul_rn(__fmul_rn(one_minus_b2, grad), grad));
        const float step = __fdiv_rn(__fmul_rn(rate, m_out[j]), __fadd_rn(__fsqrt_rn(v_out[j]), eps));
        w_out[j] = __fsub_rn(__fmul_rn(w_in[j], decay), step);
    }
    reinterpret_cast<float4*>(p_out)[item] = make_float4(w_out[0], w_out[1], w_out[2], w_out[3]);
    reinterpret_cast<float4*>(m_out_)[item] = make_float4(m_out[0], m_out[1], m_out[2], m_out[3]);
    reinterpret_cast<float4*>(v_out_)[item] = make_float4(v_out[0], v_out[1], v_out[2], v_out[3]);
"""

_kernel = None
# The probe's record; choice "kernel" once it chose the CUDA kernel.
KERNEL = {"choice": None, "reason": f"not probed yet: MLX's update until a tensor of {PROBE_ELEMENTS} elements"}


def fits(g: mx.array, p: mx.array, m: mx.array, v: mx.array) -> bool:
    """Whether the kernel handles these arrays: a bf16 gradient, float32 weights and moments, whole
    groups of four elements."""
    return (g.dtype == mx.bfloat16 and p.dtype == m.dtype == v.dtype == mx.float32 and p.size % 4 == 0
            and g.shape == p.shape == m.shape == v.shape)


def _launch(g, p, m, v, lr, scale, b1, b2, eps, wd):
    global _kernel
    if _kernel is None:
        _kernel = mx.fast.cuda_kernel(name="lfm_adamw_float32", input_names=["g", "p", "m", "v", "lr", "scale",
                                                                             "constants", "count"],
                                      output_names=["p_out", "m_out_", "v_out_"], source=_SOURCE)
    vectors = p.size // 4
    constants = mx.array([b1, 1 - b1, b2, 1 - b2, eps, wd], dtype=mx.float32)
    return _kernel(inputs=[g, p, m, v, lr.reshape(1).astype(mx.float32), scale.reshape(1).astype(mx.float32),
                           constants, mx.array([vectors], dtype=mx.uint64)],
                   grid=(vectors, 1, 1), threadgroup=(256, 1, 1),
                   output_shapes=[p.shape] * 3, output_dtypes=[mx.float32] * 3)


def update(reference, g, p, m, v, lr, scale, b1, b2, eps, wd):
    """(new weights, first moment, second moment): through the kernel once the probe (on the first
    tensor of PROBE_ELEMENTS or more) chose it, else `reference` (the compiled MLX update)."""
    if fits(g, p, m, v):
        if KERNEL["choice"] is None and p.size >= PROBE_ELEMENTS:
            probe(reference, g, p, m, v, lr, scale, b1, b2, eps, wd)
        if KERNEL["choice"] == "kernel":
            return tuple(_launch(g, p, m, v, lr, scale, b1, b2, eps, wd))
    return reference(g, p, m, v, lr, scale, b1, b2, eps, wd)


def probe(reference, g, p, m, v, lr, scale, b1, b2, eps, wd) -> dict:
    """Decide on a real update whether the kernel is used: the same bits in all three outputs as
    `reference`, and faster. Records in KERNEL."""
    KERNEL.clear()
    KERNEL["choice"] = "mlx"
    if mx.default_device() != mx.gpu or not mx.cuda.is_available():
        KERNEL["reason"] = "not the CUDA backend"
        return KERNEL
    try:
        mine = _launch(g, p, m, v, lr, scale, b1, b2, eps, wd)
        theirs = reference(g, p, m, v, lr, scale, b1, b2, eps, wd)
        differing = sum((a.view(mx.uint32) != b.view(mx.uint32)).sum().item() for a, b in zip(mine, theirs))
    except Exception as err:  # a build or launch failure leaves MLX's update in place
        KERNEL["reason"] = f"kernel failed: {type(err).__name__}: {err}"
        return KERNEL
    KERNEL.update(elements=p.size, differing=differing,
                  mlx_s=best_seconds(lambda: reference(g, p, m, v, lr, scale, b1, b2, eps, wd)),
                  kernel_s=best_seconds(lambda: _launch(g, p, m, v, lr, scale, b1, b2, eps, wd)))
    return choose(KERNEL, differing, "elements of the new weights and moments")

"""The fused AdamW update with float32 moments as one CUDA kernel, used where a start-up probe
finds it bit-identical to the compiled MLX update and faster. Two layouts of the master: a float32
array, or split into the bfloat16 weights and their 16 low bits (`kernels.master_bits`).

The update reads a bf16 gradient, the master (4 bytes) and float32 moments and writes them back:
26 bytes an element, 1.41B elements at group 4 of the 8B model. MLX's compiled kernel moved them
at about 1.8 TB/s on an H200 (23-25 ms a step); this one has each thread update four elements with
8- and 16-byte loads and stores. Each operation is rounded as MLX's graph rounds it (no contraction
into fused multiply-adds), in the graph's order; the probe compares every output bit for bit and
keeps MLX's update on any difference, on any other backend or dtype, and whenever the kernel
cannot be built.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx

from lfm_mlx.kernels.probe import begin, best_seconds, choose

PROBE_ELEMENTS = 1 << 20  # the probe waits for a tensor this large: small ones time launch costs

# The master's four elements in w_in[] (float32) and back out of w_out[], per layout.
_LOAD = {
    "float32": """
    const float4 weights = reinterpret_cast<const float4*>(p)[item];
    const float w_in[4] = {weights.x, weights.y, weights.z, weights.w};""",
    "split": """
    const uint2 high_in = reinterpret_cast<const uint2*>(high)[item];
    const uint2 low_in = reinterpret_cast<const uint2*>(low)[item];
    const uint16_t* highs = reinterpret_cast<const uint16_t*>(&high_in);
    const uint16_t* lows = reinterpret_cast<const uint16_t*>(&low_in);
    float w_in[4];
#pragma unroll
    for (int j = 0; j < 4; ++j) {  // master_bits.join_master
        const uint32_t rounded_up = lows[j] >= 0x8000u ? 1u : 0u;
        w_in[j] = __uint_as_float(((static_cast<uint32_t>(highs[j]) - rounded_up) << 16) | lows[j]);
    }""",
}
_STORE = {
    "float32": """
    reinterpret_cast<float4*>(p_out)[item] = make_float4(w_out[0], w_out[1], w_out[2], w_out[3]);""",
    "split": """
    uint2 high_out_, low_out_;
    uint16_t* highs_out = reinterpret_cast<uint16_t*>(&high_out_);
    uint16_t* lows_out = reinterpret_cast<uint16_t*>(&low_out_);
#pragma unroll
    for (int j = 0; j < 4; ++j) {  // master_bits.split_master
        const uint32_t bits = __float_as_uint(w_out[j]);
        highs_out[j] = static_cast<uint16_t>((bits + 0x8000u) >> 16);
        lows_out[j] = static_cast<uint16_t>(bits & 0xFFFFu);
    }
    reinterpret_cast<uint2*>(high_out)[item] = high_out_;
    reinterpret_cast<uint2*>(low_out)[item] = low_out_;""",
}
_BODY = """
    const size_t item = blockIdx.x * (size_t)blockDim.x + threadIdx.x;
    if (item >= count[0]) {
        return;
    }
    const float rate = lr[0], factor = scale[0];
    const float b1 = constants[0], one_minus_b1 = constants[1], b2 = constants[2], one_minus_b2 = constants[3];
    const float eps = constants[4], decay = __fsub_rn(1.0f, __fmul_rn(rate, constants[5]));
    const float4 first = reinterpret_cast<const float4*>(m)[item];
    const float4 second = reinterpret_cast<const float4*>(v)[item];
    const uint2 packed = reinterpret_cast<const uint2*>(g)[item];
    const __nv_bfloat16* grads = reinterpret_cast<const __nv_bfloat16*>(&packed);
    const float m_in[4] = {first.x, first.y, first.z, first.w};
    const float v_in[4] = {second.x, second.y, second.z, second.w};
    LOAD
    float w_out[4], m_out[4], v_out[4];
#pragma unroll
    for (int j = 0; j < 4; ++j) {
        const float grad = __fmul_rn(__bfloat162float(grads[j]), factor);
        m_out[j] = __fadd_rn(__fmul_rn(b1, m_in[j]), __fmul_rn(one_minus_b1, grad));
        v_out[j] = __fadd_rn(__fmul_rn(b2, v_in[j]), __fmul_rn(__fmul_rn(one_minus_b2, grad), grad));
        const float step = __fdiv_rn(__fmul_rn(rate, m_out[j]), __fadd_rn(__fsqrt_rn(v_out[j]), eps));
        w_out[j] = __fsub_rn(__fmul_rn(w_in[j], decay), step);
    }
    STORE
    reinterpret_cast<float4*>(m_out_)[item] = make_float4(m_out[0], m_out[1], m_out[2], m_out[3]);
    reinterpret_cast<float4*>(v_out_)[item] = make_float4(v_out[0], v_out[1], v_out[2], v_out[3]);
"""


@dataclass
class TensorUpdate:
    """One tensor's update inputs: its gradient, its master ((weights,) or a split master's (bfloat16
    weights, uint16 low bits)) and its two moments (float32 arrays or int8 codes)."""

    gradient: mx.array
    master: tuple[mx.array, ...]
    m: mx.array | dict
    v: mx.array | dict


@dataclass
class AdamWStep:
    """The step's AdamW scalars, the same for every tensor: rate, gradient scale, betas, eps, weight
    decay, and the seed of the stochastic roundings (None where nothing is rounded)."""

    lr: mx.array
    scale: mx.array
    b1: float
    b2: float
    eps: float
    wd: float
    seed: mx.array | None = None


def run(update, tensor: TensorUpdate, step: AdamWStep) -> tuple:
    """`update` (a compiled update: positional arrays) on `tensor` at `step`: (*new master, m, v)."""
    return update(tensor.gradient, tensor.master, tensor.m, tensor.v, step.lr, step.scale, step.seed,
                  step.b1, step.b2, step.eps, step.wd)


_NAMES = {"float32": (["p"], ["p_out"]), "split": (["high", "low"], ["high_out", "low_out"])}

_kernels: dict[str, object] = {}


def unprobed() -> dict[str, dict]:
    """A run's records of the probes before they ran, one per master layout (`KernelChoices.update.adamw`);
    choice "kernel" once a probe chose the CUDA kernel."""
    return {layout: {"choice": None, "reason": f"not probed yet: MLX's update until a tensor of {PROBE_ELEMENTS} "
                                               "elements"} for layout in _NAMES}


def layout_of(g: mx.array, master: tuple[mx.array, ...], m: mx.array, v: mx.array) -> str | None:
    """Which kernel handles these arrays ("float32": a float32 master; "split": a bfloat16 weight
    and uint16 low bits), or None: always a bf16 gradient, float32 moments, groups of four."""
    if not (g.dtype == mx.bfloat16 and m.dtype == v.dtype == mx.float32 and g.size % 4 == 0
            and all(a.shape == g.shape for a in (*master, m, v))):
        return None
    dtypes = tuple(a.dtype for a in master)
    return {(mx.float32,): "float32", (mx.bfloat16, mx.uint16): "split"}.get(dtypes)


def _launch(layout: str, tensor: TensorUpdate, step: AdamWStep):
    g, master, m, v = tensor.gradient, tensor.master, tensor.m, tensor.v
    if layout not in _kernels:
        inputs, outputs = _NAMES[layout]
        source = _BODY.replace("LOAD", _LOAD[layout]).replace("STORE", _STORE[layout])
        _kernels[layout] = mx.fast.cuda_kernel(
            name=f"lfm_adamw_{layout}", input_names=["g", *inputs, "m", "v", "lr", "scale", "constants", "count"],
            output_names=[*outputs, "m_out_", "v_out_"], source=source)
    vectors = g.size // 4
    constants = mx.array([step.b1, 1 - step.b1, step.b2, 1 - step.b2, step.eps, step.wd], dtype=mx.float32)
    outputs = [a.dtype for a in master] + [mx.float32, mx.float32]
    return _kernels[layout](inputs=[g, *master, m, v, step.lr.reshape(1).astype(mx.float32),
                                    step.scale.reshape(1).astype(mx.float32), constants,
                                    mx.array([vectors], dtype=mx.uint64)],
                            grid=(vectors, 1, 1), threadgroup=(256, 1, 1),
                            output_shapes=[g.shape] * len(outputs), output_dtypes=outputs)


def update(reference, tensor: TensorUpdate, step: AdamWStep, records: dict[str, dict] | None = None) -> tuple:
    """(*new master, first moment, second moment): through the kernel once the probe (on the run's
    first tensor of PROBE_ELEMENTS or more of this layout, into the run's `records`) chose it, else
    the compiled MLX update `reference` (`run(reference, tensor, step)`; always without records)."""
    layout = layout_of(tensor.gradient, tensor.master, tensor.m, tensor.v)
    if layout is not None and records is not None:
        record = records[layout]
        if record["choice"] is None and tensor.gradient.size >= PROBE_ELEMENTS:
            probe(layout, reference, tensor, step, record)
        if record["choice"] == "kernel":
            return tuple(_launch(layout, tensor, step))
    return tuple(run(reference, tensor, step))


def probe(layout: str, reference, tensor: TensorUpdate, step: AdamWStep, record: dict | None = None) -> dict:
    """Decide on a real update whether the kernel of `layout` is used: the same bits in every
    output as `reference`, and faster. Records in `record` (the run's record of this layout)."""
    record, on_cuda = begin(record)
    if not on_cuda:
        return record

    def mlx_update():
        return run(reference, tensor, step)

    def kernel_update():
        return _launch(layout, tensor, step)

    try:
        differing = sum((a.view(mx.uint8) != b.view(mx.uint8)).sum().item()
                        for a, b in zip(kernel_update(), mlx_update()))
    except Exception as err:  # a build or launch failure leaves MLX's update in place
        record["reason"] = f"kernel failed: {type(err).__name__}: {err}"
        return record
    record.update(elements=tensor.gradient.size, differing=differing, mlx_s=best_seconds(mlx_update),
                  kernel_s=best_seconds(kernel_update))
    return choose(record, differing, "bytes of the new master and moments")

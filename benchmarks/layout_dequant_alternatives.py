"""Two levers the frozen block's parts pointed at (issue 32), measured against what runs now, at
LFM2.5-8B-A1B shapes (2,048 tokens, top-4 of 32 experts, hidden 2,048, expert width 1,792):

- the device layout as a counting sort in MLX ops (a one-hot cumsum for each choice's rank in its
  expert, a scatter for the block rows) against `speculative_layout`'s two argsorts; both layouts
  must give the frozen int8 block the same output, bit for bit;
- the int8 dequantization kernel moving 32 or 64 codes a thread (two or four 16-byte loads) against
  the shipped 16, at 128 / 256 / 512 threads a block, each checked bit for bit against
  `mx.dequantize`, beside a bfloat16 add over the same elements (MLX's own elementwise bandwidth).

    python benchmarks/layout_dequant_alternatives.py --out benchmarks/results/layout_dequant_alternatives-h200.json

CUDA only (the kernels are `mx.fast.cuda_kernel`s). Prints and writes one JSON: medians and spreads
(max - min) in ms of 30 synchronized runs after 3 warm-ups; dequantization also in TB/s (1 byte
read and 2 written per element).
"""
import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.switch_layers import SwitchGLU

import lfm_mlx  # noqa: F401  (the project's BLAS and MLX set-up)
from lfm_mlx.fsutil import atomic_write_json
from lfm_mlx.kernels.choices import KernelChoices
from lfm_mlx.kernels.dequant import _kernel_dequantize
from lfm_mlx.kernels.expert_blocks import BatchedSwitchGLU, ExpertLayout, _round_up, speculative_layout
from lfm_mlx.kernels.row_gather import MISSING

parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
parser.add_argument("--out", default="")
args = parser.parse_args()
out = {"benchmark": "layout_dequant_alternatives", "device": str(mx.default_device()), "mlx": mx.__version__,
       "command": " ".join(sys.argv)}



def med(work, n=30):
    """(median, max - min) in ms of n synchronized runs of `work` after 3 warm-ups."""
    for _ in range(3):
        mx.eval(work())
    mx.synchronize()
    times = []
    for _ in range(n):
        start = time.perf_counter()
        mx.eval(work())
        mx.synchronize()
        times.append(time.perf_counter() - start)
    return round(statistics.median(times) * 1e3, 4), round((max(times) - min(times)) * 1e3, 4)


def counting_layout(indices, num_experts, capacity, kernel=False):
    """`speculative_layout`'s result without a sort: each choice's rank among its expert's choices
    from a cumulative one-hot count, the block rows' choices by a scatter (spare rows feed token 0)."""
    k = indices.shape[-1]
    flat = indices.reshape(-1).astype(mx.uint32)
    n = flat.size
    ranks = mx.cumsum((mx.expand_dims(flat, 1) == mx.arange(num_experts, dtype=mx.uint32)).astype(mx.int32), axis=0)
    counts = ranks[-1]
    rank = mx.take_along_axis(ranks, mx.expand_dims(flat, 1).astype(mx.int32), axis=1)[:, 0] - 1
    block_row = mx.minimum(flat * capacity + rank.astype(mx.uint32), num_experts * capacity - 1)
    block_choice = mx.full((num_experts * capacity,), MISSING, dtype=mx.uint32)
    block_choice[block_row] = mx.arange(n, dtype=mx.uint32)
    source_token = mx.where(block_choice == MISSING, 0, block_choice // k).astype(mx.uint32)
    return ExpertLayout(source_token, block_row.reshape(-1, k), block_choice, capacity, kernel), counts.max()


E, K, T, D, F = 32, 4, 2048, 2048, 1792
mx.random.seed(0)
logits = mx.random.normal((T, E)) + 0.7 * mx.random.normal((E,))
inds = mx.argpartition(-logits, kth=K - 1, axis=-1)[:, :K].astype(mx.uint32)
flat = inds.reshape(-1)
need = int(max((flat == e).sum().item() for e in range(E)))
cap = _round_up(int(need * 1.25))
out["rows_busiest"], out["capacity"] = need, cap
out["speculative_layout_ms"] = med(lambda: [*speculative_layout(inds, E, cap)[0].__dict__.values()][:3])
out["counting_layout_ms"] = med(lambda: [*counting_layout(inds, E, cap)[0].__dict__.values()][:3])

# Both layouts through the same frozen int8 block: the outputs must agree bit for bit.
glu = SwitchGLU(D, F, E)
glu.set_dtype(mx.bfloat16)
nn.quantize(glu, group_size=64, bits=8)
kernels = KernelChoices()
block = BatchedSwitchGLU(glu, kernels)
x = (mx.random.normal((T, D)) * 0.5).astype(mx.bfloat16)
results = {}
for name, make in (("speculative", speculative_layout), ("counting", counting_layout)):
    layout, needed = make(inds, E, cap)
    block.kept_layout = layout
    y = block(x, inds); mx.eval(y, needed)
    results[name] = y
    out[f"block_with_{name}_layout_ms"] = med(lambda: [block.__call__(x, inds)] + [make(inds, E, cap)[0].block_row])
    block.kept_layout = None
out["layouts_same_output"] = bool(mx.array_equal(results["speculative"], results["counting"]).item())

# Dequantization: the shipped kernel (16 codes a thread) against 32 and 64 codes a thread.


def make_kernel(codes):
    """The shipped kernel's arithmetic (exact in float64, one rounding) over `codes` codes a thread."""
    loads = codes // 16
    src = f"""
    const size_t chunk = blockIdx.x * (size_t)blockDim.x + threadIdx.x;
    if (chunk >= CHUNKS) {{ return; }}
    const uint4* source = reinterpret_cast<const uint4*>(w) + {loads} * chunk;
    uint4 packed[{loads}];
#pragma unroll
    for (int l = 0; l < {loads}; ++l) {{ packed[l] = source[l]; }}
    uint4* target = reinterpret_cast<uint4*>(out) + {2 * loads} * chunk;
#pragma unroll
    for (int l = 0; l < {loads}; ++l) {{
        const size_t group = ({loads} * chunk + l) / (GROUP_SIZE / 16);
        const double scale = static_cast<double>(static_cast<float>(scales[group]));
        const double bias = static_cast<double>(static_cast<float>(biases[group]));
        const uint32_t words[4] = {{packed[l].x, packed[l].y, packed[l].z, packed[l].w}};
        __align__(16) __nv_bfloat16 values[16];
#pragma unroll
        for (int j = 0; j < 16; ++j) {{
            const double code = static_cast<double>((words[j / 4] >> (8 * (j % 4))) & 0xffu);
            values[j] = __double2bfloat16(scale * code + bias);
        }}
        target[2 * l] = reinterpret_cast<const uint4*>(values)[0];
        target[2 * l + 1] = reinterpret_cast<const uint4*>(values)[1];
    }}
"""
    return mx.fast.cuda_kernel(name=f"deq{codes}", input_names=["w", "scales", "biases"], output_names=["out"], source=src)


proj = glu.gate_proj
w, s, b = proj["weight"], proj["scales"], proj["biases"]
ref = mx.dequantize(w, s, b, group_size=64, bits=8)
elements = w.size * 4
gb = elements * 3 / 1e9  # 1 byte read + 2 bytes written per element
out["dequant_elements"] = elements
t, spread = med(lambda: mx.dequantize(w, s, b, group_size=64, bits=8))
out["dequant_mx_ms"] = [t, spread, round(gb / t, 2)]
t, spread = med(lambda: _kernel_dequantize(w, s, b, 64))
out["dequant_kernel16_ms"] = [t, spread, round(gb / t, 2), bool(mx.array_equal(_kernel_dequantize(w, s, b, 64), ref).item())]
for codes in (32, 64):
    kernel = make_kernel(codes)
    for threads in (128, 256, 512):
        chunks = elements // codes
        run = lambda: kernel(inputs=[w, s, b], template=[("CHUNKS", chunks), ("GROUP_SIZE", 64)], grid=(chunks, 1, 1),
                             threadgroup=(threads, 1, 1), output_shapes=[ref.shape], output_dtypes=[mx.bfloat16])[0]
        t, spread = med(run)
        out[f"dequant_kernel{codes}_t{threads}_ms"] = [t, spread, round(gb / t, 2), bool(mx.array_equal(run(), ref).item())]
copy = mx.zeros(ref.shape, mx.bfloat16)
t, spread = med(lambda: copy + 1)
out["bf16_add_same_size_ms"] = [t, spread, round(elements * 4 / 1e9 / t, 2)]
if args.out:
    atomic_write_json(Path(args.out), out)
print(json.dumps(out, indent=1))

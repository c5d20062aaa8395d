"""How much of the GPU's memory bandwidth MLX's launches reach, against PyTorch on the same GPU
(issue 32: is the update phase, or the gradient norm, a lever?). One expert stack of the 8B model at
group 4 (117M elements):

- a float32 copy: PyTorch's `copy_`; an MLX copy kernel (one 16-byte load and store a thread, 256 or
  1,024 threads a block) one launch an evaluation, and eight launches chained in one evaluation;
  MLX's own `x + 1`;
- AdamW: PyTorch's `AdamW(fused=True)` on float32 weights (28 bytes an element); the project's kernel
  (`kernels.fused_adamw`, split master: 26 bytes) as its probe times it (one an evaluation), four in
  one evaluation, and at 128 / 512 / 1,024 threads a block (`same`: bit-identical to 256's);
- the gradient norm of 12 bf16 stacks: the trainer's `global_norm` against `torch._foreach_norm`.

    python benchmarks/bandwidth.py --out benchmarks/results/bandwidth-h100.json

CUDA only, and PyTorch with CUDA. Prints and writes one JSON: medians (and spreads, max - min) in ms
of 20 synchronized runs after 3 warm-ups (10 for the norms), and TB/s.
"""
import argparse
import json
import statistics
import sys
import time

import lfm_mlx  # noqa: F401  (the project's BLAS and MLX set-up)
import mlx.core as mx
import torch

from lfm_mlx.fsutil import atomic_write_json
from lfm_mlx.grouped.step import global_norm
from lfm_mlx.kernels import fused_adamw
from lfm_mlx.kernels.master_bits import split_master

parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
parser.add_argument("--out", default="")
args = parser.parse_args()
N = 117440512  # one expert stack (32 x 1,792 x 2,048) of the 8B model


def timed(fn, runs: int = 20, sync=mx.synchronize) -> dict:
    for _ in range(3):
        fn()
        sync()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return {"ms": statistics.median(times) * 1e3, "spread_ms": (max(times) - min(times)) * 1e3}


def rate(record: dict, bytes_moved: float, per: int = 1) -> dict:
    """`record` with TB/s for `bytes_moved` per call; `per` calls timed together (ms_each)."""
    if per > 1:
        record["ms_each"] = record["ms"] / per
    return {**record, "tb_s": bytes_moved * per / (record["ms"] / 1e3) / 1e12}


out = {"benchmark": "bandwidth", "device": str(mx.default_device()), "gpu": torch.cuda.get_device_name(0),
       "mlx": mx.__version__, "torch": torch.__version__, "elements": N, "command": " ".join(sys.argv)}
source = torch.randn(N, device="cuda")
target = torch.empty_like(source)
out["torch_copy_f32"] = rate(timed(lambda: target.copy_(source), sync=torch.cuda.synchronize), 8 * N)
weights = torch.nn.Parameter(torch.randn(N, device="cuda") * 0.02)
weights.grad = torch.randn(N, device="cuda") * 1e-3
adamw = torch.optim.AdamW([weights], lr=1e-5, fused=True)
out["torch_fused_adamw_f32"] = rate(timed(adamw.step, sync=torch.cuda.synchronize), 28 * N)
del source, target, weights, adamw
torch.cuda.empty_cache()

copy = mx.fast.cuda_kernel(name="bandwidth_copy", input_names=["x"], output_names=["y"], source="""
    const size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x;
    if (i < N4) reinterpret_cast<float4*>(y)[i] = reinterpret_cast<const float4*>(x)[i];""")


def copied(x: mx.array, threads: int = 256) -> mx.array:
    return copy(inputs=[x], template=[("N4", N // 4)], grid=(N // 4, 1, 1), threadgroup=(threads, 1, 1),
                output_shapes=[x.shape], output_dtypes=[x.dtype])[0]


def chained(x: mx.array, launches: int = 8) -> None:
    for _ in range(launches):
        x = copied(x)
    mx.eval(x)


x = mx.random.normal((N,))
mx.eval(x)
for threads in (256, 1024):
    out[f"mlx_copy_f32_tg{threads}"] = rate(timed(lambda: mx.eval(copied(x, threads))), 8 * N)
out["mlx_copy_f32_chain8"] = rate(timed(lambda: chained(x)), 8 * N, per=8)
out["mlx_add_f32"] = rate(timed(lambda: mx.eval(x + 1)), 8 * N)
del x

gradient = (mx.random.normal((N,)) * 1e-3).astype(mx.bfloat16)
high, low = split_master(mx.random.normal((N,)) * 0.02)
m, v = mx.zeros((N,)), mx.zeros((N,))
mx.eval(gradient, high, low, m, v)
step = fused_adamw.AdamWStep(lr=mx.array(1e-5), scale=mx.array(1.0), b1=0.9, b2=0.999, eps=1e-8, wd=0.01)
tensor = fused_adamw.TensorUpdate(gradient, (high, low), m, v)
out["mlx_adamw_split_shipped"] = rate(timed(lambda: mx.eval(fused_adamw._launch("split", tensor, step))), 26 * N)
out["mlx_adamw_split_4_in_one_eval"] = rate(
    timed(lambda: mx.eval([fused_adamw._launch("split", tensor, step) for _ in range(4)])), 26 * N, per=4)
reference = fused_adamw._launch("split", tensor, step)
mx.eval(reference)
kernel = fused_adamw._kernels["split"]
constants = mx.array([0.9, 1 - 0.9, 0.999, 1 - 0.999, 1e-8, 0.01], dtype=mx.float32)


def adamw_launch(threads: int) -> list[mx.array]:
    vectors = N // 4
    return kernel(inputs=[gradient, high, low, m, v, step.lr.reshape(1), step.scale.reshape(1), constants,
                          mx.array([vectors], dtype=mx.uint64)], grid=(vectors, 1, 1), threadgroup=(threads, 1, 1),
                  output_shapes=[gradient.shape] * 4, output_dtypes=[mx.bfloat16, mx.uint16, mx.float32, mx.float32])


for threads in (128, 512, 1024):
    same = all(mx.array_equal(a, b).item() for a, b in zip(adamw_launch(threads), reference))
    out[f"mlx_adamw_split_tg{threads}"] = {**rate(timed(lambda: mx.eval(adamw_launch(threads))), 26 * N), "same": same}
del gradient, high, low, m, v, reference

grads = {f"g{i}": (mx.random.normal((N,)) * 1e-3).astype(mx.bfloat16) for i in range(12)}
mx.eval(grads)
norm = {"mlx_global_norm": rate(timed(lambda: global_norm(grads), runs=10), 12 * 2 * N)}
del grads
torch_grads = [torch.randn(N, device="cuda", dtype=torch.bfloat16) * 1e-3 for _ in range(12)]
norm["torch_foreach_norm"] = rate(timed(
    lambda: torch.linalg.vector_norm(torch.stack(torch._foreach_norm(torch_grads, dtype=torch.float32))).item(),
    runs=10, sync=torch.cuda.synchronize), 12 * 2 * N)
out["norm"] = norm
print(json.dumps(out, indent=1))
if args.out:
    atomic_write_json(args.out, out)

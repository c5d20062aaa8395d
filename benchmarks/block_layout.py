"""The expert block layout kernel (`lfm_mlx.kernels.block_layout`, issue 32) on the GPU: its start-up
probe at 2,048 / 4,096 / 10,240 tokens, and its index arrays against `speculative_layout` (MLX ops)
at a capacity that holds, one with 64 rows to spare and one that falls short (16), and against the
host's stable `expert_layout`, over five routings (top-4 of 32 experts, skewed by a random bias per
expert), each timed alone (one layout an evaluation: the evaluation's own cost is in both).

    python benchmarks/block_layout.py --out benchmarks/results/block_layout-h100.json

CUDA only. Prints and writes one JSON: medians and spreads (max - min) in ms of 50 synchronized runs
after 3 warm-ups; `..._equal_speculative` lists (source_token, block_row, block_choice, needed).
"""
import argparse
import json
import statistics
import sys
import time

import lfm_mlx  # noqa: F401  (the project's BLAS and MLX set-up)
import mlx.core as mx

from lfm_mlx.fsutil import atomic_write_json
from lfm_mlx.kernels import block_layout
from lfm_mlx.kernels.expert_blocks import expert_layout, speculative_layout

parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
parser.add_argument("--out", default="")
args = parser.parse_args()


def median_ms(work, runs: int = 50) -> tuple[float, float]:
    for _ in range(3):
        mx.eval(work())
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        mx.eval(work())
        mx.synchronize()
        times.append(time.perf_counter() - start)
    return round(statistics.median(times) * 1e3, 4), round((max(times) - min(times)) * 1e3, 4)


out = {"benchmark": "block_layout", "device": str(mx.default_device()), "mlx": mx.__version__,
       "command": " ".join(sys.argv)}
EXPERTS, K = 32, 4
for tokens in (2048, 4096, 10240):
    out[f"probe_T{tokens}"] = block_layout.probe(EXPERTS, K, tokens, speculative_layout)
for tokens, skew in ((2048, 0.7), (2048, 2.0), (4096, 0.7), (333, 0.7), (10240, 1.0)):
    mx.random.seed(tokens)
    logits = mx.random.normal((tokens, EXPERTS)) + skew * mx.random.normal((EXPERTS,))
    indices = mx.argpartition(-logits, kth=K - 1, axis=-1)[:, :K].astype(mx.uint32)
    host = expert_layout(indices, EXPERTS)
    row = {"capacity": host.capacity}
    for capacity in (host.capacity, host.capacity + 64, 16):
        mine = block_layout.layout_arrays(indices, EXPERTS, capacity)
        theirs = block_layout._arrays(*speculative_layout(indices, EXPERTS, capacity))
        row[f"cap{capacity}_equal_speculative"] = [bool(mx.array_equal(a, b.astype(a.dtype)).item())
                                                   for a, b in zip(mine, theirs)]
        if capacity == host.capacity:
            row["equal_host"] = [bool(mx.array_equal(a, b).item()) for a, b in
                                 zip(mine[:3], (host.source_token, host.block_row, host.block_choice))]
    capacity = host.capacity
    row["speculative_ms"] = median_ms(lambda: block_layout._arrays(*speculative_layout(indices, EXPERTS, capacity)))
    row["kernel_ms"] = median_ms(lambda: block_layout.layout_arrays(indices, EXPERTS, capacity))
    out[f"T{tokens}_skew{skew}"] = row
print(json.dumps(out, indent=1))
if args.out:
    atomic_write_json(args.out, out)

"""Where a frozen MoE block's forward time goes on the blocks kernel (issue 32), and what padding costs.

    python benchmarks/frozen_experts.py --preset lfm2.5-8b-a1b --seq 2048   # the GPU run
    python benchmarks/frozen_experts.py --preset tiny-moe --seq 256         # CPU, CI-sized

Random weights of the preset's shapes, experts int8, as `grouped_step.py` builds them.
- `padding`: each MoE layer's expert counts in one forward over random tokens, the rows the
  padded blocks multiply (every expert at the busiest one's count) against the real rows and
  against two or three capacity tiers, and the three projections' matmuls timed at those shapes.
- `parts`: the last MoE layer's block split into what it runs (routing, the device layout, the
  three dequantizations, the row gathers into and out of blocks, the matmuls), the block with a
  kept layout (as the walk runs it), its forward + input gradient, and the block as called plainly
  (layout read back to the host).
Each time is the median of `--repeats` synchronized runs after one warm-up (`grouped_step._median_seconds`).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx_lm.models.switch_layers import SwitchGLU

sys.path.insert(0, str(Path(__file__).resolve().parent))
from grouped_step import _median_seconds, build_mlx, random_batch  # noqa: E402  (the benchmark's builder, timer)

from lfm_mlx.fsutil import atomic_write_json  # noqa: E402
from lfm_mlx.grouped import moe_layers, probe_dequant_kernel, probe_row_gather, set_expert_kernel  # noqa: E402
from lfm_mlx.kernels.choices import KernelChoices  # noqa: E402
from lfm_mlx.kernels.expert_blocks import CAPACITY_MULTIPLE, BatchedSwitchGLU, expert_weight, speculative_layout  # noqa: E402
from lfm_mlx.model.moe import feed_forward  # noqa: E402


def median_ms(work, repeats: int) -> float:
    """`grouped_step`'s median timer on a function that returns arrays to evaluate, in ms."""
    return round(_median_seconds(lambda: mx.eval(work()), repeats) * 1000, 3)


def round_up(rows: int) -> int:
    return -(-rows // CAPACITY_MULTIPLE) * CAPACITY_MULTIPLE


def expert_counts(model, tokens: mx.array) -> list[list[int]]:
    """Per MoE layer, each expert's row count (busiest first) in one forward pass."""
    seen = []
    plain_call = SwitchGLU.__call__

    def recording(self, x, indices):
        seen.append(indices)
        return plain_call(self, x, indices)

    SwitchGLU.__call__ = recording
    try:
        mx.eval(model(tokens))
    finally:
        SwitchGLU.__call__ = plain_call
    experts = model.model.args.num_experts
    return [sorted(np.bincount(np.array(i).reshape(-1), minlength=experts).tolist(), reverse=True) for i in seen]


def padding(model, config: dict, seq: int, repeats: int, timed_layers: int) -> dict:
    experts, k = config["num_experts"], config["num_experts_per_tok"]
    dims, hidden = config["hidden_size"], config["moe_intermediate_size"]
    counts = expert_counts(model, random_batch(config["vocab_size"], 1, seq, 0).inputs)
    mean = seq * k / experts
    quarter, eighth, half = experts // 4, experts // 8, experts // 2
    layouts = {  # (experts, capacity) per tier
        "one_tier": lambda c: [(experts, round_up(c[0]))],
        "two_tiers": lambda c: [(quarter, round_up(c[0])), (experts - quarter, round_up(c[quarter]))],
        "three_tiers": lambda c: [(eighth, round_up(c[0])), (half - eighth, round_up(c[eighth])),
                                  (experts - half, round_up(c[half]))],
        "no_padding": lambda c: [(experts, round_up(int(mean)))],  # the real rows, as if spread evenly
    }
    w_in = mx.random.normal((experts, hidden, dims)).astype(mx.bfloat16)
    w_out = mx.random.normal((experts, dims, hidden)).astype(mx.bfloat16)

    def glu_matmuls_ms(tiers) -> float:
        xs = [(mx.random.normal((e, c, dims)).astype(mx.bfloat16), mx.random.normal((e, c, hidden)).astype(mx.bfloat16),
               w_in[:e], w_out[:e]) for e, c in tiers]
        mx.eval(xs)

        def work():
            out = []
            for x, h, wi, wo in xs:  # gate, up (same shapes), down
                out += [x @ wi.swapaxes(-1, -2), x @ wi.swapaxes(-1, -2), h @ wo.swapaxes(-1, -2)]
            return out
        return median_ms(work, repeats)

    rows = {name: statistics.mean(sum(e * c for e, c in tiers(layer)) for layer in counts) for name, tiers in layouts.items()}
    return {
        "rows_real": seq * k, "rows_multiplied_mean": rows,
        "busiest_over_mean": [round(c[0] / mean, 2) for c in counts],
        "matmul_ms": [{name: glu_matmuls_ms(tiers(layer)) for name, tiers in layouts.items()}
                      for layer in counts[:timed_layers]],
        "counts": counts,
    }


def parts(model, config: dict, seq: int, repeats: int) -> dict:
    records = {"dequant_kernel": probe_dequant_kernel(model, moe_layers(model)[0]),
               "row_gather_kernel": probe_row_gather(model, seq)}
    kernels = KernelChoices.from_records(records)
    set_expert_kernel(model, "blocks", kernels=kernels)
    block = feed_forward(model, moe_layers(model)[-1])
    switch = block.switch_mlp
    dtype, k = mx.bfloat16, config["num_experts_per_tok"]
    x = mx.random.normal((1, seq, config["hidden_size"]), key=mx.random.key(1)).astype(dtype)
    rows = x.reshape(-1, x.shape[-1])

    def route():  # mlx-lm's Lfm2MoeSparseMoeBlock routing: sigmoid, expert_bias for selection only
        weights = mx.sigmoid(block.gate(x))
        inds = mx.argpartition(weights.astype(mx.float32) + block.expert_bias, kth=-k, axis=-1)[..., -k:]
        return inds, mx.take_along_axis(weights, inds, axis=-1)

    inds, _ = route()
    mx.eval(inds)
    out = {"routing_ms": median_ms(route, repeats)}
    experts = switch.num_experts()
    switch.keep_layout = True
    mx.eval(switch(x, inds))  # lays the blocks out once; the timed calls reuse it, as the walk does
    layout = switch.kept_layout
    projections = (switch.gate_proj, switch.up_proj, switch.down_proj)
    out["capacity"] = layout.capacity
    out["device_layout_ms"] = median_ms(lambda: speculative_layout(inds, experts, layout.capacity,
                                                                   kernels.row_gather)[0].block_row, repeats)
    out["dequantize_three_ms"] = median_ms(lambda: [expert_weight(p, dtype, x, kernels.dequant) for p in projections],
                                           repeats)
    out["to_blocks_ms"] = median_ms(lambda: layout.to_blocks(rows), repeats)
    blocks = layout.to_blocks(rows).reshape(experts, layout.capacity, -1)
    weights = [expert_weight(p, dtype, x, kernels.dequant) for p in projections]
    mx.eval(blocks, weights)

    def matmuls():
        gate, up = blocks @ weights[0].swapaxes(-1, -2), blocks @ weights[1].swapaxes(-1, -2)
        return switch.activation(up, gate) @ weights[2].swapaxes(-1, -2)
    out["matmuls_and_activation_ms"] = median_ms(matmuls, repeats)
    product = matmuls()
    mx.eval(product)
    out["from_blocks_ms"] = median_ms(lambda: layout.from_blocks(product.reshape(-1, product.shape[-1])), repeats)
    out["experts_kept_layout_ms"] = median_ms(lambda: switch(x, inds), repeats)
    grad = mx.grad(lambda v: switch(v, inds).astype(mx.float32).sum())
    out["experts_forward_and_input_grad_kept_layout_ms"] = median_ms(lambda: grad(x), repeats)
    switch.keep_layout = False
    switch.forget()
    out["block_forward_host_layout_ms"] = median_ms(lambda: block(x), repeats)
    return {**records, **out}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="tiny-moe")
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--timed-layers", type=int, default=10, help="MoE layers whose padded matmuls are timed")
    parser.add_argument("--out", default="")
    args = parser.parse_args(argv)
    model, config = build_mlx(args.preset, 0)
    results = {"benchmark": "frozen_experts", "preset": args.preset, "seq": args.seq, "repeats": args.repeats,
               "mlx_version": mx.__version__, "mlx_device": str(mx.default_device()), "machine": platform.node(),
               "command": " ".join(sys.argv)}
    results["padding"] = padding(model, config, args.seq, args.repeats, args.timed_layers)
    results["parts"] = parts(model, config, args.seq, args.repeats)
    device = "gpu" if mx.default_device() == mx.gpu else "cpu"
    out = Path(args.out or Path(os.environ.get("OUT", "benchmarks/results")) / f"frozen_experts-{args.preset}-{device}.json")
    atomic_write_json(out, results)
    print(json.dumps({"padding": {k: v for k, v in results["padding"].items() if k not in ("counts", "matmul_ms")},
                      "parts": results["parts"]}, indent=1))
    print(f"results: {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

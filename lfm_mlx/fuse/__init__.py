"""Fuse LoRA adapters into a base model: dequantize, merge, re-quantize (8 bits by default), and
check that the fine-tune survived before writing anything.

    lfm-mlx fuse --model MIXED_DIR --adapter-path ADAPTERS --save-path FUSED --rows repair_datasets/NAME
    lfm-mlx fuse ... --bits 4 --scope all --suite router --force

Merging follows mlx-lm's `fuse` math, W' = W + scale * B^T A^T (per expert for `LoRASwitchLinear`),
in float32 on the dequantized base weight. Then W' is stored as the scope says: `--scope experts`
quantizes expert projections only (routers bf16, `expert_bias` float32, the rest bf16, like the
mixed checkpoint); `--scope all` quantizes every linear layer and the embedding except routers.
`--bits bf16` quantizes nothing. Why not `mlx_lm.fuse`: it re-quantizes a quantized base at its own
bits (the seed-004 failure), has no scope, and cannot tell whether the fine-tune survived.

The fused directory is written and then loaded back; the fidelity report compares that loaded model
with base + adapters on a prompt set, and the directory only takes its final name when the report
passes the thresholds (or with --force). See `fidelity_gate` for what is checked and why.
"""

from lfm_mlx.fuse.cli import main
from lfm_mlx.fuse.fidelity import (MIN_JUDGED_SHIFT, FidelityError, Scored, Thresholds, compare, fidelity_gate,
                                   log_probs, lora_disabled, prompts_from_rows, prompts_from_suite)
from lfm_mlx.fuse.run import format_report, fuse, parse_bits
from lfm_mlx.fuse.weights import (ROUTER_SUFFIX, SCOPES, build_fused, delta_survival, dense_weight, lora_delta,
                                  quant_params, storage_params, store)

__all__ = [
    "MIN_JUDGED_SHIFT", "ROUTER_SUFFIX", "SCOPES", "FidelityError", "Scored", "Thresholds", "build_fused", "compare",
    "delta_survival", "dense_weight", "fidelity_gate", "format_report", "fuse", "log_probs", "lora_delta",
    "lora_disabled", "main", "parse_bits", "prompts_from_rows", "prompts_from_suite", "quant_params",
    "storage_params", "store",
]

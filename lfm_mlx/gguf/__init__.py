"""GGUF export for LFM2 and LFM2-MoE (llama.cpp architectures `lfm2` and `lfm2moe`).

Reads HF directories (per-expert or fused experts, conv (D, 1, K)) and mlx-lm directories (stacked
`switch_mlp`, conv (D, K, 1), affine-quantized layers dequantized on the way). Writes one GGUF file
tensor by tensor with the `gguf` package, so the 8B-A1B never sits in memory twice, and atomically.
Quantized variants (Q8_0 ... Q4_K_M) come from llama.cpp's own quantizer through llama-cpp-python,
with per-tensor type overrides and an importance matrix computed with MLX from our own transcripts.

The package, one concern per module: `plan` (source tensors, the tensor plan), `metadata` (hparams,
tokenizer, chat template), `write` (export_gguf), `llama` (open, types, quantize), `imatrix`, `cli` (main).
"""

from __future__ import annotations

from lfm_mlx.gguf.plan import (
    Q, OUTTYPES, QUANT_TYPES, ARCHS, attention_layers, dense_ff_dim,
)
from lfm_mlx.gguf.metadata import (
    portable_chat_template, read_chat_template,
)
from lfm_mlx.gguf.write import (
    export_gguf,
)
from lfm_mlx.gguf.llama import (
    open_gguf, gguf_tensor_types, quantize_gguf,
)
from lfm_mlx.gguf.imatrix import (
    render_samples, compute_imatrix, read_samples,
)
from lfm_mlx.gguf.cli import (
    main,
)

__all__ = [
    "Q", "OUTTYPES", "QUANT_TYPES", "ARCHS", "attention_layers", "dense_ff_dim", "portable_chat_template",
    "read_chat_template", "export_gguf", "open_gguf", "gguf_tensor_types", "quantize_gguf", "render_samples",
    "compute_imatrix", "read_samples", "main",
]

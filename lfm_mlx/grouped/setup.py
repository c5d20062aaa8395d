"""What the trainer and the sweep prepare before their first group, written once: the model as a
mixed checkpoint (experts int8), the kernel probes, and the expert path (given, or measured)."""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.switch_layers import QuantizedSwitchLinear

from lfm_mlx.grouped import probes
from lfm_mlx.kernels.choices import KernelChoices
from lfm_mlx.model.io import load
from lfm_mlx.model.moe import expert_kernel, feed_forward, moe_layers
from lfm_mlx.model.quant import quantize_experts


def load_mixed_model(model_dir: Path) -> tuple[nn.Module, dict]:
    """A model directory loaded with int8 experts: a mixed checkpoint as stored, a bf16 / HF model
    with its experts quantized in memory (the int8-expert mix `lfm-mlx mix` would write)."""
    model, _, config = load(model_dir, with_tokenizer=False, return_config=True)
    if not isinstance(feed_forward(model, moe_layers(model)[0]).switch_mlp.gate_proj, QuantizedSwitchLinear):
        config = quantize_experts(model, config)
        mx.eval(model.parameters())
    return model, config


def probe_kernels(model: nn.Module, layer: int, gather_tokens: int) -> dict:
    """The start-up kernel probes' records: the dequantization kernel on `layer`'s experts, the
    row-gather and block-layout kernels at `gather_tokens` tokens (`KernelChoices.from_records` makes
    the run's choices)."""
    return {"dequant_kernel": probes.probe_dequant_kernel(model, layer),
            "row_gather_kernel": probes.probe_row_gather(model, gather_tokens),
            "layout_kernel": probes.probe_layout_kernel(model, layer, gather_tokens)}


def choose_expert_path(model: nn.Module, layer: int, requested: str, probe_tokens: int, dtype: mx.Dtype,
                       seed: int, kernels: KernelChoices | None = None, remember: bool = True,
                       given: str = "set in the config") -> dict:
    """The expert kernel's record ({"choice", "reason", ...}): `requested` unless "auto"; auto
    measures one MoE block at `probe_tokens` tokens with the run's `kernels`, kept per machine and
    shape when `remember` (`probes.auto_expert_kernel`), else measured every time."""
    if requested != "auto":
        return {"choice": expert_kernel(requested), "reason": given}
    if remember:
        return probes.auto_expert_kernel(model, layer, probe_tokens, dtype, seed, kernels)
    times = probes.measure_expert_kernels(model, layer, probe_tokens, dtype, seed, kernels)
    return {"choice": min(times, key=times.get), "reason": "faster forward+backward of one MoE block",
            "seconds": times}

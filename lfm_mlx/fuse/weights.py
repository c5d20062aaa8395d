"""The weights: dequantize, merge the LoRA delta, store at the scope's bits, and how much of the delta survived."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_unflatten

from lfm_mlx import console
from lfm_mlx.model.quant import dense_weight, float_layer_like, quant_params


ROUTER_SUFFIX = "feed_forward.gate"
SCOPES = ("experts", "all")


def _lora_classes():
    from mlx_lm.tuner.lora import LoRALinear, LoRASwitchLinear

    return LoRALinear, LoRASwitchLinear


def _switch_classes():
    from mlx_lm.models.switch_layers import QuantizedSwitchLinear, SwitchLinear

    return SwitchLinear, QuantizedSwitchLinear


def lora_delta(module: nn.Module) -> mx.array:
    """scale * B^T A^T in float32, shaped like the wrapped weight (mlx-lm's fuse math)."""
    LoRALinear, _ = _lora_classes()
    a, b = module.lora_a.astype(mx.float32), module.lora_b.astype(mx.float32)
    if isinstance(module, LoRALinear):
        return (module.scale * b.T) @ a.T  # a: (in, r), b: (r, out) -> (out, in)
    return module.scale * (b @ a)  # a: (E, r, in), b: (E, out, r) -> (E, out, in)


def _is_weight_layer(module: nn.Module) -> bool:
    SwitchLinear, QuantizedSwitchLinear = _switch_classes()
    return isinstance(module, (nn.Linear, nn.QuantizedLinear, nn.Embedding, nn.QuantizedEmbedding,
                               SwitchLinear, QuantizedSwitchLinear))


def storage_params(path: str, module: nn.Module, scope: str, bits: int | None, group_size: int) -> dict | None:
    """How the fused model stores layer `path`: quantization params, or None for bf16."""
    SwitchLinear, QuantizedSwitchLinear = _switch_classes()
    if bits is None or path.endswith(ROUTER_SUFFIX):
        return None  # routers stay bf16, as llama.cpp and our mixed checkpoint keep them
    if scope == "experts" and not isinstance(module, (SwitchLinear, QuantizedSwitchLinear)):
        return None
    in_dims = module.weight.shape[-1] * (32 // module.bits if "scales" in module else 1)
    if in_dims % group_size:
        return None  # mlx cannot quantize it at this group size; it stays bf16 (listed in the report)
    return {"group_size": group_size, "bits": bits, "mode": "affine"}


def store(module: nn.Module, weight: mx.array, params: dict | None) -> nn.Module:
    """The stored layer for float32 `weight`: quantized with `params`, else bf16; float leaves in
    bf16 exactly as they will be saved, so what we measure is what gets written."""
    layer = float_layer_like(module, weight)
    if params is not None:
        layer = layer.to_quantized(**params)
    layer.update({k: v.astype(mx.bfloat16) for k, v in layer.parameters().items()
                  if isinstance(v, mx.array) and v.dtype in (mx.float32, mx.float16, mx.bfloat16)})
    return layer


def delta_survival(base: mx.array, delta: mx.array, stored_base: mx.array, stored_fused: mx.array) -> dict:
    """How much of the LoRA delta dW the stored weights keep.

    With Q(.) the storage (quantization at the fused model's bits, or bf16 rounding) and
    dQ = Q(W + dW) - Q(W) the change the stored model actually carries:
      survival = <dQ, dW> / ||dW||^2      share of the delta's direction that survives (1 = all;
                                          ~0 when rounding snaps W + dW back onto Q(W)'s grid)
      noise    = ||dQ - survival * dW|| / ||dW||   what quantization adds off that direction
      delta_rel = ||dW|| / ||W||          how big the fine-tune is next to the weight
    Q(W) is the base layer as it would be stored at the same precision (its own tensors when the
    base is already quantized that way), so base quantization error cancels out.
    """
    dq = stored_fused - stored_base
    energy = (delta * delta).sum()
    if energy.item() == 0:
        return {"survival": None, "noise": None, "delta_rel": 0.0, "delta_norm": 0.0}
    survival = (dq * delta).sum() / energy
    noise = mx.sqrt(((dq - survival * delta) ** 2).sum() / energy)
    rel = mx.sqrt(energy / mx.maximum((base * base).sum(), 1e-30))
    mx.eval(survival, noise, rel)
    return {"survival": round(survival.item(), 4), "noise": round(noise.item(), 4), "delta_rel": round(rel.item(), 6),
            "delta_norm": round(mx.sqrt(energy).item(), 6)}


def build_fused(adapter_model: nn.Module, base_model: nn.Module, scope: str, bits: int | None,
                group_size: int, progress: bool = False) -> tuple[dict, list[dict]]:
    """Replace layers of `base_model` (a bf16 load of the same base) in place by their fused,
    stored form; return the per-path quantization entries and the per-layer survival rows."""
    LoRALinear, LoRASwitchLinear = _lora_classes()
    lora_modules = [(p, m) for p, m in adapter_model.named_modules() if isinstance(m, (LoRALinear, LoRASwitchLinear))]
    lora_paths = {p for p, _ in lora_modules}
    layers: list[dict] = []
    bar = console.progress("fuse", len(lora_modules), "layer", show=progress)
    for path, module in lora_modules:
        base = module.linear
        weight = dense_weight(base)
        delta = lora_delta(module)
        params = storage_params(path, base, scope, bits, group_size)
        fused = store(base, weight + delta, params)
        if params is not None and params == quant_params(base):
            stored_base = weight  # already stored this way: Q(W) is the base itself
        else:
            stored_base = dense_weight(store(base, weight, params))
        row = {"path": path, "storage": _describe(params),
               **delta_survival(weight, delta, stored_base, dense_weight(fused))}
        layers.append(row)
        base_model.update_modules(tree_unflatten([(path, fused)]))
        mx.eval(fused.parameters())
        bar.update(1)
    bar.close()

    replacements = []
    for path, module in base_model.named_modules():
        if path in lora_paths or not _is_weight_layer(module):
            continue
        params = storage_params(path, module, scope, bits, group_size)
        if params != quant_params(module):  # otherwise keep the tensors as they are: no re-rounding
            replacements.append((path, store(module, dense_weight(module), params)))
    for path, layer in replacements:
        base_model.update_modules(tree_unflatten([(path, layer)]))
        mx.eval(layer.parameters())

    entries: dict = {}
    for path, module in base_model.named_modules():
        if path.endswith(ROUTER_SUFFIX) and _is_weight_layer(module):
            entries[path] = False  # explicit, so no loader's default predicate quantizes routers
        elif _is_weight_layer(module) and quant_params(module) is not None:
            entries[path] = quant_params(module)
    return entries, layers


def _describe(params: dict | None) -> str:
    return "bf16" if params is None else f"{params['bits']}-bit g{params['group_size']}"


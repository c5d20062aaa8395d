"""Affine quantization as mx.quantize lays it out: packing codes into uint32 words and back, quantizing
to the storage dtype's scales (requantizing trained experts), quantizing a model's experts (a mixed
checkpoint), and a layer's weight read back as float32 (or a model's experts made float32 copies)."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_unflatten

from lfm_mlx.model.moe import is_expert

STORAGE_DTYPE = mx.bfloat16  # what save_model_dir writes for scales, biases and routers


def pack_codes(codes: mx.array, bits: int) -> mx.array:
    """Pack unsigned codes along the last axis into uint32 words, as mx.quantize lays them out."""
    per = 32 // bits
    grouped = codes.astype(mx.uint32).reshape(*codes.shape[:-1], codes.shape[-1] // per, per)
    shifts = mx.arange(per, dtype=mx.uint32) * bits
    return (grouped << shifts).sum(axis=-1).astype(mx.uint32)  # disjoint bit fields: sum == or


def quantize_affine(w: mx.array, group_size: int, bits: int, storage: mx.Dtype = STORAGE_DTYPE,
                    key: mx.array | None = None) -> tuple[mx.array, mx.array, mx.array]:
    """Affine quantization in mx.quantize's layout, with scales and biases rounded to the storage
    dtype first and codes chosen against those, so the in-memory model equals the saved one.
    With `key` codes round stochastically (unbiased: E[dequantized] = w inside the range)."""
    if bits not in (2, 4, 8):
        if key is not None:
            raise ValueError(f"stochastic rounding supports 2, 4 and 8-bit experts, not {bits}-bit")
        wq, scales, biases = mx.quantize(w, group_size, bits)
        return wq, scales.astype(storage), biases.astype(storage)
    _, scales, biases = mx.quantize(w, group_size, bits)  # mlx's choice of range per group
    scales, biases = scales.astype(storage), biases.astype(storage)
    s = scales.astype(mx.float32)[..., None]
    b = biases.astype(mx.float32)[..., None]
    groups = w.astype(mx.float32).reshape(*w.shape[:-1], w.shape[-1] // group_size, group_size)
    x = (groups - b) / mx.where(s == 0, 1.0, s)
    offset = 0.5 if key is None else mx.random.uniform(shape=x.shape, key=key)
    codes = mx.clip(mx.floor(x + offset), 0, 2**bits - 1).reshape(w.shape)
    return pack_codes(codes, bits), scales, biases


def unpack_codes(packed: mx.array, bits: int) -> mx.array:
    """The inverse of `pack_codes`."""
    per = 32 // bits
    shifts = mx.arange(per, dtype=mx.uint32) * bits
    codes = (packed[..., None] >> shifts) & (2**bits - 1)
    return codes.reshape(*packed.shape[:-1], packed.shape[-1] * per)


def quantize_experts(model: nn.Module, config: dict, bits: int = 8, group_size: int = 64) -> dict:
    """Quantize every expert projection in place; return the config with per-path entries."""
    params = {"group_size": group_size, "bits": bits, "mode": "affine"}
    per_path: dict[str, dict | bool] = {}

    def predicate(path: str, module: nn.Module):
        if is_expert(path):
            if module.weight.shape[-1] % group_size:
                raise ValueError(
                    f"{path}: input size {module.weight.shape[-1]} is not a multiple of group_size "
                    f"{group_size}; pick a group size that divides it (32 or 64)"
                )
            per_path[path] = dict(params)
            return params
        if path.endswith("feed_forward.gate"):
            per_path[path] = False  # routers stay bf16: explicit, so no loader quantizes them
        return False

    nn.quantize(model, group_size=group_size, bits=bits, class_predicate=predicate)
    config = dict(config)
    config["quantization"] = {**params, **per_path}
    return config


def quant_params(module: nn.Module) -> dict | None:
    """{group_size, bits, mode} of a quantized layer; None for a float one."""
    if "scales" not in module:
        return None
    return {"group_size": module.group_size, "bits": module.bits, "mode": module.mode}


def dense_weight(module: nn.Module) -> mx.array:
    """The layer's weight as float32, dequantized if needed."""
    if "scales" in module:
        return mx.dequantize(module.weight, module.scales, module.get("biases"), group_size=module.group_size,
                             bits=module.bits, mode=module.mode).astype(mx.float32)
    return module.weight.astype(mx.float32)


def float_layer_like(module: nn.Module, weight: mx.array) -> nn.Module:
    """A float layer of the same kind as `module` (linear, embedding or switch, quantized or not)
    holding `weight` (and the module's bias, if any)."""
    from mlx_lm.models.switch_layers import QuantizedSwitchLinear, SwitchLinear

    bias = "bias" in module
    if isinstance(module, (SwitchLinear, QuantizedSwitchLinear)):
        layer = SwitchLinear(weight.shape[2], weight.shape[1], weight.shape[0], bias=bias)
    elif isinstance(module, (nn.Embedding, nn.QuantizedEmbedding)):
        layer = nn.Embedding(*weight.shape)
    else:
        layer = nn.Linear(weight.shape[1], weight.shape[0], bias=bias)
    layer.weight = weight
    if bias:
        layer.bias = module.bias
    return layer


def float_experts(model: nn.Module) -> int:
    """Replace every quantized expert projection (mlx-lm's QuantizedSwitchLinear) with a SwitchLinear
    holding its dequantized float32 weight; return how many were replaced."""
    from mlx_lm.models.switch_layers import QuantizedSwitchLinear

    replaced = [(path, float_layer_like(module, dense_weight(module)))
                for path, module in model.named_modules() if isinstance(module, QuantizedSwitchLinear)]
    if replaced:
        model.update_modules(tree_unflatten(replaced))
    return len(replaced)


FLOAT_EXPERTS_MAX_BYTES = 2 << 30  # float32 copies past this stay int8: an 8B model's would need ~32 GB


def float_experts_on_cpu(model: nn.Module) -> int:
    """`float_experts` where it pays and fits: on MLX's CPU backend, whose `gather_qmm` ran the demo
    model's experts about 6x slower than `gather_mm` on the same weights (220 tokens: 15.9 ms against
    2.7 ms a layer), for experts whose float32 copies stay under FLOAT_EXPERTS_MAX_BYTES.
    The weights are the same; only the kernel changes. Returns how many projections were replaced."""
    from mlx_lm.models.switch_layers import QuantizedSwitchLinear

    quantized = [m for _, m in model.named_modules() if isinstance(m, QuantizedSwitchLinear)]
    float_bytes = sum(4 * m.weight.size * 32 // m.bits for m in quantized)
    if mx.default_device() != mx.cpu or not quantized or float_bytes > FLOAT_EXPERTS_MAX_BYTES:
        return 0
    return float_experts(model)

"""The group's expert modules: trainable and frozen (int8, just-in-time dequantized) switch layers, the
expert-path choice, activating a group, and requantizing it to int8 with its retention statistics."""

from __future__ import annotations

import math
from typing import Callable

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.switch_layers import QuantizedSwitchLinear, SwitchLinear

from lfm_mlx.kernels import dequant
from lfm_mlx.kernels.choices import KernelChoices
from lfm_mlx.kernels.expert_blocks import BatchedSwitchGLU
from lfm_mlx.model.moe import PROJECTIONS, expert_kernel, feed_forward, moe_layers
from lfm_mlx.model.quant import STORAGE_DTYPE, quantize_affine, unpack_codes


def after(arrays: list, dependency: mx.array) -> list:
    """`arrays`, made to wait for `dependency` in MLX's evaluation order. MLX runs a graph breadth
    first, so work whose inputs exist early (casting a master copy) could run long before its
    consumer and stay in memory meanwhile; this keeps it just in time. (Tying the frozen experts'
    dequantization the same way saved 0.24 GB on CUDA: not done.)"""
    return mx.depends(arrays, [dependency])


def cast_keeping_gradient_dtype(w: mx.array, dtype: mx.Dtype) -> mx.array:
    """`w.astype(dtype)`, whose gradient stays in `dtype` instead of being cast back to w's dtype.
    The values are the same (a bf16 gradient cast to float32 is exact); the gradients of a float32
    master take half the memory until an update that reads them in float32 anyway."""
    cast = mx.custom_function(lambda a: a.astype(dtype))

    @cast.vjp
    def _(primals, cotangent, output):
        return cotangent

    return cast(w)


class TrainableSwitchLinear(SwitchLinear):
    """Dequantized experts being trained: master weights (float32 by default) cast to the
    activation dtype at each call, so bf16 compute does not round small updates away.
    `lean_gradients`: their gradients stay in the activation dtype (`cast_keeping_gradient_dtype`)."""

    def __init__(self, weight: mx.array, group_size: int, bits: int, mode: str, lean_gradients: bool = False):
        super().__init__(1, 1, 1, bias=False)
        self.weight = weight
        self.group_size, self.bits, self.mode = group_size, bits, mode
        self.lean_gradients = lean_gradients

    def weight_for(self, x: mx.array) -> mx.array:
        """The experts' weights in x's dtype, cast just in time for x."""
        w = after([self["weight"]], x)[0]
        if w.dtype != x.dtype:
            w = cast_keeping_gradient_dtype(w, x.dtype) if self.lean_gradients else w.astype(x.dtype)
        return w

    def __call__(self, x, indices, sorted_indices=False):
        return mx.gather_mm(x, self.weight_for(x).swapaxes(-1, -2), rhs_indices=indices,
                            sorted_indices=sorted_indices)


class DequantSwitchLinear(QuantizedSwitchLinear):
    """Frozen int8 experts dequantized just in time and run through gather_mm (same parameters as
    QuantizedSwitchLinear): much faster than gather_qmm's backward on CUDA, more transient memory.
    `use_kernel`: through the dequantization kernel (`KernelChoices.dequant`, set by `set_expert_kernel`)."""

    use_kernel = False

    def weight_for(self, x: mx.array) -> mx.array:
        """The experts dequantized to x's dtype."""
        w = dequant.dequantize(self["weight"], self["scales"], self.get("biases"), self.group_size,
                               self.bits, self.mode, self.use_kernel)
        return w.astype(x.dtype)

    def __call__(self, x, indices, sorted_indices=False):
        return mx.gather_mm(x, self.weight_for(x).swapaxes(-1, -2), rhs_indices=indices,
                            sorted_indices=sorted_indices)


# Expert kernels -> the frozen experts' module. On "blocks" every MoE block (trained experts
# included) runs as padded expert blocks through batched matmuls (`kernels.expert_blocks`), else gather_mm.
EXPERT_KERNEL_CLASSES = {"qmm": QuantizedSwitchLinear, "dequant": DequantSwitchLinear, "blocks": DequantSwitchLinear}
FROZEN_CLASSES = EXPERT_KERNEL_CLASSES  # the name before issue 28


def make_quantized(cls: type, weight: mx.array, scales: mx.array, biases: mx.array | None,
                   group_size: int, bits: int, mode: str = "affine",
                   kernels: KernelChoices | None = None) -> QuantizedSwitchLinear:
    """A frozen quantized expert stack of class `cls` holding the given arrays (dequantized by the
    kernel when `cls` dequantizes and `kernels.dequant`)."""
    module = cls(group_size, 1, 1, bias=False, group_size=group_size, bits=bits, mode=mode)  # tiny init
    module.weight, module.scales, module.biases = weight, scales, biases
    if isinstance(module, DequantSwitchLinear):
        module.use_kernel = (kernels or KernelChoices()).dequant
    module.freeze()
    return module


def set_expert_kernel(model: nn.Module, path: str, skip: list[int] = (), kernels: KernelChoices | None = None) -> None:
    """Switch every frozen expert stack (outside `skip`) to expert kernel `qmm`, `dequant` or `blocks`
    (`blocks` also runs the trained experts as padded expert blocks: `kernels.expert_blocks`), with the
    run's `kernels` (default: none, MLX's ops)."""
    kernels = kernels or KernelChoices()
    path = expert_kernel(path)
    cls = EXPERT_KERNEL_CLASSES[path]
    for i in moe_layers(model):
        ff = feed_forward(model, i)
        if path == "blocks" and not isinstance(ff.switch_mlp, BatchedSwitchGLU):
            ff.switch_mlp = BatchedSwitchGLU(ff.switch_mlp, kernels)
        elif path != "blocks" and isinstance(ff.switch_mlp, BatchedSwitchGLU):
            ff.switch_mlp = ff.switch_mlp.unbatched()
        if isinstance(ff.switch_mlp, BatchedSwitchGLU):
            ff.switch_mlp.kernels = kernels
        if i in skip:
            continue
        switch = ff.switch_mlp
        for proj in PROJECTIONS:
            m = getattr(switch, proj)
            if isinstance(m, QuantizedSwitchLinear) and type(m) is not cls:
                setattr(switch, proj, make_quantized(cls, m.weight, m.scales, m.get("biases"), m.group_size,
                                                     m.bits, m.mode, kernels))
            elif isinstance(m, DequantSwitchLinear):
                m.use_kernel = kernels.dequant


set_frozen_path = set_expert_kernel  # the name before issue 28


def activate_group(model: nn.Module, layers: list[int], master: mx.Dtype, train_routers: bool = True,
                   lean_gradients: bool = False, router_master: mx.Dtype | None = None) -> None:
    """Dequantize the group's experts into trainable weights of dtype `master`; freeze all else but
    them (and the routers, in `router_master`, default `master`).
    `lean_gradients`: the experts' gradients come in the compute dtype (see `lean_gradients`)."""
    for i in layers:
        switch = feed_forward(model, i).switch_mlp
        for proj in PROJECTIONS:
            q = getattr(switch, proj)
            if not isinstance(q, QuantizedSwitchLinear):
                raise TypeError(f"model.layers.{i}.feed_forward.switch_mlp.{proj} is {type(q).__name__}, "
                                "expected quantized experts (a mixed checkpoint)")
            w = mx.dequantize(q.weight, q.scales, q.get("biases"), group_size=q.group_size, bits=q.bits, mode=q.mode)
            setattr(switch, proj, TrainableSwitchLinear(w.astype(master), q.group_size, q.bits, q.mode,
                                                        lean_gradients))
    model.freeze()
    for i in layers:
        ff = feed_forward(model, i)
        for proj in PROJECTIONS:
            getattr(ff.switch_mlp, proj).unfreeze()
        if train_routers:
            ff.gate.weight = ff.gate.weight.astype(router_master or master)
            ff.gate.unfreeze()  # expert_bias stays frozen: it is selection-only, not trained by gradient


# ---------------------------------------------------------------- requantization and retention


def update_stats(start: mx.array, trained: mx.array, kept: mx.array,
                 codes: tuple[mx.array, mx.array] | None = None) -> dict[str, float]:
    """Sums that define update retention for one tensor (all in float32):
    d = trained - start (the update), k = kept - start (what survived storage).
    `codes` = (start codes, new codes) counts the int8 codes that changed."""
    d = trained.astype(mx.float32) - start.astype(mx.float32)
    k = kept.astype(mx.float32) - start.astype(mx.float32)
    sums = [(d * d).sum(), (k * k).sum(), (d * k).sum(), ((k - d) ** 2).sum(), (k != 0).sum()]
    sums.append((codes[0] != codes[1]).sum() if codes is not None else mx.array(-1))
    mx.eval(sums)
    dd, kk, dk, err, changed, codes_changed = (s.item() for s in sums)
    return {"dd": dd, "kk": kk, "dk": dk, "err": err, "changed": changed, "codes_changed": codes_changed,
            "n": start.size}


def summarize_stats(parts: list[dict[str, float]]) -> dict[str, float | None]:
    """Retention figures from summed `update_stats`:

    retention   = <k, d> / |d|^2  share of the update, projected on its direction, that was kept
    cosine      = <k, d> / (|k| |d|)
    norm_ratio  = |k| / |d|       above 1 when rounding noise outweighs the update
    rel_error   = |k - d| / |d|
    changed     = share of weights whose stored (dequantized) value changed; requantization
                  re-derives each group's scale and bias, so this is near 1 once a group moved
    codes_changed = share of int8 codes that changed (None for tensors stored as floats)
    update_rms  = sqrt(|d|^2 / n)
    """
    dd, kk, dk, err = (sum(p[key] for p in parts) for key in ("dd", "kk", "dk", "err"))
    n, changed = sum(p["n"] for p in parts), sum(p["changed"] for p in parts)
    coded = [p["codes_changed"] for p in parts if p["codes_changed"] >= 0]
    out = {"retention": None, "cosine": None, "norm_ratio": None, "rel_error": None,
           "changed": changed / n if n else 0.0,
           "codes_changed": sum(coded) / n if coded and len(coded) == len(parts) else None, "update_rms": 0.0}
    if dd > 0:
        out.update(retention=dk / dd, cosine=dk / math.sqrt(dd * kk) if kk else 0.0, norm_ratio=math.sqrt(kk / dd),
                   rel_error=math.sqrt(err / dd), update_rms=math.sqrt(dd / n))
    return out


def requantize_group(model: nn.Module, layers: list[int], start: dict[str, mx.array], frozen: str,
                     stochastic_key: Callable[[str], mx.array] | None = None,
                     kernels: KernelChoices | None = None) -> dict:
    """Requantize the group's trained experts (and round its routers to bf16), in place.

    `start` holds the group's parameters at the start of the group (`moe_params`). Returns the
    update retention of experts and routers, per layer and for the group.
    """
    cls = EXPERT_KERNEL_CLASSES[expert_kernel(frozen)]
    expert_parts, router_parts, per_layer = [], [], {}
    for i in layers:
        prefix = f"model.layers.{i}.feed_forward"
        ff = feed_forward(model, i)
        layer_parts = []
        for proj in PROJECTIONS:
            name = f"{prefix}.switch_mlp.{proj}"
            m = getattr(ff.switch_mlp, proj)
            key = stochastic_key(name) if stochastic_key else None
            wq, scales, biases = quantize_affine(m.weight, m.group_size, m.bits, STORAGE_DTYPE, key)
            scales, biases = scales.astype(start[f"{name}.scales"].dtype), biases.astype(start[f"{name}.scales"].dtype)
            w0 = mx.dequantize(start[f"{name}.weight"], start[f"{name}.scales"], start.get(f"{name}.biases"),
                               group_size=m.group_size, bits=m.bits, mode=m.mode)
            kept = mx.dequantize(wq, scales, biases, group_size=m.group_size, bits=m.bits, mode=m.mode)
            codes = None
            if m.bits in (2, 4, 8):
                codes = (unpack_codes(start[f"{name}.weight"], m.bits), unpack_codes(wq, m.bits))
            layer_parts.append(update_stats(w0, m.weight, kept, codes))
            setattr(ff.switch_mlp, proj, make_quantized(cls, wq, scales, biases, m.group_size, m.bits, m.mode,
                                                        kernels))
            mx.eval(getattr(ff.switch_mlp, proj).parameters())
        expert_parts += layer_parts
        router0 = start[f"{prefix}.gate.weight"]
        stored = ff.gate.weight.astype(STORAGE_DTYPE).astype(router0.dtype)
        router_parts.append(update_stats(router0, ff.gate.weight, stored))
        ff.gate.weight = stored
        per_layer[str(i)] = summarize_stats(layer_parts)
    mx.eval(model.parameters())
    return {"experts": summarize_stats(expert_parts), "routers": summarize_stats(router_parts),
            "per_layer": per_layer}

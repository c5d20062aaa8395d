"""What goes into the file: the source tensors of any layout (HF per-expert or fused, mlx-lm stacked,
quantized layers dequantized) and the plan of GGUF tensors (names, shapes, types) made before writing."""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable, Sequence

import gguf
import mlx.core as mx

from lfm_mlx.model.io import check_safetensors, weight_files


Q = gguf.GGMLQuantizationType
# outtype -> (GGML type of the matrices, general.file_type)
OUTTYPES = {
    "f32": (Q.F32, gguf.LlamaFileType.ALL_F32),
    "f16": (Q.F16, gguf.LlamaFileType.MOSTLY_F16),
    "bf16": (Q.BF16, gguf.LlamaFileType.MOSTLY_BF16),
    "q8_0": (Q.Q8_0, gguf.LlamaFileType.MOSTLY_Q8_0),
}
# llama.cpp quantizer presets we offer (llama_ftype values, from gguf's copy of the enum)
QUANT_TYPES = ("Q8_0", "Q6_K", "Q5_K_M", "Q5_K_S", "Q4_K_M", "Q4_K_S", "Q3_K_M", "Q3_K_S", "Q2_K", "IQ4_XS",
               "IQ3_M", "IQ3_XS", "IQ2_M")
ARCHS = {"lfm2": gguf.MODEL_ARCH.LFM2, "lfm2_moe": gguf.MODEL_ARCH.LFM2MOE}
_FLOATS = (mx.float32, mx.float16, mx.bfloat16)
# HF-only `{% generation %}` blocks -> an always-true block: same output, same whitespace control.
_GENERATION_TAG = re.compile(r"\{%(-?)\s*(generation|endgeneration)\s*(-?)%\}")


# ---------------------------------------------------------------- source tensors


class _Source:
    """The safetensors of a model directory, read lazily: `mx.load` maps the files and a tensor is
    read only when evaluated. Each tensor is dropped after its last planned use, so memory holds one
    output tensor at a time."""

    def __init__(self, model_dir: Path, config: dict):
        self.arrays: dict[str, mx.array] = {}
        self.origin: dict[str, Path] = {}
        for path in weight_files(model_dir):
            check_safetensors(path)
            for name, value in mx.load(str(path)).items():
                self.arrays[name] = value
                self.origin[name] = path
        quant = config.get("quantization")
        if quant is None and isinstance(config.get("quantization_config"), dict):
            quant = config["quantization_config"] if "bits" in config["quantization_config"] else None
        self.quant: dict = quant or {}
        self.config_path = model_dir / "config.json"
        self.uses: Counter = Counter()

    def has(self, name: str) -> bool:
        return name in self.arrays

    def first(self, names: Sequence[str]) -> str | None:
        return next((n for n in names if n in self.arrays), None)

    def _qparams(self, name: str) -> dict | None:
        """Quantization parameters of weight `name` if it is stored packed (has `.scales`)."""
        base = name.removesuffix(".weight")
        if not name.endswith(".weight") or f"{base}.scales" not in self.arrays:
            return None
        entry = self.quant.get(base)
        params = entry if isinstance(entry, dict) else self.quant
        if "bits" not in params or "group_size" not in params:
            raise ValueError(
                f"{self.config_path}: {name} is quantized (it has {base}.scales) but config.json has no "
                f"'quantization' entry with bits and group_size for it; restore config.json from the "
                f"directory that wrote these weights"
            )
        return params

    def shape(self, name: str) -> tuple[int, ...]:
        """The logical (dequantized) shape of a tensor."""
        shape = tuple(self.arrays[name].shape)
        params = self._qparams(name)
        if params is not None:
            shape = shape[:-1] + (shape[-1] * 32 // params["bits"],)
        return shape

    def expect(self, name: str, shape: tuple[int, ...], why: str) -> None:
        actual = self.shape(name)
        if actual != tuple(shape):
            raise ValueError(
                f"{self.origin[name]}: tensor {name!r} has shape {actual}, but {self.config_path} implies "
                f"{tuple(shape)} ({why}); the weights and config.json come from different models"
            )

    def claim(self, name: str) -> None:
        """Count one planned use of `name` (and of its scales / biases when packed)."""
        self.uses[name] += 1
        if self._qparams(name) is not None:
            base = name.removesuffix(".weight")
            for part in ("scales", "biases"):
                if f"{base}.{part}" in self.arrays:
                    self.uses[f"{base}.{part}"] += 1

    def _pop(self, name: str) -> mx.array:
        self.uses[name] -= 1
        return self.arrays.pop(name) if self.uses[name] == 0 else self.arrays[name]

    def take(self, name: str) -> mx.array:
        """Tensor `name`, lazy, dequantized to float32 if packed; forgotten after its last use."""
        params = self._qparams(name)
        if params is None:
            return self._pop(name)
        base = name.removesuffix(".weight")
        weight, scales = self._pop(name), self._pop(f"{base}.scales")
        biases = self._pop(f"{base}.biases") if f"{base}.biases" in self.arrays else None
        # float32 scales first: dequantizing with bf16 scales would round every weight to bf16
        if scales.dtype in _FLOATS:
            scales = scales.astype(mx.float32)
        if biases is not None:
            biases = biases.astype(mx.float32)
        return mx.dequantize(weight, scales, biases, group_size=params["group_size"], bits=params["bits"],
                             mode=params.get("mode", "affine")).astype(mx.float32)

    def unclaimed(self) -> list[str]:
        return sorted(n for n in self.arrays if self.uses[n] == 0)


# ---------------------------------------------------------------- the tensor plan


@dataclass
class _Planned:
    name: str                      # GGUF tensor name
    shape: tuple[int, ...]         # numpy (row-major) shape as written
    keep_float32: bool             # norms, conv kernel, router, expert bias: never rounded
    build: Callable[[], mx.array]  # lazy value (source dtype, or float32 if dequantized)


def attention_layers(config: dict) -> list[int]:
    """Indices of the attention layers (the others are short-conv layers)."""
    if config.get("layer_types"):
        return [i for i, kind in enumerate(config["layer_types"]) if kind == "full_attention"]
    return list(config["full_attn_idxs"])


def dense_ff_dim(config: dict) -> int:
    """Width of the dense SwiGLU: LFM2's block_ff_dim after auto-adjust (as mlx-lm and HF compute it)."""
    if config["model_type"] == "lfm2_moe":
        return config["intermediate_size"]
    ff = config.get("block_ff_dim", config.get("intermediate_size"))
    if config.get("block_auto_adjust_ff_dim"):
        ff = int(2 * ff / 3)
        if config.get("block_ffn_dim_multiplier") is not None:
            ff = int(config["block_ffn_dim_multiplier"] * ff)
        multiple = config["block_multiple_of"]
        ff = multiple * ((ff + multiple - 1) // multiple)
    return ff


def _check_supported(config: dict, path: Path) -> None:
    """Refuse settings llama.cpp's lfm2 / lfm2moe graphs cannot express, instead of exporting wrong numbers."""
    problems = []
    if config.get("conv_bias"):
        problems.append("conv_bias=true (llama.cpp's short conv has no biases)")
    scaling = config.get("rope_scaling")
    if scaling and scaling.get("rope_type", scaling.get("type")) not in (None, "default"):
        problems.append(f"rope_scaling={scaling} (llama.cpp's LFM2 graph uses plain RoPE)")
    if config["model_type"] == "lfm2_moe":
        if not config.get("norm_topk_prob", True):
            problems.append("norm_topk_prob=false (llama.cpp always renormalizes the top-k weights)")
        if float(config.get("routed_scaling_factor", 1.0)) != 1.0:
            problems.append(f"routed_scaling_factor={config['routed_scaling_factor']} (llama.cpp uses 1.0)")
    if config["hidden_size"] % config["num_attention_heads"]:
        problems.append("hidden_size is not a multiple of num_attention_heads")
    if problems:
        raise ValueError(f"{path}: cannot export to GGUF: " + "; ".join(problems))


def _plan(config: dict, src: _Source) -> list[_Planned]:
    """Every GGUF tensor in write order, its shape checked against config.json before any byte is written."""
    D, V, L = config["hidden_size"], config["vocab_size"], config["num_hidden_layers"]
    H, KV = config["num_attention_heads"], config["num_key_value_heads"]
    hd, K = D // H, config["conv_L_cache"]
    moe = config["model_type"] == "lfm2_moe"
    attention = set(attention_layers(config))
    plan: list[_Planned] = []

    def need(names: Sequence[str], what: str) -> str:
        found = src.first(names)
        if found is None:
            raise ValueError(
                f"{src.config_path.parent}: no tensor for {what}; looked for {', '.join(names)}. "
                f"The weights do not match config.json (layer types, experts, dense layers)"
            )
        return found

    def add(gguf_name: str, names: Sequence[str] | str, shape: tuple, why: str, f32: bool = False) -> None:
        name = need([names] if isinstance(names, str) else names, gguf_name)
        src.expect(name, shape, why)
        src.claim(name)
        plan.append(_Planned(gguf_name, shape, f32, partial(src.take, name)))

    add("token_embd.weight", "model.embed_tokens.weight", (V, D), "vocab_size x hidden_size")
    for i in range(L):
        p, b = f"model.layers.{i}.", f"blk.{i}."
        add(b + "attn_norm.weight", p + "operator_norm.weight", (D,), "hidden_size", f32=True)
        if i in attention:
            add(b + "attn_q.weight", p + "self_attn.q_proj.weight", (H * hd, D), "heads x head_dim, hidden")
            add(b + "attn_k.weight", p + "self_attn.k_proj.weight", (KV * hd, D), "kv_heads x head_dim, hidden")
            add(b + "attn_v.weight", p + "self_attn.v_proj.weight", (KV * hd, D), "kv_heads x head_dim, hidden")
            add(b + "attn_output.weight", p + "self_attn.out_proj.weight", (D, H * hd), "hidden, heads x head_dim")
            add(b + "attn_q_norm.weight", p + "self_attn.q_layernorm.weight", (hd,), "head_dim", f32=True)
            add(b + "attn_k_norm.weight", p + "self_attn.k_layernorm.weight", (hd,), "head_dim", f32=True)
        else:
            conv = need([p + "conv.conv.weight"], f"the short conv of layer {i}")
            # HF (D, 1, K), mlx-lm (D, K, 1) or already (D, K): llama.cpp's ssm_conv wants 2-D (D, K)
            if src.shape(conv) not in ((D, 1, K), (D, K, 1), (D, K)):
                src.expect(conv, (D, 1, K), "hidden_size x 1 x conv_L_cache, or (D, K, 1) / (D, K)")
            src.claim(conv)
            plan.append(_Planned(b + "shortconv.conv.weight", (D, K), True,
                                 lambda name=conv: src.take(name).reshape(D, K)))
            add(b + "shortconv.in_proj.weight", p + "conv.in_proj.weight", (3 * D, D), "3 x hidden, hidden")
            add(b + "shortconv.out_proj.weight", p + "conv.out_proj.weight", (D, D), "hidden, hidden")
        add(b + "ffn_norm.weight", p + "ffn_norm.weight", (D,), "hidden_size", f32=True)
        if moe and i >= config["num_dense_layers"]:
            _plan_experts(plan, config, src, i, add, need)
        else:
            F = dense_ff_dim(config)
            f = p + "feed_forward."
            add(b + "ffn_gate.weight", [f + "w1.weight", f + "gate_proj.weight"], (F, D), "ff_dim, hidden")
            add(b + "ffn_up.weight", [f + "w3.weight", f + "up_proj.weight"], (F, D), "ff_dim, hidden")
            add(b + "ffn_down.weight", [f + "w2.weight", f + "down_proj.weight"], (D, F), "hidden, ff_dim")
    add("token_embd_norm.weight", "model.embedding_norm.weight", (D,), "hidden_size", f32=True)
    if not config.get("tie_word_embeddings", True):
        add("output.weight", "lm_head.weight", (V, D), "vocab_size x hidden_size (untied)")
    elif src.has("lm_head.weight"):
        src.claim("lm_head.weight")  # tied: llama.cpp reuses token_embd; a stored copy is never read
    leftover = src.unclaimed()
    if leftover:
        raise ValueError(
            f"{src.config_path.parent}: {len(leftover)} tensor(s) fit no LFM2 GGUF tensor, e.g. "
            f"{', '.join(leftover[:4])}; the weights do not match config.json (model_type, layer_types, "
            f"conv_bias) or come from an unsupported variant"
        )
    return plan


def _plan_experts(plan, config, src, i, add, need) -> None:
    """Router, expert bias and the three stacked expert tensors of MoE layer `i`."""
    D, E, I = config["hidden_size"], config["num_experts"], config["moe_intermediate_size"]
    p, b = f"model.layers.{i}.feed_forward.", f"blk.{i}."
    add(b + "ffn_gate_inp.weight", p + "gate.weight", (E, D), "num_experts, hidden", f32=True)
    if config.get("use_expert_bias", True):
        add(b + "exp_probs_b.bias", p + "expert_bias", (E,), "num_experts", f32=True)
    else:  # llama.cpp requires the bias; zeros select exactly as the unbiased router does
        if src.has(p + "expert_bias"):
            src.claim(p + "expert_bias")  # stored, but the model does not use it
        plan.append(_Planned(b + "exp_probs_b.bias", (E,), True, lambda: mx.zeros((E,), mx.float32)))
    shapes = {"gate": (E, I, D), "up": (E, I, D), "down": (E, D, I)}
    hf = {"gate": "w1", "up": "w3", "down": "w2"}
    for part, shape in shapes.items():
        gguf_name = f"{b}ffn_{part}_exps.weight"
        stacked = p + f"switch_mlp.{part}_proj.weight"  # mlx-lm
        fused = p + ("experts.down_proj" if part == "down" else "experts.gate_up_proj")  # transformers 5
        per_expert = [p + f"experts.{e}.{hf[part]}.weight" for e in range(E)]  # HF
        if src.has(stacked):
            add(gguf_name, stacked, shape, "num_experts, out, in")
        elif src.has(fused) and part == "down":
            add(gguf_name, fused, shape, "num_experts, hidden, moe_intermediate_size")
        elif src.has(fused):
            # rows [0, I) are the gate (w1), [I, 2I) the up projection (w3)
            src.expect(fused, (E, 2 * I, D), "num_experts, 2 x moe_intermediate_size, hidden")
            src.claim(fused)
            rows = slice(0, I) if part == "gate" else slice(I, 2 * I)
            plan.append(_Planned(gguf_name, shape, False, lambda name=fused, r=rows: src.take(name)[:, r]))
        elif src.has(per_expert[0]):
            for name in per_expert:
                need([name], f"expert {name}")
                src.expect(name, shape[1:], "per-expert matrix")
                src.claim(name)
            plan.append(_Planned(gguf_name, shape, False,
                                 lambda names=per_expert: mx.stack([src.take(n) for n in names])))
        else:
            need([stacked, fused, per_expert[0]], gguf_name)

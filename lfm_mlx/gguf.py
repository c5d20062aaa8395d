"""GGUF export for LFM2 and LFM2-MoE (llama.cpp architectures `lfm2` and `lfm2moe`).

Reads HF directories (per-expert or fused experts, conv (D, 1, K)) and mlx-lm directories (stacked
`switch_mlp`, conv (D, K, 1), affine-quantized layers dequantized on the way). Writes one GGUF file
tensor by tensor with the `gguf` package, so the 8B-A1B never sits in memory twice, and atomically.
Quantized variants (Q8_0 ... Q4_K_M) come from llama.cpp's own quantizer through llama-cpp-python,
with per-tensor type overrides and an importance matrix computed with MLX from our own transcripts.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import re
import time
import warnings
from collections import Counter
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable, Iterable, Iterator, Mapping, Sequence

import gguf
import mlx.core as mx
import mlx.nn as nn
import numpy as np

from lfm_mlx import console
from lfm_mlx.errors import debugging
from lfm_mlx.fsutil import atomic_file, check_free_space, locked, recover, refuse_overlap
from lfm_mlx.models import check_safetensors, check_tokenizer, read_config, weight_files

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


# ---------------------------------------------------------------- metadata


def portable_chat_template(template: str) -> str:
    """The chat template with HF-only `{% generation %}` tags turned into `{% if true %}` blocks:
    the same text renders (same whitespace control), and every Jinja engine can run it."""

    def swap(match: re.Match) -> str:
        left, tag, right = match.groups()
        return f"{{%{left} {'if true' if tag == 'generation' else 'endif'} {right}%}}"

    return _GENERATION_TAG.sub(swap, template)


def read_chat_template(model_dir: Path) -> str | None:
    """The chat template of a model directory: chat_template.jinja (transformers 5) or tokenizer_config."""
    jinja = model_dir / "chat_template.jinja"
    if jinja.exists():
        return jinja.read_text()
    template = json.loads((model_dir / "tokenizer_config.json").read_text()).get("chat_template")
    if isinstance(template, list):  # named templates: the default one
        template = next((t["template"] for t in template if t.get("name") == "default"), None)
    return template


def _split_regexes(node) -> list[str]:
    """The Split regexes of a tokenizer.json pre-tokenizer (nested Sequences included)."""
    if not isinstance(node, dict):
        return []
    found = [node["pattern"]["Regex"]] if node.get("type") == "Split" and "Regex" in node.get("pattern", {}) else []
    for child in node.get("pretokenizers", []):
        found += _split_regexes(child)
    return found


def _token_text(value) -> str | None:
    return value.get("content") if isinstance(value, dict) else value


def _write_tokenizer(writer: gguf.GGUFWriter, model_dir: Path, config: dict) -> dict:
    """gpt2-style BPE vocabulary, merges, special ids and the chat template; returns a summary."""
    path = model_dir / "tokenizer.json"
    tok = json.loads(path.read_text())
    model = tok.get("model", {})
    if model.get("type") != "BPE":
        raise ValueError(f"{path}: tokenizer model {model.get('type')!r} is not supported; LFM2 uses byte-level BPE")
    by_id = {i: t for t, i in model["vocab"].items()}
    added = {a["id"]: a for a in tok.get("added_tokens", [])}
    by_id.update({i: a["content"] for i, a in added.items()})
    size, vocab_size = max(by_id) + 1, config["vocab_size"]
    if size > vocab_size:
        raise ValueError(
            f"{path}: the tokenizer has {size} tokens but config.json vocab_size is {vocab_size}; "
            f"the tokenizer belongs to another model"
        )
    tokens, types = [], []
    for i in range(vocab_size):  # ids past the tokenizer (or holes) become unused padding rows
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif i in added:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.CONTROL if added[i].get("special") else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.NORMAL)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    from lfm_mlx.synthetic import LLAMA3_SPLIT

    if _split_regexes(tok.get("pre_tokenizer")) != [LLAMA3_SPLIT]:
        warnings.warn(
            f"{path}: the pre-tokenizer is not LFM2's (llama3) split regex, but llama.cpp's `lfm2` "
            f"pre-tokenizer applies that regex: token ids may differ between llama.cpp and transformers",
            stacklevel=3,
        )
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("lfm2")  # llama.cpp: the llama3 split regex, as LFM2's tokenizer uses
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)

    tok_config = json.loads((model_dir / "tokenizer_config.json").read_text())
    ids = {}
    for role in ("bos", "eos", "pad"):
        text = _token_text(tok_config.get(f"{role}_token"))
        token_id = model["vocab"].get(text, next((i for i, a in added.items() if a["content"] == text), None))
        if token_id is None:
            token_id = config.get(f"{role}_token_id")
        if isinstance(token_id, list):
            token_id = token_id[0]
        if token_id is not None:
            ids[role] = int(token_id)
    if "bos" in ids:
        writer.add_bos_token_id(ids["bos"])
    if "eos" in ids:
        writer.add_eos_token_id(ids["eos"])
    if "pad" in ids:
        writer.add_pad_token_id(ids["pad"])
    add_bos = tok_config.get("add_bos_token")
    if add_bos is None:  # else from the post-processor, as tokenizers applies it
        add_bos = "bos" in ids and str(ids["bos"]) in json.dumps(tok.get("post_processor") or {})
    writer.add_add_bos_token(bool(add_bos))
    writer.add_add_eos_token(bool(tok_config.get("add_eos_token", False)))

    template = read_chat_template(model_dir)
    if template is not None:
        writer.add_chat_template(portable_chat_template(template))
    return {"tokens": size, "padded_to": vocab_size, "merges": len(merges), "special_ids": ids,
            "add_bos": bool(add_bos), "chat_template": template is not None}


def _write_hparams(writer: gguf.GGUFWriter, config: dict, name: str) -> None:
    """Every hyperparameter llama.cpp's lfm2 / lfm2moe loaders read."""
    attention = set(attention_layers(config))
    L = config["num_hidden_layers"]
    rope = config.get("rope_parameters") or {}
    writer.add_name(name)
    writer.add_context_length(config.get("max_position_embeddings", 128000))
    writer.add_embedding_length(config["hidden_size"])
    writer.add_block_count(L)
    writer.add_feed_forward_length(dense_ff_dim(config))
    writer.add_head_count(config["num_attention_heads"])
    # llama.cpp marks a layer recurrent (short conv) by n_head_kv == 0
    writer.add_head_count_kv([config["num_key_value_heads"] if i in attention else 0 for i in range(L)])
    writer.add_rope_freq_base(float(rope.get("rope_theta", config.get("rope_theta", 1000000.0))))
    writer.add_layer_norm_rms_eps(float(config["norm_eps"]))
    writer.add_vocab_size(config["vocab_size"])
    writer.add_shortconv_l_cache(config["conv_L_cache"])
    if config["model_type"] == "lfm2_moe":
        writer.add_expert_count(config["num_experts"])
        writer.add_expert_used_count(config["num_experts_per_tok"])
        writer.add_expert_feed_forward_length(config["moe_intermediate_size"])
        writer.add_leading_dense_block_count(config["num_dense_layers"])
        writer.add_expert_gating_func(gguf.ExpertGatingFuncType.SIGMOID)


# ---------------------------------------------------------------- writing


def _encode(value: mx.array, qtype: Q) -> np.ndarray:
    """An MLX array as the bytes of GGML type `qtype` (numpy, row-major). One cast, straight from
    the source dtype, and numpy views MLX's buffer: no further copies of large tensors."""
    if qtype == Q.F32:
        value = value.astype(mx.float32)
    elif qtype == Q.F16:
        value = value.astype(mx.float16)
    elif qtype == Q.BF16:  # numpy has no bfloat16: ship the raw 16-bit patterns
        value = value.astype(mx.bfloat16).view(mx.uint16)
    else:
        return gguf.quants.quantize(np.asarray(value.astype(mx.float32)), qtype)
    mx.eval(value)
    return np.asarray(value)


def _tensor_type(item: _Planned, matrix_type: Q) -> Q:
    if item.keep_float32 or len(item.shape) < 2:
        return Q.F32
    block = gguf.GGML_QUANT_SIZES[matrix_type][0]
    if item.shape[-1] % block:  # rows that do not fill whole Q8_0 blocks stay exact
        return Q.F32
    return matrix_type


def export_gguf(model_dir: str | Path, out_path: str | Path, outtype: str = "bf16",
                on_tensor: Callable[[int, int, str], None] | None = None) -> dict:
    """Export an LFM2 / LFM2-MoE directory (HF, or mlx-lm mixed / trained / fused) to one GGUF file.

    Matrices are written as `outtype` (bf16, f16, f32 or q8_0); norms, the short-conv kernel, the
    router and `expert_bias` stay float32. `on_tensor(i, n, name)` is called before each tensor (a
    progress hook). Returns a report: sizes, tensor types, vocabulary, seconds.
    """
    if outtype not in OUTTYPES:
        raise ValueError(f"outtype {outtype!r} is not supported; choose one of {', '.join(OUTTYPES)}")
    start = time.perf_counter()
    model_dir, out_path = Path(model_dir), Path(out_path)
    if not model_dir.is_dir():
        raise FileNotFoundError(f"model directory {model_dir} does not exist; pass a local model directory")
    refuse_overlap(out_path, {"model directory": model_dir})
    config = read_config(model_dir)
    check_tokenizer(model_dir)
    _check_supported(config, model_dir / "config.json")
    src = _Source(model_dir, config)
    plan = _plan(config, src)
    matrix_type, file_type = OUTTYPES[outtype]

    arch = gguf.MODEL_ARCH_NAMES[ARCHS[config["model_type"]]]
    writer = gguf.GGUFWriter(path=None, arch=arch)
    _write_hparams(writer, config, model_dir.name)
    vocab = _write_tokenizer(writer, model_dir, config)
    writer.add_file_type(file_type)
    if matrix_type == Q.Q8_0:
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    types, data_bytes = [], 0
    for item in plan:
        qtype = _tensor_type(item, matrix_type)
        types.append(qtype)
        if qtype == Q.Q8_0:  # quantized data is described by its byte shape
            byte_shape = gguf.quants.quant_shape_to_byte_shape(item.shape, qtype)
            writer.add_tensor_info(item.name, byte_shape, np.dtype(np.uint8), int(np.prod(byte_shape)), qtype)
            data_bytes += int(np.prod(byte_shape))
        else:
            dtype = {Q.F32: np.float32, Q.F16: np.float16, Q.BF16: np.uint16}[qtype]
            nbytes = int(np.prod(item.shape)) * np.dtype(dtype).itemsize
            writer.add_tensor_info(item.name, item.shape, np.dtype(dtype), nbytes, qtype)
            data_bytes += nbytes

    # One writer at a time per output; recover() drops the temporaries of killed exports.
    with locked(out_path, sibling=True):
        recover(out_path)
        check_free_space(out_path, data_bytes, "the GGUF file")  # + metadata, which is small
        with atomic_file(out_path) as tmp:
            try:
                writer.write_header_to_file(tmp)
                writer.write_kv_data_to_file()
                writer.write_ti_data_to_file()
                for i, (item, qtype) in enumerate(zip(plan, types)):
                    if on_tensor is not None:
                        on_tensor(i, len(plan), item.name)
                    writer.write_tensor_data(_encode(item.build(), qtype))
                    mx.clear_cache()  # hand freed buffers back: peak stays near one tensor, not the model
            finally:
                writer.close()
    return {
        "source": str(model_dir), "out": str(out_path), "outtype": outtype, "architecture": arch,
        "n_tensors": len(plan), "bytes": out_path.stat().st_size,
        "tensor_types": dict(Counter(t.name for t in types)), "vocab": vocab,
        "seconds": round(time.perf_counter() - start, 3),
    }


# ---------------------------------------------------------------- llama.cpp


def open_gguf(path: str | Path, **kwargs):
    """`llama_cpp.Llama(path, **kwargs)` with llama.cpp's CPU weight repacking off (its "extra
    buffer types"). On an AMX CPU the repacked path of llama-cpp-python 0.3.35 and 0.3.36 crashed
    (in ggml_backend_amx_mul_mat) on the tiny models' Q8_0 experts and moved their F16 logits off
    the plain kernels' rounding; the plain CPU kernels are the reference this project checks
    against. llama-cpp-python's Llama takes no such argument, so its default model parameters are
    swapped for the call."""
    llama_cpp = _llama_cpp()
    low_level = llama_cpp.llama_cpp
    defaults = low_level.llama_model_default_params

    def without_repacking():
        params = defaults()
        params.use_extra_bufts = False
        return params

    low_level.llama_model_default_params = without_repacking
    try:
        # verbose=False still lets the context's set-up print to stderr; llama-cpp-python's own
        # descriptor-level silencer keeps it quiet too
        from llama_cpp._utils import suppress_stdout_stderr

        with suppress_stdout_stderr(disable=kwargs.get("verbose", True)):
            return llama_cpp.Llama(model_path=str(path), **kwargs)
    finally:
        low_level.llama_model_default_params = defaults


def _llama_cpp():
    try:
        import llama_cpp
    except ImportError:
        raise ImportError(
            "quantized GGUF variants and runs in llama.cpp go through llama-cpp-python; "
            "install it with `pip install llama-cpp-python` (it builds llama.cpp, ~6 minutes)"
        ) from None
    return llama_cpp


def gguf_tensor_types(path: str | Path) -> dict[str, str]:
    """GGUF tensor name -> GGML type name, read from the file's header."""
    reader = gguf.GGUFReader(str(path))
    return {t.name: t.tensor_type.name for t in reader.tensors}


def quantize_gguf(src_gguf: str | Path, dst_gguf: str | Path, qtype: str = "Q4_K_M",
                  tensor_types: Mapping[str, str] | None = None,
                  imatrix: Mapping[str, np.ndarray] | None = None, nthread: int = 0) -> dict:
    """Quantize a bf16 / f16 / f32 GGUF with llama.cpp's quantizer (llama_model_quantize), atomically.

    `tensor_types` maps a regex over GGUF tensor names to a GGML type name (e.g.
    {"token_embd": "q8_0", "attn_": "q6_k"}); the first match wins. `imatrix` maps GGUF tensor
    names to per-column importances (see `compute_imatrix`). Returns sizes and the type counts.
    """
    llama_cpp = _llama_cpp()
    qtype = qtype.upper()
    if qtype not in QUANT_TYPES:
        raise ValueError(f"quantization type {qtype!r} is not offered; choose one of {', '.join(QUANT_TYPES)}")
    src_gguf, dst_gguf = Path(src_gguf), Path(dst_gguf)
    if not src_gguf.is_file():
        raise FileNotFoundError(f"{src_gguf} does not exist; export it first with `lfm-mlx gguf`")
    quantized = {t for t in gguf_tensor_types(src_gguf).values() if t not in ("F32", "F16", "BF16")}
    if quantized:
        raise ValueError(
            f"{src_gguf} is already quantized ({', '.join(sorted(quantized))}); requantizing stacks two "
            f"roundings. Quantize from a bf16 / f16 / f32 export (lfm-mlx gguf --outtype bf16)"
        )
    start = time.perf_counter()
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = int(gguf.LlamaFileType[f"MOSTLY_{qtype}"])
    params.nthread = nthread
    keep = []  # ctypes buffers must outlive the call

    overrides = dict(tensor_types or {})
    if overrides:
        array = (llama_cpp.llama_model_tensor_override * (len(overrides) + 1))()
        for i, (pattern, type_name) in enumerate(overrides.items()):
            try:
                re.compile(pattern)
                ggml_type = Q[type_name.upper()]
            except re.error as err:
                raise ValueError(f"tensor type override {pattern!r}: not a valid regex ({err})") from None
            except KeyError:
                raise ValueError(
                    f"tensor type override {pattern!r}={type_name!r}: unknown GGML type; use e.g. "
                    f"q8_0, q6_k, q5_k, q4_k, bf16, f16"
                ) from None
            array[i].pattern = pattern.encode()
            array[i].type = int(ggml_type)
        array[len(overrides)].pattern = None  # terminator
        params.tt_overrides = array
        keep.append(array)

    if imatrix:
        entries = (llama_cpp.llama_model_imatrix_data * (len(imatrix) + 1))()
        for i, (name, values) in enumerate(imatrix.items()):
            values = np.ascontiguousarray(values, dtype=np.float32)
            if not np.all(np.isfinite(values)):
                raise ValueError(f"imatrix entry {name!r} has non-finite values; recompute the importance matrix")
            keep.extend([values, name.encode()])
            entries[i].name = keep[-1]
            entries[i].data = values.ctypes.data_as(llama_cpp.ctypes.POINTER(llama_cpp.ctypes.c_float))
            entries[i].size = values.size
        entries[len(imatrix)].name = None  # terminator
        params.imatrix = entries
        keep.append(entries)

    with locked(dst_gguf, sibling=True), atomic_file(dst_gguf) as tmp, _captured_log(llama_cpp) as log:
        code = llama_cpp.llama_model_quantize(str(src_gguf).encode(), str(tmp).encode(), llama_cpp.byref(params))
        if code != 0:
            said = "".join(log).strip().splitlines()[-12:]
            raise RuntimeError(
                f"llama.cpp could not quantize {src_gguf} to {qtype} (code {code}); a wrong tensor override pattern, "
                f"or an imatrix that does not fit the tensors? llama.cpp's last words:\n  " + "\n  ".join(said))
    types = gguf_tensor_types(dst_gguf)
    return {
        "source": str(src_gguf), "out": str(dst_gguf), "qtype": qtype,
        "bytes": dst_gguf.stat().st_size, "source_bytes": src_gguf.stat().st_size,
        "tensor_types": dict(Counter(types.values())), "overrides": overrides,
        "imatrix_entries": len(imatrix or {}), "seconds": round(time.perf_counter() - start, 3),
    }


@contextlib.contextmanager
def _captured_log(llama_cpp) -> Iterator[list[str]]:
    """llama.cpp's log kept in a list instead of stderr: the quantizer logs every key and tensor
    (hundreds of lines for an 8B), and its level numbers differ between versions."""
    lines: list[str] = []

    @llama_cpp.llama_log_callback
    def keep(level: int, text: bytes, user_data) -> None:
        lines.append(text.decode("utf-8", "replace"))

    llama_cpp.llama_log_set(keep, ctypes.c_void_p(0))
    try:
        yield lines
    finally:
        from llama_cpp._logger import llama_log_callback  # llama-cpp-python's own, set when it was imported

        llama_cpp.llama_log_set(llama_log_callback, ctypes.c_void_p(0))


# ---------------------------------------------------------------- importance matrix


class _Tap:
    """Accumulates the mean squared input of one layer per column (per expert for expert stacks):
    llama.cpp's importance matrix, measured in MLX on our own transcripts."""

    def __init__(self, in_dims: int, experts: int = 1):
        self.sums = mx.zeros((experts, in_dims), mx.float32)
        self.counts = mx.zeros((experts,), mx.float32)
        self.experts = experts

    def add(self, x: mx.array, indices: mx.array | None) -> None:
        x = x.astype(mx.float32)
        if indices is None:
            x = x.reshape(-1, x.shape[-1])
            self.sums = self.sums + mx.sum(x * x, axis=0)
            self.counts = self.counts + x.shape[0]
            return
        # SwitchLinear inputs are (..., 1, in) and broadcast against the expert indices (...)
        x = mx.broadcast_to(x[..., 0, :], indices.shape + (x.shape[-1],)).reshape(-1, x.shape[-1])
        onehot = (indices.reshape(-1, 1) == mx.arange(self.experts)).astype(mx.float32)
        self.sums = self.sums + onehot.T @ (x * x)
        self.counts = self.counts + onehot.sum(axis=0)

    def values(self) -> np.ndarray:
        sums, counts = np.array(self.sums), np.array(self.counts)
        out = np.ones_like(sums)  # experts never routed to: uniform importance (no information)
        seen = counts > 0
        out[seen] = sums[seen] / counts[seen, None]
        return out.reshape(-1)  # expert-major, as llama.cpp lays out 3-D imatrix entries


class _Tapped(nn.Module):
    """Records its input into a `_Tap`, then runs the wrapped layer (same call signature)."""

    def __init__(self, inner: nn.Module, tap: _Tap):
        super().__init__()
        self.inner = inner
        self.tap = tap  # a plain attribute: not a parameter

    def __call__(self, x, *args, **kwargs):
        self.tap.add(x, args[0] if args else kwargs.get("indices"))  # SwitchLinear: (x, indices)
        return self.inner(x, *args, **kwargs)


# mlx-lm module path (inside a layer) -> GGUF tensor name (inside a block)
_IMATRIX_NAMES = {
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.out_proj": "attn_output", "conv.in_proj": "shortconv.in_proj",
    "conv.out_proj": "shortconv.out_proj", "feed_forward.w1": "ffn_gate", "feed_forward.w3": "ffn_up",
    "feed_forward.w2": "ffn_down", "feed_forward.gate_proj": "ffn_gate", "feed_forward.up_proj": "ffn_up",
    "feed_forward.down_proj": "ffn_down", "feed_forward.switch_mlp.gate_proj": "ffn_gate_exps",
    "feed_forward.switch_mlp.up_proj": "ffn_up_exps", "feed_forward.switch_mlp.down_proj": "ffn_down_exps",
}


def render_samples(tokenizer, samples: Iterable[str | dict]) -> list[list[int]]:
    """Token ids of samples: plain strings, or chat rows {"messages": [...], "tools": [...]} rendered
    with the model's own chat template (the transcripts the model will see)."""
    out = []
    for sample in samples:
        if isinstance(sample, dict):
            if "messages" not in sample:
                raise ValueError(f"sample {str(sample)[:80]!r}: a chat row needs a 'messages' list")
            text = tokenizer.apply_chat_template(sample["messages"], tools=sample.get("tools"), tokenize=False)
        else:
            text = sample
        out.append(tokenizer.encode(text, add_special_tokens=not isinstance(sample, dict)))
    return out


def compute_imatrix(model_dir: str | Path, samples: Iterable[str | dict],
                    max_tokens: int = 2048) -> dict[str, np.ndarray]:
    """Importance matrix for `quantize_gguf`: per GGUF tensor, the mean squared input activation of
    each column (per expert for expert stacks), measured by running the MLX model on `samples`."""
    from lfm_mlx.models import load

    model, tokenizer, config = load(model_dir, return_config=True)
    modules = dict(model.named_modules())
    taps: dict[str, _Tap] = {}
    for path, module in list(modules.items()):
        match = re.fullmatch(r"model\.layers\.(\d+)\.(.+)", path)
        if not match or match.group(2) not in _IMATRIX_NAMES:
            continue
        layer, inner = match.groups()
        shape = module.weight.shape
        in_dims = shape[-1] * 32 // module.bits if hasattr(module, "bits") else shape[-1]
        tap = _Tap(in_dims, shape[0] if len(shape) == 3 else 1)
        taps[f"blk.{layer}.{_IMATRIX_NAMES[inner]}.weight"] = tap
        parent_path, attr = path.rsplit(".", 1)
        setattr(modules[parent_path], attr, _Tapped(module, tap))
    head = _Tap(config["hidden_size"])
    taps["output.weight" if not config.get("tie_word_embeddings", True) else "token_embd.weight"] = head
    n_seen = 0
    for ids in render_samples(tokenizer, samples):
        ids = ids[:max_tokens]
        hidden = model.model(mx.array(ids)[None])  # the input of the output projection
        head.add(hidden, None)
        mx.eval([t.sums for t in taps.values()] + [t.counts for t in taps.values()])
        n_seen += len(ids)
    if n_seen == 0:
        raise ValueError("compute_imatrix got no samples; pass transcripts (chat rows or strings)")
    return {name: tap.values() for name, tap in taps.items()}


def read_samples(path: str | Path) -> list[str | dict]:
    """Samples from a JSONL file: chat rows ({"messages": ..., "tools": ...}) or {"text": ...}."""
    samples = []
    for number, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}:{number}: not JSON ({err}); one object per line") from None
        if isinstance(row, dict) and "messages" in row:
            samples.append(row)
        elif isinstance(row, dict) and isinstance(row.get("text"), str):
            samples.append(row["text"])
        else:
            raise ValueError(f"{path}:{number}: expected an object with 'messages' (a chat row) or 'text'")
    return samples


# ---------------------------------------------------------------- CLI


def _parse_override(text: str) -> tuple[str, str]:
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"{text!r}: expected REGEX=TYPE, e.g. token_embd=q8_0")
    pattern, type_name = text.rsplit("=", 1)
    return pattern, type_name


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lfm-mlx gguf", description=" ".join(__doc__.split("\n\n")[0].split()))
    parser.add_argument("model_dir", help="HF or mlx-lm (mixed, trained, fused) model directory")
    parser.add_argument("out", help="output .gguf path (written atomically)")
    parser.add_argument("--outtype", default="bf16", choices=list(OUTTYPES))
    parser.add_argument("--quantize", nargs="*", default=[], metavar="QTYPE", choices=list(QUANT_TYPES),
                        help=f"also write OUT-QTYPE.gguf with llama.cpp's quantizer ({', '.join(QUANT_TYPES)})")
    parser.add_argument("--tensor-type", action="append", default=[], type=_parse_override, metavar="REGEX=TYPE",
                        help="per-tensor type for the quantized variants, e.g. token_embd=q8_0 (repeatable)")
    parser.add_argument("--imatrix-from", metavar="JSONL",
                        help="compute an importance matrix from these transcripts (chat rows or text)")
    parser.add_argument("--json", help="write the report as JSON to this path")
    console.add_quiet(parser)
    args = parser.parse_args(argv)
    if args.quantize and args.outtype == "q8_0":
        parser.error("--quantize needs a float export (--outtype bf16, f16 or f32): "
                     "requantizing q8_0 stacks two roundings")
    if (args.imatrix_from or args.tensor_type) and not args.quantize:
        parser.error("--imatrix-from and --tensor-type apply to quantized variants: add --quantize QTYPE")
    if args.imatrix_from and not Path(args.imatrix_from).is_file():  # before the export, not after it
        parser.error(f"--imatrix-from {args.imatrix_from}: no such file (chat rows or text, one JSON object a line)")
    try:
        report = _run(args)
    except (FileNotFoundError, ValueError, ImportError, RuntimeError) as err:
        if debugging():
            raise
        parser.exit(2, f"lfm-mlx gguf: error: {err}\n")
    if args.json:
        from lfm_mlx.fsutil import atomic_write_json

        atomic_write_json(args.json, report)
    return 0


def _run(args: argparse.Namespace) -> dict:
    out = Path(args.out)
    variants = {qtype: out.with_name(f"{out.stem}-{qtype}.gguf") for qtype in args.quantize}
    console.say("gguf", f"exporting {args.model_dir} to {out} ({args.outtype} matrices; norms, conv, router and "
                        f"expert_bias float32)" + "".join(f", then {qtype} to {dst} with llama.cpp's quantizer"
                                                          for qtype, dst in variants.items())
                + (f" (importance matrix from {args.imatrix_from})" if args.imatrix_from else ""), args.quiet)
    bar = None

    def progress(i: int, n: int, name: str) -> None:
        nonlocal bar
        if bar is None:
            bar = console.progress("gguf", n, "tensor", show=not args.quiet)
        bar.set_postfix_str(name, refresh=False)
        bar.update(1)

    report = {"export": export_gguf(args.model_dir, out, args.outtype, on_tensor=progress)}
    if bar is not None:
        bar.close()
    written = [f"{out} ({report['export']['bytes'] / 1e9:.3f} GB)"]
    console.say("gguf", f"wrote {written[0]}: {report['export']['tensor_types']}", args.quiet)
    if args.imatrix_from:
        console.say("gguf", f"importance matrix from {args.imatrix_from} ...", args.quiet)
    imatrix = compute_imatrix(args.model_dir, read_samples(args.imatrix_from)) if args.imatrix_from else None
    for qtype, dst in variants.items():
        console.say("gguf", f"quantizing to {qtype} ...", args.quiet)
        result = report[qtype] = quantize_gguf(out, dst, qtype, dict(args.tensor_type), imatrix)
        written.append(f"{dst} ({result['bytes'] / 1e9:.3f} GB)")
        console.say("gguf", f"wrote {written[-1]}: {result['tensor_types']}", args.quiet)
    print(f"gguf: wrote {', '.join(written)}")
    return report

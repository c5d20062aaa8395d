"""Synthetic LFM2 / LFM2-MoE model directories in the Hugging Face layout.

Seeded random weights, a real byte-level BPE tokenizer trained with `tokenizers` (LFM2's special
tokens, llama3-style pre-tokenizer split, merges that never join a letter to what precedes it), and
the LFM2.5 (or LFM2) chat template. Tests and the demo use these instead of downloading weights;
every code path must take a real model unchanged.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
from pathlib import Path

import mlx.core as mx
import numpy as np

from lfm_mlx.fsutil import atomic_dir

SPECIAL_TOKENS = [
    "<|pad|>",
    "<|startoftext|>",
    "<|endoftext|>",
    "<|fim_pre|>",
    "<|fim_mid|>",
    "<|fim_suf|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|tool_list_start|>",
    "<|tool_list_end|>",
    "<|tool_call_start|>",
    "<|tool_call_end|>",
    "<|tool_response_start|>",
    "<|tool_response_end|>",
]
PAD_ID, BOS_ID, EOS_TEXT_ID, IM_END_ID = 0, 1, 2, 7

# llama3's split regex: llama.cpp's `lfm2` pre-tokenizer applies the same one, so token ids agree.
LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# BPE merges are learned inside runs of letters, of digits and of everything else, so no merge joins
# a letter to the space or quote before it: a word gets the same tokens after a space (in a request)
# as after `='` (in a pythonic call), and copying a value is copying tokens. With llama3's split
# alone, " cedar" and "cedar" start with different tokens, which a tiny model copies badly.
MERGE_SPLIT = r"\p{L}+|\p{N}{1,3}|[^\p{L}\p{N}]+"

TEMPLATES_DIR = Path(__file__).parent.parent / "templates"

# Layer layout of LFM2.5-8B-A1B: attention at these indices, short conv elsewhere.
_8B_ATTENTION = [2, 6, 10, 14, 18, 21]

PRESETS: dict[str, dict] = {
    "tiny-moe": dict(
        model_type="lfm2_moe", vocab_size=1024, hidden_size=64, intermediate_size=128,
        moe_intermediate_size=64, num_hidden_layers=8, attention_layers=[2, 6],
        num_attention_heads=4, num_key_value_heads=2, num_dense_layers=2,
        num_experts=8, num_experts_per_tok=2,
    ),
    # The demo's base candidate: attention in four of six layers. benchmarks/copy_probe.py (H200):
    # tiny-moe, with two attention layers among six short-conv ones, stays at chance copying eight
    # tokens after 1,000 steps; this stack copies 94% of them at step 500. A tool call is mostly
    # arguments copied out of the request.
    "demo-moe": dict(
        model_type="lfm2_moe", vocab_size=1024, hidden_size=64, intermediate_size=128,
        moe_intermediate_size=64, num_hidden_layers=6, attention_layers=[0, 1, 3, 4],
        num_attention_heads=4, num_key_value_heads=2, num_dense_layers=1,
        num_experts=8, num_experts_per_tok=2,
    ),
    # demo-moe at twice the width (head size 32): more room to copy made-up values token for token.
    "demo-moe-wide": dict(
        model_type="lfm2_moe", vocab_size=1024, hidden_size=128, intermediate_size=256,
        moe_intermediate_size=128, num_hidden_layers=6, attention_layers=[0, 1, 3, 4],
        num_attention_heads=4, num_key_value_heads=2, num_dense_layers=1,
        num_experts=8, num_experts_per_tok=2,
    ),
    "tiny-dense": dict(
        model_type="lfm2", vocab_size=1024, hidden_size=64, intermediate_size=128,
        num_hidden_layers=6, attention_layers=[2, 5], num_attention_heads=4, num_key_value_heads=2,
    ),
    "lfm2.5-8b-a1b": dict(
        model_type="lfm2_moe", vocab_size=128000, hidden_size=2048, intermediate_size=7168,
        moe_intermediate_size=1792, num_hidden_layers=24, attention_layers=_8B_ATTENTION,
        num_attention_heads=32, num_key_value_heads=8, num_dense_layers=2,
        num_experts=32, num_experts_per_tok=4, tokenizer_vocab=4096,
    ),
}


def hf_config(preset: str | dict) -> dict:
    """The config.json of a preset (or of a dict with the same keys), as transformers writes it."""
    spec = dict(PRESETS[preset]) if isinstance(preset, str) else dict(preset)
    attention = spec.pop("attention_layers")
    spec.pop("tokenizer_vocab", None)
    n_layers = spec["num_hidden_layers"]
    common = dict(
        bos_token_id=BOS_ID, eos_token_id=IM_END_ID, pad_token_id=PAD_ID,
        conv_L_cache=3, conv_bias=False, norm_eps=1e-5, max_position_embeddings=128000,
        rope_theta=1000000.0, tie_word_embeddings=True, torch_dtype="bfloat16",
        layer_types=["full_attention" if i in attention else "conv" for i in range(n_layers)],
    )
    if spec["model_type"] == "lfm2_moe":
        common.update(
            architectures=["Lfm2MoeForCausalLM"], use_expert_bias=True, norm_topk_prob=True,
            routed_scaling_factor=1.0,
        )
    else:
        common.update(
            architectures=["Lfm2ForCausalLM"], block_dim=spec["hidden_size"],
            block_ff_dim=spec["intermediate_size"], block_multiple_of=256,
            block_ffn_dim_multiplier=1.0, block_auto_adjust_ff_dim=False,
        )
    return {**spec, **common}


# ---------------------------------------------------------------- tokenizer


def _corpus() -> list[str]:
    """A small deterministic training corpus in the register of tool-use chats."""
    words = (
        "the a an to of and in for on with from by at as is are was be can will please "
        "open read write search find list show get set create delete update run check send "
        "file files folder directory path page site url browser web link tab terminal command "
        "shell output error log logs result results query text line lines name value number "
        "what how why when where which who could would should do does did you your me my i "
        "weather today tomorrow time date city price stock news email message calendar event "
        "meeting issue repository branch commit pull request server tool tools call function "
        "arguments parameters description type string integer boolean object array required "
        "properties items enum null true false none yes no ok thanks hello summary answer "
        "python json yaml config test tests install build deploy status report data table"
    ).split()
    rng = np.random.default_rng(1234)
    lines = []
    for _ in range(3000):
        n = int(rng.integers(4, 14))
        lines.append(" ".join(words[int(i)] for i in rng.integers(0, len(words), n)).capitalize() + ".")
    for i in range(400):
        name = f"{words[i % len(words)]}_{words[(i * 7) % len(words)]}"
        lines.append(
            json.dumps({"name": name, "description": " ".join(words[i % 50 : i % 50 + 6]),
                        "parameters": {"type": "object", "properties": {"path": {"type": "string"}},
                                       "required": ["path"]}})
        )
        lines.append(f"[{name}(path='/home/user/{words[i % 90]}.txt', n={i}, flag=True)]")
        lines.append(f"$ ls -la /var/log/{words[i % 70]} && cat README.md | grep -n \"{words[i % 30]}\"")
    lines.append("0123456789 !\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~\n\t")
    return lines


def build_tokenizer(vocab_size: int):
    """Train a byte-level BPE tokenizer of exactly `vocab_size` tokens (padded with reserved tokens)."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    def byte_level_split(pattern: str):
        return pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
                                        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])

    tokenizer = Tokenizer(models.BPE(byte_fallback=False))
    tokenizer.pre_tokenizer = byte_level_split(MERGE_SPLIT)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_corpus(), trainer=trainer)
    tokenizer.pre_tokenizer = byte_level_split(LLAMA3_SPLIT)  # what LFM2 (and llama.cpp's lfm2) apply
    # Pad to the exact size with reserved special tokens (real LFM2 vocabularies carry reserved ones).
    missing = vocab_size - tokenizer.get_vocab_size()
    reserved = [AddedToken(f"<|reserved_{i}|>", special=True) for i in range(max(missing, 0))]
    tokenizer.add_special_tokens([AddedToken(t, special=True) for t in SPECIAL_TOKENS] + reserved)
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<|startoftext|> $A",
        pair="<|startoftext|> $A $B",
        special_tokens=[("<|startoftext|>", BOS_ID)],
    )
    return tokenizer


def chat_template(variant: str = "lfm2.5") -> str:
    """The chat template text: `lfm2.5` (the 8B-A1B's) or `lfm2`."""
    path = TEMPLATES_DIR / f"{variant}.jinja"
    if not path.exists():
        raise ValueError(f"unknown chat template variant {variant!r}; use 'lfm2.5' or 'lfm2'")
    return path.read_text()


def write_tokenizer(out_dir: Path, vocab_size: int, template: str = "lfm2.5") -> None:
    """tokenizer.json, tokenizer_config.json (chat template, pythonic tool parser), special_tokens_map.json."""
    tokenizer = build_tokenizer(vocab_size)
    tokenizer.save(str(out_dir / "tokenizer.json"))
    added = {
        str(tokenizer.token_to_id(tok)): {
            "content": tok, "lstrip": False, "normalized": False, "rstrip": False,
            "single_word": False, "special": True,
        }
        for tok in SPECIAL_TOKENS
    }
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<|startoftext|>",
        "eos_token": "<|im_end|>",
        "pad_token": "<|pad|>",
        "add_bos_token": True,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 128000,
        "added_tokens_decoder": added,
        "chat_template": chat_template(template),
        # mlx_lm.server only auto-detects the parser from <|tool_list_start|>, which LFM2.5 lacks.
        "tool_parser_type": "pythonic",
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    special_map = {"bos_token": "<|startoftext|>", "eos_token": "<|im_end|>", "pad_token": "<|pad|>"}
    (out_dir / "special_tokens_map.json").write_text(json.dumps(special_map, indent=2))


# ---------------------------------------------------------------- weights


def _layer_tensors(config: dict, layer: int, key: mx.array, dtype, fused_experts: bool) -> dict:
    """Random weights of one decoder layer, HF names and shapes (conv as (D, 1, K))."""
    D = config["hidden_size"]
    prefix = f"model.layers.{layer}"
    shapes: dict[str, tuple] = {}
    if config["layer_types"][layer] == "full_attention":
        heads, kv = config["num_attention_heads"], config["num_key_value_heads"]
        hd = D // heads
        shapes.update({
            f"{prefix}.self_attn.q_proj.weight": (heads * hd, D),
            f"{prefix}.self_attn.k_proj.weight": (kv * hd, D),
            f"{prefix}.self_attn.v_proj.weight": (kv * hd, D),
            f"{prefix}.self_attn.out_proj.weight": (D, heads * hd),
        })
        norms = {f"{prefix}.self_attn.q_layernorm.weight": hd, f"{prefix}.self_attn.k_layernorm.weight": hd}
    else:
        shapes.update({
            f"{prefix}.conv.conv.weight": (D, 1, config["conv_L_cache"]),
            f"{prefix}.conv.in_proj.weight": (3 * D, D),
            f"{prefix}.conv.out_proj.weight": (D, D),
        })
        norms = {}
    norms.update({f"{prefix}.operator_norm.weight": D, f"{prefix}.ffn_norm.weight": D})

    is_moe = config["model_type"] == "lfm2_moe" and layer >= config["num_dense_layers"]
    if not is_moe:
        inter = config["intermediate_size"]
        shapes.update({
            f"{prefix}.feed_forward.w1.weight": (inter, D),
            f"{prefix}.feed_forward.w3.weight": (inter, D),
            f"{prefix}.feed_forward.w2.weight": (D, inter),
        })
    else:
        E, inter = config["num_experts"], config["moe_intermediate_size"]
        shapes[f"{prefix}.feed_forward.gate.weight"] = (E, D)
        if fused_experts:  # transformers 5 saves experts fused as 3-D tensors
            shapes[f"{prefix}.feed_forward.experts.gate_up_proj"] = (E, 2 * inter, D)
            shapes[f"{prefix}.feed_forward.experts.down_proj"] = (E, D, inter)
        else:
            for e in range(E):
                shapes[f"{prefix}.feed_forward.experts.{e}.w1.weight"] = (inter, D)
                shapes[f"{prefix}.feed_forward.experts.{e}.w3.weight"] = (inter, D)
                shapes[f"{prefix}.feed_forward.experts.{e}.w2.weight"] = (D, inter)

    keys = mx.random.split(key, len(shapes) + len(norms) + 1)
    tensors = {}
    for i, (name, shape) in enumerate(shapes.items()):
        fan_in = shape[-1] if not name.endswith("conv.conv.weight") else shape[-1]
        tensors[name] = (mx.random.normal(shape, key=keys[i]) * fan_in**-0.5).astype(dtype)
    # Norm weights near 1 but not exactly 1, so a mixed-up or dropped norm shows up in parity tests.
    for j, (name, size) in enumerate(norms.items()):
        tensors[name] = (1.0 + 0.1 * mx.random.normal((size,), key=keys[len(shapes) + j])).astype(dtype)
    if is_moe:
        # Selection-only bias: non-zero so that code ignoring (or misusing) it disagrees with peers.
        bias = 0.05 * mx.random.normal((config["num_experts"],), key=keys[-1])
        tensors[f"{prefix}.feed_forward.expert_bias"] = bias.astype(mx.float32)
    return tensors


def _write_shard(tensors: dict, path: Path) -> int:
    mx.eval(list(tensors.values()))
    mx.save_safetensors(str(path), tensors, metadata={"format": "pt"})
    return sum(t.nbytes for t in tensors.values())


def write_weights(out_dir: Path, config: dict, seed: int = 0, dtype=mx.bfloat16,
                  fused_experts: bool = False, shard_bytes: int = 2 << 30) -> None:
    """Write model weights layer by layer into shards, never holding the whole model in memory."""
    key = mx.random.key(seed)
    embed_key, *layer_keys = mx.random.split(key, config["num_hidden_layers"] + 2)
    D = config["hidden_size"]
    pending: dict[str, mx.array] = {
        "model.embed_tokens.weight": (0.5 * mx.random.normal((config["vocab_size"], D), key=embed_key)).astype(dtype),
        "model.embedding_norm.weight": (1.0 + 0.1 * mx.random.normal((D,), key=layer_keys[-1])).astype(dtype),
    }
    shards: list[dict] = []

    def flush() -> None:
        nonlocal pending
        if pending:
            name = f"model-{len(shards) + 1:05d}.safetensors"
            _write_shard(pending, out_dir / name)
            shards.append({"file": name, "keys": list(pending)})
            pending = {}

    for layer in range(config["num_hidden_layers"]):
        pending.update(_layer_tensors(config, layer, layer_keys[layer], dtype, fused_experts))
        if sum(t.nbytes for t in pending.values()) >= shard_bytes:
            flush()
    flush()

    if len(shards) == 1:
        os.replace(out_dir / shards[0]["file"], out_dir / "model.safetensors")
        return
    total = len(shards)
    weight_map = {}
    for i, shard in enumerate(shards):
        final = f"model-{i + 1:05d}-of-{total:05d}.safetensors"
        os.replace(out_dir / shard["file"], out_dir / final)
        weight_map.update({k: final for k in shard["keys"]})
    index = {"metadata": {}, "weight_map": dict(sorted(weight_map.items()))}
    (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def write_synthetic_model(out_dir: str | Path, preset: str = "tiny-moe", seed: int = 0,
                          template: str = "lfm2.5", fused_experts: bool = False,
                          dtype: str = "bfloat16", shard_bytes: int = 2 << 30) -> Path:
    """Write an HF-layout synthetic model directory (atomically) and return its path."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
    if dtype not in ("bfloat16", "float32", "float16"):
        raise ValueError(f"dtype {dtype!r} is not supported; use bfloat16, float16 or float32")
    config = hf_config(preset)
    config["torch_dtype"] = dtype
    tokenizer_vocab = PRESETS[preset].get("tokenizer_vocab", config["vocab_size"])
    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        write_tokenizer(tmp, tokenizer_vocab, template)
        write_weights(tmp, config, seed, getattr(mx, dtype), fused_experts, shard_bytes)
    return out_dir


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lfm-mlx synth", description=" ".join(__doc__.split("\n\n")[0].split()))
    parser.add_argument("out_dir", help="directory to write (must not exist unless --force)")
    parser.add_argument("--preset", default="tiny-moe", choices=sorted(PRESETS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--template", default="lfm2.5", choices=["lfm2.5", "lfm2"])
    parser.add_argument("--fused-experts", action="store_true",
                        help="write experts fused as transformers 5 does (gate_up_proj / down_proj)")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--force", action="store_true", help="replace an existing directory")
    args = parser.parse_args(argv)
    out = Path(args.out_dir)
    if out.exists() and not args.force:
        parser.error(f"{out} exists; pass --force to replace it")
    if out.exists():
        shutil.rmtree(out)
    write_synthetic_model(out, args.preset, args.seed, args.template, args.fused_experts, args.dtype)
    print(f"wrote {args.preset} to {out}")
    return 0

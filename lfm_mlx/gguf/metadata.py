"""The file's metadata: hyperparameters, the tokenizer (byte-level BPE, pre-tokenizer `lfm2`) and the
portable chat template."""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path

import gguf

from lfm_mlx.gguf.plan import _GENERATION_TAG, attention_layers, dense_ff_dim


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
    from lfm_mlx.model.synthetic import LLAMA3_SPLIT

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

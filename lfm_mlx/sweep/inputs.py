"""The model (a synthetic preset in memory, or a model directory with int8 experts) and the step's batch."""

from __future__ import annotations

import tempfile
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn

from lfm_mlx.data import Batch, build_dataset, make_batch
from lfm_mlx.grouped import load_mixed_model
from lfm_mlx.model.io import build_model, cast_floats, compute_dtype, read_config, resolve_model_path
from lfm_mlx.model.quant import quantize_experts
from lfm_mlx.model.synthetic import PRESETS, hf_config, write_tokenizer


def build_preset(preset: str, seed: int = 0) -> tuple[nn.Module, dict]:
    """A synthetic preset built in memory with random weights, experts int8 (no files written)."""
    config = hf_config(preset)
    mx.random.seed(seed)
    model = build_model(config)
    cast_floats(model, compute_dtype(config))
    config = quantize_experts(model, config)
    for layer in [model.model.embed_tokens, model.model.embedding_norm, *model.model.layers]:
        mx.eval(layer.parameters())  # one layer at a time: the float32 init never exists whole
    model.eval()
    return model, config


def load_model_dir(path: str) -> tuple[nn.Module, dict, Path]:
    """A model directory (mixed int8-expert, or bf16/HF: its experts are quantized in memory)."""
    model_dir = resolve_model_path(path)
    model_type = read_config(model_dir).get("model_type")
    if model_type != "lfm2_moe":
        raise ValueError(f"{model_dir}: model_type {model_type!r} has no experts; the sweep needs "
                         "an LFM2-MoE model (lfm2_moe)")
    model, config = load_mixed_model(model_dir)
    return model, config, model_dir


def synthetic_batch(vocab_size: int, seq_len: int, seed: int = 0) -> Batch:
    """One example of `seq_len` random tokens, every position trained: the memory of a full-length row."""
    ids = mx.random.randint(0, vocab_size, (1, seq_len + 1), key=mx.random.key(seed)).astype(mx.int32)
    return Batch(ids[:, :-1], ids[:, 1:], mx.ones((1, seq_len), dtype=mx.bool_), [f"random-{seq_len}"])


def data_batch(data: str, config: dict, model_dir: Path | None, preset: str | None, max_tokens: int,
               seed: int = 0) -> tuple[Batch, dict]:
    """The longest example of `data` (the step's worst case), tokenized as training would."""
    from mlx_lm.tokenizer_utils import load as load_tokenizer  # lazy: pulls in transformers (~1 s)

    with tempfile.TemporaryDirectory() as tmp:
        if model_dir is None:
            model_dir = Path(tmp)
            write_tokenizer(model_dir, PRESETS[preset].get("tokenizer_vocab", config["vocab_size"]))
        tokenizer = load_tokenizer(model_dir, eos_token_ids=config.get("eos_token_id"))
        dataset = build_dataset([data], tokenizer, max_tokens, (1.0, 0.0, 0.0), seed)
    longest = max(dataset.train, key=lambda e: e.n_tokens)
    info = {"rows_kept": dataset.manifest["kept"], "dropped": dataset.manifest["dropped"],
            "longest_row": longest.row_id, "longest_tokens": longest.n_tokens}
    return make_batch([longest], int(config.get("pad_token_id") or 0)), info

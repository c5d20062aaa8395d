"""The importance matrix for llama.cpp's quantizer, computed with MLX from our own transcripts."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Iterable

import mlx.core as mx
import mlx.nn as nn
import numpy as np


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
    from lfm_mlx.model.io import load

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

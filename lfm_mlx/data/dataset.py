"""A dataset: rows validated and encoded, the token cap, seeded splits and the manifest that records them."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
from tqdm import tqdm

from lfm_mlx.errors import InvalidInput
from lfm_mlx.fsutil import atomic_write_json
from lfm_mlx.data.rows import DEFAULT_MAX_TOKENS, validate_rows
from lfm_mlx.data.encode import Example, encode_row


@dataclass
class Dataset:
    """Train / valid / test examples and the manifest that describes how they were made."""

    train: list[Example]
    valid: list[Example]
    test: list[Example]
    manifest: dict

    def write_manifest(self, path: str | Path) -> None:
        """Write the manifest as JSON, atomically."""
        atomic_write_json(path, self.manifest)


def length_histogram(lengths: list[int], max_tokens: int) -> dict:
    """Counts per bin [lo, hi) (powers of two, then the cap), plus summary numbers."""
    edges, high = [0], 128
    while high < max_tokens:
        edges.append(high)
        high *= 2
    edges.append(max_tokens + 1)  # the last bin holds lengths up to the cap itself
    counts = [sum(lo <= n < hi for n in lengths) for lo, hi in zip(edges, edges[1:])]
    summary = {}
    if lengths:
        summary = {"min": min(lengths), "max": max(lengths), "mean": round(float(np.mean(lengths)), 1),
                   "p50": int(np.percentile(lengths, 50)), "p95": int(np.percentile(lengths, 95))}
    return {"edges": edges, "counts": counts, **summary}


def split_sizes(n: int, splits: tuple[float, float, float]) -> tuple[int, int, int]:
    """(train, valid, test) sizes for n examples; valid and test round, train takes the rest."""
    if len(splits) != 3 or any(f < 0 for f in splits) or abs(sum(splits) - 1.0) > 1e-6:
        raise InvalidInput(f"splits={tuple(splits)} must be three fractions >= 0 (train, valid, test) summing to 1")
    n_valid, n_test = round(n * splits[1]), round(n * splits[2])
    return n - n_valid - n_test, n_valid, n_test


def build_dataset(
    source: str | Path | Sequence[str | Path] | Sequence[dict],
    tokenizer,
    max_tokens: int = DEFAULT_MAX_TOKENS,
    splits: tuple[float, float, float] = (0.9, 0.05, 0.05),
    seed: int = 0,
    skip_invalid: bool = False,
) -> Dataset:
    """Validate, render and mask every row; drop over-cap and untrainable rows (counted); split
    with a seeded shuffle; describe it all in the manifest."""
    if max_tokens < 2:
        raise InvalidInput(f"max_tokens={max_tokens} must be >= 2 (one input and one target token)")
    split_sizes(0, splits)  # validate the fractions before the work
    checked = validate_rows(source, skip_invalid=skip_invalid)
    kept: list[Example] = []
    dropped = [{"row": where, "reason": "invalid", "detail": reason} for where, reason in checked.dropped]
    for row in tqdm(checked.rows, desc="rendering rows", unit="row", disable=None):
        example = encode_row(row, tokenizer)
        if example.n_tokens > max_tokens:
            dropped.append({"row": row.where, "reason": "over_cap",
                            "detail": f"{example.n_tokens} tokens > cap {max_tokens}"})
        elif example.n_trainable == 0:
            dropped.append({"row": row.where, "reason": "no_trainable",
                            "detail": "no assistant token left to train on"})
        else:
            kept.append(example)
    if not kept:
        raise InvalidInput(f"no trainable rows left out of {checked.n_read}: " + json.dumps(_count_reasons(dropped)))
    order = np.random.default_rng(seed).permutation(len(kept))
    shuffled = [kept[int(i)] for i in order]
    n_train, n_valid, n_test = split_sizes(len(kept), splits)
    train, valid, test = (shuffled[:n_train], shuffled[n_train:n_train + n_valid],
                          shuffled[n_train + n_valid:])
    template = getattr(tokenizer, "chat_template", None)
    manifest = {
        "sources": checked.sources or {"in_memory_rows": checked.n_read},
        "chat_template_sha256": hashlib.sha256(template.encode()).hexdigest() if isinstance(template, str) else None,
        "rows_read": checked.n_read,
        "kept": len(kept),
        "dropped": _count_reasons(dropped),
        "dropped_rows": dropped,
        "max_tokens": max_tokens,
        "seed": seed,
        "splits": {"fractions": list(splits), "sizes": {"train": len(train), "valid": len(valid), "test": len(test)}},
        "split_row_ids": {"train": [e.row_id for e in train], "valid": [e.row_id for e in valid],
                          "test": [e.row_id for e in test]},
        "trainable_tokens": sum(e.n_trainable for e in kept),
        "token_lengths": length_histogram([e.n_tokens for e in kept], max_tokens),
    }
    return Dataset(train=train, valid=valid, test=test, manifest=manifest)


def _count_reasons(dropped: list[dict]) -> dict[str, int]:
    counts = {"invalid": 0, "over_cap": 0, "no_trainable": 0}
    for item in dropped:
        counts[item["reason"]] += 1
    return counts

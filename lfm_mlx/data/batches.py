"""Batches: a seeded order of examples (optionally by length), padding, and the masked loss."""

from __future__ import annotations

from typing import Iterator, NamedTuple

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from lfm_mlx.data.encode import Example


class Batch(NamedTuple):
    """One padded batch; `row_ids` name its examples (for logs of skipped steps)."""

    inputs: mx.array  # (B, T) int32
    targets: mx.array  # (B, T) int32, inputs shifted by one
    loss_mask: mx.array  # (B, T) bool, False on prompt and padding
    row_ids: list[str]


def batch_order(lengths: list[int], batch_size: int, seed: int, epoch: int,
                sort_by_length: bool = False) -> list[list[int]]:
    """Example indices of each batch of one epoch, a pure function of (seed, epoch).

    With `sort_by_length` batches hold examples of similar length (less padding) and the batch
    order is shuffled instead."""
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be >= 1")
    rng = np.random.default_rng([seed, epoch])
    if sort_by_length:
        indices = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
        batches = [indices[i:i + batch_size] for i in range(0, len(indices), batch_size)]
        return [batches[int(i)] for i in rng.permutation(len(batches))]
    indices = [int(i) for i in rng.permutation(len(lengths))]
    return [indices[i:i + batch_size] for i in range(0, len(indices), batch_size)]


def make_batch(examples: list[Example], pad_id: int = 0, pad_multiple: int = 1) -> Batch:
    """Right-pad examples into (inputs, targets, loss_mask); the mask is False on padding.

    `pad_multiple` rounds the width up: fewer distinct shapes, so fewer kernel compilations on
    backends that compile per shape (MLX's CUDA backend: 2.5x faster pre-training steps at 64)."""
    width = -(-(max(e.n_tokens for e in examples) - 1) // pad_multiple) * pad_multiple
    inputs = np.full((len(examples), width), pad_id, dtype=np.int32)
    targets = np.full((len(examples), width), pad_id, dtype=np.int32)
    mask = np.zeros((len(examples), width), dtype=bool)
    for b, example in enumerate(examples):
        n = example.n_tokens - 1
        inputs[b, :n] = example.ids[:-1]
        targets[b, :n] = example.ids[1:]
        mask[b, :n] = example.mask[1:]
    return Batch(mx.array(inputs), mx.array(targets), mx.array(mask), [e.row_id for e in examples])


def iterate_batches(examples: list[Example], batch_size: int, seed: int = 0, epoch: int = 0,
                    sort_by_length: bool = False, pad_id: int = 0, start_batch: int = 0,
                    pad_multiple: int = 1) -> Iterator[Batch]:
    """Yield the batches of one epoch; `start_batch` skips the first ones (resume)."""
    order = batch_order([e.n_tokens for e in examples], batch_size, seed, epoch, sort_by_length)
    for indices in order[start_batch:]:
        yield make_batch([examples[i] for i in indices], pad_id, pad_multiple)


def masked_loss(logits: mx.array, targets: mx.array, mask: mx.array) -> tuple[mx.array, mx.array]:
    """Summed cross-entropy (in float32) over masked positions, and the number of those positions.

    Divide the two after accumulating; callers must skip batches with zero tokens."""
    losses = nn.losses.cross_entropy(logits.astype(mx.float32), targets, reduction="none")
    mask = mask.astype(mx.bool_)
    return mx.where(mask, losses, 0.0).sum(), mask.sum()

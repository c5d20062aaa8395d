"""A float32 master weight kept as two 16-bit halves: the bfloat16 weight the model computes with,
and the 16 low bits of the float32 encoding that the bfloat16 leaves out (held by the optimizer).

Together they are the float32 master exactly, in the same 4 bytes an element, but the forward and
backward passes read the bfloat16 half directly: no float32 -> bfloat16 cast of the trained
experts at every use (on an H200 at the 8B shapes, the bf16 master's gradients took 87 ms against
97-108 ms with a float32 master: `benchmarks/results`). The update joins the halves, runs AdamW in
float32 and splits the result again, so the master's values are those of a float32 master bit for
bit.

The bfloat16 half is the float32 rounded to nearest with ties away from zero (adding half of the
dropped range to the encoding, then truncating), where a cast rounds ties to even: the two differ
only when the low bits are exactly 0x8000, and there the low bits tell which way it went, so the
split is reversible; a round-to-even half would leave the tie ambiguous.
"""

from __future__ import annotations

import mlx.core as mx

_HALF = 0x8000  # half of the 16 dropped bits' range
_LOW_MASK = 0xFFFF


def _u32(value: int) -> mx.array:
    return mx.array(value, dtype=mx.uint32)


def split_master(x: mx.array) -> tuple[mx.array, mx.array]:
    """float32 `x` -> (its bfloat16 rounding, the low 16 bits of its encoding as uint16)."""
    bits = x.astype(mx.float32).view(mx.uint32)
    high = ((bits + _u32(_HALF)) >> _u32(16)).astype(mx.uint16).view(mx.bfloat16)
    return high, (bits & _u32(_LOW_MASK)).astype(mx.uint16)


def join_master(high: mx.array, low: mx.array) -> mx.array:
    """The inverse of `split_master`: the float32 master from its bfloat16 half and low bits."""
    high_bits = high.view(mx.uint16).astype(mx.uint32)
    low_bits = low.astype(mx.uint32)
    rounded_up = (low_bits >= _u32(_HALF)).astype(mx.uint32)  # the half carried into the high bits
    return (((high_bits - rounded_up) << _u32(16)) | low_bits).view(mx.float32)

"""Data-parallel training over `mx.distributed` (MLX's own ring, MPI, JACCL and NCCL backends).

    mlx.launch -n 2 --backend ring -- python -m lfm_mlx lora CONFIG.yaml
    mlx.launch --hostfile hosts.json --backend jaccl -- python -m lfm_mlx lora CONFIG.yaml

Without a launcher `init()` gives a world of one process and every helper here is a no-op. With N
ranks, each takes its contiguous slice of every global batch (`shard`), drawn from the one seeded
order of N x batch_size examples, so N ranks with batch b train on exactly what one process with
batch N*b does. Gradients are summed in their own dtype (`all_sum_tree`); rank 0 alone reads and
writes the run directory (`on_main`) and hands what it read to the others (`broadcast_*`), so the
ranks need no shared filesystem. A rank that fails at one of these meeting points makes every rank
stop (`agree`) instead of leaving the others blocked in a collective.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any, Callable

import mlx.core as mx
from mlx.utils import tree_flatten, tree_unflatten

from lfm_mlx.errors import UserError

CHUNK_BYTES = 64 << 20  # gradients go in buffers of at most this size: few collectives, bounded extra memory
LINK_GBPS = (10, 40, 80)  # the cost model's links: 10 GbE, Thunderbolt 4 / 40 GbE, Thunderbolt 5


class PeerStopped(UserError, RuntimeError):
    """Another rank stopped at a meeting point (its own message says why); this one stops too."""


@dataclass
class World:
    """This process's place in the job: `size` ranks, this one is `rank`."""

    group: Any = None
    size: int = 1
    rank: int = 0
    reduce_bytes: int = 0  # of the last all_sum_tree
    reduce_s: float = 0.0

    @property
    def main(self) -> bool:
        return self.rank == 0

    def sum(self, x: mx.array) -> mx.array:
        """all_sum over the ranks (x itself when alone)."""
        if self.size == 1:
            return x
        return mx.distributed.all_sum(x, group=self.group)

    def agree(self, error: BaseException | None) -> None:
        """Collective: when any rank passes an error, every rank raises (its own, or PeerStopped)."""
        if self.size == 1:
            if error is not None:
                raise error
            return
        flags = mx.zeros((self.size,), mx.int32)
        if error is not None:
            flags = flags.at[self.rank].add(1)
        failed = [r for r, f in enumerate(self.sum(flags).tolist()) if f]
        if error is not None:
            raise error
        if failed:
            raise PeerStopped(f"rank {failed[0]} of {self.size} stopped (its message says why); rank {self.rank} "
                              f"stops with it")

    def barrier(self) -> None:
        self.agree(None)

    def on_main(self, fn: Callable[..., Any], *args, **kwargs) -> Any:
        """Run fn on rank 0 only (the writes, the reads of the run directory); the others wait here.
        Returns fn's result on rank 0, None elsewhere; an exception on rank 0 stops every rank."""
        if self.size == 1:
            return fn(*args, **kwargs)
        result, error = None, None
        if self.main:
            try:
                result = fn(*args, **kwargs)
            except Exception as err:  # noqa: BLE001 - re-raised by agree, on rank 0 and (as PeerStopped) elsewhere
                error = err
        self.agree(error)
        return result

    def on_every(self, fn: Callable[..., Any], *args, **kwargs) -> Any:
        """Run fn on every rank (a check against this machine's own limits); an exception on any
        rank stops every rank."""
        if self.size == 1:
            return fn(*args, **kwargs)
        result, error = None, None
        try:
            result = fn(*args, **kwargs)
        except Exception as err:  # noqa: BLE001 - re-raised by agree
            error = err
        self.agree(error)
        return result

    def same_as_main(self, value: str, what: str) -> None:
        """Stop every rank when this rank's `value` (a hash of its inputs) differs from rank 0's."""
        if self.size > 1:
            self.agree(None if self.broadcast_json(value) == value else UserError(
                f"rank {self.rank}: {what} differ from rank 0's; give every machine the same files and settings"))

    def broadcast_json(self, value: Any) -> Any:
        """Rank 0's JSON-able value, on every rank."""
        if self.size == 1:
            return value
        data = json.dumps(value).encode() if self.main else b""
        n = int(self.sum(mx.array([len(data)], mx.int32)).item())
        buffer = mx.array(list(data), mx.uint8) if self.main else mx.zeros((n,), mx.uint8)
        return json.loads(bytes(self.sum(buffer).tolist()).decode())

    def broadcast_arrays(self, arrays: dict[str, mx.array] | None, like: dict[str, mx.array]) -> dict[str, mx.array]:
        """Rank 0's `arrays`, bit for bit, on every rank; the others pass None and `like` (same names,
        shapes, dtypes). Summed as unsigned integers of the same width: x + 0 keeps -0.0 and NaN bits."""
        if self.size == 1:
            return arrays
        if self.main and (set(arrays) != set(like) or any(arrays[k].shape != like[k].shape for k in like)):
            raise ValueError("broadcast_arrays: rank 0's arrays do not match the template")  # a bug, not the user's
        out = {}
        for name, template in like.items():
            bits = {1: mx.uint8, 2: mx.uint16, 4: mx.uint32, 8: mx.uint64}[template.dtype.size]
            x = arrays[name].astype(template.dtype) if self.main else mx.zeros(template.shape, template.dtype)
            out[name] = self.sum(x.view(bits)).view(template.dtype)
        mx.eval(out)
        return out

    def broadcast_tree(self, arrays: dict[str, mx.array] | None) -> dict[str, mx.array] | None:
        """Rank 0's named arrays (or None) on every rank, names, shapes and dtypes included."""
        if self.size == 1:
            return arrays
        meta = self.broadcast_json(None if not self.main or arrays is None else
                                   {k: [list(v.shape), str(v.dtype).rsplit(".", 1)[-1]] for k, v in arrays.items()})
        if meta is None:
            return None
        like = {k: mx.zeros(shape, getattr(mx, dtype)) for k, (shape, dtype) in meta.items()}
        return self.broadcast_arrays(arrays, like)

    def shard(self, items: list) -> list:
        """This rank's contiguous slice of a global batch (sizes differ by at most one; may be empty)."""
        n, extra = divmod(len(items), self.size)
        start = self.rank * n + min(self.rank, extra)
        return items[start:start + n + (self.rank < extra)]

    def all_sum_tree(self, tree: Any) -> Any:
        """Sum a tree of arrays (gradients) over the ranks, each in its own dtype, in a few flat buffers.
        Records the payload bytes and the seconds from this rank's gradients being ready to the sums
        arriving (so waiting for a slower rank counts too)."""
        if self.size == 1:
            return tree
        flat = tree_flatten(tree)
        mx.eval([v for _, v in flat])
        start = time.perf_counter()
        summed, chunk = {}, []

        def flush() -> None:
            buffer = self.sum(mx.concatenate([v.reshape(-1) for _, v in chunk]))
            mx.eval(buffer)  # one chunk at a time: the extra memory stays at CHUNK_BYTES
            offset = 0
            for name, v in chunk:
                summed[name] = buffer[offset:offset + v.size].reshape(v.shape)
                offset += v.size
            chunk.clear()

        for name, v in sorted(flat, key=lambda item: str(item[1].dtype)):  # stable: the same order on every rank
            if chunk and (v.dtype != chunk[0][1].dtype or sum(c.nbytes for _, c in chunk) + v.nbytes > CHUNK_BYTES):
                flush()
            chunk.append((name, v))
        if chunk:
            flush()
        mx.eval(list(summed.values()))
        self.reduce_s = time.perf_counter() - start
        self.reduce_bytes = sum(v.nbytes for _, v in flat)
        return tree_unflatten([(name, summed[name]) for name, _ in flat])

    def reduce_record(self) -> dict:
        """The last all_sum_tree's bytes and seconds, for a metrics row (nothing when alone)."""
        return {} if self.size == 1 else {"allreduce_bytes": self.reduce_bytes, "allreduce_s": round(self.reduce_s, 6)}

    def sum_scalars(self, *values: float) -> list[float]:
        """Python numbers summed over the ranks (float64 on CPU would not reach the GPU backends: float32)."""
        if self.size == 1:
            return list(values)
        return self.sum(mx.array(values, mx.float32)).tolist()


def init() -> World:
    """The world `mlx.launch` set up (or one process without it)."""
    group = mx.distributed.init()
    return World(group, group.size(), group.rank())


def cost_model(n_bytes: int, world_size: int, what: str) -> str:
    """The communication cost line printed at start: bytes per all-reduce and the time a ring
    all-reduce needs on common links (each rank sends and receives 2(N-1)/N of the payload)."""
    sent = n_bytes * 2 * (world_size - 1) / world_size
    times = ", ".join(f"{_seconds(sent * 8 / (gbps * 1e9))} at {gbps} Gb/s" for gbps in LINK_GBPS)
    return (f"all-reduce per step: {what} = {n_bytes / 1e6:,.1f} MB; a ring of {world_size} sends "
            f"{sent / 1e6:,.1f} MB per rank: {times}")


def _seconds(s: float) -> str:
    return f"{s * 1e6:.0f} us" if s < 1e-3 else f"{s * 1e3:.1f} ms" if s < 1 else f"{s:.2f} s"

"""The optimizer: fused AdamW (float32 or int8 moments, split or stochastically rounded masters), the
per-phase warmup + cosine schedule, and the choice among AdamW, fused AdamW and Adafactor."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
from mlx.utils import tree_map

from lfm_mlx.grouped.config import TrainConfig
from lfm_mlx.kernels import fused_adamw
from lfm_mlx.kernels.choices import KernelChoices, UpdateKernels
from lfm_mlx.kernels.fused_adamw import AdamWStep, TensorUpdate
from lfm_mlx.kernels.int8_moments import (
    MOMENT_GROUP, V_FLOOR, WEIGHT_STREAM, pack_moment, pack_moment_noisy, round_to_bfloat16, unpack_moment,
)
from lfm_mlx.kernels.master_bits import join_master, split_master
from lfm_mlx.train.schedules import warmup_cosine


UPDATE_CHUNK = 1 << 25  # elements of one tensor updated at a time with int8 moments (their float32 copies scale with it)


def _adamw_math(g, p, m, v, lr, scale, b1, b2, eps, wd):
    """mlx.optimizers.AdamW's arithmetic (no bias correction, eps outside the sqrt) in float32:
    the new weights, first and second moments, all float32."""
    g = g.astype(mx.float32) * scale
    m32 = b1 * m.astype(mx.float32) + (1 - b1) * g
    v32 = b2 * v.astype(mx.float32) + (1 - b2) * g * g
    p32 = p.astype(mx.float32) * (1 - lr * wd) - lr * m32 / (mx.sqrt(v32) + eps)
    return p32, m32, v32


# How the update reads and writes a tensor's master and moments. Masters: "plain" (the weights are the
# master, in their own dtype), "split" (bfloat16 weights + their 16 low bits: a float32 master bit for
# bit, `kernels.master_bits`), "stochastic" (bfloat16 weights, each update rounded stochastically).
# Moments: "float32", "int8" (both as int8 codes, the second as its logarithm: its values span orders
# of magnitude within a group, and a linear code would round small ones to zero and blow their step
# up), "int8-first" (the first as int8 codes, the second float32: Unsloth's MLX trainer saw an int8
# second moment diverge).
MASTERS = ("plain", "split", "stochastic")
MOMENTS = ("float32", "int8", "int8-first")


def _adamw_variant(master: str, moments: str, g, weights: tuple, m, v, lr, scale, seed, b1, b2, eps, wd):
    """_adamw_math for one (master, moments) layout: (*the new master's arrays, m, v), the moments
    int8 ones still float32 (the second as its logarithm) for `_Update` to pack."""
    p = join_master(*weights) if master == "split" else weights[0]
    if moments != "float32":
        m = unpack_moment(m)
    if moments == "int8":
        v = mx.exp(unpack_moment(v)) - V_FLOOR
    p32, m32, v32 = _adamw_math(g, p, m, v, lr, scale, b1, b2, eps, wd)
    if master == "split":
        new = split_master(p32)
    elif master == "stochastic":
        new = (round_to_bfloat16(p32, seed + WEIGHT_STREAM),)
    else:
        new = (p32.astype(p.dtype),)
    if moments == "float32":
        return (*new, m32.astype(m.dtype), v32.astype(v.dtype))
    return (*new, m32, mx.log(v32 + V_FLOOR) if moments == "int8" else v32)


@dataclass(frozen=True)
class _Update:
    """A compiled update and what happens around it: its float32-moment layouts may run the CUDA kernel
    (`kernels.fused_adamw`, when its probe finds it bit-identical and faster); int8 moments come out of
    it in float32 and are packed here, rounded stochastically (one noise draw for both, as u and 1 - u)."""

    compiled: Callable
    moments: str

    def __call__(self, tensor: TensorUpdate, step: AdamWStep, kernels: UpdateKernels) -> tuple:
        if self.moments == "float32":
            return fused_adamw.update(self.compiled, tensor, step, kernels.adamw)
        *master, m32, v32 = fused_adamw.run(self.compiled, tensor, step)
        m = pack_moment_noisy(m32, step.seed, record=kernels.moments)
        v = pack_moment_noisy(v32, step.seed, flip=True, record=kernels.moments) if self.moments == "int8" else v32
        return (*master, m, v)


# (master, moments) -> its update: one compiled graph each.
UPDATES: dict[tuple[str, str], _Update] = {
    (master, moments): _Update(mx.compile(functools.partial(_adamw_variant, master, moments)), moments)
    for master in MASTERS for moments in MOMENTS
}
_join_kernel = mx.compile(join_master)


def _leaves(tree, path: tuple = ()):
    """(path, container, key) of every array in a nested dict / list tree."""
    items = list(tree.items()) if isinstance(tree, dict) else list(enumerate(tree))
    for key, value in items:
        if isinstance(value, (dict, list)):
            yield from _leaves(value, path + (key,))
        elif isinstance(value, mx.array):
            yield path + (key,), tree, key


def _at(tree, path: tuple):
    for key in path:
        tree = tree[key]
    return tree


def _set(tree, path: tuple, value) -> None:
    _at(tree, path[:-1])[path[-1]] = value


def _rows(tree, start: int, end: int):
    """Rows start:end (first axis) of every array in a nested dict."""
    return tree_map(lambda a: a[start:end], tree)


class FusedAdamW(optim.Optimizer):
    """AdamW with mlx.optimizers.AdamW's math (defaults: no bias correction), as one compiled
    kernel per tensor (float32 arithmetic) instead of a chain of separate passes, with the
    gradient's scale (mean over tokens, clipping) folded in through `grad_scale`. Moments are
    float32 whatever the parameters' dtype (mlx.optimizers keep them in the parameters' dtype).

    `split_master`: a bfloat16 parameter is the upper half of a float32 master whose 16 low bits
    the optimizer holds (state "low", `kernels.master_bits`): the update is the float32 master's, bit for
    bit, and `merge_masters` writes the whole masters back into the model.
    `state_bits=8` (other math, checked against the float32 step's loss by the benchmark) keeps
    both moments as int8 codes (`pack_moment`; 1.125 bytes an element instead of 4) for tensors
    whose last axis is a multiple of MOMENT_GROUP; large tensors then go UPDATE_CHUNK
    elements (whole rows of the first axis) at a time. `second_state_bits=32` with `state_bits=8`
    packs only the first moment (2.5 bytes an element on average instead of 4; other math too)."""

    def __init__(self, learning_rate, betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0,
                 state_bits: int = 32, stochastic_weights: bool = False, split_master: bool = False,
                 kernels: UpdateKernels | None = None, second_state_bits: int | None = None):
        super().__init__()
        self.kernels = kernels or UpdateKernels()  # the run's kernel records (a fresh one probes anew)
        if state_bits not in (8, 32):
            raise ValueError(f"state_bits={state_bits}: use 32 (float32 moments) or 8 (int8 moments)")
        second_state_bits = state_bits if second_state_bits is None else second_state_bits
        if second_state_bits not in (8, 32) or second_state_bits < state_bits:
            raise ValueError(f"second_state_bits={second_state_bits}: use 32, or 8 with state_bits=8")
        self.second_state_bits = second_state_bits
        self._maybe_schedule("learning_rate", learning_rate)
        self.betas, self.eps, self.weight_decay = (float(betas[0]), float(betas[1])), float(eps), float(weight_decay)
        self.state_bits = state_bits
        self.stochastic_weights = stochastic_weights
        self.split_master = split_master
        self.grad_scale = mx.array(1.0, dtype=mx.float32)

    def init_single(self, parameter: mx.array, state: dict):
        zeros = mx.zeros(parameter.shape, dtype=mx.float32)
        packable = parameter.shape[-1] % MOMENT_GROUP == 0
        state["m"] = pack_moment(zeros) if self.state_bits == 8 and packable else zeros
        if self.second_state_bits == 8 and packable:
            state["v"] = pack_moment(mx.log(zeros + V_FLOOR))
        else:
            state["v"] = mx.zeros(parameter.shape, dtype=mx.float32)
        if self.split_master and parameter.dtype == mx.bfloat16:
            state["low"] = mx.zeros(parameter.shape, dtype=mx.uint16)  # the master starts at the weights

    def merge_masters(self, model: nn.Module) -> None:
        """Replace every split parameter in `model` by its whole float32 master (after the last
        step, before the group is requantized from it); the low bits leave the state."""
        for path, holder, key in list(_leaves(self.state)):
            if key == "low":
                _set(model, path[:-1], _join_kernel(_at(model, path[:-1]), holder.pop(key)))

    def update(self, model: nn.Module, gradients: dict) -> None:
        """As Optimizer.update, but one tensor at a time, each evaluated before the next, and each
        gradient dropped from `gradients` once applied (the caller's tree is emptied): the update
        then holds one tensor's temporaries instead of all of them (MLX evaluates breadth first)."""
        if not self._initialized:
            self.init(gradients)
        for name, scheduler in self._schedulers.items():
            self.state[name] = scheduler(self.step)
        self.state["step"] = self.step + 1
        for path, holder, key in _leaves(gradients):
            gradient = holder[key]
            holder[key] = None  # the caller's reference goes: the gradient is freed once used
            new = self._update_tensor(gradient, _at(model, path), _at(self.state, path))
            del gradient
            _set(model, path, new)  # into the model at once: the old weights go now, not after every tensor

    def _update_tensor(self, gradient: mx.array, parameter: mx.array, state: dict) -> mx.array:
        """The new weights of one tensor (its moments replaced in `state`), a block of rows at a time."""
        rows = parameter.shape[0] if parameter.ndim > 1 else 1  # a vector is one row
        per_block = max(1, UPDATE_CHUNK // max(parameter.size // rows, 1))
        # Float32 moments: the compiled update holds nothing beyond its outputs, so the whole tensor
        # goes at once (blocks and their concatenation moved the data twice). Int8 moments unpack
        # to float32 first, and that temporary scales with the block.
        if rows <= per_block or not isinstance(state["m"], dict):
            new = self.apply_single(gradient, parameter, state)
            mx.eval(new, state)
            return new
        pieces, moments = [], {name: [] for name in state}  # m, v (and a split master's low bits)
        for start in range(0, rows, per_block):
            end = min(start + per_block, rows)
            part = {name: _rows(value, start, end) for name, value in state.items()}
            pieces.append(self.apply_single(gradient[start:end], parameter[start:end], part))
            mx.eval(pieces[-1], part)
            for name in moments:
                moments[name].append(part[name])
        for name, parts in moments.items():
            state[name] = (mx.concatenate(parts) if isinstance(parts[0], mx.array)
                           else {k: mx.concatenate([p[k] for p in parts]) for k in parts[0]})
        new = mx.concatenate(pieces)
        mx.eval(new, state)
        return new

    def layout(self, parameter: mx.array, state: dict) -> tuple[str, str]:
        """The (master, moments) layout of one tensor's update (a key of UPDATES)."""
        if "low" in state:
            master = "split"
        elif self.stochastic_weights and parameter.dtype == mx.bfloat16:
            master = "stochastic"
        else:
            master = "plain"
        if not isinstance(state["m"], dict):
            return master, "float32"
        return master, "int8" if isinstance(state["v"], dict) else "int8-first"

    def apply_single(self, gradient: mx.array, parameter: mx.array, state: dict):
        master, moments = self.layout(parameter, state)
        (b1, b2), seed = self.betas, None
        if moments != "float32" or (self.stochastic_weights and parameter.dtype == mx.bfloat16):
            seed = mx.random.randint(0, 1 << 31, (1,)).astype(mx.uint32)  # from the step's seeded RNG
        step = AdamWStep(self.learning_rate.astype(mx.float32), self.grad_scale, b1, b2, self.eps,
                         self.weight_decay, seed)
        weights = (parameter, state["low"]) if master == "split" else (parameter,)
        *new, state["m"], state["v"] = UPDATES[master, moments](TensorUpdate(gradient, weights, state["m"], state["v"]),
                                                               step, self.kernels)
        if master == "split":
            state["low"] = new[1]
        return new[0]


def lr_schedule(config: TrainConfig, steps: int) -> Callable:
    """Linear warmup (capped at half the phase) then cosine decay to min_lr_ratio x learning_rate, over one phase."""
    return warmup_cosine(config.learning_rate, steps, min(config.warmup_steps, steps // 2), config.min_lr_ratio)


def make_optimizer(config: TrainConfig, steps: int, kernels: KernelChoices | None = None) -> optim.Optimizer:
    """The group's fresh optimizer; a fused AdamW records its kernel probes in the run's `kernels.update`."""
    schedule = lr_schedule(config, steps)
    if config.optimizer == "adamw" and config.fused_update:
        return FusedAdamW(learning_rate=schedule, betas=config.betas, eps=config.eps,
                          weight_decay=config.weight_decay,
                          state_bits=8 if config.optimizer_state in ("int8", "int8-first") else 32,
                          second_state_bits=8 if config.optimizer_state == "int8" else 32,
                          stochastic_weights=config.master_dtype == "compute-stochastic",
                          split_master=config.master_dtype == "split",
                          kernels=kernels.update if kernels is not None else None)
    if config.optimizer == "adamw":
        return optim.AdamW(learning_rate=schedule, betas=list(config.betas), eps=config.eps,
                           weight_decay=config.weight_decay)
    return optim.Adafactor(learning_rate=schedule, relative_step=False, scale_parameter=False,
                           weight_decay=config.weight_decay)

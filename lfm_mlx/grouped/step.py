"""One training step's math: forward and chunked loss, the explicit layer walk's gradients,
accumulation, the global norm and the clipped update."""

from __future__ import annotations

import math
from typing import Callable

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
from mlx.utils import tree_flatten, tree_map, tree_map_with_path, tree_unflatten
from mlx_lm.models.base import create_attention_mask, create_ssm_mask

from lfm_mlx.data import Batch, Example, make_batch, masked_loss
from lfm_mlx.grouped.optimizer import FusedAdamW
from lfm_mlx.kernels.expert_blocks import BatchedSwitchGLU


def recompute_in_backward(fn: Callable) -> Callable:
    """Gradient checkpointing of `fn(*arrays) -> array`: only the inputs are kept; the backward
    pass recomputes `fn` once the gradient of its output has arrived.

    mx.checkpoint ties the recomputation to the forward output only, and MLX evaluates graphs
    breadth first, so the recomputations of every checkpointed layer are ready, and may run,
    together at the start of the backward pass, holding what checkpointing was meant to free
    (measured on CUDA, 8B shapes, 2,048 tokens, group 4: backward peak 42.8 GB, mx.checkpoint 44.9 GB)."""
    wrapped = mx.custom_function(fn)

    @wrapped.vjp
    def backward(primals, cotangent, output):
        primals = mx.depends(list(primals) if isinstance(primals, tuple) else [primals], [cotangent])
        _, grads = mx.vjp(fn, primals, [cotangent])
        return tuple(grads)

    return wrapped


def _checkpointed(layer: nn.Module, h: mx.array, mask) -> mx.array:
    """Run `layer` under `recompute_in_backward`: its activations are recomputed in the backward pass."""
    flat = tree_flatten(layer.trainable_parameters())
    names, arrays = [name for name, _ in flat], [value for _, value in flat]

    def run(x, *params):
        layer.update(tree_unflatten(list(zip(names, params))))
        return layer(x, mask)

    return recompute_in_backward(run)(h, *arrays)


def forward_hidden(model: nn.Module, inputs: mx.array, first_active: int | None = None,
                   grad_checkpoint: bool = False, stop_gradient: bool = True) -> mx.array:
    """The mlx-lm LFM2-MoE forward (no cache) up to the final norm, with gradient hooks from
    `first_active` up: stop_gradient on the hidden state entering it (nothing below trains) and
    `recompute_in_backward` around every layer from it to the top (the layers backward runs through)."""
    inner = model.model
    h = inner.embed_tokens(inputs)
    attn_mask = create_attention_mask(h, None)
    conv_mask = create_ssm_mask(h, None)
    for i, layer in enumerate(inner.layers):
        mask = attn_mask if layer.is_attention_layer else conv_mask
        if first_active is not None and i >= first_active:
            if i == first_active and stop_gradient:
                h = mx.stop_gradient(h)
            if grad_checkpoint:
                h = _checkpointed(layer, h, mask)
                continue
        h = layer(h, mask)
    return inner.embedding_norm(h)


def forward_logits(model: nn.Module, inputs: mx.array, first_active: int | None = None,
                   grad_checkpoint: bool = False, stop_gradient: bool = True) -> mx.array:
    """`forward_hidden` through the (tied) LM head: the logits."""
    hidden = forward_hidden(model, inputs, first_active, grad_checkpoint, stop_gradient)
    return model.model.embed_tokens.as_linear(hidden)


def _cross_entropy(logits: mx.array, targets: mx.array) -> mx.array:
    """Per-token cross-entropy in float32; MLX's fused kernel (float32 accumulation without a
    float32 copy of the logits) where this MLX has it."""
    if hasattr(mx.fast, "cross_entropy"):
        return mx.fast.cross_entropy(logits, targets)
    return nn.losses.cross_entropy(logits.astype(mx.float32), targets, reduction="none")


def chunked_masked_loss(model: nn.Module, hidden: mx.array, targets: mx.array, mask: mx.array,
                        chunk: int) -> tuple[mx.array, mx.array]:
    """`data.masked_loss` of the LM head on `hidden`, `chunk` tokens at a time: neither the full
    (tokens x vocabulary) logits nor their gradient ever exist at once.

    A custom vjp walks the chunks in order, each chunk's logits recomputed and its gradient
    taken only after the previous chunk's is done (a plain per-chunk checkpoint would let MLX's
    breadth-first evaluation recompute every chunk at once)."""
    embed = model.model.embed_tokens
    dims = hidden.shape[-1]
    targets, mask = targets.reshape(-1), mask.reshape(-1).astype(mx.bool_)
    bounds = [(start, min(start + chunk, targets.size)) for start in range(0, targets.size, chunk)]

    def piece(h: mx.array, start: int, end: int) -> mx.array:
        losses = _cross_entropy(embed.as_linear(h), targets[start:end])
        return mx.where(mask[start:end], losses, 0.0).sum()

    def forward(h):
        total, previous = mx.array(0.0, dtype=mx.float32), None
        for start, end in bounds:
            part = h[start:end] if previous is None else mx.depends([h[start:end]], [previous])[0]
            previous = piece(part, start, end)
            total = total + previous
        return total

    loss = mx.custom_function(forward)

    @loss.vjp
    def backward(primals, cotangent, output):
        h, parts, previous = primals, [], cotangent  # one primal: MLX passes the array itself
        for start, end in bounds:
            part = mx.depends([h[start:end]], [previous])[0]
            _, (grad,) = mx.vjp(lambda v: piece(v, start, end), [part], [cotangent])
            parts.append(grad)
            previous = grad
        return mx.concatenate(parts, axis=0)

    return loss(hidden.reshape(-1, dims)), mask.sum()


def evaluate_loss(model: nn.Module, examples: list[Example], batch_size: int = 1, pad_id: int = 0) -> float | None:
    """Mean masked cross-entropy per trained token over `examples` (None when there are none)."""
    total, count = 0.0, 0
    for start in range(0, len(examples), batch_size):
        batch = make_batch(examples[start:start + batch_size], pad_id)
        loss, n = masked_loss(model(batch.inputs), batch.targets, batch.loss_mask)
        mx.eval(loss, n)
        total, count = total + loss.item(), count + n.item()
    return total / count if count else None


def _head_loss(model: nn.Module, h: mx.array, targets: mx.array, mask: mx.array,
               loss_chunk: int) -> tuple[mx.array, mx.array]:
    """The summed masked loss of the last layer's output `h`: final norm, tied LM head, cross-entropy."""
    hidden = model.model.embedding_norm(h)
    if loss_chunk:
        return chunked_masked_loss(model, hidden, targets, mask, loss_chunk)
    return masked_loss(model.model.embed_tokens.as_linear(hidden), targets, mask)


def _layer_vjp(layer: nn.Module, x: mx.array, mask, cotangent: mx.array) -> tuple[mx.array, dict[str, mx.array]]:
    """The layer's forward recomputed from its input `x`, then its backward for `cotangent`:
    (gradient of x, gradients of the layer's trainable parameters by name within the layer)."""
    flat = tree_flatten(layer.trainable_parameters())
    names, arrays = [name for name, _ in flat], [value for _, value in flat]

    def run(x, *params):
        layer.update(tree_unflatten(list(zip(names, params))))
        return layer(x, mask)

    _, grads = mx.vjp(run, [x, *arrays], [cotangent])
    layer.update(tree_unflatten(list(zip(names, arrays))))  # the layer holds its own arrays again
    return grads[0], dict(zip(names, grads[1:]))


def _one_ahead(work, in_flight):
    """Start `work` on the device, then wait for `in_flight` (the previous layer's): Python builds
    the next layer's graph while the device runs this one, and at most two layers' temporaries
    exist at once (an unbounded async_eval held 20.6 GB of them at the 8B shapes; waiting for each
    layer in turn cost 13% more time)."""
    mx.async_eval(work)
    if in_flight is not None:
        mx.eval(in_flight)
    return work


def speculation_counts() -> dict[str, int]:
    """A fresh count of the walk's forward passes on guessed capacities, and of how many fell short."""
    return {"passes": 0, "redone": 0}


def _speculation_held(switches: dict[int, BatchedSwitchGLU], counts: dict[str, int] | None = None) -> bool:
    """After a forward pass with speculated capacities, already evaluated: whether every guess held.
    One host read for all blocks; each block's next guess follows what it needed; counted in `counts`."""
    guessed = [switch for switch in switches.values() if switch.needed is not None]
    if not guessed:
        return True
    needs = mx.stack([switch.needed for switch in guessed]).tolist()
    held = all(need <= switch.capacity_hint for switch, need in zip(guessed, needs))
    for switch, need in zip(guessed, needs):
        switch.hint_from(need)
    if counts is not None:
        counts["passes"] += 1
        counts["redone"] += not held
    return held


def walk_loss_and_grad(model: nn.Module, inputs: mx.array, targets: mx.array, mask: mx.array, first_active: int,
                       loss_chunk: int = 0, keep_expert_activations: bool = False,
                       speculation: dict[str, int] | None = None) -> tuple[tuple[mx.array, mx.array], dict]:
    """((loss sum, trained tokens), grads) like `nn.value_and_grad` of the summed masked loss, by
    walking the layers: a forward pass that keeps only each layer's input from `first_active` up,
    then the backward pass one layer at a time, top down, each layer's forward recomputed in its
    own `mx.vjp` and evaluated before the next.

    Expert blocks (`BatchedSwitchGLU`) read nothing back: the forward pass lays them out for the
    capacity each needed last step (with headroom), checked once at its end (the pass is redone
    with exact layouts when a guess fell short), and the recomputation reuses those layouts.
    `keep_expert_activations`: frozen expert blocks above `first_active` also keep their gate and up
    projections from the forward pass, and the recomputation runs only their backward matmuls.

    The math is per-layer gradient checkpointing, but MLX evaluates one layer's work at a time:
    one graph for the whole step lets its breadth-first evaluation start the recomputation (and
    dequantization) of many layers at once, which held 17.7 GB beyond the weights at the 8B shapes
    (2,048 tokens, group 4). Layers below `first_active` hold nothing trainable: the walk stops there.
    `speculation`: counts of the guessed passes and the redone ones (`speculation_counts`)."""
    inner = model.model
    walked = range(first_active, len(inner.layers))
    switches = {i: layer.feed_forward.switch_mlp for i, layer in enumerate(inner.layers)
                if isinstance(getattr(layer.feed_forward, "switch_mlp", None), BatchedSwitchGLU)}
    try:
        for i, switch in switches.items():
            switch.keep_layout = i >= first_active
            switch.keep_activations = keep_expert_activations and not tree_flatten(switch.trainable_parameters())
        for speculate in (True, False):
            for switch in switches.values():
                switch.speculate, switch.needed = speculate, None
                switch.forget()
            h = inner.embed_tokens(inputs)
            masks = {True: create_attention_mask(h, None), False: create_ssm_mask(h, None)}
            kept, in_flight = {}, None
            for i, layer in enumerate(inner.layers):
                if i >= first_active:
                    kept[i] = h
                h = _one_ahead(layer(h, masks[layer.is_attention_layer]), in_flight)
                in_flight = h
            (loss,), (cotangent,) = mx.vjp(lambda x: _head_loss(model, x, targets, mask, loss_chunk)[0], [h],
                                           [mx.array(1.0, dtype=mx.float32)])
            trained = mask.astype(mx.bool_).sum()
            mx.eval(loss, trained, cotangent)
            if _speculation_held(switches, speculation):
                break
        flat = {}
        for i in reversed(walked):
            layer = inner.layers[i]
            previous = cotangent
            cotangent, grads = _layer_vjp(layer, kept.pop(i), masks[layer.is_attention_layer], cotangent)
            if i in switches:
                switches[i].forget()  # the graph holds what it needs now
            _one_ahead([cotangent, grads], previous)
            flat.update({f"model.layers.{i}.{name}": g for name, g in grads.items()})
    finally:
        for switch in switches.values():
            switch.keep_layout, switch.speculate, switch.keep_activations, switch.needed = False, False, False, None
            switch.forget()
    return (loss, trained), tree_map_with_path(lambda path, _: flat[path], model.trainable_parameters())


def make_loss_and_grad(model: nn.Module, first_active: int, grad_checkpoint: bool = True,
                       stop_gradient: bool = True, loss_chunk: int = 0, walk: bool = True,
                       keep_expert_activations: bool = False, speculation: dict[str, int] | None = None) -> Callable:
    """value_and_grad of the summed masked loss over the model's trainable parameters:
    f(model, inputs, targets, mask) -> ((loss sum, trained tokens), grads).
    `loss_chunk` > 0 computes the cross-entropy that many tokens at a time (`chunked_masked_loss`).
    With `grad_checkpoint` (and `stop_gradient`) the gradients come from `walk_loss_and_grad`;
    `walk=False` builds one graph for the step instead (checkpointed by `recompute_in_backward`)."""
    if grad_checkpoint and stop_gradient and walk:
        return lambda m, inputs, targets, mask: walk_loss_and_grad(m, inputs, targets, mask, first_active, loss_chunk,
                                                                   keep_expert_activations, speculation)

    def loss_fn(m, inputs, targets, mask):
        if loss_chunk:
            hidden = forward_hidden(m, inputs, first_active, grad_checkpoint, stop_gradient)
            return chunked_masked_loss(m, hidden, targets, mask, loss_chunk)
        return masked_loss(forward_logits(m, inputs, first_active, grad_checkpoint, stop_gradient), targets, mask)

    return nn.value_and_grad(model, loss_fn)


def accumulate_gradients(model: nn.Module, loss_and_grad: Callable, batches: list[Batch],
                         mean: bool = True) -> tuple[float, int, dict]:
    """Gradients of several micro-batches, token-weighted: (loss sum, trained tokens, grads), the
    grads of the mean loss, or with `mean=False` of the summed loss (divide by the trained tokens
    later, e.g. inside the fused update, which saves a pass over them).
    Each micro-batch is evaluated before the next, so memory holds one batch's activations.
    Sums are float32 (bfloat16 gradients of split masters included)."""
    grads, loss_sum, trained = None, 0.0, 0
    for batch in batches:
        (loss, n), g = loss_and_grad(model, batch.inputs, batch.targets, batch.loss_mask)
        grads = g if grads is None else tree_map(lambda a, b: a.astype(mx.float32) + b, grads, g)
        mx.eval(grads, loss, n)
        loss_sum, trained = loss_sum + loss.item(), trained + n.item()
    if not mean:
        return loss_sum, trained, grads
    return loss_sum, trained, tree_map(lambda g: g / max(trained, 1), grads)


def global_norm(grads: dict) -> float:
    """The L2 norm of all gradients (float32); inf or nan when any gradient is. At most two tensors'
    float32 squares at a time (`_one_ahead`): all at once would double the gradients' memory, one
    at a time left the device idle between them (8-10 ms of a 0.25 s step at the 8B shapes)."""
    total, in_flight = mx.array(0.0, dtype=mx.float32), None
    for _, g in tree_flatten(grads):
        total = total + _square_sum(g)
        in_flight = _one_ahead(total, in_flight)
    return math.sqrt(total.item())


# Compiled: the same value, 3.8 ms instead of 6.5 for 12 expert-stack gradients on an H200 (the
# float32 squares are still written: all tensors in one graph peaked 4.2 GB higher).
_square_sum = mx.compile(lambda g: g.astype(mx.float32).square().sum())


def trained_weight_norm(model: nn.Module) -> float:
    """The L2 norm of the trainable weights (float32): inf or nan when one is non-finite or their
    squares overflow (|w| above ~1e19, as a 1e38 learning rate leaves). One pass over them."""
    return global_norm(model.trainable_parameters())


def apply_update(model: nn.Module, optimizer: optim.Optimizer, grads: dict, grad_clip: float | None,
                 scale: float = 1.0, norm: float | None = None) -> None:
    """Clip (optionally) and apply one optimizer step, evaluating parameters and optimizer state.

    The step's gradients are `grads` x `scale` (scale 1 / trained tokens turns summed-loss
    gradients into mean-loss ones); `norm` is their global norm when the caller has it already.
    Clipping as optim.clip_grad_norm: x min(1, grad_clip / (norm + 1e-6)). A FusedAdamW takes the
    factor into its kernel; other optimizers get the gradients scaled first."""
    factor = scale
    if grad_clip is not None:
        if norm is None:
            norm = global_norm(grads) * scale
        factor = scale * min(1.0, grad_clip / (norm + 1e-6))
    if isinstance(optimizer, FusedAdamW):
        optimizer.grad_scale = mx.array(factor, dtype=mx.float32)
    elif factor != 1.0:
        grads = tree_map(lambda g: (g * factor).astype(g.dtype), grads)
    optimizer.update(model, grads)
    mx.eval(model.trainable_parameters(), optimizer.state)

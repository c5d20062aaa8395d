"""The split float32 master (bfloat16 weights + their 16 low bits, `kernels.master_bits`): lossless, the
float32 master's AdamW update bit for bit, a bf16 training step that is the float32 master's, and
a checkpoint that resumes it exactly."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from test_grouped_speed_math import tiny_model, token_batch

import lfm_mlx.grouped.experts as grouped_experts
import lfm_mlx.grouped.optimizer as grouped_optimizer
from lfm_mlx.grouped import (
    FusedAdamW, TrainConfig, activate_group, apply_update, global_norm, make_loss_and_grad, make_optimizer, master_of,
    moe_params, router_master_of, set_frozen_path,
)
from lfm_mlx.kernels.master_bits import join_master, split_master


def test_the_split_is_lossless_and_rounds_to_nearest():
    x = mx.random.normal((20000,), key=mx.random.key(1)) * 10.0 ** mx.random.uniform(-30, 30, (20000,),
                                                                                     key=mx.random.key(2))
    ties = (mx.random.randint(0, 1 << 30, (500,), key=mx.random.key(3)).astype(mx.uint32)
            & mx.array(0xFFFF0000, dtype=mx.uint32)) | mx.array(0x8000, dtype=mx.uint32)
    x = mx.concatenate([x, ties.view(mx.float32), -ties.view(mx.float32), mx.array([0.0, -0.0, 1.0, -2.5])])
    high, low = split_master(x)
    assert high.dtype == mx.bfloat16 and low.dtype == mx.uint16
    assert mx.array_equal(join_master(high, low).view(mx.uint32), x.view(mx.uint32)).item()
    differs = high.view(mx.uint16) != x.astype(mx.bfloat16).view(mx.uint16)
    assert not (differs & (low != 0x8000)).any().item()  # the cast's rounding, except on exact ties
    # On a tie the cast rounds to even: it differs exactly where the truncated value was even.
    even = ((x.view(mx.uint32) >> mx.array(16, dtype=mx.uint32)) & mx.array(1, dtype=mx.uint32)) == 0
    assert mx.array_equal(differs[-1004:-4], even[-1004:-4]).item() and differs[-1004:-4].any().item()


class _Stack(nn.Module):
    def __init__(self, w: mx.array):
        super().__init__()
        self.w = w


@pytest.mark.parametrize("state_bits", [32, 8])
def test_the_split_masters_update_is_the_float32_masters_bit_for_bit(state_bits, monkeypatch):
    """30 AdamW steps (weight decay, a gradient scale) from bf16 starting weights: a float32
    master and a split one hold the same bits after every step; int8 moments updated two rows at
    a time carry the low bits through the blocks. `merge_masters` puts the float32 masters back."""
    monkeypatch.setattr(grouped_optimizer, "UPDATE_CHUNK", 2 * 32 * 128)
    start = (0.02 * mx.random.normal((6, 32, 128), key=mx.random.key(7))).astype(mx.bfloat16)
    plain, split = _Stack(start.astype(mx.float32)), _Stack(start)
    options = dict(learning_rate=1e-3, weight_decay=0.01, state_bits=state_bits)
    plain_opt, split_opt = FusedAdamW(**options), FusedAdamW(**options, split_master=True)
    for t in range(30):
        g = (0.1 * mx.random.normal(start.shape, key=mx.random.key(100 + t))).astype(mx.bfloat16)
        for model, optimizer in ((plain, plain_opt), (split, split_opt)):
            optimizer.grad_scale = mx.array(0.5)
            mx.random.seed(t)  # the int8 moments' rounding noise: the same draws for both
            optimizer.update(model, {"w": g})
        assert split.w.dtype == mx.bfloat16 and split_opt.state["w"]["low"].dtype == mx.uint16
        joined = join_master(split.w, split_opt.state["w"]["low"])
        assert mx.array_equal(joined.view(mx.uint32), plain.w.view(mx.uint32)).item(), t
    assert not mx.array_equal(plain.w, start.astype(mx.float32)).item()  # it trained
    split_opt.merge_masters(split)
    assert split.w.dtype == mx.float32 and mx.array_equal(split.w, plain.w).item()
    assert "low" not in split_opt.state["w"]


def _train(master_dtype: str, steps: int = 20, learning_rate: float = 1e-4) -> dict[str, np.ndarray]:
    """`steps` trainer steps on group [2, 3] of a bf16 tiny-moe (padded expert blocks: the CPU's
    bf16 matmuls); the update of each trained expert stack (float32 master minus start)."""
    model = tiny_model(mx.bfloat16)
    inputs, targets, mask = token_batch(24, seed=4)
    config = TrainConfig(model="-", data=["-"], run_dir="-", learning_rate=learning_rate, warmup_steps=0,
                         steps_per_group=steps, master_dtype=master_dtype)
    layers = [2, 3]
    set_frozen_path(model, "batched")
    activate_group(model, layers, master_of(config, mx.bfloat16), lean_gradients=True,
                   router_master=router_master_of(config, mx.bfloat16))
    start = {k: np.array(v.astype(mx.float32)) for k, v in moe_params(model, layers).items() if "switch_mlp" in k}
    optimizer = make_optimizer(config, steps)
    loss_and_grad = make_loss_and_grad(model, layers[0], config.grad_checkpoint, config.stop_gradient,
                                       config.loss_chunk)
    for _ in range(steps):
        (loss, trained), grads = loss_and_grad(model, inputs, targets, mask)
        norm = global_norm(grads) / trained.item()
        apply_update(model, optimizer, grads, config.grad_clip, scale=1 / trained.item(), norm=norm)
    trained_params = moe_params(model, layers)
    assert all(trained_params[k].dtype == master_of(config, mx.bfloat16) for k in start)
    optimizer.merge_masters(model)
    return {k: np.array(v.astype(mx.float32)) - start[k] for k, v in moe_params(model, layers).items() if k in start}


def _cast_rounding_ties_away(w: mx.array, dtype: mx.Dtype) -> mx.array:
    """`cast_keeping_gradient_dtype` with the split's tie rule (ties away from zero, not to even)."""
    cast = mx.custom_function(lambda a: split_master(a)[0])

    @cast.vjp
    def _(primals, cotangent, output):
        return cotangent

    return cast(w)


def test_a_bf16_step_on_split_masters_is_the_float32_masters(monkeypatch):
    """On bf16 compute the default master is split: the trained experts are bf16 parameters (no
    cast at each use) and after 20 trainer steps their float32 masters hold the bits of a float32
    master whose bf16 cast rounds ties as the split does. (With the cast's ties to even the two
    part at the first exact tie, one weight in 196,608 at step 3 here, and routing amplifies it.)"""
    config = TrainConfig(model="-", data=["-"], run_dir="-")
    assert config.master_dtype == "split" and master_of(config, mx.bfloat16) == mx.bfloat16
    assert master_of(config, mx.float32) == mx.float32  # float32 compute: the weights are the master
    assert master_of(config.model_copy(update={"fused_update": False}), mx.bfloat16) == mx.float32
    assert router_master_of(config, mx.bfloat16) == mx.float32
    split = _train("split")
    monkeypatch.setattr(grouped_experts, "cast_keeping_gradient_dtype", _cast_rounding_ties_away)
    reference = _train("float32")
    assert sum(np.abs(update).sum() for update in reference.values()) > 0
    for name, update in reference.items():
        np.testing.assert_array_equal(split[name], update, err_msg=name)


def test_a_split_master_resumes_from_a_checkpoint_bit_for_bit(tmp_path):
    """The low bits travel in the optimizer's checkpointed state: 10 steps, save, restore into a
    fresh optimizer (as the trainer resumes), 10 more, equal the 20 uninterrupted steps."""
    from lfm_mlx.train.checkpoint import load_checkpoint, restore_tree, save_checkpoint

    start = (0.02 * mx.random.normal((4, 16, 64), key=mx.random.key(3))).astype(mx.bfloat16)
    grads = [(0.1 * mx.random.normal(start.shape, key=mx.random.key(50 + t))).astype(mx.bfloat16) for t in range(20)]
    straight, straight_opt = _Stack(start), FusedAdamW(learning_rate=1e-3, split_master=True)
    for g in grads:
        straight_opt.update(straight, {"w": g})
    first, first_opt = _Stack(start), FusedAdamW(learning_rate=1e-3, split_master=True)
    for g in grads[:10]:
        first_opt.update(first, {"w": g})
    path = save_checkpoint(tmp_path, {"global_step": 10, "phase": 0}, {"w": first.w}, optimizer_state=first_opt.state)
    saved = load_checkpoint(path)
    resumed, resumed_opt = _Stack(saved.weights["w"]), FusedAdamW(learning_rate=1e-3, split_master=True)
    resumed_opt.init(resumed.trainable_parameters())
    resumed_opt.state = restore_tree(resumed_opt.state, saved.optimizer, str(path))
    assert resumed_opt.state["w"]["low"].dtype == mx.uint16 and resumed_opt.state["w"]["low"].any().item()
    for g in grads[10:]:
        resumed_opt.update(resumed, {"w": g})
    assert mx.array_equal(resumed.w, straight.w).item()
    assert mx.array_equal(resumed_opt.state["w"]["low"], straight_opt.state["w"]["low"]).item()


def test_settings_are_one_object_and_the_old_functions_agree():
    """`TrainConfig.settings(compute)` holds what the free functions derived; they stay as aliases,
    and the estimate's StepShape comes from the same settings."""
    from lfm_mlx.grouped import StepSettings, estimate_for_config, lean_gradients, split_master_in_use
    from lfm_mlx.memory import estimate_peak
    from lfm_mlx.model.io import compute_dtype
    from lfm_mlx.model.synthetic import hf_config

    for changes in ({}, {"master_dtype": "float32"}, {"fused_update": False}, {"grad_accumulation": 2},
                    {"master_dtype": "compute"}, {"optimizer": "adafactor", "fused_update": False}):
        config = TrainConfig(model="m", data=["d"], run_dir="r", **changes)
        for compute in (mx.bfloat16, mx.float32):
            settings = config.settings(compute)
            assert isinstance(settings, StepSettings)
            assert settings.master == master_of(config, compute)
            assert settings.router_master == router_master_of(config, compute)
            assert settings.split_master == split_master_in_use(config, compute)
            assert settings.lean_gradients == lean_gradients(config)
    big = hf_config("lfm2.5-8b-a1b") | {"quantization": {"bits": 8, "group_size": 64}}
    config = TrainConfig(model="m", data=["d"], run_dir="r")
    shape = config.settings(compute_dtype(big)).step_shape(big, "dequant", 2048)
    assert (shape.group_size, shape.master, shape.fused_update, shape.lean_gradients) == (4, "split", True, True)
    assert estimate_peak(big, shape).total == estimate_for_config(big, config, "dequant", 2048).total

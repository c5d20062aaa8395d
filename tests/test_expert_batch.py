"""The padded expert-block MoE path computes what mlx-lm's gather_mm path does (tiny shapes, CPU),
and the dequantization kernel's switch stays on mx.dequantize off CUDA."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.models.switch_layers import SwitchGLU
from test_grouped_speed_math import as_np, tiny_model, token_batch

from lfm_mlx import dequant_kernel
from lfm_mlx.expert_batch import CAPACITY_MULTIPLE, BatchedSwitchGLU, expert_layout
from lfm_mlx.grouped import (
    DequantSwitchLinear, TrainableSwitchLinear, activate_group, moe_params, probe_dequant_kernel, requantize_group,
    set_frozen_path, walk_loss_and_grad,
)


def test_expert_layout_puts_every_choice_in_its_experts_block():
    experts, k = 8, 3
    logits = mx.random.normal((2, 37, experts), key=mx.random.key(4))
    indices = mx.argpartition(logits, kth=-k, axis=-1)[..., -k:]
    source_token, block_row, capacity = expert_layout(indices, experts)

    flat = np.array(indices).reshape(-1)
    counts = np.bincount(flat, minlength=experts)
    assert capacity % CAPACITY_MULTIPLE == 0 and counts.max() <= capacity < counts.max() + CAPACITY_MULTIPLE
    source_token, block_row = np.array(source_token), np.array(block_row)
    assert source_token.shape == (experts * capacity,) and block_row.shape == flat.shape
    assert len(set(block_row.tolist())) == flat.size  # no two choices share a row
    for choice, row in enumerate(block_row):
        assert row // capacity == flat[choice]  # in its expert's block
        assert source_token[row] == choice // k  # fed by its own token
    assert source_token.max() < 2 * 37  # spare rows repeat real tokens


@pytest.mark.parametrize("frozen", ["dequant", "qmm"])
def test_batched_blocks_give_the_gather_paths_outputs_and_gradients(frozen):
    """Forward and every trained gradient (experts and routers of layers 2-3) through the layer walk."""
    results = {}
    for path in (frozen, "batched"):
        model = tiny_model()
        set_frozen_path(model, path)
        activate_group(model, [2, 3], mx.float32)
        inputs, targets, mask = token_batch(29, seed=6)
        (loss, _), grads = walk_loss_and_grad(model, inputs, targets, mask, 2)
        results[path] = (model(inputs), loss.item(), grads)
    (ref_logits, ref_loss, ref_grads), (logits, loss, grads) = results[frozen], results["batched"]
    switch = model.model.layers[5].feed_forward.switch_mlp
    assert isinstance(switch, BatchedSwitchGLU) and isinstance(switch.up_proj, DequantSwitchLinear)
    assert isinstance(model.model.layers[2].feed_forward.switch_mlp.up_proj, TrainableSwitchLinear)
    np.testing.assert_allclose(np.array(logits), np.array(ref_logits), rtol=1e-4, atol=1e-4)
    assert loss == pytest.approx(ref_loss, rel=1e-5)
    got, ref = as_np(grads), as_np(ref_grads)
    assert sorted(got) == sorted(ref) and len(ref) == 8
    for name in ref:  # float32, another summation order
        np.testing.assert_allclose(got[name], ref[name], rtol=1e-4, atol=1e-5 * np.abs(ref[name]).max())


def test_switching_paths_keeps_the_parameters_and_requantizes_in_place():
    model = tiny_model()
    before = as_np(model.parameters())
    set_frozen_path(model, "batched")
    assert as_np(model.parameters()).keys() == before.keys()  # same names: checkpoints unchanged
    start = moe_params(model, [2])
    activate_group(model, [2], mx.float32)
    requantize_group(model, [2], start, "batched")
    assert isinstance(model.model.layers[2].feed_forward.switch_mlp.gate_proj, DequantSwitchLinear)
    set_frozen_path(model, "qmm")
    assert type(model.model.layers[2].feed_forward.switch_mlp) is SwitchGLU
    after = as_np(model.parameters())
    assert after.keys() == before.keys()
    for name in before:  # every layer but the trained one is bit-identical
        if not name.startswith("model.layers.2."):
            np.testing.assert_array_equal(after[name], before[name])


def test_the_dequantization_kernel_stays_off_outside_cuda():
    model = tiny_model()
    record = probe_dequant_kernel(model, 2)
    assert record == {"choice": "mx.dequantize", "reason": "not the CUDA backend"}
    q = model.model.layers[2].feed_forward.switch_mlp.gate_proj
    got = dequant_kernel.dequantize(q.weight, q.scales, q.biases, q.group_size, q.bits)
    ref = mx.dequantize(q.weight, q.scales, q.biases, group_size=q.group_size, bits=q.bits)
    assert mx.array_equal(got, ref).item()
    # what the kernel takes: 8-bit affine codes with bf16 scales and biases, whole 16-code chunks
    w = mx.zeros((2, 4, 16), dtype=mx.uint32)
    bf16 = mx.zeros((2, 4, 1), dtype=mx.bfloat16)
    assert dequant_kernel._fits(w, bf16, bf16, 64, 8, "affine")
    assert not dequant_kernel._fits(w, bf16, bf16, 64, 4, "affine")
    assert not dequant_kernel._fits(w, bf16.astype(mx.float32), bf16, 64, 8, "affine")
    assert not dequant_kernel._fits(w, bf16, None, 64, 8, "affine")

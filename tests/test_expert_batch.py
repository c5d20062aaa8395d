"""The padded expert-block MoE path computes what mlx-lm's gather_mm path does (tiny shapes, CPU),
and the dequantization kernel's switch stays on mx.dequantize off CUDA."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.models.switch_layers import SwitchGLU
from test_grouped_speed_math import as_np, tiny_model, token_batch

from lfm_mlx.grouped import (
    DequantSwitchLinear, TrainableSwitchLinear, activate_group, moe_layers, moe_params, probe_dequant_kernel,
    requantize_group, set_frozen_path, walk_loss_and_grad,
)
from lfm_mlx.kernels import dequant, expert_blocks
from lfm_mlx.kernels.expert_blocks import CAPACITY_MULTIPLE, BatchedSwitchGLU, expert_layout
from lfm_mlx.kernels.row_gather import MISSING, gather_rows, probe, sum_rows


def _check_layout(indices, experts, k, tokens):
    layout = expert_layout(indices, experts)
    flat = np.array(indices).reshape(-1)
    capacity = layout.capacity
    source_token, block_row = np.array(layout.source_token), np.array(layout.block_row).reshape(-1)
    block_choice = np.array(layout.block_choice)
    counts = np.bincount(flat, minlength=experts)
    assert capacity % CAPACITY_MULTIPLE == 0 and counts.max() <= capacity < counts.max() + CAPACITY_MULTIPLE
    assert source_token.shape == (experts * capacity,) and block_row.shape == flat.shape
    assert len(set(block_row.tolist())) == flat.size  # no two choices share a row
    for choice, row in enumerate(block_row):
        assert row // capacity == flat[choice]  # in its expert's block
        assert source_token[row] == choice // k  # fed by its own token
        assert block_choice[row] == choice  # and the way back
    assert (block_choice == MISSING).sum() == block_choice.size - flat.size  # every other row is spare
    assert source_token.max() < tokens  # spare rows repeat real tokens
    return layout


def test_expert_layout_puts_every_choice_in_its_experts_block():
    experts, k = 8, 3
    logits = mx.random.normal((2, 37, experts), key=mx.random.key(4))
    indices = mx.argpartition(logits, kth=-k, axis=-1)[..., -k:]
    _check_layout(indices, experts, k, 2 * 37)


def test_a_skewed_routing_gives_the_gather_outputs_and_gradients():
    """The batched block against mlx-lm's SwitchGLU when one expert takes every token (most rows
    spare): output, input gradient and every weight gradient, float32."""
    experts, k, tokens, dims, hidden = 6, 2, 400, 16, 24
    glu = SwitchGLU(dims, hidden, experts)
    x = mx.random.normal((tokens, dims), key=mx.random.key(1))
    second = 1 + np.arange(tokens) % (experts - 1)
    indices = mx.array(np.stack([np.zeros(tokens, dtype=np.int64), second], axis=1).astype(np.uint32))
    batched = BatchedSwitchGLU(glu)
    assert expert_layout(indices, experts).capacity == 400  # the case under test: 5 of 6 blocks mostly spare
    cotangent = mx.random.normal((tokens, k, dims), key=mx.random.key(2))

    def grads(block):
        def run(x, params):
            block.update(params)
            out = block(x, indices)
            return (out * cotangent).sum(), out
        (_, out), grads = mx.value_and_grad(run, argnums=(0, 1))(x, block.trainable_parameters())
        return out, grads

    ref_out, ref = grads(glu)
    out, got = grads(batched)
    np.testing.assert_allclose(np.array(out), np.array(ref_out), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.array(got[0]), np.array(ref[0]), rtol=1e-5, atol=1e-5)
    got_w, ref_w = as_np(got[1]), as_np(ref[1])
    assert sorted(got_w) == sorted(ref_w) == ["down_proj.weight", "gate_proj.weight", "up_proj.weight"]
    for name in ref_w:
        np.testing.assert_allclose(got_w[name], ref_w[name], rtol=1e-5, atol=1e-5)


def test_the_walk_reuses_the_forward_layout_and_forgets_it_after():
    """In the layer walk each block computes its layout once (forward pass) and the backward's
    recomputation reuses it; nothing is kept afterwards, so later calls route afresh."""
    model = tiny_model()
    set_frozen_path(model, "blocks")
    activate_group(model, [2, 3], mx.float32)
    calls = []
    real = expert_blocks.expert_layout
    expert_blocks.expert_layout = lambda *a: calls.append(1) or real(*a)
    try:
        inputs, targets, mask = token_batch(29, seed=6)
        walk_loss_and_grad(model, inputs, targets, mask, 2)
        walked = len(calls)
        model(inputs)
    finally:
        expert_blocks.expert_layout = real
    blocks = moe_layers(model)
    assert walked == len(blocks)  # once per block, the recomputation read nothing back
    assert len(calls) == 2 * len(blocks)
    for i in blocks:
        switch = model.model.layers[i].feed_forward.switch_mlp
        assert switch.kept_layout is None and not switch.keep_layout


@pytest.mark.parametrize("frozen", ["dequant", "qmm"])
def test_batched_blocks_give_the_gather_paths_outputs_and_gradients(frozen):
    """Forward and every trained gradient (experts and routers of layers 2-3) through the layer walk."""
    results = {}
    for path in (frozen, "blocks"):
        model = tiny_model()
        set_frozen_path(model, path)
        activate_group(model, [2, 3], mx.float32)
        inputs, targets, mask = token_batch(29, seed=6)
        (loss, _), grads = walk_loss_and_grad(model, inputs, targets, mask, 2)
        results[path] = (model(inputs), loss.item(), grads)
    (ref_logits, ref_loss, ref_grads), (logits, loss, grads) = results[frozen], results["blocks"]
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
    set_frozen_path(model, "blocks")
    assert as_np(model.parameters()).keys() == before.keys()  # same names: checkpoints unchanged
    start = moe_params(model, [2])
    activate_group(model, [2], mx.float32)
    requantize_group(model, [2], start, "blocks")
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
    got = dequant.dequantize(q.weight, q.scales, q.biases, q.group_size, q.bits)
    ref = mx.dequantize(q.weight, q.scales, q.biases, group_size=q.group_size, bits=q.bits)
    assert mx.array_equal(got, ref).item()
    # what the kernel takes: 8-bit affine codes with bf16 scales and biases, whole 16-code chunks
    w = mx.zeros((2, 4, 16), dtype=mx.uint32)
    bf16 = mx.zeros((2, 4, 1), dtype=mx.bfloat16)
    assert dequant._fits(w, bf16, bf16, 64, 8, "affine")
    assert not dequant._fits(w, bf16, bf16, 64, 4, "affine")
    assert not dequant._fits(w, bf16.astype(mx.float32), bf16, 64, 8, "affine")
    assert not dequant._fits(w, bf16, None, 64, 8, "affine")


def test_row_gathers_off_cuda():
    """The MLX ops behind the row gathers (the CUDA kernels are probed against them bit for bit)."""
    src = mx.random.normal((5, 8), key=mx.random.key(3))
    index = mx.array([4, MISSING, 0, 4], dtype=mx.uint32)
    want = np.array(src)[[4, 0, 0, 4]]
    want[1] = 0
    np.testing.assert_array_equal(np.array(gather_rows(src, index)), want)
    picks = mx.array([[0, 1], [2, 2], [4, 3]], dtype=mx.uint32)
    np.testing.assert_allclose(np.array(sum_rows(src, picks)), np.array(src)[np.array(picks)].sum(axis=1), rtol=1e-6)
    assert probe(8, 2, 24, 16, mx.bfloat16) == {"choice": "mlx", "reason": "not the CUDA backend"}


def test_the_layout_kernel_is_taken_only_where_its_probe_chose_it():
    """Off CUDA the one-kernel layout is never probed in; a run's records choose it only by name, and
    records written before it existed keep speculative_layout's MLX ops."""
    from lfm_mlx.grouped.setup import probe_kernels
    from lfm_mlx.kernels import block_layout
    from lfm_mlx.kernels.choices import KernelChoices

    assert block_layout.probe(8, 2, 64, expert_blocks.speculative_layout) == {
        "choice": "mlx", "reason": "not the CUDA backend"}
    records = probe_kernels(tiny_model(), 2, 64)
    assert records["layout_kernel"]["choice"] == "mlx" and not KernelChoices.from_records(records).layout
    old = {"dequant_kernel": {"choice": "kernel"}, "row_gather_kernel": {"choice": "kernel"}}
    assert KernelChoices.from_records(old) == KernelChoices(dequant=True, row_gather=True, layout=False)
    assert KernelChoices.from_records({**old, "layout_kernel": {"choice": "kernel"}}).layout


def test_a_speculated_layout_routes_like_the_host_layout_and_reports_its_need():
    experts, k = 8, 3
    logits = mx.random.normal((2, 37, experts), key=mx.random.key(4))
    indices = mx.argpartition(logits, kth=-k, axis=-1)[..., -k:]
    exact = expert_layout(indices, experts)
    layout, needed = expert_blocks.speculative_layout(indices, experts, exact.capacity + 16)
    counts = np.bincount(np.array(indices).reshape(-1), minlength=experts)
    assert needed.item() == counts.max()
    flat = np.array(indices).reshape(-1)
    rows, source, choice = (np.array(layout.block_row).reshape(-1), np.array(layout.source_token),
                            np.array(layout.block_choice))
    assert len(set(rows.tolist())) == flat.size and (rows // layout.capacity == flat).all()
    assert (source[rows] == np.arange(flat.size) // k).all() and (choice[rows] == np.arange(flat.size)).all()
    assert (choice == MISSING).sum() == choice.size - flat.size


def test_the_walk_speculates_capacities_and_redoes_a_pass_whose_guess_fell_short():
    """Step 1 lays out on the host and notes each block's need; step 2 guesses from it (no host
    read); a guess forced too small is caught at the end of the forward pass and the pass redone.
    All three give the exact walk's loss and gradients."""
    model = tiny_model()
    set_frozen_path(model, "blocks")
    activate_group(model, [2, 3], mx.float32)
    inputs, targets, mask = token_batch(29, seed=6)
    calls = []
    real = expert_blocks.expert_layout
    expert_blocks.expert_layout = lambda *a: calls.append(1) or real(*a)
    try:
        results = []
        for case in ("host", "guessed", "too small"):
            if case == "too small":
                model.model.layers[4].feed_forward.switch_mlp.capacity_hint = 16
            calls.clear()
            (loss, _), grads = walk_loss_and_grad(model, inputs, targets, mask, 2)
            results.append((loss.item(), as_np(grads), len(calls)))
    finally:
        expert_blocks.expert_layout = real
    blocks = len(moe_layers(model))
    assert [r[2] for r in results] == [blocks, 0, blocks]  # host reads: step 1, none, the redone pass
    for loss, grads, _ in results[1:]:
        assert loss == results[0][0]
        for name, value in grads.items():
            np.testing.assert_array_equal(value, results[0][1][name])


def _layout_kernel_stand_in(indices, num_experts, capacity):
    """What `block_layout.layout_arrays` returns, computed as its CUDA kernel does (a stable counting
    sort; the kernel cannot run here): the same shapes and dtypes, so the walk's kernel branch runs."""
    k = indices.shape[-1]
    flat = np.array(indices).reshape(-1).astype(np.int64)
    counts = np.bincount(flat, minlength=num_experts)
    starts = np.cumsum(counts) - counts
    seen, slot, order = np.zeros(num_experts, dtype=np.int64), np.empty_like(flat), np.empty_like(flat)
    for i, e in enumerate(flat):
        slot[i], seen[e] = seen[e], seen[e] + 1
        order[starts[e] + slot[i]] = i
    block_row = np.minimum(flat * capacity + slot, num_experts * capacity - 1)
    expert, row_slot = np.divmod(np.arange(num_experts * capacity), capacity)
    choice = order[np.minimum(starts[expert] + np.minimum(row_slot, np.maximum(counts[expert], 1) - 1), flat.size - 1)]
    block_choice = np.where(row_slot < counts[expert], choice, MISSING)
    return (mx.array((choice // k).astype(np.uint32)), mx.array(block_row.reshape(-1, k).astype(np.uint32)),
            mx.array(block_choice.astype(np.uint32)), mx.array(np.uint32(counts.max())))


def test_the_walk_on_the_layout_kernels_branch_gives_the_same_loss_and_gradients(monkeypatch):
    """`KernelChoices.layout` sends the walk's guessed layouts through `block_layout.layout_arrays`
    (here a stand-in with the kernel's outputs, its indices checked equal to speculative_layout's);
    the steps (host layout, guessed, a guess too small and redone) match the MLX layout's exactly."""
    from lfm_mlx.kernels import block_layout
    from lfm_mlx.kernels.choices import KernelChoices

    indices = mx.random.randint(0, 8, (1, 29, 2), key=mx.random.key(5)).astype(mx.uint32)
    for capacity in (32, 16):
        mine = _layout_kernel_stand_in(indices, 8, capacity)
        theirs = block_layout._arrays(*expert_blocks.speculative_layout(indices, 8, capacity))
        for a, b in zip(mine, theirs):
            assert a.shape == b.shape and mx.array_equal(a, b.astype(a.dtype)).item()
    calls = []
    monkeypatch.setattr(block_layout, "layout_arrays", lambda *a: calls.append(1) or _layout_kernel_stand_in(*a))
    inputs, targets, mask = token_batch(29, seed=6)
    results = {}
    for kernels in (KernelChoices(), KernelChoices(layout=True)):
        model = tiny_model()
        set_frozen_path(model, "blocks", kernels=kernels)
        activate_group(model, [2, 3], mx.float32)
        for case in ("host", "guessed", "too small"):
            if case == "too small":
                model.model.layers[4].feed_forward.switch_mlp.capacity_hint = 16
            (loss, _), grads = walk_loss_and_grad(model, inputs, targets, mask, 2)
            results.setdefault(case, []).append((loss.item(), as_np(grads)))
    assert calls  # the kernel's branch ran
    for (ref_loss, ref), (loss, got) in results.values():
        assert loss == ref_loss
        for name, value in got.items():
            np.testing.assert_array_equal(value, ref[name])


def test_a_layout_kernel_chosen_by_its_probe_must_also_match_in_a_moe_block(monkeypatch):
    """The probe's last check runs a real MoE block of the model on the kernel's layout: a kernel
    whose block output and input gradient match MLX's is kept; one whose output shape breaks the
    block (the bug an H100 run found: block rows shaped [1, T, k]) or whose indices differ leaves
    MLX's layout, with the reason."""
    from lfm_mlx.grouped.probes import layout_in_block
    from lfm_mlx.kernels import block_layout

    model, chosen = tiny_model(), {"choice": "kernel", "reason": "bit-identical, faster"}
    monkeypatch.setattr(block_layout, "layout_arrays", _layout_kernel_stand_in)
    record = layout_in_block(model, 2, 40, chosen)
    assert record["choice"] == "kernel" and "the same MoE block output" in record["reason"]

    def batch_shaped(indices, num_experts, capacity):
        source, rows, choices, needed = _layout_kernel_stand_in(indices, num_experts, capacity)
        return source, rows.reshape(*indices.shape[:-1], -1), choices, needed

    monkeypatch.setattr(block_layout, "layout_arrays", batch_shaped)
    record = layout_in_block(model, 2, 40, chosen)
    assert record["choice"] == "mlx" and record["reason"].startswith("failed in the MoE block")

    def shifted(indices, num_experts, capacity):
        source, rows, choices, needed = _layout_kernel_stand_in(indices, num_experts, capacity)
        return (source + 1) % 40, rows, choices, needed  # spare and real rows fed by the wrong tokens

    monkeypatch.setattr(block_layout, "layout_arrays", shifted)
    record = layout_in_block(model, 2, 40, chosen)
    assert record["choice"] == "mlx" and "differ" in record["reason"]


def test_kept_expert_activations_give_the_walks_gradients_without_recomputing_frozen_blocks():
    """With `keep_expert_activations` the frozen blocks above the group return their forward
    output in the backward pass and run only the backward matmuls (`_replay`): the same loss and
    gradients as recomputing them, also when a short capacity guess redoes the forward pass; the
    trained blocks recompute as before, and nothing stays kept after the walk."""
    model = tiny_model()
    set_frozen_path(model, "blocks")
    activate_group(model, [2, 3], mx.float32)
    inputs, targets, mask = token_batch(29, seed=6)
    (ref_loss, _), ref = walk_loss_and_grad(model, inputs, targets, mask, 2)
    replays = []
    real = BatchedSwitchGLU._replay
    BatchedSwitchGLU._replay = lambda self, x: replays.append(self) or real(self, x)
    try:
        for short_guess in (False, True):
            if short_guess:
                model.model.layers[4].feed_forward.switch_mlp.capacity_hint = 16
            replays.clear()
            (loss, _), got = walk_loss_and_grad(model, inputs, targets, mask, 2, keep_expert_activations=True)
            assert loss.item() == pytest.approx(ref_loss.item(), rel=1e-6)
            got_np, ref_np = as_np(got), as_np(ref)
            for name in ref_np:
                np.testing.assert_allclose(got_np[name], ref_np[name], rtol=1e-5, atol=1e-7)
            frozen = [i for i in moe_layers(model) if i > 3]
            assert {id(s) for s in replays} == {id(model.model.layers[i].feed_forward.switch_mlp) for i in frozen}
    finally:
        BatchedSwitchGLU._replay = real
    for i in moe_layers(model):
        switch = model.model.layers[i].feed_forward.switch_mlp
        assert switch.kept_activations is None and switch.kept_layout is None and not switch.keep_activations


def test_the_path_probe_times_the_blocks_as_the_walk_runs_them():
    """The start-up probe lays the padded blocks out once (its untimed call) and times calls that
    reuse the layout, as the walk's backward does; it leaves nothing kept and every path timed."""
    from lfm_mlx.grouped import measure_frozen_paths

    model = tiny_model()
    calls = []
    real = expert_blocks.expert_layout
    expert_blocks.expert_layout = lambda *a: calls.append(1) or real(*a)
    try:
        times = measure_frozen_paths(model, 4, 32, mx.float32)
    finally:
        expert_blocks.expert_layout = real
    assert set(times) == {"qmm", "dequant", "blocks"} and all(t > 0 for t in times.values())
    assert len(calls) == 1  # one host layout for the warm-up and the three timed calls
    switch = model.model.layers[4].feed_forward.switch_mlp
    assert isinstance(switch, BatchedSwitchGLU) and switch.kept_layout is None and not switch.keep_layout


def test_kernel_choices_are_passed_down_not_left_behind():
    """What the frozen experts and the expert blocks run is what the run's KernelChoices say, set by
    `set_frozen_path`: a later call with other choices (or none) replaces them, nothing stays behind."""
    from lfm_mlx.kernels.choices import KernelChoices

    model = tiny_model()
    chosen = KernelChoices(dequant=True, row_gather=True)
    set_frozen_path(model, "blocks", kernels=chosen)
    switch = model.model.layers[2].feed_forward.switch_mlp
    assert switch.kernels is chosen and switch.gate_proj.use_kernel
    layout = expert_layout(mx.array([[0, 1], [1, 2]]), 4, switch.kernels.row_gather)
    assert layout.kernel
    set_frozen_path(model, "dequant")  # no choices given: MLX's ops
    gate = model.model.layers[2].feed_forward.switch_mlp.gate_proj
    assert isinstance(gate, DequantSwitchLinear) and not gate.use_kernel
    set_frozen_path(model, "blocks")
    assert model.model.layers[2].feed_forward.switch_mlp.kernels == KernelChoices()
    assert not expert_layout(mx.array([[0, 1], [1, 2]]), 4).kernel

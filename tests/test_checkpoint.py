"""Atomic checkpoints: exact round trip, pruning, and never picking up a half-written one."""

from __future__ import annotations

import json
import shutil

import mlx.core as mx
import mlx.optimizers as optim
import pytest

from lfm_mlx.train.checkpoint import (
    ParkedArrays, checkpoint_name, config_hash, latest_checkpoint, list_checkpoints, load_checkpoint, restore_tree,
    save_checkpoint,
)


def _state(step: int, phase: int = 0) -> dict:
    return {"global_step": step, "phase": phase, "step_in_phase": step, "data_order": [["a", "b"]]}


def _optimizer_state() -> dict:
    opt = optim.AdamW(learning_rate=1e-3)
    params = {"model": {"layers": [{}, {"w": mx.ones((2, 3), dtype=mx.bfloat16)}]}}
    grads = {"model": {"layers": [{}, {"w": mx.full((2, 3), 0.5, dtype=mx.bfloat16)}]}}
    opt.init(params)
    opt.apply_gradients(grads, params)
    return opt.state


def test_round_trip_is_exact_for_every_dtype(tmp_path):
    weights = {"a.weight": mx.random.normal((4, 8)).astype(mx.bfloat16),
               "a.codes": mx.array([[1, 2**32 - 1]], dtype=mx.uint32),
               "a.bias": mx.random.normal((3,))}
    start = {"g.weight": mx.arange(6, dtype=mx.uint32)}
    opt_state = _optimizer_state()
    path = save_checkpoint(tmp_path, _state(3), weights, start, opt_state)
    assert path.name == checkpoint_name(3, 0) == "ckpt-00000003-0000"
    loaded = load_checkpoint(path)
    assert loaded.state["data_order"] == [["a", "b"]] and loaded.state["global_step"] == 3
    for name, value in weights.items():
        assert loaded.weights[name].dtype == value.dtype and mx.array_equal(loaded.weights[name], value).item()
    assert mx.array_equal(loaded.group_start["g.weight"], start["g.weight"]).item()
    assert loaded.optimizer["step"].dtype == mx.uint64 and loaded.optimizer["step"].item() == 1

    # The optimizer state goes back into a fresh optimizer's tree, leaf by leaf.
    fresh = optim.AdamW(learning_rate=1e-3)
    fresh.init({"model": {"layers": [{}, {"w": mx.ones((2, 3), dtype=mx.bfloat16)}]}})
    restored = restore_tree(fresh.state, loaded.optimizer, "test")
    assert mx.array_equal(restored["model"]["layers"][1]["w"]["m"], opt_state["model"]["layers"][1]["w"]["m"]).item()
    with pytest.raises(ValueError, match="do not match"):
        restore_tree(fresh.state, {"step": loaded.optimizer["step"]}, "test")


def test_a_boundary_checkpoint_has_no_optimizer_and_sorts_after_the_step_before_it(tmp_path):
    save_checkpoint(tmp_path, _state(4, 0), {"w": mx.zeros((2,))}, {"s": mx.zeros((1,))}, _optimizer_state(), keep=0)
    save_checkpoint(tmp_path, _state(4, 1), {"w": mx.ones((2,))}, None, None, keep=0)
    latest = load_checkpoint(latest_checkpoint(tmp_path))
    assert latest.path.name == "ckpt-00000004-0001"
    assert latest.optimizer is None and latest.group_start == {}
    assert [p.name for p in list_checkpoints(tmp_path)] == ["ckpt-00000004-0000", "ckpt-00000004-0001"]


def test_pruning_keeps_the_newest(tmp_path):
    for step in range(1, 6):
        save_checkpoint(tmp_path, _state(step), {"w": mx.full((2,), step)}, keep=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["ckpt-00000004-0000", "ckpt-00000005-0000"]


def test_half_written_checkpoints_are_never_picked_up(tmp_path):
    good = save_checkpoint(tmp_path, _state(1), {"w": mx.ones((64,))}, keep=0)
    root = tmp_path / "checkpoints"
    # A kill during the write leaves a dot-named temporary directory: ignored.
    shutil.copytree(good, root / ".ckpt-00000009-0000.tmp-abc")
    # A directory under a final name with a truncated array file: ignored.
    truncated = root / "ckpt-00000007-0000"
    shutil.copytree(good, truncated)
    data = (truncated / "weights.safetensors").read_bytes()
    (truncated / "weights.safetensors").write_bytes(data[: len(data) // 2])
    # One with no state.json, and one whose state.json is cut off: ignored.
    shutil.copytree(good, root / "ckpt-00000008-0000")
    (root / "ckpt-00000008-0000" / "state.json").unlink()
    shutil.copytree(good, root / "ckpt-00000006-0000")
    (root / "ckpt-00000006-0000" / "state.json").write_text(json.dumps(_state(6))[:20])
    assert latest_checkpoint(tmp_path) == good
    with pytest.raises(ValueError, match="not a complete"):
        load_checkpoint(truncated)


def test_save_failure_leaves_no_checkpoint(tmp_path):
    with pytest.raises(ValueError, match="global_step"):
        save_checkpoint(tmp_path, {"phase": 0}, {"w": mx.ones((2,))})
    with pytest.raises(Exception):
        save_checkpoint(tmp_path, _state(2), {"w": "not an array"})
    assert latest_checkpoint(tmp_path) is None
    assert not any((tmp_path / "checkpoints").iterdir())


def test_config_hash_is_order_independent_and_sensitive():
    a = config_hash({"lr": 1e-5, "groups": [[2, 3]], "seed": 0})
    assert a == config_hash({"seed": 0, "groups": [[2, 3]], "lr": 1e-5})
    assert a != config_hash({"seed": 0, "groups": [[2, 3]], "lr": 2e-5})


def test_parked_arrays_leave_memory_and_come_back_exactly(tmp_path):
    """The group's start copy parked in a file: its memory is freed while parked, `load` gives
    the same bits (packed codes, bf16 scales), `discard` removes the file; unparked, nothing is written."""
    codes = mx.random.randint(0, 1 << 30, (64, 1024), key=mx.random.key(1)).astype(mx.uint32)
    scales = mx.random.normal((64, 64), key=mx.random.key(2)).astype(mx.bfloat16)
    mx.eval(codes, scales)
    expected = {"w": mx.array(codes), "s": mx.array(scales)}  # copies kept by the test
    mx.eval(expected)
    before = mx.get_active_memory()
    parked = ParkedArrays({"w": codes, "s": scales}, tmp_path / "start.safetensors")
    del codes, scales
    assert mx.get_active_memory() <= before - 64 * 1024 * 4  # the codes' bytes left memory
    back = parked.load()
    assert sorted(back) == ["s", "w"] and all(back[k].dtype == expected[k].dtype for k in back)
    assert all(mx.array_equal(back[k], expected[k]).item() for k in back)
    parked.discard()
    assert not (tmp_path / "start.safetensors").exists()
    kept = ParkedArrays(expected)
    assert kept.load() is expected and list(tmp_path.iterdir()) == []


def test_a_checkpoint_takes_a_parked_start_copy_without_reading_it_back(tmp_path):
    """The parked file goes into the checkpoint as it is (a hard link here, a copy where links
    fail), loads back as the arrays, and outlives the parked file's removal at the group's end;
    an in-memory start copy is written as before."""
    start = {"w": mx.arange(4096, dtype=mx.uint32).reshape(64, 64), "s": mx.ones((64, 1), dtype=mx.bfloat16)}
    mx.eval(start)
    parked = ParkedArrays(dict(start), tmp_path / "run" / "group_start.safetensors")
    state = {"global_step": 3, "phase": 0}
    path = save_checkpoint(tmp_path / "run", state, {"x": mx.zeros((2,))}, group_start=parked)
    saved = path / "group_start.safetensors"
    assert saved.stat().st_ino == parked.path.stat().st_ino  # the same file, not a second write
    parked.discard()
    back = load_checkpoint(path).group_start
    assert sorted(back) == ["s", "w"] and all(mx.array_equal(back[k], start[k]).item() for k in start)

    in_memory = save_checkpoint(tmp_path / "run", {"global_step": 4, "phase": 0}, {"x": mx.zeros((2,))},
                                group_start=ParkedArrays(start))
    assert all(mx.array_equal(load_checkpoint(in_memory).group_start[k], start[k]).item() for k in start)

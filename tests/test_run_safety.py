"""Nothing lost: directory locks between live processes, replaces killed at every rename, stale
temporaries cleaned, a full disk named, non-finite updates never written, adapters tied to their base."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import mlx.core as mx
import pytest
import yaml

from lfm_mlx.fsutil import atomic_dir, atomic_file, backup_of, recover
from lfm_mlx.model.io import base_fingerprint, load

ENV = {**os.environ, "OPENBLAS_NUM_THREADS": "1"}


def cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lfm_mlx", *map(str, args)], capture_output=True, text=True,
                          env=ENV, cwd=cwd, timeout=300)


def non_finite_tensors(root: Path) -> list[str]:
    """Every tensor of every safetensors file under `root` with a non-finite value."""
    bad = []
    for path in sorted(root.rglob("*.safetensors")):
        for name, value in mx.load(str(path)).items():
            if mx.issubdtype(value.dtype, mx.floating) and not mx.all(mx.isfinite(value)).item():
                bad.append(f"{path.relative_to(root)}:{name}")
    return bad


# ---------------------------------------------------------------- locks


def hold_lock(directory: Path, sibling: bool = False) -> subprocess.Popen:
    """A live process holding the lock of `directory` until it is killed."""
    code = (f"import sys, time\nfrom lfm_mlx.fsutil import locked\nwith locked({str(directory)!r}, sibling={sibling}):\n"
            "    print('held', flush=True)\n    time.sleep(600)\n")
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, env=ENV)
    assert holder.stdout.readline().strip() == "held"
    return holder


def test_a_locked_run_or_output_directory_refuses_a_second_process_until_the_holder_dies(
        tiny_moe_dir, tiny_moe_mixed_dir, tmp_path):
    rows = tmp_path / "rows.jsonl"
    rows.write_text("")  # never read: the lock comes first
    run_dir, out_dir, mixed = tmp_path / "run", tmp_path / "lora", tmp_path / "mixed"
    train_yaml = tmp_path / "train.yaml"
    train_yaml.write_text(yaml.safe_dump({"model": str(tiny_moe_mixed_dir), "data": [str(rows)], "run_dir": str(run_dir)}))
    lora_yaml = tmp_path / "lora.yaml"
    lora_yaml.write_text(yaml.safe_dump({"model": str(tiny_moe_mixed_dir), "data": str(rows), "out_dir": str(out_dir)}))
    adapters = tmp_path / "adapters"  # fuse takes its lock before it reads the adapters' weights
    adapters.mkdir()
    (adapters / "adapter_config.json").write_text(json.dumps({"fine_tune_type": "lora"}))
    fused = tmp_path / "fused"
    holders = [hold_lock(run_dir), hold_lock(out_dir), hold_lock(mixed, sibling=True),
               hold_lock(tmp_path / "m.gguf", sibling=True), hold_lock(fused, sibling=True)]
    try:
        attempts = {"train": cli("train", train_yaml, "--no-progress"), "lora": cli("lora", lora_yaml),
                    "mix": cli("mix", tiny_moe_dir, mixed), "gguf": cli("gguf", tiny_moe_dir, tmp_path / "m.gguf"),
                    "fuse": cli("fuse", "--model", tiny_moe_mixed_dir, "--adapter-path", adapters, "--save-path", fused,
                                "--rows", rows)}
        for (verb, result), holder, where in zip(attempts.items(), holders,
                                                 (run_dir, out_dir, mixed, tmp_path / "m.gguf", fused)):
            assert result.returncode == 2, (verb, result.stderr)
            assert "Traceback" not in result.stderr
            assert f"{where} is in use by another lfm-mlx process (PID {holder.pid}" in result.stderr, verb
        assert not mixed.exists() and not (tmp_path / "m.gguf").exists() and not fused.exists()
    finally:
        for holder in holders:
            holder.send_signal(signal.SIGKILL)  # the OS releases a killed holder's lock
            holder.wait()
    assert cli("mix", tiny_moe_dir, mixed).returncode == 0
    assert not (tmp_path / ".mixed.lock").exists()  # a finished holder removes its lock file (a killed one cannot)


def test_two_live_train_runs_on_one_run_dir_never_interleave(tiny_moe_mixed_dir, tmp_path):
    from tests.test_grouped import make_config, tool_rows

    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(json.dumps(row) + "\n" for row in tool_rows(16)))
    config = make_config(tiny_moe_mixed_dir, rows, tmp_path / "run", steps_per_group=150)  # long enough to overlap
    path = tmp_path / "train.yaml"
    path.write_text(yaml.safe_dump(config.model_dump(mode="json", exclude_unset=True)))
    first = subprocess.Popen([sys.executable, "-m", "lfm_mlx", "train", str(path), "--no-progress"],
                             stderr=subprocess.PIPE, text=True, env=ENV)
    lock = tmp_path / "run" / ".lfm_mlx.lock"
    deadline = time.time() + 60
    while not (lock.exists() and lock.read_text().strip() == str(first.pid)) and time.time() < deadline:
        time.sleep(0.05)
    second = cli("train", path, "--set", "learning_rate=1e-4", "--no-progress")
    assert first.wait(timeout=300) == 0, first.stderr.read()
    assert second.returncode == 2 and f"PID {first.pid}" in second.stderr and "Traceback" not in second.stderr
    resolved = json.loads((tmp_path / "run" / "train_config.json").read_text())
    assert resolved["config"]["learning_rate"] == config.learning_rate  # the loser wrote nothing
    steps = [json.loads(line)["step"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
             if json.loads(line)["kind"] == "step"]
    assert steps == sorted(set(steps))


# ---------------------------------------------------------------- replaces killed at each rename

KILL_AT_NTH_RENAME = textwrap.dedent("""
    import os, shutil, signal, sys
    calls, kill_at = 0, int(sys.argv[1])
    def killing(real):
        def wrapped(*args, **kwargs):
            global calls
            calls += 1
            if calls == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
            return real(*args, **kwargs)
        return wrapped
    os.rename, os.replace, shutil.rmtree = killing(os.rename), killing(os.replace), killing(shutil.rmtree)
    exec(sys.argv[2])
""")


def kill_at(n: int, code: str) -> int:
    return subprocess.run([sys.executable, "-c", KILL_AT_NTH_RENAME, str(n), code], env=ENV, timeout=300).returncode


def test_a_directory_replace_killed_at_every_rename_leaves_old_or_new_after_recovery(tmp_path):
    final = tmp_path / "out"
    code = (f"from lfm_mlx.fsutil import atomic_dir\nwith atomic_dir({str(final)!r}) as tmp:\n"
            "    (tmp / 'value.txt').write_text('new')\n")
    outcomes = []
    for n in range(1, 10):
        shutil.rmtree(final, ignore_errors=True)
        final.mkdir()
        (final / "value.txt").write_text("old")
        killed = kill_at(n, code) == -signal.SIGKILL
        recover(final)  # what the next run of the verb does first
        assert (final / "value.txt").read_text() in ("old", "new"), n
        assert sorted(p.name for p in tmp_path.iterdir()) == ["out"], n  # no backup, no temporary left
        outcomes.append((killed, (final / "value.txt").read_text()))
        if not killed:
            break
    assert outcomes[-1] == (False, "new") and ("old" in [v for _, v in outcomes]) and len(outcomes) >= 3


def test_mix_killed_at_every_rename_leaves_a_loadable_model_after_recovery(tiny_moe_dir, tiny_moe_mixed_dir, tmp_path):
    dst = tmp_path / "mixed"
    code = f"from lfm_mlx.cli import main\nmain(['mix', {str(tiny_moe_dir)!r}, {str(dst)!r}])\n"
    for n in range(1, 10):
        shutil.rmtree(dst, ignore_errors=True)
        shutil.copytree(tiny_moe_mixed_dir, dst)  # an earlier output to replace
        killed = kill_at(n, code) == -signal.SIGKILL
        assert cli("mix", tiny_moe_dir, dst).returncode == 0 or not killed  # the next run recovers and redoes it
        recover(dst)
        load(dst)  # complete and loadable at the final path
        assert not backup_of(dst).exists() and not list(tmp_path.glob(".mixed.tmp-*"))
        if not killed:
            break
    assert n >= 3  # the run crossed both renames of the replace


def test_stale_temporaries_of_killed_writes_are_removed_by_the_next_run(tiny_moe_dir, tmp_path):
    out = tmp_path / "model.gguf"
    stale_file = tmp_path / ".model.gguf.tmp-abc12345"
    stale_file.write_bytes(b"x" * 1000)
    result = cli("gguf", tiny_moe_dir, out)
    assert result.returncode == 0, result.stderr
    assert not stale_file.exists() and out.is_file()

    from lfm_mlx.fsutil import recover_directory

    run = tmp_path / "run"
    (run / "checkpoints" / ".ckpt-00000004-0000.tmp-x1y2z3_4").mkdir(parents=True)
    (run / ".metrics.jsonl.tmp-q1w2e3r4").write_text("{}")
    (run / ".group_start.safetensors.tmp-a1b2c3d4.safetensors").write_text("{}")
    (run / "checkpoints" / "ckpt-00000002-0000").mkdir()
    (run / "checkpoints" / ".ckpt-00000002-0000.lfm_mlx-old").mkdir()  # killed after the new one was renamed in
    (run / ".model.lfm_mlx-old").mkdir()  # killed between the renames of the final model's replace
    (run / ".notes.old").write_text("a user's own backup")  # not ours: left alone
    (run / ".draft.tmp-mine").write_text("a user's own temporary")
    for directory in (run, run / "checkpoints"):
        recover_directory(directory)
    assert sorted(p.name for p in run.iterdir()) == [".draft.tmp-mine", ".notes.old", "checkpoints", "model"]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["ckpt-00000002-0000"]


def test_the_next_train_run_removes_what_a_killed_one_left(tiny_moe_mixed_dir, tmp_path):
    from lfm_mlx.grouped import GroupedMoETrainer
    from tests.test_grouped import make_config, tool_rows

    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(json.dumps(row) + "\n" for row in tool_rows(16)))
    run = tmp_path / "run"
    stale = [run / "checkpoints" / ".ckpt-00000003-0000.tmp-k1ll3d00", run / ".metrics.jsonl.tmp-k1ll3d01",
             run / ".group_start.safetensors.tmp-k1ll3d02.safetensors"]
    stale[0].mkdir(parents=True)
    (stale[0] / "weights.safetensors").write_bytes(b"\0" * 4096)  # half a checkpoint
    for path in stale[1:]:
        path.write_text("partial")
    GroupedMoETrainer(make_config(tiny_moe_mixed_dir, rows, run)).train()
    assert not [path for path in stale if path.exists()]
    assert not [p.name for p in run.rglob(".*")]  # nothing dot-named left: no temporaries, no lock


# ---------------------------------------------------------------- a full disk


@pytest.fixture
def small_disk(tmp_path):
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {done.stderr.decode().strip()}")
    yield mount
    subprocess.run(["umount", str(mount)], check=True)


def test_a_full_disk_is_refused_before_writing_or_named_when_it_fills(tiny_moe_dir, small_disk):
    result = cli("mix", tiny_moe_dir, small_disk / "mixed")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert f"{small_disk / 'mixed'}: the mixed checkpoint needs" in result.stderr and "are free" in result.stderr
    assert list(small_disk.iterdir()) == []  # nothing half-written

    # MLX's own error names no path ("[write] Unable to write N bytes"); ours does.
    from lfm_mlx.errors import DiskFull

    target = small_disk / "big.safetensors"
    with pytest.raises(DiskFull, match=str(target)):
        with atomic_file(target, suffix=".safetensors") as tmp:
            mx.save_safetensors(str(tmp), {"w": mx.zeros((1 << 20,))})
    with pytest.raises(DiskFull, match=str(small_disk / "d")):
        with atomic_dir(small_disk / "d") as tmp:
            (tmp / "blob").write_bytes(b"\0" * (1 << 20))
    assert list(small_disk.iterdir()) == []


def test_a_training_run_on_a_full_disk_exits_2_naming_the_file(tiny_moe_mixed_dir, small_disk, tmp_path):
    from tests.test_grouped import make_config, tool_rows

    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(json.dumps(row) + "\n" for row in tool_rows(16)))
    config = make_config(tiny_moe_mixed_dir, rows, small_disk / "run")
    path = tmp_path / "train.yaml"
    path.write_text(yaml.safe_dump(config.model_dump(mode="json", exclude_unset=True)))
    result = cli("train", path)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert str(small_disk / "run") in result.stderr and ("are free" in result.stderr or "free now" in result.stderr)
    assert not [p for p in (small_disk / "run").rglob(".*") if ".tmp-" in p.name]  # no temporaries left


# ---------------------------------------------------------------- non-finite steps


def test_an_absurd_learning_rate_never_leaves_a_non_finite_tensor_and_resume_with_a_lower_one_works(
        tiny_moe_mixed_dir, tmp_path):
    from lfm_mlx.grouped import ConfigError, GroupedMoETrainer, NonFiniteStop
    from tests.test_grouped import make_config, tool_rows

    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(json.dumps(row) + "\n" for row in tool_rows(16)))
    path = tmp_path / "train.yaml"
    for bad in ("1e38", ".inf", ".nan"):  # the CLI refuses them before anything is written
        path.write_text(f"model: {tiny_moe_mixed_dir}\ndata: {rows}\nrun_dir: {tmp_path / 'cli-run'}\nlearning_rate: {bad}\n")
        result = cli("train", path)
        assert result.returncode == 2 and "learning_rate" in result.stderr and "Traceback" not in result.stderr
        assert not (tmp_path / "cli-run").exists()

    # The Python API can skip validation (model_copy): such steps are skipped, not applied, and the
    # stop message's advice (a lower rate, --allow-config-change learning_rate) resumes the run.
    good = make_config(tiny_moe_mixed_dir, rows, tmp_path / "run", max_consecutive_skips=2)
    for absurd in (1e38, math.inf):
        shutil.rmtree(tmp_path / "run", ignore_errors=True)
        with pytest.raises(NonFiniteStop, match="none was applied") as stop:
            GroupedMoETrainer(good.model_copy(update={"learning_rate": absurd})).train()
        assert "--set learning_rate=1e-05 --allow-config-change learning_rate" in str(stop.value)
        assert stop.value.step == 2 and non_finite_tensors(tmp_path / "run") == []
        with pytest.raises(ConfigError, match="--allow-config-change learning_rate"):
            GroupedMoETrainer(good).train()
        result = GroupedMoETrainer(good, allow_config_change=("learning_rate",)).train()
        summary = json.loads((tmp_path / "run" / "summary.json").read_text())
        assert summary["config_changes"][0]["changes"] == {"learning_rate": [absurd, good.learning_rate]}
        assert result.steps == 8 and result.skipped_steps == 2 and non_finite_tensors(tmp_path / "run") == []


def test_an_update_that_makes_the_weights_non_finite_is_undone_as_if_the_step_were_skipped(tiny_moe_mixed_dir,
                                                                                            tmp_path):
    """Steps 2 and 6 (one before any checkpoint, one after the first group's) go bad after their
    update; the run undoes them and ends bit-identical to one whose steps 2 and 6 were skipped."""
    from mlx.utils import tree_flatten, tree_map, tree_unflatten

    from lfm_mlx.grouped import GroupedMoETrainer
    from tests.test_grouped import make_config, read_metrics, tensors, tool_rows

    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(json.dumps(row) + "\n" for row in tool_rows(16)))
    bad = {1, 5}  # 0-based: metrics steps 2 and 6

    def skip(step, grads):  # a non-finite gradient: the step is never applied
        return tree_map(lambda g: g * float("nan"), grads) if step in bad else grads

    fired = set()

    def overflow(step, grads):  # the weights overflow after the update (once: a replay runs clean)
        if step in bad and step not in fired:
            fired.add(step)
            model = trainer.model
            name, value = tree_flatten(model.trainable_parameters())[0]
            model.update(tree_unflatten([(name, mx.full(value.shape, 1e30, value.dtype))]))
        return grads

    skipped = GroupedMoETrainer(make_config(tiny_moe_mixed_dir, rows, tmp_path / "skipped"), grad_hook=skip).train()
    trainer = GroupedMoETrainer(make_config(tiny_moe_mixed_dir, rows, tmp_path / "undone"), grad_hook=overflow)
    undone = trainer.train()
    assert fired == bad and undone.skipped_steps == skipped.skipped_steps == 2 and undone.steps == 8
    ours, theirs = tensors(undone.model_dir), tensors(skipped.model_dir)
    assert ours.keys() == theirs.keys() and all(mx.array_equal(ours[k], theirs[k]).item() for k in ours)
    metrics = [r for r in read_metrics(tmp_path / "undone") if r["kind"] in ("step", "skipped")]
    assert [r["step"] for r in metrics] == list(range(1, 9))  # the replay left no duplicate records
    assert [r["step"] for r in metrics if r["kind"] == "skipped"] == [2, 6]
    assert all("the step was undone" in r["reason"] for r in metrics if r["kind"] == "skipped")
    assert non_finite_tensors(tmp_path / "undone") == []


def test_weights_that_overflow_after_every_update_stop_with_exit_65_and_nothing_non_finite_written(
        tiny_moe_mixed_dir, tmp_path):
    from tests.test_grouped import make_config, tool_rows

    model = tmp_path / "model"
    shutil.copytree(tiny_moe_mixed_dir, model)
    weights_path = next(model.glob("*.safetensors"))
    weights = mx.load(str(weights_path))
    router = next(k for k in weights if k.endswith("feed_forward.gate.weight"))
    weights[router] = weights[router] * 1e21  # routing still works (sigmoid saturates); the squares overflow
    mx.save_safetensors(str(weights_path), weights, metadata={"format": "mlx"})
    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(json.dumps(row) + "\n" for row in tool_rows(16)))
    config = make_config(model, rows, tmp_path / "run", group_size=6, group_stride=6, max_consecutive_skips=3)
    path = tmp_path / "train.yaml"
    path.write_text(yaml.safe_dump(config.model_dump(mode="json", exclude_unset=True)))
    result = cli("train", path)
    assert result.returncode == 65 and "Traceback" not in result.stderr, result.stderr
    assert "stopped at step 3: 3 consecutive steps were skipped, the last because its update made the trained " \
           "weights non-finite" in result.stderr and "--allow-config-change learning_rate" in result.stderr
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["weight_norm"]) for r in records if r["kind"] == "skipped"] == [(1, "inf"), (2, "inf"),
                                                                                         (3, "inf")]
    assert not (tmp_path / "run" / "model").exists() and non_finite_tensors(tmp_path / "run") == []


def nan_model(source: Path, target: Path) -> Path:
    """A copy of `source` whose final norm holds a NaN: every loss is NaN."""
    shutil.copytree(source, target)
    weights_path = next(target.glob("*.safetensors"))
    weights = mx.load(str(weights_path))
    norm = weights["model.embedding_norm.weight"]
    weights["model.embedding_norm.weight"] = mx.where(mx.arange(norm.size) == 0, mx.nan, norm).astype(norm.dtype)
    mx.save_safetensors(str(weights_path), weights, metadata={"format": "mlx"})
    return target


def test_a_loss_that_goes_nan_stops_with_only_finite_tensors_written(tiny_moe_mixed_dir, tmp_path):
    from lfm_mlx import lora
    from tests.test_grouped import make_config, tool_rows

    model = nan_model(tiny_moe_mixed_dir, tmp_path / "nan-model")
    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(json.dumps(row) + "\n" for row in tool_rows(16)))
    path = tmp_path / "train.yaml"
    config = make_config(model, rows, tmp_path / "run", max_consecutive_skips=2)
    path.write_text(yaml.safe_dump(config.model_dump(mode="json", exclude_unset=True)))
    result = cli("train", path)
    assert result.returncode == 65 and "2 consecutive steps" in result.stderr, result.stderr
    assert non_finite_tensors(tmp_path / "run") == []

    config = lora.LoraConfig(model=str(model), data=str(rows), out_dir=str(tmp_path / "lora"), rank=4, max_steps=6,
                             eval_every=100, save_every=100, progress=False, splits=[0.75, 0.25, 0.0])
    with pytest.raises(lora.NonFiniteStop, match="3 consecutive steps"):
        lora.train_lora(config)
    assert non_finite_tensors(tmp_path / "lora") == []
    rows_logged = [json.loads(line) for line in (tmp_path / "lora" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows_logged if "skipped" in r] == [1, 2, 3]


# ---------------------------------------------------------------- adapters and their base


def test_adapters_are_refused_on_another_base(tiny_moe_dir, tiny_moe_mixed_dir, tmp_path):
    from lfm_mlx import lora
    from lfm_mlx.model.synthetic import write_synthetic_model
    from tests.test_grouped import tool_rows

    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(json.dumps(row) + "\n" for row in tool_rows(8)))
    out = tmp_path / "adapters"
    config = lora.LoraConfig(model=str(tiny_moe_mixed_dir), data=str(rows), out_dir=str(out), rank=4, max_steps=2,
                             eval_every=100, save_every=1, progress=False, splits=[0.75, 0.25, 0.0], modules=["attention"])
    lora.train_lora(config)
    recorded = json.loads((out / "adapter_config.json").read_text())["lfm_mlx"]["base_fingerprint"]
    assert recorded == base_fingerprint(tiny_moe_mixed_dir)

    other = tmp_path / "other-mixed"  # same architecture, other weights
    from lfm_mlx.mixed import mix

    mix(write_synthetic_model(tmp_path / "other", "tiny-moe", seed=1), other)
    assert base_fingerprint(other) != recorded
    result = cli("fuse", "--model", other, "--adapter-path", out, "--save-path", tmp_path / "fused", "--rows", rows)
    assert result.returncode == 2 and "trained on another base" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "fused").exists()


def test_lora_resume_refuses_a_base_changed_in_place(tiny_moe_mixed_dir, tmp_path):
    from lfm_mlx import lora
    from tests.test_grouped import tool_rows

    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(json.dumps(row) + "\n" for row in tool_rows(8)))
    base = tmp_path / "base"
    shutil.copytree(tiny_moe_mixed_dir, base)
    config = lora.LoraConfig(model=str(base), data=str(rows), out_dir=str(tmp_path / "adapters"), rank=4, max_steps=2,
                             eval_every=100, save_every=1, progress=False, splits=[0.75, 0.25, 0.0], modules=["attention"])
    lora.train_lora(config)
    weights = next(base.glob("*.safetensors"))
    arrays = mx.load(str(weights))
    name = next(k for k in arrays if k.endswith("q_proj.weight"))
    arrays[name] = arrays[name] * 1.5  # the same path, retrained in place
    mx.save_safetensors(str(weights), arrays, metadata={"format": "mlx"})
    with pytest.raises(ValueError, match="is not the base"):
        lora.train_lora(dataclasses.replace(config, max_steps=3))

"""Data-parallel LoRA and grouped training over mx.distributed: real two-process jobs started by
`mlx.launch -n 2 --backend ring` on 127.0.0.1 (CPU), no mocks. Two ranks with batch 1 train what one
process with batch 2 does, rank 0 alone writes, a job killed (SIGKILL of a rank: rank 1 of LoRA,
rank 0 of grouped) or stopped (grouped: one rank's memory hard stop stops both) resumes
bit-identically, a second launch on a busy run dir and a resume on another world size are refused."""

from __future__ import annotations

import json
import os
import random
import socket
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from lfm_mlx import lora
from lfm_mlx.fsutil import locked
from lfm_mlx.train import distributed

ROOT = Path(__file__).resolve().parents[1]
LAUNCH = Path(sys.executable).parent / "mlx.launch"
JOB = Path(__file__).with_name("distributed_job.py")
CONFIG = dict(rank=4, learning_rate=1e-3, epochs=1, eval_every=4, save_every=2, lr_schedule="constant",
              modules=["attention", "conv", "experts"], progress=False)


def free_port_pair() -> int:
    """A port p with p and p + 1 free (the ring backend listens on one port per rank)."""
    while True:
        port = random.randint(20000, 60000)
        try:
            for p in (port, port + 1):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", p))
            return port
        except OSError:
            continue


def launch(*command: str, cwd: Path) -> subprocess.CompletedProcess:
    """Two ranks under mlx.launch (which exits 0 even when a rank fails: callers read the output)."""
    env = {**os.environ, "OPENBLAS_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.run([str(LAUNCH), "-n", "2", "--backend", "ring", "--starting-port", str(free_port_pair()),
                           "--", sys.executable, *command], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300)


def run_job(workdir: Path, values: dict, **options: tuple[int, int]) -> subprocess.CompletedProcess:
    """tests/distributed_job.py on two ranks; options kill=(rank, step), stop=(rank, readings)."""
    config = workdir.with_suffix(".json")
    config.write_text(json.dumps(values))
    return launch(str(JOB), str(workdir), str(config), *(f"{k}={r}:{n}" for k, (r, n) in options.items()),
                  cwd=workdir.parent)


def max_relative_difference(a: dict, b: dict) -> float:
    """Largest |a - b| over each tensor's largest |a|, across the tensors."""
    assert a.keys() == b.keys()
    return max(float(np.abs(np.array(a[k]) - np.array(b[k])).max() / max(np.abs(np.array(a[k])).max(), 1e-30))
               for k in a)


def losses(run: Path) -> list[float]:
    return [row["train_loss"] for row in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
            if "train_loss" in row]


@pytest.fixture(scope="module")
def rows(tmp_path_factory) -> Path:
    from test_lora import write_repair_set

    return write_repair_set(tmp_path_factory.mktemp("dist-rows") / "rows", n_train=16, n_valid=4, n_test=4)


def test_shards_cover_each_global_batch_in_order():
    for size in (1, 2, 3, 4):
        for n in range(0, 9):
            items = list(range(n))
            shards = [distributed.World(size=size, rank=r).shard(items) for r in range(size)]
            assert sum(shards, []) == items and max(map(len, shards)) - min(map(len, shards)) <= 1


def test_cost_model_is_computed_from_the_bytes():
    line = distributed.cost_model(int(1.41e9) * 2, 2, "group 4 (1.41B bf16 gradients)")
    assert "2,820.0 MB" in line and "2.26 s at 10 Gb/s" in line and "564.0 ms at 40 Gb/s" in line
    assert "4,230.0 MB per rank" in distributed.cost_model(int(2.82e9), 4, "x")  # 2(N-1)/N of the payload


def test_two_ranks_train_what_one_process_does_and_resume_after_a_kill(tiny_moe_mixed_dir, rows, tmp_path, capsys):
    values = dict(CONFIG, model=str(tiny_moe_mixed_dir), data=str(rows), out_dir="out", batch_size=1)
    two = run_job(tmp_path / "two", {**values, "progress": True})  # progress is not a run identity key
    assert "rank 0 summary" in two.stdout and "rank 1 summary" in two.stdout, two.stdout + two.stderr
    assert "all-reduce per step" in two.stderr and "at 80 Gb/s" in two.stderr
    run = tmp_path / "two" / "rank0" / "out"
    assert not any((tmp_path / "two" / "rank1").iterdir())  # rank 1 wrote nothing, not even a lock

    one = tmp_path / "one"
    lora.train_lora(lora.config_from_dict({**values, "out_dir": str(one), "batch_size": 2}))
    a, b = losses(one), losses(run)
    assert len(a) == len(b) == 8 and np.allclose(a, b, rtol=1e-5, atol=0)
    # Same examples per step; the sums differ only in order and padding width, so not bit for bit.
    difference = max_relative_difference(mx.load(str(one / "checkpoint" / "adapters.safetensors")),
                                         mx.load(str(run / "checkpoint" / "adapters.safetensors")))
    print(f"1 x batch 2 vs 2 ranks x batch 1: adapters differ by at most {difference:.2e} (relative)")
    assert difference < 1e-3
    row = json.loads((run / "metrics.jsonl").read_text().splitlines()[1])
    assert row["allreduce_bytes"] == 4 * sum(v.size for v in mx.load(str(run / "adapters.safetensors")).values())

    # SIGKILL rank 1 at step 3 (the last checkpoint is step 2), launch again: the same weights, bit for bit.
    killed = run_job(tmp_path / "killed", values, kill=(1, 3))
    assert "rank 0 summary" not in killed.stdout
    resumed = run_job(tmp_path / "killed", values)
    assert "rank 0 summary" in resumed.stdout, resumed.stdout + resumed.stderr
    again = tmp_path / "killed" / "rank0" / "out"
    for name in ("adapters.safetensors", "optimizer.safetensors"):
        x, y = mx.load(str(run / "checkpoint" / name)), mx.load(str(again / "checkpoint" / name))
        assert x.keys() == y.keys() and all(mx.array_equal(x[k], y[k]).item() for k in x), name
    assert [json.loads(r)["step"] for r in (again / "metrics.jsonl").read_text().splitlines() if "train_loss" in r] \
        == list(range(1, 9))
    assert not any((tmp_path / "killed" / "rank1").iterdir())

    # The same run dir on one process: refused, with the count to launch.
    code = lora.main(["--model", str(tiny_moe_mixed_dir), "--data", str(rows), "--out-dir", str(run),
                      *sum(([f"--{k.replace('_', '-')}", json.dumps(v)] for k, v in CONFIG.items()), [])])
    assert code == 2 and "was trained by 2 process(es) and this launch has 1" in capsys.readouterr().err


def test_a_busy_run_dir_stops_every_rank(tiny_moe_mixed_dir, rows, tmp_path, capsys):
    out = tmp_path / "busy"
    config = tmp_path / "lora.yaml"
    config.write_text(json.dumps(dict(CONFIG, model=str(tiny_moe_mixed_dir), data=str(rows), out_dir=str(out))))
    with locked(out):  # another job holds it
        result = launch("-m", "lfm_mlx", "lora", str(config), cwd=tmp_path)
    output = result.stdout + result.stderr
    assert "is in use by another lfm-mlx process" in output, output
    assert "rank 0 of 2 stopped" in output  # rank 1 stops with it instead of waiting in a collective
    assert "Traceback" not in output and "summary" not in output


def test_grouped_two_ranks_train_what_one_process_does_a_hard_stop_stops_both_and_a_kill_resumes(
        tiny_moe_mixed_dir, rows, tmp_path):
    from lfm_mlx.grouped import ConfigError, GroupedMoETrainer, TrainConfig

    values = dict(model=str(tiny_moe_mixed_dir), data=[str(rows / "train.jsonl")], run_dir="run", group_size=3,
                  group_stride=3, epochs=1, steps_per_group=3, batch_size=1, learning_rate=3e-3, warmup_steps=1,
                  splits=[1.0, 0.0, 0.0], frozen_path="qmm", eval_each_group=False, progress=True, checkpoint_every=2)
    straight = run_job(tmp_path / "two", values)
    assert "rank 0 trained 6 steps" in straight.stdout, straight.stdout + straight.stderr
    assert "all-reduce per step: group 0's gradients" in straight.stderr
    run = tmp_path / "two" / "rank0" / "run"
    assert not any((tmp_path / "two" / "rank1").iterdir())

    one = tmp_path / "one"
    GroupedMoETrainer(TrainConfig(**{**values, "run_dir": str(one), "batch_size": 2, "progress": False})).train()
    a, b = ([r["loss"] for r in map(json.loads, (d / "metrics.jsonl").read_text().splitlines()) if r["kind"] == "step"]
            for d in (one, run))
    assert len(a) == len(b) == 6 and np.allclose(a, b, rtol=1e-4, atol=0)
    # The float32 masters agree to ~1e-5; stored as int8 experts (bf16 scales, routers), a value near a
    # rounding boundary lands one code or one bf16 step apart: measured 0.6% of the codes, 1.3e-3 relative.
    x, y = (mx.load(str(d / "model" / "model.safetensors")) for d in (one, run))
    codes = [k for k in x if x[k].dtype == mx.uint32]
    assert sum((x[k] != y[k]).sum().item() for k in codes) < 0.02 * sum(x[k].size for k in codes)
    assert max(mx.abs(x[k].astype(mx.float32) - y[k].astype(mx.float32)).max().item()
               / max(mx.abs(x[k].astype(mx.float32)).max().item(), 1e-30) for k in x if k not in codes) < 2e-2

    # Rank 1's memory reader reports 1 PB from its 4th reading: both ranks stop after one checkpoint,
    # and the next launch resumes to the uninterrupted run's weights, bit for bit.
    stopped = run_job(tmp_path / "stopped", values, stop=(1, 3))
    assert "MemoryHardStop: memory hard stop at step 4" in stopped.stderr, stopped.stdout + stopped.stderr
    assert "PeerMemoryStop: memory hard stop at step 4 on rank 1 of 2" in stopped.stderr
    again = tmp_path / "stopped" / "rank0" / "run"
    assert (again / "checkpoints" / "ckpt-00000004-0001").is_dir() and not (again / "model").exists()
    with pytest.raises(ConfigError, match=r"written by a job of 2 process\(es\) and this launch has 1"):
        GroupedMoETrainer(TrainConfig(**{**values, "run_dir": str(again), "progress": False})).train()
    resumed = run_job(tmp_path / "stopped", values)
    assert "rank 0 trained 6 steps" in resumed.stdout, resumed.stdout + resumed.stderr
    assert (again / "model" / "model.safetensors").read_bytes() == (run / "model" / "model.safetensors").read_bytes()
    assert not any((tmp_path / "stopped" / "rank1").iterdir())

    # SIGKILL rank 0 (the lock holder and writer) at step 5, the newest checkpoint step 4 (mid group 1);
    # the same launch again resumes to the uninterrupted run's weights, bit for bit.
    killed = run_job(tmp_path / "killed", values, kill=(0, 5))
    assert "trained" not in killed.stdout, killed.stdout + killed.stderr
    again = tmp_path / "killed" / "rank0" / "run"
    assert [c.name for c in sorted((again / "checkpoints").iterdir())][-1] == "ckpt-00000004-0001"
    resumed = run_job(tmp_path / "killed", values)
    assert "rank 0 trained 6 steps" in resumed.stdout, resumed.stdout + resumed.stderr
    assert (again / "model" / "model.safetensors").read_bytes() == (run / "model" / "model.safetensors").read_bytes()
    assert [r["step"] for r in map(json.loads, (again / "metrics.jsonl").read_text().splitlines())
            if r["kind"] == "step"] == list(range(1, 7))
    assert not any((tmp_path / "killed" / "rank1").iterdir())

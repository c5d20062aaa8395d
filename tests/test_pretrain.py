"""lfm_mlx.demo.pretrain: a short run lowers the loss, writes a directory both loaders open, is cached and reproducible."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import asdict

import mlx.core as mx
import mlx_lm
import numpy as np
import pytest

from lfm_mlx.demo import pretrain as pt
from lfm_mlx.model.io import load

TINY = dict(steps=12, batch_size=2, rows=48, warmup_steps=2, seed=0)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    out = tmp_path_factory.mktemp("pretrain") / "base"
    report = pt.pretrain(out, pt.PretrainConfig(**TINY), progress=False)
    return out, report


def test_loss_goes_down(base):
    _, report = base
    losses = [entry["loss"] for entry in report["log"]]
    assert len(losses) == TINY["steps"] and all(np.isfinite(losses))
    # From about ln(vocab) at the fresh init to clearly lower within a dozen steps.
    assert np.mean(losses[-3:]) < 0.8 * np.mean(losses[:3])
    assert report["loss_last"] < report["loss_first"]


def test_directory_opens_with_lfm_mlx_and_mlx_lm(base):
    out, report = base
    saved = json.loads((out / "pretrain.json").read_text())
    assert saved["key"] == report["key"] == pt.PretrainConfig(**TINY).key()
    weights = mx.load(str(out / "model.safetensors"))
    assert {v.dtype for k, v in weights.items() if not k.endswith("expert_bias")} == {mx.bfloat16}
    assert all(v.dtype == mx.float32 for k, v in weights.items() if k.endswith("expert_bias"))
    assert json.loads((out / "tokenizer_config.json").read_text())["tool_parser_type"] == "pythonic"

    ours, tokenizer = load(out)
    theirs, their_tokenizer = mlx_lm.load(str(out))
    theirs.set_dtype(mx.float32)  # mlx_lm keeps the stored bf16, and gather_mm is float32-only on CPU
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "play some music"}], add_generation_prompt=True)
    assert ids == their_tokenizer.apply_chat_template([{"role": "user", "content": "play some music"}],
                                                      add_generation_prompt=True)
    ours_logits = ours(mx.array([ids]))[0, -1].astype(mx.float32)
    theirs_logits = theirs(mx.array([ids]))[0, -1].astype(mx.float32)
    assert mx.allclose(ours_logits, theirs_logits, atol=0.05, rtol=0.05)
    text = mlx_lm.generate(theirs, their_tokenizer, ids, max_tokens=8)
    assert isinstance(text, str)


def test_same_settings_give_the_same_weights(base, tmp_path):
    out, report = base
    again = pt.pretrain(tmp_path / "again", pt.PretrainConfig(**TINY), progress=False)
    assert [e["loss"] for e in again["log"]] == [e["loss"] for e in report["log"]]
    first, second = mx.load(str(out / "model.safetensors")), mx.load(str(tmp_path / "again" / "model.safetensors"))
    assert first.keys() == second.keys()
    assert all(mx.array_equal(first[k], second[k]).item() for k in first)


def test_cache_is_reused_and_keyed_by_settings(tmp_path):
    config = pt.PretrainConfig(steps=2, batch_size=2, rows=8)
    path = pt.cached_base(tmp_path, config, progress=False)
    assert path.name == f"base-{config.key()}"
    stamp = (path / "model.safetensors").stat().st_mtime_ns
    assert pt.cached_base(tmp_path, config, progress=False) == path
    assert (path / "model.safetensors").stat().st_mtime_ns == stamp  # reused, not retrained
    other = pt.PretrainConfig(steps=2, batch_size=2, rows=8, seed=1)
    assert other.key() != config.key()
    assert pt.main(["--cache-dir", str(tmp_path), "--steps", "2", "--batch-size", "2", "--rows", "8"]) == 0
    assert (path / "model.safetensors").stat().st_mtime_ns == stamp  # the CLI finds the same cache entry


def test_quiet_prints_only_the_final_line(tmp_path, capsys):
    capsys.readouterr()
    assert pt.main(["--out", str(tmp_path / "q"), "--steps", "2", "--batch-size", "2", "--rows", "8", "--quiet"]) == 0
    out, err = capsys.readouterr()
    assert err == "" and out.startswith(f"base: {tmp_path / 'q'} ") and len(out.splitlines()) == 1


@pytest.mark.parametrize("module", ["lfm_mlx.pretrain", "lfm_mlx.demo.pretrain"])
def test_the_recorded_command_and_the_moved_module_both_run(module):
    """`python -m lfm_mlx.pretrain` (README and the shipped base's pretrain.json) is a shim over lfm_mlx.demo.pretrain."""
    done = subprocess.run([sys.executable, "-W", "error::RuntimeWarning", "-m", module, "--help"],
                          capture_output=True, text=True)
    assert done.returncode == 0 and "--quiet" in done.stdout and "--loss-on" in done.stdout, done.stderr


def test_bad_settings_fail_before_training(tmp_path):
    config = pt.PretrainConfig(steps=0, loss_on="prompt", preset="tiny-dense")
    problems = config.problems()
    assert any("steps=0" in p for p in problems)
    assert any("loss_on='prompt'" in p for p in problems)
    assert any("not an LFM2-MoE preset" in p for p in problems)
    with pytest.raises(ValueError, match="invalid pretrain settings"):
        pt.pretrain(tmp_path / "never", config, progress=False)
    assert not (tmp_path / "never").exists()


def test_the_shipped_demo_base_is_the_one_its_command_makes_and_loads_in_mlx_lm():
    from mlx_lm import load as mlx_lm_load

    path = pt.shipped_base()
    report = json.loads((path / pt.REPORT_NAME).read_text())
    assert report["settings"] == asdict(pt.SHIPPED_CONFIG)
    assert report["command"] == pt.command(pt.SHIPPED_CONFIG, "DIR") and "--loss-on assistant" in report["command"]
    model, tokenizer = mlx_lm_load(str(path))
    assert len(model.layers) == 6 and tokenizer.encode("open acorn.io")


def test_a_damaged_shipped_base_fails_with_the_command_that_rebuilds_it(tmp_path, monkeypatch):
    import shutil

    damaged = tmp_path / "demo-moe"
    shutil.copytree(pt.SHIPPED_BASE, damaged)
    (damaged / pt.REPORT_NAME).write_text("{not json")
    monkeypatch.setattr(pt, "SHIPPED_BASE", damaged)
    with pytest.raises(FileNotFoundError, match="python -m lfm_mlx.pretrain --out .*--loss-on assistant"):
        pt.shipped_base()


# The first 2,000 rows of the pre-training surface as the shipped base's recipe (RECIPE_VERSION 5) drew them.
SHIPPED_ROWS_SHA256 = "dd6f5b8526d3954e"


def test_the_pre_training_surface_still_draws_the_shipped_base_rows():
    """The shipped base is reproducible from its command only while the pre-training rows stay the same:
    a change to the pretrain surface (its intents, wrappers, fillers, or the draws) needs a new
    RECIPE_VERSION and a rebuilt base, not a silent drift."""
    import hashlib

    from lfm_mlx.demo.task import generate_rows

    rows = generate_rows(2000, pt.SHIPPED_CONFIG.seed, "pretrain", pt.SHIPPED_CONFIG.tools_per_row)
    digest = hashlib.sha256(json.dumps(rows, sort_keys=True).encode()).hexdigest()[:16]
    assert (pt.RECIPE_VERSION, digest) == (5, SHIPPED_ROWS_SHA256), (
        "the pre-training rows changed: bump RECIPE_VERSION, rebuild the shipped base with "
        f"{pt.command(pt.SHIPPED_CONFIG, str(pt.SHIPPED_BASE))}, then update SHIPPED_ROWS_SHA256")


def test_encoding_in_forked_workers_gives_the_same_examples(monkeypatch):
    """The GPU machine encodes pre-training rows in forked workers; they must be the serial encoding."""
    from lfm_mlx.demo.task import generate_rows
    from mlx_lm.utils import load_tokenizer

    tokenizer = load_tokenizer(pt.SHIPPED_BASE)
    rows = generate_rows(240, 0, "pretrain", 2)
    serial = pt.encode_rows(rows, tokenizer)
    monkeypatch.setattr(pt.os, "cpu_count", lambda: 4)
    monkeypatch.setattr(pt.sys, "platform", "linux")
    forked = pt.encode_rows(rows, tokenizer, chunk=20)
    assert [(e.ids, e.mask) for e in forked] == [(e.ids, e.mask) for e in serial]

"""Mixed checkpoints: exactly int8 experts, bf16 routers and float32 expert_bias, through mlx_lm.load."""

from __future__ import annotations

import json
import subprocess
import sys

import mlx.core as mx
import mlx.nn as nn
import mlx_lm
import numpy as np
import pytest
from mlx_lm.models.switch_layers import QuantizedSwitchLinear

from lfm_mlx.model import io as models
from lfm_mlx.mixed import mix, size_report

TOKENS = [1, 6, 300, 512, 77, 901, 14, 15, 640, 7, 6, 222, 333, 444, 555, 666, 777, 888, 999, 20]


def test_mlx_lm_load_rebuilds_the_exact_mix(tiny_moe_mixed_dir):
    model, _ = mlx_lm.load(str(tiny_moe_mixed_dir))
    config = json.loads((tiny_moe_mixed_dir / "config.json").read_text())
    for i, layer in enumerate(model.model.layers):
        ff = layer.feed_forward
        if i < config["num_dense_layers"]:
            assert isinstance(ff.gate_proj, nn.Linear)
            assert ff.gate_proj.weight.dtype == mx.bfloat16
            continue
        for proj in (ff.switch_mlp.gate_proj, ff.switch_mlp.up_proj, ff.switch_mlp.down_proj):
            assert isinstance(proj, QuantizedSwitchLinear)
            assert (proj.bits, proj.group_size, proj.mode) == (8, 64, "affine")
        assert type(ff.gate) is nn.Linear and ff.gate.weight.dtype == mx.bfloat16
        assert ff.expert_bias.dtype == mx.float32
    assert model.model.embed_tokens.weight.dtype == mx.bfloat16


def test_mlx_lm_and_lfm_mlx_give_the_same_logits(tiny_moe_mixed_dir):
    theirs, _ = mlx_lm.load(str(tiny_moe_mixed_dir))
    ours, _ = models.load(tiny_moe_mixed_dir, dtype=mx.bfloat16)
    tokens = mx.array([TOKENS])
    assert mx.array_equal(theirs(tokens), ours(tokens)).item()


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def _kl_and_top1(reference_dir, candidate_dir, prompts):
    reference, _ = models.load(reference_dir, dtype=mx.float32)
    candidate, _ = models.load(candidate_dir, dtype=mx.float32)
    p = _log_softmax(np.array(reference(prompts)))
    q = _log_softmax(np.array(candidate(prompts)))
    kl = (np.exp(p) * (p - q)).sum(-1)
    return kl, (p.argmax(-1) == q.argmax(-1)).mean()


def test_int8_next_token_distribution_stays_close_to_bf16(tiny_moe_dir, tiny_moe_mixed_dir, tmp_path):
    # Both in float32 compute, so the only difference is the rounding of the experts.
    prompts = mx.array(np.random.default_rng(0).integers(14, 1024, size=(8, 48)).tolist())
    kl8, top1_8 = _kl_and_top1(tiny_moe_dir, tiny_moe_mixed_dir, prompts)
    mix(tiny_moe_dir, tmp_path / "int4", bits=4)
    kl4, top1_4 = _kl_and_top1(tiny_moe_dir, tmp_path / "int4", prompts)
    print(f"int8: KL mean {kl8.mean():.2e} median {np.median(kl8):.2e} top-1 {top1_8:.3f}; "
          f"int4: KL mean {kl4.mean():.2e} median {np.median(kl4):.2e} top-1 {top1_4:.3f}")
    # Measured on this seed: int8 median 6e-4, mean 3e-2 (top-1 0.94); int4 median 0.14, mean 0.29.
    # Affine int8 in groups of 64 errs by at most range/510 per weight, which moves logits by
    # ~1e-2: a typical position's KL is ~1e-3 or less (the median bound, 3x margin). Top-k
    # routing is discontinuous and a random router leaves many tokens near a tie, so a few
    # positions switch experts and carry most of the mean; the mean bound allows for them.
    # The 4-bit mix must be clearly worse, or the measurement would not discriminate at all.
    assert np.median(kl8) < 2e-3
    assert kl8.mean() < 0.1
    assert top1_8 >= 0.9
    assert kl4.mean() > 5 * kl8.mean() and np.median(kl4) > 50 * np.median(kl8)


def test_size_report_categories(tiny_moe_mixed_dir, tiny_moe_dir):
    report = size_report(tiny_moe_mixed_dir)
    on_disk = sum(p.stat().st_size for p in tiny_moe_mixed_dir.glob("*.safetensors"))
    assert 0 < report["total_bytes"] <= on_disk
    assert sum(row["bytes"] for row in report["categories"].values()) == report["total_bytes"]
    assert abs(sum(row["share"] for row in report["categories"].values()) - 1) < 1e-9
    bf16 = size_report(tiny_moe_dir)
    # int8 + bf16 scales/biases per 64 weights: 8.5 bits against 16.
    ratio = report["categories"]["experts"]["bytes"] / bf16["categories"]["experts"]["bytes"]
    assert abs(ratio - 8.5 / 16) < 1e-6
    assert report["categories"]["routers"]["bytes"] == bf16["categories"]["routers"]["bytes"]


def test_mix_refuses_a_dense_model_and_leaves_nothing(tiny_dense_dir, tmp_path):
    with pytest.raises(ValueError, match="has no experts"):
        mix(tiny_dense_dir, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert not list(tmp_path.glob(".out.tmp-*"))


def test_failed_mix_keeps_the_previous_output(tiny_moe_mixed_dir, tmp_path, monkeypatch):
    import lfm_mlx.mixed as mixed_module

    out = tmp_path / "out"
    mix(tiny_moe_mixed_dir.parent / "tiny-moe", out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def explode(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(mixed_module, "save_model_dir", explode)
    with pytest.raises(OSError):
        mix(tiny_moe_mixed_dir.parent / "tiny-moe", out)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_cli_mix_prints_the_size_report(tiny_moe_dir, tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "lfm_mlx", "mix", str(tiny_moe_dir), str(tmp_path / "m"), "--json", str(tmp_path / "r.json")],
        capture_output=True, text=True, check=True,
    )
    assert "experts" in result.stdout and "routers" in result.stdout
    assert json.loads((tmp_path / "r.json").read_text())["total_bytes"] > 0


@pytest.mark.parametrize("where", ["same", "inside"])
def test_mix_never_writes_over_or_into_its_source(tiny_moe_dir, tmp_path, capsys, where):
    """`lfm-mlx mix SRC SRC` once replaced the bf16 source with the int8 output: now exit 2, source intact."""
    import shutil

    from lfm_mlx.mixed import main

    src = tmp_path / "src"
    shutil.copytree(tiny_moe_dir, src)
    before = {p.name: p.read_bytes() for p in src.iterdir() if p.is_file()}
    dst = src if where == "same" else src / "mixed"
    assert main([str(src), str(dst)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("lfm-mlx mix: ") and str(src) in err and "Traceback" not in err
    assert {p.name: p.read_bytes() for p in src.iterdir() if p.is_file()} == before
    assert not (src / "mixed").exists()

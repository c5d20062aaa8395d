"""Fusion: mlx-lm's merge math, storage by scope, the fidelity gate (a real LoRA passes at 8 bits and
trips at 4), delta survival (the seed-004 failure), and fused directories that mlx_lm loads and serves."""

from __future__ import annotations

import json
import shutil
import urllib.request
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import mlx_lm
import numpy as np
import pytest
from mlx_lm.models.switch_layers import QuantizedSwitchLinear, SwitchLinear
from mlx_lm.tuner.lora import LoRALinear, LoRASwitchLinear

from lfm_mlx import fuse as F
from lfm_mlx import lora
from lfm_mlx.model import io as models
from tests.test_lora import TOOLS, make_rows, small_config, write_repair_set
from tests.test_server_eval import mlx_lm_server

TOKENS = [1, 6, 300, 512, 77, 901, 14, 15, 640, 7, 6, 222, 333, 444]


@pytest.fixture(scope="module")
def repair_set(tmp_path_factory) -> Path:
    return write_repair_set(tmp_path_factory.mktemp("fuse_rows") / "set", n_train=24, n_valid=6, n_test=16)


@pytest.fixture(scope="module")
def adapters(tiny_moe_mixed_dir, repair_set, tmp_path_factory) -> Path:
    """A real LoRA on the int8 experts: 24 steps, small next to the weights (||dW|| / ||W|| ~ 0.08)."""
    out = tmp_path_factory.mktemp("fuse_lora") / "adapters"
    config = small_config(tiny_moe_mixed_dir, repair_set, out, modules=["experts"], rank=8, learning_rate=5e-4,
                          epochs=2, max_steps=24, eval_every=100, save_every=100)
    lora.train_lora(config)
    return out


# ---------------------------------------------------------------- merge math


def test_delta_reproduces_the_lora_forward_pass():
    mx.random.seed(3)
    linear = LoRALinear.from_base(nn.Linear(32, 16, bias=False), r=4, scale=1.5)
    linear.lora_b = mx.random.normal(linear.lora_b.shape)
    x = mx.random.normal((5, 32))
    delta = F.lora_delta(linear)
    assert mx.allclose(x @ (linear.linear.weight + delta).T, linear(x), atol=1e-4).item()
    assert mx.allclose(delta, linear.fuse(dequantize=True).weight - linear.linear.weight, atol=1e-5).item()

    switch = LoRASwitchLinear.from_base(SwitchLinear(32, 16, 4, bias=False), r=4, scale=0.5)
    switch.lora_b = mx.random.normal(switch.lora_b.shape)
    indices = mx.array([[0, 3], [2, 1]])
    xs = mx.random.normal((2, 1, 1, 32))
    fused = SwitchLinear(32, 16, 4, bias=False)
    fused.weight = switch.linear.weight + F.lora_delta(switch)
    assert mx.allclose(fused(xs, indices), switch(xs, indices), atol=1e-4).item()


def test_delta_survival_catches_requantizing_onto_the_same_grid():
    """Seed 004: a 4-bit base plus a small delta, stored at 4 bits again, snaps back to the base."""
    rng = np.random.default_rng(0)
    weight = mx.array(rng.normal(0, 0.05, (64, 256)).astype(np.float32))
    base = nn.Linear(256, 64, bias=False)
    base.weight = weight
    base4 = base.to_quantized(group_size=64, bits=4)
    w4 = F.dense_weight(base4)
    delta = mx.array((0.05 * 0.005 * rng.normal(size=(64, 4)) @ rng.normal(size=(4, 256))).astype(np.float32))

    def survival(params):
        fused = F.dense_weight(F.store(base4, w4 + delta, params))
        stored_base = w4 if params == F.quant_params(base4) else F.dense_weight(F.store(base4, w4, params))
        return F.delta_survival(w4, delta, stored_base, fused)

    p4, p8 = ({"group_size": 64, "bits": b, "mode": "affine"} for b in (4, 8))
    assert survival(p4)["survival"] < 0.5
    assert survival(p8)["survival"] > 0.8
    assert survival(None)["survival"] > 0.95  # bf16
    assert survival(p8)["delta_rel"] == pytest.approx(float(mx.linalg.norm(delta) / mx.linalg.norm(w4)), rel=1e-3)


# ---------------------------------------------------------------- the gate on a real LoRA


def test_real_lora_fused_at_8_bits_passes_and_at_4_bits_is_refused(tiny_moe_mixed_dir, adapters, repair_set,
                                                                   tmp_path, capsys):
    fused8 = tmp_path / "fused8"
    report = F.fuse(tiny_moe_mixed_dir, adapters, fused8, bits=8, rows=repair_set, progress=False)
    assert report["passed"] and not report["reasons"]
    assert report["adapter_vs_fused"]["decisive_top1_agreement"] >= 0.95
    assert report["survival"]["min"] > 0.9 and len(report["layers"]) == 18  # 6 MoE layers x 3 projections
    assert report["fine_tune_kept"] > 0.95  # KL to the adapter model is a sliver of the base's
    assert json.loads((fused8 / "fidelity.json").read_text())["passed"]

    fused4 = tmp_path / "fused4"
    code = F.main(["--model", str(tiny_moe_mixed_dir), "--adapter-path", str(adapters), "--save-path", str(fused4),
                   "--bits", "4", "--rows", str(repair_set)])
    err = capsys.readouterr().err
    assert code == 1
    assert "refusing to write" in err and "top-1 agreement" in err and "--force" in err
    assert not fused4.exists()
    refused = json.loads((tmp_path / "fused4.refused.json").read_text())
    assert not refused["passed"] and refused["adapter_vs_fused"]["decisive_top1_agreement"] < 0.95
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fused4.refused.json", "fused8"]  # no temporaries

    forced = F.fuse(tiny_moe_mixed_dir, adapters, fused4, bits=4, rows=repair_set, force=True, progress=False)
    assert forced["forced"] and fused4.is_dir()


def test_cli_says_what_it_fuses_a_line_per_phase_in_a_log_and_quiet_leaves_the_end_line(
        tiny_moe_mixed_dir, adapters, repair_set, tmp_path):
    import os
    import subprocess
    import sys

    def cli(save: Path, *extra: str) -> subprocess.CompletedProcess:  # stderr is a pipe, as in a log
        return subprocess.run([sys.executable, "-m", "lfm_mlx", "fuse", "--model", str(tiny_moe_mixed_dir),
                               "--adapter-path", str(adapters), "--save-path", str(save), "--rows", str(repair_set),
                               *extra], capture_output=True, text=True,
                              env={**os.environ, "OPENBLAS_NUM_THREADS": "1"}, timeout=300)

    result = cli(tmp_path / "fused")
    assert result.returncode == 0, result.stderr
    lines = result.stderr.splitlines()
    assert lines[0].startswith(f"lfm-mlx fuse: merging {adapters} into {tiny_moe_mixed_dir} on Device(cpu, 0) (BLAS: ")
    assert ("; expert projections at 8 bits (group 64); fidelity on up to 32 prompt(s) of "
            f"{repair_set}; writing {tmp_path / 'fused'} if the gate passes") in lines[0], lines[0]
    assert lines[1].startswith("lfm-mlx fuse: scoring base + adapters on ") and lines[-1].startswith(
        "lfm-mlx fuse: writing the fused model")
    merge = [line for line in lines if "layers" in line and "%" in line]  # 18 LoRA layers, a line a quarter
    assert "\r" not in result.stderr and len(merge) == 4 and len(lines) == 7, result.stderr
    report = json.loads((tmp_path / "fused" / "fidelity.json").read_text())
    end = result.stdout.splitlines()[-1]
    assert end == (f"fused model: {tmp_path / 'fused'} ({report['size_bytes'] / 1e9:.3f} GB; fidelity passed: top-1 "
                   f"{report['adapter_vs_fused']['top1_agreement']:.4f}, fine-tune kept {report['fine_tune_kept']}; "
                   f"report {tmp_path / 'fused' / 'fidelity.json'})")
    assert "PASSED" in result.stdout  # the report's lines before it

    quiet = cli(tmp_path / "quiet", "-q")
    assert quiet.returncode == 0 and quiet.stderr == "" and quiet.stdout.startswith(f"fused model: {tmp_path / 'quiet'} (")
    assert len(quiet.stdout.splitlines()) == 1


def test_help_describes_fuse_in_full_sentences(capsys):
    with pytest.raises(SystemExit):
        F.main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert ("Fuse LoRA adapters into a base model: dequantize, merge, re-quantize (8 bits by default), and check "
            "that the fine-tune survived before writing anything.") in text


def _gate_report(kept: float | None, shift: float, answers: float = 1.0) -> dict:
    """A fidelity report whose top-1 and survival pass, with the given fine-tune share and shift."""
    return {"adapter_vs_fused": {"decisive_top1_agreement": 0.99, "top1_agreement": 0.99, "mean_kl": 0.0,
                                 "answer_agreement": answers},
            "adapter_vs_base": {"mean_kl": shift}, "fine_tune_kept": kept,
            "layers": [{"path": "model.layers.3.feed_forward.switch_mlp.up_proj", "survival": 0.99,
                        "storage": "4-bit g64"}]}


def test_gate_refuses_a_fuse_that_undoes_half_the_fine_tune_even_when_top1_passes():
    thresholds = F.Thresholds()
    (reason,) = F.fidelity_gate(_gate_report(kept=0.50, shift=0.047), thresholds)
    assert reason.startswith("fine-tune kept 0.50 < 0.8") and "50%" in reason
    assert F.fidelity_gate(_gate_report(kept=0.997, shift=0.047), thresholds) == []
    # a fine-tune that barely moved the model: the ratio is rounding noise, so it is not judged
    assert F.fidelity_gate(_gate_report(kept=0.2, shift=F.MIN_JUDGED_SHIFT / 2), thresholds) == []
    assert F.fidelity_gate(_gate_report(kept=None, shift=0.0), thresholds) == []


def test_gate_refuses_a_fuse_that_changes_answers_the_adapter_model_is_sure_of():
    (reason,) = F.fidelity_gate(_gate_report(kept=0.93, shift=0.36, answers=0.81), F.Thresholds())
    assert reason.startswith("answer agreement 0.81 < 0.9") and "19%" in reason


def test_8bit_fused_dir_loads_in_mlx_lm_with_the_mixed_layout(tiny_moe_mixed_dir, adapters, repair_set, tmp_path):
    out = tmp_path / "fused"
    F.fuse(tiny_moe_mixed_dir, adapters, out, bits=8, rows=repair_set, progress=False)
    assert json.loads((out / "tokenizer_config.json").read_text())["tool_parser_type"] == "pythonic"
    model, _ = mlx_lm.load(str(out))
    layer = model.model.layers[4]
    assert isinstance(layer.feed_forward.switch_mlp.up_proj, QuantizedSwitchLinear)
    assert layer.feed_forward.switch_mlp.up_proj.bits == 8
    assert type(layer.feed_forward.gate) is nn.Linear and layer.feed_forward.gate.weight.dtype == mx.bfloat16
    assert layer.feed_forward.expert_bias.dtype == mx.float32
    assert type(model.model.layers[0].feed_forward.gate_proj) is nn.Linear
    ours, _ = models.load(out, dtype=mx.bfloat16)
    assert mx.array_equal(model(mx.array([TOKENS])), ours(mx.array([TOKENS]))).item()


def test_bf16_fuse_is_base_plus_scale_b_a(tiny_moe_mixed_dir, adapters, repair_set, tmp_path):
    out = tmp_path / "fused_bf16"
    report = F.fuse(tiny_moe_mixed_dir, adapters, out, bits="bf16", rows=repair_set, progress=False)
    assert report["bits"] == "bf16" and "quantization" not in json.loads((out / "config.json").read_text())
    base, _ = models.load(tiny_moe_mixed_dir, dtype=mx.float32, with_tokenizer=False)
    fused, _ = models.load(out, dtype=mx.float32, with_tokenizer=False)
    saved = mx.load(str(adapters / "adapters.safetensors"))
    scale = json.loads((adapters / "adapter_config.json").read_text())["lora_parameters"]["scale"]
    prefix = "model.layers.5.feed_forward.switch_mlp.down_proj"
    a, b = np.array(saved[f"{prefix}.lora_a"]), np.array(saved[f"{prefix}.lora_b"])  # (E, r, in), (E, out, r)
    expected = np.array(F.dense_weight(base.model.layers[5].feed_forward.switch_mlp.down_proj)) \
        + scale * np.einsum("eor,eri->eoi", b, a)
    got = np.array(fused.model.layers[5].feed_forward.switch_mlp.down_proj.weight)
    np.testing.assert_allclose(got, expected, rtol=2**-8, atol=1e-6)  # equal up to bf16 storage


def test_scope_all_quantizes_everything_but_routers_and_norms(tiny_moe_mixed_dir, adapters, tmp_path):
    out = tmp_path / "all8"
    report = F.fuse(tiny_moe_mixed_dir, adapters, out, bits=8, scope="all", suite="router", max_prompts=2,
                    new_tokens=6, force=True, progress=False)
    assert report["prompt_set"]["sequences"] == 2 and 2 <= report["adapter_vs_fused"]["positions"] <= 12
    model, _ = mlx_lm.load(str(out))
    assert isinstance(model.model.embed_tokens, nn.QuantizedEmbedding)
    assert isinstance(model.model.layers[2].self_attn.q_proj, nn.QuantizedLinear)
    assert isinstance(model.model.layers[0].feed_forward.gate_proj, nn.QuantizedLinear)
    assert type(model.model.layers[3].feed_forward.gate) is nn.Linear
    assert type(model.model.layers[3].conv.conv) is nn.Conv1d and model.model.layers[3].operator_norm.weight.dtype == mx.bfloat16
    quantization = json.loads((out / "config.json").read_text())["quantization"]
    assert quantization["model.layers.3.feed_forward.gate"] is False


def test_bad_requests_name_the_problem(tiny_moe_mixed_dir, tiny_dense_dir, adapters, repair_set, tmp_path):
    with pytest.raises(ValueError, match="bits: '5' is not supported"):
        F.fuse(tiny_moe_mixed_dir, adapters, tmp_path / "x", bits="5", rows=repair_set)
    with pytest.raises(ValueError, match="one prompt set"):
        F.fuse(tiny_moe_mixed_dir, adapters, tmp_path / "x")
    with pytest.raises(FileNotFoundError, match="has no adapter_config.json"):
        F.fuse(tiny_moe_mixed_dir, tmp_path, tmp_path / "x", rows=repair_set)
    with pytest.raises(ValueError, match="trained on another base"):
        F.fuse(tiny_dense_dir, adapters, tmp_path / "x", rows=repair_set)
    unrecorded = tmp_path / "unrecorded"  # adapters from before bases were fingerprinted: the scope check speaks
    shutil.copytree(adapters, unrecorded)
    config = json.loads((unrecorded / "adapter_config.json").read_text())
    config["lfm_mlx"].pop("base_fingerprint")
    (unrecorded / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="quantizes nothing; pass --scope all"):
        F.fuse(tiny_dense_dir, unrecorded, tmp_path / "x", rows=repair_set)
    assert not (tmp_path / "x").exists()


# ---------------------------------------------------------------- heavier: seed 004 end to end, mlx_lm.server


@pytest.mark.slow
def test_seed_004_fusing_into_a_4bit_base_at_4_bits_rounds_the_delta_away(tiny_moe_dir, repair_set, tmp_path):
    from lfm_mlx.mixed import mix

    base4 = tmp_path / "base4"
    mix(tiny_moe_dir, base4, bits=4)
    adapters = tmp_path / "adapters"
    lora.train_lora(small_config(base4, repair_set, adapters, modules=["experts"], rank=8, learning_rate=1e-4,
                                 max_steps=24, eval_every=100, save_every=100))
    with pytest.raises(F.FidelityError) as info:
        F.fuse(base4, adapters, tmp_path / "f4", bits=4, rows=repair_set, progress=False)
    assert any("delta survival" in reason for reason in info.value.report["reasons"])
    assert info.value.report["survival"]["weighted_mean"] < 0.5
    report8 = F.fuse(base4, adapters, tmp_path / "f8", bits=8, rows=repair_set, force=True, progress=False)
    assert report8["survival"]["min"] > 0.9
    assert report8["fine_tune_kept"] > info.value.report["fine_tune_kept"] + 0.3


@pytest.mark.slow
def test_mlx_lm_server_returns_structured_tool_calls_from_the_fused_model(tiny_moe_mixed_dir, repair_set, tmp_path):
    adapters = tmp_path / "adapters"
    lora.train_lora(small_config(tiny_moe_mixed_dir, repair_set, adapters, rank=8, learning_rate=2e-3, epochs=3,
                                 eval_every=24, save_every=100))
    fused = tmp_path / "fused"
    F.fuse(tiny_moe_mixed_dir, adapters, fused, bits=8, rows=repair_set, progress=False)
    with mlx_lm_server(fused, tmp_path / "server.log") as url:
        body = {"model": str(fused), "messages": make_rows(1, 300)[0]["messages"][:1], "tools": TOOLS,
                "max_tokens": 30, "temperature": 0.0}
        request = urllib.request.Request(f"{url}/chat/completions", json.dumps(body).encode(),
                                         {"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=60) as reply:
            choice = json.loads(reply.read())["choices"][0]
        assert choice["finish_reason"] == "tool_calls", choice
        call = choice["message"]["tool_calls"][0]["function"]
        assert call["name"] in ("read_file", "list_dir") and json.loads(call["arguments"])["path"].startswith("/")

"""Loading: every layout, parity with transformers, and clear errors on bad input."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from lfm_mlx.model import io as models
from lfm_mlx.model.synthetic import write_synthetic_model

TOKENS = [1, 6, 300, 512, 77, 901, 14, 15, 640, 7, 6, 222, 333, 444, 555, 666, 777, 888, 999, 20]


def mlx_logits(model_dir, dtype=None) -> np.ndarray:
    model, _ = models.load(model_dir, dtype=dtype)
    return np.array(model(mx.array([TOKENS])).astype(mx.float32))


@pytest.mark.parametrize("fixture", ["tiny_dense_dir", "tiny_moe_dir", "demo_moe_dir"])
def test_float32_logits_match_transformers(fixture, request):
    torch = pytest.importorskip("torch")
    from transformers import AutoModelForCausalLM

    model_dir = request.getfixturevalue(fixture)
    ours = mlx_logits(model_dir, mx.float32)
    reference = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    with torch.no_grad():
        theirs = reference(torch.tensor([TOKENS])).logits.numpy()
    assert ours.shape == theirs.shape
    assert np.abs(ours - theirs).max() <= 1e-4


def test_cpu_compute_dtype_is_float32(tiny_moe_dir):
    model, _ = models.load(tiny_moe_dir)
    if mx.default_device() == mx.cpu:
        assert model.model.layers[3].feed_forward.switch_mlp.gate_proj.weight.dtype == mx.float32
    assert model.model.layers[3].feed_forward.expert_bias.dtype == mx.float32


def _rewrite(src: Path, dst: Path, transform) -> Path:
    """Copy a model directory, passing its single safetensors file's tensors through `transform`."""
    shutil.copytree(src, dst)
    weights = mx.load(str(dst / "model.safetensors"))
    (dst / "model.safetensors").unlink()
    transform(dst, weights)
    return dst


def test_fused_expert_layout_matches_per_expert(tiny_moe_dir, tmp_path):
    config = json.loads((tiny_moe_dir / "config.json").read_text())

    def fuse(dst, weights):
        out = {}
        for layer in range(config["num_dense_layers"], config["num_hidden_layers"]):
            prefix = f"model.layers.{layer}.feed_forward.experts"
            w1, w2, w3 = ([weights.pop(f"{prefix}.{e}.{w}.weight") for e in range(config["num_experts"])]
                          for w in ("w1", "w2", "w3"))
            out[f"{prefix}.gate_up_proj"] = mx.concatenate([mx.stack(w1), mx.stack(w3)], axis=1)
            out[f"{prefix}.down_proj"] = mx.stack(w2)
        mx.save_safetensors(str(dst / "model.safetensors"), {**weights, **out})

    fused = _rewrite(tiny_moe_dir, tmp_path / "fused", fuse)
    np.testing.assert_array_equal(mlx_logits(fused), mlx_logits(tiny_moe_dir))


def test_sharded_with_index_matches_single_file(tiny_moe_dir, tmp_path):
    sharded = write_synthetic_model(tmp_path / "sharded", "tiny-moe", seed=0, shard_bytes=200_000)
    assert (sharded / "model.safetensors.index.json").exists()
    assert len(list(sharded.glob("model-*-of-*.safetensors"))) > 2
    np.testing.assert_array_equal(mlx_logits(sharded), mlx_logits(tiny_moe_dir))


def test_mlx_layout_round_trip(tiny_moe_dir, tmp_path):
    model, _, config = models.load(tiny_moe_dir, dtype=mx.bfloat16, return_config=True)
    out = tmp_path / "mlx"
    out.mkdir()
    models.save_model_dir(model, config, tiny_moe_dir, out)
    saved = mx.load(str(out / "model.safetensors"))
    assert saved["model.layers.0.conv.conv.weight"].shape == (64, 3, 1)  # MLX conv layout (D, K, 1)
    assert "model.layers.3.feed_forward.switch_mlp.gate_proj.weight" in saved
    np.testing.assert_array_equal(mlx_logits(out), mlx_logits(tiny_moe_dir))
    tok_config = json.loads((out / "tokenizer_config.json").read_text())
    assert tok_config["tool_parser_type"] == "pythonic"


@pytest.mark.parametrize("value", ["docs/cedar/maple.md", "git checkout frost", "Lisbon", "moss garden ideas",
                                   "https://heron-inlet.dev", "send it to zelda@quill.com"])
def test_a_value_has_the_same_tokens_in_a_request_and_in_a_call(tiny_moe_dir, value):
    """No BPE merge joins a letter to the space or quote before it, so copying an argument from the
    request into a pythonic call is copying its tokens (what a tiny demo model can learn)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_moe_dir)
    value_ids = tokenizer.encode(value, add_special_tokens=False)

    def holds_value(text: str) -> bool:
        ids = tokenizer.encode(text, add_special_tokens=False)
        return any(ids[i:i + len(value_ids)] == value_ids for i in range(len(ids)))

    assert holds_value(f"please read {value} now")  # after a space
    assert holds_value(f"read_file(path='{value}')")  # after `='`
    assert holds_value(f'{{"path": "{value}"}}')  # after a JSON quote


def test_hub_id_offline_gives_one_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match="pass its local directory"):
        models.load("LiquidAI/LFM2-8B-A1B")


# ---------------------------------------------------------------- bad input


@pytest.fixture
def model_copy(tiny_moe_dir, tmp_path) -> Path:
    return Path(shutil.copytree(tiny_moe_dir, tmp_path / "copy"))


def _edit_config(model_dir: Path, **changes) -> None:
    config = json.loads((model_dir / "config.json").read_text())
    for key, value in changes.items():
        if value is None:
            config.pop(key)
        else:
            config[key] = value
    (model_dir / "config.json").write_text(json.dumps(config))


def test_missing_config_key_names_it_and_the_typo(model_copy):
    config = json.loads((model_copy / "config.json").read_text())
    _edit_config(model_copy, num_experts=None, num_expert=config["num_experts"])
    with pytest.raises(ValueError, match=r"config.json: missing key 'num_experts' \(found 'num_expert'"):
        models.load(model_copy)


def test_unsupported_model_type(model_copy):
    _edit_config(model_copy, model_type="llama")
    with pytest.raises(ValueError, match="model_type 'llama' is not supported"):
        models.load(model_copy)


@pytest.mark.parametrize("shard", ["../outside.safetensors", "/etc/passwd", "link.safetensors"])
def test_shard_escaping_the_directory_is_refused(model_copy, tmp_path, shard):
    outside = tmp_path / "outside.safetensors"
    shutil.copy(model_copy / "model.safetensors", outside)
    if shard == "link.safetensors":
        os.symlink(outside, model_copy / shard)
    weights = mx.load(str(model_copy / "model.safetensors"))
    index = {"weight_map": {name: shard for name in weights}}
    (model_copy / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match="points outside the model directory"):
        models.load(model_copy)


def test_truncated_safetensors(model_copy):
    path = model_copy / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"model.safetensors: truncated.*re-download"):
        models.load(model_copy)


def test_corrupt_safetensors_header(model_copy):
    path = model_copy / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[10:20] = b"\xff" * 10
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="corrupt safetensors header"):
        models.load(model_copy)


def test_missing_tokenizer(model_copy):
    (model_copy / "tokenizer.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"tokenizer file\(s\) tokenizer.json missing"):
        models.load(model_copy)


def test_weights_not_matching_config(model_copy):
    _edit_config(model_copy, hidden_size=128)
    with pytest.raises(ValueError, match="do not match config.json"):
        models.load(model_copy)

"""LoRA repair passes: config precedence and errors, module selection, assistant-only training,
early stopping, exact resume, and adapters that mlx_lm.load / mlx_lm.generate use unchanged."""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import mlx_lm
import pytest
from mlx_lm.tuner.lora import LoRALinear, LoRASwitchLinear

from lfm_mlx import lora
from lfm_mlx.data import build_dataset
from lfm_mlx.model.io import load

TOOLS = [{"type": "function", "function": {"name": name}} for name in ("read_file", "list_dir")]  # short prompts: fast steps
WORDS = ["notes", "todo", "main", "data", "log", "plan", "mail", "home", "work", "docs", "test", "song"]


def make_rows(n: int, offset: int = 0) -> list[dict]:
    """Two-assistant-turn tool traces: a call, a tool result, a final answer (both turns trained)."""
    rows = []
    for i in range(offset, offset + n):
        tool = TOOLS[i % 2]["function"]["name"]
        path = f"/{WORDS[i % len(WORDS)]}"
        verb = "read" if tool == "read_file" else "list"
        rows.append({"id": f"row{i}", "tools": TOOLS, "messages": [
            {"role": "user", "content": f"{verb} {path}"},
            {"role": "assistant", "content": "", "tool_calls": [
                {"type": "function", "function": {"name": tool, "arguments": {"path": path}}}]},
            {"role": "tool", "content": "ok"},
            {"role": "assistant", "content": "Done."},
        ]})
    return rows


def write_repair_set(root: Path, n_train: int = 24, n_valid: int = 6, n_test: int = 6) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for name, n, offset in (("train", n_train, 0), ("valid", n_valid, 100), ("test", n_test, 200)):
        (root / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in make_rows(n, offset)))
    return root


def small_config(model_dir: Path, data: Path, out_dir: Path, **overrides) -> lora.LoraConfig:
    values = dict(model=str(model_dir), data=str(data), out_dir=str(out_dir), rank=4, learning_rate=1e-3,
                  epochs=1, eval_every=8, save_every=8, progress=False)
    values.update(overrides)
    return lora.config_from_dict(values)


@pytest.fixture(scope="module")
def repair_set(tmp_path_factory) -> Path:
    return write_repair_set(tmp_path_factory.mktemp("repair") / "files")


@pytest.fixture(scope="module")
def trained(tiny_moe_mixed_dir, repair_set, tmp_path_factory) -> tuple[Path, dict, list[dict]]:
    """A LoRA on every module group, router included, trained 24 steps on the mixed tiny MoE."""
    out = tmp_path_factory.mktemp("lora") / "adapters"
    steps: list[dict] = []
    config = small_config(tiny_moe_mixed_dir, repair_set, out, modules=["attention", "conv", "mlp", "experts", "router"])
    summary = lora.train_lora(config, on_step=steps.append)
    return out, summary, steps


# ---------------------------------------------------------------- config


def test_cli_overrides_yaml_overrides_defaults(tmp_path):
    path = tmp_path / "lora.yaml"
    path.write_text("model: base\ndata: rows.jsonl\nout_dir: out\nrank: 4\nlearning_rate: 1e-4\nlayers: [5, 6]\n")
    config = lora.load_config(path, {"rank": 2, "modules": ["experts"]})
    assert config.rank == 2  # CLI
    assert config.learning_rate == 1e-4 and config.layers == [5, 6]  # YAML (1e-4 without a dot is still a number)
    assert config.modules == ["experts"]  # CLI
    assert config.dropout == lora.LoraConfig().dropout  # default
    assert config.lora_scale == 2.0 * 2 / 2  # alpha defaults to 2 * rank


def test_config_errors_name_file_line_key_and_fix(tmp_path):
    path = tmp_path / "lora.yaml"
    path.write_text("model: base\ndata: rows.jsonl\nrnak: 8\nout_dir: out\ndropout: 1.5\nalpha: 16\nscale: 2.0\n"
                    "modules: [attention, expert]\nlayers: -2\n")
    with pytest.raises(ValueError) as info:
        lora.load_config(path)
    message = str(info.value)
    assert f"{path}:3: unknown key 'rnak'; did you mean 'rank'?" in message
    assert f"{path}:5: dropout: 1.5 must be a number in [0, 1)" in message
    assert "alpha and scale: give one of them" in message
    assert "unknown module 'expert' (did you mean 'experts'?)" in message
    assert f"{path}:9: layers: -2 is not valid" in message
    with pytest.raises(ValueError, match=r"--rank: rank: 0 must be an integer >= 1"):
        lora.load_config(None, {"model": "m", "data": "d", "out_dir": "o", "rank": 0})


def test_cli_trains_from_yaml_with_flag_overrides(tiny_moe_mixed_dir, repair_set, tmp_path, capsys):
    path = tmp_path / "lora.yaml"
    path.write_text(f"model: {tiny_moe_mixed_dir}\ndata: {repair_set}\nout_dir: {tmp_path / 'out'}\nrank: 2\n"
                    "modules: [conv]\nprogress: false\n")
    assert lora.main([str(path), "--max-steps", "2", "--layers", "[7]"]) == 0
    out = capsys.readouterr().out
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["steps"] == 2 and summary["lora_layers"] == 2  # layer 7's conv in_proj and out_proj
    assert out == (f"adapters: {tmp_path / 'out' / 'adapters.safetensors'} (best step {summary['best_step']} of 2, "
                   f"valid loss {summary['best_val_loss']:.4f}, test loss {summary['test_loss']:.4f}, skipped 0; "
                   f"summary {tmp_path / 'out' / 'summary.json'})\n")
    run = json.loads((tmp_path / "out" / "run_config.json").read_text())
    assert run["rank"] == 2 and run["layers"] == [7] and run["max_steps"] == 2


def test_cli_says_what_it_trains_a_line_a_quarter_in_a_log_and_quiet_leaves_the_end_line(
        tiny_moe_mixed_dir, repair_set, tmp_path):
    import os
    import subprocess
    import sys

    def cli(out: Path, *extra: str) -> subprocess.CompletedProcess:  # stderr is a pipe, as in a log
        return subprocess.run([sys.executable, "-m", "lfm_mlx", "lora", "--model", str(tiny_moe_mixed_dir), "--data",
                               str(repair_set), "--out-dir", str(out), "--rank", "2", "--modules", "[conv]",
                               "--max-steps", "8", *extra], capture_output=True, text=True,
                              env={**os.environ, "OPENBLAS_NUM_THREADS": "1"}, timeout=300)

    result = cli(tmp_path / "out")
    assert result.returncode == 0, result.stderr
    start, *progress = result.stderr.splitlines()
    manifest = json.loads((tmp_path / "out" / "data_manifest.json").read_text())
    rows = sum(manifest[k]["kept"] for k in ("train", "valid", "test") if k in manifest)
    wrapped = len(json.loads((tmp_path / "out" / "adapter_config.json").read_text())["lora_parameters"]["keys"])
    assert start.startswith(f"lfm-mlx lora: starting: rank 2 adapters (scale 2) on {wrapped} linear layers (conv) of "
                            f"{tiny_moe_mixed_dir}, "), start
    for fact in ("on Device(cpu, 0) (BLAS: ", "compute float32; 8 steps at learning rate 0.0001; "
                 f"rows {rows} of {rows}, train/valid/test ", f"; out_dir {tmp_path / 'out'}"):
        assert fact in start, (fact, start)
    assert "\r" not in result.stderr and len(progress) == 4, result.stderr  # a line a quarter, not a refresh a step
    assert progress[-1].startswith("lfm-mlx lora: 100% (8/8 steps, ") and "; loss " in progress[-1], progress
    assert result.stdout.startswith(f"adapters: {tmp_path / 'out' / 'adapters.safetensors'} (best step ")

    again = cli(tmp_path / "out", "--max-steps", "10")  # a resume says so
    assert again.stderr.startswith("lfm-mlx lora: resuming at step 8: "), again.stderr
    quiet = cli(tmp_path / "quiet", "--quiet")
    assert quiet.returncode == 0 and quiet.stderr == "" and len(quiet.stdout.splitlines()) == 1
    assert quiet.stdout.startswith(f"adapters: {tmp_path / 'quiet' / 'adapters.safetensors'} (")


def test_cli_reports_bad_config_and_exits_2(tmp_path, capsys):
    assert lora.main(["--model", "m", "--data", "d", "--out-dir", str(tmp_path / "o"), "--epochs", "zero"]) == 2
    assert "epochs: 'zero' must be an integer >= 1" in capsys.readouterr().err


# ---------------------------------------------------------------- module selection


def test_module_groups_and_layer_selection_map_to_mlx_lm_paths(tiny_moe_mixed_dir, tiny_dense_dir):
    model, _ = load(tiny_moe_mixed_dir, with_tokenizer=False)
    keys = lora.lora_keys(model, "all", ["attention", "router"])
    # tiny-moe: attention at layers 2 and 6, MoE (router) from layer 2 on
    assert [k for k in keys if "self_attn" in k] == [f"model.layers.{i}.self_attn.{p}" for i in (2, 6)
                                                     for p in ("q_proj", "k_proj", "v_proj", "out_proj")]
    assert [k for k in keys if k.endswith("feed_forward.gate")] == [f"model.layers.{i}.feed_forward.gate" for i in range(2, 8)]
    assert lora.lora_keys(model, 2, ["conv"]) == ["model.layers.7.conv.in_proj", "model.layers.7.conv.out_proj"]
    assert lora.lora_keys(model, [0, 3], ["mlp", "experts", "self_attn.q_proj"]) == [
        "model.layers.0.feed_forward.gate_proj", "model.layers.0.feed_forward.up_proj",
        "model.layers.0.feed_forward.down_proj", "model.layers.3.feed_forward.switch_mlp.gate_proj",
        "model.layers.3.feed_forward.switch_mlp.up_proj", "model.layers.3.feed_forward.switch_mlp.down_proj"]
    with pytest.raises(ValueError, match=r"layers: \[9\] out of range; the model has layers 0..7"):
        lora.lora_keys(model, [1, 9], ["conv"])
    dense, _ = load(tiny_dense_dir, with_tokenizer=False)
    with pytest.raises(ValueError, match="match nothing"):
        lora.lora_keys(dense, "all", ["experts", "router"])


# ---------------------------------------------------------------- training


def test_loss_is_on_every_assistant_token_and_nothing_else(trained, tiny_moe_mixed_dir, repair_set):
    out, summary, steps = trained
    _, tokenizer = load(tiny_moe_mixed_dir)
    train = build_dataset(repair_set / "train.jsonl", tokenizer, 4096, (1.0, 0.0, 0.0)).train
    by_id = {e.row_id: e.n_trainable for e in train}
    # batch_size 1: each step's token count is exactly its row's assistant tokens (both turns)
    assert sorted(s["tokens"] for s in steps if "train_loss" in s) == sorted(by_id.values())
    assert summary["steps"] == len(train) == 24


def test_training_logs_metrics_and_lowers_validation_loss(trained):
    out, summary, steps = trained
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "train_loss" in r] == list(range(1, 25))
    vals = [r for r in rows if "val_loss" in r]
    assert [r["step"] for r in vals] == [0, 8, 16, 24]
    assert summary["best_val_loss"] < vals[0]["val_loss"] * 0.5
    assert summary["test_loss"] is not None and summary["examples"] == {"train": 24, "valid": 6, "test": 6}
    for name in ("adapters.safetensors", "adapter_config.json", "run_config.json", "data_manifest.json", "summary.json"):
        assert (out / name).is_file(), name
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporary files left behind


def test_mlx_lm_load_and_generate_use_the_adapters_unchanged(trained, tiny_moe_mixed_dir):
    out, summary, _ = trained
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["fine_tune_type"] == "lora" and set(config["lora_parameters"]) == {"rank", "scale", "dropout", "keys"}
    model, tokenizer = mlx_lm.load(str(tiny_moe_mixed_dir), adapter_path=str(out))
    wrapped = {p: m for p, m in model.named_modules() if isinstance(m, (LoRALinear, LoRASwitchLinear))}
    assert sorted(wrapped) == sorted(config["lora_parameters"]["keys"])
    assert isinstance(wrapped["model.layers.4.feed_forward.switch_mlp.up_proj"], LoRASwitchLinear)
    saved = mx.load(str(out / "adapters.safetensors"))
    for name, value in saved.items():
        module = wrapped[name.rsplit(".", 1)[0]]
        assert mx.array_equal(getattr(module, name.rsplit(".", 1)[1]), value).item(), name

    row = make_rows(1, offset=300)[0]  # held out; after the tool result the trained answer is "Done."
    prompt = tokenizer.apply_chat_template(row["messages"][:3], tools=TOOLS, add_generation_prompt=True, tokenize=False)
    ids = tokenizer.encode(prompt, add_special_tokens=False)
    with_adapter = mlx_lm.generate(model, tokenizer, ids, max_tokens=24)
    base, _ = mlx_lm.load(str(tiny_moe_mixed_dir))
    without = mlx_lm.generate(base, tokenizer, ids, max_tokens=24)
    assert with_adapter == "Done."  # and it stopped at <|im_end|>
    assert "Done." not in without


def test_early_stopping_keeps_the_best_adapters(tiny_moe_mixed_dir, repair_set, tmp_path):
    out = tmp_path / "early"
    # min_delta larger than any possible gain: the first evaluation after the start is "no better"
    config = small_config(tiny_moe_mixed_dir, repair_set, out, eval_every=3, patience=1, min_delta=1e9)
    summary = lora.train_lora(config)
    assert summary["stopped_early"] and summary["steps"] == 3 and summary["best_step"] == 0
    assert "adapters kept are the untrained ones" in summary["warning"]  # a no-op repair is said, not silent
    best = mx.load(str(out / "adapters.safetensors"))
    assert all(not mx.any(v).item() for k, v in best.items() if k.endswith("lora_b"))  # step 0: B is still zero
    again = lora.train_lora(config)  # a finished run resumes to nothing
    assert again["steps"] == 3


def test_resume_after_a_crash_continues_exactly(tiny_moe_mixed_dir, repair_set, tmp_path):
    common = dict(modules=["experts", "conv"], lr_schedule="constant", max_steps=6, save_every=2, eval_every=100)
    straight = tmp_path / "straight"
    lora.train_lora(small_config(tiny_moe_mixed_dir, repair_set, straight, **common))

    rows = tmp_path / "rows"  # a copy this test may edit
    rows.mkdir()
    for name in ("train", "valid", "test"):
        (rows / f"{name}.jsonl").write_text((repair_set / f"{name}.jsonl").read_text())
    crashed = tmp_path / "crashed"
    config = small_config(tiny_moe_mixed_dir, rows, crashed, **common)

    def crash(row: dict) -> None:
        if row.get("step") == 5 and "train_loss" in row:
            raise KeyboardInterrupt("simulated kill after the step-4 checkpoint")

    with pytest.raises(KeyboardInterrupt):
        lora.train_lora(config, on_step=crash)
    assert json.loads((crashed / "checkpoint" / "state.json").read_text())["step"] == 4
    lora.train_lora(config)
    for name in ("adapters.safetensors", "optimizer.safetensors"):
        a, b = mx.load(str(straight / "checkpoint" / name)), mx.load(str(crashed / "checkpoint" / name))
        assert a.keys() == b.keys()
        assert all(mx.array_equal(a[k], b[k]).item() for k in a), name
    steps = [json.loads(line)["step"] for line in (crashed / "metrics.jsonl").read_text().splitlines()
             if "train_loss" in line]
    assert steps == [1, 2, 3, 4, 5, 6]  # the step logged before the crash is not duplicated

    with pytest.raises(ValueError, match=r"rank \(4 -> 8\)"):
        lora.train_lora(small_config(tiny_moe_mixed_dir, rows, crashed, **{**common, "rank": 8}))
    with pytest.raises(FileExistsError, match="resume: true"):
        lora.train_lora(small_config(tiny_moe_mixed_dir, rows, crashed, **{**common, "resume": False}))
    (rows / "train.jsonl").write_text((rows / "train.jsonl").read_text().replace("Done.", "Finished."))
    with pytest.raises(ValueError, match="the rows changed"):
        lora.train_lora(config)


def test_float_experts_train_adapters_for_the_int8_model(tiny_moe_mixed_dir, repair_set, tmp_path):
    """`float_experts`: float32 copies of the int8 experts compute the mixed model's logits (same weight
    values, another summation order), and the adapters trained on them serve the int8 model as the
    adapters trained on it do (same keys and shapes, close validation loss, the trained answer)."""
    from mlx_lm.models.switch_layers import QuantizedSwitchLinear, SwitchLinear

    from lfm_mlx.model.io import load
    from lfm_mlx.model.quant import float_experts

    quantized, tokenizer = load(tiny_moe_mixed_dir)
    copied, _ = load(tiny_moe_mixed_dir)
    n_quantized = sum(isinstance(m, QuantizedSwitchLinear) for _, m in copied.named_modules())
    assert n_quantized > 0 and float_experts(copied) == n_quantized
    assert not any(isinstance(m, QuantizedSwitchLinear) for _, m in copied.named_modules())
    assert sum(isinstance(m, SwitchLinear) for _, m in copied.named_modules()) == n_quantized
    ids = mx.array([tokenizer.encode("list the files in /tmp and read notes.txt")])
    assert mx.allclose(copied(ids), quantized(ids), atol=1e-4).item()

    on_int8 = lora.train_lora(small_config(tiny_moe_mixed_dir, repair_set, tmp_path / "int8"))
    on_float = lora.train_lora(small_config(tiny_moe_mixed_dir, repair_set, tmp_path / "float", float_experts=True))
    assert abs(on_float["best_val_loss"] - on_int8["best_val_loss"]) < 0.05 * on_int8["best_val_loss"]
    a, b = (mx.load(str(tmp_path / name / "adapters.safetensors")) for name in ("int8", "float"))
    assert {k: v.shape for k, v in a.items()} == {k: v.shape for k, v in b.items()}
    model, tokenizer = mlx_lm.load(str(tiny_moe_mixed_dir), adapter_path=str(tmp_path / "float"))
    row = make_rows(1, offset=300)[0]
    prompt = tokenizer.apply_chat_template(row["messages"][:3], tools=TOOLS, add_generation_prompt=True, tokenize=False)
    assert mlx_lm.generate(model, tokenizer, tokenizer.encode(prompt, add_special_tokens=False), max_tokens=24) == "Done."

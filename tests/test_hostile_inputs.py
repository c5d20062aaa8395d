"""Hostile inputs across the verbs, through the real CLI in subprocesses: every one exits 2 with one
message that names the offending path or key, and no traceback."""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

import pytest
import yaml

from tests.test_grouped import tool_rows

ENV = {**os.environ, "OPENBLAS_NUM_THREADS": "1"}
ENV.pop("LFM_MLX_DEBUG", None)


class Ctx:
    """Paths one case builds on: fresh copies of the tiny models, good rows, a scratch directory."""

    def __init__(self, root: Path, hf: Path, mixed: Path, dense: Path):
        self.root, self.hf, self.mixed, self.dense = root, hf, mixed, dense
        self.rows = root / "rows.jsonl"
        self.rows.write_text("".join(json.dumps(row) + "\n" for row in tool_rows(8)))

    def model(self, name: str = "model", source: Path | None = None) -> Path:
        target = self.root / name
        shutil.copytree(source or self.hf, target)
        return target

    def weights(self, model: Path) -> Path:
        return next(model.glob("*.safetensors"))

    def file(self, name: str, content: str | bytes) -> Path:
        path = self.root / name
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
        return path

    def train_yaml(self, text: str = "", **values) -> Path:
        data = {"model": str(self.mixed), "data": [str(self.rows)], "run_dir": str(self.root / "run"), **values}
        return self.file("train.yaml", yaml.safe_dump(data) + text)

    def lora_yaml(self, text: str = "", **values) -> Path:
        data = {"model": str(self.mixed), "data": str(self.rows), "out_dir": str(self.root / "adapters"), **values}
        return self.file("lora.yaml", yaml.safe_dump(data) + text)


# ---------------------------------------------------------------- broken model directories


def no_config(ctx):
    model = ctx.model()
    (model / "config.json").unlink()
    return model, "config.json"


def config_not_json(ctx):
    model = ctx.model()
    (model / "config.json").write_text("{model_type: lfm2_moe")
    return model, "config.json"


def config_a_list(ctx):
    model = ctx.model()
    (model / "config.json").write_text("[1, 2]")
    return model, "config.json"


def config_not_utf8(ctx):
    model = ctx.model()
    (model / "config.json").write_bytes(b'{"model_type": "\xff\xfe"}')
    return model, "config.json"


def patch_config(**changes) -> Callable:
    def build(ctx):
        model = ctx.model()
        config = json.loads((model / "config.json").read_text())
        for key, value in changes.items():
            if value is None:
                config.pop(key)
            else:
                config[key] = value
        (model / "config.json").write_text(json.dumps(config))
        key = next(iter(changes))
        return model, key
    return build


def header_claims_2_62(ctx):
    model = ctx.model()
    path = ctx.weights(model)
    data = bytearray(path.read_bytes())
    data[:8] = struct.pack("<Q", 1 << 62)
    path.write_bytes(bytes(data))
    return model, path.name


def offsets_past_end(ctx):
    model = ctx.model()
    path = ctx.weights(model)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return model, path.name


def header_not_json(ctx):
    model = ctx.model()
    path = ctx.weights(model)
    data = bytearray(path.read_bytes())
    data[8:12] = b"!!!!"
    path.write_bytes(bytes(data))
    return model, path.name


def tiny_weights_file(ctx):
    model = ctx.model()
    ctx.weights(model).write_bytes(b"abc")
    return model, "model.safetensors"


def bad_offsets(ctx):
    model = ctx.model()
    path = ctx.weights(model)
    data = path.read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + length])
    name = next(k for k in header if k != "__metadata__")
    header[name]["data_offsets"] = ["a", "b"]
    text = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + data[8 + length:])
    return model, name


def index_outside(ctx):
    model = ctx.model()
    (ctx.root / "elsewhere.safetensors").write_bytes(ctx.weights(model).read_bytes())
    (model / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"x": "../elsewhere.safetensors"}}))
    return model, "points outside the model directory"


def index_missing_shard(ctx):
    model = ctx.model()
    (model / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"x": "model-2.safetensors"}}))
    return model, "model-2.safetensors"


def index_not_json(ctx):
    model = ctx.model()
    (model / "model.safetensors.index.json").write_text("{not json")
    return model, "model.safetensors.index.json"


def symlink_outside(ctx):
    model = ctx.model()
    outside = ctx.root / "outside"
    outside.mkdir()
    path = ctx.weights(model)
    shutil.move(path, outside / path.name)
    path.symlink_to(outside / path.name)
    return model, "outside the model directory"


def no_weights(ctx):
    model = ctx.model()
    ctx.weights(model).unlink()
    return model, "no *.safetensors"


def no_tokenizer(ctx):
    model = ctx.model()
    (model / "tokenizer.json").unlink()
    return model, "tokenizer.json"


def wrong_shapes(ctx):
    hidden = json.loads((ctx.hf / "config.json").read_text())["hidden_size"]
    model, _ = patch_config(hidden_size=hidden * 2)(ctx)
    return model, "config.json"


BROKEN_MODELS = {
    "no config.json": no_config, "config.json not JSON": config_not_json, "config.json a list": config_a_list,
    "config.json not UTF-8": config_not_utf8, "model_type llama": patch_config(model_type="llama"),
    "missing num_experts": patch_config(num_experts=None), "vocab_size a string": patch_config(vocab_size="many"),
    "header claims 2^62 bytes": header_claims_2_62, "offsets past the end": offsets_past_end,
    "header not JSON": header_not_json, "3-byte weights": tiny_weights_file, "offsets not numbers": bad_offsets,
    "index points outside": index_outside, "index names a missing shard": index_missing_shard,
    "index not JSON": index_not_json, "weights symlinked outside": symlink_outside, "no weights": no_weights,
    "no tokenizer": no_tokenizer, "weights do not match config": wrong_shapes,
}


def mix_case(broken: Callable) -> Callable:
    def build(ctx):
        model, expect = broken(ctx)
        return ["mix", model, ctx.root / "out"], expect
    return build


def train_model_case(broken: Callable) -> Callable:
    def build(ctx):
        model, expect = broken(ctx)
        return ["train", ctx.train_yaml(model=str(model)), "--no-progress"], expect
    return build


# ---------------------------------------------------------------- the table


CASES: dict[str, Callable] = {f"mix: {name}": mix_case(broken) for name, broken in BROKEN_MODELS.items()}
# train loads models with the same code as mix: a few cases show the path is the same (each costs ~3 s of imports)
CASES.update({f"train: {name}": train_model_case(BROKEN_MODELS[name]) for name in (
    "header claims 2^62 bytes", "index points outside", "weights do not match config")})
CASES.update({
    "mix: source missing": lambda ctx: (["mix", ctx.root / "nope", ctx.root / "out"], "nope"),
    "mix: source is a file": lambda ctx: (["mix", ctx.rows, ctx.root / "out"], "rows.jsonl"),
    "mix: dense model": lambda ctx: (["mix", ctx.dense, ctx.root / "out"], "has no experts"),
    "mix: already quantized": lambda ctx: (["mix", ctx.mixed, ctx.root / "out"], "already quantized"),
    "mix: output is the source": lambda ctx: (["mix", ctx.hf, ctx.hf], str(ctx.hf)),
    "mix: output inside the source": lambda ctx: (["mix", ctx.hf, ctx.hf / "sub"], str(ctx.hf / "sub")),
    "mix: output under a file": lambda ctx: (["mix", ctx.hf, ctx.rows / "out"], "rows.jsonl is a file"),
    "gguf: output is a directory": lambda ctx: (["gguf", ctx.hf, ctx.root], "is a directory; pass a file path"),
    "train: run_dir is a file": lambda ctx: (["train", ctx.train_yaml(run_dir=str(ctx.rows))], "rows.jsonl is a file"),
    "lora: out_dir is a file": lambda ctx: (["lora", ctx.lora_yaml(out_dir=str(ctx.rows))], "rows.jsonl is a file"),
    # train: config
    "train: config missing": lambda ctx: (["train", ctx.root / "none.yaml"], "none.yaml"),
    "train: YAML syntax": lambda ctx: (["train", ctx.file("t.yaml", "model: [a\nrun_dir: x\n")], "t.yaml"),
    "train: duplicate key": lambda ctx: (["train", ctx.train_yaml("learning_rate: 1e-5\nlearning_rate: 1e-4\n")],
                                         "'learning_rate' is given twice"),
    "train: top-level typo": lambda ctx: (["train", ctx.train_yaml(lerning_rate=1e-5)], "did you mean 'learning_rate'"),
    "train: nested typo": lambda ctx: (["train", ctx.train_yaml(memory={"hardgb": 10})], "did you mean 'memory.hard_gb'"),
    "train: learning_rate .inf": lambda ctx: (["train", ctx.train_yaml("learning_rate: .inf\n")], "learning_rate"),
    "train: learning_rate 1e38": lambda ctx: (["train", ctx.train_yaml(learning_rate=1e38)], "learning_rate"),
    "train: weight_decay nan": lambda ctx: (["train", ctx.train_yaml("weight_decay: .nan\n")], "weight_decay"),
    "train: group_size 50": lambda ctx: (["train", ctx.train_yaml(group_size=50, group_stride=1)], "group_size: 50"),
    "train: total_gb above RAM": lambda ctx: (["train", ctx.train_yaml(memory={"total_gb": 100000, "soft_gb": 10,
                                                                              "hard_gb": 20})], "memory.above_physical"),
    "train: --set without =": lambda ctx: (["train", ctx.train_yaml(), "--set", "learning_rate"], "--set"),
    "train: data missing": lambda ctx: (["train", ctx.train_yaml(data=[str(ctx.root / "gone.jsonl")])], "gone.jsonl"),
    "train: data is a directory": lambda ctx: (["train", ctx.train_yaml(data=[str(ctx.root)])], "is a directory"),
    "train: data empty": lambda ctx: (["train", ctx.train_yaml(data=[str(ctx.file("empty.jsonl", ""))])],
                                      "empty.jsonl"),
    "train: data not UTF-8": lambda ctx: (["train", ctx.train_yaml(data=[str(ctx.file(
        "latin.jsonl", ctx.rows.read_bytes() + b'{"messages": "caf\xe9"}\n'))])], "latin.jsonl:9"),
    "train: data row not JSON": lambda ctx: (["train", ctx.train_yaml(data=[str(ctx.file(
        "bad.jsonl", ctx.rows.read_text() + "{oops\n"))])], "bad.jsonl:9"),
    "train: model missing": lambda ctx: (["train", ctx.train_yaml(model=str(ctx.root / "no-model"))], "no-model"),
    "train: run_dir is the model": lambda ctx: (["train", ctx.train_yaml(run_dir=str(ctx.mixed))],
                                                "the output is, holds or lies inside the model"),
    "train: dense model": lambda ctx: (["train", ctx.train_yaml(model=str(ctx.dense))], "has no experts"),
    # lora
    "lora: config missing": lambda ctx: (["lora", ctx.root / "none.yaml"], "none.yaml"),
    "lora: duplicate key": lambda ctx: (["lora", ctx.lora_yaml("rank: 4\nrank: 8\n")], "'rank' is given twice"),
    "lora: unknown key": lambda ctx: (["lora", ctx.lora_yaml(rnak=4)], "did you mean 'rank'"),
    "lora: learning_rate .inf": lambda ctx: (["lora", ctx.lora_yaml("learning_rate: .inf\n")], "learning_rate"),
    "lora: data missing": lambda ctx: (["lora", ctx.lora_yaml(data=str(ctx.root / "gone.jsonl"))], "gone.jsonl"),
    "lora: data dir without train.jsonl": lambda ctx: (["lora", ctx.lora_yaml(data=str(ctx.root))], "train.jsonl"),
    "lora: data not UTF-8": lambda ctx: (["lora", ctx.lora_yaml(data=str(ctx.file(
        "latin.jsonl", ctx.rows.read_bytes() + b'{"messages": "caf\xe9"}\n')))], "latin.jsonl:9"),
    "lora: model without config.json": lambda ctx: (["lora", ctx.lora_yaml(model=str(no_config(ctx)[0]))],
                                                    "config.json"),
    "lora: out_dir inside the model": lambda ctx: (["lora", ctx.lora_yaml(out_dir=str(ctx.mixed / "adapters"))],
                                                   "adapters"),
    # gguf
    "gguf: model missing": lambda ctx: (["gguf", ctx.root / "nope", ctx.root / "m.gguf"], "nope"),
    "gguf: output inside the model": lambda ctx: (["gguf", ctx.hf, ctx.hf / "m.gguf"], "m.gguf"),
    "gguf: model_type llama": lambda ctx: (["gguf", patch_config(model_type="llama")(ctx)[0], ctx.root / "m.gguf"],
                                           "model_type"),
    "gguf: header claims 2^62": lambda ctx: (["gguf", header_claims_2_62(ctx)[0], ctx.root / "m.gguf"],
                                            "model.safetensors"),
    "gguf: bad outtype": lambda ctx: (["gguf", ctx.hf, ctx.root / "m.gguf", "--outtype", "q3"], "--outtype"),
    # fuse
    "fuse: no adapter_config.json": lambda ctx: (["fuse", "--model", ctx.mixed, "--adapter-path", ctx.root,
                                                  "--save-path", ctx.root / "f", "--rows", ctx.rows], "adapter_config"),
    "fuse: save path is the model": lambda ctx: (["fuse", "--model", ctx.mixed, "--adapter-path", adapter_dir(ctx),
                                                  "--save-path", ctx.mixed, "--rows", ctx.rows], str(ctx.mixed)),
    "fuse: adapters of another base": lambda ctx: (["fuse", "--model", ctx.mixed, "--adapter-path",
                                                    adapter_dir(ctx, "0" * 64), "--save-path", ctx.root / "f",
                                                    "--rows", ctx.rows], "another base"),
    "fuse: adapter_config.json not JSON": lambda ctx: (["fuse", "--model", ctx.mixed, "--adapter-path",
                                                        adapter_dir(ctx, text="{nope"), "--save-path", ctx.root / "f",
                                                        "--rows", ctx.rows], "adapter_config.json"),
})


def adapter_dir(ctx, fingerprint: str | None = None, text: str | None = None) -> Path:
    path = ctx.root / "adapters-in"
    path.mkdir(exist_ok=True)
    config = {"fine_tune_type": "lora", "lfm_mlx": {"base_fingerprint": fingerprint}}
    (path / "adapter_config.json").write_text(text if text is not None else json.dumps(config))
    return path


def run_case(name: str, build: Callable, root: Path, hf: Path, mixed: Path, dense: Path) -> tuple:
    case_dir = root / "".join(c if c.isalnum() else "_" for c in name)
    case_dir.mkdir()
    argv, expect = build(Ctx(case_dir, hf, mixed, dense))
    result = subprocess.run([sys.executable, "-m", "lfm_mlx", *map(str, argv)], capture_output=True, text=True,
                            env=ENV, timeout=120)
    return name, argv, expect, result


def test_at_least_fifty_hostile_inputs_exit_2_naming_the_culprit_without_a_traceback(
        tiny_moe_dir, tiny_moe_mixed_dir, tiny_dense_dir, tmp_path):
    assert len(CASES) >= 50
    with ThreadPoolExecutor(max_workers=2) as pool:  # two cores: two subprocesses at a time
        results = list(pool.map(lambda item: run_case(*item, tmp_path, tiny_moe_dir, tiny_moe_mixed_dir,
                                                      tiny_dense_dir), CASES.items()))
    failures = []
    for name, argv, expect, result in results:
        err = result.stderr
        if result.returncode != 2 or "Traceback" in err or expect not in err:
            failures.append(f"{name}: exit {result.returncode}, expected {expect!r} in:\n{err[-1500:]}")
    assert not failures, f"{len(failures)} of {len(results)} cases:\n\n" + "\n\n".join(failures)


@pytest.mark.parametrize("verb", ["train", "lora", "mix"])
def test_lfm_mlx_debug_shows_the_traceback_of_a_user_error(tmp_path, verb):
    config = tmp_path / "t.yaml"
    config.write_text("model: a\nmodel: b\n")
    argv = [str(config)] if verb != "mix" else [str(tmp_path / "nope"), str(tmp_path / "out")]
    result = subprocess.run([sys.executable, "-m", "lfm_mlx", verb, *argv], capture_output=True, text=True,
                            env={**ENV, "LFM_MLX_DEBUG": "1"}, timeout=120)
    assert result.returncode == 1 and "Traceback" in result.stderr



def test_the_bad_row_hint_names_options_that_work_and_the_end_line_counts_the_dropped_rows(tiny_moe_mixed_dir,
                                                                                           tmp_path):
    ctx = Ctx(tmp_path, tiny_moe_mixed_dir, tiny_moe_mixed_dir, tiny_moe_mixed_dir)
    with ctx.rows.open("a") as rows:
        rows.write('{"messages": [{"role": "user", "content": "no answer"}]}\n')  # row 9 has no assistant turn
    train = ctx.train_yaml(steps_per_group=1, group_size=6, eval_each_group=False, expert_kernel="qmm",
                           memory={"total_gb": 8, "soft_gb": 5, "hard_gb": 6})
    lora = ctx.lora_yaml(rank=2, modules=["conv"], max_steps=2)
    ends = {}
    for argv, hint in ((["train", train, "--quiet"], ["--set", "skip_invalid=true"]),
                       (["lora", lora, "--quiet"], ["--skip-invalid", "true"])):
        refused = subprocess.run([sys.executable, "-m", "lfm_mlx", *map(str, argv)], capture_output=True, text=True,
                                 env=ENV, timeout=300)
        assert refused.returncode == 2 and f"{ctx.rows}:9: " in refused.stderr, refused.stderr
        assert f"`lfm-mlx {argv[0]} CONFIG {' '.join(hint)}`" in refused.stderr  # the option as the message spells it
        done = subprocess.run([sys.executable, "-m", "lfm_mlx", *map(str, argv + hint)], capture_output=True,
                              text=True, env=ENV, timeout=300)
        assert done.returncode == 0 and done.stderr == "" and len(done.stdout.splitlines()) == 1, done.stderr
        ends[argv[0]] = done.stdout
    assert "rows 8 of 9, dropped {" in ends["train"], ends["train"]  # the end line says rows were dropped

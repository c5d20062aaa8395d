"""The whole pipeline, shortened: every stage runs for real and the exported model agrees with MLX.

What this test does not assert yet: the learning ordering (base < trained < repaired) of issue 8.
The tiny base does not learn to read its prompt within the demo's budget (see the README's
status section); the stage-to-stage agreement checks below hold regardless.
"""

from __future__ import annotations

import json

import pytest

from lfm_mlx.demo import STAGES, DemoConfig, run_demo
from lfm_mlx.report import read_jsonl


@pytest.mark.slow
def test_quick_demo_runs_every_stage_and_llama_cpp_agrees_with_mlx(tmp_path):
    pytest.importorskip("llama_cpp")
    config = DemoConfig.quick(str(tmp_path / "run"), str(tmp_path / "cache"))
    summary = run_demo(config)
    run = tmp_path / "run"

    assert list(summary["pass_rates"]) == list(STAGES)
    reports = {name: json.loads((run / "eval" / folder / "report.json").read_text())
               for name, folder in zip(STAGES, ["base", "trained", "repaired", "fused8", "gguf"])}
    case_ids = [c["id"] for c in reports["base"]["cases"]]
    assert case_ids and all([c["id"] for c in r["cases"]] == case_ids for r in reports.values())

    # The fused 8-bit model in MLX and its GGUF export in llama.cpp: same greedy text, same score.
    mlx_texts = [c["runs"][0]["text"] for c in reports["fused 8-bit"]["cases"]]
    gguf_texts = [c["runs"][0]["text"] for c in reports["gguf (llama.cpp)"]["cases"]]
    same = sum(a == b for a, b in zip(mlx_texts, gguf_texts)) / len(case_ids)
    assert same >= 0.9, f"llama.cpp and MLX agree on only {same:.0%} of greedy generations"
    assert abs(summary["pass_rates"]["gguf (llama.cpp)"] - summary["pass_rates"]["fused 8-bit"]) <= 0.02

    # Grouped training lowered the masked validation loss of the task; LoRA logged its losses.
    grouped = read_jsonl(run / "grouped" / "metrics.jsonl")
    start = next(r for r in grouped if r["kind"] == "start")
    end = next(r for r in grouped if r["kind"] == "end")
    assert end["valid_loss"] < start["valid_loss"]
    assert any("train_loss" in r for r in read_jsonl(run / "lora" / "metrics.jsonl"))

    for name in ("summary.json", "summary.md", "pass_rate.png", "loss.png", "memory.png", "model-f32.gguf"):
        assert (run / name).stat().st_size > 0
    assert (run / "repair_datasets" / "demo" / "manifest.json").is_file()

"""The README's demo, as `lfm-mlx demo` runs it (`DemoConfig()`, about 9 minutes on a 2-core CPU):
every stage runs for real, training lifts the held-out pass rate from the base's 0%, the fused 8-bit
model and its GGUF in llama.cpp keep it, the 4-bit fuse is judged, and `mlx_lm.server` serves the
fused model: calls as structured `tool_calls` with finish_reason "tool_calls", plain answers as content.

The demo runs once per module, as README command 1 runs it (`python -m lfm_mlx demo`, here with
`--quiet`); each test reads its run directory.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from lfm_mlx.demo import STAGES, DemoConfig
from lfm_mlx.report import read_jsonl
from tests.test_server_eval import mlx_lm_server

FOLDERS = dict(zip(STAGES, ["base", "trained", "repaired", "fused8", "gguf"]))


@pytest.fixture(scope="module")
def demo_cli(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    pytest.importorskip("llama_cpp")
    run = tmp_path_factory.mktemp("demo") / "run"
    done = subprocess.run([sys.executable, "-m", "lfm_mlx", "demo", "--run-dir", str(run), "--quiet"],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    return run, done


@pytest.fixture(scope="module")
def demo(demo_cli) -> tuple[Path, dict]:
    run, _ = demo_cli
    return run, json.loads((run / "summary.json").read_text())


@pytest.mark.slow
def test_quiet_demo_prints_its_summary_and_nothing_else(demo_cli):
    """`--quiet`: no stage lines, no progress bars or lines, no start lines of the verbs inside; the
    summary (table, legend, environment, stage times) on stdout, as summary.md holds it."""
    run, done = demo_cli
    chatter = [line for line in done.stderr.splitlines() if line.startswith(("[demo]", "lfm-mlx ", "[lora]"))
               and "warning" not in line]
    assert chatter == [] and "\r" not in done.stderr, done.stderr[-2000:]
    assert done.stdout.startswith("held-out suite, pass rate per stage"), done.stdout[:500]
    assert done.stdout.strip() == (run / "summary.md").read_text().strip()


def reports(run: Path) -> dict[str, dict]:
    return {name: json.loads((run / "eval" / folder / "report.json").read_text()) for name, folder in FOLDERS.items()}


@pytest.mark.slow
def test_every_stage_runs_and_leaves_its_reports(demo):
    run, summary = demo
    assert list(summary["pass_rates"]) == list(STAGES)
    # The paraphrase suite (held-out wording) is scored at every stage, beside the test suite.
    assert list(summary["paraphrase_pass_rates"]) == list(STAGES)
    paraphrased = json.loads((run / "eval" / "base_paraphrase" / "report.json").read_text())
    assert paraphrased["suites"][0]["name"] == "demo_task_paraphrase"
    assert ("paraphrase suite" in (run / "summary.md").read_text()) and "best_step" in summary["lora"]
    by_stage = reports(run)
    case_ids = [c["id"] for c in by_stage["base"]["cases"]]
    assert case_ids and all([c["id"] for c in r["cases"]] == case_ids for r in by_stage.values())
    # Grouped training lowered the masked validation loss of the task; LoRA logged its losses.
    grouped = read_jsonl(run / "grouped" / "metrics.jsonl")
    start = next(r for r in grouped if r["kind"] == "start")
    end = next(r for r in grouped if r["kind"] == "end")
    assert end["valid_loss"] < start["valid_loss"]
    assert any("train_loss" in r for r in read_jsonl(run / "lora" / "metrics.jsonl"))
    for name in ("summary.json", "summary.md", "pass_rate.png", "loss.png", "memory.png", "model-f32.gguf"):
        assert (run / name).stat().st_size > 0
    assert (run / "repair_datasets" / "demo" / "manifest.json").is_file()
    # 8 bits keep the fine-tune; 4 bits are judged by the same gate, and measurably further from it.
    fused8, fused4 = summary["fidelity_8bit"], summary["fidelity_4bit"]
    assert fused8["passed"] and fused8["answer_agreement"] >= 0.9 and fused8["fine_tune_kept"] > 0.9  # measured 0.99
    # 4-bit rounding is 16x coarser than 8-bit: measurably further from base + adapters (KL 2.1x, kept
    # 0.981 against 0.991 with the recipe-4 base, 0.986 against 1.000 with recipe 5's; 3x and more with recipe 3's).
    assert fused4["mean_kl"] > 1.5 * fused8["mean_kl"] and fused4["fine_tune_kept"] < fused8["fine_tune_kept"]
    assert (run / "fused-4bit").is_dir() == fused4["passed"]
    assert fused4["passed"] == (not fused4["reasons"])
    # Without BFCL's data the slice is skipped, and the summary says how to get it.
    assert "pip download --no-deps bfcl-eval" in summary["bfcl"]["skipped"]
    assert "BFCL slice: skipped" in (run / "summary.md").read_text()


# The bounds the demo's final stages are held to, by the BLAS its matmuls ran on (the summary's
# environment line). OpenBLAS (README command 1 installs it; CI runs on it): the aims, where
# this 2-core box printed 94% held-out (90 of 96), finalization 94%, paraphrase 85%, no category
# below 81%. MLX's reference BLAS (a machine without OpenBLAS) sums in another order: 86% held-out
# (83 of 96), finalization 81%, paraphrase 85%, no_tool 75% (docs/benchmarks.md).
BOUNDS = {
    "openblas": {"held_out": 0.90, "paraphrase": 0.80, "category": 0.75, "finalization": 0.90},
    "reference": {"held_out": 0.86, "paraphrase": 0.80, "category": 0.75, "finalization": 0.80},
}


@pytest.mark.slow
def test_the_demo_learns_the_tool_surface(demo):
    """On the run's own reports (96 held-out cases each): the base passes at most 10% and calls none
    of the task's tools, grouped training reaches 60%, and the repaired, fused 8-bit and GGUF stages
    meet the BLAS's bounds (BOUNDS) with no false positives and the fused model within two cases of
    the adapters."""
    _, summary = demo
    rates, paraphrase, metrics = summary["pass_rates"], summary["paraphrase_pass_rates"], summary["metrics"]
    bounds = BOUNDS["openblas" if "BLAS: openblas" in summary["environment"] else "reference"]
    assert all(m["cases"] >= 96 for m in metrics.values()), {k: m["cases"] for k, m in metrics.items()}
    assert rates["base"] <= 0.10 and rates["trained"] >= 0.60, rates
    # The base calls its own (sibling) tools, never the task's.
    base = metrics["base"]["per_category"]
    assert all(base[c]["pass_rate"] == 0 for c in ("browser", "terminal", "file", "apps")), base
    for stage in ("repaired", "fused 8-bit", "gguf (llama.cpp)"):
        assert rates[stage] >= bounds["held_out"] and paraphrase[stage] >= bounds["paraphrase"], (stage, rates, paraphrase)
        final = metrics[stage]
        assert min(c["pass_rate"] for c in final["per_category"].values()) >= bounds["category"], (stage, final["per_category"])
        assert final["no_tool_false_positive_rate"] <= 0.05, (stage, final)
        assert final["finalization_rate"] >= bounds["finalization"], (stage, final)
    one_case = 1 / metrics["repaired"]["cases"]
    assert abs(rates["fused 8-bit"] - rates["repaired"]) <= 2 * one_case + 1e-4, rates  # rates: 4 decimals


@pytest.mark.slow
def test_the_demo_fixes_its_expert_path_so_reruns_are_identical(demo, tmp_path):
    """The expert path is set, not timed at start-up (a timing choice could differ between runs), and
    evaluating the same model again gives the same answer on every case."""
    from lfm_mlx.evaluate import MLXBackend, evaluate

    run, _ = demo
    frozen = json.loads((run / "grouped" / "expert_kernel.json").read_text())
    assert frozen["choice"] == DemoConfig().expert_kernel and frozen["reason"] == "set in the config", frozen
    again = evaluate(MLXBackend(run / "fused-8bit"), [run / "task" / "suite.json"], tmp_path, max_tokens=48,
                     progress=False)
    first = reports(run)["fused 8-bit"]
    assert [c["runs"][0]["text"] for c in again["cases"]] == [c["runs"][0]["text"] for c in first["cases"]]


@pytest.mark.slow
def test_llama_cpp_agrees_with_mlx_on_the_fused_model(demo):
    run, summary = demo
    by_stage = reports(run)
    mlx_texts = [c["runs"][0]["text"] for c in by_stage["fused 8-bit"]["cases"]]
    gguf_texts = [c["runs"][0]["text"] for c in by_stage["gguf (llama.cpp)"]["cases"]]
    same = sum(a == b for a, b in zip(mlx_texts, gguf_texts)) / len(mlx_texts)
    assert same >= 0.9, f"llama.cpp and MLX agree on only {same:.0%} of greedy generations"
    assert abs(summary["pass_rates"]["gguf (llama.cpp)"] - summary["pass_rates"]["fused 8-bit"]) <= 0.02


@pytest.mark.slow
def test_mlx_lm_server_serves_the_fused_model_with_structured_tool_calls(demo, tmp_path):
    from lfm_mlx.evaluate import EndpointBackend, evaluate

    run, _ = demo
    with mlx_lm_server(run / "fused-8bit", tmp_path / "server.log") as url:
        served = evaluate(EndpointBackend(url), [run / "task" / "suite.json"], tmp_path / "eval", max_tokens=48,
                          progress=False)
    assert served["complete"] and served["error"] is None
    calls = plain = 0
    for case in served["cases"]:
        got = case["runs"][0]
        assert got["failure"] != "error", got["detail"]  # every request, tool history included, was accepted
        if got["structured_calls"]:
            calls += 1  # a call comes back in message.tool_calls, not as text
            # "length" when the model went on after its call until max_tokens (as OpenAI reports it)
            assert got["finish_reason"] in ("tool_calls", "length") and not got["leaked_calls"], (case["id"], got)
        elif got["finish_reason"] == "tool_calls":
            continue  # the model began a call the server's pythonic parser could not read: no calls, no text
        elif got["finish_reason"] == "length" and not got["content"]:
            continue  # a call begun and cut off by max_tokens: the server holds an unfinished call's text back
        elif not got["malformed"]:
            plain += 1  # no call: a plain answer
            assert got["content"] and got["finish_reason"] in ("stop", "length"), (case["id"], got)
    # The server decodes in the stored bf16 and the in-process eval in float32 (CPU gather_mm), so an
    # model's near-ties may decode differently: the test checks the serving contract, not identical text.
    assert calls >= 1, f"no structured call among {len(served['cases'])} held-out prompts ({plain} plain answers)"
    assert plain >= 1, f"no plain answer among {len(served['cases'])} held-out prompts ({calls} calls)"


def test_the_demo_memory_budget_fits_smaller_machines(monkeypatch):
    """A budget above physical memory is refused by train, so a 16 GB Mac gets 16 GB, not CI's 24."""
    import psutil

    from lfm_mlx.demo import demo_memory_budget

    for physical_gb, total in ((64.0, 24.0), (16.0, 16.0), (8.6, 8.6)):
        memory = type("Memory", (), {"total": int(physical_gb * 1e9)})
        monkeypatch.setattr(psutil, "virtual_memory", lambda memory=memory: memory)
        budget = demo_memory_budget()
        assert budget["total_gb"] == total and 0 < budget["soft_gb"] < budget["hard_gb"] <= total, budget


@pytest.mark.slow
def test_the_quant_ladder_on_the_demos_fused_model(demo, tmp_path):
    """Issue 33's CI case: three rungs and a small suite on the demo's own fused model, in the real llama.cpp;
    a tensor-type override llama.cpp refuses is reported, not fatal."""
    from lfm_mlx.ladder import run_ladder
    from tests.test_ladder import FAST, follows_the_rule

    broken = "Q4_K_M@attn_q=i32"  # llama.cpp aborts on it (GGML_ASSERT); q1_0 fits this model's 128-wide rows

    run, _ = demo
    suite = json.loads((run / "task" / "suite.json").read_text())
    per_category: dict[str, int] = {}
    cases = [c for c in suite["cases"] if per_category.setdefault(c["category"], 0) < 2
             and not per_category.update({c["category"]: per_category[c["category"]] + 1})]
    small = tmp_path / "suite.json"
    small.write_text(json.dumps({**suite, "cases": cases}))
    out = tmp_path / "ladder"
    ladder = run_ladder(run / "fused-8bit", out, str(small), ["Q8_0", "Q4_K_M", "IQ4_XS", broken], **FAST)
    assert ladder["complete"] and [r["name"] for r in ladder["rungs"]] == ["BF16", "Q8_0", "Q4_K_M", "IQ4_XS", broken]
    measured = ladder["rungs"][:4]
    sizes = [r["bytes"] for r in measured]
    assert sizes == sorted(sizes, reverse=True), sizes  # smaller down the ladder
    for rung in measured:
        assert rung["status"] == "measured" and rung["runs"] == len(cases) == 12 and rung["suite_complete"]
        assert rung["peak_rss_bytes"] > 0 and rung["prefill_tok_s"] > 0 and rung["decode_tok_s"] > 0
        assert 0 <= rung["agreement"] <= 1 and rung["false_positives"] >= 0 and rung["text_tool_leaks"] >= 0
    assert ladder["rungs"][4]["status"] == "failed" and ladder["rungs"][4]["verdict"] == "rejected"
    assert "SIGABRT" in ladder["rungs"][4]["reasons"][0], ladder["rungs"][4]["reasons"]
    assert ladder["recommendation"]["rung"] == follows_the_rule(ladder)
    assert all(r["reasons"] for r in ladder["rungs"][1:] if r["name"] != ladder["recommendation"]["rung"])

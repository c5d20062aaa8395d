"""What the demo reports: the summary table, the BFCL slice's table, the fidelity verdicts and the plots,
all made from the run directory's JSON files; and the environment line and peak memory they quote."""

from __future__ import annotations

import json
import os
import resource
import sys
from pathlib import Path

from lfm_mlx import cpu_blas
from lfm_mlx.report import plot_bars, plot_series, read_jsonl, text_table


def bfcl_text(bfcl: dict) -> str:
    if "skipped" in bfcl:
        return f"BFCL slice: skipped ({bfcl['skipped']})"
    rows = [{"category": r["category"], "base": r["before"], "fused 8-bit": r["after"], "delta (points)": r["delta_pp"]}
            for r in bfcl["compare"]]
    return (f"BFCL v4 slice ({bfcl['per_category']} cases per category): what the fine-tune did to general tool calling\n"
            + text_table(rows, ["category", "base", "fused 8-bit", "delta (points)"],
                         {"base": ".0%", "fused 8-bit": ".0%", "delta (points)": "+.1f"}))


def peak_rss_gb() -> float:
    """The larger peak resident memory of this process and of the evaluation worker (after it ended)."""
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
    peaks = [resource.getrusage(who).ru_maxrss for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
    return round(max(peaks) * scale / 1e9, 3)


def environment_line() -> str:
    """Where the demo runs: MLX, its device, the BLAS its CPU matmuls use, the cores."""
    import mlx.core as mx  # here, not at the top: the summary of a finished run needs no MLX

    return f"MLX {mx.__version__} on {mx.default_device()}, BLAS: {cpu_blas.describe()}, {os.cpu_count()} cores"


def fidelity_summary(report: dict) -> dict:
    """What the summary keeps of a fuse's fidelity report: the verdict and the numbers it rests on."""
    fused = report["adapter_vs_fused"]
    return {"passed": report["passed"], "reasons": report["reasons"], "answer_agreement": fused["answer_agreement"],
            "decisive_top1_agreement": fused["decisive_top1_agreement"], "mean_kl": fused["mean_kl"],
            "fine_tune_kept": report["fine_tune_kept"], "min_survival": report["survival"]["min"]}


LEGEND = """pass: cases answered as expected (the right tool with the right arguments, or a plain answer that
  contains the expected words); a column per category: browser, terminal, file, apps (calls to the task's
  tools), no_tool (small talk and how-to questions that need no call), finalization (answering from a tool result)
structured: cases expecting a call whose reply holds one inside the tool-call markers (what a server returns
  as message.tool_calls), whether right or wrong
false pos.: cases expecting no call (no_tool, finalization) answered with one
leaks: cases (a count) with a call written as plain text outside the markers, which a server leaves in the content"""


def summary_text(summary: dict) -> str:
    """The summary table: pass rate per stage and category, leaks, false positives, time, memory."""
    rows, categories = [], sorted({c for m in summary["metrics"].values() for c in m["per_category"]})
    for name, metrics in summary["metrics"].items():
        row = {"stage": name, "pass": metrics["pass_rate"], "leaks": metrics["text_tool_leaks"],
               "false pos.": metrics["no_tool_false_positive_rate"], "structured": metrics["structured_tool_call_rate"]}
        row.update({c: metrics["per_category"].get(c, {}).get("pass_rate") for c in categories})
        rows.append(row)
    percent = {k: ".0%" for k in ["pass", "false pos.", "structured", *categories]}
    timing = text_table(summary["stages"], ["stage", "seconds", "process_peak_gb", "mlx_peak_gb"],
                        {"seconds": ".1f", "process_peak_gb": ".2f", "mlx_peak_gb": ".3f"})
    fused8, fused4 = summary["fidelity_8bit"], summary["fidelity_4bit"]
    verdict = "passed the gate" if fused4["passed"] else f"refused: {fused4['reasons'][0]}"
    paraphrase = " -> ".join(f"{name} {rate:.0%}" for name, rate in summary["paraphrase_pass_rates"].items())
    return ("held-out suite, pass rate per stage\n"
            + text_table(rows, ["stage", "pass", *categories, "structured", "false pos.", "leaks"], percent)
            + "\n" + LEGEND
            + f"\n\nparaphrase suite (held-out wording), pass rate: {paraphrase}"
            + (f"\n\nLoRA repair: {summary['lora']['warning']}" if summary["lora"].get("warning") else "")
            + f"\n\nfidelity vs base + adapters: 8-bit answers {fused8['answer_agreement']:.0%}, fine-tune kept "
            f"{fused8['fine_tune_kept']}; 4-bit answers {fused4['answer_agreement']:.0%}, kept {fused4['fine_tune_kept']}"
            f" -> 4-bit {verdict}\n\n{bfcl_text(summary['bfcl'])}\n\n{summary['environment']}\nstages (wall {summary['wall_seconds']:.0f} s, peak RSS "
            f"{summary['peak_rss_gb']:.2f} GB; the evaluations marked 'beside training' overlap it)\n" + timing + "\n")


def make_plots(run_dir: str | Path) -> list[Path]:
    """Pass rate per stage, loss curves and memory over time, from the run directory's JSON files."""
    run = Path(run_dir)
    summary = json.loads((run / "summary.json").read_text())
    out = [plot_bars(list(summary["pass_rates"]), [v or 0.0 for v in summary["pass_rates"].values()],
                     run / "pass_rate.png", "Held-out pass rate per stage", "pass rate")]
    grouped = [r for r in read_jsonl(run / "grouped" / "metrics.jsonl") if r.get("kind") == "step"]
    lora = [r for r in read_jsonl(run / "lora" / "metrics.jsonl") if "train_loss" in r]
    offset = len(grouped)
    out.append(plot_series(
        [("grouped MoE training", [r["step"] for r in grouped], [r["loss"] for r in grouped]),
         ("LoRA repair", [offset + r["step"] for r in lora], [r["train_loss"] for r in lora])],
        run / "loss.png", "Training loss", "step (grouped, then LoRA)", "masked cross-entropy"))
    out.append(plot_series(
        [("grouped step peak (GB)", [r["step"] for r in grouped], [r["peak_memory_gb"] for r in grouped])],
        run / "memory.png", "Memory during grouped training", "step", "GB"))
    return out

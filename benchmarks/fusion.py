"""Fusion benchmark: base, base + adapter, fused bf16, fused 8-bit and fused 4-bit, in one run, on the same prompts.

    python benchmarks/fusion.py --preset tiny-moe            # CPU, CI-sized (~2-3 min on 2 cores)
    python benchmarks/fusion.py --preset lfm2.5-8b-a1b       # GPU: the real shapes, random weights

The base is a mixed checkpoint (experts int8, the rest bf16) built in memory from mlx-lm's random
initialisation of the preset's shapes. A LoRA (`lfm_mlx.lora`, every module group) is trained on
rows of a small file-tool surface; `lfm_mlx.fuse` then writes the three fused variants (experts
scope; 4-bit with --force, its fidelity verdict is recorded). Per variant: size on disk, load time
(model + tokenizer + adapters; the page cache is warm for all, each was just written), peak MLX
memory over load + decode + eval, greedy decode tokens/s (a fixed number of tokens after a fixed
prompt), eval pass rate (`lfm_mlx.evaluate` on a suite of held-out prompts of the same tool surface)
and top-1 agreement / KL with base + adapter on held-out rows. Ratios are against base + adapter
measured in the same run. JSON goes to benchmarks/results/ (and to $OUT when set).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from importlib.metadata import version
from pathlib import Path

import mlx.core as mx

from lfm_mlx import fuse as F
from lfm_mlx.evaluate import MLXBackend, run_suites
from lfm_mlx.fsutil import atomic_dir, atomic_write_json
from lfm_mlx.lora import LoraConfig, train_lora
from lfm_mlx.model.io import build_model, cast_floats, save_model_dir
from lfm_mlx.model.quant import quantize_experts
from lfm_mlx.model.synthetic import PRESETS as MODEL_PRESETS
from lfm_mlx.model.synthetic import hf_config, write_tokenizer
from lfm_mlx.suites import load_suite

GB = 1e9
PRESETS = {
    "tiny-moe": dict(n_train=40, n_heldout=12, lora=dict(rank=8, learning_rate=2e-3, epochs=3), decode_tokens=128,
                     decode_repeats=3, eval_max_tokens=32),
    # Sized for ~5 minutes on one GPU; most of it is writing and reading ~40 GB of model directories.
    "lfm2.5-8b-a1b": dict(n_train=12, n_heldout=6, lora=dict(rank=8, learning_rate=1e-4, epochs=1, max_steps=8),
                          decode_tokens=64, decode_repeats=2, eval_max_tokens=24),
}
WORDS = ["notes", "todo", "main", "data", "log", "plan", "mail", "home", "work", "docs", "test", "song", "film",
         "code", "task", "list", "book", "news", "shop", "trip"]
TOOL_LIBRARY = {
    name: {"type": "function", "function": {"name": name, "description": text, "parameters": {
        "type": "object", "properties": {"path": {"type": "string"}}, "required": ["path"]}}}
    for name, text in (("read_file", "Read a file"), ("list_dir", "List a folder"))
}


# ---------------------------------------------------------------- inputs


def build_base(preset: str, out: Path) -> float:
    """Write the preset's mixed checkpoint (random weights, experts int8); return seconds taken."""
    start = time.perf_counter()
    mx.random.seed(0)
    config = hf_config(preset)
    model = build_model(config)  # mlx-lm's random initialisation, lazy
    cast_floats(model, mx.bfloat16)
    config = quantize_experts(model, config, bits=8, group_size=64)
    for layer in model.model.layers:  # materialise layer by layer: bounded transient memory
        mx.eval(layer.parameters())
    mx.eval(model.parameters())
    with tempfile.TemporaryDirectory(dir=out.parent) as tokenizer_dir:
        write_tokenizer(Path(tokenizer_dir), MODEL_PRESETS[preset].get("tokenizer_vocab", config["vocab_size"]))
        with atomic_dir(out) as tmp:
            save_model_dir(model, config, Path(tokenizer_dir), tmp)
    return time.perf_counter() - start


def call(name: str, path: str) -> dict:
    return {"type": "function", "function": {"name": name, "arguments": {"path": path}}}


def case_rows(index: int) -> tuple[str, str, str]:
    """(user text, tool, path) of example `index`: alternate tools, a word per index."""
    tool = "read_file" if index % 2 == 0 else "list_dir"
    path = f"/{WORDS[index % len(WORDS)]}"
    return f"{'read' if tool == 'read_file' else 'list'} {path}", tool, path


def write_inputs(work: Path, n_train: int, n_heldout: int) -> tuple[Path, Path]:
    """A repair set (train / valid / test rows) and an eval suite of held-out prompts, same tools."""
    suite = {"name": "fusion_bench", "description": "file tools: call with the right path, then finalize",
             "version": 1, "tools": TOOL_LIBRARY, "cases": []}
    for i in range(1000, 1000 + n_heldout):
        text, tool, path = case_rows(i)
        suite["cases"].append({"id": f"call-{i}", "category": "tool_call", "tools": list(TOOL_LIBRARY),
                               "messages": [{"role": "user", "content": text}],
                               "expect": {"tool_call": {"name": tool, "arguments": {"path": {"exact": path}}}}})
        suite["cases"].append({"id": f"final-{i}", "category": "finalization", "tools": list(TOOL_LIBRARY),
                               "messages": [{"role": "user", "content": text},
                                            {"role": "assistant", "content": "", "tool_calls": [call(tool, path)]},
                                            {"role": "tool", "content": "ok"}],
                               "expect": {"final_answer": {"contains": ["Done"]}}})
    suite_path = work / "suite.json"
    suite_path.write_text(json.dumps(suite, indent=1))
    tools = load_suite(suite_path).cases[0].tools  # exactly what the eval renders

    rows_dir = work / "repair_set"
    rows_dir.mkdir()
    splits = {"train": range(n_train), "valid": range(500, 500 + max(2, n_heldout // 2)),
              "test": range(1000, 1000 + n_heldout)}
    for split, indices in splits.items():
        lines = []
        for i in indices:
            text, tool, path = case_rows(i)
            messages = [{"role": "user", "content": text},
                        {"role": "assistant", "content": "", "tool_calls": [call(tool, path)]},
                        {"role": "tool", "content": "ok"},
                        {"role": "assistant", "content": "Done."}]
            lines.append(json.dumps({"id": f"{split}-{i}", "tools": tools, "messages": messages}))
        (rows_dir / f"{split}.jsonl").write_text("\n".join(lines) + "\n")
    return rows_dir, suite_path


# ---------------------------------------------------------------- measuring


def decode_speed(model, tokenizer, suite, n_tokens: int, repeats: int = 3) -> float:
    """Greedy tokens/s after the prefill on the suite's first prompt, exactly n_tokens per run;
    the median of `repeats` runs."""
    from mlx_lm.generate import generate_step

    case = suite.cases[0]
    text = tokenizer.apply_chat_template(case.messages, tools=case.tools, add_generation_prompt=True, tokenize=False)
    prompt = mx.array(tokenizer.encode(text, add_special_tokens=False))
    speeds = []
    for _ in range(repeats):
        first, count = None, 0
        for token, _ in generate_step(prompt, model, max_tokens=n_tokens):
            mx.eval(token)
            count += 1
            if first is None:
                first = time.perf_counter()  # the prefill and first token are done
        speeds.append((count - 1) / (time.perf_counter() - first))
    return statistics.median(speeds)


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.glob("*.safetensors"))


def measure(name: str, model_dir: Path, adapter_path: Path | None, suite, sequences, reference, settings: dict) -> dict:
    gc.collect()
    mx.clear_cache()
    mx.reset_peak_memory()
    start = time.perf_counter()
    backend = MLXBackend(model_dir, adapter_path)
    mx.eval(backend.model.parameters())
    load_s = time.perf_counter() - start
    tps = decode_speed(backend.model, backend.tokenizer, suite, settings["decode_tokens"], settings["decode_repeats"])
    report = run_suites([suite], backend, max_tokens=settings["eval_max_tokens"], progress=False)
    agreement = F.compare(reference, backend.model, sequences) if reference is not None else None
    row = {
        "name": name, "dir": str(model_dir), "adapter_path": str(adapter_path) if adapter_path else None,
        "size_bytes": dir_bytes(model_dir) + (dir_bytes(adapter_path) if adapter_path else 0),
        "load_s": round(load_s, 3), "peak_memory_gb": round(mx.get_peak_memory() / GB, 3),
        "decode_tokens_per_s": round(tps, 2),
        "eval_pass_rate": report["metrics"]["pass_rate"],
        "eval": {k: report["metrics"][k] for k in ("runs", "passed", "per_category", "structured_tool_call_rate",
                                                   "finalization_rate", "text_tool_leaks")},
        "vs_adapter": agreement,
    }
    del backend
    return row


# ---------------------------------------------------------------- the run


def log(started: float, message: str) -> None:
    print(f"[{time.perf_counter() - started:7.1f} s] {message}", file=sys.stderr, flush=True)


def run(preset: str, work: Path) -> dict:
    settings = PRESETS[preset]
    started = time.perf_counter()
    base = work / "base"
    log(started, f"building the {preset} mixed base")
    build_s = build_base(preset, base)
    rows_dir, suite_path = write_inputs(work, settings["n_train"], settings["n_heldout"])
    suite = load_suite(suite_path)

    adapters = work / "adapters"
    config = LoraConfig(model=str(base), data=str(rows_dir), out_dir=str(adapters), eval_every=1000, save_every=1000,
                        patience=0, progress=False, **settings["lora"])
    log(started, "training the LoRA")
    lora_summary = train_lora(config)

    fused, fidelity = {}, {}
    for bits in ("bf16", 8, 4):
        out = work / f"fused-{bits}"
        log(started, f"fusing at {bits}")
        start = time.perf_counter()
        report = F.fuse(base, adapters, out, bits=bits, rows=rows_dir, force=True, progress=False)
        fused[bits] = out
        fidelity[f"fused {bits}" if bits == "bf16" else f"fused {bits}-bit"] = {
            "fuse_s": round(time.perf_counter() - start, 2), "passed": report["passed"], "reasons": report["reasons"],
            "adapter_vs_fused": report["adapter_vs_fused"], "fine_tune_kept": report["fine_tune_kept"],
            "survival": report["survival"]}

    # base + adapter first: its log-probs on the held-out rows are the reference for every variant
    backend = MLXBackend(base, adapters)
    sequences = F.prompts_from_rows(rows_dir, backend.tokenizer, limit=32)
    reference = F.log_probs(backend.model, sequences)
    del backend
    variants = [("base + adapter", base, adapters), ("base", base, None), ("fused bf16", fused["bf16"], None),
                ("fused 8-bit", fused[8], None), ("fused 4-bit", fused[4], None)]
    rows = []
    for name, model_dir, adapter_path in variants:
        log(started, f"measuring {name}")
        row = measure(name, model_dir, adapter_path, suite, sequences, reference, settings)
        row["fidelity"] = fidelity.get(name)
        rows.append(row)
        print(f"  {name:<15} {row['size_bytes'] / GB:8.3f} GB  load {row['load_s']:6.2f} s  peak {row['peak_memory_gb']:7.3f} GB  "
              f"decode {row['decode_tokens_per_s']:8.1f} tok/s  pass {row['eval_pass_rate']}  "
              f"top-1 vs adapter {row['vs_adapter']['top1_agreement']}", file=sys.stderr)

    baseline = rows[0]
    ratios = {r["name"]: {"size": round(r["size_bytes"] / baseline["size_bytes"], 4),
                          "load_s": round(r["load_s"] / baseline["load_s"], 4),
                          "peak_memory": round(r["peak_memory_gb"] / baseline["peak_memory_gb"], 4),
                          "decode_tokens_per_s": round(r["decode_tokens_per_s"] / baseline["decode_tokens_per_s"], 4)}
              for r in rows}
    return {
        "benchmark": "fusion", "preset": preset, "device": str(mx.default_device()), "device_info": mx.device_info(),
        "versions": {"mlx": version("mlx"), "mlx-lm": version("mlx-lm"), "python": platform.python_version()},
        "platform": platform.platform(),
        "settings": {**settings, "prompts": "held-out rows of the repair set (fidelity) and suite.json (eval)",
                     "suite_cases": len(suite.cases), "fuse_scope": "experts", "group_size": 64},
        "build_base_s": round(build_s, 2), "lora": lora_summary, "variants": rows,
        "ratios_vs_base_plus_adapter": ratios, "elapsed_s": round(time.perf_counter() - started, 1),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="tiny-moe", choices=sorted(PRESETS))
    parser.add_argument("--workdir", help="where the model directories go (default: a temporary directory)")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"), help="results directory")
    args = parser.parse_args(argv)
    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="lfm_fusion_"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        result = run(args.preset, work)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    device = "gpu" if mx.default_device() == mx.gpu else "cpu"
    path = Path(args.out) / f"fusion-{args.preset}-{device}.json"
    atomic_write_json(path, result)
    if os.environ.get("OUT"):
        atomic_write_json(Path(os.environ["OUT"]) / path.name, result)
    print(json.dumps({"results": str(path), "elapsed_s": result["elapsed_s"]}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

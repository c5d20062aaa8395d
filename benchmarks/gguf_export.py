"""GGUF export of the LFM2.5-8B-A1B shapes (random weights): time, peak memory, sizes.

Steps (each in its own process, so peak RSS is that step's alone; outputs that exist are reused,
so the steps can run in separate calls):
  synth     HF directory of the preset (bf16, random weights)
  mix       mixed checkpoint: experts int8, routers bf16 (lfm_mlx.mixed)
  copy      baseline: copy one safetensors shard of the mixed dir (disk throughput, same run)
  export    mixed dir -> bf16 GGUF (lfm_mlx.gguf.export_gguf)
  quantize  bf16 GGUF -> Q4_K_M (and --qtypes) with llama.cpp's quantizer
  load      llama.cpp loads the Q4_K_M file and evaluates a short prompt

Ratios against the baseline: export throughput / copy throughput, and peak RSS / largest tensor
(near 1x-4x means tensor-by-tensor; a whole second copy of the model would be ~100x here).

  python benchmarks/gguf_export.py --work-dir /tmp/gguf_bench              # all steps
  python benchmarks/gguf_export.py --work-dir /tmp/gguf_bench --steps export,quantize
  python benchmarks/gguf_export.py --preset tiny-moe --work-dir /tmp/b      # smoke test
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

STEPS = ("synth", "mix", "copy", "export", "quantize", "load")


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def run_step(step: str, work: Path, preset: str, qtypes: list[str]) -> dict:
    """One step in this process; returns its measurements."""
    import mlx.core as mx

    hf, mixed, bf16 = work / "hf", work / "mixed", work / "model-bf16.gguf"
    start = time.perf_counter()
    result: dict = {"step": step}
    if step == "synth":
        from lfm_mlx.model.synthetic import write_synthetic_model

        if not hf.exists():
            write_synthetic_model(hf, preset)
        result["bytes"] = dir_bytes(hf)
    elif step == "mix":
        from lfm_mlx.mixed import mix

        if not mixed.exists():
            mix(hf, mixed)
        result["bytes"] = dir_bytes(mixed)
    elif step == "copy":
        shard = max(mixed.glob("*.safetensors"), key=lambda p: p.stat().st_size)
        target = work / "copy-baseline.bin"
        shutil.copyfile(shard, target)
        with open(target, "rb") as handle:
            os.fsync(handle.fileno())
        result["bytes"] = target.stat().st_size
        target.unlink()  # disk is tight on the 8B shapes
    elif step == "export":
        from lfm_mlx.gguf import export_gguf

        report = export_gguf(mixed, bf16, "bf16")
        result.update(bytes=report["bytes"], source_bytes=dir_bytes(mixed), tensor_types=report["tensor_types"])
        result["largest_tensor_bytes"] = largest_tensor_bytes(mixed)
    elif step == "quantize":
        from lfm_mlx.gguf import quantize_gguf

        result["variants"] = {}
        for qtype in qtypes:
            report = quantize_gguf(bf16, work / f"model-{qtype}.gguf", qtype)
            result["variants"][qtype] = {k: report[k] for k in ("bytes", "source_bytes", "tensor_types", "seconds")}
    elif step == "load":
        import llama_cpp

        llm = llama_cpp.Llama(str(work / f"model-{qtypes[0]}.gguf"), n_ctx=256, verbose=False)
        tokens = llm.tokenize(b"<|im_start|>user\nWhat is the weather in Paris?<|im_end|>\n", special=True)
        llm.eval(tokens)
        result.update(tokens=len(tokens), file=f"model-{qtypes[0]}.gguf")
    else:
        raise ValueError(f"unknown step {step!r}; choose from {', '.join(STEPS)}")
    result["seconds"] = round(time.perf_counter() - start, 3)
    result["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    result["mlx_peak_bytes"] = mx.get_peak_memory()
    result["device"] = str(mx.default_device())
    result["versions"] = {"mlx": mx.__version__, "gguf": importlib.metadata.version("gguf")}
    return result


def largest_tensor_bytes(model_dir: Path) -> int:
    """float32 bytes of the largest tensor (dequantized): the scale of one tensor-at-a-time step."""
    import mlx.core as mx

    from lfm_mlx.model.io import weight_files

    largest = 0
    for path in weight_files(model_dir):
        for name, value in mx.load(str(path)).items():
            elements = value.size * (32 // 8 if value.dtype == mx.uint32 else 1)  # int8 packs 4 per uint32
            largest = max(largest, elements * 4)
    return largest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work-dir", required=True, type=Path)
    parser.add_argument("--preset", default="lfm2.5-8b-a1b")
    parser.add_argument("--steps", default=",".join(STEPS), help=f"comma-separated, from {', '.join(STEPS)}")
    parser.add_argument("--qtypes", default="Q4_K_M", help="comma-separated llama.cpp types (first one is loaded)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "gguf_export.json")
    parser.add_argument("--step", help=argparse.SUPPRESS)  # child mode: run one step, print JSON
    args = parser.parse_args(argv)
    qtypes = args.qtypes.split(",")
    args.work_dir.mkdir(parents=True, exist_ok=True)
    if args.step:
        print(json.dumps(run_step(args.step, args.work_dir, args.preset, qtypes)))
        return 0

    results = json.loads(args.out.read_text()) if args.out.exists() else {}
    results.setdefault("preset", args.preset)
    for step in args.steps.split(","):
        command = [sys.executable, __file__, "--work-dir", str(args.work_dir), "--preset", args.preset,
                   "--qtypes", args.qtypes, "--step", step]
        done = subprocess.run(command, check=True, capture_output=True, text=True)
        measured = json.loads(done.stdout.strip().splitlines()[-1])
        results[step] = measured
        print(json.dumps(measured), flush=True)

    if "copy" in results and "export" in results:
        copy, export = results["copy"], results["export"]
        results["ratios"] = {
            "export_vs_copy_throughput": round((export["bytes"] / export["seconds"])
                                               / (copy["bytes"] / copy["seconds"]), 3),
            "export_peak_rss_over_largest_tensor": round(export["peak_rss_bytes"] / export["largest_tensor_bytes"], 2),
            "export_peak_rss_over_source": round(export["peak_rss_bytes"] / export["source_bytes"], 3),
        }
        print(json.dumps(results["ratios"]))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

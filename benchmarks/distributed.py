"""Data-parallel LoRA: tokens/s of 1 vs 2 processes (`mlx.launch -n 2 --backend ring`, loopback).

    python benchmarks/distributed.py                       # tiny-moe and demo-moe-wide, CPU, ~3 min on 2 cores
    python benchmarks/distributed.py --presets tiny-moe --steps 16 --batch 2

Per preset, three real `lfm-mlx lora` runs on the same rows: one process with batch b, one with
batch 2b (the same global batch as two ranks: the same examples each step), and two ranks with
batch b each. From each run's metrics.jsonl: trained (loss) tokens per second between the first and
the last step, the mean step time, and for two ranks the all-reduce bytes and its share of the step
(from a rank's gradients being ready to the sums arriving: waiting for the slower rank counts).
Scaling efficiency = tokens/s of 2 ranks / (2 x tokens/s of 1 process at batch b); on one machine
the two ranks share its cores, so this measures the overhead, not a second machine's speed-up.
JSON goes to benchmarks/results/ (and to $OUT when set).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

import mlx.core as mx

from lfm_mlx.mixed import mix
from lfm_mlx.model.synthetic import write_synthetic_model

ROOT = Path(__file__).resolve().parents[1]
TOOLS = [{"type": "function", "function": {"name": n, "parameters": {"type": "object", "properties": {
    "path": {"type": "string"}}}}} for n in ("read_file", "list_dir", "delete_file")]


def write_rows(path: Path, n: int) -> Path:
    rows = []
    for i in range(n):
        tool = TOOLS[i % 3]["function"]["name"]
        rows.append({"id": f"r{i}", "tools": TOOLS, "messages": [
            {"role": "user", "content": f"please {tool.replace('_', ' ')} /home/user/project{i}/notes.txt now"},
            {"role": "assistant", "content": "", "tool_calls": [
                {"type": "function", "function": {"name": tool, "arguments": {"path": f"/home/user/project{i}/notes.txt"}}}]},
            {"role": "tool", "content": f"ok: {i} lines"},
            {"role": "assistant", "content": f"Done: {tool} on project {i} returned {i} lines."}]})
    path.mkdir(parents=True, exist_ok=True)
    (path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def run(config: dict, workdir: Path, ranks: int) -> dict:
    workdir.mkdir(parents=True)
    (workdir / "lora.yaml").write_text(json.dumps(config))
    command = [sys.executable, "-m", "lfm_mlx", "lora", "lora.yaml"]
    if ranks > 1:
        command = [str(Path(sys.executable).parent / "mlx.launch"), "-n", str(ranks), "--backend", "ring", "--", *command]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(command, cwd=workdir, env=env, capture_output=True, text=True)
    rows = [r for r in map(json.loads, (workdir / "out" / "metrics.jsonl").read_text().splitlines()) if "train_loss" in r]
    if len(rows) < 3:
        raise RuntimeError(f"{workdir}: the run did not finish:\n{done.stdout}\n{done.stderr}")
    timed = rows[1:]  # the first step compiles and warms caches
    seconds = timed[-1]["elapsed_s"] - rows[0]["elapsed_s"]
    out = {"ranks": ranks, "batch_per_rank": config["batch_size"], "steps": len(rows),
           "tokens_per_s": round(sum(r["tokens"] for r in timed) / seconds, 1),
           "step_s": round(seconds / len(timed), 4), "final_loss": rows[-1]["train_loss"]}
    if ranks > 1:
        reduce_s = sum(r["allreduce_s"] for r in timed) / len(timed)
        out.update(allreduce_bytes=rows[-1]["allreduce_bytes"], allreduce_s=round(reduce_s, 5),
                   allreduce_share=round(reduce_s / out["step_s"], 4),
                   cost_line=next((line for line in done.stderr.splitlines() if "all-reduce per step" in line), None))
    return out


def bench(preset: str, steps: int, batch: int, root: Path) -> dict:
    model = write_synthetic_model(root / preset, preset, seed=0)
    mixed = root / f"{preset}-mixed"
    mix(model, mixed)
    rows = write_rows(root / "rows", steps * batch * 2)
    base = dict(model=str(mixed), data=str(rows), out_dir="out", splits=[1.0, 0.0, 0.0], rank=8, epochs=1,
                max_steps=steps, eval_every=10_000, save_every=10_000, learning_rate=1e-3, progress=True,
                modules=["attention", "conv", "mlp", "experts"])
    one = run({**base, "batch_size": batch}, root / f"{preset}-1xb", 1)
    same = run({**base, "batch_size": 2 * batch}, root / f"{preset}-1x2b", 1)
    two = run({**base, "batch_size": batch}, root / f"{preset}-2xb", 2)
    weights = [mx.load(str(root / f"{preset}-{name}" / "out" / "adapters.safetensors")) for name in ("1x2b", "2xb")]
    difference = max(float((abs(weights[0][k] - weights[1][k]).max() / abs(weights[0][k]).max()).item())
                     for k in weights[0])
    return {"preset": preset, "one_process_batch_b": one, "one_process_batch_2b": same, "two_ranks_batch_b": two,
            "scaling_efficiency": round(two["tokens_per_s"] / (2 * one["tokens_per_s"]), 3),
            "speedup_vs_same_global_batch": round(two["tokens_per_s"] / same["tokens_per_s"], 3),
            "adapters_max_relative_difference_2xb_vs_1x2b": difference}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--presets", nargs="+", default=["tiny-moe", "demo-moe-wide"])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--batch", type=int, default=2, help="per rank")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        results = [bench(p, args.steps, args.batch, Path(tmp)) for p in args.presets]
    report = {"benchmark": "distributed", "backend": "ring over 127.0.0.1", "device": str(mx.default_device()),
              "machine": platform.machine(), "cpus": os.cpu_count(), "mlx": mx.__version__,
              "OPENBLAS_NUM_THREADS": os.environ.get("OPENBLAS_NUM_THREADS"), "results": results}
    text = json.dumps(report, indent=2)
    print(text)
    for folder in filter(None, [ROOT / "benchmarks" / "results", os.environ.get("OUT")]):
        Path(folder).mkdir(parents=True, exist_ok=True)
        (Path(folder) / f"distributed-{'-'.join(args.presets)}-cpu.json").write_text(text + "\n")


if __name__ == "__main__":
    main()

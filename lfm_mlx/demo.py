"""`lfm-mlx demo`: the pipeline on an embedded default (a synthetic tiny LFM2-MoE model).

Stage 1 (foundation): synthesize `tiny-moe`, mix it (experts int8, rest bf16), print the size
report, and generate greedily through plain `mlx_lm` from the mixed directory.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from lfm_mlx.mixed import format_size_report, mix
from lfm_mlx.synthetic import write_synthetic_model


def foundation_stage(run_dir: Path, preset: str = "tiny-moe", seed: int = 0, max_tokens: int = 24) -> dict:
    """Synthesize, mix, report sizes, and generate through mlx_lm from the mixed directory."""
    import mlx_lm

    started = time.perf_counter()
    base = write_synthetic_model(run_dir / "base", preset, seed=seed)
    mixed = run_dir / "mixed"
    report = mix(base, mixed)
    print(format_size_report(report))
    model, tokenizer = mlx_lm.load(str(mixed))
    messages = [{"role": "user", "content": "List the files in /tmp please."}]
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    text = mlx_lm.generate(model, tokenizer, prompt, max_tokens=max_tokens)
    print(f"greedy generation from {mixed} (random weights, so the text is noise):\n{text!r}")
    summary = {"size_report": report, "generation": text, "seconds": time.perf_counter() - started}
    (run_dir / "foundation.json").write_text(json.dumps(summary, indent=2))
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lfm-mlx demo", description=__doc__.split("\n")[0])
    parser.add_argument("--run-dir", default="runs/demo", help="where every report and checkpoint goes")
    parser.add_argument("--preset", default="tiny-moe")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    run_dir = Path(args.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    foundation_stage(run_dir, args.preset, args.seed)
    return 0

"""Fuse LoRA adapters into a base model: dequantize, merge, re-quantize (8 bits by default), and
check that the fine-tune survived before writing anything.

    lfm-mlx fuse --model MIXED_DIR --adapter-path ADAPTERS --save-path FUSED --rows repair_datasets/NAME
    lfm-mlx fuse ... --bits 4 --scope all --suite router --force

What it does and checks: lfm_mlx.fuse.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from lfm_mlx import console
from lfm_mlx.errors import debugging
from lfm_mlx.fsutil import atomic_write_json
from lfm_mlx.fuse.fidelity import FidelityError, Thresholds
from lfm_mlx.fuse.run import format_report, fuse
from lfm_mlx.fuse.weights import SCOPES


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lfm-mlx fuse", description=" ".join(__doc__.split("\n\n")[0].split()))
    parser.add_argument("--model", required=True, help="base model directory the adapters were trained on")
    parser.add_argument("--adapter-path", required=True, help="LoRA directory (adapter_config.json + adapters.safetensors)")
    parser.add_argument("--save-path", required=True, help="fused model directory to write (atomically)")
    parser.add_argument("--bits", default="8", choices=["8", "6", "4", "bf16"], help="storage of quantized layers (default 8)")
    parser.add_argument("--scope", default="experts", choices=SCOPES,
                        help="experts: quantize expert projections only (default); all: every layer but routers and norms")
    parser.add_argument("--group-size", type=int, default=64, choices=[32, 64, 128])
    prompts = parser.add_mutually_exclusive_group(required=True)
    prompts.add_argument("--rows", help="held-out chat rows: a repair-set directory (test.jsonl) or a JSONL file")
    prompts.add_argument("--suite", help="an eval suite (shipped name or JSON file) whose prompts to score")
    parser.add_argument("--max-prompts", type=int, default=32, help="use at most this many rows / cases")
    parser.add_argument("--new-tokens", type=int, default=32, help="greedy continuation scored per suite prompt")
    defaults = Thresholds()
    parser.add_argument("--min-top1", type=float, default=defaults.min_top1,
                        help="minimum top-1 agreement on decisive positions (default 0.95)")
    parser.add_argument("--min-survival", type=float, default=defaults.min_survival,
                        help="minimum per-layer delta survival (default 0.5)")
    parser.add_argument("--min-answers", type=float, default=defaults.min_answer_agreement,
                        help="minimum share of answers reproduced at every decisive position (default 0.9)")
    parser.add_argument("--min-kept", type=float, default=defaults.min_kept,
                        help="minimum share of the fine-tune kept, 1 - KL(fused)/KL(base) (default 0.8)")
    parser.add_argument("--max-kl", type=float, default=None, help="maximum mean KL in nats per token (default: not gated)")
    parser.add_argument("--force", action="store_true", help="write the fused model even when the fidelity gate fails")
    parser.add_argument("--report", help="also write the fidelity report JSON here")
    console.add_quiet(parser)
    args = parser.parse_args(argv)
    thresholds = Thresholds(min_top1=args.min_top1, min_survival=args.min_survival,
                            min_answer_agreement=args.min_answers, min_kept=args.min_kept,
                            max_kl=args.max_kl)
    stored = "nothing quantized (bf16)" if args.bits == "bf16" else (
        f"{'expert projections' if args.scope == 'experts' else 'every layer but routers and norms'} at "
        f"{args.bits} bits (group {args.group_size})")
    console.say("fuse", f"merging {args.adapter_path} into {args.model} on {console.where()}; {stored}; fidelity on up "
                        f"to {args.max_prompts} prompt(s) of {args.rows or args.suite}; writing {args.save_path}"
                        + (" even if the gate fails (--force)" if args.force else " if the gate passes"), args.quiet)
    try:
        report = fuse(args.model, args.adapter_path, args.save_path, args.bits, args.scope, args.group_size,
                      args.rows, args.suite, args.max_prompts, args.new_tokens, thresholds, args.force,
                      progress=not args.quiet, log=lambda line: console.say("fuse", line, args.quiet))
    except FidelityError as err:
        print(format_report(err.report), file=sys.stderr)
        print(f"lfm-mlx fuse: {err}", file=sys.stderr)
        if args.report:
            atomic_write_json(args.report, err.report)
        return 1
    except (ValueError, FileNotFoundError) as err:
        if debugging():
            raise
        print(f"lfm-mlx fuse: {err}", file=sys.stderr)
        return 2
    if args.report:
        atomic_write_json(args.report, report)
    if not args.quiet:
        print(format_report(report))
    fused = report["adapter_vs_fused"]
    print(f"fused model: {args.save_path} ({report['size_bytes'] / 1e9:.3f} GB; fidelity "
          f"{'passed' if report['passed'] else 'FAILED, written anyway (--force)'}: top-1 "
          f"{fused['top1_agreement']:.4f}, fine-tune kept {report['fine_tune_kept']}; report "
          f"{Path(args.save_path) / 'fidelity.json'})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())


"""`lfm-mlx sweep` / `python -m lfm_mlx.sweep`: the command line."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from lfm_mlx import console
from lfm_mlx.memory import MemoryBudget
from lfm_mlx.model.moe import expert_kernel
from lfm_mlx.sweep.config import DEFAULT_SIZES, EXIT_BAD_INPUT, EXIT_NOTHING_FITS, PLOT_NAME, REPORT_NAME, SweepConfig
from lfm_mlx.sweep.run import run_sweep
from lfm_mlx.sweep.report import format_table, plot_sweep
from lfm_mlx.train import distributed


def _sizes(text: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give comma-separated integers, e.g. 1,2,4,6") from None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="lfm-mlx sweep", description="Group-size memory and time sweep of grouped MoE training, with a "
        "calibrated memory model: which group size fits the budget, and how fast it runs.",
        epilog=f"Writes OUT/{REPORT_NAME} and OUT/{PLOT_NAME}. Exit codes: 0 done, {EXIT_BAD_INPUT} bad input, "
               f"{EXIT_NOTHING_FITS} no group size fits the budget.")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", help="model directory (mixed int8-expert, or bf16/HF) or hub id")
    source.add_argument("--preset", help="synthetic preset built in memory: tiny-moe or lfm2.5-8b-a1b")
    parser.add_argument("--data", help="JSONL chat rows: the longest (up to --seq-len tokens) is the step's batch")
    parser.add_argument("--seq-len", type=int, default=10240, help="tokens of the random example, or the token "
                        "cap with --data (default 10240)")
    parser.add_argument("--group-sizes", type=_sizes, default=list(DEFAULT_SIZES), help="default 1,2,4,6,8,11")
    parser.add_argument("--steps", type=int, default=3, help="steps per size; the first is a warm-up (default 3)")
    parser.add_argument("--optimizer", default="adamw", choices=["adamw", "adafactor"])
    parser.add_argument("--master-dtype", default="split", choices=["split", "float32", "compute", "compute-stochastic"])
    parser.add_argument("--expert-kernel", default="auto", choices=["auto", "qmm", "dequant", "blocks"],
                        help="how the frozen int8 experts run (README glossary; default auto: measured)")
    parser.add_argument("--frozen-path", choices=["auto", "qmm", "dequant", "batched", "blocks"],
                        help=argparse.SUPPRESS)  # --expert-kernel's name before issue 28
    parser.add_argument("--calibrate", default="fit", help="fit (each size from the smaller ones measured before "
                        "it; the first calibrates itself), none, or a global factor (default fit)")
    parser.add_argument("--budget-gb", type=float, default=64.0, help="machine memory (default 64)")
    parser.add_argument("--soft-gb", type=float, default=54.0, help="soft limit (default 54)")
    parser.add_argument("--hard-gb", type=float, default=60.0, help="hard stop (default 60)")
    parser.add_argument("--out", default="runs/sweep", help="output directory (default runs/sweep)")
    parser.add_argument("--seed", type=int, default=0)
    console.add_quiet(parser)
    args = parser.parse_args(argv)
    if args.frozen_path is not None:
        console.deprecated("expert_kernel", "--frozen-path is deprecated; use --expert-kernel (same values; "
                                            "'batched' is now 'blocks')")
        args.expert_kernel = expert_kernel(args.frozen_path, warn=False)
    main_rank = distributed.init().main  # under mlx.launch rank 0 alone prints and writes
    args.quiet = args.quiet or not main_rank
    try:
        budget = MemoryBudget(total_gb=args.budget_gb, soft_gb=args.soft_gb, hard_gb=args.hard_gb)
        cfg = SweepConfig(model=args.model, preset=args.preset, data=args.data, seq_len=args.seq_len,
                          group_sizes=args.group_sizes, steps=args.steps, optimizer=args.optimizer,
                          master_dtype=args.master_dtype, expert_kernel=args.expert_kernel, calibrate=args.calibrate,
                          budget=budget, out=args.out, seed=args.seed)
        cfg.check()
        console.say("sweep", f"group sizes {','.join(map(str, sorted(set(cfg.group_sizes))))} of "
                             f"{cfg.model or 'preset ' + cfg.preset} on {console.where()}: {cfg.steps} step(s) each of "
                             + (f"the longest row of {cfg.data} (at most {cfg.seq_len} tokens)" if cfg.data else
                                f"{cfg.seq_len} random tokens")
                             + f", {cfg.optimizer}, masters {cfg.master_dtype}, experts {cfg.expert_kernel}; memory "
                               f"soft/hard {args.soft_gb:g}/{args.hard_gb:g} GB of {args.budget_gb:g} (machine "
                               f"{console.machine_gb():.1f} GB); writing {cfg.out}", args.quiet)
        report = run_sweep(cfg, log=lambda line: console.say("sweep", line, args.quiet))
    except (ValueError, FileNotFoundError) as err:
        print(f"lfm-mlx sweep: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    json_path = Path(cfg.out) / REPORT_NAME
    if not main_rank:
        return 0 if report["last_safe_size"] is not None else EXIT_NOTHING_FITS
    if not args.quiet:
        print(format_table(report))
    try:
        plot = str(plot_sweep(json_path, Path(cfg.out) / PLOT_NAME))
    except ImportError as err:  # a bare accelerator box; the plot is made from the JSON, so make it later
        plot = f"not made ({err}); run lfm_mlx.sweep.plot_sweep('{json_path}') where matplotlib is installed"
    safe = report["last_safe_size"]
    print(f"sweep: {'largest group size within the budget: ' + str(safe) if safe is not None else 'no group size fits'}"
          f"; report {json_path}, plot {plot}")
    return 0 if safe is not None else EXIT_NOTHING_FITS

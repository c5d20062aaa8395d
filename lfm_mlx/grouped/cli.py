"""`lfm-mlx train CONFIG`: the command line of grouped training."""

from __future__ import annotations

import argparse
import json
import sys

from lfm_mlx import console
from lfm_mlx.errors import UserError, debugging
from lfm_mlx.grouped.config import CHANGEABLE_ON_RESUME, ConfigError, TrainConfig
from lfm_mlx.grouped.run import NonFiniteStop
from lfm_mlx.grouped.trainer import GroupedMoETrainer
from lfm_mlx.memory import MemoryBudgetExceeded, MemoryHardStop
from lfm_mlx.train import distributed


EXIT_CONFIG, EXIT_OVER_BUDGET = 2, 3


def _parse_overrides(items: list[str]) -> dict:
    import yaml

    overrides = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: use KEY=VALUE, e.g. --set learning_rate=2e-5 "
                              "or --set memory.hard_gb=50")
        key, value = item.split("=", 1)
        overrides[key.strip()] = yaml.safe_load(value)
    return overrides


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="lfm-mlx train", description="Grouped MoE training of an LFM2-MoE mixed checkpoint from a YAML config.",
        epilog="Resumes from the newest checkpoint in run_dir when there is one. Exit codes: 0 done, "
               f"{EXIT_CONFIG} bad config or data, {EXIT_OVER_BUDGET} refused by the memory admission check, "
               f"{NonFiniteStop.exit_code} too many non-finite steps, {MemoryHardStop.exit_code} memory hard stop "
               "(checkpoint saved; resume with a smaller setting).")
    parser.add_argument("config", help="YAML file with TrainConfig keys (model, data, run_dir, ...)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key (repeatable; nested keys with dots: memory.hard_gb=50)")
    parser.add_argument("--restart", action="store_true", help="discard run_dir's checkpoints and start over")
    parser.add_argument("--allow-config-change", action="append", default=[], metavar="KEY",
                        choices=CHANGEABLE_ON_RESUME,
                        help="resume although KEY changed (repeatable; recorded in metrics.jsonl, the checkpoints "
                             f"and summary.json): {', '.join(CHANGEABLE_ON_RESUME)}")
    parser.add_argument("--no-progress", action="store_true", help="no start line, no progress")
    console.add_quiet(parser)
    parser.add_argument("--print-config", action="store_true", help="print the validated config and exit")
    args = parser.parse_args(argv)
    try:
        overrides = _parse_overrides(args.overrides)
        if args.no_progress or args.quiet:
            overrides["progress"] = False
        config = TrainConfig.from_yaml(args.config, overrides)
    except UserError as err:
        if debugging():
            raise
        print(f"lfm-mlx train: {err}", file=sys.stderr)
        return EXIT_CONFIG
    if args.print_config:
        print(json.dumps(config.model_dump(mode="json"), indent=2))
        return 0
    try:
        result = GroupedMoETrainer(config, allow_config_change=args.allow_config_change).train(restart=args.restart)
    except (UserError, FileNotFoundError) as err:  # a user's mistake: one message, exit 2
        if debugging():
            raise
        print(f"lfm-mlx train: {err}", file=sys.stderr)
        return EXIT_CONFIG
    except MemoryBudgetExceeded as err:
        print(f"lfm-mlx train: refused: {err}", file=sys.stderr)
        return EXIT_OVER_BUDGET
    except (MemoryHardStop, NonFiniteStop) as err:
        print(f"lfm-mlx train: {err}", file=sys.stderr)
        return err.exit_code
    if not distributed.init().main:  # rank 0 prints (and holds run_dir/data_manifest.json)
        return 0
    manifest = json.loads((result.run_dir / "data_manifest.json").read_text())
    dropped = {reason: n for reason, n in manifest["dropped"].items() if n}
    rows = f"rows {manifest['kept']} of {manifest['rows_read']}" + (
        f", dropped {dropped} (run_dir/data_manifest.json lists them)" if dropped else "")
    print(f"trained model: {result.model_dir}  (steps {result.steps}, skipped {result.skipped_steps}, "
          f"valid loss {result.initial_valid_loss} -> {result.final_valid_loss}; {rows})")
    return 0

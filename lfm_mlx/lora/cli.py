"""LoRA repair passes on LFM2 / LFM2-MoE models (bf16 or mixed int8-expert bases), on mlx_lm.tuner.

    lfm-mlx lora CONFIG.yaml [--rank 8 --learning-rate 5e-5 ...]   (CLI > YAML > defaults; the keys: lfm_mlx.lora)
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path
from typing import Any

from lfm_mlx import console
from lfm_mlx.errors import debugging
from lfm_mlx.lora.config import LoraConfig, load_config
from lfm_mlx.lora.train import NonFiniteStop, train_lora
from lfm_mlx.train import distributed


def _parse_value(text: str) -> Any:
    """A CLI value read as YAML, so `--layers 4`, `--modules [attention,experts]`, `--alpha null` work."""
    import yaml

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="lfm-mlx lora", description=" ".join(__doc__.split("\n\n")[0].split()),
        epilog="Every config key is also a flag (--learning-rate 5e-5, --modules '[attention, experts]'); "
               "flags override the YAML file, which overrides the defaults.",
    )
    parser.add_argument("config", nargs="?", help="YAML config file")
    for f in dataclasses.fields(LoraConfig):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        parser.add_argument(f"--{f.name.replace('_', '-')}", dest=f.name, type=_parse_value,
                            default=argparse.SUPPRESS, metavar="VALUE", help=f"(default: {default!r})")
    console.add_quiet(parser)
    args = vars(parser.parse_args(argv))
    path = args.pop("config", None)
    if args.pop("quiet"):
        args["progress"] = False
    try:
        config = load_config(path, args)
        summary = train_lora(config)
    except (ValueError, FileNotFoundError, FileExistsError) as err:
        if debugging():
            raise
        print(f"lfm-mlx lora: {err}", file=sys.stderr)
        return 2
    except NonFiniteStop as err:
        print(f"lfm-mlx lora: {err}", file=sys.stderr)
        return NonFiniteStop.exit_code
    if distributed.init().main:  # one line per job, not one per rank; the numbers are in summary.json
        best = f"best step {summary['best_step']} of {summary['steps']}, valid loss {summary['best_val_loss']:.4f}" \
            if summary["best_val_loss"] is not None else f"{summary['steps']} steps, no validation rows"
        test = f", test loss {summary['test_loss']:.4f}" if summary["test_loss"] is not None else ""
        print(f"adapters: {Path(config.out_dir) / 'adapters.safetensors'} ({best}{test}, skipped "
              f"{summary['skipped_steps']}; summary {Path(config.out_dir) / 'summary.json'})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""`python -m lfm_mlx.data ROWS.jsonl --model DIR`: validate, render, mask and split a row file."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from lfm_mlx.data.rows import DEFAULT_MAX_TOKENS, RowValidationError, validate_rows
from lfm_mlx.data.encode import trained_spans
from lfm_mlx.data.dataset import build_dataset


def main(argv: list[str] | None = None) -> int:
    """`python -m lfm_mlx.data ROWS.jsonl --model DIR`: validate, render, mask and split; print
    the manifest summary and the trained text of a few examples."""
    parser = argparse.ArgumentParser(prog="python -m lfm_mlx.data", description=main.__doc__.split(":")[0])
    parser.add_argument("rows", nargs="+", help="JSONL file(s) of chat rows")
    parser.add_argument("--model", required=True, help="model directory whose tokenizer and chat template render the rows")
    parser.add_argument("--max-tokens", type=int, default=DEFAULT_MAX_TOKENS, help="per-example token cap")
    parser.add_argument("--splits", type=float, nargs=3, default=(0.9, 0.05, 0.05), metavar=("TRAIN", "VALID", "TEST"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip-invalid", action="store_true", help="drop and count invalid rows instead of failing")
    parser.add_argument("--manifest", help="write the manifest JSON here")
    parser.add_argument("--show", type=int, default=1, help="print the trained spans of this many train examples")
    args = parser.parse_args(argv)
    try:
        validate_rows(args.rows, skip_invalid=args.skip_invalid)  # fail fast, before the tokenizer loads
    except (RowValidationError, FileNotFoundError) as error:
        print(error)
        return 2
    from mlx_lm.tokenizer_utils import load as load_tokenizer

    tokenizer = load_tokenizer(Path(args.model))
    dataset = build_dataset(args.rows, tokenizer, args.max_tokens, tuple(args.splits), args.seed, args.skip_invalid)
    if args.manifest:
        dataset.write_manifest(args.manifest)
    keys = ("rows_read", "kept", "dropped", "splits", "trainable_tokens", "token_lengths")
    summary = {key: dataset.manifest[key] for key in keys}
    print(json.dumps(summary, indent=2))
    for example in dataset.train[: args.show]:
        print(f"--- {example.row_id}: trained spans")
        for span in trained_spans(example, tokenizer):
            print(repr(span))
    return 0

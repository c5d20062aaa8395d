"""A synthetic tool-use task for the demo: two tool surfaces, a seeded row generator, held-out suites.

    python -m lfm_mlx.task OUT_DIR --rows 600 --seed 0
"""

from __future__ import annotations

import argparse

from lfm_mlx.demo.task.build import write_task
from lfm_mlx.demo.task.surfaces import SURFACES


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lfm_mlx.task", description=" ".join(__doc__.split("\n\n")[0].split()))
    parser.add_argument("out_dir", help="directory for train.jsonl, suite.json and suite_dev.json")
    parser.add_argument("--rows", type=int, default=600, help="training rows to write")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--per-category", type=int, default=10, help="suite cases per category")
    parser.add_argument("--tools-per-row", type=int, default=2, help="tools listed per row / case (the needed one + distractors)")
    parser.add_argument("--surface", default="task", choices=sorted(SURFACES))
    args = parser.parse_args(argv)
    paths = write_task(args.out_dir, args.rows, args.seed, args.per_category, args.tools_per_row, args.surface)
    for key, path in paths.items():
        print(f"{key}: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())


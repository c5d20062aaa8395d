# `python -m lfm_mlx.task` as README records it: the task now lives in lfm_mlx.demo.task.
from lfm_mlx.demo.task.cli import main

if __name__ == "__main__":
    raise SystemExit(main())

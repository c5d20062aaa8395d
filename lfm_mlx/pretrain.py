# `python -m lfm_mlx.pretrain`, the command the shipped base's pretrain.json and README record: now lfm_mlx.demo.pretrain.
from lfm_mlx.demo.pretrain import main

if __name__ == "__main__":
    raise SystemExit(main())

"""Moved to `lfm_mlx.model.io`; kept only for `lfm_mlx/pretrain.py` (the demo's, being moved to demo/ by
another change, which will import `lfm_mlx.model.io`): delete with that move."""

from lfm_mlx.model.io import load, read_config, save_model_dir  # noqa: F401

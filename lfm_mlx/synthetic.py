"""Moved to `lfm_mlx.model.synthetic`; kept only for `lfm_mlx/pretrain.py` (the demo's, being moved to demo/
by another change, which will import `lfm_mlx.model.synthetic`): delete with that move."""

from lfm_mlx.model.synthetic import PRESETS, write_synthetic_model  # noqa: F401

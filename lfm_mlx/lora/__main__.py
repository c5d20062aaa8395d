"""`python -m lfm_mlx.lora`: the same as `lfm-mlx lora`."""

from lfm_mlx.lora.cli import main

raise SystemExit(main())

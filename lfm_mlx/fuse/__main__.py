"""`python -m lfm_mlx.fuse`: the same as `lfm-mlx fuse`."""

from lfm_mlx.fuse.cli import main

raise SystemExit(main())

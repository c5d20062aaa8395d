"""`python -m lfm_mlx.data`."""

from lfm_mlx.data.cli import main

raise SystemExit(main())

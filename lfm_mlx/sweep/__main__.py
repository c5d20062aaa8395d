"""`python -m lfm_mlx.sweep`."""

import sys

from lfm_mlx.sweep.cli import main

sys.exit(main())

"""`python -m lfm_mlx.evaluate`: the same as `lfm-mlx eval`."""

import sys

from lfm_mlx.evaluate.cli import main

sys.exit(main())

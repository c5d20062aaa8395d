"""`python -m lfm_mlx.grouped CONFIG`: the same as `lfm-mlx train CONFIG`."""

import sys

from lfm_mlx.grouped.cli import main

sys.exit(main())

import sys

from lfm_mlx.cli import main

sys.exit(main())

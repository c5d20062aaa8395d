"""`python -m lfm_mlx.demo.task` (or `python -m lfm_mlx.task`): writes the demo task's rows and suites."""

from lfm_mlx.demo.task.cli import main

raise SystemExit(main())

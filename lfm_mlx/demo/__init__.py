"""The demo: the synthetic tool-use task, the pre-trained base it starts from and the end-to-end run
(`lfm-mlx demo`). The library never imports it.

    run       the stages in order (mix, grouped training, repair, fuse, GGUF, evals beside training)
    summary   the summary table, the fidelity verdicts, the plots
    task/     the tool surfaces, rows and held-out suites (`python -m lfm_mlx.task`)
    pretrain  the base's pre-training on the `pretrain` surface (`python -m lfm_mlx.pretrain`)
    bases/    the shipped base, demo-moe-wide
"""

from lfm_mlx.demo.run import (STAGES, TASK_WEIGHTS, DemoConfig, StageLog, bfcl_slice, demo_memory_budget, eval_job,
                              grouped_config, lora_settings, main, repair_rows, run_demo)
from lfm_mlx.demo.summary import (LEGEND, bfcl_text, environment_line, fidelity_summary, make_plots, peak_rss_gb,
                                  summary_text)

__all__ = [
    "LEGEND", "STAGES", "TASK_WEIGHTS", "DemoConfig", "StageLog", "bfcl_slice", "bfcl_text", "demo_memory_budget",
    "environment_line", "eval_job", "fidelity_summary", "grouped_config", "lora_settings", "main", "make_plots",
    "peak_rss_gb", "repair_rows", "run_demo", "summary_text",
]

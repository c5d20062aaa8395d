# %% [markdown]
# # lfm_mlx from Python: grouped MoE training, evaluation, a repair set
#
# Run it as a script (`python examples/notebook_pipeline.py`) or cell by cell in a notebook.
# It uses a synthetic tiny LFM2-MoE so it runs anywhere in a few minutes; for a real model, point
# `BASE` at a downloaded LFM2.5-8B-A1B directory and use the settings of
# `examples/lfm2.5-8b-a1b-mac64.yaml` (run `python -m lfm_mlx.sweep` first).

# %%
from pathlib import Path

from lfm_mlx import GroupedMoETrainer, GroupSchedule, TrainConfig, mix, write_synthetic_model
from lfm_mlx.demo.task import write_task
from lfm_mlx.evaluate import evaluate_model
from lfm_mlx.repair import build_repair_set

WORK = Path("runs/notebook")
BASE = write_synthetic_model(WORK / "base", "tiny-moe", seed=0)  # or your HF directory

# %% Mixed checkpoint: experts int8, routers and everything else bf16
report = mix(BASE, WORK / "mixed")
print(f"mixed checkpoint: {report['total_bytes'] / 1e6:.2f} MB, experts {report['categories']['experts']['share']:.0%}")

# %% Training rows (OpenAI chat form with tool_calls) and a held-out eval suite
task = write_task(WORK / "task", rows=200, seed=0, per_category=3)

# %% Which MoE layers train together
print(GroupSchedule.for_model(WORK / "mixed", size=4, stride=3))

# %% Grouped MoE training: experts + routers of one group at a time, requantized after each group
config = TrainConfig(
    model=str(WORK / "mixed"), data=[str(task["train"])], run_dir=str(WORK / "grouped"),
    max_tokens=1024, splits=(0.9, 0.1, 0.0), group_size=4, group_stride=3, epochs=1,
    steps_per_group=10, batch_size=4, learning_rate=3e-3,
    memory={"total_gb": 16, "soft_gb": 10, "hard_gb": 12},  # the watchdog: refuse, warn, stop
)
result = GroupedMoETrainer(config).train()
print(f"validation loss {result.initial_valid_loss:.3f} -> {result.final_valid_loss:.3f}; model in {result.model_dir}")

# %% Evaluate on the held-out suite and on the dev suite (the repair set comes from the dev failures)
held_out = evaluate_model(result.model_dir, [task["suite"]], WORK / "eval" / "held_out", max_tokens=48)
dev = evaluate_model(result.model_dir, [task["suite_dev"]], WORK / "eval" / "dev", max_tokens=48)
# Expect 0.0 here: a randomly initialized tiny-moe learns no tool calls in a few steps. `lfm-mlx demo`
# runs the same stages from a pre-trained base and shows the learning (README, Status).
print("held-out pass rate:", held_out["metrics"]["pass_rate"], "(0.0 expected on a random tiny-moe)")

# %% A repair set: structured rows with assistant.tool_calls, built from the dev failures
manifest = build_repair_set(WORK / "eval" / "dev" / "report.json", "notebook", WORK / "repair_datasets",
                            suites=[task["suite_dev"]], force=True)
splits = manifest.get("counts", manifest.get("splits"))
print("repair rows per split:", {name: split["rows"] for name, split in splits.items()})
# Next: `lfm-mlx lora` on WORK/repair_datasets/notebook, then `lfm-mlx fuse` (see README).

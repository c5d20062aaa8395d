"""Ablation: which training learns the demo's tool surface, and what does each cost the base?

On the demo's task (rows, held-out and paraphrase suites) from the demo's base, with one budget of
optimizer steps (batch 4) for every arm:
- grouped:           grouped MoE training alone (experts + routers, AdamW), the whole budget
- grouped-adafactor: the same with Adafactor
- lora-all:          LoRA on every module of the mixed base, the whole budget
- lora-experts:      LoRA on the experts only
- pipeline:          the demo's way: grouped training, then a LoRA repair on the dev suite's failures
                     (the demo's step counts; the budget is their sum)
Each arm reports the held-out and paraphrase pass rates, and the mean KL(base || tuned) per token on
a general held-out set: rows of the base's own pre-training surface (its tools and chat, seed 1),
which no arm trains on. A low KL means the arm left the base's other abilities alone.

    python benchmarks/learning.py                 # CPU size: 600 task rows, a 150-step repair
    python benchmarks/learning.py --gpu           # 1,800 rows, two grouped epochs, a 600-step repair

Writes benchmarks/results/learning-<device>.json and prints the table.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from dataclasses import asdict, replace
from pathlib import Path

import lfm_mlx  # noqa: F401  (first: it loads OpenBLAS before mlx.core on Linux)
import mlx.core as mx

from lfm_mlx.demo import DemoConfig, environment_line, grouped_config, lora_settings, repair_rows
from lfm_mlx.demo.pretrain import shipped_base
from lfm_mlx.demo.task import generate_rows, write_task
from lfm_mlx.evaluate import MLXBackend, evaluate
from lfm_mlx.fsutil import atomic_write_json
from lfm_mlx.grouped import GroupedMoETrainer
from lfm_mlx.lora import train_lora
from lfm_mlx.mixed import mix
from lfm_mlx.report import text_table
from lfm_mlx.train.schedules import GroupSchedule

ARMS = ("grouped", "grouped-adafactor", "lora-all", "lora-experts", "pipeline")
GENERAL_ROWS = 48  # rows of the pre-training surface scored for KL


def general_set(path: Path) -> Path:
    """Held-out rows of the base's own surface (another seed than pre-training's)."""
    rows = generate_rows(GENERAL_ROWS, seed=1, surface="pretrain")
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def base_reference(base_dir: Path, rows: Path):
    """The base's log-probs on the general set, computed once for every arm's KL."""
    from lfm_mlx.fuse import log_probs, prompts_from_rows

    base = MLXBackend(base_dir)
    sequences = prompts_from_rows(rows, base.tokenizer, limit=GENERAL_ROWS)
    return log_probs(base.model, sequences), sequences


def kl_from_base(reference, tuned_dir: Path, adapter: Path | None) -> float:
    """Mean KL(base || tuned) per scored (assistant) token of the general set."""
    from lfm_mlx.fuse import compare

    log_probs, sequences = reference
    return compare(log_probs, MLXBackend(tuned_dir, adapter).model, sequences)["mean_kl"]


def score(model: Path, adapter: Path | None, task: dict, out: Path, config: DemoConfig) -> dict:
    backend = MLXBackend(model, adapter)
    rates = {}
    for key, name in (("suite", "held_out"), ("suite_paraphrase", "paraphrase")):
        report = evaluate(backend, [task[key]], out / name, max_tokens=config.max_tokens, progress=False)
        rates[name] = report["metrics"]["pass_rate"]
        rates[name + "_per_category"] = {c: v["pass_rate"] for c, v in report["metrics"]["per_category"].items()}
    return rates


def run_arm(arm: str, config: DemoConfig, mixed: Path, task: dict, budget: int, work: Path) -> dict:
    """Train one arm; returns its model directory, adapter (if any), steps and seconds."""
    out, started = work / arm, time.perf_counter()
    model, adapter, steps = mixed, None, 0
    if arm in ("grouped", "grouped-adafactor"):
        groups = len(GroupSchedule.for_model(mixed / "config.json", config.group_size, config.group_stride))
        optimizer = "adafactor" if arm == "grouped-adafactor" else "adamw"
        result = GroupedMoETrainer(grouped_config(config, mixed, task["train"], out, optimizer=optimizer,
                                                  steps_per_group=budget // groups, progress=False)).train(restart=True)
        model, steps = Path(result.model_dir), result.steps
    elif arm in ("lora-all", "lora-experts"):
        modules = ["experts"] if arm == "lora-experts" else ["attention", "conv", "mlp", "experts"]
        adapter = out / "adapters"
        summary = train_lora(lora_settings(config, mixed, [str(task["train"])], adapter, modules=modules,
                                           max_steps=budget, save_every=budget, eval_every=max(budget // 4, 1),
                                           progress=False))
        steps = summary["steps"]
    elif arm == "pipeline":
        result = GroupedMoETrainer(grouped_config(config, mixed, task["train"], out / "grouped",
                                                  progress=False)).train(restart=True)
        model = Path(result.model_dir)
        evaluate(MLXBackend(model), [task["suite_dev"]], out / "dev", max_tokens=config.max_tokens, progress=False)
        rows = repair_rows(config, out / "dev" / "report.json", task, out / "repair_datasets")
        adapter = out / "adapters"
        summary = train_lora(lora_settings(config, model, rows, adapter, progress=False))
        steps = result.steps + summary["steps"]
    return {"model": model, "adapter": adapter, "steps": steps, "train_seconds": round(time.perf_counter() - started, 1)}


def table(results: dict) -> str:
    rows = [{"arm": arm, **{k: v for k, v in r.items() if not k.endswith("per_category")}} for arm, r in results.items()]
    return text_table(rows, ["arm", "held_out", "paraphrase", "kl_from_base", "steps", "train_seconds"],
                      {"held_out": ".0%", "paraphrase": ".0%", "kl_from_base": ".4f", "train_seconds": ".0f"})


def merge(paths: list[str], out: str) -> int:
    """Join the arms of runs made side by side (same task, base and budget) into one JSON and table."""
    runs = [json.loads(Path(p).read_text()) for p in paths]
    budgets = {r["budget_steps"] for r in runs}
    if len(budgets) != 1:
        raise SystemExit(f"the runs had different budgets {sorted(budgets)}; merge only runs of one budget")
    joined = {**runs[0], "arms": {arm: r for run in runs for arm, r in run["arms"].items()}, "merged_from": paths}
    atomic_write_json(out, joined)
    print(table(joined["arms"]))
    print(f"wrote {out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--base", default="", help="pre-trained base directory (default: the shipped demo base)")
    parser.add_argument("--work", default="runs/learning", help="scratch directory for the arms' runs")
    parser.add_argument("--arms", default=",".join(ARMS), help="comma-separated subset of " + ", ".join(ARMS))
    parser.add_argument("--gpu", action="store_true", help="the larger size: 1,800 task rows, two grouped epochs")
    parser.add_argument("--budget", type=int, default=0,
                        help="optimizer steps per arm (default: the pipeline arm's, which then runs first)")
    parser.add_argument("--merge", nargs="+", metavar="JSON", help="only join the arms of earlier runs' JSON files")
    parser.add_argument("--out", help="JSON path (default: benchmarks/results/learning-<cpu|gpu>.json)")
    args = parser.parse_args(argv)
    if args.merge:
        return merge(args.merge, args.out or str(Path(__file__).parent / "results" / "learning-cpu.json"))
    # CPU size: two thirds of the demo's rows and half its repair steps (about half an hour on 2 cores)
    # LoRA on the int8 experts, as results/learning-cpu.json was measured (the demo now trains on float copies)
    config = DemoConfig(run_dir=args.work, base=args.base, task_rows=600, lora_steps=150, lora_float_experts=False)
    if args.gpu:
        config = replace(config, task_rows=1800, epochs=2, lora_steps=600)
    arms = [a for a in args.arms.split(",") if a]
    unknown = sorted(set(arms) - set(ARMS))
    if unknown:
        parser.error(f"unknown arms {unknown}; choose from {', '.join(ARMS)}")
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    base = Path(config.base) if config.base else shipped_base()
    print(environment_line(), flush=True)
    task = write_task(work / "task", rows=config.task_rows, seed=config.seed, per_category=config.cases_per_category,
                      weights=config.category_weights, full_traces=config.full_traces)
    mixed = work / "mixed"
    mix(base, mixed)
    reference = base_reference(mixed, general_set(work / "general.jsonl"))
    # The budget: the pipeline's steps (one grouped pass per group, then the LoRA repair).
    pipeline = run_arm("pipeline", config, mixed, task, 0, work) if "pipeline" in arms else None
    budget = args.budget or (pipeline["steps"] if pipeline else 0)
    if not budget:
        parser.error("without the pipeline arm, give --budget (optimizer steps per arm)")
    results = {}
    for arm in arms:
        trained = pipeline if arm == "pipeline" else run_arm(arm, config, mixed, task, budget, work)
        entry = score(trained["model"], trained["adapter"], task, work / arm / "eval", config)
        entry["kl_from_base"] = kl_from_base(reference, trained["model"], trained["adapter"])
        entry.update(steps=trained["steps"], train_seconds=trained["train_seconds"])
        results[arm] = entry
        print(f"{arm}: held-out {entry['held_out']:.0%}, paraphrase {entry['paraphrase']:.0%}, "
              f"KL from base {entry['kl_from_base']:.4f}, {entry['steps']} steps, {entry['train_seconds']:.0f} s", flush=True)
    print(table(results))
    device = "gpu" if mx.default_device() == mx.gpu else "cpu"
    out = Path(args.out or Path(__file__).parent / "results" / f"learning-{device}.json")
    atomic_write_json(out, {"benchmark": "learning", "environment": environment_line(), "machine": platform.platform(),
                            "mlx": mx.__version__, "base": str(base), "config": asdict(config), "budget_steps": budget,
                            "arms": results})
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

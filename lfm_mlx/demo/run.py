"""`lfm-mlx demo`: the whole pipeline end to end on a synthetic tiny LFM2-MoE, on CPU in minutes.

base (pre-trained on another tool surface, shipped: lfm_mlx/demo/bases/demo-moe-wide) -> mix (experts int8) -> eval ->
grouped MoE training on the task -> eval -> repair set from the failures -> LoRA repair -> eval ->
fuse to 8 bits (and to 4 bits, which the fidelity check refuses where it changes the fine-tune's
answers) -> eval -> GGUF export ->
eval through llama.cpp. Every stage writes its reports into the run directory; the summary table
and the plots are made from those JSON files (`summary`).

The stages' modules are imported inside the functions that run them: the evaluation worker, a spawned
process, imports this module and needs none of them.
"""

from __future__ import annotations

import argparse
import importlib.util
import multiprocessing
import resource
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

from lfm_mlx import console
from lfm_mlx.demo.summary import environment_line, fidelity_summary, make_plots, peak_rss_gb, summary_text
from lfm_mlx.fsutil import atomic_write_json, atomic_write_text

STAGES = ("base", "trained", "repaired", "fused 8-bit", "gguf (llama.cpp)")
TASK_WEIGHTS = {"browser": 1.0, "terminal": 1.0, "file": 1.0, "apps": 1.0, "no_tool": 2.5, "finalization": 1.0}


@dataclass
class DemoConfig:
    """Every knob of the demo (the test suite runs these defaults); `quick()` is a shortened smoke run."""

    run_dir: str = "runs/demo"
    base: str = ""  # a pre-trained LFM2-MoE directory; empty: the shipped lfm_mlx/demo/bases/demo-moe-wide
    seed: int = 0
    # Chosen by held-out pass rates measured on this 2-core box with the shipped base (README, Status)
    task_rows: int = 900
    # The training rows' category mix: the plain answers (small talk, how-to) gain most from more rows
    category_weights: dict = field(default_factory=lambda: dict(TASK_WEIGHTS))
    # A call's row goes on to the tool result and the answer from it: finalization 31% -> 75%
    full_traces: bool = True
    cases_per_category: int = 16  # 6 categories: 96 held-out cases, one case about a point
    # One group over the tiny model's five MoE layers (the 8B recipe keeps groups of 4): each row
    # trains every expert once, in fewer steps than overlapping groups of 4 at stride 3
    group_size: int = 5
    group_stride: int = 5
    epochs: int = 1
    train_lr: float = 1e-3  # 2e-3 (groups of 4, half the rows each): 34%
    # Fixed rather than "auto" (timed at start-up): the paths sum in other orders, and a timing
    # choice could give two runs on one machine other weights.
    expert_kernel: str = "qmm"
    # 500 steps: held-out mean 89.6% over task seeds 0-2 against 88.2% at 300 (docs/benchmarks.md); the
    # batched evaluations made room for them inside 10 minutes (9.1 min on the 2-core box)
    lora_steps: int = 500
    lora_lr: float = 1e-3  # 300 steps: 81% against 80% for 150 steps at 5e-4 (validation loss 0.050 against 0.066)
    lora_rank: int = 16
    # The adapters train on float32 copies of the int8 experts (the same weights): MLX's CPU backend runs
    # quantized expert matmuls slowly, and this keeps the demo inside 10 minutes (LoRA ~1.6x faster)
    lora_float_experts: bool = True
    max_tokens: int = 48  # generation budget per eval case
    gguf_outtype: str = "f32"
    # BFCL v4's data (`pip download --no-deps bfcl-eval`): a slice scored on the base and the fused model,
    # to show what the fine-tune cost general tool calling. Empty: skipped, with the recipe printed.
    bfcl_data: str = ""
    bfcl_per_category: int = 20
    progress: bool = True  # stage lines and the stages' progress; --quiet leaves errors and the summary

    @classmethod
    def quick(cls, run_dir: str) -> "DemoConfig":
        return cls(run_dir=run_dir, task_rows=400, cases_per_category=3, lora_steps=100)


@dataclass
class StageLog:
    """Wall time and peak memory per stage, as the summary reports them."""

    rows: list[dict] = field(default_factory=list)
    show: bool = True

    def record(self, name: str, started: float, **extra) -> None:
        import mlx.core as mx

        peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)
        self.rows.append({"stage": name, "seconds": round(time.perf_counter() - started, 2),
                          "process_peak_gb": peak_rss / 1e9, "mlx_peak_gb": mx.get_peak_memory() / 1e9, **extra})
        if self.show:
            print(f"[demo] {name}: {self.rows[-1]['seconds']:.1f} s", flush=True)


def _eval(backend, suite: Path, out_dir: Path, max_tokens: int, progress: bool = True) -> dict:
    from lfm_mlx.evaluate import evaluate

    return evaluate(backend, [suite], out_dir, max_tokens=max_tokens, progress=progress)


def _stage_suites(task: dict[str, Path], out_dir: Path) -> list[tuple[Path, Path]]:
    """(suite, report dir) of one stage: the held-out test suite, then the paraphrase suite (held-out wording)."""
    return [(task["suite"], out_dir), (task["suite_paraphrase"], out_dir.with_name(out_dir.name + "_paraphrase"))]


def eval_job(model: Path, adapter: Path | None, jobs: list[tuple[Path, Path]], max_tokens: int) -> tuple[list[dict], float]:
    """One model on several suites, in the evaluation worker; returns the reports and the seconds taken."""
    from lfm_mlx import cpu_blas
    from lfm_mlx.evaluate import MLXBackend, evaluate

    started = time.perf_counter()
    cpu_blas.set_threads(1)
    backend = MLXBackend(model, adapter)
    reports = [evaluate(backend, [suite], out, max_tokens=max_tokens, progress=False) for suite, out in jobs]
    return reports, time.perf_counter() - started


def grouped_config(config: DemoConfig, mixed: Path, train_rows: Path, run_dir: Path, **overrides):
    """The grouped MoE training stage's TrainConfig (experts and routers of every group, one pass each)."""
    from lfm_mlx.grouped import TrainConfig

    settings = dict(
        model=str(mixed), data=[str(train_rows)], run_dir=str(run_dir), max_tokens=1024,
        splits=(0.95, 0.05, 0.0), group_size=config.group_size, group_stride=config.group_stride,
        epochs=config.epochs, steps_per_group="epoch", batch_size=4, learning_rate=config.train_lr,
        warmup_steps=5, checkpoint_every=0, seed=config.seed, expert_kernel=config.expert_kernel,
        memory=demo_memory_budget(), progress=config.progress,
    )
    return TrainConfig(**{**settings, **overrides})


def demo_memory_budget() -> dict:
    """24 GB (CI's machine), or this machine's memory when it has less: a budget above the physical
    memory is refused, since its hard stop could never fire. The demo itself peaks under 1 GB."""
    import psutil

    total = min(24.0, round(psutil.virtual_memory().total / 1e9, 1))
    return {"total_gb": total, "soft_gb": round(total * 2 / 3, 1), "hard_gb": round(total * 5 / 6, 1)}


def repair_rows(config: DemoConfig, dev_report: Path, task: dict[str, Path], out_dir: Path) -> list[str]:
    """The LoRA repair's data: a repair set built from the dev suite's failures, plus the task rows."""
    from lfm_mlx.repair import build_repair_set

    build_repair_set(dev_report, "demo", out_dir, suites=[task["suite_dev"]], seed=config.seed, force=True,
                     note="failures of the grouped-trained model on the dev suite, plus passing and no-tool cases")
    return [str(out_dir / "demo" / "train.jsonl"), str(task["train"])]


def lora_settings(config: DemoConfig, model: Path, data: list[str], out_dir: Path, **overrides):
    """The LoRA repair stage's LoraConfig (prompt-masked, every module, the best validation step kept)."""
    from lfm_mlx.lora import LoraConfig

    settings = dict(
        model=str(model), data=data, out_dir=str(out_dir), rank=config.lora_rank, learning_rate=config.lora_lr,
        max_steps=config.lora_steps, batch_size=4, epochs=50, eval_every=max(config.lora_steps // 4, 1), patience=0,
        save_every=config.lora_steps, splits=[0.95, 0.05, 0.0], max_tokens=1024, seed=config.seed, resume=False,
        float_experts=config.lora_float_experts, progress=config.progress,
    )
    return LoraConfig(**{**settings, **overrides})


def run_demo(config: DemoConfig) -> dict:
    """Run every stage; return (and write) the summary.

    The evaluations of the base, the grouped-trained and the repaired model run in a second process
    beside the training that follows them (each process on one BLAS thread: the tiny model's matmuls
    gain nothing from two), which saves minutes on a 2-core machine and changes no result."""
    from lfm_mlx import cpu_blas
    from lfm_mlx.demo.pretrain import shipped_base  # here: `python -m lfm_mlx.demo.pretrain` imports this package first

    if importlib.util.find_spec("llama_cpp") is None:  # the last stage runs the GGUF in llama.cpp
        raise SystemExit("lfm-mlx demo: llama-cpp-python is missing; install it with pip install -e '.[cpu,gguf]'")
    run = Path(config.run_dir)
    run.mkdir(parents=True, exist_ok=True)
    atomic_write_json(run / "demo_config.json", asdict(config))
    log, started = StageLog(show=config.progress), time.perf_counter()
    base = Path(config.base) if config.base else shipped_base()
    if config.progress:
        print(f"[demo] {environment_line()}; base {base}", flush=True)
    threads = cpu_blas.set_threads(1)  # restored at the end: the caller's other work may want them all
    try:
        return _run_stages(config, run, base, log, started)
    finally:
        if threads is not None:
            cpu_blas.set_threads(threads)


@dataclass
class Reports:
    """Each stage's evaluation reports: the held-out test suite's and the paraphrase suite's."""

    held_out: dict[str, dict] = field(default_factory=dict)
    paraphrase: dict[str, dict] = field(default_factory=dict)

    def add(self, name: str, reports) -> None:
        self.held_out[name], self.paraphrase[name] = reports

    def collect(self, name: str, job, log: StageLog) -> None:
        """A worker evaluation's reports into the summary, and the worker's own time into the log."""
        reports, seconds = job.result()
        self.add(name, reports)
        log.record(f"eval {name} (beside training)", started=time.perf_counter() - seconds)


def _run_stages(config: DemoConfig, run: Path, base: Path, log: StageLog, started: float) -> dict:
    """The stages in order; each evaluation in the worker overlaps the stage after the one it evaluates."""
    task, mixed = _task_and_mix(config, run, base, log)
    reports = Reports()
    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as worker:
        def beside(model: Path, adapter: Path | None, name: str):  # an evaluation in the worker
            return worker.submit(eval_job, model, adapter, _stage_suites(task, run / "eval" / name), config.max_tokens)

        base_job = beside(mixed, None, "base")
        trained = _train_grouped(config, run, task, mixed, log)
        reports.collect("base", base_job, log)

        trained_job = beside(trained, None, "trained")
        lora_dir, lora_summary = _repair(config, run, task, trained, log)
        reports.collect("trained", trained_job, log)

        repaired_job = beside(trained, lora_dir, "repaired")
        fused, fidelity8, fidelity4 = _fuse(config, run, task, trained, lora_dir, log)
        gguf_path = _eval_fused_and_gguf(config, run, task, fused, reports, log)
        reports.collect("repaired", repaired_job, log)
    results = {
        "lora": {key: lora_summary.get(key) for key in ("steps", "best_step", "best_val_loss", "warning")},
        "fidelity_8bit": fidelity8,
        "fidelity_4bit": fidelity4,
        "bfcl": bfcl_slice(config, mixed, fused, run / "eval", log),
        "paths": {"base": str(base), "mixed": str(mixed), "trained": str(trained), "adapters": str(lora_dir),
                  "fused": str(fused), "gguf": str(gguf_path)},
    }
    return _write_summary(config, run, log, started, reports, results)


def _task_and_mix(config: DemoConfig, run: Path, base: Path, log: StageLog) -> tuple[dict[str, Path], Path]:
    """The task's rows and suites, and the base's mixed checkpoint (experts int8)."""
    from lfm_mlx.demo.task import write_task
    from lfm_mlx.mixed import mix

    t = time.perf_counter()
    task = write_task(run / "task", rows=config.task_rows, seed=config.seed, per_category=config.cases_per_category,
                      weights=config.category_weights, full_traces=config.full_traces)
    mixed = run / "mixed"
    mix(base, mixed)
    log.record("task data + mix", t)
    return task, mixed


def _train_grouped(config: DemoConfig, run: Path, task: dict[str, Path], mixed: Path, log: StageLog) -> Path:
    """Grouped MoE training on the task's rows; returns the trained model directory."""
    from lfm_mlx.grouped import GroupedMoETrainer

    t = time.perf_counter()
    result = GroupedMoETrainer(grouped_config(config, mixed, task["train"], run / "grouped")).train(restart=True)
    trained = Path(result.model_dir)
    log.record("grouped MoE training", t, steps=result.steps)
    return trained


def _repair(config: DemoConfig, run: Path, task: dict[str, Path], trained: Path, log: StageLog) -> tuple[Path, dict]:
    """The dev suite's eval, the repair set from its failures, the LoRA repair; returns the adapters and
    the LoRA run's summary."""
    from lfm_mlx.evaluate import MLXBackend
    from lfm_mlx.lora import train_lora

    t = time.perf_counter()  # the repair set is built from the dev suite's failures, so it comes first
    _eval(MLXBackend(trained), task["suite_dev"], run / "eval" / "trained_dev", config.max_tokens, config.progress)
    log.record("eval trained (dev suite)", t)

    t = time.perf_counter()
    lora_dir = run / "lora"
    rows = repair_rows(config, run / "eval" / "trained_dev" / "report.json", task, run / "repair_datasets")
    lora_summary = train_lora(lora_settings(config, trained, rows, lora_dir))
    log.record("repair set + LoRA repair", t)
    return lora_dir, lora_summary


def _fuse(config: DemoConfig, run: Path, task: dict[str, Path], trained: Path, lora_dir: Path,
          log: StageLog) -> tuple[Path, dict, dict]:
    """Fuse to 8 bits, and try 4 bits (the fidelity gate judges whether the fine-tune survives it)."""
    from lfm_mlx.fuse import FidelityError, fuse

    t = time.perf_counter()
    fused = run / "fused-8bit"
    fidelity8 = fidelity_summary(fuse(trained, lora_dir, fused, bits=8, suite=task["suite"],
                                       progress=config.progress))
    try:  # the same fine-tune at 4 bits: the gate judges whether it survives
        fidelity4 = fidelity_summary(fuse(trained, lora_dir, run / "fused-4bit", bits=4, suite=task["suite"],
                                                progress=config.progress))
    except FidelityError as err:
        fidelity4 = {**fidelity_summary(err.report), "reason": str(err).splitlines()[0]}
    log.record("fuse 8-bit (+ 4-bit check)", t, fused_4bit_refused=not fidelity4["passed"])
    return fused, fidelity8, fidelity4


def _eval_fused_and_gguf(config: DemoConfig, run: Path, task: dict[str, Path], fused: Path, reports: Reports,
                         log: StageLog) -> Path:
    """The fused model's eval in MLX, then its GGUF export and the same eval in llama.cpp; returns the GGUF."""
    from lfm_mlx.evaluate import LlamaCppBackend, MLXBackend
    from lfm_mlx.gguf import export_gguf

    t = time.perf_counter()
    fused_backend = MLXBackend(fused)
    reports.add("fused 8-bit", [_eval(fused_backend, suite, out, config.max_tokens, config.progress)
                                for suite, out in _stage_suites(task, run / "eval" / "fused8")])
    log.record("eval fused 8-bit", t)

    t = time.perf_counter()
    gguf_path = run / f"model-{config.gguf_outtype}.gguf"
    export_gguf(fused, gguf_path, outtype=config.gguf_outtype)
    gguf_backend = LlamaCppBackend(gguf_path, fused)
    reports.add("gguf (llama.cpp)", [_eval(gguf_backend, suite, out, config.max_tokens, config.progress)
                                     for suite, out in _stage_suites(task, run / "eval" / "gguf")])
    log.record("GGUF export + eval in llama.cpp", t)
    return gguf_path


def _write_summary(config: DemoConfig, run: Path, log: StageLog, started: float, reports: Reports,
                   results: dict) -> dict:
    """summary.json, summary.md and the plots; the summary table printed."""
    evals = {name: reports.held_out[name] for name in STAGES}  # in pipeline order
    paraphrase = {name: reports.paraphrase[name] for name in STAGES}
    summary = {
        "config": asdict(config),
        "environment": environment_line(),
        "wall_seconds": round(time.perf_counter() - started, 1),
        "peak_rss_gb": peak_rss_gb(),
        "stages": log.rows,
        "pass_rates": {name: report["metrics"]["pass_rate"] for name, report in evals.items()},
        "metrics": {name: report["metrics"] for name, report in evals.items()},
        "paraphrase_pass_rates": {name: report["metrics"]["pass_rate"] for name, report in paraphrase.items()},
        **results,
    }
    atomic_write_json(run / "summary.json", summary)
    atomic_write_text(run / "summary.md", summary_text(summary))
    make_plots(run)
    print(summary_text(summary))
    return summary


def bfcl_slice(config: DemoConfig, base: Path, fused: Path, eval_dir: Path, log: "StageLog") -> dict:
    """BFCL's default categories, `bfcl_per_category` cases each, on the base and the fused model."""
    from lfm_mlx.bfcl import RECIPE, load_suites
    from lfm_mlx.evaluate import MLXBackend, compare_reports, evaluate

    if not config.bfcl_data:
        return {"skipped": f"no BFCL data; to score general tool calling before and after, run: {RECIPE}"}
    t = time.perf_counter()
    suites = load_suites("bfcl", config.bfcl_data, limit=config.bfcl_per_category)
    before, after = [evaluate(MLXBackend(model), suites, eval_dir / name, max_tokens=128, progress=False)
                     for model, name in ((base, "bfcl_base"), (fused, "bfcl_fused8"))]
    log.record("BFCL slice, base and fused 8-bit", t)
    return {"per_category": config.bfcl_per_category, "compare": compare_reports(before, after)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lfm-mlx demo", description=" ".join(__doc__.split("\n\n")[0].split()))
    parser.add_argument("--run-dir", default="runs/demo", help="where every report and checkpoint goes")
    parser.add_argument("--quick", action="store_true", help="a shortened smoke run (every stage, fewer steps and cases)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--base", default="", help="another pre-trained LFM2-MoE directory (default: the shipped base)")
    parser.add_argument("--bfcl-data", default="", help="BFCL v4's data (pip download --no-deps bfcl-eval -d DIR): "
                                                         "score a slice on the base and the fused model")
    console.add_quiet(parser)
    args = parser.parse_args(argv)
    config = DemoConfig.quick(args.run_dir) if args.quick else DemoConfig(args.run_dir)
    config.seed, config.base, config.bfcl_data, config.progress = args.seed, args.base, args.bfcl_data, not args.quiet
    run_demo(config)
    return 0

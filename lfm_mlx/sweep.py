"""`python -m lfm_mlx.sweep`: which group size fits, measured before a long run.

For each group size, smallest first, the sweep
1. estimates the step's peak with `grouped.estimate_for_config`, with the settings the step really uses
   (frozen-expert path, gradient checkpointing, the attention kind this backend runs, compute and
   master dtypes), and adds the runtime baseline measured at start;
2. asks a `MemoryWatchdog` to admit it: an estimate over the hard stop ends the sweep unrun;
3. runs a few real grouped-training steps (lfm_mlx.grouped's `activate_group`, `make_loss_and_grad`,
   `accumulate_gradients`, `apply_update`, `end_group`) on the FIRST `size` MoE layers, the
   worst case for the backward pass, with the watchdog checking after every step: a hard stop
   ends the sweep;
and records MLX peak memory, process RSS, step time and tokens/s against the estimate.

Estimate vs measurement. `estimate_peak` counts the MLX buffers of one step; the budget is about
the memory the process really takes. On unified memory (CPU backend, Apple silicon) that is the
process's peak during the step (Linux: peak RSS, reset before each step; elsewhere: the non-MLX
part of RSS plus MLX's peak), on CUDA the device memory MLX holds. The sweep's watchdog decides on
that figure ("measured"). "Predicted" is the estimate plus the runtime's fixed cost (interpreter,
libraries, kernels), read once before any weight exists. On a tiny model that baseline is most of
the memory, so the step's own error (estimate vs MLX peak) is reported as well.

Calibration (`--calibrate fit`, the default). Three terms of the estimate are not byte counts:
how much of the activation-side components (activations, logits, attention, frozen dequant) MLX
holds at once on this backend, the optimizer update's transient (clipped gradients, new
parameters and moments: a multiple of the group's trainable bytes), and the runtime's overhead
during a step (memory outside MLX's accounting: allocator arenas, scratch). Each size's prediction
uses only the sizes measured before it (a factor and an overhead averaged, the update as a line
in trainable bytes); the first size that runs calibrates itself and is not counted as a test, so
every later size is a true test of the model. `--calibrate none` reports the raw model;
`--calibrate FACTOR` applies a given global factor (e.g. from an earlier sweep on this machine).
"""

from __future__ import annotations

import argparse
import gc
import importlib.metadata
import math
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import psutil
from mlx.utils import tree_flatten

import lfm_mlx
from lfm_mlx import console
from lfm_mlx.data import Batch, build_dataset, make_batch
from lfm_mlx.fsutil import atomic_write_json
from lfm_mlx.kernel_choices import KernelChoices
from lfm_mlx.grouped import (
    ActiveGroup, TrainConfig, choose_expert_path, estimate_for_config, load_mixed_model, moe_layers,
    probe_attention, probe_kernels, set_frozen_path,
)
from lfm_mlx.memory import (
    BACKWARD, GB, PERSISTENT, UPDATE, MemoryBudget, MemoryBudgetExceeded, MemoryEstimate, MemoryHardStop,
    MemorySoftLimitWarning, MemoryWatchdog, StepMemoryReader, read_memory,
)
from lfm_mlx.mixed import quantize_experts
from lfm_mlx.models import build_model, cast_floats, compute_dtype, read_config, resolve_model_path
from lfm_mlx.report import text_table
from lfm_mlx.schedule import GroupSchedule
from lfm_mlx.synthetic import PRESETS, hf_config, write_tokenizer

DEFAULT_SIZES = (1, 2, 4, 6, 8, 11)
TOLERANCE = 0.15  # |predicted - measured| / measured allowed for every size that ran
EXIT_BAD_INPUT, EXIT_NOTHING_FITS = 2, 3
REPORT_NAME, PLOT_NAME = "sweep.json", "sweep.png"
_SELF = "itself (the calibration point, not a test)"


@dataclass
class SweepConfig:
    """What to sweep: a model (`model` dir or synthetic `preset`), the batch (`data` rows, or random
    tokens of `seq_len`; with data, `seq_len` is the token cap), sizes, steps and training settings."""

    model: str | None = None
    preset: str | None = None
    data: str | None = None
    seq_len: int = 10240
    group_sizes: list[int] = field(default_factory=lambda: list(DEFAULT_SIZES))
    steps: int = 3
    optimizer: str = "adamw"
    master_dtype: str = "split"
    frozen_path: str = "auto"
    calibrate: str = "fit"  # "fit", "none" or a factor such as "0.9"
    budget: MemoryBudget = field(default_factory=MemoryBudget)
    out: str = "runs/sweep"
    seed: int = 0

    def check(self) -> None:
        """Raise one ValueError listing every bad setting (name, value, fix)."""
        problems = []
        if (self.model is None) == (self.preset is None):
            problems.append(f"give exactly one of --model DIR or --preset NAME (got model={self.model!r}, "
                            f"preset={self.preset!r})")
        if self.preset is not None and PRESETS.get(self.preset, {}).get("model_type") != "lfm2_moe":
            moe = sorted(name for name, spec in PRESETS.items() if spec.get("model_type") == "lfm2_moe")
            problems.append(f"--preset {self.preset!r} is not an MoE preset; use one of {moe}")
        if self.data is not None and not Path(self.data).is_file():
            problems.append(f"--data {self.data}: no such file (a JSONL file of chat rows)")
        if self.seq_len < 2:
            problems.append(f"--seq-len {self.seq_len} must be >= 2")
        if not self.group_sizes or any(s < 1 for s in self.group_sizes):
            problems.append(f"--group-sizes {self.group_sizes}: give positive sizes, e.g. 1,2,4")
        if self.steps < 1:
            problems.append(f"--steps {self.steps} must be >= 1 (the first is a warm-up when there are more)")
        if self.optimizer not in ("adamw", "adafactor"):
            problems.append(f"--optimizer {self.optimizer!r}: use adamw or adafactor")
        if self.master_dtype not in ("split", "float32", "compute", "compute-stochastic"):
            problems.append(f"--master-dtype {self.master_dtype!r}: use split, float32, compute or "
                            "compute-stochastic")
        if self.frozen_path not in ("auto", "qmm", "dequant", "batched"):
            problems.append(f"--frozen-path {self.frozen_path!r}: use auto, qmm, dequant or batched")
        if self.calibrate not in ("fit", "none"):
            try:
                if float(self.calibrate) <= 0:
                    raise ValueError
            except ValueError:
                problems.append(f"--calibrate {self.calibrate!r}: use fit, none or a factor > 0 such as 0.9")
        if problems:
            raise ValueError("lfm-mlx sweep: " + "; ".join(problems))


# ---------------------------------------------------------------- machine and runtime


def backend_name() -> str:
    """'cuda', 'metal' or 'cpu': where MLX runs by default here."""
    if mx.default_device() == mx.cpu:
        return "cpu"
    if mx.metal.is_available():
        return "metal"
    return "cuda" if mx.cuda.is_available() else "gpu"


def _cpu_name() -> str:
    if Path("/proc/cpuinfo").exists():
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    if sys.platform == "darwin":
        import subprocess

        try:
            return subprocess.run(["sysctl", "-n", "machdep.cpu.brand_string"], capture_output=True,
                                  text=True, timeout=5).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            pass
    return platform.processor() or platform.machine()


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def machine_info() -> dict:
    """Platform, CPU, RAM, MLX backend and device (GPU name when there is one), and versions."""
    backend = backend_name()
    try:
        info = mx.device_info()
    except (AttributeError, RuntimeError):  # older MLX, or a backend that cannot describe its device
        info = {}
    return {
        "platform": platform.platform(), "machine": platform.machine(), "cpu": _cpu_name(),
        "cpu_count": os.cpu_count(), "ram_bytes": psutil.virtual_memory().total,
        "backend": backend, "device": str(mx.default_device()),
        "gpu": info.get("device_name") if backend != "cpu" else None,
        "device_info": {k: v for k, v in info.items() if isinstance(v, (int, float, str))},
        "versions": {"mlx": mx.__version__, "mlx-lm": _version("mlx-lm") or _version("mlx_lm"),
                     "lfm_mlx": _version("lfm_mlx") or lfm_mlx.__version__,
                     "python": platform.python_version()},
    }


def measure_baseline() -> dict:
    """The runtime's fixed memory before any weight exists: process RSS and MLX active + cache.

    On the CPU backend and Apple's unified memory MLX buffers are process memory, so a step's
    buffers add to the RSS baseline; on CUDA they live on the device, apart from the host RSS."""
    gc.collect()
    mx.clear_cache()
    reading = read_memory(reset_peak=False)
    return {"rss": reading.rss, "mlx": reading.active + reading.cache, "unified": backend_name() != "cuda"}


def predicted_used(step_bytes: int, baseline: dict, overhead: int = 0) -> int:
    """The watchdog's decision figure a step of `step_bytes` MLX memory should produce, given the
    runtime baseline and the runtime's `overhead` during a step (memory outside MLX's accounting)."""
    if baseline["unified"]:
        return baseline["rss"] + overhead + step_bytes
    return max(baseline["rss"], baseline["mlx"] + overhead + step_bytes)


# ---------------------------------------------------------------- model and batch


def build_preset(preset: str, seed: int = 0) -> tuple[nn.Module, dict]:
    """A synthetic preset built in memory with random weights, experts int8 (no files written)."""
    config = hf_config(preset)
    mx.random.seed(seed)
    model = build_model(config)
    cast_floats(model, compute_dtype(config))
    config = quantize_experts(model, config)
    for layer in [model.model.embed_tokens, model.model.embedding_norm, *model.model.layers]:
        mx.eval(layer.parameters())  # one layer at a time: the float32 init never exists whole
    model.eval()
    return model, config


def load_model_dir(path: str) -> tuple[nn.Module, dict, Path]:
    """A model directory (mixed int8-expert, or bf16/HF: its experts are quantized in memory)."""
    model_dir = resolve_model_path(path)
    model_type = read_config(model_dir).get("model_type")
    if model_type != "lfm2_moe":
        raise ValueError(f"{model_dir}: model_type {model_type!r} has no experts; the sweep needs "
                         "an LFM2-MoE model (lfm2_moe)")
    model, config = load_mixed_model(model_dir)
    return model, config, model_dir


def synthetic_batch(vocab_size: int, seq_len: int, seed: int = 0) -> Batch:
    """One example of `seq_len` random tokens, every position trained: the memory of a full-length row."""
    ids = mx.random.randint(0, vocab_size, (1, seq_len + 1), key=mx.random.key(seed)).astype(mx.int32)
    return Batch(ids[:, :-1], ids[:, 1:], mx.ones((1, seq_len), dtype=mx.bool_), [f"random-{seq_len}"])


def data_batch(data: str, config: dict, model_dir: Path | None, preset: str | None, max_tokens: int,
               seed: int = 0) -> tuple[Batch, dict]:
    """The longest example of `data` (the step's worst case), tokenized as training would."""
    from mlx_lm.tokenizer_utils import load as load_tokenizer  # lazy: pulls in transformers (~1 s)

    with tempfile.TemporaryDirectory() as tmp:
        if model_dir is None:
            model_dir = Path(tmp)
            write_tokenizer(model_dir, PRESETS[preset].get("tokenizer_vocab", config["vocab_size"]))
        tokenizer = load_tokenizer(model_dir, eos_token_ids=config.get("eos_token_id"))
        dataset = build_dataset([data], tokenizer, max_tokens, (1.0, 0.0, 0.0), seed)
    longest = max(dataset.train, key=lambda e: e.n_tokens)
    info = {"rows_kept": dataset.manifest["kept"], "dropped": dataset.manifest["dropped"],
            "longest_row": longest.row_id, "longest_tokens": longest.n_tokens}
    return make_batch([longest], int(config.get("pad_token_id") or 0)), info


# ---------------------------------------------------------------- estimate and calibration


def estimate_for(config: dict, size: int, seq_len: int, train: TrainConfig, frozen: str,
                 attention: str) -> MemoryEstimate:
    """`estimate_peak` with the settings the grouped step runs (as `GroupedMoETrainer` admits it)."""
    return estimate_for_config(config, train, frozen, seq_len, group_size=size, attention=attention)


def calibration_point(raw: MemoryEstimate, measured: dict, baseline: dict, size: int) -> dict:
    """What one measured size says about the three terms that are not byte counts (each of them
    independent of the group size, or linear in its trainable bytes):
    - `activation_factor`: the backward phase's MLX peak above the persistent components, over the
      estimate's activation-side components (how much of them MLX holds at once on this backend);
    - `update`: the update phase's MLX peak above the persistent components (clipped gradients, new
      parameters and moments), against the group's `trainable` bytes;
    - `runtime_overhead`: what the measured figure holds beyond the baseline and MLX's peak
      (allocator arenas and scratch outside MLX's accounting; on CPU it grows with the tokens)."""
    parts = raw.components()
    persistent = sum(parts[n] for n in PERSISTENT)
    return {"size": size, "trainable": parts["optimizer_update"],
            "activation_factor": max(measured["backward_peak"] - persistent, 0) / sum(parts[n] for n in BACKWARD),
            "update": max(measured["update_peak"] - persistent, 0),
            "runtime_overhead": measured["used"] - predicted_used(measured["mlx_peak"], baseline)}


def fit_calibration(points: list[dict]) -> dict:
    """Calibration from the sizes measured so far: mean activation factor and runtime overhead; the
    update transient as a line in trainable bytes (least squares; through the origin from one size)."""
    n = len(points)
    xs, ys = [p["trainable"] for p in points], [p["update"] for p in points]
    mean_x, mean_y = sum(xs) / n, sum(ys) / n
    spread = sum((x - mean_x) ** 2 for x in xs)
    if spread > 0:
        slope = sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys)) / spread
        intercept = mean_y - slope * mean_x
    else:
        slope, intercept = mean_y / mean_x, 0.0
    return {"mode": "fitted", "from_sizes": [p["size"] for p in points],
            "activation_factor": sum(p["activation_factor"] for p in points) / n,
            "update_per_trainable_byte": slope, "update_intercept": intercept,
            "runtime_overhead": int(round(sum(p["runtime_overhead"] for p in points) / n))}


def given_calibration(factor: float) -> dict:
    return {"mode": "given", "factor": factor, "runtime_overhead": 0}


def apply_calibration(raw: MemoryEstimate, fit: dict | None) -> MemoryEstimate:
    """The raw estimate with a calibration applied: a fitted one scales the activation-side
    components and replaces the update transient by its fitted line; a given one is a global factor."""
    if fit is None:
        return raw
    if fit["mode"] == "given":
        return replace(raw, calibration=fit["factor"])
    scales = dict(raw.scales)
    for name in BACKWARD:
        scales[name] = scales.get(name, 1.0) * fit["activation_factor"]
    trainable = raw.components()["optimizer_update"]
    update = max(fit["update_intercept"] + fit["update_per_trainable_byte"] * trainable, 0.0)
    scales["optimizer_update"] = 1.0
    return replace(raw, scales=scales, optimizer_update=int(round(update)))


# ---------------------------------------------------------------- one group size


def run_size(model: nn.Module, layers: list[int], batch: Batch, train: TrainConfig, steps: int,
             watchdog: MemoryWatchdog, reader: StepMemoryReader, frozen: str,
             kernels: KernelChoices | None = None) -> dict:
    """`steps` real grouped-training steps on `layers`, the trainer's own (`ActiveGroup`), the
    watchdog checking after each step as in training.

    Returns per-step seconds and memory samples. Raises MemoryHardStop (with the samples taken so
    far in `err.sweep_samples`). The group is requantized afterwards, so the model is as before."""
    group = ActiveGroup(model, layers, train, steps, frozen, train.run_dir, kernels=kernels)  # parked as the trainer
    samples = []

    def end_phase(name: str, grads) -> None:
        if name in ("backward", "update"):
            reader.end_phase(name)

    try:
        for step in range(steps):
            reader.reset()
            tick = time.perf_counter()
            # mean-loss gradients, every update applied (even when not finite: memory is the point)
            result = group.step([batch], mean=True, on_phase=end_phase)
            seconds = time.perf_counter() - tick
            loss, norm = result.loss, result.norm
            record = {"step": step, "seconds": seconds, "loss": loss if math.isfinite(loss) else str(loss),
                      "grad_norm": norm if math.isfinite(norm) else str(norm)}
            try:
                sample = watchdog.check(step + 1)
            except MemoryHardStop as err:
                err.sweep_samples = samples + [{**record, **err.sample.to_dict(), **reader.last}]
                raise
            samples.append({**record, **sample.to_dict(), **reader.last})
    finally:
        group.close()
        del group
        gc.collect()
        mx.clear_cache()
    return {"samples": samples}


def _measured(samples: list[dict], tokens: int) -> dict:
    """Memory maxima over every step (the warm-up too: it must fit as well) and the median time
    of the steps after the warm-up (all steps when there is only one)."""
    timed = [s["seconds"] for s in samples[1:]] or [s["seconds"] for s in samples]
    step_s = statistics.median(timed) if timed else None
    process = [s["process_peak"] for s in samples if s.get("process_peak") is not None]
    return {
        "mlx_peak": max(s["mlx_peak"] for s in samples), "process_peak": max(process) if process else None,
        "backward_peak": max(s.get("backward_peak", 0) for s in samples),
        "update_peak": max(s.get("update_peak", 0) for s in samples),
        "active_before": max(s.get("active_before", 0) for s in samples),
        "rss": max(s["rss"] for s in samples),
        "used": max(s["used"] for s in samples), "active_after": samples[-1]["active"],
        "step_s": step_s, "timed_steps": len(samples) - 1 if len(samples) > 1 else 0,
        "tokens_per_s": tokens / step_s if step_s else None,
    }


def _overhead(fit: dict | None) -> int:
    return fit["runtime_overhead"] if fit else 0


def _estimate_record(estimate: MemoryEstimate, baseline: dict, fit: dict | None) -> dict:
    record = estimate.to_dict()
    record["inputs"] = {k: v for k, v in record["inputs"].items() if k != "config"}
    record["runtime_overhead"] = _overhead(fit)
    record["predicted_used"] = predicted_used(estimate.total, baseline, _overhead(fit))
    return record


def _admit(estimate: MemoryEstimate, baseline: dict, budget: MemoryBudget,
           overhead: int = 0) -> tuple[str | None, list[str]]:
    """Admission of one size: (refusal text or None, warnings). The step lives in what the budget
    leaves after the runtime (baseline and overhead), so the watchdog admits against that room."""
    fixed = predicted_used(0, baseline, overhead)
    head = (f"runtime {fixed / GB:.3f} GB + estimated step {estimate.total / GB:.3f} GB = "
            f"{predicted_used(estimate.total, baseline, overhead) / GB:.3f} GB against the hard stop "
            f"{budget.hard_gb:g} GB")
    if fixed / GB >= budget.soft_gb:
        return f"{head}: the runtime alone is over the soft limit {budget.soft_gb:g} GB", []
    room = MemoryBudget(total_gb=budget.total_gb - fixed / GB, soft_gb=budget.soft_gb - fixed / GB,
                        hard_gb=budget.hard_gb - fixed / GB)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", MemorySoftLimitWarning)
        try:
            MemoryWatchdog(room).admit(estimate)
        except MemoryBudgetExceeded as err:
            return f"{head} (room for the step {room.hard_gb:.3f} GB): {err}", []
    return None, [f"{head}: {w.message}" for w in caught if issubclass(w.category, MemorySoftLimitWarning)]


# ---------------------------------------------------------------- the sweep


@dataclass
class _Setup:
    """Everything the per-size loop needs, prepared once."""

    train: TrainConfig
    config: dict
    model: nn.Module
    batch: Batch
    baseline: dict
    attention: dict
    frozen: dict
    master: mx.Dtype
    report: dict  # the report's fixed sections
    kernels: KernelChoices = field(default_factory=KernelChoices)


def prepare(cfg: SweepConfig, log=print) -> _Setup:
    """Config and batch, the attention probe, the runtime baseline, then the model (in that order,
    so the baseline holds everything but the weights), and the frozen-expert path."""
    train = TrainConfig(model=cfg.model or f"preset:{cfg.preset}", data=[cfg.data or "synthetic"],
                        run_dir=str(cfg.out), optimizer=cfg.optimizer, master_dtype=cfg.master_dtype,
                        frozen_path=cfg.frozen_path, max_tokens=cfg.seq_len, seed=cfg.seed, progress=False)
    machine = machine_info()
    model_dir = None
    if cfg.preset is not None:
        config = hf_config(cfg.preset)
    else:
        model_dir = resolve_model_path(cfg.model)
        config = read_config(model_dir)
    dtype = compute_dtype(config)
    data_info = None
    if cfg.data is not None:
        batch, data_info = data_batch(cfg.data, config, model_dir, cfg.preset, cfg.seq_len, cfg.seed)
    else:
        batch = synthetic_batch(int(config["vocab_size"]), cfg.seq_len, cfg.seed)
    mx.eval(batch.inputs, batch.targets, batch.loss_mask)
    heads = int(config["num_attention_heads"])
    attention = probe_attention(heads, int(config["hidden_size"]) // heads, dtype)
    baseline = measure_baseline()
    log(f"runtime baseline: RSS {baseline['rss'] / GB:.3f} GB, MLX {baseline['mlx'] / GB:.3f} GB "
        f"({machine['backend']}); attention backward: {attention['kind']}")

    tick = time.perf_counter()
    if cfg.preset is not None:
        model, config = build_preset(cfg.preset, cfg.seed)
    else:
        model, config, model_dir = load_model_dir(cfg.model)
    build_s = time.perf_counter() - tick
    moe = moe_layers(model)
    records = probe_kernels(model, moe[0], batch.inputs.shape[1])
    kernels = KernelChoices.from_records(records)
    # measured at 256 tokens every time (not kept per machine: a sweep measures, it does not train)
    frozen = choose_expert_path(model, moe[0], cfg.frozen_path, min(256, batch.inputs.shape[1]), dtype, cfg.seed,
                                kernels, remember=False, given="set on the command line") | records
    set_frozen_path(model, frozen["choice"], kernels=kernels)
    gc.collect()
    mx.clear_cache()
    master = train.settings(dtype).master
    report = {
        "kind": "lfm_mlx.sweep/1",
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "settings": {**{k: v for k, v in asdict(cfg).items() if k != "budget"},
                     "group_sizes": sorted(set(cfg.group_sizes)), "grad_checkpoint": train.grad_checkpoint,
                     "batch_size": train.batch_size},
        "budget": asdict(cfg.budget),
        "machine": machine,
        "model": {"source": cfg.model or f"preset:{cfg.preset}", "moe_layers": moe,
                  "weights_bytes": sum(v.nbytes for _, v in tree_flatten(model.parameters())),
                  "compute_dtype": str(dtype), "master_dtype": str(master), "master": cfg.master_dtype, "build_s": build_s,
                  "shapes": {k: config[k] for k in ("vocab_size", "hidden_size", "moe_intermediate_size",
                                                     "num_hidden_layers", "num_experts", "num_experts_per_tok")},
                  "quantization": {k: config["quantization"][k] for k in ("bits", "group_size")}},
        "batch": {"seq_len": batch.inputs.shape[1], "tokens": batch.inputs.size,
                  "source": "data" if cfg.data else "random tokens", "data": data_info},
        "baseline": baseline, "attention": attention, "frozen_path": frozen, "tolerance": TOLERANCE,
    }
    return _Setup(train, config, model, batch, baseline, attention, frozen, master, report, kernels)


def sweep_size(setup: _Setup, cfg: SweepConfig, size: int, fit: dict | None, points: list[dict],
               log=print) -> tuple[dict, dict | None]:
    """Estimate (calibrated from the smaller sizes), admit and, if admitted, run one group size.
    Returns its record and the calibration for the next sizes (refitted with this one's point)."""
    layers = moe_layers(setup.model)[:size]
    seq_len, tokens = setup.batch.inputs.shape[1], setup.batch.inputs.size
    raw = estimate_for(setup.config, size, seq_len, setup.train, setup.frozen["choice"], setup.attention["kind"])
    predicted = apply_calibration(raw, fit)
    record = {"size": size, "layers": layers, "status": None, "reason": None,
              "estimate": _estimate_record(predicted, setup.baseline, fit),
              "raw_estimate": _estimate_record(raw, setup.baseline, None),
              "calibrated_from": fit.get("from_sizes", "given") if fit else None, "measured": None, "warnings": []}
    refusal, notes = _admit(predicted, setup.baseline, cfg.budget, _overhead(fit))
    record["warnings"] += notes
    if refusal is not None:
        record.update(status="refused", reason=refusal)
        log(f"size {size}: refused by the estimate, not run: {refusal.splitlines()[0]}")
        return record, fit

    log(f"size {size}: layers {layers[0]}-{layers[-1]}, {cfg.steps} step(s) of {tokens} tokens ...")
    reader = StepMemoryReader(setup.baseline["unified"])
    watchdog = MemoryWatchdog(cfg.budget, reader=reader)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", MemorySoftLimitWarning)
        try:
            samples = run_size(setup.model, layers, setup.batch, setup.train, cfg.steps, watchdog, reader,
                               setup.frozen["choice"], setup.kernels)["samples"]
            record["status"] = "ok"
        except MemoryHardStop as err:
            samples = err.sweep_samples
            record.update(status="stopped", reason=str(err))
            log(f"size {size}: stopped by the watchdog: {str(err).split('. Resume')[0]}")
    record["warnings"] += [str(w.message) for w in caught if issubclass(w.category, MemorySoftLimitWarning)]
    record["steps"] = samples
    record["measured"] = measured = _measured(samples, tokens)
    if record["status"] != "ok":
        return record, fit
    if cfg.calibrate == "fit":
        points.append(calibration_point(raw, measured, setup.baseline, size))
        if fit is None:  # the first size that ran: no smaller size to calibrate it, so it calibrates itself
            fit = fit_calibration(points)
            predicted = apply_calibration(raw, fit)
            record["estimate"] = _estimate_record(predicted, setup.baseline, fit)
            record["calibrated_from"] = _SELF
        else:
            fit = fit_calibration(points)
    record.update(_errors(predicted, raw, measured, setup.baseline, record["estimate"]["predicted_used"]))
    return record, fit


def run_sweep(cfg: SweepConfig, log=print) -> dict:
    """Run the sweep, smallest size first, until a size is refused or stopped; returns the
    JSON-ready report, also written to OUT/sweep.json."""
    cfg.check()
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    setup = prepare(cfg, log)
    n_moe = len(setup.report["model"]["moe_layers"])
    fit = given_calibration(float(cfg.calibrate)) if cfg.calibrate not in ("fit", "none") else None
    records, skipped, points, stop = [], [], [], None
    for size in sorted(set(cfg.group_sizes)):
        if size > n_moe:
            skipped.append({"size": size, "reason": f"the model has {n_moe} MoE layers"})
        elif stop is not None:
            skipped.append({"size": size, "reason": f"escalation stopped at size {stop['size']}"})
        else:
            record, fit = sweep_size(setup, cfg, size, fit, points, log)
            records.append(record)
            if record["status"] != "ok":
                stop = {"size": size, "status": record["status"], "reason": record["reason"].split(". Resume")[0]}

    report = dict(setup.report)
    report["calibration"] = {**(fit or {"mode": "none", "runtime_overhead": 0}), "points": points}
    report.update(sizes=records, skipped_sizes=skipped, stop=stop,
                  last_safe_size=max((r["size"] for r in records if r["status"] == "ok"), default=None))
    tested = [r for r in records if r.get("error") is not None and r["calibrated_from"] != _SELF]
    report["within_tolerance"] = bool(tested) and all(r["within_tolerance"] for r in tested)
    report["recommendation"] = recommend(report, setup.config)
    atomic_write_json(out / REPORT_NAME, report)
    return report



def _errors(predicted: MemoryEstimate, raw: MemoryEstimate, measured: dict, baseline: dict,
            predicted_used_bytes: int) -> dict:
    """Relative errors (estimate - measured) / measured: `error` on the watchdog's figure (runtime
    included), `step_error` on MLX's peak alone, `raw_*` before calibration, and per phase (MLX
    peak of the backward pass and of the optimizer update against persistent + that phase)."""
    def rel(a: float, b: float) -> float:
        return (a - b) / b

    parts = predicted.components()
    persistent = sum(parts[n] for n in PERSISTENT)
    error = rel(predicted_used_bytes, measured["used"])
    return {
        "error": error, "within_tolerance": abs(error) <= TOLERANCE,
        "raw_error": rel(predicted_used(raw.total, baseline), measured["used"]),
        "step_error": rel(predicted.total, measured["mlx_peak"]),
        "raw_step_error": rel(raw.total, measured["mlx_peak"]),
        "phase_errors": {
            "backward": rel(persistent + sum(parts[n] for n in BACKWARD), measured["backward_peak"]),
            "update": rel(persistent + sum(parts[n] for n in UPDATE), measured["update_peak"]),
        },
    }


def recommend(report: dict, config: dict) -> dict:
    """Largest size whose measured memory stayed under the soft limit, stride = size - 1."""
    soft = report["budget"]["soft_gb"] * GB
    ok = [r for r in report["sizes"] if r["status"] == "ok"]
    fits = [r for r in ok if r["measured"]["used"] < soft]
    if not fits:
        why = ("no size ran to completion" if not ok else
               f"every size that ran used more than the soft limit {report['budget']['soft_gb']:g} GB")
        return {"group_size": None, "stride": None, "groups": None,
                "why": f"{why}: shorten the token cap (--seq-len), use --optimizer adafactor, or a larger budget"}
    best = max(fits, key=lambda r: r["size"])
    size = best["size"]
    stride = max(size - 1, 1)
    schedule = GroupSchedule.for_model(config, size, stride)
    used, hard = best["measured"]["used"], report["budget"]["hard_gb"] * GB
    why = (f"largest size whose measured memory ({used / GB:.3f} GB, the watchdog's figure, warm-up included) "
           f"stayed under the soft limit {report['budget']['soft_gb']:g} GB, {(hard - used) / GB:.3f} GB below the "
           f"hard stop. The sweep's step is the worst case (the group at the first MoE layer, so the backward "
           f"pass runs through every MoE layer; {report['batch']['seq_len']} tokens), so a run with this token "
           "cap stays at or below it. ")
    why += ("Stride = size - 1 overlaps consecutive groups by one layer, so every pair of neighbouring layers "
            "trains together in some group (the seed run's 4/3)." if size > 1 else "Size 1 has no overlap: stride 1.")
    return {"group_size": size, "stride": stride, "groups": len(schedule), "why": why}


# ---------------------------------------------------------------- output


def _fit_label(calibrated_from) -> str:
    if calibrated_from is None:
        return "raw"
    if calibrated_from == _SELF:
        return "self"
    return calibrated_from if isinstance(calibrated_from, str) else ",".join(map(str, calibrated_from))


def format_table(report: dict) -> str:
    """The per-size table printed on stdout (GB = 1e9 bytes). 'fit from': the sizes whose
    measurements calibrated this size's prediction ('self': the calibration point, not a test)."""
    rows = []
    for r in report["sizes"]:
        m = r["measured"] or {}
        rows.append({
            "size": r["size"], "status": r["status"], "fit from": _fit_label(r["calibrated_from"]),
            "predicted GB": r["estimate"]["predicted_used"] / GB, "measured GB": m["used"] / GB if m else None,
            "error": r.get("error"), "raw error": r.get("raw_error"), "step est GB": r["estimate"]["total"] / GB,
            "MLX peak GB": m["mlx_peak"] / GB if m else None, "step error": r.get("step_error"),
            "RSS GB": m["rss"] / GB if m else None, "step s": m.get("step_s"), "tokens/s": m.get("tokens_per_s"),
        })
    columns = ["size", "status", "fit from", "predicted GB", "measured GB", "error", "raw error", "step est GB",
               "MLX peak GB", "step error", "RSS GB", "step s", "tokens/s"]
    fmt = {c: ".3f" for c in columns if c.endswith("GB")}
    fmt.update({"error": "+.1%", "raw error": "+.1%", "step error": "+.1%", "step s": ".3f", "tokens/s": ",.0f"})
    budget, cal, rec = report["budget"], report["calibration"], report["recommendation"]
    lines = [
        f"group-size sweep: {report['model']['source']}, {report['batch']['tokens']} tokens/step, "
        f"{report['settings']['optimizer']}, frozen experts {report['frozen_path']['choice']}, attention "
        f"{report['attention']['kind']}, {report['machine']['backend']} "
        f"({report['machine']['gpu'] or report['machine']['cpu']})",
        f"budget {budget['total_gb']:g} GB: soft {budget['soft_gb']:g}, hard stop {budget['hard_gb']:g}; runtime "
        f"baseline {predicted_used(0, report['baseline']) / GB:.3f} GB (in 'predicted')",
        text_table(rows, columns, fmt),
    ]
    if cal["mode"] == "fitted":
        lines.append(
            f"calibration (each size from the smaller ones measured before it), final fit from sizes "
            f"{_fit_label(cal['from_sizes'])}: activation side x{cal['activation_factor']:.3f}, optimizer update "
            f"{cal['update_per_trainable_byte']:.2f} x trainable bytes {cal['update_intercept'] / GB:+.3f} GB, "
            f"runtime overhead during a step {cal['runtime_overhead'] / GB:+.3f} GB")
    elif cal["mode"] == "given":
        lines.append(f"calibration: given factor x{cal['factor']:.3f} on the whole estimate")
    for s in report["skipped_sizes"]:
        lines.append(f"size {s['size']}: skipped ({s['reason']})")
    tested = [r["size"] for r in report["sizes"] if r.get("error") is not None and r["calibrated_from"] != _SELF]
    if tested:
        verdict = "within" if report["within_tolerance"] else "NOT within"
        lines.append(f"estimate vs measured: {verdict} {report['tolerance']:.0%} for every size predicted before it "
                     f"ran (sizes {', '.join(map(str, tested))})")
    else:
        lines.append("estimate vs measured: no size was predicted and then run, nothing to compare")
    last, stop = report["last_safe_size"], report["stop"]
    how = {"refused": "refused by the estimate", "stopped": "stopped by the watchdog"}
    lines.append(f"last safe size: {last if last is not None else 'none'}"
                 + (f" (escalation ended: size {stop['size']} {how[stop['status']]})" if stop else ""))
    if rec["group_size"] is not None:
        lines.append(f"recommended: group size {rec['group_size']}, stride {rec['stride']} ({rec['groups']} groups). "
                     f"{rec['why']}")
    else:
        lines.append(f"recommended: none. {rec['why']}")
    return "\n".join(lines)


def plot_sweep(json_path: str | Path, out_png: str | Path | None = None) -> Path:
    """Plot a sweep report from its JSON: memory (predicted and measured, with the soft and hard
    limits) and step time against group size. Writes next to the JSON unless `out_png` is given."""
    import json

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    json_path = Path(json_path)
    report = json.loads(json_path.read_text())
    out_png = Path(out_png) if out_png else json_path.with_suffix(".png")
    sizes = report["sizes"]
    ran = [r for r in sizes if r["measured"]]
    fig, (mem, speed) = plt.subplots(1, 2, figsize=(11, 4.2))
    mem.plot([r["size"] for r in sizes], [r["estimate"]["predicted_used"] / GB for r in sizes], "o--",
             label="predicted (estimate + runtime)")
    mem.plot([r["size"] for r in ran], [r["measured"]["used"] / GB for r in ran], "s-",
             label="measured (watchdog figure)")
    mem.plot([r["size"] for r in sizes], [r["estimate"]["total"] / GB for r in sizes], "x--", color="gray",
             label="estimate (step, MLX)")
    mem.plot([r["size"] for r in ran], [r["measured"]["mlx_peak"] / GB for r in ran], "^:", label="measured MLX peak")
    for r in sizes:
        if r["status"] in ("refused", "stopped"):
            mem.annotate(r["status"], (r["size"], r["estimate"]["predicted_used"] / GB), textcoords="offset points",
                         xytext=(4, 6), color="red")
    budget = report["budget"]
    mem.axhline(budget["hard_gb"], color="red", linestyle="--", label=f"hard stop {budget['hard_gb']:g} GB")
    mem.axhline(budget["soft_gb"], color="orange", linestyle=":", label=f"soft limit {budget['soft_gb']:g} GB")
    highest = max([r["estimate"]["predicted_used"] for r in sizes] + [r["measured"]["used"] for r in ran], default=0)
    if 0 < highest / GB < 0.1 * budget["soft_gb"]:
        mem.set_yscale("log")  # a tiny model far below the limits: keep both visible
    mem.set_xlabel("group size (MoE layers)")
    mem.set_ylabel("peak memory (GB)")
    mem.set_title("memory per step")
    mem.grid(alpha=0.3)
    mem.legend(fontsize=7, loc="best")
    timed = [r for r in ran if r["measured"]["step_s"] is not None]
    speed.plot([r["size"] for r in timed], [r["measured"]["step_s"] for r in timed], "o-", color="tab:green")
    speed.set_xlabel("group size (MoE layers)")
    speed.set_ylabel("step time (s, median)")
    speed.set_title(f"step time, {report['batch']['tokens']} tokens")
    speed.grid(alpha=0.3)
    fig.suptitle(f"{report['model']['source']} on {report['machine']['backend']} "
                 f"({report['machine']['gpu'] or report['machine']['cpu']})", fontsize=10)
    fig.tight_layout()
    fd, tmp = tempfile.mkstemp(prefix=f".{out_png.name}.tmp-", suffix=".png", dir=out_png.parent)
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=110)
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; the plot is an ordinary file
        os.replace(tmp, out_png)
    finally:
        plt.close(fig)
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out_png


# ---------------------------------------------------------------- command line


def _sizes(text: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give comma-separated integers, e.g. 1,2,4,6") from None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="lfm-mlx sweep", description="Group-size memory and time sweep of grouped MoE training, with a "
        "calibrated memory model: which group size fits the budget, and how fast it runs.",
        epilog=f"Writes OUT/{REPORT_NAME} and OUT/{PLOT_NAME}. Exit codes: 0 done, {EXIT_BAD_INPUT} bad input, "
               f"{EXIT_NOTHING_FITS} no group size fits the budget.")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", help="model directory (mixed int8-expert, or bf16/HF) or hub id")
    source.add_argument("--preset", help="synthetic preset built in memory: tiny-moe or lfm2.5-8b-a1b")
    parser.add_argument("--data", help="JSONL chat rows: the longest (up to --seq-len tokens) is the step's batch")
    parser.add_argument("--seq-len", type=int, default=10240, help="tokens of the random example, or the token "
                        "cap with --data (default 10240)")
    parser.add_argument("--group-sizes", type=_sizes, default=list(DEFAULT_SIZES), help="default 1,2,4,6,8,11")
    parser.add_argument("--steps", type=int, default=3, help="steps per size; the first is a warm-up (default 3)")
    parser.add_argument("--optimizer", default="adamw", choices=["adamw", "adafactor"])
    parser.add_argument("--master-dtype", default="split", choices=["split", "float32", "compute", "compute-stochastic"])
    parser.add_argument("--frozen-path", default="auto", choices=["auto", "qmm", "dequant", "batched"])
    parser.add_argument("--calibrate", default="fit", help="fit (each size from the smaller ones measured before "
                        "it; the first calibrates itself), none, or a global factor (default fit)")
    parser.add_argument("--budget-gb", type=float, default=64.0, help="machine memory (default 64)")
    parser.add_argument("--soft-gb", type=float, default=54.0, help="soft limit (default 54)")
    parser.add_argument("--hard-gb", type=float, default=60.0, help="hard stop (default 60)")
    parser.add_argument("--out", default="runs/sweep", help="output directory (default runs/sweep)")
    parser.add_argument("--seed", type=int, default=0)
    console.add_quiet(parser)
    args = parser.parse_args(argv)
    try:
        budget = MemoryBudget(total_gb=args.budget_gb, soft_gb=args.soft_gb, hard_gb=args.hard_gb)
        cfg = SweepConfig(model=args.model, preset=args.preset, data=args.data, seq_len=args.seq_len,
                          group_sizes=args.group_sizes, steps=args.steps, optimizer=args.optimizer,
                          master_dtype=args.master_dtype, frozen_path=args.frozen_path, calibrate=args.calibrate,
                          budget=budget, out=args.out, seed=args.seed)
        cfg.check()
        console.say("sweep", f"group sizes {','.join(map(str, sorted(set(cfg.group_sizes))))} of "
                             f"{cfg.model or 'preset ' + cfg.preset} on {console.where()}: {cfg.steps} step(s) each of "
                             + (f"the longest row of {cfg.data} (at most {cfg.seq_len} tokens)" if cfg.data else
                                f"{cfg.seq_len} random tokens")
                             + f", {cfg.optimizer}, masters {cfg.master_dtype}, experts {cfg.frozen_path}; memory "
                               f"soft/hard {args.soft_gb:g}/{args.hard_gb:g} GB of {args.budget_gb:g} (machine "
                               f"{console.machine_gb():.1f} GB); writing {cfg.out}", args.quiet)
        report = run_sweep(cfg, log=lambda line: console.say("sweep", line, args.quiet))
    except (ValueError, FileNotFoundError) as err:
        print(f"lfm-mlx sweep: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    json_path = Path(cfg.out) / REPORT_NAME
    if not args.quiet:
        print(format_table(report))
    try:
        plot = str(plot_sweep(json_path, Path(cfg.out) / PLOT_NAME))
    except ImportError as err:  # a bare accelerator box; the plot is made from the JSON, so make it later
        plot = f"not made ({err}); run lfm_mlx.sweep.plot_sweep('{json_path}') where matplotlib is installed"
    safe = report["last_safe_size"]
    print(f"sweep: {'largest group size within the budget: ' + str(safe) if safe is not None else 'no group size fits'}"
          f"; report {json_path}, plot {plot}")
    return 0 if safe is not None else EXIT_NOTHING_FITS


if __name__ == "__main__":
    sys.exit(main())

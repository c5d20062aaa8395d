"""The sweep: prepared once, then every size smallest first until one is refused or stopped; the recommendation."""

from __future__ import annotations

import gc
import time
import warnings
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from lfm_mlx.data import Batch
from lfm_mlx.fsutil import atomic_write_json
from lfm_mlx.grouped import TrainConfig, choose_expert_path, moe_layers, probe_attention, probe_kernels, set_expert_kernel
from lfm_mlx.grouped import ranks
from lfm_mlx.kernels.choices import KernelChoices
from lfm_mlx.memory import GB, MemoryHardStop, MemorySoftLimitWarning, MemoryWatchdog, StepMemoryReader
from lfm_mlx.model.io import compute_dtype, read_config, resolve_model_path
from lfm_mlx.model.synthetic import hf_config
from lfm_mlx.sweep.calibration import (
    _errors, apply_calibration, calibration_point, estimate_for, fit_calibration, given_calibration,
)
from lfm_mlx.sweep.config import REPORT_NAME, SweepConfig, TOLERANCE, _SELF
from lfm_mlx.sweep.inputs import build_preset, data_batch, load_model_dir, synthetic_batch
from lfm_mlx.sweep.machine import machine_info, measure_baseline
from lfm_mlx.sweep.measure import _admit, _estimate_record, _measured, _overhead, rank_record, run_size
from lfm_mlx.train import distributed
from lfm_mlx.train.schedules import GroupSchedule


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
    world: distributed.World = field(default_factory=distributed.World)  # mlx.launch's ranks (or one)
    park_dir: Path | None = None  # where this rank parks the group start copy (the trainer's rule)


def prepare(cfg: SweepConfig, log=print) -> _Setup:
    """Config and batch, the attention probe, the runtime baseline, then the model (in that order,
    so the baseline holds everything but the weights), and the expert kernel."""
    train = TrainConfig(model=cfg.model or f"preset:{cfg.preset}", data=[cfg.data or "synthetic"],
                        run_dir=str(cfg.out), optimizer=cfg.optimizer, master_dtype=cfg.master_dtype,
                        expert_kernel=cfg.expert_kernel, max_tokens=cfg.seq_len, seed=cfg.seed, progress=False)
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
    frozen = choose_expert_path(model, moe[0], cfg.expert_kernel, min(256, batch.inputs.shape[1]), dtype, cfg.seed,
                                kernels, remember=False, given="set on the command line") | records
    set_expert_kernel(model, frozen["choice"], kernels=kernels)
    gc.collect()
    mx.clear_cache()
    master = train.settings(dtype).master
    report = {
        "kind": "lfm_mlx.sweep/1",
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "settings": {**{k: v for k, v in asdict(cfg).items() if k not in ("budget", "frozen_path")},
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
        "baseline": baseline, "attention": attention, "expert_kernel": frozen, "tolerance": TOLERANCE,
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
    if setup.world.sum_scalars(float(refusal is not None))[0] and refusal is None:  # the ranks run it together
        refusal = "refused by the estimate on another rank (against that machine's budget)"
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
                               setup.frozen["choice"], setup.kernels, setup.world, setup.park_dir)["samples"]
            record["status"] = "ok"
        except MemoryHardStop as err:
            samples = err.sweep_samples
            record.update(status="stopped", reason=str(err))
            log(f"size {size}: stopped by the watchdog: {str(err).split('. Resume')[0]}")
    record["warnings"] += [str(w.message) for w in caught if issubclass(w.category, MemorySoftLimitWarning)]
    record["steps"] = samples
    record["measured"] = measured = _measured(samples, tokens)
    if setup.world.size > 1:  # every rank's peak memory and the all-reduce of this group size
        record["ranks"] = rank_record(setup.world, measured, samples)
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
    JSON-ready report, also written to OUT/sweep.json. Under `mlx.launch` every rank runs each size
    on its own machine, the gradients all-summed; rank 0 alone logs and writes the report."""
    cfg.check()
    out, world = Path(cfg.out), distributed.init()
    log = log if world.main else (lambda line: None)
    world.on_main(out.mkdir, parents=True, exist_ok=True)
    setup = prepare(cfg, log)
    scratch = []  # holds rank > 0's private parking directory until the sweep returns
    setup.world, setup.park_dir = world, ranks.park_dir(world, out, scratch)
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
    if world.size > 1:
        report["world_size"] = world.size
    world.on_main(atomic_write_json, out / REPORT_NAME, report)
    return report


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

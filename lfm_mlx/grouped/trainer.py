"""GroupedMoETrainer: admission, loading, the expert-path choice, resume, and the explicit training loop
over the group schedule."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import math
import shutil
import sys
import time
from pathlib import Path
from typing import Callable

import mlx.core as mx
import mlx.optimizers as optim
from mlx.utils import tree_flatten
import psutil

from lfm_mlx import console
from lfm_mlx.data import build_dataset
from lfm_mlx.fsutil import atomic_dir, atomic_write_json, atomic_write_text, check_free_space
from lfm_mlx.grouped import ranks
from lfm_mlx.grouped.config import (
    CHANGEABLE_ON_RESUME, ConfigError, TrainConfig, describe_change, estimate_for_config,
)
from lfm_mlx.grouped.experts import set_expert_kernel
from lfm_mlx.grouped.group import ActiveGroup
from lfm_mlx.grouped.probes import PROBE_TOKENS, probe_attention
from lfm_mlx.grouped.run import BatchStream, NonFiniteStop, TrainResult, UndoStep, _step_seed, steps_per_group
from lfm_mlx.grouped.setup import choose_expert_path, load_mixed_model, probe_kernels
from lfm_mlx.grouped.step import evaluate_loss, trained_weight_norm
from lfm_mlx.kernels.choices import KernelChoices
from lfm_mlx.memory import GB, MemoryBudgetExceeded, MemoryHardStop, MemoryReading, MemoryWatchdog
from lfm_mlx.model.io import compute_dtype, read_config, resolve_model_path, save_model_dir, weight_files
from lfm_mlx.model.moe import expert_kernel, layer_of, moe_params
from lfm_mlx.train import distributed
from lfm_mlx.train.checkpoint import Checkpoint, ParkedArrays, config_hash, list_checkpoints, save_checkpoint
from lfm_mlx.train.schedules import GroupSchedule


def _model_fingerprint(model_dir: Path) -> dict:
    return {"config_sha256": hashlib.sha256((model_dir / "config.json").read_bytes()).hexdigest(),
            "weights": {p.name: p.stat().st_size for p in weight_files(model_dir)}}


class GroupedMoETrainer:
    """Train a mixed LFM2-MoE checkpoint group by group (see the `lfm_mlx.grouped` package docstring).

    Hooks (Python API only): `memory_reader` replaces the watchdog's MLX/psutil reader;
    `grad_hook(step, grads) -> grads` sees the accumulated gradients of every step before the
    finiteness check (e.g. to inject a fault in a test).
    """

    def __init__(self, config: TrainConfig, memory_reader: Callable[[], MemoryReading] | None = None,
                 grad_hook: Callable[[int, dict], dict] | None = None, allow_config_change: tuple[str, ...] = ()):
        self.config = config
        self.allow_config_change = tuple(allow_config_change)
        self.run_dir = Path(config.run_dir)
        self.memory_reader = memory_reader
        self.grad_hook = grad_hook
        self.metrics_path = self.run_dir / "metrics.jsonl"
        self.n_records = 0
        self.optimizer: optim.Optimizer | None = None  # the active group's, fresh per group
        self.undone: dict[int, dict] = {}  # global step -> its 'skipped' record: steps a replay skips
        self.world, self._scratch = distributed.init(), []  # mlx.launch's ranks (or one): rank 0 alone writes

    # ------------------------------------------------------------ bookkeeping

    def _log(self, record: dict) -> None:
        if self.world.main:
            with open(self.metrics_path, "a") as handle:
                handle.write(json.dumps(record) + "\n")
        self.n_records += 1

    def _truncate_metrics(self, keep: int) -> None:
        """Keep the first `keep` records: later ones come from steps redone after the resume."""
        lines = self.metrics_path.read_text().splitlines() if self.world.main and self.metrics_path.exists() else []
        kept = lines[:keep]
        self.world.on_main(atomic_write_text, self.metrics_path, "".join(line + "\n" for line in kept))
        self.n_records = len(kept)

    def _checkpoint(self, state: dict, layers_done: set[int], active: list[int], start: ParkedArrays | None,
                    optimizer: optim.Optimizer | None) -> Path:
        state = {**state, "metrics_records": self.n_records, "world_size": self.world.size}
        touched = sorted(layers_done | set(active))
        # An optimizer that never applied a step holds only its scalars (maybe a non-finite rate): nothing to keep.
        applied = optimizer is not None and not {k for k, _ in tree_flatten(optimizer.state)} <= {"step",
                                                                                                 "learning_rate"}
        return self.world.on_main(save_checkpoint, self.run_dir, state, moe_params(self.model, touched),
                               group_start=start if active else None,
                               optimizer_state=optimizer.state if applied and active else None,
                               keep=self.config.keep_checkpoints)

    # ------------------------------------------------------------ setup

    def _prepare(self, restart: bool):
        cfg = self.config
        cfg.check_paths()
        self.world.on_main(self.run_dir.mkdir, parents=True, exist_ok=True)
        self.model_dir = resolve_model_path(cfg.model)
        model_config = read_config(self.model_dir)
        if model_config["model_type"] != "lfm2_moe":
            raise ConfigError(f"{self.model_dir}: model_type {model_config['model_type']!r} has no experts; "
                              "grouped training needs an LFM2-MoE model (lfm2_moe)")
        n_moe = int(model_config["num_hidden_layers"]) - int(model_config.get("num_dense_layers", 0))
        if cfg.group_size > n_moe:
            raise ConfigError(f"group_size: {cfg.group_size} is more than the {n_moe} MoE layers of {self.model_dir}; "
                              f"use group_size <= {n_moe} (group_size: {n_moe} trains them all as one group)")
        self._check_physical_memory()
        self.schedule = GroupSchedule.for_model(model_config, cfg.group_size, cfg.group_stride)
        from mlx_lm.tokenizer_utils import load as load_tokenizer  # lazy: pulls in transformers (~1 s)

        self.tokenizer = load_tokenizer(self.model_dir, eos_token_ids=model_config.get("eos_token_id"))
        self.dataset = build_dataset(cfg.data, self.tokenizer, cfg.max_tokens, tuple(cfg.splits), cfg.seed,
                                     cfg.skip_invalid)
        self.world.on_main(self.dataset.write_manifest, self.run_dir / "data_manifest.json")
        self.pad_id = int(model_config.get("pad_token_id") or 0)
        self.spg = steps_per_group(len(self.dataset.train), cfg, len(self.schedule), self.world.size)
        self.n_phases = cfg.epochs * len(self.schedule)
        data_fingerprint = {"sources": self.dataset.manifest["sources"],
                            "split_row_ids": self.dataset.manifest["split_row_ids"]}
        self.identity = {"model": _model_fingerprint(self.model_dir), "data": data_fingerprint}
        self.hash = config_hash({"config": cfg.training_hash_dict(), **self.identity})
        self.world.same_as_main(self.hash, f"model {self.model_dir}, data {cfg.data} or the config")
        if restart and self.world.main:
            for old in list_checkpoints(self.run_dir):
                shutil.rmtree(old)
            self.metrics_path.unlink(missing_ok=True)
            (self.run_dir / "summary.json").unlink(missing_ok=True)
        return model_config

    def _check_physical_memory(self) -> None:
        """memory.total_gb above the machine's RAM: the hard stop would never fire before the OS kills the run."""
        physical = psutil.virtual_memory().total / GB
        memory = self.config.memory
        if memory.total_gb <= physical * 1.02 or memory.above_physical:  # 2%: vendors round their figures
            return
        if "total_gb" not in memory.model_fields_set:  # the 64 GB default on a smaller machine: say so, go on
            print(f"lfm-mlx train: warning: memory.total_gb defaults to {memory.total_gb:g} GB but this machine has "
                  f"{physical:.1f} GB; set memory.total_gb, soft_gb and hard_gb for it so the hard stop can fire",
                  file=sys.stderr)
            return
        raise ConfigError(
            f"memory.total_gb: {memory.total_gb:g} is above this machine's physical memory ({physical:.1f} GB "
            f"measured), so memory.hard_gb ({memory.hard_gb:g}) could never stop the run before the OS kills it; "
            f"set memory.total_gb to at most {physical:.0f} (and soft_gb < hard_gb below it), or set "
            "memory.above_physical: true to accept it")

    def _config_changes(self, resume: Checkpoint) -> dict:
        """The keys a resume changes ({key: [before, after]}) when --allow-config-change allows them
        all and nothing else (model, data, other keys) differs; else a ConfigError."""
        refused = ConfigError(
            f"{self.run_dir} holds checkpoint {resume.path.name} of a different run (config, model or data changed: "
            f"its resolved config is in {self.run_dir / 'train_config.json'}); use a new run_dir, or --restart to "
            f"discard the old checkpoints")
        before = resume.state.get("training_config")
        if before is None:  # checkpoints from before training_config was saved in them
            resolved = self.run_dir / "train_config.json"
            before = json.loads(resolved.read_text()).get("config", {}) if resolved.exists() else None
        if not isinstance(before, dict):
            raise refused
        now = self.config.training_hash_dict()
        before = {k: before.get(k) for k in now}
        if config_hash({"config": before, **self.identity}) != resume.state.get("config_hash"):
            raise refused  # the model or the data changed, or the record does not match the checkpoint
        changes = {k: [before[k], now[k]] for k in now if json.dumps(before[k]) != json.dumps(now[k])}
        allowed = set(self.allow_config_change) & set(CHANGEABLE_ON_RESUME)
        if not changes or not set(changes) <= allowed:
            listed = ", ".join(describe_change(k, a, b) for k, (a, b) in changes.items())
            changeable = [k for k in changes if k in CHANGEABLE_ON_RESUME]
            hint = (f"; to resume with it, add --allow-config-change {' --allow-config-change '.join(changeable)}"
                    if changeable and len(changeable) == len(changes) else
                    f"; only {', '.join(CHANGEABLE_ON_RESUME)} may change on a resume (--allow-config-change KEY)")
            raise ConfigError(f"{self.run_dir} holds checkpoint {resume.path.name} of a different run ({listed})"
                              f"{hint}; or use a new run_dir, or --restart to discard the old checkpoints")
        return changes

    def _admit(self, model_config: dict, frozen: str) -> dict:
        longest = max(e.n_tokens for e in self.dataset.train) - 1
        estimate = estimate_for_config(model_config, self.config, frozen, longest,
                                       attention=self.attention["kind"])
        self.watchdog.admit(estimate)
        return estimate.to_dict()

    def _probe_attention(self, model_config: dict) -> dict:
        """Whether this backend's attention backward holds the score matrix (the estimate needs
        it: at 10K tokens that is tens of GB) or is fused; a short measurement, before any weight.
        Not measured on the CPU, whose sdpa backward always holds it (the probe takes seconds there)."""
        if mx.default_device() == mx.cpu:
            return {"kind": "materialized", "reason": "CPU backend: sdpa's backward holds the scores"}
        heads = int(model_config["num_attention_heads"])
        seq = min(1024, max(e.n_tokens for e in self.dataset.train))
        return probe_attention(heads, int(model_config["hidden_size"]) // heads, compute_dtype(model_config), seq)

    def _load_model(self, model_config: dict) -> dict:
        self.model, config = load_mixed_model(self.model_dir)
        self.dtype = compute_dtype(config)
        self.master = self.config.settings(self.dtype).master
        return config

    def _choose_expert_kernel(self, model_config: dict, resumed: dict | None) -> dict:
        """The recorded choice on resume (bit-exact replay); else forced, or measured."""
        cfg = self.config
        # Bit-identical either way, so a resumed run may probe again.
        # Long enough that the kernels' launch costs weigh as in a real step; capped so the probe stays short.
        seq = min(PROBE_TOKENS, max(e.n_tokens for e in self.dataset.train))
        kernels = probe_kernels(self.model, self.schedule.groups[0][0], seq)
        self.kernels = KernelChoices.from_records(kernels)  # this run's, passed down from here
        if resumed is not None:
            recorded = resumed["expert_kernel"] if "expert_kernel" in resumed else resumed["frozen_path"]  # older
            return {"choice": expert_kernel(recorded, warn=False), "reason": "recorded when the run started"} | kernels
        record = choose_expert_path(self.model, self.schedule.groups[0][0], cfg.expert_kernel, seq, self.dtype,
                                    cfg.seed, self.kernels) | kernels
        if cfg.expert_kernel != "auto":
            return record
        choice = record["choice"]
        if choice != "qmm":
            try:
                record[f"estimate_{choice}"] = self._admit(model_config, choice)
            except MemoryBudgetExceeded as err:
                record.update(choice="qmm", reason=f"{choice} is faster but over budget: {str(err).splitlines()[0]}")
        return record

    def _start_line(self, resolved: dict, resuming: bool) -> str:
        """One line a user reads before the first step: what trains where, on what budget, with which rows."""
        def short(dtype: str) -> str:
            return dtype.replace("mlx.core.", "")

        manifest, memory = self.dataset.manifest, self.config.memory
        dropped = manifest["rows_read"] - manifest["kept"]
        return (f"lfm-mlx train: {'resuming' if resuming else 'starting'} {self.model_dir.name} on "
                f"{console.where()}; compute {short(resolved['compute_dtype'])}, masters "
                f"{short(resolved['master_dtype'])}, experts {self.frozen}; {len(resolved['groups'])} group(s) x "
                f"{self.spg} steps x {self.config.epochs} epoch(s) = {resolved['total_steps']} "
                f"steps; memory soft/hard {memory.soft_gb:g}/{memory.hard_gb:g} GB of {memory.total_gb:g} "
                f"(machine {console.machine_gb():.1f} GB); rows {manifest['kept']} of "
                f"{manifest['rows_read']}" + (f" ({dropped} dropped: run_dir/data_manifest.json)" if dropped else "")
                + f"; run_dir {self.run_dir}")

    # ------------------------------------------------------------ training

    def _micro_ids(self, phase: int) -> list[list[str]]:
        """Row ids of every micro-batch of a phase: the data order a checkpoint records."""
        return [self.stream.row_ids(m) for step in range(self.spg) for m in self._batches(phase, step)]

    def _batches(self, phase: int, step: int) -> list[int]:
        """Stream indices of the micro-batches of step `step` of phase `phase`."""
        acc = self.config.grad_accumulation
        first = (phase * self.spg + step) * acc
        return list(range(first, first + acc))

    def train(self, restart: bool = False) -> TrainResult:
        """Run (or resume) training; returns where the trained model is. The run directory is locked
        for the whole run: a second process on it gets DirectoryBusy."""
        self.config.check_paths()  # before the lock creates run_dir
        with contextlib.ExitStack() as stack:
            ranks.claim_run_dir(self.world, self.run_dir, self.config.model, stack)  # rank 0's for the whole job
            while True:
                try:
                    return self._train(restart)
                except UndoStep as undo:  # replay from the newest checkpoint (as a resume), the step skipped
                    self.model = self.optimizer = None  # one model in memory, not two
                    restart = False
                    if self.config.progress and self.world.main:
                        console.say("train", f"step {undo.step} made the trained weights non-finite; undoing it: "
                                             "replaying from the newest checkpoint with that step skipped")

    def _train(self, restart: bool) -> TrainResult:
        cfg = self.config
        model_config = self._prepare(restart)
        summary_path = self.run_dir / "summary.json"
        summary = self.world.broadcast_json(self.world.on_main(
            lambda: json.loads(summary_path.read_text()) if summary_path.exists() else None))
        if summary is not None:
            if summary.get("config_hash") == self.hash and summary.get("complete"):
                return TrainResult.from_record(summary["result"], run_dir=self.run_dir,
                                              model_dir=Path(summary["result"]["model_dir"]))
        self.watchdog = MemoryWatchdog(cfg.memory.budget(), cfg.memory.sample_every, reader=self.memory_reader)
        self.attention = self._probe_attention(model_config)
        admission_path = "dequant" if cfg.expert_kernel == "dequant" else "qmm"
        estimate = self.world.on_every(self._admit, model_config, admission_path)  # each rank's own budget

        resume, changes = ranks.read_resume(self.world, self.run_dir, self.hash, self._config_changes)
        model_config = self._load_model(model_config)
        frozen = self._choose_expert_kernel(model_config, resume.state if resume else None)
        self.frozen = frozen["choice"]
        self.stream = BatchStream(self.dataset.train, cfg.batch_size * self.world.size, cfg.seed,  # global batches
                                  cfg.sort_by_length, self.pad_id)
        groups = self.schedule.groups
        resolved = {
            "config": cfg.model_dump(mode="json"), "config_hash": self.hash, "model_dir": str(self.model_dir),
            "schedule": self.schedule.to_dict(), "groups": groups, "steps_per_group": self.spg,
            "phases": self.n_phases, "total_steps": self.n_phases * self.spg,
            "warmup_steps_effective": min(cfg.warmup_steps, self.spg // 2),
            "compute_dtype": str(self.dtype), "master_dtype": str(self.master), "expert_kernel": frozen,
            "memory_estimate": estimate, "attention": self.attention, "train_examples": len(self.dataset.train),
            "valid_examples": len(self.dataset.valid),
        }
        self.world.on_main(atomic_write_json, self.run_dir / "train_config.json", resolved)
        self.world.on_main(atomic_write_json, self.run_dir / "expert_kernel.json", frozen)  # frozen_path.json before issue 28
        if cfg.progress and self.world.main:
            print(self._start_line(resolved, resume is not None), file=sys.stderr, flush=True)

        # ---- state: fresh or restored
        state = {"phase": 0, "step_in_phase": 0, "global_step": 0, "skipped_steps": 0, "consecutive_skips": 0,
                 "tokens_seen": 0, "history": [], "initial_valid_loss": None, "layers_done": [], "config_changes": []}
        set_expert_kernel(self.model, self.frozen, kernels=self.kernels)
        if resume is None:
            self._truncate_metrics(0)
            valid = evaluate_loss(self.model, self.dataset.valid, cfg.batch_size, self.pad_id) if (
                cfg.eval_each_group and self.dataset.valid) else None
            state["initial_valid_loss"] = valid
            self._log({"kind": "start", "step": 0, "valid_loss": valid, "expert_kernel": frozen,
                       "estimate_gb": estimate["total"] / GB, "steps_per_group": self.spg,
                       "total_steps": self.n_phases * self.spg})
        else:
            state.update({k: resume.state.get(k, state[k]) for k in state})
            self._truncate_metrics(resume.state["metrics_records"])
            active = groups[state["phase"] % len(groups)] if state["step_in_phase"] else []
            done = {k: v for k, v in resume.weights.items() if layer_of(k) not in active}
            self.model.load_weights(list(done.items()) + list(resume.group_start.items()), strict=False)
            set_expert_kernel(self.model, self.frozen, kernels=self.kernels)
            self._log({"kind": "resume", "step": state["global_step"], "checkpoint": resume.path.name})
            if changes:  # allowed by --allow-config-change: kept in the run's history and every later checkpoint
                state["config_changes"].append({"step": state["global_step"], "checkpoint": resume.path.name,
                                                "changes": changes})
                state["consecutive_skips"] = 0
                self._log({"kind": "config_change", "step": state["global_step"], "changes": changes})

        progress = console.progress("train", self.n_phases * self.spg, "step", state["global_step"],
                                    cfg.progress and self.world.main)
        self.watchdog.start()  # the first sample counts the first step, not the model loading before it
        try:
            for phase in range(state["phase"], self.n_phases):
                self._run_phase(phase, state, resume, progress)
                resume = None
        finally:
            progress.close()
        return self._finish(state, model_config, frozen)

    def _run_phase(self, phase: int, state: dict, resume, progress) -> None:
        cfg = self.config
        groups = self.schedule.groups
        epoch, index = divmod(phase, len(groups))
        layers = groups[index]
        mid_group = resume is not None and state["step_in_phase"]
        group = ActiveGroup(self.model, layers, cfg, self.spg, self.frozen,
                            ranks.park_dir(self.world, self.run_dir, self._scratch), self.dtype,
                            resume=resume if mid_group else None, kernels=self.kernels)
        optimizer = self.optimizer = group.optimizer
        start = group.start
        first = state["step_in_phase"] if mid_group else 0
        order = self._micro_ids(phase)
        if mid_group and resume.state.get("data_order") != order:
            raise ConfigError(f"{resume.path}: the data order of phase {phase} differs from the checkpoint's; "
                              "the training data or its split changed; use a new run_dir")
        phase_start = time.perf_counter()

        def snapshot(step_in_phase: int) -> dict:
            return {**state, "phase": phase, "step_in_phase": step_in_phase, "config_hash": self.hash,
                    "training_config": cfg.training_hash_dict(),
                    "expert_kernel": self.frozen, "data_order": order, "epoch": epoch, "group": index,
                    "rng": {"rule": "mx.random.seed(sha256(f'{seed}/step/{step}')[:4]) before every step",
                            "seed": cfg.seed}}

        for step in range(first, self.spg):
            global_step = phase * self.spg + step
            if global_step + 1 in self.undone:  # undone before this replay: skipped, logged and counted again
                state.update(global_step=global_step + 1, skipped_steps=state["skipped_steps"] + 1,
                             consecutive_skips=state["consecutive_skips"] + 1)
                self._log(self.undone[global_step + 1])
                progress.update(1)
                continue
            mx.random.seed(_step_seed(cfg.seed, global_step))
            tick = time.perf_counter()
            micro = self._batches(phase, step)
            # The step's learning rate too: one the config would refuse (an API caller can skip
            # validation) would write non-finite or ~1e38 weights, so such a step is not applied.
            step_lr = group.next_learning_rate()
            hook = None if self.grad_hook is None else functools.partial(self.grad_hook, global_step)
            batches = [ranks.local_batch(self.world, self.dataset.train, self.stream.indices(m), self.pad_id)
                       for m in micro]  # this rank's slice of each micro-batch of the global stream
            result = group.step(batches, grad_hook=hook, world=self.world,
                                accept=lambda loss, norm: math.isfinite(loss) and math.isfinite(norm)
                                and 0 < step_lr < 1)
            loss, norm, trained = result.loss, result.norm, result.trained
            ids = [row for m in micro for row in self.stream.row_ids(m)]
            tokens = sum(self.dataset.train[i].n_tokens - 1 for m in micro for i in self.stream.indices(m))
            state["global_step"] = global_step + 1
            if not result.applied:
                state["skipped_steps"] += 1
                state["consecutive_skips"] += 1
                self._log({"kind": "skipped", "step": global_step + 1, "phase": phase, "row_ids": ids,
                           "loss": loss if math.isfinite(loss) else str(loss), "grad_norm": str(norm),
                           "lr": step_lr if math.isfinite(step_lr) else str(step_lr)})
                if state["consecutive_skips"] >= cfg.max_consecutive_skips:
                    self._checkpoint(snapshot(step + 1), set(state["layers_done"]), layers, start, optimizer)
                    raise NonFiniteStop(global_step + 1, state["consecutive_skips"], ids, cfg.learning_rate,
                                        f"{state['consecutive_skips']} consecutive steps had a non-finite loss or "
                                        f"gradient, or a learning rate outside (0, 1) (now {step_lr:g}); none was "
                                        "applied")
                progress.update(1)
                continue
            weight_norm = trained_weight_norm(self.model)
            if not math.isfinite(weight_norm):
                # The update freed the old weights as it went (memory stays flat), so it is undone by a
                # replay from the newest checkpoint, bit-identical as a resume, that skips this step.
                state["skipped_steps"] += 1
                state["consecutive_skips"] += 1
                record = {"kind": "skipped", "step": global_step + 1, "phase": phase, "row_ids": ids, "loss": loss,
                          "grad_norm": norm, "weight_norm": str(weight_norm),
                          "reason": "after the update the trained weights were non-finite or overflowed float32; "
                                    "the step was undone"}
                self._log(record)
                if state["consecutive_skips"] >= cfg.max_consecutive_skips:
                    raise NonFiniteStop(global_step + 1, state["consecutive_skips"], ids, cfg.learning_rate,
                                        f"{state['consecutive_skips']} consecutive steps were skipped, the last "
                                        f"because its update made the trained weights non-finite or overflow float32 "
                                        f"(norm {weight_norm}, learning rate {step_lr:g}); nothing was saved")
                self.undone[global_step + 1] = record
                raise UndoStep(global_step + 1)
            state["consecutive_skips"] = 0
            seconds = time.perf_counter() - tick
            state["tokens_seen"] += tokens
            stop = None
            try:
                sample = self.watchdog.check(global_step + 1)
            except MemoryHardStop as err:
                sample, stop = err.sample, err
            stop = ranks.agree_on_stop(self.world, stop, global_step + 1)  # any rank's hard stop stops all
            self._log({"kind": "step", "step": global_step + 1, "epoch": epoch, "phase": phase, "group": index,
                       "layers": layers, "loss": loss, "lr": optimizer.learning_rate.item(),
                       "grad_norm": norm, "weight_norm": weight_norm, "tokens": tokens, "trained_tokens": trained,
                       "tokens_per_s": tokens / seconds, "step_s": seconds,
                       "peak_memory_gb": (sample.peak if sample else mx.get_peak_memory()) / GB,
                       "active_memory_gb": (sample.active if sample else mx.get_active_memory()) / GB,
                       **self.world.reduce_record()})
            ranks.say_cost(self.world, cfg.progress and step == first, f"group {index}'s gradients")
            progress.set_postfix(loss=f"{loss:.4f}", group=f"{index}/{len(self.schedule)}", epoch=epoch)
            progress.update(1)
            if stop is not None:  # the step is done and logged: save it, then stop before memory runs out
                self._checkpoint(snapshot(step + 1), set(state["layers_done"]), layers, start, optimizer)
                raise stop
            last = step == self.spg - 1
            if cfg.checkpoint_every and (global_step + 1) % cfg.checkpoint_every == 0 and not last:
                self._checkpoint(snapshot(step + 1), set(state["layers_done"]), layers, start, optimizer)

        def rounding_key(name: str) -> mx.array:  # per tensor and phase: a resumed run draws the same noise
            digest = hashlib.sha256(f"{cfg.seed}/{phase}/{name}".encode()).digest()
            return mx.random.key(int.from_bytes(digest[:4], "little"))

        retention = group.close(rounding_key if cfg.stochastic_rounding else None)
        valid = evaluate_loss(self.model, self.dataset.valid, cfg.batch_size, self.pad_id) if (
            cfg.eval_each_group and self.dataset.valid) else None
        record = {"kind": "group_end", "step": state["global_step"], "epoch": epoch, "phase": phase,
                  "group": index, "layers": layers, "retention": retention, "valid_loss": valid,
                  "seconds": time.perf_counter() - phase_start}
        if cfg.optimizer_state in ("int8", "int8-first"):
            record["moment_kernel"] = dict(self.kernels.update.moments)  # how the int8 moments were packed
        elif cfg.optimizer == "adamw" and cfg.fused_update:
            record["adamw_kernel"] = {layout: dict(kernel) for layout, kernel in self.kernels.update.adamw.items()}
        self._log(record)
        state["history"].append({k: record[k] for k in ("phase", "group", "layers", "valid_loss", "retention")})
        state["layers_done"] = sorted(set(state["layers_done"]) | set(layers))
        state.update(phase=phase + 1, step_in_phase=0)
        self._checkpoint({**snapshot(0), "phase": phase + 1, "data_order": []}, set(state["layers_done"]), [],
                         None, None)

    def _finish(self, state: dict, model_config: dict, frozen: dict) -> TrainResult:
        out = self.run_dir / "model"
        stored = [v.size * 2 if v.dtype in (mx.float32, mx.float16, mx.bfloat16) else v.nbytes  # floats go as bf16
                  for _, v in tree_flatten(self.model.parameters())]

        def save() -> None:
            check_free_space(out, sum(stored), "the trained model")
            with atomic_dir(out) as tmp:
                save_model_dir(self.model, model_config, self.model_dir, tmp)

        self.world.on_main(save)
        final = state["history"][-1]["valid_loss"] if state["history"] else None
        result = TrainResult(run_dir=self.run_dir, model_dir=out, steps=state["global_step"],
                             skipped_steps=state["skipped_steps"], initial_valid_loss=state["initial_valid_loss"],
                             final_valid_loss=final, expert_kernel=self.frozen, groups=state["history"])
        record = {k: (str(v) if isinstance(v, Path) else v) for k, v in result.__dict__.items()}
        self._log({"kind": "end", "step": state["global_step"], "valid_loss": final,
                   "skipped_steps": state["skipped_steps"], "model_dir": str(out)})
        self.world.on_main(atomic_write_json, self.run_dir / "summary.json",
                          {"complete": True, "config_hash": self.hash, "result": record,
                           "config_changes": state["config_changes"],
                           "tokens_seen": state["tokens_seen"], "expert_kernel": frozen})
        return result


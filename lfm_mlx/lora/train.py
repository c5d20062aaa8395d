"""The LoRA training loop: loss, schedule, checkpoints and exact resume, early stopping, data parallel."""

from __future__ import annotations

import contextlib
import json
import math
import sys
import time
from pathlib import Path
from typing import Callable

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
from mlx.utils import tree_flatten, tree_map, tree_map_with_path

from lfm_mlx import console
from lfm_mlx.errors import InvalidInput
from lfm_mlx.fsutil import (
    atomic_dir, atomic_write_json, atomic_write_text, check_free_space, locked, recover_directory, refuse_overlap,
)
from lfm_mlx.lora.adapters import apply_lora, load_data, lora_parameters, save_safetensors_atomic
from lfm_mlx.lora.config import RUN_IDENTITY_KEYS, LoraConfig
from lfm_mlx.model.io import base_fingerprint
from lfm_mlx.train import distributed
from lfm_mlx.train.schedules import warmup_cosine


def _loss(model: nn.Module, inputs: mx.array, targets: mx.array, mask: mx.array,
          n_total: mx.array | None = None) -> tuple[mx.array, mx.array]:
    """Mean loss over the masked tokens; divided by `n_total` (every rank's tokens) it is this rank's
    share of the global batch's mean, so the ranks' gradients sum to the whole batch's gradient."""
    from lfm_mlx.data import masked_loss

    total, count = masked_loss(model(inputs), targets, mask)
    return total / mx.maximum(count if n_total is None else n_total, 1), count


def evaluate_loss(model: nn.Module, examples: list, batch_size: int,
                  world: distributed.World | None = None) -> float | None:
    """Token-weighted mean loss over every masked token of `examples` (None when empty); with
    several ranks each scores its slice and every rank gets the same total."""
    from lfm_mlx.data import iterate_batches, masked_loss

    if not examples:
        return None
    model.eval()
    world = world or distributed.World()
    total, count = 0.0, 0
    mine = world.shard(examples)
    for batch in iterate_batches(mine, batch_size, seed=0, epoch=0) if mine else ():
        loss_sum, n = masked_loss(model(batch.inputs), batch.targets, batch.loss_mask)
        mx.eval(loss_sum, n)
        total, count = total + loss_sum.item(), count + n.item()
    total, count = world.sum_scalars(total, count)
    return total / max(count, 1)


def _schedule(config: LoraConfig, total_steps: int):
    """Warmup from 1% of the rate, then cosine to 10% of it (or the rate held: lr_schedule constant)."""
    lr = config.learning_rate
    return warmup_cosine(lr, total_steps, config.warmup_steps, 0.1, warmup_start=lr * 0.01,
                         cosine=config.lr_schedule == "cosine")


def _read_checkpoint(path: Path, adapters: dict, optimizer_state: dict) -> tuple[dict, dict]:
    """The checkpoint's adapters and optimizer state, checked against this run's (rank 0 reads them)."""
    saved = mx.load(str(path / "adapters.safetensors")), mx.load(str(path / "optimizer.safetensors"))
    if set(saved[0]) != set(adapters) or set(saved[1]) != set(optimizer_state):
        raise ValueError(f"{path}: adapters or optimizer state do not match this run's LoRA layers; start a new out_dir")
    return saved


class NonFiniteStop(RuntimeError):
    """Too many consecutive steps whose loss, gradient or update was non-finite (each was undone)."""

    exit_code = 65  # EX_DATAERR, as lfm-mlx train


def _all_finite(tree) -> bool:
    """True when every array of `tree` is finite: one reduction over them (LoRA tensors are small)."""
    leaves = [value for _, value in tree_flatten(tree)]
    total = sum(value.astype(mx.float32).square().sum() for value in leaves)  # overflow counts as non-finite
    return bool(mx.isfinite(total).item())


def _checkpoint(out: Path, model: nn.Module, optimizer: optim.Optimizer, state: dict) -> None:
    arrays = [*lora_parameters(model).values(), *(v for _, v in tree_flatten(optimizer.state))]
    check_free_space(out / "checkpoint", sum(a.nbytes for a in arrays), "the LoRA checkpoint")
    with atomic_dir(out / "checkpoint") as tmp:
        mx.save_safetensors(str(tmp / "adapters.safetensors"), lora_parameters(model))
        mx.save_safetensors(str(tmp / "optimizer.safetensors"), dict(tree_flatten(optimizer.state)))
        (tmp / "state.json").write_text(json.dumps(state, indent=2))


def _check_resumable(out: Path, config: LoraConfig) -> dict | None:
    """The checkpoint state to resume from, or None for a fresh run; refuse mismatched runs."""
    state_path = out / "checkpoint" / "state.json"
    if not state_path.exists():
        return None
    state = json.loads(state_path.read_text())
    if not config.resume:
        raise FileExistsError(
            f"out_dir: {out} already holds a LoRA run (step {state['step']}); set resume: true to continue it "
            f"or choose a new out_dir"
        )
    fingerprint = base_fingerprint(config.model)
    if state.get("base_fingerprint", fingerprint) != fingerprint:
        raise InvalidInput(
            f"model: {config.model} is not the base {out}'s checkpoint was trained on (its weights or config.json "
            f"differ: fingerprint {fingerprint[:12]} vs {state['base_fingerprint'][:12]}); pass that base, or "
            f"choose a new out_dir")
    previous = state.get("config", {})
    changed = [f"{k} ({previous.get(k)!r} -> {getattr(config, k)!r})" for k in RUN_IDENTITY_KEYS
               if json.dumps(previous.get(k)) != json.dumps(getattr(config, k))]
    if changed:
        raise ValueError(
            f"out_dir: {out} holds a run made with different settings: {', '.join(changed)}; "
            f"restore them to resume, or choose a new out_dir"
        )
    return state


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop metric rows written after the checkpoint we resume from (they will be redone)."""
    if not path.exists():
        return
    kept = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line).get("step", 0) <= step]
    atomic_write_text(path, "".join(line + "\n" for line in kept))


def train_lora(config: LoraConfig, on_step: Callable[[dict], None] | None = None) -> dict:
    """Run (or resume) a LoRA pass; return the summary also written to out_dir/summary.json. The
    out_dir is locked for the whole run: a second process on it gets DirectoryBusy."""
    problems = config.problems()
    if problems:
        raise InvalidInput("invalid LoRA config:\n  " + "\n  ".join(problems))
    out = Path(config.out_dir)
    world = distributed.init()  # one process, or the ranks mlx.launch started: rank 0 alone holds the lock and writes

    def claim(stack: contextlib.ExitStack) -> None:
        refuse_overlap(out, {"base model": config.model})  # an output is never an input
        stack.enter_context(locked(out))
        recover_directory(out)  # what killed writes left: temporaries, a half-replaced checkpoint

    with contextlib.ExitStack() as stack:
        world.on_main(claim, stack)
        return _train_lora(config, out, on_step, world)


def _train_lora(config: LoraConfig, out: Path, on_step: Callable[[dict], None] | None,
                world: distributed.World) -> dict:
    from lfm_mlx.data import batch_order, make_batch
    from lfm_mlx.model.io import load
    from lfm_mlx.model.quant import float_experts

    resume_state = world.broadcast_json(world.on_main(_check_resumable, out, config))
    if resume_state is not None and resume_state.get("world_size", 1) != world.size:
        raise InvalidInput(
            f"out_dir: {out} was trained by {resume_state.get('world_size', 1)} process(es) and this launch has "
            f"{world.size}; resume it with the same count (mlx.launch -n {resume_state.get('world_size', 1)}), "
            f"or choose a new out_dir")

    model, tokenizer, model_config = load(config.model, return_config=True)
    if config.float_experts:
        float_experts(model)
    train, valid, test, manifest = load_data(config, tokenizer)
    mx.random.seed(config.seed)  # LoRA A matrices start random
    adapter = apply_lora(model, config)
    previous_manifest = out / "data_manifest.json"
    if world.size > 1:  # every rank loads its own copy of the base and the rows: they must be rank 0's
        mine = json.dumps([adapter["lfm_mlx"]["base_fingerprint"], manifest], sort_keys=True, default=str)
        world.agree(None if world.broadcast_json(mine) == mine else InvalidInput(
            f"rank {world.rank}: model {config.model} or data {config.data} differ from rank 0's; give every "
            f"machine the same files"))

    def write_run_files() -> None:
        if resume_state is not None and previous_manifest.exists() \
                and json.loads(previous_manifest.read_text()) != json.loads(json.dumps(manifest)):
            raise ValueError(f"data: the rows changed since {out}'s checkpoint (see {previous_manifest}); "
                             f"restore them to resume, or choose a new out_dir")
        atomic_write_json(out / "adapter_config.json", adapter)
        atomic_write_json(out / "run_config.json", config.to_dict())
        atomic_write_json(out / "data_manifest.json", manifest)

    world.on_main(write_run_files)
    n_trainable = sum(v.size for v in lora_parameters(model).values())
    if world.size > 1 and world.main and config.progress:
        grad_bytes = sum(v.nbytes for v in lora_parameters(model).values())
        print(f"[lora] {world.size} ranks, batch {config.batch_size} each (global {config.batch_size * world.size}); "
              + distributed.cost_model(grad_bytes, world.size, f"{n_trainable:,} adapter gradients"), file=sys.stderr)

    steps_per_epoch = math.ceil(len(train) / (config.batch_size * world.size))  # batch_size is per rank
    total_steps = config.epochs * steps_per_epoch
    if config.max_steps is not None:
        total_steps = min(total_steps, config.max_steps)
    optimizer = optim.AdamW(learning_rate=_schedule(config, total_steps), weight_decay=config.weight_decay)
    if config.progress and world.main:
        console.say("lora", _start_line(config, adapter, model_config, manifest, (train, valid, test), total_steps,
                                        n_trainable, resume_state))

    state = {"step": 0, "epoch": 0, "batch": 0, "best_val_loss": None, "best_step": None, "bad_evals": 0,
             "stopped_early": False, "elapsed_s": 0.0, "skipped_steps": 0, "consecutive_skips": 0,
             "config_changes": []}
    changes = {}
    if resume_state is not None:  # rank 0 reads the checkpoint and hands it to the others bit for bit
        optimizer.init(model.trainable_parameters())
        like = lora_parameters(model), dict(tree_flatten(optimizer.state))
        saved = world.on_main(_read_checkpoint, out / "checkpoint", *like) or (None, None)
        model.load_weights(list(world.broadcast_arrays(saved[0], like[0]).items()), strict=False)
        restored = world.broadcast_arrays(saved[1], like[1])
        optimizer.state = tree_map_with_path(lambda name, _: restored[name], optimizer.state)
        state.update({k: resume_state.get(k, state[k]) for k in state})
        world.on_main(_truncate_metrics, out / "metrics.jsonl", state["step"])
        previous = resume_state.get("config", {})
        changes = {k: [previous.get(k), v] for k, v in config.to_dict().items()
                   if k in previous and json.dumps(previous[k]) != json.dumps(v)}
        if changes:  # settings a resume may change (learning_rate, patience, ...): kept in the run's history
            state["config_changes"].append({"step": state["step"], "changes": changes})
            state["consecutive_skips"] = 0
    mx.random.seed(config.seed + state["step"])  # dropout masks

    loss_and_grad = nn.value_and_grad(model, _loss)
    fingerprint = adapter["lfm_mlx"]["base_fingerprint"]
    metrics_file = open(out / "metrics.jsonl", "a") if world.main else None
    started = time.perf_counter() - state["elapsed_s"]

    def log(row: dict) -> None:
        if metrics_file is not None:
            metrics_file.write(json.dumps(row) + "\n")
            metrics_file.flush()
        if on_step is not None:
            on_step(row)

    def save_best() -> None:
        world.on_main(save_safetensors_atomic, out / "adapters.safetensors", lora_parameters(model), {"format": "mlx"})

    def checkpoint() -> None:
        world.on_main(_checkpoint, out, model, optimizer, {**state, "config": config.to_dict(),
                                                           "base_fingerprint": fingerprint, "world_size": world.size})

    def validate() -> bool:
        """Evaluate; update best / patience; True when training should stop."""
        val = evaluate_loss(model, valid, config.batch_size, world)
        model.train()
        if val is None:
            save_best()  # no validation set: the latest adapters are the result
            return False
        best = state["best_val_loss"]
        improved = best is None or val < best - config.min_delta
        log({"step": state["step"], "epoch": state["epoch"], "val_loss": val, "improved": improved})
        if improved:
            state.update(best_val_loss=val, best_step=state["step"], bad_evals=0)
            save_best()
        else:
            state["bad_evals"] += 1
        return bool(config.patience) and state["bad_evals"] >= config.patience

    bar = console.progress("lora", total_steps, "step", state["step"], show=config.progress and world.main)
    done = state["stopped_early"] or state["step"] >= total_steps
    if changes:
        log({"step": state["step"], "config_change": changes})
    if state["step"] == 0 and not done and valid:
        validate()  # the starting point, so "best" can never be worse than the base
    model.train()
    try:
        while not done and state["epoch"] < config.epochs:
            # One seeded order of global batches; each rank takes its slice (all of it when alone).
            order = batch_order([e.n_tokens for e in train], config.batch_size * world.size, config.seed, state["epoch"])
            for indices in order[state["batch"]:]:
                mine = world.shard(indices)
                batch = make_batch([train[i] for i in mine]) if mine else None
                tokens = batch.loss_mask.sum() if mine else mx.array(0, mx.int32)
                tokens = world.sum(tokens)
                if batch is not None:
                    (loss, _), grads = loss_and_grad(model, batch.inputs, batch.targets, batch.loss_mask, tokens)
                else:  # fewer examples left than ranks: this rank adds nothing
                    loss, grads = mx.array(0.0), tree_map(mx.zeros_like, model.trainable_parameters())
                loss, grads = world.sum(loss), world.all_sum_tree(grads)  # before clipping: every rank, one update
                grad_norm = None
                if config.max_grad_norm is not None:
                    grads, grad_norm = optim.clip_grad_norm(grads, config.max_grad_norm)
                # References, not copies (MLX arrays are immutable): a non-finite step is undone with them.
                before = (model.trainable_parameters(), tree_map_with_path(lambda _, v: v, optimizer.state))
                finite = _all_finite([loss, grads])
                if finite:
                    optimizer.update(model, grads)
                    mx.eval(model.trainable_parameters(), optimizer.state, loss, tokens)
                    finite = _all_finite(model.trainable_parameters())
                state["step"] += 1
                state["batch"] += 1
                if not finite:
                    model.update(before[0])
                    optimizer.state = before[1]
                    state["skipped_steps"] += 1
                    state["consecutive_skips"] += 1
                    log({"step": state["step"], "epoch": state["epoch"], "skipped": "a non-finite loss, gradient or "
                         "updated adapter weights; the step was undone", "loss": str(loss.item())})
                    if state["consecutive_skips"] >= config.max_consecutive_skips:
                        checkpoint()
                        raise NonFiniteStop(
                            f"stopped at step {state['step']}: {state['consecutive_skips']} consecutive steps had a "
                            f"non-finite loss, gradient or update (each undone; {out / 'checkpoint'} holds the last "
                            f"good adapters; see {out / 'metrics.jsonl'}). Fix the data, or lower the learning rate "
                            f"and resume: lfm-mlx lora CONFIG --learning-rate {config.learning_rate / 10:g}")
                    continue
                state["consecutive_skips"] = 0
                row = {"step": state["step"], "epoch": state["epoch"], "train_loss": loss.item(),
                       "tokens": tokens.item(), "lr": optimizer.learning_rate.item(),
                       "grad_norm": None if grad_norm is None else grad_norm.item(),
                       "elapsed_s": round(time.perf_counter() - started, 3),
                       "peak_memory_gb": round(mx.get_peak_memory() / 1e9, 4)}
                if world.size > 1:
                    row.update(allreduce_bytes=world.reduce_bytes, allreduce_s=round(world.reduce_s, 6))
                log(row)
                bar.set_postfix(loss=f"{row['train_loss']:.3f}", val=state["best_val_loss"] and f"{state['best_val_loss']:.3f}")
                bar.update(1)
                last = state["step"] >= total_steps
                stop = False
                if state["step"] % config.eval_every == 0 or last:
                    stop = validate()
                    state["stopped_early"] = stop
                if stop or last or state["step"] % config.save_every == 0:
                    state["elapsed_s"] = time.perf_counter() - started
                    checkpoint()
                if stop or last:
                    done = True
                    break
            else:
                state["epoch"] += 1
                state["batch"] = 0
    finally:
        if metrics_file is not None:
            metrics_file.close()
        bar.close()

    # The result is the best validation checkpoint (or the latest, without a validation set).
    best = world.on_main(lambda: dict(mx.load(str(out / "adapters.safetensors"))))
    model.load_weights(list(world.broadcast_arrays(best, lora_parameters(model)).items()), strict=False)
    summary = {
        "adapter_path": str(out), "model": config.model, "steps": state["step"], "total_steps": total_steps,
        "epochs_completed": round(state["step"] / steps_per_epoch, 3), "stopped_early": state["stopped_early"],
        "best_val_loss": state["best_val_loss"], "best_step": state["best_step"],
        "test_loss": evaluate_loss(model, test, config.batch_size, world), "world_size": world.size,
        "trainable_parameters": n_trainable, "lora_layers": len(adapter["lora_parameters"]["keys"]),
        "examples": {"train": len(train), "valid": len(valid), "test": len(test)},
        "elapsed_s": round(time.perf_counter() - started, 3),
        "peak_memory_gb": round(mx.get_peak_memory() / 1e9, 4),
        "skipped_steps": state["skipped_steps"], "config_changes": state["config_changes"],
    }
    if valid and state["best_step"] == 0:
        # Best-checkpoint selection kept the zero-initialized adapters (B = 0): they change nothing.
        summary["warning"] = (f"validation loss never improved on step 0 ({state['best_val_loss']:.4f}) in "
                              f"{state['step']} steps, so the adapters kept are the untrained ones and leave the model "
                              f"unchanged; lower learning_rate (now {config.learning_rate}) or add training rows")
        if world.main:
            print(f"[lora] warning: {summary['warning']}", file=sys.stderr)
    world.on_main(atomic_write_json, out / "summary.json", summary)
    return summary


def _start_line(config: LoraConfig, adapter: dict, model_config: dict, manifest: dict, splits: tuple,
                total_steps: int, n_trainable: int, resume_state: dict | None) -> str:
    """One line a user reads before the first step: what trains where, for how long, on which rows."""
    from lfm_mlx.model.io import compute_dtype

    parts = [manifest[k] for k in ("train", "valid", "test") if k in manifest] if "repair_set" in manifest else [manifest]
    kept, read = sum(p["kept"] for p in parts), sum(p["rows_read"] for p in parts)
    dropped = f" ({read - kept} dropped: out_dir/data_manifest.json)" if read > kept else ""
    return (f"{'resuming at step ' + str(resume_state['step']) if resume_state else 'starting'}: rank {config.rank} "
            f"adapters (scale {config.lora_scale:g}) on {len(adapter['lora_parameters']['keys'])} linear layers "
            f"({', '.join(config.modules)}) of {config.model}, {n_trainable:,} parameters, on {console.where()}, "
            f"compute {str(compute_dtype(model_config)).removeprefix('mlx.core.')}; {total_steps} steps at learning "
            f"rate {config.learning_rate:g}; rows {kept} of {read}{dropped}, train/valid/test "
            f"{'/'.join(str(len(s)) for s in splits)}; out_dir {config.out_dir}")


"""One grouped MoE training step, measured beside PyTorch + transformers and mlx-lm LoRA in one run.

    python benchmarks/grouped_step.py --preset lfm2.5-8b-a1b --seq 2048 --group-size 4 --steps 5
    python benchmarks/grouped_step.py --preset tiny-moe --seq 128 --steps 3      # CPU, CI-sized

Random weights of the preset's shapes are built in memory (no model directory). The MLX side is
the trainer's own step (`lfm_mlx.grouped`): int8 experts, the first group of `--group-size` MoE
layers dequantized and trained with its routers (AdamW), frozen experts on the path the trainer's
start-up measurement picks, gradient checkpointing on; variants switch one setting each. PyTorch
runs `Lfm2MoeForCausalLM` from the same config in bf16 (float32 on CPU) with the experts and
routers of the same layers trainable (AdamW). mlx-lm's LoRA (rank 16, every layer) runs on the
same int8-expert model. Results (tokens/s, peak memory, ratios) go to benchmarks/results/ as JSON (and, when the
environment variable OUT names a directory, as the device tool sets it, a copy goes there too).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import shutil
import statistics
import sys
import time
import traceback
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
from mlx.utils import tree_flatten

from lfm_mlx.data import Batch, masked_loss
from lfm_mlx.fsutil import atomic_write_json
from lfm_mlx.grouped import (
    TrainConfig, accumulate_gradients, activate_group, apply_update, make_loss_and_grad, make_optimizer,
    measure_frozen_paths, moe_layers, moe_params, requantize_group, set_frozen_path,
)
from lfm_mlx.mixed import parameter_bytes, quantize_experts
from lfm_mlx.models import build_model, cast_floats, compute_dtype
from lfm_mlx.synthetic import hf_config

GB = 1e9
VARIANTS = ("default", "other-frozen-path", "no-checkpoint", "no-stop-gradient", "bf16-master", "adafactor")


def build_mlx(preset: str) -> tuple[nn.Module, dict]:
    """The preset's mlx-lm model with random weights, compute dtype, experts int8 (group 64)."""
    config = hf_config(preset)
    model = build_model(config)  # mlx-lm's random initialisation, still lazy
    cast_floats(model, compute_dtype(config))
    config = quantize_experts(model, config, bits=8, group_size=64)
    for layer in model.model.layers:  # materialise layer by layer: bounded transient memory
        mx.eval(layer.parameters())
    mx.eval(model.parameters())
    return model, config


def random_batch(vocab: int, batch: int, seq: int, seed: int) -> Batch:
    ids = mx.random.randint(0, vocab, (batch, seq + 1), key=mx.random.key(seed)).astype(mx.int32)
    return Batch(ids[:, :-1], ids[:, 1:], mx.ones((batch, seq), dtype=mx.bool_), [])


def timed_steps(step, n_warmup: int, n_steps: int, peak_reset, peak_read) -> dict:
    """Run `step()` n_warmup + n_steps times; time the last n_steps and read their peak memory."""
    losses, times = [], []
    for i in range(n_warmup + n_steps):
        if i == n_warmup:
            peak_reset()
        start = time.perf_counter()
        losses.append(step())
        if i >= n_warmup:
            times.append(time.perf_counter() - start)
    return {"step_s": statistics.median(times), "step_s_all": times, "peak_memory_gb": peak_read(),
            "loss_first": losses[0], "loss_last": losses[-1]}


def mlx_peak_reset() -> None:
    mx.synchronize()
    mx.reset_peak_memory()


def mlx_peak_read() -> float:
    return mx.get_peak_memory() / GB


def run_mlx_variant(model: nn.Module, layers: list[int], batch: Batch, args, frozen: str, grad_checkpoint: bool,
                    stop_gradient: bool, master: mx.Dtype, optimizer: str) -> dict:
    """The trainer's step (same functions) on one group; the group is requantized afterwards."""
    set_frozen_path(model, frozen)
    start = moe_params(model, layers)
    tick = time.perf_counter()
    activate_group(model, layers, master)
    mx.eval(model.parameters())
    activate_s = time.perf_counter() - tick
    config = TrainConfig(model="-", data=["-"], run_dir="-", optimizer=optimizer, learning_rate=1e-5,
                         warmup_steps=0, steps_per_group=args.warmup + args.steps)
    opt = make_optimizer(config, args.warmup + args.steps)
    loss_and_grad = make_loss_and_grad(model, layers[0], grad_checkpoint, stop_gradient)

    def step() -> float:
        loss_sum, trained, grads = accumulate_gradients(model, loss_and_grad, [batch])
        apply_update(model, opt, grads, config.grad_clip)
        return loss_sum / trained

    result = timed_steps(step, args.warmup, args.steps, mlx_peak_reset, mlx_peak_read)
    tick = time.perf_counter()
    retention = requantize_group(model, layers, start, frozen)
    result.update(activate_s=activate_s, requantize_s=time.perf_counter() - tick,
                  retention=retention["experts"]["retention"],
                  settings={"frozen_path": frozen, "grad_checkpoint": grad_checkpoint, "stop_gradient": stop_gradient,
                            "master_dtype": str(master), "optimizer": optimizer})
    del opt, loss_and_grad
    gc.collect()
    mx.clear_cache()
    return result


def block_timings(model: nn.Module, layer: int, seq: int, dtype: mx.Dtype) -> dict:
    """Forward + input-gradient of one frozen MoE block at the benchmark's full sequence length."""
    return {f"{k}_ms": v * 1000 for k, v in measure_frozen_paths(model, layer, seq, dtype).items()}


def run_lora(model: nn.Module, batch: Batch, args) -> dict:
    """mlx-lm's LoRA (rank 16 on every linear / expert layer of every block), AdamW, on the same model."""
    from mlx_lm.tuner.utils import linear_to_lora_layers

    set_frozen_path(model, "qmm")  # LoRASwitchLinear wraps mlx-lm's own QuantizedSwitchLinear
    model.freeze()
    linear_to_lora_layers(model, len(model.model.layers), {"rank": 16, "scale": 20.0, "dropout": 0.0})
    mx.eval(model.parameters())
    trainable = sum(v.size for _, v in tree_flatten(model.trainable_parameters()))
    loss_and_grad = nn.value_and_grad(model, lambda m, x, t, k: masked_loss(m(x), t, k))
    opt = optim.AdamW(learning_rate=1e-5, weight_decay=0.0)

    def step() -> float:
        loss_sum, trained, grads = accumulate_gradients(model, loss_and_grad, [batch])
        apply_update(model, opt, grads, 1.0)
        return loss_sum / trained

    result = timed_steps(step, args.warmup, args.steps, mlx_peak_reset, mlx_peak_read)
    result["trainable_parameters"] = trainable
    return result


def run_torch(config: dict, layers: list[int], args) -> dict:
    """transformers' Lfm2MoeForCausalLM, experts + routers of `layers` trainable, AdamW."""
    import torch
    import transformers
    from transformers import Lfm2MoeConfig, Lfm2MoeForCausalLM

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32  # float32 on CPU, as MLX there
    torch.manual_seed(args.seed)
    keys = {k: v for k, v in config.items() if k not in ("architectures", "torch_dtype", "quantization",
                                                           "quantization_config", "model_type")}
    hf = Lfm2MoeConfig(**keys)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = Lfm2MoeForCausalLM(hf)
    finally:
        torch.set_default_dtype(default)
    model.to(dtype)
    model.train()
    prefixes = tuple(f"model.layers.{i}.feed_forward." for i in layers)
    params = []
    for name, p in model.named_parameters():
        p.requires_grad_(name.startswith(prefixes))
        if p.requires_grad:
            params.append(p)
    opt = torch.optim.AdamW(params, lr=1e-5, weight_decay=0.0)
    ids = torch.randint(0, hf.vocab_size, (args.batch, args.seq), device=device)

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    def step() -> float:
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync()
        return out.loss.item()

    def reset():
        sync()
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()

    def read():
        return torch.cuda.max_memory_allocated() / GB if device == "cuda" else None

    result = timed_steps(step, args.warmup, args.steps, reset, read)
    result.update(device=device, dtype=str(dtype), torch=torch.__version__, transformers=transformers.__version__,
                  trainable_parameters=sum(p.numel() for p in params),
                  experts_implementation=getattr(model.config, "_experts_implementation", None),
                  attn_implementation=getattr(model.config, "_attn_implementation", None),
                  gpu=torch.cuda.get_device_name() if device == "cuda" else None)
    del model, opt, params
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    return result


def _section(results: dict, name: str, out: Path, fn, *args):
    """Run one part; on failure keep its error in the results and go on (one try on the GPU box)."""
    print(f"[grouped_step] {name} ...", flush=True)
    try:
        results[name] = fn(*args)
    except Exception as err:  # a baseline's failure must not lose the other numbers
        results[name] = {"error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc()[-3000:]}
    atomic_write_json(out, results)
    return results[name]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="lfm2.5-8b-a1b", choices=["lfm2.5-8b-a1b", "tiny-moe"])
    parser.add_argument("--seq", type=int, default=None, help="tokens per sequence (2048 for 8B, 128 for tiny)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--group-size", type=int, default=4)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per measurement")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--variants", default="all", help=f"comma list of {','.join(VARIANTS)} or 'all'")
    parser.add_argument("--baselines", default="torch,lora", help="comma list of torch, lora (or 'none')")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", help="result JSON (default benchmarks/results/grouped_step-PRESET-DEVICE.json)")
    args = parser.parse_args(argv)
    args.seq = args.seq or (2048 if args.preset == "lfm2.5-8b-a1b" else 128)
    variants = list(VARIANTS) if args.variants == "all" else [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        parser.error(f"unknown variants {unknown}; choose from {', '.join(VARIANTS)}")
    baselines = [] if args.baselines == "none" else [b.strip() for b in args.baselines.split(",") if b.strip()]

    device = "gpu" if mx.default_device() == mx.gpu else "cpu"
    out = Path(args.out or Path(__file__).parent / "results" / f"grouped_step-{args.preset}-{device}.json")
    results: dict = {
        "benchmark": "grouped_step", "preset": args.preset, "seq": args.seq, "batch": args.batch,
        "group_size": args.group_size, "steps": args.steps, "warmup": args.warmup,
        "tokens_per_step": args.seq * args.batch, "mlx_device": str(mx.default_device()),
        "mlx_version": mx.__version__, "python": sys.version.split()[0], "machine": platform.machine(),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S"), "command": " ".join(sys.argv),
    }
    config = hf_config(args.preset)
    first_moe = config["num_dense_layers"]
    layers = list(range(first_moe, min(first_moe + args.group_size, config["num_hidden_layers"])))
    results["group_layers"] = layers  # the first group: backward runs through every layer above it

    if "torch" in baselines:  # first, so MLX's buffer cache cannot crowd it out
        _section(results, "torch", out, run_torch, config, layers, args)

    model, mixed = build_mlx(args.preset)
    dtype = compute_dtype(mixed)
    results["mlx_model_gb"] = parameter_bytes(model) / GB
    results["compute_dtype"] = str(dtype)
    batch = random_batch(config["vocab_size"], args.batch, args.seq, args.seed)
    # What the trainer does at start-up (a short sequence), and the same at the full length.
    probe = _section(results, "frozen_path_probe", out, lambda: {
        "seconds": measure_frozen_paths(model, layers[0], min(256, args.seq), dtype, args.seed)})
    _section(results, "block_timings_full_seq", out, block_timings, model, moe_layers(model)[-1], args.seq, dtype)
    chosen = min(probe["seconds"], key=probe["seconds"].get) if "seconds" in probe else "qmm"
    other = "dequant" if chosen == "qmm" else "qmm"
    results["frozen_path_choice"] = chosen

    settings = {
        "default": (chosen, True, True, mx.float32, "adamw"),
        "other-frozen-path": (other, True, True, mx.float32, "adamw"),
        "no-checkpoint": (chosen, False, True, mx.float32, "adamw"),
        "no-stop-gradient": (chosen, True, False, mx.float32, "adamw"),
        "bf16-master": (chosen, True, True, dtype, "adamw"),
        "adafactor": (chosen, True, True, mx.float32, "adafactor"),
    }
    results["mlx"] = {}
    for name in variants:
        if name == "bf16-master" and dtype == mx.float32:
            results["mlx"][name] = {"skipped": "compute dtype is float32 on this backend"}
            continue
        print(f"[grouped_step] mlx {name} ...", flush=True)
        try:
            results["mlx"][name] = run_mlx_variant(model, layers, batch, args, *settings[name])
        except Exception as err:  # keep the other variants' numbers
            results["mlx"][name] = {"error": f"{type(err).__name__}: {err}",
                                    "traceback": traceback.format_exc()[-3000:]}
        atomic_write_json(out, results)

    if "lora" in baselines:  # last: it rewrites the model's layers
        _section(results, "lora", out, run_lora, model, batch, args)

    tokens = args.seq * args.batch
    for part in [results["mlx"].get(v) for v in variants] + [results.get(b) for b in baselines]:
        if isinstance(part, dict) and "step_s" in part:
            part["tokens_per_s"] = tokens / part["step_s"]
    ours = results["mlx"].get("default", {})
    ratios = {}
    for base in baselines:
        theirs = results.get(base, {})
        if "tokens_per_s" in ours and "tokens_per_s" in theirs:
            ratios[f"mlx_default_vs_{base}_tokens_per_s"] = ours["tokens_per_s"] / theirs["tokens_per_s"]
            if ours.get("peak_memory_gb") and theirs.get("peak_memory_gb"):
                ratios[f"mlx_default_vs_{base}_peak_memory"] = ours["peak_memory_gb"] / theirs["peak_memory_gb"]
    results["ratios"] = ratios
    results["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S")
    atomic_write_json(out, results)

    print(f"\n{'run':<28}{'step s':>9}{'tokens/s':>11}{'peak GB':>9}")
    rows = [(f"mlx {v}", results["mlx"].get(v, {})) for v in variants] + [(b, results.get(b, {})) for b in baselines]
    for name, part in rows:
        if "step_s" in part:
            peak = part.get("peak_memory_gb")
            peak = "n/a" if peak is None else f"{peak:.3f}"
            print(f"{name:<28}{part['step_s']:>9.3f}{part['tokens_per_s']:>11.0f}{peak:>9}")
        else:
            print(f"{name:<28}  {part.get('error', part.get('skipped', 'not run'))[:80]}")
    print(json.dumps(ratios, indent=2))
    print(f"results: {out}")
    if os.environ.get("OUT") and Path(os.environ["OUT"]).is_dir():  # the device tool's return folder
        shutil.copy(out, Path(os.environ["OUT"]) / out.name)
        print(f"copied to {os.environ['OUT']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

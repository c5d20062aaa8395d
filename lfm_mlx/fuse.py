"""Fuse LoRA adapters into a base model: dequantize, merge, re-quantize (8 bits by default), and
check that the fine-tune survived before writing anything.

    lfm-mlx fuse --model MIXED_DIR --adapter-path ADAPTERS --save-path FUSED --rows repair_datasets/NAME
    lfm-mlx fuse ... --bits 4 --scope all --suite router --force

Merging follows mlx-lm's `fuse` math, W' = W + scale * B^T A^T (per expert for `LoRASwitchLinear`),
in float32 on the dequantized base weight. Then W' is stored as the scope says: `--scope experts`
quantizes expert projections only (routers bf16, `expert_bias` float32, the rest bf16, like the
mixed checkpoint); `--scope all` quantizes every linear layer and the embedding except routers.
`--bits bf16` quantizes nothing. Why not `mlx_lm.fuse`: it re-quantizes a quantized base at its own
bits (the seed-004 failure), has no scope, and cannot tell whether the fine-tune survived.

The fused directory is written and then loaded back; the fidelity report compares that loaded model
with base + adapters on a prompt set, and the directory only takes its final name when the report
passes the thresholds (or with --force). See `fidelity_gate` for what is checked and why.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterator

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten

from lfm_mlx import console
from lfm_mlx.errors import InvalidInput, debugging
from lfm_mlx.fsutil import atomic_dir, atomic_write_json, check_free_space, locked, recover, refuse_overlap

ROUTER_SUFFIX = "feed_forward.gate"
SCOPES = ("experts", "all")


@dataclass
class Thresholds:
    """Fidelity gate. Defaults, and why:

    - min_top1 0.95, on decisive positions (the adapter's top token leads its runner-up by
      >= top1_margin = 0.1 in probability): an 8-bit round trip of a real LLM keeps ~0.98-0.99
      top-1 agreement with its bf16 parent (llama.cpp's "same top p" for Q8_0), 4-bit formats
      ~0.90-0.95. Below 0.95 greedy decoding leaves the adapter model's path within a few tokens
      of a tool call. Near-ties are left out because any rounding flips them, bf16 included.
    - min_survival 0.5: below half, a layer's quantized weights carry less of the LoRA delta's
      direction than they lose; fusing into a 4-bit base and re-quantizing to 4 bits (seed 004)
      measures ~0.3 here, dequantize-merge-8-bit ~0.95-1.0.
    - min_answer_agreement 0.9: the share of scored answers (tool calls, replies) the fused model
      reproduces at every position where the adapter model is decisive. A call is all or nothing:
      one changed token breaks it, so per-position agreement hides what matters. In `lfm-mlx demo`
      the 8-bit fuse reproduces 1.00 of its answers and the 4-bit fuse 0.84 (kept 0.97 and 0.64);
      with a longer-trained base 0.97 and 0.81 (4-bit decisive top-1 still 0.98).
    - min_kept 0.8: the share of the fine-tune the fused model keeps, 1 - KL(adapter || fused) /
      KL(adapter || base). Top-1 agreement can pass while the fused model has slid halfway back
      toward the base (an earlier demo's 4-bit fuse: decisive top-1 0.956, kept 0.50); the 8-bit
      fuse keeps > 0.99 there. Judged only when the adapters moved the model by at least
      MIN_JUDGED_SHIFT nats per token: below that the ratio measures rounding noise.
    - max_kl (nats per token) is reported always and gated only when set: its scale depends on how
      sharp the model is, so a fixed default would misjudge small or untrained models.
    """

    min_top1: float = 0.95
    top1_margin: float = 0.1
    min_survival: float = 0.5
    min_answer_agreement: float = 0.9
    min_kept: float = 0.8
    max_kl: float | None = None


MIN_JUDGED_SHIFT = 1e-3  # mean KL(base + adapters || base) below which min_kept is not judged


class FidelityError(RuntimeError):
    """The fused model failed the fidelity gate; `.report` holds the full report."""

    def __init__(self, message: str, report: dict):
        super().__init__(message)
        self.report = report


# ---------------------------------------------------------------- weights


def _lora_classes():
    from mlx_lm.tuner.lora import LoRALinear, LoRASwitchLinear

    return LoRALinear, LoRASwitchLinear


def _switch_classes():
    from mlx_lm.models.switch_layers import QuantizedSwitchLinear, SwitchLinear

    return SwitchLinear, QuantizedSwitchLinear


def quant_params(module: nn.Module) -> dict | None:
    """{group_size, bits, mode} of a quantized layer; None for a float one."""
    if "scales" not in module:
        return None
    return {"group_size": module.group_size, "bits": module.bits, "mode": module.mode}


def dense_weight(module: nn.Module) -> mx.array:
    """The layer's weight as float32, dequantized if needed."""
    if "scales" in module:
        return mx.dequantize(module.weight, module.scales, module.get("biases"), group_size=module.group_size,
                             bits=module.bits, mode=module.mode).astype(mx.float32)
    return module.weight.astype(mx.float32)


def lora_delta(module: nn.Module) -> mx.array:
    """scale * B^T A^T in float32, shaped like the wrapped weight (mlx-lm's fuse math)."""
    LoRALinear, _ = _lora_classes()
    a, b = module.lora_a.astype(mx.float32), module.lora_b.astype(mx.float32)
    if isinstance(module, LoRALinear):
        return (module.scale * b.T) @ a.T  # a: (in, r), b: (r, out) -> (out, in)
    return module.scale * (b @ a)  # a: (E, r, in), b: (E, out, r) -> (E, out, in)


def _is_weight_layer(module: nn.Module) -> bool:
    SwitchLinear, QuantizedSwitchLinear = _switch_classes()
    return isinstance(module, (nn.Linear, nn.QuantizedLinear, nn.Embedding, nn.QuantizedEmbedding,
                               SwitchLinear, QuantizedSwitchLinear))


def storage_params(path: str, module: nn.Module, scope: str, bits: int | None, group_size: int) -> dict | None:
    """How the fused model stores layer `path`: quantization params, or None for bf16."""
    SwitchLinear, QuantizedSwitchLinear = _switch_classes()
    if bits is None or path.endswith(ROUTER_SUFFIX):
        return None  # routers stay bf16, as llama.cpp and our mixed checkpoint keep them
    if scope == "experts" and not isinstance(module, (SwitchLinear, QuantizedSwitchLinear)):
        return None
    in_dims = module.weight.shape[-1] * (32 // module.bits if "scales" in module else 1)
    if in_dims % group_size:
        return None  # mlx cannot quantize it at this group size; it stays bf16 (listed in the report)
    return {"group_size": group_size, "bits": bits, "mode": "affine"}


def _float_layer_like(module: nn.Module, weight: mx.array) -> nn.Module:
    """A float layer of the same kind as `module` holding `weight` (and its bias, if any)."""
    SwitchLinear, QuantizedSwitchLinear = _switch_classes()
    bias = "bias" in module
    if isinstance(module, (SwitchLinear, QuantizedSwitchLinear)):
        layer = SwitchLinear(weight.shape[2], weight.shape[1], weight.shape[0], bias=bias)
    elif isinstance(module, (nn.Embedding, nn.QuantizedEmbedding)):
        layer = nn.Embedding(*weight.shape)
    else:
        layer = nn.Linear(weight.shape[1], weight.shape[0], bias=bias)
    layer.weight = weight
    if bias:
        layer.bias = module.bias
    return layer


def store(module: nn.Module, weight: mx.array, params: dict | None) -> nn.Module:
    """The stored layer for float32 `weight`: quantized with `params`, else bf16; float leaves in
    bf16 exactly as they will be saved, so what we measure is what gets written."""
    layer = _float_layer_like(module, weight)
    if params is not None:
        layer = layer.to_quantized(**params)
    layer.update({k: v.astype(mx.bfloat16) for k, v in layer.parameters().items()
                  if isinstance(v, mx.array) and v.dtype in (mx.float32, mx.float16, mx.bfloat16)})
    return layer


def delta_survival(base: mx.array, delta: mx.array, stored_base: mx.array, stored_fused: mx.array) -> dict:
    """How much of the LoRA delta dW the stored weights keep.

    With Q(.) the storage (quantization at the fused model's bits, or bf16 rounding) and
    dQ = Q(W + dW) - Q(W) the change the stored model actually carries:
      survival = <dQ, dW> / ||dW||^2      share of the delta's direction that survives (1 = all;
                                          ~0 when rounding snaps W + dW back onto Q(W)'s grid)
      noise    = ||dQ - survival * dW|| / ||dW||   what quantization adds off that direction
      delta_rel = ||dW|| / ||W||          how big the fine-tune is next to the weight
    Q(W) is the base layer as it would be stored at the same precision (its own tensors when the
    base is already quantized that way), so base quantization error cancels out.
    """
    dq = stored_fused - stored_base
    energy = (delta * delta).sum()
    if energy.item() == 0:
        return {"survival": None, "noise": None, "delta_rel": 0.0, "delta_norm": 0.0}
    survival = (dq * delta).sum() / energy
    noise = mx.sqrt(((dq - survival * delta) ** 2).sum() / energy)
    rel = mx.sqrt(energy / mx.maximum((base * base).sum(), 1e-30))
    mx.eval(survival, noise, rel)
    return {"survival": round(survival.item(), 4), "noise": round(noise.item(), 4), "delta_rel": round(rel.item(), 6),
            "delta_norm": round(mx.sqrt(energy).item(), 6)}


def build_fused(adapter_model: nn.Module, base_model: nn.Module, scope: str, bits: int | None,
                group_size: int, progress: bool = False) -> tuple[dict, list[dict]]:
    """Replace layers of `base_model` (a bf16 load of the same base) in place by their fused,
    stored form; return the per-path quantization entries and the per-layer survival rows."""
    LoRALinear, LoRASwitchLinear = _lora_classes()
    lora_modules = [(p, m) for p, m in adapter_model.named_modules() if isinstance(m, (LoRALinear, LoRASwitchLinear))]
    lora_paths = {p for p, _ in lora_modules}
    layers: list[dict] = []
    bar = console.progress("fuse", len(lora_modules), "layer", show=progress)
    for path, module in lora_modules:
        base = module.linear
        weight = dense_weight(base)
        delta = lora_delta(module)
        params = storage_params(path, base, scope, bits, group_size)
        fused = store(base, weight + delta, params)
        if params is not None and params == quant_params(base):
            stored_base = weight  # already stored this way: Q(W) is the base itself
        else:
            stored_base = dense_weight(store(base, weight, params))
        row = {"path": path, "storage": _describe(params),
               **delta_survival(weight, delta, stored_base, dense_weight(fused))}
        layers.append(row)
        base_model.update_modules(tree_unflatten([(path, fused)]))
        mx.eval(fused.parameters())
        bar.update(1)
    bar.close()

    replacements = []
    for path, module in base_model.named_modules():
        if path in lora_paths or not _is_weight_layer(module):
            continue
        params = storage_params(path, module, scope, bits, group_size)
        if params != quant_params(module):  # otherwise keep the tensors as they are: no re-rounding
            replacements.append((path, store(module, dense_weight(module), params)))
    for path, layer in replacements:
        base_model.update_modules(tree_unflatten([(path, layer)]))
        mx.eval(layer.parameters())

    entries: dict = {}
    for path, module in base_model.named_modules():
        if path.endswith(ROUTER_SUFFIX) and _is_weight_layer(module):
            entries[path] = False  # explicit, so no loader's default predicate quantizes routers
        elif _is_weight_layer(module) and quant_params(module) is not None:
            entries[path] = quant_params(module)
    return entries, layers


def _describe(params: dict | None) -> str:
    return "bf16" if params is None else f"{params['bits']}-bit g{params['group_size']}"


# ---------------------------------------------------------------- prompt sets and fidelity


@dataclass
class Scored:
    """A token sequence and the positions whose next-token predictions are compared."""

    ids: list[int]
    positions: list[int]
    source: str


def prompts_from_rows(path: str | Path, tokenizer, limit: int = 32) -> list[Scored]:
    """Held-out chat rows: a repair-set directory (test.jsonl, else valid.jsonl) or a JSONL file.
    Scored positions are those predicting assistant tokens (the trained ones)."""
    from lfm_mlx.data import encode_row, validate_rows

    path = Path(path)
    if path.is_dir():
        candidates = [path / "test.jsonl", path / "valid.jsonl"]
        found = [p for p in candidates if p.is_file() and p.stat().st_size > 0]
        if not found:
            raise FileNotFoundError(f"--rows: {path} has no test.jsonl or valid.jsonl with rows; pass a JSONL file")
        path = found[0]
    rows = validate_rows(path).rows[:limit]
    out = []
    for row in rows:
        example = encode_row(row, tokenizer)
        positions = [j - 1 for j in range(1, example.n_tokens) if example.mask[j]]
        out.append(Scored(example.ids, positions, row.where))
    return out


def prompts_from_suite(suite: str | Path, tokenizer, model: nn.Module, limit: int = 32,
                       new_tokens: int = 32) -> list[Scored]:
    """Eval-suite prompts rendered with the chat template, each extended by `model`'s greedy
    continuation; scored positions are those predicting the continuation."""
    from mlx_lm.generate import generate_step

    from lfm_mlx.suites import load_suite

    loaded = load_suite(suite)
    eos = set(getattr(tokenizer, "eos_token_ids", None) or [tokenizer.eos_token_id])
    out = []
    for case in loaded.cases[:limit]:
        text = tokenizer.apply_chat_template(case.messages, tools=case.tools or None, add_generation_prompt=True,
                                             tokenize=False)
        ids = tokenizer.encode(text, add_special_tokens=False)
        generated = []
        for token, _ in generate_step(mx.array(ids), model, max_tokens=new_tokens):
            generated.append(int(token))
            if generated[-1] in eos:
                break
        positions = list(range(len(ids) - 1, len(ids) - 1 + len(generated)))
        out.append(Scored(ids + generated, positions, f"{loaded.name}/{case.id}"))
    return out


def log_probs(model: nn.Module, sequences: list[Scored], batch_size: int = 8) -> list[mx.array]:
    """Float32 log-probabilities at the scored positions of each sequence. Sequences run in
    right-padded batches: the model is causal, so padding never reaches a scored position."""
    out = []
    for start in range(0, len(sequences), batch_size):
        chunk = sequences[start:start + batch_size]
        width = max(len(seq.ids) for seq in chunk)
        ids = mx.array([seq.ids + [0] * (width - len(seq.ids)) for seq in chunk])
        logits = model(ids)
        for row, seq in enumerate(chunk):
            picked = logits[row, mx.array(seq.positions)].astype(mx.float32)
            lp = picked - mx.logsumexp(picked, axis=-1, keepdims=True)
            mx.eval(lp)
            out.append(lp)
    return out


def compare(reference: list[mx.array], candidate: nn.Module, sequences: list[Scored], margin: float = 0.1) -> dict:
    """Agreement of `candidate` with the reference log-probs, per scored position, averaged:

    top1_agreement over all positions; decisive_top1_agreement over the positions where the
    reference's top token beats its runner-up by >= `margin` in probability (near-ties flip under
    any rounding, bf16 included, and decide nothing); mean and max KL(reference || candidate);
    answer_agreement: the share of sequences whose every decisive position agrees (the candidate
    reproduces the whole answer, e.g. a tool call, wherever the reference was sure of it).
    """
    agree = decisive = decisive_agree = count = whole = 0
    kl_sum, kl_max = 0.0, 0.0
    for p, q in zip(reference, log_probs(candidate, sequences)):
        kl = (mx.exp(p) * (p - q)).sum(axis=-1)
        same = p.argmax(axis=-1) == q.argmax(axis=-1)
        top2 = mx.sort(mx.exp(p), axis=-1)[:, -2:]
        sure = (top2[:, 1] - top2[:, 0]) >= margin
        mx.eval(kl, same, sure)
        agree += same.sum().item()
        decisive += sure.sum().item()
        decisive_agree += (same & sure).sum().item()
        kl_sum += kl.sum().item()
        kl_max = max(kl_max, kl.max().item())
        count += p.shape[0]
        whole += (same | ~sure).all().item()
    return {"positions": count, "top1_agreement": round(agree / count, 4),
            "answer_agreement": round(whole / len(sequences), 4),
            "decisive_positions": decisive,
            "decisive_top1_agreement": round(decisive_agree / decisive, 4) if decisive else None,
            "mean_kl": round(kl_sum / count, 6), "max_kl": round(kl_max, 6)}


@contextlib.contextmanager
def lora_disabled(model: nn.Module) -> Iterator[None]:
    """Temporarily zero every LoRA scale: the adapter model then computes the base model."""
    LoRALinear, LoRASwitchLinear = _lora_classes()
    modules = [m for _, m in model.named_modules() if isinstance(m, (LoRALinear, LoRASwitchLinear))]
    scales = [m.scale for m in modules]
    for m in modules:
        m.scale = 0.0
    try:
        yield
    finally:
        for m, s in zip(modules, scales):
            m.scale = s


def fidelity_gate(report: dict, thresholds: Thresholds) -> list[str]:
    """Reasons the fused model fails the gate (empty when it passes)."""
    reasons = []
    fused = report["adapter_vs_fused"]
    top1, where = fused["decisive_top1_agreement"], "decisive positions"
    if top1 is None:  # the adapter model is never decisive here: judge every position
        top1, where = fused["top1_agreement"], "positions"
    if top1 < thresholds.min_top1:
        reasons.append(f"top-1 agreement {top1:.3f} < {thresholds.min_top1}: the fused model picks a different next "
                       f"token than base + adapters at {1 - top1:.1%} of the scored {where}")
    answers = fused.get("answer_agreement")
    if answers is not None and answers < thresholds.min_answer_agreement:
        reasons.append(f"answer agreement {answers:.2f} < {thresholds.min_answer_agreement}: the fused model changes "
                       f"{1 - answers:.0%} of the scored answers somewhere the adapter model is sure of its token")
    low = [r for r in report["layers"] if r["survival"] is not None and r["survival"] < thresholds.min_survival]
    if low:
        worst = min(low, key=lambda r: r["survival"])
        reasons.append(f"delta survival {worst['survival']:.2f} < {thresholds.min_survival} at {worst['path']} "
                       f"({len(low)} of {len(report['layers'])} LoRA layers below): {worst['storage']} storage rounds "
                       f"the fine-tune's delta away there")
    kept, shift = report.get("fine_tune_kept"), report["adapter_vs_base"]["mean_kl"]
    if kept is not None and shift >= MIN_JUDGED_SHIFT and kept < thresholds.min_kept:
        reasons.append(f"fine-tune kept {kept:.2f} < {thresholds.min_kept}: the fused model's KL to base + adapters "
                       f"is {1 - kept:.0%} of the base's, so quantization undid that share of the fine-tune")
    kl = report["adapter_vs_fused"]["mean_kl"]
    if thresholds.max_kl is not None and kl > thresholds.max_kl:
        reasons.append(f"mean KL {kl:.4g} > {thresholds.max_kl} nats per token")
    return reasons


# ---------------------------------------------------------------- the whole step


def parse_bits(value: str | int | None) -> int | None:
    """'8' / 8 -> 8; 'bf16' / None -> None (no quantization)."""
    if value in (None, "bf16", "none"):
        return None
    if str(value) in ("4", "6", "8"):
        return int(value)
    raise ValueError(f"bits: {value!r} is not supported; use 8 (default), 6, 4 or bf16")


def fuse(model_dir: str | Path, adapter_path: str | Path, save_path: str | Path, bits: int | str | None = 8,
         scope: str = "experts", group_size: int = 64, rows: str | Path | None = None,
         suite: str | Path | None = None, max_prompts: int = 32, new_tokens: int = 32,
         thresholds: Thresholds | None = None, force: bool = False, progress: bool = True,
         log: Callable[[str], None] | None = None) -> dict:
    """Fuse `adapter_path` into `model_dir`, write `save_path` if the fidelity gate passes (or
    `force`), and return the fidelity report (also saved as save_path/fidelity.json). `log(line)`
    hears each phase; `progress` shows the merge per layer.

    Raises FidelityError (nothing written at `save_path`; the report goes next to it as
    `<save_path>.refused.json`) when the gate fails without `force`.
    """
    from mlx_lm.tuner.utils import load_adapters

    from lfm_mlx.models import load, resolve_model_path, save_model_dir

    bits = parse_bits(bits)
    log = log or (lambda line: None)
    thresholds = thresholds or Thresholds()
    if scope not in SCOPES:
        raise ValueError(f"scope: {scope!r} must be one of {', '.join(SCOPES)}")
    if (rows is None) == (suite is None):
        raise ValueError("fidelity needs one prompt set: pass rows (held-out repair rows, e.g. repair_datasets/NAME) "
                         "or suite (an eval suite name or file)")
    if not (Path(adapter_path) / "adapter_config.json").is_file():
        raise FileNotFoundError(f"adapter_path: {adapter_path} has no adapter_config.json; pass a LoRA output directory")
    save_path = Path(save_path)
    refuse_overlap(save_path, {"base model": model_dir, "adapter directory": adapter_path})
    _check_base(model_dir, adapter_path)
    # The output is replaced as a whole, so its lock sits beside it; recover() undoes a killed replace.
    with locked(save_path, sibling=True):
        recover(save_path)
        started = time.perf_counter()

        adapter_model, tokenizer, config = load(model_dir, return_config=True)
        if scope == "experts" and bits is not None and config["model_type"] != "lfm2_moe":
            raise ValueError(f"scope: 'experts' on a dense {config['model_type']} model quantizes nothing; "
                             f"pass --scope all, or --bits bf16 for an unquantized fuse")
        load_adapters(adapter_model, str(adapter_path))
        adapter_model.eval()
        if rows is not None:
            sequences = prompts_from_rows(rows, tokenizer, max_prompts)
        else:
            sequences = prompts_from_suite(suite, tokenizer, adapter_model, max_prompts, new_tokens)
        sequences = [seq for seq in sequences if seq.positions]
        if not sequences:
            raise ValueError("the prompt set has no scored positions (rows without assistant turns?); pass other rows or a suite")
        log(f"scoring base + adapters on {len(sequences)} prompt(s)")
        reference = log_probs(adapter_model, sequences)

        base_model, _, _ = load(model_dir, dtype=mx.bfloat16, lazy=True, with_tokenizer=False, return_config=True)
        entries, layers = build_fused(adapter_model, base_model, scope, bits, group_size, progress)
        check_free_space(save_path, sum(v.nbytes for _, v in tree_flatten(base_model.parameters())), "the fused model")
        fused_config = {k: v for k, v in config.items() if k not in ("quantization", "quantization_config")}
        if any(isinstance(v, dict) for v in entries.values()):  # per-path entries: mlx_lm.load rebuilds this exact mix
            fused_config["quantization"] = {"group_size": group_size, "bits": bits, "mode": "affine", **entries}

        report = {
            "format": "lfm_mlx.fuse_report", "version": 1,
            "model": str(model_dir), "adapter_path": str(adapter_path), "save_path": str(save_path),
            "bits": bits or "bf16", "scope": scope, "group_size": group_size,
            "prompt_set": {"rows": str(rows) if rows else None, "suite": str(suite) if suite else None,
                           "sequences": len(sequences)},
            "thresholds": asdict(thresholds),
        }
        with atomic_dir(save_path) as tmp:
            log("writing the fused model, loading it back, scoring it and the base")
            save_model_dir(base_model, fused_config, resolve_model_path(model_dir), tmp)
            del base_model
            _force_pythonic(tmp)
            fused_model, _ = load(tmp)
            report["adapter_vs_fused"] = compare(reference, fused_model, sequences, thresholds.top1_margin)
            del fused_model
            with lora_disabled(adapter_model):  # how far the fine-tune moved the model, for scale
                report["adapter_vs_base"] = compare(reference, adapter_model, sequences, thresholds.top1_margin)
            base_kl = report["adapter_vs_base"]["mean_kl"]
            # 1 = the fused model is as close to base + adapters as it gets; 0 = it behaves like the base.
            report["fine_tune_kept"] = round(1 - report["adapter_vs_fused"]["mean_kl"] / base_kl, 4) if base_kl > 0 else None
            report["layers"] = layers
            report["survival"] = _survival_summary(layers)
            report["size_bytes"] = sum(p.stat().st_size for p in tmp.glob("*.safetensors"))
            reasons = fidelity_gate(report, thresholds)
            report.update(passed=not reasons, reasons=reasons, forced=bool(reasons) and force,
                          elapsed_s=round(time.perf_counter() - started, 2))
            if reasons and not force:
                refused = save_path.parent / f"{save_path.name}.refused.json"
                atomic_write_json(refused, report)
                advice = "fuse at more bits (--bits 8, or bf16)" if bits is not None and bits < 8 else "fuse with --bits bf16"
                if scope == "all":
                    advice += " or with --scope experts"
                raise FidelityError(f"refusing to write {save_path}: " + "; ".join(reasons)
                                    + f". {advice[0].upper() + advice[1:]}; --force writes it anyway. Report: {refused}", report)
            atomic_write_json(tmp / "fidelity.json", report)
        (save_path.parent / f"{save_path.name}.refused.json").unlink(missing_ok=True)  # a stale refusal no longer holds
        return report


def _check_base(model_dir: str | Path, adapter_path: str | Path) -> None:
    """Refuse a base other than the one the adapters were trained on (adapters record its fingerprint;
    older ones without it are taken as they are)."""
    from lfm_mlx.models import base_fingerprint

    config_path = Path(adapter_path) / "adapter_config.json"
    try:
        recorded = json.loads(config_path.read_text()).get("lfm_mlx", {}).get("base_fingerprint")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as err:
        raise InvalidInput(f"{config_path}: not a JSON object ({err}); pass a LoRA output directory") from None
    if recorded is not None and recorded != base_fingerprint(model_dir):
        raise InvalidInput(
            f"{adapter_path}: these adapters were trained on another base than {model_dir} (its config.json or weights "
            f"differ from the fingerprint in {config_path}); pass the model directory they were trained on")


def _force_pythonic(model_dir: Path) -> None:
    """mlx_lm.server only auto-detects the parser from <|tool_list_start|>, which LFM2.5 lacks."""
    path = model_dir / "tokenizer_config.json"
    config = json.loads(path.read_text())
    if config.get("tool_parser_type") != "pythonic":
        config["tool_parser_type"] = "pythonic"
        path.write_text(json.dumps(config, indent=2))


def _survival_summary(layers: list[dict]) -> dict:
    """Minimum and delta-energy-weighted mean survival over the LoRA layers with a non-zero delta."""
    measured = [r for r in layers if r["survival"] is not None]
    if not measured:
        return {"min": None, "weighted_mean": None, "layers": 0}
    worst = min(measured, key=lambda r: r["survival"])
    energy = [r["delta_norm"] ** 2 for r in measured]
    mean = sum(e * r["survival"] for e, r in zip(energy, measured)) / sum(energy)
    return {"min": worst["survival"], "min_path": worst["path"], "weighted_mean": round(mean, 4), "layers": len(measured)}


def format_report(report: dict) -> str:
    """A few human-readable lines."""
    fused, base = report["adapter_vs_fused"], report["adapter_vs_base"]
    lines = [
        f"fused {report['bits']} ({report['scope']}) vs base + adapters on {fused['positions']} positions: "
        f"top-1 agreement {fused['top1_agreement']:.4f} ({fused['decisive_top1_agreement']} on the "
        f"{fused['decisive_positions']} decisive ones), mean KL {fused['mean_kl']:.5f}",
        f"base vs base + adapters (how far the fine-tune moved it): top-1 {base['top1_agreement']:.4f}, "
        f"mean KL {base['mean_kl']:.5f}; share of the fine-tune kept (1 - KL ratio): {report['fine_tune_kept']}",
    ]
    survival = report["survival"]
    if survival["layers"]:
        lines.append(f"delta survival: min {survival['min']:.3f} ({survival['min_path']}), delta-weighted mean "
                     f"{survival['weighted_mean']:.3f} over {survival['layers']} LoRA layers")
    lines.append("PASSED" if report["passed"] else ("FAILED (written anyway: --force)" if report["forced"] else "FAILED"))
    lines.extend(f"  - {reason}" for reason in report["reasons"])
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lfm-mlx fuse", description=" ".join(__doc__.split("\n\n")[0].split()))
    parser.add_argument("--model", required=True, help="base model directory the adapters were trained on")
    parser.add_argument("--adapter-path", required=True, help="LoRA directory (adapter_config.json + adapters.safetensors)")
    parser.add_argument("--save-path", required=True, help="fused model directory to write (atomically)")
    parser.add_argument("--bits", default="8", choices=["8", "6", "4", "bf16"], help="storage of quantized layers (default 8)")
    parser.add_argument("--scope", default="experts", choices=SCOPES,
                        help="experts: quantize expert projections only (default); all: every layer but routers and norms")
    parser.add_argument("--group-size", type=int, default=64, choices=[32, 64, 128])
    prompts = parser.add_mutually_exclusive_group(required=True)
    prompts.add_argument("--rows", help="held-out chat rows: a repair-set directory (test.jsonl) or a JSONL file")
    prompts.add_argument("--suite", help="an eval suite (shipped name or JSON file) whose prompts to score")
    parser.add_argument("--max-prompts", type=int, default=32, help="use at most this many rows / cases")
    parser.add_argument("--new-tokens", type=int, default=32, help="greedy continuation scored per suite prompt")
    defaults = Thresholds()
    parser.add_argument("--min-top1", type=float, default=defaults.min_top1,
                        help="minimum top-1 agreement on decisive positions (default 0.95)")
    parser.add_argument("--min-survival", type=float, default=defaults.min_survival,
                        help="minimum per-layer delta survival (default 0.5)")
    parser.add_argument("--min-answers", type=float, default=defaults.min_answer_agreement,
                        help="minimum share of answers reproduced at every decisive position (default 0.9)")
    parser.add_argument("--min-kept", type=float, default=defaults.min_kept,
                        help="minimum share of the fine-tune kept, 1 - KL(fused)/KL(base) (default 0.8)")
    parser.add_argument("--max-kl", type=float, default=None, help="maximum mean KL in nats per token (default: not gated)")
    parser.add_argument("--force", action="store_true", help="write the fused model even when the fidelity gate fails")
    parser.add_argument("--report", help="also write the fidelity report JSON here")
    console.add_quiet(parser)
    args = parser.parse_args(argv)
    thresholds = Thresholds(min_top1=args.min_top1, min_survival=args.min_survival,
                            min_answer_agreement=args.min_answers, min_kept=args.min_kept,
                            max_kl=args.max_kl)
    stored = "nothing quantized (bf16)" if args.bits == "bf16" else (
        f"{'expert projections' if args.scope == 'experts' else 'every layer but routers and norms'} at "
        f"{args.bits} bits (group {args.group_size})")
    console.say("fuse", f"merging {args.adapter_path} into {args.model} on {console.where()}; {stored}; fidelity on up "
                        f"to {args.max_prompts} prompt(s) of {args.rows or args.suite}; writing {args.save_path}"
                        + (" even if the gate fails (--force)" if args.force else " if the gate passes"), args.quiet)
    try:
        report = fuse(args.model, args.adapter_path, args.save_path, args.bits, args.scope, args.group_size,
                      args.rows, args.suite, args.max_prompts, args.new_tokens, thresholds, args.force,
                      progress=not args.quiet, log=lambda line: console.say("fuse", line, args.quiet))
    except FidelityError as err:
        print(format_report(err.report), file=sys.stderr)
        print(f"lfm-mlx fuse: {err}", file=sys.stderr)
        if args.report:
            atomic_write_json(args.report, err.report)
        return 1
    except (ValueError, FileNotFoundError) as err:
        if debugging():
            raise
        print(f"lfm-mlx fuse: {err}", file=sys.stderr)
        return 2
    if args.report:
        atomic_write_json(args.report, report)
    if not args.quiet:
        print(format_report(report))
    fused = report["adapter_vs_fused"]
    print(f"fused model: {args.save_path} ({report['size_bytes'] / 1e9:.3f} GB; fidelity "
          f"{'passed' if report['passed'] else 'FAILED, written anyway (--force)'}: top-1 "
          f"{fused['top1_agreement']:.4f}, fine-tune kept {report['fine_tune_kept']}; report "
          f"{Path(args.save_path) / 'fidelity.json'})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""The fidelity gate: prompt sets (rows or a suite), log-probs of base + adapters vs the fused model, the thresholds."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import mlx.core as mx
import mlx.nn as nn

from lfm_mlx.fuse.weights import _lora_classes


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
    continuation (its end token included); scored positions are those predicting the continuation."""
    from lfm_mlx.model.generate import greedy_continuations, prompt_ids
    from lfm_mlx.suites import load_suite

    loaded = load_suite(suite)
    cases = loaded.cases[:limit]
    prompts = [prompt_ids(tokenizer, case.messages, case.tools) for case in cases]
    out = []
    for case, ids, answer in zip(cases, prompts, greedy_continuations(model, tokenizer, prompts, new_tokens)):
        positions = list(range(len(ids) - 1, len(ids) - 1 + len(answer.tokens)))
        out.append(Scored(ids + answer.tokens, positions, f"{loaded.name}/{case.id}"))
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


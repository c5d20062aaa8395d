"""The whole step: `fuse` (load, merge, write, load back, score, gate, rename or refuse) and its report."""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path
from typing import Callable

import mlx.core as mx
from mlx.utils import tree_flatten

from lfm_mlx.errors import InvalidInput
from lfm_mlx.fsutil import atomic_dir, atomic_write_json, check_free_space, locked, recover, refuse_overlap
from lfm_mlx.fuse.fidelity import (
    FidelityError, Thresholds, compare, fidelity_gate, log_probs, lora_disabled, prompts_from_rows, prompts_from_suite,
)
from lfm_mlx.fuse.weights import SCOPES, build_fused


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
    from lfm_mlx.model.io import resolve_model_path, save_model_dir

    bits = parse_bits(bits)
    log = log or (lambda line: None)
    thresholds = thresholds or Thresholds()
    _check_arguments(scope, rows, suite, adapter_path)
    save_path = Path(save_path)
    refuse_overlap(save_path, {"base model": model_dir, "adapter directory": adapter_path})
    _check_base(model_dir, adapter_path)
    # The output is replaced as a whole, so its lock sits beside it; recover() undoes a killed replace.
    with locked(save_path, sibling=True):
        recover(save_path)
        started = time.perf_counter()
        adapter_model, tokenizer, config = _load_with_adapters(model_dir, adapter_path, scope, bits)
        sequences = _scored_prompts(adapter_model, tokenizer, rows, suite, max_prompts, new_tokens)
        log(f"scoring base + adapters on {len(sequences)} prompt(s)")
        reference = log_probs(adapter_model, sequences)
        base_model, fused_config, layers = _merged_base(model_dir, adapter_model, config, scope, bits, group_size,
                                                        progress, save_path)
        report = _report_head(model_dir, adapter_path, save_path, bits, scope, group_size, rows, suite,
                              len(sequences), thresholds)
        with atomic_dir(save_path) as tmp:
            log("writing the fused model, loading it back, scoring it and the base")
            save_model_dir(base_model, fused_config, resolve_model_path(model_dir), tmp)
            del base_model  # free the merged weights before the fused model is loaded back
            _force_pythonic(tmp)
            _score_fused(report, reference, adapter_model, tmp, sequences, thresholds)
            report["layers"] = layers
            report["survival"] = _survival_summary(layers)
            report["size_bytes"] = sum(p.stat().st_size for p in tmp.glob("*.safetensors"))
            reasons = fidelity_gate(report, thresholds)
            report.update(passed=not reasons, reasons=reasons, forced=bool(reasons) and force,
                          elapsed_s=round(time.perf_counter() - started, 2))
            if reasons and not force:
                _refuse(report, save_path, bits, scope)
            atomic_write_json(tmp / "fidelity.json", report)
        (save_path.parent / f"{save_path.name}.refused.json").unlink(missing_ok=True)  # a stale refusal no longer holds
        return report


def _check_arguments(scope: str, rows: str | Path | None, suite: str | Path | None, adapter_path: str | Path) -> None:
    """Refuse a scope, prompt set or adapter directory that cannot work, before anything is loaded."""
    if scope not in SCOPES:
        raise ValueError(f"scope: {scope!r} must be one of {', '.join(SCOPES)}")
    if (rows is None) == (suite is None):
        raise ValueError("fidelity needs one prompt set: pass rows (held-out repair rows, e.g. repair_datasets/NAME) "
                         "or suite (an eval suite name or file)")
    if not (Path(adapter_path) / "adapter_config.json").is_file():
        raise FileNotFoundError(f"adapter_path: {adapter_path} has no adapter_config.json; pass a LoRA output directory")


def _load_with_adapters(model_dir: str | Path, adapter_path: str | Path, scope: str, bits: int | None):
    """The base with the adapters applied (eval mode), its tokenizer and config.json."""
    from mlx_lm.tuner.utils import load_adapters

    from lfm_mlx.model.io import load

    adapter_model, tokenizer, config = load(model_dir, return_config=True)
    if scope == "experts" and bits is not None and config["model_type"] != "lfm2_moe":
        raise ValueError(f"scope: 'experts' on a dense {config['model_type']} model quantizes nothing; "
                         f"pass --scope all, or --bits bf16 for an unquantized fuse")
    load_adapters(adapter_model, str(adapter_path))
    adapter_model.eval()
    return adapter_model, tokenizer, config


def _scored_prompts(adapter_model, tokenizer, rows: str | Path | None, suite: str | Path | None, max_prompts: int,
                    new_tokens: int) -> list:
    """The fidelity prompt set (from held-out rows, or the suite's prompts answered by base + adapters),
    keeping only sequences with positions to score."""
    if rows is not None:
        sequences = prompts_from_rows(rows, tokenizer, max_prompts)
    else:
        sequences = prompts_from_suite(suite, tokenizer, adapter_model, max_prompts, new_tokens)
    sequences = [seq for seq in sequences if seq.positions]
    if not sequences:
        raise ValueError("the prompt set has no scored positions (rows without assistant turns?); pass other rows or a suite")
    return sequences


def _merged_base(model_dir: str | Path, adapter_model, config: dict, scope: str, bits: int | None, group_size: int,
                 progress: bool, save_path: Path) -> tuple[object, dict, list[dict]]:
    """The base (bf16, lazy) with the adapters merged in and `scope` quantized, its config.json, and the
    per-layer merge records; refuses when save_path's disk cannot hold it."""
    from lfm_mlx.model.io import load

    base_model, _, _ = load(model_dir, dtype=mx.bfloat16, lazy=True, with_tokenizer=False, return_config=True)
    entries, layers = build_fused(adapter_model, base_model, scope, bits, group_size, progress)
    check_free_space(save_path, sum(v.nbytes for _, v in tree_flatten(base_model.parameters())), "the fused model")
    fused_config = {k: v for k, v in config.items() if k not in ("quantization", "quantization_config")}
    if any(isinstance(v, dict) for v in entries.values()):  # per-path entries: mlx_lm.load rebuilds this exact mix
        fused_config["quantization"] = {"group_size": group_size, "bits": bits, "mode": "affine", **entries}
    return base_model, fused_config, layers


def _report_head(model_dir: str | Path, adapter_path: str | Path, save_path: Path, bits: int | None, scope: str,
                 group_size: int, rows: str | Path | None, suite: str | Path | None, sequences: int,
                 thresholds: Thresholds) -> dict:
    """The report's first keys: what was fused, how, and on which prompts."""
    return {
        "format": "lfm_mlx.fuse_report", "version": 1,
        "model": str(model_dir), "adapter_path": str(adapter_path), "save_path": str(save_path),
        "bits": bits or "bf16", "scope": scope, "group_size": group_size,
        "prompt_set": {"rows": str(rows) if rows else None, "suite": str(suite) if suite else None,
                       "sequences": sequences},
        "thresholds": asdict(thresholds),
    }


def _score_fused(report: dict, reference, adapter_model, fused_dir: Path, sequences: list,
                 thresholds: Thresholds) -> None:
    """Into the report: the written model and the bare base, each against base + adapters, and the share
    of the fine-tune the fused model kept."""
    from lfm_mlx.model.io import load
    from lfm_mlx.model.quant import float_experts_on_cpu

    fused_model, _ = load(fused_dir)
    float_experts_on_cpu(fused_model)  # the same weights, scored without the CPU's slow quantized kernel
    report["adapter_vs_fused"] = compare(reference, fused_model, sequences, thresholds.top1_margin)
    del fused_model  # out of memory before the base is scored
    with lora_disabled(adapter_model):  # how far the fine-tune moved the model, for scale
        report["adapter_vs_base"] = compare(reference, adapter_model, sequences, thresholds.top1_margin)
    base_kl = report["adapter_vs_base"]["mean_kl"]
    # 1 = the fused model is as close to base + adapters as it gets; 0 = it behaves like the base.
    report["fine_tune_kept"] = round(1 - report["adapter_vs_fused"]["mean_kl"] / base_kl, 4) if base_kl > 0 else None


def _refuse(report: dict, save_path: Path, bits: int | None, scope: str) -> None:
    """Write the failed report beside save_path as NAME.refused.json and raise FidelityError with advice."""
    refused = save_path.parent / f"{save_path.name}.refused.json"
    atomic_write_json(refused, report)
    advice = "fuse at more bits (--bits 8, or bf16)" if bits is not None and bits < 8 else "fuse with --bits bf16"
    if scope == "all":
        advice += " or with --scope experts"
    raise FidelityError(f"refusing to write {save_path}: " + "; ".join(report["reasons"])
                        + f". {advice[0].upper() + advice[1:]}; --force writes it anyway. Report: {refused}", report)


def _check_base(model_dir: str | Path, adapter_path: str | Path) -> None:
    """Refuse a base other than the one the adapters were trained on (adapters record its fingerprint;
    older ones without it are taken as they are)."""
    from lfm_mlx.model.io import base_fingerprint

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


"""Mixed checkpoints: MoE experts int8 (affine), routers bf16, `expert_bias` float32, the rest bf16.

The quantized layers are listed one by one in config["quantization"], so plain `mlx_lm.load`
rebuilds exactly this mix (experts `QuantizedSwitchLinear`, routers plain `Linear`); mlx-lm's own
`lfm2_moe` predicate would quantize the routers too, which is why we do not use it.
"""

from __future__ import annotations

import argparse
import sys
import json
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from lfm_mlx.errors import InvalidInput, debugging
from lfm_mlx.fsutil import atomic_dir, check_free_space, locked, recover, refuse_overlap
from lfm_mlx.model.io import load, save_model_dir
from lfm_mlx.model.quant import quantize_experts

SIZE_CATEGORIES = ("experts", "routers", "attention + conv", "dense mlp", "embeddings", "norms")


def categorize(name: str) -> str:
    """Which size-report category a weight name belongs to."""
    if "switch_mlp" in name or ".experts." in name:
        return "experts"
    if name.endswith(("feed_forward.gate.weight", "expert_bias")) or ".feed_forward.gate." in name:
        return "routers"
    if ".self_attn." in name or ".conv." in name:
        return "attention + conv"
    if ".feed_forward." in name:
        return "dense mlp"
    if "embed_tokens" in name or name.startswith("lm_head"):
        return "embeddings"
    return "norms"


def size_report(model_dir: Path) -> dict:
    """Bytes and share per category, read from the safetensors headers of a model directory."""
    from lfm_mlx.model.io import weight_files

    totals = {c: 0 for c in SIZE_CATEGORIES}
    for path in weight_files(Path(model_dir)):
        with open(path, "rb") as handle:
            header_len = int.from_bytes(handle.read(8), "little")
            header = json.loads(handle.read(header_len))
        for name, meta in header.items():
            if name != "__metadata__":
                start, end = meta["data_offsets"]
                totals[categorize(name)] += end - start
    total = sum(totals.values())
    rows = {c: {"bytes": b, "share": b / total if total else 0.0} for c, b in totals.items()}
    return {"total_bytes": total, "categories": rows}


def format_size_report(report: dict) -> str:
    lines = [f"{'category':<18}{'bytes':>16}{'GB':>10}{'share':>9}"]
    for name, row in report["categories"].items():
        lines.append(f"{name:<18}{row['bytes']:>16,}{row['bytes'] / 1e9:>10.3f}{row['share']:>8.1%}")
    lines.append(f"{'total':<18}{report['total_bytes']:>16,}{report['total_bytes'] / 1e9:>10.3f}{1:>8.0%}")
    return "\n".join(lines)


def mix(src: str | Path, dst: str | Path, bits: int = 8, group_size: int = 64) -> dict:
    """Write the mixed checkpoint of `src` to `dst` atomically; return its size report."""
    refuse_overlap(dst, {"source model": src})
    model, _, config = load(src, dtype=mx.bfloat16, lazy=True, return_config=True)
    if config["model_type"] != "lfm2_moe":
        raise InvalidInput(f"{src}: model_type {config['model_type']!r} has no experts; mix needs an LFM2-MoE model")
    if "quantization" in config:
        raise InvalidInput(
            f"{src}: already quantized ({config['quantization'].get('bits')} bits); mix a bf16 / HF directory"
        )
    mixed_config = quantize_experts(model, config, bits, group_size)
    from lfm_mlx.model.io import resolve_model_path

    # The output is replaced as a whole, so its lock sits beside it; recover() undoes a killed replace.
    with locked(dst, sibling=True):
        recover(dst)
        check_free_space(dst, parameter_bytes(model), "the mixed checkpoint")
        with atomic_dir(dst) as tmp:
            save_model_dir(model, mixed_config, resolve_model_path(src), tmp)
    return size_report(Path(dst))


def parameter_bytes(model: nn.Module) -> int:
    return sum(v.nbytes for _, v in tree_flatten(model.parameters()))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lfm-mlx mix", description=" ".join(__doc__.split("\n\n")[0].split()))
    parser.add_argument("src", help="source model: HF or bf16 MLX directory, or hub repo id")
    parser.add_argument("dst", help="output directory (written atomically)")
    parser.add_argument("--bits", type=int, default=8, choices=[4, 6, 8], help="expert bits (default 8)")
    parser.add_argument("--group-size", type=int, default=64, choices=[32, 64, 128])
    parser.add_argument("--json", help="also write the size report as JSON to this path")
    args = parser.parse_args(argv)
    try:
        report = mix(args.src, args.dst, args.bits, args.group_size)
    except (ValueError, FileNotFoundError) as err:  # a user's mistake: one line, exit 2
        if debugging():
            raise
        print(f"lfm-mlx mix: {err}", file=sys.stderr)
        return 2
    print(format_size_report(report))
    if args.json:
        from lfm_mlx.fsutil import atomic_write_json

        atomic_write_json(args.json, report)
    return 0

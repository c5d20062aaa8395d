"""`lfm-mlx gguf`: export, then the quantized variants."""

from __future__ import annotations

import argparse
from pathlib import Path

from lfm_mlx import console
from lfm_mlx.errors import debugging
from lfm_mlx.gguf.plan import OUTTYPES, QUANT_TYPES
from lfm_mlx.gguf.write import export_gguf
from lfm_mlx.gguf.llama import quantize_gguf
from lfm_mlx.gguf.imatrix import compute_imatrix, read_samples


def _parse_override(text: str) -> tuple[str, str]:
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"{text!r}: expected REGEX=TYPE, e.g. token_embd=q8_0")
    pattern, type_name = text.rsplit("=", 1)
    return pattern, type_name


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lfm-mlx gguf", description=" ".join(__doc__.split("\n\n")[0].split()))
    parser.add_argument("model_dir", help="HF or mlx-lm (mixed, trained, fused) model directory")
    parser.add_argument("out", help="output .gguf path (written atomically)")
    parser.add_argument("--outtype", default="bf16", choices=list(OUTTYPES))
    parser.add_argument("--quantize", nargs="*", default=[], metavar="QTYPE", choices=list(QUANT_TYPES),
                        help=f"also write OUT-QTYPE.gguf with llama.cpp's quantizer ({', '.join(QUANT_TYPES)})")
    parser.add_argument("--tensor-type", action="append", default=[], type=_parse_override, metavar="REGEX=TYPE",
                        help="per-tensor type for the quantized variants, e.g. token_embd=q8_0 (repeatable)")
    parser.add_argument("--imatrix-from", metavar="JSONL",
                        help="compute an importance matrix from these transcripts (chat rows or text)")
    parser.add_argument("--json", help="write the report as JSON to this path")
    console.add_quiet(parser)
    args = parser.parse_args(argv)
    if args.quantize and args.outtype == "q8_0":
        parser.error("--quantize needs a float export (--outtype bf16, f16 or f32): "
                     "requantizing q8_0 stacks two roundings")
    if (args.imatrix_from or args.tensor_type) and not args.quantize:
        parser.error("--imatrix-from and --tensor-type apply to quantized variants: add --quantize QTYPE")
    if args.imatrix_from and not Path(args.imatrix_from).is_file():  # before the export, not after it
        parser.error(f"--imatrix-from {args.imatrix_from}: no such file (chat rows or text, one JSON object a line)")
    try:
        report = _run(args)
    except (FileNotFoundError, ValueError, ImportError, RuntimeError) as err:
        if debugging():
            raise
        parser.exit(2, f"lfm-mlx gguf: error: {err}\n")
    if args.json:
        from lfm_mlx.fsutil import atomic_write_json

        atomic_write_json(args.json, report)
    return 0


def _run(args: argparse.Namespace) -> dict:
    out = Path(args.out)
    variants = {qtype: out.with_name(f"{out.stem}-{qtype}.gguf") for qtype in args.quantize}
    console.say("gguf", f"exporting {args.model_dir} to {out} ({args.outtype} matrices; norms, conv, router and "
                        f"expert_bias float32)" + "".join(f", then {qtype} to {dst} with llama.cpp's quantizer"
                                                          for qtype, dst in variants.items())
                + (f" (importance matrix from {args.imatrix_from})" if args.imatrix_from else ""), args.quiet)
    bar = None

    def progress(i: int, n: int, name: str) -> None:
        nonlocal bar
        if bar is None:
            bar = console.progress("gguf", n, "tensor", show=not args.quiet)
        bar.set_postfix_str(name, refresh=False)
        bar.update(1)

    report = {"export": export_gguf(args.model_dir, out, args.outtype, on_tensor=progress)}
    if bar is not None:
        bar.close()
    written = [f"{out} ({report['export']['bytes'] / 1e9:.3f} GB)"]
    console.say("gguf", f"wrote {written[0]}: {report['export']['tensor_types']}", args.quiet)
    if args.imatrix_from:
        console.say("gguf", f"importance matrix from {args.imatrix_from} ...", args.quiet)
    imatrix = compute_imatrix(args.model_dir, read_samples(args.imatrix_from)) if args.imatrix_from else None
    for qtype, dst in variants.items():
        console.say("gguf", f"quantizing to {qtype} ...", args.quiet)
        result = report[qtype] = quantize_gguf(out, dst, qtype, dict(args.tensor_type), imatrix)
        written.append(f"{dst} ({result['bytes'] / 1e9:.3f} GB)")
        console.say("gguf", f"wrote {written[-1]}: {result['tensor_types']}", args.quiet)
    print(f"gguf: wrote {', '.join(written)}")
    return report

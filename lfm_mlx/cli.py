"""`lfm-mlx VERB ...` / `python -m lfm_mlx VERB ...`: one module per verb, each with main(argv)."""

from __future__ import annotations

import errno
import importlib
import os
import sys

from lfm_mlx.errors import UserError
from lfm_mlx.fsutil import is_disk_full

# verb -> module whose main(argv) runs it
VERBS = {
    "synth": ("lfm_mlx.model.synthetic", "write a synthetic LFM2 / LFM2-MoE model directory"),
    "mix": ("lfm_mlx.mixed", "make a mixed checkpoint: experts int8, everything else bf16"),
    "train": ("lfm_mlx.grouped", "grouped MoE training from a YAML config"),
    "sweep": ("lfm_mlx.sweep", "group-size memory and time sweep"),
    "convert": ("lfm_mlx.convert", "import tool traces (hermes, sharegpt, xlam, folded) as chat rows"),
    "eval": ("lfm_mlx.evaluate", "tool-call evaluation of a model or endpoint"),
    "repair-set": ("lfm_mlx.repair", "build a repair dataset from an eval report"),
    "lora": ("lfm_mlx.lora", "LoRA repair pass from a YAML config"),
    "fuse": ("lfm_mlx.fuse", "dequantize, merge adapters, quantize to 8 bits, check fidelity"),
    "gguf": ("lfm_mlx.gguf", "export a model directory to GGUF"),
    "ladder": ("lfm_mlx.ladder", "quant ladder in llama.cpp: size, memory, speed, pass rate per type; a recommendation"),
    "demo": ("lfm_mlx.demo", "the whole pipeline end to end on a synthetic model"),
}


def usage() -> str:
    lines = ["usage: lfm-mlx VERB [args...]  (lfm-mlx VERB --help for details)", "", "verbs:"]
    for verb, (_, help_text) in VERBS.items():
        lines.append(f"  {verb:<11} {help_text}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    verb, rest = argv[0], argv[1:]
    if verb not in VERBS:
        print(f"lfm-mlx: unknown verb {verb!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(VERBS[verb][0])
    try:
        result = module.main(rest)
    except (UserError, OSError, RuntimeError) as err:
        # A user's mistake (or a full disk) is one line and exit 2; anything else keeps its traceback.
        if os.environ.get("LFM_MLX_DEBUG") == "1" or not (isinstance(err, UserError) or is_disk_full(err)
                                                           or is_path_refused(err)):
            raise
        print(f"lfm-mlx {verb}: {user_message(err)}", file=sys.stderr)
        return 2
    return int(result or 0)


def is_path_refused(err: BaseException) -> bool:
    """The OS refused a path the user gave (permissions, a read-only disk): the user's to fix."""
    return isinstance(err, OSError) and err.errno in (errno.EACCES, errno.EPERM, errno.EROFS, errno.ENAMETOOLONG) \
        and err.filename is not None


def user_message(err: BaseException) -> str:
    """The error's message; a full disk that named no path gets the path and the fix."""
    if isinstance(err, UserError):
        return str(err)
    if is_path_refused(err):
        return f"{err.filename}: {err.strerror}; choose a path this user may write, or fix its permissions"
    where = getattr(err, "filename", None) or "an output file (the error names none)"
    return f"{where}: the disk is full ({err}); free some space or write to another disk"


if __name__ == "__main__":
    sys.exit(main())

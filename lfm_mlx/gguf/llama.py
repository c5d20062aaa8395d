"""llama.cpp through llama-cpp-python: open a GGUF, read its tensor types, quantize with its quantizer."""

from __future__ import annotations

import contextlib
import ctypes
import re
import time
from collections import Counter
from pathlib import Path
from typing import Iterator, Mapping

import gguf
import numpy as np

from lfm_mlx.fsutil import atomic_file, locked
from lfm_mlx.gguf.plan import Q, QUANT_TYPES


def open_gguf(path: str | Path, **kwargs):
    """`llama_cpp.Llama(path, **kwargs)` with llama.cpp's CPU weight repacking off (its "extra
    buffer types"). On an AMX CPU the repacked path of llama-cpp-python 0.3.35 and 0.3.36 crashed
    (in ggml_backend_amx_mul_mat) on the tiny models' Q8_0 experts and moved their F16 logits off
    the plain kernels' rounding; the plain CPU kernels are the reference this project checks
    against. llama-cpp-python's Llama takes no such argument, so its default model parameters are
    swapped for the call."""
    llama_cpp = _llama_cpp()
    low_level = llama_cpp.llama_cpp
    defaults = low_level.llama_model_default_params

    def without_repacking():
        params = defaults()
        params.use_extra_bufts = False
        return params

    low_level.llama_model_default_params = without_repacking
    try:
        # verbose=False still lets the context's set-up print to stderr; llama-cpp-python's own
        # descriptor-level silencer keeps it quiet too
        from llama_cpp._utils import suppress_stdout_stderr

        with suppress_stdout_stderr(disable=kwargs.get("verbose", True)):
            return llama_cpp.Llama(model_path=str(path), **kwargs)
    finally:
        low_level.llama_model_default_params = defaults


def _llama_cpp():
    try:
        import llama_cpp
    except ImportError:
        raise ImportError(
            "quantized GGUF variants and runs in llama.cpp go through llama-cpp-python; "
            "install it with `pip install llama-cpp-python` (it builds llama.cpp, ~6 minutes)"
        ) from None
    return llama_cpp


def gguf_tensor_types(path: str | Path) -> dict[str, str]:
    """GGUF tensor name -> GGML type name, read from the file's header."""
    reader = gguf.GGUFReader(str(path))
    return {t.name: t.tensor_type.name for t in reader.tensors}


def quantize_gguf(src_gguf: str | Path, dst_gguf: str | Path, qtype: str = "Q4_K_M",
                  tensor_types: Mapping[str, str] | None = None,
                  imatrix: Mapping[str, np.ndarray] | None = None, nthread: int = 0) -> dict:
    """Quantize a bf16 / f16 / f32 GGUF with llama.cpp's quantizer (llama_model_quantize), atomically.

    `tensor_types` maps a regex over GGUF tensor names to a GGML type name (e.g.
    {"token_embd": "q8_0", "attn_": "q6_k"}); the first match wins. `imatrix` maps GGUF tensor
    names to per-column importances (see `compute_imatrix`). Returns sizes and the type counts.
    """
    llama_cpp = _llama_cpp()
    qtype = qtype.upper()
    if qtype not in QUANT_TYPES:
        raise ValueError(f"quantization type {qtype!r} is not offered; choose one of {', '.join(QUANT_TYPES)}")
    src_gguf, dst_gguf = Path(src_gguf), Path(dst_gguf)
    if not src_gguf.is_file():
        raise FileNotFoundError(f"{src_gguf} does not exist; export it first with `lfm-mlx gguf`")
    quantized = {t for t in gguf_tensor_types(src_gguf).values() if t not in ("F32", "F16", "BF16")}
    if quantized:
        raise ValueError(
            f"{src_gguf} is already quantized ({', '.join(sorted(quantized))}); requantizing stacks two "
            f"roundings. Quantize from a bf16 / f16 / f32 export (lfm-mlx gguf --outtype bf16)"
        )
    start = time.perf_counter()
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = int(gguf.LlamaFileType[f"MOSTLY_{qtype}"])
    params.nthread = nthread
    keep = []  # ctypes buffers must outlive the call

    overrides = dict(tensor_types or {})
    if overrides:
        array = (llama_cpp.llama_model_tensor_override * (len(overrides) + 1))()
        for i, (pattern, type_name) in enumerate(overrides.items()):
            try:
                re.compile(pattern)
                ggml_type = Q[type_name.upper()]
            except re.error as err:
                raise ValueError(f"tensor type override {pattern!r}: not a valid regex ({err})") from None
            except KeyError:
                raise ValueError(
                    f"tensor type override {pattern!r}={type_name!r}: unknown GGML type; use e.g. "
                    f"q8_0, q6_k, q5_k, q4_k, bf16, f16"
                ) from None
            array[i].pattern = pattern.encode()
            array[i].type = int(ggml_type)
        array[len(overrides)].pattern = None  # terminator
        params.tt_overrides = array
        keep.append(array)

    if imatrix:
        entries = (llama_cpp.llama_model_imatrix_data * (len(imatrix) + 1))()
        for i, (name, values) in enumerate(imatrix.items()):
            values = np.ascontiguousarray(values, dtype=np.float32)
            if not np.all(np.isfinite(values)):
                raise ValueError(f"imatrix entry {name!r} has non-finite values; recompute the importance matrix")
            keep.extend([values, name.encode()])
            entries[i].name = keep[-1]
            entries[i].data = values.ctypes.data_as(llama_cpp.ctypes.POINTER(llama_cpp.ctypes.c_float))
            entries[i].size = values.size
        entries[len(imatrix)].name = None  # terminator
        params.imatrix = entries
        keep.append(entries)

    with locked(dst_gguf, sibling=True), atomic_file(dst_gguf) as tmp, _captured_log(llama_cpp) as log:
        code = llama_cpp.llama_model_quantize(str(src_gguf).encode(), str(tmp).encode(), llama_cpp.byref(params))
        if code != 0:
            said = "".join(log).strip().splitlines()[-12:]
            raise RuntimeError(
                f"llama.cpp could not quantize {src_gguf} to {qtype} (code {code}); a wrong tensor override pattern, "
                f"or an imatrix that does not fit the tensors? llama.cpp's last words:\n  " + "\n  ".join(said))
    types = gguf_tensor_types(dst_gguf)
    return {
        "source": str(src_gguf), "out": str(dst_gguf), "qtype": qtype,
        "bytes": dst_gguf.stat().st_size, "source_bytes": src_gguf.stat().st_size,
        "tensor_types": dict(Counter(types.values())), "overrides": overrides,
        "imatrix_entries": len(imatrix or {}), "seconds": round(time.perf_counter() - start, 3),
    }


@contextlib.contextmanager
def _captured_log(llama_cpp) -> Iterator[list[str]]:
    """llama.cpp's log kept in a list instead of stderr: the quantizer logs every key and tensor
    (hundreds of lines for an 8B), and its level numbers differ between versions."""
    lines: list[str] = []

    @llama_cpp.llama_log_callback
    def keep(level: int, text: bytes, user_data) -> None:
        lines.append(text.decode("utf-8", "replace"))

    llama_cpp.llama_log_set(keep, ctypes.c_void_p(0))
    try:
        yield lines
    finally:
        from llama_cpp._logger import llama_log_callback  # llama-cpp-python's own, set when it was imported

        llama_cpp.llama_log_set(llama_log_callback, ctypes.c_void_p(0))

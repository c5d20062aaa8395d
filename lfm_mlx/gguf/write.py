"""Writing the planned tensors into one GGUF file, tensor by tensor and atomically (`export_gguf`)."""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path
from typing import Callable

import gguf
import mlx.core as mx
import numpy as np

from lfm_mlx.fsutil import atomic_file, check_free_space, locked, recover, refuse_overlap
from lfm_mlx.gguf.metadata import _write_hparams, _write_tokenizer
from lfm_mlx.gguf.plan import ARCHS, OUTTYPES, Q, _Planned, _Source, _check_supported, _plan
from lfm_mlx.model.io import check_tokenizer, read_config


def _encode(value: mx.array, qtype: Q) -> np.ndarray:
    """An MLX array as the bytes of GGML type `qtype` (numpy, row-major). One cast, straight from
    the source dtype, and numpy views MLX's buffer: no further copies of large tensors."""
    if qtype == Q.F32:
        value = value.astype(mx.float32)
    elif qtype == Q.F16:
        value = value.astype(mx.float16)
    elif qtype == Q.BF16:  # numpy has no bfloat16: ship the raw 16-bit patterns
        value = value.astype(mx.bfloat16).view(mx.uint16)
    else:
        return gguf.quants.quantize(np.asarray(value.astype(mx.float32)), qtype)
    mx.eval(value)
    return np.asarray(value)


def _tensor_type(item: _Planned, matrix_type: Q) -> Q:
    if item.keep_float32 or len(item.shape) < 2:
        return Q.F32
    block = gguf.GGML_QUANT_SIZES[matrix_type][0]
    if item.shape[-1] % block:  # rows that do not fill whole Q8_0 blocks stay exact
        return Q.F32
    return matrix_type


def export_gguf(model_dir: str | Path, out_path: str | Path, outtype: str = "bf16",
                on_tensor: Callable[[int, int, str], None] | None = None) -> dict:
    """Export an LFM2 / LFM2-MoE directory (HF, or mlx-lm mixed / trained / fused) to one GGUF file.

    Matrices are written as `outtype` (bf16, f16, f32 or q8_0); norms, the short-conv kernel, the
    router and `expert_bias` stay float32. `on_tensor(i, n, name)` is called before each tensor (a
    progress hook). Returns a report: sizes, tensor types, vocabulary, seconds.
    """
    if outtype not in OUTTYPES:
        raise ValueError(f"outtype {outtype!r} is not supported; choose one of {', '.join(OUTTYPES)}")
    start = time.perf_counter()
    model_dir, out_path = Path(model_dir), Path(out_path)
    if not model_dir.is_dir():
        raise FileNotFoundError(f"model directory {model_dir} does not exist; pass a local model directory")
    refuse_overlap(out_path, {"model directory": model_dir})
    config = read_config(model_dir)
    check_tokenizer(model_dir)
    _check_supported(config, model_dir / "config.json")
    src = _Source(model_dir, config)
    plan = _plan(config, src)
    matrix_type, file_type = OUTTYPES[outtype]

    arch = gguf.MODEL_ARCH_NAMES[ARCHS[config["model_type"]]]
    writer = gguf.GGUFWriter(path=None, arch=arch)
    _write_hparams(writer, config, model_dir.name)
    vocab = _write_tokenizer(writer, model_dir, config)
    writer.add_file_type(file_type)
    if matrix_type == Q.Q8_0:
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    types, data_bytes = [], 0
    for item in plan:
        qtype = _tensor_type(item, matrix_type)
        types.append(qtype)
        if qtype == Q.Q8_0:  # quantized data is described by its byte shape
            byte_shape = gguf.quants.quant_shape_to_byte_shape(item.shape, qtype)
            writer.add_tensor_info(item.name, byte_shape, np.dtype(np.uint8), int(np.prod(byte_shape)), qtype)
            data_bytes += int(np.prod(byte_shape))
        else:
            dtype = {Q.F32: np.float32, Q.F16: np.float16, Q.BF16: np.uint16}[qtype]
            nbytes = int(np.prod(item.shape)) * np.dtype(dtype).itemsize
            writer.add_tensor_info(item.name, item.shape, np.dtype(dtype), nbytes, qtype)
            data_bytes += nbytes

    # One writer at a time per output; recover() drops the temporaries of killed exports.
    with locked(out_path, sibling=True):
        recover(out_path)
        check_free_space(out_path, data_bytes, "the GGUF file")  # + metadata, which is small
        with atomic_file(out_path) as tmp:
            try:
                writer.write_header_to_file(tmp)
                writer.write_kv_data_to_file()
                writer.write_ti_data_to_file()
                for i, (item, qtype) in enumerate(zip(plan, types)):
                    if on_tensor is not None:
                        on_tensor(i, len(plan), item.name)
                    writer.write_tensor_data(_encode(item.build(), qtype))
                    mx.clear_cache()  # hand freed buffers back: peak stays near one tensor, not the model
            finally:
                writer.close()
    return {
        "source": str(model_dir), "out": str(out_path), "outtype": outtype, "architecture": arch,
        "n_tensors": len(plan), "bytes": out_path.stat().st_size,
        "tensor_types": dict(Counter(t.name for t in types)), "vocab": vocab,
        "seconds": round(time.perf_counter() - start, 3),
    }

"""Give MLX's Linux CPU backend a fast BLAS.

The Linux `mlx[cpu]` wheel links the reference (netlib) BLAS. On the 2-core CI box its float32
matmul runs at about 5 GFLOP/s; through OpenBLAS the same call runs at about 66 GFLOP/s (a
2048 x 2048 x 2048 matmul: 3.53 s against 0.26 s). MLX calls `cblas_sgemm` through the dynamic
linker, and the linker searches the global scope before a library's own dependencies, so loading
an OpenBLAS with RTLD_GLOBAL before `mlx.core` is imported makes MLX's matmuls use it. macOS
(Accelerate) and the GPU backends are left alone.

`lfm_mlx/__init__.py` calls `preload()` on import. `LFM_MLX_BLAS=off` skips it, and
`LFM_MLX_BLAS=/path/libopenblas.so.0` picks the library. On Debian or Ubuntu,
`apt-get install libopenblas0-pthread` provides one.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys
from pathlib import Path

# Where Debian / Ubuntu / Fedora put a multithreaded OpenBLAS that exports plain `cblas_*` names.
_KNOWN_PATHS = (
    "/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib/x86_64-linux-gnu/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/libopenblas.so.0",
    "/usr/lib64/libopenblasp.so.0",
    "/usr/lib64/libopenblas.so.0",
)

_loaded: str | None = None
_reason = "not tried"


def _candidates() -> list[str]:
    found = ctypes.util.find_library("openblas")
    return ([found] if found else []) + [path for path in _KNOWN_PATHS if Path(path).exists()]


def preload() -> str | None:
    """Load an OpenBLAS into the global symbol scope (Linux only); returns its path, or None."""
    global _loaded, _reason
    if _loaded or not sys.platform.startswith("linux"):
        _reason = _reason if _loaded else "not Linux: MLX uses the platform's BLAS"
        return _loaded
    choice = os.environ.get("LFM_MLX_BLAS", "").strip()
    if choice.lower() == "off":
        _reason = "LFM_MLX_BLAS=off"
        return None
    if "mlx.core" in sys.modules:
        # Too late to be sure: calls MLX already bound stay on the reference BLAS.
        _reason = "mlx.core was imported before lfm_mlx"
    for path in [choice] if choice else _candidates():
        try:
            ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
        except OSError as error:
            _reason = f"could not load {path}: {error}"
            continue
        _loaded = path
        return path
    if not choice:
        _reason = "no OpenBLAS found (apt-get install libopenblas0-pthread)"
    return None


def set_threads(n: int) -> int | None:
    """Cap the loaded OpenBLAS at `n` threads; returns the count before (to restore), or None when no
    OpenBLAS is loaded (nothing to cap).

    The tiny models' matmuls gain nothing from a second thread, so two processes of one thread each
    (training beside an evaluation) get twice the work done on two cores."""
    if not _loaded:
        return None
    library = ctypes.CDLL(_loaded)
    before = int(library.openblas_get_num_threads())
    library.openblas_set_num_threads(int(n))
    return before


def describe() -> str:
    """One line for reports: which BLAS MLX's CPU matmuls use here."""
    if _loaded:
        return f"openblas ({_loaded})"
    return f"reference BLAS of the mlx wheel ({_reason})" if sys.platform.startswith("linux") else "platform BLAS"

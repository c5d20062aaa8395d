"""The Linux CPU BLAS preload (lfm_mlx/cpu_blas.py): used when present, and still correct."""

import os
import sys

import mlx.core as mx
import numpy as np
import pytest

from lfm_mlx import cpu_blas


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="only Linux CPU wheels link the reference BLAS")
def test_openblas_is_used_when_installed():
    if os.environ.get("LFM_MLX_BLAS", "").lower() == "off":
        pytest.skip("LFM_MLX_BLAS=off")
    if not cpu_blas._candidates():
        pytest.skip("no OpenBLAS installed here (apt-get install libopenblas0-pthread)")
    assert cpu_blas.describe().startswith("openblas"), cpu_blas.describe()


def test_matmul_agrees_with_numpy():
    # Whatever BLAS answers MLX's cblas_sgemm calls, the products must be right (incl. transposes).
    rng = np.random.default_rng(0)
    a = rng.standard_normal((67, 129)).astype(np.float32)
    b = rng.standard_normal((129, 33)).astype(np.float32)
    with mx.stream(mx.cpu):
        got = np.array(mx.array(a) @ mx.array(b))
        got_t = np.array(mx.array(b).T @ mx.array(a).T)
    np.testing.assert_allclose(got, a @ b, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(got_t, (a @ b).T, rtol=1e-4, atol=1e-4)


def test_off_switch_and_description(monkeypatch):
    monkeypatch.setattr(cpu_blas, "_loaded", None)
    monkeypatch.setenv("LFM_MLX_BLAS", "off")
    assert cpu_blas.preload() is None
    if sys.platform.startswith("linux"):
        assert "LFM_MLX_BLAS=off" in cpu_blas.describe()

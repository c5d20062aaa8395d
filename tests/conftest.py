"""Shared fixtures: tiny synthetic models, written once per test session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from lfm_mlx.model.synthetic import write_synthetic_model


@pytest.fixture(autouse=True, scope="session")
def machine_cache(tmp_path_factory) -> Path:
    """Per-machine caches (the expert path `auto` measured) go to the session's temp dir, not ~/.cache."""
    path = tmp_path_factory.mktemp("machine-cache")
    os.environ["LFM_MLX_CACHE"] = str(path)  # subprocesses (the CLI tests) inherit it
    return path


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="session")
def tiny_moe_dir(models_dir) -> Path:
    return write_synthetic_model(models_dir / "tiny-moe", "tiny-moe", seed=0)


@pytest.fixture(scope="session")
def demo_moe_dir(models_dir) -> Path:
    return write_synthetic_model(models_dir / "demo-moe", "demo-moe", seed=0)


@pytest.fixture(scope="session")
def tiny_dense_dir(models_dir) -> Path:
    return write_synthetic_model(models_dir / "tiny-dense", "tiny-dense", seed=0)


@pytest.fixture(scope="session")
def tiny_moe_mixed_dir(models_dir, tiny_moe_dir) -> Path:
    from lfm_mlx.mixed import mix

    out = models_dir / "tiny-moe-mixed"
    mix(tiny_moe_dir, out)
    return out

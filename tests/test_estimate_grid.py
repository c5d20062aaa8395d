"""estimate_peak against values frozen before it was split into one function per component (issue 28):
every component identical over a seeded grid of settings on the 8B-A1B and the demo MoE shapes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lfm_mlx import console
from lfm_mlx.memory import estimate_peak
from lfm_mlx.model.synthetic import hf_config

GRID = json.loads((Path(__file__).parent / "data" / "estimate_grid.json").read_text())["cases"]


def _today(settings: dict) -> dict:
    """The grid's settings (frozen_path, 'batched': the names of then) in today's spelling."""
    settings = dict(settings)
    kernel = settings.pop("frozen_path")
    return settings | {"expert_kernel": "blocks" if kernel == "batched" else kernel}


@pytest.mark.parametrize("case", GRID, ids=[str(i) for i in range(len(GRID))])
def test_estimate_matches_the_values_frozen_before_the_split(case):
    got = estimate_peak(hf_config(case["model"]), **_today(case["settings"]))
    assert got.components() == case["components"] and got.total == case["total"]


def test_the_old_keyword_and_value_give_the_same_estimate_with_one_warning(capsys, monkeypatch):
    monkeypatch.setattr(console, "_WARNED", set())
    case = next(c for c in GRID if c["settings"]["frozen_path"] == "batched")
    for _ in range(2):
        old = estimate_peak(hf_config(case["model"]), **case["settings"])
        assert old.components() == case["components"] and old.inputs["expert_kernel"] == "blocks"
    err = capsys.readouterr().err
    assert err.count("warning") == 1 and "'frozen_path' is deprecated; use 'expert_kernel'" in err, err

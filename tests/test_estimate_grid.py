"""estimate_peak against values frozen before it was split into one function per component (issue 28):
every component identical over a seeded grid of settings on the 8B-A1B and the demo MoE shapes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lfm_mlx.memory import estimate_peak
from lfm_mlx.model.synthetic import hf_config

GRID = json.loads((Path(__file__).parent / "data" / "estimate_grid.json").read_text())["cases"]


@pytest.mark.parametrize("case", GRID, ids=[str(i) for i in range(len(GRID))])
def test_estimate_matches_the_values_frozen_before_the_split(case):
    got = estimate_peak(hf_config(case["model"]), **case["settings"])
    assert got.components() == case["components"] and got.total == case["total"]

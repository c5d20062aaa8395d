"""lfm_mlx.train.schedules.GroupSchedule: groups, validation, printing, serialization."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from lfm_mlx.model.synthetic import hf_config
from lfm_mlx.train.schedules import GroupSchedule


def test_8b_a1b_size_4_stride_3():
    schedule = GroupSchedule.for_model(hf_config("lfm2.5-8b-a1b"), size=4, stride=3)
    assert (schedule.first_layer, schedule.last_layer) == (2, 23)
    assert schedule.groups == [
        [2, 3, 4, 5], [5, 6, 7, 8], [8, 9, 10, 11], [11, 12, 13, 14],
        [14, 15, 16, 17], [17, 18, 19, 20], [20, 21, 22, 23],
    ]
    assert len(schedule) == 7
    table = str(schedule)
    assert "size 4, stride 3, MoE layers 2-23 (22 layers), 7 groups" in table
    assert "    6  20-23      4  20" in table.splitlines()


def test_last_group_is_clipped_to_the_last_layer():
    assert GroupSchedule(4, 4, 2, 23).groups[-2:] == [[18, 19, 20, 21], [22, 23]]
    assert GroupSchedule(30, 1, 2, 23).groups == [list(range(2, 24))]
    assert GroupSchedule(1, 1, 5, 5).groups == [[5]]


@given(size=st.integers(1, 9), data=st.data(), first=st.integers(0, 4), span=st.integers(0, 40))
def test_groups_cover_every_layer_in_order(size, data, first, span):
    stride = data.draw(st.integers(1, size))
    schedule = GroupSchedule(size, stride, first, first + span)
    groups = schedule.groups
    assert groups[0][0] == first and groups[-1][-1] == first + span
    assert sorted({layer for g in groups for layer in g}) == list(range(first, first + span + 1))
    for i, group in enumerate(groups):
        assert group == list(range(group[0], group[-1] + 1))  # consecutive layers
        assert len(group) == size or i == len(groups) - 1  # only the last one is clipped
        if i:
            assert group[0] == groups[i - 1][0] + stride
    # No group is wholly inside its predecessor's range (no wasted group at the end).
    assert len(groups) == 1 or groups[-1][-1] > groups[-2][-1]


def test_every_problem_in_one_error():
    with pytest.raises(ValueError) as info:
        GroupSchedule(size=0, stride=0, first_layer=5, last_layer=2)
    message = str(info.value)
    assert "size=0 must be >= 1" in message
    assert "stride=0 must be >= 1" in message
    assert "layer range 5..2 is empty" in message
    with pytest.raises(ValueError, match=r"stride=5 > size=4 leaves MoE layers 6, 11, 16, 21 never trained"):
        GroupSchedule(4, 5, 2, 23)
    with pytest.raises(ValueError, match=r"leaves MoE layers 5-6, 10-11 never trained"):
        GroupSchedule(3, 5, 2, 12)
    with pytest.raises(ValueError, match="size=True must be an integer"):
        GroupSchedule(True, 1, 0, 3)


def test_dict_round_trip_and_unknown_keys():
    schedule = GroupSchedule(4, 3, 2, 23)
    data = json.loads(json.dumps(schedule.to_dict()))
    assert data == {"size": 4, "stride": 3, "first_layer": 2, "last_layer": 23}
    assert GroupSchedule.from_dict(data) == schedule
    with pytest.raises(ValueError, match=r"unknown \['strides'\], missing \['stride'\]"):
        GroupSchedule.from_dict({"size": 4, "strides": 3, "first_layer": 2, "last_layer": 23})


def test_for_model_reads_a_model_dir(tiny_moe_dir, tiny_dense_dir):
    schedule = GroupSchedule.for_model(tiny_moe_dir, size=2, stride=2)
    assert schedule.groups == [[2, 3], [4, 5], [6, 7]]
    with pytest.raises(ValueError, match="needs an LFM2-MoE config"):
        GroupSchedule.for_model(tiny_dense_dir, 2, 2)

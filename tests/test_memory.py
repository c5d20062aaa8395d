"""lfm_mlx.memory: peak estimates, admission, and the watchdog under a simulated leak."""

from __future__ import annotations

import gc
import json
import warnings
from dataclasses import replace

import mlx.core as mx
import pytest

from lfm_mlx.memory import (
    GB,
    MemoryBudget,
    MemoryBudgetExceeded,
    MemoryHardStop,
    MemoryReading,
    MemorySoftLimitWarning,
    MemoryWatchdog,
    StepMemoryReader,
    StepShape,
    estimate_peak,
    parameter_counts,
    read_memory,
    runtime_baseline,
    weights_bytes,
)
from lfm_mlx.model.synthetic import hf_config

BIG = hf_config("lfm2.5-8b-a1b")


def test_8b_a1b_weights_by_hand():
    # 24 layers: 2 dense (MLP 7168), 22 MoE (32 experts of 3 x 2048 x 1792); attention at
    # 2, 6, 10, 14, 18, 21 (q, o: 2048 x 2048; k, v: 2048 x 512; q/k norms 64), conv elsewhere
    # (in 2048 x 6144, out 2048 x 2048, depthwise 2048 x 3); tied 128000 x 2048 embeddings.
    experts = 22 * 32 * 3 * 2048 * 1792
    rest = (
        128000 * 2048
        + 6 * (2 * 2048 * 2048 + 2 * 2048 * 512 + 2 * 64)
        + 18 * (2048 * 6144 + 2048 * 2048 + 2048 * 3)
        + 2 * 3 * 2048 * 7168
        + 22 * 32 * 2048  # routers
        + 2 * 2048 * 24 + 2048  # norms
    )
    by_hand = experts * 1 + experts // 64 * 2 * 2 + rest * 2 + 22 * 32 * 4  # int8 + bf16 scale/bias, bf16, fp32 bias
    assert by_hand == 9_669_083_392
    assert weights_bytes(BIG, expert_bits=8, group_bits_size=64, compute_dtype_bytes=2) == by_hand
    assert parameter_counts(BIG)["experts"] == experts
    # The device notes quote 10.07 GB for these shapes; an mlx-lm model of them, experts
    # quantized to 8 bits and the rest bf16, holds 9.669 GB of parameters (measured here).
    assert abs(by_hand - 10.07 * GB) / (10.07 * GB) < 0.05


@pytest.mark.parametrize("dtype, dtype_bytes", [(mx.bfloat16, 2), (mx.float32, 4)])
def test_weights_match_a_loaded_mixed_checkpoint(tiny_moe_mixed_dir, dtype, dtype_bytes):
    """The weights component equals the bytes a real mixed checkpoint occupies once loaded."""
    from mlx.utils import tree_flatten

    from lfm_mlx.model.io import load

    model, _ = load(tiny_moe_mixed_dir, dtype=dtype, with_tokenizer=False)
    config = json.loads((tiny_moe_mixed_dir / "config.json").read_text())
    loaded = sum(v.nbytes for _, v in tree_flatten(model.parameters()))
    assert weights_bytes(config, compute_dtype_bytes=dtype_bytes) == loaded


def test_estimate_grows_with_group_and_sequence():
    totals = [estimate_peak(BIG, group_size=g, seq_len=2048).total for g in range(1, 23)]
    assert all(a < b for a, b in zip(totals, totals[1:]))
    by_len = [estimate_peak(BIG, group_size=4, seq_len=s).total for s in (256, 1024, 4096, 10240)]
    assert all(a < b for a, b in zip(by_len, by_len[1:]))
    assert estimate_peak(BIG, StepShape(4, 2048), batch_size=2).total > estimate_peak(BIG, StepShape(4, 2048)).total
    # The usual levers lower it.
    base = estimate_peak(BIG, StepShape(4, 2048), grad_checkpoint=False)
    assert estimate_peak(BIG, StepShape(4, 2048), optimizer="adafactor", grad_checkpoint=False).total < base.total
    assert estimate_peak(BIG, StepShape(4, 2048), grad_checkpoint=True).total < base.total
    assert estimate_peak(BIG, StepShape(4, 2048), grad_checkpoint=False, expert_kernel="dequant").total > base.total
    assert estimate_peak(BIG, StepShape(4, 2048), grad_checkpoint=False, attention="fused").total < base.total


def test_estimate_components_and_calibration():
    e = estimate_peak(BIG, group_size=4, seq_len=2048)
    parts = e.components()
    group = 4 * 32 * 3 * 2048 * 1792
    assert parts["group_dequant"] == group * 2
    assert parts["gradients"] == (group + 4 * 32 * 2048) * 2
    assert parts["optimizer_state"] == (group + 4 * 32 * 2048) * 2 * 4  # AdamW, two fp32 moments
    assert parts["logits"] == 2048 * 128000 * (2 + 4 + 8 + 2)
    persistent = sum(parts[k] for k in ("weights", "group_dequant", "gradients", "optimizer_state"))
    backward = sum(parts[k] for k in ("activations", "logits", "attention", "frozen_dequant"))
    assert e.total == persistent + max(backward, parts["optimizer_update"])
    table = e.as_table()
    assert "weights" in table and f"{e.total / GB:.3f}" in table
    # Calibrating against a measurement reproduces it; per-component scales act on one part.
    factor = e.calibrate(31.3 * GB)
    calibrated = estimate_peak(BIG, group_size=4, seq_len=2048, calibration=factor)
    assert calibrated.total == pytest.approx(31.3 * GB, rel=1e-9)
    scaled = estimate_peak(BIG, group_size=4, seq_len=2048, scales={"logits": 0.5})
    assert scaled.total == e.total - parts["logits"] // 2
    with pytest.raises(ValueError, match="optimizer='sgd'.*scales for unknown components \\['logit'\\]"):
        estimate_peak(BIG, StepShape(4, 2048), optimizer="sgd", scales={"logit": 2.0})


def test_runtime_baseline_adds_to_total_outside_the_calibration():
    plain = estimate_peak(BIG, group_size=4, seq_len=2048)
    assert plain.baseline == 0 and plain.total == plain.raw_total  # the default keeps the old total
    base = runtime_baseline()
    assert 0 < base < 64 * GB
    e = estimate_peak(BIG, group_size=4, seq_len=2048, baseline=base, calibration=1.2)
    assert e.components() == plain.components() and e.raw_total == plain.raw_total
    assert e.total == round(plain.raw_total * 1.2) + base
    assert e.to_dict()["baseline"] == base and "runtime baseline" in e.as_table()
    assert replace(e, calibration=e.calibrate(40 * GB)).total == pytest.approx(40 * GB, rel=1e-9)
    with pytest.raises(ValueError, match="must be > the baseline"):
        e.calibrate(base)
    # Admission counts the baseline, and its suggested settings are re-estimated with it: group
    # size 10 fits 60 GB alone (59.0 GB) but not with 2 GB of runtime on top.
    with pytest.raises(MemoryBudgetExceeded) as info:
        MemoryWatchdog(MemoryBudget()).admit(estimate_peak(BIG, group_size=10, seq_len=2048, baseline=2 * 10**9))
    assert info.value.suggestions[0].startswith("group size 9 (est. 56.35 GB)")
    with pytest.raises(ValueError, match="baseline=-1 must be >= 0"):
        estimate_peak(BIG, StepShape(4, 2048), baseline=-1)


def test_admission_refuses_with_numbers_and_fixes_that_fit():
    watchdog = MemoryWatchdog(MemoryBudget())
    watchdog.admit(estimate_peak(BIG, group_size=4, seq_len=2048))  # about 33 GB: fits
    too_big = estimate_peak(BIG, group_size=11, seq_len=2048)
    with pytest.raises(MemoryBudgetExceeded) as info:
        watchdog.admit(too_big)
    error = info.value
    assert error.estimate is too_big and error.budget.hard_gb == 60
    assert f"{too_big.total / GB:.2f} GB exceeds the hard stop 60.00 GB" in str(error)
    assert error.suggestions[0].startswith("group size 10 ")
    assert any(s.startswith("optimizer adafactor") for s in error.suggestions)
    assert estimate_peak(BIG, group_size=10, seq_len=2048).total <= 60 * GB < estimate_peak(BIG, StepShape(11, 2048)).total
    with pytest.warns(MemorySoftLimitWarning, match="above the soft limit"):
        MemoryWatchdog(MemoryBudget(64, 20, 40)).admit(estimate_peak(BIG, StepShape(4, 2048)))
    with pytest.raises(ValueError, match="needs 0 < soft_gb < hard_gb <= total_gb"):
        MemoryBudget(64, 60, 54)


class ScriptedReader:
    """Readings in GB from a list: what the watchdog sees of a process whose memory grows."""

    def __init__(self, used_gb: list[float]):
        self.used_gb, self.calls = used_gb, 0

    def __call__(self) -> MemoryReading:
        value = int(self.used_gb[self.calls] * GB)
        self.calls += 1
        return MemoryReading(active=value, peak=value, cache=0, rss=value // 2)


def test_simulated_leak_clears_warns_then_stops_before_the_limit():
    cleared = []

    def clear():
        cleared.append(True)
        mx.clear_cache()

    leak = [5.0 + 0.5 * i for i in range(20)]  # 5.0, 5.5, ... GB
    watchdog = MemoryWatchdog(MemoryBudget(total_gb=12, soft_gb=8, hard_gb=10), reader=ScriptedReader(leak),
                              clear_cache=clear)
    seen = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(MemoryHardStop) as info:
            for step in range(20):
                seen.append(watchdog.check(step))
    soft = [w for w in caught if issubclass(w.category, MemorySoftLimitWarning)]
    assert len(soft) == 1 and "step 6: memory 8.00 GB crossed the soft limit 8.00 GB" in str(soft[0].message)
    assert [s.level for s in seen] == ["ok"] * 6 + ["soft"] * 3  # 8.0, 8.5, 9.0 GB
    assert len(cleared) == 4 and all(s.cleared for s in seen[6:])  # each soft sample, and before the stop
    stop = info.value
    assert stop.exit_code == 75
    # Stopped at 9.5 GB, because the next sample (10.0 GB) would reach the hard stop.
    assert stop.sample.step == 9 and stop.sample.used == int(9.5 * GB) < 10 * GB
    assert stop.sample.predicted_next == int(10.0 * GB)
    assert "the next sample would pass the hard limit" in str(stop) and "9.50 GB" in str(stop)


def test_warns_once_per_crossing_and_ignores_one_long_step():
    readings = [5, 8.5, 8.6, 7, 8.5, 5, 9.9, 5, 5, 10.2]
    watchdog = MemoryWatchdog(MemoryBudget(12, 8, 10), reader=ScriptedReader(readings))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        levels = [watchdog.check(step).level for step in range(9)]
        with pytest.raises(MemoryHardStop, match="at the hard limit"):
            watchdog.check(9)
    assert levels == ["ok", "soft", "soft", "ok", "soft", "ok", "soft", "ok", "ok"]
    assert sum(issubclass(w.category, MemorySoftLimitWarning) for w in caught) == 3
    # One long example (9.9 GB) without sustained growth does not trigger a predicted stop.
    every_other = MemoryWatchdog(MemoryBudget(12, 8, 10), sample_every=2, reader=ScriptedReader([5, 6]))
    assert every_other.check(1) is None and every_other.check(2).used == 5 * GB


def test_real_mlx_arrays_leak_is_stopped_before_the_hard_limit():
    """A growing list of real MLX arrays, read through MLX and psutil (the default reader)."""
    chunk = 32 * 2**20  # bytes per step
    base = max(read_memory().rss, mx.get_active_memory() + mx.get_cache_memory())
    budget = MemoryBudget(total_gb=(base + 40 * chunk) / GB, soft_gb=(base + 10 * chunk) / GB,
                          hard_gb=(base + 20 * chunk) / GB)
    watchdog = MemoryWatchdog(budget)
    leaked = []
    with pytest.warns(MemorySoftLimitWarning):
        with pytest.raises(MemoryHardStop) as info:
            for step in range(40):
                leaked.append(mx.full((chunk // 4,), float(step), dtype=mx.float32))
                mx.eval(leaked[-1])
                watchdog.check(step)
    sample = info.value.sample
    assert sample.used < budget.hard_bytes <= sample.predicted_next  # stopped on the prediction
    assert mx.get_active_memory() < budget.hard_bytes
    assert sample.active >= len(leaked) * chunk
    leaked.clear()


@pytest.mark.parametrize("os_peak", [True, False], ids=["linux-peak-rss", "rss-plus-mlx-peak"])
def test_transient_allocation_inside_a_step_is_in_the_sample(os_peak):
    """A step that allocates a large MLX array, evaluates it and frees it before the check: RSS
    after the step no longer holds it, yet the default reader's sample reports the step's peak
    (both ways: the kernel's peak RSS, and non-MLX RSS plus MLX's peak)."""
    reader = StepMemoryReader(unified=True)  # the CPU backend: MLX buffers are process memory
    if os_peak and not reader.os_peak:
        pytest.skip("no resettable peak RSS here (/proc/self/clear_refs: Linux only)")
    reader.os_peak = reader.os_peak and os_peak
    assert isinstance(MemoryWatchdog().reader, StepMemoryReader)  # the default reader
    watchdog = MemoryWatchdog(MemoryBudget(), reader=reader)
    size = 256 * 2**20
    gc.collect()
    mx.clear_cache()
    before = read_memory(reset_peak=False).rss
    watchdog.start()
    big = mx.full((size // 4,), 1.0, dtype=mx.float32)
    mx.eval(big)
    del big
    mx.clear_cache()  # the step returns its buffers, as MLX does with large ones on CPU
    sample = watchdog.check(1)
    assert sample.rss < before + size // 2  # read after the step, RSS alone misses the transient
    # MLX's own peak (the old figure) is the array plus MLX's small active set; the process peak
    # also holds the interpreter and libraries.
    assert reader.last["mlx_peak"] >= size
    assert sample.peak >= before + 0.97 * size and sample.used >= sample.peak
    # The next sample covers only its own interval: the transient is gone from it.
    assert watchdog.check(2).used < before + size // 2

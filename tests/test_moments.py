"""The int8 AdamW moments' noise and packing (CPU; the CUDA kernel is checked against the same
functions bit for bit by its start-up probe)."""

from __future__ import annotations

import mlx.core as mx
import numpy as np

from lfm_mlx.kernels import int8_moments
from lfm_mlx.kernels.int8_moments import moment_noise, pack_moment, pack_moment_noisy, unpack_moment


def test_moment_noise_is_uniform_and_follows_its_seed():
    seed = mx.array(12345, dtype=mx.uint32)
    u = np.array(moment_noise((512, 1024), seed))
    assert u.min() >= 0 and u.max() < 1
    assert abs(u.mean() - 0.5) < 0.002 and abs(u.std() - (1 / 12) ** 0.5) < 0.002
    assert np.allclose(np.histogram(u, 16, range=(0, 1))[0] / u.size, 1 / 16, atol=0.002)
    assert abs(np.corrcoef(u.ravel()[:-1], u.ravel()[1:])[0, 1]) < 0.01  # neighbours independent
    assert np.array_equal(u, np.array(moment_noise((512, 1024), seed)))  # a function of the seed
    other = np.array(moment_noise((512, 1024), mx.array(12346, dtype=mx.uint32)))
    assert abs(np.corrcoef(u.ravel(), other.ravel())[0, 1]) < 0.01


def test_noisy_packing_is_unbiased_and_off_cuda_uses_mlx():
    x = mx.random.normal((4, 128), key=mx.random.key(3)) * 10.0 ** mx.linspace(-3, 0, 128)
    draws = mx.stack([unpack_moment(pack_moment_noisy(x, mx.array(s, dtype=mx.uint32), flip=s % 2 == 1))
                      for s in range(400)])
    step = (x.reshape(4, 2, 64).max(-1) - x.reshape(4, 2, 64).min(-1)) / 255
    assert (mx.abs(draws - x).max(0).reshape(4, 2, 64) <= step[..., None] * 1.01).all().item()  # within a code
    assert (mx.abs(draws.mean(0) - x).reshape(4, 2, 64) < step[..., None] * 0.15).all().item()  # unbiased
    assert int8_moments.probe(x, mx.array(1, dtype=mx.uint32)) == {"choice": "mlx", "reason": "not the CUDA backend"}
    seed = mx.array(7, dtype=mx.uint32)
    ref = pack_moment(x, 1 - moment_noise(x.shape, seed))
    got = pack_moment_noisy(x, seed, flip=True)
    assert all(mx.array_equal(got[k], ref[k]).item() for k in ref)


def test_stochastic_bfloat16_rounding_is_unbiased_and_lands_on_a_neighbour():
    from lfm_mlx.kernels.int8_moments import round_to_bfloat16
    x = mx.random.normal((64, 64), key=mx.random.key(7)) * 0.02  # weights' scale
    draws = mx.stack([round_to_bfloat16(x, mx.array(s, dtype=mx.uint32)) for s in range(600)])
    assert draws.dtype == mx.bfloat16
    exact, values = np.array(x), np.array(draws.astype(mx.float32))
    step = 2.0 ** (np.floor(np.log2(np.abs(exact))) - 7)  # bf16's spacing around each value
    assert (np.abs(values - exact) < step).all() and (np.sign(values) == np.sign(exact)).all()
    assert (np.unique(values.reshape(600, -1), axis=0).shape[0]) > 1  # the draws differ
    nearest = np.abs(np.array(x.astype(mx.bfloat16).astype(mx.float32)) - exact).mean()
    assert np.abs(values.mean(0) - exact).mean() < 0.1 * nearest  # unbiased: the mean converges on x


def test_stochastic_weights_keep_updates_smaller_than_a_bfloat16_step():
    """bf16 weights of 1.0 moving ~1e-4 to 6e-4 a step (bf16's step there is 2^-7): nearest rounding
    never moves them, stochastic rounding follows a float32 master on average."""
    from lfm_mlx.grouped import FusedAdamW
    moved = {}
    for name, dtype, stochastic in (("nearest", mx.bfloat16, False), ("stochastic", mx.bfloat16, True),
                                    ("float32", mx.float32, False)):
        mx.random.seed(0)
        weights = {"w": mx.ones((4096,), dtype=dtype)}
        opt = FusedAdamW(learning_rate=1e-4, stochastic_weights=stochastic)
        for _ in range(20):
            opt.update(weights, {"w": mx.ones((4096,), dtype=mx.bfloat16)})
        assert weights["w"].dtype == dtype
        moved[name] = 1.0 - np.array(weights["w"].astype(mx.float32)).astype(np.float64).mean()
    assert moved["nearest"] == 0.0 and moved["float32"] > 0.005
    assert abs(moved["stochastic"] - moved["float32"]) < 0.03 * moved["float32"]


def test_a_kernel_is_chosen_only_when_identical_and_faster():
    from lfm_mlx.kernels.probe import choose
    assert choose({"kernel_s": 1.0, "mlx_s": 2.0}, 0, "rows")["choice"] == "kernel"
    slower = choose({"kernel_s": 2.0, "mlx_s": 1.0}, 0, "rows")
    assert slower["choice"] == "mlx" and slower["reason"] == "bit-identical, not faster"
    wrong = choose({"kernel_s": 1.0, "mlx_s": 2.0}, 3, "rows")
    assert wrong["choice"] == "mlx" and wrong["reason"] == "3 rows differ from MLX's"

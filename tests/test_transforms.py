"""Gradient transforms: averaging over processes and clipping, one mechanism for every optimizer."""

from __future__ import annotations

import numpy as np

from charrnn.optim import pack
from charrnn.transforms import (
    allreduce_mean,
    chain,
    clip_by_global_norm,
    clip_by_value,
    clipping,
    global_norm,
)
from charrnn.world import ThreadWorld


def grads(rng, scale=5.0):
    return {"W": rng.standard_normal((4, 3)) * scale, "b": rng.standard_normal(3) * scale}


def test_clip_by_value_packed_and_plain_agree_bit_for_bit(rng):
    plain = grads(rng)
    packed = pack(plain)
    clip_by_value(1.5)(plain)
    clip_by_value(1.5)(packed)
    for k in plain:
        assert np.array_equal(plain[k], packed[k])
        assert np.abs(plain[k]).max() <= 1.5


def test_clip_by_global_norm_scales_jointly_and_leaves_small_norms(rng):
    g = grads(rng)
    before = {k: v.copy() for k, v in g.items()}
    norm = global_norm(g)
    clip_by_global_norm(norm / 4)(g)
    assert np.isclose(global_norm(g), norm / 4, rtol=1e-12)
    for k in g:
        np.testing.assert_allclose(g[k], before[k] / 4, rtol=1e-12)
    small = {"a": np.array([0.3, 0.4])}
    clip_by_global_norm(0.5)(small)
    assert np.array_equal(small["a"], [0.3, 0.4])


def test_clipping_is_value_then_norm_and_none_when_off():
    g = {"a": np.array([30.0, 4.0]), "b": np.array([-12.0])}
    clipping(3.0, 2.5)(g)  # clipped: [3, 3], [-3]; norm sqrt(27)
    scale = 2.5 / np.sqrt(27.0)
    np.testing.assert_allclose(g["a"], [3 * scale, 3 * scale], rtol=1e-14)
    np.testing.assert_allclose(g["b"], [-3 * scale], rtol=1e-14)
    assert clipping(None, None) is None and chain(None, None) is None


def test_allreduce_mean_packed_and_unpacked(rng):
    parts = [grads(np.random.default_rng(r)) for r in range(3)]
    expected = {k: (parts[0][k] + parts[1][k] + parts[2][k]) / 3 for k in parts[0]}

    def body(world, packed):
        g = pack(parts[world.rank]) if packed else {k: v.copy() for k, v in parts[world.rank].items()}
        return allreduce_mean(world)(g)

    for packed in (True, False):
        results = ThreadWorld.run(3, lambda world, packed=packed: body(world, packed))
        for out in results:
            for k in expected:
                np.testing.assert_allclose(out[k], expected[k], rtol=1e-15)
        assert all(np.array_equal(results[0][k], results[2][k]) for k in expected)  # same bits on every rank

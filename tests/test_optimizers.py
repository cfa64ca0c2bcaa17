"""The sgd, rmsprop, adam and adamw optimizers, and the clipping the training loop applies for all."""

from __future__ import annotations

import copy
import re

import numpy as np
import pytest

import charrnn.transforms
import charrnn_plugins.optimizers
from charrnn import ConfigError, run_pipeline
from charrnn.optim import pack, pack_views, packed_buffer
from charrnn.transforms import clipping
from charrnn_plugins.adagrad import Adagrad
from charrnn_plugins.optimizers import SGD, Adam, AdamW, RMSprop
from conftest import TINY_TEXT, option_problem

ALL = [Adagrad, SGD, RMSprop, Adam, AdamW]


def fresh(p):
    return {k: v.copy() for k, v in p.items()}


def loop_step(opt, params, grads):
    """What the training loop does: the clipping transform the optimizer's settings ask for, then
    `step` (on a copy of the gradients, packed if they were)."""
    flat = packed_buffer(list(grads.values()))
    g = pack_views(flat.copy(), grads) if flat is not None else fresh(grads)
    transform = clipping(opt.clip, opt.clip_norm)
    opt.step(params, transform(g) if transform is not None else g)


@pytest.mark.parametrize("cls", [Adagrad, SGD, RMSprop, Adam, AdamW])
def test_no_optimizer_clips_on_its_own(cls):
    """Clipping settings are read by the loop; `step` itself never clips (so it cannot clip twice)."""
    g = {"w": np.array([-90.0, -0.5, 0.25, 70.0])}
    a, b = {"w": np.zeros(4)}, {"w": np.zeros(4)}
    cls(clip=1.0, clip_norm=1.0).step(a, fresh(g))
    cls(clip=None, clip_norm=None).step(b, fresh(g))
    assert np.array_equal(a["w"], b["w"])


def test_sgd_plain_step():
    p = {"w": np.array([1.0, -2.0, 0.5])}
    SGD(lr=0.1, clip_norm=None).step(p, {"w": np.array([0.5, 10.0, -0.25])})
    np.testing.assert_allclose(p["w"], [1.0 - 0.05, -2.0 - 1.0, 0.5 + 0.025], rtol=1e-15)


def test_sgd_momentum_and_weight_decay_two_steps():
    lr, mu, wd = 0.1, 0.9, 0.01
    p0, g1, g2 = np.array([1.0, -2.0]), np.array([0.5, 0.25]), np.array([-1.0, 0.75])
    p = {"w": p0.copy()}
    opt = SGD(lr=lr, momentum=mu, weight_decay=wd, clip_norm=None)
    opt.step(p, {"w": g1.copy()})
    buf1 = g1 + wd * p0
    p1 = p0 - lr * buf1
    np.testing.assert_allclose(p["w"], p1, rtol=1e-14)
    opt.step(p, {"w": g2.copy()})
    buf2 = mu * buf1 + (g2 + wd * p1)
    np.testing.assert_allclose(p["w"], p1 - lr * buf2, rtol=1e-14)
    np.testing.assert_allclose(opt.state_dict()["buf.w"], buf2, rtol=1e-14)


def test_sgd_nesterov_two_steps():
    lr, mu = 0.1, 0.9
    p0, g1, g2 = np.array([1.0, -2.0]), np.array([0.5, 0.25]), np.array([-1.0, 0.75])
    p = {"w": p0.copy()}
    opt = SGD(lr=lr, momentum=mu, nesterov=True, clip_norm=None)
    opt.step(p, {"w": g1})
    buf1 = g1
    p1 = p0 - lr * (g1 + mu * buf1)
    np.testing.assert_allclose(p["w"], p1, rtol=1e-14)
    opt.step(p, {"w": g2})
    buf2 = mu * buf1 + g2
    np.testing.assert_allclose(p["w"], p1 - lr * (g2 + mu * buf2), rtol=1e-14)


def test_rmsprop_two_steps():
    lr, decay, eps = 2e-3, 0.95, 1e-8
    p0, g1, g2 = np.array([1.0, -2.0, 0.5]), np.array([0.5, 3.0, -0.25]), np.array([-1.0, 0.0, 2.0])
    p = {"w": p0.copy()}
    opt = RMSprop()
    opt.step(p, {"w": g1})
    cache1 = (1 - decay) * g1**2
    p1 = p0 - lr * g1 / (np.sqrt(cache1) + eps)
    np.testing.assert_allclose(p["w"], p1, rtol=1e-14)
    opt.step(p, {"w": g2})
    cache2 = decay * cache1 + (1 - decay) * g2**2
    np.testing.assert_allclose(p["w"], p1 - lr * g2 / (np.sqrt(cache2) + eps), rtol=1e-14)
    np.testing.assert_allclose(opt.state_dict()["cache.w"], cache2, rtol=1e-14)


def adam_reference(p0, grads, lr, b1=0.9, b2=0.999, eps=1e-8, wd=0.0):
    """Textbook Adam (with AdamW's decoupled decay when wd > 0): the params after each step."""
    p, m, v, out = p0.copy(), np.zeros_like(p0), np.zeros_like(p0), []
    for t, g in enumerate(grads, start=1):
        p = p * (1 - lr * wd)
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g**2
        m_hat, v_hat = m / (1 - b1**t), v / (1 - b2**t)
        p = p - lr * m_hat / (np.sqrt(v_hat) + eps)
        out.append(p)
    return out


def test_adam_two_steps():
    p0, g1, g2 = np.array([1.0, -2.0, 0.5]), np.array([0.5, 3.0, -0.25]), np.array([-1.0, 0.0, 2.0])
    p = {"w": p0.copy()}
    opt = Adam(lr=0.01, clip_norm=None)
    opt.step(p, {"w": g1})
    # first step: m_hat = g, v_hat = g^2, so each entry moves by lr * sign(g) (up to eps)
    np.testing.assert_allclose(p["w"], p0 - 0.01 * g1 / (np.abs(g1) + 1e-8), rtol=1e-14)
    opt.step(p, {"w": g2})
    m = 0.9 * 0.1 * g1 + 0.1 * g2
    v = 0.999 * 0.001 * g1**2 + 0.001 * g2**2
    m_hat, v_hat = m / (1 - 0.9**2), v / (1 - 0.999**2)
    expected = p0 - 0.01 * g1 / (np.abs(g1) + 1e-8) - 0.01 * m_hat / (np.sqrt(v_hat) + 1e-8)
    np.testing.assert_allclose(p["w"], expected, rtol=1e-12)
    state = opt.state_dict()
    assert int(state["t"]) == 2 and set(state) == {"m.w", "v.w", "t"}
    np.testing.assert_allclose(state["m.w"], m, rtol=1e-14)
    np.testing.assert_allclose(state["v.w"], v, rtol=1e-14)


def test_adamw_decays_matrices_only():
    lr, wd = 0.01, 0.5
    W0, b0 = np.array([[1.0, -2.0], [0.5, 3.0]]), np.array([1.0, -1.0])
    gW = [np.array([[0.5, -0.25], [1.0, 2.0]]), np.array([[-1.0, 0.5], [0.0, 1.0]])]
    gb = [np.array([0.3, -0.7]), np.array([0.2, 0.1])]
    p = {"W": W0.copy(), "b": b0.copy()}
    opt = AdamW(lr=lr, weight_decay=wd, clip_norm=None)
    for i in range(2):
        opt.step(p, {"W": gW[i], "b": gb[i]})
        np.testing.assert_allclose(p["W"], adam_reference(W0, gW, lr, wd=wd)[i], rtol=1e-12)
        np.testing.assert_allclose(p["b"], adam_reference(b0, gb, lr)[i], rtol=1e-12)  # no decay


def test_adamw_without_decay_is_adam():
    g = {"W": np.array([[0.5, -0.25], [1.0, 2.0]])}
    pa, pb = {"W": np.ones((2, 2))}, {"W": np.ones((2, 2))}
    Adam().step(pa, g)
    AdamW(weight_decay=0.0).step(pb, g)
    assert np.array_equal(pa["W"], pb["W"])


@pytest.mark.parametrize("cls", ALL)
def test_elementwise_clip(cls):
    p = {"w": np.zeros(4)}
    g = {"w": np.array([-9.0, -0.5, 0.25, 7.0])}
    a, b = cls(clip=1.0, clip_norm=None), cls(clip=None, clip_norm=None)
    pb = {"w": np.zeros(4)}
    loop_step(a, p, g)
    b.step(pb, {"w": np.array([-1.0, -0.5, 0.25, 1.0])})
    assert np.array_equal(p["w"], pb["w"])
    assert np.array_equal(g["w"], [-9.0, -0.5, 0.25, 7.0])  # the caller's gradients are untouched


def test_elementwise_clip_values():
    p = {"w": np.zeros(4)}
    loop_step(SGD(lr=1.0, clip=1.0, clip_norm=None), p, {"w": np.array([-9.0, -0.5, 0.25, 7.0])})
    np.testing.assert_array_equal(p["w"], [1.0, 0.5, -0.25, -1.0])


@pytest.mark.parametrize("cls", ALL)
def test_clip_norm_scales_all_gradients_jointly(cls):
    grads = {"a": np.array([3.0, 4.0]), "b": np.array([[12.0]])}  # global norm 13
    before = copy.deepcopy(grads)
    params = {"a": np.array([1.0, -1.0]), "b": np.array([[0.5]])}
    clipped, reference = fresh(params), fresh(params)
    opt = cls(clip=None, clip_norm=6.5)
    ref = cls(clip=None, clip_norm=None)
    for _ in range(2):
        loop_step(opt, clipped, grads)
        ref.step(reference, {k: g * 0.5 for k, g in grads.items()})
    for k in params:
        np.testing.assert_allclose(clipped[k], reference[k], rtol=1e-14)
        assert np.array_equal(grads[k], before[k])


def test_clip_norm_leaves_small_gradients_alone():
    grads = {"a": np.array([0.3, 0.4])}
    p = {"a": np.zeros(2)}
    loop_step(SGD(lr=1.0, clip_norm=0.5), p, grads)
    np.testing.assert_array_equal(p["a"], [-0.3, -0.4])


def test_clip_then_clip_norm():
    grads = {"a": np.array([30.0, 4.0]), "b": np.array([-12.0])}
    p = {"a": np.zeros(2), "b": np.zeros(1)}
    loop_step(SGD(lr=1.0, clip=3.0, clip_norm=2.5), p, grads)  # clipped: [3, 3], [-3]; norm sqrt(27)
    scale = 2.5 / np.sqrt(27.0)
    np.testing.assert_allclose(p["a"], [-3 * scale, -3 * scale], rtol=1e-14)
    np.testing.assert_allclose(p["b"], [3 * scale], rtol=1e-14)
    assert grads["a"][0] == 30.0 and grads["b"][0] == -12.0


def sequence_of_grads(rng, n):
    return [{"W": rng.standard_normal((3, 2)), "b": rng.standard_normal(2) * 10} for _ in range(n)]


OPTIONS = [
    (Adagrad, {"clip_norm": 3.0}),
    (SGD, {"momentum": 0.9, "nesterov": True, "weight_decay": 0.1}),
    (SGD, {}),
    (RMSprop, {"clip_norm": 3.0}),
    (Adam, {}),
    (AdamW, {"weight_decay": 0.1}),
]


@pytest.mark.parametrize(("cls", "options"), OPTIONS)
def test_state_dict_resume_is_bit_exact(cls, options, rng):
    grads = sequence_of_grads(rng, 6)
    params = {"W": rng.standard_normal((3, 2)), "b": rng.standard_normal(2)}
    a = cls(**options)
    for g in grads[:3]:
        a.step(params, g)
    state = a.state_dict()
    assert all(isinstance(v, np.ndarray) for v in state.values())
    b = cls(**options)
    b.load_state_dict({k: v.copy() for k, v in state.items()})
    pa, pb = params, fresh(params)
    for g in grads[3:]:
        a.step(pa, g)
        b.step(pb, g)
    for k in pa:
        assert np.array_equal(pa[k], pb[k]), k
    for k, v in a.state_dict().items():
        assert np.array_equal(v, b.state_dict()[k]), k


def test_state_dict_of_plain_sgd_is_empty():
    p = {"w": np.ones(2)}
    opt = SGD()
    opt.step(p, {"w": np.ones(2)})
    assert opt.state_dict() == {}
    opt.load_state_dict({})


def test_load_state_dict_rejects_foreign_state():
    with pytest.raises(ValueError, match="unexpected optimizer state 'mem.w'"):
        Adam().load_state_dict({"mem.w": np.zeros(2), "t": np.array(1)})


@pytest.mark.parametrize(
    ("cls", "options"),
    [
        (Adagrad, {"lr": 0.5}),
        (SGD, {"lr": 0.05}),
        (SGD, {"lr": 0.02, "momentum": 0.9}),
        (SGD, {"lr": 0.02, "momentum": 0.9, "nesterov": True}),
        (RMSprop, {"lr": 0.05}),
        (Adam, {"lr": 0.1}),
        (AdamW, {"lr": 0.1}),
    ],
)
def test_loss_decreases_on_toy_quadratic(cls, options):
    curvature = np.array([[1.0, 4.0], [9.0, 0.5]])
    target = np.array([[3.0, -1.0], [2.0, 0.5]])
    p = {"W": np.zeros((2, 2))}
    opt = cls(**options)
    losses = []
    for _ in range(300):
        diff = p["W"] - target
        losses.append(float((curvature * diff**2).sum()))
        opt.step(p, {"W": 2 * curvature * diff})
    assert losses[-1] < 1e-2 * losses[0]


@pytest.mark.parametrize("cls", ALL)
def test_float32_stays_float32(cls):
    p = {"W": np.ones((3, 2), np.float32), "b": np.zeros(2, np.float32)}
    g = {"W": np.full((3, 2), 0.5, np.float32), "b": np.full(2, -0.5, np.float32)}
    opt = cls()
    opt.step(p, g)
    opt.step(p, g)
    assert p["W"].dtype == np.float32 and p["b"].dtype == np.float32
    assert all(v.dtype == np.float32 for k, v in opt.state_dict().items() if k != "t")


@pytest.mark.parametrize("cls", ALL)
def test_lr_is_a_public_float_the_loop_can_set(cls):
    opt = cls(lr=1)
    assert opt.lr == 1.0 and isinstance(opt.lr, float)
    opt.lr = 0.5  # as a schedule does before each step
    pa, pb = {"W": np.ones((2, 2))}, {"W": np.ones((2, 2))}
    g = {"W": np.array([[0.5, -1.0], [2.0, 0.1]])}
    opt.step(pa, g)
    cls(lr=0.5).step(pb, g)
    assert np.array_equal(pa["W"], pb["W"])


@pytest.mark.parametrize(
    ("cls", "options", "message"),
    [
        (SGD, {"lr": -1}, "lr: must be > 0, got -1"),
        (SGD, {"lr": 0}, "lr: must be > 0, got 0"),
        (SGD, {"lr": float("nan")}, "lr: expected a finite number, got nan"),
        (SGD, {"momentum": -0.1}, r"momentum: must be in \[0, 1\), got -0.1"),
        (SGD, {"momentum": 1.0}, r"momentum: must be in \[0, 1\)"),
        (SGD, {"nesterov": True}, "nesterov needs momentum > 0"),
        (SGD, {"nesterov": "yes"}, "nesterov: expected true or false, got 'yes'"),
        (SGD, {"weight_decay": -1e-4}, "weight_decay: must be >= 0"),
        (SGD, {"clip": 0}, "clip: must be > 0, got 0"),
        (SGD, {"clip_norm": -5}, "clip_norm: must be > 0, got -5"),
        (SGD, {"lr": "fast"}, "lr: expected a number, got 'fast'"),
        (RMSprop, {"decay": 1.0}, r"decay: must be in \[0, 1\)"),
        (RMSprop, {"eps": 0}, "eps: must be > 0"),
        (Adam, {"beta1": 1.0}, r"beta1: must be in \[0, 1\)"),
        (Adam, {"beta2": -0.1}, r"beta2: must be in \[0, 1\)"),
        (Adam, {"eps": -1e-8}, "eps: must be > 0"),
        (AdamW, {"weight_decay": -0.01}, "weight_decay: must be >= 0"),
        (AdamW, {"lr": -1}, "lr: must be > 0, got -1"),
        (Adagrad, {"clip_norm": 0}, "clip_norm: must be > 0"),
        (Adagrad, {"clip": -5}, "clip: must be > 0"),
        (Adagrad, {"clip": "5"}, "clip: expected a number or null, got '5'"),
    ],
)
def test_bad_options_are_refused_in_one_wording(cls, options, message):
    assert re.search(message, option_problem(cls, "optimizer", **options))


E2E = {
    "sgd": {"type": "sgd", "lr": 0.2, "momentum": 0.9, "nesterov": True},
    "rmsprop": {"type": "rmsprop", "lr": 0.01},
    "adam": {"type": "adam", "lr": 0.01},
    "adamw": {"type": "adamw", "lr": 0.01},
}


@pytest.mark.parametrize("name", list(E2E))
def test_pipeline_trains_with_each_optimizer(tiny_config, name):
    tiny_config["optimizer"] = E2E[name]
    tiny_config["train"]["steps"] = 200
    result = run_pipeline(tiny_config, plugins=[charrnn_plugins.optimizers])
    assert result.train.train_loss < 0.6 * np.log(len(set(TINY_TEXT)))  # smoothed loss; starts at ~ln V
    assert len(result.text) == 4 + 50


@pytest.mark.parametrize("name", list(E2E))
def test_pipeline_default_options_learn(tiny_config, name):
    tiny_config["optimizer"] = {"type": name}
    tiny_config["stages"] = ["train"]
    tiny_config["train"]["steps"] = 200
    result = run_pipeline(tiny_config, plugins=[charrnn_plugins.optimizers])
    assert result.train.train_loss < np.log(len(set(TINY_TEXT)))


def test_pipeline_schedule_sets_lr_and_options_are_typed(tiny_config):
    tiny_config["optimizer"] = {"type": "adamw", "clip_norm": None, "clip": 1}
    tiny_config["schedule"] = {"type": "cosine", "warmup_steps": 5}
    tiny_config["stages"] = ["train"]
    assert np.isfinite(run_pipeline(tiny_config, plugins=[charrnn_plugins.optimizers]).train.train_loss)
    tiny_config["optimizer"] = {"type": "adam", "beta1": "high"}
    with pytest.raises(ConfigError, match="optimizer.beta1: expected a number, got 'high'"):
        run_pipeline(tiny_config, plugins=[charrnn_plugins.optimizers])
    tiny_config["optimizer"] = {"type": "sgd", "momentun": 0.9}
    with pytest.raises(ConfigError, match="did you mean 'momentum'"):
        run_pipeline(tiny_config, plugins=[charrnn_plugins.optimizers])


# -- packed parameters: one flat buffer, a few calls per step ------------------------------


def packed_pair(rng, dtype=np.float64):
    """Parameters and gradient sequence, as plain dicts and as packed views of flat buffers."""
    params = {"W": rng.standard_normal((4, 3)), "U": rng.standard_normal((3, 3)), "b": rng.standard_normal(3)}
    grads = [{k: rng.standard_normal(v.shape) * 4 for k, v in params.items()} for _ in range(5)]
    return {k: v.astype(dtype) for k, v in params.items()}, [
        {k: v.astype(dtype) for k, v in g.items()} for g in grads
    ]


@pytest.mark.parametrize(("cls", "options"), [*OPTIONS, (Adagrad, {}), (RMSprop, {}), (Adam, {"clip": 0.5})])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_packed_updates_are_bit_identical_to_per_parameter_ones(cls, options, dtype, rng):
    params, grads = packed_pair(rng, dtype)
    plain, packed = fresh(params), pack(params)
    packed_grads = pack(grads[0])
    a, b = cls(**options), cls(**options)
    for g in grads:
        for k, v in g.items():
            packed_grads[k][...] = v
        loop_step(a, plain, g)
        loop_step(b, packed, packed_grads)
        for k in plain:
            assert np.array_equal(plain[k], packed[k]), k
    for name in b.state_names:  # after `step` (not a direct `slots` call): the state is one flat buffer
        assert packed_buffer(list(b.state[name].values())) is not None, name
        assert packed_buffer(list(a.state[name].values())) is None, name
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert np.array_equal(sa[k], sb[k]), k


@pytest.mark.parametrize(("cls", "options"), OPTIONS)
def test_state_moves_between_packed_and_per_parameter_runs(cls, options, rng):
    """A checkpoint's per-parameter state loads into a packed run (and back) bit-exactly."""
    params, grads = packed_pair(rng)
    a = cls(**options)
    plain = fresh(params)
    for g in grads[:2]:
        a.step(plain, g)
    b = cls(**options)
    b.load_state_dict({k: v.copy() for k, v in a.state_dict().items()})
    packed, packed_grads = pack(plain), pack(grads[2])
    b.step(packed, packed_grads)
    a.step(plain, grads[2])
    c = cls(**options)
    c.load_state_dict({k: v.copy() for k, v in b.state_dict().items()})
    for g in grads[3:]:
        a.step(plain, g)
        c.step(packed, pack(g))  # fresh gradient buffers each step: the layout is found again
    for k in plain:
        assert np.array_equal(plain[k], packed[k]), k


def test_packed_buffer_only_accepts_consecutive_views_without_gaps():
    flat = np.arange(10.0)
    a, b = flat[:4].reshape(2, 2), flat[4:10]
    assert packed_buffer([a, b]) is flat
    assert packed_buffer([b, a]) is None  # out of order
    assert packed_buffer([a, flat[5:10]]) is None  # a gap
    assert packed_buffer([a, flat[4:9]]) is None  # does not cover the buffer
    assert packed_buffer([a, np.zeros(6)]) is None  # another buffer
    assert packed_buffer([np.zeros(3)]) is None  # owns its memory
    assert packed_buffer([flat[::2]]) is None  # not contiguous
    assert packed_buffer([]) is None


def test_weights_replaced_by_other_arrays_fall_back_to_per_parameter_updates(rng):
    params, grads = packed_pair(rng)
    packed = pack(params)
    opt = Adagrad()
    opt.step(packed, pack(grads[0]))
    packed["W"] = packed["W"].copy()  # no longer a view of the flat buffer
    assert [s.key for s in opt.slots(packed, pack(grads[1]))] == list(packed)


def clip_by_hand(grads, clip, clip_norm):
    """Elementwise clip, then one global-norm rescale: the reference for every optimizer."""
    out = {k: np.clip(g, -clip, clip) if clip is not None else g.copy() for k, g in grads.items()}
    if clip_norm is not None:
        norm = np.sqrt(sum(float((g**2).sum()) for g in out.values()))
        if norm > clip_norm:
            out = {k: g * (clip_norm / norm) for k, g in out.items()}
    return out


STEP_OPTIONS = [
    (Adagrad, {"clip": 0.5, "clip_norm": 2.0}),
    (SGD, {"momentum": 0.9, "clip": 0.5, "clip_norm": 2.0}),
    (RMSprop, {"clip": 0.5, "clip_norm": 2.0}),
    (Adam, {"clip_norm": 2.0}),
    (Adam, {"clip": 0.5, "clip_norm": 2.0}),
    (AdamW, {"clip": 0.5, "clip_norm": 2.0}),
]


@pytest.mark.parametrize(("cls", "options"), STEP_OPTIONS)
def test_step_clips_packed_gradients_once_and_stays_packed(cls, options, rng, monkeypatch):
    """The loop's clipping engages, runs exactly once per step, and the update stays on the flat buffers."""
    params, grads = packed_pair(rng)
    packed = pack(params)
    reference, ref = fresh(params), cls(**{**options, "clip": None, "clip_norm": None})
    opt = cls(**options)
    calls = []
    norm = charrnn.transforms.global_norm  # the global norm is computed once per clipping
    monkeypatch.setattr(charrnn.transforms, "global_norm", lambda g: calls.append(1) or norm(g))
    for i, g in enumerate(grads[:3], start=1):
        by_hand = clip_by_hand(g, options.get("clip"), options["clip_norm"])
        assert not all(np.array_equal(by_hand[k], g[k]) for k in g)  # clipping engages
        loop_step(opt, packed, pack(g))
        ref.step(reference, by_hand)
        assert len(calls) == i  # one clipping per step
        for k in params:
            np.testing.assert_allclose(packed[k], reference[k], rtol=1e-13, atol=1e-15)
    for name in opt.state_names:  # the state lives in one flat buffer: the packed update was used
        assert packed_buffer(list(opt.state[name].values())) is not None, name
    for k, v in ref.state_dict().items():
        np.testing.assert_allclose(opt.state_dict()[k], v, rtol=1e-13, atol=1e-15)

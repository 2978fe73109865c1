"""Prediction kinds and their conversions, the Denoiser value, guidance, thresholding and time labels."""
import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models import analytic
from solvers import predictions, schedules
from solvers.predictions import Denoiser, Guided, Thresholded, convert, dynamic_threshold

KINDS = predictions.PREDICTION_KINDS

SCHEDULES = {
    "vp_linear": (schedules.VPLinear(), (0.01, 0.3, 0.9)),
    "vp_cosine": (schedules.VPCosine(), (0.02, 0.5, 0.95)),
    "discrete_sd": (schedules.DiscreteVP.named("scaled_linear", 1000, 0.00085, 0.012), (3.3, 420.5, 987.25)),
    "ve": (schedules.VE(), (0.05, 0.5, 1.0)),
    "edm": (schedules.EDM(), (0.01, 1.0, 40.0)),
    "flow": (schedules.Flow(), (0.05, 0.5, 0.95)),
}
CASES = [(name, t) for name, (_, ts) in SCHEDULES.items() for t in ts]


def _fd_derivatives(schedule, t, h=1e-6):
  scale = max(1.0, abs(t))
  hh = h * scale
  ta, tb = jnp.asarray(t + hh), jnp.asarray(t - hh)
  if isinstance(schedule, schedules.Flow):  # exact: alpha = 1 - t, sigma = t
    return -1.0, 1.0
  dalpha = (float(schedule.alpha(ta)) - float(schedule.alpha(tb))) / (2 * hh)
  dsigma = (float(schedule.sigma(ta)) - float(schedule.sigma(tb))) / (2 * hh)
  return dalpha, dsigma


def _truth(schedule, t, seed=0, shape=(3, 4)):
  """Independent ground truth: each kind written from its definition for a random (x0, eps)."""
  k1, k2 = jax.random.split(jax.random.key(seed))
  x0 = jax.random.normal(k1, shape, jnp.float64)
  eps = jax.random.normal(k2, shape, jnp.float64)
  alpha, sigma = float(schedule.alpha(jnp.asarray(t))), float(schedule.sigma(jnp.asarray(t)))
  dalpha, dsigma = _fd_derivatives(schedule, t)
  x = alpha * x0 + sigma * eps
  values = {"eps": eps, "x0": x0, "score": -eps / sigma, "v": alpha * eps - sigma * x0,
            "velocity": dalpha * x0 + dsigma * eps}
  return x, values


def _close(actual, expected, rtol):
  expected = np.asarray(expected)
  np.testing.assert_allclose(actual, expected, rtol=rtol, atol=rtol * np.max(np.abs(expected)))


@pytest.mark.parametrize("name,t", CASES)
def test_convert_matches_definitions_for_every_pair(name, t):
  schedule = SCHEDULES[name][0]
  x, truth = _truth(schedule, t)
  for src, dst in itertools.product(KINDS, KINDS):
    # the finite-difference derivative limits velocity to ~1e-7 relative; everything else is exact
    rtol = 1e-6 if "velocity" in (src, dst) and name != "flow" else 1e-9
    _close(convert(truth[src], src, dst, x, jnp.asarray(t), schedule), truth[dst], rtol)


@pytest.mark.parametrize("name,t", CASES)
def test_convert_round_trips_every_pair(name, t):
  schedule = SCHEDULES[name][0]
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.normal(size=(2, 5)))
  for src, dst in itertools.product(KINDS, KINDS):
    out = jnp.asarray(rng.normal(size=(2, 5)))
    back = convert(convert(out, src, dst, x, jnp.asarray(t), schedule), dst, src, x, jnp.asarray(t), schedule)
    _close(back, out, 1e-9)


def test_flow_velocity_is_eps_minus_x0():
  schedule = schedules.Flow()
  x, truth = _truth(schedule, 0.3)
  _close(convert(truth["eps"], "eps", "velocity", x, jnp.asarray(0.3), schedule), truth["eps"] - truth["x0"], 1e-12)


def test_to_from_x0_eps_are_inverse():
  rng = np.random.default_rng(2)
  x0, eps = rng.normal(size=4), rng.normal(size=4)
  alpha, sigma, dalpha, dsigma = 0.8, 0.6, -0.3, 0.4
  x = alpha * x0 + sigma * eps
  for kind in KINDS:
    out = predictions.from_x0_eps(kind, x0, eps, alpha, sigma, dalpha, dsigma)
    got_x0, got_eps = predictions.to_x0_eps(kind, out, x, alpha, sigma, dalpha, dsigma)
    np.testing.assert_allclose(got_x0, x0, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(got_eps, eps, rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------- the analytic oracle in every kind


@pytest.mark.parametrize("oracle_name", ["gaussian", "gmm"])
@pytest.mark.parametrize("name,t", [("vp_linear", 0.3), ("discrete_sd", 420.5), ("edm", 1.0), ("flow", 0.5)])
def test_oracle_denoisers_agree_in_every_kind(oracle_name, name, t):
  schedule = SCHEDULES[name][0]
  oracle = analytic.gaussian(dim=3, seed=1) if oracle_name == "gaussian" else analytic.gmm(dim=3, seed=1)
  alpha, sigma = schedule.alpha(jnp.asarray(t)), schedule.sigma(jnp.asarray(t))
  x = oracle.sample(jax.random.key(5), 4, alpha, sigma)
  x0_true, eps_true = oracle.x0_eps(x, alpha, sigma)
  # the oracle's own pair is consistent with x
  _close(alpha * x0_true + sigma * eps_true, x, 1e-12)
  for dst in KINDS:
    outs = [oracle.denoiser(schedule, prediction=src).predict(dst, x, jnp.asarray(t), schedule) for src in KINDS]
    rtol = 1e-6 if dst == "velocity" else 1e-9
    for src, out in zip(KINDS, outs):
      _close(out, outs[0], rtol)
    if dst == "x0":
      _close(outs[0], x0_true, 1e-9)
    if dst == "eps":
      _close(outs[0], eps_true, 1e-9)


def test_gaussian_oracle_x0_is_the_posterior_mean():
  oracle = analytic.Gaussian(mean=jnp.asarray([0.5, -1.0]), std=jnp.asarray([2.0, 0.5]))
  alpha, sigma = 0.6, 0.8
  x = jnp.asarray([[1.0, 0.0]])
  # E[x0 | x] = mean + alpha std^2 (x - alpha mean) / (alpha^2 std^2 + sigma^2), by hand:
  expected = [0.5 + 0.6 * 4.0 * (1.0 - 0.3) / (0.36 * 4.0 + 0.64),
              -1.0 + 0.6 * 0.25 * (0.0 + 0.6) / (0.36 * 0.25 + 0.64)]
  np.testing.assert_allclose(oracle.x0(x, alpha, sigma)[0], expected, rtol=1e-12)


def test_float32_sample_gives_float32_prediction_with_float64_schedule():
  schedule = SCHEDULES["discrete_sd"][0]
  oracle = analytic.gaussian(dim=3, seed=2)
  x64 = oracle.sample(jax.random.key(0), 2, schedule.alpha(jnp.asarray(500.0)), schedule.sigma(jnp.asarray(500.0)))
  x32 = x64.astype(jnp.float32)
  den = oracle.denoiser(schedule, "eps")
  out32 = den.predict("x0", x32, jnp.asarray(500.0), schedule)
  assert out32.dtype == jnp.float32
  assert schedule.lam_table.dtype == jnp.float64
  np.testing.assert_allclose(out32, den.predict("x0", x64, jnp.asarray(500.0), schedule), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- a toy conditional network


def _eps_net(params, x, label, cond):
  return jnp.tanh(params["w"] * x + params["b"] * label) + cond


def _x0_net(params, x, label, cond):
  """The same network written as a data prediction (label = t, the schedule rides in params)."""
  schedule = params["schedule"]
  alpha, sigma = schedule.alpha(label), schedule.sigma(label)
  return (x - sigma * _eps_net(params, x, label, cond)) / alpha


def _v_net(params, x, label, cond):
  schedule = params["schedule"]
  alpha, sigma = schedule.alpha(label), schedule.sigma(label)
  eps = _eps_net(params, x, label, cond)
  x0 = (x - sigma * eps) / alpha
  return alpha * eps - sigma * x0


SCHED = schedules.VPLinear()
PARAMS = {"w": jnp.asarray(0.7), "b": jnp.asarray(-0.4), "schedule": SCHED}
COND = jnp.asarray([0.3, -0.2, 0.5])
UNCOND = jnp.zeros(3)
X = jnp.asarray(np.random.default_rng(3).normal(size=(2, 3)))
T = jnp.asarray(0.4)


def _inner(apply_fn=_eps_net, prediction="eps"):
  return Denoiser(apply_fn=apply_fn, params=PARAMS, prediction=prediction)


@pytest.mark.parametrize("kind", KINDS)
def test_guidance_scale_one_is_conditional_and_zero_unconditional(kind):
  inner = _inner()
  cond_out = inner.replace(cond=COND).predict(kind, X, T, SCHED)
  uncond_out = inner.replace(cond=UNCOND).predict(kind, X, T, SCHED)
  assert not np.allclose(cond_out, uncond_out)  # the toy network does use cond
  g1 = Guided(inner=inner, cond=COND, uncond=UNCOND, scale=1.0).predict(kind, X, T, SCHED)
  g0 = Guided(inner=inner, cond=COND, uncond=UNCOND, scale=0.0).predict(kind, X, T, SCHED)
  np.testing.assert_allclose(g1, cond_out, rtol=1e-12, atol=1e-12)
  np.testing.assert_array_equal(g0, uncond_out)


def test_guidance_formula_and_affine_invariance():
  scale = 3.5
  eps_c = _eps_net(PARAMS, X, T, COND)
  eps_u = _eps_net(PARAMS, X, T, UNCOND)
  eps_g = eps_u + scale * (eps_c - eps_u)
  alpha, sigma = SCHED.alpha(T), SCHED.sigma(T)
  x0_expected = (X - sigma * eps_g) / alpha
  results = {}
  for apply_fn, prediction in ((_eps_net, "eps"), (_x0_net, "x0"), (_v_net, "v")):
    g = Guided(inner=_inner(apply_fn, prediction), cond=COND, uncond=UNCOND, scale=scale)
    results[prediction] = g.predict("x0", X, T, SCHED)
    np.testing.assert_allclose(g.predict("eps", X, T, SCHED), eps_g, rtol=1e-10, atol=1e-10)
  for prediction, x0 in results.items():
    np.testing.assert_allclose(x0, x0_expected, rtol=1e-10, atol=1e-10, err_msg=prediction)


def test_guidance_scale_is_a_leaf_new_scales_do_not_retrace():
  traces = []

  def f(g, x):
    traces.append(1)
    return g.predict("x0", x, T, SCHED)

  f = jax.jit(f)
  g = Guided(inner=_inner(), cond=COND, uncond=UNCOND, scale=1.0)
  a = f(g, X)
  b = f(g.replace(scale=4.0), X)
  assert len(traces) == 1
  assert not np.allclose(a, b)


# ---------------------------------------------------------------- thresholding


A = [0.5, -3.0, 2.0, 1.0, -0.2]   # quantile(|A|, 1) = 3
B = [0.1, -0.4, 0.3, 0.2, 0.05]   # quantile(|B|, 1) = 0.4
X0 = jnp.asarray([A, B])


def test_imagen_threshold_max_val_is_a_floor():
  a, b = np.asarray(A), np.asarray(B)
  out = dynamic_threshold(X0, ratio=1.0, max_val=1.0, semantics="imagen")
  np.testing.assert_allclose(out, [a / 3.0, b], rtol=1e-14)  # s_A = 3; s_B = max(0.4, 1) = 1
  out = dynamic_threshold(X0, ratio=1.0, max_val=2.0, semantics="imagen")
  np.testing.assert_allclose(out, [a / 3.0, b / 2.0], rtol=1e-14)  # s_B = max(0.4, 2) = 2


def test_diffusers_threshold_max_val_is_a_ceiling():
  b = np.asarray(B)
  # default max_val = 1: s = clip(q, 1, 1) = 1, plain clipping to [-1, 1]
  out = dynamic_threshold(X0, ratio=1.0, max_val=1.0, semantics="diffusers")
  np.testing.assert_allclose(out, [[0.5, -1.0, 1.0, 1.0, -0.2], b], rtol=1e-14)
  out = dynamic_threshold(X0, ratio=0.5, semantics="diffusers")
  np.testing.assert_allclose(out, np.clip(np.asarray(X0), -1, 1), rtol=1e-14)
  # max_val = 2: s_A = clip(3, 1, 2) = 2, s_B = clip(0.4, 1, 2) = 1
  out = dynamic_threshold(X0, ratio=1.0, max_val=2.0, semantics="diffusers")
  np.testing.assert_allclose(out, [[0.25, -1.0, 1.0, 0.5, -0.1], b], rtol=1e-14)


def test_threshold_quantile_is_per_sample_and_interpolated():
  rng = np.random.default_rng(4)
  x0 = rng.normal(size=(3, 2, 4, 4)) * np.array([0.5, 2.0, 4.0])[:, None, None, None]
  for semantics, max_val in (("imagen", 1.0), ("diffusers", 2.5)):
    out = np.asarray(dynamic_threshold(jnp.asarray(x0), ratio=0.9, max_val=max_val, semantics=semantics))
    for i in range(3):
      q = np.quantile(np.abs(x0[i]).ravel(), 0.9)  # linear interpolation, as torch.quantile
      s = max(q, max_val) if semantics == "imagen" else min(max(q, 1.0), max_val)
      np.testing.assert_allclose(out[i], np.clip(x0[i], -s, s) / s, rtol=1e-12)
  # batch_ndim = 2: the quantile is taken per (i, j)
  out = np.asarray(dynamic_threshold(jnp.asarray(x0), ratio=1.0, max_val=0.0, batch_ndim=2))
  np.testing.assert_allclose(np.max(np.abs(out), axis=(2, 3)), 1.0, rtol=1e-12)


def test_threshold_keeps_dtype():
  out = dynamic_threshold(X0.astype(jnp.float32), ratio=0.9, max_val=1.0)
  assert out.dtype == jnp.float32


@pytest.mark.parametrize("semantics", predictions.THRESHOLD_SEMANTICS)
def test_thresholded_denoiser(semantics):
  inner = _inner().replace(cond=COND)
  x = 3.0 * X
  td = Thresholded(inner=inner, ratio=0.8, max_val=1.5, semantics=semantics)
  raw_x0 = inner.predict("x0", x, T, SCHED)
  expected_x0 = dynamic_threshold(raw_x0, 0.8, 1.5, semantics)
  assert not np.allclose(expected_x0, raw_x0)  # the thresholding does act here
  np.testing.assert_allclose(td.predict("x0", x, T, SCHED), expected_x0, rtol=1e-12)
  # other kinds are the thresholded x0 converted back
  alpha, sigma = SCHED.alpha(T), SCHED.sigma(T)
  np.testing.assert_allclose(td.predict("eps", x, T, SCHED), (x - alpha * expected_x0) / sigma, rtol=1e-10)


# ---------------------------------------------------------------- time labels


def _label_echo(params, x, label, cond):
  return jnp.zeros_like(x) + label


@pytest.mark.parametrize("label,expected", [
    ("t", lambda s, t: t),
    ("t999", lambda s, t: 999.0 * t),
    ("t1000", lambda s, t: 1000.0 * t),
    ("rho", lambda s, t: float(s.sigma(jnp.asarray(t)) / s.alpha(jnp.asarray(t)))),
    ("edm_c_noise", lambda s, t: 0.25 * math.log(float(s.sigma(jnp.asarray(t)) / s.alpha(jnp.asarray(t))))),
    ("lambda", lambda s, t: math.log(float(s.alpha(jnp.asarray(t)) / s.sigma(jnp.asarray(t))))),
])
def test_time_labels(label, expected):
  for schedule, t in ((SCHED, 0.37), (schedules.EDM(), 2.5), (SCHEDULES["discrete_sd"][0], 321.0)):
    den = Denoiser(apply_fn=_label_echo, time_label=label)
    got = den.raw(jnp.zeros((2,)), jnp.asarray(t), schedule)
    np.testing.assert_allclose(got, expected(schedule, t), rtol=1e-12)


def test_time_labels_by_hand():
  edm = schedules.EDM()
  den = Denoiser(apply_fn=_label_echo, time_label="edm_c_noise")
  assert float(den.raw(jnp.zeros(1), jnp.asarray(80.0), edm)[0]) == pytest.approx(0.25 * math.log(80.0), rel=1e-14)
  den = Denoiser(apply_fn=_label_echo, time_label="t999")
  assert float(den.raw(jnp.zeros(1), jnp.asarray(1.0), SCHED)[0]) == pytest.approx(999.0)
  den = Denoiser(apply_fn=_label_echo, time_label="lambda")
  assert float(den.raw(jnp.zeros(1), jnp.asarray(0.5), schedules.Flow())[0]) == pytest.approx(0.0, abs=1e-15)


def _custom_label(schedule, t):
  return 7.0 * t + 1.0


def test_callable_time_label():
  den = Denoiser(apply_fn=_label_echo, time_label=_custom_label)
  np.testing.assert_allclose(den.raw(jnp.zeros(3), jnp.asarray(0.5), SCHED), 4.5)


# ---------------------------------------------------------------- errors


def _wrong_shape(params, x, label, cond):
  return x[..., :-1]


def test_unknown_kinds_and_labels_raise_naming_the_value():
  with pytest.raises(ValueError, match="noise"):
    Denoiser(apply_fn=_eps_net, prediction="noise")
  with pytest.raises(ValueError, match="epsilon"):
    _inner().replace(cond=COND).predict("epsilon", X, T, SCHED)
  with pytest.raises(ValueError, match="sample"):
    convert(X, "sample", "eps", X, T, SCHED)
  with pytest.raises(ValueError, match="flow_prediction"):
    convert(X, "eps", "flow_prediction", X, T, SCHED)
  with pytest.raises(ValueError, match="sigma999"):
    Denoiser(apply_fn=_eps_net, time_label="sigma999")
  with pytest.raises(ValueError, match="torch"):
    dynamic_threshold(X0, semantics="torch")
  with pytest.raises(ValueError, match="torch"):
    Thresholded(inner=_inner(), semantics="torch")
  with pytest.raises(ValueError, match="x_start"):
    Guided(inner=_inner(), cond=COND, uncond=UNCOND).predict("x_start", X, T, SCHED)


def test_output_shape_mismatch_raises_naming_both_shapes():
  den = Denoiser(apply_fn=_wrong_shape)
  with pytest.raises(ValueError, match=r"\(2, 2\).*\(2, 3\)"):
    den.predict("eps", X, T, SCHED)

"""Noise schedules: closed forms, inverses, derivatives, discrete tables and their interpolation, dtypes."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from solvers import schedules

N_TRAIN = 1000


def _discrete(beta_schedule, interpolation):
  if beta_schedule == "scaled_linear":
    return schedules.DiscreteVP.named("scaled_linear", N_TRAIN, 0.00085, 0.012, interpolation=interpolation)
  return schedules.DiscreteVP.named(beta_schedule, N_TRAIN, interpolation=interpolation)


SCHEDULE_FACTORIES = {
    "vp_linear": schedules.VPLinear,
    "vp_cosine": schedules.VPCosine,
    "ve": schedules.VE,
    "edm": schedules.EDM,
    "flow": schedules.Flow,
}
for _beta in schedules.BETA_SCHEDULES:
  for _interp in schedules.INTERPOLATIONS:
    SCHEDULE_FACTORIES[f"discrete_{_beta}_{_interp}"] = (lambda b=_beta, i=_interp: _discrete(b, i))

ALL = sorted(SCHEDULE_FACTORIES)
VP = [name for name in ALL if name.startswith(("vp_", "discrete_"))]
DISCRETE = [name for name in ALL if name.startswith("discrete_")]
_CACHE = {}


def _schedule(name):
  if name not in _CACHE:
    _CACHE[name] = SCHEDULE_FACTORIES[name]()
  return _CACHE[name]


def _interior_times(schedule, n=401):
  """Times spanning the schedule's range where lambda is finite (Flow has lambda = -inf at t = 1)."""
  hi = min(schedule.t_max, 0.999) if isinstance(schedule, schedules.Flow) else schedule.t_max
  return np.linspace(schedule.t_min, hi, n)


def _fractional_times(schedule, n=64, seed=0):
  """Random times strictly inside the range, away from the integer knots of discrete schedules."""
  rng = np.random.default_rng(seed)
  lo, hi = schedule.t_min, min(schedule.t_max, 0.999) if isinstance(schedule, schedules.Flow) else schedule.t_max
  t = rng.uniform(lo, hi, n)
  if isinstance(schedule, schedules.DiscreteVP):
    t = np.floor(t) + rng.uniform(0.1, 0.9, n)
    t = np.clip(t, 0.1, schedule.t_max - 0.1)
  return t


# ---------------------------------------------------------------- inverse, identities, monotonicity


@pytest.mark.parametrize("name", ALL)
def test_t_lambda_round_trip(name):
  s = _schedule(name)
  t = np.concatenate([_interior_times(s), _fractional_times(s)])
  lam = s.lam(jnp.asarray(t))
  assert np.all(np.isfinite(np.asarray(lam)))
  back = np.asarray(s.t_of_lambda(lam))
  np.testing.assert_allclose(back, t, rtol=0, atol=1e-10 * max(1.0, s.t_max))


@pytest.mark.parametrize("name", ALL)
def test_lambda_is_log_alpha_minus_log_sigma_and_rho(name):
  s = _schedule(name)
  t = jnp.asarray(_fractional_times(s))
  np.testing.assert_allclose(s.lam(t), np.log(np.asarray(s.alpha(t))) - np.log(np.asarray(s.sigma(t))),
                             rtol=1e-12, atol=1e-12)
  np.testing.assert_allclose(s.rho(t), np.asarray(s.sigma(t)) / np.asarray(s.alpha(t)), rtol=1e-12)
  np.testing.assert_allclose(s.t_of_rho(s.rho(t)), t, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("name", VP)
def test_vp_alpha_sq_plus_sigma_sq_is_one(name):
  s = _schedule(name)
  t = jnp.asarray(np.concatenate([_interior_times(s), _fractional_times(s)]))
  np.testing.assert_allclose(s.alpha(t) ** 2 + s.sigma(t) ** 2, 1.0, rtol=0, atol=1e-13)


@pytest.mark.parametrize("name", ["ve", "edm"])
def test_variance_exploding_alpha_is_one(name):
  s = _schedule(name)
  t = jnp.asarray(_interior_times(s))
  np.testing.assert_array_equal(s.alpha(t), 1.0)


def test_flow_alpha_sigma_are_one_minus_t_and_t():
  s = schedules.Flow()
  t = jnp.asarray([0.001, 0.3, 0.5, 0.9, 0.999])
  np.testing.assert_allclose(s.alpha(t), 1 - np.asarray(t), rtol=1e-14)
  np.testing.assert_allclose(s.sigma(t), np.asarray(t), rtol=1e-14)
  assert float(s.lam(jnp.asarray(0.5))) == 0.0
  assert float(s.lam(jnp.asarray(1.0))) == -np.inf


def test_ve_and_edm_sigma_closed_forms():
  ve = schedules.VE(sigma_min=0.01, sigma_max=50.0)
  np.testing.assert_allclose(ve.sigma(jnp.asarray([0.0, 0.5, 1.0])), [0.01, math.sqrt(0.01 * 50.0), 50.0],
                             rtol=1e-13)
  edm = schedules.EDM()
  np.testing.assert_allclose(edm.sigma(jnp.asarray([0.002, 1.0, 80.0])), [0.002, 1.0, 80.0], rtol=1e-14)


@pytest.mark.parametrize("name", ALL)
def test_alpha_sigma_of_lambda_matches_alpha_sigma_of_t(name):
  s = _schedule(name)
  t = jnp.asarray(np.concatenate([_interior_times(s, 101), _fractional_times(s)]))
  alpha, sigma = s.alpha_sigma_of_lambda(s.lam(t))
  np.testing.assert_allclose(alpha, s.alpha(t), rtol=1e-11, atol=1e-14)
  np.testing.assert_allclose(sigma, s.sigma(t), rtol=1e-11, atol=1e-14)


@pytest.mark.parametrize("name", ALL)
def test_alpha_sigma_at_infinite_lambda_is_clean_data(name):
  alpha, sigma = _schedule(name).alpha_sigma_of_lambda(jnp.asarray(jnp.inf))
  assert float(alpha) == 1.0 and float(sigma) == 0.0


@pytest.mark.parametrize("name", ALL)
def test_lambda_strictly_decreasing(name):
  s = _schedule(name)
  t = np.sort(np.concatenate([_interior_times(s, 3001), _fractional_times(s)]))
  lam = np.asarray(s.lam(jnp.asarray(t)))
  assert np.all(np.diff(lam) < 0)


# ---------------------------------------------------------------- derivatives


@pytest.mark.parametrize("name", ALL)
def test_derivatives_match_finite_differences(name):
  s = _schedule(name)
  t = _fractional_times(s, n=16, seed=1)
  h = 1e-6 * max(1.0, s.t_max)  # discrete times stay >= 0.1 from a knot, so t +- h stays in one segment
  dalpha, dsigma = s.derivatives(jnp.asarray(t))
  fd_alpha = (np.asarray(s.alpha(jnp.asarray(t + h))) - np.asarray(s.alpha(jnp.asarray(t - h)))) / (2 * h)
  fd_sigma = (np.asarray(s.sigma(jnp.asarray(t + h))) - np.asarray(s.sigma(jnp.asarray(t - h)))) / (2 * h)
  scale_a = np.max(np.abs(fd_alpha)) + 1e-300
  scale_s = np.max(np.abs(fd_sigma))
  np.testing.assert_allclose(dalpha, fd_alpha, rtol=1e-6, atol=1e-6 * scale_a)
  np.testing.assert_allclose(dsigma, fd_sigma, rtol=1e-6, atol=1e-6 * scale_s)


def test_vp_linear_derivative_closed_form():
  s = schedules.VPLinear()
  t = jnp.asarray([0.01, 0.25, 0.5, 1.0])
  dlog_alpha = -0.5 * (20.0 - 0.1) * np.asarray(t) - 0.05
  dalpha, dsigma = s.derivatives(t)
  alpha, sigma = np.asarray(s.alpha(t)), np.asarray(s.sigma(t))
  np.testing.assert_allclose(dalpha, alpha * dlog_alpha, rtol=1e-12)
  np.testing.assert_allclose(dsigma, -alpha * alpha * dlog_alpha / sigma, rtol=1e-12)  # d(alpha^2+sigma^2)=0


# ---------------------------------------------------------------- closed forms


def test_vp_linear_log_alpha_closed_form():
  s = schedules.VPLinear(beta_min=0.1, beta_max=20.0)
  # log alpha(t) = -(19.9) t^2 / 4 - 0.05 t, by hand:
  expected = {0.0: 0.0, 0.5: -1.24375 - 0.025, 1.0: -4.975 - 0.05, 0.2: -0.199 - 0.01}
  for t, value in expected.items():
    assert float(s.log_alpha(jnp.asarray(t))) == pytest.approx(value, abs=1e-13)
  # and the inverse from the spec's formula at lambda = 0 (alpha^2 = 1/2, L = log 2)
  big_l = math.log(2.0)
  t0 = 2 * big_l / (math.sqrt(0.1**2 + 2 * 19.9 * big_l) + 0.1)
  assert float(s.t_of_lambda(jnp.asarray(0.0))) == pytest.approx(t0, abs=1e-14)
  assert float(s.lam(jnp.asarray(t0))) == pytest.approx(0.0, abs=1e-13)


def test_vp_cosine_log_alpha_closed_form():
  s = schedules.VPCosine()
  for t in (0.0, 0.3, 0.7, 0.9946):
    expected = math.log(math.cos((t + 0.008) / 1.008 * math.pi / 2)) - math.log(math.cos(0.008 / 1.008 * math.pi / 2))
    assert float(s.log_alpha(jnp.asarray(t))) == pytest.approx(expected, abs=1e-13)


# ---------------------------------------------------------------- discrete tables


def _numpy_betas(beta_schedule, n=N_TRAIN):
  if beta_schedule == "linear":
    return np.linspace(1e-4, 0.02, n)
  if beta_schedule == "scaled_linear":
    return np.linspace(math.sqrt(0.00085), math.sqrt(0.012), n) ** 2
  out = []
  for i in range(n):
    a1 = math.cos((i / n + 0.008) / 1.008 * math.pi / 2) ** 2
    a2 = math.cos(((i + 1) / n + 0.008) / 1.008 * math.pi / 2) ** 2
    out.append(min(1 - a2 / a1, 0.999))
  return np.array(out)


@pytest.mark.parametrize("name", DISCRETE)
def test_discrete_integer_indices_reproduce_alphas_cumprod(name):
  s = _schedule(name)
  beta_schedule = name[len("discrete_"):].rsplit("_log_", 1)[0]
  alphas_cumprod = np.cumprod(1.0 - _numpy_betas(beta_schedule))
  idx = jnp.arange(N_TRAIN, dtype=jnp.float64)
  np.testing.assert_allclose(np.asarray(s.alpha(idx)) ** 2, alphas_cumprod, rtol=1e-12, atol=1e-15)
  np.testing.assert_allclose(s.alphas_cumprod, alphas_cumprod, rtol=1e-12, atol=1e-15)
  assert s.num_train_timesteps == N_TRAIN and s.t_min == 0.0 and s.t_max == N_TRAIN - 1


def test_make_betas_squaredcos_matches_spec_formula():
  for n in (10, 1000):
    betas = schedules.make_betas("squaredcos_cap_v2", n)
    np.testing.assert_allclose(betas, _numpy_betas("squaredcos_cap_v2", n), rtol=1e-11, atol=0)
    assert betas[-1] == 0.999  # alpha_bar(1) = 0: the cap is hit
  assert np.all(schedules.make_betas("squaredcos_cap_v2", 1000)[:-1] < 0.999)


def test_make_betas_linear_and_scaled_linear():
  np.testing.assert_allclose(schedules.make_betas("linear", 1000), np.linspace(1e-4, 0.02, 1000), rtol=1e-15)
  betas = schedules.make_betas("scaled_linear", 1000, 0.00085, 0.012)
  assert betas[0] == pytest.approx(0.00085, rel=1e-14) and betas[-1] == pytest.approx(0.012, rel=1e-14)
  # scaled_linear is linear in sqrt(beta), not in beta
  np.testing.assert_allclose(np.diff(np.sqrt(betas)), (math.sqrt(0.012) - math.sqrt(0.00085)) / 999, rtol=1e-9)
  assert betas.dtype == np.float64


@pytest.mark.parametrize("name", DISCRETE)
def test_dpm_time_mapping(name):
  s = _schedule(name)
  assert float(s.to_dpm_time(0.0)) == pytest.approx(1.0 / N_TRAIN, abs=1e-15)
  assert float(s.to_dpm_time(N_TRAIN - 1.0)) == pytest.approx(1.0, abs=1e-15)
  t = _fractional_times(s)
  np.testing.assert_allclose(s.from_dpm_time(s.to_dpm_time(t)), t, atol=1e-10)
  t_dpm = np.linspace(1.0 / N_TRAIN, 1.0, 37)
  np.testing.assert_allclose(s.to_dpm_time(s.from_dpm_time(t_dpm)), t_dpm, atol=1e-14)


def test_dpm_time_log_alpha_matches_official_discrete_interpolation():
  # DPM-Solver's NoiseScheduleVP('discrete'): knots (n+1)/N, log alpha piecewise linear in t_dpm.
  s = _discrete("linear", "log_alpha")
  log_alpha_knots = 0.5 * np.log(np.cumprod(1.0 - _numpy_betas("linear")))
  knots = (np.arange(N_TRAIN) + 1.0) / N_TRAIN
  t_dpm = np.array([0.0015, 0.1234, 0.5005, 0.87654, 0.9995])
  expected = np.interp(t_dpm, knots, log_alpha_knots)
  np.testing.assert_allclose(s.log_alpha(jnp.asarray(s.from_dpm_time(t_dpm))), expected, rtol=1e-11, atol=1e-14)


@pytest.mark.parametrize("beta_schedule", schedules.BETA_SCHEDULES)
def test_interpolation_modes_at_midpoints(beta_schedule):
  log_snr = _discrete(beta_schedule, "log_snr")
  log_alpha = _discrete(beta_schedule, "log_alpha")
  n = jnp.asarray([3.0, 250.0, 600.0, 990.0])
  mid = n + 0.5
  # both agree at the integers
  np.testing.assert_allclose(log_snr.lam(n), log_alpha.lam(n), rtol=1e-14)
  # log_snr: lambda linear between integers
  np.testing.assert_allclose(log_snr.lam(mid), 0.5 * (log_snr.lam(n) + log_snr.lam(n + 1)), rtol=1e-13)
  # log_alpha: log alpha linear between integers
  np.testing.assert_allclose(log_alpha.log_alpha(mid),
                             0.5 * (log_alpha.log_alpha(n) + log_alpha.log_alpha(n + 1)), rtol=1e-13)
  # the two are different interpolations: each breaks the other's linearity at the midpoint
  assert np.all(np.abs(np.asarray(log_alpha.lam(mid) - log_snr.lam(mid))) > 1e-9)
  quarter = n + 0.25
  np.testing.assert_allclose(log_snr.lam(quarter), 0.75 * log_snr.lam(n) + 0.25 * log_snr.lam(n + 1), rtol=1e-13)


def test_discrete_validation():
  with pytest.raises(ValueError, match="strictly"):
    schedules.DiscreteVP.from_alphas_cumprod([0.9, 0.95, 0.5])
  with pytest.raises(ValueError, match=r"\(3, 1\)"):
    schedules.DiscreteVP.from_alphas_cumprod(np.full((3, 1), 0.5))
  with pytest.raises(ValueError, match="betas"):
    schedules.DiscreteVP.from_betas([0.1, 1.0])
  with pytest.raises(ValueError, match="num_train_timesteps=1"):
    schedules.make_betas("linear", 1)


# ---------------------------------------------------------------- dtypes


def test_tables_stay_float64_with_float32_inputs():
  s = _schedule("discrete_linear_log_snr")
  assert s.lam_table.dtype == jnp.float64
  t32 = jnp.asarray([10.5, 500.25], jnp.float32)
  assert s.lam(t32).dtype == jnp.float64
  np.testing.assert_allclose(s.lam(t32), s.lam(jnp.asarray([10.5, 500.25])), rtol=1e-15)
  # a float32 sample: the schedule leaves are untouched by running a float32 computation through jit
  x32 = jnp.ones((2, 3), jnp.float32)
  out_schedule, out = jax.jit(lambda sch, x: (sch, (x * sch.alpha(jnp.asarray(7.5, jnp.float32)))))(s, x32)
  assert out_schedule.lam_table.dtype == jnp.float64
  np.testing.assert_array_equal(out_schedule.lam_table, s.lam_table)
  assert out.dtype == jnp.float64  # alpha comes from the float64 table; callers cast (Denoiser.predict does)
  rebuilt = schedules.DiscreteVP.from_alphas_cumprod(np.asarray(s.alphas_cumprod, np.float32))
  assert rebuilt.lam_table.dtype == jnp.float64
  assert schedules.table_dtype() == jnp.float64


def test_tables_float32_when_x64_off():
  with jax.enable_x64(False):
    assert schedules.table_dtype() == jnp.float32
    s = schedules.DiscreteVP.named("scaled_linear", 1000, 0.00085, 0.012)
    assert s.lam_table.dtype == jnp.float32
    assert s.lam(jnp.asarray(3.5, jnp.float32)).dtype == jnp.float32
    expected = np.cumprod(1.0 - _numpy_betas("scaled_linear"))
    np.testing.assert_allclose(np.asarray(s.alphas_cumprod), expected, rtol=2e-5)
    assert schedules.VE().log_alpha(0.5).dtype == jnp.float32


# ---------------------------------------------------------------- names and errors


def test_get_by_name_builds_each_schedule():
  assert isinstance(schedules.get("vp_linear"), schedules.VPLinear)
  assert isinstance(schedules.get("edm"), schedules.EDM)
  s = schedules.get("discrete_vp", beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
  np.testing.assert_allclose(s.lam_table, _schedule("discrete_scaled_linear_log_snr").lam_table, rtol=1e-15)
  assert schedules.get("ve", sigma_max=10.0).sigma_max == 10.0


def test_unknown_names_raise_naming_the_value():
  with pytest.raises(ValueError, match="cosine_typo"):
    schedules.make_betas("cosine_typo")
  with pytest.raises(ValueError, match="cosine_typo"):
    schedules.DiscreteVP.named("cosine_typo")
  with pytest.raises(ValueError, match="cubic"):
    schedules.DiscreteVP.named("linear", interpolation="cubic")
  with pytest.raises(ValueError, match="subvp"):
    schedules.get("subvp")
  with pytest.raises(ValueError, match="vp_linear"):  # the message lists the valid names
    schedules.get("subvp")

"""The EDM samplers (solvers/edm.py): Karras et al. 2022, Algorithms 1 and 2.

Transcription of the algorithms on the EDM schedule, invariance under the schedule, identities with DDIM and
rhoRK-DEIS Heun, orders on the EDM grid, NFE, churn's distribution and its keys, options."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import solvers
from models import analytic
from solvers import edm, grids, schedules

GAUSSIAN = analytic.Gaussian(mean=jnp.array([0.3, -0.5, 1.0]), std=jnp.array([0.5, 1.2, 0.8]))


def _sample(solver, schedule, grid, x, key=0, oracle=GAUSSIAN, **kwargs):
  return solvers.sample(solver, oracle.denoiser(schedule), schedule, grid, x, key=jax.random.key(key), **kwargs)


def _noisy(oracle, n, rho, seed=1):
  """n samples of the rescaled variable v = x / alpha at noise level rho (the EDM schedule's x)."""
  return oracle.sample(jax.random.key(seed), n, 1.0, rho)


def algorithm_2(oracle, x, sigmas, key, heun=True, S_churn=0.0, S_tmin=0.0, S_tmax=math.inf, S_noise=1.0):
  """Algorithm 2 of Karras et al. 2022 (Algorithm 1 when S_churn = 0), written out on the EDM schedule
  (s = 1, sigma(t) = t) with the exact denoiser D(x; sigma); step i draws its noise from fold_in(key, i)."""
  n = len(sigmas) - 1
  for i in range(n):
    sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
    gamma = min(S_churn / n, math.sqrt(2.0) - 1.0) if S_tmin <= sigma <= S_tmax else 0.0
    sigma_hat = sigma + gamma * sigma
    if gamma > 0:
      z = jax.random.normal(jax.random.fold_in(key, i), x.shape, x.dtype)
      x = x + math.sqrt(sigma_hat**2 - sigma**2) * S_noise * z
    d = (x - oracle.x0(x, 1.0, sigma_hat)) / sigma_hat
    x_next = x + (sigma_next - sigma_hat) * d
    if heun and sigma_next != 0:
      d_next = (x_next - oracle.x0(x_next, 1.0, sigma_next)) / sigma_next
      x_next = x + (sigma_next - sigma_hat) * (d + d_next) / 2
    x = x_next
  return x


@pytest.mark.parametrize("options", [
    {"method": "euler"},
    {"method": "heun"},
    {"method": "heun", "S_churn": 40.0, "S_tmin": 0.05, "S_tmax": 10.0, "S_noise": 1.003},  # gamma: sqrt(2) - 1
    {"method": "euler", "S_churn": 3.0, "S_tmin": 0.01, "S_tmax": 1.0, "S_noise": 1.007},   # gamma = 3 / 12
], ids=lambda o: "-".join(f"{v}" for v in o.values()))
def test_matches_the_papers_algorithms_on_the_edm_schedule(options):
  schedule = schedules.EDM()
  grid = grids.edm(schedule, 12)
  x = _noisy(GAUSSIAN, 5, 80.0)
  key = jax.random.key(3)
  sol = solvers.sample(edm.EDM(**options), GAUSSIAN.denoiser(schedule, prediction="x0"), schedule, grid, x, key=key)
  expected = algorithm_2(GAUSSIAN, x, np.asarray(grid.sigma[:13]), key, heun=options["method"] == "heun",
                         **{k: v for k, v in options.items() if k != "method"})
  np.testing.assert_allclose(sol.x, expected, rtol=1e-11, atol=1e-11)


@pytest.mark.parametrize("schedule", [schedules.VPLinear(), schedules.VE(), schedules.Flow()],
                         ids=lambda s: type(s).__name__)
def test_any_schedule_samples_as_the_edm_schedule_in_x_over_alpha(schedule):
  """EDM Sec. 3: with sigma(t) = t, s(t) = 1 for x / alpha the sampler does not depend on the schedule.
  The same rho grid, key and v_T give the same sample (alpha = 1 at sigma = 0), churn included."""
  def grid_of(s):
    return grids.karras(s, 10, sigma_min=0.02, sigma_max=40.0, final="zero")

  v = _noisy(GAUSSIAN, 4, 40.0)
  grid = grid_of(schedule)
  for name in ("edm_heun", "edm_heun_churn"):
    on_edm = _sample(name, schedules.EDM(), grid_of(schedules.EDM()), v, key=4)
    on_schedule = _sample(name, schedule, grid, grid.alpha[0] * v, key=4)
    np.testing.assert_allclose(on_schedule.x, on_edm.x, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("final", grids.FINAL_POLICIES)
def test_euler_is_ddim_and_heun_is_rhork_heun_except_into_sigma_zero(final):
  schedule = schedules.VPLinear()
  grid = grids.edm(schedule, 9, final=final)
  x = GAUSSIAN.sample(jax.random.key(2), 4, grid.alpha[0], grid.sigma[0])
  np.testing.assert_allclose(_sample("edm_euler", schedule, grid, x).x, _sample("ddim_eps", schedule, grid, x).x,
                             rtol=1e-12, atol=1e-12)
  heun = _sample("edm_heun", schedule, grid, x, return_trajectory=True)
  rk = _sample("deis_rhork_2heun", schedule, grid, x, return_trajectory=True)
  if final == "t_end":
    np.testing.assert_allclose(heun.x, rk.x, rtol=1e-12, atol=1e-12)
    return
  # Into sigma = 0 EDM takes an Euler step: the denoised point D(x_{N-1}); rhoRK takes Ralston's two stages.
  np.testing.assert_allclose(heun.trajectory[2 * 8], rk.trajectory[8], rtol=1e-12, atol=1e-12)
  np.testing.assert_allclose(heun.x, GAUSSIAN.x0(heun.trajectory[2 * 8], grid.alpha[8], grid.sigma[8]),
                             rtol=1e-12, atol=1e-12)
  assert not np.allclose(heun.x, rk.x, rtol=1e-6)


def test_churn_zero_is_deterministic_heun_exactly_and_outside_its_window_to_round_off():
  """S_churn = 0 compiles to the same program as edm_heun; a churn window holding no node adds 0 * z (the
  noisy program, compiled on its own, may round differently in the last bit)."""
  schedule = schedules.VPLinear()
  grid = grids.edm(schedule, 8)
  x = GAUSSIAN.sample(jax.random.key(2), 4, grid.alpha[0], grid.sigma[0])
  heun = _sample("edm_heun", schedule, grid, x)
  no_churn = edm.EDM(**dict(edm.CHURN_SETTINGS["cifar10_vp"], S_churn=0.0))
  outside = edm.EDM(**dict(edm.CHURN_SETTINGS["cifar10_vp"], S_tmin=100.0, S_tmax=200.0))
  assert not no_churn.stochastic and outside.stochastic
  np.testing.assert_array_equal(_sample(no_churn, schedule, grid, x).x, heun.x)
  np.testing.assert_allclose(_sample(outside, schedule, grid, x, key=9).x, heun.x, rtol=1e-14, atol=1e-14)
  assert not np.allclose(_sample("edm_heun_churn", schedule, grid, x, key=9).x, heun.x)


@pytest.mark.parametrize("schedule", [schedules.EDM(), schedules.VPLinear()], ids=lambda s: type(s).__name__)
@pytest.mark.parametrize("name, order", [("edm_euler", 1), ("edm_heun", 2)])
def test_order_on_the_edm_grid(schedule, name, order):
  """Errors at the grid's last node sigma_min (the final jump to sigma = 0 is the same map for every N)."""
  x = GAUSSIAN.sample(jax.random.key(5), 8, schedule.alpha(schedule.t_max), schedule.sigma(schedule.t_max))
  steps, errors = (40, 80, 160), []
  for n in steps:
    grid = grids.edm(schedule, n, final="t_end", capacity=256)
    x_T = GAUSSIAN.pf_ode_solution(x, schedule.alpha(schedule.t_max), schedule.sigma(schedule.t_max),
                                   grid.alpha[0], grid.sigma[0])
    exact = GAUSSIAN.pf_ode_solution(x_T, grid.alpha[0], grid.sigma[0], grid.alpha[n], grid.sigma[n])
    errors.append(float(jnp.sqrt(jnp.mean((_sample(name, schedule, grid, x_T).x - exact) ** 2))))
  slope = -np.polyfit(np.log(steps), np.log(errors), 1)[0]
  assert abs(slope - order) < 0.3, (slope, errors)


def test_nfe_is_2n_minus_1_into_sigma_zero_and_2n_otherwise():
  schedule = schedules.EDM()
  x = _noisy(GAUSSIAN, 2, 80.0)
  for n in (1, 2, 5):
    for final, heun_nfe in (("zero", 2 * n - 1), ("t_end", 2 * n)):
      grid = grids.edm(schedule, n, final=final)
      assert int(_sample("edm_euler", schedule, grid, x).nfe) == n
      assert int(_sample("edm_heun", schedule, grid, x).nfe) == heun_nfe
      assert int(_sample("edm_heun_churn", schedule, grid, x).nfe) == heun_nfe


def _per_sample(solver, schedule, grid, x, keys, oracle=GAUSSIAN):
  """One key per sample: vmap over (x_T, keys)."""
  def one(x1, key):
    return solvers.sample(solver, oracle.denoiser(schedule), schedule, grid, x1[None], key=key).x[0]
  return jax.vmap(one)(x, keys)


def test_per_sample_keys_make_samples_independent_of_the_batch():
  schedule = schedules.VPLinear()
  grid = grids.edm(schedule, 6)
  x = GAUSSIAN.sample(jax.random.key(2), 8, grid.alpha[0], grid.sigma[0])
  keys = jax.random.split(jax.random.key(7), 8)
  batch_of_8 = _per_sample("edm_heun_churn", schedule, grid, x, keys)
  batch_of_3 = _per_sample("edm_heun_churn", schedule, grid, x[:3], keys[:3])
  np.testing.assert_allclose(batch_of_3, batch_of_8[:3], rtol=1e-13, atol=1e-13)
  # The same start with other keys lands elsewhere: the noise is the key's, not shared across samples.
  same_start = _per_sample("edm_heun_churn", schedule, grid, jnp.repeat(x[:1], 8, axis=0), keys)
  assert np.min(np.abs(np.diff(same_start, axis=0))) > 0


def _standard_errors(samples, oracle):
  """(mean, variance, covariance) deviations from the data's, each in standard errors of a sample of this size."""
  n = samples.shape[0]
  mean, cov = samples.mean(0), np.cov(np.asarray(samples).T)
  std = np.asarray(oracle.std)
  return np.concatenate([(mean - oracle.mean) / (std / np.sqrt(n)),
                         (np.diag(cov) - std**2) / (std**2 * np.sqrt(2.0 / (n - 1))),
                         [cov[0, 1] / (std[0] * std[1] / np.sqrt(n))]])


def test_churn_samples_the_data_distribution_and_detects_a_wrong_noise_scale():
  """10k samples of a 2-D Gaussian through Algorithm 2 (CIFAR-10 VP churn, exact S_noise = 1) on the EDM grid.

  128 steps (NFE 255): below ~72 steps gamma sits at its cap sqrt(2) - 1 and the churned Heun steps leave
  a variance bias of 2.7 standard errors at 64 steps (5.4 at 32; measured with 400k samples), 0.6 at 128.
  S_noise = 1.3 (69% too much injected variance) moves the variances by ~40-50 standard errors."""
  schedule = schedules.VPLinear()
  data = analytic.Gaussian(mean=jnp.array([0.3, -0.5]), std=jnp.array([0.5, 1.2]))
  grid = grids.edm(schedule, 128)
  n = 10_000
  x = data.sample(jax.random.key(11), n, grid.alpha[0], grid.sigma[0])
  keys = jax.random.split(jax.random.key(12), n)
  exact = edm.EDM(**dict(edm.CHURN_SETTINGS["cifar10_vp"], S_noise=1.0))
  errors = _standard_errors(_per_sample(exact, schedule, grid, x, keys, data), data)
  assert np.all(np.abs(errors) < 5), errors
  too_noisy = edm.EDM(**dict(edm.CHURN_SETTINGS["cifar10_vp"], S_noise=1.3))
  errors = _standard_errors(_per_sample(too_noisy, schedule, grid, x, keys, data), data)
  assert np.max(np.abs(errors)) > 5, errors


@pytest.mark.parametrize("options, message", [
    ({"method": "rk4"}, "method='rk4'"),
    ({"S_churn": -1.0}, "S_churn=-1.0"),
    ({"S_churn": math.inf}, "S_churn=inf"),
    ({"S_tmin": 2.0, "S_tmax": 1.0}, "S_tmin=2.0"),
    ({"S_noise": 0.0}, "S_noise=0.0"),
])
def test_bad_options_raise(options, message):
  with pytest.raises(ValueError, match=message.replace("(", r"\(")):
    edm.EDM(**options)


def test_churn_needs_a_key():
  schedule = schedules.EDM()
  with pytest.raises(ValueError, match="stochastic"):
    solvers.sample("edm_heun_churn", GAUSSIAN.denoiser(schedule), schedule, grids.edm(schedule, 4),
                   _noisy(GAUSSIAN, 2, 80.0))


def test_churn_weak_order_two_below_the_gamma_cap():
  """Weak order of Alg. 2 where gamma = S_churn / N stays below its cap sqrt(2) - 1 (S_churn = 5, N >= 16):
  the relative variance error of 400k one-dimensional samples (standard error 2e-3) against N. Measured
  0.206 / 0.047 / 0.012 at N = 16 / 32 / 64: slope 2.06. (With the paper's S_churn = 30, gamma sits at its cap
  below ~72 steps and the error falls only like N^-1.5 there: 0.24 / 0.084 / 0.035.)"""
  schedule, oracle, n = schedules.VPLinear(), analytic.gaussian(dim=1, seed=1), 400_000
  solver = edm.EDM(method="heun", S_churn=5.0, S_tmin=0.0, S_tmax=1e9, S_noise=1.0)
  errors, steps = [], (16, 32, 64)
  for num_steps in steps:
    grid = grids.edm(schedule, num_steps, capacity=128)
    x = oracle.sample(jax.random.key(0), n, grid.alpha[0], grid.sigma[0])
    out = solvers.sample(solver, oracle.denoiser(schedule), schedule, grid, x,
                         key=jax.random.split(jax.random.key(1), n)).x
    end = int(grid.num_steps)
    exact_var = float(grid.alpha[end] ** 2 * oracle.std[0] ** 2 + grid.sigma[end] ** 2)
    errors.append(abs(float(jnp.var(out)) / exact_var - 1.0))
  slope = -np.polyfit(np.log(steps), np.log(errors), 1)[0]
  assert abs(slope - 2.0) <= 0.35, (slope, errors)

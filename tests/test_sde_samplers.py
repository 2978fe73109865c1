"""Stochastic samplers: Euler-Maruyama, SDE-DPM-Solver++ (1, 2M), DDPM ancestral and the Langevin corrector.

- weak order from the exact moments of each scheme on Gaussian data: every step is affine in the sample, the
  model outputs and fresh noise, so the mean and covariance of the final sample follow from the solver's
  coefficient table by a recursion, with no sampling (``scheme_moments``);
- distribution: mean and covariance of 10k samples of a 2-D Gaussian within 5 standard errors of the data's,
  and of the scheme's exact moments; a wrong noise scale fails the same check;
- per-sample keys: a sample depends on its own key only, not on the batch (except score_sde's batch-averaged
  Langevin step, shown to depend on it);
- SDE-DPM-Solver++ order 1 is DDPM ancestral; the Langevin corrector with snr = 0 is its bare predictor;
- bad options.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import solvers
from models import analytic
from solvers import grids, schedules
from solvers.ddim import DDIM
from solvers.dpm_solver_multistep import DPMSolverMultistep
from solvers.dpm_solver_sde import DPMSolverSDE
from solvers.euler_maruyama import EulerMaruyama
from solvers.langevin import LangevinCorrector
from solvers.unipc import UniPC

SCHEDULE = schedules.VPLinear()
ORACLE = analytic.gaussian(dim=2, seed=4)
NUM_SAMPLES = 10_000
TOLERANCE_SE = 5.0


def _x_T(n, schedule=SCHEDULE, seed=9, oracle=ORACLE):
  t = schedule.t_max
  return oracle.sample(jax.random.key(seed), n, schedule.alpha(t), schedule.sigma(t))


# --- exact moments of a scheme on Gaussian data --------------------------------------------------------------


def _linear_prediction(kind, alpha, sigma, oracle):
  """(k, b) per node and dimension: the oracle's ``kind`` prediction is k x + b (Gaussian data)."""
  a, s = alpha[:, None], sigma[:, None]
  mean, var0 = np.asarray(oracle.mean), np.asarray(oracle.std) ** 2
  var = a**2 * var0 + s**2
  if kind == "eps":
    return s / var, -s * a * mean / var
  return a * var0 / var, mean - a**2 * var0 * mean / var


def _rows(solver, grid, schedule):
  """(model kind, anchor weight, model-output weights newest first, noise weight) per step."""
  c = {name: np.asarray(value) for name, value in solver.coefficients(grid, schedule).items()}
  if isinstance(solver, EulerMaruyama):
    return "eps", c["x"], c["eps"][:, None], c["z"]
  if isinstance(solver, DDIM):
    return solver.form, c["x"], c["m"][:, None], c["z"]
  return "x0", c["anchor"], c["hist"], c["z"]


def scheme_moments(solver, grid, schedule=SCHEDULE, oracle=ORACLE):
  """Exact mean and variance (per dimension) of the scheme's final sample, x_T ~ the marginal at t_max.

  The state (x_i, x_{i-1}, ...) is jointly Gaussian per dimension; x_{i+1} = anchor x_i + sum_j hist_j
  (k_{i-j} x_{i-j} + b_{i-j}) + z w with fresh w, so its mean and covariance propagate exactly."""
  kind, anchor, hist, noise = _rows(solver, grid, schedule)
  depth, dim = hist.shape[1], oracle.mean.shape[0]
  alpha, sigma = np.asarray(grid.alpha), np.asarray(grid.sigma)
  k, b = _linear_prediction(kind, alpha, sigma, oracle)
  mean, cov = np.zeros((depth, dim)), np.zeros((depth, depth, dim))
  mean[0] = alpha[0] * np.asarray(oracle.mean)
  cov[0, 0] = alpha[0] ** 2 * np.asarray(oracle.std) ** 2 + sigma[0] ** 2
  for i in range(int(grid.num_steps)):
    weights, shift = np.zeros((depth, dim)), np.zeros(dim)
    weights[0] += anchor[i]
    for j in range(min(depth, i + 1)):
      weights[j] += hist[i, j] * k[i - j]
      shift += hist[i, j] * b[i - j]
    cross = np.einsum("jd,jld->ld", weights, cov)  # cov(x_{i+1}, x_{i-l})
    new_cov = np.zeros_like(cov)
    new_cov[0, 0] = np.einsum("ld,ld->d", cross, weights) + noise[i] ** 2
    new_cov[0, 1:] = new_cov[1:, 0] = cross[:-1]
    new_cov[1:, 1:] = cov[:-1, :-1]
    mean = np.concatenate([(np.einsum("jd,jd->d", weights, mean) + shift)[None], mean[:-1]])
    cov = new_cov
  return mean[0], cov[0, 0]


def target_moments(grid, oracle=ORACLE):
  """Mean and variance of the exact marginal at the grid's last node."""
  n = int(grid.num_steps)
  a, s = float(grid.alpha[n]), float(grid.sigma[n])
  return a * np.asarray(oracle.mean), a**2 * np.asarray(oracle.std) ** 2 + s**2


def _weak_error(solver, grid, schedule, oracle):
  mean, var = scheme_moments(solver, grid, schedule, oracle)
  exact_mean, exact_var = target_moments(grid, oracle)
  return max(np.max(np.abs(mean - exact_mean) / np.sqrt(exact_var)), np.max(np.abs(var / exact_var - 1)))


WEAK_STEPS = (50, 100, 200)
WEAK_CASES = {
    "euler_maruyama VPLinear": (EulerMaruyama(), SCHEDULE, 1),
    "euler_maruyama VPCosine": (EulerMaruyama(), schedules.VPCosine(), 1),
    "euler_maruyama EDM": (EulerMaruyama(), schedules.EDM(), 1),
    "ddpm_ancestral": (DDIM(eta=1.0), SCHEDULE, 1),
    "sde-dpm-solver++ 2M midpoint": (DPMSolverSDE(), SCHEDULE, 2),
    "sde-dpm-solver++ 2M heun": (DPMSolverSDE(solver_type="heun"), SCHEDULE, 2),
}


@pytest.mark.parametrize("case", WEAK_CASES)
def test_weak_order_from_exact_moments(case):
  """Slope of the moment error (mean in marginal stds, relative variance) at t_min vs steps on a logSNR grid."""
  solver, schedule, order = WEAK_CASES[case]
  oracle = analytic.gaussian(dim=3, seed=1)
  solver = solver.for_order_measurement()
  errors = [_weak_error(solver, grids.uniform_logsnr(schedule, n, capacity=256), schedule, oracle) for n in WEAK_STEPS]
  slope = -np.polyfit(np.log(WEAK_STEPS), np.log(errors), 1)[0]
  assert abs(slope - order) <= 0.3, (case, slope, errors)
  assert solver.declared_order == order


# --- distributions --------------------------------------------------------------------------------------------


def standard_errors(samples, mean, var):
  """|sample mean - mean|, |sample variance - var| and |sample covariance| (the data are uncorrelated), each
  in its standard error for n independent samples of N(mean, diag(var))."""
  n = samples.shape[0]
  samples = np.asarray(samples)
  centred = samples - samples.mean(0)
  cov = centred.T @ centred / (n - 1)
  mean_z = np.abs(samples.mean(0) - mean) / np.sqrt(var / n)
  var_z = np.abs(np.diag(cov) - var) / (var * np.sqrt(2.0 / (n - 1)))
  off = ~np.eye(len(var), dtype=bool)
  cov_z = np.abs(cov[off]) / np.sqrt(np.outer(var, var)[off] / n)
  return np.concatenate([mean_z, var_z, cov_z])


# (solver, grid) with at most ~2 standard errors of discretisation bias at 10k samples (scheme_moments).
DISTRIBUTION_CASES = {
    "euler_maruyama": ("euler_maruyama", lambda: grids.uniform_t(SCHEDULE, 200)),
    "ddpm_ancestral": ("ddpm_ancestral", lambda: grids.uniform_logsnr(SCHEDULE, 400)),
    "dpm_solver_pp_2m_sde": ("dpm_solver_pp_2m_sde", lambda: grids.uniform_logsnr(SCHEDULE, 100)),
    "dpm_solver_pp_2m_sde into zero": ("dpm_solver_pp_2m_sde", lambda: grids.uniform_logsnr(SCHEDULE, 100, final="zero")),
    "euler_maruyama_langevin": ("euler_maruyama_langevin", lambda: grids.uniform_t(SCHEDULE, 200)),
    "langevin snr_batch (score_sde)": (LangevinCorrector(step_size="snr_batch"), lambda: grids.uniform_t(SCHEDULE, 200)),
}


@pytest.mark.parametrize("case", DISTRIBUTION_CASES)
def test_samples_have_the_data_distribution(case):
  solver, make_grid = DISTRIBUTION_CASES[case]
  grid = make_grid()
  out = solvers.sample(solver, ORACLE.denoiser(SCHEDULE), SCHEDULE, grid, _x_T(NUM_SAMPLES),
                       key=jax.random.key(3)).x
  z = standard_errors(out, *target_moments(grid))
  assert np.max(z) <= TOLERANCE_SE, (case, z)
  solver = solvers.get(solver) if isinstance(solver, str) else solver
  if not isinstance(solver, LangevinCorrector):  # the scheme's own moments: the step does what its table says
    z_scheme = standard_errors(out, *scheme_moments(solver, grid))
    assert np.max(z_scheme) <= TOLERANCE_SE, (case, z_scheme)


@pytest.mark.parametrize("solver", [DPMSolverSDE(s_noise=1.1), LangevinCorrector(step_size="snr")],
                         ids=["noise scale 1.1", "per-sample snr in 2-D"])
def test_wrong_noise_fails_the_distribution_check(solver):
  """The check has power: 10% too much noise per step fails it, and so does the per-sample snr step in 2-D,
  whose ||z|| / ||s|| ratio has a heavy tail (the variance comes out several times too large)."""
  grid = grids.uniform_logsnr(SCHEDULE, 100) if isinstance(solver, DPMSolverSDE) else grids.uniform_t(SCHEDULE, 200)
  out = solvers.sample(solver, ORACLE.denoiser(SCHEDULE), SCHEDULE, grid, _x_T(NUM_SAMPLES), key=jax.random.key(3)).x
  assert np.max(standard_errors(out, *target_moments(grid))) > 2 * TOLERANCE_SE


# --- keys -----------------------------------------------------------------------------------------------------

def test_batch_averaged_langevin_step_depends_on_the_batch():
  x, keys = _x_T(6, seed=2), jax.random.split(jax.random.key(11), 6)
  grid = grids.uniform_logsnr(SCHEDULE, 6)
  solver = LangevinCorrector(step_size="snr_batch")
  run = lambda x, keys: solvers.sample(solver, ORACLE.denoiser(SCHEDULE), SCHEDULE, grid, x, key=keys).x  # noqa: E731
  assert float(jnp.max(jnp.abs(run(x[2:5], keys[2:5]) - run(x, keys)[2:5]))) > 1e-3


def test_raw_keys_are_accepted_and_a_wrong_key_shape_is_refused():
  run = lambda key: solvers.sample("euler_maruyama", ORACLE.denoiser(SCHEDULE), SCHEDULE,  # noqa: E731
                                   grids.uniform_logsnr(SCHEDULE, 3), _x_T(4), key=key).x
  np.testing.assert_array_equal(run(jax.random.key_data(jax.random.key(4))), run(jax.random.key(4)))
  with pytest.raises(ValueError, match=r"key has shape \(3,\)"):
    run(jax.random.split(jax.random.key(0), 3))


# --- identities -----------------------------------------------------------------------------------------------


def _sample(solver, grid, key=5, n=5):
  return solvers.sample(solver, ORACLE.denoiser(SCHEDULE), SCHEDULE, grid, _x_T(n, seed=1), key=jax.random.key(key))


@pytest.mark.parametrize("final", grids.FINAL_POLICIES)
def test_first_order_sde_dpm_solver_pp_is_ddpm_ancestral(final):
  grid = grids.uniform_logsnr(SCHEDULE, 12, final=final)
  np.testing.assert_allclose(_sample(DPMSolverSDE(order=1), grid).x, _sample("ddpm_ancestral", grid).x,
                             rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("predictor", [EulerMaruyama(), DPMSolverSDE(), DPMSolverMultistep()],
                         ids=["euler_maruyama", "sde-dpm-solver++ 2M", "dpm-solver++ 2M (ODE)"])
def test_langevin_with_snr_zero_is_the_bare_predictor(predictor):
  """A multistep predictor's anchor moves with the corrected sample; an ODE predictor works too."""
  grid = grids.uniform_logsnr(SCHEDULE, 9)
  bare = _sample(predictor, grid)
  corrected = _sample(LangevinCorrector(predictor=predictor, snr=0.0, n_steps=2, step_size="snr"), grid)
  np.testing.assert_allclose(corrected.x, bare.x, rtol=1e-13, atol=1e-13)
  assert int(corrected.nfe) == 3 * int(bare.nfe) == 27
  moved = _sample(LangevinCorrector(predictor=predictor, snr=0.16, n_steps=2, step_size="snr"), grid)
  assert float(jnp.max(jnp.abs(moved.x - bare.x))) > 1e-3


# --- options --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("make, match", [
    (lambda: DPMSolverSDE(order=3), "order=3"),
    (lambda: DPMSolverSDE(solver_type="bh2"), "solver_type='bh2'.*midpoint, heun"),
    (lambda: DPMSolverSDE(s_noise=-1.0), "s_noise=-1.0"),
    (lambda: LangevinCorrector(predictor=UniPC()), "predictor=UniPC.*EulerMaruyama, DDIM"),
    (lambda: LangevinCorrector(n_steps=0), "n_steps=0"),
    (lambda: LangevinCorrector(snr=-0.1), "snr=-0.1"),
    (lambda: LangevinCorrector(step_size="adaptive"), "step_size='adaptive'.*ald, snr, snr_batch"),
])
def test_bad_options_raise(make, match):
  with pytest.raises(ValueError, match=match):
    make()


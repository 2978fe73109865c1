"""Teleportation: the fit (full and low rank), the jump is the exact Gaussian flow, partial teleport + inner solver
is the inner solver on the remaining grid, on the mixture it lowers the error at equal NFE, no recompile, bad input."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import solvers
from models import analytic
from solvers import grids, loop, reference, schedules, teleportation
from solvers.dpm_solver_multistep import DPMSolverMultistep
from solvers.unipc import UniPC

SCHEDULE = schedules.VPLinear()


def _exact_moments(oracle):
  dim = oracle.mean.shape[0]
  return teleportation.GaussianMoments(mean=oracle.mean, basis=jnp.eye(dim), eigenvalues=oracle.std**2,
                                       remainder=jnp.zeros(()))


def _x_T(oracle, n, seed=1):
  return oracle.sample(jax.random.key(seed), n, SCHEDULE.alpha(1.0), SCHEDULE.sigma(1.0))


@pytest.mark.parametrize("final", grids.FINAL_POLICIES)
def test_teleporting_all_the_way_is_the_closed_form(final):
  oracle = analytic.gaussian(dim=5, seed=2)
  x = _x_T(oracle, 6)
  grid = grids.uniform_logsnr(SCHEDULE, 7, final=final)
  sol = solvers.sample(teleportation.Teleport(moments=_exact_moments(oracle), skip=1.0), oracle.denoiser(SCHEDULE),
                       SCHEDULE, grid, x)
  exact = oracle.pf_ode_solution(x, grid.alpha[0], grid.sigma[0], grid.alpha[7], grid.sigma[7])
  np.testing.assert_allclose(sol.x, exact, rtol=1e-12, atol=1e-12)
  assert int(sol.nfe) == 0


def test_partial_teleport_is_the_inner_solver_on_the_remaining_grid():
  oracle = analytic.gaussian(dim=5, seed=2)
  denoiser, x = oracle.denoiser(SCHEDULE), _x_T(oracle, 6)
  grid = grids.uniform_logsnr(SCHEDULE, 10)
  times = grid.times()
  inner = DPMSolverMultistep(order=2)
  sol = solvers.sample(teleportation.Teleport(moments=_exact_moments(oracle), skip=0.3, inner=inner), denoiser,
                       SCHEDULE, grid, x)
  start = oracle.pf_ode_solution(x, grid.alpha[0], grid.sigma[0], grid.alpha[3], grid.sigma[3])
  rest = solvers.sample(inner, denoiser, SCHEDULE, grids.from_times(SCHEDULE, times[3:]), start)
  np.testing.assert_allclose(sol.x, rest.x, rtol=1e-12, atol=1e-12)
  assert int(sol.nfe) == int(rest.nfe) == 7
  exact = oracle.pf_ode_solution(x, grid.alpha[0], grid.sigma[0], grid.alpha[10], grid.sigma[10])
  full = solvers.sample(inner, denoiser, SCHEDULE, grid, x)
  assert 0 < np.abs(sol.x - exact).max() < np.abs(full.x - exact).max()  # a shorter range: a smaller error


def test_fit_reproduces_the_covariance_full_and_on_the_top_subspace():
  rng = np.random.default_rng(0)
  dim, rank = 12, 3
  scales = np.concatenate([[3.0, 2.0, 1.5], np.linspace(0.3, 0.1, dim - rank)])
  rotation = np.linalg.qr(rng.normal(size=(dim, dim)))[0]
  samples = jnp.asarray(rng.normal(size=(500, dim)) * scales @ rotation.T + 0.5)
  empirical = np.cov(np.asarray(samples), rowvar=False)

  def covariance(m):
    basis = np.asarray(m.basis)
    return basis * np.asarray(m.eigenvalues) @ basis.T + float(m.remainder) * (np.eye(dim) - basis @ basis.T)

  full = teleportation.fit_gaussian(samples)
  np.testing.assert_allclose(covariance(full), empirical, atol=1e-12)
  np.testing.assert_allclose(full.mean, np.mean(np.asarray(samples), 0), rtol=1e-13)
  low = teleportation.fit_gaussian(samples, rank=rank)
  top = np.linalg.eigh(empirical)[1][:, -rank:]
  np.testing.assert_allclose(covariance(low) @ top, empirical @ top, atol=1e-10)
  np.testing.assert_allclose(float(low.remainder), np.sum(np.linalg.eigvalsh(empirical)[:-rank]) / (dim - rank))
  np.testing.assert_allclose(np.trace(covariance(low)), np.trace(empirical))
  assert float(teleportation.fit_gaussian(samples, rank=rank, remainder="zero").remainder) == 0.0


def _rmse(a, b):
  return float(jnp.sqrt(jnp.mean((a - b) ** 2)))


@pytest.mark.parametrize("inner", [DPMSolverMultistep(order=2), UniPC()], ids=["dpm_solver_pp_2m", "unipc_bh2_2"])
def test_teleport_lowers_the_error_on_the_mixture_at_equal_nfe(inner):
  """Measured (docs/teleportation.md, 256 samples): skipping 3 of 8 steps at NFE 5 cuts the RMSE by ~0.6x, 4 of 14
  at NFE 10 by ~0.4x, for either inner solver; asserted with margin on 24 samples."""
  oracle = analytic.gmm(dim=8)
  denoiser = oracle.denoiser(SCHEDULE)
  moments = teleportation.fit_gaussian(oracle.sample(jax.random.key(11), 4096))
  x = _x_T(oracle, 24)
  answer = reference.solve(denoiser, SCHEDULE, x, 1.0, 1e-3)
  for nfe, skipped, ratio in ((5, 3, 0.8), (10, 4, 0.7)):
    errors = []
    for k in (0, skipped):
      grid = grids.uniform_logsnr(SCHEDULE, nfe + k, t_end=1e-3)
      sol = solvers.sample(teleportation.Teleport(moments=moments, skip=k / (nfe + k), inner=inner), denoiser,
                           SCHEDULE, grid, x)
      assert int(sol.nfe) == nfe
      errors.append(_rmse(sol.x, answer))
    assert errors[1] < ratio * errors[0], (nfe, errors)


def test_new_moments_and_skips_never_recompile():
  oracle = analytic.gaussian(dim=4, seed=3)
  denoiser, x, grid = oracle.denoiser(SCHEDULE), _x_T(oracle, 3), grids.uniform_logsnr(SCHEDULE, 9)
  moments = _exact_moments(oracle)
  solvers.sample(teleportation.Teleport(moments=moments, skip=0.2), denoiser, SCHEDULE, grid, x)
  before = loop.trace_count()
  other = moments.replace(mean=moments.mean + 1.0)
  for solver in (teleportation.Teleport(moments=other, skip=0.5), teleportation.Teleport(moments=moments, skip=0.0)):
    solvers.sample(solver, denoiser, SCHEDULE, grid, x)
  assert loop.trace_count() == before


@pytest.mark.parametrize("call, match", [
    (lambda: teleportation.Teleport(skip=0.5), "moments"),
    (lambda: teleportation.Teleport(skip=1.5, moments=_exact_moments(analytic.gaussian(dim=2))), "skip"),
    (lambda: teleportation.Teleport(inner="ddim"), "inner"),
    (lambda: teleportation.fit_gaussian(jnp.ones((5, 3)), rank=4), "rank"),
    (lambda: teleportation.fit_gaussian(jnp.ones((5, 3)), remainder="mean"), "remainder"),
])
def test_bad_input_raises(call, match):
  with pytest.raises(ValueError, match=match):
    call()

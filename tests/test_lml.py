"""LML (solvers/lml.py): the damping -> inf and rank -> 0 limits are the plain Langevin move, the low-rank
Hessian-vector product against jax.jvp of the exact score, Woodbury against dense algebra, the noise
covariance, NFE counted with the noise-level window (the registered ``ddim_lml`` also runs through
tests/test_battery.py)."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import solvers
from models import analytic
from solvers import grids, lml, schedules
from solvers.dpm_solver_multistep import DPMSolverMultistep
from solvers.langevin import LangevinCorrector
from tests import test_battery as battery

SCHEDULE = schedules.VPLinear()
NAME = "ddim_lml"


def _move_inputs(b=5, d=6, r=2, seed=0):
  k = jax.random.split(jax.random.key(seed), 5)
  x, s, z = (jax.random.normal(k[j], (b, d), jnp.float64) for j in range(3))
  outputs = jax.random.normal(k[3], (r, b, d), jnp.float64)
  zeta = jax.random.normal(k[4], (b, r), jnp.float64)
  return x, s, z, outputs, zeta


@pytest.mark.parametrize("rank", [1, 2, 3])
def test_damping_to_infinity_is_the_plain_langevin_move(rank):
  """The gap to x + h s + sqrt(2h) z closes: the drift's like 1 / damping (P = I - U U^T + O(|U|^4),
  |U|^2 ~ 1 / damping), the whole move's like damping^{-1/2} (the U zeta part of the noise is O(|U|))."""
  x, s, z, outputs, zeta = _move_inputs(r=rank)
  h = 0.05
  plain = x + h * s + jnp.sqrt(2 * h) * z
  lams = (1e3, 1e5, 1e7)
  move = jax.jit(lml.lml_move)  # a traced damping: inf gives U = 0 there too
  drift = [float(jnp.max(jnp.abs(move(x, s, outputs, lam, h, 0 * z, 0 * zeta) - x - h * s))) for lam in lams]
  gaps = [float(jnp.max(jnp.abs(move(x, s, outputs, lam, h, z, zeta) - plain))) for lam in lams]
  np.testing.assert_allclose(move(x, s, outputs, math.inf, h, z, zeta), plain, rtol=0, atol=1e-15)
  assert drift[0] > 1e-5 and gaps[0] > 1e-3
  for a, b in zip(drift, drift[1:]):
    np.testing.assert_allclose(b / a, 1e-2, rtol=0.1)
  for a, b in zip(gaps, gaps[1:]):
    np.testing.assert_allclose(b / a, 1e-1, rtol=0.2)
  np.testing.assert_array_equal(lml.lml_move(x, s, outputs, math.inf, h, z, zeta), plain)
  np.testing.assert_array_equal(lml.lml_move(x, s, outputs[:0], 1.0, h, z, zeta[:, :0]), plain)


def test_sampler_limits_are_the_langevin_corrector():
  """damping = inf: the Langevin corrector around the same predictor, to rounding; a finite damping moves it."""
  oracle = analytic.gmm(dim=4, seed=1)
  den = oracle.denoiser(SCHEDULE)
  grid = grids.uniform_logsnr(SCHEDULE, 6, final="zero")
  x = jax.random.normal(jax.random.key(0), (16, 4), jnp.float64)
  key = jax.random.key(3)
  ref = solvers.sample(LangevinCorrector(predictor=DPMSolverMultistep(order=2)), den, SCHEDULE, grid, x, key=key)
  sol = solvers.sample(lml.LML(damping=math.inf), den, SCHEDULE, grid, x, key=key)  # rank 0: the same branch
  np.testing.assert_allclose(sol.x, ref.x, rtol=1e-10, atol=1e-10)
  assert int(sol.nfe) == int(ref.nfe)
  near = solvers.sample(lml.LML(damping=0.1), den, SCHEDULE, grid, x, key=key)
  assert float(jnp.max(jnp.abs(near.x - ref.x))) > 1e-2  # a finite damping moves the samples (the rate: above)


@pytest.mark.parametrize("rank", [1, 2, 3, 5])
def test_woodbury_and_noise_covariance_match_dense_algebra(rank):
  """P v by Woodbury equals the dense (I + U U^T)^{-1} v, and Cov[P (z + U zeta)] = P (I + U U^T) P = P."""
  _, s, _, outputs, _ = _move_inputs(r=rank, seed=rank)
  u = lml.low_rank_factor(outputs, 0.3, kappa=0.5)
  dense = jnp.eye(u.shape[1]) + jnp.einsum("bdi,bei->bde", u, u)
  np.testing.assert_allclose(lml.precondition(u, s), jnp.linalg.solve(dense, s[..., None])[..., 0], rtol=1e-10, atol=1e-12)
  p = jnp.linalg.inv(dense)
  np.testing.assert_allclose(p @ dense @ p, p, atol=1e-12)


def test_low_rank_hessian_vector_product_against_jvp():
  """(L2): sigma^2 H ~= -eps_hat eps_hat^T is exact in expectation over x ~ p_t (Fisher's identity), not pointwise.

  On a Gaussian H is constant: the Monte-Carlo mean of the low-rank product over N samples matches jax.jvp
  of the exact score to the sampling error (~ 1 / sqrt(N)); on a mixture, the means of both products agree
  to the same accuracy while single points are off by O(1)."""
  n = 8000
  t = 0.5
  alpha, sigma = SCHEDULE.alpha(t), SCHEDULE.sigma(t)
  for oracle in (analytic.gaussian(dim=4, seed=3), analytic.gmm(dim=4, seed=2)):
    x = oracle.sample(jax.random.key(1), n, alpha, sigma)
    v = jax.random.normal(jax.random.key(2), (4,), jnp.float64)

    @jax.jit
    def products(oracle, x, v):
      eps = oracle.eps(x, alpha, sigma)
      score = lambda y: -oracle.eps(y, alpha, sigma) / sigma  # noqa: E731
      exact = jax.jvp(score, (x,), (jnp.broadcast_to(v, x.shape),))[1]          # H(x) v, per sample
      return exact, lml.hessian_vector_product(eps[None], sigma, jnp.broadcast_to(v, x.shape))

    exact, approx = products(oracle, x, v)
    scale = float(jnp.linalg.norm(jnp.mean(exact, 0)))
    mean_err = float(jnp.linalg.norm(jnp.mean(approx, 0) - jnp.mean(exact, 0))) / scale
    assert mean_err < 5 / math.sqrt(n), (type(oracle).__name__, mean_err)
    point_err = float(jnp.median(jnp.linalg.norm(approx - exact, axis=1) / jnp.linalg.norm(exact, axis=1)))
    assert point_err > 0.3  # pointwise, a rank-1 product is no Hessian: the promise is in expectation
  # and jax.hessian of log p_t agrees with the jvp of the score on the mixture (the exact reference is right)
  hess = jax.jit(jax.hessian(lambda y: oracle.log_prob(y, alpha, sigma)))(x[0])
  np.testing.assert_allclose(hess @ v, exact[0], rtol=1e-8, atol=1e-10)


def test_nfe_counts_moves_inside_the_window_only():
  oracle = analytic.gaussian(dim=4, seed=3)
  counter = [0]
  den = battery.counting_denoiser(oracle, counter)
  x = jax.random.normal(jax.random.key(0), (3, 4), jnp.float64)
  grid = grids.uniform_logsnr(SCHEDULE, 8, final="zero")
  sig = np.asarray(grid.sigma[: grid.num_steps])
  for lo, hi, n_steps in ((0.0, math.inf, 1), (0.2, 0.9, 2), (5.0, 6.0, 1)):
    counter[0] = 0
    sol = solvers.sample(lml.LML(sigma_min=lo, sigma_max=hi, n_steps=n_steps), den, SCHEDULE, grid, x,
                         key=jax.random.key(1))
    jax.effects_barrier()
    expected = grid.num_steps + n_steps * int(np.sum((sig >= lo) & (sig <= hi) & (sig > 0)))
    assert int(sol.nfe) == counter[0] == expected, (lo, hi, int(sol.nfe), counter[0], expected)


def test_wraps_other_solvers_and_rejects_what_it_cannot():
  oracle = analytic.gmm(dim=4, seed=1)
  grid = grids.uniform_logsnr(SCHEDULE, 5)
  x = jax.random.normal(jax.random.key(0), (4, 4), jnp.float64)
  for name in ("unipc_bh2_2", "euler_maruyama_langevin"):
    if name not in solvers.available():
      continue
    sol = solvers.sample(lml.LML(predictor=solvers.get(name), rank=2), oracle.denoiser(SCHEDULE), SCHEDULE, grid, x,
                         key=jax.random.key(0))
    assert bool(jnp.all(jnp.isfinite(sol.x)))
  with pytest.raises(ValueError):
    lml.LML(damping=0.0)
  with pytest.raises(ValueError):
    lml.LML(predictor=solvers.get("dpm_solver_12"))
  with pytest.raises(ValueError):
    solvers.sample(lml.LML(predictor=solvers.get("edm_heun_churn")), oracle.denoiser(SCHEDULE), SCHEDULE, grid, x,
                   key=jax.random.key(0))


@pytest.mark.parametrize("reuse,base_name", [("x0", "ddim"), ("eps", "dpm_solver_pp_2m")])
def test_reuse_adds_no_model_call_and_a_null_move_is_the_base_solver(reuse, base_name):
  """reuse: the predictor takes the move's output, so NFE is the base solver's; with snr = 0 the move is null
  and the samples are the base solver's."""
  oracle = analytic.gmm(dim=4, seed=1)
  counter = [0]
  den = battery.counting_denoiser(oracle, counter)
  grid = grids.uniform_logsnr(SCHEDULE, 6, final="zero")
  x = jax.random.normal(jax.random.key(0), (8, 4), jnp.float64)
  for base_solver in (solvers.get(base_name),):
    ref = solvers.sample(base_solver, den, SCHEDULE, grid, x)
    counter[0] = 0
    sol = solvers.sample(lml.LML(predictor=base_solver, reuse=reuse), den, SCHEDULE, grid, x, key=jax.random.key(1))
    jax.effects_barrier()
    assert int(sol.nfe) == counter[0] == int(ref.nfe) == grid.num_steps
    assert float(jnp.max(jnp.abs(sol.x - ref.x))) > 1e-3
    null = solvers.sample(lml.LML(predictor=base_solver, reuse=reuse, snr=0.0), den, SCHEDULE, grid, x,
                          key=jax.random.key(1))
    np.testing.assert_allclose(null.x, ref.x, rtol=1e-10, atol=1e-10)
  with pytest.raises(ValueError):
    lml.LML(predictor=solvers.get("euler_maruyama_langevin"), reuse="x0")

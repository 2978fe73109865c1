"""Adaptive DPM-Solver-12 / -23: reaches t_end, error and NFE follow rtol, rejected attempts count, an
independent transcription of the paper's algorithm, the final jump to sigma = 0, the budget, jit / vmap."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import solvers
from models import analytic
from solvers import dpm_solver_adaptive as adaptive
from solvers import dpm_solver_singlestep as ss
from solvers import grids, schedules
from tests.test_battery import counting_denoiser

SCHEDULE = schedules.VPLinear()
GRID = grids.uniform_logsnr(SCHEDULE, 3)  # only its first and last nodes matter


def _x_T(oracle, n=8, seed=1):
  return oracle.sample(jax.random.key(seed), n, SCHEDULE.alpha(1.0), SCHEDULE.sigma(1.0))


def _rmse(a, b):
  return float(jnp.sqrt(jnp.mean((a - b) ** 2)))


def _exact(oracle, x, grid=GRID):
  n = int(grid.num_steps)
  return oracle.pf_ode_solution(x, grid.alpha[0], grid.sigma[0], grid.alpha[n], grid.sigma[n])


def _accepted(trajectory):
  """Attempts that moved x (a rejected attempt leaves it unchanged)."""
  return int(jnp.sum(jnp.any(trajectory[1:] != trajectory[:-1], axis=tuple(range(1, trajectory.ndim)))))


@pytest.mark.parametrize("order", [2, 3])
def test_reaches_t_end_exactly(order):
  oracle = analytic.gaussian(dim=4, seed=3)
  solver = adaptive.DPMSolverAdaptive(order=order)
  denoiser, x = oracle.denoiser(SCHEDULE), _x_T(oracle)
  state = solver.init(denoiser, SCHEDULE, GRID, x, jax.random.key(0))
  step = jax.jit(lambda s, i: solver.step(denoiser, SCHEDULE, GRID, {}, i, s))
  i = 0
  while not bool(state.done):
    state = step(state, i)
    i += 1
  assert float(state.t) == float(GRID.t[3]) and float(state.lam) == float(GRID.lam[3])
  assert int(state.nfe) == order * i and 3 < i < solver.max_attempts
  assert _rmse(state.x, _exact(oracle, x)) < 0.05


@pytest.mark.parametrize("order", [2, 3])
@pytest.mark.parametrize("prediction", adaptive.PREDICTIONS)
def test_error_falls_and_nfe_grows_as_rtol_falls(order, prediction):
  oracle = analytic.gaussian(dim=4, seed=3)
  x = _x_T(oracle)
  errors, nfes = [], []
  for rtol in (1e-2, 1e-3, 1e-4):
    solver = adaptive.DPMSolverAdaptive(order=order, prediction=prediction, rtol=rtol, atol=rtol / 10)
    sol = solvers.sample(solver, oracle.denoiser(SCHEDULE), SCHEDULE, GRID, x)
    errors.append(_rmse(sol.x, _exact(oracle, x)))
    nfes.append(int(sol.nfe))
  assert errors[0] > errors[1] > errors[2] and errors[2] < 1e-4, errors
  assert nfes[0] < nfes[1] < nfes[2] and all(n % order == 0 for n in nfes), nfes


@pytest.mark.parametrize("order", [2, 3])
def test_rejected_attempts_happen_for_a_large_first_step_and_count(order):
  oracle, counter = analytic.gmm(dim=3), [0]
  x = _x_T(oracle)
  attempts = {}
  for h_init in (0.05, 5.0):
    counter[0] = 0
    solver = adaptive.DPMSolverAdaptive(order=order, h_init=h_init, rtol=1e-3, atol=1e-4)
    sol = solvers.sample(solver, counting_denoiser(oracle, counter), SCHEDULE, GRID, x, return_trajectory=True)
    jax.effects_barrier()
    assert int(sol.nfe) == counter[0] > 0
    assert int(sol.nfe) % order == 0
    attempts[h_init] = (int(sol.nfe) // order, _accepted(sol.trajectory))
  tried, accepted = attempts[5.0]
  assert tried - accepted >= 2  # h = 5 and h = 5 * 0.9 E^(-1/order) at least are rejected
  assert attempts[0.05][0] - attempts[0.05][1] < tried - accepted


def _official_adaptive(oracle, x, order, prediction, rtol, atol, h_init=0.05, theta=0.9, t_err=1e-5):
  """An independent host-side transcription of the paper's Algorithm 4 / the official ``dpm_solver_adaptive``
  (spec section 4.3): lower / higher singlestep updates, batch-max RMS error, always-shrinking h."""
  t_0, t_T = SCHEDULE.t_min, SCHEDULE.t_max
  lam = lambda t: float(SCHEDULE.lam(jnp.asarray(t, jnp.float64)))
  coef = lambda l: tuple(float(v) for v in SCHEDULE.alpha_sigma_of_lambda(jnp.asarray(l, jnp.float64)))
  data = prediction == "data"

  def model(u, l):
    x0, eps = oracle.x0_eps(jnp.asarray(u), *coef(l))
    return np.asarray(x0 if data else eps)

  def updates(x, ls, lt):
    h = lt - ls
    a_s, s_s = coef(ls)

    def first(l, m):
      a, s = coef(l)
      return s / s_s * x - a * np.expm1(-(l - ls)) * m if data else a / a_s * x - s * np.expm1(l - ls) * m

    def w2(l):  # the signed alpha a2 / -sigma b2 factor
      a, s = coef(l)
      hh = l - ls
      return a * (np.expm1(-hh) / hh + 1.0) if data else -s * (np.expm1(hh) / hh - 1.0)

    def w1(l):
      a, s = coef(l)
      return -a * np.expm1(-(l - ls)) if data else -s * np.expm1(l - ls)

    m_s = model(x, ls)
    if order == 2:
      r1 = 0.5
      m_1 = model(first(ls + r1 * h, m_s), ls + r1 * h)
      return first(lt, m_s), first(lt, m_s) + w1(lt) / (2 * r1) * (m_1 - m_s), 2
    r1, r2 = 1.0 / 3.0, 2.0 / 3.0
    m_1 = model(first(ls + r1 * h, m_s), ls + r1 * h)
    low = first(lt, m_s) + w1(lt) / (2 * r1) * (m_1 - m_s)
    u_2 = first(ls + r2 * h, m_s) + (r2 / r1) * w2(ls + r2 * h) * (m_1 - m_s)
    m_2 = model(u_2, ls + r2 * h)
    return low, first(lt, m_s) + w2(lt) / r2 * (m_2 - m_s), 3

  x, x_prev = np.asarray(x), np.asarray(x)
  s, lam_s, lam_0, h, nfe = t_T, lam(t_T), lam(t_0), h_init, 0
  while abs(s - t_0) > t_err:
    lam_t = min(lam_s + h, lam_0)  # (the official first attempt is not clipped; with h_init = 0.05 it is moot)
    t = t_0 if lam_t == lam_0 else float(SCHEDULE.t_of_lambda(jnp.asarray(lam_t, jnp.float64)))
    low, high, calls = updates(x, lam_s, lam_t)
    delta = np.maximum(atol, rtol * np.maximum(np.abs(low), np.abs(x_prev)))
    err = np.max(np.sqrt(np.mean(((high - low) / delta) ** 2, axis=1)))
    if err <= 1.0:
      x, x_prev, s, lam_s = high, low, t, lam_t
    h = min(theta * h * err ** (-1.0 / order), lam_0 - lam_s)
    nfe += calls
  return x, nfe


@pytest.mark.parametrize("order", [2, 3])
@pytest.mark.parametrize("prediction", adaptive.PREDICTIONS)
def test_matches_an_independent_transcription_of_the_algorithm(order, prediction):
  oracle = analytic.gmm(dim=3)
  x = _x_T(oracle, n=4)
  solver = adaptive.DPMSolverAdaptive(order=order, prediction=prediction, rtol=1e-3, atol=1e-4)
  sol = solvers.sample(solver, oracle.denoiser(SCHEDULE), SCHEDULE, GRID, x)
  theirs, nfe = _official_adaptive(oracle, x, order, prediction, 1e-3, 1e-4)
  assert int(sol.nfe) == nfe
  np.testing.assert_allclose(sol.x, theirs, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("prediction", adaptive.PREDICTIONS)
def test_final_zero_ends_with_a_denoising_jump(prediction):
  oracle = analytic.gmm(dim=3)
  x = _x_T(oracle)
  zero = grids.uniform_logsnr(SCHEDULE, 4, final="zero")
  before = grids.from_times(SCHEDULE, zero.times()[:4])  # the same start and the last finite node
  solver = adaptive.DPMSolverAdaptive(order=3, prediction=prediction)
  at_zero = solvers.sample(solver, oracle.denoiser(SCHEDULE), SCHEDULE, zero, x)
  at_end = solvers.sample(solver, oracle.denoiser(SCHEDULE), SCHEDULE, before, x)
  t = before.times()[-1]
  np.testing.assert_allclose(at_zero.x, oracle.x0(at_end.x, SCHEDULE.alpha(t), SCHEDULE.sigma(t)), rtol=1e-10,
                             atol=1e-12)
  assert int(at_zero.nfe) == int(at_end.nfe) + 3
  # One step with final='zero': no adaptive part, only the jump.
  one = solvers.sample(solver, oracle.denoiser(SCHEDULE), SCHEDULE, grids.uniform_logsnr(SCHEDULE, 1, final="zero"), x)
  np.testing.assert_allclose(one.x, oracle.x0(x, SCHEDULE.alpha(1.0), SCHEDULE.sigma(1.0)), rtol=1e-10, atol=1e-12)
  assert int(one.nfe) == 3


def test_out_of_budget_is_nan():
  oracle = analytic.gaussian(dim=4, seed=3)
  sol = solvers.sample(adaptive.DPMSolverAdaptive(order=2, max_attempts=4), oracle.denoiser(SCHEDULE), SCHEDULE,
                       GRID, _x_T(oracle))
  assert bool(jnp.all(jnp.isnan(sol.x))) and int(sol.nfe) == 8


def test_error_norm_is_the_batch_max_rms():
  low = jnp.zeros((2, 4))
  high = jnp.array([[1.0, 1.0, 1.0, 1.0], [2.0, 0.0, 0.0, 0.0]]) * 0.01
  e = adaptive.error_norm(high, low, low, rtol=0.5, atol=0.01)
  np.testing.assert_allclose(e, 1.0)  # RMS 1 for both samples


def test_jit_and_vmap():
  oracle = analytic.gaussian(dim=4, seed=3)
  x = _x_T(oracle, n=4)
  solver = solvers.get("dpm_solver_pp_23")

  def one(x1):
    sol = solvers.sample(solver, oracle.denoiser(SCHEDULE), SCHEDULE, GRID, x1[None])
    return sol.x[0], sol.nfe

  xs, nfes = jax.jit(jax.vmap(one))(x)
  looped = [one(x[i]) for i in range(4)]
  np.testing.assert_allclose(xs, jnp.stack([v for v, _ in looped]), rtol=1e-12, atol=1e-12)
  assert [int(n) for n in nfes] == [int(n) for _, n in looped]  # each sample its own step sizes
  batch = solvers.sample(solver, oracle.denoiser(SCHEDULE), SCHEDULE, GRID, x)
  assert _rmse(batch.x, _exact(oracle, x)) < 0.05


def test_registered_names_and_bad_options():
  for name, order, prediction in (("dpm_solver_12", 2, "noise"), ("dpm_solver_23", 3, "noise"),
                                  ("dpm_solver_pp_12", 2, "data"), ("dpm_solver_pp_23", 3, "data")):
    solver = solvers.get(name)
    assert (solver.order, solver.declared_order, solver.prediction) == (order, order, prediction)
    assert solver.adaptive and not solver.stochastic
    assert (solver.rtol, solver.atol, solver.h_init, solver.theta, solver.t_err) == (0.05, 0.0078, 0.05, 0.9, 1e-5)
  assert not ss.DPMSolverSinglestep().adaptive
  for options, match in (({"order": 1}, "order=1"), ({"rtol": 0.0, "atol": 0.0}, "rtol=0.0"),
                         ({"h_init": -1.0}, "h_init=-1.0"), ({"theta": 1.5}, "theta=1.5"),
                         ({"max_attempts": 0}, "max_attempts=0"), ({"prediction": "v"}, "prediction='v'")):
    with pytest.raises(ValueError, match=match):
      adaptive.DPMSolverAdaptive(**options)

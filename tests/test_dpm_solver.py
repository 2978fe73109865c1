"""Multistep DPM-Solver / DPM-Solver++: exactness on polynomial predictions, the 3M weight (spec P1),
the per-step order rules and thresholding."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import solvers
from models import analytic
from solvers import dpm_solver_multistep as dpm
from solvers import exponential, grids, schedules

SCHEDULE = schedules.VPLinear()


def _x_T(oracle, n=8, seed=1):
  return oracle.sample(jax.random.key(seed), n, SCHEDULE.alpha(1.0), SCHEDULE.sigma(1.0))


@pytest.mark.parametrize("prediction", dpm.PREDICTIONS)
@pytest.mark.parametrize("final", grids.FINAL_POLICIES)
def test_first_order_is_ddim(prediction, final):
  oracle = analytic.gmm(dim=3)
  grid = grids.uniform_logsnr(SCHEDULE, 9, final=final)
  ours = solvers.sample(dpm.DPMSolverMultistep(order=1, prediction=prediction), oracle.denoiser(SCHEDULE),
                        SCHEDULE, grid, _x_T(oracle)).x
  ddim = solvers.sample("ddim", oracle.denoiser(SCHEDULE), SCHEDULE, grid, _x_T(oracle)).x
  np.testing.assert_allclose(ours, ddim, rtol=1e-10, atol=1e-12)


def _polynomial_denoiser(coefficients, kind):
  """A model whose ``kind`` prediction is sum_k c_k lambda^k, whatever x (so the ODE is linear in x)."""
  def apply_fn(params, x, lam, cond):
    return jnp.broadcast_to(sum(c * lam**k for k, c in enumerate(params)), x.shape)

  return solvers.Denoiser(apply_fn=apply_fn, params=tuple(coefficients), prediction=kind, time_label="lambda")


def _exact_step(x_s, lam_s, lam_t, coefficients, prediction):
  """x_t of the exponential integrator with a polynomial m(lambda), by 60-point Gauss-Legendre (exact here)."""
  nodes, weights = np.polynomial.legendre.leggauss(60)
  lam = 0.5 * (lam_t - lam_s) * nodes + 0.5 * (lam_t + lam_s)
  m = sum(c * lam**k for k, c in enumerate(coefficients))
  alpha = lambda l: np.sqrt(1 / (1 + np.exp(-2 * l)))
  sigma = lambda l: np.sqrt(1 / (1 + np.exp(2 * l)))
  if prediction == "data":
    integral = 0.5 * (lam_t - lam_s) * np.sum(weights * np.exp(-(lam_t - lam)) * m)
    return sigma(lam_t) / sigma(lam_s) * x_s + alpha(lam_t) * integral
  integral = 0.5 * (lam_t - lam_s) * np.sum(weights * np.exp(lam_t - lam) * m)
  return alpha(lam_t) / alpha(lam_s) * x_s - sigma(lam_t) * integral


def _step_error_with_exact_history(solver, coefficients, step):
  """Runs ``step`` steps, resetting x to the exact solution before the last one (so the history is exact
  and only that step's error remains); returns |x - exact| after it."""
  kind = "x0" if solver.prediction == "data" else "eps"
  denoiser = _polynomial_denoiser(coefficients, kind)
  grid = grids.from_times(SCHEDULE, np.array([0.9, 0.7, 0.45, 0.3, 0.2]))
  lam = np.asarray(grid.lam)
  coeffs = solver.coefficients(grid, SCHEDULE)
  state = solver.init(denoiser, SCHEDULE, grid, jnp.ones((1, 2)), jax.random.key(0))
  x = 1.0
  for i in range(step + 1):
    x = _exact_step(x, lam[0], lam[i], coefficients, solver.prediction) if i else 1.0
    state = state._replace(x=jnp.full((1, 2), x), anchor=jnp.full((1, 2), x))
    state = solver.step(denoiser, SCHEDULE, grid, jax.tree_util.tree_map(lambda c, i=i: c[i], coeffs), i, state)
  exact = _exact_step(x, lam[step], lam[step + 1], coefficients, solver.prediction)
  return float(jnp.max(jnp.abs(state.x - exact)))


LINEAR, QUADRATIC = (0.3, -0.7), (0.3, -0.7, 0.4)


@pytest.mark.parametrize("prediction", dpm.PREDICTIONS)
def test_exactness_on_polynomial_predictions(prediction):
  get = lambda **kw: dpm.DPMSolverMultistep(prediction=prediction, lower_order_final=False, **kw)
  # 2M heun (taylor) and 3M are exact for linear m(lambda); 2M midpoint is not (second order only).
  assert _step_error_with_exact_history(get(order=2, solver_type="heun"), LINEAR, 1) < 1e-12
  assert _step_error_with_exact_history(get(order=3), LINEAR, 2) < 1e-12
  assert _step_error_with_exact_history(get(order=2, solver_type="midpoint"), LINEAR, 1) > 1e-4
  # Spec P1: only the exactly-integrated 3M is exact for quadratic m(lambda).
  assert _step_error_with_exact_history(get(order=3, third_order="exact"), QUADRATIC, 2) < 1e-12
  assert _step_error_with_exact_history(get(order=3, third_order="reference"), QUADRATIC, 2) > 1e-4


def test_reference_3m_converges_with_order_2_and_the_exact_one_with_order_3():
  """Spec P1, measured on the closed-form Gaussian (non-uniform lambda grid, 40/80/160 steps)."""
  from tests.test_battery import order_test_grid
  oracle = analytic.gaussian(dim=4, seed=3)
  x = _x_T(oracle)
  slopes, last = {}, {}
  for variant in dpm.THIRD_ORDER:
    solver = dpm.DPMSolverMultistep(order=3, third_order=variant, lower_order_final=False)
    errors = []
    for steps in (40, 80, 160):
      grid = order_test_grid(steps)
      exact = oracle.pf_ode_solution(x, grid.alpha[0], grid.sigma[0], grid.alpha[steps], grid.sigma[steps])
      errors.append(float(jnp.sqrt(jnp.mean((solvers.sample(solver, oracle.denoiser(SCHEDULE), SCHEDULE, grid,
                                                                   x).x - exact) ** 2))))
    slopes[variant] = -np.polyfit(np.log([40, 80, 160]), np.log(errors), 1)[0]
    last[variant] = errors[-1]
  assert slopes["reference"] < 2.45 and slopes["exact"] > 2.8, slopes
  assert last["exact"] < last["reference"] / 5, last


@pytest.mark.parametrize("below,num_steps,expected", [
    (10, 9, [1, 2, 3, 3, 3, 3, 3, 2, 1]),      # official: fewer than 10 steps
    (10, 10, [1, 2, 3, 3, 3, 3, 3, 3, 3, 3]),
    (15, 14, [1, 2] + [3] * 10 + [2, 1]),     # diffusers: fewer than 15 steps
    (15, 15, [1, 2] + [3] * 13),
    (None, 20, [1, 2] + [3] * 16 + [2, 1]),   # always (UniPC / DPM-Solver-v3 style)
])
def test_lower_order_final_rule(below, num_steps, expected):
  zero = jnp.zeros(num_steps, bool)
  got = dpm.multistep_orders(num_steps, num_steps, 3, True, below, zero)
  assert list(np.asarray(got)) == expected
  off = dpm.multistep_orders(num_steps, num_steps, 3, False, below, zero)
  assert list(np.asarray(off)) == [1, 2] + [3] * (num_steps - 2)
  # A step into sigma = 0 is first order whatever the rule.
  into_zero = dpm.multistep_orders(num_steps, num_steps, 3, False, below, zero.at[-1].set(True))
  assert int(into_zero[-1]) == 1


def test_orders_follow_the_traced_step_count():
  """The order table is computed from grid.num_steps inside jit (one compilation for every N)."""
  solver = dpm.DPMSolverMultistep(order=3, lower_order_final_below=None)
  f = jax.jit(lambda n: dpm.multistep_orders(n, 12, 3, True, None, jnp.zeros(12, bool)))
  assert list(np.asarray(f(6)))[:6] == [1, 2, 3, 3, 2, 1]
  assert list(np.asarray(f(12))) == [1, 2] + [3] * 8 + [2, 1]
  assert solver.declared_order == 2 and dpm.DPMSolverMultistep(order=3, third_order="exact").declared_order == 3


def test_weights_are_accurate_for_small_and_infinite_steps():
  h = jnp.array([1e-8, 1e-3, 0.05, 0.2, 3.0])
  for k in (1, 2, 3, 4):
    # Reference values from the series / closed forms in float64 with extra care: h phi_k(-h).
    ref = []
    for v in np.asarray(h):
      terms = sum((-v) ** n / math.factorial(n + k) for n in range(40))
      ref.append(v * terms)
    rtol = 1e-13 if k < 4 else 1e-12  # phi_4's recurrence cancels ~3e-13 just above the series' range (h = 0.2)
    np.testing.assert_allclose(exponential.data_weight(k, h), ref, rtol=rtol)
    ref_b = [v * sum(v ** n / math.factorial(n + k) for n in range(40)) for v in np.asarray(h)]
    np.testing.assert_allclose(exponential.noise_weight(k, h), ref_b, rtol=rtol)
    assert float(exponential.data_weight(k, jnp.inf)) == 1.0 / math.factorial(k - 1)
  with jax.enable_x64(False):  # float32 (the default): no catastrophic cancellation, no int32 overflow of (n + k)!
    np.testing.assert_allclose(exponential.data_weight(3, jnp.float32(1e-3)), 1e-3 * (1 / 6 - 1e-3 / 24), rtol=1e-6)
    for k in (1, 2, 3, 4):
      h32 = jnp.asarray(h, jnp.float32)
      ref = [v * sum((-v) ** n / math.factorial(n + k) for n in range(40)) for v in np.asarray(h)]
      np.testing.assert_allclose(exponential.data_weight(k, h32), ref, rtol=1e-5)
      ref_b = [v * sum(v ** n / math.factorial(n + k) for n in range(40)) for v in np.asarray(h)]
      np.testing.assert_allclose(exponential.noise_weight(k, h32), ref_b, rtol=1e-5)


def test_thresholding_option_bounds_the_data_prediction():
  oracle = analytic.GMM(weights=jnp.array([0.5, 0.5]), means=jnp.array([[2.5, -2.5], [-2.0, 3.0]]),
                        stds=jnp.full((2, 1), 0.2))
  grid = grids.uniform_logsnr(SCHEDULE, 10, final="zero")
  plain = solvers.sample("dpm_solver_pp_2m", oracle.denoiser(SCHEDULE), SCHEDULE, grid, _x_T(oracle)).x
  clipped = solvers.sample(solvers.get("dpm_solver_pp_2m", thresholding=True), oracle.denoiser(SCHEDULE),
                           SCHEDULE, grid, _x_T(oracle)).x
  assert float(jnp.max(jnp.abs(plain))) > 1.5
  assert float(jnp.max(jnp.abs(clipped))) <= 1.0 + 1e-12


def test_bad_options():
  with pytest.raises(ValueError, match="order=4"):
    dpm.DPMSolverMultistep(order=4)
  with pytest.raises(ValueError, match="solver_type='rk'"):
    dpm.DPMSolverMultistep(solver_type="rk")
  with pytest.raises(ValueError, match="third_order='double'"):
    dpm.DPMSolverMultistep(third_order="double")

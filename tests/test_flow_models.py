"""Flow matching / rectified-flow velocity models run through every deterministic solver.

The oracle is Gaussian data under ``schedules.Flow`` (alpha = 1 - t, sigma = t, the linear interpolant) with
a denoiser that predicts the velocity u = alpha' x0 + sigma' eps = eps - x0; solvers reach it only through
the schedule and the prediction conversions. In lambda, the data-form PF-ODE of x / sigma (and the noise form
of x / alpha) is the same for every schedule, so on the battery's lambda range and grid the flow problem is
the battery's problem; what is flow-specific is reached through Flow's alpha, sigma and t(lambda), the
velocity conversion, the start at pure noise (t = 1: alpha = 0, lambda = -inf) and the end at t = 0 (x = x0).

Where a solver starts (``STARTS_AT_PURE_NOISE``, measured): data-form multistep updates step from alpha_s = 0
exactly (x_t = sigma_t x_s + alpha_t a1(inf) x0 with a1(inf) = 1), so they start at t = 1. The others (and
solvers registered later, until they are listed there) start at ``T_START`` (lambda = -12, alpha = 6e-6):
noise-form updates multiply by alpha_t / alpha_s (DDIM's eps form, DPM-Solver, DEIS, the PNDM family, EDM's
Euler / Heun in x / alpha); a singlestep group needs its inner nodes at finite r = (lambda_i - lambda_s) / h,
undefined for h = inf (DPM-Solver++ 2S / 3S); DPM-Solver-v3's step weights integrate its statistics from
lambda_s. Both starts share every node after the first, so every order is measured on one grid shape, with
each solver's order caps off and the battery's tolerance.
"""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import solvers
from models import analytic
from solvers import grids, reference, schedules
from tests import test_battery as battery

FLOW = schedules.Flow()
STEPS = (80, 160, 320)
CAPACITY = 512
LAM_START = -12.0                                   # first node after t = 1: alpha = 6e-6
LAM_END = battery.order_test_lambda_range()[1]      # the battery's end: t = 0.0099 under Flow
T_START = float(FLOW.t_of_lambda(LAM_START))
STARTS_AT_PURE_NOISE = {
    "ddim", "dpm_solver_pp_2m", "dpm_solver_pp_3m", "dpm_solver_pp_3m_exact", "dpm_solver_pp_2m_unic", "unipc_bh1_1",
    "unipc_bh1_2", "unipc_bh1_3", "unipc_bh2_1", "unipc_bh2_2", "unipc_bh2_3", "dc_solver", "dpm_solver_pp_2m_hb",
    "teleport_dpm_solver_pp_2m", "ts_ddim", "ts_dpm_solver_pp_2m"}
ADAPTIVE = [name for name in battery.DETERMINISTIC if solvers.get(name).adaptive]


def _gaussian():
  return analytic.gaussian(dim=4, seed=3)


def _rmse(a, b):
  return float(jnp.sqrt(jnp.mean((a - b) ** 2)))


def _slope(steps, errors):
  return -np.polyfit(np.log(steps), np.log(errors), 1)[0]


def flow_grid(steps, t_start, final="t_end"):
  """The battery's lambda spacing from LAM_START to LAM_END under Flow, its first node moved to t_start (t = 1:
  the first step starts from alpha = 0 instead of 6e-6; every later node is shared)."""
  times = np.array(FLOW.t_of_lambda(jnp.asarray(battery.nonuniform_lambdas(steps, LAM_START, LAM_END))))
  times[0] = t_start
  return grids.from_times(FLOW, times, final=final, capacity=CAPACITY)


def _pure_noise(oracle, n=8, seed=1):
  return oracle.sample(jax.random.key(seed), n, 0.0, 1.0)


def _start(oracle, t_start):
  """x at t_start on the PF-ODE trajectories from the same pure noise (so both starts sample the same)."""
  return oracle.pf_ode_solution(_pure_noise(oracle), 0.0, 1.0, FLOW.alpha(t_start), FLOW.sigma(t_start))


def test_velocity_oracle_is_the_time_derivative_of_the_closed_form_trajectory():
  oracle = _gaussian()
  denoiser = oracle.denoiser(FLOW, prediction="velocity")
  z = _pure_noise(oracle)

  def x_at(t):
    return oracle.pf_ode_solution(z, 0.0, 1.0, FLOW.alpha(t), FLOW.sigma(t))

  delta = 1e-5
  for t in (0.02, 0.3, 0.7, 0.98):
    finite_difference = (x_at(t + delta) - x_at(t - delta)) / (2 * delta)
    np.testing.assert_allclose(denoiser.predict("velocity", x_at(t), t, FLOW), finite_difference, rtol=1e-8, atol=1e-8)
  # At pure noise (alpha = 0) the one-sided second-order difference.
  one_sided = (-3 * x_at(1.0) + 4 * x_at(1.0 - delta) - x_at(1.0 - 2 * delta)) / (-2 * delta)
  np.testing.assert_allclose(denoiser.predict("velocity", z, 1.0, FLOW), one_sided, rtol=1e-8, atol=1e-8)
  # u = eps - x0 under Flow, and the conversions invert the velocity at every t.
  for t in (0.0, 0.5, 1.0):
    x = x_at(t)
    eps, x0 = denoiser.predict("eps", x, t, FLOW), denoiser.predict("x0", x, t, FLOW)
    np.testing.assert_allclose(denoiser.predict("velocity", x, t, FLOW), eps - x0, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(FLOW.alpha(t) * x0 + FLOW.sigma(t) * eps, x, rtol=1e-12, atol=1e-12)


def zero_floor(oracle, x, t_start):
  """The error at t = 0 of a first-order last step from the exact x at t_end: x0(x(t_end)) against x(0)."""
  t_end = FLOW.t_of_lambda(LAM_END)
  at_t_end = oracle.pf_ode_solution(x, FLOW.alpha(t_start), FLOW.sigma(t_start), FLOW.alpha(t_end), FLOW.sigma(t_end))
  at_zero = oracle.pf_ode_solution(x, FLOW.alpha(t_start), FLOW.sigma(t_start), 1.0, 0.0)
  return _rmse(oracle.x0(at_t_end, FLOW.alpha(t_end), FLOW.sigma(t_end)), at_zero)


def _run(solver, oracle, t_start, steps, final):
  """(sample, exact answer at the grid's last node) from the PF-ODE trajectories of the same pure noise."""
  x, grid = _start(oracle, t_start), flow_grid(steps, t_start, final)
  end = grid.num_steps
  exact = oracle.pf_ode_solution(x, grid.alpha[0], grid.sigma[0], grid.alpha[end], grid.sigma[end])
  return solvers.sample(solver, oracle.denoiser(FLOW, prediction="velocity"), FLOW, grid, x).x, exact


# EDICT's coupled steps amplify the x / y gap by alpha_{i+1} / alpha_i, which is huge from near-pure noise:
# its coarsest point here is far off (0.11 vs 0.012), so the slope is pre-asymptotic; the battery checks its order.
FLOW_ORDER = [name for name in battery.FIXED_GRID if name != "edict"]


@pytest.mark.parametrize("name", FLOW_ORDER)
def test_declared_order_on_the_flow_gaussian_from_pure_noise_where_possible(name):
  """The declared order to t_end; into t = 0 (x = x0) the last step is first order for most solvers, so its
  error has a floor: at most that floor (the exact x at t_end, denoised) plus twice the error at t_end."""
  solver, oracle = solvers.get(name).for_order_measurement(), _gaussian()
  t_start = 1.0 if name in STARTS_AT_PURE_NOISE else T_START
  errors = []
  for steps in STEPS:
    x, exact = _run(solver, oracle, t_start, steps, "t_end")
    errors.append(_rmse(x, exact))
    error_zero = _rmse(*_run(solver, oracle, t_start, steps, "zero"))
    floor = zero_floor(oracle, _start(oracle, t_start), t_start)
    assert error_zero <= floor + 2 * errors[-1], (name, steps, error_zero, floor)
  slope = _slope(STEPS, errors)
  declared = solvers.get(name).declared_order
  assert slope >= declared - battery.ORDER_TOLERANCE, (name, t_start, declared, slope, errors)
  if not solver.superconverges_on_linear_problems:
    assert slope <= declared + battery.ORDER_TOLERANCE, (name, t_start, declared, slope, errors)


@pytest.fixture(scope="module")
def gmm_reference():
  """A mixture under Flow: x at T_START (from pure noise, through the diffrax reference) and at t_end."""
  oracle = analytic.gmm(dim=4, seed=2)
  denoiser = oracle.denoiser(FLOW, prediction="velocity")
  t_end = float(FLOW.t_of_lambda(LAM_END))
  x_start = oracle.sample(jax.random.key(5), 8, FLOW.alpha(T_START), FLOW.sigma(T_START))
  return oracle, x_start, reference.solve(denoiser, FLOW, x_start, T_START, t_end)


@pytest.mark.parametrize("name", ["unipc_bh2_3", "dpm_solver_3s"])
def test_mixture_under_flow_matches_the_reference(gmm_reference, name):
  """A data-form multistep and a noise-form singlestep solver on the velocity model of a mixture converge to
  diffrax's answer, at least with order 2 (the mixture is pre-asymptotic here: measured 2.8 and 4.8)."""
  oracle, x_start, exact = gmm_reference
  solver = solvers.get(name).for_order_measurement()
  errors = [_rmse(solvers.sample(solver, oracle.denoiser(FLOW, prediction="velocity"), FLOW,
                                 flow_grid(steps, T_START), x_start).x, exact) for steps in STEPS[:2]]
  assert errors[1] < 1e-4 and _slope(STEPS[:2], errors) > 2, errors


@pytest.mark.parametrize("name", ADAPTIVE)
def test_adaptive_solver_reaches_its_tolerance_on_the_flow_gaussian(name):
  """Over the battery's lambda range (the adaptive step needs a finite lambda at the start) to t_end and to
  t = 0, with rtol 1e-3."""
  oracle = _gaussian()
  solver = dataclasses.replace(solvers.get(name), rtol=1e-3, atol=1e-4)
  lam_start = battery.order_test_lambda_range()[0]
  t_start = FLOW.t_of_lambda(lam_start)
  x = _start(oracle, t_start)
  errors = {}
  for final in grids.FINAL_POLICIES:
    grid = grids.from_times(FLOW, np.array(FLOW.t_of_lambda(jnp.asarray([lam_start, LAM_END]))), final=final)
    end = grid.num_steps
    exact = oracle.pf_ode_solution(x, grid.alpha[0], grid.sigma[0], grid.alpha[end], grid.sigma[end])
    errors[final] = _rmse(solvers.sample(solver, oracle.denoiser(FLOW, prediction="velocity"), FLOW, grid, x).x, exact)
  assert errors["t_end"] < solver.rtol * _rmse(x, 0.0) + solver.atol, errors
  assert errors["zero"] < zero_floor(oracle, x, t_start) + 2 * errors["t_end"], errors

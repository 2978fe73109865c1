"""Singlestep DPM-Solver / DPM-Solver++: DDIM at order 1, the official and diffusers order schedules, final
steps to sigma = 0, exactness on polynomial predictions, the official logSNR grid and an independent
re-implementation of the official algorithm on it, measured orders."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import solvers
from models import analytic
from solvers import ddim, grids, schedules
from solvers import dpm_solver_multistep as multistep
from solvers import dpm_solver_singlestep as ss

SCHEDULE = schedules.VPLinear()


def _x_T(oracle, n=8, seed=1):
  return oracle.sample(jax.random.key(seed), n, SCHEDULE.alpha(1.0), SCHEDULE.sigma(1.0))


def _official_orders(n, order):
  """DPM-Solver-fast (official ``method='singlestep'``), as listed in the spec, section 4.1."""
  if order == 3:
    k = n // 3 + 1
    return {0: [3] * (k - 2) + [2, 1], 1: [3] * (k - 1) + [1], 2: [3] * (k - 1) + [2]}[n % 3]
  if order == 2:
    return [2] * (n // 2) if n % 2 == 0 else [2] * (n // 2) + [1]
  return [1] * n


def _diffusers_orders(n, order):
  """diffusers' DPMSolverSinglestepScheduler.order_list (lower_order_final=True) folded into groups: a run
  1, 2, ..., k of its per-step orders is one group of order k."""
  if order == 3:
    steps = {0: [1, 2, 3] * (n // 3 - 1) + [1, 2, 1], 1: [1, 2, 3] * (n // 3) + [1],
             2: [1, 2, 3] * (n // 3) + [1, 2]}[n % 3]
  elif order == 2:
    steps = [1, 2] * (n // 2 - 1) + [1, 1] if n % 2 == 0 else [1, 2] * (n // 2) + [1]
  else:
    steps = [1] * n
  groups = []
  for s in steps:
    if s == 1:
      groups.append(1)
    else:
      groups[-1] += 1
  return groups


_stages = jax.jit(lambda solver, grid: solver.stages(grid), static_argnums=0)


def _groups(solver, grid):
  """The group orders the solver uses on ``grid``, read off its per-iteration arrays (and checked)."""
  start, stage, k = (np.asarray(a) for a in _stages(solver, grid))
  n = int(grid.num_steps)
  assert np.all(start[:n] + stage[:n] == np.arange(n))
  assert np.all((stage[:n] < k[:n]) & (stage[:n] >= 0))
  firsts = np.flatnonzero(stage[:n] == 0)
  assert np.all(start[firsts] == firsts)
  groups = [int(k[i]) for i in firsts]
  assert sum(groups) == n and all(np.all(k[i:i + g] == g) for i, g in zip(firsts, groups))
  return groups


@pytest.mark.parametrize("order", [1, 2, 3])
def test_order_schedules_follow_the_official_and_diffusers_lists(order):
  for n in range(1, 13):
    grid = grids.uniform_logsnr(SCHEDULE, n)
    assert _groups(ss.DPMSolverSinglestep(order=order), grid) == _official_orders(n, order), n
    assert _groups(ss.DPMSolverSinglestep(order=order, schedule="diffusers"), grid) == _diffusers_orders(n, order), n
    fixed = [order] * (n // order) + ([n % order] if n % order else [])
    assert _groups(ss.DPMSolverSinglestep(order=order, schedule="fixed"), grid) == fixed, n
    max_order = _groups(ss.DPMSolverSinglestep(order=order, schedule="max_order"), grid)
    assert max_order.count(order) == (n // order - (order == 3 and n % 3 == 1 and n > 3)), n
    assert order == 1 or n == 1 or order == 2 and n % 2 or 1 not in max_order, (n, max_order)
  # Only order 2 with even N tells diffusers from the official schedule.
  assert _diffusers_orders(8, 2) == [2, 2, 2, 1, 1] != _official_orders(8, 2)


def test_group_orders_with_a_traced_step_count():
  orders = jax.jit(lambda n: ss.group_orders(n, 16, 3))(jnp.asarray(11))
  assert list(np.asarray(orders)) == [3, 3, 3, 2] + [0] * 12


@pytest.mark.parametrize("prediction", ss.PREDICTIONS)
@pytest.mark.parametrize("final", grids.FINAL_POLICIES)
def test_first_order_is_ddim(prediction, final):
  oracle = analytic.gmm(dim=3)
  grid = grids.uniform_logsnr(SCHEDULE, 9, final=final)
  ours = solvers.sample(ss.DPMSolverSinglestep(order=1, prediction=prediction), oracle.denoiser(SCHEDULE),
                        SCHEDULE, grid, _x_T(oracle)).x
  form = "x0" if prediction == "data" else "eps"
  reference = solvers.sample(ddim.DDIM(form=form), oracle.denoiser(SCHEDULE), SCHEDULE, grid, _x_T(oracle)).x
  np.testing.assert_allclose(ours, reference, rtol=1e-12, atol=1e-13)


def test_final_zero_is_finite_and_its_last_stage_first_order():
  oracle = analytic.gmm(dim=3)
  x = _x_T(oracle).astype(jnp.float32)
  for order, schedule, prediction in ((2, "official", "noise"), (3, "official", "data"), (3, "fixed", "noise"),
                                      (2, "diffusers", "data")):
    solver = ss.DPMSolverSinglestep(order=order, prediction=prediction, schedule=schedule)
    for n in range(1, 13):
      grid = grids.uniform_logsnr(SCHEDULE, n, final="zero")
      groups = _groups(solver, grid)
      assert groups[-1] == 1, (order, schedule, n, groups)
      plain = _groups(solver, grids.uniform_logsnr(SCHEDULE, n))
      expected = plain if plain[-1] == 1 else plain[:-1] + [plain[-1] - 1, 1]  # [k] -> [k - 1, 1]
      assert groups == expected, (order, schedule, n)
      sol = solvers.sample(solver, oracle.denoiser(SCHEDULE), SCHEDULE, grid, x)
      assert sol.x.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(sol.x))), (order, schedule, n)
      assert int(sol.nfe) == n


def _quadratic_in_lambda(params, x, lam, cond):
  return jnp.broadcast_to(params[0] + params[1] * lam + params[2] * lam**2, x.shape)


def _polynomial_denoiser(coefficients, kind):
  """A model predicting ``kind`` = c0 + c1 lambda + c2 lambda^2 whatever x (so the ODE is linear in x)."""
  return solvers.Denoiser(apply_fn=_quadratic_in_lambda, params=tuple(coefficients), prediction=kind,
                          time_label="lambda")


def _exact_polynomial_solution(x_s, lam_s, lam_t, c, prediction):
  """The exact solution for m(lambda) = c0 + c1 lambda + c2 lambda^2, from the antiderivatives
  d/dl [e^l (p - p' + p'')] = e^l p and d/dl [-e^-l (p + p' + p'')] = e^-l p of a quadratic p."""
  p = np.polynomial.Polynomial(c)
  alpha = lambda l: np.sqrt(1.0 / (1.0 + np.exp(-2.0 * l)))
  sigma = lambda l: np.sqrt(1.0 / (1.0 + np.exp(2.0 * l)))
  if prediction == "data":  # x_t = (sigma_t / sigma_s) x_s + alpha_t int e^{l - l_t} p(l) dl
    q = p - p.deriv(1) + p.deriv(2)
    return sigma(lam_t) / sigma(lam_s) * x_s + alpha(lam_t) * (q(lam_t) - np.exp(lam_s - lam_t) * q(lam_s))
  r = p + p.deriv(1) + p.deriv(2)  # x_t = (alpha_t / alpha_s) x_s - sigma_t int e^{l_t - l} p(l) dl
  return alpha(lam_t) / alpha(lam_s) * x_s - sigma(lam_t) * (np.exp(lam_t - lam_s) * r(lam_s) - r(lam_t))


@pytest.mark.parametrize("prediction", ss.PREDICTIONS)
def test_heun_forms_are_exact_for_polynomial_predictions(prediction):
  kind = "x0" if prediction == "data" else "eps"
  times = np.array([0.8, 0.62, 0.5, 0.41, 0.3, 0.24, 0.17, 0.12, 0.1, 0.07, 0.05, 0.042, 0.03])  # 12 uneven steps
  grid = grids.from_times(SCHEDULE, times)
  lam = np.asarray(grid.lam)
  x = jnp.linspace(-1.0, 1.5, 6).reshape(2, 3)
  quadratic, linear = (0.3, -0.2, 0.05), (0.3, -0.2, 0.0)

  def error(solver, c, begin=0):
    sol = solvers.sample(solver, _polynomial_denoiser(c, kind), SCHEDULE, grid, x, return_trajectory=True)
    exact = _exact_polynomial_solution(np.asarray(sol.trajectory[begin]), lam[begin], lam[12], c, prediction)
    return float(np.max(np.abs(np.asarray(sol.x) - exact)))

  heun3 = ss.DPMSolverSinglestep(order=3, prediction=prediction, solver_type="heun", schedule="fixed")
  heun2 = ss.DPMSolverSinglestep(order=2, prediction=prediction, solver_type="heun", schedule="fixed")
  assert error(heun3, quadratic) < 1e-12
  assert error(heun2, linear) < 1e-12
  # 2M heun after its first-order first step (from node 1 on, with the model history exact).
  heun2m = multistep.DPMSolverMultistep(order=2, prediction=prediction, solver_type="heun", lower_order_final=False)
  assert error(heun2m, linear, begin=1) < 1e-12
  # The checks can fail: one order less, or the midpoint forms, are not exact.
  assert error(heun2, quadratic) > 1e-5
  assert error(dataclasses.replace(heun3, solver_type="midpoint"), quadratic) > 1e-6


@pytest.mark.parametrize("order", [2, 3])
def test_official_logsnr_grid_places_nodes_as_documented(order):
  lam_start, lam_end = (float(SCHEDULE.lam(t)) for t in (SCHEDULE.t_max, SCHEDULE.t_min))
  for nfe in range(1, 13):
    grid = ss.official_logsnr_grid(SCHEDULE, nfe, order)
    assert int(grid.num_steps) == nfe
    groups = _official_orders(nfe, order)
    lam = np.asarray(grid.lam)[: nfe + 1]
    outer = np.linspace(lam_start, lam_end, len(groups) + 1)
    starts = np.cumsum([0] + groups)
    np.testing.assert_allclose(lam[starts], outer, rtol=1e-10, atol=1e-10)
    for g, k in enumerate(groups):
      r = (lam[starts[g]: starts[g] + k] - outer[g]) / (outer[g + 1] - outer[g])
      np.testing.assert_allclose(r, np.arange(k) / k, atol=1e-10)
    assert _groups(ss.DPMSolverSinglestep(order=order), grid) == groups
  with pytest.raises(ValueError, match="nfe=0"):
    ss.official_logsnr_grid(SCHEDULE, 0, order)


def _official_sampler(oracle, x, nfe, order, prediction, solver_type):
  """An independent host-side transcription of the official singlestep DPM-Solver (skip_type='logSNR',
  r1 = 1/2 or 1/3, r2 = 2/3), from the formulas of spec section 4.1, in float64 numpy."""
  lam_0, lam_1 = (float(SCHEDULE.lam(t)) for t in (SCHEDULE.t_max, SCHEDULE.t_min))
  groups = _official_orders(nfe, order)
  outer = np.linspace(lam_0, lam_1, len(groups) + 1)
  coef = lambda l: tuple(float(v) for v in SCHEDULE.alpha_sigma_of_lambda(jnp.asarray(l)))
  data = prediction == "data"

  def model(u, l):
    a, s = coef(l)
    x0, eps = oracle.x0_eps(jnp.asarray(u), a, s)
    return np.asarray(x0 if data else eps)

  x = np.asarray(x)
  for g, k in enumerate(groups):
    ls, lt = outer[g], outer[g + 1]
    h = lt - ls
    a_s, s_s = coef(ls)
    if data:
      p1 = lambda hh: -np.expm1(-hh)
      p2 = lambda hh: np.expm1(-hh) / hh + 1.0
      first = lambda l, ms: coef(l)[1] / s_s * x + coef(l)[0] * p1(l - ls) * ms
      scale = lambda l: coef(l)[0]
    else:
      p1 = np.expm1
      p2 = lambda hh: np.expm1(hh) / hh - 1.0
      first = lambda l, ms: coef(l)[0] / a_s * x - coef(l)[1] * p1(l - ls) * ms
      scale = lambda l: -coef(l)[1]
    p3 = lambda hh: p2(hh) / hh - 0.5 if not data else 0.5 - p2(hh) / hh
    m_s = model(x, ls)
    if k == 1:
      x = first(lt, m_s)
      continue
    r1 = 0.5 if k == 2 else 1.0 / 3.0
    l1 = ls + r1 * h
    m_1 = model(first(l1, m_s), l1)
    if k == 2:
      c = p1(h) / (2 * r1) if solver_type == "midpoint" else p2(h) / r1
      x = first(lt, m_s) + scale(lt) * c * (m_1 - m_s)
      continue
    r2 = 2.0 / 3.0
    l2 = ls + r2 * h
    u2 = first(l2, m_s) + scale(l2) * (r2 / r1) * p2(r2 * h) * (m_1 - m_s)
    m_2 = model(u2, l2)
    if solver_type == "midpoint":
      x = first(lt, m_s) + scale(lt) * p2(h) / r2 * (m_2 - m_s)
    else:
      d1_0, d1_1 = (m_1 - m_s) / r1, (m_2 - m_s) / r2
      d1 = (r2 * d1_0 - r1 * d1_1) / (r2 - r1)
      d2 = 2.0 * (d1_1 - d1_0) / (r2 - r1)
      x = first(lt, m_s) + scale(lt) * (p2(h) * d1 + p3(h) * d2)
  return x


@pytest.mark.parametrize("order", [2, 3])
@pytest.mark.parametrize("prediction", ss.PREDICTIONS)
def test_matches_an_independent_official_sampler_on_its_logsnr_grid(order, prediction):
  oracle = analytic.gmm(dim=3)
  x = _x_T(oracle, n=4)
  for solver_type in ss.SOLVER_TYPES:
    solver = ss.DPMSolverSinglestep(order=order, prediction=prediction, solver_type=solver_type)
    for nfe in (5, 6, 7):
      ours = solvers.sample(solver, oracle.denoiser(SCHEDULE), SCHEDULE, ss.official_logsnr_grid(SCHEDULE, nfe, order), x)
      theirs = _official_sampler(oracle, x, nfe, order, prediction, solver_type)
      np.testing.assert_allclose(ours.x, theirs, rtol=1e-9, atol=1e-10)
      assert int(ours.nfe) == nfe


@pytest.mark.parametrize("order", [2, 3])
def test_measured_orders_on_the_gaussian(order):
  """Every (prediction, solver_type) with groups all of full order on a lambda-uniform grid (the official
  logSNR grid of 'fixed' groups: r exactly 1/2 or 1/3, 2/3): within 0.3 of the order. The data-form 3S
  midpoint variant needs this many NFE: its log2 error ratios per doubling are 2.4, 2.75, 2.9, 2.95 from
  48 to 768 NFE here (and 3.6, 3.5, 3.4, 3.2 on the battery's non-uniform grid)."""
  oracle = analytic.gaussian(dim=4, seed=3)
  x = _x_T(oracle)
  nfes = (96, 192, 384) if order == 3 else (48, 96, 192)
  for prediction in ss.PREDICTIONS:
    for solver_type in ss.SOLVER_TYPES:
      solver = ss.DPMSolverSinglestep(order=order, prediction=prediction, solver_type=solver_type, schedule="fixed")
      errors = []
      for nfe in nfes:
        grid = ss.official_logsnr_grid(SCHEDULE, nfe, order, group_schedule="fixed", capacity=512)
        exact = oracle.pf_ode_solution(x, grid.alpha[0], grid.sigma[0], grid.alpha[nfe], grid.sigma[nfe])
        sol = solvers.sample(solver, oracle.denoiser(SCHEDULE), SCHEDULE, grid, x)
        errors.append(float(jnp.sqrt(jnp.mean((sol.x - exact) ** 2))))
      slope = -np.polyfit(np.log(nfes), np.log(errors), 1)[0]
      assert abs(slope - order) <= 0.3, (prediction, solver_type, slope, errors)


def test_registered_names_and_options():
  for name, order, prediction in (("dpm_solver_2s", 2, "noise"), ("dpm_solver_3s", 3, "noise"),
                                  ("dpm_solver_pp_2s", 2, "data"), ("dpm_solver_pp_3s", 3, "data")):
    solver = solvers.get(name)
    assert (solver.order, solver.declared_order, solver.prediction) == (order, order, prediction)
    assert solver.solver_type == "midpoint" and solver.schedule == "official" and not solver.adaptive
    assert solver.for_order_measurement().schedule == "max_order"
  with pytest.raises(ValueError, match="order=4"):
    ss.DPMSolverSinglestep(order=4)
  with pytest.raises(ValueError, match="schedule='uniform'.*official"):
    ss.DPMSolverSinglestep(schedule="uniform")
  with pytest.raises(ValueError, match="solver_type='taylor'.*midpoint, heun"):
    ss.DPMSolverSinglestep(solver_type="taylor")


def test_thresholding_option_bounds_the_data_prediction():
  oracle = analytic.gaussian(dim=4, seed=0)
  big = analytic.Gaussian(mean=oracle.mean * 5.0, std=oracle.std)
  grid = grids.uniform_logsnr(SCHEDULE, 6, final="zero")
  x = _x_T(big, n=4)
  plain = solvers.sample(ss.DPMSolverSinglestep(order=3), big.denoiser(SCHEDULE), SCHEDULE, grid, x).x
  clipped = solvers.sample(ss.DPMSolverSinglestep(order=3, thresholding=True), big.denoiser(SCHEDULE), SCHEDULE,
                           grid, x).x
  assert float(jnp.max(jnp.abs(plain))) > 1.5
  assert float(jnp.max(jnp.abs(clipped))) <= 1.0 + 1e-9  # the last step returns the (thresholded) x0

"""Heavy ball and GHVB (solvers/heavy_ball.py, solvers/ghvb.py; Wizadwongsa et al. 2024): beta = 1 is the base
method, the recursions written out here, the orders (global on the Gaussian, and of the steady recursion on the
linear test equation), the real stability limits against theory and the spec's table, and option validation."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from models import analytic
from solvers import grids, loop, predictions, schedules
from solvers.dpm_solver_multistep import DPMSolverMultistep
from solvers.ghvb import GHVB, parse_order
from solvers.heavy_ball import DPMSolverPPHeavyBall, PLMSHeavyBall
from tests.test_battery import order_test_grid

SCHEDULE = schedules.VPLinear()
GMM = analytic.gmm(dim=3, num_components=2, seed=4)
ADAMS_BASHFORTH = {1: [1.0], 2: [3 / 2, -1 / 2], 3: [23 / 12, -16 / 12, 5 / 12], 4: [55 / 24, -59 / 24, 37 / 24, -9 / 24]}
BETAS = (1.0, 0.8, 0.6, 0.4)


def _x_T(n=4):
  t = SCHEDULE.t_max
  return GMM.sample(jax.random.key(0), n, SCHEDULE.alpha(t), SCHEDULE.sigma(t))


def _plms_heavy_ball(grid, x, order, beta):
  """PLMS-HB written out in the scaled variables: x_bar' = x_bar + (sigma_bar' - sigma_bar) v with
  v = (1 - beta) v + beta AB_{min(order, n + 1)}(eps) (v_0 = eps_0); beta = 1 is pseudo Adams-Bashforth."""
  a, s = np.asarray(grid.alpha), np.asarray(grid.sigma)
  outputs, velocity = [], None
  for n in range(int(grid.num_steps)):
    outputs.insert(0, GMM.eps(x, a[n], s[n]))
    update = sum(w * e for w, e in zip(ADAMS_BASHFORTH[min(order, n + 1)], outputs))
    velocity = update if velocity is None else (1 - beta) * velocity + beta * update
    x = a[n + 1] * (x / a[n] + (s[n + 1] / a[n + 1] - s[n] / a[n]) * velocity)
  return x


@pytest.mark.parametrize("order", (1, 2, 3, 4))
def test_beta_one_is_pseudo_adams_bashforth(order):
  grid = grids.uniform_t(SCHEDULE, 7, t_end=0.01)
  x = _x_T()
  expected = _plms_heavy_ball(grid, x, order, 1.0)
  for solver in (GHVB(order=order, beta=1.0), PLMSHeavyBall(order=order, beta=1.0)):
    np.testing.assert_allclose(loop.sample(solver, GMM.denoiser(SCHEDULE), SCHEDULE, grid, x).x, expected,
                               rtol=1e-10, atol=1e-12, err_msg=str(solver))


def test_plms_heavy_ball_is_the_written_out_recursion():
  grid = grids.karras(SCHEDULE, 8)
  x = _x_T()
  sol = loop.sample(PLMSHeavyBall(order=3, beta=0.7), GMM.denoiser(SCHEDULE), SCHEDULE, grid, x)
  np.testing.assert_allclose(sol.x, _plms_heavy_ball(grid, x, 3, 0.7), rtol=1e-10, atol=1e-12)
  assert int(sol.nfe) == 8


def _dpm_solver_pp_heavy_ball(grid, x, beta):
  """DPM-Solver++(2M) with HB as the official diffusers wrapper (spec 1.4): a first-order first step, then
  D = x0 + (x0 - x0_prev) / (2 r), v = D at the first 2M step and v = (1 - beta) v + beta D after it."""
  a, s, lam = (np.asarray(v) for v in (grid.alpha, grid.sigma, grid.lam))
  previous, velocity = None, None
  for n in range(int(grid.num_steps)):
    x0 = GMM.x0(x, a[n], s[n])
    h = lam[n + 1] - lam[n]
    if previous is None:
      update = x0
    else:
      update = x0 + (x0 - previous) / (2 * (lam[n] - lam[n - 1]) / h)
      velocity = update if velocity is None else (1 - beta) * velocity + beta * update
      update = velocity
    x = s[n + 1] / s[n] * x - a[n + 1] * np.expm1(-h) * update
    previous = x0
  return x


def test_dpm_solver_pp_heavy_ball_is_the_written_out_recursion_and_its_base_at_beta_one():
  x = _x_T()
  grid = grids.uniform_logsnr(SCHEDULE, 12)
  sol = loop.sample(DPMSolverPPHeavyBall(beta=0.7), GMM.denoiser(SCHEDULE), SCHEDULE, grid, x)
  np.testing.assert_allclose(sol.x, _dpm_solver_pp_heavy_ball(grid, x, 0.7), rtol=1e-10, atol=1e-12)
  # With the lower-order final steps (5 < 10 steps) and a final step into sigma = 0.
  for grid in (grids.uniform_logsnr(SCHEDULE, 5), grids.uniform_logsnr(SCHEDULE, 12, final="zero")):
    ours = loop.sample(DPMSolverPPHeavyBall(beta=1.0), GMM.denoiser(SCHEDULE), SCHEDULE, grid, x).x
    base = loop.sample(DPMSolverMultistep(order=2), GMM.denoiser(SCHEDULE), SCHEDULE, grid, x).x
    np.testing.assert_allclose(ours, base, rtol=1e-12, atol=1e-12)


def _slope(solver):
  oracle = analytic.gaussian(dim=4, seed=3)
  x = oracle.sample(jax.random.key(1), 8, SCHEDULE.alpha(SCHEDULE.t_max), SCHEDULE.sigma(SCHEDULE.t_max))
  steps, errors = (40, 80, 160), []
  for n in steps:
    grid = order_test_grid(n)
    exact = oracle.pf_ode_solution(x, grid.alpha[0], grid.sigma[0], grid.alpha[n], grid.sigma[n])
    errors.append(float(jnp.sqrt(jnp.mean((loop.sample(solver, oracle.denoiser(SCHEDULE), SCHEDULE, grid, x).x
                                           - exact) ** 2))))
  return -np.polyfit(np.log(steps), np.log(errors), 1)[0]


def test_ghvb_keeps_order_two_where_heavy_ball_drops_to_one():
  """Global orders on the Gaussian (the battery's non-uniform grid) at beta = 0.6: GHVB-3 converges with
  order 2 (its cap, solvers/ghvb.py), PLMS-HB with 1, and both with 2 at beta = 1."""
  for solver, expected in ((GHVB(order=3, beta=0.6), 2), (PLMSHeavyBall(order=2, beta=0.6), 1),
                           (PLMSHeavyBall(order=2, beta=1.0), 2)):
    assert solver.declared_order == expected
    assert abs(_slope(solver) - expected) < 0.3, solver


# The linear test equation d x_bar / d sigma_bar = mu x_bar: on EDM (alpha = 1, sigma = t) eps = mu x, and a
# uniform t grid has the constant step delta, so z = mu delta. A steady step (past the warm-up) maps the state
# linearly: x_{n+1} and the momentum buffers = (J0 + z Jz) (x_n and buffers), measured from the solver's own step.
EDM = schedules.EDM()
LINEAR_GRID = grids.uniform_t(EDM, 20)
DELTA = float(LINEAR_GRID.t[1] - LINEAR_GRID.t[0])
STEADY_ROW = 10


def _linear(mu):
  return predictions.Denoiser(apply_fn=lambda mu, x, t, cond: mu * x, params=jnp.asarray(mu), prediction="eps")


@functools.partial(jax.jit, static_argnums=0)
def _jacobian(solver, mu):
  coeffs = jax.tree_util.tree_map(lambda c: c[STEADY_ROW], solver.coefficients(LINEAR_GRID, EDM))
  state = solver.init(_linear(mu), EDM, LINEAR_GRID, jnp.zeros(1), jax.random.key(0))
  fields = [f for f in state._fields if f not in ("nfe", "key")]
  flat, unravel = ravel_pytree({f: getattr(state, f) for f in fields})

  def step(vector):
    new = solver.step(_linear(mu), EDM, LINEAR_GRID, coeffs, STEADY_ROW, state._replace(**unravel(vector)))
    return ravel_pytree({f: getattr(new, f) for f in fields})[0]

  return jax.jacfwd(step)(flat)


@functools.lru_cache(maxsize=None)
def _step_matrices(solver):
  """(J0, Jz): the solver's steady step on the test equation is J0 + z Jz."""
  j0 = np.asarray(_jacobian(solver, 0.0))
  return j0, (np.asarray(_jacobian(solver, 1.0)) - j0) / DELTA


def _spectral_radius(solver, z):
  j0, jz = _step_matrices(solver)
  return np.max(np.abs(np.linalg.eigvals(j0 + z * jz)))


def _stability_limit(solver, far=-20.0):
  """The most negative z with every z in (limit, 0) stable (spectral radius <= 1): bisection between a stable
  small step and ``far``, then checked on 100 points inside (the stable set is an interval there)."""
  stable, unstable = -1e-3, far
  assert _spectral_radius(solver, stable) < 1 < _spectral_radius(solver, unstable)
  while stable - unstable > 1e-10:
    mid = 0.5 * (stable + unstable)
    stable, unstable = (mid, unstable) if _spectral_radius(solver, mid) <= 1 + 1e-12 else (stable, mid)
  assert all(_spectral_radius(solver, z) <= 1 + 1e-12 for z in np.linspace(stable, -1e-3, 100))
  return stable


def _principal_root_error(solver, z):
  j0, jz = _step_matrices(solver)
  return np.min(np.abs(np.linalg.eigvals(j0 + z * jz) - np.exp(z)))


@pytest.mark.parametrize("beta", (1.0, 0.8, 0.4))
def test_steady_recursion_order(beta):
  """The principal root of the steady step misses e^z by O(z^{k+1}) for GHVB-k at every beta (order k), by
  O(z^2) for PLMS-HB with beta < 1 (order 1): log2 of the error ratio for z = -0.04, -0.02."""
  for order in (1, 2, 3, 4):
    for solver, expected in ((GHVB(order=order, beta=beta), order),
                             (PLMSHeavyBall(order=order, beta=beta), order if beta == 1 else 1)):
      local = np.log2(_principal_root_error(solver, -0.04) / _principal_root_error(solver, -0.02))
      assert abs(local - (expected + 1)) < 0.3, (solver, local)


# The spec's real-axis limits (specs/momentum-inversion-lml.md, 1.5), rounded there to 2-3 digits:
# (method, order, beta) -> limit.
SPEC_LIMITS = {("hb", 1, 0.8): -3, ("hb", 2, 0.8): -1.5, ("hb", 3, 0.8): -0.82, ("hb", 4, 0.8): -0.46,
               ("hb", 1, 0.5): -6, ("hb", 2, 0.5): -3, ("hb", 3, 0.5): -1.64, ("hb", 4, 0.5): -0.92,
               ("ghvb", 1, 0.8): -3, ("ghvb", 2, 0.8): -1.21, ("ghvb", 3, 0.8): -0.65, ("ghvb", 4, 0.8): -0.36,
               ("ghvb", 1, 0.5): -6, ("ghvb", 2, 0.5): -1.51, ("ghvb", 3, 0.5): -0.79, ("ghvb", 4, 0.5): -0.44,
               ("ab", 1, 1.0): -2, ("ab", 2, 1.0): -1, ("ab", 3, 1.0): -0.545, ("ab", 4, 1.0): -0.30}
ADAMS_BASHFORTH_LIMITS = {1: -2.0, 2: -1.0, 3: -6 / 11, 4: -3 / 10}  # classical: rho(-1) / sigma(-1)


def _ghvb_limit_theory(order, beta):
  """Where the root xi = -1 crosses: (xi - 1)(xi - 1 + beta) = beta z xi C(xi) (the GHVB recursion's
  characteristic equation, C(xi) = sum_j w_j xi^{-j}) gives z = -2 (2 - beta) / (beta sum_j |w_j|) with the
  alternating beta-AB weights w_j (spec 1.1) written out here."""
  numerators = {1: [beta], 2: [2 + beta, 2 - beta], 3: [18 + 5 * beta, 24 - 8 * beta, 6 - beta],
                4: [46 + 9 * beta, 78 - 19 * beta, 42 - 5 * beta, 10 - beta]}[order]
  denominator = {1: 1, 2: 2, 3: 12, 4: 24}[order]
  return -2 * (2 - beta) * denominator / sum(numerators)


def test_stability_limits_grow_as_theory_says():
  """Measured limits (the solver's own steady step) against theory: GHVB at xi = -1 (``_ghvb_limit_theory``)
  and heavy ball's exact factor (2 - beta) / beta on the classical AB_k limits, to the bisection's 1e-8; against
  the spec's table within 3% (its entries are rounded, and some outward: -0.46 for -0.45, -0.44 for -0.4286);
  and the ordering the paper claims: the interval grows as beta falls, more for HB than for GHVB when k >= 2."""
  measured = {}
  for beta in BETAS + (0.5,):
    for order in (1, 2, 3, 4):
      ghvb_limit = measured["ghvb", order, beta] = _stability_limit(GHVB(order=order, beta=beta))
      hb_limit = measured["hb", order, beta] = _stability_limit(PLMSHeavyBall(order=order, beta=beta))
      np.testing.assert_allclose(ghvb_limit, _ghvb_limit_theory(order, beta), rtol=1e-8)
      np.testing.assert_allclose(hb_limit, ADAMS_BASHFORTH_LIMITS[order] * (2 - beta) / beta, rtol=1e-8)
      assert hb_limit < ghvb_limit if order >= 2 and beta < 1 else hb_limit == pytest.approx(ghvb_limit)
  for (method, order, beta), limit in SPEC_LIMITS.items():
    ours = measured["ghvb" if method == "ab" else method, order, beta]
    assert ours == pytest.approx(limit, rel=0.03), (method, order, beta, ours)
  for method in ("ghvb", "hb"):
    for order in (1, 2, 3, 4):
      limits = [measured[method, order, beta] for beta in BETAS]
      assert all(np.diff(limits) < 0), (method, order, limits)


def test_sampling_the_linear_equation_decays_inside_the_limit_and_grows_outside():
  """The real loop, 400 steps on d x / d t = mu x (EDM, uniform t): GHVB 3.8 decays at 0.95 of its measured limit
  and grows at 1.05 of it, while AB4 (beta = 1) already grows at the same 0.95 step."""
  solver = GHVB.from_notation(3.8)
  grid = grids.uniform_t(EDM, 400)
  delta = float(grid.t[1] - grid.t[0])
  limit = _stability_limit(solver)

  def final(solver, z):
    return float(jnp.abs(loop.sample(solver, _linear(z / delta), EDM, grid, jnp.ones(1)).x[0]))

  assert final(solver, 0.95 * limit) < 1e-2
  assert final(solver, 1.05 * limit) > 1e2
  assert final(GHVB(order=4, beta=1.0), 0.95 * limit) > 1e2


def test_order_notation():
  assert parse_order(3.8) == (4, 0.8)
  assert parse_order(1.5) == (2, 0.5)
  assert parse_order(0.5) == (1, 0.5)
  assert parse_order(4) == (4, 1.0)
  assert parse_order(2.0) == (2, 1.0)
  assert GHVB.from_notation(2.7) == GHVB(order=3, beta=0.7)
  assert PLMSHeavyBall.from_notation(3.9) == PLMSHeavyBall(order=4, beta=0.9)
  for bad in (0, -1.5, 4.2, 3.0000001, float("nan"), "3.8", True):
    with pytest.raises(ValueError, match="order notation"):
      parse_order(bad)


def test_bad_options_raise():
  with pytest.raises(ValueError, match="order=5"):
    GHVB(order=5)
  with pytest.raises(ValueError, match="order=0"):
    PLMSHeavyBall(order=0)
  for make in (GHVB, PLMSHeavyBall, DPMSolverPPHeavyBall):
    for beta in (0.0, -0.2, 1.5):
      with pytest.raises(ValueError, match=f"beta={beta}"):
        make(beta=beta)

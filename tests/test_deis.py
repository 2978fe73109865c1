"""DEIS (solvers/deis.py): DDIM equivalences, the paper's Psi / w form, exactness of one step on polynomial
noise predictions, Runge-Kutta order conditions, measured orders, and diffusers' log-rho variant against
its closed forms and DPM-Solver."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import integrate

import solvers
from models import analytic
from solvers import deis, grids, predictions, schedules

SCHEDULE = schedules.VPLinear()


def _x(n=4, dim=3, seed=0):
  oracle = analytic.gaussian(dim=dim, seed=seed)
  t = SCHEDULE.t_max
  return oracle, oracle.sample(jax.random.key(seed), n, SCHEDULE.alpha(t), SCHEDULE.sigma(t))


def _sample(solver, denoiser, grid, x, schedule=SCHEDULE):
  return solvers.sample(solver, denoiser, schedule, grid, x).x


# ---- DDIM equivalences ---------------------------------------------------------------------------------

@pytest.mark.parametrize("final", grids.FINAL_POLICIES)
def test_degree_zero_and_euler_sample_as_ddim(final):
  oracle = analytic.gmm(dim=3)
  x = oracle.sample(jax.random.key(0), 4, SCHEDULE.alpha(SCHEDULE.t_max), SCHEDULE.sigma(SCHEDULE.t_max))
  grid = grids.uniform_logsnr(SCHEDULE, 7, final=final, capacity=16)
  denoiser = oracle.denoiser(SCHEDULE)
  ddim = _sample(solvers.get("ddim_eps"), denoiser, grid, x)
  for solver in (deis.DEISMultistep(0, "t_ab"), deis.DEISMultistep(0, "rho_ab"), deis.DEISRungeKutta("1euler")):
    np.testing.assert_allclose(_sample(solver, denoiser, grid, x), ddim, rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("schedule", [schedules.DiscreteVP.named(), schedules.EDM(), schedules.VPCosine()],
                         ids=lambda s: type(s).__name__)
@pytest.mark.parametrize("final", grids.FINAL_POLICIES)
def test_degree_zero_and_euler_tables_are_ddims(schedule, final):
  grid = grids.uniform_logsnr(schedule, 7, final=final, capacity=16)
  n = int(grid.num_steps)
  ddim = solvers.get("ddim_eps").coefficients(grid, schedule)
  t_ab = deis.DEISMultistep(0, "t_ab")
  rho_ab = deis.DEISMultistep(0, "rho_ab").coefficients(grid, schedule)
  euler = deis.DEISRungeKutta("1euler")
  np.testing.assert_array_equal(t_ab.t_ab_weights(schedule, grid)[:n, 0], ddim["m"][:n])
  np.testing.assert_array_equal(rho_ab["hist"][:n, 0], ddim["m"][:n])
  np.testing.assert_array_equal(rho_ab["anchor"][:n], ddim["x"][:n])
  np.testing.assert_allclose(euler.coefficients(grid, schedule)["b"][:n, 0], ddim["m"][:n], rtol=1e-14)
  np.testing.assert_array_equal(euler.coefficients(grid, schedule)["x"][:n], ddim["x"][:n])


# ---- tAB: the paper's form and exactness ---------------------------------------------------------------

def _vp_linear_closed_forms(schedule):
  """log abar(t), and rho'(t), for VP linear in numpy (independent of solvers.schedules)."""
  b0, db = schedule.beta_min, schedule.beta_max - schedule.beta_min

  def log_abar(t):
    return -0.5 * db * t**2 - b0 * t

  def drho(t):  # rho = sqrt(1 / abar - 1)
    big_a = -log_abar(t)
    return (db * t + b0) * np.exp(big_a) / (2.0 * np.sqrt(np.expm1(big_a)))

  return log_abar, drho


def _lagrange(tau, nodes, j):
  out = 1.0
  for m, node in enumerate(nodes):
    if m != j:
      out = out * (tau - node) / (nodes[j] - node)
  return out


@pytest.mark.parametrize("make_grid", [lambda: grids.uniform_t(SCHEDULE, 10), lambda: grids.quadratic_t(SCHEDULE, 10)],
                         ids=["uniform_t", "quadratic_t"])
def test_t_ab_weights_are_the_papers_psi_w_integrals(make_grid):
  """C_ij = int Psi(t_{i+1}, tau) w(tau) l_j(tau) dtau, Psi = sqrt(abar_{i+1} / abar_tau),
  w = -(1/2) (d log abar / dtau) / sqrt(1 - abar_tau), by adaptive quadrature in t."""
  grid = make_grid()
  log_abar, _ = _vp_linear_closed_forms(SCHEDULE)
  b0, db = SCHEDULE.beta_min, SCHEDULE.beta_max - SCHEDULE.beta_min

  def psi_w(tau, t_next):
    w = 0.5 * (db * tau + b0) / np.sqrt(-np.expm1(log_abar(tau)))
    return np.exp(0.5 * (log_abar(t_next) - log_abar(tau))) * w

  weights = np.asarray(deis.DEISMultistep(3, "t_ab").t_ab_weights(SCHEDULE, grid))
  t = grid.times()
  for i in (0, 1, 2, 5, 9):
    nodes = [t[i - j] for j in range(min(3, i) + 1)]
    for j in range(len(nodes)):
      ref = integrate.quad(lambda tau: psi_w(tau, t[i + 1]) * _lagrange(tau, nodes, j), t[i], t[i + 1],
                           epsabs=0.0, epsrel=1e-13, limit=200)[0]
      np.testing.assert_allclose(weights[i, j], ref, rtol=1e-10, err_msg=f"step {i}, node {j}")
    assert np.all(weights[i, len(nodes):] == 0)


def _poly(params, x, label, cond):
  """A toy noise prediction that ignores x: eps = sum_k params[k] label^k, label = t or rho."""
  powers = label ** jnp.arange(params.shape[0], dtype=params.dtype)
  return jnp.broadcast_to(powers @ params, x.shape).astype(x.dtype)


def _poly_denoiser(degree, time_label, dim=3, seed=0):
  params = jax.random.normal(jax.random.key(seed), (degree + 1, dim), jnp.float64)
  return predictions.Denoiser(apply_fn=_poly, params=params, prediction="eps", time_label=time_label), params


def _multistep_step_from_history(solver, denoiser, grid, i, x):
  """Step i of a multistep solver whose history holds the model's outputs at the previous nodes."""
  state = solver.init(denoiser, SCHEDULE, grid, x, jax.random.key(0))
  t = np.asarray(grid.t)
  past = [denoiser.predict("eps", x, t[i - 1 - j], SCHEDULE) if i - 1 - j >= 0 else jnp.zeros_like(x)
          for j in range(state.hist.shape[0])]
  state = state._replace(hist=jnp.stack(past))
  row = jax.tree_util.tree_map(lambda c: c[i], solver.coefficients(grid, SCHEDULE))
  return solver.step(denoiser, SCHEDULE, grid, row, i, state).x


@pytest.mark.parametrize("degree", [1, 2, 3])
def test_t_ab_step_is_exact_for_polynomial_eps_in_t(degree):
  denoiser, params = _poly_denoiser(degree, "t")
  _, drho = _vp_linear_closed_forms(SCHEDULE)
  _, x = _x()
  for grid in (grids.uniform_t(SCHEDULE, 10), grids.uniform_logsnr(SCHEDULE, 12)):
    t, alpha = grid.times(), np.asarray(grid.alpha)
    for i in (degree, len(t) - 2):
      moments = [integrate.quad(lambda tau, k=k: drho(tau) * tau**k, t[i], t[i + 1], epsabs=0.0, epsrel=1e-13,
                                limit=200)[0] for k in range(degree + 1)]
      exact = alpha[i + 1] / alpha[i] * x + alpha[i + 1] * (np.asarray(moments) @ np.asarray(params))
      got = _multistep_step_from_history(deis.DEISMultistep(degree, "t_ab"), denoiser, grid, i, x)
      np.testing.assert_allclose(got, exact, rtol=1e-11, atol=1e-11)
      # Degree - 1 is not exact, so the test can fail.
      lower = _multistep_step_from_history(deis.DEISMultistep(degree - 1, "t_ab"), denoiser, grid, i, x)
      assert np.max(np.abs(lower - exact)) > max(1e-10, 100 * np.max(np.abs(got - exact)))


def _rho_integral(params, rho_a, rho_b):
  """int_{rho_a}^{rho_b} sum_k params[k] rho^k d rho."""
  k = np.arange(params.shape[0])[:, None]
  return np.sum(np.asarray(params) * (rho_b ** (k + 1) - rho_a ** (k + 1)) / (k + 1), axis=0)


@pytest.mark.parametrize("degree", [1, 2, 3])
@pytest.mark.parametrize("final", grids.FINAL_POLICIES)
def test_rho_ab_step_is_exact_for_polynomial_eps_in_rho(degree, final):
  denoiser, params = _poly_denoiser(degree, "rho")
  _, x = _x()
  grid = grids.uniform_logsnr(SCHEDULE, 12, final=final)
  rho, alpha = np.exp(-np.asarray(grid.lam)), np.asarray(grid.alpha)
  for i in (degree, int(grid.num_steps) - 1):  # the last step ends at rho = 0 with final='zero'
    exact = alpha[i + 1] * (x / alpha[i] + _rho_integral(params, rho[i], rho[i + 1]))
    got = _multistep_step_from_history(deis.DEISMultistep(degree, "rho_ab"), denoiser, grid, i, x)
    np.testing.assert_allclose(got, exact, rtol=1e-11, atol=1e-11)


# ---- rhoRK ---------------------------------------------------------------------------------------------

# Butcher's order conditions up to order 4: (order, function of (A, b, c), value).
_CONDITIONS = [
    (1, lambda a, b, c: b.sum(), 1.0),
    (2, lambda a, b, c: b @ c, 1 / 2),
    (3, lambda a, b, c: b @ c**2, 1 / 3),
    (3, lambda a, b, c: b @ a @ c, 1 / 6),
    (4, lambda a, b, c: b @ c**3, 1 / 4),
    (4, lambda a, b, c: (b * c) @ a @ c, 1 / 8),
    (4, lambda a, b, c: b @ a @ c**2, 1 / 12),
    (4, lambda a, b, c: b @ a @ a @ c, 1 / 24),
]


@pytest.mark.parametrize("name", sorted(deis.TABLEAUS))
def test_tableaus_satisfy_their_order_conditions(name):
  order = deis.RK_ORDERS[name]
  for zero_step, p in ((False, order), (True, min(order, 3))):
    a, b, c = deis.tableau(name, zero_step)
    assert np.all(np.triu(a) == 0)  # explicit
    for q, condition, value in _CONDITIONS:
      if q <= p:
        np.testing.assert_allclose(condition(a, b, c), value, rtol=1e-14, err_msg=(name, zero_step, q))
    if p < 4:  # the next order fails, so the conditions are not vacuous
      assert any(abs(condition(a, b, c) - value) > 1e-3 for q, condition, value in _CONDITIONS if q == p + 1)
    if zero_step:
      assert np.all(c < 1)  # no stage at sigma = 0


def _quadrature_degree(b, c):
  """The largest k with sum_j b_j c_j^m = 1 / (m + 1) for m <= k: for an eps that depends on rho only, an
  RK step is this quadrature rule (Heun: trapezoid, 1; Kutta 3 and RK4: Simpson, 3; Ralston 2 and 3: 2)."""
  k = 0
  while k < 6 and abs(b @ c ** (k + 1) - 1 / (k + 2)) < 1e-14:
    k += 1
  return k


@pytest.mark.parametrize("name", sorted(deis.TABLEAUS))
@pytest.mark.parametrize("final", grids.FINAL_POLICIES)
def test_rho_rk_step_is_exact_for_polynomial_eps_in_rho(name, final):
  solver = deis.DEISRungeKutta(name)
  grid = grids.uniform_logsnr(SCHEDULE, 6, final=final)
  i = int(grid.num_steps) - 1  # with final='zero', the step into rho = 0 (the substitute tableau)
  _, b, c = deis.tableau(name, zero_step=final == "zero")
  degree = _quadrature_degree(b, c)
  assert degree >= min(solver.order, 3) - 1
  rho, alpha = np.exp(-np.asarray(grid.lam)), np.asarray(grid.alpha)
  _, x = _x()
  for d in (degree, degree + 1):  # exact for the rule's degree, and not beyond (the test can fail)
    denoiser, params = _poly_denoiser(d, "rho")
    state = solver.init(denoiser, SCHEDULE, grid, x, jax.random.key(0))
    row = jax.tree_util.tree_map(lambda c: c[i], solver.coefficients(grid, SCHEDULE))
    got = solver.step(denoiser, SCHEDULE, grid, row, i, state)
    exact = alpha[i + 1] * (x / alpha[i] + _rho_integral(params, rho[i], rho[i + 1]))
    error = np.max(np.abs(got.x - exact))
    if d == degree:
      np.testing.assert_allclose(got.x, exact, rtol=1e-11, atol=1e-11)
      assert int(got.nfe) == solver.stages
      exact_error = error
    else:
      assert error > max(1e-12, 1e3 * exact_error)


def test_rho_rk_never_evaluates_at_sigma_zero():
  """An x0-predicting model gives eps = 0/0 at sigma = 0: the step into sigma = 0 must avoid that point, and
  then the same model predicting x0 or eps gives the same samples."""
  oracle, x = _x()
  grid = grids.uniform_logsnr(SCHEDULE, 8, final="zero", capacity=16)
  for name in ("2heun", "3kutta", "4rk"):
    table = deis.DEISRungeKutta(name).coefficients(grid, SCHEDULE)
    assert float(jnp.min(SCHEDULE.sigma(table["t"][: int(grid.num_steps)]))) > 0
  solver = deis.DEISRungeKutta("4rk")
  from_x0 = _sample(solver, oracle.denoiser(SCHEDULE, "x0"), grid, x)
  assert bool(jnp.all(jnp.isfinite(from_x0)))
  np.testing.assert_allclose(from_x0, _sample(solver, oracle.denoiser(SCHEDULE, "eps"), grid, x), rtol=1e-10, atol=1e-10)


# ---- measured orders -----------------------------------------------------------------------------------

def _nonuniform_lambda_grid(steps, final="t_end"):
  """The battery's order-test grid (lambda non-uniform, step sizes varying 3x), with room for 640 steps."""
  lam_start, lam_end = (float(SCHEDULE.lam(t)) for t in (SCHEDULE.t_max, SCHEDULE.t_min))
  u = np.linspace(0.0, 1.0, steps + 1)
  lam = lam_start + (lam_end - lam_start) * (u + 0.5 * u * (1 - u))
  times = np.array(SCHEDULE.t_of_lambda(jnp.asarray(lam)))
  times[0], times[-1] = SCHEDULE.t_max, SCHEDULE.t_min
  return grids.from_times(SCHEDULE, times, capacity=1024, final=final)


def _slope(solver, steps, final="t_end"):
  oracle = analytic.gaussian(dim=4, seed=3)
  x = oracle.sample(jax.random.key(1), 8, SCHEDULE.alpha(SCHEDULE.t_max), SCHEDULE.sigma(SCHEDULE.t_max))
  errors = []
  for n in steps:
    grid = _nonuniform_lambda_grid(n, final)
    last = int(grid.num_steps)
    exact = oracle.pf_ode_solution(x, grid.alpha[0], grid.sigma[0], grid.alpha[last], grid.sigma[last])
    errors.append(float(jnp.sqrt(jnp.mean((_sample(solver, oracle.denoiser(SCHEDULE), grid, x) - exact) ** 2))))
  return -np.polyfit(np.log(steps), np.log(errors), 1)[0]


def test_rho_ab_degree_3_is_fourth_order_asymptotically():
  """Unregistered because the battery's 40/80/160 steps are pre-asymptotic for it (slope 3.5 there)."""
  assert abs(_slope(deis.DEISMultistep(3, "rho_ab"), (160, 320, 640)) - 4) <= 0.2


@pytest.mark.parametrize("solver,order", [(deis.DEISMultistep(2, "rho_ab"), 3), (deis.DEISRungeKutta("4rk"), 4),
                                          (deis.DEISRungeKutta("3kutta"), 3)], ids=["rhoab2", "rk4", "kutta3"])
def test_full_order_into_sigma_zero(solver, order):
  """rhoAB and rhoRK keep their order on a step into sigma = 0 (tAB and log-rho take a DDIM step there)."""
  assert abs(_slope(solver, (40, 80, 160), final="zero") - order) <= 0.3


# ---- diffusers' log-rho DEIS ---------------------------------------------------------------------------

def _diffusers_closed_form_weights(grid, order):
  """The hist weights alpha_t coef_j of diffusers' DEIS (spec section 6 closed forms), numpy float64."""
  rho = np.exp(-np.asarray(grid.lam, np.float64))
  alpha = np.asarray(grid.alpha, np.float64)
  n = int(grid.num_steps)

  def f2(r, b, c):  # int (log r - log c) / (log b - log c) d r
    return r * (np.log(r) - np.log(c) - 1) / (np.log(b) - np.log(c))

  def f3(r, b, c, d):  # int (log r - log c)(log r - log d) / ((log b - log c)(log b - log d)) d r
    big_l, lc, ld = np.log(r), np.log(c), np.log(d)
    return r * (big_l**2 - 2 * big_l + 2 - (lc + ld) * (big_l - 1) + lc * ld) / ((np.log(b) - lc) * (np.log(b) - ld))

  rows = np.zeros((n, order))
  for i in range(n):
    k = min(order, i + 1)
    t, s0 = rho[i + 1], rho[i]
    if k == 1:
      coefs = [t - s0]
    elif k == 2:
      s1 = rho[i - 1]
      coefs = [f2(t, s0, s1) - f2(s0, s0, s1), f2(t, s1, s0) - f2(s0, s1, s0)]
    else:
      s1, s2 = rho[i - 1], rho[i - 2]
      coefs = [f3(t, s0, s1, s2) - f3(s0, s0, s1, s2), f3(t, s1, s2, s0) - f3(s0, s1, s2, s0),
               f3(t, s2, s0, s1) - f3(s0, s2, s0, s1)]
    rows[i, :k] = alpha[i + 1] * np.asarray(coefs)
  return rows


@pytest.mark.parametrize("order", [2, 3])
def test_log_rho_weights_match_diffusers_closed_forms(order):
  grid = grids.karras(SCHEDULE, 12)
  solver = deis.deis_logrho(order=order, lower_order_final=False)
  got = np.asarray(solver.coefficients(grid, SCHEDULE)["hist"])[: int(grid.num_steps)]
  np.testing.assert_allclose(got, _diffusers_closed_form_weights(grid, order), rtol=1e-9, atol=1e-12)


def test_log_rho_lower_order_final_below_15_steps():
  for steps, capped in ((10, True), (14, True), (15, False)):
    grid = grids.uniform_logsnr(SCHEDULE, steps)
    hist = np.asarray(deis.deis_logrho(order=3).coefficients(grid, SCHEDULE)["hist"])
    nonzero = (hist[:steps] != 0).sum(axis=1)
    expected = np.minimum(3, np.arange(steps) + 1)
    if capped:
      expected = np.minimum(expected, steps - np.arange(steps))
    np.testing.assert_array_equal(nonzero, expected)
  assert deis.deis_logrho(order=3).for_order_measurement().lower_order_final is False


def test_bad_options_raise():
  with pytest.raises(ValueError, match="ab_order"):
    deis.DEISMultistep(ab_order=4)
  with pytest.raises(ValueError, match="method"):
    deis.DEISMultistep(method="t_rk")
  with pytest.raises(ValueError, match="quadrature_nodes"):
    deis.DEISMultistep(quadrature_nodes=1)
  with pytest.raises(ValueError, match="rk_method"):
    deis.DEISRungeKutta("5dopri")
  with pytest.raises(ValueError, match="order"):
    deis.deis_logrho(order=4)
  assert [solvers.get(f"deis_tab{r}").declared_order for r in (1, 2, 3)] == [2, 3, 4]

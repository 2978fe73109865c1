"""DC-Solver: rho = 1 is the wrapped solver, the compensation is Lagrange interpolation, searched ratios beat
rho = 1 on held-out samples, CPR carries them to an unseen NFE, save / load, gradients, no recompile, bad input;
and the class-conditional GMM that guided searches use."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import solvers
from models import analytic
from solvers import dc_solver, grids, loop, predictions, reference, schedules
from solvers.dpm_solver_multistep import DPMSolverMultistep
from solvers.unipc import UniPC

SCHEDULE = schedules.VPLinear()
CAPACITY = 16


def _x_T(oracle, n, seed):
  return oracle.sample(jax.random.key(seed), n, SCHEDULE.alpha(1.0), SCHEDULE.sigma(1.0))


def _grid(steps, final="t_end"):
  return grids.uniform_logsnr(SCHEDULE, steps, t_start=1.0, t_end=1e-3, final=final, capacity=CAPACITY)


def _rmse(solver, denoiser, grid, x, answer):
  return float(jnp.sqrt(jnp.mean((solvers.sample(solver, denoiser, SCHEDULE, grid, x).x - answer) ** 2)))


@pytest.mark.parametrize("inner", [UniPC(), DPMSolverMultistep(order=2)], ids=["unipc", "dpm_solver_pp_2m"])
@pytest.mark.parametrize("final", grids.FINAL_POLICIES)
def test_unit_ratios_are_the_wrapped_solver(inner, final):
  oracle = analytic.gmm(dim=3)
  denoiser, x, grid = oracle.denoiser(SCHEDULE), _x_T(oracle, 4, 1), _grid(7, final)
  expected = solvers.sample(inner, denoiser, SCHEDULE, grid, x)
  for solver in (dc_solver.DCSolver(inner=inner), dc_solver.DCSolver(inner=inner, ratios=jnp.ones(CAPACITY - 1))):
    sol = solvers.sample(solver, denoiser, SCHEDULE, grid, x)
    np.testing.assert_array_equal(sol.x, expected.x)
    assert int(sol.nfe) == int(expected.nfe)
  moved = dc_solver.DCSolver(inner=inner, ratios=jnp.full(CAPACITY - 1, 1.2))
  assert not np.allclose(solvers.sample(moved, denoiser, SCHEDULE, grid, x).x, expected.x)


@pytest.mark.parametrize("dc_order", dc_solver.DC_ORDERS)
def test_compensation_weights_interpolate_polynomials_exactly(dc_order):
  times = np.sort(np.random.default_rng(0).uniform(0.0, 1.0, 12))[::-1].copy()
  ratios = np.linspace(0.4, 1.6, 11)
  weights = np.asarray(dc_solver.lagrange_weights(jnp.asarray(times), jnp.asarray(ratios), dc_order))
  poly = lambda t: sum(c * t**j for j, c in enumerate((0.3, -1.1, 2.0, -0.7)[: dc_order + 1]))  # degree dc_order
  np.testing.assert_array_equal(weights[:dc_order], np.eye(dc_order + 1)[[0] * dc_order])  # too little history
  rows = np.arange(dc_order, 11)
  history = poly(times[rows[:, None] - np.arange(dc_order + 1)])
  target = ratios[rows] * times[rows] + (1 - ratios[rows]) * times[rows - 1]
  np.testing.assert_allclose(np.sum(weights[rows] * history, -1), poly(target), rtol=1e-11, atol=1e-12)


def _guided(oracle, scale):
  """Classifier-free guidance towards component 1 of the mixture."""
  return predictions.Guided(inner=oracle.denoiser(SCHEDULE), cond=oracle.label(1), uncond=None, scale=scale)


def _searched(denoiser, steps, x_train):
  grid = _grid(steps)
  target = dc_solver.reference_trajectory(denoiser, SCHEDULE, grid, x_train, substeps=25)  # one fine capacity
  return dc_solver.fit_ratios(dc_solver.DCSolver(), denoiser, SCHEDULE, grid, x_train, target, iterations=30)


GUIDANCE = (1.0, 2.0, 4.0)


@pytest.fixture(scope="module")
def gmm_fits():
  """The default GMM guided towards one component: ratios searched on 10 samples at NFE 5, 6, 8 and guidance
  1, 2, 4; and 32 held-out samples."""
  oracle = analytic.gmm(dim=8)
  x_train, held_out = _x_T(oracle, 10, 1), _x_T(oracle, 32, 0)
  settings = [(steps, scale) for steps in (5, 6, 8) for scale in GUIDANCE]
  fits = {(steps, scale): _searched(_guided(oracle, scale), steps, x_train) for steps, scale in settings}
  return oracle, held_out, fits


def _held_out_rmse(oracle, held_out, steps, scale, ratios):
  denoiser, grid = _guided(oracle, scale), _grid(steps)
  answer = reference.solve(denoiser, SCHEDULE, held_out, 1.0, grid.t[steps])
  return [_rmse(dc_solver.DCSolver(ratios=r), denoiser, grid, held_out, answer) for r in (None, ratios)]


def test_searched_ratios_beat_unit_ratios_on_held_out_samples(gmm_fits):
  oracle, held_out, fits = gmm_fits
  for setting, (ratios, info) in fits.items():
    assert info["final_loss"] < info["initial_loss"], (setting, info)
    assert np.all(np.asarray(ratios[:2]) == 1.0) and np.all(np.abs(np.asarray(ratios) - 1) < 0.5)
  plain, compensated = _held_out_rmse(oracle, held_out, 6, 4.0, fits[6, 4.0][0])
  assert compensated < 0.5 * plain, (plain, compensated)  # measured: 0.23


def test_cpr_interpolates_to_an_unseen_step_count_and_guidance_scale(gmm_fits):
  oracle, held_out, fits = gmm_fits
  cpr = dc_solver.CPR.fit([(ratios, steps, scale) for (steps, scale), (ratios, _) in fits.items()], degree=3)
  for scale, factor in ((3.0, 0.8), (1.5, 0.95)):  # measured: 0.70 and 0.86
    ratios = cpr.ratios(7, CAPACITY, guidance=scale)
    plain, predicted = _held_out_rmse(oracle, held_out, 7, scale, ratios)
    assert predicted < factor * plain, (scale, plain, predicted)
    assert np.all(ratios[:2] == 1.0) and np.all(ratios[7:] == 1.0)


def test_cpr_recovers_ratios_it_can_represent():
  truth = dc_solver.CPR(coefficients=np.random.default_rng(1).normal(size=(3, 3, 3)) * 0.1)
  settings = [(steps, guidance) for steps in (5, 6, 8, 10, 12) for guidance in (1.0, 3.0, 7.5)]
  fitted = dc_solver.CPR.fit([(truth.ratios(s, 20, g), s, g) for s, g in settings], degree=2)
  for steps, guidance in ((7, 2.0), (9, 5.0)):
    np.testing.assert_allclose(fitted.ratios(steps, 20, guidance), truth.ratios(steps, 20, guidance), rtol=1e-9)


def test_save_load_round_trip(tmp_path):
  solver = dc_solver.DCSolver(ratios=jnp.linspace(0.9, 1.1, CAPACITY - 1))
  cpr = dc_solver.CPR(coefficients=np.arange(27.0).reshape(3, 3, 3))
  path = str(tmp_path / "ratios.npz")
  dc_solver.save(path, solver, cpr)
  loaded, loaded_cpr = dc_solver.load(path, dc_solver.DCSolver())
  np.testing.assert_array_equal(loaded.ratios, solver.ratios)
  np.testing.assert_array_equal(loaded_cpr.coefficients, cpr.coefficients)
  assert sorted(p.name for p in tmp_path.iterdir()) == ["ratios.npz"]  # no temporary file left behind
  for other in (dc_solver.DCSolver(dc_order=3), dc_solver.DCSolver(inner=UniPC(order=3))):
    with pytest.raises(ValueError, match="holds ratios for"):
      dc_solver.load(path, other)


def test_gradients_match_finite_differences_and_new_ratios_do_not_recompile():
  oracle = analytic.gmm(dim=3)
  denoiser, x, grid = oracle.denoiser(SCHEDULE), _x_T(oracle, 3, 2), _grid(6)
  loss = lambda r: jnp.sum(solvers.sample(dc_solver.DCSolver(ratios=r), denoiser, SCHEDULE, grid, x).x ** 2)
  ratios = jnp.linspace(0.8, 1.3, CAPACITY - 1)
  grad = jax.grad(loss)(ratios)
  traces = loop.trace_count()
  direction = jax.random.normal(jax.random.key(3), ratios.shape)
  eps = 1e-5
  fd = (loss(ratios + eps * direction) - loss(ratios - eps * direction)) / (2 * eps)
  np.testing.assert_allclose(jnp.sum(grad * direction), fd, rtol=1e-6)
  assert loop.trace_count() == traces
  assert np.all(grad[:2] == 0) and np.all(grad[6:] == 0) and np.all(grad[2:6] != 0)  # only compensated steps


def test_bad_input():
  with pytest.raises(ValueError, match="dc_order=5"):
    dc_solver.DCSolver(dc_order=5)
  with pytest.raises(ValueError, match="inner="):
    dc_solver.DCSolver(inner=solvers.get("ddim"))
  with pytest.raises(ValueError, match="1-D"):
    dc_solver.DCSolver(ratios=jnp.ones((3, 3)))
  oracle = analytic.gmm(dim=2)
  denoiser, x, grid = oracle.denoiser(SCHEDULE), _x_T(oracle, 2, 0), _grid(4)
  with pytest.raises(ValueError, match=r"\(15,\)"):
    solvers.sample(dc_solver.DCSolver(ratios=jnp.ones(8)), denoiser, SCHEDULE, grid, x)
  target = jnp.zeros((5,) + x.shape)
  with pytest.raises(ValueError, match="bound='sigmoid'"):
    dc_solver.fit_ratios(dc_solver.DCSolver(), denoiser, SCHEDULE, grid, x, target, bound="sigmoid")
  with pytest.raises(ValueError, match="target has shape"):
    dc_solver.fit_ratios(dc_solver.DCSolver(), denoiser, SCHEDULE, grid, x, target[:3])
  with pytest.raises(ValueError, match="cond must be None"):
    analytic.gaussian(dim=2).denoiser(SCHEDULE).replace(cond=jnp.ones(2)).predict("eps", x, 0.5, SCHEDULE)


def test_class_conditional_gmm_and_guidance():
  oracle = analytic.gmm(dim=3)
  x, t = _x_T(oracle, 4, 0), 0.4
  label = oracle.label(2)
  conditional = oracle.denoiser(SCHEDULE).replace(cond=label).predict("x0", x, t, SCHEDULE)
  component = analytic.Gaussian(mean=oracle.means[2], std=jnp.broadcast_to(oracle.stds[2], (3,)))
  np.testing.assert_allclose(conditional, component.denoiser(SCHEDULE).predict("x0", x, t, SCHEDULE), rtol=1e-12)
  guided = lambda scale: predictions.Guided(inner=oracle.denoiser(SCHEDULE), cond=label, uncond=None,
                                            scale=scale).predict("x0", x, t, SCHEDULE)
  np.testing.assert_allclose(guided(1.0), conditional, rtol=1e-12)
  unconditional = oracle.denoiser(SCHEDULE).predict("x0", x, t, SCHEDULE)
  np.testing.assert_allclose(guided(3.0), unconditional + 3.0 * (conditional - unconditional), rtol=1e-12)


def test_prepare_searches_ratios_for_the_grid_and_falls_back_to_one():
  """Solver.prepare (what the convergence study calls): ratios searched on prior samples of its own key beat
  rho = 1 on held-out x_T; a search that raises the training loss (a huge step size) leaves rho = 1."""
  oracle = analytic.gmm(dim=3)
  denoiser, grid = oracle.denoiser(SCHEDULE), _grid(6)
  held_out = _x_T(oracle, 32, 0)
  answer = reference.solve(denoiser, SCHEDULE, held_out, 1.0, 1e-3)
  base_solver = solvers.get("dc_solver")
  prepared = base_solver.prepare(denoiser, SCHEDULE, grid, held_out, jax.random.key(3))
  assert not np.allclose(prepared.ratios[:6], 1.0)
  assert _rmse(prepared, denoiser, grid, held_out, answer) < 0.8 * _rmse(
      base_solver, denoiser, grid, held_out, answer)
  wild = base_solver.prepare(denoiser, SCHEDULE, grid, held_out, jax.random.key(3), bound="none", learning_rate=50.0,
                             iterations=2)
  np.testing.assert_array_equal(wild.ratios, 1.0)

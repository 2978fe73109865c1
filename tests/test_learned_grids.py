"""Learned time grids (solvers.learned_grids): the optimiser lowers the calibration loss, the grid stays strictly
monotone inside the schedule's range for any parameters, the loss is differentiable in the times, the held-out
loss is reported apart, and bad input raises ValueError. Tiny settings: a 4-D mixture, 3 steps, few starts."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import solvers
from models import analytic
from solvers import learned_grids as lg
from solvers import schedules

STEPS = 3
SOLVER = "dpm_solver_pp_2m"


@pytest.fixture(scope="module")
def problem():
  schedule = schedules.VPLinear()
  denoiser = analytic.gmm(dim=4).denoiser(schedule)
  return lg.make_problem(denoiser, schedule, jax.random.key(0), num_calibration=8, num_heldout=16, rtol=1e-8,
                         atol=1e-8)


@pytest.fixture(scope="module")
def result(problem):
  return lg.optimize(SOLVER, problem, STEPS, init="logsnr", iterations=25, learning_rate=0.1)


def test_problem_shapes_and_references(problem):
  assert problem.x_calibration.shape == (8, 4) and problem.x_heldout.shape == (16, 4)
  assert problem.reference_calibration.shape == (8, 4) and problem.final == "zero"
  assert problem.t_start == 1.0 and problem.t_end == 1e-3
  # The starts are N(0, sigma^2) noise; the references lie near the data (GMM means), far from the starts.
  assert not np.allclose(problem.x_calibration, problem.reference_calibration, atol=0.1)
  # Calibration and held-out starts differ (separate keys).
  assert not np.any(np.isclose(problem.x_calibration[:, 0][:, None], problem.x_heldout[:, 0][None]))


def test_optimiser_lowers_calibration_loss(result):
  assert result.history[0] > 0
  assert result.calibration_loss < 0.9 * result.history[0]
  assert result.calibration_loss == pytest.approx(min(result.history))
  assert np.isfinite(result.heldout_loss) and np.isfinite(result.initial_heldout_loss)
  assert result.seconds > 0 and result.init == "logsnr"


def test_heldout_loss_is_measured_on_the_heldout_set(problem, result):
  solver = solvers.get(SOLVER)
  times = jnp.asarray(result.times)
  heldout = float(lg.loss(solver, times, problem.x_heldout, problem.reference_heldout, problem))
  calibration = float(lg.loss(solver, times, problem.x_calibration, problem.reference_calibration, problem))
  assert heldout == pytest.approx(result.heldout_loss, rel=1e-9)
  assert calibration == pytest.approx(result.calibration_loss, rel=1e-9)
  assert heldout != pytest.approx(calibration, rel=1e-3)
  initial = jnp.asarray(lg.hand_made_times(problem.schedule, "logsnr", STEPS))
  # learn_end moves the initial last node by 0.1% of the lambda span only.
  assert float(lg.loss(solver, initial, problem.x_heldout, problem.reference_heldout, problem)) == pytest.approx(
      result.initial_heldout_loss, rel=2e-2)


def test_learned_grid_is_strictly_monotone_and_in_range(problem, result):
  t = result.times
  assert t.shape == (STEPS,)  # final='zero': the sigma = 0 node is not listed
  assert np.all(np.diff(t) < 0)
  assert t[0] == problem.t_start and t[-1] >= problem.t_end
  assert np.all((t >= problem.schedule.t_min) & (t <= problem.schedule.t_max))
  grid = lg.make_grid(problem.schedule, jnp.asarray(t), "zero")
  assert int(grid.num_steps) == STEPS and float(grid.sigma[STEPS]) == 0.0


@pytest.mark.parametrize("learn_end", [False, True])
def test_any_logits_give_a_strictly_monotone_grid(learn_end):
  schedule = schedules.VPLinear()
  rng = np.random.default_rng(0)
  for n in (3, 9):
    m = lg.num_logits(n, learn_end)
    for scale in (1.0, 30.0, 300.0):  # extreme logits: the min_fraction floor keeps every interval open
      t = np.asarray(lg.times_from_logits(jnp.asarray(scale * rng.standard_normal(m)), schedule, n, 1.0, 1e-3,
                                          learn_end=learn_end))
      assert t.shape == (n,) and t[0] == 1.0 and np.all(np.diff(t) < 0)
      assert t[-1] >= 1e-3 and (learn_end or t[-1] == 1e-3)


@pytest.mark.parametrize("name", lg.INITS)
def test_logits_reproduce_the_hand_made_grids(name):
  schedule = schedules.VPLinear()
  times = lg.hand_made_times(schedule, name, 6, final="t_end")
  assert times.shape == (7,) and times[0] == 1.0 and times[-1] == 1e-3
  logits = lg.logits_from_times(times, schedule, 1.0, 1e-3)
  back = np.asarray(lg.times_from_logits(logits, schedule, 7, 1.0, 1e-3))
  np.testing.assert_allclose(back, times, rtol=1e-10)


def test_loss_gradient_matches_finite_differences(problem):
  solver = solvers.get(SOLVER)
  times = jnp.asarray(lg.hand_made_times(problem.schedule, "logsnr", STEPS))
  f = jax.jit(jax.value_and_grad(
      lambda t: lg.loss(solver, t, problem.x_calibration, problem.reference_calibration, problem)))
  grad = np.asarray(f(times)[1])
  assert np.all(np.isfinite(grad)) and np.any(grad != 0)
  k, eps = 1, 1e-6
  step = jnp.zeros_like(times).at[k].set(eps)
  numeric = (float(f(times + step)[0]) - float(f(times - step)[0])) / (2 * eps)
  assert grad[k] == pytest.approx(numeric, rel=1e-4)


def test_float32_loss_matches_float64(problem):
  solver = solvers.get(SOLVER)
  times = jnp.asarray(lg.hand_made_times(problem.schedule, "logsnr", STEPS))
  l64 = lg.loss(solver, times, problem.x_heldout, problem.reference_heldout, problem)
  l32 = lg.loss(solver, times.astype(jnp.float32), problem.x_heldout.astype(jnp.float32),
                problem.reference_heldout.astype(jnp.float32), problem)
  assert l32.dtype == jnp.float32 and l64.dtype == jnp.float64
  assert float(l32) == pytest.approx(float(l64), rel=1e-4)


def test_best_init_picks_the_lowest_calibration_loss(problem):
  result = lg.optimize(SOLVER, problem, STEPS, init="best", iterations=0)
  solver = solvers.get(SOLVER)
  scores = {name: float(lg.loss(solver, jnp.asarray(lg.hand_made_times(problem.schedule, name, STEPS)),
                                problem.x_calibration, problem.reference_calibration, problem))
            for name in lg.BASELINES}
  assert result.init == min(scores, key=scores.get)
  assert result.calibration_loss == pytest.approx(scores[result.init], rel=2e-2)


def test_array_init_with_a_free_end_is_kept(problem):
  """An evolution-found grid (last node above t_end) is a valid start with learn_end: 0 iterations return it."""
  init = np.array([1.0, 0.4, 0.12, 0.031])[:STEPS]
  result = lg.optimize(SOLVER, problem, STEPS, init=init, iterations=0)
  assert result.init == "times" and len(result.history) == 1
  np.testing.assert_allclose(result.times, init, rtol=1e-9)
  with pytest.raises(ValueError, match="t_end"):  # without learn_end the grid must end at t_end
    lg.optimize(SOLVER, problem, STEPS, init=init, iterations=0, learn_end=False)


def test_bad_input_raises(problem):
  schedule, denoiser = problem.schedule, problem.denoiser
  key = jax.random.key(0)
  with pytest.raises(ValueError, match="num_calibration"):
    lg.make_problem(denoiser, schedule, key, num_calibration=0, num_heldout=4)
  with pytest.raises(ValueError, match="final"):
    lg.make_problem(denoiser, schedule, key, num_calibration=2, num_heldout=2, final="last")
  with pytest.raises(ValueError, match="t_end"):
    lg.make_problem(denoiser, schedule, key, num_calibration=2, num_heldout=2, t_start=0.1, t_end=0.5)
  with pytest.raises(ValueError, match="shape"):
    lg.make_problem(solvers.Denoiser(apply_fn=lambda p, x, t, c: x), schedule, key, num_calibration=2, num_heldout=2)
  with pytest.raises(ValueError, match="init"):
    lg.optimize(SOLVER, problem, STEPS, init="cosine", iterations=1)
  with pytest.raises(ValueError, match="init"):
    lg.optimize(SOLVER, problem, STEPS, init=np.array([1.0, 0.5]), iterations=1)
  with pytest.raises(ValueError, match="strictly"):
    lg.optimize(SOLVER, problem, STEPS, init=np.array([1.0, 0.001, 0.5]), iterations=1)
  with pytest.raises(ValueError, match="learning_rate"):
    lg.optimize(SOLVER, problem, STEPS, learning_rate=0.0)
  with pytest.raises(ValueError, match="iterations"):
    lg.optimize(SOLVER, problem, STEPS, iterations=-1)
  with pytest.raises(ValueError, match="stochastic"):
    lg.optimize("ddpm_ancestral", problem, STEPS)
  with pytest.raises(ValueError, match="adaptive"):
    lg.optimize("dpm_solver_12", problem, STEPS)
  with pytest.raises(ValueError, match="DC-Solver"):
    lg.optimize(SOLVER, problem, STEPS, learn_ratios=True)
  with pytest.raises(ValueError, match="learn_end"):
    lg.optimize(SOLVER, problem._replace(final="t_end"), STEPS, learn_end=True)
  with pytest.raises(ValueError, match="unknown"):
    lg.hand_made_times(schedule, "edm", 4)

"""Time shift: no window (or no step above the cutoff) is the wrapped solver, the model is called at the
variance-matched candidate per sample, the candidate table, bad options."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import solvers
from models import analytic
from solvers import grids, schedules, time_shift
from solvers.ddim import DDIM
from solvers.dpm_solver_multistep import DPMSolverMultistep

SCHEDULE = schedules.VPLinear()
INNERS = [DDIM(), DPMSolverMultistep(order=2)]


def _setup():
  oracle = analytic.gmm(dim=3)
  x = oracle.sample(jax.random.key(1), 4, SCHEDULE.alpha(1.0), SCHEDULE.sigma(1.0))
  return oracle.denoiser(SCHEDULE), x, grids.uniform_logsnr(SCHEDULE, 7, capacity=16)


@pytest.mark.parametrize("inner", INNERS, ids=["ddim", "dpm_solver_pp_2m"])
def test_no_shift_is_the_wrapped_solver(inner):
  denoiser, x, grid = _setup()
  expected = solvers.sample(inner, denoiser, SCHEDULE, grid, x).x
  no_window = solvers.sample(time_shift.TimeShift(inner=inner, window=0.0), denoiser, SCHEDULE, grid, x).x
  np.testing.assert_array_equal(no_window, expected)
  # Above the cutoff nothing moves, but the model call is mapped over the batch: equal up to its round-off.
  no_step = solvers.sample(time_shift.TimeShift(inner=inner, cutoff=SCHEDULE.t_max), denoiser, SCHEDULE, grid, x).x
  np.testing.assert_allclose(no_step, expected, rtol=1e-12, atol=1e-12)
  shifted = solvers.sample(time_shift.TimeShift(inner=inner), denoiser, SCHEDULE, grid, x).x
  assert not np.allclose(shifted, expected, atol=1e-6)


def test_candidate_times_span_the_window_above_the_cutoff():
  solver = time_shift.TimeShift(window=0.25, cutoff=0.5, candidates=5)
  grid = grids.uniform_t(SCHEDULE, 8, capacity=16)
  times, t = np.asarray(solver.candidate_times(grid, SCHEDULE)), np.asarray(grid.t)
  for i in range(8):
    if i == 0 or t[i] <= 0.5:
      np.testing.assert_array_equal(times[i], t[i])
    else:
      step = t[i] - t[i + 1]
      expected = np.clip(t[i] + np.linspace(-0.25, 0.25, 5) * step, SCHEDULE.t_min, SCHEDULE.t_max)
      np.testing.assert_allclose(times[i], expected, rtol=1e-14)


class _TimeEcho:
  """A denoiser whose noise prediction is the time it is called at (x0 the same), to read the time back."""

  def predict(self, kind, x, t, schedule):
    return jnp.broadcast_to(jnp.asarray(t, x.dtype), x.shape)


@pytest.mark.parametrize("data_variance", [0.0, 0.7])
def test_each_sample_is_evaluated_at_its_variance_matched_time(data_variance):
  solver = time_shift.TimeShift(inner=DDIM(form="eps"), window=0.3, cutoff=0.0, candidates=7,
                                data_variance=data_variance)
  grid = grids.uniform_t(SCHEDULE, 6, capacity=8)
  coeffs = solver.coefficients(grid, SCHEDULE)
  i = 2
  times, variance = np.asarray(coeffs["times"][i]), np.asarray(coeffs["variance"][i])
  np.testing.assert_allclose(variance, np.asarray(SCHEDULE.alpha(times)) ** 2 * data_variance
                             + np.asarray(SCHEDULE.sigma(times)) ** 2, rtol=1e-13)
  # Sample k has (unbiased) variance a little off candidate target[k]: it must pick candidate k.
  picks = [5, 0, 3]
  signs = np.array([1.0, -1.0] * 8)
  x = jnp.stack([signs * np.sqrt((variance[k] + 1e-6) * 15 / 16) for k in picks])
  state = solver.init(_TimeEcho(), SCHEDULE, grid, x, jax.random.key(0))
  row = jax.tree_util.tree_map(lambda c: c[i], coeffs)
  new = solver.step(_TimeEcho(), SCHEDULE, grid, row, i, state)
  c = row["inner"]
  called_at = (new.x - c["x"] * x) / c["m"]
  np.testing.assert_allclose(called_at, np.broadcast_to(times[picks][:, None], x.shape), rtol=1e-10)
  assert int(new.nfe) == 1


@pytest.mark.parametrize("options", [{"window": -0.1}, {"candidates": 1}, {"candidates": 2.0}, {"data_variance": -1.0},
                                     {"inner": solvers.get("dpm_solver_2s")}])
def test_bad_options_raise(options):
  with pytest.raises(ValueError, match=next(iter(options))):
    time_shift.TimeShift(**options)

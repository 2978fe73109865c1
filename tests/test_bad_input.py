"""Bad input raises a ValueError that names the offending value, before anything runs."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import solvers
from models import analytic
from solvers import ddim, grids, schedules

SCHEDULE = schedules.VPLinear()


@pytest.fixture(name="oracle")
def _oracle():
  return analytic.gaussian(dim=3)


def test_unknown_solver_lists_the_valid_names(oracle):
  with pytest.raises(ValueError, match=r"'dpm_magic' is unknown; valid: .*ddim"):
    solvers.sample("dpm_magic", oracle.denoiser(SCHEDULE), SCHEDULE, grids.uniform_t(SCHEDULE, 3), jnp.zeros((1, 3)))
  with pytest.raises(ValueError, match="'nope'.*ddim"):
    solvers.get("nope")


@pytest.mark.parametrize("steps", [0, -3, 2.5, True])
def test_nfe_below_one_or_not_an_integer(steps):
  with pytest.raises(ValueError, match=f"num_steps={steps!r}"):
    grids.uniform_logsnr(SCHEDULE, steps)


def test_non_monotone_and_out_of_range_grids():
  with pytest.raises(ValueError, match="strictly monotone.*0.5"):
    grids.from_times(SCHEDULE, np.array([1.0, 0.5, 0.7, 0.1]))
  with pytest.raises(ValueError, match=r"t\[1\]=1.5.*outside.*\[0.001, 1.0\]"):
    grids.from_times(SCHEDULE, np.array([0.9, 1.5, 0.1]))
  with pytest.raises(ValueError, match="outside"):
    grids.uniform_t(SCHEDULE, 4, t_end=0.0)


def test_shape_mismatch_between_x_T_and_the_denoiser_output():
  def apply_fn(params, x, t, cond):
    return jnp.zeros((x.shape[0], 5))

  denoiser = solvers.Denoiser(apply_fn=apply_fn)
  with pytest.raises(ValueError, match=r"output shape \(2, 5\) differs from the sample shape \(2, 3\)"):
    solvers.sample("ddim", denoiser, SCHEDULE, grids.uniform_t(SCHEDULE, 3), jnp.zeros((2, 3)))


def test_unknown_prediction_kind():
  with pytest.raises(ValueError, match="'noise' is unknown; valid: eps, x0, v, score, velocity"):
    solvers.Denoiser(apply_fn=lambda p, x, t, c: x, prediction="noise")


def test_float64_requested_without_x64(oracle):
  with jax.enable_x64(False):
    grid = grids.uniform_t(SCHEDULE, 3)
    with pytest.raises(ValueError, match="float64 but jax_enable_x64 is off"):
      solvers.sample("ddim", oracle.denoiser(SCHEDULE), SCHEDULE, grid, np.zeros((1, 3), np.float64))


def test_integer_samples_and_non_grids(oracle):
  with pytest.raises(ValueError, match="dtype int"):
    solvers.sample("ddim", oracle.denoiser(SCHEDULE), SCHEDULE, grids.uniform_t(SCHEDULE, 3), np.zeros((1, 3), int))
  with pytest.raises(ValueError, match="grid must be a solvers.grids.Grid.*ndarray"):
    solvers.sample("ddim", oracle.denoiser(SCHEDULE), SCHEDULE, np.linspace(1, 0.1, 4), jnp.zeros((1, 3)))


def test_stochastic_solver_needs_a_key(oracle):
  with pytest.raises(ValueError, match="stochastic: pass key="):
    solvers.sample(ddim.DDIM(eta=1.0), oracle.denoiser(SCHEDULE), SCHEDULE, grids.uniform_t(SCHEDULE, 3),
                   jnp.zeros((1, 3)))


def test_ddim_options():
  with pytest.raises(ValueError, match="eta=1.5"):
    ddim.DDIM(eta=1.5)
  with pytest.raises(ValueError, match="form='v'"):
    ddim.DDIM(form="v")
  with pytest.raises(TypeError):
    solvers.get("ddim", no_such_option=1)

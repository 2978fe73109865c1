"""Parity of SDE-DPM-Solver++ (order 1, 2M midpoint / heun) with diffusers' DPMSolverMultistepScheduler
(``algorithm_type='sde-dpmsolver++'``) on the analytic mixture, both sides using the same noise.

Our step i draws its noise as ``base.noise(key, x, i)``; the diffusers loop below hands those draws to
``scheduler.step(..., variance_noise=...)`` in place of its own ``randn_tensor``, so the two runs differ only
in arithmetic. Everything else (betas, timesteps, the oracle as a network, the float64 mode, our grid for
diffusers' 'zero' / 'sigma_min' ends, tolerances) is the harness of tests/test_diffusers_parity.py.
"""
import contextlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import solvers
from solvers import base
from solvers.dpm_solver_sde import DPMSolverSDE
from tests.test_diffusers_parity import (BETAS, DIFFERS, F64_RTOL, ORACLE, SCHEDULE, STOCK_RTOL, X_T,
                                         _float64_module, _oracle_network, dpm_grid, rel_diff)

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

pytestmark = pytest.mark.filterwarnings(
    "ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning")

KEY = jax.random.key(21)


def run_ours(solver, grid, key=KEY):
  denoiser = ORACLE.denoiser(SCHEDULE)
  return np.asarray(solvers.sample(solver, denoiser, SCHEDULE, grid, jnp.asarray(X_T), key=key).x)


def run_diffusers_sde(config, num_steps, mode):
  """diffusers' sampling loop on the oracle from X_T, step i given the noise base.noise(KEY, x, i).

  Returns (final sample, timesteps). mode 'float64': the scheduler's code in float64; 'stock': as shipped."""
  cls = diffusers.DPMSolverMultistepScheduler
  in_mode = (lambda: _float64_module(cls)) if mode == "float64" else contextlib.nullcontext
  with in_mode():
    scheduler = cls(**BETAS, prediction_type="epsilon", algorithm_type="sde-dpmsolver++", **config)
  network = _oracle_network(scheduler, "epsilon")
  x = torch.from_numpy(np.array(X_T, np.float64))
  with in_mode():
    scheduler.set_timesteps(num_steps)
    for i, t in enumerate(scheduler.timesteps):
      noise = torch.from_numpy(np.array(base.noise(KEY, jnp.asarray(X_T), i)))
      x = scheduler.step(network(x, t), t, x, variance_noise=noise).prev_sample
  return x.numpy().astype(np.float64), scheduler.timesteps.numpy().copy()


CASES = {f"order {order} {kind}": (order, kind) for order, kind in ((1, "midpoint"), (2, "midpoint"), (2, "heun"))}


def _case(name, final, num_steps, mode):
  order, solver_type = CASES[name]
  config = dict(solver_order=order, solver_type=solver_type, final_sigmas_type=final)
  theirs, timesteps = run_diffusers_sde(config, num_steps, mode)
  # diffusers' rule: lower-order final steps below 15 steps.
  ours = DPMSolverSDE(order=order, solver_type=solver_type, lower_order_final_below=15)
  return ours, dpm_grid(timesteps, final), theirs


@pytest.mark.parametrize("num_steps", [10, 20])
@pytest.mark.parametrize("final", ["zero", "sigma_min"])
@pytest.mark.parametrize("name", CASES)
def test_sde_dpm_solver_pp_matches_diffusers_in_float64(name, final, num_steps):
  ours, grid, theirs = _case(name, final, num_steps, "float64")
  diff = rel_diff(run_ours(ours, grid), theirs)
  assert diff <= F64_RTOL, (name, final, num_steps, diff)


def test_sde_dpm_solver_pp_matches_stock_diffusers_and_the_noise_matters():
  """As shipped (float32 tables and steps) within the stock tolerance; another key moves the result by far more."""
  ours, grid, theirs = _case("order 2 midpoint", "zero", 20, "stock")
  assert rel_diff(run_ours(ours, grid), theirs) <= STOCK_RTOL
  assert rel_diff(run_ours(ours, grid, key=jax.random.key(22)), theirs) > DIFFERS

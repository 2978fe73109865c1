"""Parity of our naive inversions with diffusers' inverse schedulers on the analytic mixture (the harness,
modes and tolerances of tests/test_diffusers_parity.py; the inverted point is a clean mixture sample X0).

**DDIMInverseScheduler** (leading spacing) is the natural inverse of DDIMScheduler: its N model calls are at
exactly the sampling timesteps, ascending, the first at the smallest one (``steps_offset``; diffusers#5145
had -19 instead of 1), and N calls for N sampling steps (diffusers#3436 had N - 1). Call i steps from level
t_i - T // N (``initial_alpha_cumprod`` below 0: 1 with ``set_alpha_to_one``, else alphas_cumprod[0], the
sampling scheduler's final alpha) to level t_i with eps evaluated at (x, t_i): our ``DDIMInversion`` with
``alignment='sampling'`` on ``ddim_grid`` of the sampling timesteps (test_ddim_inverse_parity: every
intermediate sample agrees, measured <= 1.9e-15 relative in the float64 mode, <= 6.9e-7 stock; the
``alignment='current'`` variant is another method). As in sampling, ``set_alpha_to_one=False`` with
``steps_offset=0`` makes one step zero-length (here the first: alphas_cumprod[0] to alphas_cumprod[0]), an
identity that costs a model call; our grid leaves it out.
Known differences, asserted:
- 'trailing' with T % N != 0 steps from t_i - T // N, not from the previous timestep (the mirror of
  diffusers#9261 in DDIMScheduler; for N = 7 its first step even starts at alphas_cumprod[0] whatever
  set_alpha_to_one); rebuilt step by step from our one-step inversions.
- ``prediction_type='sample'`` / ``'v_prediction'``: the model is evaluated at t_i but its output is
  converted to (x0, eps) with the *source* level's alpha, sigma (t_i - T // N), so it is not the eps of the
  model: another method (0.75 away for v, 5.9 for 'sample' into alphas_cumprod[0]) and, with
  set_alpha_to_one, a division by sigma = 0 at the first step (inf / NaN, diffusers#10920). Our denoiser
  converts at the model's own time, so our inversion is the same for eps, x0 and v models.

**DPMSolverMultistepInverseScheduler** (dpmsolver++, order 2) is our ``DPMSolverPPInversion`` (model at the
current node, data prediction, first step first order) with ``solver_type='heun'``: ours integrates the
linear extrapolation of x0 exactly, which is diffusers' 'heun' 2M (measured <= 6.7e-14 float64, <= 1.9e-5
stock, where its step keeps the float64 sample and only the tables are float32; its 'midpoint' differs by
4e-3..9e-3). Its nodes are its timesteps (from 0, or ``steps_offset``) and the noisiest timestep (999)
appended as the last sigma; we build our grid from exactly those (``grids.from_times``). Known differences, asserted:
- 'linspace' nodes are the reverse of DPMSolverMultistepScheduler's (final 'sigma_min'); 'leading' ones are
  not: the last step runs to 999 instead of to the sampling scheduler's first timestep N (T // (N + 1)) +
  steps_offset, and with steps_offset=1 the inversion starts at index 1 where sampling ends at index 0.
- ``lower_order_final`` (default, below 15 steps): the last inverse step (into the noisiest node) is first
  order; ours has no such rule (2.8e-4 .. 2.3e-3 apart); rebuilt from our 2M on the first N - 1 steps and one
  DDIM inversion step with the model at the current node.
- 'trailing': the timesteps end at 999 and 999 is appended again, a zero-length last step: an identity that
  costs a model call when first order, 0 / 0 = NaN in 'heun' 2M when it is second order. It also starts at
  T / N - 1 (99 for N = 10), not at 0.
- ``algorithm_type='sde-dpmsolver++'``: sqrt(1 - e^{-2h}) with h < 0 is NaN at the first step
  (diffusers#10748); we have no stochastic inversion.
"""
import contextlib
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
import pytest

diffusers = pytest.importorskip("diffusers", reason="parity peer missing: pip install -e '.[parity]'")

from solvers import grids, inversion  # noqa: E402
from solvers.ddim_inversion import DDIMInversion  # noqa: E402
from solvers.dpm_solver_inversion import DPMSolverPPInversion  # noqa: E402
from tests import test_diffusers_parity as parity  # noqa: E402
from tests.test_diffusers_parity import (  # noqa: E402
    DDIM_SETTINGS, DIFFERS, NUM_TRAIN, ORACLE, SCHEDULE, STOCK_RTOL, _assert_close, ddim_grid, rel_diff, run_diffusers)

pytestmark = parity.pytestmark

F64_RTOL = 1e-12  # measured <= 6.7e-14 (DPM) and <= 1.9e-15 (DDIM) relative
STEPS = (10, 20)
X0 = np.asarray(ORACLE.sample(jax.random.key(3), 8), np.float64)
DDIM_INVERSE = diffusers.DDIMInverseScheduler
DPM_INVERSE = diffusers.DPMSolverMultistepInverseScheduler


@contextlib.contextmanager
def _model_calls():
  """Records the integer timestep of every model call made by ``run_diffusers`` inside the block."""
  calls = []
  network_of = parity._oracle_network

  def recording(scheduler, prediction_type):
    network = network_of(scheduler, prediction_type)

    def call(sample, timestep):
      calls.append(int(timestep))
      return network(sample, timestep)

    return call

  with mock.patch.object(parity, "_oracle_network", recording):
    yield calls


def run_inverse(cls, config, num_steps, mode="float64", prediction_type="epsilon"):
  """diffusers' inversion loop from X0: (DiffusersRun, the timesteps of its model calls)."""
  with _model_calls() as calls:
    run = run_diffusers(cls, config, num_steps, mode, prediction_type, x_T=X0)
  return run, np.array(calls)


def invert_ours(method, grid, prediction="eps", x0=X0):
  """Our inversion of x0 along the sampling grid: (latent, nfe, the sample after each step)."""
  latent, sol = inversion.invert(method, ORACLE.denoiser(SCHEDULE, prediction), SCHEDULE, grid, jnp.asarray(x0),
                                 return_trajectory=True)
  nfe = int(sol.nfe)
  return np.asarray(latent.x), nfe, np.asarray(sol.trajectory)[1: nfe + 1]


def our_model_times(solver, grid):
  """The times at which ``solver`` calls the model when it runs on grids.reverse(grid)."""
  return np.asarray(solver.coefficients(grids.reverse(grid), SCHEDULE)["t"])[: int(grid.num_steps)]


def sampling_timesteps(cls, config, num_steps):
  scheduler = cls(**parity.BETAS, **config)
  scheduler.set_timesteps(num_steps)
  return scheduler.timesteps.numpy().copy()


# --- DDIMInverseScheduler ----------------------------------------------------------------------------------


def _ddim_config(set_alpha_to_one=True, steps_offset=0, spacing="leading"):
  return dict(clip_sample=False, set_alpha_to_one=set_alpha_to_one, steps_offset=steps_offset,
              timestep_spacing=spacing)


@pytest.mark.parametrize("set_alpha_to_one,steps_offset", DDIM_SETTINGS)
def test_ddim_inverse_parity(set_alpha_to_one, steps_offset):
  config = _ddim_config(set_alpha_to_one, steps_offset)
  for num_steps in STEPS:
    what = f"DDIM inverse set_alpha_to_one={set_alpha_to_one} steps_offset={steps_offset} N={num_steps}"
    f64, calls = run_inverse(DDIM_INVERSE, config, num_steps)
    stock, _ = run_inverse(DDIM_INVERSE, config, num_steps, "stock")
    sampling = sampling_timesteps(diffusers.DDIMScheduler, config, num_steps)
    # N calls (not N - 1: #3436) at exactly the sampling timesteps, the first at the smallest (not -19: #5145).
    np.testing.assert_array_equal(calls, sampling[::-1], err_msg=what)
    assert calls.size == f64.nfe == num_steps and calls[0] == steps_offset == sampling.min()
    grid = ddim_grid(sampling, set_alpha_to_one)
    latent, nfe, trajectory = invert_ours("ddim", grid)
    identity_first = not set_alpha_to_one and steps_offset == 0  # alphas_cumprod[0] -> alphas_cumprod[0]
    assert nfe == num_steps - identity_first
    np.testing.assert_array_equal(our_model_times(DDIMInversion(), grid), calls[identity_first:])
    if identity_first:
      _assert_close(f64.trajectory[0], X0, 1e-14, what + ": diffusers' zero-length first step")
    _assert_close(trajectory, np.stack(f64.trajectory[identity_first:]), F64_RTOL, what + " (float64, every step)")
    _assert_close(latent, f64.x, F64_RTOL, what + " (float64)")
    _assert_close(latent, stock.x, STOCK_RTOL, what + " (stock)")
    if not set_alpha_to_one:  # (a grid into sigma = 0 has no model value at its first 'current' node)
      current, _, _ = invert_ours(inversion.get("ddim", alignment="current"), grid)
      assert rel_diff(current, f64.x) > DIFFERS, what + ": alignment='current'"


@pytest.mark.parametrize("num_steps", (7, 10, 20))
def test_ddim_inverse_trailing_steps_from_t_minus_T_over_N(num_steps):
  """With 'trailing' spacing diffusers' inverse step i goes from level t_i - T // N to t_i: the previous
  timestep only where T % N == 0. Otherwise (N = 7) it is rebuilt from one-step DDIM inversions between
  those levels (below 0: alphas_cumprod = 1), and differs from the inversion along its sampling timesteps."""
  config = _ddim_config(spacing="trailing")
  run, calls = run_inverse(DDIM_INVERSE, config, num_steps)
  sampling = sampling_timesteps(diffusers.DDIMScheduler, config, num_steps)
  np.testing.assert_array_equal(calls, sampling[::-1])
  natural, _, _ = invert_ours("ddim", grids.from_times(SCHEDULE, sampling, final="zero"))
  x = X0
  for t in calls:
    source = t - NUM_TRAIN // num_steps
    step = (grids.from_times(SCHEDULE, [t], final="zero") if source < 0
            else grids.from_times(SCHEDULE, [t, source]))
    x, _, _ = invert_ours("ddim", step, x0=x)
  what = f"DDIM inverse trailing N={num_steps}"
  _assert_close(x, run.x, F64_RTOL, what + " rebuilt from its own steps")
  if NUM_TRAIN % num_steps == 0:
    _assert_close(natural, run.x, F64_RTOL, what)
  else:
    assert rel_diff(natural, run.x) > DIFFERS, what


def _source_level_inversion(prediction_type, set_alpha_to_one, num_steps, timesteps):
  """diffusers' inverse with an x0 / v model, rebuilt: the model at (x, t_i), its output converted to x0
  and eps with alpha, sigma of the source level t_i - T // N, then x' = alpha_i x0 + sigma_i eps."""
  ac = np.asarray(SCHEDULE.alphas_cumprod, np.float64)
  x = X0
  for t in timesteps:
    source = t - NUM_TRAIN // num_steps
    a_s = np.sqrt(ac[source] if source >= 0 else (1.0 if set_alpha_to_one else ac[0]))
    s_s = np.sqrt(1.0 - a_s ** 2)
    a_t, s_t = np.sqrt(ac[t]), np.sqrt(1.0 - ac[t])
    x0, eps = (np.asarray(v, np.float64) for v in parity._X0_EPS(jnp.asarray(x), a_t, s_t))
    if prediction_type == "sample":
      x0, eps = x0, (x - a_s * x0) / s_s
    else:
      v = a_t * eps - s_t * x0
      x0, eps = a_s * x - s_s * v, a_s * v + s_s * x
    x = a_t * x0 + s_t * eps
  return x


def test_ddim_inverse_converts_x0_and_v_outputs_at_the_source_level():
  num_steps = 10
  for set_alpha_to_one in (False, True):
    config = _ddim_config(set_alpha_to_one, steps_offset=1)
    eps_run, calls = run_inverse(DDIM_INVERSE, config, num_steps)
    grid = ddim_grid(sampling_timesteps(diffusers.DDIMScheduler, config, num_steps), set_alpha_to_one)
    for prediction in ("eps", "x0", "v"):  # ours: the same inversion for every model parameterization
      _assert_close(invert_ours("ddim", grid, prediction)[0], eps_run.x, F64_RTOL, f"our {prediction} model")
    for prediction_type in ("sample", "v_prediction"):
      run, _ = run_inverse(DDIM_INVERSE, config, num_steps, prediction_type=prediction_type)
      what = f"DDIM inverse {prediction_type} set_alpha_to_one={set_alpha_to_one}"
      if set_alpha_to_one and prediction_type == "sample":  # eps = (x - x0) / 0 at the first step (#10920)
        assert not np.isfinite(run.trajectory[0]).all(), what
        continue
      assert rel_diff(run.x, eps_run.x) > 0.1, what
      rebuilt = _source_level_inversion(prediction_type, set_alpha_to_one, num_steps, calls)
      _assert_close(rebuilt, run.x, F64_RTOL, what + " rebuilt")


# --- DPMSolverMultistepInverseScheduler ----------------------------------------------------------------------


def _dpm_config(solver_type="heun", lower_order_final=False, spacing="linspace", steps_offset=0, **options):
  config = dict(algorithm_type="dpmsolver++", solver_order=2, solver_type=solver_type,
                lower_order_final=lower_order_final, timestep_spacing=spacing, steps_offset=steps_offset)
  return dict(config, **options)


def dpm_inverse_nodes(run):
  """The nodes diffusers' inverse integrates: its timesteps, then the noisiest timestep (its last sigma)."""
  return np.append(run.timesteps, run.scheduler.noisiest_timestep)


def dpm_inverse_grid(nodes):
  """Our sampling grid through those nodes (noise end first); ``invert`` runs it backwards."""
  return grids.from_times(SCHEDULE, nodes[::-1])


DPM_SPACINGS = (("linspace", 0), ("leading", 0), ("leading", 1))


@pytest.mark.parametrize("spacing,steps_offset", DPM_SPACINGS)
def test_dpm_inverse_parity_heun(spacing, steps_offset):
  for num_steps, lower_order_final in ((10, False), (20, False), (20, True)):  # the rule acts below 15 steps
    config = _dpm_config(lower_order_final=lower_order_final, spacing=spacing, steps_offset=steps_offset)
    what = f"DPM++ 2M heun inverse {spacing} steps_offset={steps_offset} N={num_steps} lof={lower_order_final}"
    f64, calls = run_inverse(DPM_INVERSE, config, num_steps)
    stock, _ = run_inverse(DPM_INVERSE, config, num_steps, "stock")
    nodes = dpm_inverse_nodes(f64)
    assert nodes[0] == steps_offset and nodes[-1] == NUM_TRAIN - 1 and nodes.size == num_steps + 1
    grid = dpm_inverse_grid(nodes)
    np.testing.assert_allclose(np.exp(-np.asarray(grids.reverse(grid).lam[: num_steps + 1])), f64.sigmas,
                               rtol=1e-12, err_msg=what)
    latent, nfe, trajectory = invert_ours("dpm_solver_pp", grid)
    np.testing.assert_array_equal(calls, f64.timesteps)
    np.testing.assert_array_equal(our_model_times(DPMSolverPPInversion(), grid), calls)
    assert nfe == f64.nfe == num_steps
    _assert_close(trajectory, np.stack(f64.trajectory), F64_RTOL, what + " (float64, every step)")
    _assert_close(latent, f64.x, F64_RTOL, what + " (float64)")
    _assert_close(latent, stock.x, STOCK_RTOL, what + " (stock)")
    # The reverse of DPMSolverMultistepScheduler's nodes (final 'sigma_min') for 'linspace' only.
    sampling = np.append(sampling_timesteps(diffusers.DPMSolverMultistepScheduler, config, num_steps), 0)
    assert np.array_equal(nodes, sampling[::-1]) == (spacing == "linspace"), what
    if spacing == "leading":
      assert sampling[0] == num_steps * (NUM_TRAIN // (num_steps + 1)) + steps_offset < nodes[-1]


def test_dpm_inverse_midpoint_is_not_ours():
  """Ours is the exactly integrated extrapolation, diffusers' 'heun'; its 'midpoint' 2M is another method."""
  for num_steps in STEPS:
    run, _ = run_inverse(DPM_INVERSE, _dpm_config(solver_type="midpoint"), num_steps)
    latent, _, _ = invert_ours("dpm_solver_pp", dpm_inverse_grid(dpm_inverse_nodes(run)))
    assert rel_diff(latent, run.x) > DIFFERS


@pytest.mark.parametrize("spacing", ("linspace", "leading"))
def test_dpm_inverse_lower_order_final_is_a_first_order_last_step(spacing):
  """diffusers' default lower_order_final (below 15 steps) makes the step into the noisiest node first
  order: our 2M on the first N - 1 steps, then one DDIM inversion step with the model at the current node."""
  num_steps = 10
  run, _ = run_inverse(DPM_INVERSE, _dpm_config(lower_order_final=True, spacing=spacing), num_steps)
  nodes = dpm_inverse_nodes(run)
  ours, _, _ = invert_ours("dpm_solver_pp", dpm_inverse_grid(nodes))
  assert rel_diff(ours, run.x) > 1e-5
  x, _, _ = invert_ours("dpm_solver_pp", dpm_inverse_grid(nodes[:-1]))
  x, nfe, _ = invert_ours(inversion.get("ddim", alignment="current"), dpm_inverse_grid(nodes[-2:]), x0=x)
  assert nfe == 1
  _assert_close(x, run.x, F64_RTOL, f"DPM++ 2M inverse {spacing} lower_order_final rebuilt")


def test_dpm_inverse_trailing_ends_with_a_zero_length_step():
  """'trailing': timesteps T/N - 1 .. 999, then 999 again. A first-order zero-length last step is an identity
  that costs a model call (our grid stops at 999, N - 1 steps); a second-order one is 0 / 0 = NaN in 'heun'."""
  num_steps = 10
  run, calls = run_inverse(DPM_INVERSE, _dpm_config(lower_order_final=True, spacing="trailing"), num_steps)
  nodes = dpm_inverse_nodes(run)
  assert nodes[0] == NUM_TRAIN // num_steps - 1 and nodes[-1] == nodes[-2] == NUM_TRAIN - 1
  assert calls.size == num_steps and run.sigmas[-1] == run.sigmas[-2]
  _assert_close(run.trajectory[-1], run.trajectory[-2], 1e-14, "diffusers' zero-length last step")
  latent, nfe, _ = invert_ours("dpm_solver_pp", dpm_inverse_grid(nodes[:-1]))
  assert nfe == num_steps - 1
  _assert_close(latent, run.x, F64_RTOL, "DPM++ 2M heun inverse trailing")
  for solver_type, lower_order_final in (("heun", False), ("midpoint", False)):
    run, _ = run_inverse(DPM_INVERSE, _dpm_config(solver_type, lower_order_final, "trailing"), num_steps)
    assert np.isfinite(run.trajectory[-2]).all()
    assert np.isnan(run.x).all() == (solver_type == "heun"), solver_type


def test_dpm_inverse_sde_is_nan_at_the_first_step():
  """diffusers#10748: the sde-dpmsolver++ inverse takes sqrt(1 - e^{-2h}) with h < 0."""
  run, _ = run_inverse(DPM_INVERSE, _dpm_config(algorithm_type="sde-dpmsolver++"), 10)
  assert np.isnan(run.trajectory[0]).all()

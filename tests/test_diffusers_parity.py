"""Parity with diffusers' PyTorch schedulers on the same analytic model: DDIM, DPM-Solver / ++ (multistep and
singlestep), DEIS (log-rho), UniPC (bh1 / bh2, orders 1-3, data / noise, UniC after DPM-Solver++).

Both sides sample the same Gaussian mixture (``models.analytic``: exact eps and x0 at any (alpha, sigma))
from the same x_T, with the same betas (DDPM linear 1e-4..0.02, 1000 steps), the same integer timesteps
(diffusers' ``timesteps`` after ``set_timesteps``, passed to ``grids.from_times``: a ``DiscreteVP``'s time
is the training index) and the same end: diffusers' ``final_sigmas_type='zero'`` / DDIM
``set_alpha_to_one=True`` is our ``final='zero'``; ``'sigma_min'`` / ``set_alpha_to_one=False`` end at the
first training step, our grid with index 0 appended (where it is not there already). On the diffusers side
the oracle is wrapped as a network would be: a function of (sample, integer timestep) that takes alpha and
sigma from the scheduler's own ``alphas_cumprod[timestep]``.

Each diffusers run is made in up to three modes (``run_diffusers(mode=...)``):
- ``float64``: the scheduler's own code, with the ``float32`` its module names read as ``float64``
  (``_float64_module``), so its betas, alphas_cumprod and sigmas are built in float64 and the multistep
  DPM ``step()`` no longer casts the sample to float32. This is algorithmic parity: measured <= 4e-14
  relative on every case here; tolerance ``F64_RTOL = 1e-11``.
- ``stock``: diffusers as shipped: float32 betas / alphas_cumprod / sigmas, DPM steps in float32 (the model
  stays float64, at the float32 alphas_cumprod). Measured up to 4.4e-5 relative (3S heun and 3M into
  sigma_min, N = 15); tolerance ``STOCK_RTOL = 1e-4``. It is diffusers' float32, not the algorithm: in the
  ``float32_tables`` mode (the shipped float32 table, float64 arithmetic) diffusers agrees with our solver
  run on that same table to 1e-14 again; for 3M into sigma_min the table accounts for nearly all of the
  stock difference (``test_stock_residual_is_diffusers_float32_table_and_arithmetic``).
- ``float32_tables``: see above.
A wrong lower-order-final rule moves the result by 0.1 or more here, the 3M weight by 0.3
(``test_lower_order_final_threshold_differs_by_default``, ``test_exactly_integrated_3m_differs...``), so
the stock tolerance still separates those;
the solver_type of 3M's single second-order warm-up step moves it by only 4e-7..1e-2: the float64 mode's
tolerance is the check that tells every configuration apart.

Differences on purpose or diffusers bugs are tests too: DDIM's prev_t = t - T // N with non-leading
spacings (diffusers #9261, #12633), the zero-length final step of Karras + 'sigma_min' (#6477; NaN in
float32 for 2M heun and 3M), diffusers' 3S midpoint second stage, our exactly-integrated 3M, our default lower-order-final threshold (10, as
the official code, vs diffusers' 15) and trailing spacings that give diffusers n + 1 timesteps.
``python -m tests.test_diffusers_parity`` prints the table of docs/parity.md.
"""
import contextlib
import dataclasses
import sys
from typing import Any
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="parity peer missing: pip install -e '.[parity]' (CPU torch wheel)")
diffusers = pytest.importorskip("diffusers", reason="parity peer missing: pip install -e '.[parity]'")

jax.config.update("jax_enable_x64", True)  # as tests/conftest.py; also when run as a script

import solvers  # noqa: E402
from models import analytic  # noqa: E402
from solvers import grids, schedules  # noqa: E402
from solvers.ddim import DDIM  # noqa: E402
from solvers.dpm_solver_singlestep import DPMSolverSinglestep  # noqa: E402
from solvers.dpm_solver_multistep import DPMSolverMultistep  # noqa: E402
from solvers.unipc import UniPC  # noqa: E402

pytestmark = [
    pytest.mark.filterwarnings("ignore::FutureWarning"),  # diffusers deprecates algorithm_type='dpmsolver'
    # diffusers calls np.array(tensor): torch's __array__ has no copy argument (numpy 2 migration warning).
    pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning"),
    # diffusers' DEIS applies np.log to torch tensors (numpy 2 migration warning, once per step).
    pytest.mark.filterwarnings("ignore:__array_wrap__ must accept context:DeprecationWarning"),
]

NUM_TRAIN = 1000
BETAS = dict(num_train_timesteps=NUM_TRAIN, beta_start=1e-4, beta_end=0.02, beta_schedule="linear")
SCHEDULE = schedules.DiscreteVP.named("linear", NUM_TRAIN, 1e-4, 0.02)
ORACLE = analytic.gmm(dim=4, num_components=3, seed=1, dtype=jnp.float64)
STEPS = (7, 10, 15, 20, 25)
F64_RTOL = 1e-11
STOCK_RTOL = 1e-4
DIFFERS = 1e-3  # "differs": far above both tolerances


def _x_T(n=16, seed=0):
  t = SCHEDULE.t_max
  return np.asarray(ORACLE.sample(jax.random.key(seed), n, SCHEDULE.alpha(t), SCHEDULE.sigma(t)), np.float64)


X_T = _x_T()


def rel_diff(ours, theirs):
  """max |ours - theirs| / max |theirs|: the relative difference reported everywhere here."""
  ours, theirs = np.asarray(ours, np.float64), np.asarray(theirs, np.float64)
  return float(np.max(np.abs(ours - theirs)) / np.max(np.abs(theirs)))


def _assert_close(ours, theirs, rtol, what):
  diff = rel_diff(ours, theirs)
  assert diff <= rtol, f"{what}: relative difference {diff:.3e} > {rtol:.0e}"


def _assert_parity(what, ours, nfe, runs, grid, num_steps):
  """The grid is diffusers' sigma list (rho = exp(-lambda) at every node), the samples agree in the float64
  and stock modes, and both sides made num_steps model calls."""
  np.testing.assert_allclose(np.exp(-np.asarray(grid.lam[: num_steps + 1])), runs["float64"].sigmas,
                             rtol=1e-12, err_msg=what)
  _assert_close(ours, runs["float64"].x, F64_RTOL, what + " (float64)")
  _assert_close(ours, runs["stock"].x, STOCK_RTOL, what + " (stock)")
  assert nfe == runs["float64"].nfe == num_steps


# --- the diffusers side ------------------------------------------------------------------------------------


class _Float64:
  """A stand-in for a module (torch or numpy) whose ``float32`` is ``float64``."""

  def __init__(self, module):
    self._module = module
    self.float32 = module.float64

  def __getattr__(self, name):
    return getattr(self._module, name)


@contextlib.contextmanager
def _float64_module(scheduler_cls):
  """Runs a scheduler's own code with the float32 its module names read as float64.

  diffusers builds its tables with ``dtype=torch.float32``, casts sigmas with ``.astype(np.float32)`` and
  the multistep DPM ``step()`` casts the sample with ``.to(torch.float32)``; patching the module's
  ``torch`` and ``np`` names keeps all of that in float64 without copying any of its code.
  """
  module = sys.modules[scheduler_cls.__module__]
  with mock.patch.object(module, "torch", _Float64(torch)), mock.patch.object(module, "np", _Float64(np)):
    yield


_X0_EPS = jax.jit(ORACLE.x0_eps)


def _oracle_network(scheduler, prediction_type):
  """The oracle as diffusers sees a network: (sample, integer timestep) -> output, at the scheduler's own
  alphas_cumprod[timestep] (float32 in the stock mode, float64 in the float64 mode)."""

  def network(sample, timestep):
    ac = float(scheduler.alphas_cumprod[int(timestep)])
    alpha, sigma = np.sqrt(ac), np.sqrt(1.0 - ac)
    x0, eps = (np.asarray(a, np.float64) for a in _X0_EPS(jnp.asarray(sample.numpy(), jnp.float64), alpha, sigma))
    out = {"epsilon": eps, "sample": x0, "v_prediction": alpha * eps - sigma * x0}[prediction_type]
    return torch.from_numpy(np.array(out))

  return network


@dataclasses.dataclass
class DiffusersRun:
  x: np.ndarray            # the final sample, float64
  trajectory: list         # the sample after each step
  timesteps: np.ndarray    # the scheduler's timesteps (one model call each)
  sigmas: Any              # its sigma table (None for DDIM)
  alphas_cumprod: np.ndarray
  scheduler: Any

  @property
  def nfe(self):
    return len(self.trajectory)


MODES = ("float64", "stock", "float32_tables")


def run_diffusers(scheduler_cls, config, num_steps, mode="float64", prediction_type="epsilon", x_T=X_T,
                  solver_p_cls=None, solver_p_config=None):
  """A diffusers sampling loop (set_timesteps, then model + step per timestep) on the oracle, from x_T.

  ``solver_p_cls`` / ``solver_p_config``: a second scheduler passed as ``solver_p`` (UniPC's predictor
  plug-in), built and run in the same mode."""
  if mode not in MODES:
    raise ValueError(f"mode={mode!r}; valid: {MODES}")
  if solver_p_cls is not None and mode == "float32_tables":
    raise ValueError("solver_p runs in the float64 and stock modes only")
  float64 = _float64_module(scheduler_cls) if mode != "stock" else contextlib.nullcontext()
  peer = lambda: (_float64_module(solver_p_cls) if solver_p_cls is not None and mode == "float64"  # noqa: E731
                  else contextlib.nullcontext())
  with _float64_module(scheduler_cls) if mode == "float64" else contextlib.nullcontext(), peer():
    if solver_p_cls is not None:
      config = dict(config, solver_p=solver_p_cls(**BETAS, prediction_type=prediction_type, **solver_p_config))
    scheduler = scheduler_cls(**BETAS, prediction_type=prediction_type, **config)
  if mode == "float32_tables":  # the shipped float32 tables, held (exactly) in float64
    for name, value in vars(scheduler).items():
      if isinstance(value, torch.Tensor) and value.dtype == torch.float32:
        setattr(scheduler, name, value.double())
  network = _oracle_network(scheduler, prediction_type)
  x = torch.from_numpy(np.array(x_T, np.float64))
  trajectory = []
  with float64, peer():
    scheduler.set_timesteps(num_steps)
    for t in scheduler.timesteps:
      out = network(scheduler.scale_model_input(x, t), t)
      x = scheduler.step(out, t, x).prev_sample
      trajectory.append(x.numpy().astype(np.float64))
  sigmas = getattr(scheduler, "sigmas", None)
  return DiffusersRun(x=trajectory[-1], trajectory=trajectory, timesteps=scheduler.timesteps.numpy().copy(),
                      sigmas=None if sigmas is None else sigmas.numpy().astype(np.float64),
                      alphas_cumprod=scheduler.alphas_cumprod.numpy().astype(np.float64), scheduler=scheduler)


# --- our side ----------------------------------------------------------------------------------------------


def _rounded_t(schedule, t):
  """A time label that rounds to the integer timestep (diffusers rounds Karras timesteps for the model)."""
  return jnp.round(t)


def run_ours(solver, grid, schedule=SCHEDULE, prediction="eps", time_label="t", x_T=X_T):
  denoiser = ORACLE.denoiser(schedule, prediction).replace(time_label=time_label)
  sol = solvers.sample(solver, denoiser, schedule, grid, jnp.asarray(x_T))
  return np.asarray(sol.x), int(sol.nfe)


def dpm_grid(timesteps, final_sigmas_type, schedule=SCHEDULE):
  """Our grid for a DPM scheduler's timesteps: 'zero' -> final='zero'; 'sigma_min' -> sigma of index 0."""
  if final_sigmas_type == "zero":
    return grids.from_times(schedule, timesteps, final="zero")
  return grids.from_times(schedule, np.append(timesteps, 0), final="t_end")


def ddim_grid(timesteps, set_alpha_to_one, schedule=SCHEDULE):
  """Our grid for DDIMScheduler (leading spacing): its last step goes below index 0, to alphas_cumprod = 1
  (final='zero') or to alphas_cumprod[0]; when the timesteps already end at 0 that last step has length
  zero (an identity that costs an NFE) and our grid simply ends there."""
  if set_alpha_to_one:
    return grids.from_times(schedule, timesteps, final="zero")
  if timesteps[-1] == 0:
    return grids.from_times(schedule, timesteps, final="t_end")
  return grids.from_times(schedule, np.append(timesteps, 0), final="t_end")


# --- cases -------------------------------------------------------------------------------------------------

DDIM_SETTINGS = [(one, offset) for one in (True, False) for offset in (0, 1)]


def ddim_case(num_steps, set_alpha_to_one, steps_offset, form="x0", modes=("float64", "stock")):
  config = dict(clip_sample=False, set_alpha_to_one=set_alpha_to_one, steps_offset=steps_offset,
                timestep_spacing="leading")
  runs = {mode: run_diffusers(diffusers.DDIMScheduler, config, num_steps, mode) for mode in modes}
  ours, nfe = run_ours(DDIM(form=form), ddim_grid(runs[modes[0]].timesteps, set_alpha_to_one))
  return ours, nfe, runs


def _dpm_case_table():
  cases = {}
  for prediction, algorithm in (("data", "dpmsolver++"), ("noise", "dpmsolver")):
    for order in (2, 3):
      for solver_type in ("midpoint", "heun"):
        name = f"{algorithm} {order}M {solver_type}"
        config = dict(algorithm_type=algorithm, solver_order=order, solver_type=solver_type)
        # diffusers' rule: lower-order final steps below 15 steps (ours defaults to the official 10).
        ours = DPMSolverMultistep(order=order, prediction=prediction, solver_type=solver_type,
                                  lower_order_final=True, lower_order_final_below=15)
        cases[name] = (config, ours)
  return cases


DPM_CASES = _dpm_case_table()
# diffusers refuses algorithm_type='dpmsolver' with final_sigmas_type='zero' (test below).
FINALS = {name: ("zero", "sigma_min") if name.startswith("dpmsolver++") else ("sigma_min",) for name in DPM_CASES}


def dpm_case(name, final, num_steps, modes=("float64", "stock"), spacing="linspace", steps_offset=0,
             prediction_type="epsilon"):
  config, solver = DPM_CASES[name]
  config = dict(config, final_sigmas_type=final, timestep_spacing=spacing, steps_offset=steps_offset)
  runs = {mode: run_diffusers(diffusers.DPMSolverMultistepScheduler, config, num_steps, mode, prediction_type)
          for mode in modes}
  prediction = {"epsilon": "eps", "sample": "x0", "v_prediction": "v"}[prediction_type]
  grid = dpm_grid(runs[modes[0]].timesteps, final)
  ours, nfe = run_ours(solver, grid, prediction=prediction)
  return ours, nfe, runs, grid


def deis_case(order, num_steps, modes=("float64", "stock"), spacing="linspace", steps_offset=0):
  """DEISMultistepScheduler (log-rho AB; it always ends at the sigma of index 0) vs ``deis_logrho_{order}``
  (the noise-form DPM-Solver it equals, with diffusers' lower-order-final rule, below 15 steps)."""
  config = dict(solver_order=order, timestep_spacing=spacing, steps_offset=steps_offset)
  runs = {mode: run_diffusers(diffusers.DEISMultistepScheduler, config, num_steps, mode) for mode in modes}
  grid = dpm_grid(runs[modes[0]].timesteps, "sigma_min")
  ours, nfe = run_ours(solvers.get(f"deis_logrho_{order}"), grid)
  return ours, nfe, runs, grid


def _singlestep_case_table():
  cases = {}
  for prediction, algorithm in (("data", "dpmsolver++"), ("noise", "dpmsolver")):
    for order in (2, 3):
      for solver_type in ("midpoint", "heun"):
        config = dict(algorithm_type=algorithm, solver_order=order, solver_type=solver_type)
        cases[f"{algorithm} {order}S {solver_type}"] = (config, DPMSolverSinglestep(
            order=order, prediction=prediction, solver_type=solver_type))
  return cases


SINGLESTEP_CASES = _singlestep_case_table()
# 3S midpoint differs on purpose (test_singlestep_3s_midpoint_differs...).
SINGLESTEP_PARITY = [name for name in SINGLESTEP_CASES if "3S midpoint" not in name]


def singlestep_case(name, final, num_steps, lower_order_final=False, modes=("float64", "stock")):
  """DPMSolverSinglestepScheduler (one model call per step() on the global grid, its groups from
  ``get_order_list``) vs DPMSolverSinglestep with the same group orders: schedule='diffusers' is its list
  with lower_order_final=True, which it forces when N % order != 0 or the end is 'zero' (default False),
  and 'fixed' is its list with lower_order_final=False."""
  config, solver = SINGLESTEP_CASES[name]
  config = dict(config, final_sigmas_type=final, lower_order_final=lower_order_final)
  runs = {mode: run_diffusers(diffusers.DPMSolverSinglestepScheduler, config, num_steps, mode) for mode in modes}
  effective = runs[modes[0]].scheduler.config.lower_order_final
  solver = dataclasses.replace(solver, schedule="diffusers" if effective else "fixed")
  grid = dpm_grid(runs[modes[0]].timesteps, final)
  ours, nfe = run_ours(solver, grid)
  return ours, nfe, runs, grid


def _unipc_case_table():
  cases = {}
  for prediction in ("data", "noise"):
    for variant in ("bh1", "bh2"):
      for order in (1, 2, 3):
        config = dict(solver_order=order, solver_type=variant, predict_x0=prediction == "data")
        cases[f"UniPC {variant} order {order} {prediction}"] = (config, UniPC(order=order, variant=variant,
                                                                                prediction=prediction))
  return cases


UNIPC_CASES = _unipc_case_table()
# Into sigma = 0 diffusers' UniPC returns NaN with bh1 (B(h) = hh = -inf times 0: spec P6) and with noise
# prediction (sigma_t expm1(h) = 0 * inf); test_diffusers_unipc_nan_into_zero_and_ours_is_the_limit.
UNIPC_FINALS = {name: ("zero", "sigma_min") if "bh2" in name and name.endswith("data") else ("sigma_min",)
                for name in UNIPC_CASES}


def unipc_case(name, final, num_steps, modes=("float64", "stock"), spacing="linspace", steps_offset=0, **options):
  """UniPCMultistepScheduler vs UniPC; ``options`` go to both (disable_corrector, lower_order_final)."""
  config, solver = UNIPC_CASES[name]
  config = dict(config, final_sigmas_type=final, timestep_spacing=spacing, steps_offset=steps_offset, **options)
  if "disable_corrector" in options:
    options = dict(options, disable_corrector=tuple(options["disable_corrector"]))
  runs = {mode: run_diffusers(diffusers.UniPCMultistepScheduler, config, num_steps, mode) for mode in modes}
  grid = dpm_grid(runs[modes[0]].timesteps, final)
  ours, nfe = run_ours(dataclasses.replace(solver, **options), grid)
  return ours, nfe, runs, grid


# --- DDIM --------------------------------------------------------------------------------------------------
# One test per setting, looping over the step counts: each solver configuration compiles once per worker.


@pytest.mark.parametrize("set_alpha_to_one,steps_offset", DDIM_SETTINGS)
def test_ddim_parity(set_alpha_to_one, steps_offset):
  for num_steps in STEPS:
    ours, nfe, runs = ddim_case(num_steps, set_alpha_to_one, steps_offset)
    ours_eps, _, _ = ddim_case(num_steps, set_alpha_to_one, steps_offset, form="eps", modes=("float64",))
    what = f"DDIM leading set_alpha_to_one={set_alpha_to_one} steps_offset={steps_offset} N={num_steps}"
    _assert_close(ours, runs["float64"].x, F64_RTOL, what + " (float64)")
    _assert_close(ours_eps, runs["float64"].x, F64_RTOL, what + " (eps form, float64)")
    _assert_close(ours, runs["stock"].x, STOCK_RTOL, what + " (stock)")
    assert runs["float64"].nfe == num_steps
    zero_length_last = not set_alpha_to_one and runs["float64"].timesteps[-1] == 0
    # set_alpha_to_one=False with timesteps ending at 0: diffusers' last step goes from alphas_cumprod[0] to
    # alphas_cumprod[0], an identity that costs a model call; we end the grid at 0 instead.
    assert zero_length_last == (not set_alpha_to_one and steps_offset == 0)
    assert nfe == num_steps - (1 if zero_length_last else 0)
    if zero_length_last:
      _assert_close(runs["float64"].trajectory[-2], runs["float64"].x, 1e-14, "diffusers' zero-length last step")


@pytest.mark.parametrize("spacing,num_steps", [("trailing", 7), ("trailing", 15), ("linspace", 10),
                                               ("trailing", 10)])
def test_ddim_non_leading_spacing_steps_to_other_timesteps_than_its_own(spacing, num_steps):
  """diffusers' DDIMScheduler.step goes to prev_t = t - T // N whatever the spacing (#9261, #12633): with
  'trailing' / 'linspace' that is not the next entry of its own timesteps unless the spacing is trailing
  and T / N an integer, so the sample reaches level prev_t and the next model call labels it as the next
  timestep. Our DDIM steps between consecutive nodes of the grid it is given."""
  config = dict(clip_sample=False, set_alpha_to_one=True, timestep_spacing=spacing)
  run = run_diffusers(diffusers.DDIMScheduler, config, num_steps)
  t = run.timesteps
  prev = t - NUM_TRAIN // num_steps
  consistent = np.array_equal(prev[:-1], t[1:])
  assert consistent == (spacing == "trailing" and NUM_TRAIN % num_steps == 0)
  # What diffusers computes, rebuilt from our DDIM: one step t_i -> prev_i (below 0: alphas_cumprod = 1)
  # per model call, the sample carried unchanged from level prev_i to the next call at t_{i+1}.
  x = X_T
  for t_i, prev_i in zip(t, prev):
    grid = (grids.from_times(SCHEDULE, [t_i], final="zero") if prev_i < 0
            else grids.from_times(SCHEDULE, [t_i, prev_i]))
    x, _ = run_ours(DDIM(), grid, x_T=x)
  _assert_close(x, run.x, F64_RTOL, f"DDIM {spacing} N={num_steps} rebuilt with mismatched steps")
  ours, _ = run_ours(DDIM(), grids.from_times(SCHEDULE, t, final="zero"))
  if consistent:
    _assert_close(ours, run.x, F64_RTOL, f"DDIM {spacing} N={num_steps}")
  else:
    assert rel_diff(ours, run.x) > DIFFERS


# --- multistep DPM-Solver / DPM-Solver++ -------------------------------------------------------------------

OTHER_SPACINGS = (("leading", 0), ("leading", 1), ("trailing", 0))


@pytest.mark.parametrize("name", DPM_CASES)
def test_dpm_multistep_parity(name):
  for final in FINALS[name]:
    for num_steps in STEPS:
      ours, nfe, runs, grid = dpm_case(name, final, num_steps)
      what = f"{name} final={final} N={num_steps}"
      _assert_parity(what, ours, nfe, runs, grid, num_steps)
    for spacing, offset in OTHER_SPACINGS:
      for num_steps in (7, 20):
        ours, _, runs, _ = dpm_case(name, final, num_steps, spacing=spacing, steps_offset=offset)
        what = f"{name} final={final} {spacing} steps_offset={offset} N={num_steps}"
        np.testing.assert_array_equal(runs["float64"].timesteps,
                                      grids.diffusers_timesteps(NUM_TRAIN, num_steps, spacing, "dpm", offset))
        _assert_close(ours, runs["float64"].x, F64_RTOL, what + " (float64)")
        _assert_close(ours, runs["stock"].x, STOCK_RTOL, what + " (stock)")


@pytest.mark.parametrize("name,prediction_type", [("dpmsolver++ 2M midpoint", "sample"),
                                                  ("dpmsolver 3M heun", "v_prediction")])
def test_parity_for_other_prediction_types(name, prediction_type):
  for final in FINALS[name]:
    for num_steps in (7, 20):
      ours, _, runs, _ = dpm_case(name, final, num_steps, prediction_type=prediction_type)
      what = f"{name} {prediction_type} final={final} N={num_steps}"
      _assert_close(ours, runs["float64"].x, F64_RTOL, what + " (float64)")
      _assert_close(ours, runs["stock"].x, STOCK_RTOL, what + " (stock)")


@pytest.mark.parametrize("order", (2, 3))
def test_deis_logrho_parity(order):
  for num_steps in STEPS:
    ours, nfe, runs, grid = deis_case(order, num_steps)
    what = f"DEIS log-rho order {order} N={num_steps}"
    _assert_parity(what, ours, nfe, runs, grid, num_steps)
  for spacing, offset in OTHER_SPACINGS:
    for num_steps in (7, 20):
      ours, _, runs, _ = deis_case(order, num_steps, spacing=spacing, steps_offset=offset)
      what = f"DEIS log-rho order {order} {spacing} steps_offset={offset} N={num_steps}"
      _assert_close(ours, runs["float64"].x, F64_RTOL, what + " (float64)")
      _assert_close(ours, runs["stock"].x, STOCK_RTOL, what + " (stock)")


@pytest.mark.parametrize("name", SINGLESTEP_PARITY)
def test_dpm_singlestep_parity(name):
  finals = ("zero", "sigma_min") if name.startswith("dpmsolver++") else ("sigma_min",)
  for final in finals:
    for lower_order_final in (False, True):
      for num_steps in STEPS:
        ours, nfe, runs, grid = singlestep_case(name, final, num_steps, lower_order_final)
        what = f"{name} final={final} lower_order_final={lower_order_final} N={num_steps}"
        _assert_parity(what, ours, nfe, runs, grid, num_steps)


@pytest.mark.parametrize("name", UNIPC_CASES)
def test_unipc_parity(name):
  for final in UNIPC_FINALS[name]:
    for num_steps in STEPS:
      ours, nfe, runs, grid = unipc_case(name, final, num_steps)
      what = f"{name} final={final} N={num_steps}"
      _assert_parity(what, ours, nfe, runs, grid, num_steps)
  for spacing, offset in OTHER_SPACINGS[1:]:
    ours, _, runs, _ = unipc_case(name, "sigma_min", 7, modes=("float64",), spacing=spacing, steps_offset=offset)
    _assert_close(ours, runs["float64"].x, F64_RTOL, f"{name} {spacing} steps_offset={offset}")


@pytest.mark.parametrize("name,options", [("UniPC bh1 order 3 data", dict(disable_corrector=[0, 3])),
                                          ("UniPC bh2 order 2 noise", dict(lower_order_final=False))])
def test_unipc_corrector_switch_and_lower_order_final_parity(name, options):
  """diffusers' disable_corrector (the output of a listed step is not corrected) and lower_order_final."""
  ours, _, runs, grid = unipc_case(name, "sigma_min", 10, modes=("float64",), **options)
  _assert_close(ours, runs["float64"].x, F64_RTOL, f"{name} {options}")
  default, _ = run_ours(UNIPC_CASES[name][1], grid)
  assert rel_diff(default, runs["float64"].x) > 1e-6  # the option changes the result


@pytest.mark.parametrize("order", (1, 2, 3))
def test_diffusers_unipc_nan_into_zero_and_ours_is_the_limit(order):
  """diffusers' bh1 step into sigma = 0 multiplies B(h) = -h = -inf by a zero (spec P6) and returns NaN, at
  every order. Ours takes the first-order step there, whose limit is the data prediction at the last
  (predicted, uncorrected) point: x_N = x0(x_{N-1}), with x_{N-1} diffusers' own output of step N - 2."""
  name = f"UniPC bh1 order {order} data"
  for num_steps in (7, 20):
    ours, _, runs, grid = unipc_case(name, "zero", num_steps, modes=("float64", "stock"))
    assert np.isnan(runs["float64"].x).all() and np.isnan(runs["stock"].x).all()
    assert np.isfinite(runs["float64"].trajectory[-2]).all()
    t_last = grid.t[num_steps - 1]
    limit = ORACLE.x0(jnp.asarray(runs["float64"].trajectory[-2]), SCHEDULE.alpha(t_last), SCHEDULE.sigma(t_last))
    _assert_close(ours, limit, F64_RTOL, f"{name} N={num_steps}")
  for prediction in ("data", "noise"):  # noise prediction into zero: NaN in diffusers with either B(h)
    name = f"UniPC bh2 order {order} {prediction}"
    ours, _, runs, _ = unipc_case(name, "zero", 7, modes=("float64",))
    assert np.isfinite(ours).all() and np.isnan(runs["float64"].x).any() == (prediction == "noise")


def test_unic_after_dpm_solver_pp_parity_and_where_diffusers_converts_eps():
  """UniC after DPM-Solver++ 2M = diffusers' UniPC with ``solver_p=DPMSolverMultistepScheduler``, exactly
  for an x0-predicting model. For an eps model diffusers' solver_p converts eps -> x0 at the *corrected*
  sample while eps was evaluated at the predicted one, so its history differs from x0(x_pred): a
  different method (by 1e-2 here; slightly closer to the exact ODE solution on this mixture, see
  docs/parity.md), which we do not copy: our history is the model output where it was evaluated."""
  solver = solvers.get("dpm_solver_pp_2m_unic")
  solver = dataclasses.replace(solver, predictor=dataclasses.replace(solver.predictor, lower_order_final_below=15))
  config = dict(solver_order=2, solver_type="bh2")
  for final in ("zero", "sigma_min"):
    for prediction_type, prediction in (("sample", "x0"), ("epsilon", "eps")):
      for num_steps in (7, 20):
        runs = {mode: run_diffusers(diffusers.UniPCMultistepScheduler, dict(config, final_sigmas_type=final),
                                    num_steps, mode, prediction_type, solver_p_cls=diffusers.DPMSolverMultistepScheduler,
                                    solver_p_config=dict(solver_order=2, final_sigmas_type=final))
                for mode in ("float64", "stock")}
        ours, nfe = run_ours(solver, dpm_grid(runs["float64"].timesteps, final), prediction=prediction)
        what = f"UniC after DPM-Solver++ 2M {prediction_type} final={final} N={num_steps}"
        if prediction_type == "sample":
          _assert_close(ours, runs["float64"].x, F64_RTOL, what + " (float64)")
          _assert_close(ours, runs["stock"].x, STOCK_RTOL, what + " (stock)")
        else:
          assert rel_diff(ours, runs["float64"].x) > DIFFERS, what
        assert nfe == num_steps


def test_stock_residual_is_diffusers_float32_table_and_arithmetic():
  """The stock difference is diffusers' float32: run on its own float32 alphas_cumprod with float64
  arithmetic, diffusers agrees with our solver on that same table as tightly as in the float64 mode. Here
  (3M into sigma_min) the table accounts for nearly all of the stock difference (2.2e-5 of 2.3e-5)."""
  name, final, num_steps = "dpmsolver++ 3M midpoint", "sigma_min", 20  # the largest stock difference
  runs = dpm_case(name, final, num_steps, modes=("float32_tables", "stock"))[2]
  table = schedules.DiscreteVP.from_alphas_cumprod(runs["stock"].alphas_cumprod)
  ours, _ = run_ours(DPM_CASES[name][1], dpm_grid(runs["stock"].timesteps, final, table), schedule=table)
  _assert_close(ours, runs["float32_tables"].x, F64_RTOL, "float32 table, float64 arithmetic")
  ours_f64_table, _ = run_ours(DPM_CASES[name][1], dpm_grid(runs["stock"].timesteps, final))
  table_part = rel_diff(ours_f64_table, runs["float32_tables"].x)
  arithmetic_part = rel_diff(ours, runs["stock"].x)
  assert 1e-6 < table_part < STOCK_RTOL and arithmetic_part < table_part / 10


def test_diffusers_refuses_noise_prediction_into_zero_and_we_finish_with_the_data_prediction():
  with pytest.raises(ValueError, match="sigma_min"):
    diffusers.DPMSolverMultistepScheduler(**BETAS, algorithm_type="dpmsolver", final_sigmas_type="zero")
  # Our noise-form step into sigma = 0 takes its finite limit: the last step returns x0(x_{N-1}).
  grid = grids.from_times(SCHEDULE, grids.diffusers_timesteps(NUM_TRAIN, 10), final="zero")
  sol = solvers.sample(DPM_CASES["dpmsolver 2M midpoint"][1], ORACLE.denoiser(SCHEDULE), SCHEDULE, grid,
                       jnp.asarray(X_T), return_trajectory=True)
  x_prev = sol.trajectory[9]
  np.testing.assert_allclose(sol.x, ORACLE.x0(x_prev, SCHEDULE.alpha(grid.t[9]), SCHEDULE.sigma(grid.t[9])),
                             rtol=1e-12, atol=1e-12)


# --- differences on purpose --------------------------------------------------------------------------------


def test_lower_order_final_threshold_differs_by_default():
  """Our default lower_order_final_below=10 is the official DPM-Solver's; diffusers' is 15."""
  name, final = "dpmsolver++ 2M midpoint", "sigma_min"
  for num_steps in (7, 10, 14, 15):
    _, _, runs, grid = dpm_case(name, final, num_steps, modes=("float64",))
    ours_default, _ = run_ours(solvers.get("dpm_solver_pp_2m"), grid)
    if num_steps < 10 or num_steps >= 15:
      _assert_close(ours_default, runs["float64"].x, F64_RTOL, f"same final orders, N={num_steps}")
    else:
      assert rel_diff(ours_default, runs["float64"].x) > DIFFERS


def test_exactly_integrated_3m_differs_from_diffusers_3m():
  """diffusers' 3M weights D2 by h phi_3 (spec P1, as the official code); our third_order='exact' by 2 h phi_3."""
  name, final = "dpmsolver++ 3M midpoint", "sigma_min"
  ours, _, runs, grid = dpm_case(name, final, 20, modes=("float64",))
  exact, _ = run_ours(dataclasses.replace(DPM_CASES[name][1], third_order="exact"), grid)
  _assert_close(ours, runs["float64"].x, F64_RTOL, "reference 3M")
  assert rel_diff(exact, runs["float64"].x) > DIFFERS


@pytest.mark.parametrize("name", ("dpmsolver++ 3S midpoint", "dpmsolver 3S midpoint"))
def test_singlestep_3s_midpoint_differs_in_its_second_stage(name):
  """diffusers' 3S computes the second stage u2 with the update of its solver_type, so for 'midpoint' with the
  midpoint form; the official code (and ours) always takes the taylor form there (spec 4.4). 'heun' agrees
  (test_dpm_singlestep_parity), and so does 3S midpoint where it has no third-order group."""
  final = "sigma_min"
  for num_steps in (7, 20):
    ours, _, runs, _ = singlestep_case(name, final, num_steps, modes=("float64",))
    assert rel_diff(ours, runs["float64"].x) > DIFFERS
  for num_steps in (1, 2):  # groups [1] and [1, 1] / [2]: no second stage of a third-order group
    ours, _, runs, _ = singlestep_case(name, final, num_steps, modes=("float64",))
    _assert_close(ours, runs["float64"].x, F64_RTOL, f"{name} N={num_steps}")


@pytest.mark.parametrize("name", ("dpmsolver++ 2M midpoint", "dpmsolver++ 2M heun", "dpmsolver++ 3M midpoint"))
def test_karras_sigma_min_wastes_its_last_step_and_rounds_model_timesteps(name):
  """diffusers' Karras sigmas already end at sigma_min, and 'sigma_min' appends it again: the last of the N
  model calls is a zero-length step (#6477), which in float32 (h = 0 exactly) is 0 / 0 = NaN for 2M heun
  and 3M. The model is called at round(t(sigma_i)) while the solver steps to sigma_i. Our Karras grid of
  N - 1 steps, with the model queried at the rounded time, reproduces diffusers' float64 result; our
  default queries it at the exact time. (N >= 15 here: below that diffusers' lower-order rule counts the
  wasted step too, so its last real step is second order where ours is first.)"""
  config = dict(DPM_CASES[name][0], use_karras_sigmas=True, final_sigmas_type="sigma_min")
  solver = DPM_CASES[name][1]
  for num_steps in (20, 25):
    f64 = run_diffusers(diffusers.DPMSolverMultistepScheduler, config, num_steps)
    stock = run_diffusers(diffusers.DPMSolverMultistepScheduler, config, num_steps, mode="stock")
    assert stock.sigmas[-1] == stock.sigmas[-2]
    assert abs(np.log(f64.sigmas[-1] / f64.sigmas[-2])) < 1e-12
    assert np.isnan(stock.x).any() == (name != "dpmsolver++ 2M midpoint")
    grid = grids.karras(SCHEDULE, num_steps - 1)
    np.testing.assert_allclose(np.exp(-np.asarray(grid.lam[:num_steps])), f64.sigmas[:-1], rtol=1e-12)
    np.testing.assert_array_equal(np.round(np.asarray(grid.t[:num_steps])), f64.timesteps)
    rounded, nfe = run_ours(solver, grid, time_label=_rounded_t)
    assert nfe == num_steps - 1 and f64.nfe == num_steps
    _assert_close(rounded, f64.x, F64_RTOL, f"{name} Karras N={num_steps}, rounded model times")
    exact, _ = run_ours(solver, grid)
    assert rel_diff(exact, f64.x) > 1e-4


def test_timesteps_match_diffusers_except_where_trailing_gives_an_extra_minus_one():
  """grids.diffusers_timesteps reproduces set_timesteps; for some N (61, 103, ...) diffusers' 'trailing'
  returns N + 1 timesteps ending in -1 (alphas_cumprod[-1] is then the noisiest entry); we keep N."""
  extra = []
  for family, cls in (("dpm", diffusers.DPMSolverMultistepScheduler), ("ddim", diffusers.DDIMScheduler)):
    for spacing in grids.SPACINGS:
      for offset in (0, 1):
        scheduler = cls(**BETAS, timestep_spacing=spacing, steps_offset=offset)
        for n in range(1, 130):
          scheduler.set_timesteps(n)
          theirs = scheduler.timesteps.numpy()
          ours = grids.diffusers_timesteps(NUM_TRAIN, n, spacing, family, offset)
          if theirs.size == n + 1:
            extra.append((family, spacing, n))
            assert theirs[-1] == -1
            theirs = theirs[:-1]
          np.testing.assert_array_equal(ours, theirs, err_msg=f"{family} {spacing} offset={offset} N={n}")
  assert {n for _, spacing, n in extra} == {61, 103, 121, 122}
  assert {spacing for _, spacing, _ in extra} == {"trailing"}


# --- the table of docs/parity.md ---------------------------------------------------------------------------


def parity_table():
  """Markdown rows: max relative difference per solver and setting over STEPS, in both modes."""
  rows = ["| solver | setting | float64 mode: max rel. diff | stock: " + " / ".join(f"N={n}" for n in STEPS) + " |",
          "|---|---|---|---|"]

  def row(solver, setting, pairs):
    f64 = max(p[0] for p in pairs)
    rows.append(f"| {solver} | {setting} | {f64:.1e} | " + " / ".join(f"{p[1]:.1e}" for p in pairs) + " |")

  for one, offset in DDIM_SETTINGS:
    pairs = []
    for n in STEPS:
      ours, _, runs = ddim_case(n, one, offset)
      pairs.append((rel_diff(ours, runs["float64"].x), rel_diff(ours, runs["stock"].x)))
    row("DDIM (`ddim`)", f"leading, set_alpha_to_one={one}, steps_offset={offset}", pairs)
  for name, final in ((name, final) for name in DPM_CASES for final in FINALS[name]):
    pairs = []
    for n in STEPS:
      ours, _, runs, _ = dpm_case(name, final, n)
      pairs.append((rel_diff(ours, runs["float64"].x), rel_diff(ours, runs["stock"].x)))
    row(name, f"linspace, final {final}", pairs)
  for order in (2, 3):
    pairs = []
    for n in STEPS:
      ours, _, runs, _ = deis_case(order, n)
      pairs.append((rel_diff(ours, runs["float64"].x), rel_diff(ours, runs["stock"].x)))
    row(f"DEIS log-rho order {order} (`deis_logrho_{order}`)", "linspace, final sigma_min (always)", pairs)
  for name in SINGLESTEP_PARITY:
    for final in ("zero", "sigma_min") if name.startswith("dpmsolver++") else ("sigma_min",):
      for lower_order_final in (False, True):
        pairs = []
        for n in STEPS:
          ours, _, runs, _ = singlestep_case(name, final, n, lower_order_final)
          pairs.append((rel_diff(ours, runs["float64"].x), rel_diff(ours, runs["stock"].x)))
        row(name, f"final {final}, lower_order_final={lower_order_final}", pairs)
  for name in UNIPC_CASES:
    for final in UNIPC_FINALS[name]:
      pairs = []
      for n in STEPS:
        ours, _, runs, _ = unipc_case(name, final, n)
        pairs.append((rel_diff(ours, runs["float64"].x), rel_diff(ours, runs["stock"].x)))
      row(name, f"linspace, final {final}", pairs)
  return "\n".join(rows)


if __name__ == "__main__":
  print(parity_table())

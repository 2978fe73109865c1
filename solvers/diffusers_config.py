"""A diffusers scheduler config as the equivalent schedule, grid, solver and network convention here.

``load(config)`` takes a scheduler's config (``dict(pipe.scheduler.config)``, a path to a
``scheduler_config.json``, or a folder holding one, directly or under ``scheduler/``) and returns a
``LoadedScheduler``: the ``schedule`` (a ``DiscreteVP`` from the config's betas, or ``Flow``), the ``prediction``
kind and ``time_label`` the network expects, the ``solver`` (with its registered ``solver_name`` and the
``options`` that differ from the registered default) and ``grid(num_inference_steps)``, the grid diffusers
steps on. ``load(config, scheduler='DPMSolverMultistepScheduler')`` reads the config as another class, like
``DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)``; keys that class does not have are
ignored, as ``from_config`` does, and listed in ``ignored``.

Conventions (diffusers 0.42.1; https://huggingface.co/docs/diffusers/api/schedulers/overview and each
scheduler's page; docs/parity.md has the measured agreement of each solver):
- **Betas.** ``trained_betas``, else ``beta_schedule`` 'linear' / 'scaled_linear' / 'squaredcos_cap_v2' with
  ``beta_start``, ``beta_end``, ``num_train_timesteps`` (``schedules.make_betas``). ``rescale_betas_zero_snr``
  (Lin et al. 2024, "Common Diffusion Noise Schedules and Sampling Steps Are Flawed", Algorithm 1: sqrt(abar)
  shifted to end at 0 and rescaled to keep its first value) is supported where diffusers then sets the last
  alphas_cumprod to 2**-24 (DPMSolverMultistep, UniPC, Euler, EulerAncestral); DDIM and DDPM keep it at 0
  (infinite -lambda), which a ``DiscreteVP`` cannot hold, so they raise.
- **Time.** A ``DiscreteVP``'s time is the training index, and the network's label is diffusers' timestep:
  the index itself (``time_label='t'``); on Karras / exponential / Lu sigma grids diffusers rounds (or
  truncates) the timestep it gives the network while the solver steps on the exact sigma, so the label
  rounds too (``rounded_label``); the Euler family's fractional ``linspace`` timesteps have sigma
  interpolated linearly in sigma (``SigmaInterpLabel``); ``timestep_type='continuous'`` with v-prediction is
  EDM's c_noise = log(sigma) / 4 (``'edm_c_noise'``). Flow matching labels are ``num_train_timesteps`` x sigma.
- **Timesteps** (Lin et al. 2024, Table 2): ``timestep_spacing`` 'linspace' / 'leading' (+ ``steps_offset``) /
  'trailing' as ``grids.diffusers_timesteps``; ``lambda_min_clipped`` cuts the noisy end (DPM-Solver).
  'trailing' gives diffusers N + 1 timesteps for some N (61, 103, ... at T = 1000); ``grid`` refuses those N.
- **The end.** ``final_sigmas_type='zero'`` is ``final='zero'``; 'sigma_min' ends at index 0
  (``final='t_end'``). DDIM / PNDM: ``set_alpha_to_one=True`` is 'zero'; False ends at index 0, and where the
  timesteps already end at 0 diffusers' last step has length zero (an identity that costs a model call),
  which the grid leaves out (one NFE fewer). DDIM and PNDM step from t to t - T // N whatever the spacing:
  only where that is the next timestep (always for 'leading'; 'trailing' when N divides T) does a grid
  reproduce them (diffusers #9261), so ``grid`` raises otherwise.
- **Solvers.** DDIMScheduler -> ``ddim``; DPMSolverMultistepScheduler -> ``dpm_solver_pp_2m`` / ``_3m``
  (``dpmsolver++``), ``dpm_solver_2m`` / ``_3m`` (``dpmsolver``), ``dpm_solver_pp_2m_sde``
  (``sde-dpmsolver++``) with ``solver_type``, ``lower_order_final`` (diffusers' threshold: below 15 steps) and
  ``euler_at_final``; DPMSolverSinglestepScheduler -> ``dpm_solver(_pp)_2s`` / ``_3s`` with its group orders;
  DEISMultistepScheduler -> ``deis_logrho_2`` / ``_3``; UniPCMultistepScheduler -> ``unipc_{bh1,bh2}_{order}``
  (``predict_x0``, ``disable_corrector``, ``lower_order_final``); PNDMScheduler -> ``plms``
  (``skip_prk_steps``) or ``pndm_f`` (``midpoint='diffusers'``), v-prediction with ``combine='v'``;
  EulerDiscreteScheduler -> ``edm_euler``; HeunDiscreteScheduler -> ``edm_heun``;
  EulerAncestralDiscreteScheduler and DDPMScheduler (``variance_type`` 'fixed_small') -> ``ddpm_ancestral``
  (DDIM eta = 1: the same transition, so the same distribution, not the same draws);
  FlowMatchEulerDiscreteScheduler (fixed ``shift``) -> ``ddim`` on ``Flow``: on x = (1 - s) x0 + s eps,
  DDIM's step equals Euler's x + (s' - s) v exactly.
- **Starting noise.** Our x_T is on the VP scale. The Euler family (Euler, Heun, EulerAncestral) starts from
  ``init_noise_sigma`` x N(0, I) on its x / alpha scale, which is sqrt(sigma^2 + 1) (= 1 / alpha) for
  'leading' but sigma_max for 'linspace' / 'trailing': multiply standard normal noise by
  ``init_noise_scale`` (1 elsewhere) to start where diffusers starts.
Known differences, where the class maps but diffusers' own result differs (docs/parity.md): UniPC into
sigma = 0 with ``bh1`` or noise prediction (NaN in diffusers, the finite limit here). Unsupported keys or
values raise a ValueError naming them: thresholding / clip_sample, beta / flow sigmas, learned variances,
dynamic shifting, Karras / exponential sigmas with a repeated last sigma (``final_sigmas_type='sigma_min'``
and DEIS: a zero-length last step, diffusers #6477), 3S 'midpoint' (diffusers' second stage is not the
official one), 3M with ``euler_at_final``, and classes with no equivalent here (LMS, KDPM2, LCM, ...).
"""
import dataclasses
import json
import math
import os
from typing import Any, Callable, Dict, Mapping, Tuple

import jax.numpy as jnp
import numpy as np

from solvers import base, grids, predictions, schedules
from solvers import ddim as ddim_lib
from solvers import deis, dpm_solver_multistep, dpm_solver_sde, dpm_solver_singlestep, edm, pndm, unipc

PREDICTIONS = {"epsilon": "eps", "sample": "x0", "v_prediction": "v"}
CONFIG_NAME = "scheduler_config.json"
ZERO_SNR_ALPHAS_CUMPROD = 2.0**-24  # diffusers' last alphas_cumprod after rescale_betas_zero_snr
LOWER_ORDER_FINAL_BELOW = 15  # diffusers' multistep lower-order-final threshold (steps)

_BETAS = dict(num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear",
              trained_betas=None)
_THRESHOLD = dict(thresholding=False, dynamic_thresholding_ratio=0.995, sample_max_value=1.0)
_SIGMAS = dict(use_karras_sigmas=False, use_exponential_sigmas=False, use_beta_sigmas=False)
_FLOW = dict(use_flow_sigmas=False, flow_shift=1.0, use_dynamic_shifting=False, time_shift_type="exponential")

# Each supported class's config keys and their defaults (diffusers 0.42.1 signatures): a key the config
# leaves out takes its default, as in diffusers.
DEFAULTS = {
    "DDIMScheduler": dict(
        _BETAS, clip_sample=True, set_alpha_to_one=True, steps_offset=0, prediction_type="epsilon",
        **_THRESHOLD, clip_sample_range=1.0, timestep_spacing="leading", rescale_betas_zero_snr=False),
    "DPMSolverMultistepScheduler": dict(
        _BETAS, solver_order=2, prediction_type="epsilon", **_THRESHOLD, algorithm_type="dpmsolver++",
        solver_type="midpoint", lower_order_final=True, euler_at_final=False, **_SIGMAS, use_lu_lambdas=False,
        final_sigmas_type="zero", lambda_min_clipped=-math.inf, variance_type=None, timestep_spacing="linspace",
        steps_offset=0, rescale_betas_zero_snr=False, **_FLOW),
    "DPMSolverSinglestepScheduler": dict(
        _BETAS, solver_order=2, prediction_type="epsilon", **_THRESHOLD, algorithm_type="dpmsolver++",
        solver_type="midpoint", lower_order_final=False, **_SIGMAS, final_sigmas_type="zero",
        lambda_min_clipped=-math.inf, variance_type=None, **_FLOW),
    "DEISMultistepScheduler": dict(
        _BETAS, solver_order=2, prediction_type="epsilon", **_THRESHOLD, algorithm_type="deis",
        solver_type="logrho", lower_order_final=True, **_SIGMAS, timestep_spacing="linspace", steps_offset=0,
        **_FLOW),
    "UniPCMultistepScheduler": dict(
        _BETAS, solver_order=2, prediction_type="epsilon", **_THRESHOLD, predict_x0=True, solver_type="bh2",
        lower_order_final=True, disable_corrector=[], solver_p=None, **_SIGMAS, timestep_spacing="linspace",
        steps_offset=0, final_sigmas_type="zero", rescale_betas_zero_snr=False, sigma_min=None, sigma_max=None,
        shift_terminal=None, **_FLOW),
    "PNDMScheduler": dict(
        _BETAS, skip_prk_steps=False, set_alpha_to_one=False, prediction_type="epsilon",
        timestep_spacing="leading", steps_offset=0),
    "EulerDiscreteScheduler": dict(
        _BETAS, prediction_type="epsilon", interpolation_type="linear", **_SIGMAS, sigma_min=None,
        sigma_max=None, timestep_spacing="linspace", timestep_type="discrete", steps_offset=0,
        rescale_betas_zero_snr=False, final_sigmas_type="zero"),
    "HeunDiscreteScheduler": dict(
        _BETAS, beta_start=0.00085, beta_end=0.012, prediction_type="epsilon", **_SIGMAS, clip_sample=False,
        clip_sample_range=1.0, timestep_spacing="linspace", steps_offset=0),
    "EulerAncestralDiscreteScheduler": dict(
        _BETAS, prediction_type="epsilon", timestep_spacing="linspace", steps_offset=0,
        rescale_betas_zero_snr=False),
    "DDPMScheduler": dict(
        _BETAS, variance_type="fixed_small", clip_sample=True, prediction_type="epsilon", **_THRESHOLD,
        clip_sample_range=1.0, timestep_spacing="leading", steps_offset=0, rescale_betas_zero_snr=False),
    "FlowMatchEulerDiscreteScheduler": dict(
        num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=False, base_shift=0.5, max_shift=1.15,
        base_image_seq_len=256, max_image_seq_len=4096, invert_sigmas=False, shift_terminal=None, **_SIGMAS,
        time_shift_type="exponential", stochastic_sampling=False),
}

# Classes with no equivalent here, and why (k-diffusion names in docs/naming.md).
UNSUPPORTED = {
    "LMSDiscreteScheduler": "linear multistep on k-diffusion's sigma ODE (sample_lms) has no solver here",
    "KDPM2DiscreteScheduler": "k-diffusion's DPM-Solver-2 in sigma (sample_dpm_2) has no solver here",
    "KDPM2AncestralDiscreteScheduler": "k-diffusion's sample_dpm_2_ancestral has no solver here",
    "DPMSolverSDEScheduler": "k-diffusion's DPM++ SDE (sample_dpmpp_sde, Brownian-tree noise) has no solver here",
    "LCMScheduler": "latent consistency models' multistep consistency sampling is not a diffusion ODE/SDE solver",
    "TCDScheduler": "trajectory consistency distillation's sampler has no solver here",
    "IPNDMScheduler": "improved PNDM (iPNDM) has no solver here",
    "SASolverScheduler": "SA-Solver has no solver here",
    "EDMEulerScheduler": "EDM-parameterised configs (sigma_data, sigma range) are not read; use edm_euler on "
                         "schedules.EDM",
    "EDMDPMSolverMultistepScheduler": "EDM-parameterised configs are not read; use dpm_solver_pp_2m on "
                                      "schedules.EDM with grids.edm",
    "CosineDPMSolverMultistepScheduler": "its cosine sigma schedule (Stable Audio) is not read",
    "FlowMatchHeunDiscreteScheduler": "use edm_heun on schedules.Flow (not checked against diffusers)",
}


# --- time labels (hashable values: a Denoiser's time_label is static) -----------------------------------


@dataclasses.dataclass(frozen=True)
class RoundedLabel:
  """The integer timestep diffusers gives the network on a sigma grid: round(t) ('round') or the int64 cast
  of a non-negative t ('floor'), while the solver steps on the exact node."""
  mode: str = "round"

  def __call__(self, schedule, t):
    return jnp.round(t) if self.mode == "round" else jnp.floor(t)


@dataclasses.dataclass(frozen=True)
class SigmaInterpLabel:
  """diffusers' timestep of a node whose sigma = exp(-lambda) was interpolated linearly in sigma between
  integer timesteps (the Euler family's ``np.interp(timesteps, arange(T), sigmas)``): the inverse of that
  interpolation, so a fractional 'linspace' timestep comes back exactly; integers stay integers."""

  def __call__(self, schedule, t):
    table = jnp.exp(-schedule.lam_table)  # increasing with the index
    return jnp.interp(schedule.rho(t), table, jnp.arange(table.shape[0], dtype=table.dtype))


@dataclasses.dataclass(frozen=True)
class ScaledLabel:
  """factor x t: flow matching's timestep num_train_timesteps x sigma."""
  factor: float

  def __call__(self, schedule, t):
    return self.factor * t


# --- the result --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, eq=False)
class LoadedScheduler:
  """What ``load`` returns (see the module docstring). ``solver`` equals
  ``solvers.get(solver_name, **options)``; sample with ``solvers.sample(solver, denoiser(apply_fn, params),
  schedule, grid(N), init_noise_scale * z)``."""
  class_name: str
  schedule: Any
  prediction: str
  time_label: Any
  solver_name: str
  solver: Any
  options: Dict[str, Any] = dataclasses.field(hash=False)
  init_noise_scale: float
  ignored: Tuple[str, ...]
  config: Dict[str, Any] = dataclasses.field(hash=False, repr=False)  # every key the class reads, resolved
  _grid_fn: Callable = dataclasses.field(repr=False)

  def grid(self, num_inference_steps, capacity=None):
    """The grid diffusers steps on after ``set_timesteps(num_inference_steps)`` (see the module docstring)."""
    if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, (int, np.integer)) \
        or num_inference_steps < 1:
      raise ValueError(f"num_inference_steps={num_inference_steps!r} must be an integer >= 1")
    return self._grid_fn(int(num_inference_steps), capacity)

  def timesteps(self, num_inference_steps):
    """The network's time label at each node a step starts from (host float64 array): diffusers'
    ``scheduler.timesteps`` after ``set_timesteps`` (Heun: its distinct entries; PNDM lists some twice;
    without a zero-length last step the grid leaves out)."""
    grid = self.grid(num_inference_steps)
    label = self.time_label if callable(self.time_label) else predictions.TIME_LABELS[self.time_label]
    t = grid.t[: int(grid.num_steps)]
    return np.asarray(label(self.schedule, t), np.float64)

  def denoiser(self, apply_fn, params=None, cond=None):
    """A ``solvers.Denoiser`` for a network ``apply_fn(params, x, label, cond)`` trained as this config says."""
    return predictions.Denoiser(apply_fn=apply_fn, params=params, prediction=self.prediction,
                                time_label=self.time_label, cond=cond)


# --- reading the config ------------------------------------------------------------------------------------


def _read(config):
  """(dict, class name or None) from a mapping, a scheduler, a JSON file or a folder holding one."""
  if isinstance(config, Mapping):
    return dict(config), config.get("_class_name")
  if isinstance(config, (str, os.PathLike)):
    path = os.fspath(config)
    if os.path.isdir(path):
      candidates = [os.path.join(path, CONFIG_NAME), os.path.join(path, "scheduler", CONFIG_NAME)]
      found = [c for c in candidates if os.path.isfile(c)]
      if not found:
        raise ValueError(f"no {CONFIG_NAME} in the folder {path!r} (nor in its scheduler/ subfolder)")
      path = found[0]
    if not os.path.isfile(path):
      raise ValueError(f"scheduler config {path!r} does not exist: pass a dict, a {CONFIG_NAME} or its folder")
    try:
      with open(path) as f:
        data = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
      raise ValueError(f"cannot read the scheduler config {path!r}: {e}") from e
    if not isinstance(data, dict):
      raise ValueError(f"scheduler config {path!r} holds a {type(data).__name__}, not a JSON object")
    return data, data.get("_class_name")
  if isinstance(getattr(config, "config", None), Mapping):  # a diffusers scheduler object
    return dict(config.config), type(config).__name__
  raise ValueError(f"config must be a dict, a path to {CONFIG_NAME} (or its folder) or a diffusers scheduler, "
                   f"got {type(config).__name__}")


class _Options:
  """The config of one class: defaults filled in, every read recorded. ``finish`` raises on a key whose
  value differs from diffusers' default but was never read: nothing unsupported passes silently."""

  def __init__(self, class_name, config, defaults):
    self.class_name = class_name
    self.defaults = defaults
    self.values = dict(defaults)
    self.values.update({k: v for k, v in config.items() if k in defaults})
    self.ignored = tuple(sorted(k for k in config if k not in defaults and not str(k).startswith("_")))
    self.read = set()

  def __getitem__(self, key):
    self.read.add(key)
    return self.values[key]

  def skip(self, *keys):
    """Keys that do not matter under the settings read so far (diffusers does not read them either)."""
    self.read.update(keys)

  def fail(self, key, why):
    raise ValueError(f"{self.class_name}: {key}={self.values[key]!r} is unsupported: {why}")

  def choice(self, key, valid, why=None):
    value = self[key]
    if value not in valid:
      if why:
        self.fail(key, why)
      raise ValueError(f"{self.class_name}: {key}={value!r} is unknown; valid: {', '.join(map(repr, valid))}")
    return value

  def flag(self, key):
    return self.choice(key, (False, True))

  def integer(self, key, low):
    value = self[key]
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
      raise ValueError(f"{self.class_name}: {key}={value!r} must be an integer >= {low}")
    return int(value)

  def require_default(self, key, why):
    if self[key] != self.defaults[key]:
      self.fail(key, why)

  def finish(self):
    for key, default in self.defaults.items():
      if key not in self.read and self.values[key] != default:
        self.fail(key, f"only the default {default!r} is")


# --- schedules and timesteps -------------------------------------------------------------------------------


def rescale_zero_terminal_snr(alphas_cumprod):
  """Lin et al. 2024, Algorithm 1: sqrt(abar) shifted so its last entry is 0 and scaled so its first is kept."""
  root = np.sqrt(np.asarray(alphas_cumprod, np.float64))
  first, last = root[0], root[-1]
  return ((root - last) * first / (first - last)) ** 2


def _discrete_schedule(opts, zero_snr):
  """The DiscreteVP of the config's betas. zero_snr: how the class treats rescale_betas_zero_snr
  ('tiny': last alphas_cumprod 2**-24; 'refuse': it keeps 0; None: the class has no such key)."""
  num_train = opts.integer("num_train_timesteps", 2)
  betas = opts["trained_betas"]
  if betas is not None:
    opts.skip("beta_schedule", "beta_start", "beta_end")
    betas = np.asarray(betas, np.float64)
    if betas.shape != (num_train,):
      raise ValueError(f"{opts.class_name}: trained_betas has shape {betas.shape}; num_train_timesteps="
                       f"{num_train} needs ({num_train},)")
  else:
    name = opts.choice("beta_schedule", schedules.BETA_SCHEDULES)
    betas = schedules.make_betas(name, num_train, float(opts["beta_start"]), float(opts["beta_end"]))
  if zero_snr is not None and opts.flag("rescale_betas_zero_snr"):
    if zero_snr == "refuse":
      opts.fail("rescale_betas_zero_snr", f"{opts.class_name} keeps alphas_cumprod = 0 (lambda = -inf) at the "
                "last training step, which a DiscreteVP cannot hold")
    alphas_cumprod = rescale_zero_terminal_snr(np.exp(np.cumsum(np.log1p(-betas))))
    alphas_cumprod[-1] = ZERO_SNR_ALPHAS_CUMPROD
    return schedules.DiscreteVP.from_alphas_cumprod(alphas_cumprod)
  return schedules.DiscreteVP.from_betas(betas)


def _prediction(opts):
  kind = opts.choice("prediction_type", tuple(PREDICTIONS))
  return PREDICTIONS[kind]


def _no_thresholding(opts):
  opts.require_default("thresholding", "dynamic thresholding is not mapped (solvers.Thresholded has no "
                       "check against diffusers' per-class placement)")
  opts.skip("dynamic_thresholding_ratio", "sample_max_value")


def _no_flow(opts):
  opts.require_default("use_flow_sigmas", "flow sigmas are not read; use FlowMatchEulerDiscreteScheduler configs")
  opts.require_default("use_dynamic_shifting", "dynamic shifting needs the image size (mu)")
  opts.skip("flow_shift", "time_shift_type")


def _spacing(opts):
  return opts.choice("timestep_spacing", grids.SPACINGS)


def _offset(opts, spacing):
  if spacing == "leading":
    return opts.integer("steps_offset", 0)
  opts.skip("steps_offset")
  return 0


def _check_trailing(class_name, num_train, num_steps):
  count = np.arange(num_train, 0, -num_train / num_steps).size
  if count != num_steps:
    raise ValueError(f"{class_name}: timestep_spacing='trailing' with num_inference_steps={num_steps} gives diffusers "
                     f"{count} timesteps, the last one -1 (arange round-off; docs/parity.md); choose another "
                     "num_inference_steps")


def _timesteps(class_name, num_train, num_steps, spacing, family, offset, last=None):
  """diffusers' integer timesteps (grids.diffusers_timesteps); ``last``: DPM-Solver's lambda_min_clipped end."""
  if spacing == "trailing":
    _check_trailing(class_name, num_train, num_steps)
  return grids.diffusers_timesteps(num_train if last is None else last, num_steps, spacing, family, offset)


def _index_grid(schedule, times, final, capacity):
  """Integer timesteps, then sigma = 0 ('zero') or index 0 ('sigma_min'; a repeated 0 is a zero-length step,
  left out)."""
  if final == "zero":
    return grids.from_times(schedule, times, final="zero", capacity=capacity)
  if times[-1] != 0:
    times = np.append(times, 0)
  return grids.from_times(schedule, times, final="t_end", capacity=capacity)


def _sigma_table(schedule):
  """diffusers' sigmas sqrt((1 - abar) / abar) = exp(-lambda) at the integer timesteps (host float64)."""
  return np.exp(-np.asarray(schedule.lam_table, np.float64))


def _times_of_sigmas(schedule, sigmas):
  return np.asarray(schedule.t_of_lambda(jnp.asarray(-np.log(sigmas), schedules.table_dtype())), np.float64)


def _sigma_grid(schedule, kind, num_steps, capacity, sigma_min=None, sigma_max=None):
  """Karras (rho = 7) or exponential (uniform in log sigma) sigmas between the bounds (default: the table's),
  then sigma = 0."""
  if kind == "karras":
    return grids.karras(schedule, num_steps, sigma_min=sigma_min, sigma_max=sigma_max, final="zero",
                        capacity=capacity)
  t_start = None if sigma_max is None else float(_times_of_sigmas(schedule, [sigma_max])[0])
  t_end = None if sigma_min is None else float(_times_of_sigmas(schedule, [sigma_min])[0])
  return grids.uniform_logsnr(schedule, num_steps, t_start=t_start, t_end=t_end, final="zero", capacity=capacity)


# --- one function per class --------------------------------------------------------------------------------


def _sigma_kind(opts, allow_lu=False):
  """Which sigma grid the config asks for: None, 'karras', 'exponential' (or 'lu': uniform lambda)."""
  opts.require_default("use_beta_sigmas", "beta sigmas (scipy's beta quantiles) are not reproduced")
  chosen = [k for k in ("use_karras_sigmas", "use_exponential_sigmas") + (("use_lu_lambdas",) if allow_lu else ())
            if opts.flag(k)]
  if len(chosen) > 1:
    raise ValueError(f"{opts.class_name}: only one of {', '.join(chosen)} may be True")
  return {None: None, "use_karras_sigmas": "karras", "use_exponential_sigmas": "exponential",
          "use_lu_lambdas": "lu"}[chosen[0] if chosen else None]


def _repeated_sigma_min(opts, kind):
  raise ValueError(f"{opts.class_name}: {kind} sigmas with a final sigma_min are unsupported: diffusers' list "
                   "already ends at sigma_min and repeats it, a zero-length last step (diffusers #6477; NaN in "
                   "float32 for some solvers); use final_sigmas_type='zero'")


def _dpm_family_grid(opts, schedule, final, sigma_kind, label_mode, lambda_clip=False, singlestep=False):
  """(grid function, time label) of the multistep DPM family (DPMSolver*, UniPC, DEIS)."""
  class_name, num_train = opts.class_name, schedule.num_train_timesteps
  if sigma_kind is not None:
    if final != "zero":
      _repeated_sigma_min(opts, sigma_kind)
    opts.skip("timestep_spacing", "steps_offset", "lambda_min_clipped")
    kind = "karras" if sigma_kind == "karras" else "exponential"  # 'lu' = exponential: uniform in log sigma

    def sigma_grid(num_steps, capacity):
      return _sigma_grid(schedule, kind, num_steps, capacity)
    return sigma_grid, RoundedLabel(label_mode)
  spacing = "linspace" if singlestep else _spacing(opts)
  offset = 0 if singlestep else _offset(opts, spacing)
  last = None
  if lambda_clip:
    clip = float(opts["lambda_min_clipped"])
    clipped = int(np.searchsorted(np.asarray(schedule.lam_table, np.float64)[::-1], clip, side="left"))
    if clipped:
      last = num_train - clipped
      if spacing == "trailing":
        opts.fail("lambda_min_clipped", "clipping with timestep_spacing='trailing' is not reproduced")

  def index_grid(num_steps, capacity):
    times = _timesteps(class_name, num_train, num_steps, spacing, "dpm", offset, last)
    return _index_grid(schedule, times, final, capacity)
  return index_grid, "t"


def _final(opts, noise_form):
  final = opts.choice("final_sigmas_type", ("zero", "sigma_min"))
  if noise_form and final == "zero":
    opts.fail("final_sigmas_type", f"diffusers refuses algorithm_type={opts.values['algorithm_type']!r} with 'zero' "
              "(its noise-form step into sigma = 0 is 0 * inf); use 'sigma_min'")
  return final


def _solver_type(opts, aliases):
  """diffusers' solver_type, after the aliases its __init__ applies (e.g. DPM-Solver reads 'bh2' as 'midpoint')."""
  value = opts["solver_type"]
  for target, names in aliases.items():
    if value in names:
      return target
  valid = [name for names in aliases.values() for name in names]
  raise ValueError(f"{opts.class_name}: solver_type={value!r} is unknown; valid: {', '.join(map(repr, valid))}")


def _dpm_family_prologue(opts, zero_snr):
  """(schedule, prediction) of a DPM-family class, which may neither threshold nor use flow sigmas."""
  schedule = _discrete_schedule(opts, zero_snr)
  prediction = _prediction(opts)
  _no_thresholding(opts)
  _no_flow(opts)
  if "variance_type" in opts.defaults:
    opts.require_default("variance_type", "learned variances are not read")
  return schedule, prediction


# diffusers' DPM-Solver schedulers read UniPC's / DEIS's solver types as 'midpoint'.
_DPM_SOLVER_TYPES = {"midpoint": ("midpoint", "logrho", "bh1", "bh2"), "heun": ("heun",)}


def _map_dpm_multistep(opts):
  schedule, prediction = _dpm_family_prologue(opts, "tiny")
  algorithm = opts["algorithm_type"]
  if algorithm == "deis":
    algorithm_used = "dpmsolver++"  # diffusers' alias
  elif algorithm in ("dpmsolver++", "dpmsolver", "sde-dpmsolver++"):
    algorithm_used = algorithm
  elif algorithm == "sde-dpmsolver":
    opts.fail("algorithm_type", "the noise-prediction SDE solver has no equivalent here; use 'sde-dpmsolver++'")
  else:
    opts.choice("algorithm_type", ("dpmsolver++", "dpmsolver", "sde-dpmsolver++", "sde-dpmsolver", "deis"))
  solver_type = _solver_type(opts, _DPM_SOLVER_TYPES)
  order = opts.choice("solver_order", (1, 2, 3))
  final = _final(opts, algorithm not in ("dpmsolver++", "sde-dpmsolver++"))
  lower_order_final = opts.flag("lower_order_final")
  below = LOWER_ORDER_FINAL_BELOW
  if opts.flag("euler_at_final"):
    if order == 3:
      opts.fail("euler_at_final", "with solver_order=3 diffusers lowers only the last step, which the per-step "
                "order rule here cannot express")
    lower_order_final, below = True, None  # order <= 2: the last step is first order at any N
  sigma_kind = _sigma_kind(opts, allow_lu=True)
  cosine = opts.values["trained_betas"] is None and opts.values["beta_schedule"] == "squaredcos_cap_v2"
  # diffusers rounds the Karras / Lu timesteps (not for squaredcos_cap_v2) and casts them to int64.
  label_mode = "round" if sigma_kind in ("karras", "lu") and not cosine else "floor"
  grid_fn, label = _dpm_family_grid(opts, schedule, final, sigma_kind, label_mode, lambda_clip=True)
  if algorithm_used == "sde-dpmsolver++":
    if order == 3:
      opts.fail("solver_order", "SDE-DPM-Solver++ here has orders 1 and 2")
    name = "dpm_solver_pp_2m_sde"
    solver = dpm_solver_sde.DPMSolverSDE(order=order, solver_type=solver_type, lower_order_final=lower_order_final,
                                         lower_order_final_below=below)
  else:
    data = algorithm_used == "dpmsolver++"
    name = ("dpm_solver_pp_" if data else "dpm_solver_") + ("3m" if order == 3 else "2m")
    solver = dpm_solver_multistep.DPMSolverMultistep(
        order=order, prediction="data" if data else "noise", solver_type=solver_type,
        lower_order_final=lower_order_final, lower_order_final_below=below)
  return dict(schedule=schedule, prediction=prediction, time_label=label, solver_name=name, solver=solver,
              grid_fn=grid_fn)


def _map_dpm_singlestep(opts):
  schedule, prediction = _dpm_family_prologue(opts, None)
  algorithm = opts["algorithm_type"]
  if algorithm == "sde-dpmsolver++":
    opts.fail("algorithm_type", "the singlestep SDE solver has no equivalent here")
  if algorithm not in ("dpmsolver++", "dpmsolver", "deis"):
    opts.choice("algorithm_type", ("dpmsolver++", "dpmsolver", "sde-dpmsolver++", "deis"))
  data = algorithm in ("dpmsolver++", "deis")  # 'deis': diffusers' alias of dpmsolver++
  solver_type = _solver_type(opts, _DPM_SOLVER_TYPES)
  order = opts.choice("solver_order", (1, 2, 3))
  if order == 3 and solver_type == "midpoint":
    opts.fail("solver_type", "diffusers' 3S computes its second stage with the midpoint form, the official "
              "DPM-Solver (and dpm_solver_3s here) with the taylor form (docs/parity.md); use 'heun'")
  final = _final(opts, algorithm != "dpmsolver++")
  # diffusers forces lower_order_final=True into 'zero' and where N % order != 0; there its list equals
  # 'fixed', so 'fixed' serves every N when lower_order_final=False and the end is sigma_min.
  lower_order_final = opts.flag("lower_order_final") or final == "zero"
  sigma_kind = _sigma_kind(opts)
  grid_fn, label = _dpm_family_grid(opts, schedule, final, sigma_kind, "round" if sigma_kind == "karras" else "floor",
                                    lambda_clip=True, singlestep=True)
  name = ("dpm_solver_pp_" if data else "dpm_solver_") + ("3s" if order == 3 else "2s")
  solver = dpm_solver_singlestep.DPMSolverSinglestep(
      order=order, prediction="data" if data else "noise", solver_type=solver_type,
      schedule="diffusers" if lower_order_final else "fixed")
  return dict(schedule=schedule, prediction=prediction, time_label=label, solver_name=name, solver=solver,
              grid_fn=grid_fn)


def _map_deis(opts):
  schedule, prediction = _dpm_family_prologue(opts, None)
  opts.choice("algorithm_type", ("deis", "dpmsolver", "dpmsolver++"))  # diffusers reads the DPM ones as 'deis'
  _solver_type(opts, {"logrho": ("logrho", "midpoint", "heun", "bh1", "bh2")})
  order = opts.choice("solver_order", (1, 2, 3))
  sigma_kind = _sigma_kind(opts)
  if sigma_kind is not None:
    _repeated_sigma_min(opts, sigma_kind)  # DEIS always ends at its last sigma, repeated
  grid_fn, label = _dpm_family_grid(opts, schedule, "sigma_min", None, "round")
  solver = deis.deis_logrho(order=order, lower_order_final=opts.flag("lower_order_final"))
  return dict(schedule=schedule, prediction=prediction, time_label=label, solver_name=f"deis_logrho_{max(order, 2)}",
              solver=solver, grid_fn=grid_fn)


def _map_unipc(opts):
  schedule, prediction = _dpm_family_prologue(opts, "tiny")
  opts.require_default("shift_terminal", "it applies to flow sigmas only")
  opts.require_default("solver_p", "a predictor scheduler object is not read (dpm_solver_pp_2m_unic is UniC "
                       "after DPM-Solver++ 2M)")
  variant = _solver_type(opts, {"bh1": ("bh1",), "bh2": ("bh2", "midpoint", "heun", "logrho")})
  order = opts.choice("solver_order", (1, 2, 3))
  data = opts.flag("predict_x0")
  disabled = opts["disable_corrector"]
  if not isinstance(disabled, (list, tuple)) or not all(isinstance(i, int) and not isinstance(i, bool)
                                                         for i in disabled):
    raise ValueError(f"{opts.class_name}: disable_corrector={disabled!r} must be a list of step indices")
  final = opts.choice("final_sigmas_type", ("zero", "sigma_min"))
  sigma_kind = _sigma_kind(opts)
  if sigma_kind is None:
    opts.skip("sigma_min", "sigma_max")
  else:
    opts.require_default("sigma_min", "custom Karras / exponential bounds are not read")
    opts.require_default("sigma_max", "custom Karras / exponential bounds are not read")
  grid_fn, label = _dpm_family_grid(opts, schedule, final, sigma_kind, "round" if sigma_kind == "karras" else "floor")
  solver = unipc.UniPC(order=order, variant=variant, prediction="data" if data else "noise",
                       disable_corrector=tuple(int(i) for i in disabled),
                       lower_order_final=opts.flag("lower_order_final"))
  return dict(schedule=schedule, prediction=prediction, time_label=label, solver_name=f"unipc_{variant}_{order}",
              solver=solver, grid_fn=grid_fn)


def _ddim_family_grid(opts, schedule, spacing, offset, set_alpha_to_one):
  """DDIM / PNDM: step t -> t - T // N, ending at alphas_cumprod 1 or alphas_cumprod[0] (module docstring)."""
  num_train, class_name = schedule.num_train_timesteps, opts.class_name

  def grid_fn(num_steps, capacity):
    times = _timesteps(class_name, num_train, num_steps, spacing, "ddim", offset)
    stride = num_train // num_steps
    previous = times - stride
    if not (np.array_equal(previous[:-1], times[1:]) and previous[-1] < 0):
      raise ValueError(f"{class_name}: timestep_spacing={spacing!r} with num_inference_steps={num_steps}: diffusers "
                       f"steps from t to t - {stride} (num_train_timesteps // num_inference_steps), which is not "
                       "its next timestep here (diffusers #9261), so no grid reproduces it; use 'leading' (or "
                       "'trailing' with num_inference_steps dividing num_train_timesteps)")
    return _index_grid(schedule, times, "zero" if set_alpha_to_one else "sigma_min", capacity)
  return grid_fn


def _no_clipping(opts):
  opts.choice("clip_sample", (False,), "clipping x0 (while keeping the raw model output) has no equivalent here")
  opts.skip("clip_sample_range")


def _ddim_family_prologue(opts):
  """(schedule, prediction) of DDIM / DDPM: no thresholding, no clipping, zero terminal SNR refused."""
  schedule = _discrete_schedule(opts, "refuse")
  prediction = _prediction(opts)
  _no_thresholding(opts)
  _no_clipping(opts)
  return schedule, prediction


def _map_ddim(opts):
  schedule, prediction = _ddim_family_prologue(opts)
  spacing = _spacing(opts)
  grid_fn = _ddim_family_grid(opts, schedule, spacing, _offset(opts, spacing),
                              opts.flag("set_alpha_to_one"))
  return dict(schedule=schedule, prediction=prediction, time_label="t", solver_name="ddim", solver=ddim_lib.DDIM(),
              grid_fn=grid_fn)


def _map_pndm(opts):
  schedule = _discrete_schedule(opts, None)
  kind = opts.choice("prediction_type", ("epsilon", "v_prediction"))
  spacing = opts.choice("timestep_spacing", ("leading",), "PNDM's steps follow t - T // N and its PRK half steps; "
                        "only 'leading' is checked against diffusers")
  grid_fn = _ddim_family_grid(opts, schedule, spacing, _offset(opts, spacing),
                              opts.flag("set_alpha_to_one"))
  plms = opts.flag("skip_prk_steps")
  combine = "v" if kind == "v_prediction" else "eps"  # diffusers combines raw v outputs (first order)
  solver = pndm.PNDM(method="plms" if plms else "f_pndm", midpoint="diffusers", combine=combine)
  return dict(schedule=schedule, prediction=PREDICTIONS[kind], time_label="t",
              solver_name="plms" if plms else "pndm_f", solver=solver, grid_fn=grid_fn)


def _map_ddpm(opts):
  schedule, prediction = _ddim_family_prologue(opts)
  opts.choice("variance_type", ("fixed_small", "fixed_small_log"), "only the posterior variance (DDIM eta = 1) "
              "is mapped")
  spacing = _spacing(opts)
  offset = _offset(opts, spacing)
  num_train = schedule.num_train_timesteps

  def grid_fn(num_steps, capacity):  # DDPM steps to its next timestep, the last one to alphas_cumprod = 1
    times = _timesteps(opts.class_name, num_train, num_steps, spacing, "ddim", offset)
    return grids.from_times(schedule, times, final="zero", capacity=capacity)
  return dict(schedule=schedule, prediction=prediction, time_label="t", solver_name="ddpm_ancestral",
              solver=ddim_lib.DDIM(eta=1.0), grid_fn=grid_fn)


def _euler_timesteps(class_name, num_train, num_steps, spacing, offset):
  """The Euler family's float timesteps: 'linspace' is not rounded."""
  if spacing == "linspace":
    return np.linspace(0, num_train - 1, num_steps)[::-1].copy()
  return _timesteps(class_name, num_train, num_steps, spacing, "ddim", offset).astype(np.float64)


def _map_euler_family(opts, solver_name, solver, zero_snr):
  """Euler, Heun, EulerAncestral: sigmas interpolated linearly in sigma at the timesteps (Karras /
  exponential between the first and last of them), then sigma = 0; the model input x / sqrt(sigma^2 + 1)."""
  class_name = opts.class_name
  schedule = _discrete_schedule(opts, zero_snr)
  prediction = _prediction(opts)
  if "clip_sample" in opts.defaults:
    _no_clipping(opts)
  if "interpolation_type" in opts.defaults:
    opts.choice("interpolation_type", ("linear",), "diffusers' 'log_linear' builds N + 1 sigmas for N timesteps")
  if "final_sigmas_type" in opts.defaults:
    opts.choice("final_sigmas_type", ("zero",), "diffusers then returns x / alpha at sigma_min, not the sample")
  sigma_kind = _sigma_kind(opts) if "use_karras_sigmas" in opts.defaults else None
  bounds = (None, None)
  if "sigma_min" in opts.defaults:
    bounds = (opts["sigma_min"], opts["sigma_max"]) if sigma_kind else (None, None)
    if sigma_kind is None:
      opts.skip("sigma_min", "sigma_max")
  spacing = _spacing(opts)
  offset = _offset(opts, spacing)
  num_train = schedule.num_train_timesteps
  table = _sigma_table(schedule)

  def grid_fn(num_steps, capacity):
    steps = _euler_timesteps(class_name, num_train, num_steps, spacing, offset)
    if sigma_kind is not None:
      lo = float(table[int(steps[-1])]) if bounds[0] is None else float(bounds[0])
      hi = float(table[int(steps[0])]) if bounds[1] is None else float(bounds[1])
      return _sigma_grid(schedule, sigma_kind, num_steps, capacity, sigma_min=lo, sigma_max=hi)
    integer = np.all(steps == np.round(steps))
    times = steps if integer else _times_of_sigmas(schedule, np.interp(steps, np.arange(num_train), table))
    return grids.from_times(schedule, times, final="zero", capacity=capacity)

  if "timestep_type" in opts.defaults and opts.choice("timestep_type", ("discrete", "continuous")) == "continuous" \
      and prediction == "v":
    label = "edm_c_noise"
  else:
    label = "t" if sigma_kind is not None or spacing != "linspace" else SigmaInterpLabel()
  # init_noise_sigma: sqrt(sigma_max^2 + 1) for 'leading' (our x_T scale 1), sigma_max otherwise.
  sigma_max = float(table[-1]) if bounds[1] is None else float(bounds[1])
  scale = 1.0 if spacing == "leading" else sigma_max / math.sqrt(1.0 + sigma_max**2)
  return dict(schedule=schedule, prediction=prediction, time_label=label, solver_name=solver_name, solver=solver,
              grid_fn=grid_fn, init_noise_scale=scale)


def _map_euler(opts):
  return _map_euler_family(opts, "edm_euler", edm.EDM(method="euler"), "tiny")


def _map_heun(opts):
  return _map_euler_family(opts, "edm_heun", edm.EDM(method="heun"), None)


def _map_euler_ancestral(opts):
  return _map_euler_family(opts, "ddpm_ancestral", ddim_lib.DDIM(eta=1.0), "tiny")


def _map_flow_match_euler(opts):
  num_train = opts.integer("num_train_timesteps", 2)
  opts.require_default("use_dynamic_shifting", "the shift then depends on the image size (mu); pass a fixed shift")
  opts.skip("base_shift", "max_shift", "base_image_seq_len", "max_image_seq_len", "time_shift_type")
  _sigma_kind(opts)  # any of them True raises below
  for key in ("use_karras_sigmas", "use_exponential_sigmas"):
    opts.require_default(key, "sigma grids over flow sigmas are not reproduced")
  shift = float(opts["shift"])
  if not shift > 0:
    raise ValueError(f"{opts.class_name}: shift={shift!r} must be > 0")

  def shifted(s):
    return shift * s / (1.0 + (shift - 1.0) * s)

  s_min = shifted(1.0 / num_train)  # diffusers' sigma_min: the shifted training sigmas' last
  schedule = schedules.Flow(t_min=min(float(shifted(s_min)), s_min), t_max=1.0)

  def grid_fn(num_steps, capacity):
    sigmas = shifted(np.linspace(num_train * 1.0, num_train * s_min, num_steps) / num_train)
    return grids.from_times(schedule, sigmas, final="zero", capacity=capacity)
  label = "t1000" if num_train == 1000 else ScaledLabel(float(num_train))
  return dict(schedule=schedule, prediction="velocity", time_label=label, solver_name="ddim", solver=ddim_lib.DDIM(),
              grid_fn=grid_fn)


MAPPERS = {
    "DDIMScheduler": _map_ddim,
    "DPMSolverMultistepScheduler": _map_dpm_multistep,
    "DPMSolverSinglestepScheduler": _map_dpm_singlestep,
    "DEISMultistepScheduler": _map_deis,
    "UniPCMultistepScheduler": _map_unipc,
    "PNDMScheduler": _map_pndm,
    "EulerDiscreteScheduler": _map_euler,
    "HeunDiscreteScheduler": _map_heun,
    "EulerAncestralDiscreteScheduler": _map_euler_ancestral,
    "DDPMScheduler": _map_ddpm,
    "FlowMatchEulerDiscreteScheduler": _map_flow_match_euler,
}


def _options(solver, name):
  """The fields of ``solver`` that differ from the solver registered as ``name``."""
  default = base.get(name)
  return {f.name: getattr(solver, f.name) for f in dataclasses.fields(solver)
          if getattr(solver, f.name) != getattr(default, f.name)}


def load(config, scheduler=None):
  """The schedule, grid, solver and network convention equivalent to a diffusers scheduler config.

  ``config``: a dict (``dict(pipe.scheduler.config)``), a diffusers scheduler, a path to a
  ``scheduler_config.json`` or a folder holding one (or a pipeline folder with ``scheduler/``).
  ``scheduler``: the class to read it as (a name or the class), as ``SchedulerCls.from_config(config)``;
  default the config's ``_class_name``. Raises a ValueError naming an unsupported class, key or value.
  """
  data, class_name = _read(config)
  if scheduler is not None:
    class_name = scheduler if isinstance(scheduler, str) else getattr(scheduler, "__name__", None)
    if not isinstance(class_name, str):
      raise ValueError(f"scheduler={scheduler!r} must be a class name or a diffusers scheduler class")
  if class_name is None:
    raise ValueError("the config has no '_class_name': pass scheduler=<class name>")
  if class_name in UNSUPPORTED:
    raise ValueError(f"{class_name} is unsupported: {UNSUPPORTED[class_name]} (docs/naming.md)")
  if class_name not in MAPPERS:
    raise ValueError(f"scheduler class {class_name!r} is unknown; supported: {', '.join(sorted(MAPPERS))}")
  opts = _Options(class_name, data, DEFAULTS[class_name])
  fields = MAPPERS[class_name](opts)
  opts.finish()
  grid_fn = fields.pop("grid_fn")
  fields.setdefault("init_noise_scale", 1.0)
  return LoadedScheduler(class_name=class_name, options=_options(fields["solver"], fields["solver_name"]),
                         ignored=opts.ignored, config=dict(opts.values), _grid_fn=grid_fn, **fields)

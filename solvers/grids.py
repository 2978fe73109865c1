"""Time grids: where a sampler steps, padded to a fixed capacity so one compilation serves every NFE.

A ``Grid`` holds, per node, the time t and alpha, sigma, lambda there, in float64 when x64 is on.
``num_steps`` (a leaf, not static) says how many intervals are real; nodes past ``num_steps`` repeat
the last node and the sampling loop skips those steps.

The final-step policy is explicit: ``final='t_end'`` stops at t_end; ``final='zero'`` makes the last
step a jump to sigma = 0 (alpha = 1, lambda = +inf), i.e. finishes with a denoising step, as
diffusers' ``final_sigmas_type='zero'`` and the EDM / k-diffusion samplers do. Either way
``num_steps`` counts every step, the final jump included. Lowering the order near the end is a
per-solver option, never a rule of the grid.

Builders: ``uniform_t``, ``quadratic_t`` (DPM-Solver's time_quadratic), ``uniform_logsnr``
(DPM-Solver's logSNR), ``karras`` (Karras et al. 2022, Eq. 5, in rho = sigma / alpha), ``edm`` (Karras
with the EDM defaults), ``diffusers_timesteps`` (integer ``linspace`` / ``leading`` / ``trailing``
spacings of diffusers' discrete schedulers) and ``from_times`` for any user array.
"""
import math

import jax
import jax.numpy as jnp
import numpy as np

from solvers import schedules as schedules_lib
from solvers.pytree import pytree_dataclass

FINAL_POLICIES = ("t_end", "zero")
MIN_CAPACITY = 64


@pytree_dataclass
class Grid:
  """The nodes a sampler steps through, padded to a fixed capacity (module docstring); build with the builders."""
  t: jnp.ndarray       # (capacity,) times; past the last node, repeats of it
  alpha: jnp.ndarray
  sigma: jnp.ndarray
  lam: jnp.ndarray     # half log-SNR; +inf at a sigma = 0 node
  num_steps: jnp.ndarray  # int32 scalar: intervals actually taken

  @property
  def capacity(self):
    """The padded number of nodes (static): one compilation serves every grid of this capacity."""
    return self.t.shape[0]

  def times(self):
    """The real nodes' times as a host array (the sigma = 0 node's time is the schedule's zero time)."""
    return np.asarray(self.t)[: int(self.num_steps) + 1]


def reverse(grid):
  """The same nodes in the opposite order (inversion runs the sampling grid backwards): node k of the
  result is node ``num_steps - k`` of ``grid``, and the padding repeats ``grid``'s first node. Traceable,
  so one compilation serves every step count; a sigma = 0 node (lambda = +inf) becomes the first node."""
  k = jnp.arange(grid.capacity)
  index = jnp.maximum(grid.num_steps - k, 0)
  take = lambda a: jnp.take(a, index)
  return Grid(t=take(grid.t), alpha=take(grid.alpha), sigma=take(grid.sigma), lam=take(grid.lam),
              num_steps=grid.num_steps)


def default_capacity(num_nodes):
  """Grids are padded to max(64, next power of two) nodes, so NFE 1..63 share one compilation."""
  return max(MIN_CAPACITY, 2 ** math.ceil(math.log2(max(num_nodes, 1))))


def _check_num_steps(num_steps):
  if isinstance(num_steps, (bool, float)) or not isinstance(num_steps, (int, np.integer)) or num_steps < 1:
    raise ValueError(f"num_steps={num_steps!r}: the number of steps must be an integer >= 1")
  return int(num_steps)


def _check_final(final):
  if final not in FINAL_POLICIES:
    raise ValueError(f"final={final!r} is unknown; valid: {', '.join(FINAL_POLICIES)}")


def _is_concrete(x):
  return not isinstance(x, jax.core.Tracer)


def _validate_times(schedule, times, final, round_to_integers):
  t = np.asarray(times, dtype=np.float64)
  if t.ndim != 1 or t.size < 1:
    raise ValueError(f"a grid needs a 1-D array of times, got shape {t.shape}")
  bad = np.flatnonzero(~np.isfinite(t))
  if bad.size:
    raise ValueError(f"grid time t[{bad[0]}]={float(t[bad[0]])!r} is not finite")
  lo, hi = float(schedule.t_min), float(schedule.t_max)
  tol = 1e-9 * max(1.0, abs(hi))
  out = np.flatnonzero((t < lo - tol) | (t > hi + tol))
  if out.size:
    raise ValueError(f"grid time t[{out[0]}]={float(t[out[0]])!r} is outside the schedule's range [{lo}, {hi}]")
  if round_to_integers:
    rounded = np.round(t)
    dup = np.flatnonzero(np.diff(rounded) == 0)
    if dup.size:
      raise ValueError(f"grid times t[{dup[0]}]={float(t[dup[0]])!r} and t[{dup[0] + 1}]={float(t[dup[0] + 1])!r} round to the "
                       f"same integer {rounded[dup[0]]:g}; use fewer steps or another spacing")
    t = rounded
  if t.size > 1:
    d = np.diff(t)
    if not (np.all(d < 0) or np.all(d > 0)):
      i = int(np.flatnonzero(d >= 0)[0] if d[0] < 0 else np.flatnonzero(d <= 0)[0])
      raise ValueError(f"grid times must be strictly monotone: t[{i}]={float(t[i])!r}, t[{i + 1}]={float(t[i + 1])!r}")
    if final == "zero" and d[0] > 0:
      raise ValueError(f"final='zero' needs a decreasing (sampling-direction) grid, got increasing times "
                       f"t[0]={float(t[0])!r}, t[1]={float(t[1])!r}")
  return t


def from_times(schedule, times, *, final="t_end", capacity=None, round_to_integers=False):
  """A grid through the given times (strictly monotone, inside [schedule.t_min, schedule.t_max]).

  With ``final='zero'`` a sigma = 0 node is appended after the last time, so ``num_steps = len(times)``;
  otherwise ``num_steps = len(times) - 1``. ``round_to_integers`` rounds (for discrete schedules queried
  at integer steps) and rejects times that collide after rounding.
  """
  _check_final(final)
  if _is_concrete(times):
    times = _validate_times(schedule, times, final, round_to_integers)
  num_nodes = times.shape[0] + (1 if final == "zero" else 0)
  num_steps = num_nodes - 1
  if num_steps < 1:
    raise ValueError(f"num_steps={num_steps}: a grid needs at least 2 times (or 1 time with final='zero')")
  capacity = default_capacity(num_nodes) if capacity is None else int(capacity)
  if capacity < num_nodes:
    raise ValueError(f"capacity={capacity} is smaller than the {num_nodes} nodes of this grid")
  dtype = schedules_lib.table_dtype()
  n_times = times.shape[0]
  index = jnp.arange(capacity)
  # Pad on the host when the times are concrete, so every grid of one capacity reuses the same kernels.
  pad = (np.pad if _is_concrete(times) else jnp.pad)(times, (0, capacity - n_times), mode="edge")
  t_padded = jnp.asarray(pad, dtype)
  lam = schedule.lam(t_padded)
  alpha, sigma = jnp.exp(schedule.log_alpha(t_padded)), jnp.exp(schedule.log_sigma(t_padded))
  if final == "zero":
    is_zero = index >= n_times
    zero_t = schedule.zero_sigma_t if schedule.zero_sigma_t is not None else times[-1]
    t_padded = jnp.where(is_zero, jnp.asarray(zero_t, dtype), t_padded)
    lam = jnp.where(is_zero, jnp.inf, lam)
    alpha = jnp.where(is_zero, 1.0, alpha)
    sigma = jnp.where(is_zero, 0.0, sigma)
  return Grid(t=t_padded, alpha=alpha, sigma=sigma, lam=lam, num_steps=jnp.asarray(num_steps, jnp.int32))


def _endpoints(schedule, t_start, t_end):
  t_start = schedule.t_max if t_start is None else t_start
  t_end = schedule.t_min if t_end is None else t_end
  return float(t_start), float(t_end)


def _num_times(num_steps, final):
  _check_final(final)
  return _check_num_steps(num_steps) + (0 if final == "zero" else 1)


def _fractions(num_times):
  return np.linspace(0.0, 1.0, num_times) if num_times > 1 else np.zeros(1)


def uniform_t(schedule, num_steps, *, t_start=None, t_end=None, final="t_end", capacity=None):
  """Times uniform in t from t_start (default t_max) to t_end (default t_min)."""
  t_start, t_end = _endpoints(schedule, t_start, t_end)
  u = _fractions(_num_times(num_steps, final))
  return from_times(schedule, t_start + (t_end - t_start) * u, final=final, capacity=capacity)


def quadratic_t(schedule, num_steps, *, t_start=None, t_end=None, final="t_end", capacity=None):
  """Times uniform in sqrt(t) (DPM-Solver ``time_quadratic``; DDIM's ``quad`` in continuous time)."""
  t_start, t_end = _endpoints(schedule, t_start, t_end)
  u = _fractions(_num_times(num_steps, final))
  return from_times(schedule, (np.sqrt(t_start) + (np.sqrt(t_end) - np.sqrt(t_start)) * u) ** 2,
                    final=final, capacity=capacity)


def _times_of_lambda(schedule, lam, capacity):
  """t(lambda) on the host; evaluated on an array padded to ``capacity`` so that every step count of one
  capacity reuses the same compiled kernels."""
  lam = np.asarray(lam, np.float64)
  padded = np.pad(lam, (0, max(capacity - lam.size, 0)), mode="edge")
  t = schedule.t_of_lambda(jnp.asarray(padded, schedules_lib.table_dtype()))
  return np.array(t, np.float64)[: lam.size]


def _capacity(num_times, final, capacity):
  return default_capacity(num_times + (1 if final == "zero" else 0)) if capacity is None else int(capacity)


def uniform_logsnr(schedule, num_steps, *, t_start=None, t_end=None, final="t_end", capacity=None):
  """Times uniform in lambda (DPM-Solver ``logSNR``, DEIS ``log``; the recommended low-NFE grid)."""
  t_start, t_end = _endpoints(schedule, t_start, t_end)
  lam_start, lam_end = (float(schedule.lam(jnp.asarray(v, schedules_lib.table_dtype()))) for v in (t_start, t_end))
  if not (np.isfinite(lam_start) and np.isfinite(lam_end)):
    raise ValueError(f"uniform_logsnr needs finite lambda at both ends; lambda({t_start})={lam_start}, "
                     f"lambda({t_end})={lam_end}: move t_start / t_end inside the schedule")
  u = _fractions(_num_times(num_steps, final))
  times = _times_of_lambda(schedule, lam_start + (lam_end - lam_start) * u, _capacity(u.size, final, capacity))
  # Exact endpoints despite round-off in t(lambda). A single time (one step with final='zero') is t_start.
  times[0] = t_start
  if times.size > 1:
    times[-1] = t_end
  return from_times(schedule, times, final=final, capacity=capacity)


def karras(schedule, num_steps, *, sigma_min=None, sigma_max=None, rho=7.0, final="t_end", capacity=None):
  """Karras et al. 2022, Eq. 5, in the EDM sigma rho = sigma / alpha:
  rho_i = (rho_max^(1/r) + i / (n - 1) (rho_min^(1/r) - rho_max^(1/r)))^r, mapped to t by lambda = -log rho.
  ``sigma_min`` / ``sigma_max`` default to rho at the schedule's t_min / t_max.
  """
  dtype = schedules_lib.table_dtype()
  lo = float(schedule.rho(jnp.asarray(schedule.t_min, dtype))) if sigma_min is None else float(sigma_min)
  hi = float(schedule.rho(jnp.asarray(schedule.t_max, dtype))) if sigma_max is None else float(sigma_max)
  if not 0 < lo < hi or not np.isfinite(hi):
    raise ValueError(f"karras needs 0 < sigma_min < sigma_max < inf, got sigma_min={lo}, sigma_max={hi}")
  if rho <= 0:
    raise ValueError(f"rho={rho!r} must be positive")
  u = _fractions(_num_times(num_steps, final))
  rhos = (hi ** (1 / rho) + u * (lo ** (1 / rho) - hi ** (1 / rho))) ** rho
  times = _times_of_lambda(schedule, -np.log(rhos), _capacity(u.size, final, capacity))
  if sigma_max is None:
    times[0] = schedule.t_max
  if sigma_min is None and times.size > 1:  # a single time (one step with final='zero') is the start
    times[-1] = schedule.t_min
  return from_times(schedule, times, final=final, capacity=capacity)


def edm(schedule, num_steps, *, sigma_min=0.002, sigma_max=80.0, rho=7.0, final="zero", capacity=None):
  """The EDM sampler's grid (Karras et al. 2022, Table 1): Karras rho = 7 on [0.002, 80], then sigma = 0.

  The bounds are clipped to the schedule's range of rho.
  """
  dtype = schedules_lib.table_dtype()
  lo = max(sigma_min, float(schedule.rho(jnp.asarray(schedule.t_min, dtype))))
  hi = min(sigma_max, float(schedule.rho(jnp.asarray(schedule.t_max, dtype))))
  return karras(schedule, num_steps, sigma_min=lo, sigma_max=hi, rho=rho, final=final, capacity=capacity)


SPACINGS = ("linspace", "leading", "trailing")
SPACING_FAMILIES = ("dpm", "ddim")


def diffusers_timesteps(num_train_timesteps, num_steps, spacing="linspace", family="dpm", steps_offset=0):
  """The integer model timesteps of diffusers' discrete schedulers, descending (diffusers 0.3x ``set_timesteps``).

  ``family='dpm'`` (DPMSolver*, UniPC, DEIS): linspace = round(linspace(0, T-1, n+1))[::-1][:-1];
  leading = (arange(n+1) * (T // (n+1)))[::-1][:-1] + offset. ``family='ddim'`` (DDIM, PNDM):
  linspace = round(linspace(0, T-1, n))[::-1]; leading = (arange(n) * (T // n))[::-1] + offset.
  trailing (both) = round(arange(T, 0, -T / n)) - 1. These solvers then append a final point
  (sigma = 0 or the first training step): pass the result to ``from_times`` with the matching ``final``.
  """
  n = _check_num_steps(num_steps)
  big_t = int(num_train_timesteps)
  if spacing not in SPACINGS:
    raise ValueError(f"spacing={spacing!r} is unknown; valid: {', '.join(SPACINGS)}")
  if family not in SPACING_FAMILIES:
    raise ValueError(f"family={family!r} is unknown; valid: {', '.join(SPACING_FAMILIES)}")
  if n > big_t:
    raise ValueError(f"num_steps={n} exceeds num_train_timesteps={big_t}")
  if n == big_t and family == "dpm" and spacing != "trailing":
    # n + 1 points on the T integers 0..T-1: timesteps would repeat (leading: all zero).
    raise ValueError(f"num_steps={n} with family='dpm' and spacing={spacing!r} needs num_steps < "
                     f"num_train_timesteps={big_t}")
  if spacing == "trailing":
    # arange(T, 0, -T/n) has n + 1 entries for some n (T=1000: n=61, 103, ...) through round-off, the last
    # one ~1e-13 -> timestep -1; diffusers' first n entries are these, so keep exactly n.
    steps = (np.round(np.arange(big_t, 0, -big_t / n)) - 1)[:n]
  elif family == "dpm" and spacing == "linspace":
    steps = np.round(np.linspace(0, big_t - 1, n + 1))[::-1][:-1]
  elif family == "dpm":
    steps = (np.arange(n + 1) * (big_t // (n + 1)))[::-1][:-1] + steps_offset
  elif spacing == "linspace":
    steps = np.round(np.linspace(0, big_t - 1, n))[::-1]
  else:
    steps = (np.arange(n) * (big_t // n))[::-1] + steps_offset
  return steps.astype(np.int64)


GRIDS = {
    "uniform_t": uniform_t,
    "quadratic_t": quadratic_t,
    "logsnr": uniform_logsnr,
    "karras": karras,
    "edm": edm,
}


def make(name, schedule, num_steps, **kwargs):
  """Builds a grid by name; an unknown name raises a ValueError listing the valid ones."""
  if name not in GRIDS:
    raise ValueError(f"grid {name!r} is unknown; valid: {', '.join(sorted(GRIDS))}")
  return GRIDS[name](schedule, num_steps, **kwargs)

"""Time-shift sampling against exposure bias (Li, Qu, Yao, Sun & Moens 2024, "Alleviating Exposure Bias in
Diffusion Models through Sampling with Shifted Time Steps", ICLR, arXiv 2305.15583, Sec. 4 and Algorithm 1-2;
TS-DDIM / TS-DPM).

At step i (not the first, and only while t_i > ``cutoff``) the model is evaluated at the time t_s whose noise level
matches the sample's variance instead of at the scheduled t_i (Sec. 4.2, variance matching):
  t_s = argmin_{tau in window(t_i)} (s^2 - (alpha_tau^2 v + sigma_tau^2))^2,
  s^2 = the unbiased variance of each sample over all its entries (a time per sample, no extra model call),
where v = ``data_variance`` (0, the official rule: s^2 against 1 - alpha_bar_tau = sigma_tau^2 of a VP schedule).
The window is measured in steps: ``candidates`` times evenly spaced in t_i +- ``window`` |t_i - t_{i+1}|, clipped
to the schedule's range; the choice is an argmin over that row of the table and a gather, not a branch.

The official integrations differ (spec section 4). This one follows TS-DPM's DEIS integration: only the model call
moves to t_s (its output converted to the prediction the solver needs at t_s, as TS-DDIM reads x0 with
alpha_bar_{t_s}); the integrator's coefficients and history stay on the scheduled nodes, so any table-driven
solver that calls the model once per step at its node can be wrapped unchanged. Not implemented: the DDIM / PNDM
and ADM variants that move the step's target to t_s and the DPM-Solver variant that relabels target and history:
each moves the sample's assigned noise level by O(window h) per step, O(1) in total, so the sampler would not
converge to the ODE solution as the steps shrink. Here the label moves by O(window h), an O(h^2) local error, so
a shifted sampler converges with order 1.

x is (batch, ...): each sample gets its own time, the model call is mapped over the batch (still one NFE).
"""
import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from solvers import base
from solvers.ddim import DDIM
from solvers.dpm_solver_multistep import DPMSolverMultistep
from solvers.pytree import pytree_dataclass
from solvers.unipc import UniPC

WRAPPABLE = (DDIM, DPMSolverMultistep, UniPC)


@pytree_dataclass
class _AtShiftedTime:
  """``inner`` evaluated at the per-sample times ``t`` (batch,) whatever time the solver asks for: one batched
  call, mapped over the samples so that the model sees a scalar time as always."""
  inner: Any
  t: jnp.ndarray

  def predict(self, kind, x, t, schedule):
    return jax.vmap(lambda x1, t1: self.inner.predict(kind, x1[None], t1, schedule)[0])(x, self.t)


@dataclasses.dataclass(frozen=True)
class TimeShift(base.Solver):
  """Time-shift sampling (Li et al. 2024, Algorithms 1-2): ``inner`` with the model evaluated at variance-matched
  times (module docstring)."""
  inner: Any = DDIM()
  window: float = 0.2
  cutoff: float = 0.3
  candidates: int = 9
  data_variance: float = 0.0

  def __post_init__(self):
    if not isinstance(self.inner, WRAPPABLE):
      raise ValueError(f"inner={self.inner!r} is not supported; valid: {', '.join(c.__name__ for c in WRAPPABLE)}")
    if not self.window >= 0:
      raise ValueError(f"window={self.window!r} must be >= 0 (a fraction of the step)")
    if isinstance(self.candidates, bool) or not isinstance(self.candidates, int) or self.candidates < 2:
      raise ValueError(f"candidates={self.candidates!r} must be an integer >= 2")
    if not self.data_variance >= 0:
      raise ValueError(f"data_variance={self.data_variance!r} must be >= 0")

  @property
  def order(self):
    """The wrapped solver's order."""
    return self.inner.order

  @property
  def stochastic(self):
    """Whether the wrapped solver draws noise."""
    return self.inner.stochastic

  @property
  def declared_order(self):
    """The wrapped solver's without a window; otherwise 1: the label moves by O(window h) per step."""
    return self.inner.declared_order if self.window == 0 else 1

  @property
  def superconverges_on_linear_problems(self):
    """The wrapped solver's, without a window (``base.Solver``)."""
    return self.inner.superconverges_on_linear_problems and self.window == 0

  def for_order_measurement(self):
    """This wrapper around the wrapped solver's order-measurement configuration."""
    return dataclasses.replace(self, inner=self.inner.for_order_measurement())

  def init(self, denoiser, schedule, grid, x, key):
    """The wrapped solver's state."""
    return self.inner.init(denoiser, schedule, grid, x, key)

  def candidate_times(self, grid, schedule):
    """(capacity - 1, candidates) times the model may be evaluated at in each step (all t_i where none shifts)."""
    t_now, t_next = grid.t[:-1], grid.t[1:]
    offsets = jnp.linspace(-1.0, 1.0, self.candidates, dtype=grid.t.dtype) * self.window
    times = jnp.clip(t_now[:, None] + offsets * (t_now - t_next)[:, None], schedule.t_min, schedule.t_max)
    shifts = (jnp.arange(t_now.shape[0]) >= 1) & (t_now > self.cutoff)
    return jnp.where(shifts[:, None], times, t_now[:, None])

  def coefficients(self, grid, schedule):
    """The wrapped solver's table, the candidate times per step and the marginal variance at each."""
    times = self.candidate_times(grid, schedule)
    variance = schedule.alpha(times) ** 2 * self.data_variance + schedule.sigma(times) ** 2
    return {"inner": self.inner.coefficients(grid, schedule), "times": times, "variance": variance}

  def step(self, denoiser, schedule, grid, coeffs, i, state):
    """The wrapped step with the model evaluated at each sample's variance-matched time: one model call."""
    if self.window == 0:
      return self.inner.step(denoiser, schedule, grid, coeffs["inner"], i, state)
    x = state.x
    flat = x.reshape(x.shape[0], -1).astype(base.compute_dtype(x))
    sample_variance = jnp.var(flat, axis=1, ddof=1)
    choice = jnp.argmin((sample_variance[:, None] - coeffs["variance"][None, :]) ** 2, axis=1)
    shifted = _AtShiftedTime(inner=denoiser, t=coeffs["times"][choice])
    return self.inner.step(shifted, schedule, grid, coeffs["inner"], i, state)


base.register("ts_ddim", TimeShift)
base.register("ts_dpm_solver_pp_2m", lambda: TimeShift(inner=DPMSolverMultistep(order=2)))

"""Adaptive step-size DPM-Solver-12 and DPM-Solver-23 (noise or data prediction), in the one sampling loop.

Lu et al. 2022, "DPM-Solver" (NeurIPS), Sec. 3.3 and Algorithm 4 (App. C): each attempt from lambda_s with
step h (in lambda) computes a lower- and a higher-order singlestep solution x_l, x_h at lambda_s + h,
sharing model evaluations:
- order 2 (DPM-Solver-12): x_l = DPM-Solver-1, x_h = DPM-Solver-2 with r1 = 1/2: 2 model calls;
- order 3 (DPM-Solver-23): x_l = DPM-Solver-2 with r1 = 1/3, x_h = DPM-Solver-3 with (r1, r2) = (1/3, 2/3):
  3 model calls
(the stage formulas of ``dpm_solver_singlestep``, with its ``solver_type`` for the second- and third-order
updates). With delta = max(atol, rtol max(|x_l|, |x_prev|)) elementwise (x_prev: x_l of the last accepted
step, x_T at first) the error is E = max over the batch (axis 0) of the RMS of (x_h - x_l) / delta, so every
sample of one ``x`` shares the step sizes (the paper's batch-max). E <= 1 accepts: x <- x_h,
x_prev <- x_l, lambda_s <- lambda_s + h. Accepted or not, h <- min(theta h E^(-1/order), lambda_end - lambda_s),
and the attempt's model calls count in the NFE (rejected attempts too, as in the paper). The run ends when
|t_s - t_end| <= t_err. Defaults are the official ones (rtol 0.05, atol 0.0078, h_init 0.05, theta 0.9,
t_err 1e-5); the official first attempt is not clipped to the end, here it is.

The grid gives only the start (node 0) and the end (node num_steps); its other nodes are ignored. If the
last node has sigma = 0 (``final='zero'``), the adaptive part ends at node num_steps - 1 and one more
iteration jumps to sigma = 0 with the first-order data-prediction step x = alpha_end x0(x_s) (the official
``denoise_to_zero``); that iteration still makes ``order`` model calls of which it uses the first (all
count in the NFE). The start needs a finite lambda (alpha > 0).

How it runs in the one loop (solvers.loop): ``num_iterations`` is the static budget ``max_attempts``, and
``active`` is "not finished yet", so the loop skips the rest of the budget without model calls. Each
iteration is one attempt with a fixed number of model calls; accept / reject is ``jnp.where``, not a branch.
The state keeps lambda_s, t_s, the next h, x_prev and the finished flag. If the budget runs out before
t_end, the result is NaN (raise ``max_attempts`` or loosen the tolerances) rather than a silently unfinished
sample. The solver is deterministic (``stochastic = False``). Under ``jax.vmap`` every mapped instance gets
its own step sizes (the batch-max is then over the instance's own axis 0), and the loop's skip becomes a
select, so each instance costs ``max_attempts`` attempts of compute (the NFE still counts only real
attempts); pass a batch as one ``x`` to share the step sizes instead.
"""
import dataclasses
from typing import Any, NamedTuple

import jax.numpy as jnp

from solvers import base
from solvers import dpm_solver_singlestep as singlestep

PREDICTIONS = singlestep.PREDICTIONS
SOLVER_TYPES = singlestep.SOLVER_TYPES


class AdaptiveState(NamedTuple):
  """The adaptive solver's state: the accepted point, the step-size controller's memory and the finished flag."""
  x: jnp.ndarray        # the solution at t
  x_prev: jnp.ndarray   # the lower-order solution of the last accepted step (x_T at first)
  lam: jnp.ndarray      # lambda at t (scalar, the compute dtype)
  t: jnp.ndarray
  h: jnp.ndarray        # the size (> 0) of the next attempt, in lambda
  done: jnp.ndarray     # bool: t_end (and sigma = 0 after ``final='zero'``) reached
  nfe: jnp.ndarray
  key: Any


def _end_node(grid):
  """(index of the last node the adaptive part reaches, whether a jump to sigma = 0 follows)."""
  n = grid.num_steps
  zero = grid.sigma[n] == 0
  return jnp.where(zero, n - 1, n), zero


def error_norm(x_high, x_low, x_prev, rtol, atol):
  """E = max over axis 0 of RMS((x_high - x_low) / delta), delta = max(atol, rtol max(|x_low|, |x_prev|))."""
  delta = jnp.maximum(atol, rtol * jnp.maximum(jnp.abs(x_low), jnp.abs(x_prev)))
  ratio = ((x_high - x_low) / delta).reshape(x_high.shape[:1] + (-1,) if x_high.ndim else (1, -1))
  mean_square = jnp.max(jnp.mean(ratio**2, axis=1))
  # Floor before the square root: E = 0 (an exact step) would give an infinite derivative and an infinite h.
  return jnp.sqrt(jnp.maximum(mean_square, jnp.finfo(mean_square.dtype).tiny))


@dataclasses.dataclass(frozen=True)
class DPMSolverAdaptive(base.Solver):
  """DPM-Solver-12 (``order=2``) / -23 (``order=3``) with the step-size control of Lu et al. 2022a (module docstring);
  ``prediction`` 'noise' (DPM-Solver) or 'data' (DPM-Solver++), tolerances ``rtol`` / ``atol``, first step ``h_init``
  (in lambda), safety factor ``theta``, end tolerance ``t_err``, and the static budget ``max_attempts``."""
  order: int = 3
  prediction: str = "noise"
  solver_type: str = "midpoint"
  rtol: float = 0.05
  atol: float = 0.0078
  h_init: float = 0.05
  theta: float = 0.9
  t_err: float = 1e-5
  max_attempts: int = 500
  adaptive = True

  def __post_init__(self):
    if self.order not in (2, 3):
      raise ValueError(f"order={self.order!r} is not supported; valid: 2 (DPM-Solver-12), 3 (DPM-Solver-23)")
    for name, valid in (("prediction", PREDICTIONS), ("solver_type", SOLVER_TYPES)):
      if getattr(self, name) not in valid:
        raise ValueError(f"{name}={getattr(self, name)!r} is unknown; valid: {', '.join(valid)}")
    if not (self.rtol >= 0 and self.atol >= 0 and self.rtol + self.atol > 0):
      raise ValueError(f"rtol={self.rtol!r}, atol={self.atol!r}: both must be >= 0 and one of them > 0")
    if not self.h_init > 0:
      raise ValueError(f"h_init={self.h_init!r} must be > 0 (a step in lambda)")
    if not 0 < self.theta <= 1:
      raise ValueError(f"theta={self.theta!r} must lie in (0, 1]")
    if not self.t_err >= 0:
      raise ValueError(f"t_err={self.t_err!r} must be >= 0")
    if isinstance(self.max_attempts, bool) or not isinstance(self.max_attempts, int) or self.max_attempts < 1:
      raise ValueError(f"max_attempts={self.max_attempts!r} must be an integer >= 1")

  def num_iterations(self, grid):
    return self.max_attempts

  def active(self, grid, i, state):
    return jnp.logical_not(state.done)

  def coefficients(self, grid, schedule):
    """No table: the step sizes are chosen on the fly."""
    return {}  # nothing depends on the grid alone: the step sizes are chosen on the fly

  def init(self, denoiser, schedule, grid, x, key):
    """The state at the grid's first node with the first attempt's step ``h_init``."""
    dtype = base.compute_dtype(x)
    return AdaptiveState(x=x, x_prev=x, lam=grid.lam[0].astype(dtype), t=grid.t[0].astype(dtype),
                         h=jnp.asarray(self.h_init, dtype), done=jnp.zeros((), bool),
                         nfe=jnp.zeros((), jnp.int32), key=key)

  def _update(self, schedule, x, lam_s, a_s, s_s, lam_to, k, stage, hh, ms, r1, r2):
    """The singlestep stage of (k, stage) from (x, lam_s) to lam_to, hh = lam_to - lam_s."""
    a_t, s_t = (v.astype(x.dtype) for v in schedule.alpha_sigma_of_lambda(lam_to))
    w = singlestep.stage_weights(k, stage, self.solver_type, *singlestep.phi_weights(self.prediction, hh), r1, r2)
    w = w.astype(x.dtype)
    combo = sum(w[j] * m for j, m in enumerate(ms))
    if self.prediction == "data":
      return (s_t / s_s) * x + a_t * combo
    return (a_t / a_s) * x - s_t * combo

  def step(self, denoiser, schedule, grid, coeffs, i, state):
    """One attempt: the lower- and higher-order solutions, the error norm, accept or reject, the next h
    (``order`` model calls, counted whether accepted or not)."""
    dtype = base.compute_dtype(state.x)
    kind = "x0" if self.prediction == "data" else "eps"
    end, zero = _end_node(grid)
    lam_end, t_end = grid.lam[end].astype(dtype), grid.t[end].astype(dtype)
    direction = jnp.sign(lam_end - grid.lam[0].astype(dtype))
    jump = zero & (jnp.abs(state.t - t_end) <= self.t_err)
    remaining = jnp.abs(lam_end - state.lam)
    h = jnp.where(jump, 0.0, jnp.minimum(state.h, remaining))
    full = h >= remaining
    lam_t = jnp.where(full, lam_end, state.lam + direction * h)
    t_t = jnp.where(full, t_end, schedule.t_of_lambda(lam_t).astype(dtype))
    hh = lam_t - state.lam

    x = state.x.astype(dtype)
    a_s, s_s = (v.astype(dtype) for v in schedule.alpha_sigma_of_lambda(state.lam))

    def model(u, lam_u):
      t_u = schedule.t_of_lambda(lam_u).astype(dtype)
      return denoiser.predict(kind, u.astype(state.x.dtype), t_u, schedule).astype(dtype)

    update = lambda lam_to, k, stage, ms, r1, r2: self._update(
        schedule, x, state.lam, a_s, s_s, lam_to, k, stage, lam_to - state.lam, ms, r1, r2)
    m_s = denoiser.predict(kind, state.x, state.t, schedule).astype(dtype)
    if self.order == 2:
      r1, r2 = 0.5, 1.0
      lam_1 = state.lam + r1 * hh
      m_1 = model(update(lam_1, 2, 0, [m_s], r1, r2), lam_1)
      x_low = update(lam_t, 1, 0, [m_s], r1, r2)
      x_high = update(lam_t, 2, 1, [m_s, m_1], r1, r2)
    else:
      r1, r2 = 1.0 / 3.0, 2.0 / 3.0
      lam_1, lam_2 = state.lam + r1 * hh, state.lam + r2 * hh
      m_1 = model(update(lam_1, 3, 0, [m_s], r1, r2), lam_1)
      x_low = update(lam_t, 2, 1, [m_s, m_1], r1, 1.0)
      m_2 = model(update(lam_2, 3, 1, [m_s, m_1], r1, r2), lam_2)
      x_high = update(lam_t, 3, 2, [m_s, m_1, m_2], r1, r2)

    err = error_norm(x_high, x_low, state.x_prev.astype(dtype), self.rtol, self.atol)
    accept = (err <= 1.0) & jnp.logical_not(jump)
    lam_new = jnp.where(accept, lam_t, state.lam)
    t_new = jnp.where(accept, t_t, state.t)
    h_new = jnp.minimum(self.theta * h * err ** (-1.0 / self.order), jnp.abs(lam_end - lam_new))
    x0 = m_s if self.prediction == "data" else (x - s_s * m_s) / a_s
    x_new = jnp.where(jump, grid.alpha[grid.num_steps].astype(dtype) * x0, jnp.where(accept, x_high, x))
    done = jump | (jnp.logical_not(zero) & (jnp.abs(t_new - t_end) <= self.t_err))
    # Out of budget before the end: NaN, not a silently unfinished sample.
    x_new = jnp.where(jnp.logical_not(done) & (i >= self.max_attempts - 1), jnp.nan, x_new)
    return state._replace(x=x_new.astype(state.x.dtype),
                          x_prev=jnp.where(accept, x_low, state.x_prev).astype(state.x_prev.dtype),
                          lam=lam_new, t=t_new, h=jnp.where(jump, state.h, h_new).astype(dtype), done=done,
                          nfe=state.nfe + self.order)


base.register("dpm_solver_12", lambda: DPMSolverAdaptive(order=2))
base.register("dpm_solver_23", lambda: DPMSolverAdaptive(order=3))
base.register("dpm_solver_pp_12", lambda: DPMSolverAdaptive(order=2, prediction="data"))
base.register("dpm_solver_pp_23", lambda: DPMSolverAdaptive(order=3, prediction="data"))

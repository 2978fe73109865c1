"""Shared machinery of the exponential integrators: phi-function weights and the linear-multistep state.

Variation of constants (Lu et al. 2022, Eq. 3.4 and DPM-Solver++ Eq. 8), with h = lambda_t - lambda_s:
  noise form: x_t = (alpha_t / alpha_s) x_s - sigma_t int_0^h e^{h - tau} eps(lambda_s + tau) dtau
  data form:  x_t = (sigma_t / sigma_s) x_s + alpha_t int_0^h e^{-(h - tau)} x0(lambda_s + tau) dtau
and int_0^h e^{+-(h - tau)} tau^k / k! dtau = h^{k+1} phi_{k+1}(+-h). The dimensionless weights are
  data:  a_k(h) = h phi_k(-h)   (a1 = 1 - e^{-h}, a2 = 1 - a1 / h, a3 = 1/2 - a2 / h)
  noise: b_k(h) = h phi_k(h)    (b1 = e^h - 1,    b2 = b1 / h - 1, b3 = b2 / h - 1/2)
The recursions cancel catastrophically for small h (a3 loses ~2 log10(1/h) digits), so below
|h| = 0.1 a Taylor series is used; a_k(+inf) = 1 / (k-1)! (a step to sigma = 0) is exact.

Every multistep / singlestep exponential integrator here is a table-driven linear combination:
after evaluating the model at the current point and pushing the output on a history buffer (newest
first), the next point is  x' = c_anchor * anchor + sum_k c_hist[k] * hist[k]  and the anchor (the start
of the current step or stage group) moves to x' where ``c_end`` = 1. Warm-up, per-step order and the
lower-order final steps are rows of the table, not branches in the loop.
"""
import math
from typing import Any, NamedTuple

import jax.numpy as jnp

from solvers import base, predictions

# Below |h| = 1 the phi_k come from their Taylor series (20 terms: the first dropped one is < 1 / 20! = 4e-19);
# the closed-form recurrence cancels there (phi_4 at h = 0.2 lost 3e-13 in float64 and 2.5e-4 in float32).
_SERIES_BELOW = 1.0
_SERIES_TERMS = 20


def _series(k, z):
  """phi_k(z) = sum_n z^n / (n + k)! for small |z|."""
  return sum(z**n / float(math.factorial(n + k)) for n in range(_SERIES_TERMS))  # a float: 13! overflows int32 without x64


def data_weight(k, h):
  """a_k(h) = h phi_k(-h), exact at h = +inf (1 / (k-1)!) and accurate for small h."""
  small = jnp.abs(h) < _SERIES_BELOW
  safe = jnp.where(small | jnp.isinf(h), 1.0, h)
  a = -jnp.expm1(-safe)
  for j in range(2, k + 1):
    a = 1.0 / math.factorial(j - 1) - a / safe
  large = jnp.where(jnp.isinf(h), 1.0 / math.factorial(k - 1), a)
  return jnp.where(small, h * _series(k, -jnp.where(small, h, 0.0)), large)


def noise_weight(k, h):
  """b_k(h) = h phi_k(h), accurate for small h (infinite at h = +inf: callers handle sigma_t = 0)."""
  small = jnp.abs(h) < _SERIES_BELOW
  safe = jnp.where(small, 1.0, h)
  b = jnp.expm1(safe)
  for j in range(2, k + 1):
    b = b / safe - 1.0 / math.factorial(j - 1)
  return jnp.where(small, h * _series(k, jnp.where(small, h, 0.0)), b)


class MultistepState(NamedTuple):
  """The state of the table-driven multistep / singlestep solvers (module docstring)."""
  x: jnp.ndarray       # the current point (where the model is evaluated next)
  anchor: jnp.ndarray  # the point the current step / stage group starts from
  hist: jnp.ndarray    # (history, *x.shape) model outputs, newest first
  nfe: jnp.ndarray
  key: Any


def init_state(x, history, key):
  """A ``MultistepState`` at x with an empty (zero) buffer of ``history`` model outputs."""
  return MultistepState(x=x, anchor=x, hist=jnp.zeros((history,) + x.shape, x.dtype),
                        nfe=jnp.zeros((), jnp.int32), key=key)


def table_step(denoiser, schedule, grid, kind, coeffs, i, state):
  """One table-driven step: evaluate ``kind`` at node i, push it, combine, move the anchor."""
  c = base.cast_coefficients(coeffs, state.x)
  m = denoiser.predict(kind, state.x, grid.t[i], schedule)
  hist = jnp.concatenate([m[None], state.hist[:-1]])
  x = c["anchor"] * state.anchor
  for k in range(hist.shape[0]):
    x = x + c["hist"][k] * hist[k]
  x = x.astype(state.x.dtype)
  anchor = jnp.where(c["end"] > 0, x, state.anchor)
  return state._replace(x=x, anchor=anchor, hist=hist, nfe=state.nfe + 1)


def prediction_table_step(solver, denoiser, schedule, grid, coeffs, i, state):
  """``table_step`` on the solver's ``prediction`` ('data': x0, 'noise': eps), through dynamic thresholding
  when the solver's ``thresholding`` option is on (x0 is thresholded; eps is converted from it)."""
  if solver.thresholding:
    denoiser = predictions.Thresholded(inner=denoiser, ratio=solver.threshold_ratio, max_val=solver.threshold_max_val,
                                       semantics=solver.threshold_semantics)
  kind = "x0" if solver.prediction == "data" else "eps"
  return table_step(denoiser, schedule, grid, kind, coeffs, i, state)


def first_order_rows(grid, data):
  """(anchor weight, weight of m_s, c_t) of the first-order (DDIM) step between consecutive nodes."""
  return first_order_weights(grid.alpha[:-1], grid.sigma[:-1], grid.alpha[1:], grid.sigma[1:], step_sizes(grid), data)


def first_order_weights(a_s, s_s, a_t, s_t, h, data):
  """(anchor weight, weight of m_s, c_t) of the first-order (DDIM) map from (a_s, s_s) to (a_t, s_t), h = lambda_t - lambda_s.

  data: x_t = (sigma_t / sigma_s) x_s + alpha_t a1(h) x0_s, c_t = alpha_t; noise: x_t = (alpha_t / alpha_s) x_s
  - sigma_t expm1(h) eps_s, c_t = sigma_t, with the finite limit -alpha_t sigma_s / alpha_s at sigma_t = 0.
  """
  if data:
    return s_t / s_s, a_t * data_weight(1, h), a_t
  finite = s_t > 0
  m = jnp.where(finite, -s_t * noise_weight(1, jnp.where(finite, h, 0.0)), -a_t * s_s / a_s)
  return a_t / a_s, m, s_t


def _det(m):
  """Determinant of a batch of 1x1, 2x2 or 3x3 matrices (last two axes), written out."""
  n = m.shape[-1]
  if n == 1:
    return m[..., 0, 0]
  if n == 2:
    return m[..., 0, 0] * m[..., 1, 1] - m[..., 0, 1] * m[..., 1, 0]
  return sum(m[..., 0, k] * _det(jnp.delete(jnp.delete(m, 0, axis=-2), k, axis=-1)) * (-1.0) ** k for k in range(3))


def solve_small(matrix, rhs):
  """Solves the batched n x n systems matrix @ x = rhs (n <= 3, rhs (..., n)) by Cramer's rule.

  The order conditions of the multistep methods are such tiny Vandermonde systems; written out they
  compile in milliseconds, where jnp.linalg.solve's LU costs seconds per shape (eagerly, under
  jax.disable_jit, too)."""
  n = matrix.shape[-1]
  if n > 3:
    raise ValueError(f"solve_small handles n <= 3, got n={n}")
  det = _det(matrix)
  return jnp.stack([_det(matrix.at[..., :, k].set(rhs)) / det for k in range(n)], -1)


def step_sizes(grid):
  """h_i = lambda_{i+1} - lambda_i for the capacity - 1 steps of the grid (padding gives 0 or nan)."""
  return grid.lam[1:] - grid.lam[:-1]


def previous(values, k, fill):
  """values shifted k steps later along axis 0: row i holds values[i - k] (``fill`` before the start)."""
  pad = jnp.full((k,) + values.shape[1:], fill, values.dtype)
  return jnp.concatenate([pad, values[:-k]]) if k else values

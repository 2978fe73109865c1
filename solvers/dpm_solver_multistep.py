"""Multistep DPM-Solver (noise prediction) and DPM-Solver++ (data prediction), orders 1-3.

Lu et al. 2022b, "DPM-Solver++: Fast Solver for Guided Sampling of Diffusion Probabilistic Models",
Algorithm 2 (2M); 3M and the noise-prediction multistep DPM-Solver as the official code
(``algorithm_type`` 'dpmsolver++' / 'dpmsolver') and diffusers compute them (spec section 4.2). With
h = lambda_{i+1} - lambda_i, r0 = h_{i-1} / h, r1 = h_{i-2} / h, m the model output (x0 for ++, eps
otherwise), D1_0 = (m_i - m_{i-1}) / r0, D1_1 = (m_{i-1} - m_{i-2}) / r1:
  2M midpoint (official 'dpmsolver'):  x' = (sigma'/sigma) x + alpha' a1 (m_i + D1_0 / 2)
  2M heun     (official 'taylor'):     x' = (sigma'/sigma) x + alpha' (a1 m_i + a2 D1_0)
  3M: D1 = D1_0 + r0 / (r0 + r1) (D1_0 - D1_1), D2 = (D1_0 - D1_1) / (r0 + r1),
      x' = (sigma'/sigma) x + alpha' (a1 m_i + a2 D1 + c a3 D2)
(noise form: (alpha'/alpha) x - sigma' (b1 m_i + ...)). D2 approximates h^2 m'' / 2, whose exact weight is
2 a3: the official code and diffusers use c = 1 (``third_order='reference'``, the default, for parity),
which is not exact for quadratic m(lambda) and lets the order fall towards 2;
``third_order='exact'`` uses c = 2 (see docs and tests/test_dpm_solver.py for both measured orders).

Warm-up: step i uses order min(order, i + 1). ``lower_order_final``: when the run has fewer than
``lower_order_final_below`` steps (official 10, diffusers 15; None: always), step i uses at most
order num_steps - i. A step that ends at sigma = 0 (``final='zero'``) is always first order: h = inf
there, and higher orders would need 1 / r0 = inf (diffusers forces the same).
"""
import dataclasses
from typing import Optional

import jax.numpy as jnp

from solvers import base, exponential, predictions

PREDICTIONS = ("data", "noise")
SOLVER_TYPES = ("midpoint", "heun")
THIRD_ORDER = ("reference", "exact")


def multistep_orders(num_steps, length, order, lower_order_final, below, zero_target):
  """Per-step order: warm-up, optional lower-order final steps, first order into sigma = 0."""
  i = jnp.arange(length)
  orders = jnp.minimum(order, i + 1)
  if lower_order_final:
    active = True if below is None else num_steps < below
    orders = jnp.where(active, jnp.minimum(orders, jnp.maximum(num_steps - i, 1)), orders)
  return jnp.where(zero_target, 1, orders)


def difference_weights(h, order):
  """Hist weights (newest first) of D1_0, D1 and D2 for steps of size h (see module docstring)."""
  finite = jnp.isfinite(h) & (h != 0)
  safe_h = jnp.where(finite, h, 1.0)
  h_prev = exponential.previous(jnp.where(finite, h, 1.0), 1, 1.0)
  h_prev2 = exponential.previous(jnp.where(finite, h, 1.0), 2, 1.0)
  r0, r1 = h_prev / safe_h, h_prev2 / safe_h
  zero = jnp.zeros_like(h)
  d1_0 = jnp.stack([1 / r0, -1 / r0, zero], -1)
  d1_1 = jnp.stack([zero, 1 / r1, -1 / r1], -1)
  u = d1_0 - d1_1
  d1 = d1_0 + (r0 / (r0 + r1))[:, None] * u
  d2 = u / (r0 + r1)[:, None]
  return [w[:, :order] for w in (d1_0, d1, d2)]


class MultistepRules:
  """What multistep solvers with fields ``order``, ``lower_order_final`` and ``lower_order_final_below``
  share: the history buffer, the per-step orders and the order-measurement configuration."""

  def for_order_measurement(self):
    """This solver without lower-order final steps (``base.Solver.for_order_measurement``)."""
    return dataclasses.replace(self, lower_order_final=False)

  def init(self, denoiser, schedule, grid, x, key):
    """A ``MultistepState`` with room for ``order`` model outputs."""
    return exponential.init_state(x, self.order, key)

  def step_orders(self, grid):
    """The order of each step (warm-up, lower-order final steps, first order into sigma = 0)."""
    return multistep_orders(grid.num_steps, grid.capacity - 1, self.order, self.lower_order_final,
                            self.lower_order_final_below, grid.sigma[1:] == 0)


@dataclasses.dataclass(frozen=True)
class DPMSolverMultistep(MultistepRules, base.Solver):
  """Multistep DPM-Solver++ (``prediction='data'``; Lu et al. 2022b, Alg. 2 for 2M) and DPM-Solver (``'noise'``).

  ``order`` 1-3, ``solver_type`` 'midpoint' / 'heun', ``third_order`` 'reference' / 'exact' (module docstring),
  ``lower_order_final`` below ``lower_order_final_below`` steps (None: always), and dynamic thresholding of x0
  (``thresholding``, ``threshold_ratio``, ``threshold_max_val``, ``threshold_semantics``: ``predictions.dynamic_threshold``).
  """
  order: int = 2
  prediction: str = "data"
  solver_type: str = "midpoint"
  third_order: str = "reference"
  lower_order_final: bool = True
  lower_order_final_below: Optional[int] = 10
  thresholding: bool = False
  threshold_ratio: float = 0.995
  threshold_max_val: float = 1.0
  threshold_semantics: str = "imagen"

  def __post_init__(self):
    if self.order not in (1, 2, 3):
      raise ValueError(f"order={self.order!r} is not supported; valid: 1, 2, 3")
    base.check_options(self, (("prediction", PREDICTIONS), ("solver_type", SOLVER_TYPES), ("third_order", THIRD_ORDER),
                              ("threshold_semantics", predictions.THRESHOLD_SEMANTICS)))

  @property
  def declared_order(self):
    """The reference 3M converges with order 2 only (measured: tests/test_dpm_solver.py)."""
    return 2 if self.order == 3 and self.third_order == "reference" else self.order

  def coefficients(self, grid, schedule):
    """Table rows: anchor weight (sigma'/sigma or alpha'/alpha), history weights of each step's order, ``end`` = 1."""
    h = exponential.step_sizes(grid)
    a_s, a_t, s_s, s_t = grid.alpha[:-1], grid.alpha[1:], grid.sigma[:-1], grid.sigma[1:]
    orders = self.step_orders(grid)
    d1_0, d1, d2 = difference_weights(h, self.order)
    e0 = jnp.zeros_like(d1_0).at[:, 0].set(1.0)
    data = self.prediction == "data"
    w1, w2, w3 = ((exponential.data_weight if data else exponential.noise_weight)(k, h) for k in (1, 2, 3))
    c3 = 2.0 if self.third_order == "exact" else 1.0
    second = 0.5 * w1[:, None] * d1_0 if self.solver_type == "midpoint" else w2[:, None] * d1_0
    by_order = [w1[:, None] * e0, w1[:, None] * e0 + second,
                w1[:, None] * e0 + w2[:, None] * d1 + c3 * w3[:, None] * d2]
    weights = by_order[0]
    for k in range(2, self.order + 1):
      weights = jnp.where((orders >= k)[:, None], by_order[k - 1], weights)
    if data:
      return {"anchor": s_t / s_s, "hist": a_t[:, None] * weights, "end": jnp.ones_like(h)}
    # Noise form: at sigma_t = 0 (order 1) -sigma_t b1 has the finite limit -alpha_t sigma_s / alpha_s.
    hist = jnp.where((s_t > 0)[:, None], -s_t[:, None] * weights, (-a_t * s_s / a_s)[:, None] * e0)
    return {"anchor": a_t / a_s, "hist": hist, "end": jnp.ones_like(h)}

  def step(self, denoiser, schedule, grid, coeffs, i, state):
    """One multistep step: evaluate m_i (x0 or eps), push it, combine with the table row (one model call)."""
    return exponential.prediction_table_step(self, denoiser, schedule, grid, coeffs, i, state)


base.register("dpm_solver_pp_2m", lambda: DPMSolverMultistep(order=2))
base.register("dpm_solver_pp_3m", lambda: DPMSolverMultistep(order=3))
base.register("dpm_solver_pp_3m_exact", lambda: DPMSolverMultistep(order=3, third_order="exact"))
base.register("dpm_solver_2m", lambda: DPMSolverMultistep(order=2, prediction="noise"))
base.register("dpm_solver_3m", lambda: DPMSolverMultistep(order=3, prediction="noise"))

"""Second-order naive inversion: DPM-Solver++(2M) on the reversed grid (Lu et al. 2022, "DPM-Solver++",
Eq. 8 and Algorithm 2; the authors' advice for inversion is to run the solver on reversed time steps,
diffusers#3335, as diffusers' DPMSolverMultistepInverseScheduler does).

Runs on ``grids.reverse(grid)``: N steps through exactly the sampling grid's nodes. The step from node j
to node j + 1 (h = lambda_{j+1} - lambda_j < 0) evaluates D_j = x0_hat(x_j, t_j) at the current node and
extrapolates the data prediction linearly in lambda through D_{j-1}, integrated exactly:
  x_{j+1} = (sigma_{j+1} / sigma_j) x_j + alpha_{j+1} [a1(h) D_j + a2(h) (h / h_{j-1}) (D_j - D_{j-1})],
  a1 = 1 - e^{-h},  a2 = 1 - a1 / h                          (``exponential.data_weight``; diffusers' 2M 'heun')
The first step, and the step after a sigma = 0 node, has no usable history and is the first-order (DDIM)
step. A sigma = 0 first node (a grid with final='zero') is stepped from by DDIM inversion with the model
at the next node (``DDIMInversion``'s sampling alignment), since neither eps nor the data form is defined
there. Second order as an integrator of the reversed ODE (tests/test_inversion.py).

Why not the sampling alignment: evaluating at (x_j, t_{j+1}), as DDIM inversion does, perturbs every model
value by O(h), which caps any multistep inversion at first order (we measured slope 1.0 for that variant).
Like every naive inversion, the round trip is inexact.
"""
import dataclasses
from typing import Any, NamedTuple

import jax.numpy as jnp

from solvers import base, exponential


class InversionState(NamedTuple):
  """The inversion's state: the current point and the previous step's data prediction."""
  x: jnp.ndarray
  previous: jnp.ndarray  # the data prediction of the previous step
  nfe: jnp.ndarray
  key: Any


@dataclasses.dataclass(frozen=True)
class DPMSolverPPInversion(base.Solver):
  """DPM-Solver++(2M) inversion on a reversed grid; see the module docstring."""
  order = 2

  def init(self, denoiser, schedule, grid, x, key):
    """An ``InversionState`` at x (the data) with no history."""
    return InversionState(x=x, previous=jnp.zeros_like(x), nfe=jnp.zeros((), jnp.int32), key=key)

  def coefficients(self, grid, schedule):
    """Per step: the weights of x, of the new and of the previous data prediction, and the model's time."""
    a_s, s_s, a_t, s_t = grid.alpha[:-1], grid.sigma[:-1], grid.alpha[1:], grid.sigma[1:]
    h = exponential.step_sizes(grid)
    from_zero = s_s == 0
    has_history = (jnp.arange(h.shape[0]) > 0) & (exponential.previous(s_s, 1, 0.0) > 0)
    # From a sigma = 0 node: DDIM inversion x' = a x + b (x - alpha_t D) / sigma_t with D at t_{j+1}.
    a, b, _ = exponential.first_order_weights(a_s, s_s, a_t, s_t, h, data=False)
    safe_h = jnp.where(from_zero | (h == 0), -1.0, h)
    a1, a2 = exponential.data_weight(1, safe_h), exponential.data_weight(2, safe_h)
    ratio = jnp.where(has_history, safe_h / jnp.where(has_history, exponential.previous(safe_h, 1, 1.0), 1.0), 0.0)
    slope = a_t * a2 * ratio
    return {"x": jnp.where(from_zero, a + b / s_t, s_t / jnp.where(from_zero, 1.0, s_s)),
            "new": jnp.where(from_zero, -b * a_t / s_t, a_t * a1 + slope),
            "previous": jnp.where(from_zero, 0.0, -slope),
            "t": jnp.where(from_zero, grid.t[1:], grid.t[:-1])}

  def step(self, denoiser, schedule, grid, coeffs, i, state):
    """One DPM-Solver++(2M) step on the reversed grid: one model call."""
    c = base.cast_coefficients({k: coeffs[k] for k in ("x", "previous", "new")}, state.x)
    x0 = denoiser.predict("x0", state.x, coeffs["t"], schedule)
    x = c["x"] * state.x + c["previous"] * state.previous + c["new"] * x0
    return state._replace(x=x.astype(state.x.dtype), previous=x0, nfe=state.nfe + 1)

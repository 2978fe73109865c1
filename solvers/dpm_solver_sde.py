"""SDE-DPM-Solver++ (Lu et al. 2022b, "DPM-Solver++", its SDE variant), orders 1 and 2 (multistep, "2M").

The reverse diffusion SDE (Song et al. 2021, Eq. 6) written with the data prediction x0 and lambda =
log(alpha / sigma) has the linear part dx = (d log sigma - d lambda) x + ..., whose exact solution turns one
step from s to t, h = lambda_t - lambda_s, into (variation of constants, as DPM-Solver++ Eq. 8 for the ODE)
  x_t = (sigma_t / sigma_s) e^{-h} x_s + 2 alpha_t int_0^h e^{-2(h - tau)} x0(lambda_s + tau) dtau
        + sigma_t sqrt(1 - e^{-2h}) z,
the noise term being the exact Ornstein-Uhlenbeck increment. With x0 expanded as in the multistep ODE
solver (m_i the newest output, D1_0 = (m_i - m_{i-1}) / r0, r0 = h_{i-1} / h) and the weights of
``exponential.data_weight`` at 2h (int_0^h 2 e^{-2(h - tau)} tau^k / k! dtau = h^k a_{k+1}(2h)):
  order 1: x_t = (sigma_t / sigma_s) e^{-h} x_s + alpha_t a1(2h) m_i + sigma_t sqrt(1 - e^{-2h}) z
           (a1(2h) = 1 - e^{-2h}: this is DDPM ancestral sampling, DDIM with eta = 1)
  2M midpoint: ... + alpha_t a1(2h) D1_0 / 2;   2M heun: ... + alpha_t a2(2h) D1_0
as diffusers' ``algorithm_type='sde-dpmsolver++'`` and k-diffusion's ``sample_dpmpp_2m_sde`` (midpoint).
``s_noise`` scales the noise (k-diffusion's option; 1 samples the model's distribution).
Warm-up, lower-order final steps and the first-order step into sigma = 0 follow the multistep ODE solver.

Weak order (tests/test_sde_samplers.py, exact moments of the scheme on Gaussian data, logSNR grid): 1 for
order 1 and 2 for 2M (midpoint and heun), although D1_0 is a difference along a Brownian path. On Gaussian
data the model is linear; the weak order on nonlinear data was not measured.
"""
import dataclasses
from typing import Optional

import jax.numpy as jnp

from solvers import base, exponential
from solvers.ddim import DDIM
from solvers.dpm_solver_multistep import SOLVER_TYPES, MultistepRules, difference_weights


@dataclasses.dataclass(frozen=True)
class DPMSolverSDE(MultistepRules, base.Solver):
  """SDE-DPM-Solver++ (Lu et al. 2022b) of ``order`` 1 or 2 (2M), ``solver_type`` 'midpoint' / 'heun', noise scale
  ``s_noise``; lower-order final steps as ``DPMSolverMultistep`` (module docstring)."""
  order: int = 2
  solver_type: str = "midpoint"
  lower_order_final: bool = True
  lower_order_final_below: Optional[int] = 10
  s_noise: float = 1.0
  stochastic = True

  def __post_init__(self):
    if self.order not in (1, 2):
      raise ValueError(f"order={self.order!r} is not supported; valid: 1, 2")
    base.check_options(self, (("solver_type", SOLVER_TYPES),))
    if not self.s_noise >= 0:
      raise ValueError(f"s_noise={self.s_noise!r} must be >= 0")

  def coefficients(self, grid, schedule):
    """Table rows of the drift part (weights at 2h) and the noise scale s_noise sigma_t sqrt(1 - e^{-2h})."""
    h = exponential.step_sizes(grid)
    a_t, s_s, s_t = grid.alpha[1:], grid.sigma[:-1], grid.sigma[1:]
    d1_0 = difference_weights(h, self.order)[0]
    e0 = jnp.zeros_like(d1_0).at[:, 0].set(1.0)
    w1 = exponential.data_weight(1, 2.0 * h)
    second = 0.5 * w1 if self.solver_type == "midpoint" else exponential.data_weight(2, 2.0 * h)
    weights = jnp.where((self.step_orders(grid) >= 2)[:, None], w1[:, None] * e0 + second[:, None] * d1_0,
                        w1[:, None] * e0)
    return {"anchor": s_t / s_s * jnp.exp(-h), "hist": a_t[:, None] * weights, "end": jnp.ones_like(h),
            "z": self.s_noise * s_t * jnp.sqrt(-jnp.expm1(-2.0 * h))}

  def step(self, denoiser, schedule, grid, coeffs, i, state):
    """The table step on x0, plus the step's Gaussian noise from ``base.noise(key, x, i)``: one model call."""
    state = exponential.table_step(denoiser, schedule, grid, "x0", coeffs, i, state)
    x = state.x + base.cast_coefficients(coeffs["z"], state.x) * base.noise(state.key, state.x, i)
    x = x.astype(state.x.dtype)
    return state._replace(x=x, anchor=x)


base.register("dpm_solver_pp_2m_sde", DPMSolverSDE)
base.register("ddpm_ancestral", lambda: DDIM(eta=1.0))  # = DPMSolverSDE(order=1), tested

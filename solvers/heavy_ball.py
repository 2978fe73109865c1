"""Heavy-ball (HB) momentum on PLMS and on DPM-Solver++(2M): Wizadwongsa et al. 2024 ("Diffusion Sampling with
Momentum for Mitigating Divergence Artifacts", ICLR; their PLMS-HB and DPM-Solver++ with HB, official code
sWizad/momentum-diffusion).

HB smooths the base method's effective model output D_n (what its first-order update is fed with) by Polyak's
heavy ball, v_n = (1 - beta) v_{n-1} + beta D_n, and takes the first-order step with v_n:
- ``PLMSHeavyBall``: D_n = AB_k(eps_n, ..., eps_{n-k+1}) (pseudo Adams-Bashforth, step n of order min(k, n + 1),
  the first an Euler step, as the official code), v_0 = D_0 = eps_0, and the DDIM transfer of solvers/pndm.py
  (``exponential.first_order_weights``, noise form): x_{n+1} = (alpha'/alpha) x_n - sigma' expm1(h) v_n.
- ``DPMSolverPPHeavyBall``: D_n = x0_n + (x0_n - x0_{n-1}) / (2 r), r = h_{n-1} / h_n (DPM-Solver++(2M), midpoint,
  solvers/dpm_solver_multistep.py), x_{n+1} = (sigma'/sigma) x_n + alpha' (1 - e^{-h}) v_n. First-order steps
  (the first, the lower-order final ones, one into sigma = 0) take D_n = x0_n without momentum, and the first
  second-order step starts the average (v = D_n), as the official diffusers wrapper.
beta = 1 is the base method. The paper's ``k - 1 + beta`` notation (3.8: PLMS4 with beta = 0.8) is accepted by
``PLMSHeavyBall.from_notation`` (``ghvb.parse_order``).

Order: for beta < 1 the average lags D_n by (1 - beta) / beta steps, an O(h) error in every step: HB converges
with order 1 (the paper proves first order; measured on the Gaussian in tests/test_momentum.py).
Stability: on d x_bar / d sigma_bar = mu x_bar (z = mu delta) AB_k's characteristic equation
(xi - 1) xi^{k-1} = z sigma(xi) becomes (xi - 1)(xi - 1 + beta) xi^{k-1} = beta z xi sigma(xi) with PLMS-HB, so where a
root crosses xi = -1 the real stability limit grows by exactly (2 - beta) / beta (-2 -> -3 at beta = 0.8 for k = 1,
-0.3 -> -0.45 for AB4), measured from the solver's own step in tests/test_momentum.py.
"""
import dataclasses
from typing import Any, NamedTuple, Optional

import jax.numpy as jnp

from solvers import base, dpm_solver_multistep, exponential, ghvb


class HeavyBallState(NamedTuple):
  """The heavy-ball state: the current point, the average v and the raw outputs the base method combines."""
  x: jnp.ndarray         # the current point
  velocity: jnp.ndarray  # v_{n-1}, the heavy-ball average of the effective outputs
  outputs: jnp.ndarray   # (history, *x.shape) raw model outputs, newest first
  nfe: jnp.ndarray
  key: Any


def init_state(x, history, key):
  """A ``HeavyBallState`` at x with v = 0 and room for ``history`` outputs."""
  return HeavyBallState(x=x, velocity=jnp.zeros_like(x), outputs=jnp.zeros((history,) + x.shape, x.dtype),
                        nfe=jnp.zeros((), jnp.int32), key=key)


def heavy_ball_step(kind, denoiser, schedule, grid, coeffs, i, state):
  """Evaluates ``kind`` at node i, combines the outputs into D, averages it into v and takes the first-order step."""
  c = base.cast_coefficients(coeffs, state.x)
  output = denoiser.predict(kind, state.x, grid.t[i], schedule)
  outputs = jnp.concatenate([output[None], state.outputs[:-1]])
  effective = c["outputs"][0] * outputs[0]
  for k in range(1, outputs.shape[0]):
    effective = effective + c["outputs"][k] * outputs[k]
  velocity = (c["keep"] * state.velocity + c["new"] * effective).astype(state.x.dtype)
  x = (c["anchor"] * state.x + c["transfer"] * velocity).astype(state.x.dtype)
  return state._replace(x=x, velocity=velocity, outputs=outputs, nfe=state.nfe + 1)


@dataclasses.dataclass(frozen=True)
class PLMSHeavyBall(base.Solver):
  """PLMS (pseudo AB of order ``order``) with heavy-ball momentum ``beta`` (Wizadwongsa et al. 2024; module
  docstring)."""
  order: int = 4
  beta: float = 0.8

  def __post_init__(self):
    base.check_options(self, (("order", ghvb.ORDERS),))
    ghvb.check_beta(self.beta)

  @classmethod
  def from_notation(cls, notation):
    """PLMS-HB from the paper's ``k - 1 + beta`` notation: ``PLMSHeavyBall.from_notation(3.8)``."""
    order, beta = ghvb.parse_order(notation)
    return cls(order=order, beta=beta)

  @property
  def declared_order(self):
    """1 with momentum (beta < 1); PLMS's min(order, 2) without (solvers/ghvb.py)."""
    return min(self.order, 2) if self.beta == 1 else 1

  def init(self, denoiser, schedule, grid, x, key):
    """A ``HeavyBallState`` with room for ``order`` eps outputs."""
    return init_state(x, self.order, key)

  def coefficients(self, grid, schedule):
    """Per step: the DDIM transfer, the AB_k weights (warm-up order) and the EMA's weights."""
    length = grid.capacity - 1
    anchor, transfer, _ = exponential.first_order_weights(grid.alpha[:-1], grid.sigma[:-1], grid.alpha[1:],
                                                          grid.sigma[1:], exponential.step_sizes(grid), data=False)
    keep, new = (jnp.asarray(row, anchor.dtype) for row in ghvb.momentum_rows(length, self.beta))
    weights = jnp.asarray(ghvb.warm_up_weights(length, self.order, 1.0), anchor.dtype)
    return {"anchor": anchor, "transfer": transfer, "outputs": weights, "keep": keep, "new": new}

  def step(self, denoiser, schedule, grid, coeffs, i, state):
    """``heavy_ball_step`` on eps: one model call."""
    return heavy_ball_step("eps", denoiser, schedule, grid, coeffs, i, state)


@dataclasses.dataclass(frozen=True)
class DPMSolverPPHeavyBall(base.Solver):
  """DPM-Solver++(2M) with heavy-ball momentum ``beta`` (Wizadwongsa et al. 2024; module docstring); lower-order
  final steps as ``DPMSolverMultistep``."""
  beta: float = 0.8
  lower_order_final: bool = True
  lower_order_final_below: Optional[int] = 10
  order = 2

  def __post_init__(self):
    ghvb.check_beta(self.beta)

  @property
  def declared_order(self):
    """1 with momentum (beta < 1); DPM-Solver++(2M)'s 2 without."""
    return 2 if self.beta == 1 else 1

  def for_order_measurement(self):
    """This solver without lower-order final steps."""
    return dataclasses.replace(self, lower_order_final=False)

  def init(self, denoiser, schedule, grid, x, key):
    """A ``HeavyBallState`` with room for two x0 outputs."""
    return init_state(x, 2, key)

  def coefficients(self, grid, schedule):
    """Per step: the first-order data-form weights, the 2M combination D_n and the EMA's weights."""
    h = exponential.step_sizes(grid)
    anchor, transfer, _ = exponential.first_order_weights(grid.alpha[:-1], grid.sigma[:-1], grid.alpha[1:],
                                                          grid.sigma[1:], h, data=True)
    orders = dpm_solver_multistep.multistep_orders(grid.num_steps, h.shape[0], 2, self.lower_order_final,
                                                   self.lower_order_final_below, grid.sigma[1:] == 0)
    second = orders >= 2
    difference = dpm_solver_multistep.difference_weights(h, 2)[0]
    weights = jnp.zeros_like(difference).at[:, 0].set(1.0) + jnp.where(second[:, None], 0.5 * difference, 0.0)
    momentum = second & (exponential.previous(orders, 1, 1) >= 2)
    keep = jnp.where(momentum, 1.0 - self.beta, 0.0).astype(h.dtype)
    new = jnp.where(momentum, self.beta, 1.0).astype(h.dtype)
    return {"anchor": anchor, "transfer": transfer, "outputs": weights, "keep": keep, "new": new}

  def step(self, denoiser, schedule, grid, coeffs, i, state):
    """``heavy_ball_step`` on x0: one model call."""
    return heavy_ball_step("x0", denoiser, schedule, grid, coeffs, i, state)


base.register("plms_hb", lambda: PLMSHeavyBall(order=4, beta=0.8))
base.register("dpm_solver_pp_2m_hb", DPMSolverPPHeavyBall)

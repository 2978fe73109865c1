"""GHVB: the generalized heavy-ball method of Wizadwongsa et al. 2024 ("Diffusion Sampling with Momentum for
Mitigating Divergence Artifacts", ICLR; their GHVB method, official code sWizad/momentum-diffusion).

In the scaled variables x_bar = x / alpha, sigma_bar = sigma / alpha the PF-ODE reads d x_bar / d sigma_bar = eps,
and each step is the DDIM transfer (Euler in x_bar; ``exponential.first_order_weights`` in noise form, as PLMS in
solvers/pndm.py) x_{n+1} = alpha_{n+1} (x_n / alpha_n + delta_n u_n), delta_n = sigma_bar_{n+1} - sigma_bar_n,
with the model output f_n = eps(x_n, t_n) smoothed before the multistep combination:
  v_n = (1 - beta) v_{n-1} + beta f_n   (v_0 = f_0),
  u_n = C_k^beta(v_n, ..., v_{n-k+1}) = (1 / beta) sum_j c_{k,j}(beta) v_{n-j}   (``beta_adams_bashforth``),
the beta-modified Adams-Bashforth weights, which reduce to AB_k (the PLMS weights) at beta = 1. Step n uses
order min(k, n + 1) (the first step is Euler), as the official code. The weights are the uniform-step ones applied
to any grid (pseudo linear multistep).

Order ``order.beta`` notation (``parse_order``): the paper writes GHVB k - 1 + beta, a number between the
neighbouring integer orders, e.g. 3.8 is k = 4 with beta = 0.8 and the integer 4 is AB4 (beta = 1).

Order. On a uniform sigma_bar grid the steady recursion is of order k for every beta (tests/test_momentum.py: its
principal root misses e^z by O(z^{k+1})), but globally: the Euler first step contributes O(h^2), v_0 = f_0
differs from the lagged average the later steps assume by O(h) (a transient that decays as (1 - beta)^n and
contributes O(h^2)), and the fixed weights on a non-uniform grid leave a local O(h^3) for k >= 3 (as PLMS, see
solvers/pndm.py). The global order is min(k, 2) (``declared_order``, measured on the Gaussian).

Stability (the paper's motivation): on d x_bar / d sigma_bar = mu x_bar with z = mu delta, the real stability
interval ends where a root crosses xi = -1 in (xi - 1)(xi - 1 + beta) = beta z xi C_k^beta(xi^0, xi^-1, ...), at
z = -2 (2 - beta) denominator / sum_j |c_{k,j}(beta)|: it grows as beta falls (AB4 -0.3, GHVB 3.8 -0.353, 3.4 -0.453),
less than heavy ball's factor (2 - beta) / beta (solvers/heavy_ball.py) but keeping the order; measured from the
solver's own step in tests/test_momentum.py.
"""
import dataclasses
import math
from typing import Any, NamedTuple

import jax.numpy as jnp
import numpy as np

from solvers import base, exponential

ORDERS = (1, 2, 3, 4)


def beta_adams_bashforth(order, beta):
  """The weights of C_order^beta on (v_n, v_{n-1}, ...), newest first (Wizadwongsa et al. 2024, GHVB).

  Each row sums to one; beta = 1 gives the Adams-Bashforth weights (1; 3/2, -1/2; 23, -16, 5 / 12; ...)."""
  numerators = {
      1: (beta,),
      2: (2 + beta, -(2 - beta)),
      3: (18 + 5 * beta, -(24 - 8 * beta), 6 - beta),
      4: (46 + 9 * beta, -(78 - 19 * beta), 42 - 5 * beta, -(10 - beta)),
  }[order]
  denominator = {1: 1, 2: 2, 3: 12, 4: 24}[order]
  return np.array(numerators) / (denominator * beta)


def parse_order(notation):
  """(order k, beta) from the paper's ``k - 1 + beta`` notation: 3.8 -> (4, 0.8), 1.5 -> (2, 0.5), 4 -> (4, 1.0).

  A value within 1e-6 above an integer is rejected as ambiguous (beta ~ 0 of the next order, or a rounding of the
  integer order), as are values outside (0, 4]."""
  if isinstance(notation, bool) or not isinstance(notation, (int, float, np.integer, np.floating)):
    raise ValueError(f"order notation {notation!r} must be a number in (0, 4], e.g. 3.8 (order 4, beta 0.8)")
  notation = float(notation)
  if not 0.0 < notation <= ORDERS[-1]:
    raise ValueError(f"order notation {notation!r} must lie in (0, 4], e.g. 3.8 (order 4, beta 0.8)")
  order = math.ceil(notation)
  beta = round(notation - (order - 1), 12)
  if beta < 1e-6:
    raise ValueError(f"order notation {notation!r} is ambiguous: beta = {beta:.1e} of order {order}; "
                     f"write {order - 1} for order {order - 1} without momentum or give beta explicitly")
  return order, beta


def check_beta(beta):
  """Raises a ValueError unless 0 < beta <= 1 (beta = 1: no momentum)."""
  if isinstance(beta, bool) or not 0.0 < beta <= 1.0:
    raise ValueError(f"beta={beta!r} must lie in (0, 1] (1: no momentum)")


def momentum_rows(length, beta):
  """Per-step EMA weights (keep, new) of v_n = keep v_{n-1} + new m_n: (0, 1) at step 0, then (1 - beta, beta)."""
  first = np.arange(length) == 0
  return np.where(first, 0.0, 1.0 - beta), np.where(first, 1.0, beta)


def warm_up_weights(length, order, beta):
  """(length, order) weights of C^beta, newest first, with the warm-up order min(order, n + 1) at step n."""
  rows = np.zeros((length, order))
  for n in range(length):
    weights = beta_adams_bashforth(min(order, n + 1), beta)
    rows[n, :len(weights)] = weights
  return rows


class GHVBState(NamedTuple):
  """GHVB's state: the current point and the last ``order`` averaged outputs v."""
  x: jnp.ndarray           # the current point
  velocities: jnp.ndarray  # (order, *x.shape) v_n, v_{n-1}, ..., newest first
  nfe: jnp.ndarray
  key: Any


@dataclasses.dataclass(frozen=True)
class GHVB(base.Solver):
  """Generalized heavy ball (Wizadwongsa et al. 2024) of order k = ``order`` (1-4) with momentum ``beta`` in (0, 1]
  (module docstring)."""
  order: int = 4
  beta: float = 0.8

  def __post_init__(self):
    base.check_options(self, (("order", ORDERS),))
    check_beta(self.beta)

  @classmethod
  def from_notation(cls, notation):
    """GHVB from the paper's ``k - 1 + beta`` notation (``parse_order``): ``GHVB.from_notation(3.8)``."""
    order, beta = parse_order(notation)
    return cls(order=order, beta=beta)

  @property
  def declared_order(self):
    """min(order, 2): the Euler first step, v_0 = f_0 and the fixed weights on non-uniform grids (docstring)."""
    return min(self.order, 2)

  def init(self, denoiser, schedule, grid, x, key):
    """A ``GHVBState`` at x with no velocities yet."""
    return GHVBState(x=x, velocities=jnp.zeros((self.order,) + x.shape, x.dtype), nfe=jnp.zeros((), jnp.int32),
                     key=key)

  def coefficients(self, grid, schedule):
    """Per step: the DDIM transfer, the weights of C_k^beta (warm-up order) times the transfer, and the EMA's."""
    length = grid.capacity - 1
    anchor, transfer, _ = exponential.first_order_weights(grid.alpha[:-1], grid.sigma[:-1], grid.alpha[1:],
                                                          grid.sigma[1:], exponential.step_sizes(grid), data=False)
    keep, new = (jnp.asarray(row, anchor.dtype) for row in momentum_rows(length, self.beta))
    weights = jnp.asarray(warm_up_weights(length, self.order, self.beta), anchor.dtype)
    return {"anchor": anchor, "velocities": transfer[:, None] * weights, "keep": keep, "new": new}

  def step(self, denoiser, schedule, grid, coeffs, i, state):
    """f_n = eps(x_n), v_n = (1 - beta) v_{n-1} + beta f_n, x_{n+1} = DDIM transfer of C_k^beta(v): one model call."""
    c = base.cast_coefficients(coeffs, state.x)
    eps = denoiser.predict("eps", state.x, grid.t[i], schedule)
    velocity = (c["keep"] * state.velocities[0] + c["new"] * eps).astype(state.x.dtype)
    velocities = jnp.concatenate([velocity[None], state.velocities[:-1]])
    x = c["anchor"] * state.x
    for k in range(self.order):
      x = x + c["velocities"][k] * velocities[k]
    return state._replace(x=x.astype(state.x.dtype), velocities=velocities, nfe=state.nfe + 1)


base.register("ghvb_2", lambda: GHVB(order=2, beta=0.8))
base.register("ghvb_4", lambda: GHVB(order=4, beta=0.8))

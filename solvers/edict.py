"""EDICT: exact diffusion inversion via coupled transformations (Wallace, Gokul & Naik 2023, CVPR, Eq. 13-15).

Two coupled sequences (x, y), both starting at x_T (sampling) or at the data (inversion). With the
noise-form DDIM step from node i to i + 1, a = alpha_{i+1} / alpha_i, b = sigma_{i+1} - a sigma_i, and every
model call at t_i:
  x' = a x + b eps_hat(y, t_i),   y' = a y + b eps_hat(x', t_i)                 (Eq. 13-14)
  x_{i+1} = p x' + (1 - p) y',    y_{i+1} = p y' + (1 - p) x_{i+1}              (Eq. 15, mixing p)
Each line updates one sequence from the other only, so the step inverts exactly (``EDICTInversion``):
  y' = (y_{i+1} - (1 - p) x_{i+1}) / p,   x' = (x_{i+1} - (1 - p) y') / p,
  y = (y' - b eps_hat(x', t_i)) / a,       x = (x' - b eps_hat(y, t_i)) / a.
With ``alternate=True`` (the official code's ``leapfrog_steps``, the default) x and y swap roles on odd
sampling steps; the inversion mirrors this by the sampling step index. Two model calls per step, first
order (DDIM-based). Defaults p = 0.93 (the paper's editing setting). The mixing matrix of one step has
determinant p^2, so the inversion amplifies rounding by up to p^{-2N} (1.4e3 at N = 50, p = 0.93):
higher p keeps the inversion stable (tests/test_edict.py and docs/inversion.md measure it).
The sample is x (y agrees with it to O(h)). The noise-form step needs alpha_i > 0 at every evaluated
node: a flow-matching grid must start below t = 1.
"""
import dataclasses

import jax.numpy as jnp

from solvers import base, exponential


def _check_mixing(p):
  if not 0.0 < p <= 1.0:
    raise ValueError(f"p={p!r} must lie in (0, 1] (the inversion divides by p)")


def _swap(odd, x, y):
  return jnp.where(odd, y, x), jnp.where(odd, x, y)


@dataclasses.dataclass(frozen=True)
class EDICT(base.Solver):
  """EDICT sampler; regenerates from a ``base.Latent`` pair (x_T, y_T). See the module docstring."""
  p: float = 0.93
  alternate: bool = True
  order = 1

  def __post_init__(self):
    _check_mixing(self.p)

  def init(self, denoiser, schedule, grid, x, key):
    zero = jnp.zeros((), jnp.int32)
    x, y = (x.x, x.partner) if isinstance(x, base.Latent) else (x, x)
    return base.PairState(x=x, partner=y, nfe=zero, key=key, start=zero)

  def coefficients(self, grid, schedule):
    a, b, _ = exponential.first_order_rows(grid, data=False)
    return {"a": a, "b": b}

  def step(self, denoiser, schedule, grid, coeffs, i, state):
    c = base.cast_coefficients(coeffs, state.x)
    p = jnp.asarray(self.p, c["a"].dtype)
    t = grid.t[i]
    odd = self.alternate & (i % 2 == 1)
    x, y = _swap(odd, state.x, state.partner)
    x_mid = c["a"] * x + c["b"] * denoiser.predict("eps", y, t, schedule)
    y_mid = c["a"] * y + c["b"] * denoiser.predict("eps", x_mid.astype(y.dtype), t, schedule)
    x_new = p * x_mid + (1 - p) * y_mid
    y_new = p * y_mid + (1 - p) * x_new
    x_new, y_new = _swap(odd, x_new.astype(x.dtype), y_new.astype(x.dtype))
    return state._replace(x=x_new, partner=y_new, nfe=state.nfe + 2)


@dataclasses.dataclass(frozen=True)
class EDICTInversion(base.Solver):
  """The exact inverse of ``EDICT`` on the reversed grid (``grids.reverse``)."""
  p: float = 0.93
  alternate: bool = True
  order = 1

  def __post_init__(self):
    _check_mixing(self.p)

  def init(self, denoiser, schedule, grid, x, key):
    zero = jnp.zeros((), jnp.int32)
    return base.PairState(x=x, partner=x, nfe=zero, key=key, start=zero)

  def coefficients(self, grid, schedule):
    # Row j undoes the sampling step from node j + 1 to node j of the reversed grid.
    a, b, _ = exponential.first_order_weights(grid.alpha[1:], grid.sigma[1:], grid.alpha[:-1], grid.sigma[:-1],
                                              grid.lam[:-1] - grid.lam[1:], data=False)
    return {"a": a, "b": b}

  def step(self, denoiser, schedule, grid, coeffs, i, state):
    c = base.cast_coefficients(coeffs, state.x)
    p = jnp.asarray(self.p, c["a"].dtype)
    t = grid.t[i + 1]
    odd = self.alternate & ((grid.num_steps - 1 - i) % 2 == 1)
    x_new, y_new = _swap(odd, state.x, state.partner)
    y_mid = (y_new - (1 - p) * x_new) / p
    x_mid = (x_new - (1 - p) * y_mid) / p
    y = (y_mid - c["b"] * denoiser.predict("eps", x_mid.astype(x_new.dtype), t, schedule)) / c["a"]
    x = (x_mid - c["b"] * denoiser.predict("eps", y.astype(x_new.dtype), t, schedule)) / c["a"]
    x, y = _swap(odd, x.astype(state.x.dtype), y.astype(state.x.dtype))
    return state._replace(x=x, partner=y, nfe=state.nfe + 2)


base.register("edict", EDICT)

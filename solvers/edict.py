"""EDICT: exact diffusion inversion via coupled transformations (Wallace, Gokul & Naik 2023, CVPR, Eq. 13-15).

Two coupled sequences (x, y), both starting at x_T (sampling) or at the data (inversion). With the
noise-form DDIM step from node i to i + 1, a = alpha_{i+1} / alpha_i, b = sigma_{i+1} - a sigma_i, and every
model call at t_i:
  x' = a x + b eps_hat(y, t_i),   y' = a y + b eps_hat(x', t_i)                 (Eq. 13-14)
  x_{i+1} = p x' + (1 - p) y',    y_{i+1} = p y' + (1 - p) x_{i+1}              (Eq. 15, mixing p)
Each line updates one sequence from the other only, so the step inverts exactly (``EDICTInversion``):
  y' = (y_{i+1} - (1 - p) x_{i+1}) / p,   x' = (x_{i+1} - (1 - p) y') / p,
  y = (y' - b eps_hat(x', t_i)) / a,       x = (x' - b eps_hat(y, t_i)) / a.
With ``alternate=True`` (the official code's ``leapfrog_steps``, the default) the two coupled updates swap
roles on odd sampling steps (y first, from eps(x); then x from eps(y')); the mixing layer stays as written.
The inversion mirrors this by the sampling step index (the official code counts from the inversion's end,
which mirrors it only for an even number of steps). Two model calls per step, first
order (DDIM-based). Default p = 0.93 (the paper's editing setting). Rounding in the inversion is damped by
the mixing, not amplified: in float32 at 50 steps on the GMM oracle the round trip errs 1e-6..3e-6 at p = 0.93,
1e-4 at 0.97 and 2e-3 at p = 1 (no mixing); a trained network amplifies rounding more (7e-5 at p = 0.93 on
the digits U-Net, 1.9e-4 with guidance 3), measured in tests/test_edict.py and docs/inversion.md.
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
class _EDICTPair(base.Solver):
  """Shared by EDICT's sampler and inverse: the mixing p, the alternation, and the pair state (x, y), which
  starts from a ``base.Latent`` (x_T, y_T) or from x twice."""
  p: float = 0.93
  alternate: bool = True
  order = 1

  def __post_init__(self):
    _check_mixing(self.p)

  def init(self, denoiser, schedule, grid, x, key):
    zero = jnp.zeros((), jnp.int32)
    x, y = (x.x, x.partner) if isinstance(x, base.Latent) else (x, x)
    return base.PairState(x=x, partner=y, nfe=zero, key=key, start=zero)


@dataclasses.dataclass(frozen=True)
class EDICT(_EDICTPair):
  """EDICT sampler (Wallace, Gokul & Naik 2023); regenerates from a ``base.Latent`` pair (x_T, y_T)."""

  def coefficients(self, grid, schedule):
    """Per-step DDIM weights in noise form: x' = a x + b eps_hat."""
    a, b, _ = exponential.first_order_rows(grid, data=False)
    return {"a": a, "b": b}

  def step(self, denoiser, schedule, grid, coeffs, i, state):
    """Wallace et al. 2023, Eq. 13-15: the coupled DDIM updates of (x, y), then the mixing layer with p."""
    c = base.cast_coefficients(coeffs, state.x)
    p = jnp.asarray(self.p, c["a"].dtype)
    t = grid.t[i]
    odd = self.alternate & (i % 2 == 1)
    u, w = _swap(odd, state.x, state.partner)  # u is updated first, from eps(w)
    u_mid = (c["a"] * u + c["b"] * denoiser.predict("eps", w, t, schedule)).astype(u.dtype)
    w_mid = c["a"] * w + c["b"] * denoiser.predict("eps", u_mid, t, schedule)
    x_mid, y_mid = _swap(odd, u_mid, w_mid.astype(u.dtype))
    x_new = p * x_mid + (1 - p) * y_mid  # the mixing layer is the same on every step
    y_new = p * y_mid + (1 - p) * x_new
    return state._replace(x=x_new.astype(u.dtype), partner=y_new.astype(u.dtype), nfe=state.nfe + 2)


@dataclasses.dataclass(frozen=True)
class EDICTInversion(_EDICTPair):
  """The exact inverse of ``EDICT`` on the reversed grid (``grids.reverse``)."""

  def coefficients(self, grid, schedule):
    """Per-step inverse DDIM weights: row j undoes the sampling step from node j + 1 to node j."""
    # Row j undoes the sampling step from node j + 1 to node j of the reversed grid.
    a, b, _ = exponential.first_order_weights(grid.alpha[1:], grid.sigma[1:], grid.alpha[:-1], grid.sigma[:-1],
                                              grid.lam[:-1] - grid.lam[1:], data=False)
    return {"a": a, "b": b}

  def step(self, denoiser, schedule, grid, coeffs, i, state):
    """Eq. 13-15 inverted: the mixing layer undone, then the coupled DDIM updates in reverse order."""
    c = base.cast_coefficients(coeffs, state.x)
    p = jnp.asarray(self.p, c["a"].dtype)
    t = grid.t[i + 1]
    odd = self.alternate & ((grid.num_steps - 1 - i) % 2 == 1)
    dtype = state.x.dtype
    y_mid = (state.partner - (1 - p) * state.x) / p
    x_mid = (state.x - (1 - p) * y_mid) / p
    u_mid, w_mid = _swap(odd, x_mid.astype(dtype), y_mid.astype(dtype))
    w = ((w_mid - c["b"] * denoiser.predict("eps", u_mid, t, schedule)) / c["a"]).astype(dtype)
    u = (u_mid - c["b"] * denoiser.predict("eps", w, t, schedule)) / c["a"]
    x, y = _swap(odd, u.astype(dtype), w)
    return state._replace(x=x, partner=y, nfe=state.nfe + 2)


base.register("edict", EDICT)

"""Levenberg-Marquardt-Langevin (LML) correction: a damped low-rank-Hessian-preconditioned Langevin move
at chosen noise levels, inserted between the steps of any solver whose iteration i runs grid node i to i + 1.

Wang et al. 2025, "Unleashing High-Quality Image Generation in Diffusion Sampling Using Second-Order
Levenberg-Marquardt-Langevin" (arXiv 2505.24222, ICCV 2025). The paper's methodology section could not be
retrieved here (only its abstract and the official code, github zituitui/LML-diffusion-sampler); the
equations below are derived from the abstract's three ingredients and the official code's correction, and
are numbered here (L1-L5), not with the paper's numbers. See docs/lml.md for what is verified and what not.

(L1) Newton-Langevin at a fixed noise level t, target p_t, score s = grad log p_t, Hessian H = grad^2 log p_t:
       x' = x + h M s(x) + sqrt(2 h) M^{1/2} z,   M = (-H)^{-1}   (quadratic cost in the dimension).
(L2) Low-rank Hessian from model outputs. With eps_hat(x) = E[eps | x_t = x] (the model's output),
     Tweedie's second-order identity gives  -sigma_t^2 H(x) = I - Cov[eps | x] = I - E[eps eps^T | x] + eps_hat eps_hat^T.
     Replacing E[eps eps^T | x] by its average over x ~ p_t, which is E[eps eps^T] = I, leaves
       -sigma_t^2 H(x)  ~=  G(x) = sum_k w_k m_k m_k^T,
     with m_0 = eps_hat(x) the current output (rank 1; the official code's ``m m^T`` with kappa = 0) and,
     for rank r > 1, the outputs m_1 .. m_{r-1} of the previous LML moves, weights w_k = kappa^k / sum_j kappa^j.
     The approximation is unbiased over the marginal: E_{x~p_t}[eps_hat eps_hat^T] = -sigma_t^2 E_{x~p_t}[H]
     (Fisher's identity; tested on a Gaussian, where H is constant, against jax.jvp of the exact score).
     No model call beyond the one the move needs anyway.
(L3) Levenberg-Marquardt damping lambda > 0 (``damping``), scaled so that the damped preconditioner is the
     identity in the limit lambda -> inf:  P = lambda (lambda I + G)^{-1} = (I + U U^T)^{-1},
     U = [sqrt(w_k / lambda) m_k] (D x r). Applied by Woodbury with an r x r solve: O(D r^2), never D x D:
       P v = v - U (I_r + U^T U)^{-1} U^T v.                         (the official code's rank-1 formula)
(L4) The LML move:  x' = x + h P s + sqrt(2 h) P (z + U zeta),  z ~ N(0, I_D), zeta ~ N(0, I_r).
     Cov[P (z + U zeta)] = P (I + U U^T) P = P, so the noise has exactly the preconditioner's covariance without
     a matrix square root. h = 2 (snr sigma_t)^2 as in solvers/langevin.py ('ald').
(L5) Limits: lambda -> inf (or rank = 0) gives U = 0, P = I and x' = x + h s + sqrt(2 h) z, the plain
     first-order Langevin move with the same z: tested numerically (tests/test_lml.py).

Not included (unverified against the paper): the divergence term a position-dependent preconditioner needs
for an exact invariant measure (P depends on x through eps_hat), and the official code's zero-NFE variant
that rescales the solver's increment instead of taking a Langevin move (with kappa = 0, its default, that
variant is the identity: spec section 3).

Cost: one model call per LML move (counted in NFE) plus O(D r^2) arithmetic. With ``reuse`` ('x0' or 'eps'),
the predictor's step at a corrected node does not call the model again: it is handed the last move's output,
converted to the moved point with x0 (or eps) held fixed, so LML adds n_steps - 1 calls per corrected node
(0 for one move): the official code's "no extra NFE" budget, at the price of a stale model output
(an O(|move|) error in the predictor's input). Only for predictors with one model call per step at
(x_i, t_i): DDIM and the multistep DPM-Solvers.
"""
import dataclasses
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from solvers import base, exponential, predictions
from solvers.ddim import DDIM
from solvers.dpm_solver_multistep import DPMSolverMultistep

REUSE = (None, "x0", "eps")
REUSE_PREDICTORS = (DDIM, DPMSolverMultistep)  # one model call per step, at (x_i, t_i)


def _flat(x):
  """(B, D) view of x: the leading axis is the batch when x.ndim > 1, else x is one sample."""
  return x.reshape(x.shape[0], -1) if x.ndim > 1 else x.reshape(1, -1)


def low_rank_factor(outputs, damping, kappa=1.0):
  """U (B, D, r) of (L3): columns sqrt(w_k / damping) m_k, outputs (r, *x.shape) newest first."""
  r = outputs.shape[0]
  w = jnp.asarray([kappa**k for k in range(r)], outputs.dtype)
  w = w / jnp.sum(w)
  cols = jnp.stack([_flat(outputs[k]) for k in range(r)], -1)  # (B, D, r)
  return cols * jnp.sqrt(w / damping)


def _solve(matrix, rhs):
  if matrix.shape[-1] <= 3:
    return exponential.solve_small(matrix, rhs)
  return jnp.linalg.solve(matrix, rhs[..., None])[..., 0]


def precondition(u, v):
  """P v = (I + U U^T)^{-1} v by Woodbury (L3); u (B, D, r), v (B, D). O(D r^2)."""
  if u.shape[-1] == 0:
    return v
  k = jnp.einsum("bdi,bdj->bij", u, u)
  c = k + jnp.eye(u.shape[-1], dtype=u.dtype)
  return v - jnp.einsum("bdi,bi->bd", u, _solve(c, jnp.einsum("bdi,bd->bi", u, v)))


def hessian_vector_product(outputs, sigma, v, kappa=1.0):
  """The low-rank approximation (L2) of H v: -(1 / sigma^2) sum_k w_k m_k (m_k . v), per sample."""
  u = low_rank_factor(outputs, 1.0, kappa)
  vf = _flat(v)
  return (-jnp.einsum("bdi,bi->bd", u, jnp.einsum("bdi,bd->bi", u, vf)) / sigma**2).reshape(v.shape)


def lml_move(x, score, outputs, damping, step, z, zeta, kappa=1.0):
  """The pure LML move (L4): x + step P score + sqrt(2 step) P (z + U zeta).

  x, score, z: shaped like x; outputs (r, *x.shape) eps-scale model outputs, newest first (r = 0: plain
  Langevin); zeta (B, r) standard normal; damping lambda > 0 (inf allowed: P = I)."""
  shape = x.shape
  xf, sf, zf = _flat(x), _flat(score), _flat(z)
  if outputs.shape[0] == 0 or (isinstance(damping, (int, float)) and math.isinf(damping)):
    u = jnp.zeros(xf.shape + (0,), xf.dtype)
  else:
    u = low_rank_factor(outputs, damping, kappa)
  noise = zf + (jnp.einsum("bdi,bi->bd", u, zeta) if u.shape[-1] else 0.0)
  moved = xf + step * precondition(u, sf) + jnp.sqrt(2.0 * step) * precondition(u, noise)
  return moved.reshape(shape)


class LMLState(NamedTuple):
  """LML's state: the wrapped solver's state and the outputs of the previous moves (the low-rank factor's)."""
  x: jnp.ndarray
  nfe: jnp.ndarray
  key: Any
  inner: Any            # the wrapped solver's state (its x and nfe mirror the outer ones)
  outputs: jnp.ndarray  # (max(rank - 1, 0), *x.shape): eps outputs of the previous LML moves, newest first


@dataclasses.dataclass(frozen=True)
class LML(base.Solver):
  """LML (Wang et al. 2025; our equations L1-L5): moves before the wrapped solver's step at every node whose sigma
  lies in [sigma_min, sigma_max].

  ``predictor``: any solver whose iteration i is grid node i (one-step, multistep, the Langevin corrector);
  ``damping``: lambda of (L3) (inf: plain Langevin); ``rank``: outputs in G (0: plain Langevin);
  ``kappa``: weight decay over older outputs (1: equal weights); ``snr``: the move's size as in
  solvers/langevin.py; ``n_steps``: moves per node (one NFE each); ``sigma_min``, ``sigma_max``: the window.
  The final node is never corrected (a move comes before the step from its node)."""
  predictor: Any = DPMSolverMultistep(order=2)
  damping: float = 1.0
  rank: int = 1
  kappa: float = 1.0
  snr: float = 0.16
  n_steps: int = 1
  sigma_min: float = 0.0
  sigma_max: float = math.inf
  reuse: Any = None
  stochastic = True
  order = 0  # a fixed-size Langevin move keeps an O(snr^2) bias at any step count (as solvers/langevin.py)

  def __post_init__(self):
    if not isinstance(self.predictor, base.Solver) or self.predictor.adaptive:
      raise ValueError(f"predictor={self.predictor!r} must be a non-adaptive solver")
    for name in ("rank", "n_steps"):
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, int) or value < (0 if name == "rank" else 1):
        raise ValueError(f"{name}={value!r} must be an integer >= {0 if name == 'rank' else 1}")
    if not self.damping > 0:
      raise ValueError(f"damping={self.damping!r} must be > 0 (inf: plain Langevin)")
    if not 0 <= self.kappa <= 1:
      raise ValueError(f"kappa={self.kappa!r} must lie in [0, 1]")
    if not self.snr >= 0:
      raise ValueError(f"snr={self.snr!r} must be >= 0")
    base.check_options(self, (("reuse", REUSE),))
    if self.reuse is not None and not isinstance(self.predictor, REUSE_PREDICTORS):
      raise ValueError(f"reuse={self.reuse!r} needs a predictor with one model call per step: "
                       f"{', '.join(c.__name__ for c in REUSE_PREDICTORS)}")
    if not 0 <= self.sigma_min <= self.sigma_max:
      raise ValueError(f"need 0 <= sigma_min <= sigma_max, got {self.sigma_min!r}, {self.sigma_max!r}")

  def num_iterations(self, grid):
    n = self.predictor.num_iterations(grid)
    if n != grid.capacity - 1:
      raise ValueError(f"{type(self.predictor).__name__} does not step node by node; LML cannot wrap it")
    return n

  def active(self, grid, i, state):
    return self.predictor.active(grid, i, state.inner)

  def init(self, denoiser, schedule, grid, x, key):
    """The wrapped solver's state and an empty (zero) buffer of rank - 1 earlier outputs."""
    inner = self.predictor.init(denoiser, schedule, grid, x, key)
    outputs = jnp.zeros((max(self.rank - 1, 0),) + x.shape, x.dtype)
    return LMLState(x=inner.x, nfe=inner.nfe, key=key, inner=inner, outputs=outputs)

  def coefficients(self, grid, schedule):
    """The predictor's table (the moves need none)."""
    return self.predictor.coefficients(grid, schedule)

  def acts(self, grid, i):
    """Whether node i gets LML moves (traced): sigma_i inside the window and sigma_i > 0."""
    s = grid.sigma[i]
    return (s >= self.sigma_min) & (s <= self.sigma_max) & (s > 0)

  def _moves(self, denoiser, schedule, grid, i, x, nfe, outputs, key):
    x = x.astype(base.compute_dtype(x))
    sigma = grid.sigma[i].astype(x.dtype)
    sigma = jnp.where(sigma > 0, sigma, 1.0)  # acts() excludes sigma = 0; keeps the untaken branch finite under vmap
    step = 2.0 * (self.snr * sigma) ** 2
    plain = math.isinf(self.damping) or self.rank == 0
    for j in range(self.n_steps):
      before = x
      eps = denoiser.predict("eps", x, grid.t[i], schedule)
      full = jnp.concatenate([eps[None], outputs.astype(x.dtype)])  # (max(rank, 1), *x.shape), newest first
      z = base.noise(key, x, i, j + 1)  # the predictor draws from the key folded with i alone
      rank = 0 if plain else self.rank
      zeta = base.noise(key, jnp.zeros(_flat(x).shape[:1] + (rank,), x.dtype), i, j + 1, 1)
      x = lml_move(x, -eps / sigma, full[:rank], 1.0 if plain else self.damping, step, z, zeta, self.kappa)
      outputs = full[: outputs.shape[0]]
    return x, nfe + self.n_steps, outputs, eps, before

  def step(self, denoiser, schedule, grid, coeffs, i, state):
    """The LML moves (L4) at node i when ``acts``, then the predictor's step i (with ``reuse``: on the held output)."""
    inner = state.inner._replace(x=state.x, nfe=state.nfe)

    def predict(inner, x, nfe, den):
      moved = {"anchor": x} if hasattr(inner, "anchor") else {}
      return self.predictor.step(den, schedule, grid, coeffs, i, inner._replace(x=x, nfe=nfe, **moved))

    def correct(inner):
      x, nfe, outputs, eps, before = self._moves(denoiser, schedule, grid, i, state.x, state.nfe, state.outputs,
                                                 state.key)
      x = x.astype(state.x.dtype)
      if self.reuse is None:
        return predict(inner, x, nfe, denoiser), outputs.astype(state.outputs.dtype)
      held = eps if self.reuse == "eps" else predictions.convert(eps, "eps", "x0", before, grid.t[i], schedule)
      # the predictor adds the one call it believes it makes; the move already made (and counted) it
      return predict(inner, x, nfe - 1, _Reused(held, self.reuse)), outputs.astype(state.outputs.dtype)

    inner, outputs = jax.lax.cond(self.acts(grid, i), correct,
                                  lambda s: (predict(s, s.x, s.nfe, denoiser), state.outputs), inner)
    return LMLState(x=inner.x, nfe=inner.nfe, key=state.key, inner=inner, outputs=outputs)


class _Reused:
  """A denoiser answering with one held output (``kind`` x0 or eps at the moved point), calling no model."""

  def __init__(self, held, kind):
    self.held, self.kind = held, kind

  def predict(self, kind, x, t, schedule):
    return predictions.convert(self.held.astype(x.dtype), self.kind, kind, x, t, schedule).astype(x.dtype)


# The configuration the GMM sweep (docs/lml.md) found to improve on its base at NFE 5, 10 and 20 on two seeds
# (sliced W2): DDIM, damping 30, rank 1, at every node, the predictor reusing the move's x0 (no extra NFE).
base.register("ddim_lml", lambda: LML(predictor=DDIM(), damping=30.0, rank=1, reuse="x0"))

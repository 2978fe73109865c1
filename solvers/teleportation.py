"""Analytical teleportation (Wang & Vastola 2025, "The Unreasonable Effectiveness of Gaussian Score Approximation for
Diffusion Models and its Applications", TMLR 2025, arXiv 2412.09726, Sec. 3 and Sec. 6 "hybrid sampling").

At high noise the learned score is close to that of the Gaussian N(mu, Sigma) with the data's mean and covariance,
whose PF-ODE is solved in closed form. With Sigma = U diag(lambda) U^T + nu (I - U U^T) (top r eigenpairs and an
isotropic remainder nu), y = x - alpha mu, c = U^T y and r = y - U c, the flow from (alpha_a, sigma_a) to
(alpha_b, sigma_b) is (their Eq. 7 in EDM form, written here for x = alpha x0 + sigma eps)
  c_b = c sqrt((alpha_b^2 lambda + sigma_b^2) / (alpha_a^2 lambda + sigma_a^2)),  r_b likewise with nu,
  x_b = alpha_b mu + U c_b + r_b.
nu = 0 is the paper's choice for a truncated basis (the remainder then scales by sigma_b / sigma_a); ``fit_gaussian``
uses the mean of the discarded eigenvalues, which makes the full-rank and truncated fits agree on the remainder's
trace (``remainder='zero'`` gives the paper's).

``Teleport`` jumps x_T from the grid's first node to node k = round(skip * num_steps) with this map (no model call)
and runs ``inner`` on the remaining num_steps - k steps. ``skip`` is thus a fraction of the grid's steps, as in the
paper (k of N EDM steps); on a grid uniform in lambda it is the same fraction of the lambda range. The moments and
``skip`` are leaves: new ones never recompile. Moments are fitted explicitly from data samples (``fit_gaussian``);
the registered default has none and skip = 0, i.e. it is the inner solver.
"""
import dataclasses
from typing import Any, Optional

import jax
import jax.numpy as jnp

from solvers import base
from solvers import grids as grids_lib
from solvers.dpm_solver_multistep import DPMSolverMultistep
from solvers.pytree import pytree_dataclass, static_field

REMAINDERS = ("isotropic", "zero")


@pytree_dataclass
class GaussianMoments:
  """N(mean, basis diag(eigenvalues) basis^T + remainder (I - basis basis^T)) over flattened samples."""
  mean: jnp.ndarray         # (D,)
  basis: jnp.ndarray        # (D, r), orthonormal columns
  eigenvalues: jnp.ndarray  # (r,)
  remainder: jnp.ndarray    # scalar: the variance of every direction orthogonal to the basis

  def pf_ode_solution(self, x, alpha_from, sigma_from, alpha_to, sigma_to):
    """The exact PF-ODE map of this Gaussian from noise level (alpha_from, sigma_from) to (alpha_to, sigma_to);
    x is (batch, ...) with D entries per sample."""
    flat = x.reshape(x.shape[0], -1)
    y = flat - alpha_from * self.mean
    coords = y @ self.basis
    rest = y - coords @ self.basis.T

    def scale(variance):
      return jnp.sqrt((alpha_to**2 * variance + sigma_to**2) / (alpha_from**2 * variance + sigma_from**2))

    moved = alpha_to * self.mean + (coords * scale(self.eigenvalues)) @ self.basis.T + rest * scale(self.remainder)
    return moved.reshape(x.shape).astype(x.dtype)


def fit_gaussian(samples, rank=None, remainder="isotropic"):
  """The mean and the top ``rank`` (default: all) principal directions of ``samples`` (n, ...), from the SVD of the
  centred samples (never a D x D matrix); the other directions share the mean of the remaining eigenvalues
  (``remainder='isotropic'``) or get variance 0 (``'zero'``, the paper's)."""
  if remainder not in REMAINDERS:
    raise ValueError(f"remainder={remainder!r} is unknown; valid: {', '.join(REMAINDERS)}")
  flat = jnp.asarray(samples).reshape(samples.shape[0], -1)
  n, dim = flat.shape
  if n < 2:
    raise ValueError(f"fit_gaussian needs at least 2 samples, got {n}")
  most = min(n, dim)
  rank = most if rank is None else rank
  if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= most:
    raise ValueError(f"rank={rank!r} must be an integer in [1, {most}] (min(samples, dimension))")
  mean = jnp.mean(flat, axis=0)
  _, singular, vt = jnp.linalg.svd(flat - mean, full_matrices=False)
  eigenvalues = singular**2 / (n - 1)
  left_out = dim - rank
  rest = jnp.sum(eigenvalues[rank:]) / left_out if left_out and remainder == "isotropic" else 0.0
  return GaussianMoments(mean=mean, basis=vt[:rank].T, eigenvalues=eigenvalues[:rank],
                         remainder=jnp.asarray(rest, flat.dtype))


@pytree_dataclass
class Teleport(base.Solver):
  """Teleportation (Wang & Vastola 2025): a closed-form jump over the first ``skip`` fraction of the grid's steps,
  then ``inner`` (module docstring)."""
  moments: Optional[GaussianMoments] = None
  skip: Any = 0.0
  inner: Any = static_field(default=DPMSolverMultistep(order=2))

  def __post_init__(self):
    if not isinstance(self.inner, base.Solver):
      raise ValueError(f"inner={self.inner!r} must be a solver")
    leaves = jax.tree_util.tree_leaves(self.inner)
    if not (len(leaves) == 1 and leaves[0] is self.inner):
      raise ValueError(f"inner={type(self.inner).__name__} carries array leaves (learned parameters); only static "
                       "solvers can be wrapped")
    if isinstance(self.skip, (int, float)):
      if not 0.0 <= self.skip <= 1.0:
        raise ValueError(f"skip={self.skip!r} must lie in [0, 1] (a fraction of the grid's steps)")
      if self.skip > 0 and self.moments is None:
        raise ValueError(f"skip={self.skip!r} needs moments: pass moments=fit_gaussian(data samples)")

  @property
  def order(self):
    """The inner solver's order."""
    return self.inner.order

  @property
  def declared_order(self):
    """The inner solver's. A skip > 0 adds the Gaussian approximation's error over the jumped range, which does not
    shrink with the step count (exact only for Gaussian data); the registered solver has skip = 0."""
    return self.inner.declared_order

  @property
  def stochastic(self):
    """Whether the inner solver draws noise."""
    return self.inner.stochastic

  @property
  def adaptive(self):
    """Whether the inner solver chooses its own steps."""
    return self.inner.adaptive

  @property
  def superconverges_on_linear_problems(self):
    """The inner solver's (``base.Solver``)."""
    return self.inner.superconverges_on_linear_problems

  def for_order_measurement(self):
    """This wrapper around the inner solver's order-measurement configuration."""
    return dataclasses.replace(self, inner=self.inner.for_order_measurement())

  def skipped_steps(self, grid):
    """k = round(skip * num_steps): the steps jumped over (traced)."""
    return jnp.clip(jnp.round(self.skip * grid.num_steps), 0, grid.num_steps).astype(jnp.int32)

  def remaining_grid(self, grid):
    """The grid from node k on, padded like any grid (its last node repeated): what ``inner`` integrates."""
    k = self.skipped_steps(grid)
    index = jnp.minimum(k + jnp.arange(grid.capacity), grid.capacity - 1)
    return grids_lib.Grid(t=grid.t[index], alpha=grid.alpha[index], sigma=grid.sigma[index], lam=grid.lam[index],
                          num_steps=grid.num_steps - k)

  def num_iterations(self, grid):
    return self.inner.num_iterations(grid)

  def active(self, grid, i, state):
    return self.inner.active(self.remaining_grid(grid), i, state)

  def init(self, denoiser, schedule, grid, x, key):
    """The closed-form jump of x to node k (no model call), then the inner solver's state on the remaining grid."""
    if self.moments is not None:
      k = self.skipped_steps(grid)
      jumped = self.moments.pf_ode_solution(x, grid.alpha[0], grid.sigma[0], grid.alpha[k], grid.sigma[k])
      x = jnp.where(k > 0, jumped, x)
    return self.inner.init(denoiser, schedule, self.remaining_grid(grid), x, key)

  def coefficients(self, grid, schedule):
    """The inner solver's table on the remaining grid."""
    return self.inner.coefficients(self.remaining_grid(grid), schedule)

  def step(self, denoiser, schedule, grid, coeffs, i, state):
    """The inner solver's step i on the remaining grid."""
    return self.inner.step(denoiser, schedule, self.remaining_grid(grid), coeffs, i, state)


base.register("teleport_dpm_solver_pp_2m", Teleport)

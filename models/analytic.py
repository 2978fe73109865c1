"""Exact oracles: data distributions whose denoiser and probability-flow ODE are known in closed form.

For data x0 and x_t = alpha x0 + sigma eps, with any schedule of ``solvers.schedules``:
- ``Gaussian``: x0 ~ N(mean, diag(std^2)). Then x_t ~ N(alpha mean, alpha^2 std^2 + sigma^2), the
  denoiser is linear, and the PF-ODE keeps the standardised variable z = (x_t - alpha mean) / s_t,
  s_t = sqrt(alpha^2 std^2 + sigma^2), constant (the flow is the monotone map between Gaussians), so
  ``pf_ode_solution`` is exact at any t, sigma = 0 included.
- ``GMM``: x0 ~ sum_k w_k N(mean_k, diag(std_k^2)); the posterior mean E[x0 | x_t] (so eps, x0, v,
  score, velocity) is exact; its PF-ODE has no closed form (use ``solvers.reference``).
``denoiser(schedule, prediction)`` wraps either as a ``solvers.Denoiser`` whose params are the oracle and
the schedule, so it runs through every solver like a network would. A GMM is also class-conditional: a
denoiser's ``cond`` (mixture weights, e.g. ``GMM.label(k)``) replaces its weights, so ``solvers.Guided``
does classifier-free guidance with ``uncond=None`` (the unconditional mixture).
"""
import dataclasses

import jax
import jax.numpy as jnp

from solvers.predictions import Denoiser, from_x0_eps
from solvers.pytree import pytree_dataclass


class _Oracle:
  """What both oracles share: the denoiser wrapper and eps / x0 from ``x0_eps``."""

  def denoiser(self, schedule, prediction="eps"):
    """This oracle as a Denoiser predicting ``prediction``, time label t."""
    return Denoiser(apply_fn=_OracleApply(prediction), params={"oracle": self, "schedule": schedule},
                    prediction=prediction, time_label="t")

  def conditioned(self, cond):
    """This oracle under the condition ``cond``; an unconditional oracle raises a ValueError."""
    raise ValueError(f"{type(self).__name__} has no conditioning; cond must be None, got {cond!r}")

  def eps(self, x, alpha, sigma):
    """E[eps | x_t = x] at noise level (alpha, sigma)."""
    return self.x0_eps(x, alpha, sigma)[1]

  def x0(self, x, alpha, sigma):
    """E[x0 | x_t = x] at noise level (alpha, sigma) (the ideal denoiser)."""
    return self.x0_eps(x, alpha, sigma)[0]


@dataclasses.dataclass(frozen=True)
class _OracleApply:
  """apply_fn of an oracle denoiser (hashable, so jit caches on it): params = oracle and schedule,
  the label is the schedule's own time t."""
  kind: str

  def __call__(self, params, x, t, cond):
    schedule = params["schedule"]
    alpha, sigma = schedule.alpha(t), schedule.sigma(t)
    oracle = params["oracle"] if cond is None else params["oracle"].conditioned(cond)
    x0, eps = oracle.x0_eps(x, alpha, sigma)
    dalpha, dsigma = schedule.derivatives(t) if self.kind == "velocity" else (None, None)
    return from_x0_eps(self.kind, x0, eps, alpha, sigma, dalpha, dsigma).astype(x.dtype)


@pytree_dataclass
class Gaussian(_Oracle):
  """Gaussian data x0 ~ N(mean, diag(std^2)): exact denoiser and exact PF-ODE (module docstring)."""
  mean: jnp.ndarray  # (D,)
  std: jnp.ndarray   # (D,)

  def marginal_std(self, alpha, sigma):
    """The per-dimension std of x_t = alpha x0 + sigma eps: sqrt(alpha^2 std^2 + sigma^2)."""
    return jnp.sqrt(alpha**2 * self.std**2 + sigma**2)

  def x0_eps(self, x, alpha, sigma):
    """(E[x0 | x], E[eps | x]) at noise level (alpha, sigma); finite at alpha = 0 and at sigma = 0."""
    var = alpha**2 * self.std**2 + sigma**2
    resid = x - alpha * self.mean
    return self.mean + alpha * self.std**2 * resid / var, sigma * resid / var

  def pf_ode_solution(self, x_from, alpha_from, sigma_from, alpha_to, sigma_to):
    """The exact PF-ODE map from noise level (alpha_from, sigma_from) to (alpha_to, sigma_to)."""
    z = (x_from - alpha_from * self.mean) / self.marginal_std(alpha_from, sigma_from)
    return alpha_to * self.mean + self.marginal_std(alpha_to, sigma_to) * z

  def sample(self, key, n, alpha=1.0, sigma=0.0):
    """n samples of x_t at noise level (alpha, sigma); the defaults give data samples."""
    z = jax.random.normal(key, (n,) + self.mean.shape, self.mean.dtype)
    return alpha * self.mean + self.marginal_std(alpha, sigma) * z


@pytree_dataclass
class GMM(_Oracle):
  """Gaussian mixture data with diagonal components: exact posterior mean, class-conditional through
  ``cond`` weights (module docstring)."""
  weights: jnp.ndarray  # (K,), summing to one
  means: jnp.ndarray    # (K, D)
  stds: jnp.ndarray     # (K, D) or (K, 1)

  def _components(self, x, alpha, sigma):
    var = alpha**2 * self.stds**2 + sigma**2                  # (K, D)
    resid = x[..., None, :] - alpha * self.means              # (..., K, D)
    log_p = (jnp.log(self.weights) - 0.5 * jnp.sum(jnp.log(2 * jnp.pi * var) * jnp.ones_like(resid), -1)
             - 0.5 * jnp.sum(resid**2 / var, -1))             # (..., K)
    return var, resid, log_p

  def conditioned(self, weights):
    """This mixture with other component weights (the class-conditional data distribution)."""
    return self.replace(weights=jnp.asarray(weights, self.weights.dtype))

  def label(self, k):
    """One-hot weights of component k: the condition 'class k'."""
    return jnp.zeros_like(self.weights).at[k].set(1.0)

  def log_prob(self, x, alpha=1.0, sigma=0.0):
    """log p_t(x) of the noised mixture (the data density at the defaults)."""
    return jax.nn.logsumexp(self._components(x, alpha, sigma)[2], axis=-1)

  def x0_eps(self, x, alpha, sigma):
    """Exact (E[x0 | x], E[eps | x]): responsibility-weighted Gaussian posteriors."""
    var, resid, log_p = self._components(x, alpha, sigma)
    w = jax.nn.softmax(log_p, axis=-1)[..., None]             # (..., K, 1)
    x0 = jnp.sum(w * (self.means + alpha * self.stds**2 * resid / var), -2)
    eps = jnp.sum(w * (sigma * resid / var), -2)
    return x0, eps

  def sample(self, key, n, alpha=1.0, sigma=0.0, return_labels=False):
    """n draws of the noised mixture; with ``return_labels`` also each draw's component (int32)."""
    k_comp, k_noise = jax.random.split(key)
    comp = jax.random.choice(k_comp, self.weights.shape[0], (n,), p=self.weights)
    z = jax.random.normal(k_noise, (n, self.means.shape[1]), self.means.dtype)
    std = jnp.broadcast_to(self.stds, self.means.shape)[comp]
    x = alpha * self.means[comp] + jnp.sqrt(alpha**2 * std**2 + sigma**2) * z
    return (x, comp.astype(jnp.int32)) if return_labels else x


def gaussian(dim=8, seed=0, dtype=None):
  """A Gaussian with means in [-1, 1] and stds in [0.2, 1.5] (spread, so every direction matters)."""
  k1, k2 = jax.random.split(jax.random.key(seed))
  dtype = dtype or (jnp.float64 if jax.config.jax_enable_x64 else jnp.float32)
  mean = jax.random.uniform(k1, (dim,), dtype, -1.0, 1.0)
  std = jnp.exp(jax.random.uniform(k2, (dim,), dtype, jnp.log(0.2), jnp.log(1.5)))
  return Gaussian(mean=mean, std=std)


def gmm(dim=8, num_components=4, seed=0, std=0.3, dtype=None):
  """A mixture of ``num_components`` well-separated components of std ``std`` with unequal weights."""
  k1, k2 = jax.random.split(jax.random.key(seed))
  dtype = dtype or (jnp.float64 if jax.config.jax_enable_x64 else jnp.float32)
  means = 1.5 * jax.random.normal(k1, (num_components, dim), dtype) / jnp.sqrt(dim) * 2
  weights = jax.nn.softmax(jax.random.normal(k2, (num_components,), dtype) * 0.5)
  stds = jnp.full((num_components, 1), std, dtype)
  return GMM(weights=weights, means=means, stds=stds)

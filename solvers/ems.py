"""Empirical model statistics (EMS) of DPM-Solver-v3 (Zheng, Lu, Chen, Zhu 2023, "DPM-Solver-v3: Improved
Diffusion ODE Solver with Empirical Model Statistics", Sec. 3.1-3.2, Eq. 6-7, App. C).

With N = sigma eps - l x and f = N / alpha, the PF-ODE in lambda reads dx/dlambda = (alpha'/alpha - l) x - N.
The EMS are three functions of lambda, per dimension of x:
- l_lambda minimises E||grad_x N||_F^2 over the data's ODE trajectories, i.e. l = E[diag(sigma d eps / dx)]
  (exact with one jvp per dimension, or Hutchinson's estimator v * (J v) with Rademacher probes);
- (s_lambda, b_lambda) fit f' ~ s f + b by least squares per dimension, f' the total lambda-derivative of f
  along the trajectory (one jvp of the model, plus -l' x / alpha).
They live on K + 1 lambda-uniform nodes between the schedule's t_start and t_end; between nodes they are
piecewise linear, outside constant. The solver needs, per step lambda_s -> lambda_t, exact integrals of
L = int l, S = int s, e^{L + S} and B = int e^{-S} b (the paper's I, B, C and E_k of Eq. 8-9). Instead of the
official trapezoid rule on the EMS nodes (which also snaps the sampling grid to those nodes), L and S are
integrated exactly (piecewise quadratic) and the rest by Gauss-Legendre quadrature on the pieces between
the grid's nodes, its sub-steps and the EMS nodes, where every integrand is smooth: the integrals are
accurate to round-off on any grid, so the solver keeps its order on grids that are not EMS nodes.

Files: ``save`` writes an npz with the arrays and a key (``cache_key``: model id, schedule, t-range, K,
samples); ``load`` refuses a file written under another key. Writes are atomic (temp file + os.replace).
"""
import hashlib
import json
import math
import os
import tempfile

import jax
import jax.numpy as jnp
import numpy as np

from solvers import loop, schedules as schedules_lib
from solvers import grids as grids_lib
from solvers.deis import gauss_legendre
from solvers.pytree import pytree_dataclass

QUADRATURE_NODES = 8
SUBSTEPS = 4  # every grid step is split into this many quadrature pieces (more where EMS nodes fall inside)
FIELDS = ("l", "s", "b")


def _integration_matrix(nodes):
  """W[q, r] = int_0^{u_q} ell_r(u) du for the Lagrange basis ell_r on the quadrature nodes u (on [0, 1])."""
  powers = np.arange(nodes.size)
  coeffs = np.linalg.inv(nodes[:, None] ** powers[None, :])  # ell_r(u) = sum_m coeffs[m, r] u^m
  return (nodes[:, None] ** (powers + 1)[None, :] / (powers + 1)) @ coeffs


_NODES, _WEIGHTS = gauss_legendre(QUADRATURE_NODES)
_PARTIAL = _integration_matrix(_NODES)


def _lift(a, ndim):
  """a (n,) reshaped to (n, 1, ..., 1) to broadcast against per-dimension arrays of ``ndim`` extra axes."""
  return a.reshape(a.shape + (1,) * ndim)


@pytree_dataclass
class EMS:
  """Empirical model statistics l, s, b (per dimension) on increasing lambda nodes (module docstring)."""
  lam: jnp.ndarray  # (K + 1,) strictly increasing lambda nodes
  l: jnp.ndarray    # (K + 1, *event_shape)
  s: jnp.ndarray
  b: jnp.ndarray

  @classmethod
  def degenerated(cls, event_shape=()):
    """l = 1, s = b = 0 for every lambda: DPM-Solver-v3 then is DPM-Solver++ (paper, Sec. 3.4)."""
    ones = jnp.ones((2,) + tuple(event_shape), schedules_lib.table_dtype())
    return cls(lam=jnp.asarray([0.0, 1.0], ones.dtype), l=ones, s=0 * ones, b=0 * ones)

  @property
  def event_ndim(self):
    """The number of per-dimension axes of l, s, b (0 for statistics shared by every dimension)."""
    return self.l.ndim - 1

  def _locate(self, lam):
    """Cell index, clipped lambda and offset into the cell, for lambdas of any shape (flattened)."""
    clipped = jnp.clip(lam, self.lam[0], self.lam[-1])
    index = jnp.searchsorted(self.lam, clipped, side="right", method="compare_all") - 1
    index = jnp.clip(index, 0, self.lam.shape[0] - 2)
    return index, clipped, clipped - self.lam[index]

  def value(self, field, lam):
    """The piecewise-linear ``field`` ('l', 's' or 'b') at lam (n,): (n, *event_shape)."""
    values = getattr(self, field)
    index, _, offset = self._locate(lam)
    frac = _lift(offset / (self.lam[index + 1] - self.lam[index]), self.event_ndim)
    return values[index] + frac * (values[index + 1] - values[index])

  def integral(self, field, lam):
    """int_{lam_0}^{lam} field (exact for the piecewise-linear field, constant beyond the nodes): (n, *event_shape)."""
    values = getattr(self, field)
    widths = _lift(jnp.diff(self.lam), self.event_ndim)
    cumulative = jnp.concatenate([jnp.zeros_like(values[:1]), jnp.cumsum(0.5 * widths * (values[1:] + values[:-1]), 0)])
    index, clipped, offset = self._locate(lam)
    d = _lift(offset, self.event_ndim)
    inside = cumulative[index] + d * (values[index] + 0.5 * (values[index + 1] - values[index]) * d / widths[index])
    beyond = _lift(lam - clipped, self.event_ndim)
    return inside + beyond * jnp.where(_lift(lam < self.lam[0], self.event_ndim), values[0], values[-1])

  def step_integrals(self, lam_from, lam_to, moments):
    """Per-step integrals for consecutive steps lam_from -> lam_to ((n,) each, finite; steps of zero length,
    which give zeros, only at the end), with
    Phi(lam) = (L + S)(lam) - (L + S)(lam_s), tau = lam - lam_s:
      'decay_l' = e^{L_s - L_t}, 'decay_s' = e^{S_s - S_t}, 'moments'[k] = int e^Phi tau^k / k! (k < moments),
      'beta' = int_s^t e^{S_s - S} b, 'q' = int_s^t e^Phi (int_s^lam e^{S_s - S} b) dlam
    In the paper's cumulative integrals (Eq. 8-9): I_t - I_s = e^{L_s + S_s} moments[0] and
    C_t - C_s - B_s (I_t - I_s) = e^{L_s} q."""
    n, ndim = lam_from.shape[0], self.event_ndim
    forward = jnp.where(jnp.sum(lam_to - lam_from) >= 0, 1.0, -1.0)
    lo = jnp.minimum(jnp.min(lam_from), jnp.min(lam_to))
    hi = jnp.maximum(jnp.max(lam_from), jnp.max(lam_to))
    split = jnp.arange(SUBSTEPS) / SUBSTEPS
    points = jnp.concatenate([(lam_from[:, None] + (lam_to - lam_from)[:, None] * split).ravel(), lam_to,
                              jnp.clip(self.lam, lo, hi)])
    points = points[jnp.argsort(forward * points)]
    start, width = points[:-1], points[1:] - points[:-1]  # pieces, each inside one step
    step = jnp.searchsorted(forward * lam_from, forward * (start + 0.5 * width), side="right", method="compare_all")
    step = jnp.clip(step - 1, 0, n - 1)
    lam_q = start[:, None] + width[:, None] * _NODES                       # (P, Q)
    flat = lam_q.ravel()
    shape = lam_q.shape + self.l.shape[1:]
    l_int, s_int = self.integral("l", flat).reshape(shape), self.integral("s", flat).reshape(shape)
    l_from, s_from = self.integral("l", lam_from), self.integral("s", lam_from)
    l_to, s_to = self.integral("l", lam_to), self.integral("s", lam_to)
    growth = jnp.exp(l_int + s_int - (l_from + s_from)[step][:, None])    # e^Phi at the quadrature nodes
    source = jnp.exp(s_from[step][:, None] - s_int) * self.value("b", flat).reshape(shape)  # e^{S_s - S} b
    weight = _lift(width[:, None] * _WEIGHTS, ndim)
    tau = _lift(lam_q - lam_from[step][:, None], ndim)
    per_step = lambda v: jax.ops.segment_sum(v, step, num_segments=n)
    moment_list = [per_step(jnp.sum(weight * growth * tau**k, 1)) / math.factorial(k) for k in range(moments)]
    beta_piece = jnp.sum(weight * source, 1)
    before = jnp.cumsum(beta_piece, 0) - beta_piece                        # pieces before this one, all steps
    first = jnp.searchsorted(step, step, side="left", method="compare_all")
    inner = (before - before[first])[:, None] + jnp.einsum("qr,pr...->pq...", _PARTIAL, source) * _lift(width, ndim + 1)
    return {"decay_l": jnp.exp(l_from - l_to), "decay_s": jnp.exp(s_from - s_to), "moments": moment_list,
            "beta": per_step(beta_piece), "q": per_step(jnp.sum(weight * growth * inner, 1))}


def cache_key(model_id, schedule, *, t_start, t_end, num_nodes, num_samples):
  """The string a file of EMS is keyed by: model, schedule (type and leaf values), t-range, K and samples."""
  leaves, treedef = jax.tree_util.tree_flatten(schedule)
  digest = hashlib.sha256(str(treedef).encode())
  for leaf in leaves:
    digest.update(np.asarray(leaf, np.float64).tobytes())
  return json.dumps({"model": str(model_id), "schedule": f"{type(schedule).__name__}:{digest.hexdigest()[:16]}",
                     "t_start": float(t_start), "t_end": float(t_end), "K": int(num_nodes),
                     "samples": int(num_samples)}, sort_keys=True)


def save(ems, path, key):
  """Writes ``ems`` and its ``key`` to the npz file ``path`` atomically."""
  directory = os.path.dirname(os.path.abspath(path))
  handle, temporary = tempfile.mkstemp(dir=directory, suffix=".npz")
  try:
    with os.fdopen(handle, "wb") as out:
      np.savez(out, key=np.asarray(key), **{name: np.asarray(getattr(ems, name)) for name in ("lam",) + FIELDS})
    os.replace(temporary, path)
  except BaseException:
    os.unlink(temporary)
    raise


def load(path, key):
  """The EMS saved at ``path``; a ValueError naming both keys if the file was written under another key."""
  with np.load(path) as data:
    stored = str(data["key"])
    if stored != key:
      raise ValueError(f"EMS file {path!r} has key {stored} but {key} was requested")
    return EMS(**{name: jnp.asarray(data[name]) for name in ("lam",) + FIELDS})


def _diagonal_jacobian(fn, x, probes):
  """diag(d fn / dx) per sample: exact with one jvp per dimension (probes=None), else Hutchinson's
  E[v * (J v)] over Rademacher probes (a (num_probes, *x.shape) array)."""
  if probes is None:
    event = x.shape[1:]
    basis = jnp.eye(math.prod(event), dtype=x.dtype).reshape((-1,) + event)
    columns = jax.vmap(lambda e: jax.jvp(fn, (x,), (jnp.broadcast_to(e, x.shape),))[1] * e)(basis)
    return jnp.sum(columns, 0)
  return jnp.mean(jax.vmap(lambda v: v * jax.jvp(fn, (x,), (v,))[1])(probes), 0)


def _node_statistics(denoiser, schedule, lam, x, l_node, l_slope, probes):
  """(l, f, f') at one lambda node for the samples x (l_node None: only l is computed)."""
  alpha_sigma = lambda lam_: schedule.alpha_sigma_of_lambda(lam_)
  eps_at = lambda x_, lam_: denoiser.predict("eps", x_, schedule.t_of_lambda(lam_), schedule)
  (alpha, sigma), (dalpha, _) = jax.jvp(alpha_sigma, (lam,), (jnp.ones_like(lam),))
  if l_node is None:
    return jnp.mean(_diagonal_jacobian(lambda x_: sigma * eps_at(x_, lam), x, probes), 0)

  def f_of(x_, lam_):
    a, s = alpha_sigma(lam_)
    return (s * eps_at(x_, lam_) - l_node * x_) / a

  velocity = dalpha / alpha * x - sigma * eps_at(x, lam)  # dx / dlambda on the PF-ODE
  f, df = jax.jvp(f_of, (x, lam), (velocity, jnp.ones_like(lam)))
  return f, df - l_slope * x / alpha


def _least_squares(f, df):
  """Per-dimension (s, b) minimising E(df - s f - b)^2 over samples; s = 0 where f does not vary."""
  f_mean, df_mean = jnp.mean(f, 0), jnp.mean(df, 0)
  var = jnp.mean((f - f_mean) ** 2, 0)
  cov = jnp.mean((f - f_mean) * (df - df_mean), 0)
  varies = var > (1e-10 * (1.0 + jnp.abs(f_mean))) ** 2
  s = jnp.where(varies, cov / jnp.where(varies, var, 1.0), 0.0)
  return s, df_mean - s * f_mean


def compute(denoiser, schedule, x_T, *, num_nodes=120, t_start=None, t_end=None, solver="unipc_bh2_3", substeps=2,
            hutchinson_probes=None, key=None):
  """EMS of ``denoiser`` on K = ``num_nodes`` lambda-uniform intervals from t_start (default t_max) to t_end
  (default t_min), from the PF-ODE trajectories started at the samples x_T (leading axis; the paper draws
  x_T ~ N(0, sigma_T^2 I): ``prior_samples``), integrated by ``solver`` with ``substeps`` steps per EMS
  interval. ``hutchinson_probes``: None for the exact diagonal (one jvp per dimension), else that many
  Rademacher probes drawn with ``key``. l comes first, then (s, b) by least squares with l' from the nodes' l."""
  t_start = schedule.t_max if t_start is None else t_start
  t_end = schedule.t_min if t_end is None else t_end
  for name, value in (("num_nodes", num_nodes), ("substeps", substeps)):
    if not isinstance(value, int) or value < 1:
      raise ValueError(f"{name}={value!r} must be an integer >= 1")
  x_T = jnp.asarray(x_T)
  grid = grids_lib.uniform_logsnr(schedule, num_nodes * substeps, t_start=t_start, t_end=t_end)
  trajectory = loop.sample(solver, denoiser, schedule, grid, x_T, return_trajectory=True).trajectory
  xs = trajectory[::substeps][: num_nodes + 1]
  lam = grid.lam[: num_nodes * substeps + 1: substeps]
  probes = None
  if hutchinson_probes is not None:
    probe_key = jax.random.key(0) if key is None else key
    probes = jax.random.rademacher(probe_key, (int(hutchinson_probes),) + x_T.shape, x_T.dtype)
  return _statistics(denoiser, schedule, lam, xs, probes)


@jax.jit
def _statistics(denoiser, schedule, lam, xs, probes):
  """The EMS at the nodes lam from the trajectories' points xs (K + 1, samples, *event_shape)."""
  l = jax.vmap(lambda lam_, x_: _node_statistics(denoiser, schedule, lam_, x_, None, None, probes))(lam, xs)
  l_slope = jnp.gradient(l, lam, axis=0)
  f, df = jax.vmap(lambda *a: _node_statistics(denoiser, schedule, *a, probes))(lam, xs, l, l_slope)
  s, b = jax.vmap(_least_squares)(f, df)
  return EMS(lam=lam, l=l, s=s, b=b)


def prior_samples(schedule, key, num_samples, event_shape, t_start=None):
  """x_T ~ N(0, sigma(t_start)^2 I), the paper's starting points of the EMS trajectories."""
  t_start = schedule.t_max if t_start is None else t_start
  sigma = schedule.sigma(jnp.asarray(t_start, schedules_lib.table_dtype()))
  return sigma * jax.random.normal(key, (num_samples,) + tuple(event_shape), schedules_lib.table_dtype())


def cached(path, model_id, denoiser, schedule, x_T, **options):
  """The EMS stored at ``path`` under this model / schedule / range / K / samples, computing and saving them
  first if the file does not exist (a file with another key raises)."""
  t_start, t_end = options.get("t_start"), options.get("t_end")
  key = cache_key(model_id, schedule, t_start=schedule.t_max if t_start is None else t_start,
                  t_end=schedule.t_min if t_end is None else t_end, num_nodes=options.get("num_nodes", 120),
                  num_samples=x_T.shape[0])
  if os.path.exists(path):
    return load(path, key)
  ems = compute(denoiser, schedule, x_T, **options)
  save(ems, path, key)
  return ems


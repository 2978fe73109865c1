"""DC-Solver: dynamic compensation of a multistep (predictor-corrector) sampler (Zhao, Wang, Zhou & Lu 2024,
"DC-Solver: Improving Predictor-Corrector Diffusion Sampler via Dynamic Compensation", ECCV, arXiv 2409.03755;
the method is its Sec. 3. The equation numbers cited here (Eq. 9-12) were not re-checked against the text.)

Dynamic compensation (Eq. 9-10): before the predictor step from node i, the newest model output m_i
is replaced by the Lagrange interpolant in time through the last K + 1 outputs (K = ``dc_order``),
  m_i <- sum_{k=0..K} L_k(t~) m_{i-k},  L_k(t~) = prod_{j != k} (t~ - t_{i-j}) / (t_{i-k} - t_{i-j}),
evaluated at t~ = rho_i t_i + (1 - rho_i) t_{i-1}, so rho_i = 1 leaves m_i unchanged. As in the official code,
the corrector of step i-1 -> i (UniC) still sees the raw m_i; the compensated value then replaces it in the
history, where the predictor, the next corrector and later compensations use it. No extra model call.
Steps with fewer than K + 1 outputs so far are not compensated.

Here the L_k(t~) are one more row of the solver's table (``coefficients``), computed from the ``ratios`` leaf:
the solver is a pytree, so new ratios never recompile and ``jax.grad`` reaches them (ratio search).
The wrapped solver is UniPC (the paper's predictor-corrector; default: data prediction, B(h) = expm1, order 2,
as the official diffusers scheduler) or, as a plug-in, a predictor-only multistep DPM-Solver(++).

Ratio search (Eq. 11): ``fit_ratios`` optimises all ratios jointly with AdamW on the sum over nodes of
the mean squared distance between the sampler's trajectory and a reference trajectory at the same times, through
the differentiable loop. The paper searches them greedily, one step at a time, against the corrected x; the joint
loss is cheaper (one compiled loss for every step) and sees how a ratio affects later steps.
Cascade polynomial regression (Eq. 12): ``CPR`` predicts the ratios for unseen step counts and guidance
scales from a polynomial in (step fraction, NFE, guidance) fitted by least squares to searched ratios.
"""
import dataclasses
import functools
import json
import os
import tempfile
import time
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from solvers import base, ems, loop, reference
from solvers import grids as grids_lib
from solvers.dpm_solver_multistep import DPMSolverMultistep
from solvers.pytree import pytree_dataclass, static_field
from solvers.unipc import UniPC

DC_ORDERS = (1, 2, 3)
BOUNDS = ("tanh", "none")
# Scales of the CPR features (the official code's choice): guidance / 12 and NFE / 50.
_GUIDANCE_SCALE, _NFE_SCALE = 12.0, 50.0


def lagrange_weights(t, ratios, dc_order):
  """(L, dc_order + 1) weights of m_i, m_{i-1}, ... giving the compensated m_i of row i (Eq. 9-10).

  Row i interpolates through (t_{i-k}, m_{i-k}), k = 0..dc_order, at t~ = ratios[i] t_i + (1 - ratios[i]) t_{i-1};
  rows with i < dc_order (not enough history) and rows whose nodes coincide (grid padding) are e_0."""
  length = ratios.shape[0]
  nodes = jnp.stack([jnp.concatenate([jnp.full((k,), t[0]), t[: length - k]]) for k in range(dc_order + 1)], -1)
  target = ratios * nodes[:, 0] + (1.0 - ratios) * nodes[:, 1]
  eligible = jnp.arange(length) >= dc_order
  for a in range(dc_order + 1):
    for b in range(a + 1, dc_order + 1):
      eligible = eligible & (nodes[:, a] != nodes[:, b])
  safe_nodes = jnp.where(eligible[:, None], nodes, jnp.arange(dc_order + 1, dtype=nodes.dtype))
  weights = []
  for k in range(dc_order + 1):
    w = jnp.ones_like(target)
    for j in range(dc_order + 1):
      if j != k:
        w = w * (target - safe_nodes[:, j]) / (safe_nodes[:, k] - safe_nodes[:, j])
    weights.append(w)
  identity = jnp.zeros((dc_order + 1,), t.dtype).at[0].set(1.0)
  return jnp.where(eligible[:, None], jnp.stack(weights, -1), identity)


@pytree_dataclass
class DCSolver(base.Solver):
  """DC-Solver (Zhao et al. 2024): ``inner`` with dynamic compensation (Eq. 9-10); ``ratios`` (capacity - 1,)
  is a traced leaf (None: all 1)."""
  ratios: Optional[jnp.ndarray] = None
  inner: Any = static_field(default=UniPC())
  dc_order: int = static_field(default=2)

  def __post_init__(self):
    if not isinstance(self.inner, (UniPC, DPMSolverMultistep)):
      raise ValueError(f"inner={self.inner!r} is not supported; valid: a UniPC or a DPMSolverMultistep")
    base.check_options(self, (("dc_order", DC_ORDERS),))
    if self.ratios is not None and isinstance(self.ratios, (np.ndarray, jnp.ndarray)) and self.ratios.ndim != 1:
      raise ValueError(f"ratios must be a 1-D array (one per grid step), got shape {self.ratios.shape}")

  @property
  def order(self):
    """The wrapped solver's order."""
    return self.inner.order

  @property
  def declared_order(self):
    """The wrapped solver's: with rho = 1 DC-Solver is that solver. A fixed rho != 1 perturbs m_i by O(h) with
    an O(h) weight, so searched ratios make the method formally first order (spec section 9)."""
    return self.inner.declared_order

  @property
  def superconverges_on_linear_problems(self):
    """The wrapped solver's (``base.Solver``)."""
    return self.inner.superconverges_on_linear_problems

  def for_order_measurement(self):
    """This solver around the wrapped solver's order-measurement configuration."""
    return dataclasses.replace(self, inner=self.inner.for_order_measurement())

  def _history(self, inner_history):
    return max(inner_history, self.dc_order + 1)

  def init(self, denoiser, schedule, grid, x, key):
    """The wrapped solver's state, its history buffer widened to dc_order + 1 outputs."""
    state = self.inner.init(denoiser, schedule, grid, x, key)
    extra = self._history(state.hist.shape[0]) - state.hist.shape[0]
    return state._replace(hist=jnp.pad(state.hist, ((0, extra),) + ((0, 0),) * x.ndim))

  def coefficients(self, grid, schedule):
    """The wrapped solver's rows (widened) and the compensation's Lagrange weights (``lagrange_weights``)."""
    rows = self.inner.coefficients(grid, schedule)
    length = grid.capacity - 1
    if self.ratios is None:
      ratios = jnp.ones((length,), grid.t.dtype)
    else:
      if self.ratios.shape != (length,):
        raise ValueError(f"ratios has shape {self.ratios.shape}; this grid needs ({length},) (capacity - 1)")
      ratios = jnp.asarray(self.ratios, grid.t.dtype)
    # The inner rows' history weights (the 2-D entries) widen to the longer buffer with zeros.
    size = self._history(max(r.shape[1] for r in rows.values() if r.ndim == 2))
    padded = {k: jnp.pad(r, ((0, 0), (0, size - r.shape[1]))) if r.ndim == 2 else r for k, r in rows.items()}
    dc = lagrange_weights(grid.t, ratios, self.dc_order)
    return {"inner": padded, "dc": jnp.pad(dc, ((0, 0), (0, size - dc.shape[1])))}

  def step(self, denoiser, schedule, grid, coeffs, i, state):
    """The inner step with the raw m_i, then the compensation folded in: the predictor is linear in m_i, so
    x moves by (its weight on m_i) x (compensated - raw m_i), and the compensated value replaces m_i."""
    new = self.inner.step(denoiser, schedule, grid, coeffs["inner"], i, state)
    dc = base.cast_coefficients(coeffs["dc"], state.x)
    inner = base.cast_coefficients(coeffs["inner"], state.x)
    compensated = dc[0] * new.hist[0]
    for k in range(1, new.hist.shape[0]):
      compensated = compensated + dc[k] * new.hist[k]
    change = compensated - new.hist[0]
    hist = new.hist.at[0].set(compensated.astype(state.x.dtype))
    if isinstance(self.inner, UniPC):  # the anchor is the corrected point, which used the raw m_i
      x = (new.x + inner["pred_hist"][0] * change).astype(state.x.dtype)
      return new._replace(x=x, hist=hist)
    x = (new.x + inner["hist"][0] * change).astype(state.x.dtype)
    return new._replace(x=x, anchor=jnp.where(inner["end"] > 0, x, new.anchor), hist=hist)


  def prepare(self, denoiser, schedule, grid, x_T, key, *, num_samples=10, **fit_options):
    """This solver with ratios searched for ``grid`` (``fit_ratios`` against ``reference_trajectory``) on
    ``num_samples`` prior samples x_T ~ N(0, sigma_T^2 I) drawn with ``key`` (the paper uses ~10 datapoints).

    Where the search does not lower the training loss below that of rho = 1 (at high NFE, where Adam's steps
    are coarser than the optimum's distance from 1), the ratios stay 1."""
    samples = ems.prior_samples(schedule, key, num_samples, x_T.shape[1:], t_start=float(grid.t[0])).astype(x_T.dtype)
    target = reference_trajectory(denoiser, schedule, grid, samples)
    ratios, info = fit_ratios(self, denoiser, schedule, grid, samples, target, **fit_options)
    return with_ratios(self, ratios if info["final_loss"] < info["initial_loss"] else jnp.ones_like(ratios))


def with_ratios(solver, ratios):
  """``solver`` with new ratios (an array, one per grid step)."""
  return dataclasses.replace(solver, ratios=jnp.asarray(ratios))


def reference_trajectory(denoiser, schedule, grid, x_T, *, substeps=40, solver=None):
  """(num_steps + 1, *x_T.shape): x along the PF-ODE through x_T at the grid's real nodes.

  A fine run (each interval split into ``substeps`` equal lambda steps, UniPC-3 by default) gives the nodes; a
  final jump to sigma = 0 is integrated with the diffrax reference instead (the paper uses a 200-step DDIM run)."""
  if not isinstance(substeps, int) or substeps < 1:
    raise ValueError(f"substeps={substeps!r}: must be an integer >= 1")
  steps = int(grid.num_steps)
  zero = float(grid.sigma[steps]) == 0.0
  finite = steps - 1 if zero else steps
  t, lam = np.asarray(grid.t, np.float64), np.asarray(grid.lam, np.float64)
  points = [jnp.asarray(x_T)]
  if finite > 0:
    u = np.arange(substeps) / substeps
    fine_lam = np.concatenate([lam[n] + u * (lam[n + 1] - lam[n]) for n in range(finite)] + [lam[finite: finite + 1]])
    times = np.array(schedule.t_of_lambda(jnp.asarray(fine_lam)), np.float64)
    times[::substeps] = t[: finite + 1]  # the coarse nodes exactly
    fine = grids_lib.from_times(schedule, times)
    solver = solver or UniPC(order=3, lower_order_final=False)
    run = loop.sample(solver, denoiser, schedule, fine, x_T, return_trajectory=True)
    points = list(run.trajectory[: finite * substeps + 1: substeps])
  if zero:
    points.append(reference.solve(denoiser, schedule, points[-1], grid.t[finite], "zero"))
  return jnp.stack(points)


def _bounded(params, bound):
  """Ratios from the optimised parameters: 1 + tanh(theta) / 2 in (0.5, 1.5) (the official 'tanh' bound), or theta."""
  return 1.0 + 0.5 * jnp.tanh(params) if bound == "tanh" else params


def _trajectory_loss(params, solver, denoiser, schedule, grid, x_T, target, bound):
  """sum over the real nodes n >= 1 of the mean squared distance to target_n (target padded to the capacity)."""
  run = with_ratios(solver, _bounded(params, bound))
  trajectory = loop.sample(run, denoiser, schedule, grid, x_T, return_trajectory=True).trajectory
  nodes = jnp.arange(grid.capacity)
  weights = ((nodes >= 1) & (nodes <= grid.num_steps)).astype(trajectory.dtype)
  return jnp.sum(weights * jnp.mean((trajectory - target) ** 2, axis=tuple(range(1, x_T.ndim + 1))))


@functools.partial(jax.jit, static_argnames=("bound", "learning_rate"))
def _adamw_update(params, opt_state, solver, denoiser, schedule, grid, x_T, target, bound, learning_rate):
  value, grad = jax.value_and_grad(_trajectory_loss)(params, solver, denoiser, schedule, grid, x_T, target, bound)
  changes, opt_state = optax.adamw(learning_rate).update(grad, opt_state, params)
  return optax.apply_updates(params, changes), opt_state, value


def fit_ratios(solver, denoiser, schedule, grid, x_T, target, *, learning_rate=0.1, iterations=40, bound="tanh"):
  """Ratios minimising sum_n mean |x_n - target_n|^2 over the real nodes n = 1..num_steps (Eq. 11), by AdamW.

  x_n is the loop's trajectory: for UniPC the predicted point, before UniC corrects it at the next model call (the
  paper's loss uses the corrected point; the final sample, never corrected, is the same either way).
  ``target``: (num_steps + 1, *x_T.shape), e.g. ``reference_trajectory``. Starts from rho = 1 (theta = 0 with the
  tanh bound, as the official code). One compilation serves every grid of a capacity. Returns (ratios, info) with
  the loss before and after and the seconds taken."""
  if bound not in BOUNDS:
    raise ValueError(f"bound={bound!r} is unknown; valid: {', '.join(BOUNDS)}")
  steps = int(grid.num_steps)
  if target.shape != (steps + 1,) + tuple(x_T.shape):
    raise ValueError(f"target has shape {target.shape}; expected {(steps + 1,) + tuple(x_T.shape)}")
  if not (isinstance(iterations, int) and iterations >= 1 and learning_rate > 0):
    raise ValueError(f"iterations={iterations!r} must be an integer >= 1 and learning_rate={learning_rate!r} > 0")
  started = time.perf_counter()
  target = jnp.pad(target, ((0, grid.capacity - steps - 1),) + ((0, 0),) * x_T.ndim, mode="edge")
  length = grid.capacity - 1
  params = jnp.zeros((length,)) if bound == "tanh" else jnp.ones((length,))
  opt_state = optax.adamw(learning_rate).init(params)
  losses = []
  for _ in range(iterations):
    params, opt_state, value = _adamw_update(params, opt_state, solver, denoiser, schedule, grid, x_T, target,
                                             bound, learning_rate)
    losses.append(value)
  ratios = _bounded(params, bound)
  final = _trajectory_loss(params, solver, denoiser, schedule, grid, x_T, target, bound)
  info = {"initial_loss": float(losses[0]), "final_loss": float(final), "seconds": time.perf_counter() - started}
  return ratios, info


def _cpr_features(step_fraction, num_steps, guidance, degree):
  """(n, degree + 1, 3, 3) features x^q C^(2-m) M^(2-n) of Eq. 12, x = k / NFE, C = guidance / 12, M = NFE / 50."""
  x = np.asarray(step_fraction, np.float64)[:, None, None, None]
  c = (np.asarray(guidance, np.float64) / _GUIDANCE_SCALE)[:, None, None, None]
  m = (np.asarray(num_steps, np.float64) / _NFE_SCALE)[:, None, None, None]
  q, powers = np.arange(degree + 1)[:, None, None], 2 - np.arange(3)
  return x**q * c ** powers[:, None] * m ** powers[None, :]


@dataclasses.dataclass(frozen=True)
class CPR:
  """Cascade polynomial regression (Eq. 12): rho(k, NFE, guidance) = sum_q x^q sum_m C^(2-m) sum_n c[q,m,n] M^(2-n)
  for the compensated steps k > dc_order (1-based), 1 before. ``coefficients``: (degree + 1, 3, 3)."""
  coefficients: np.ndarray
  dc_order: int = 2

  @classmethod
  def fit(cls, searched, dc_order=2, degree=3):
    """Least squares over searched ratios: ``searched`` = [(ratios, num_steps, guidance), ...], ratios[i] of step
    i + 1. Terms the data cannot identify (e.g. guidance terms when one scale is given) get the minimum-norm fit."""
    rows, values = [], []
    for ratios, num_steps, guidance in searched:
      k = np.arange(dc_order + 1, num_steps + 1)
      rows.append(_cpr_features(k / num_steps, np.full(k.shape, num_steps), np.full(k.shape, guidance), degree))
      values.append(np.asarray(ratios, np.float64)[k - 1])
    design = np.concatenate(rows).reshape(-1, (degree + 1) * 9)
    solution = np.linalg.lstsq(design, np.concatenate(values), rcond=None)[0]
    return cls(coefficients=solution.reshape(degree + 1, 3, 3), dc_order=dc_order)

  def ratios(self, num_steps, capacity, guidance=0.0):
    """(capacity - 1,) ratios for a grid of ``num_steps`` steps at ``guidance`` (1 where not compensated)."""
    if num_steps < 1 or capacity < num_steps + 1:
      raise ValueError(f"num_steps={num_steps!r}, capacity={capacity!r}: need 1 <= num_steps < capacity")
    k = np.arange(self.dc_order + 1, num_steps + 1)
    features = _cpr_features(k / num_steps, np.full(k.shape, num_steps), np.full(k.shape, guidance),
                             self.coefficients.shape[0] - 1)
    out = np.ones(capacity - 1)
    out[k - 1] = np.einsum("iqmn,qmn->i", features, self.coefficients)
    return out


def settings(solver):
  """What learned ratios depend on besides the grid: the wrapped solver and dc_order."""
  return json.dumps({"inner": repr(solver.inner), "dc_order": solver.dc_order}, sort_keys=True)


def save(path, solver, cpr=None):
  """Writes the solver's ratios (if any) and CPR coefficients (if any) with its settings to ``path`` (.npz),
  atomically (a temporary file in the same folder, then os.replace)."""
  arrays = {"settings": np.asarray(settings(solver))}
  if solver.ratios is not None:
    arrays["ratios"] = np.asarray(solver.ratios, np.float64)
  if cpr is not None:
    if cpr.dc_order != solver.dc_order:
      raise ValueError(f"cpr.dc_order={cpr.dc_order} differs from the solver's dc_order={solver.dc_order}")
    arrays["cpr"] = np.asarray(cpr.coefficients, np.float64)
  folder = os.path.dirname(os.path.abspath(path))
  handle, temporary = tempfile.mkstemp(dir=folder, suffix=".npz")
  try:
    with os.fdopen(handle, "wb") as f:
      np.savez(f, **arrays)
    os.replace(temporary, path)
  except BaseException:
    os.unlink(temporary)
    raise


def load(path, solver):
  """(solver with the saved ratios, CPR or None) from ``path``; ValueError if it was saved for other settings."""
  with np.load(path, allow_pickle=False) as data:
    saved = str(data["settings"])
    if saved != settings(solver):
      raise ValueError(f"{path} holds ratios for {saved}, not for {settings(solver)}")
    ratios = jnp.asarray(data["ratios"]) if "ratios" in data else solver.ratios
    cpr = CPR(coefficients=np.array(data["cpr"]), dc_order=solver.dc_order) if "cpr" in data else None
  return dataclasses.replace(solver, ratios=ratios), cpr


base.register("dc_solver", DCSolver)

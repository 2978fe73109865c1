"""Singlestep DPM-Solver (noise prediction) and DPM-Solver++ (data prediction), orders 1-3.

Lu et al. 2022, "DPM-Solver: A Fast ODE Solver for Diffusion Probabilistic Model Sampling in Around 10
Steps" (NeurIPS), Algorithms 1 and 2 (DPM-Solver-2 / -3), Sec. 3.4 (DPM-Solver-fast) and App. B; Lu et al.
2022, "DPM-Solver++", Algorithm 1 (2S). A group of order k goes from s to t, h = lambda_t - lambda_s, in k
model evaluations at s = s_0 < s_1 < ... < s_{k-1}, r_i = (lambda_{s_i} - lambda_s) / h. With m the model
output (x0 for ++, eps otherwise), Delta_i = m_{s_i} - m_s and the weights a_k / b_k of solvers.exponential
(data form shown; the noise form replaces sigma_t / sigma_s by alpha_t / alpha_s and + alpha_t a_k by
- sigma_t b_k):
  order 1:  x_t = (sigma_t / sigma_s) x_s + alpha_t a1(h) m_s                           (DDIM)
  order 2:  u_1 = order-1 step to s_1;  x_t = (order 1) + alpha_t c Delta_1,
            'midpoint' (official 'dpmsolver'): c = a1(h) / (2 r1);  'heun' (official 'taylor'): c = a2(h) / r1
  order 3:  u_1 as above;  u_2 = (sigma_2 / sigma_s) x_s + alpha_2 (a1(r2 h) m_s + (r2 / r1) a2(r2 h) Delta_1)
            (the 'taylor' form for both solver types, as the official code; diffusers' 'midpoint' uses the
            midpoint form here, so diffusers 'heun' = official 'taylor' but diffusers 'midpoint' != official
            'dpmsolver' at order 3);
            'midpoint': x_t = (order 1) + alpha_t a2(h) Delta_2 / r2;
            'heun':     D1_0 = Delta_1 / r1, D1_1 = Delta_2 / r2, D1 = (r2 D1_0 - r1 D1_1) / (r2 - r1),
                        D2 = 2 (D1_1 - D1_0) / (r2 - r1),  x_t = (order 1) + alpha_t (a2(h) D1 + a3(h) D2).
The 'heun' forms are exact when m is a polynomial of degree k - 1 in lambda; 'midpoint' ones are of the
same order.

The grid lists every evaluation point: a group of order k spans k consecutive grid intervals starting at
node s, and its inner points are the nodes in between, so r_i come from the grid (as the official code with
skip_type 'time_uniform' / 'time_quadratic' and diffusers' DPMSolverSinglestepScheduler, which both step on
the global grid). NFE = grid.num_steps and one loop iteration is one model evaluation, run by the
table-driven ``exponential.table_step``. For the official skip_type='logSNR' placement (outer intervals
uniform in lambda, inner points at r = 1/2 or 1/3, 2/3) build the grid with ``official_logsnr_grid``.

Group orders (``schedule``), for N = num_steps:
- ``'official'`` (DPM-Solver-fast, official ``method='singlestep'``): order 3: K = N // 3 + 1 groups,
  N % 3 == 0: [3] * (K - 2) + [2, 1]; == 1: [3] * (K - 1) + [1]; == 2: [3] * (K - 1) + [2];
  order 2: [2] * (N / 2) for even N, [2] * (N // 2) + [1] for odd N; order 1: [1] * N.
- ``'fixed'``: [order] * (N // order) + [N % order] (official ``singlestep_fixed`` when order divides N; the
  official one drops the remainder instead).
- ``'max_order'``: groups of ``order`` and, where N % order != 0, the fewest lower-order groups with none of
  order 1 when that is possible (order 3, N % 3 == 1: [3] * (N // 3 - 1) + [2, 2]). A single first-order
  group adds O(h^2) to the global error, so this is the configuration the declared order is measured on
  (``for_order_measurement``); order 2 with odd N still needs one first-order group.
- ``'diffusers'``: DPMSolverSinglestepScheduler's ``order_list`` with ``lower_order_final=True`` (which it
  forces whenever N % order != 0): the official list except order 2 with even N, where diffusers gives
  [2] * (N / 2 - 1) + [1, 1]. Its ``lower_order_final=False`` with N % order == 0 is ``'fixed'``.
A group whose last stage lands on sigma = 0 (``final='zero'``: h = inf, so r_i = 0 and the order-k terms
are undefined) has order k > 1 split into [k - 1, 1] (diffusers #9104 forces the same last order 1).
The per-iteration group start, stage and order are computed from the traced num_steps with jnp
(cumsum / searchsorted), so one compilation serves every N.
"""
import dataclasses

import jax.numpy as jnp
import numpy as np

from solvers import base, exponential, grids, predictions
from solvers import schedules as schedules_lib

PREDICTIONS = ("data", "noise")
SOLVER_TYPES = ("midpoint", "heun")
SCHEDULES = ("official", "fixed", "diffusers", "max_order")


def group_orders(num_steps, length, order, schedule="official", zero_target=False):
  """The order of each stage group, (length,) int32, zero past the last group (num_steps may be traced).

  ``zero_target``: the last node has sigma = 0, so a last group of order k > 1 becomes [k - 1, 1]."""
  if order not in (1, 2, 3):
    raise ValueError(f"order={order!r} is not supported; valid: 1, 2, 3")
  if schedule not in SCHEDULES:
    raise ValueError(f"schedule={schedule!r} is unknown; valid: {', '.join(SCHEDULES)}")
  n = jnp.asarray(num_steps, jnp.int32)
  m, rem = n // order, n % order
  no_rem = rem == 0
  if order == 1:
    full, tail1, tail2 = n, 0, 0
  elif schedule == "fixed" or (order == 2 and schedule in ("official", "max_order")):
    full, tail1, tail2 = m, rem, 0
  elif schedule == "max_order":  # order 3: a remainder of 1 becomes [2, 2] (except N = 1)
    split = (rem == 1) & (m > 0)
    full, tail1, tail2 = jnp.where(split, m - 1, m), jnp.where(split, 2, rem), jnp.where(split, 2, 0)
  elif order == 3:  # official and diffusers agree
    full, tail1, tail2 = jnp.where(no_rem, m - 1, m), jnp.where(no_rem, 2, rem), jnp.where(no_rem, 1, 0)
  else:  # order 2, diffusers: even N ends in [1, 1]
    full, tail1, tail2 = jnp.where(no_rem, m - 1, m), 1, jnp.where(no_rem, 1, 0)
  g = jnp.arange(length)
  orders = jnp.where(g < full, order, jnp.where(g == full, tail1, jnp.where(g == full + 1, tail2, 0)))
  last = jnp.sum(orders > 0) - 1
  k_last = orders[jnp.maximum(last, 0)]
  split = jnp.asarray(zero_target) & (k_last > 1)
  orders = jnp.where(split & (g == last), k_last - 1, orders)
  orders = jnp.where(split & (g == last + 1), 1, orders)
  return orders.astype(jnp.int32)


def stage_arrays(orders, num_steps):
  """Per iteration i (one model evaluation at node i): (group start node, stage in the group, group order).

  Iterations past num_steps get (i, 0, 1), a harmless first-order row."""
  length = orders.shape[0]
  ends = jnp.cumsum(orders)
  i = jnp.arange(length)
  g = jnp.clip(jnp.searchsorted(ends, i, side="right"), 0, length - 1)
  k = orders[g]
  valid = i < num_steps
  start = jnp.where(valid, ends[g] - k, i)
  k = jnp.where(valid, k, 1)
  return start, i - start, k


def stage_weights(k, stage, solver_type, w1, w2, w3, r1, r2):
  """Weights of (m_s, m_{s1}, m_{s2}), shape (..., 3), of the stage that follows evaluation ``stage`` of a group
  of order ``k`` (see the module docstring); w_j are a_j / b_j at the step from s to that stage's target.

  The data form is x' = (sigma' / sigma_s) x_s + alpha' * (weights . m), the noise form
  x' = (alpha' / alpha_s) x_s - sigma' * (weights . m)."""
  w1, w2, w3, r1, r2 = (jnp.asarray(v)[..., None] for v in (w1, w2, w3, r1, r2))
  e0 = jnp.array([1.0, 0.0, 0.0])
  d1 = jnp.array([-1.0, 1.0, 0.0])  # Delta_1
  d2 = jnp.array([-1.0, 0.0, 1.0])  # Delta_2
  first = w1 * e0
  inner2 = first + (r2 / r1) * w2 * d1  # u_2 (taylor form, both solver types)
  if solver_type == "midpoint":
    final2 = first + w1 / (2.0 * r1) * d1
    final3 = first + w2 / r2 * d2
  else:
    d1_0, d1_1 = d1 / r1, d2 / r2
    big_d1 = (r2 * d1_0 - r1 * d1_1) / (r2 - r1)
    big_d2 = 2.0 * (d1_1 - d1_0) / (r2 - r1)
    final2 = first + w2 / r1 * d1
    final3 = first + w2 * big_d1 + w3 * big_d2
  k, stage = jnp.asarray(k)[..., None], jnp.asarray(stage)[..., None]
  out = jnp.where((stage == 1) & (k == 3), inner2, first)
  out = jnp.where((stage == 1) & (k == 2), final2, out)
  return jnp.where((stage == 2) & (k == 3), final3, out)


def phi_weights(prediction, h):
  """(w1, w2, w3) = (a1, a2, a3)(h) for data prediction, (b1, b2, b3)(h) for noise prediction."""
  weight = exponential.data_weight if prediction == "data" else exponential.noise_weight
  return tuple(weight(j, h) for j in (1, 2, 3))


@dataclasses.dataclass(frozen=True)
class DPMSolverSinglestep(base.Solver):
  """Singlestep DPM-Solver-k (``prediction='noise'``; Lu et al. 2022a, Alg. 1-2) and DPM-Solver++(kS) (``'data'``;
  Lu et al. 2022b, Alg. 1 for 2S), k = ``order`` 1-3, stage groups laid out by ``schedule`` (module docstring)."""
  order: int = 2
  prediction: str = "data"
  solver_type: str = "midpoint"
  schedule: str = "official"
  thresholding: bool = False
  threshold_ratio: float = 0.995
  threshold_max_val: float = 1.0
  threshold_semantics: str = "imagen"

  def __post_init__(self):
    if self.order not in (1, 2, 3):
      raise ValueError(f"order={self.order!r} is not supported; valid: 1, 2, 3")
    base.check_options(self, (("prediction", PREDICTIONS), ("solver_type", SOLVER_TYPES), ("schedule", SCHEDULES),
                              ("threshold_semantics", predictions.THRESHOLD_SEMANTICS)))

  def for_order_measurement(self):
    """This solver with the ``'max_order'`` group schedule (the fewest lower-order groups)."""
    return dataclasses.replace(self, schedule="max_order")

  @property
  def superconverges_on_linear_problems(self):
    """Data-prediction 3S midpoint measures order ~3.5 on the battery's Gaussian at 40-160 NFE (13-53 steps):
    it is third order only through r2 = 2/3 + O(h) on a non-uniform grid, and its errors fall by 3.6, 3.5, 3.4,
    3.2 (log2) per doubling from 48 to 768 NFE, towards 3 from above (on a lambda-uniform grid 2.4, 2.75, 2.9,
    2.95, from below). Its order 3 is checked there at 96-384 NFE in tests/test_dpm_solver_singlestep.py."""
    return self.order == 3 and self.prediction == "data" and self.solver_type == "midpoint"

  def init(self, denoiser, schedule, grid, x, key):
    """A ``MultistepState`` whose buffer holds the current group's ``order`` stage outputs."""
    return exponential.init_state(x, self.order, key)

  def stages(self, grid):
    """(start, stage, group order) per iteration for this grid (see ``stage_arrays``)."""
    n = grid.num_steps
    orders = group_orders(n, grid.capacity - 1, self.order, self.schedule, grid.sigma[n] == 0)
    return stage_arrays(orders, n)

  def coefficients(self, grid, schedule):
    """One table row per model evaluation: anchor = the group start, weights of the group's outputs so far."""
    start, stage, k = self.stages(grid)
    length, last = start.shape[0], grid.capacity - 1
    lam, alpha, sigma = grid.lam, grid.alpha, grid.sigma
    i = jnp.arange(length)
    valid = i < grid.num_steps
    lam_s, a_s, s_s = lam[start], alpha[start], sigma[start]
    a_t, s_t = alpha[i + 1], sigma[i + 1]
    h_t = lam[i + 1] - lam_s  # from the group start to this stage's target
    # r_i of the group (inner nodes over its full step); unused entries get harmless values.
    h = jnp.where(k >= 2, lam[jnp.minimum(start + k, last)] - lam_s, 1.0)
    r1 = jnp.where(k >= 2, (lam[jnp.minimum(start + 1, last)] - lam_s) / h, 0.5)
    r2 = jnp.where(k >= 3, (lam[jnp.minimum(start + 2, last)] - lam_s) / h, 2.0)
    w = stage_weights(k, stage, self.solver_type, *phi_weights(self.prediction, h_t), r1, r2)
    # Newest first: hist[q] holds the output of stage (stage - q) of the group.
    cols = [jnp.where(stage >= q, jnp.take_along_axis(w, jnp.maximum(stage - q, 0)[:, None], 1)[:, 0], 0.0)
            for q in range(self.order)]
    weights = jnp.stack(cols, -1)
    e0 = jnp.zeros_like(weights).at[:, 0].set(1.0)
    if self.prediction == "data":
      anchor, hist = s_t / s_s, a_t[:, None] * weights
    else:
      # sigma_t = 0 (a first-order last stage): -sigma_t b1(h) has the finite limit -alpha_t sigma_s / alpha_s.
      anchor = a_t / a_s
      hist = jnp.where((s_t > 0)[:, None], -s_t[:, None] * weights, (-a_t * s_s / a_s)[:, None] * e0)
    return {"anchor": jnp.where(valid, anchor, 1.0), "hist": jnp.where(valid[:, None], hist, 0.0),
            "end": jnp.where(valid, (stage == k - 1).astype(h_t.dtype), 1.0)}

  def step(self, denoiser, schedule, grid, coeffs, i, state):
    """One stage: evaluate m at node i, then the next stage point (or the group's end) from the row."""
    return exponential.prediction_table_step(self, denoiser, schedule, grid, coeffs, i, state)


def official_logsnr_grid(schedule, nfe, order, *, t_start=None, t_end=None, group_schedule="official",
                         capacity=None):
  """The evaluation nodes of the official singlestep sampler with ``skip_type='logSNR'`` (DPM-Solver-fast).

  With the K group orders of ``group_orders(nfe, ..., order, group_schedule)``, the K outer intervals are
  uniform in lambda from lambda(t_start) (default t_max) to lambda(t_end) (default t_min); a group of order k
  has its inner nodes at lambda_s + (j / k) h, j = 1..k-1 (r = 1/2, or 1/3 and 2/3: the official defaults).
  The grid has num_steps = nfe, so ``DPMSolverSinglestep(order, schedule=group_schedule)`` on it is the
  official sampler. Only ``final='t_end'``: the official sampler stops at t_end.
  """
  if isinstance(nfe, (bool, float)) or not isinstance(nfe, (int, np.integer)) or nfe < 1:
    raise ValueError(f"nfe={nfe!r}: the number of model evaluations must be an integer >= 1")
  nfe = int(nfe)
  length = grids.default_capacity(nfe + 1)  # one array length for many nfe: the eager ops compile once
  orders = np.asarray(group_orders(nfe, length, order, group_schedule))
  orders = orders[orders > 0]
  dtype = schedules_lib.table_dtype()
  t_start = float(schedule.t_max if t_start is None else t_start)
  t_end = float(schedule.t_min if t_end is None else t_end)
  lam_start, lam_end = (float(schedule.lam(jnp.asarray(v, dtype))) for v in (t_start, t_end))
  if not (np.isfinite(lam_start) and np.isfinite(lam_end)):
    raise ValueError(f"official_logsnr_grid needs finite lambda at both ends; lambda({t_start})={lam_start}, "
                     f"lambda({t_end})={lam_end}: move t_start / t_end inside the schedule")
  outer = lam_start + (lam_end - lam_start) * np.arange(orders.size + 1) / orders.size
  lams = [outer[g] + j / k * (outer[g + 1] - outer[g]) for g, k in enumerate(orders) for j in range(k)]
  lams = np.array(lams + [outer[-1]])
  # t(lambda) on an array padded to the capacity, so that every nfe of one capacity reuses the same kernels.
  padded = np.pad(lams, (0, max(grids.default_capacity(lams.size) if capacity is None else capacity, lams.size)
                         - lams.size), mode="edge")
  times = np.array(schedule.t_of_lambda(jnp.asarray(padded, dtype)), np.float64)[: lams.size]
  times[0], times[-1] = t_start, t_end
  return grids.from_times(schedule, times, capacity=capacity)


base.register("dpm_solver_2s", lambda: DPMSolverSinglestep(order=2, prediction="noise"))
base.register("dpm_solver_3s", lambda: DPMSolverSinglestep(order=3, prediction="noise"))
base.register("dpm_solver_pp_2s", lambda: DPMSolverSinglestep(order=2))
base.register("dpm_solver_pp_3s", lambda: DPMSolverSinglestep(order=3))

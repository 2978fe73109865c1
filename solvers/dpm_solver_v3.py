"""DPM-Solver-v3 (Zheng, Lu, Chen, Zhu 2023, "DPM-Solver-v3: Improved Diffusion ODE Solver with Empirical Model
Statistics"): the multistep predictor (Eq. 8-9, Alg. 1-2), the pseudo-order option (Sec. 3.3) and the corrector.

With the EMS l, s, b (solvers/ems.py), f = (sigma eps - l x) / alpha and, relative to the anchor s,
g_j = e^{S_s - S_j} f_j - e^{S_s} (B_j - B_s), the step s -> t of order n + 1 is
  x_t = (alpha_t / alpha_s) e^{L_s - L_t} x_s
        - alpha_t e^{L_s - L_t} [int e^Phi g_s + sum_{k=1..n} int e^Phi tau^k / k! g^(k) + int e^Phi (B - B_s) e^{S_s}]
(Phi = L + S - L_s - S_s, tau = lambda - lambda_s), with g^(k) from the n older points: Taylor (solving the
Vandermonde system of the points' tau^k / k!), or pseudo-order (k! times Newton divided differences, which
keeps only first order accuracy of each derivative: formally second order for n >= 2).
All of it is linear in (x_s, f_j) with per-dimension weights, so every step is a table row: the loop
evaluates eps once, pushes f, corrects, predicts.

Corrector (``use_corrector``): after eps at the predicted x_t, the step s -> t is redone with the points
(s, t, s_-1, ...) at order p + ``c_pseudo`` (p the predictor's order of that step, pseudo derivatives when
``c_pseudo``), skipped on the final step and where that order is 1. The official code then keeps
sigma eps - l x at t, so f_t is unchanged and needs no new model call. ``half``: correct only nodes in
the noisier half of the schedule's time range, t > (t_min + t_max) / 2 -- the official code's rule
(t > 0.5 on [0, 1]); its README states the opposite half (spec pitfall P9).

Grid: the official code snaps the sampling times to the EMS nodes; here the EMS integrals are evaluated
exactly at the grid's lambdas (ems.EMS.step_integrals), so any grid keeps the declared order. A step to
sigma = 0 returns x0 = (x - sigma eps) / alpha of the current point (first order; no EMS beyond lambda = inf).
Warm-up uses order min(order, i + 1); ``lower_order_final`` (the official default, unconditional) caps
step i at num_steps - i. With degenerated EMS (l = 1, s = b = 0) this is DPM-Solver++ multistep with the
Taylor ('heun') 2nd order and the exactly weighted 3M (``third_order='exact'``).

The EMS are leaves of the solver, so solvers with new statistics never recompile. The registered
``dpm_solver_v3`` has the README's options (order 3, corrector with c_pseudo, lower-order final steps) and
degenerated EMS, valid for any model; pass ``ems=`` statistics of the model sampled. With c_pseudo it is
second order; use_corrector=False or c_pseudo=False keep order 3 (the Taylor corrector's error cancels the
predictor's at 40-160 steps, so its order 3 shows from ~300 steps on: tests/test_dpm_solver_v3.py).
"""
import math

import jax.numpy as jnp

from solvers import base, exponential
from solvers import ems as ems_lib
from solvers.dpm_solver_multistep import multistep_orders
from solvers.ems import EMS
from solvers.pytree import pytree_dataclass, static_field

BOOLEANS = (False, True)


def derivative_weights(offsets, pseudo):
  """Weights w (rows, n, n + 1) with g^(k) = sum_j w[:, k - 1, j] g_j, for the points tau_0 = 0 and
  tau_j = offsets[:, j - 1] (j = 1..n): Taylor (Vandermonde) or pseudo-order (k! Newton divided differences)."""
  rows, n = offsets.shape
  positions = jnp.concatenate([jnp.zeros((rows, 1), offsets.dtype), offsets], 1)
  if pseudo:
    table = [jnp.broadcast_to(jnp.eye(n + 1, dtype=offsets.dtype), (rows, n + 1, n + 1))]
    for level in range(1, n + 1):
      prev = table[-1]
      gaps = positions[:, : n + 1 - level] - positions[:, level:]
      table.append((prev[:, :-1] - prev[:, 1:]) / gaps[:, :, None])
    return jnp.stack([math.factorial(k) * table[k][:, 0] for k in range(1, n + 1)], 1)
  powers = jnp.stack([offsets**k / math.factorial(k) for k in range(1, n + 1)], 2)  # (rows, j, k)
  inverse = jnp.linalg.inv(powers)                                                  # (rows, k, j)
  return jnp.concatenate([-jnp.sum(inverse, 2, keepdims=True), inverse], 2)


@pytree_dataclass
class DPMSolverV3(base.Solver):
  """DPM-Solver-v3 (Zheng et al. 2023; module docstring) with the statistics ``ems`` (None: degenerated EMS).

  ``order`` 1-3, ``p_pseudo`` / ``c_pseudo`` (pseudo-order predictor / corrector), ``use_corrector``,
  ``lower_order_final`` and ``half`` (correct only the noisier half) as the official sampler's options."""
  ems: EMS = None
  order: int = static_field(default=3)
  p_pseudo: bool = static_field(default=False)
  use_corrector: bool = static_field(default=True)
  c_pseudo: bool = static_field(default=True)
  lower_order_final: bool = static_field(default=True)
  half: bool = static_field(default=False)

  def __post_init__(self):
    if self.order not in (1, 2, 3):
      raise ValueError(f"order={self.order!r} is not supported; valid: 1, 2, 3")
    base.check_options(self, [(name, BOOLEANS) for name in
                              ("p_pseudo", "use_corrector", "c_pseudo", "lower_order_final", "half")])
    if self.ems is None:
      object.__setattr__(self, "ems", EMS.degenerated())

  @property
  def declared_order(self):
    """Taylor derivatives give order p (the corrector of order p keeps it); pseudo-order derivatives beyond
    the first, in the predictor or the corrector, give 2 (measured: tests/test_dpm_solver_v3.py)."""
    pseudo_predictor = self.p_pseudo and self.order >= 3
    pseudo_corrector = self.use_corrector and self.c_pseudo and self.order >= 2
    return 2 if pseudo_predictor or pseudo_corrector else self.order

  def for_order_measurement(self):
    """This solver without lower-order final steps."""
    return self.replace(lower_order_final=False)

  def prepare(self, denoiser, schedule, grid, x_T, key, *, num_nodes=120, num_samples=256):
    """This solver with the EMS of ``denoiser`` (``ems.compute``: ``num_samples`` prior samples x_T ~ N(0, sigma_T^2 I)
    drawn with ``key``, ``num_nodes`` lambda intervals over the grid's range up to its last node with sigma > 0)."""
    steps = int(grid.num_steps)
    last = steps - 1 if float(grid.sigma[steps]) == 0.0 else steps
    t_start, t_end = float(grid.t[0]), float(grid.t[last])
    samples = ems_lib.prior_samples(schedule, key, num_samples, x_T.shape[1:], t_start=t_start)
    return self.replace(ems=ems_lib.compute(denoiser, schedule, samples, num_nodes=num_nodes, t_start=t_start,
                                            t_end=t_end))

  def init(self, denoiser, schedule, grid, x, key):
    """A ``MultistepState`` with room for order + 1 values of f (the corrector also needs the new one)."""
    return exponential.init_state(x, self.order + 1, key)

  def step_orders(self, grid):
    """The predictor's order per step: warm-up, lower-order final steps, first order into sigma = 0."""
    return multistep_orders(grid.num_steps, grid.capacity - 1, self.order, self.lower_order_final, None,
                            grid.sigma[1:] == 0)

  def coefficients(self, grid, schedule):
    """Per-dimension table rows: f from eps and x, the corrector's and the predictor's weights and constants
    (the EMS integrals of Eq. 8-9 at the grid's lambdas)."""
    ems = self.ems
    lift = lambda a: a.reshape(a.shape + (1,) * ems.event_ndim)
    finite = jnp.isfinite(grid.lam)
    lam = jnp.where(finite, grid.lam, grid.lam[jnp.sum(finite) - 1])
    zero_target = grid.sigma[1:] == 0
    lam_s, lam_t = lam[:-1], jnp.where(zero_target, lam[:-1], lam[1:])
    a_s, a_t = grid.alpha[:-1], grid.alpha[1:]
    size = self.order + 1
    integrals = ems.step_integrals(lam_s, lam_t, self.order + int(self.c_pseudo))
    # gamma_m, delta_m: g_{i-m} = gamma_m f_{i-m} + delta_m relative to the anchor i.
    gamma, delta = [jnp.ones_like(integrals["beta"])], [jnp.zeros_like(integrals["beta"])]
    for m in range(1, size):
      gamma.append(gamma[-1] / exponential.previous(integrals["decay_s"], m, 1.0))
      delta.append(delta[-1] + exponential.previous(integrals["beta"], m, 0.0) * gamma[-1])
    back = [lam_s - exponential.previous(lam_s, m, jnp.nan) for m in range(1, size)]  # lambda_i - lambda_{i-m}
    # Absent points (warm-up, padding) get distinct stand-ins, so the unused rows stay finite.
    back = [jnp.where(jnp.isfinite(b) & (b != 0), b, float(m + 1)) for m, b in enumerate(back)]
    orders = self.step_orders(grid)

    def update(points_order, offsets, point_gamma, point_delta, pseudo):
      """Rows of the order-``points_order`` update whose points have these offsets / gammas / deltas."""
      n = points_order - 1
      d = derivative_weights(jnp.stack(offsets[:n], 1), pseudo) if n else None
      f_weights, const = [], integrals["q"]
      for j in range(points_order):
        w = integrals["moments"][0] if j == 0 else jnp.zeros_like(integrals["moments"][0])
        for k in range(1, n + 1):
          w = w + integrals["moments"][k] * lift(d[:, k - 1, j])
        f_weights.append(w * point_gamma[j])
        const = const + w * point_delta[j]
      scale = lift(a_t) * integrals["decay_l"]
      return [-scale * w for w in f_weights], -scale * const

    anchor = lift(a_t / a_s) * integrals["decay_l"]
    l_s = ems.value("l", lam_s)
    # Predictor: points i, i-1, i-2 at hist[0..2].
    empty = jnp.zeros((lam_s.shape[0], size) + integrals["beta"].shape[1:], integrals["beta"].dtype)
    predictions = []
    for p in range(1, self.order + 1):
      f_w, const = update(p, [-b for b in back], gamma, delta, self.p_pseudo)
      rows = empty
      for j, w in enumerate(f_w):
        rows = rows.at[:, j].set(w)
      predictions.append((rows, const))
    pred_hist, pred_const = predictions[0]
    for p in range(2, self.order + 1):
      on = lift(orders >= p)
      pred_hist = jnp.where(on[:, None], predictions[p - 1][0], pred_hist)
      pred_const = jnp.where(on, predictions[p - 1][1], pred_const)
    # Into sigma = 0: x0 = (x_s - sigma_s eps_s) / alpha_s = (1 - l_s) x_s / alpha_s - f_s.
    to_zero = lift(zero_target)
    pred_anchor = jnp.where(to_zero, (1.0 - l_s) / lift(a_s), anchor)
    pred_hist = jnp.where(to_zero[:, None], jnp.zeros_like(pred_hist).at[:, 0].set(-1.0), pred_hist)
    pred_const = jnp.where(to_zero, 0.0, pred_const)
    # Corrector of step j = i - 1 -> i at iteration i: points s = j (hist[1]), t = j + 1 (hist[0]), j - 1, j - 2.
    h = lam_t - lam_s
    offsets = [jnp.where(h != 0, h, 1.0)] + [-b for b in back]
    point_gamma = [gamma[0], integrals["decay_s"]] + gamma[1:]
    point_delta = [delta[0], -integrals["beta"]] + delta[1:]
    slots = [1, 0, 2, 3]
    corr_orders = orders + int(self.c_pseudo)
    corr_hist, corr_const = empty, jnp.zeros_like(pred_const)
    for c in range(2, self.order + int(self.c_pseudo) + 1):
      f_w, const = update(c, offsets, point_gamma, point_delta, self.c_pseudo)
      rows = empty
      for j, w in enumerate(f_w):
        rows = rows.at[:, slots[j]].set(w)
      on = lift(corr_orders == c)
      corr_hist = jnp.where(on[:, None], rows, corr_hist)
      corr_const = jnp.where(on, const, corr_const)
    steps = jnp.arange(lam_s.shape[0])
    corrected = (corr_orders > 1) & (steps < grid.num_steps - 1) & self.use_corrector
    if self.half:
      corrected = corrected & (grid.t[1:] > 0.5 * (schedule.t_min + schedule.t_max))
    corrected = exponential.previous(corrected, 1, False)
    on = lift(corrected)
    return {"f_eps": grid.sigma[:-1] / a_s, "f_x": -l_s / lift(a_s),
            "pred_anchor": pred_anchor, "pred_hist": pred_hist, "pred_const": pred_const,
            "corr_x": jnp.where(on, 0.0, 1.0) * jnp.ones_like(anchor),
            "corr_anchor": jnp.where(on, exponential.previous(anchor, 1, 0.0), 0.0),
            "corr_hist": jnp.where(on[:, None], exponential.previous(corr_hist, 1, 0.0), 0.0),
            "corr_const": jnp.where(on, exponential.previous(corr_const, 1, 0.0), 0.0)}

  def step(self, denoiser, schedule, grid, coeffs, i, state):
    """Evaluate eps at x_i, push f_i, correct x_i (step i - 1 -> i), predict x_{i+1}: one model call."""
    c = base.cast_coefficients(coeffs, state.x)
    eps = denoiser.predict("eps", state.x, grid.t[i], schedule)
    hist = jnp.concatenate([(c["f_eps"] * eps + c["f_x"] * state.x)[None], state.hist[:-1]])
    corrected = c["corr_x"] * state.x + c["corr_anchor"] * state.anchor + c["corr_const"]
    x = c["pred_const"]
    for k in range(hist.shape[0]):
      corrected = corrected + c["corr_hist"][k] * hist[k]
    x = x + c["pred_anchor"] * corrected
    for k in range(hist.shape[0]):
      x = x + c["pred_hist"][k] * hist[k]
    return state._replace(x=x.astype(state.x.dtype), anchor=corrected.astype(state.x.dtype), hist=hist,
                          nfe=state.nfe + 1)


base.register("dpm_solver_v3", DPMSolverV3)

"""UniPC: the UniP predictor and the UniC corrector (Zhao et al. 2023, "UniPC: A Unified Predictor-Corrector
Framework for Fast Sampling of Diffusion Models", Algorithms 1-3, the B(h) forms of Sec. 3.3 / App. C).

Step s -> t of order p, h = lambda_t - lambda_s, m the model output (x0 for data prediction, eps for noise),
hh = -h (data) or h (noise), c_t = alpha_t (data) or sigma_t (noise):
  base      x~ = (sigma_t/sigma_s) x_s - alpha_t expm1(-h) m_s    (noise: (alpha_t/alpha_s) x_s - sigma_t expm1(h) m_s)
  history   r_k = (lambda_{s_k} - lambda_s) / h < 0, D_k = (m_{s_k} - m_s) / r_k  (k = 1..p-1, newest first)
  B(h)      'bh1': B = hh;  'bh2': B = expm1(hh);   g_i = i! hh phi_{i+1}(hh) / B,  i = 1..p
  UniP-p    x^P = x~ - c_t B sum_{k<p} rho^P_k D_k,  rho^P = [1/2] for p = 2, else sum_k r_k^(i-1) rho^P_k = g_i (i < p)
  UniC-p    m_t = model(x^P) (also the next step's history value: no extra NFE); r_p = 1, D_p = m_t - m_s;
            x^C = x~ - c_t B (sum_{k<p} rho^C_k D_k + rho^C_p D_p),  rho^C = [1/2] for p = 1, else R rho^C = g (p x p).
UniP-p has order p; UniC-p raises it to p + 1. The corrector of the last step is skipped (it would need an
extra model call), as in the paper and diffusers; ``disable_corrector`` lists more steps to leave
uncorrected (diffusers' semantics: the output of step j is not corrected when j is listed).
Warm-up uses order min(order, i + 1); ``lower_order_final`` (the paper's and diffusers' default: always)
uses at most order num_steps - i; a step into sigma = 0 is first order (higher B(h) terms are 0 * inf
there: spec pitfall P6, diffusers' bh1 returns NaN).

``predictor=`` makes UniC a plug-in corrector after another table-driven multistep solver of the same
prediction type (e.g. DPM-Solver++ 2M, as in the paper's Table 4): its predictor rows are used unchanged and
UniC corrects each step with that solver's per-step order.

One loop iteration at node i: evaluate m_i at the predicted x_i, correct x_i with the step (i-1 -> i),
then predict x_{i+1} from the corrected point, which becomes the anchor. All weights come from tables.
"""
import dataclasses
import math
from typing import Any, Optional, Tuple

import jax.numpy as jnp

from solvers import base, exponential
from solvers.dpm_solver_multistep import PREDICTIONS, DPMSolverMultistep, multistep_orders

VARIANTS = ("bh1", "bh2")


def _ratios(h, count):
  """r_k = (lambda_{i-k} - lambda_i) / h_i for k = 1..count, per step (L, count); 1 where undefined."""
  finite = jnp.isfinite(h) & (h != 0)
  safe_h = jnp.where(finite, h, 1.0)
  gaps = jnp.where(finite, h, 1.0)
  cumulative, out = jnp.zeros_like(h), []
  for k in range(1, count + 1):
    cumulative = cumulative + exponential.previous(gaps, k, 1.0)
    out.append(-cumulative / safe_h)
  return jnp.stack(out, -1) if out else jnp.zeros(h.shape + (0,))


def _g(h, p, data, variant):
  """(g_1..g_p) per step and the factor c_t-free product B: returns (g (L, p), B (L,))."""
  weight = exponential.data_weight if data else exponential.noise_weight
  sign = -1.0 if data else 1.0
  finite = jnp.isfinite(h) & (h != 0)
  safe_h = jnp.where(finite, h, 1.0)
  hh = sign * safe_h
  big_b = hh if variant == "bh1" else sign * weight(1, safe_h)  # expm1(hh)
  g = [math.factorial(i) * sign * weight(i + 1, safe_h) / big_b for i in range(1, p + 1)]
  return jnp.stack(g, -1), big_b


def _solve(r, g, p, corrector):
  """rho for predictor (p - 1 unknowns) or corrector (p unknowns, r_p = 1), batched over steps."""
  n = p if corrector else p - 1
  if n == 0:
    return jnp.zeros(r.shape[:1] + (0,))
  if (corrector and p == 1) or (not corrector and p == 2):
    return jnp.full(r.shape[:1] + (1,), 0.5)
  nodes = jnp.concatenate([r[:, : p - 1], jnp.ones_like(r[:, :1])], -1)[:, :n] if corrector else r[:, :n]
  matrix = jnp.stack([nodes**i for i in range(n)], 1)  # rows i = 0..n-1: r_k^i
  return exponential.solve_small(matrix, g[:, :n])


@dataclasses.dataclass(frozen=True)
class UniPC(base.Solver):
  """UniP-p predictor with the UniC corrector (Zhao et al. 2023, Alg. 1-3; module docstring).

  ``order`` p = 1-3 of the predictor, ``variant`` B(h) 'bh1' / 'bh2', ``prediction`` 'data' / 'noise',
  ``corrector`` (UniC on), ``disable_corrector`` (steps left uncorrected), ``lower_order_final`` below
  ``lower_order_final_below`` steps (None: always), ``predictor`` (another multistep solver's rows instead of UniP).
  """
  order: int = 2
  variant: str = "bh2"
  prediction: str = "data"
  corrector: bool = True
  disable_corrector: Tuple[int, ...] = ()
  lower_order_final: bool = True
  lower_order_final_below: Optional[int] = None
  predictor: Optional[Any] = None

  def __post_init__(self):
    if self.order not in (1, 2, 3):
      raise ValueError(f"order={self.order!r} is not supported; valid: 1, 2, 3")
    base.check_options(self, (("variant", VARIANTS), ("prediction", PREDICTIONS)))
    if self.predictor is not None:
      if not hasattr(self.predictor, "step_orders") or getattr(self.predictor, "prediction", None) != self.prediction:
        raise ValueError(f"predictor {self.predictor!r} must be a table-driven multistep solver with "
                         f"prediction={self.prediction!r}")
      object.__setattr__(self, "order", self.predictor.order)

  @property
  def superconverges_on_linear_problems(self):
    """UniPC-3 with UniC measures order ~5 on Gaussian data (a linear PF-ODE) but 4 on a Gaussian mixture
    (tests/test_unipc.py); the lower orders show their declared order on both."""
    return self.corrector and self.order == 3

  @property
  def declared_order(self):
    base_order = self.order if self.predictor is None else self.predictor.declared_order
    return base_order + (1 if self.corrector else 0)

  def for_order_measurement(self):
    predictor = None if self.predictor is None else self.predictor.for_order_measurement()
    return dataclasses.replace(self, lower_order_final=False, predictor=predictor)

  def init(self, denoiser, schedule, grid, x, key):
    """A ``MultistepState`` with room for order + 1 outputs (the corrector also needs the new one)."""
    return exponential.init_state(x, self.order + 1, key)

  def step_orders(self, grid):
    """The order of each step (warm-up, lower-order final steps, first order into sigma = 0)."""
    return multistep_orders(grid.num_steps, grid.capacity - 1, self.order, self.lower_order_final,
                            self.lower_order_final_below, grid.sigma[1:] == 0)

  def _unip(self, grid, h, orders):
    """Predictor rows: anchor weight and hist weights (L, order + 1)."""
    data = self.prediction == "data"
    r = _ratios(h, max(self.order - 1, 1))
    weights = jnp.zeros(h.shape + (self.order + 1,))
    anchor, base_m, c_t = exponential.first_order_rows(grid, data)
    by_order = []
    for p in range(1, self.order + 1):
      w = weights.at[:, 0].set(base_m)
      if p > 1:
        g, big_b = _g(h, p, data, self.variant)
        rho = _solve(r, g, p, corrector=False)
        scale = -(c_t * big_b)[:, None] * rho / r[:, : p - 1]  # weight on m_{i-k}
        w = w.at[:, 1:p].add(scale).at[:, 0].add(-jnp.sum(scale, -1))
      by_order.append(w)
    weights = by_order[0]
    for p in range(2, self.order + 1):
      weights = jnp.where((orders >= p)[:, None], by_order[p - 1], weights)
    return anchor, weights

  def _unic(self, grid, h, orders):
    """Corrector rows of step j = i - 1 -> i, laid out for iteration i: (x weight, anchor weight, hist weights)."""
    data = self.prediction == "data"
    r = _ratios(h, max(self.order - 1, 1))
    anchor, base_m, c_t = exponential.first_order_rows(grid, data)
    # Hist at iteration j + 1: [m_{j+1}, m_j, m_{j-1}, ...]; the step's own base value m_j is hist[1].
    size = self.order + 1
    by_order = []
    for p in range(1, self.order + 1):
      g, big_b = _g(h, p, data, self.variant)
      rho = _solve(r, g, p, corrector=True)
      factor = -(c_t * big_b)[:, None]
      w = jnp.zeros(h.shape + (size,)).at[:, 1].set(base_m)
      for k in range(1, p):  # D_k = (m_{j-k} - m_j) / r_k
        coef = factor[:, 0] * rho[:, k - 1] / r[:, k - 1]
        w = w.at[:, k + 1].add(coef).at[:, 1].add(-coef)
      last = factor[:, 0] * rho[:, p - 1]  # D_p = m_{j+1} - m_j
      w = w.at[:, 0].add(last).at[:, 1].add(-last)
      by_order.append(w)
    weights = by_order[0]
    for p in range(2, self.order + 1):
      weights = jnp.where((orders >= p)[:, None], by_order[p - 1], weights)
    steps = jnp.arange(h.shape[0])
    on = (steps < grid.num_steps - 1) & self.corrector  # the last step is never corrected
    for j in self.disable_corrector:
      on = on & (steps != j)
    # Shift by one: the correction of step j happens at iteration j + 1; iteration 0 corrects nothing.
    on = exponential.previous(on, 1, False)
    weights = exponential.previous(weights, 1, 0.0)
    anchor = exponential.previous(anchor, 1, 0.0)
    return jnp.where(on, 0.0, 1.0), jnp.where(on, anchor, 0.0), jnp.where(on[:, None], weights, 0.0)

  def coefficients(self, grid, schedule):
    """Per iteration i: the UniC rows of step i - 1 -> i and the predictor rows of step i -> i + 1."""
    h = exponential.step_sizes(grid)
    if self.predictor is None:
      orders = self.step_orders(grid)
      pred_anchor, pred_hist = self._unip(grid, h, orders)
    else:
      orders = self.predictor.step_orders(grid)
      rows = self.predictor.coefficients(grid, schedule)
      pred_anchor = rows["anchor"]
      pred_hist = jnp.pad(rows["hist"], ((0, 0), (0, self.order + 1 - rows["hist"].shape[1])))
    corr_x, corr_anchor, corr_hist = self._unic(grid, h, orders)
    return {"pred_anchor": pred_anchor, "pred_hist": pred_hist, "corr_x": corr_x, "corr_anchor": corr_anchor,
            "corr_hist": corr_hist}

  def step(self, denoiser, schedule, grid, coeffs, i, state):
    """Evaluate m_i at the predicted x_i, correct x_i (UniC), predict x_{i+1} (UniP): one model call."""
    c = base.cast_coefficients(coeffs, state.x)
    kind = "x0" if self.prediction == "data" else "eps"
    m = denoiser.predict(kind, state.x, grid.t[i], schedule)
    hist = jnp.concatenate([m[None], state.hist[:-1]])
    corrected = c["corr_x"] * state.x + c["corr_anchor"] * state.anchor
    for k in range(hist.shape[0]):
      corrected = corrected + c["corr_hist"][k] * hist[k]
    x = c["pred_anchor"] * corrected
    for k in range(hist.shape[0]):
      x = x + c["pred_hist"][k] * hist[k]
    return state._replace(x=x.astype(state.x.dtype), anchor=corrected.astype(state.x.dtype), hist=hist,
                          nfe=state.nfe + 1)


for _order in (1, 2, 3):
  for _variant in VARIANTS:
    base.register(f"unipc_{_variant}_{_order}", lambda o=_order, v=_variant: UniPC(order=o, variant=v))
del _order, _variant
base.register("dpm_solver_pp_2m_unic", lambda: UniPC(predictor=DPMSolverMultistep(order=2), variant="bh2"))

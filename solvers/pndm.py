"""PNDM: pseudo numerical methods (Liu et al. 2022, "Pseudo Numerical Methods for Diffusion Models on Manifolds")
and the PLMS sampler of CompVis-LDM / diffusers' ``PNDMScheduler(skip_prk_steps=True)``.

Every step moves with the paper's transfer part (Eq. 9), the DDIM map, here the first-order noise-form
exponential integrator (``exponential.first_order_weights``):
  phi(x, e, s, t) = (alpha_t / alpha_s) x - sigma_t expm1(lambda_t - lambda_s) e,
fed with a "gradient part" e built from model outputs e_k = eps(x_k, t_k) by classical formulas:
- ``method='s_pndm'`` (S-PNDM): the first step is improved Euler, e1 = eps(x_0, t_0),
  e2 = eps(phi(x_0, e1, t_0, t_1), t_1), x_1 = phi(x_0, (e1 + e2) / 2, t_0, t_1) (only e1 is kept), then
  pseudo Adams-Bashforth 2 for ever: e = (3 e_k - e_{k-1}) / 2. NFE = N + 1.
- ``method='f_pndm'`` (the paper's PNDM): three pseudo-RK4 steps, with t_m the step's midpoint:
  e1 = eps(x, t), e2 = eps(phi(x, e1, t, t_m), t_m), e3 = eps(phi(x, e2, t, t_m), t_m), e4 = eps(phi(x, e3, t, t'), t'),
  x' = phi(x, (e1 + 2 e2 + 2 e3 + e4) / 6, t, t') (e1 is kept), then pseudo AB4:
  e = (55 e_k - 59 e_{k-1} + 37 e_{k-2} - 9 e_{k-3}) / 24. NFE = N + 9 (4 N for N <= 3).
- ``method='plms'``: the improved-Euler first step, then AB2, AB3 ((23, -16, 5) / 12) and AB4. NFE = N + 1.

Midpoints (``midpoint``): 't' is the paper's (t + t') / 2. 'diffusers' is diffusers' integer half step on a
``DiscreteVP``: with d = floor((t - t') / 2), e1's transfer goes to t - d while e2 and e3 are evaluated at
(and e2's transfer goes to) t' + d; the two differ by one when t - t' is odd, as in diffusers.
``combine='v'`` reproduces diffusers' ``prediction_type='v_prediction'``: the raw v outputs are combined and the
combination is converted to eps at the step's start (eps = alpha_s v + sigma_s x_s); the default 'eps' combines
each output converted to eps where it was evaluated, as the paper. Converting v_i from (x_i, t_i) at (x_s, t_s)
errs by (alpha_i - alpha_s) v_i + sigma_i x_i - sigma_s x_s = O(h), which weights summing to one do not cancel:
'v' converges with order 1 only (measured in tests/test_pndm.py).

A warm-up step (improved Euler, pseudo-RK4) that ends at sigma = 0 would evaluate eps at sigma = 0, where it
is undefined: it is a DDIM step instead (one NFE), as EDM's Heun sampler skips its last correction.

The official code (runner/method.py) transfers with alphas_cump[t + 1] for model label t (spec pitfall P8).
That is the convention of the model's labels, not of the method: this module uses the schedule's alpha at the
time it evaluates the model (as diffusers). The official sampler is ``f_pndm`` / ``s_pndm`` with ``midpoint='t'``
on the grid t_k + 1 (ending at 0) of ``DiscreteVP.from_alphas_cumprod(alphas_cump)`` and the time label
``lambda schedule, t: t - 1`` (its fractional midpoint labels agree where t - t' is even; it floors otherwise).

Order. The exact solution is x_t = (alpha_t / alpha_s) x_s - sigma_t int_0^h e^{h - tau} eps(lambda_s + tau) dtau
(Lu et al. 2022, Eq. 3.4), so phi needs the e^{h - tau}-weighted mean of eps over the step, while the
classical formulas return (to their order) the uniform mean. For eps = a + b lambda, improved Euler and AB-k
(k >= 2, uniform lambda steps) give e = eps(lambda_s + h / 2), and the step misses the exact one by
  sigma_t b ((e^h - 1) h / 2 - (e^h - 1 - h)) = sigma_t b (h^3 / 12 + h^4 / 24 + ...),
a local error O(h^3) whatever the formula's classical order: every method here converges with global order 2
(``declared_order``). The nominal orders (``order``: 2, 4, 4) are the classical formulas' ones. Checked in
tests/test_pndm.py: that local error to 1e-9, slopes ~2 on the Gaussian and on eps = a + b lambda; on a Gaussian
mixture F-PNDM / PLMS look faster before the h^2 term dominates (slope 2.7 at 80 -> 160 steps, 1.96 at 640 -> 1280).
"""
import dataclasses
from typing import Any, NamedTuple

import jax.numpy as jnp
import numpy as np

from solvers import base, exponential, schedules

METHODS = ("s_pndm", "f_pndm", "plms")
MIDPOINTS = ("t", "diffusers")
COMBINATIONS = ("eps", "v")

# Where a row evaluates the model and where its transfer goes: the step's start / end node or a midpoint.
_START, _END, _MID_FIRST, _MID_SECOND = 0, 1, 2, 3
_HISTORY = 3  # AB4 combines the new output with three kept ones


def _row(eval_at, target, new, hist=(), acc=0.0, acc_keep=0.0, acc_new=0.0, push=0.0, end=0.0):
  """One kind of iteration: the combination e = new * e_new + sum hist[k] * kept[k] + acc * accumulated, where
  the transfer goes, how the RK accumulator and the kept outputs change and whether the step ends."""
  return dict(eval_at=eval_at, target=target, new=new, hist=tuple(hist) + (0.0,) * (_HISTORY - len(hist)),
              acc=acc, acc_keep=acc_keep, acc_new=acc_new, push=push, end=end)


_KINDS = {
    "euler": _row(_START, _END, 1.0, push=1.0),                  # improved Euler, predictor
    "heun": _row(_END, _END, 0.5, (0.5,), end=1.0),               # improved Euler, (e1 + e2) / 2
    "ab2": _row(_START, _END, 3 / 2, (-1 / 2,), push=1.0, end=1.0),
    "ab3": _row(_START, _END, 23 / 12, (-16 / 12, 5 / 12), push=1.0, end=1.0),
    "ab4": _row(_START, _END, 55 / 24, (-59 / 24, 37 / 24, -9 / 24), push=1.0, end=1.0),
    "rk0": _row(_START, _MID_FIRST, 1.0, acc_new=1 / 6, push=1.0),  # pseudo-RK4 stages
    "rk1": _row(_MID_SECOND, _MID_SECOND, 1.0, acc_keep=1.0, acc_new=1 / 3),
    "rk2": _row(_MID_SECOND, _END, 1.0, acc_keep=1.0, acc_new=1 / 3),
    "rk3": _row(_END, _END, 1 / 6, acc=1.0, end=1.0),
}


class PNDMState(NamedTuple):
  """The state of PNDM / PLMS: the evaluation point, the step's start, kept eps outputs and the RK4 accumulator."""
  x: jnp.ndarray       # where the model is evaluated next
  anchor: jnp.ndarray  # the start of the current step
  hist: jnp.ndarray    # (kept, *x.shape) kept model outputs (one per step), newest first
  acc: jnp.ndarray     # (1 or 0, *x.shape) the pseudo-RK4 sum (e1 + 2 e2 + 2 e3) / 6 so far
  nfe: jnp.ndarray
  key: Any


@dataclasses.dataclass(frozen=True)
class PNDM(base.Solver):
  """S-PNDM, F-PNDM (Liu et al. 2022; the transfer part is their Eq. 9) and PLMS: ``method`` 's_pndm' / 'f_pndm' / 'plms',
  ``midpoint`` 't' / 'diffusers', ``combine`` 'eps' / 'v' (module docstring). One loop iteration per model call."""
  method: str = "f_pndm"
  midpoint: str = "t"
  combine: str = "eps"

  def __post_init__(self):
    base.check_options(self, (("method", METHODS), ("midpoint", MIDPOINTS), ("combine", COMBINATIONS)))

  @property
  def order(self):
    """The classical formulas' order (improved Euler + AB2: 2; RK4 / AB4: 4)."""
    return 2 if self.method == "s_pndm" else 4

  @property
  def declared_order(self):
    """2 for every method: the transfer weights the uniform mean of eps; 1 with combine='v' (module docstring)."""
    return 1 if self.combine == "v" else 2

  def _warm_up(self):
    """(warm-up steps, extra model calls per warm-up step)."""
    return (3, 3) if self.method == "f_pndm" else (1, 1)

  def _plan(self, num_iterations):
    """Per iteration (static): the step it belongs to and its kind."""
    steps, kinds = [], []
    for j in range(num_iterations):
      if self.method == "f_pndm":
        step, kind = (j // 4, f"rk{j % 4}") if j < 12 else (j - 9, "ab4")
      else:
        step = max(j - 1, 0)
        kind = "euler" if j == 0 else "heun" if j == 1 else "ab2" if self.method == "s_pndm" else f"ab{min(j, 4)}"
      steps.append(step)
      kinds.append(kind)
    return np.array(steps), kinds

  def num_iterations(self, grid):
    warm_up, extra = self._warm_up()
    return grid.capacity - 1 + warm_up * extra

  def active(self, grid, i, state):
    warm_up, extra = self._warm_up()
    n = grid.num_steps
    # A warm-up step into sigma = 0 is a DDIM step: its other stages (the last iterations) are skipped.
    last_into_zero = (n <= warm_up) & (grid.sigma[n] == 0)
    return i < n + extra * (jnp.minimum(n, warm_up) - last_into_zero)

  def _midpoints(self, t_start, t_end):
    """(first, second) midpoint times: e1's transfer target, and where e2, e3 are evaluated / e2 goes."""
    if self.midpoint == "t":
      mid = 0.5 * (t_start + t_end)
      return mid, mid
    half = jnp.floor(0.5 * (t_start - t_end))
    return t_start - half, t_end + half

  def coefficients(self, grid, schedule):
    """One row per iteration: where the model is evaluated, the transfer's weights and the combination's."""
    if self.midpoint == "diffusers" and not isinstance(schedule, schedules.DiscreteVP):
      raise ValueError(f"midpoint='diffusers' (integer half steps) needs a DiscreteVP schedule, got "
                       f"{type(schedule).__name__}; use midpoint='t'")
    steps, kinds = self._plan(self.num_iterations(grid))
    steps = np.minimum(steps, grid.capacity - 2)  # rows past the last real step are never active
    table = {name: np.array([_KINDS[kind][name] for kind in kinds], np.float64) for name in _KINDS["euler"]}
    into_zero = grid.sigma[steps + 1] == 0
    warm_up_predictor = np.isin(kinds, ("euler", "rk0"))
    target = jnp.where(into_zero & warm_up_predictor, _END, table["target"])
    end = jnp.where(into_zero & warm_up_predictor, 1.0, table["end"])

    t_start, t_end = grid.t[steps], grid.t[steps + 1]
    mid_first, mid_second = self._midpoints(t_start, t_end)
    mids = [(schedule.alpha(t), schedule.sigma(t), schedule.lam(t)) for t in (mid_first, mid_second)]
    # The transfer's target (alpha, sigma, lambda): the step's end node or one of its midpoints.
    a_t, s_t, lam_t = (jnp.where(target == _END, node[steps + 1], jnp.where(target == _MID_FIRST, first, second))
                       for node, first, second in zip((grid.alpha, grid.sigma, grid.lam), *mids))
    a_s, s_s = grid.alpha[steps], grid.sigma[steps]
    anchor, weight, _ = exponential.first_order_weights(a_s, s_s, a_t, s_t, lam_t - grid.lam[steps], data=False)
    if self.combine == "v":  # eps = alpha_s v + sigma_s x_s at the step's start
      anchor, weight = anchor + weight * s_s, weight * a_s
    eval_t = jnp.where(table["eval_at"] == _START, t_start,
                       jnp.where(table["eval_at"] == _END, t_end, mid_second))
    return {"t": eval_t, "anchor": anchor, "new": weight * table["new"], "acc": weight * table["acc"],
            "hist": weight[:, None] * table["hist"], "acc_keep": table["acc_keep"], "acc_new": table["acc_new"],
            "push": table["push"], "end": end}

  def init(self, denoiser, schedule, grid, x, key):
    """A ``PNDMState`` with room for the kept outputs (1 for S-PNDM, 3 otherwise) and, for F-PNDM, the RK sum."""
    kept = 1 if self.method == "s_pndm" else _HISTORY
    stages = 1 if self.method == "f_pndm" else 0
    return PNDMState(x=x, anchor=x, hist=jnp.zeros((kept,) + x.shape, x.dtype),
                     acc=jnp.zeros((stages,) + x.shape, x.dtype), nfe=jnp.zeros((), jnp.int32), key=key)

  def step(self, denoiser, schedule, grid, coeffs, i, state):
    """One model call: combine it with the kept outputs / RK sum (gradient part), then transfer from the anchor."""
    c = base.cast_coefficients({k: v for k, v in coeffs.items() if k != "t"}, state.x)
    m = denoiser.predict(self.combine, state.x, coeffs["t"], schedule)
    x = c["anchor"] * state.anchor + c["new"] * m
    for k in range(state.hist.shape[0]):
      x = x + c["hist"][k] * state.hist[k]
    for k in range(state.acc.shape[0]):
      x = x + c["acc"] * state.acc[k]
    hist = jnp.where(c["push"] > 0, jnp.concatenate([m[None], state.hist[:-1]]), state.hist)
    acc = (c["acc_keep"] * state.acc + c["acc_new"] * m).astype(state.x.dtype)
    x = x.astype(state.x.dtype)
    anchor = jnp.where(c["end"] > 0, x, state.anchor)
    return state._replace(x=x, anchor=anchor, hist=hist, acc=acc, nfe=state.nfe + 1)


base.register("pndm_s", lambda: PNDM(method="s_pndm"))
base.register("pndm_f", lambda: PNDM(method="f_pndm"))
base.register("plms", lambda: PNDM(method="plms"))

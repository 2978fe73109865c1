"""USF: a multistep exponential integrator whose update is chosen per step (Liu, Ning, Yang & Wang 2024, "A Unified
Sampling Framework for Solver Searching of Diffusion Probabilistic Models", ICLR; arXiv 2312.07243, Sec. 3-4).

USF writes every exponential-integrator step s -> t (h = lambda_t - lambda_s) as the variation-of-constants
formula of one prediction type with the model output m(lambda) replaced by a truncated Taylor expansion at the
step's start, whose derivatives are estimated from the previous model outputs (spec section 0):
  data:  x_t = (sigma_t / sigma_s) x_s + alpha_t int_0^h e^{-(h - tau)} x0(lambda_s + tau) dtau
  noise: x_t = (alpha_t / alpha_s) x_s - sigma_t int_0^h e^{h - tau} eps(lambda_s + tau) dtau.
The components chosen at each step i here (the "solver schedule" of the paper, Sec. 3.2 and Table 1):
- ``prediction``: 0 = data (x0, DPM-Solver++ form), 1 = noise (eps, DPM-Solver form);
- ``order``: 1..3, the number of model outputs the expansion uses (the newest first). The derivatives are the
  UniP-p estimates of UniPC (Zhao et al. 2023, Alg. 2, the B(h) form of Sec. 3.3, ``variant`` bh1 / bh2): order 2
  with bh2 is DPM-Solver(++) 2M, order 1 is DDIM. Lowered where fewer outputs exist (step i has i + 1), to 1 on a
  step into sigma = 0 (h = inf), and, with ``lower_order_final``, to num_steps - i (UniPC's default rule);
- ``corrector``: 0 / 1, UniC-p (UniPC Alg. 1) after step i, using the model output at node i + 1 that the next
  step needs anyway (no extra NFE). The last step is never corrected: its corrector would cost an extra NFE;
- ``afs`` (one bit for the run): the analytical first step. The first model output is replaced by the posterior
  mean of data ~ N(0, s^2 I) (s = ``afs_data_std``, 1 for standardised data), exact at t_max as alpha -> 0:
    x0 = alpha s^2 x / (alpha^2 s^2 + sigma^2),  eps = sigma x / (alpha^2 s^2 + sigma^2),
  i.e. eps(x_T) ~ x_T / sigma_T for a VE / EDM schedule and ~ sigma_T x_T ~ x_T for VP (USF Sec. 3.2, after the
  AFS of Zhou et al. 2024, AMED-Solver). It saves one NFE: N steps cost N - 1 model calls. The analytic value
  drives the first step only: no corrector and no later derivative estimate uses it (for data that is not centred
  its error is O(alpha_T |E x0|), fine for one step from near-pure noise, not inside a difference m_1 - m_0 divided
  by the step), so steps 1 and 2 run at most orders 1 and 2.
The starting point of the expansion is fixed at the current node (the corrected point, as in every solver above):
USF's other starting points and its derivative-scaling and low-order derivative-estimation options are not
implemented.

Mixed prediction types work because every model call keeps both its x0 and its eps (one is converted from the
other at the evaluation point: x = alpha x0 + sigma eps), so a data step after noise steps finds the x0 history it
needs. The model is asked for the kind it natively predicts (``Denoiser.prediction``; x0 for the rest), so that a
run with one prediction type sees exactly the values the single-type solvers see.

The choices are array leaves of the solver (``Choices``), like DC-Solver's ratios: new choices never recompile, the
loop is vmappable over them (a population of schedules in one call), and every coefficient is computed outside the
loop (DESIGN property 4): the UniP / UniC rows of UniPC for both prediction types are built for the chosen per-step
orders, and per step the chosen type's rows are selected with ``jnp.where``. The step computes both types'
combinations (cheap linear combinations of buffers) and keeps the chosen one. The only branch in the step is a
``lax.cond`` that skips the model call of an analytical first step (otherwise the NFE it saves would still be spent).

Registered as ``usf`` with the default schedule data / order 2 / corrector on / no AFS, i.e. UniPC bh2 order 2
(``unipc_bh2_2``), bit for bit (tests/test_usf.py).
"""
import dataclasses
from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from solvers import base, exponential, predictions
from solvers.dpm_solver_multistep import multistep_orders
from solvers.pytree import pytree_dataclass, static_field
from solvers.unipc import VARIANTS, UniPC

PREDICTIONS = ("data", "noise")   # index = the code in Choices.prediction
ORDERS = (1, 2, 3)
MAX_ORDER = 3
HISTORY = MAX_ORDER + 1           # UniC-p of an order-p step uses p + 1 outputs


class Choices(NamedTuple):
  """Per-step choices (int arrays of one length n: entry i is step i; steps past n repeat entry n - 1)."""
  prediction: Any  # (n,) 0 = data, 1 = noise
  order: Any       # (n,) 1..3
  corrector: Any   # (n,) 0 / 1
  afs: Any         # () 0 / 1: analytical first step


def _validate(arrays):
  """Raises a ValueError naming the first bad field or value of the host arrays of a Choices."""
  for name, array in arrays.items():
    if not (np.issubdtype(array.dtype, np.integer) or array.dtype == bool):
      raise ValueError(f"choices.{name} has dtype {array.dtype}; integer codes are required")
  shapes = [arrays[name].shape for name in ("prediction", "order", "corrector")]
  if len(set(shapes)) != 1 or len(shapes[0]) < 1 or shapes[0][-1] < 1 or arrays["afs"].shape != shapes[0][:-1]:
    raise ValueError("choices.prediction, .order and .corrector must be arrays of one shape (..., n), n >= 1 steps, "
                     "and choices.afs of shape (...), got shapes "
                     + ", ".join(f"{name}={arrays[name].shape}" for name in Choices._fields))
  valid = {"prediction": (0, 1), "order": ORDERS, "corrector": (0, 1), "afs": (0, 1)}
  for name, allowed in valid.items():
    flat = arrays[name].ravel()
    bad = np.flatnonzero(~np.isin(flat, allowed))
    if bad.size:
      where = f"[{bad[0]}]" if arrays[name].ndim else ""
      raise ValueError(f"choices.{name}{where}={flat[bad[0]].item()!r} is not allowed; valid: {', '.join(map(str, allowed))}"
                       + (" (0 = data, 1 = noise)" if name == "prediction" else ""))


def _concrete(choices):
  """The host arrays of ``choices`` if every field is a concrete array (not traced, not a placeholder), else None."""
  fields = [getattr(choices, name) for name in Choices._fields]
  if all(isinstance(f, np.ndarray) or (isinstance(f, jax.Array) and not isinstance(f, jax.core.Tracer))
         for f in fields):
    return {name: np.asarray(f) for name, f in zip(Choices._fields, fields)}
  return None


def check_choices(choices):
  """``choices`` with its fields as int32 arrays, after checking shapes ((..., n) per step, (...) for afs: leading
  batch axes are allowed, e.g. a population to vmap over) and values; a ValueError names the bad one. Traced
  fields (inside jit / vmap) pass unchecked."""
  if not isinstance(choices, Choices):
    raise ValueError(f"choices must be a usf.Choices, got {type(choices).__name__}")
  if any(isinstance(leaf, jax.core.Tracer) for leaf in jax.tree_util.tree_leaves(choices)):
    return choices
  arrays = {name: np.asarray(getattr(choices, name)) for name in Choices._fields}
  _validate(arrays)
  return Choices(*(jnp.asarray(arrays[name], jnp.int32) for name in Choices._fields))


def _prediction_code(value):
  if isinstance(value, str):
    if value not in PREDICTIONS:
      raise ValueError(f"prediction={value!r} is unknown; valid: {', '.join(PREDICTIONS)}")
    return PREDICTIONS.index(value)
  return value


def make_choices(prediction, order, corrector, afs=False):
  """Choices from per-step lists (or one value for every step): prediction 'data' / 'noise' (or 0 / 1), order
  1..3, corrector True / False, afs True / False. Checked (``check_choices``)."""
  lists = [prediction, order, corrector]
  n = max((len(v) for v in lists if isinstance(v, (list, tuple, np.ndarray))), default=1)
  per_step = [list(v) if isinstance(v, (list, tuple, np.ndarray)) else [v] * n for v in lists]
  per_step[0] = [_prediction_code(p) for p in per_step[0]]
  for name, value in zip(("order", "corrector"), per_step[1:]):
    if any(isinstance(v, float) for v in value):
      raise ValueError(f"{name}={value!r}: integers are required")
  if isinstance(afs, float):
    raise ValueError(f"afs={afs!r}: pass True / False")
  return check_choices(Choices(*(np.asarray(v, np.int64) for v in per_step), afs=np.asarray(int(afs))))


def constant_choices(num_steps, prediction="data", order=2, corrector=True, afs=False, lower_order_final=True):
  """The same choice at every one of ``num_steps`` steps; ``lower_order_final`` lowers the order of step i to
  num_steps - i (UniPC's rule, written into the choices so that a ``USF(lower_order_final=False)`` runs them)."""
  if isinstance(num_steps, bool) or not isinstance(num_steps, (int, np.integer)) or num_steps < 1:
    raise ValueError(f"num_steps={num_steps!r}: must be an integer >= 1")
  if order not in ORDERS:
    raise ValueError(f"order={order!r} is not supported; valid: {', '.join(map(str, ORDERS))}")
  orders = [min(order, num_steps - i) if lower_order_final else order for i in range(num_steps)]
  return make_choices([prediction] * num_steps, orders, [bool(corrector)] * num_steps, afs)


def choices_to_json(choices, num_steps=None):
  """A JSON-able dict: {"steps": [{"prediction": "data", "order": 2, "corrector": true}, ...], "afs": false}
  (the first ``num_steps`` entries, all by default)."""
  choices = check_choices(choices)
  n = len(choices.prediction) if num_steps is None else int(num_steps)
  if not 1 <= n <= len(choices.prediction):
    raise ValueError(f"num_steps={num_steps!r}: the choices have {len(choices.prediction)} steps")
  steps = [{"prediction": PREDICTIONS[int(choices.prediction[i])], "order": int(choices.order[i]),
            "corrector": bool(choices.corrector[i])} for i in range(n)]
  return {"steps": steps, "afs": bool(choices.afs)}


def choices_from_json(data):
  """The inverse of ``choices_to_json``; a bad entry raises a ValueError naming it."""
  if not isinstance(data, dict) or not isinstance(data.get("steps"), list) or not data["steps"]:
    raise ValueError(f"USF choices must be a dict with a non-empty list 'steps' (and 'afs'), got {data!r}")
  unknown = set(data) - {"steps", "afs"}
  if unknown:
    raise ValueError(f"USF choices have unknown keys {sorted(unknown)}; valid: steps, afs")
  fields = ("prediction", "order", "corrector")
  for i, step in enumerate(data["steps"]):
    if not isinstance(step, dict) or set(step) != set(fields):
      raise ValueError(f"USF choices steps[{i}]={step!r}: need exactly the keys {', '.join(fields)}")
    if not isinstance(step["corrector"], bool):
      raise ValueError(f"USF choices steps[{i}].corrector={step['corrector']!r}: must be true or false")
    if isinstance(step["order"], bool) or not isinstance(step["order"], int):
      raise ValueError(f"USF choices steps[{i}].order={step['order']!r}: must be an integer in 1..3")
  afs = data.get("afs", False)
  if not isinstance(afs, bool):
    raise ValueError(f"USF choices afs={afs!r}: must be true or false")
  return make_choices([s["prediction"] for s in data["steps"]], [s["order"] for s in data["steps"]],
                      [s["corrector"] for s in data["steps"]], afs)


def _native_kind(denoiser):
  """The kind to request from the model: eps for a network that predicts eps, else x0 (module docstring)."""
  for candidate in (denoiser, getattr(denoiser, "inner", None)):
    kind = getattr(candidate, "prediction", None)
    if isinstance(kind, str):
      return "eps" if kind == "eps" else "x0"
  return "x0"


class USFState(NamedTuple):
  """The state of ``USF``: the point the model is evaluated at next, the corrected current point (the expansion's
  start), both histories of model outputs (newest first), the NFE and the key."""
  x: jnp.ndarray
  anchor: jnp.ndarray
  hist_x0: jnp.ndarray   # (HISTORY, *x.shape)
  hist_eps: jnp.ndarray  # (HISTORY, *x.shape)
  nfe: jnp.ndarray
  key: Any


@pytree_dataclass
class USF(base.Solver):
  """The unified sampling framework's per-step solver schedule (Liu et al. 2024, USF, Sec. 3; module docstring) on
  UniPC's UniP / UniC (Zhao et al. 2023). ``choices`` (a ``Choices`` leaf; None: the registered default, data
  / order 2 / corrector / no AFS at every step) are traced; ``variant`` (UniPC's B(h)), ``lower_order_final`` and
  ``afs_data_std`` are static."""
  choices: Optional[Choices] = None
  variant: str = static_field(default="bh2")
  lower_order_final: bool = static_field(default=True)
  afs_data_std: float = static_field(default=1.0)

  def __post_init__(self):
    base.check_options(self, (("variant", VARIANTS), ("lower_order_final", (True, False))))
    if not (isinstance(self.afs_data_std, (int, float)) and np.isfinite(self.afs_data_std) and self.afs_data_std > 0):
      raise ValueError(f"afs_data_std={self.afs_data_std!r} must be a positive number")
    if self.choices is not None:
      if not isinstance(self.choices, Choices):
        raise ValueError(f"choices must be a usf.Choices or None, got {type(self.choices).__name__}")
      arrays = _concrete(self.choices)  # unflattening under jit / vmap passes tracers or placeholders: no check
      if arrays is not None:
        _validate(arrays)

  def _concrete_choices(self):
    if self.choices is None:
      return None
    arrays = _concrete(self.choices)
    return None if arrays is None else Choices(**arrays)

  @property
  def order(self):
    """The highest chosen order (2 for the default)."""
    choices = self._concrete_choices()
    return 2 if choices is None else int(np.max(np.asarray(choices.order)))

  @property
  def declared_order(self):
    """The global order of the weakest chosen step: its order, plus one with the corrector (UniC-p has order
    p + 1). The default (UniPC-2 with UniC) is 3. An analytical first step adds an error set by t_max, not by
    the step size, and is not counted."""
    choices = self._concrete_choices()
    if choices is None:
      return 3
    return int(np.min(np.asarray(choices.order) + np.asarray(choices.corrector)))

  @property
  def superconverges_on_linear_problems(self):
    """Like UniPC: order 3 with the corrector shows order ~5 on Gaussians (tests/test_unipc.py)."""
    choices = self._concrete_choices()
    return choices is not None and bool(np.any((np.asarray(choices.order) == 3) & (np.asarray(choices.corrector) > 0)))

  def for_order_measurement(self):
    return dataclasses.replace(self, lower_order_final=False)

  def init(self, denoiser, schedule, grid, x, key):
    zeros = jnp.zeros((HISTORY,) + x.shape, x.dtype)
    return USFState(x=x, anchor=x, hist_x0=zeros, hist_eps=zeros, nfe=jnp.zeros((), jnp.int32), key=key)

  def _per_step(self, length):
    """(prediction, order, corrector, afs) as int arrays of ``length`` steps (padded with the last entry)."""
    if self.choices is None:
      ones = jnp.ones((length,), jnp.int32)
      return 0 * ones, 2 * ones, ones, jnp.zeros((), jnp.int32)
    arrays = []
    for name in ("prediction", "order", "corrector"):
      value = jnp.asarray(getattr(self.choices, name), jnp.int32)
      if value.shape[-1] > length:
        raise ValueError(f"choices.{name} has {value.shape[-1]} steps; this grid has room for {length} "
                         f"(capacity - 1): build a grid with a larger capacity")
      arrays.append(jnp.pad(value, (0, length - value.shape[-1]), mode="edge"))
    return (*arrays, jnp.asarray(self.choices.afs, jnp.int32))

  def step_orders(self, grid):
    """The order each step runs with: the chosen one, lowered for lack of history, by ``lower_order_final`` and
    to 1 into sigma = 0."""
    length = grid.capacity - 1
    _, order, _, afs = self._per_step(length)
    # After an analytical first step the history starts at node 1 (see ``coefficients``): step i has i outputs.
    order = jnp.where(afs > 0, jnp.minimum(order, jnp.maximum(jnp.arange(length), 1)), order)
    return multistep_orders(grid.num_steps, length, order, self.lower_order_final, None, grid.sigma[1:] == 0)

  def coefficients(self, grid, schedule):
    """Rows of both prediction types for the chosen orders (UniPC's UniP / UniC tables), the per-step type of the
    predictor and of the corrector applied at iteration i (that of step i - 1), and the AFS flag of row 0."""
    length = grid.capacity - 1
    prediction, _, corrector, afs = self._per_step(length)
    orders = self.step_orders(grid)
    h = exponential.step_sizes(grid)
    # Iteration i corrects step i - 1 (never the last step; UniPC's own rule) if that step's corrector is on. The
    # analytic first output only drives the first step: neither a corrector nor a later step's derivative estimate
    # uses it (it is the exact posterior mean only for centred data, and a difference m_1 - m_0 would carry its
    # error divided by the step).
    steps = jnp.arange(length)
    corrected = exponential.previous((corrector > 0) & ~((steps == 0) & (afs > 0)), 1, False)
    rows = {}
    for name in PREDICTIONS:
      unipc = UniPC(order=MAX_ORDER, variant=self.variant, prediction=name)
      pred_anchor, pred_hist = unipc._unip(grid, h, orders)
      corr_x, corr_anchor, corr_hist = unipc._unic(grid, h, orders)
      rows[name] = {"pred_anchor": pred_anchor, "pred_hist": pred_hist,
                    "corr_x": jnp.where(corrected, corr_x, 1.0), "corr_anchor": jnp.where(corrected, corr_anchor, 0.0),
                    "corr_hist": jnp.where(corrected[:, None], corr_hist, 0.0)}
    dtype = h.dtype
    return {**rows, "pred_noise": (prediction == 1).astype(dtype),
            "corr_noise": exponential.previous(prediction == 1, 1, False).astype(dtype),
            "analytic": ((steps == 0) & (afs > 0)).astype(dtype)}

  def _analytic(self, x, alpha, sigma):
    """(x0, eps): the posterior mean for data ~ N(0, afs_data_std^2 I) (the analytical first step)."""
    var = alpha**2 * self.afs_data_std**2 + sigma**2
    return (alpha * self.afs_data_std**2 / var * x).astype(x.dtype), (sigma / var * x).astype(x.dtype)

  def _model(self, denoiser, schedule, x, t):
    """(x0, eps) from one model call, in the kind the model predicts, the other converted at (x, t)."""
    kind = _native_kind(denoiser)
    other = "x0" if kind == "eps" else "eps"
    out = denoiser.predict(kind, x, t, schedule)
    converted = predictions.convert(out, kind, other, x, t, schedule).astype(x.dtype)
    return (out, converted) if kind == "x0" else (converted, out)

  def step(self, denoiser, schedule, grid, coeffs, i, state):
    """Evaluate at node i (or take the analytic value), correct node i with step i - 1's UniC, predict node i + 1
    with step i's UniP, each in the chosen prediction type."""
    c = base.cast_coefficients(coeffs, state.x)
    analytic = c["analytic"] > 0
    x0, eps = jax.lax.cond(analytic,
                           lambda x: self._analytic(x, grid.alpha[i].astype(x.dtype), grid.sigma[i].astype(x.dtype)),
                           lambda x: self._model(denoiser, schedule, x, grid.t[i]), state.x)
    hist = {"data": jnp.concatenate([x0[None], state.hist_x0[:-1]]),
            "noise": jnp.concatenate([eps[None], state.hist_eps[:-1]])}

    def combine(rows, hist):
      corrected = rows["corr_x"] * state.x + rows["corr_anchor"] * state.anchor
      for k in range(HISTORY):
        corrected = corrected + rows["corr_hist"][k] * hist[k]
      return corrected

    corrected = jnp.where(c["corr_noise"] > 0, combine(c["noise"], hist["noise"]), combine(c["data"], hist["data"]))

    def predict(rows, hist):
      x = rows["pred_anchor"] * corrected
      for k in range(HISTORY):
        x = x + rows["pred_hist"][k] * hist[k]
      return x

    x = jnp.where(c["pred_noise"] > 0, predict(c["noise"], hist["noise"]), predict(c["data"], hist["data"]))
    nfe = state.nfe + jnp.where(analytic, 0, 1).astype(state.nfe.dtype)
    return state._replace(x=x.astype(state.x.dtype), anchor=corrected.astype(state.x.dtype), hist_x0=hist["data"],
                          hist_eps=hist["noise"], nfe=nfe)


def with_choices(solver, choices):
  """``solver`` (a ``USF``) running ``choices`` (checked; traced choices pass unchecked)."""
  if not isinstance(solver, USF):
    raise ValueError(f"with_choices needs a usf.USF solver, got {type(solver).__name__}")
  return dataclasses.replace(solver, choices=check_choices(choices))


base.register("usf", USF)

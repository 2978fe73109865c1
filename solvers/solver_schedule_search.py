"""Search for a USF solver schedule (the per-step choices of ``solvers.usf``) with a learned performance predictor,
after S^3 (Liu, Ning, Yang & Wang 2024, "A Unified Sampling Framework for Solver Searching of Diffusion
Probabilistic Models", ICLR; arXiv 2312.07243, Sec. 4.2: predictor-based multi-stage search).

The space: at each of ``num_steps`` steps a prediction type (data / noise), a Taylor order (1..3) and the UniC
corrector (on / off), and one analytical-first-step bit for the run: 12^N x 2 schedules. Choices that cannot act are
canonicalised before anything is evaluated, so equivalent schedules are evaluated once: the order of step i is at
most its history (i + 1; i after an analytical first step), the last step's corrector is off (never applied), and an
order-1 step without corrector that starts from an uncorrected point (the first step, or after a step without
UniC) is data prediction (DDIM: both forms are the same map there); with ``zero_final`` (a grid ending at
sigma = 0) the last step is first order. tests/test_solver_schedule_search.py checks that canonical forms have the
same loss (it found the "uncorrected point" condition).

S^3 as implemented (``method='s3'``):
1. Evaluate the seed schedules (``seeds``; by default the USF forms of UniPC bh2-2 and DPM-Solver++ 2M with their
   lower-order final steps, so the result is never worse than them on ``loss_fn``) and ``initial`` random ones with
   the true ``loss_fn``.
2. ``stages`` times: fit the predictor, an ensemble of small MLPs on the one-hot encoding of the choices (per step
   2 + 3 + 2 entries, plus 2 for AFS) regressing the standardised log loss (optax AdamW, full batch); breed children
   of the ``parents`` best schedules evaluated so far (per-step mutation, uniform crossover), score them, and
   evaluate for real the predicted best of every group of ``tournament`` children. The stages share the rest of
   the budget equally.
3. Return the best schedule evaluated.
The paper's predictor is also an MLP on encoded schedules (it encodes the time steps too, which here are fixed by
the grid ``loss_fn`` closes over) that ranks candidates from an evolutionary proposal, whose predicted best are
evaluated. Scoring one large pool and evaluating its predicted top (tried first) spent the stages on near copies
of one predicted optimum and lost to the plain evolution below; a tournament per evaluated child keeps the
evolution's diversity and lets the predictor reject the children it expects to be bad. The predictor's rank
correlation with the true loss on held-out random schedules (GMM, 6 steps): 0.51 / 0.64 / 0.77 after 40 / 100 /
200 evaluated schedules (a ridge regression on the same features: 0.49 / 0.54 / 0.53).

Baselines with the same seeds and the same number of true evaluations: ``method='random'`` (the seeds, then
random schedules) and ``method='evolution'`` (the same initial set, then each stage's children evaluated without
the predictor: a plain elitist evolutionary search).

Measured on the analytic GMM (dim 8, VPLinear, logSNR grid t = 1 -> 1e-3 then sigma = 0; ``learned_grids`` problem,
key 0, 128 calibration / 512 held-out starts; budget 200 true evaluations; ``zero_final=True``): held-out RMSE
against the diffrax reference, and the search's wall time on the shared 2-core CPU (compilation included):

| NFE | UniPC bh2-2 | DPM-Solver++ 2M | S^3 | evolution | random | S^3 + AFS (NFE + 1 steps) | seconds (S^3 / +AFS) |
|---|---|---|---|---|---|---|---|
| 4 | 0.387 | 0.392 | 0.312 | 0.313 | 0.313 | 0.216 | 10 / 10 |
| 5 | 0.322 | 0.310 | 0.218 | 0.201 | 0.201 | 0.119 | 6 / 16 |
| 6 | 0.234 | 0.230 | 0.115 | 0.115 | 0.128 | 0.088 | 8 / 13 |
| 8 | 0.143 | 0.155 | 0.065 | 0.065 | 0.076 | 0.058 | 14 / 14 |
| 10 | 0.087 | 0.106 | 0.037 | 0.065 | 0.073 | 0.043 | 14 / 14 |

The searched schedules mix both prediction types and all orders (e.g. NFE 6: D1 N1c D3 N2c D1c N1, D = data,
N = noise, c = UniC). With a loss this cheap the predictor does not beat the plain evolution at equal true
evaluations (equal at NFE 4 / 6 / 8, worse at 5, better at 10 held-out); both beat random search from NFE 6 on.
With 32 calibration starts the schedules overfit (NFE 10: calibration 0.016, held-out 0.116 for S^3).

Every true evaluation is ``loss_fn(solver)`` with ``solver`` a ``usf.USF`` (``solver`` options kept, choices
replaced), vmapped over a batch of ``batch`` schedules and jitted once per search (the batch is padded, so the last
one does not recompile): ``loss_fn`` must be traceable, e.g. ``learned_grids.loss`` bound to a grid, its starts and
their reference end points. Non-finite losses count as +inf (for the predictor, as the largest finite log loss
plus one). The search is deterministic for a ``key``: the host-side sampling uses a NumPy generator seeded from it.
"""
import functools
import time
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from solvers import usf
from solvers.evolutionary_search import _check_positive_int, _check_probability, _rng

METHODS = ("s3", "random", "evolution")
_FEATURES_PER_STEP = 7  # one-hot: prediction (2), order (3), corrector (2)


class SearchResult(NamedTuple):
  """What ``search`` returns: the best schedule found and its loss, the per-stage history (``history['stage']``:
  'initial' or the stage number; ``'best'``: best loss so far after it; ``'stage_best'``; ``'evaluations'``: true
  evaluations so far; ``'rank_correlation'``: for S^3, the Spearman correlation between the predictor's scores and
  the true losses of the schedules that stage evaluated, nan otherwise), the number of true evaluations, the
  wall time (compilation included), and every evaluated schedule with its loss (``evaluated``: (choices, loss)
  pairs in evaluation order)."""
  choices: usf.Choices
  loss: float
  history: dict
  evaluations: int
  seconds: float
  evaluated: list


# ----------------------------------------------------------------------------------------------------
# Schedules as tuples: (prediction_0..N-1, order_0..N-1, corrector_0..N-1, afs), canonical.


def _canonical(prediction, order, corrector, afs, zero_final=False):
  n = len(prediction)
  prediction, order, corrector = (np.array(v, np.int64) for v in (prediction, order, corrector))
  history = np.maximum(np.arange(n), 1) if afs else np.arange(n) + 1
  order = np.minimum(order, history)
  if zero_final:
    order[n - 1] = 1
  corrector[n - 1] = 0
  if afs:
    corrector[0] = 0
    prediction[0] = 0
  # A first-order step is DDIM in either form only from an uncorrected point: after UniC the anchor (corrected)
  # and the model's input (predicted) differ, and the two forms weight them differently.
  uncorrected_start = np.concatenate([[True], corrector[:-1] == 0])
  prediction[(order == 1) & (corrector == 0) & uncorrected_start] = 0
  return tuple(prediction) + tuple(order) + tuple(corrector) + (int(afs),)


def _from_choices(choices, num_steps, zero_final=False):
  c = usf.check_choices(choices)
  arrays = [np.asarray(getattr(c, name)) for name in ("prediction", "order", "corrector")]
  if arrays[0].shape != (num_steps,):
    raise ValueError(f"seed choices have {arrays[0].shape[-1] if arrays[0].ndim else 0} steps; num_steps={num_steps}")
  return _canonical(*arrays, int(c.afs), zero_final)


def _to_choices(member):
  n = (len(member) - 1) // 3
  m = np.asarray(member, np.int64)
  return usf.Choices(prediction=m[:n], order=m[n:2 * n], corrector=m[2 * n:3 * n], afs=m[3 * n])


class _Space:
  """Random schedules, mutations and crossovers (host side, NumPy generator)."""

  def __init__(self, num_steps, afs, zero_final=False):
    self.n = num_steps
    self.afs = afs  # None: searched; True / False: fixed
    self.zero_final = zero_final

  def _afs(self, rng):
    return int(rng.integers(2)) if self.afs is None else int(self.afs)

  def random(self, rng):
    n = self.n
    return _canonical(rng.integers(0, 2, n), rng.integers(1, 4, n), rng.integers(0, 2, n), self._afs(rng),
                      self.zero_final)

  def mutate(self, rng, parent, probability):
    n = self.n
    p = np.asarray(parent, np.int64)
    for _ in range(20):  # a child equal to its parent (canonically) is redrawn
      prediction, order, corrector = p[:n].copy(), p[n:2 * n].copy(), p[2 * n:3 * n].copy()
      afs = int(p[-1])
      for i in np.flatnonzero(rng.random(n) < probability):
        component = rng.integers(3)
        if component == 0:
          prediction[i] = 1 - prediction[i]
        elif component == 1:
          order[i] = rng.choice([o for o in usf.ORDERS if o != order[i]])
        else:
          corrector[i] = 1 - corrector[i]
      if self.afs is None and rng.random() < probability:
        afs = 1 - afs
      child = _canonical(prediction, order, corrector, afs, self.zero_final)
      if child != tuple(parent):
        return child
    return self.random(rng)

  def cross(self, rng, a, b):
    n = self.n
    a, b = np.asarray(a, np.int64), np.asarray(b, np.int64)
    take = rng.random(n) < 0.5
    pick = lambda k: np.where(take, a[k * n:(k + 1) * n], b[k * n:(k + 1) * n])  # noqa: E731
    return _canonical(pick(0), pick(1), pick(2), int(a[-1] if rng.random() < 0.5 else b[-1]), self.zero_final)


  def breed(self, rng, parents, crossover, mutation):
    """A child of random ``parents``: uniform crossover with probability ``crossover``, else a mutation."""
    pick = lambda: parents[rng.integers(len(parents))]  # noqa: E731
    return self.cross(rng, pick(), pick()) if rng.random() < crossover else self.mutate(rng, pick(), mutation)


def seed_schedules(num_steps):
  """The default seeds: the USF forms of UniPC bh2-2 (data, order 2, UniC) and DPM-Solver++ 2M (data, order 2),
  with UniPC's lower-order final steps written into the choices."""
  return [usf.constant_choices(num_steps, "data", 2, corrector) for corrector in (True, False)]


# ----------------------------------------------------------------------------------------------------
# Features and the performance predictor.


def encode(members):
  """One-hot features (num_schedules, 7 num_steps + 2) of canonical schedules (tuples or ``usf.Choices``)."""
  rows = []
  for member in members:
    if isinstance(member, usf.Choices):
      member = _from_choices(member, np.asarray(member.prediction).shape[-1])
    m = np.asarray(member, np.int64)
    n = (m.size - 1) // 3
    feature = np.zeros((n, _FEATURES_PER_STEP))
    feature[np.arange(n), m[:n]] = 1
    feature[np.arange(n), 2 + m[n:2 * n] - 1] = 1
    feature[np.arange(n), 5 + m[2 * n:3 * n]] = 1
    rows.append(np.concatenate([feature.ravel(), np.eye(2)[m[-1]]]))
  return np.stack(rows)


def _mlp_init(key, sizes):
  params = []
  for k, (a, b) in zip(jax.random.split(key, len(sizes) - 1), zip(sizes[:-1], sizes[1:])):
    params.append((jax.random.normal(k, (a, b)) * np.sqrt(2.0 / a), jnp.zeros(b)))
  return params


def _mlp(params, x):
  for w, b in params[:-1]:
    x = jax.nn.gelu(x @ w + b)
  w, b = params[-1]
  return (x @ w + b)[..., 0]


@functools.partial(jax.jit, static_argnames=("hidden", "steps", "ensemble"))
def _fit(key, features, targets, weights, hidden, steps, learning_rate, weight_decay, ensemble):
  """An ensemble of MLPs fitted to the weighted (0 / 1: padding) rows by AdamW; returns the stacked params."""
  sizes = (features.shape[1], hidden, hidden, 1)
  optimizer = optax.adamw(learning_rate, weight_decay=weight_decay)

  def one(key):
    params = _mlp_init(key, sizes)

    def loss(params):
      return jnp.sum(weights * (_mlp(params, features) - targets) ** 2) / jnp.sum(weights)

    def update(carry, _):
      params, state = carry
      grad = jax.grad(loss)(params)
      changes, state = optimizer.update(grad, state, params)
      return (optax.apply_updates(params, changes), state), None

    (params, _), _ = jax.lax.scan(update, (params, optimizer.init(params)), None, length=steps)
    return params

  return jax.vmap(one)(jax.random.split(key, ensemble))


@jax.jit
def _predict(params, features):
  return jnp.mean(jax.vmap(_mlp, in_axes=(0, None))(params, features), 0)


class Predictor(NamedTuple):
  """A fitted performance predictor: ``scores(members)`` are standardised predicted log losses (lower is better)."""
  params: list

  def scores(self, members):
    """Predicted standardised log losses of schedules (tuples or ``usf.Choices``); lower is predicted better."""
    return np.asarray(_predict(self.params, jnp.asarray(encode(members))), np.float64)


def _targets(losses):
  """Standardised log losses; non-finite ones at the largest finite log loss + 1."""
  logs = np.log(np.where(np.isfinite(losses) & (losses > 0), losses, np.nan))
  finite = logs[np.isfinite(logs)]
  if finite.size == 0:
    return np.zeros_like(losses, dtype=np.float64)
  logs = np.where(np.isfinite(logs), logs, finite.max() + 1.0)
  return (logs - finite.mean()) / max(finite.std(), 1e-12)


def fit_predictor(members, losses, *, key, capacity=None, hidden=64, steps=400, learning_rate=3e-3,
                  weight_decay=1e-3, ensemble=4):
  """The performance predictor fitted to evaluated schedules (tuples or ``usf.Choices``) and their true losses.

  The training set is padded to ``capacity`` rows (default: its size) with zero weights, so a search that refits
  on a growing set compiles once."""
  features = encode(members)
  losses = np.asarray(losses, np.float64)
  if losses.shape != (features.shape[0],):
    raise ValueError(f"losses has shape {losses.shape}; expected ({features.shape[0]},)")
  capacity = features.shape[0] if capacity is None else max(int(capacity), features.shape[0])
  pad = capacity - features.shape[0]
  features = np.pad(features, ((0, pad), (0, 0)))
  targets = np.pad(_targets(losses), (0, pad))
  weights = np.pad(np.ones(losses.shape[0]), (0, pad))
  params = _fit(key, jnp.asarray(features), jnp.asarray(targets), jnp.asarray(weights), hidden=hidden, steps=steps,
                learning_rate=learning_rate, weight_decay=weight_decay, ensemble=ensemble)
  return Predictor(params=params)


def rank_correlation(a, b):
  """Spearman's rank correlation of two 1-D arrays (ties broken by order)."""
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  if a.shape != b.shape or a.ndim != 1 or a.size < 2:
    raise ValueError(f"rank_correlation needs two 1-D arrays of one length >= 2, got shapes {a.shape}, {b.shape}")
  ra, rb = (np.argsort(np.argsort(v, kind="stable"), kind="stable").astype(np.float64) for v in (a, b))
  ra, rb = ra - ra.mean(), rb - rb.mean()
  return float(np.sum(ra * rb) / np.sqrt(np.sum(ra**2) * np.sum(rb**2)))


# ----------------------------------------------------------------------------------------------------
# True evaluations.


def make_evaluator(loss_fn, solver, batch):
  """A function of a list of canonical schedules returning their losses (float64 NumPy): ``loss_fn`` on
  ``usf.with_choices(solver, choices)``, vmapped over ``batch`` schedules at a time (padded) and jitted once."""
  batched = jax.jit(jax.vmap(lambda choices: loss_fn(usf.with_choices(solver, choices))))

  def evaluate(members):
    out = []
    for start in range(0, len(members), batch):
      chunk = list(members[start:start + batch])
      padded = chunk + [chunk[-1]] * (batch - len(chunk))
      stacked = np.stack([np.asarray(m, np.int64) for m in padded])
      n = (stacked.shape[1] - 1) // 3
      choices = usf.Choices(prediction=jnp.asarray(stacked[:, :n], jnp.int32),
                            order=jnp.asarray(stacked[:, n:2 * n], jnp.int32),
                            corrector=jnp.asarray(stacked[:, 2 * n:3 * n], jnp.int32),
                            afs=jnp.asarray(stacked[:, -1], jnp.int32))
      values = np.asarray(batched(choices), np.float64)[:len(chunk)]
      out.append(np.where(np.isfinite(values), values, np.inf))
    return np.concatenate(out) if out else np.zeros(0)

  return evaluate


# ----------------------------------------------------------------------------------------------------
# The search.


def _unseen(rng, make, count, seen, tries=20):
  """Up to ``count`` distinct members from ``make()`` not in ``seen``."""
  out, local = [], set()
  for _ in range(count * tries):
    if len(out) == count:
      break
    member = make()
    if member not in seen and member not in local:
      local.add(member)
      out.append(member)
  return out


def search(loss_fn, num_steps, *, key, budget, method="s3", solver=None, afs=None, zero_final=False, seeds=None,
           initial=None,
           stages=4, parents=8, mutation=0.25, crossover=0.5, tournament=8, batch=16, hidden=64, predictor_steps=400,
           ensemble=4):
  """A USF solver schedule for ``num_steps`` steps minimising ``loss_fn`` with ``budget`` true evaluations.

  ``loss_fn(solver) -> scalar``: traceable in the solver's choices (module docstring). ``method``: 's3' (predictor
  guided), 'random' or 'evolution' (baselines; module docstring). ``solver``: the ``usf.USF`` whose choices are
  searched (default ``USF(lower_order_final=False)``: the orders are searched, UniPC's final rule is a seed).
  ``afs``: None searches the analytical first step, True / False fixes it (then the seeds are given that AFS).
  ``zero_final``: True when ``loss_fn``'s grid ends with a jump to sigma = 0 (``final='zero'``): that step is first
  order whatever is chosen, so its order is canonicalised away.
  ``seeds``: ``usf.Choices`` evaluated first (default ``seed_schedules``); ``initial``: random schedules evaluated
  with them (default a third of the budget); ``stages``: predictor / evolution rounds sharing the rest;
  ``parents``: the top-k evaluated that breed; ``mutation``: per-step probability of changing one component;
  ``crossover``: fraction of children bred by crossover; ``tournament``: children scored per evaluated one (S^3);
  ``batch``: schedules per vmapped evaluation; ``hidden`` / ``predictor_steps`` / ``ensemble``: the predictor's MLP
  width, AdamW steps and ensemble size. Returns a ``SearchResult``."""
  started = time.perf_counter()
  if not callable(loss_fn):
    raise ValueError(f"loss_fn must be a function of a USF solver, got {type(loss_fn).__name__}")
  if method not in METHODS:
    raise ValueError(f"method={method!r} is unknown; valid: {', '.join(METHODS)}")
  num_steps = _check_positive_int(num_steps, "num_steps")
  budget = _check_positive_int(budget, "budget")
  stages = _check_positive_int(stages, "stages")
  tournament = _check_positive_int(tournament, "tournament")
  parents = _check_positive_int(parents, "parents")
  batch = _check_positive_int(batch, "batch")
  hidden = _check_positive_int(hidden, "hidden")
  predictor_steps = _check_positive_int(predictor_steps, "predictor_steps")
  ensemble = _check_positive_int(ensemble, "ensemble")
  mutation = _check_probability(mutation, "mutation", low_open=True)
  crossover = _check_probability(crossover, "crossover", low_open=False)
  if afs not in (None, True, False):
    raise ValueError(f"afs={afs!r}: None (searched), True or False")
  solver = usf.USF(lower_order_final=False) if solver is None else solver
  if not isinstance(solver, usf.USF):
    raise ValueError(f"solver must be a usf.USF, got {type(solver).__name__}")
  seeds = seed_schedules(num_steps) if seeds is None else list(seeds)
  if afs is not None:
    seeds = [c._replace(afs=jnp.asarray(int(afs), jnp.int32)) for c in seeds]
  members = []
  if zero_final not in (True, False):
    raise ValueError(f"zero_final={zero_final!r}: True or False")
  for member in (_from_choices(c, num_steps, zero_final) for c in seeds):
    if member not in members:
      members.append(member)
  if len(members) > budget:
    raise ValueError(f"budget={budget} is smaller than the {len(members)} distinct seed schedules")
  initial = (budget // 3 if initial is None else _check_positive_int(initial, "initial", 0))
  if method != "random" and len(members) + initial >= budget:
    raise ValueError(f"budget={budget} leaves nothing for the stages after {len(members)} seeds and initial={initial}")

  rng = _rng(key)
  predictor_key = jax.random.fold_in(key, 1)
  space = _Space(num_steps, afs, zero_final)
  evaluate = make_evaluator(loss_fn, solver, batch)
  seen = {}
  history = {"stage": [], "best": [], "stage_best": [], "evaluations": [], "rank_correlation": []}
  evaluated = []

  def record(stage, batch_members, predicted=None):
    values = evaluate(batch_members)
    for member, value in zip(batch_members, values):
      seen[member] = value
      evaluated.append((_to_choices(member), float(value)))
    correlation = float("nan")
    if predicted is not None and len(values) > 1 and np.all(np.isfinite(values)):
      correlation = rank_correlation(predicted, values)
    history["stage"].append(stage)
    history["stage_best"].append(float(values.min()) if len(values) else float("inf"))
    history["best"].append(float(min(seen.values())))
    history["evaluations"].append(len(seen))
    history["rank_correlation"].append(correlation)

  first_count = budget if method == "random" else len(members) + initial
  first = members + _unseen(rng, lambda: space.random(rng), first_count - len(members), set(members))
  record("initial", first)
  remaining = budget - len(seen)
  for stage in range(1, stages + 1):
    if remaining <= 0:
      break
    take = remaining // (stages - stage + 1)
    if take <= 0:
      continue
    top = sorted(seen, key=seen.get)[:parents]
    if method == "evolution":
      record(stage, _unseen(rng, lambda: space.breed(rng, top, crossover, mutation), take, seen))
    else:
      predictor = fit_predictor(list(seen), [seen[m] for m in seen], key=jax.random.fold_in(predictor_key, stage),
                                capacity=budget, hidden=hidden, steps=predictor_steps, ensemble=ensemble)
      # Each evaluated child is the predicted best of ``tournament`` children of the top schedules.
      children = _unseen(rng, lambda: space.breed(rng, top, crossover, mutation), take * tournament, seen)
      scores = dict(zip(children, predictor.scores(children)))
      groups = [children[k:k + tournament] for k in range(0, len(children), tournament)]
      chosen = [min(group, key=scores.get) for group in groups][:take]
      record(stage, chosen, predicted=[scores[m] for m in chosen])
    remaining = budget - len(seen)
  best = min(seen, key=seen.get)
  return SearchResult(choices=usf.check_choices(_to_choices(best)), loss=float(seen[best]), history=history,
                      evaluations=len(seen), seconds=time.perf_counter() - started, evaluated=evaluated)

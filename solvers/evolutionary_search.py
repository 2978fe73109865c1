"""Evolutionary search over sampling time steps, after AutoDiffusion (Li, Li, Zheng, Wu, Xiao, Wang, Zheng, Pan,
Chao & Ji 2023, "AutoDiffusion: Training-Free Optimization of Time Steps and Architectures for Automated Diffusion
Model Acceleration", ICCV; arXiv 2309.10438).

The search space (the time-step part of the paper's): a fixed, fine, decreasing set of candidate times, from
which a schedule picks ``num_times`` sorted, distinct entries. ``t_start`` is always the first time; with
``final='t_end'`` ``t_end`` is always the last one (so every schedule ends where the reference does); with
``final='zero'`` the grid appends the sigma = 0 node itself (``grids.from_times``) and the last finite time is
free (any candidate down to ``t_end``). The default candidates are 1000 times uniform in lambda between
``t_start`` and ``t_end`` (the paper's DPM-Solver variant picks from a 1000-node time-uniform set; lambda-uniform
nodes resolve the low-noise end, where few-step grids want their steps), or, for a ``DiscreteVP`` schedule, its
integer training steps in [t_end, t_start], as the paper picks among the DDPM's 1000 steps.

The evolutionary algorithm (the paper's search, as in its official code's ``EvolutionSearcher``):
1. Population: ``population`` schedules, uniformly random subsets of the candidates (the paper's default);
   ``init`` grids (e.g. the logSNR grid's times) are added to the candidates, enter the first population as they
   are, and half of it is their mutations (the official ``use_ddim_init_x`` option, mutation probability 0.1).
2. Each generation, the ``parents`` best schedules evaluated so far (top-k over every generation: elitism, so the
   best loss never increases) breed the next population: a fraction ``crossover`` by uniform crossover of two random
   parents (the i-th time of the child is the i-th time of either parent, with probability 1/2, then sorted; a time
   drawn twice is replaced by another time of either parent, so times stay distinct), the rest by mutation of one
   random parent (each free time replaced with probability ``mutation`` by a random unused candidate; a child equal
   to its parent is redrawn). Schedules already evaluated are rejected and redrawn (the official code's
   ``vis_dict``); what cannot be filled in ten tries per slot is filled with random schedules.
3. ``generations`` populations are evaluated in all (the initial one included). The official code's defaults,
   population 50, top-k 10, 10 iterations, mutation probability 0.1, 25 crossovers + 25 mutations, are the
   defaults here.

What we kept and what we dropped. AutoDiffusion's two-stage evolutionary search covers time steps and network
architectures (which blocks of the noise-prediction network to skip at each step). We keep the time-step search
only: no architecture, the model is called whole at every step. The candidate schedules are evaluated by
``loss_fn``, supplied by the caller, in one ``jax.vmap``-ed, jitted call per generation, instead of one sampling run
each; the paper's proxy is the FID of a small set of generated samples, ours is whatever ``loss_fn`` computes: the
RMSE against reference solutions on a few starting noises (``proxy_loss(metric='rmse')``), or, reference-free on the
analytic GMM, a sliced Wasserstein distance to data samples (``proxy_loss(metric='swd')``). The search is seeded by
``key`` and deterministic; the host does the bookkeeping (sets of visited schedules) with a NumPy generator seeded
from the key.

Measured on the analytic GMM (``models.analytic.gmm(dim=8)``, VPLinear, t = 1 -> 1e-3, final='zero'),
``dpm_solver_pp_2m`` (NFE = steps): RMSE on 512 held-out starts against the diffrax reference (rtol 1e-10), from
``learned_grids.make_problem(..., key=jax.random.key(0), num_calibration=C, num_heldout=512)``; the search
minimises ``proxy_loss(solver, problem)``, the RMSE on the C calibration starts; key 0, random initial population.
Columns: the hand-made grids; the paper's settings (population 50, top-10, 10 generations = 500 evaluations) with
C = 32 and C = 128; 50 generations (C = 128); 10 generations seeded with the three hand-made grids (C = 128):

| NFE | logSNR | time-quadratic | Karras | C=32, 50x10 | C=128, 50x10 | C=128, 50x50 | C=128, seeded |
|---|---|---|---|---|---|---|---|
| 4 | 0.392 | 0.379 | 0.444 | 0.189 | 0.173 | 0.172 | 0.173 |
| 5 | 0.310 | 0.255 | 0.402 | 0.159 | 0.137 | 0.129 | 0.129 |
| 6 | 0.230 | 0.189 | 0.231 | 0.159 | 0.118 | 0.112 | 0.113 |
| 8 | 0.155 | 0.118 | 0.278 | 0.121 | 0.084 | 0.081 | 0.080 |
| 10 | 0.106 | 0.077 | 0.158 | 0.063 | 0.080 | 0.056 | 0.078 |

With 128 calibration starts the searched grid beats the best hand-made one (time-quadratic) on held-out starts by
2.2x at NFE 4, 1.9x at 5, 1.6x at 6 and 1.4x at 8; at NFE 10 it needs 50 generations (1.4x). The per-start errors
are heavy-tailed (trajectories near the boundaries between modes: 5% of the held-out starts carry 68% of
time-quadratic's squared error at NFE 5), so 32 starts are an unrepresentative sample: the search then overfits them
(calibration / held-out RMSE 0.075 / 0.159 at NFE 5, 0.035 / 0.121 at NFE 8, where it loses to time-quadratic's
0.118). Searched grids (C = 128) put their steps in lambda in [-2.9, 1.9] after t_start (lambda -5.0), where the
mixture's modes separate, and jump to sigma = 0 from lambda 1.0-1.9, well before t_end (lambda 4.6). Wall time on
the shared 2-core CPU (load 5-12), C = 128: 2.6-4.1 s for the first 50 x 10 search at an NFE (compilation included),
0.2-0.6 s for the same search compiled, 1.1-4.1 s for 50 x 50.
"""
import functools
import time
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from solvers import grids as grids_lib
from solvers import loop
from solvers import schedules as schedules_lib

DEFAULT_CANDIDATES = 1000
METRICS = ("rmse", "swd")
_TRIES = 10  # redraws per population slot before a random schedule fills it (the official max_iters = 10 x)


class SearchResult(NamedTuple):
  """What ``search`` returns: the best times, their loss, per-generation history, evaluation count and wall time."""
  times: np.ndarray   # (num_times,) the best schedule found: decreasing, distinct, times[0] = t_start
  loss: float         # its loss, as evaluated in the population's batch
  history: dict       # per generation: 'best' (best so far), 'generation_best', 'mean' (of the finite losses)
  evaluations: int    # calls of loss_fn (population x generations)
  seconds: float      # wall time of the search, compilation included


def _check_positive_int(value, name, minimum=1):
  if isinstance(value, (bool, float)) or not isinstance(value, (int, np.integer)) or value < minimum:
    raise ValueError(f"{name}={value!r}: must be an integer >= {minimum}")
  return int(value)


def _check_probability(value, name, low_open):
  ok = isinstance(value, (int, float, np.floating)) and not isinstance(value, bool) and np.isfinite(value)
  if not ok or not ((0.0 < value if low_open else 0.0 <= value) and value <= 1.0):
    raise ValueError(f"{name}={value!r}: must be a number in {'(0, 1]' if low_open else '[0, 1]'}")
  return float(value)


def _rng(key):
  """A NumPy generator seeded from a JAX key (typed or raw uint32), so the host side is deterministic too."""
  if key is None:
    raise ValueError("key=None: pass key=jax.random.key(seed); the search is random")
  key = jnp.asarray(key) if not isinstance(key, jax.Array) else key
  if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
    key = jax.random.key_data(key)
  return np.random.default_rng(np.asarray(key, np.uint32).ravel().tolist())


def candidate_times(schedule, *, t_start=None, t_end=None, candidates=None):
  """The decreasing candidate times of the search, from ``t_start`` to ``t_end`` (both included).

  ``candidates``: None (the default: the integer steps of a ``DiscreteVP`` schedule, otherwise 1000 times uniform
  in lambda), an integer n (n times uniform in lambda), or an array of times inside [t_end, t_start].
  """
  t_start, t_end = grids_lib._endpoints(schedule, t_start, t_end)
  lo, hi = float(schedule.t_min), float(schedule.t_max)
  tol = 1e-9 * max(1.0, abs(hi))
  for name, value in (("t_start", t_start), ("t_end", t_end)):
    if not (np.isfinite(value) and lo - tol <= value <= hi + tol):
      raise ValueError(f"{name}={value!r} is outside the schedule's range [{lo}, {hi}]")
  if not t_start > t_end:
    raise ValueError(f"t_start={t_start!r} must be larger than t_end={t_end!r} (sampling runs down in t)")
  if candidates is None and isinstance(schedule, schedules_lib.DiscreteVP):
    inner = np.arange(np.ceil(t_end), np.floor(t_start) + 1, dtype=np.float64)
  elif candidates is None or isinstance(candidates, (int, np.integer)) and not isinstance(candidates, bool):
    n = DEFAULT_CANDIDATES if candidates is None else _check_positive_int(candidates, "candidates", 2)
    inner = grids_lib.uniform_logsnr(schedule, n - 1, t_start=t_start, t_end=t_end, final="t_end").times()
  else:
    inner = np.asarray(candidates, np.float64)
    if inner.ndim != 1 or inner.size < 1 or not np.all(np.isfinite(inner)):
      raise ValueError(f"candidates must be None, an integer or a 1-D array of finite times, got {candidates!r}")
    bad = np.flatnonzero((inner > t_start + tol) | (inner < t_end - tol))
    if bad.size:
      raise ValueError(f"candidates[{bad[0]}]={float(inner[bad[0]])!r} is outside [t_end, t_start] = "
                       f"[{t_end}, {t_start}]")
  inner = inner[(inner < t_start) & (inner > t_end)]
  return np.unique(np.concatenate([[t_start, t_end], inner]))[::-1].copy()


def _snap(times, pool, name):
  """Indices into ``pool`` (decreasing) of the given times, which must be among them (after merging)."""
  index = np.searchsorted(-pool, -times)
  index = np.clip(index, 0, pool.size - 1)
  if not np.allclose(pool[index], times, rtol=0, atol=1e-12 * max(1.0, float(np.max(np.abs(pool))))):
    raise ValueError(f"{name}: times {times!r} are not candidates")
  return index


class _Space:
  """The search space: fixed first (and with final='t_end' last) time, ``free`` times picked from ``pool``."""

  def __init__(self, times, num_times, final):
    self.start = times[:1]
    self.end = times[-1:] if final == "t_end" else times[:0]
    self.pool = times[1:-1] if final == "t_end" else times[1:]
    self.free = num_times - 1 - self.end.size
    if self.free > self.pool.size:
      raise ValueError(f"{num_times} times need {self.free} free candidates but only {self.pool.size} lie "
                       f"between t_start and t_end: pass more candidates or fewer steps")

  def times(self, member):
    return np.concatenate([self.start, self.pool[np.asarray(member, int)], self.end])

  def random(self, rng):
    return tuple(np.sort(rng.choice(self.pool.size, self.free, replace=False)))

  def mutate(self, rng, parent, probability):
    parent = np.asarray(parent)
    mask = np.zeros(parent.size, bool)
    while parent.size and not mask.any():  # a child equal to its parent would be rejected: redraw the mask
      mask = rng.random(parent.size) < probability
    unused = np.setdiff1d(np.arange(self.pool.size), parent)
    child = parent.copy()
    if mask.sum() > unused.size:
      return tuple(parent)
    child[mask] = rng.choice(unused, int(mask.sum()), replace=False)
    return tuple(np.sort(child))

  def cross(self, rng, first, second):
    first, second = np.asarray(first), np.asarray(second)
    child = np.unique(np.where(rng.random(first.size) < 0.5, first, second))
    spare = np.setdiff1d(np.union1d(first, second), child)  # a time taken twice: refill from the parents
    if child.size < self.free:
      child = np.concatenate([child, rng.choice(spare, self.free - child.size, replace=False)])
    return tuple(np.sort(child))


@functools.lru_cache(maxsize=8)
def _batched(loss_fn, chunk):
  if chunk is None:
    return jax.jit(jax.vmap(loss_fn))
  return jax.jit(lambda times: jax.lax.map(loss_fn, times, batch_size=chunk))


def evaluate(loss_fn, times, *, chunk=None):
  """``loss_fn`` on each row of ``times`` (a (num_schedules, num_times) batch) in one jitted call: ``jax.vmap``, or
  ``lax.map`` over ``chunk`` rows at a time. The compiled function is cached per ``loss_fn`` (the last 8), so
  further batches of the same shape, and the searches that call this, never recompile. Returns float64 NumPy."""
  if chunk is not None:
    chunk = _check_positive_int(chunk, "chunk")
  times = jnp.asarray(times, schedules_lib.table_dtype())
  if times.ndim != 2:
    raise ValueError(f"times has shape {times.shape}; expected (num_schedules, num_times)")
  return np.asarray(_batched(loss_fn, chunk)(times), np.float64)


def search(loss_fn, schedule, num_steps, *, key, t_start=None, t_end=None, final="zero", candidates=None,
           population=50, generations=10, mutation=0.1, crossover=0.5, parents=None, init=None, chunk=None):
  """AutoDiffusion's evolutionary search for the time steps minimising ``loss_fn`` (module docstring).

  ``loss_fn(times) -> scalar``: a JAX-traceable function of one decreasing (num_times,) array of times, where
  num_times = num_steps with ``final='zero'`` (the sigma = 0 node is the grid's) and num_steps + 1 otherwise, e.g.
  the RMSE of a solver on ``grids.from_times(schedule, times, final=final)`` (``proxy_loss``). Non-finite losses
  count as +inf. ``candidates``: see ``candidate_times``. ``population``: schedules per generation; ``generations``:
  populations evaluated, the first included; ``mutation``: the probability that a mutation replaces each free time;
  ``crossover``: the fraction of each new population bred by crossover (the rest by mutation); ``parents``: the
  top-k of all schedules so far that breed (default min(10, population)); ``init``: None, or one or several
  decreasing arrays of num_times times from t_start (and to t_end with ``final='t_end'``) that seed the first
  population; ``chunk``: evaluate the population ``chunk`` schedules at a time (``lax.map``) instead of all at once,
  to bound memory. Returns a ``SearchResult``.
  """
  started = time.perf_counter()
  if not callable(loss_fn):
    raise ValueError(f"loss_fn must be a function of the times, got {type(loss_fn).__name__}")
  num_times = grids_lib._num_times(num_steps, final)
  population = _check_positive_int(population, "population", 2)
  generations = _check_positive_int(generations, "generations")
  parents = min(10, population) if parents is None else _check_positive_int(parents, "parents")
  if parents > population:
    raise ValueError(f"parents={parents} must not exceed population={population}")
  if chunk is not None:
    chunk = _check_positive_int(chunk, "chunk")
  mutation = _check_probability(mutation, "mutation", low_open=True)
  crossover = _check_probability(crossover, "crossover", low_open=False)
  rng = _rng(key)
  times = candidate_times(schedule, t_start=t_start, t_end=t_end, candidates=candidates)
  seeds = _init_grids(init, num_times, final, times)
  if seeds:
    times = np.unique(np.concatenate([times] + seeds))[::-1].copy()
  space = _Space(times, num_times, final)
  members = [tuple(_snap(s[1:len(s) - space.end.size], space.pool, "init")) for s in seeds]

  visited = {}
  history = {"best": [], "generation_best": [], "mean": []}
  roots = _unique(members, visited)
  if len(roots) > population:
    raise ValueError(f"init has {len(roots)} distinct grids, more than population={population}")
  # Seeds, then their mutations (probability 0.1, the official use_ddim_init_x) up to half the population.
  first = _fill(roots, max(population // 2, len(roots)), visited, rng,
                lambda: space.mutate(rng, roots[rng.integers(len(roots))], 0.1), random=False) if roots else []
  batch = _fill(first, population, visited, rng, lambda: space.random(rng))
  for generation in range(generations):
    if generation:
      top = sorted(visited, key=visited.get)[:parents]
      pick = lambda: top[rng.integers(len(top))]
      n_cross = int(round(crossover * population))
      bred = _fill([], n_cross, visited, rng, lambda: space.cross(rng, pick(), pick()), random=False)
      bred = _fill(bred, population, visited, rng, lambda: space.mutate(rng, pick(), mutation), random=False)
      batch = _fill(bred, population, visited, rng, lambda: space.random(rng))
    values = evaluate(loss_fn, np.stack([space.times(m) for m in batch]), chunk=chunk)
    values = np.where(np.isfinite(values), values, np.inf)
    for member, value in zip(batch, values):
      visited[member] = min(value, visited.get(member, np.inf))
    finite = values[np.isfinite(values)]
    history["generation_best"].append(float(values.min()))
    history["mean"].append(float(finite.mean()) if finite.size else float("inf"))
    history["best"].append(float(min(visited.values())))
  best = min(visited, key=visited.get)
  return SearchResult(times=space.times(best), loss=float(visited[best]), history=history,
                      evaluations=population * generations, seconds=time.perf_counter() - started)


def _init_grids(init, num_times, final, times):
  """The seed grids as a list of validated arrays of num_times decreasing times."""
  if init is None:
    return []
  several = isinstance(init, (list, tuple)) and len(init) > 0 and np.ndim(init[0]) == 1
  arrays = list(init) if several else [init]
  out = []
  t_start, t_end = times[0], times[-1]
  tol = 1e-9 * max(1.0, abs(t_start))
  for k, a in enumerate(arrays):
    a = np.array(a, np.float64)
    if a.shape != (num_times,) or not np.all(np.isfinite(a)):
      raise ValueError(f"init[{k}] has shape {a.shape}; it must be {num_times} finite times")
    if num_times > 1 and not np.all(np.diff(a) < 0):
      raise ValueError(f"init[{k}]={a.tolist()} must be strictly decreasing")
    if abs(a[0] - t_start) > tol or (final == "t_end" and abs(a[-1] - t_end) > tol) or a[-1] < t_end - tol:
      raise ValueError(f"init[{k}] must start at t_start={t_start}" + (f" and end at t_end={t_end}" if final ==
                       "t_end" else f" and stay above t_end={t_end}") + f", got {a[0]} .. {a[-1]}")
    a[0] = t_start
    if final == "t_end":
      a[-1] = t_end
    out.append(a)
  return out


def _unique(members, visited):
  seen, out = set(visited), []
  for m in members:
    if m not in seen:
      seen.add(m)
      out.append(m)
  return out


def _fill(batch, size, visited, rng, draw, random=True):
  """``batch`` topped up to ``size`` with new schedules from ``draw`` (not yet evaluated, not in the batch), with
  ``_TRIES`` tries per slot; with ``random``, slots still empty then take any schedule (duplicates allowed when
  the space is too small to fill the population)."""
  batch, seen = list(batch), set(visited) | set(batch)
  tries = _TRIES * max(size - len(batch), 0)
  while len(batch) < size and tries > 0:
    tries -= 1
    member = draw()
    if member not in seen:
      seen.add(member)
      batch.append(member)
  while random and len(batch) < size:
    batch.append(draw())
  return batch


def sorted_projections(x, directions):
  """(n, P): the projections of the points x (n, D) on the ``directions`` (P, D), each column sorted."""
  return jnp.sort(x @ directions.T, axis=0)


def sliced_wasserstein(x, y_sorted, directions):
  """Sliced 2-Wasserstein distance between the point sets x (n, D) and y (n, D), given y as
  ``sorted_projections(y, directions)``: sqrt of the mean over the unit ``directions`` of the squared W2 distance
  of the 1-D projections, which for equal sizes pairs the sorted values (Rabin, Peyre, Delon & Bernot 2011,
  Sec. 3; Bonneel, Rabin, Peyre & Pfister 2015, Eq. 4)."""
  return jnp.sqrt(jnp.mean((sorted_projections(x, directions) - y_sorted) ** 2))


def proxy_loss(solver, problem, *, metric="rmse", data=None, key=None, num_projections=64):
  """A cheap loss_fn(times) for ``search``: ``solver``'s samples from ``problem.x_calibration`` (a
  ``learned_grids.Problem``, e.g. from ``learned_grids.make_problem``) on the grid through ``times``, scored by

  - ``metric='rmse'``: ``learned_grids.loss``, the RMSE against ``problem.reference_calibration`` (the PF-ODE
    solutions from the same starts), on a handful of starting noises: the accuracy the search is for.
  - ``metric='swd'``: the sliced Wasserstein distance (``sliced_wasserstein``, ``num_projections`` random
    directions drawn from ``key``) between the samples and ``data``, as many data samples as there are starts
    (e.g. ``GMM.sample``): reference-free, a distribution-level score like the paper's FID. The references are
    not used, so a Problem without them will do: ``learned_grids.Problem(denoiser, schedule, final, t_start,
    t_end, x_T, None, None, None)``.

  How well they rank 24 random 5-step ddim schedules on the GMM (dim 8), by the Spearman rank correlation with the
  RMSE on 48 held-out starts (tests/test_evolutionary_search.py): RMSE on 8 / 32 starts 0.98 / 1.00; SWD on 8 / 32 /
  256 samples -0.08 / 0.96 / 0.95. At equal sizes the RMSE ranks better (with 8 samples the SWD is noise); the SWD
  needs no reference solutions.
  ``solver``: an object or a registered name.
  """
  from solvers import base, learned_grids  # imported here: learned_grids imports diffrax (the references)

  solver = base.get(solver) if isinstance(solver, str) else solver
  if not isinstance(problem, learned_grids.Problem):
    raise ValueError(f"problem must be a solvers.learned_grids.Problem (learned_grids.make_problem), got "
                     f"{type(problem).__name__}")
  if metric not in METRICS:
    raise ValueError(f"metric={metric!r} is unknown; valid: {', '.join(METRICS)}")
  x_T = jnp.asarray(problem.x_calibration)
  if metric == "rmse":
    reference = problem.reference_calibration
    if reference is None or tuple(np.shape(reference)) != tuple(x_T.shape):
      raise ValueError(f"metric='rmse' needs problem.reference_calibration of the starts' shape {tuple(x_T.shape)}, "
                       f"got {None if reference is None else tuple(np.shape(reference))}")
    reference = jnp.asarray(reference, x_T.dtype)
    return lambda times: learned_grids.loss(solver, times, x_T, reference, problem)
  if data is None or tuple(np.shape(data)) != tuple(x_T.shape):
    raise ValueError(f"metric='swd' needs data of the starts' shape {tuple(x_T.shape)} (as many data samples as "
                     f"starts), got {None if data is None else tuple(np.shape(data))}")
  num_projections = _check_positive_int(num_projections, "num_projections")
  if key is None:
    raise ValueError("metric='swd' needs key= for its random projection directions")
  flat = lambda x: x.reshape(x.shape[0], -1)
  directions = jax.random.normal(key, (num_projections, flat(x_T).shape[1]), x_T.dtype)
  directions = directions / jnp.linalg.norm(directions, axis=1, keepdims=True)
  # Sorted here, once: inside the loss XLA would constant-fold the sort of the data at every compilation.
  data_sorted = sorted_projections(flat(jnp.asarray(data, x_T.dtype)), directions)

  def swd(times):
    grid = learned_grids.make_grid(problem.schedule, times, problem.final)
    x = loop.sample(solver, problem.denoiser, problem.schedule, grid, x_T).x
    return sliced_wasserstein(flat(x), data_sorted, directions)
  return swd

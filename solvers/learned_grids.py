"""Learned time grids: the grid's times as parameters, fitted by gradient descent through the sampler.

The method is teacher-student discretisation learning: the times where a fixed solver steps are optimised so
that its few-step output matches a high-accuracy solution of the probability-flow ODE from the same starting
noise, by backpropagating through the (differentiable) sampling loop. This is LD3 (Tong, Hoang, Liu, Van den
Broeck & Niepert 2025, "Learning to Discretize Denoising Diffusion ODEs", ICLR; the global truncation error
between student and teacher, Sec. 3, on a small set of ~100 noises) without its soft teacher-forcing surrogate,
and in the spirit of DDSS (Watson, Chan, Ho & Norouzi 2022, "Learning Fast Samplers for Diffusion Models by
Differentiating Through Sample Quality", ICLR), which differentiates through a sampler to fit its time steps
and coefficients (there against a sample-quality score). The teacher here is ``solvers.reference.solve``
(diffrax, Dopri8, rtol 1e-10), and the loss is the RMSE of the final sample against it.

Parametrisation (monotone by construction; our choice): the grid runs in lambda (half log-SNR) from
lambda(t_start) to lambda(t_end), both fixed. The m = num_times - 1 intervals take the fractions
  f = min_fraction + (1 - m min_fraction) softmax(logits)
of that span, so every interval is at least ``min_fraction`` of it (strictly monotone in floating point for any
logits), and the times are t_k = schedule.t_of_lambda(lambda_start + span * sum_{j<k} f_j), with t_0 = t_start
and t_last = t_end set exactly. With ``learn_end=True`` (``final='zero'`` only) one more softmax entry is
slack: the last finite node before the jump to sigma = 0 may stop short of t_end (never beyond it).

``Problem`` holds the calibration set (the starts the grid is fitted on, tens of them) and a held-out set
(the starts it is judged on, so overfitting shows), each with its reference end points. ``loss`` is the RMSE
of a solver on a grid through given times; it is jit-able and differentiable in the times, so evolutionary
or solver-schedule searches can use it as their objective. ``optimize`` runs Adam (optax) on the logits; the
grid is traced, so one compilation of the loss and its gradient serves every iteration, and calls with the
same shapes reuse it.
"""
import time
from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from solvers import base, loop, reference
from solvers import grids as grids_lib
from solvers import schedules as schedules_lib

INITS = ("logsnr", "quadratic_t", "karras", "uniform_t")  # the hand-made grids (names of grids.GRIDS)
BASELINES = ("logsnr", "quadratic_t", "karras")  # what init='best' chooses from: the usual low-NFE grids
MIN_FRACTION = 1e-4
_INITIAL_SLACK = 1e-3  # learn_end: the share of the lambda span left unused at the start of the optimisation


class Problem(NamedTuple):
  """A calibration problem: starts x_T ~ N(0, sigma(t_start)^2 I) and their reference end points.

  ``reference_*`` are the PF-ODE solutions from ``x_*`` at t_start to sigma = 0 (``final='zero'``) or to t_end
  (``final='t_end'``). ``final``, ``t_start`` and ``t_end`` are Python values (static)."""
  denoiser: Any
  schedule: Any
  final: str
  t_start: float
  t_end: float
  x_calibration: jnp.ndarray
  reference_calibration: jnp.ndarray
  x_heldout: jnp.ndarray
  reference_heldout: jnp.ndarray


class Result(NamedTuple):
  """What ``optimize`` returns. ``times``: the learned decreasing times (num_times,), host float64, the best
  iterate on the calibration set; ``history``: the calibration loss before each update (history[0]: the
  initial grid's); ``seconds``: wall time of the whole optimisation, compilation included."""
  times: np.ndarray
  calibration_loss: float
  heldout_loss: float
  history: np.ndarray
  seconds: float
  initial_heldout_loss: float = float("nan")
  ratios: Optional[np.ndarray] = None  # learned DC-Solver ratios (learn_ratios=True), else None
  init: str = ""                        # the starting grid: a name of INITS, or 'times' (an array was given)


# ----------------------------------------------------------------------------------------------------
# Validation helpers.


def _check_int(value, name, minimum):
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
    raise ValueError(f"{name}={value!r} must be an integer >= {minimum}")
  return int(value)


def _check_endpoints(schedule, t_start, t_end):
  """(t_start, t_end) as floats, defaulting to the schedule's t_max / t_min; t_min <= t_end < t_start <= t_max."""
  t_start = float(schedule.t_max) if t_start is None else float(t_start)
  t_end = float(schedule.t_min) if t_end is None else float(t_end)
  lo, hi = float(schedule.t_min), float(schedule.t_max)
  tol = 1e-9 * max(1.0, abs(hi))
  if not (lo - tol <= t_end < t_start <= hi + tol):
    raise ValueError(f"t_start={t_start!r}, t_end={t_end!r}: need {lo} <= t_end < t_start <= {hi} (the schedule's range)")
  lam = np.asarray(schedule.lam(jnp.asarray([t_start, t_end], schedules_lib.table_dtype())), np.float64)
  if not np.all(np.isfinite(lam)):
    raise ValueError(f"lambda(t_start={t_start})={lam[0]}, lambda(t_end={t_end})={lam[1]}: a learned grid needs "
                     "finite lambda at both ends; move t_start / t_end inside the schedule")
  return t_start, t_end


def _check_final(final):
  if final not in grids_lib.FINAL_POLICIES:
    raise ValueError(f"final={final!r} is unknown; valid: {', '.join(grids_lib.FINAL_POLICIES)}")
  return final


def num_times(num_steps, final):
  """How many times a grid of ``num_steps`` steps lists: the sigma = 0 node of ``final='zero'`` is not one."""
  _check_final(final)
  return _check_int(num_steps, "num_steps", 1) + (0 if final == "zero" else 1)


def _event_shape(denoiser, shape):
  if shape is not None:
    shape = tuple(int(s) for s in np.atleast_1d(shape))
    if not shape or min(shape) < 1:
      raise ValueError(f"shape={shape!r}: the shape of one sample, positive sizes")
    return shape
  params = getattr(denoiser, "params", None)
  oracle = params.get("oracle") if isinstance(params, dict) else None
  for field in ("means", "mean"):  # models.analytic.GMM / Gaussian
    if oracle is not None and hasattr(oracle, field):
      return tuple(getattr(oracle, field).shape[-1:])
  raise ValueError("shape=None: the shape of one sample cannot be read from this denoiser; pass shape=(...)")


def _check_solver(solver):
  if isinstance(solver, str):
    solver = base.get(solver)
  if getattr(solver, "stochastic", False):
    raise ValueError(f"{type(solver).__name__} is stochastic; learned grids fit deterministic (PF-ODE) solvers")
  if getattr(solver, "adaptive", False):
    raise ValueError(f"{type(solver).__name__} is adaptive: it chooses its own steps, so a grid cannot be learned for it")
  return solver


# ----------------------------------------------------------------------------------------------------
# The problem.


def make_problem(denoiser, schedule, key, *, num_calibration, num_heldout, t_start=None, t_end=None, final="zero",
                 dtype=None, shape=None, rtol=1e-10, atol=1e-10):
  """Draws ``num_calibration`` and ``num_heldout`` starts x_T ~ N(0, sigma(t_start)^2 I) (from fold_in(key, 0)
  and fold_in(key, 1)) and integrates each to its reference end point with ``solvers.reference.solve``
  (float64, tolerances ``rtol`` / ``atol``; needs jax_enable_x64).

  ``t_start`` / ``t_end`` default to the schedule's t_max / t_min; ``final`` is the grids' final-step policy.
  ``dtype`` (default: float64 with x64) is that of the stored starts and references, hence of the samples the
  loss runs. ``shape`` is the shape of one sample; None reads it from an analytic oracle's denoiser."""
  if not jax.config.jax_enable_x64:
    raise ValueError("make_problem computes reference solutions in float64: enable jax_enable_x64 first")
  n_cal = _check_int(num_calibration, "num_calibration", 1)
  n_held = _check_int(num_heldout, "num_heldout", 1)
  final = _check_final(final)
  t_start, t_end = _check_endpoints(schedule, t_start, t_end)
  shape = _event_shape(denoiser, shape)
  dtype = jnp.dtype(schedules_lib.table_dtype() if dtype is None else dtype)
  if not jnp.issubdtype(dtype, jnp.floating):
    raise ValueError(f"dtype={dtype} must be a floating dtype")
  for name, value in (("rtol", rtol), ("atol", atol)):
    if not (isinstance(value, (int, float)) and value > 0):
      raise ValueError(f"{name}={value!r} must be a positive number")
  sigma = schedule.sigma(jnp.asarray(t_start, jnp.float64))
  target = "zero" if final == "zero" else t_end
  out = []
  for index, count in ((0, n_cal), (1, n_held)):
    x = sigma * jax.random.normal(jax.random.fold_in(key, index), (count,) + shape, jnp.float64)
    answer = reference.solve(denoiser, schedule, x, t_start, target, rtol=rtol, atol=atol)
    out += [x.astype(dtype), answer.astype(dtype)]
  return Problem(denoiser, schedule, final, t_start, t_end, *out)


# ----------------------------------------------------------------------------------------------------
# Grids.


def make_grid(schedule, times, final):
  """The grid through ``times`` (decreasing; traced or concrete) with the final policy, padded to nothing
  (capacity = its node count: fewest loop iterations; each step count compiles once)."""
  extra = 1 if final == "zero" else 0
  return grids_lib.from_times(schedule, times, final=final, capacity=times.shape[0] + extra)


def hand_made_times(schedule, name, num_steps, *, t_start=None, t_end=None, final="zero"):
  """The times (num_times,) of a hand-made grid between t_start and t_end (endpoints exact): ``logsnr``
  (uniform lambda), ``quadratic_t`` (uniform sqrt(t)), ``uniform_t`` or ``karras`` (Karras et al. 2022, Eq. 5,
  rho = 7, between rho(t_start) and rho(t_end)). With ``final='zero'`` the sigma = 0 node is not listed."""
  if name not in INITS:
    raise ValueError(f"grid {name!r} is unknown; valid: {', '.join(INITS)}")
  t_start, t_end = _check_endpoints(schedule, t_start, t_end)
  n = num_times(num_steps, final)
  if name == "karras":
    rho = lambda t: float(schedule.rho(jnp.asarray(t, schedules_lib.table_dtype())))
    grid = grids_lib.karras(schedule, num_steps, sigma_min=rho(t_end), sigma_max=rho(t_start), final=final)
  else:
    grid = grids_lib.GRIDS[name](schedule, num_steps, t_start=t_start, t_end=t_end, final=final)
  times = np.array(grid.times()[:n], np.float64)
  times[0] = t_start
  if n > 1:
    times[-1] = t_end
  return times


def _lambda_span(schedule, t_start, t_end):
  dtype = schedules_lib.table_dtype()
  lam_start = schedule.lam(jnp.asarray(t_start, dtype))
  return lam_start, schedule.lam(jnp.asarray(t_end, dtype)) - lam_start


def num_logits(n_times, learn_end):
  """The parameters of a grid of ``n_times`` times: one per interval, plus the slack with ``learn_end``."""
  if n_times <= 1:
    return 0
  return n_times - 1 + (1 if learn_end else 0)


def times_from_logits(logits, schedule, n_times, t_start, t_end, *, learn_end=False, min_fraction=MIN_FRACTION):
  """The decreasing times (n_times,) of the parametrisation (module doc); traceable and differentiable."""
  dtype = schedules_lib.table_dtype()
  head = jnp.full((1,), t_start, dtype)
  if n_times == 1:
    return head
  m = logits.shape[0]
  lam_start, span = _lambda_span(schedule, t_start, t_end)
  fractions = min_fraction + (1.0 - m * min_fraction) * jax.nn.softmax(jnp.asarray(logits, dtype))
  cumulative = jnp.cumsum(fractions)
  if learn_end:
    inner = schedule.t_of_lambda(lam_start + span * cumulative[: n_times - 1])
    return jnp.concatenate([head, inner.astype(dtype)])
  inner = schedule.t_of_lambda(lam_start + span * cumulative[: n_times - 2])
  return jnp.concatenate([head, inner.astype(dtype), jnp.full((1,), t_end, dtype)])


def logits_from_times(times, schedule, t_start, t_end, *, learn_end=False, min_fraction=MIN_FRACTION):
  """Logits whose times (``times_from_logits``) are ``times`` (decreasing, from t_start to t_end; with
  ``learn_end`` to t_end or above it: the slack is the rest of the lambda span, at least 0.1% of it, so a last node
  at t_end moves by that much)."""
  times = np.asarray(times, np.float64)
  if times.ndim != 1 or times.size < 1:
    raise ValueError(f"times must be a 1-D array, got shape {times.shape}")
  n = times.size
  m = num_logits(n, learn_end)
  if m == 0:
    return jnp.zeros((0,), schedules_lib.table_dtype())
  if m * min_fraction >= 1.0:
    raise ValueError(f"min_fraction={min_fraction} is too large for {m} intervals: need m * min_fraction < 1")
  lam_start, span = (float(v) for v in _lambda_span(schedule, t_start, t_end))
  lam = np.asarray(schedule.lam(jnp.asarray(times, schedules_lib.table_dtype())), np.float64)
  fractions = np.diff(lam) / span
  if learn_end:  # the unused rest of the span, at least _INITIAL_SLACK (fractions are renormalised below)
    fractions = np.append(fractions, max(1.0 - fractions.sum(), _INITIAL_SLACK))
  fractions = fractions / fractions.sum()
  shares = (fractions - min_fraction) / (1.0 - m * min_fraction)
  if np.any(shares <= 0):
    k = int(np.flatnonzero(shares <= 0)[0])
    raise ValueError(f"times {times[k]!r} -> {times[min(k + 1, n - 1)]!r} span {fractions[k]:.3g} of the lambda range, "
                     f"not more than min_fraction={min_fraction}")
  logits = np.log(shares)
  return jnp.asarray(logits - logits.mean(), schedules_lib.table_dtype())


def _initial_times(init, schedule, num_steps, t_start, t_end, final, learn_end=False):
  n = num_times(num_steps, final)
  if isinstance(init, str):
    if init not in INITS:
      raise ValueError(f"init={init!r} is unknown; valid: {', '.join(INITS + ('best',))} or an array of times")
    return hand_made_times(schedule, init, num_steps, t_start=t_start, t_end=t_end, final=final)
  times = np.asarray(init, np.float64)
  if times.shape != (n,):
    raise ValueError(f"init has shape {times.shape}; {num_steps} steps with final={final!r} need ({n},) times, "
                     f"or a name from {', '.join(INITS)}")
  tol = 1e-9 * max(1.0, abs(t_start))
  end_ok = n == 1 or abs(times[-1] - t_end) <= tol or (learn_end and times[-1] > t_end)
  if abs(times[0] - t_start) > tol or not end_ok or np.any(np.diff(times) >= 0):
    raise ValueError(f"init times must decrease strictly from t_start={t_start} to t_end={t_end} (or, with learn_end, "
                     f"to above it), got {times.tolist()}")
  return times


# ----------------------------------------------------------------------------------------------------
# The loss and its optimisation.


def loss(solver, times, x_T, reference, problem):
  """RMSE between ``solver``'s samples from ``x_T`` on the grid through ``times`` and ``reference``.

  ``times``: a decreasing (num_times,) array, without the sigma = 0 node when ``problem.final == 'zero'``
  (the grid is ``grids.from_times(problem.schedule, times, final=problem.final)``, unpadded). Only
  ``problem``'s denoiser, schedule and final are used. Jit-able, vmappable and differentiable in ``times``."""
  grid = make_grid(problem.schedule, times, problem.final)
  x = loop.sample(solver, problem.denoiser, problem.schedule, grid, x_T).x
  return jnp.sqrt(jnp.mean((x - reference) ** 2))


class _Spec(NamedTuple):
  """The static part of an optimisation (hashable: part of the jit cache key)."""
  final: str
  n_times: int
  t_start: float
  t_end: float
  learn_end: bool
  min_fraction: float
  learn_ratios: bool


def _solver_with(solver, params, spec):
  if not spec.learn_ratios:
    return solver
  from solvers import dc_solver
  return dc_solver.with_ratios(solver, 1.0 + 0.5 * jnp.tanh(params["ratios"]))  # DC-Solver's tanh bound


def _params_loss(params, solver, denoiser, schedule, x_T, target, spec):
  times = times_from_logits(params["logits"], schedule, spec.n_times, spec.t_start, spec.t_end,
                            learn_end=spec.learn_end, min_fraction=spec.min_fraction)
  problem = Problem(denoiser, schedule, spec.final, spec.t_start, spec.t_end, None, None, None, None)
  return loss(_solver_with(solver, params, spec), times, x_T, target, problem)


def _update(params, opt_state, solver, denoiser, schedule, x_T, target, spec, learning_rate):
  value, grad = jax.value_and_grad(_params_loss)(params, solver, denoiser, schedule, x_T, target, spec)
  changes, opt_state = optax.adam(learning_rate).update(grad, opt_state, params)
  return optax.apply_updates(params, changes), opt_state, value


_update_static = jax.jit(_update, static_argnames=("solver", "spec", "learning_rate"))
_update_traced = jax.jit(_update, static_argnames=("spec", "learning_rate"))
_loss_static = jax.jit(_params_loss, static_argnames=("solver", "spec"))
_loss_traced = jax.jit(_params_loss, static_argnames=("spec",))


def optimize(solver, problem, num_steps, *, init="logsnr", iterations=200, learning_rate=0.05, learn_end=None,
             min_fraction=MIN_FRACTION, learn_ratios=False):
  """Fits the times of a ``num_steps``-step grid for ``solver`` (an object or a registered name) on
  ``problem``'s calibration set by Adam on the logits (module doc), from the hand-made grid ``init`` (a name of
  ``INITS``; ``'best'``: whichever of ``BASELINES`` has the lowest calibration loss; or an array of times from
  t_start to t_end).

  Returns a ``Result``: the times of the iterate with the lowest calibration loss seen (the loss at every
  iterate is known from the gradient evaluations; the held-out set plays no part in the choice), its
  calibration and held-out RMSE, the initial grid's held-out RMSE, the history and the wall time.
  ``learn_end`` (final='zero' only; None: on for final='zero') lets the last node before sigma = 0 move up from
  t_end (on the GMM this lowers the held-out RMSE at NFE 5-6 by a further ~40%).
  ``learn_ratios`` fits a DC-Solver's compensation ratios (1 + tanh(theta) / 2, from 1) jointly with the grid."""
  solver = _check_solver(solver)
  started = time.perf_counter()
  _check_int(iterations, "iterations", 0)
  if not (isinstance(learning_rate, (int, float)) and not isinstance(learning_rate, bool) and learning_rate > 0):
    raise ValueError(f"learning_rate={learning_rate!r} must be a positive number")
  if not (isinstance(min_fraction, (int, float)) and 0 < min_fraction < 0.5):
    raise ValueError(f"min_fraction={min_fraction!r} must lie in (0, 0.5)")
  if learn_end is None:
    learn_end = problem.final == "zero"
  if learn_end and problem.final != "zero":
    raise ValueError(f"learn_end=True needs final='zero' (the last node of final={problem.final!r} is the reference's end)")
  if learn_ratios:
    from solvers import dc_solver
    if not isinstance(solver, dc_solver.DCSolver):
      raise ValueError(f"learn_ratios=True needs a DC-Solver (dc_solver), got {type(solver).__name__}")
  schedule = problem.schedule
  n = num_times(num_steps, problem.final)
  spec = _Spec(problem.final, n, problem.t_start, problem.t_end, bool(learn_end), float(min_fraction), bool(learn_ratios))
  static = not loop._has_leaves(solver)
  update = _update_static if static else _update_traced
  evaluate = _loss_static if static else _loss_traced
  args = (solver, problem.denoiser, schedule)

  def start(times):
    params = {"logits": logits_from_times(times, schedule, problem.t_start, problem.t_end, learn_end=learn_end,
                                          min_fraction=min_fraction)}
    if learn_ratios:  # one ratio per step (the grid's capacity - 1), from theta = 0: rho = 1
      params["ratios"] = jnp.zeros((n if problem.final == "zero" else n - 1,), schedules_lib.table_dtype())
    return params

  if isinstance(init, str) and init == "best":
    scores = {name: float(evaluate(start(_initial_times(name, schedule, num_steps, problem.t_start, problem.t_end,
                                                        problem.final)), *args, problem.x_calibration,
                                   problem.reference_calibration, spec)) for name in BASELINES}
    init = min(scores, key=scores.get)
  init_times = _initial_times(init, schedule, num_steps, problem.t_start, problem.t_end, problem.final, learn_end)
  initial = params = start(init_times)

  opt_state = optax.adam(learning_rate).init(params)
  history, best, best_params = [], np.inf, params
  for _ in range(iterations):
    new_params, opt_state, value = update(params, opt_state, *args, problem.x_calibration,
                                          problem.reference_calibration, spec, float(learning_rate))
    value = float(value)
    history.append(value)
    if value < best:
      best, best_params = value, params
    params = new_params
  last = float(evaluate(params, *args, problem.x_calibration, problem.reference_calibration, spec))
  if iterations == 0 or last < best:
    best, best_params = last, params
  history.append(last)
  heldout = float(evaluate(best_params, *args, problem.x_heldout, problem.reference_heldout, spec))
  initial_heldout = float(evaluate(initial, *args, problem.x_heldout, problem.reference_heldout, spec))
  times = np.asarray(times_from_logits(best_params["logits"], schedule, n, problem.t_start, problem.t_end,
                                       learn_end=learn_end, min_fraction=min_fraction), np.float64)
  ratios = np.asarray(1.0 + 0.5 * np.tanh(np.asarray(best_params["ratios"]))) if learn_ratios else None
  return Result(times=times, calibration_loss=best, heldout_loss=heldout, history=np.asarray(history),
                seconds=time.perf_counter() - started, initial_heldout_loss=initial_heldout, ratios=ratios,
                init=init if isinstance(init, str) else "times")

"""The solver-order convergence study: error against NFE for every deterministic solver on analytic problems
and on a trained network.

For each problem (the analytic Gaussian, whose PF-ODE is solved exactly by ``Gaussian.pf_ode_solution``,
the GMM, whose answer comes from ``solvers.reference.solve``, and 'model': the network of a training
workdir, see below), each deterministic registered solver
and each step count, a fixed-seed batch x_T drawn from the exact marginal at the grid's first node is
integrated with ``solvers.sample`` in float64. Solvers that learn from the model first (``Solver.prepare``:
DPM-Solver-v3 computes its statistics, DC-Solver searches its ratios for each grid) do so on their own
training points (``prepare_seed``), and the time it takes is recorded as ``prepare_seconds``. The RMSE against the exact / reference answer, the NFE the
solver actually used (``Solution.nfe``) and the wall time are recorded, and the empirical order is fitted
as minus the least-squares slope of log(RMSE) against log(NFE).

The problem 'model' (``Config.model``: a training workdir of ``experiments.train``) uses the trained network
as the denoiser (final EMA params, unconditional: the null label of a class-conditional network), with its
own schedule, prediction kind and time label (``sample_lib.load_model``); ``schedule``, ``t_start`` and
``t_end`` do not apply to it. It runs over the schedule's whole interval [t_min, t_max], from starting noise
x_T ~ N(0, sigma(t_max)^2 I) (N(0, I) for VP schedules, as ``experiments.sample`` draws it) of the data's
shape, and its answer is the diffrax reference (``reference_rtol`` / ``reference_atol``), whose wall time
is recorded as the problem's ``seconds``. The network runs in float64 (float32 weights promoted), so the
errors are the solvers' own. Each x_T costs the reference hundreds of network calls: keep ``batch`` small
(8-16) for image models.

``run(config, workdir)`` is the entry point for the absl main, colabs and tests. It writes, atomically:
``config.json`` (the resolved config), ``metrics.jsonl`` (one line per run, rewritten after each run),
``results.json`` (rewritten after each (problem, solver) with ``"complete": false`` until the end),
``table.txt`` and ``convergence.png``.
"""
import dataclasses
import inspect
import io
import json
import math
import os
import sys
import tempfile
import time
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from experiments import cli

PROBLEMS = ("gaussian", "gmm")  # the analytic problems (the default)
MODEL = "model"                  # the problem of a trained network (Config.model)


@dataclasses.dataclass(frozen=True)
class Config:
  """The study's settings; every field has the default of the main job."""
  # Names from PROBLEMS and MODEL; None: PROBLEMS, or just MODEL when ``model`` is set.
  problems: Optional[Sequence[str]] = None
  model: Optional[str] = None          # a training workdir (experiments.train): the network of problem 'model'
  dim: int = 8
  # Registered solver names; None means every registered solver that is not stochastic.
  solvers: Optional[Sequence[str]] = None
  # Step counts of the sweep (= NFE for solvers with one model call per step; the fit uses Solution.nfe).
  nfe_steps: Sequence[int] = (5, 10, 20, 40, 80, 160)
  schedule: str = "vp_linear"          # a name of solvers.schedules.SCHEDULES
  # A name of solvers.grids.GRIDS, or learned:<name>: a learned-schedule artifact (solvers.schedule_artifacts) of
  # the problem's schedule, for one step count (nfe_steps = its steps), or, with '{nfe}' in the name (e.g.
  # learned:gmm-dim8-k4-seed0-unipc_bh2_2-gradient-nfe{nfe}), one per step count; final must be the artifacts'.
  # Their grids only: every solver of the study runs on them (a DC / USF artifact's options are not used).
  grid: str = "logsnr"
  schedules_dir: Optional[str] = None  # a folder searched first for learned:<name> artifacts
  final: str = "t_end"                 # solvers.grids.FINAL_POLICIES: 't_end' or 'zero' (a last jump to sigma = 0)
  t_start: Optional[float] = 1.0       # None: the schedule's t_max
  t_end: Optional[float] = 1e-3        # None: the schedule's t_min
  batch: int = 32
  seed: int = 0                        # seed of the x_T batch
  # Seed of the training points of solvers that learn from the model before sampling (Solver.prepare:
  # DPM-Solver-v3's statistics, DC-Solver's ratios, searched per grid); never the x_T batch itself.
  prepare_seed: int = 1
  reference_rtol: float = 1e-10        # tolerances of the diffrax reference (GMM)
  reference_atol: float = 1e-10
  # Points whose RMSE is below max(this, 100 * reference tolerance) (round-off / reference floor) are
  # left out of the order fit.
  error_floor: float = 1e-12
  # How many of the largest-NFE points the 'asymptotic order' slope uses.
  asymptotic_points: int = 3


# ----------------------------------------------------------------------------------------------------
# Config resolution and validation.


def _as_list(value, name):
  if isinstance(value, str):
    value = [v for v in value.split(",") if v]
  try:
    return list(value)
  except TypeError:
    raise ValueError(f"{name}={value!r} must be a list") from None


def _check_int(value, name, minimum):
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
    try:
      parsed = int(str(value))
    except ValueError:
      raise ValueError(f"{name}: {value!r} is not an integer") from None
    value = parsed
  if value < minimum:
    raise ValueError(f"{name}: {value!r} must be >= {minimum}")
  return int(value)


def resolve_config(config=None):
  """A validated ``Config`` from a Config, a dict of overrides or None; bad values raise ValueError."""
  import solvers
  from solvers import grids, schedule_artifacts, schedules

  config = cli.dataclass_config(Config, config)

  if config.problems is None:
    problems = [MODEL] if config.model else list(PROBLEMS)
  else:
    problems = _as_list(config.problems, "problems")
  if not problems:
    raise ValueError("problems is empty; valid: " + ", ".join(PROBLEMS + (MODEL,)))
  for p in problems:
    if p not in PROBLEMS + (MODEL,):
      raise ValueError(f"problem {p!r} is unknown; valid: {', '.join(PROBLEMS + (MODEL,))}")
  problems = list(dict.fromkeys(problems))
  if MODEL in problems and not config.model:
    raise ValueError(f"problem {MODEL!r} needs model=<a training workdir> (--model)")
  if config.model and MODEL not in problems:
    raise ValueError(f"model={config.model!r} is set but problems={problems} leaves out {MODEL!r}: add it")

  if config.solvers is None:
    names = [n for n in solvers.available() if not solvers.get(n).stochastic]
  else:
    names = list(dict.fromkeys(_as_list(config.solvers, "solvers")))
    if not names:
      raise ValueError("solvers is empty; leave it unset for every deterministic solver")
    for n in names:
      if solvers.get(n).stochastic:  # get raises a ValueError listing the names for an unknown one
        raise ValueError(f"solver {n!r} is stochastic; this study measures deterministic PF-ODE convergence")

  steps = sorted({_check_int(v, "nfe_steps", 1) for v in _as_list(config.nfe_steps, "nfe_steps")})
  if not steps:
    raise ValueError("nfe_steps is empty")

  if config.schedule not in schedules.SCHEDULES:
    raise ValueError(f"schedule {config.schedule!r} is unknown; valid: {', '.join(sorted(schedules.SCHEDULES))}")
  learned = schedule_artifacts.learned_name(config.grid)
  if learned is None and config.grid not in grids.GRIDS:
    raise ValueError(f"grid {config.grid!r} is unknown; valid: {', '.join(sorted(grids.GRIDS))}, or learned:<name>")
  if config.final not in grids.FINAL_POLICIES:
    raise ValueError(f"final {config.final!r} is unknown; valid: {', '.join(grids.FINAL_POLICIES)}")
  if learned is not None:  # every artifact exists (an unknown name lists the available ones) and fits
    if "{nfe}" not in learned and len(steps) != 1:
      artifact = schedule_artifacts.load(learned, search_path=config.schedules_dir)
      raise ValueError(f"grid {config.grid!r} has {artifact.num_steps} steps: pass nfe_steps=[{artifact.num_steps}] "
                       "(--nfe), or put '{nfe}' in the name for one artifact per step count")
    for n in steps:
      schedule_artifacts.check_compatible(_learned_artifact(config, n), num_steps=n, final=config.final)
  for name in ("reference_rtol", "reference_atol", "error_floor"):
    value = getattr(config, name)
    if not (isinstance(value, (int, float)) and value > 0):
      raise ValueError(f"{name}={value!r} must be a positive number")
  return dataclasses.replace(
      config, problems=problems, solvers=names, nfe_steps=steps,
      dim=_check_int(config.dim, "dim", 1), batch=_check_int(config.batch, "batch", 1),
      seed=_check_int(config.seed, "seed", 0), prepare_seed=_check_int(config.prepare_seed, "prepare_seed", 0),
      asymptotic_points=_check_int(config.asymptotic_points, "asymptotic_points", 2))


# ----------------------------------------------------------------------------------------------------
# Atomic file output.


def _umask():
  mask = os.umask(0)
  os.umask(mask)
  return mask


def _write_atomic(workdir, name, data):
  """Writes ``data`` (str or bytes) to workdir/name via a temporary file in workdir and os.replace."""
  mode = "wb" if isinstance(data, bytes) else "w"
  fd, tmp = tempfile.mkstemp(dir=workdir, prefix=f".{name}.", suffix=".tmp")
  try:
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the file the usual permissions
    with os.fdopen(fd, mode) as f:
      f.write(data)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, os.path.join(workdir, name))
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


def _json(obj):
  return json.dumps(obj, indent=2, allow_nan=False) + "\n"


def _finite_or_none(x):
  return float(x) if x is not None and math.isfinite(x) else None


# ----------------------------------------------------------------------------------------------------
# The study.


def fit_order(nfe, err):
  """Minus the least-squares slope of log(err) against log(nfe); None with fewer than 2 distinct NFE."""
  nfe, err = np.asarray(nfe, np.float64), np.asarray(err, np.float64)
  if nfe.size < 2 or np.unique(nfe).size < 2:
    return None
  slope = np.polyfit(np.log(nfe), np.log(err), 1)[0]
  return float(-slope)


def _learned_artifact(config, steps):
  """The artifact of ``grid='learned:<name>'`` for ``steps`` ('{nfe}' in the name replaced by it)."""
  from solvers import schedule_artifacts
  name = schedule_artifacts.learned_name(config.grid).replace("{nfe}", str(steps))
  return schedule_artifacts.load(name, search_path=config.schedules_dir)


def _make_grid(grids, schedule, config, steps, capacity):
  from solvers import schedule_artifacts
  if schedule_artifacts.learned_name(config.grid) is not None:
    artifact = _learned_artifact(config, steps)
    schedule_artifacts.check_compatible(artifact, schedule=schedule, num_steps=steps, final=config.final)
    return artifact.grid(capacity=capacity)
  builder = grids.GRIDS[config.grid]
  params = inspect.signature(builder).parameters
  kwargs = {"final": config.final, "capacity": capacity}
  if "t_start" in params:
    kwargs.update(t_start=config.t_start, t_end=config.t_end)
  elif config.grid == "karras":  # Karras spacing between rho(t_start) and rho(t_end)
    dtype = jnp.float64
    if config.t_start is not None:
      kwargs["sigma_max"] = float(schedule.rho(jnp.asarray(config.t_start, dtype)))
    if config.t_end is not None:
      kwargs["sigma_min"] = float(schedule.rho(jnp.asarray(config.t_end, dtype)))
  # Other builders (edm) use their own range; the start and the end are read back from the grid.
  return builder(schedule, steps, **kwargs)


def _sweep(grids, schedule, config):
  """(schedule, [grid per step count], start, end) of the sweep; every grid must share start and end."""
  capacity = max(config.nfe_steps) + 1  # nodes of the largest grid, for either final policy
  grid_list = [_make_grid(grids, schedule, config, n, capacity) for n in config.nfe_steps]
  start, end = _endpoints(grid_list[0])
  for n, g in zip(config.nfe_steps, grid_list):
    s, e = _endpoints(g)
    if not (np.allclose(s, start, rtol=1e-12, atol=0) and np.allclose(e, end, rtol=1e-12, atol=0)):
      raise ValueError(f"grid {config.grid!r} with {n} steps spans {s[0]}..{e[0]}, unlike the {start[0]}..{end[0]} "
                       "of the others: the sweep needs a common start and end")
  return schedule, grid_list, start, end


def _endpoints(grid):
  n = int(grid.num_steps)
  start = tuple(float(v[0]) for v in (grid.t, grid.alpha, grid.sigma))
  end = tuple(float(v[n]) for v in (grid.t, grid.alpha, grid.sigma))
  return start, end


def _problem(name, config, schedule, start, end, model=None):
  """(denoiser, x_T, answer, answer_info) for one problem; ``model`` (a ``sample_lib.Model``) for 'model'."""
  from models import analytic
  from solvers import reference

  (t0, a0, s0), (t1, a1, s1) = start, end
  if name == MODEL:
    from experiments import sample_lib
    denoiser = sample_lib.denoiser(model)
    x_T = sample_lib.prior(s0, (config.batch,) + model.shape, jax.random.key(config.seed), jnp.float64)
    info = {"model": config.model, "params": model.source, "model_step": model.step,
            "data_shape": list(model.shape), "x_T": "N(0, sigma(t_start)^2 I)"}
  else:
    oracle = analytic.gaussian(dim=config.dim) if name == "gaussian" else analytic.gmm(dim=config.dim)
    x_T = oracle.sample(jax.random.key(config.seed), config.batch, a0, s0)
    denoiser = oracle.denoiser(schedule)
    info = {}
  started = time.perf_counter()
  if name == "gaussian":
    answer = oracle.pf_ode_solution(x_T, a0, s0, a1, s1)
    info.update(answer="exact (Gaussian.pf_ode_solution)")
  else:
    t_end = "zero" if s1 == 0.0 else t1
    answer = reference.solve(denoiser, schedule, x_T, t0, t_end,
                             rtol=config.reference_rtol, atol=config.reference_atol)
    info.update(answer="reference (solvers.reference.solve, diffrax)", rtol=config.reference_rtol,
                atol=config.reference_atol)
  answer = jax.block_until_ready(answer)
  info.update(seconds=time.perf_counter() - started, t_start=t0, t_end=t1, sigma_end=s1)
  floor = config.error_floor if name == "gaussian" else max(
      config.error_floor, 100 * max(config.reference_rtol, config.reference_atol))
  info["error_floor"] = floor
  return denoiser, x_T, answer, info


def _sample_timed(sample, solver, denoiser, schedule, grid, x_T):
  started = time.perf_counter()
  sol = sample(solver, denoiser, schedule, grid, x_T)
  x = jax.block_until_ready(sol.x)
  return x, int(sol.nfe), time.perf_counter() - started


def _summarise(runs, floor, asymptotic_points):
  for r in runs:
    r["in_fit"] = r.get("rmse") is not None and r["rmse"] > floor
  good = [r for r in runs if r["in_fit"]]
  fitted = fit_order([r["nfe"] for r in good], [r["rmse"] for r in good])
  tail = good[-asymptotic_points:]
  asym = fit_order([r["nfe"] for r in tail], [r["rmse"] for r in tail])
  return fitted, asym


def run(config=None, workdir="workdir/convergence"):
  """Runs the study described by ``config`` (a Config, a dict of overrides, or None for the defaults).

  Writes its outputs into ``workdir`` (created if missing), prints the table to stdout last, and returns
  the results dict that is also written to results.json.
  """
  jax.config.update("jax_enable_x64", True)
  import solvers
  from solvers import grids, loop, schedules

  config = resolve_config(config)
  model = None
  if MODEL in config.problems:  # loaded (and a bad path refused) before anything is written
    from experiments import sample_lib
    model = sample_lib.load_model(config.model)
  os.makedirs(workdir, exist_ok=True)
  for stale in ("table.txt", "convergence.png"):  # outputs of an earlier run would not match this one
    if os.path.exists(os.path.join(workdir, stale)):
      os.remove(os.path.join(workdir, stale))
  resolved = dataclasses.asdict(config)
  _write_atomic(workdir, "config.json", _json(resolved))
  results = {"complete": False, "config": resolved, "problems": {}}
  _write_atomic(workdir, "results.json", _json(results))
  study_start = time.perf_counter()

  metrics = []
  for problem in config.problems:
    if problem == MODEL:  # the model's own schedule over its whole interval, as experiments.sample runs it
      sweep = _sweep(grids, model.setup.schedule, dataclasses.replace(config, t_start=None, t_end=None))
    else:
      sweep = _sweep(grids, schedules.get(config.schedule), config)
    schedule, grid_list, start, end = sweep
    denoiser, x_T, answer, info = _problem(problem, config, schedule, start, end, model)
    logging.info("%s: answer in %.2fs (%s)", problem, info["seconds"], info["answer"])
    entry = dict(info, solvers={})
    results["problems"][problem] = entry
    for name in config.solvers:
      solver = solvers.get(name)
      traces = loop.trace_count()
      record = {"declared_order": solver.declared_order, "runs": []}
      prepare_key = jax.random.key(config.prepare_seed)
      # Warm-up at the largest grid: compiles the loop once for this (problem, solver) pair.
      try:
        started = time.perf_counter()
        warm = solver.prepare(denoiser, schedule, grid_list[-1], x_T, prepare_key)
        if warm is not solver:  # the first preparation includes its compilation
          record["first_prepare_seconds"] = time.perf_counter() - started
        record["compile_seconds"] = _sample_timed(solvers.sample, warm, denoiser, schedule, grid_list[-1], x_T)[2]
      except ValueError as e:
        record["compile_error"] = str(e)
      for steps, grid in zip(config.nfe_steps, grid_list):
        row = {"problem": problem, "solver": name, "steps": steps}
        try:
          started = time.perf_counter()
          prepared = solver.prepare(denoiser, schedule, grid, x_T, prepare_key)
          if prepared is not solver:
            row["prepare_seconds"] = time.perf_counter() - started
          x, nfe, seconds = _sample_timed(solvers.sample, prepared, denoiser, schedule, grid, x_T)
          rmse = float(jnp.sqrt(jnp.mean((x - answer) ** 2)))
          row.update(nfe=nfe, rmse=_finite_or_none(rmse), seconds=seconds)
          if row["rmse"] is None:
            row["error"] = f"non-finite result (rmse={rmse})"
        except ValueError as e:  # e.g. too few steps for the solver's order
          row["error"] = str(e)
        if "error" in row:
          logging.warning("%s / %s / %d steps: %s", problem, name, steps, row["error"])
        metrics.append(row)
        _write_atomic(workdir, "metrics.jsonl", "".join(json.dumps(m, allow_nan=False) + "\n" for m in metrics))
        record["runs"].append({k: v for k, v in row.items() if k not in ("problem", "solver")})
      record["compilations"] = loop.trace_count() - traces
      record["fitted_order"], record["asymptotic_order"] = _summarise(
          record["runs"], info["error_floor"], config.asymptotic_points)
      entry["solvers"][name] = record
      logging.info("%s / %s: fitted order %s (declared %s)", problem, name, record["fitted_order"], solver.declared_order)
      _write_atomic(workdir, "results.json", _json(results))

  results["total_seconds"] = time.perf_counter() - study_start
  results["complete"] = True
  table = format_table(results)
  _write_atomic(workdir, "table.txt", table)
  _write_atomic(workdir, "convergence.png", plot(results))
  _write_atomic(workdir, "results.json", _json(results))
  sys.stdout.write(table)
  sys.stdout.flush()
  return results


# ----------------------------------------------------------------------------------------------------
# Reports.


def _fmt_order(v):
  return "-" if v is None else f"{v:.2f}"


def format_table(results):
  """The text table: one row per run, with the (problem, solver) orders repeated on each row."""
  header = ("problem", "solver", "steps", "NFE", "RMSE", "fitted order", "asym. order", "declared")
  rows = []
  for problem, entry in results["problems"].items():
    for name, rec in entry["solvers"].items():
      for r in rec["runs"]:
        if "error" in r and r.get("rmse") is None:
          rmse = "skipped: " + r["error"][:60]
        else:
          rmse = f"{r['rmse']:.3e}" + ("" if r.get("in_fit", True) else " (floor)")
        rows.append((problem, name, str(r["steps"]), str(r.get("nfe", "-")), rmse,
                     _fmt_order(rec["fitted_order"]), _fmt_order(rec["asymptotic_order"]),
                     str(rec["declared_order"])))
  widths = [max(len(h), *(len(row[i]) for row in rows)) if rows else len(h) for i, h in enumerate(header)]
  right = {2, 3, 5, 6, 7}

  def line(cells):
    return "  ".join(c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

  out = [line(header), line(["-" * w for w in widths])] + [line(r) for r in rows]
  return "\n".join(out) + "\n"


def solver_family(name):
  """The panel a solver is drawn in: its family, from the registered name."""
  tokens = name.split("_")
  if tokens[0] == "unipc" or tokens[-1] == "unic":
    return "UniPC / UniC"
  if tokens[0] == "deis":
    return "DEIS"
  if tokens[0] in ("pndm", "plms", "ghvb") or tokens[-1] == "hb":
    return "PNDM / PLMS / momentum (HB, GHVB)"
  if tokens[0] in ("edm", "ts", "teleport"):
    return "EDM, time shift, teleportation"
  if tokens[0] in ("bdia", "edict"):
    return "exact inversion samplers (BDIA, EDICT)"
  if name in ("dpm_solver_v3", "dc_solver"):
    return "learned from the model (v3 EMS, DC ratios)"
  if tokens[0] == "dpm":
    if tokens[-1] in ("12", "23"):
      return "DPM-Solver adaptive"
    return "DPM-Solver singlestep" if tokens[-1].endswith("s") else "DPM-Solver multistep"
  return tokens[0].upper()


def plot(results):
  """PNG bytes: log-log RMSE against NFE; a row per solver family, a column per problem, reference slopes."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.ticker
  from matplotlib import pyplot as plt

  problems = list(results["problems"])
  families = sorted({solver_family(n) for p in problems for n in results["problems"][p]["solvers"]})
  fig, axes = plt.subplots(len(families), len(problems), figsize=(6.0 * len(problems), 4.2 * len(families)),
                           squeeze=False)
  for column, problem in zip(axes.T, problems):
    entry = results["problems"][problem]
    for ax, family in zip(column, families):
      anchors, orders, nfe_all = [], set(), []
      for name, rec in entry["solvers"].items():
        pts = [(r["nfe"], r["rmse"]) for r in rec["runs"] if r.get("rmse")]
        if solver_family(name) != family or not pts:
          continue
        nfe, err = zip(*pts)
        ax.loglog(nfe, err, "o-", ms=3, label=f"{name} (fit {_fmt_order(rec['fitted_order'])}, p={rec['declared_order']})")
        anchors.append(err[0])
        nfe_all += list(nfe)
        orders.add(rec["declared_order"])
      if nfe_all:
        lo, hi = min(nfe_all), max(nfe_all)
        xs = np.array([lo, hi], np.float64)
        anchor = float(np.exp(np.mean(np.log(anchors)))) * 2.0
        for p in sorted(orders):
          ax.loglog(xs, anchor * (xs / lo) ** (-float(p)), "--", color="gray", lw=0.8)
          ax.annotate(f"-{p}", (hi, anchor * (hi / lo) ** (-float(p))), fontsize=7, color="gray")
        ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
      end = "sigma=0" if entry["sigma_end"] == 0 else format(entry["t_end"], "g")
      ax.set_title(f"{problem} ({entry['answer'].split(' ')[0]}, t={entry['t_start']:g}->{end}): {family}", fontsize=8)
      ax.set_xlabel("NFE")
      ax.set_ylabel("RMSE")
      ax.grid(True, which="both", alpha=0.3)
      ax.legend(fontsize=6)
  fig.tight_layout()
  buf = io.BytesIO()
  fig.savefig(buf, format="png", dpi=100)
  plt.close(fig)
  return buf.getvalue()

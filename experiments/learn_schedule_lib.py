"""Learned sampling schedules at 4-10 NFE: gradient-learned grids, AutoDiffusion-style evolutionary search and USF /
S^3 solver schedules, against the hand-made grids, on the analytic GMM or a trained network.

For each solver of ``solvers`` and each NFE of ``nfe`` (one model call per step, so the grid has NFE steps; solvers
that call the model more often per step are refused, see ``_check_one_call_per_step``), on one ``learned_grids``
problem (``num_calibration`` starts the methods fit, ``num_heldout`` other starts they are judged on, each with its
diffrax reference end point):
- the hand-made grids ``baselines`` (logSNR, time-quadratic, Karras between t_start and t_end) are evaluated on both
  sets; "best hand-made" is the one with the lowest **held-out** RMSE (the most favourable baseline);
- ``gradient``: ``learned_grids.optimize`` (Adam on the softmax-of-lambda-increments parametrisation, from the
  hand-made grid best on the calibration set, the last node before sigma = 0 free);
- ``evolution``: ``evolutionary_search.search`` (AutoDiffusion's time-step search over 1000 lambda-uniform
  candidate times, ``population`` x ``generations`` evaluations of the calibration RMSE);
- ``hybrid``: ``learned_grids.optimize`` started from the grid ``evolution`` found (the search escapes the local
  minima next to the hand-made grids, the gradient refines its snapped-to-candidates times); its wall time includes
  the search's;
- ``usf`` (a solver of its own, listed as ``usf``): ``solver_schedule_search.search`` (S^3: per-step prediction
  type, order and corrector of ``usf.USF`` with a learned predictor, ``usf_budget`` true evaluations, no analytical
  first step so that NFE = steps) on the hand-made grid best for USF's default (= UniPC bh2-2) on the calibration set.
Every learned schedule is saved as a ``schedule_artifacts`` artifact (``schedules_dir``, default
``<workdir>/schedules``) that ``experiments.sample`` and ``experiments.convergence`` accept by name
(``--grid=learned:<name>``).

The problem: ``problem='gmm'`` is ``models.analytic.gmm(dim)`` (4 components, seed 0) on ``schedule`` from t_start
to t_end; ``model=<training workdir>`` is its network (final EMA params, unconditional: the null label) on its own
schedule's whole interval, x_T ~ N(0, sigma(t_max)^2 I). ``dtype`` is that of the starts and samples (float64 by
default; references are float64 either way).

``run(config, workdir)`` writes atomically into ``workdir``: ``config.json``, ``results.json`` (rewritten after
each (solver, NFE), ``"complete": false`` until the end), ``table.txt`` (held-out RMSE tables, the calibration vs
held-out check, wall times), ``learned_schedules.png`` (held-out RMSE vs NFE per solver) and the artifacts.
"""
import dataclasses
import io
import os
import sys
import time
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from experiments import cli
from experiments.convergence_lib import _as_list, _check_int, _json, _write_atomic

PROBLEMS = ("gmm",)
METHODS = ("gradient", "evolution", "hybrid", "usf")
USF = "usf"  # the pseudo-solver of the 'usf' method
DTYPES = ("float64", "float32")


@dataclasses.dataclass(frozen=True)
class Config:
  """The experiment's settings (defaults: the GMM measurement of docs/learned_schedules.md)."""
  problem: Optional[str] = None            # 'gmm'; None: 'gmm' unless ``model`` is set
  model: Optional[str] = None              # a training workdir (experiments.train)
  dim: int = 8                             # GMM dimension
  schedule: str = "vp_linear"              # GMM: a name of solvers.schedules.SCHEDULES
  t_start: Optional[float] = None          # GMM: None = the schedule's t_max
  t_end: Optional[float] = None            # GMM: None = the schedule's t_min
  final: str = "zero"                      # the grids' final-step policy
  solvers: Sequence[str] = ("dpm_solver_pp_2m", "unipc_bh2_2")
  nfe: Sequence[int] = (4, 5, 6, 8, 10)
  methods: Sequence[str] = ("gradient", "evolution", "hybrid")
  baselines: Sequence[str] = ("logsnr", "quadratic_t", "karras")
  num_calibration: int = 32
  num_heldout: int = 256
  seed: int = 0                            # starts: fold_in(key(seed), 0 / 1); searches: key(seed + 1)
  dtype: str = "float64"
  reference_rtol: float = 1e-10
  reference_atol: float = 1e-10
  # gradient
  init: str = "best"                       # learned_grids.INITS or 'best' (of the baselines, on calibration)
  iterations: int = 200
  learning_rate: float = 0.05
  learn_end: bool = True                   # final='zero': the last node before sigma = 0 is learned too
  # evolution
  population: int = 50
  generations: int = 10
  # usf
  usf_budget: int = 200
  schedules_dir: Optional[str] = None      # where artifacts go; None: <workdir>/schedules


def resolve_config(config=None):
  """A validated ``Config`` from a Config, a dict of overrides or None; a bad value raises ValueError naming it."""
  import solvers
  from solvers import grids, learned_grids, schedules

  config = cli.dataclass_config(Config, config)
  problem = config.problem
  if problem is None:
    problem = None if config.model else "gmm"
  elif problem not in PROBLEMS:
    raise ValueError(f"problem={problem!r} is unknown; valid: {', '.join(PROBLEMS)} (or model=<training workdir>)")
  if problem and config.model:
    raise ValueError(f"problem={problem!r} and model={config.model!r}: choose one")
  names = list(dict.fromkeys(_as_list(config.solvers, "solvers")))
  methods = list(dict.fromkeys(_as_list(config.methods, "methods")))
  for m in methods:
    if m not in METHODS:
      raise ValueError(f"method {m!r} is unknown; valid: {', '.join(METHODS)}")
  if not methods:
    raise ValueError(f"methods is empty; valid: {', '.join(METHODS)}")
  if not names and methods != [USF]:
    raise ValueError("solvers is empty: list registered solvers (one model call per step)")
  for n in names:
    solver = solvers.get(n)  # an unknown name raises a ValueError listing them
    if solver.stochastic or solver.adaptive or n == USF:
      raise ValueError(f"solver {n!r} is {'USF (use methods=usf)' if n == USF else 'stochastic or adaptive'}; "
                       "learned grids are for fixed-grid deterministic solvers")
  nfe = sorted(set(cli.numbers([str(v) for v in _as_list(config.nfe, "nfe")], "nfe", int, minimum=1)))
  baselines = list(dict.fromkeys(_as_list(config.baselines, "baselines")))
  for b in baselines:
    if b not in learned_grids.INITS:
      raise ValueError(f"baseline {b!r} is unknown; valid: {', '.join(learned_grids.INITS)}")
  if not baselines:
    raise ValueError(f"baselines is empty; valid: {', '.join(learned_grids.INITS)}")
  if config.init != "best" and config.init not in learned_grids.INITS:
    raise ValueError(f"init={config.init!r} is unknown; valid: best, {', '.join(learned_grids.INITS)}")
  if config.final not in grids.FINAL_POLICIES:
    raise ValueError(f"final={config.final!r} is unknown; valid: {', '.join(grids.FINAL_POLICIES)}")
  if config.learn_end and config.final != "zero":
    raise ValueError("learn_end=True needs final='zero'; set learn_end=False for final='t_end'")
  if config.schedule not in schedules.SCHEDULES:
    raise ValueError(f"schedule={config.schedule!r} is unknown; valid: {', '.join(sorted(schedules.SCHEDULES))}")
  if config.dtype not in DTYPES:
    raise ValueError(f"dtype={config.dtype!r} is unknown; valid: {', '.join(DTYPES)}")
  for name in ("learning_rate", "reference_rtol", "reference_atol"):
    value = getattr(config, name)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
      raise ValueError(f"{name}={value!r} must be a positive number")
  return dataclasses.replace(
      config, problem=problem, solvers=names, methods=methods, nfe=nfe, baselines=baselines,
      dim=_check_int(config.dim, "dim", 1), num_calibration=_check_int(config.num_calibration, "num_calibration", 1),
      num_heldout=_check_int(config.num_heldout, "num_heldout", 1), seed=_check_int(config.seed, "seed", 0),
      iterations=_check_int(config.iterations, "iterations", 0), population=_check_int(config.population, "population", 2),
      generations=_check_int(config.generations, "generations", 1), usf_budget=_check_int(config.usf_budget, "usf_budget", 1))


# ----------------------------------------------------------------------------------------------------
# The problem.


def gmm_key(dim):
  """The model key of ``models.analytic.gmm(dim)`` (4 components, seed 0, std 0.3)."""
  return f"gmm-dim{dim}-k4-seed0"


def _setup(config):
  """(denoiser, schedule, t_start, t_end, shape, model_key, info)."""
  from solvers import schedules
  if config.model:
    from experiments import sample_lib
    model = sample_lib.load_model(config.model)
    info = {"model": config.model, "params": model.source, "model_step": model.step, "data_shape": list(model.shape),
            "conditioning": "unconditional (null label)" if model.num_classes else "unconditional"}
    return (sample_lib.denoiser(model), model.setup.schedule, None, None, model.shape, sample_lib.model_key(model),
            info)
  from models import analytic
  schedule = schedules.get(config.schedule)
  return (analytic.gmm(dim=config.dim).denoiser(schedule), schedule, config.t_start, config.t_end, (config.dim,),
          gmm_key(config.dim), {"problem": "gmm", "dim": config.dim, "schedule": config.schedule})


def _check_one_call_per_step(names, denoiser, schedule, shape, config, t_start, t_end):
  """Every solver must make exactly one model call per step (NFE = steps) on the grids compared here."""
  import solvers
  from solvers import learned_grids
  n = max(config.nfe)
  times = learned_grids.hand_made_times(schedule, "logsnr", n, t_start=t_start, t_end=t_end, final=config.final)
  x = jnp.zeros((1,) + tuple(shape), jnp.float32)
  for name in names:
    nfe = int(solvers.sample(name, denoiser, schedule, learned_grids.make_grid(schedule, jnp.asarray(times), config.final),
                             x).nfe)
    if nfe != n:
      raise ValueError(f"solver {name!r} makes {nfe} model calls in {n} steps; this experiment compares at equal "
                       "NFE = steps and takes one-call-per-step solvers only (multistep / UniPC / DEIS / DDIM ...)")


# ----------------------------------------------------------------------------------------------------
# The run.


def _losses(loss_fn, problem, times):
  t = jnp.asarray(times)
  return {"calibration": float(loss_fn(t, problem.x_calibration, problem.reference_calibration)),
          "heldout": float(loss_fn(t, problem.x_heldout, problem.reference_heldout))}


def _artifact(sa, key, schedule, solver, method, nfe, times, final, record, config, options=None):
  metrics = {"calibration_rmse": record["calibration"], "heldout_rmse": record["heldout"],
             "num_calibration": config.num_calibration, "num_heldout": config.num_heldout, "seed": config.seed,
             "seconds": record["seconds"], "best_hand_made": record["best_hand_made"],
             "best_hand_made_heldout_rmse": record["best_hand_made_heldout"]}
  return sa.make(model=key, schedule=schedule, solver=solver, times=times, final=final, nfe=nfe, method=method,
                 metrics=metrics, solver_options=options)


def run(config=None, workdir="workdir/learn_schedule"):
  """Runs the experiment (module doc) into ``workdir``; returns the results dict also written to results.json."""
  jax.config.update("jax_enable_x64", True)
  import solvers
  from solvers import evolutionary_search, learned_grids
  from solvers import schedule_artifacts as sa

  config = resolve_config(config)
  denoiser, schedule, t_start, t_end, shape, key_name, info = _setup(config)
  _check_one_call_per_step(config.solvers, denoiser, schedule, shape, config, t_start, t_end)
  schedules_dir = config.schedules_dir or os.path.join(workdir, "schedules")
  os.makedirs(workdir, exist_ok=True)
  for stale in ("table.txt", "learned_schedules.png"):
    if os.path.exists(os.path.join(workdir, stale)):
      os.remove(os.path.join(workdir, stale))
  resolved = dataclasses.asdict(config)
  _write_atomic(workdir, "config.json", _json(resolved))
  started = time.perf_counter()
  problem = learned_grids.make_problem(
      denoiser, schedule, jax.random.key(config.seed), num_calibration=config.num_calibration,
      num_heldout=config.num_heldout, t_start=t_start, t_end=t_end, final=config.final, dtype=config.dtype,
      shape=shape, rtol=config.reference_rtol, atol=config.reference_atol)
  jax.block_until_ready(problem.reference_heldout)
  info.update(model_key=key_name, t_start=problem.t_start, t_end=problem.t_end, final=config.final,
              reference_seconds=time.perf_counter() - started, schedule_json=sa.schedule_to_json(schedule))
  results = {"complete": False, "config": resolved, "problem": info, "solvers": {}, "artifacts": []}
  _write_atomic(workdir, "results.json", _json(results))
  search_key = jax.random.key(config.seed + 1)

  entries = [(name, solvers.get(name)) for name in config.solvers if set(config.methods) - {USF}]
  if USF in config.methods:
    entries.append((USF, solvers.get(USF)))
  for name, solver in entries:
    loss_fn = jax.jit(lambda t, x, ref, s=solver: learned_grids.loss(s, t, x, ref, problem))
    per_nfe = results["solvers"].setdefault(name, {})
    for nfe in config.nfe:
      entry = {"baselines": {}, "methods": {}}
      hand = {}
      for grid_name in config.baselines:
        hand[grid_name] = learned_grids.hand_made_times(schedule, grid_name, nfe, t_start=problem.t_start,
                                                        t_end=problem.t_end, final=config.final)
        entry["baselines"][grid_name] = dict(_losses(loss_fn, problem, hand[grid_name]), times=hand[grid_name].tolist())
      best = min(hand, key=lambda g: entry["baselines"][g]["heldout"])
      best_calibration = min(hand, key=lambda g: entry["baselines"][g]["calibration"])
      entry.update(best_hand_made=best, best_hand_made_heldout=entry["baselines"][best]["heldout"],
                   best_hand_made_on_calibration=best_calibration)
      learned = []  # (method, solver name, times, record, options)
      if name != USF and "gradient" in config.methods:
        result = learned_grids.optimize(solver, problem, nfe, init=config.init, iterations=config.iterations,
                                        learning_rate=config.learning_rate,
                                        learn_end=config.learn_end if config.final == "zero" else False)
        record = {"calibration": result.calibration_loss, "heldout": result.heldout_loss, "seconds": result.seconds,
                  "init": result.init, "iterations": config.iterations,
                  "history_first_last": [float(result.history[0]), float(result.history[-1])]}
        learned.append(("gradient", name, result.times, record, None))
      if name != USF and {"evolution", "hybrid"} & set(config.methods):
        search_fn = lambda t, s=solver: learned_grids.loss(s, t, problem.x_calibration, problem.reference_calibration,
                                                           problem)
        found = evolutionary_search.search(search_fn, schedule, nfe, key=jax.random.fold_in(search_key, nfe),
                                           t_start=problem.t_start, t_end=problem.t_end, final=config.final,
                                           population=config.population, generations=config.generations)
        record = dict(_losses(loss_fn, problem, found.times), seconds=found.seconds, evaluations=found.evaluations)
        if "evolution" in config.methods:
          learned.append(("evolution", name, found.times, record, None))
        if "hybrid" in config.methods:
          result = learned_grids.optimize(solver, problem, nfe, init=found.times, iterations=config.iterations,
                                          learning_rate=config.learning_rate,
                                          learn_end=config.learn_end if config.final == "zero" else False)
          learned.append(("hybrid", name, result.times,
                          {"calibration": result.calibration_loss, "heldout": result.heldout_loss,
                           "seconds": found.seconds + result.seconds, "init": "evolution",
                           "evolution_calibration": record["calibration"], "evolution_heldout": record["heldout"]},
                          None))
      if name == USF:
        from solvers import solver_schedule_search, usf
        grid_times = jnp.asarray(hand[best_calibration])
        base = usf.USF(lower_order_final=False)
        search_fn = lambda s: learned_grids.loss(s, grid_times, problem.x_calibration, problem.reference_calibration,
                                                 problem)
        found = solver_schedule_search.search(search_fn, nfe, key=jax.random.fold_in(search_key, 1000 + nfe),
                                              budget=config.usf_budget, solver=base, afs=False)
        chosen = usf.with_choices(base, found.choices)
        t = jnp.asarray(hand[best_calibration])
        record = {"calibration": float(learned_grids.loss(chosen, t, problem.x_calibration,
                                                          problem.reference_calibration, problem)),
                  "heldout": float(learned_grids.loss(chosen, t, problem.x_heldout, problem.reference_heldout, problem)),
                  "seconds": found.seconds, "evaluations": found.evaluations, "grid": best_calibration}
        options = dict(usf.choices_to_json(found.choices, nfe), lower_order_final=False)
        learned.append(("usf", USF, hand[best_calibration], record, options))
      for method, solver_name, times, record, options in learned:
        record.update(best_hand_made=best, best_hand_made_heldout=entry["best_hand_made_heldout"],
                      times=np.asarray(times).tolist())
        artifact = _artifact(sa, key_name, schedule, solver_name, method, nfe, times, config.final, record, config,
                             options)
        record["artifact"] = artifact.name
        sa.save(artifact, schedules_dir)
        results["artifacts"].append(artifact.name)
        entry["methods"][method] = record
        logging.info("%s NFE %d %s: held-out %.4g (best hand-made %s %.4g), %.1fs", solver_name, nfe, method,
                     record["heldout"], best, entry["best_hand_made_heldout"], record["seconds"])
      per_nfe[str(nfe)] = entry
      _write_atomic(workdir, "results.json", _json(results))

  results["schedules_dir"] = schedules_dir
  results["total_seconds"] = time.perf_counter() - started
  results["complete"] = True
  table = format_table(results)
  _write_atomic(workdir, "table.txt", table)
  _write_atomic(workdir, "learned_schedules.png", plot(results))
  _write_atomic(workdir, "results.json", _json(results))
  sys.stdout.write(table)
  sys.stdout.flush()
  return results


# ----------------------------------------------------------------------------------------------------
# Reports.


def _rows(results):
  """(solver, [nfe], {row label: [value per nfe]}) for the held-out table, rows in a fixed order."""
  for name, per_nfe in results["solvers"].items():
    nfes = sorted(per_nfe, key=int)
    rows = {}
    for grid in results["config"]["baselines"]:
      rows[grid] = [per_nfe[n]["baselines"][grid]["heldout"] for n in nfes]
    rows["best hand-made"] = [per_nfe[n]["best_hand_made_heldout"] for n in nfes]
    for method in METHODS:
      if any(method in per_nfe[n]["methods"] for n in nfes):
        rows[method] = [per_nfe[n]["methods"].get(method, {}).get("heldout") for n in nfes]
    yield name, nfes, rows


def _cell(v):
  return "-" if v is None else f"{v:.4f}"


def format_table(results):
  """Markdown tables: held-out RMSE per solver (rows: hand-made grids, the best of them, each method; the best
  value of each column in bold), learned / best hand-made ratios, calibration vs held-out, wall times."""
  info = results["problem"]
  out = [f"Held-out RMSE ({results['config']['num_heldout']} starts; learned on {results['config']['num_calibration']} "
         f"calibration starts), {info.get('model_key')}, t = {info['t_start']:g} -> "
         f"{'sigma=0' if info['final'] == 'zero' else format(info['t_end'], 'g')}\n"]
  for name, nfes, rows in _rows(results):
    out.append(f"\n{name}\n\n| grid / method | " + " | ".join(f"NFE {n}" for n in nfes) + " |")
    out.append("|---|" + "---|" * len(nfes))
    column_best = [min(v[i] for v in rows.values() if v[i] is not None) for i in range(len(nfes))]
    for label, values in rows.items():
      cells = [("**" + _cell(v) + "**") if v is not None and v == column_best[i] else _cell(v)
               for i, v in enumerate(values)]
      out.append(f"| {label} | " + " | ".join(cells) + " |")
    for method in METHODS:
      if method in rows:
        ratio = [None if v is None else b / v for v, b in zip(rows[method], rows["best hand-made"])]
        out.append(f"| best hand-made / {method} | " + " | ".join("-" if r is None else f"{r:.2f}x" for r in ratio) + " |")
  out.append("\nCalibration vs held-out RMSE (overfitting check), and wall seconds (compilation included)\n")
  out.append("| solver | method | NFE | calibration | held-out | held-out / calibration | seconds |")
  out.append("|---|---|---|---|---|---|---|")
  for name, per_nfe in results["solvers"].items():
    for n in sorted(per_nfe, key=int):
      for method, r in per_nfe[n]["methods"].items():
        out.append(f"| {name} | {method} | {n} | {r['calibration']:.4f} | {r['heldout']:.4f} | "
                   f"{r['heldout'] / r['calibration']:.2f} | {r['seconds']:.1f} |")
  out.append(f"\nReference solutions: {info['reference_seconds']:.1f} s; total {results.get('total_seconds', 0):.1f} s\n")
  return "\n".join(out)


def plot(results):
  """PNG bytes: held-out RMSE vs NFE, one panel per solver: the hand-made grids (thin), their best (dashed) and
  each learned method (thick)."""
  import matplotlib
  matplotlib.use("Agg")
  from matplotlib import pyplot as plt

  panels = list(_rows(results))
  fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4.2), squeeze=False)
  for ax, (name, nfes, rows) in zip(axes[0], panels):
    x = [int(n) for n in nfes]
    for label, values in rows.items():
      pts = [(a, v) for a, v in zip(x, values) if v is not None]
      if not pts:
        continue
      style = ({"lw": 2.2, "marker": "o"} if label in METHODS else
               {"lw": 1.4, "ls": "--", "color": "black", "marker": "s", "ms": 3} if label == "best hand-made" else
               {"lw": 0.9, "marker": ".", "alpha": 0.8})
      ax.semilogy(*zip(*pts), label=label, **style)
    ax.set_title(f"{name} ({results['problem'].get('model_key')})", fontsize=9)
    ax.set_xlabel("NFE")
    ax.set_ylabel("held-out RMSE")
    ax.set_xticks(x)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
  fig.tight_layout()
  buf = io.BytesIO()
  fig.savefig(buf, format="png", dpi=100)
  plt.close(fig)
  return buf.getvalue()

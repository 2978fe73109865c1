"""The LML sweep (experiments/lml_sweep.py): sample quality of base solvers with and without LML moves at
equal NFE on the analytic Gaussian mixture, where the data distribution is known exactly.

Metrics (per configuration, over ``batch`` samples from the exact x_T marginal):
- ``sw2``: sliced Wasserstein-2 distance to as many exact data samples (``projections`` random directions,
  sorted 1-D quantiles); ``sw2_floor`` is the same distance between two independent exact sample sets;
- ``nll_gap``: mean -log p_data(samples) minus that of exact samples (0 is right; < 0 means samples
  crowd the modes, > 0 that they are spread or off the data);
- ``nfe``: the model calls actually made. An LML configuration at target NFE N takes the largest step count
  S whose S predictor calls plus its LML moves (nodes inside the window) fit in N.
Timing (``cost``): wall time per sampling run at a fixed step count, best of ``repeats`` after compilation:
base, base + plain Langevin moves (damping = inf), base + LML moves at every node (both one extra model call
per node), and LML with reuse='x0' (no extra call); ratios to base and to the plain Langevin corrector (the
LML arithmetic alone). The analytic model is cheap, so these ratios overstate the overhead next to a network.

``run(config, workdir)`` writes config.json, results.json and table.txt atomically into workdir.
"""
import dataclasses
import json
import math
import os
import time
from typing import Tuple

import jax
import jax.numpy as jnp
import numpy as np

import solvers
from experiments.convergence_lib import _write_atomic
from models import analytic
from solvers import grids, lml, schedules


@dataclasses.dataclass(frozen=True)
class Config:
  """The sweep's settings: base solvers, target NFEs, LML dampings / ranks / kappa / snr, the GMM and the metrics."""
  solvers: Tuple[str, ...] = ("dpm_solver_pp_2m", "ddim")
  nfe: Tuple[int, ...] = (5, 10, 20)
  dampings: Tuple[float, ...] = (0.3, 3.0, 30.0, math.inf)
  ranks: Tuple[int, ...] = (1,)
  kappa: float = 1.0
  snr: float = 0.16
  windows: Tuple[Tuple[float, float], ...] = ((0.0, math.inf), (0.0, 0.5))  # (sigma_min, sigma_max)
  reuses: Tuple[str, ...] = ("none", "x0")  # 'none': one model call per move; 'x0'/'eps': the predictor reuses it
  dim: int = 8
  batch: int = 2000
  projections: int = 64
  seed: int = 0
  final: str = "zero"
  repeats: int = 10


def sliced_w2(a, b, directions):
  """Sliced Wasserstein-2 between equal-size point sets a, b (n, D) over unit ``directions`` (P, D)."""
  pa, pb = jnp.sort(a @ directions.T, axis=0), jnp.sort(b @ directions.T, axis=0)
  return float(jnp.sqrt(jnp.mean((pa - pb) ** 2)))


def _grid(schedule, steps, capacity, final):
  return grids.uniform_logsnr(schedule, steps, final=final, capacity=capacity)


def moves(solver, grid):
  """Extra model calls the LML moves make on ``grid`` (host-side count of the window's nodes)."""
  if not isinstance(solver, lml.LML):
    return 0
  sig = np.asarray(grid.sigma[: grid.num_steps])
  per_node = solver.n_steps - (0 if solver.reuse is None else 1)
  return per_node * int(np.sum((sig >= solver.sigma_min) & (sig <= solver.sigma_max) & (sig > 0)))


def steps_for_nfe(solver, schedule, nfe, capacity, final):
  """The largest step count S with S + moves(S) <= nfe (at least 1)."""
  for s in range(nfe, 0, -1):
    if s + moves(solver, _grid(schedule, s, capacity, final)) <= nfe:
      return s
  return 1


def _fmt(v):
  return "inf" if isinstance(v, float) and math.isinf(v) else f"{v:g}"


def _label(damping, rank, window, reuse):
  lo, hi = window
  return f"lml d={_fmt(damping)} r={rank} [{_fmt(lo)},{_fmt(hi)}] reuse={reuse}"


def _variants(config, base):
  """(label, solver, options) of the base solver and its LML wrappers; damping = inf once per window and reuse."""
  out = [("base", base, {})]
  for reuse in config.reuses:
    for window in config.windows:
      seen_plain = False
      for damping in config.dampings:
        for rank in config.ranks:
          if math.isinf(damping):
            if seen_plain:
              continue
            seen_plain = True
            label = f"langevin d=inf [{_fmt(window[0])},{_fmt(window[1])}] reuse={reuse}"
          else:
            label = _label(damping, rank, window, reuse)
          solver = lml.LML(predictor=base, damping=damping, rank=rank, kappa=config.kappa, snr=config.snr,
                           sigma_min=window[0], sigma_max=window[1], reuse=None if reuse == "none" else reuse)
          out.append((label, solver, {"damping": None if math.isinf(damping) else damping, "rank": rank,
                                      "sigma_min": window[0], "reuse": reuse,
                                      "sigma_max": None if math.isinf(window[1]) else window[1]}))
  return out


def _time(fn, repeats):
  jax.block_until_ready(fn())
  best = math.inf
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    best = min(best, time.perf_counter() - start)
  return best


def run(config=None, workdir="workdir/lml"):
  """Runs the sweep of ``config`` (default ``Config()``) and writes config.json, results.json and table.txt into
  ``workdir`` atomically; returns the results dict (rows, best per solver and NFE, cost, sw2_floor)."""
  config = config or Config()
  os.makedirs(workdir, exist_ok=True)
  cfg = {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(config).items()}
  _write_atomic(workdir, "config.json", json.dumps(cfg, default=str, indent=2) + "\n")
  schedule = schedules.VPLinear()
  oracle = analytic.gmm(dim=config.dim, seed=config.seed)
  den = oracle.denoiser(schedule)
  keys = jax.random.split(jax.random.key(config.seed + 1), 5)
  t = schedule.t_max
  x_T = oracle.sample(keys[0], config.batch, schedule.alpha(t), schedule.sigma(t))
  truth, truth2 = oracle.sample(keys[1], config.batch), oracle.sample(keys[2], config.batch)
  directions = jax.random.normal(keys[3], (config.projections, config.dim), x_T.dtype)
  directions = directions / jnp.linalg.norm(directions, axis=1, keepdims=True)
  nll_true = float(-jnp.mean(oracle.log_prob(truth)))
  floor = sliced_w2(truth, truth2, directions)
  capacity = max(config.nfe) + 1
  rows = []
  for name in config.solvers:
    base = solvers.get(name)
    for label, solver, options in _variants(config, base):
      for nfe in config.nfe:
        steps = steps_for_nfe(solver, schedule, nfe, capacity, config.final)
        grid = _grid(schedule, steps, capacity, config.final)
        sol = solvers.sample(solver, den, schedule, grid, x_T, key=keys[4])
        x = sol.x
        ok = bool(jnp.all(jnp.isfinite(x)))
        rows.append({"solver": name, "variant": label, **options, "target_nfe": nfe, "steps": steps,
                     "nfe": int(sol.nfe), "sw2": sliced_w2(x, truth, directions) if ok else None,
                     "nll_gap": float(-jnp.mean(oracle.log_prob(x))) - nll_true if ok else None})
      _write_atomic(workdir, "results.json", json.dumps({"rows": rows}, indent=2) + "\n")
  cost = _cost(config, schedule, den, x_T, keys[4], capacity)
  results = {"sw2_floor": floor, "nll_true": nll_true, "rows": rows, "cost": cost, "best": _best(rows)}
  _write_atomic(workdir, "results.json", json.dumps(results, indent=2) + "\n")
  _write_atomic(workdir, "table.txt", table(results))
  return results


def _cost(config, schedule, den, x_T, key, capacity):
  """Wall time per run at 10 steps: base, + plain Langevin at every node, + LML (rank max) at every node."""
  out = []
  steps = 10
  grid = _grid(schedule, steps, capacity, config.final)
  finite = [d for d in config.dampings if not math.isinf(d)] or [1.0]
  for name in config.solvers:
    base = solvers.get(name)
    runs = {"base": base, "langevin": lml.LML(predictor=base, damping=math.inf),
            "lml": lml.LML(predictor=base, damping=finite[0], rank=max(config.ranks)),
            "lml_reuse": lml.LML(predictor=base, damping=finite[0], rank=max(config.ranks), reuse="x0")}
    times = {k: _time(lambda s=s: solvers.sample(s, den, schedule, grid, x_T, key=key).x, config.repeats)
             for k, s in runs.items()}
    out.append({"solver": name, "steps": steps, "batch": config.batch, "seconds": times,
                "lml_over_base": times["lml"] / times["base"], "lml_over_langevin": times["lml"] / times["langevin"],
                "langevin_over_base": times["langevin"] / times["base"], "rank": max(config.ranks),
                "lml_reuse_over_base": times["lml_reuse"] / times["base"]})
  return out


def _best(rows):
  """Per (solver, target NFE): the base row, the best plain-Langevin row and the best finite-damping LML row by sw2."""
  best = {}
  for r in rows:
    if r["sw2"] is None:
      continue
    kind = "base" if r["variant"] == "base" else ("langevin" if r["variant"].startswith("langevin") else "lml")
    if kind != "base":
      kind += "/reuse" if r.get("reuse") not in (None, "none") else "/extra-nfe"
    key = f"{r['solver']}@{r['target_nfe']}"
    cur = best.setdefault(key, {}).get(kind)
    if cur is None or r["sw2"] < cur["sw2"]:
      best[key][kind] = r
  return best


def table(results):
  """The text table of ``run``'s results (every row, the best per solver and NFE, the cost lines)."""
  lines = [f"GMM (dim from config), sliced W2 to exact data samples (floor between two exact sets: "
           f"{results['sw2_floor']:.4f}); nll_gap = mean -log p_data - that of exact samples", ""]
  lines.append(f"{'solver':<18} {'variant':<44} {'NFE':>4} {'steps':>5} {'sw2':>8} {'nll_gap':>8}")
  lines.append("-" * 92)
  for r in results["rows"]:
    sw2 = "nan" if r["sw2"] is None else f"{r['sw2']:.4f}"
    gap = "nan" if r["nll_gap"] is None else f"{r['nll_gap']:+.3f}"
    lines.append(f"{r['solver']:<18} {r['variant']:<44} {r['nfe']:>4} {r['steps']:>5} {sw2:>8} {gap:>8}")
  lines += ["", "best per solver and NFE (by sw2):"]
  for key, kinds in results["best"].items():
    parts = [f"{k}: {v['sw2']:.4f} ({v['variant']}, steps {v['steps']})" for k, v in kinds.items()]
    lines.append(f"  {key}: " + "; ".join(parts))
  lines += ["", "cost per run at 10 steps (best of repeats, after compilation; +langevin / +lml: one extra model call "
            "per node; lml reuse=x0: none):"]
  for c in results["cost"]:
    s = c["seconds"]
    lines.append(f"  {c['solver']}: base {s['base']*1e3:.2f} ms, +langevin {s['langevin']*1e3:.2f} ms, "
                 f"+lml(rank {c['rank']}) {s['lml']*1e3:.2f} ms; lml/base {c['lml_over_base']:.2f}, "
                 f"lml/langevin {c['lml_over_langevin']:.2f}; lml reuse=x0 {s['lml_reuse']*1e3:.2f} ms, "
                 f"lml_reuse/base {c['lml_reuse_over_base']:.2f}")
  return "\n".join(lines) + "\n"

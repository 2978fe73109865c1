"""The speed benchmark: solver overhead, compilation, sampling vs model cost and throughput, in ONE run.

Performance claims here are ratios of numbers measured side by side in one process (the machine may be
shared and noisy). Every timing is taken over ``repeats`` timed calls after a warm-up call, each ended by
``block_until_ready`` (``torch.cuda.synchronize`` for torch on a GPU); the best (minimum) and the median
are both recorded (``*_median`` keys). The tables quote the best: on a shared machine the minimum is the
call least disturbed by other jobs, while the median measures them too (the convention of Python's
``timeit``); parts 3 and 4 also time their two sides interleaved and quote the median of the paired
ratios. The parts (``PARTS``):

1. ``overhead``: the cost per step of the solvers themselves. The model is near-free, eps = 0.5 x
   (``HalfEps``), on x_T of shape (batch, dim) float32 on the VP-linear schedule, a logSNR grid of
   ``steps`` steps from t = 1 to 1e-3 (padded to the default capacity). For each solver: the time of
   one jitted ``solvers.sample`` call, and microseconds per step = that / steps and per NFE =
   that / NFE. The per-step figure includes the loop's skipped padding iterations and the call's fixed
   dispatch cost, i.e. what a user pays per step; the marginal cost of a real step over a skipped one
   is below the timing noise on CPU for the deterministic solvers. Adaptive solvers choose their own
   steps: only microseconds per NFE apply. Stochastic solvers get a key.
2. ``diffusers``: the same near-free model in torch driving diffusers' PyTorch schedulers
   (``DIFFUSERS``: DDIM, DPM-Solver++ 2M, UniPC bh2 order 2, DEIS order 2, each with its defaults) for
   ``steps`` ``scheduler.step`` calls (``set_timesteps`` outside the timing), microseconds per step,
   and the ratio ours / diffusers against our counterpart of each (timed as in part 1). Without
   torch or diffusers the part records ``available: false`` and the reason.
3. ``compile``: ``solvers.loop.trace_count()`` around sampling with every NFE 1..``compile_max_nfe``
   (``compile_solver``, the shape of part 1, a fresh model function so nothing is cached). Grids are
   padded to max(64, next power of two) nodes, so NFE 1..63 share one compilation and 64..127 a second:
   the count must equal the number of distinct capacities. Each compiling call is followed by the same
   call again (cached): compile time = first call - cached call.
4. ``unet``: the digits preset's U-Net (``experiments/configs/digits.py``; random weights, or the trained
   EMA params of ``model``, a training workdir, via ``sample_lib.load_model``) at batch ``unet_batch``:
   one jitted network evaluation (``Denoiser.raw``) and a jitted sampler run of each ``unet_solvers`` x
   ``unet_nfe``, timed interleaved (each repeat: the best of three evaluations, then one sampler
   run, so both see the same load); ratio = sampler time / (NFE x evaluation time), the median of the
   per-repeat ratios (``ratio_best``: best sampler time / (NFE x best evaluation)). Near 1 means the
   loop adds nothing to the model's cost. Where part 1 timed the same solver, ``predicted_ratio`` = 1 +
   its near-free microseconds per step / the evaluation's microseconds: the loop's own cost per step
   (at part 1's shape; the default 64 x 64 has as many numbers as a batch of 64 8x8 digits), a
   noise-resistant estimate of what the measured ratio should be.
5. ``throughput``: samples per second of ``throughput_solver`` at ``throughput_nfe`` steps, batch
   ``throughput_batch`` (default: ``unet_batch`` rounded up to a multiple of the device count), with the
   U-Net (or the near-free model, ``throughput_model='near_free'``), on one device
   (``solvers.sample``) and batch-sharded over every device (``models.sharding.make_mesh`` +
   ``sharded_sample``; on one device: a one-device mesh), timed interleaved; ``speedup`` is the median
   of the paired ratios one device / all devices (``speedup_best``: of the best times).

Random U-Net weights are drawn on the host (``random_params``: LeCun-normal kernels, N(0, 1) embeddings,
unit norm scales, zero biases, shapes from ``jax.eval_shape`` of the module's init) rather than by
``module.init``, whose XLA compilation alone takes 10-25 s on a 2-core CPU; the network's cost does not
depend on the values (and a zero-initialised output layer, as ``init`` gives, would make it trivial).

``run(config, workdir)`` validates everything (a bad value raises ValueError naming it) before the workdir
is touched, removes an earlier run's ``results.json`` / ``table.txt``, runs the parts, and only then
writes ``table.txt`` and ``results.json`` (atomically, ``convergence_lib._write_atomic``) and prints the
table: a run that fails leaves neither file behind. ``results.json`` records the machine (platform, device
kind and count, jax version, CPU count) beside every number.
"""
import dataclasses
import math
import os
import platform
import sys
import time
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from experiments.convergence_lib import _check_int, _json, _write_atomic

PARTS = ("overhead", "diffusers", "compile", "unet", "throughput")
DEFAULT_STOCHASTIC = ("ddpm_ancestral", "dpm_solver_pp_2m_sde", "euler_maruyama")
# diffusers scheduler -> (constructor options, our counterpart): the same method and order.
DIFFUSERS = {
    "DDIMScheduler": ({}, "ddim"),
    "DPMSolverMultistepScheduler": ({"algorithm_type": "dpmsolver++", "solver_order": 2}, "dpm_solver_pp_2m"),
    "UniPCMultistepScheduler": ({"solver_type": "bh2", "solver_order": 2}, "unipc_bh2_2"),
    "DEISMultistepScheduler": ({"solver_type": "logrho", "solver_order": 2}, "deis_logrho_2"),
}
THROUGHPUT_MODELS = ("unet", "near_free")
RESULTS, TABLE = "results.json", "table.txt"
T_START, T_END = 1.0, 1e-3  # the overhead / compile parts' grid (VP linear)
EVALS_PER_REPEAT = 3        # network evaluations per interleaved repeat of the unet part


@dataclasses.dataclass(frozen=True)
class Config:
  """The benchmark's settings; every field has the default of the full run (about 3 minutes on 2 CPU cores)."""
  parts: Sequence[str] = PARTS
  # Registered solver names of the overhead part; None: every deterministic solver and DEFAULT_STOCHASTIC.
  solvers: Optional[Sequence[str]] = None
  steps: int = 50                  # steps per sample call (overhead, diffusers)
  batch: int = 64                  # x_T is (batch, dim) float32 (overhead, diffusers, compile)
  dim: int = 64
  repeats: int = 21                # timed calls per measurement (best and median are kept)
  seed: int = 0
  compile_solver: str = "ddim"
  compile_max_nfe: int = 100       # the compile part samples every NFE 1..compile_max_nfe
  model: Optional[str] = None      # a training workdir (experiments.train); None: the digits U-Net, random weights
  unet_batch: int = 64
  unet_solvers: Sequence[str] = ("dpm_solver_pp_2m", "ddim")
  unet_nfe: Sequence[int] = (10, 20)
  throughput_solver: str = "dpm_solver_pp_2m"
  throughput_nfe: int = 10
  throughput_batch: Optional[int] = None  # None: unet_batch rounded up to a multiple of the device count
  throughput_model: str = "unet"   # THROUGHPUT_MODELS


# ----------------------------------------------------------------------------------------------------
# Config.


def _names(value, what):
  if isinstance(value, str):
    value = [v for v in value.split(",") if v]
  try:
    names = list(dict.fromkeys(value))
  except TypeError:
    raise ValueError(f"{what}={value!r} must be a list of names") from None
  if not names:
    raise ValueError(f"{what} is empty: list at least one")
  return names


def default_solvers():
  """Every registered deterministic solver, then DEFAULT_STOCHASTIC."""
  import solvers
  return [n for n in solvers.available() if not solvers.get(n).stochastic] + list(DEFAULT_STOCHASTIC)


def resolve_config(config=None):
  """A validated ``Config`` from a Config, a dict of overrides or None; a bad value raises ValueError naming it."""
  import solvers

  if config is None:
    config = Config()
  elif isinstance(config, dict):
    names = {f.name for f in dataclasses.fields(Config)}
    unknown = sorted(set(config) - names)
    if unknown:
      raise ValueError(f"unknown config key(s) {', '.join(map(repr, unknown))}; valid: {', '.join(sorted(names))}")
    config = Config(**config)
  elif not isinstance(config, Config):
    raise ValueError(f"config must be a dict or a {Config.__name__}, got {type(config).__name__}")

  parts = _names(config.parts, "parts")
  for p in parts:
    if p not in PARTS:
      raise ValueError(f"part {p!r} is unknown; valid: {', '.join(PARTS)}")
  parts = [p for p in PARTS if p in parts]  # run in the documented order
  names = default_solvers() if config.solvers is None else _names(config.solvers, "solvers")
  for n in names + [config.compile_solver, config.throughput_solver] + _names(config.unet_solvers, "unet_solvers"):
    solvers.get(n)  # an unknown name raises a ValueError listing the valid ones
  if solvers.get(config.compile_solver).adaptive:
    raise ValueError(f"compile_solver={config.compile_solver!r} is adaptive (it ignores the grid's steps); "
                     "pick a fixed-step solver such as ddim")
  if config.throughput_model not in THROUGHPUT_MODELS:
    raise ValueError(f"throughput_model={config.throughput_model!r} is unknown; valid: {', '.join(THROUGHPUT_MODELS)}")
  unet_nfe = sorted({_check_int(v, "unet_nfe (NFE)", 1) for v in _names(config.unet_nfe, "unet_nfe")})
  throughput_batch = config.throughput_batch
  if throughput_batch is not None:
    throughput_batch = _check_int(throughput_batch, "throughput_batch", 1)
    if "throughput" in parts:
      from models import sharding
      sharding.check_batch_size(throughput_batch, sharding.make_mesh())
  model = None if config.model in (None, "") else str(config.model)
  return dataclasses.replace(
      config, parts=parts, solvers=names, model=model, unet_solvers=_names(config.unet_solvers, "unet_solvers"),
      unet_nfe=unet_nfe, steps=_check_int(config.steps, "steps (NFE)", 1), batch=_check_int(config.batch, "batch", 1),
      dim=_check_int(config.dim, "dim", 1), repeats=_check_int(config.repeats, "repeats", 1),
      seed=_check_int(config.seed, "seed", 0),
      compile_max_nfe=_check_int(config.compile_max_nfe, "compile_max_nfe (NFE)", 1),
      unet_batch=_check_int(config.unet_batch, "unet_batch", 1),
      throughput_nfe=_check_int(config.throughput_nfe, "throughput_nfe (NFE)", 1), throughput_batch=throughput_batch)


# ----------------------------------------------------------------------------------------------------
# Timing and models.


class HalfEps:
  """The near-free model: eps = 0.5 x. Hashed by identity, so a fresh instance is a fresh static
  argument of the jitted loop (the compile part counts compilations from a cold cache)."""

  def __call__(self, params, x, label, cond):
    return 0.5 * x


_NEAR_FREE = HalfEps()


def near_free_denoiser(apply_fn=_NEAR_FREE):
  """The ``solvers.Denoiser`` of the near-free model (an eps prediction, the schedule's own time label)."""
  from solvers.predictions import Denoiser
  return Denoiser(apply_fn=apply_fn, params=None, prediction="eps", time_label="t")


def _seconds(fn):
  """Wall time of one call of ``fn`` (which blocks until its work is done)."""
  start = time.perf_counter()
  fn()
  return time.perf_counter() - start


def best_and_median(times):
  """(min, median) of a list of wall times, as floats."""
  return float(np.min(times)), float(np.median(times))


def time_calls(fn, repeats):
  """(best, median) wall time of ``repeats`` calls of ``fn`` (warm it up first: no call here is discarded)."""
  return best_and_median([_seconds(fn) for _ in range(repeats)])


def _sampler(solver, denoiser, schedule, grid, x, key):
  """A function that calls solvers.sample, blocks until the result is ready and returns the Solution."""
  import solvers

  def call():
    return jax.block_until_ready(solvers.sample(solver, denoiser, schedule, grid, x, key=key))
  return call


def random_params(module, x, label, cond=None, seed=0):
  """Host-drawn random weights of ``module`` (shapes from ``jax.eval_shape`` of its init, no compilation):
  LeCun-normal kernels (N(0, 1 / fan_in), fan_in = all but the last axis), N(0, 1) embeddings, unit
  scales, zero biases, float32."""
  shapes = jax.eval_shape(lambda: module.init(jax.random.key(0), x, label, cond))["params"]
  rng = np.random.default_rng(seed)

  def draw(path, leaf):
    name = getattr(path[-1], "key", str(path[-1]))
    shape = tuple(leaf.shape)
    if name == "kernel":
      value = rng.standard_normal(shape) / math.sqrt(max(1, int(np.prod(shape[:-1]))))
    elif name == "embedding":
      value = rng.standard_normal(shape)
    elif name == "scale":
      value = np.ones(shape)
    else:
      value = np.zeros(shape)
    return jnp.asarray(value, leaf.dtype)

  return jax.tree_util.tree_map_with_path(draw, shapes)


def _network(config):
  """(Denoiser, schedule, example shape, description) of the unet part's network."""
  from experiments import sample_lib, train_lib
  from experiments.configs import digits
  from models import nets

  if config.model:
    model = sample_lib.load_model(config.model)
    what = f"{type(model.setup.module).__name__} of {config.model} (step {model.step})"
  else:
    setup = train_lib.Setup(train_lib.resolve_config(digits.get_config()))
    x = jnp.zeros((1,) + tuple(setup.dataset.shape), jnp.float32)
    cond = jnp.zeros((1,), jnp.int32) if setup.num_classes else None
    params = random_params(setup.module, x, jnp.zeros((1,), jnp.float32), cond, config.seed)
    model = sample_lib.Model(setup, params, 0, "random weights")
    what = f"digits preset {type(setup.module).__name__}, random weights"
  what += f", {nets.count_params(model.params)} parameters, unconditional (null label)"
  return sample_lib.denoiser(model), model.setup.schedule, model.shape, what


def _x(key, shape):
  return jax.random.normal(key, shape, jnp.float32)


# ----------------------------------------------------------------------------------------------------
# The parts.


def _overhead_one(name, config, schedule, grid, x, key):
  import solvers
  solver = solvers.get(name)
  record = {"kind": "adaptive" if solver.adaptive else ("sde" if solver.stochastic else "ode"),
            "steps": config.steps}
  call = _sampler(solver, near_free_denoiser(), schedule, grid, x, key if solver.stochastic else None)
  try:
    started = time.perf_counter()
    sol = call()
    record["first_call_seconds"] = time.perf_counter() - started  # includes the compilation
  except Exception as e:  # noqa: BLE001  one solver's failure (too few steps, float32 trouble) is its row, not the run's
    record["error"] = f"{type(e).__name__}: {e}"
    logging.warning("overhead / %s: %s", name, record["error"])
    return record
  seconds, median = time_calls(call, config.repeats)
  nfe = int(sol.nfe)
  record.update(nfe=nfe, call_ms=1e3 * seconds, call_ms_median=1e3 * median, us_per_nfe=1e6 * seconds / nfe,
                us_per_step=None if solver.adaptive else 1e6 * seconds / config.steps,
                finite=bool(np.all(np.isfinite(np.asarray(sol.x)))))
  return record


def _overhead_setup(config):
  from solvers import grids, schedules
  schedule = schedules.VPLinear()
  grid = grids.uniform_logsnr(schedule, config.steps, t_start=T_START, t_end=T_END)
  key = jax.random.key(config.seed)
  return schedule, grid, _x(jax.random.fold_in(key, 0), (config.batch, config.dim)), jax.random.fold_in(key, 1)


def overhead(config, cache):
  """Part 1: each solver's time per call, step and NFE with the near-free model (records also go to ``cache``)."""
  schedule, grid, x, key = _overhead_setup(config)
  out = {}
  for name in config.solvers:
    out[name] = cache[name] = _overhead_one(name, config, schedule, grid, x, key)
    logging.info("overhead / %s: %s", name, out[name])
  return {"model": "eps = 0.5 x (near-free)", "shape": [config.batch, config.dim], "dtype": "float32",
          "grid": f"logsnr, {config.steps} steps, t {T_START:g} -> {T_END:g}, capacity {grid.capacity}",
          "solvers": out}


def diffusers_part(config, cache):
  """diffusers' schedulers on the near-free model in torch; ``available: false`` without torch / diffusers."""
  try:
    import diffusers
    import torch
  except ImportError as e:
    return {"available": False, "reason": f"{type(e).__name__}: {e}"}
  device = "cuda" if torch.cuda.is_available() else "cpu"
  sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
  generator = torch.Generator().manual_seed(config.seed)
  x_T = torch.randn(config.batch, config.dim, generator=generator, dtype=torch.float32).to(device)
  schedule, grid, x, key = _overhead_setup(config)
  rows = {}
  for cls_name, (options, ours) in DIFFUSERS.items():
    scheduler = getattr(diffusers, cls_name)(**options)

    def loop(scheduler=scheduler):
      scheduler.set_timesteps(config.steps, device=device)
      sync()
      started = time.perf_counter()
      sample = x_T
      with torch.inference_mode():
        for t in scheduler.timesteps:
          sample = scheduler.step(0.5 * sample, t, sample).prev_sample
      sync()
      return time.perf_counter() - started, sample

    _, sample = loop()  # warm-up
    seconds, median = best_and_median([loop()[0] for _ in range(config.repeats)])
    if ours not in cache:
      cache[ours] = _overhead_one(ours, config, schedule, grid, x, key)
    mine = cache[ours].get("us_per_step")
    theirs = 1e6 * seconds / config.steps
    rows[cls_name] = {"options": options, "ours": ours, "us_per_step": theirs,
                      "us_per_step_median": 1e6 * median / config.steps, "ours_us_per_step": mine,
                      "ratio": None if mine is None else mine / theirs,
                      "finite": bool(torch.isfinite(sample).all())}
    logging.info("diffusers / %s: %s", cls_name, rows[cls_name])
  return {"available": True, "diffusers_version": diffusers.__version__, "torch_version": torch.__version__,
          "torch_device": device, "torch_threads": torch.get_num_threads(), "steps": config.steps,
          "schedulers": rows}


def compile_part(config):
  """Compilations and compile time across NFE 1..compile_max_nfe at one shape, from a cold cache."""
  import solvers
  from solvers import grids, loop

  schedule, _, x, key = _overhead_setup(config)
  den = near_free_denoiser(HalfEps())  # a fresh static argument: no compilation of earlier parts is reused
  solver = solvers.get(config.compile_solver)
  key = key if solver.stochastic else None
  nfe_range = range(1, config.compile_max_nfe + 1)
  grid_list = [grids.uniform_logsnr(schedule, n, t_start=T_START, t_end=T_END) for n in nfe_range]
  capacities = sorted({g.capacity for g in grid_list})
  before = loop.trace_count()
  compiles, cached = [], []
  sweep_start = time.perf_counter()
  for n, grid in zip(nfe_range, grid_list):
    call = _sampler(solver, den, schedule, grid, x, key)
    traces = loop.trace_count()
    seconds = _seconds(call)
    if loop.trace_count() > traces:
      again = _seconds(call)
      compiles.append({"nfe": n, "capacity": grid.capacity, "first_call_seconds": seconds,
                       "cached_call_seconds": again, "compile_seconds": seconds - again})
    else:
      cached.append(seconds)
  sweep = time.perf_counter() - sweep_start
  count = loop.trace_count() - before
  total = sum(c["compile_seconds"] for c in compiles)
  cached_call = float(np.median(cached)) if cached else float(np.median([c["cached_call_seconds"] for c in compiles]))
  return {"solver": config.compile_solver, "shape": [config.batch, config.dim], "nfe": [1, config.compile_max_nfe],
          "compilations": count, "capacities": capacities, "distinct_capacities": len(capacities),
          "compile_seconds_total": total, "compile_seconds_per_compilation": total / max(count, 1),
          "cached_call_seconds": cached_call, "sweep_seconds": sweep, "compiling_calls": compiles}


def unet_part(config, network, cache):
  """Sampler wall time / (NFE x one network evaluation) for the network at batch unet_batch."""
  from solvers import grids

  den, schedule, shape, what = network
  x = _x(jax.random.key(config.seed), (config.unet_batch,) + tuple(shape))
  t_mid = jnp.asarray(0.5 * (schedule.t_min + schedule.t_max), jnp.float32)
  evaluate = jax.jit(lambda d, x, t: d.raw(x, t, schedule))

  def one_eval():
    return jax.block_until_ready(evaluate(den, x, t_mid))

  started = time.perf_counter()
  one_eval()
  eval_compile = time.perf_counter() - started
  runs = []
  for name in config.unet_solvers:
    for nfe in config.unet_nfe:
      grid = grids.uniform_logsnr(schedule, nfe)
      call = _sampler(name, den, schedule, grid, x, jax.random.key(config.seed + 1))
      started = time.perf_counter()
      sol = call()
      first = time.perf_counter() - started
      made = int(sol.nfe)
      evals, samples, ratios = [], [], []
      for _ in range(config.repeats):  # interleaved: both see the same load
        e = time_calls(one_eval, EVALS_PER_REPEAT)[0]
        s = _seconds(call)
        evals.append(e)
        samples.append(s)
        ratios.append(s / (made * e))
      near_free = cache.get(name, {}).get("us_per_step")
      runs.append({"solver": name, "steps": nfe, "nfe": made, "first_call_seconds": first,
                   "predicted_ratio": None if near_free is None else 1 + 1e-6 * near_free / min(evals),
                   "sample_seconds": min(samples), "sample_seconds_median": float(np.median(samples)),
                   "eval_seconds": min(evals), "eval_seconds_median": float(np.median(evals)),
                   "ratio": float(np.median(ratios)), "ratio_best": min(samples) / (made * min(evals)),
                   "finite": bool(np.all(np.isfinite(np.asarray(sol.x))))})
      logging.info("unet / %s / NFE %d: %s", name, nfe, runs[-1])
  return {"model": what, "shape": [config.unet_batch] + list(shape), "dtype": "float32",
          "eval_first_call_seconds": eval_compile,
          "eval_seconds": min(r["eval_seconds"] for r in runs) if runs else None, "runs": runs}


def throughput_batch(config):
  """The throughput part's batch: ``throughput_batch``, or ``unet_batch`` rounded up to a multiple of the devices."""
  if config.throughput_batch is not None:
    return config.throughput_batch
  n = jax.device_count()
  return -(-config.unet_batch // n) * n


def throughput_part(config, network):
  """Samples per second on one device and batch-sharded over every device."""
  import solvers
  from models import sharding
  from solvers import grids, schedules

  batch = throughput_batch(config)
  if config.throughput_model == "unet":
    den, schedule, shape, what = network
    grid = grids.uniform_logsnr(schedule, config.throughput_nfe)
  else:
    den, schedule, shape, what = near_free_denoiser(), schedules.VPLinear(), (config.dim,), "eps = 0.5 x (near-free)"
    grid = grids.uniform_logsnr(schedule, config.throughput_nfe, t_start=T_START, t_end=T_END)
  solver = solvers.get(config.throughput_solver)
  key = jax.random.key(config.seed + 1) if solver.stochastic else None
  x = _x(jax.random.key(config.seed), (batch,) + tuple(shape))
  mesh = sharding.make_mesh()
  sharding.check_batch_size(batch, mesh)
  ways = (("one device", 1, _sampler(solver, den, schedule, grid, x, key)),
          ("all devices, batch-sharded", jax.device_count(), lambda: jax.block_until_ready(
              sharding.sharded_sample(solver, den, schedule, grid, x, mesh, key=key))))
  firsts, solutions = [], []
  for _, _, call in ways:  # warm-up (compilation)
    started = time.perf_counter()
    solutions.append(call())
    firsts.append(time.perf_counter() - started)
  times = [[], []]
  for _ in range(config.repeats):  # interleaved: both ways see the same load
    for k, (_, _, call) in enumerate(ways):
      times[k].append(_seconds(call))
  rows = []
  for (label, devices, _), first, sol, t in zip(ways, firsts, solutions, times):
    seconds, median = best_and_median(t)
    rows.append({"devices": devices, "how": label, "first_call_seconds": first, "sample_seconds": seconds,
                 "sample_seconds_median": median, "samples_per_second": batch / seconds, "nfe": int(sol.nfe),
                 "finite": bool(np.all(np.isfinite(np.asarray(sol.x))))})
    logging.info("throughput / %s: %s", label, rows[-1])
  return {"model": what, "solver": config.throughput_solver, "steps": config.throughput_nfe, "batch": batch,
          "dtype": "float32", "rows": rows,
          "speedup": float(np.median(np.asarray(times[0]) / np.asarray(times[1]))),
          "speedup_best": rows[1]["samples_per_second"] / rows[0]["samples_per_second"]}


# ----------------------------------------------------------------------------------------------------
# The run.


def environment():
  """The machine and software the numbers were measured on."""
  device = jax.devices()[0]
  return {"platform": device.platform, "device_kind": device.device_kind, "device_count": jax.device_count(),
          "jax_version": jax.__version__, "cpu_count": os.cpu_count(), "x64": bool(jax.config.jax_enable_x64),
          "python": platform.python_version(), "machine": platform.machine(), "system": platform.system()}


def run(config=None, workdir="workdir/benchmark"):
  """Runs the benchmark described by ``config`` (a Config, a dict of overrides, or None for the defaults).

  Validates first (ValueError naming a bad value, with the workdir untouched), runs the parts, then writes
  ``table.txt`` and ``results.json`` into ``workdir`` and prints the table to stdout last. Returns the
  results dict written to results.json.
  """
  config = resolve_config(config)
  network = None
  if "unet" in config.parts or ("throughput" in config.parts and config.throughput_model == "unet"):
    network = _network(config)  # loaded (and a bad --model refused) before anything is written
  os.makedirs(workdir, exist_ok=True)
  for stale in (RESULTS, TABLE):  # an earlier run's outputs would not match this one
    if os.path.exists(os.path.join(workdir, stale)):
      os.remove(os.path.join(workdir, stale))
  started = time.perf_counter()
  results = {"complete": False, "config": dataclasses.asdict(config), "environment": environment()}
  cache = {}
  if "overhead" in config.parts:
    results["overhead"] = overhead(config, cache)
  if "diffusers" in config.parts:
    results["diffusers"] = diffusers_part(config, cache)
  if "compile" in config.parts:
    results["compile"] = compile_part(config)
  if "unet" in config.parts:
    results["unet"] = unet_part(config, network, cache)
  if "throughput" in config.parts:
    results["throughput"] = throughput_part(config, network)
  results["total_seconds"] = time.perf_counter() - started
  results["complete"] = True
  table = format_table(results)
  _write_atomic(workdir, TABLE, table)
  _write_atomic(workdir, RESULTS, _json(results))  # last: its presence means the run finished
  sys.stdout.write(table)
  sys.stdout.flush()
  return results


# ----------------------------------------------------------------------------------------------------
# The table.


def _fmt(v, spec):
  return "-" if v is None else format(v, spec)


def _columns(header, rows, right):
  widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]

  def line(cells):
    return "  ".join(c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

  return [line(header), line(["-" * w for w in widths])] + [line(r) for r in rows]


def format_table(results):
  """The text report: the machine, then one block per part that ran."""
  env = results["environment"]
  out = [f"Benchmark on {env['device_kind']} ({env['platform']}) x {env['device_count']} device(s); jax "
         f"{env['jax_version']}, {env['cpu_count']} CPUs, x64 {'on' if env['x64'] else 'off'}; "
         f"{results['total_seconds']:.0f} s. Best of {results['config']['repeats']} calls (medians in results.json)."]
  o = results.get("overhead")
  if o:
    out += ["", f"1. Solver overhead: {o['model']}, x {tuple(o['shape'])} {o['dtype']}, {o['grid']}"]
    rows, failed = [], []
    for name, r in o["solvers"].items():
      if "error" in r:
        rows.append((name, r["kind"], "-", "-", "-", "-", "-", "failed"))
        failed.append(f"  {name} failed: {r['error'][:200]}")
        continue
      rows.append((name, r["kind"], str(r["nfe"]), f"{r['call_ms']:.3f}", f"{r['call_ms_median']:.3f}",
                   _fmt(r["us_per_step"], ".1f"), f"{r['us_per_nfe']:.1f}", f"{r['first_call_seconds']:.2f}"))
    out += _columns(("solver", "kind", "NFE", "call ms", "median ms", "us/step", "us/NFE", "first call s"), rows,
                    {2, 3, 4, 5, 6, 7}) + failed
  d = results.get("diffusers")
  if d is not None:
    out.append("")
    if not d["available"]:
      out.append(f"1b. diffusers: absent ({d['reason']})")
    else:
      out.append(f"1b. diffusers {d['diffusers_version']} (torch {d['torch_version']}, {d['torch_device']}, "
                 f"{d['torch_threads']} threads): scheduler.step loops of {d['steps']} steps, same model")
      rows = [(cls, r["ours"], f"{r['us_per_step']:.1f}", _fmt(r["ours_us_per_step"], ".1f"), _fmt(r["ratio"], ".3f"))
              for cls, r in d["schedulers"].items()]
      out += _columns(("diffusers scheduler", "ours", "diffusers us/step", "ours us/step", "ours/diffusers"),
                      rows, {2, 3, 4})
  c = results.get("compile")
  if c:
    out += ["", f"2. Compilation: {c['solver']}, x {tuple(c['shape'])}, every NFE {c['nfe'][0]}..{c['nfe'][1]}: "
            f"{c['compilations']} compilations for {c['distinct_capacities']} grid capacities "
            f"{c['capacities']}; {c['compile_seconds_total']:.2f} s compiling in all, "
            f"{c['compile_seconds_per_compilation']:.2f} s per compilation; a cached call "
            f"{1e3 * c['cached_call_seconds']:.3f} ms; the whole sweep {c['sweep_seconds']:.2f} s"]
  u = results.get("unet")
  if u:
    out += ["", f"3. Sampling vs model cost: {u['model']}, x {tuple(u['shape'])} {u['dtype']}; ratio = sample time "
            "/ (NFE x one evaluation): median of interleaved pairs, and best / best"]
    rows = [(r["solver"], str(r["nfe"]), f"{1e3 * r['sample_seconds']:.1f}", f"{1e3 * r['eval_seconds']:.2f}",
             f"{r['ratio']:.3f}", f"{r['ratio_best']:.3f}", _fmt(r["predicted_ratio"], ".4f")) for r in u["runs"]]
    out += _columns(("solver", "NFE", "sample ms", "eval ms", "ratio", "best/best", "predicted (part 1)"), rows,
                    {1, 2, 3, 4, 5, 6})
  t = results.get("throughput")
  if t:
    out += ["", f"4. Throughput: {t['model']}, {t['solver']} {t['steps']} steps, batch {t['batch']} {t['dtype']}; "
            f"speedup {t['speedup']:.2f}x (median of interleaved pairs; best / best {t['speedup_best']:.2f}x)"]
    rows = [(str(r["devices"]), r["how"], f"{1e3 * r['sample_seconds']:.1f}", f"{r['samples_per_second']:.1f}")
            for r in t["rows"]]
    out += _columns(("devices", "how", "batch ms", "samples/s"), rows, {0, 2, 3})
  return "\n".join(out) + "\n"

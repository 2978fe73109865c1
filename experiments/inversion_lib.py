"""The inversion study: how exactly each inversion method of ``solvers.inversion`` round-trips data.

  python -m experiments.inversion --workdir=/tmp/inversion [--methods=ddim,bdia] [--dtypes=float64] [--nfe=10,50]
  python -m experiments.inversion --workdir=/tmp/inv_digits --model=/tmp/digits --source_class=3 --target_class=8

Problem (default): the analytic class-conditional Gaussian mixture (``models.analytic.gmm``, exact denoiser) under the
VP-linear schedule. The data x0 is a fixed-seed batch of samples of class ``source_class``; the model is
guided towards that class, ``Guided(inner, cond=gmm.label(source_class), uncond=None, scale=s)`` (scale 1
is the class-conditional model itself, uncond=None the unconditional mixture). The mixture is built in
float64 and cast, so every dtype inverts the same problem.

For each method (``inversion.METHODS``), each of its option values (``gamma`` of bdia / bdia_edm, the
mixing ``p`` of edict; the naive ddim and dpm_solver_pp have none), each dtype, each guidance scale and
each step count N, it measures
- the round-trip error ||regenerate(invert(x0)) - x0|| / ||x0|| over the whole batch (and the worst
  sample's own relative error), with the same guided model in both directions;
- the model calls actually made by invert and by regenerate (``Solution.nfe``);
- the wall time of one invert + regenerate after compilation (best of ``repeats``; with the cheap
  analytic model this is loop overhead, nearly independent of N because the grids are padded to one
  capacity);
- for the naive methods, the fitted order of the round-trip error in N (``convergence_lib.fit_order``).
Every grid has the same capacity, so the loop compiles once per (method, option, dtype) and direction.

Editing (the GMM stand-in for the image grid of original / inverted-regenerated / edited images): at
N = ``edit_steps`` in float64, with each method at its library default option (or the swept value
closest to it), class-``source_class`` samples are inverted guided towards their class and regenerated
guided towards ``target_class``. Reported per guidance scale:
- ``to_target`` / ``in_source``: the fractions of edited samples whose most likely mixture component (the
  largest joint log-density of ``GMM._components``) is the target / the source class. With a one-hot
  condition nearly every latent lands nearest the target, so this is a sanity check: the argmax also
  counts samples far off every component;
- ``typical``: the fraction inside the target class's 99.9% region (``TYPICAL``, a chi-square bound);
- ``offset_change``: ||(x_edit - mu_j) - (x0 - mu_k)|| / ||x0 - mu_k||, mean over samples: how much of a
  sample's position within its class the edit loses (the components share one std). At guidance 1 each
  class is one Gaussian, so the exact PF-ODE edit is known in closed form (``Gaussian.pf_ode_solution``
  there and back); its offset change is recorded as the reference (``exact_offset_change_guidance_1``).

A trained network (``Config.model``: a training workdir of ``experiments.train``, loaded by
``sample_lib.load_model``: final EMA params, the training's module, schedule, prediction kind and time
label). The data x0 are ``batch`` training examples of class ``source_class`` (``training_subset``: drawn
by ``numpy.random.default_rng(seed)``, their indices recorded); the model is the network guided towards
that class, ``Guided(inner, cond=source_class, uncond=nets.null_label, scale=s)`` (``network_denoiser``;
at scale 1 too, so every scale shares one compilation, two network passes per call); the schedule is
the model's, over its whole interval (t_start = its t_max, t_end = its t_min; the default grid 'logsnr'
with final 'zero'). Classes default to 0 and 1 and must lie in the network's range; an unconditional
network takes no class or guidance setting (it is studied as it is, without an edit). The dtypes
default to float32 (``MODEL_DTYPES``: the network's own; float64 also works, ~3x slower on a CPU). The
editing record runs in float32: per method (plotted option) and guidance scale, x0 is inverted towards
``source_class`` once and regenerated towards ``source_class`` (the round trip) and ``target_class``
(the edit); it reports ``to_target`` / ``in_source`` (fractions of edits whose nearest (L2) training
example is of the target / the source class), ``change`` (||x_edit - x0|| / ||x0||, mean) and the
round-trip error. For image data (H, W, C) it also draws ``inversion_grid.png`` (``plot_grid``): a panel
per guidance scale, a row per original (the first ``grid_images``), columns original | round trip per
method | edit per method, [-1, 1] -> [0, 1] (``sample_lib.image_grid``), pixel for pixel
(``grid_layout``). Everything is loaded and checked before anything is written: a bad model path, a
class out of range or class flags for an unconditional network raise a ValueError naming them.

``run(config, workdir)`` is the entry point for the absl main, colabs and tests. It writes, atomically
(``convergence_lib._write_atomic``): ``config.json``, ``results.json`` (rewritten after each
(method, option, dtype) with ``"complete": false`` until the end), ``table.txt`` and ``inversion.png``
(round-trip error against N, log-log, a panel per dtype, a line per method at its default option), and
``inversion_grid.png`` for an image model (written before the final results.json).
"""
import dataclasses
import inspect
import io
import math
import os
import sys
import time
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from experiments import cli
from experiments.convergence_lib import _as_list, _check_int, _endpoints, _json, _make_grid, _write_atomic, fit_order

METHOD_NAMES = ("ddim", "dpm_solver_pp", "bdia", "bdia_edm", "edict")  # = solvers.inversion.METHODS
DTYPES = ("float32", "float64")
MODEL_DTYPES = ("float32",)  # the default dtypes of a trained network (float64 runs it ~3x slower on a CPU)
GUIDANCE = (1.0, 3.0)         # the default guidance scales (the GMM and class-conditional networks)
CLASSES = {"source_class": 0, "target_class": 1}  # the default classes
# The option each method sweeps: (keyword of inversion.get, Config field / flag holding its values).
OPTIONS = {"bdia": ("gamma", "gammas"), "bdia_edm": ("gamma", "gammas"), "edict": ("p", "mixing")}
LEVELS = (1e-4, 1e-10)  # error levels marked in the plot
GRID_PNG = "inversion_grid.png"  # originals | round trips | edits of a trained image model
TYPICAL = 0.999  # probability mass of a class's 'typical' region (the editing record's 'typical' fraction)


@dataclasses.dataclass(frozen=True)
class Config:
  """The study's settings; every field has the default of the main job (None: the default of the problem,
  filled in by ``resolve_config`` and, for what depends on the network, by ``run`` once it is loaded)."""
  methods: Sequence[str] = METHOD_NAMES
  dtypes: Optional[Sequence[str]] = None        # None: DTYPES for the GMM, MODEL_DTYPES for a trained network
  nfe_steps: Sequence[int] = (10, 20, 50, 100)  # step counts N; the NFE actually used is recorded
  guidance: Optional[Sequence[float]] = None    # scales towards source_class (1: the conditional model); None: GUIDANCE
  gammas: Sequence[float] = (0.9, 0.96, 1.0)    # BDIA's gamma, in (0, 1]
  mixing: Sequence[float] = (0.8, 0.93, 0.97)   # EDICT's mixing p, in (0, 1]
  batch: int = 32
  seed: int = 0                                 # seed of the x0 batch
  dim: int = 8
  components: int = 4
  source_class: Optional[int] = None            # class of the data and of the inversion's condition; None: 0
  target_class: Optional[int] = None            # class the editing record regenerates towards; None: 1
  edit_steps: int = 50                          # N of the editing record; 0 leaves it out
  repeats: int = 3                              # timed round trips per point (the best is recorded)
  schedule: str = "vp_linear"                   # a name of solvers.schedules.SCHEDULES
  grid: str = "logsnr"                          # a name of solvers.grids.GRIDS
  final: str = "zero"                           # 't_end' or 'zero' (end with a jump to sigma = 0)
  t_start: Optional[float] = 1.0
  t_end: Optional[float] = 1e-3
  model: Optional[str] = None                   # a training workdir (experiments.train): study its network instead
  grid_images: int = 8                          # originals (rows) in inversion_grid.png (image models)


# ----------------------------------------------------------------------------------------------------
# Config resolution and validation.


def _unit_interval(values, flag, what):
  """Numbers in (0, 1]; a bad one raises ValueError naming it."""
  out = cli.numbers(_as_list(values, flag), flag, float)
  for v in out:
    if not 0.0 < v <= 1.0:
      raise ValueError(f"--{flag}: {v!r} must lie in (0, 1] ({what})")
  return list(dict.fromkeys(out))


def resolve_config(config=None):
  """A validated ``Config`` from a Config, a dict of overrides or None; bad values raise ValueError."""
  from solvers import grids, inversion, schedules

  config = cli.dataclass_config(Config, config)

  methods = list(dict.fromkeys(_as_list(config.methods, "methods")))
  if not methods:
    raise ValueError("--methods is empty; valid: " + ", ".join(inversion.METHODS))
  for m in methods:
    if m not in inversion.METHODS:
      raise ValueError(f"--methods: inversion method {m!r} is unknown; valid: {', '.join(inversion.METHODS)}")
  if config.model is not None and (not isinstance(config.model, str) or not config.model):
    raise ValueError(f"model={config.model!r} must be the --workdir of a training run (python -m experiments.train)")
  default_dtypes = MODEL_DTYPES if config.model else DTYPES
  dtypes = list(dict.fromkeys(_as_list(default_dtypes if config.dtypes is None else config.dtypes, "dtypes")))
  if not dtypes:
    raise ValueError("--dtypes is empty; valid: " + ", ".join(DTYPES))
  for d in dtypes:
    if d not in DTYPES:
      raise ValueError(f"--dtypes: dtype {d!r} is unknown; valid: {', '.join(DTYPES)}")

  steps = sorted(set(cli.numbers([str(v) for v in _as_list(config.nfe_steps, "nfe")], "nfe", int, minimum=1)))
  # A network's defaults (guidance, classes) depend on whether it is class-conditional: run fills them in.
  guidance = config.guidance
  if guidance is not None or not config.model:
    guidance = list(dict.fromkeys(cli.numbers(_as_list(GUIDANCE if guidance is None else guidance, "guidance"),
                                              "guidance", float, minimum=0.0)))
    for s in guidance:
      if not math.isfinite(s):
        raise ValueError(f"--guidance: {s!r} must be a finite scale >= 0")
  gammas = _unit_interval(config.gammas, "gammas", "BDIA's inversion divides by gamma")
  mixing = _unit_interval(config.mixing, "mixing", "EDICT's inversion divides by p")

  # The GMM's size; None with a network (resolve_for_model), so a recorded config.json resolves again.
  gmm_unset = config.model and config.dim is None and config.components is None
  components = None if gmm_unset else _check_int(config.components, "components", 2)
  classes = {}
  for name, default in CLASSES.items():
    k = getattr(config, name)
    if k is None and config.model:
      classes[name] = None  # the network's default, or none for an unconditional one (run)
      continue
    k = _check_int(default if k is None else k, name, 0)
    if not config.model and k >= components:  # a network's class range is checked once it is loaded
      raise ValueError(f"{name}={k} must be a class in 0..{components - 1} (components={components})")
    classes[name] = k
  _check_classes_differ(classes)

  if config.schedule not in schedules.SCHEDULES:
    raise ValueError(f"schedule {config.schedule!r} is unknown; valid: {', '.join(sorted(schedules.SCHEDULES))}")
  if config.grid not in grids.GRIDS:
    raise ValueError(f"grid {config.grid!r} is unknown; valid: {', '.join(sorted(grids.GRIDS))}")
  if config.final not in grids.FINAL_POLICIES:
    raise ValueError(f"final {config.final!r} is unknown; valid: {', '.join(grids.FINAL_POLICIES)}")
  return dataclasses.replace(
      config, methods=methods, dtypes=dtypes, nfe_steps=steps, guidance=guidance, gammas=gammas, mixing=mixing,
      components=components, **classes,
      dim=None if gmm_unset else _check_int(config.dim, "dim", 1), batch=_check_int(config.batch, "batch", 1),
      seed=_check_int(config.seed, "seed", 0), edit_steps=_check_int(config.edit_steps, "edit_steps", 0),
      repeats=_check_int(config.repeats, "repeats", 1), grid_images=_check_int(config.grid_images, "grid_images", 1))


def _check_classes_differ(classes):
  if classes["source_class"] is not None and classes["source_class"] == classes["target_class"]:
    raise ValueError(f"target_class={classes['target_class']} must differ from source_class (editing changes the class)")


def option_values(config, method):
  """The swept option of ``method`` as a list of {keyword: value} (one empty dict for the naive methods)."""
  if method not in OPTIONS:
    return [{}]
  keyword, field = OPTIONS[method]
  return [{keyword: float(v)} for v in getattr(config, field)]


def library_default(method):
  """The option value ``inversion.get(method)`` uses, or None for a method without one."""
  from solvers import inversion
  if method not in OPTIONS:
    return None
  return float(inspect.signature(inversion.METHODS[method]).parameters[OPTIONS[method][0]].default)


def plotted_option(config, method):
  """The option of ``method`` drawn in the plot and used for editing: the library default, or the swept
  value closest to it when the sweep leaves it out."""
  default = library_default(method)
  if default is None:
    return {}
  return min(option_values(config, method), key=lambda o: abs(next(iter(o.values())) - default))


def label(method, option):
  """'bdia gamma=0.96', 'edict p=0.93', 'ddim'."""
  return " ".join([method] + [f"{k}={v:g}" for k, v in option.items()])


# ----------------------------------------------------------------------------------------------------
# A trained network (Config.model).


def resolve_for_model(config, model):
  """``config`` (resolved) completed for ``model`` (a ``sample_lib.Model``): classes and guidance checked
  against the network and defaulted (a class out of range, or a class / guidance setting for an
  unconditional network, raises a ValueError naming it), the model's schedule over its own interval
  (t_start, t_end None: the grid builders' defaults, its t_max and t_min), the GMM-only fields None."""
  classes = {name: getattr(config, name) for name in CLASSES}
  if model.num_classes == 0:
    given = [f"{name}={getattr(config, name)}" for name in CLASSES if getattr(config, name) is not None]
    if config.guidance not in (None, [1.0]):  # 1: the network itself
      given.append(f"guidance={config.guidance}")
    if given:
      raise ValueError(f"{', '.join(given)}: the model in {config.model} is unconditional (trained with "
                       "diffusion.conditional=False): it has no classes to guide towards; leave the class and "
                       "guidance flags out")
    guidance = [1.0]  # the network itself (the table's 'guidance 1')
  else:
    n = model.num_classes
    for name, default in CLASSES.items():
      k = default if classes[name] is None else classes[name]
      if k >= n:
        raise ValueError(f"{name}={k} is out of range: the model in {config.model} has {n} classes (0..{n - 1})")
      classes[name] = k
    _check_classes_differ(classes)
    guidance = list(GUIDANCE) if config.guidance is None else config.guidance
  return dataclasses.replace(config, guidance=guidance, schedule=model.setup.cfg["diffusion"]["schedule"],
                             t_start=None, t_end=None, dim=None, components=None, **classes)


def training_subset(config, model):
  """(indices, x0): ``config.batch`` training examples of ``model`` (of ``config.source_class`` unless it is
  None), drawn without replacement by ``numpy.random.default_rng(config.seed)``, in index order."""
  data = model.setup.dataset
  k = config.source_class
  pool = np.arange(data.num_examples) if k is None else np.flatnonzero(np.asarray(data.labels) == k)
  if pool.size < config.batch:
    what = "examples" if k is None else f"examples of class {k}"
    raise ValueError(f"batch={config.batch} is more than the {pool.size} training {what} of the model in "
                     f"{config.model}")
  indices = np.sort(np.random.default_rng(config.seed).choice(pool, config.batch, replace=False))
  return indices, np.asarray(data.x[indices], np.float32)


def network_denoiser(model, cls, scale, batch, dtype):
  """The network of ``model`` guided towards class ``cls`` with ``scale``: ``Guided`` with the null label as
  the unconditional pass, at scale 1 too, so every scale and class shares one compilation (two network
  passes per call, one NFE). ``cls`` None: the (unconditional) network itself."""
  from experiments import sample_lib
  from models import nets
  from solvers import predictions
  inner = sample_lib.denoiser(model)
  if cls is None:
    return inner
  return predictions.Guided(inner=inner, cond=jnp.full((batch,), cls, jnp.int32),
                            uncond=nets.null_label(model.setup.module, batch), scale=jnp.asarray(scale, dtype))


def _nearest_class(x, data, labels):
  """The class of each sample's nearest (L2) example in ``data``."""
  a = np.asarray(x, np.float64).reshape(len(x), -1)
  b = np.asarray(data, np.float64).reshape(len(data), -1)
  d2 = np.sum(a * a, axis=1)[:, None] - 2.0 * a @ b.T + np.sum(b * b, axis=1)[None, :]
  return np.asarray(labels)[np.argmin(d2, axis=1)]


def _network_editing(config, inversion, schedule, grid, model, x0, report_method):
  """(editing record, panels of inversion_grid.png) of a trained network, in float32 at N = edit_steps, each
  method at its plotted option. Per method and guidance scale, x0 is inverted guided towards source_class,
  regenerated with the same model (the round trip) and guided towards target_class (the edit). The record
  (None for an unconditional network, which has no edit) holds the fractions of edits whose nearest
  training example is of the target / the source class, the mean change ||x_edit - x0|| / ||x0|| and the
  round-trip error; a panel per guidance scale holds the first ``grid_images`` originals, round trips and
  edits."""
  k, j = config.source_class, config.target_class
  dtype = jnp.float32
  x0 = jnp.asarray(x0, dtype)
  rows = min(config.grid_images, config.batch)
  data = model.setup.dataset
  record = None if k is None else {"steps": config.edit_steps, "dtype": "float32", "source_class": k,
                                   "target_class": j, "classifier": "nearest training example (L2)",
                                   "methods": []}
  columns = {scale: ([], []) for scale in config.guidance}  # (round trips, edits) per scale
  for name in config.methods:
    option = plotted_option(config, name)
    method = inversion.get(name, **option)
    title = label(name, option).replace(" ", "\n")
    for scale in config.guidance:
      to_source = network_denoiser(model, k, scale, config.batch, dtype)
      started = time.perf_counter()
      latent, inverted = inversion.invert(method, to_source, schedule, grid, x0, return_trajectory=True)
      x = jax.block_until_ready(inversion.regenerate(method, to_source, schedule, grid, latent).x)
      columns[scale][0].append((f"{title}\nround trip", np.asarray(x[:rows])))
      if record is None:
        continue
      edited = inversion.regenerate(method, network_denoiser(model, j, scale, config.batch, dtype), schedule, grid,
                                    latent)
      x_edit = np.asarray(jax.block_until_ready(edited.x), np.float64)
      columns[scale][1].append((f"{title}\nedit to {j}", x_edit[:rows]))
      row = {"method": name, "option": _option_value(option), "guidance": float(scale),
             "nfe_invert": int(inverted.nfe), "nfe_regenerate": int(edited.nfe),
             "seconds": time.perf_counter() - started, "round_trip_rel_error": _errors(x, x0)[0]}
      if not np.all(np.isfinite(x_edit)):
        row["error"] = "non-finite edited samples"
      else:
        nearest = _nearest_class(x_edit, data.x, data.labels)
        x0_flat = np.asarray(x0, np.float64).reshape(config.batch, -1)
        change = np.linalg.norm(x_edit.reshape(config.batch, -1) - x0_flat, axis=1) / np.linalg.norm(x0_flat, axis=1)
        row.update(to_target=float(np.mean(nearest == j)), in_source=float(np.mean(nearest == k)),
                   change=float(np.mean(change)))
      record["methods"].append(row)
      report_method(row)
  originals = [("original", np.asarray(x0[:rows]))]
  where = f"N={config.edit_steps}, float32"
  panels = []
  for scale, (round_trips, edits) in columns.items():
    if k is None:
      title = f"{where}: original | round trip (invert, regenerate)"
    else:
      title = (f"guidance {scale:g}, {where}: original | round trip (invert and regenerate guided to class {k}) |\n"
               f"edit (invert guided to class {k}, regenerate guided to class {j})")
    panels.append((title, originals + round_trips + edits))
  return record, panels


# ----------------------------------------------------------------------------------------------------
# The study.


def _option_value(option):
  return next(iter(option.values())) if option else None


def _round_trip(inversion, method, invert_denoiser, regen_denoiser, schedule, grid, x0):
  """(x regenerated, invert NFE, regenerate NFE, seconds) of one invert + regenerate."""
  started = time.perf_counter()
  latent, inverted = inversion.invert(method, invert_denoiser, schedule, grid, x0, return_trajectory=True)
  solution = inversion.regenerate(method, regen_denoiser, schedule, grid, latent)
  x = jax.block_until_ready(solution.x)
  return x, int(inverted.nfe), int(solution.nfe), time.perf_counter() - started


def _errors(x, x0):
  """(relative error over the batch, worst sample's relative error), or (None, None) if not finite."""
  x, x0 = np.asarray(x, np.float64), np.asarray(x0, np.float64)
  if not np.all(np.isfinite(x)):
    return None, None
  diff = (x - x0).reshape(x.shape[0], -1)
  ref = x0.reshape(x0.shape[0], -1)
  rel = float(np.linalg.norm(diff) / np.linalg.norm(ref))
  worst = float(np.max(np.linalg.norm(diff, axis=1) / np.linalg.norm(ref, axis=1)))
  return rel, worst


def _cast(tree, dtype):
  return jax.tree_util.tree_map(lambda a: jnp.asarray(a).astype(dtype), tree)


def _typical(x, mean, std):
  """Fraction of samples inside the TYPICAL region of the class Gaussian N(mean, diag(std^2)): squared
  standardised distance below the chi-square quantile with D degrees of freedom."""
  from scipy import stats
  x = np.asarray(x, np.float64)
  d2 = np.sum(((x - mean) / std) ** 2, axis=1)
  return float(np.mean(d2 <= stats.chi2.ppf(TYPICAL, x.shape[1])))


def _offset_change(x, mean, offset0):
  """Mean over samples of ||(x - mean) - offset0|| / ||offset0||."""
  offset = np.asarray(x, np.float64) - mean
  return float(np.mean(np.linalg.norm(offset - offset0, axis=1) / np.linalg.norm(offset0, axis=1)))


def _editing(config, inversion, predictions, schedule, grid, gmm, x0, report_method):
  """The editing record (float64, N = edit_steps, each method at its plotted option)."""
  from models import analytic
  k, j = config.source_class, config.target_class
  denoiser = gmm.denoiser(schedule, "eps")
  means = np.asarray(gmm.means, np.float64)
  stds = np.broadcast_to(np.asarray(gmm.stds, np.float64), means.shape)
  offset0 = np.asarray(x0, np.float64) - means[k]
  record = {"steps": config.edit_steps, "dtype": "float64", "source_class": k, "target_class": j,
            "x0_in_source_class": float(np.mean(np.asarray(jnp.argmax(gmm._components(x0, 1.0, 0.0)[2], -1)) == k)),
            "x0_typical": _typical(x0, means[k], stds[k]), "methods": []}
  # Reference at guidance 1 (the class-conditional model, one Gaussian per class): the exact PF-ODE edit,
  # class-k flow from the data to the grid's first node, then the class-j flow back (closed form).
  source, target = (analytic.Gaussian(mean=gmm.means[c], std=jnp.asarray(stds[c])) for c in (k, j))
  a_T, s_T = grid.alpha[0], grid.sigma[0]
  exact = target.pf_ode_solution(source.pf_ode_solution(x0, 1.0, 0.0, a_T, s_T), a_T, s_T, 1.0, 0.0)
  record["exact_offset_change_guidance_1"] = _offset_change(exact, means[j], offset0)
  for name in config.methods:
    option = plotted_option(config, name)
    method = inversion.get(name, **option)
    for scale in config.guidance:
      s = jnp.asarray(scale, jnp.float64)
      to_source = predictions.Guided(inner=denoiser, cond=gmm.label(k), uncond=None, scale=s)
      to_target = predictions.Guided(inner=denoiser, cond=gmm.label(j), uncond=None, scale=s)
      x, nfe_inv, nfe_regen, seconds = _round_trip(inversion, method, to_source, to_target, schedule, grid, x0)
      row = {"method": name, "option": _option_value(option), "guidance": float(scale),
             "nfe_invert": nfe_inv, "nfe_regenerate": nfe_regen, "seconds": seconds}
      if not np.all(np.isfinite(np.asarray(x))):
        row["error"] = "non-finite edited samples"
      else:
        classes = np.asarray(jnp.argmax(gmm._components(x, 1.0, 0.0)[2], -1))
        row.update(to_target=float(np.mean(classes == j)), in_source=float(np.mean(classes == k)),
                   typical=_typical(x, means[j], stds[j]), offset_change=_offset_change(x, means[j], offset0))
      record["methods"].append(row)
      report_method(row)
  return record


def run(config=None, workdir="workdir/inversion"):
  """Runs the study described by ``config`` (a Config, a dict of overrides, or None for the defaults).

  Writes its outputs into ``workdir`` (created if missing), prints the table to stdout last, and returns
  the results dict that is also written to results.json.
  """
  jax.config.update("jax_enable_x64", True)
  from models import analytic
  from solvers import grids, inversion, loop, predictions, schedules

  config = resolve_config(config)
  network = None
  if config.model:  # loaded, and the config checked against it, before anything is written
    from experiments import sample_lib
    network = sample_lib.load_model(config.model)
    config = resolve_for_model(config, network)
    indices, x0_data = training_subset(config, network)
  os.makedirs(workdir, exist_ok=True)
  for stale in ("table.txt", "inversion.png", GRID_PNG):  # outputs of an earlier run would not match this one
    if os.path.exists(os.path.join(workdir, stale)):
      os.remove(os.path.join(workdir, stale))
  resolved = dataclasses.asdict(config)
  _write_atomic(workdir, "config.json", _json(resolved))
  study_start = time.perf_counter()

  schedule = schedules.get(config.schedule) if network is None else network.setup.schedule
  edit_steps = [config.edit_steps] if config.edit_steps else []
  capacity = grids.default_capacity(max(config.nfe_steps + edit_steps) + 1)  # one compilation for every N
  grid_list = [_make_grid(grids, schedule, config, n, capacity) for n in config.nfe_steps]
  (t0, _, s0), (t1, _, s1) = _endpoints(grid_list[0])
  k = config.source_class
  if network is None:
    gmm64 = analytic.gmm(dim=config.dim, num_components=config.components, dtype=jnp.float64)
    x0_64 = gmm64.conditioned(gmm64.label(k)).sample(jax.random.key(config.seed), config.batch)
    data = f"GMM ({config.components} components, dim {config.dim}): {config.batch} samples of class {k}"
    guided = f"Guided(cond=label({k}), uncond=None (the mixture), scale=guidance)"
  else:
    data = (f"{network.setup.cfg['data']['name']} training data: {config.batch} examples"
            f"{'' if k is None else f' of class {k}'} (seed {config.seed})")
    guided = (f"the trained {network.setup.cfg['model']['name']} (step {network.step}), "
              + ("unconditional" if k is None else f"Guided(cond={k}, uncond=null label, scale=guidance)"))

  def models_for(dtype):
    """(x0, [the model of each guidance scale]) in ``dtype``."""
    if network is not None:
      return jnp.asarray(x0_data, dtype), [network_denoiser(network, k, s, config.batch, dtype) for s in config.guidance]
    gmm = _cast(gmm64, dtype)
    inner = gmm.denoiser(schedule, "eps")
    return x0_64.astype(dtype), [predictions.Guided(inner=inner, cond=gmm.label(k), uncond=None,
                                                    scale=jnp.asarray(s, dtype)) for s in config.guidance]

  problem = {"data": data, "model": guided, "schedule": config.schedule, "grid": config.grid,
             "final": config.final, "t_start": t0, "t_end": t1,
             "sigma_start": s0, "sigma_end": s1, "capacity": capacity,
             "error": "||regenerate(invert(x0)) - x0|| / ||x0|| over the batch"}
  if network is not None:
    problem.update(model_workdir=config.model, params=network.source, model_step=network.step,
                   num_classes=network.num_classes, data_shape=list(network.shape),
                   schedule_kwargs=network.setup.cfg["diffusion"]["schedule_kwargs"],
                   prediction=network.setup.loss.prediction, data_indices=indices.tolist())
  results = {"complete": False, "config": resolved, "problem": problem,
             "methods": {m: {"exact": inversion.get(m).exact, "option": OPTIONS.get(m, (None,))[0],
                             "library_default": library_default(m),
                             "plotted_option": _option_value(plotted_option(config, m))} for m in config.methods},
             "series": [], "runs": [], "editing": None}
  _write_atomic(workdir, "results.json", _json(results))

  for name in config.methods:
    for option in option_values(config, name):
      method = inversion.get(name, **option)
      for dtype_name in config.dtypes:
        x0, models = models_for(jnp.dtype(dtype_name))
        traces = loop.trace_count()
        series = {"method": name, "option": _option_value(option), "dtype": dtype_name}
        # Warm-up on the largest grid: compiles invert and regenerate once for this (method, option, dtype).
        series["compile_seconds"] = _round_trip(inversion, method, models[0], models[0], schedule, grid_list[-1], x0)[3]
        orders = []
        for scale, model in zip(config.guidance, models):
          points = []
          for steps, grid in zip(config.nfe_steps, grid_list):
            x, nfe_inv, nfe_regen, seconds = _round_trip(inversion, method, model, model, schedule, grid, x0)
            for _ in range(config.repeats - 1):
              seconds = min(seconds, _round_trip(inversion, method, model, model, schedule, grid, x0)[3])
            rel, worst = _errors(x, x0)
            row = dict(series, guidance=float(scale), steps=steps, nfe_invert=nfe_inv, nfe_regenerate=nfe_regen,
                       rel_error=rel, max_sample_rel_error=worst, seconds=seconds)
            if rel is None:
              row["error"] = "non-finite round trip"
              logging.warning("%s / %s / guidance %g / N=%d: non-finite round trip", label(name, option),
                              dtype_name, scale, steps)
            else:
              points.append((steps, rel))
            results["runs"].append(row)
          # The order of the round-trip error in N: meaningful for the naive methods only (the exact
          # ones sit at rounding level).
          order = None if method.exact or len(points) < 2 else fit_order(*zip(*points))
          orders.append({"guidance": float(scale), "order": order})
        series["compilations"] = loop.trace_count() - traces
        series["round_trip_order"] = orders
        results["series"].append(series)
        logging.info("%s / %s: compiled in %.2fs (%d traces)", label(name, option), dtype_name,
                     series["compile_seconds"], series["compilations"])
        _write_atomic(workdir, "results.json", _json(results))

  grid_png = None
  if config.edit_steps:
    grid = _make_grid(grids, schedule, config, config.edit_steps, capacity)
    report = lambda row: logging.info("editing %s: %s", row["method"], row)
    if network is None:
      results["editing"] = _editing(config, inversion, predictions, schedule, grid, gmm64, x0_64, report)
    else:
      results["editing"], panels = _network_editing(config, inversion, schedule, grid, network, x0_data, report)
      if len(network.shape) == 3:  # images (H, W, C)
        grid_png = plot_grid(panels)

  results["total_seconds"] = time.perf_counter() - study_start
  results["complete"] = True
  table = format_table(results)
  _write_atomic(workdir, "table.txt", table)
  _write_atomic(workdir, "inversion.png", plot(results))
  if grid_png is not None:
    _write_atomic(workdir, GRID_PNG, grid_png)
  _write_atomic(workdir, "results.json", _json(results))
  sys.stdout.write(table)
  sys.stdout.flush()
  return results


# ----------------------------------------------------------------------------------------------------
# Reports.


def _series_keys(results):
  """(method, option) in the order they ran."""
  return list(dict.fromkeys((s["method"], s["option"]) for s in results["series"]))


def _row_label(results, method, option):
  keyword = results["methods"][method]["option"]
  return label(method, {} if option is None else {keyword: option})


def _lines(header, rows, right_from=1):
  widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]

  def line(cells):
    return "  ".join(c.rjust(w) if i >= right_from else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

  return [line(header), line(["-" * w for w in widths])] + [line(r) for r in rows]


def format_table(results):
  """The text report: a block of round-trip errors per (dtype, guidance), a timing block per dtype, editing."""
  config = results["config"]
  steps = config["nfe_steps"]
  keys = _series_keys(results)
  runs = {(r["method"], r["option"], r["dtype"], r["guidance"], r["steps"]): r for r in results["runs"]}
  orders = {(s["method"], s["option"], s["dtype"], o["guidance"]): o["order"]
            for s in results["series"] for o in s["round_trip_order"]}
  p = results["problem"]
  out = [f"Inversion round trip: {p['error']}; cell = error (NFE invert + regenerate).",
         f"{p['data']}; model {p['model']}; {p['schedule']}, {p['grid']} grid t={p['t_start']:g}->"
         f"{'sigma=0' if p['sigma_end'] == 0 else format(p['t_end'], 'g')}. Order: fitted slope in N (naive methods).", ""]
  for dtype in config["dtypes"]:
    for scale in config["guidance"]:
      out.append(f"== {dtype}, guidance {scale:g} ==")
      rows = []
      for method, option in keys:
        cells = [_row_label(results, method, option)]
        for n in steps:
          r = runs.get((method, option, dtype, scale, n))
          if r is None:
            cells.append("-")
          elif r["rel_error"] is None:
            cells.append("non-finite")
          else:
            cells.append(f"{r['rel_error']:.2e} ({r['nfe_invert'] + r['nfe_regenerate']})")
        order = orders.get((method, option, dtype, scale))
        cells.append("-" if order is None else f"{order:.2f}")
        rows.append(cells)
      out += _lines(["method / option"] + [f"N={n}" for n in steps] + ["order"], rows) + [""]
  for dtype in config["dtypes"]:
    out.append(f"== {dtype}: ms per invert + regenerate (best of {config['repeats']}, mean over guidance scales); "
               "compile s (both directions) ==")
    rows = []
    compile_s = {(s["method"], s["option"], s["dtype"]): s["compile_seconds"] for s in results["series"]}
    for method, option in keys:
      cells = [_row_label(results, method, option)]
      for n in steps:
        times = [runs[key]["seconds"] for key in ((method, option, dtype, s, n) for s in config["guidance"]) if key in runs]
        cells.append(f"{1e3 * sum(times) / len(times):.2f}" if times else "-")
      c = compile_s.get((method, option, dtype))
      cells.append("-" if c is None else f"{c:.2f}")
      rows.append(cells)
    out += _lines(["method / option"] + [f"N={n}" for n in steps] + ["compile s"], rows) + [""]
  edit = results.get("editing")
  if edit and "classifier" in edit:  # a trained network's record
    out += _network_editing_table(results, edit)
  elif edit:
    out.append(f"== editing ({edit['dtype']}, N={edit['steps']}): invert class-{edit['source_class']} samples guided to "
               f"class {edit['source_class']}, regenerate guided to class {edit['target_class']} ==")
    out.append(f"to {edit['target_class']}: fraction whose most likely component is {edit['target_class']}; "
               f"in {edit['source_class']}: fraction left in class {edit['source_class']}; typical: fraction inside "
               f"class {edit['target_class']}'s {100 * TYPICAL:g}% region (chi-square); offset: "
               f"||(x_edit - mu_{edit['target_class']}) - (x0 - mu_{edit['source_class']})|| / ||x0 - mu_{edit['source_class']}||, mean. "
               f"x0: in class {edit['source_class']} {edit['x0_in_source_class']:.2f}, typical {edit['x0_typical']:.2f}.")
    out += _editing_lines(
        results, edit, [f"to {edit['target_class']}", f"in {edit['source_class']}", "typical", "offset"],
        lambda r: ["non-finite"] * 4 if "error" in r else [f"{r['to_target']:.2f}", f"{r['in_source']:.2f}",
                                                           f"{r['typical']:.2f}", f"{r['offset_change']:.3f}"])
    out += [f"exact PF-ODE edit at guidance 1 (closed form, the Gaussian class flows): offset "
            f"{edit['exact_offset_change_guidance_1']:.3f}", ""]
  if "total_seconds" in results:
    out.append(f"total {results['total_seconds']:.1f} s")
  return "\n".join(out) + "\n"


def _network_editing_table(results, edit):
  k, j = edit["source_class"], edit["target_class"]
  out = [f"== editing ({edit['dtype']}, N={edit['steps']}): invert the class-{k} examples guided to class {k}, "
         f"regenerate guided to class {j} ==",
         f"to {j} / in {k}: fraction of edited images whose nearest training example (L2) is of class {j} / {k}; "
         f"change: ||x_edit - x0|| / ||x0||, mean over images; round trip: the round-trip error at this N."]

  def cells(r):
    rt = "non-finite" if r["round_trip_rel_error"] is None else f"{r['round_trip_rel_error']:.2e}"
    return (["non-finite"] * 3 if "error" in r else
            [f"{r['to_target']:.2f}", f"{r['in_source']:.2f}", f"{r['change']:.3f}"]) + [rt]

  return out + _editing_lines(results, edit, [f"to {j}", f"in {k}", "change", "round trip"], cells) + [""]


def _editing_lines(results, edit, columns, cells):
  """The table of an editing record: a row per method, per guidance scale the ``columns`` (the first
  prefixed with the scale) holding ``cells(row)`` of the record's row of that method and scale."""
  scales = list(dict.fromkeys(r["guidance"] for r in edit["methods"]))
  header = ["method / option"]
  for s in scales:
    header += [f"g={s:g}: {columns[0]}"] + list(columns[1:])
  rows = []
  for method in dict.fromkeys(r["method"] for r in edit["methods"]):
    mine = {r["guidance"]: r for r in edit["methods"] if r["method"] == method}
    row = [_row_label(results, method, next(iter(mine.values()))["option"])]
    for s in scales:
      row += cells(mine[s])
    rows.append(row)
  return _lines(header, rows)


def plot(results):
  """PNG bytes: round-trip error against N (log-log), a panel per dtype, a line per method at its plotted
  option (solid: the first guidance scale, dashed: the others), the LEVELS marked."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.ticker
  from matplotlib import pyplot as plt

  config = results["config"]
  dtypes = config["dtypes"]
  floor = 1e-18  # an exactly zero error is drawn here
  fig, axes = plt.subplots(1, len(dtypes), figsize=(6.0 * len(dtypes), 4.5), squeeze=False)
  colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
  for ax, dtype in zip(axes[0], dtypes):
    for c, (method, info) in enumerate(results["methods"].items()):
      for g, scale in enumerate(config["guidance"]):
        pts = [(r["steps"], max(r["rel_error"], floor)) for r in results["runs"]
               if r["method"] == method and r["option"] == info["plotted_option"] and r["dtype"] == dtype
               and r["guidance"] == scale and r["rel_error"] is not None]
        if not pts:
          continue
        n, err = zip(*pts)
        name = _row_label(results, method, info["plotted_option"])
        ax.loglog(n, err, "o-" if g == 0 else "s--", ms=3, lw=1.2 if g == 0 else 0.8, color=colors[c % len(colors)],
                  label=f"{name}, guidance {scale:g}")
    for level in LEVELS:
      ax.axhline(level, color="gray", ls=":", lw=0.8)
      ax.annotate(f"{level:.0e}", (0.01, level), xycoords=("axes fraction", "data"), fontsize=7, color="gray",
                  va="bottom")
    ax.set_xticks(config["nfe_steps"])
    ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_title(f"{dtype}: ||regenerate(invert(x0)) - x0|| / ||x0||", fontsize=9)
    ax.set_xlabel("steps N")
    ax.set_ylabel("relative round-trip error")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=6)
  fig.tight_layout()
  buf = io.BytesIO()
  fig.savefig(buf, format="png", dpi=100)
  plt.close(fig)
  return buf.getvalue()


GRID_TILE_PX = 72     # at least this many pixels per tile (image + padding) in inversion_grid.png
GRID_MARGIN = 10      # pixels left of the mosaics, and below the last one
GRID_HEADER = 64      # pixels above each mosaic: the panel's title and the column titles
GRID_MIN_WIDTH = 480  # room for a panel's title
GRID_DPI = 100


def grid_layout(rows, cols, height, width, panels):
  """The pixel layout of inversion_grid.png for ``panels`` mosaics of rows x cols images of height x width:
  ``scale`` (PNG pixels per image pixel, nearest neighbour), the PNG's ``width`` and ``height``, the
  mosaics' ``left`` column and the ``tops`` row of each (PNG pixels; tile (r, c) of a mosaic starts
  ``(1 + r (height + 1), 1 + c (width + 1))`` image pixels after its corner: one pixel of padding)."""
  scale = max(1, math.ceil(GRID_TILE_PX / (width + 1)))
  mosaic_h, mosaic_w = (rows * (height + 1) + 1) * scale, (cols * (width + 1) + 1) * scale
  tops = [GRID_HEADER + p * (GRID_HEADER + mosaic_h) for p in range(panels)]
  return {"scale": scale, "width": max(GRID_MIN_WIDTH, mosaic_w + 2 * GRID_MARGIN),
          "height": tops[-1] + mosaic_h + GRID_MARGIN, "left": GRID_MARGIN, "tops": tops}


def plot_grid(panels):
  """PNG bytes of inversion_grid.png: a mosaic per panel, ``panels`` = [(title, [(column title, images
  (rows, H, W, C) in [-1, 1])])], every panel with the same rows and columns. The images are tiled by
  ``sample_lib.image_grid`` ([-1, 1] -> [0, 1], grey padding; non-finite values drawn as 0) and placed pixel
  for pixel (``grid_layout``), the titles above them."""
  import matplotlib
  matplotlib.use("Agg")
  from matplotlib import pyplot as plt
  from experiments import sample_lib

  rows, h, w, c = np.shape(panels[0][1][0][1])
  cols = len(panels[0][1])
  layout = grid_layout(rows, cols, h, w, len(panels))
  scale, width, height, left = layout["scale"], layout["width"], layout["height"], layout["left"]
  fig = plt.figure(figsize=(width / GRID_DPI, height / GRID_DPI), dpi=GRID_DPI)
  for (title, columns), top in zip(panels, layout["tops"]):
    tiles = np.stack([np.asarray(images, np.float32) for _, images in columns], axis=1).reshape(rows * cols, h, w, c)
    mosaic = sample_lib.image_grid(np.nan_to_num(tiles, nan=0.0, posinf=1.0, neginf=-1.0), rows, cols)
    if c != 3:  # grey (or the first channel of other data) as RGB
      mosaic = np.repeat(mosaic[..., :1], 3, axis=-1)
    mosaic = np.kron(mosaic, np.ones((scale, scale, 1), np.float32))
    fig.figimage(mosaic, xo=left, yo=height - top - mosaic.shape[0], origin="upper")
    fig.text(left / width, 1.0 - (top - GRID_HEADER + 3) / height, title, ha="left", va="top", fontsize=7)
    for q, (name, _) in enumerate(columns):
      x = left + (1 + q * (w + 1) + w / 2) * scale
      fig.text(x / width, 1.0 - (top - 2) / height, name, ha="center", va="bottom", fontsize=6, linespacing=1.1)
  buf = io.BytesIO()
  fig.savefig(buf, format="png", dpi=GRID_DPI)
  plt.close(fig)
  return buf.getvalue()

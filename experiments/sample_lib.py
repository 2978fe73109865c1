"""Sampling a trained network: ``run(config, workdir)`` draws samples from a training workdir's model.

The model comes from a workdir of ``experiments.train`` (``load_model``): its resolved config.json and its
final EMA params (``params/<steps>/``, ``checkpoint='params'``) or the EMA params of its newest checkpoint
(``checkpoint='latest'``, e.g. of an unfinished run). Module, schedule, prediction kind and time label are
those training used (``train_lib.Setup``), so the ``solvers.Denoiser`` (``denoiser``) sees the network
exactly as the loss did.

Sampling: x_T ~ N(0, sigma(t_start)^2 I) (N(0, I) up to 1e-5 for the VP and flow schedules) at the grid's
first node (the schedule's t_max for the builders' defaults), ``num_samples`` of the data's shape, in
float32, integrated by any registered solver (its ``prepare`` first, for the solvers that learn from the
model) along the named grid with the chosen final-step policy, or along a learned grid (``grid='learned:<name>'``, a
``solvers.schedule_artifacts`` artifact of ``experiments.learn_schedule``: its times, steps, final policy and, unless
``solver`` is given, its solver with the learned options). Class-conditional networks take a class
label for every sample (``class_label=k``, or ``-1`` for one row per class: ceil(num_samples /
num_classes) samples of each class) and a classifier-free guidance scale (``solvers.Guided`` with the
network's null label as the unconditional pass; scale 1 is the conditional network alone, one pass).
Without a class label a conditional network samples unconditionally (the null label).

Randomness: x_T from fold_in(key(seed), 0), a stochastic solver's noise from fold_in(key(seed), 1), the
training points of a solver's ``prepare`` from fold_in(key(seed), 2): the same seed gives the same samples.

``run`` writes into ``workdir``, atomically (``convergence_lib._write_atomic``):
- ``config.json``: the resolved sampling config, the model's step and its training config;
- ``samples.npz``: ``samples`` (N, *data shape) float32, ``labels`` (N,) int32 (-1: unconditional),
  ``nfe`` (model evaluations; a guided evaluation counts once), ``solver``, ``grid`` (names) and
  ``seconds`` (wall time of prepare + sampling, compilation included);
- ``samples.png``: image data (H, W, C) as a grid of tiles, [-1, 1] -> [0, 1] (one row per class with
  ``class_label=-1``); vector data as a scatter plot of the first two coordinates over the training data
  in light grey (a histogram for 1-D data).
"""
import dataclasses
import io
import json
import math
import os
import time
from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from experiments import cli
from experiments.convergence_lib import _check_int, _json, _write_atomic

CHECKPOINTS = ("params", "latest")
DEFAULT_SOLVER, DEFAULT_STEPS, DEFAULT_FINAL = "dpm_solver_pp_2m", 10, "t_end"
ALL_CLASSES = -1
PAD_VALUE = 0.5  # grey between the tiles of an image grid (digits are white on black)


@dataclasses.dataclass(frozen=True)
class Config:
  """The settings of one sampling run; ``model`` (a training workdir) is required."""
  model: Optional[str] = None
  # A registered solver name (solvers.available()); None: dpm_solver_pp_2m, or a learned grid's own solver.
  solver: Optional[str] = None
  # A name of solvers.grids.GRIDS (or its builder's name, uniform_logsnr), or learned:<name>: the grid of a
  # solvers.schedule_artifacts artifact (learned for this model's schedule), found in ``schedules_dir``,
  # $DOS_SCHEDULES or experiments/schedules/; it sets steps and final, and the solver (with its learned options) if
  # ``solver`` is unset.
  grid: str = "logsnr"
  steps: Optional[int] = None           # grid steps (the NFE for one-call-per-step solvers); None: 10 / the artifact's
  # solvers.grids.FINAL_POLICIES: stop at t_min, or end with a jump to sigma = 0; None: t_end / the artifact's
  final: Optional[str] = None
  num_samples: int = 64
  seed: int = 0
  class_label: Optional[int] = None     # None: unconditional; k: class k; -1: one row per class
  guidance: Optional[float] = None      # classifier-free guidance scale (needs class_label); None: 1
  checkpoint: str = "params"            # 'params' (final EMA) or 'latest' (EMA of the newest checkpoint)
  schedules_dir: Optional[str] = None   # a folder searched first for learned:<name> artifacts


# ----------------------------------------------------------------------------------------------------
# The trained model.


class Model(NamedTuple):
  """A trained network and what sampling needs of its training run."""
  setup: Any          # train_lib.Setup: cfg, dataset, module, schedule, loss (prediction, time label)
  params: Any         # EMA params
  step: int           # the training step of the params
  source: str         # the folder the params came from

  @property
  def num_classes(self):
    """The network's number of classes (0: unconditional)."""
    return self.setup.num_classes

  @property
  def shape(self):
    """The shape of one example."""
    return tuple(self.setup.dataset.shape)


def load_model(workdir, checkpoint="params"):
  """The network of the training workdir ``workdir``: ``checkpoint='params'`` loads its final EMA params,
  ``'latest'`` the EMA params of its newest checkpoint. A path that is not a training workdir, or one
  without the requested params, raises a ValueError naming it."""
  from experiments import train_lib
  from models import checkpoints

  if checkpoint not in CHECKPOINTS:
    raise ValueError(f"checkpoint={checkpoint!r} is unknown; valid: {', '.join(CHECKPOINTS)}")
  if not workdir or not os.path.isdir(workdir):
    raise ValueError(f"model workdir {workdir!r} does not exist; pass the --workdir of a training run "
                     "(python -m experiments.train)")
  if not os.path.isfile(os.path.join(workdir, train_lib.CONFIG)):
    raise ValueError(f"{workdir} is not a training workdir: it has no {train_lib.CONFIG} "
                     "(written by python -m experiments.train)")
  params_dir = os.path.join(workdir, train_lib.PARAMS)
  ckpt_dir = os.path.join(workdir, train_lib.CHECKPOINTS)
  if checkpoint == "params":
    step = checkpoints.latest_step(params_dir)
    if step is None:
      hint = (f"; it has checkpoints (newest: step {checkpoints.latest_step(ckpt_dir)}): sample from them with "
              "checkpoint='latest' (--checkpoint=latest)" if checkpoints.latest_step(ckpt_dir) is not None else "")
      raise ValueError(f"{params_dir} holds no final params: the training run in {workdir} has not finished{hint}")
    setup, params = train_lib.load_params(workdir)
    return Model(setup, params, step, os.path.join(params_dir, str(step)))
  step = checkpoints.latest_step(ckpt_dir)
  if step is None:
    raise ValueError(f"{ckpt_dir} holds no complete checkpoint: nothing to sample from in {workdir}")
  setup, state = train_lib.restore_state(workdir, step)
  return Model(setup, state.ema_params, step, os.path.join(ckpt_dir, str(step)))


def denoiser(model, cond=None):
  """The ``solvers.Denoiser`` of ``model`` with class labels ``cond`` (None: the null label), with the
  prediction kind and time label of its training loss."""
  from models import nets
  loss = model.setup.loss
  return nets.denoiser(model.setup.module, model.params, prediction=loss.prediction, time_label=loss.time_label,
                       cond=cond)


def prior(sigma, shape, key, dtype=jnp.float32):
  """x_T ~ N(0, sigma^2 I) of ``shape``: the starting noise at a node with noise level ``sigma``."""
  return jnp.asarray(sigma, dtype) * jax.random.normal(key, shape, dtype)


# ----------------------------------------------------------------------------------------------------
# Config.


def _grid_name(name):
  """A name of grids.GRIDS; a builder's function name (uniform_logsnr) maps to its registered name."""
  from solvers import grids
  if name in grids.GRIDS:
    return name
  for registered, builder in grids.GRIDS.items():
    if builder.__name__ == name:
      return registered
  raise ValueError(f"grid {name!r} is unknown; valid: {', '.join(sorted(grids.GRIDS))}")


def resolve_config(config):
  """A validated ``Config`` from a Config or a dict of overrides; a bad value raises ValueError naming it.
  (What depends on the model, such as the class range, is checked by ``run`` once it is loaded.)"""
  import solvers
  from solvers import grids
  from solvers import schedule_artifacts as sa

  config = cli.dataclass_config(Config, config)
  if not config.model:
    raise ValueError("model is required: the --workdir of a training run (python -m experiments.train)")
  learned = sa.learned_name(config.grid)
  if learned is not None:  # an unknown name raises a ValueError listing the available ones
    artifact = sa.load(learned, search_path=config.schedules_dir)
    sa.check_compatible(artifact, num_steps=config.steps, final=config.final)
    config = dataclasses.replace(config, steps=artifact.num_steps, final=artifact.final,
                                 solver=config.solver or artifact.solver)
  config = dataclasses.replace(config, solver=config.solver or DEFAULT_SOLVER,
                               steps=DEFAULT_STEPS if config.steps is None else config.steps,
                               final=config.final or DEFAULT_FINAL)
  solvers.get(config.solver)  # raises a ValueError listing the names
  if config.final not in grids.FINAL_POLICIES:
    raise ValueError(f"final={config.final!r} is unknown; valid: {', '.join(grids.FINAL_POLICIES)}")
  if config.checkpoint not in CHECKPOINTS:
    raise ValueError(f"checkpoint={config.checkpoint!r} is unknown; valid: {', '.join(CHECKPOINTS)}")
  class_label = None if config.class_label is None else _check_int(config.class_label, "class_label", ALL_CLASSES)
  guidance = config.guidance
  if guidance is not None:
    if isinstance(guidance, bool) or not isinstance(guidance, (int, float)) or not math.isfinite(guidance) \
        or guidance < 0:
      raise ValueError(f"guidance={guidance!r} must be a finite number >= 0")
    if class_label is None:
      raise ValueError(f"guidance={guidance} needs a class label to guide towards: pass class_label "
                       "(--class_label=k, or -1 for every class)")
    guidance = float(guidance)
  return dataclasses.replace(config, model=str(config.model), grid=config.grid if learned else _grid_name(config.grid),
                             steps=_check_int(config.steps, "steps", 1),
                             num_samples=_check_int(config.num_samples, "num_samples", 1),
                             seed=_check_int(config.seed, "seed", 0), class_label=class_label, guidance=guidance)


def labels_for(config, num_classes):
  """The (N,) int32 class labels of the samples (-1: unconditional) for a model with ``num_classes``."""
  if config.class_label is None:
    return np.full((config.num_samples,), -1, np.int32)
  if num_classes == 0:
    raise ValueError(f"class_label={config.class_label}: the model in {config.model} is unconditional (trained "
                     "with diffusion.conditional=False); leave --class_label and --guidance out")
  if config.class_label == ALL_CLASSES:
    per_class = -(-config.num_samples // num_classes)
    return np.repeat(np.arange(num_classes, dtype=np.int32), per_class)
  if config.class_label >= num_classes:
    raise ValueError(f"class_label={config.class_label} is out of range: the model in {config.model} has "
                     f"{num_classes} classes (0..{num_classes - 1}; -1 for one row per class)")
  return np.full((config.num_samples,), config.class_label, np.int32)


def _sampling_denoiser(model, labels, guidance):
  from models import nets
  from solvers import predictions
  if labels[0] < 0:
    return denoiser(model)
  cond = jnp.asarray(labels)
  if guidance is None or guidance == 1.0:
    return denoiser(model, cond)
  return predictions.Guided(inner=denoiser(model), cond=cond, uncond=nets.null_label(model.setup.module, labels.size),
                            scale=jnp.asarray(guidance, jnp.float32))


# ----------------------------------------------------------------------------------------------------
# The run.


def run(config, workdir):
  """Samples per ``config`` (a Config or a dict of overrides) into ``workdir``; see the module doc.

  Everything is validated, the model loaded and the samples drawn before anything is written. Returns
  the summary the absl main prints (workdir, num_samples, nfe, seconds, finite, solver, grid, model_step)
  with the ``samples`` and ``labels`` arrays."""
  import solvers
  from solvers import grids

  config = resolve_config(config)
  model = load_model(config.model, config.checkpoint)
  labels = labels_for(config, model.num_classes)
  schedule = model.setup.schedule
  artifact = _learned_artifact(config, model)
  grid = artifact.grid() if artifact else grids.make(config.grid, schedule, config.steps, final=config.final)
  den = _sampling_denoiser(model, labels, config.guidance)
  own = artifact is not None and config.solver == artifact.solver and bool(artifact.solver_options)
  solver = artifact.solver_object() if own else solvers.get(config.solver)
  key = jax.random.key(config.seed)
  x_T = prior(grid.sigma[0], (labels.size,) + model.shape, jax.random.fold_in(key, 0))

  started = time.perf_counter()
  # A learned solver's options (DC ratios, USF choices) are its preparation: not searched again.
  prepared = solver if own else solver.prepare(den, schedule, grid, x_T, jax.random.fold_in(key, 2))
  sol = solvers.sample(prepared, den, schedule, grid, x_T, key=jax.random.fold_in(key, 1))
  samples = np.asarray(jax.block_until_ready(sol.x), np.float32)
  seconds = time.perf_counter() - started
  nfe = int(sol.nfe)

  os.makedirs(workdir, exist_ok=True)
  resolved = dataclasses.asdict(config)
  record = {"sample": resolved, "model": {"workdir": config.model, "params": model.source, "step": model.step,
                                          "num_classes": model.num_classes, "data_shape": list(model.shape),
                                          "train_config": model.setup.cfg, "key": model_key(model)}}
  if artifact is not None:
    record["learned_schedule"] = artifact.to_json()
  _write_atomic(workdir, "config.json", _json(record))
  buf = io.BytesIO()
  np.savez(buf, samples=samples, labels=labels, nfe=np.int32(nfe), solver=np.str_(config.solver),
           grid=np.str_(config.grid), seconds=np.float64(seconds))
  _write_atomic(workdir, "samples.npz", buf.getvalue())
  _write_atomic(workdir, "samples.png", plot(samples, labels, model, config, nfe))
  finite = bool(np.all(np.isfinite(samples)))
  summary = {"workdir": workdir, "num_samples": int(labels.size), "nfe": nfe, "seconds": seconds,
             "finite": finite, "solver": config.solver, "grid": config.grid, "model_step": model.step}
  return dict(summary, samples=samples, labels=labels)


def model_key(model):
  """The model key of learned-schedule artifacts: ``<dataset>-<fingerprint of the training config>-step<step>``."""
  from solvers import schedule_artifacts as sa
  return f"{model.setup.cfg['data']['name']}-{sa.config_fingerprint(model.setup.cfg)}-step{model.step}"


def _learned_artifact(config, model):
  """The artifact of ``grid='learned:<name>'`` checked against the model's schedule (None for a builder's grid); one
  learned for another model is used with a warning."""
  from solvers import schedule_artifacts as sa
  name = sa.learned_name(config.grid)
  if name is None:
    return None
  artifact = sa.load(name, search_path=config.schedules_dir)
  sa.check_compatible(artifact, schedule=model.setup.schedule, num_steps=config.steps, final=config.final)
  if artifact.model != model_key(model):
    logging.warning("schedule artifact %r was learned for model %r, not for this one (%r)", name, artifact.model,
                    model_key(model))
  if config.solver != artifact.solver:
    logging.warning("schedule artifact %r was learned for solver %r; sampling with %r", name, artifact.solver,
                    config.solver)
  return artifact


# ----------------------------------------------------------------------------------------------------
# The picture.


def image_grid(samples, rows, cols, pad=1):
  """A (rows (H + pad) + pad, cols (W + pad) + pad, C) mosaic of NHWC samples in [-1, 1], mapped to [0, 1]
  (clipped); tile k sits at row k // cols, column k % cols; empty tiles and the padding are PAD_VALUE."""
  n, h, w, c = samples.shape
  out = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad, c), PAD_VALUE, np.float32)
  tiles = np.clip((samples + 1.0) / 2.0, 0.0, 1.0)
  for k in range(min(n, rows * cols)):
    r, q = divmod(k, cols)
    out[pad + r * (h + pad): pad + r * (h + pad) + h, pad + q * (w + pad): pad + q * (w + pad) + w] = tiles[k]
  return out


def _title(config, model, nfe):
  guide = "" if config.class_label is None else (
      f", class {'all' if config.class_label == ALL_CLASSES else config.class_label}"
      f", guidance {1.0 if config.guidance is None else config.guidance:g}")
  return (f"{config.solver}, {config.grid} grid, {config.steps} steps (NFE {nfe}), final={config.final}{guide}; "
          f"model step {model.step}")


def plot(samples, labels, model, config, nfe):
  """PNG bytes: an image grid for image data, else a scatter (histogram in 1-D) over the training data."""
  import matplotlib
  matplotlib.use("Agg")
  from matplotlib import pyplot as plt

  if samples.ndim == 4:
    n = samples.shape[0]
    if config.class_label == ALL_CLASSES:
      rows, cols = model.num_classes, n // model.num_classes
    else:
      cols = math.ceil(math.sqrt(n))
      rows = math.ceil(n / cols)
    mosaic = image_grid(samples, rows, cols)
    if mosaic.shape[-1] == 1:
      mosaic = np.repeat(mosaic, 3, axis=-1)
    scale = max(1, math.ceil(400 / max(mosaic.shape[:2])))  # nearest-neighbour: at least ~400 px
    fig, ax = plt.subplots(figsize=(6.0, 6.0 * mosaic.shape[0] / mosaic.shape[1] + 0.4))
    ax.imshow(np.kron(mosaic, np.ones((scale, scale, 1), np.float32)), interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])
    if config.class_label == ALL_CLASSES:  # name the rows
      tile = (samples.shape[1] + 1) * scale
      ax.set_yticks([(r + 0.5) * tile for r in range(rows)], [str(r) for r in range(rows)], fontsize=7)
      ax.set_ylabel("class")
  else:
    flat = samples.reshape(samples.shape[0], -1)
    data = np.asarray(model.setup.dataset.x[:5000], np.float32).reshape(-1, flat.shape[1])
    fig, ax = plt.subplots(figsize=(6.0, 6.0))
    classes = sorted(set(labels.tolist()) - {-1})
    if flat.shape[1] == 1:
      ax.hist(data[:, 0], bins=60, density=True, color="lightgrey", label="training data")
      for c in classes or [-1]:
        ax.hist(flat[labels == c, 0], bins=60, density=True, histtype="step",
                label="samples" if c < 0 else f"class {c}")
    else:
      ax.scatter(data[:, 0], data[:, 1], s=2, color="lightgrey", label="training data")
      for c in classes or [-1]:
        sel = flat[labels == c]
        ax.scatter(sel[:, 0], sel[:, 1], s=6, label="samples" if c < 0 else f"class {c}")
      ax.set_aspect("equal", adjustable="datalim")
      if flat.shape[1] > 2:
        ax.set_xlabel("x[0]")
        ax.set_ylabel("x[1]")
    ax.legend(fontsize=7, markerscale=2)
  ax.set_title(_title(config, model, nfe), fontsize=7)
  fig.tight_layout()
  buf = io.BytesIO()
  fig.savefig(buf, format="png", dpi=100)
  plt.close(fig)
  return buf.getvalue()


def summary_line(result):
  """One JSON line of ``run``'s result without the arrays (what the absl main prints)."""
  return json.dumps({k: v for k, v in result.items() if k not in ("samples", "labels")})

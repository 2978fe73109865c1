"""Training a diffusion model into a workdir, resumable bit for bit: ``run(config, workdir)``.

The config is an ml_collections ConfigDict (presets: ``experiments/configs/*.py``; every key and its
default: ``default_config``). ``run`` writes into ``workdir``:

- ``config.json``: the resolved config. A restart with the same workdir must use the same config: any
  difference raises a ValueError naming the differing keys (use a new workdir for a new config).
- ``checkpoints/<step>/``: the TrainState (params, EMA params, optimiser state, step, PRNG key) every
  ``train.checkpoint_every`` steps, at the end, and on SIGTERM (the handler only sets a flag; the loop
  finishes its step, saves and returns, so the process exits 0). Saves are atomic
  (``models.checkpoints``); the newest ``train.keep_checkpoints`` are kept.
- ``params/<steps>/``: at the end, the final EMA params ({"ema_params": ...}; ``load_params``).
- ``metrics.jsonl``: one line per ``train.log_every`` steps (and one for the steps before a SIGTERM save)
  with step, loss and grad_norm (means over the ``window`` steps since the previous line), lr (of the
  last step), steps_per_sec (of the window, wall clock; the first window includes compilation).
  Lines are buffered and appended just before each checkpoint save, so they cover at most the steps
  of that checkpoint. On resume from step s, lines with step > s (written before a save that was
  killed) and a partial last line are dropped, atomically, so no step is ever logged twice; the
  recomputed steps then log the same losses.
- stderr: a progress line (step, loss, rate, ETA) per log line.

Determinism: step s trains on ``models.data.batch(dataset, s, batch_size, seed)`` (the data position is
the step) with the randomness fold_in(key, s) (``models.training``), so a run killed at any point and
restarted from its latest checkpoint ends with bit-identical parameters (on the same machine and
software, float32). A fresh workdir (no checkpoint yet, or only the leftovers of a killed first save)
starts from scratch; a checkpoint that cannot be read raises a ValueError naming its path.

Everything trains in float32, whatever ``jax_enable_x64`` says: x0, noise, times and the time labels are
float32, and schedule coefficients are computed from the float32 times (discrete schedule tables in
their own dtype) before being cast to float32. A run in a process with x64 enabled can therefore differ
in the last bits from one without: resume in the same setting.
"""
import dataclasses
import inspect
import json
import math
import os
import signal
import sys
import threading
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from experiments.convergence_lib import _json, _write_atomic

CHECKPOINTS = "checkpoints"
PARAMS = "params"
METRICS = "metrics.jsonl"
CONFIG = "config.json"


def default_config():
  """Every key ``run`` reads, with its default. Presets start from this and change what they need."""
  c = ml_collections.ConfigDict()
  c.seed = 0                        # model init, per-step randomness (fold_in) and the data order
  c.data = ml_collections.ConfigDict()
  c.data.name = "two_moons"         # a name of models.data
  c.data.options = ml_collections.ConfigDict()  # keyword options of models.data.load
  c.data.batch_size = 256
  c.model = ml_collections.ConfigDict()
  c.model.name = "mlp"              # "mlp" (models.mlp.MLP) or "unet" (models.unet.UNet)
  c.model.kwargs = ml_collections.ConfigDict()  # constructor fields; num_classes comes from the data
  c.diffusion = ml_collections.ConfigDict()
  c.diffusion.schedule = "vp_linear"            # a name of solvers.schedules.SCHEDULES
  c.diffusion.schedule_kwargs = ml_collections.ConfigDict()
  c.diffusion.prediction = "eps"                # eps, x0, v, score, velocity
  c.diffusion.time_label = "t999"               # a name of solvers.predictions.TIME_LABELS
  c.diffusion.t_sampling = "uniform"            # uniform or lognormal (EDM)
  c.diffusion.lognormal_mean = -1.2
  c.diffusion.lognormal_std = 1.2
  c.diffusion.conditional = False               # class-conditional on the dataset's labels
  c.diffusion.label_dropout = 0.0               # P(class -> null label) for classifier-free guidance
  c.optim = ml_collections.ConfigDict()
  c.optim.learning_rate = 1e-3
  c.optim.warmup_steps = 0
  c.optim.decay = "constant"                    # constant or cosine (to end_factor * lr at train.steps)
  c.optim.end_factor = 0.0
  c.optim.weight_decay = 0.0
  c.optim.b1 = 0.9
  c.optim.b2 = 0.999
  c.optim.eps = 1e-8
  c.optim.clip_norm = 1.0                       # 0: no clipping
  c.ema = ml_collections.ConfigDict()
  c.ema.decay = 0.999
  c.ema.warmup = True                           # min(decay, (1 + step) / (10 + step))
  c.train = ml_collections.ConfigDict()
  c.train.steps = 2000
  c.train.log_every = 50
  c.train.checkpoint_every = 500
  c.train.keep_checkpoints = 3
  return c


# ----------------------------------------------------------------------------------------------------
# Config.


def _plain(value):
  """A JSON-ready copy: ConfigDicts -> dicts, tuples -> lists."""
  if isinstance(value, (ml_collections.ConfigDict, ml_collections.FrozenConfigDict)):
    value = value.to_dict()
  return json.loads(json.dumps(value))


def _flat(d, prefix=""):
  out = {}
  for k, v in d.items():
    if isinstance(v, dict) and v:
      out.update(_flat(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v
  return out


def config_diff(a, b):
  """Dotted keys whose values differ between the nested dicts a and b (present in one only included)."""
  fa, fb = _flat(a), _flat(b)
  return sorted(k for k in set(fa) | set(fb) if fa.get(k, "<missing>") != fb.get(k, "<missing>"))


def _int(cfg, key, minimum):
  value = cfg
  for part in key.split("."):
    value = value[part]
  if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
    raise ValueError(f"config {key}={value!r} must be an integer >= {minimum}")
  return value


def resolve_config(config):
  """The config as a validated plain dict (ConfigDict or dict in); a bad value raises ValueError."""
  from solvers import predictions, schedules
  from models import training

  if config is None:
    config = default_config()
  cfg = _plain(config)
  missing = sorted(set(_flat(_plain(default_config()))) - set(_flat(cfg)) - {
      "data.options", "model.kwargs", "diffusion.schedule_kwargs"})
  if missing:
    raise ValueError(f"config lacks key(s) {', '.join(missing)}; start from train_lib.default_config()")
  free = ("data.options.", "model.kwargs.", "diffusion.schedule_kwargs.")  # checked against their owners below
  extra = sorted(k for k in set(_flat(cfg)) - set(_flat(_plain(default_config()))) if not k.startswith(free))
  if extra:
    raise ValueError(f"config has unknown key(s) {', '.join(extra)}; the keys are those of train_lib.default_config()")
  d, o, t = cfg["diffusion"], cfg["optim"], cfg["train"]
  if cfg["model"]["name"] not in _models():
    raise ValueError(f"model.name={cfg['model']['name']!r} is unknown; valid: {', '.join(_models())}")
  if d["schedule"] not in schedules.SCHEDULES:
    raise ValueError(f"diffusion.schedule={d['schedule']!r} is unknown; valid: {', '.join(sorted(schedules.SCHEDULES))}")
  predictions.check_kind(d["prediction"])
  if d["time_label"] not in predictions.TIME_LABELS:
    raise ValueError(f"diffusion.time_label={d['time_label']!r} is unknown; valid: {', '.join(predictions.TIME_LABELS)}")
  if d["t_sampling"] not in training.T_SAMPLINGS:
    raise ValueError(f"diffusion.t_sampling={d['t_sampling']!r} is unknown; valid: {', '.join(training.T_SAMPLINGS)}")
  if d["label_dropout"] and not d["conditional"]:
    raise ValueError(f"diffusion.label_dropout={d['label_dropout']} needs diffusion.conditional=True")
  if o["decay"] not in training.DECAYS:
    raise ValueError(f"optim.decay={o['decay']!r} is unknown; valid: {', '.join(training.DECAYS)}")
  cfg["data"]["options"] = _with_defaults(_data_options(cfg["data"]["name"]), cfg["data"]["options"],
                                         "data.options")
  cfg["model"]["kwargs"] = _with_defaults(_model_fields(cfg["model"]["name"]), cfg["model"]["kwargs"], "model.kwargs")
  cfg["diffusion"]["schedule_kwargs"] = _with_defaults(_signature_defaults(schedules.SCHEDULES[d["schedule"]]),
                                                       d["schedule_kwargs"], "diffusion.schedule_kwargs")
  _int(cfg, "seed", 0)
  _int(cfg, "data.batch_size", 1)
  _int(cfg, "optim.warmup_steps", 0)
  for key in ("train.steps", "train.log_every", "train.checkpoint_every", "train.keep_checkpoints"):
    _int(cfg, key, 1)
  if o["decay"] == "cosine" and t["steps"] <= o["warmup_steps"]:
    raise ValueError(f"optim.decay='cosine' needs train.steps={t['steps']} > optim.warmup_steps={o['warmup_steps']}")
  return cfg


def _with_defaults(defaults, given, where):
  """``given`` over ``defaults`` (so config.json lists every value used); unknown keys raise."""
  unknown = sorted(set(given) - set(defaults))
  if unknown:
    raise ValueError(f"{where}: unknown key(s) {', '.join(map(repr, unknown))}; valid: {', '.join(sorted(defaults))}")
  return _plain({**defaults, **given})


def _signature_defaults(fn):
  return {p.name: p.default for p in inspect.signature(fn).parameters.values()
          if p.default is not inspect.Parameter.empty}


def _data_options(name):
  from models import data
  return data.options(name)  # raises a ValueError listing the datasets for an unknown name


def _model_fields(name):
  # The module's constructor fields but num_classes (set from the data) and Flax's parent / name.
  return {f.name: f.default for f in dataclasses.fields(_models()[name])
          if f.name not in ("parent", "name", "num_classes") and f.default is not dataclasses.MISSING}


def _models():
  from models.mlp import MLP
  from models.unet import UNet
  return {"mlp": MLP, "unet": UNet}


def _check_saved_config(workdir, cfg):
  path = os.path.join(workdir, CONFIG)
  if not os.path.exists(path):
    _write_atomic(workdir, CONFIG, _json(cfg))
    return
  try:
    with open(path) as f:
      saved = json.load(f)
  except (OSError, ValueError) as e:
    raise ValueError(f"{path} cannot be read ({e}); fix or remove it, or use a new workdir") from None
  diff = config_diff(saved, cfg)
  if diff:
    raise ValueError(f"the config differs from the one this workdir was trained with ({path}) in: "
                     f"{', '.join(diff)}. Resume with the same config, or use a new --workdir")


# ----------------------------------------------------------------------------------------------------
# The pieces of a run.


class Setup:
  """Dataset, module, loss, optimiser, train step and a fresh state, built from a resolved config."""

  def __init__(self, cfg):
    from models import data, nets, training
    from solvers import schedules

    self.cfg = cfg
    d, o = cfg["diffusion"], cfg["optim"]
    self.dataset = data.load(cfg["data"]["name"], **cfg["data"]["options"])
    num_classes = int(self.dataset.num_classes or 0) if d["conditional"] else 0
    if d["conditional"] and num_classes < 1:
      raise ValueError(f"diffusion.conditional=True but dataset {cfg['data']['name']!r} has no classes")
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in cfg["model"]["kwargs"].items()}
    self.module = _models()[cfg["model"]["name"]](num_classes=num_classes, **kwargs)
    self.num_classes = num_classes
    self.schedule = schedules.get(d["schedule"], **d["schedule_kwargs"])
    self.loss = training.DiffusionLoss(
        apply_fn=nets.ModuleApply(self.module), schedule=self.schedule, prediction=d["prediction"],
        time_label=d["time_label"], num_classes=num_classes, label_dropout=float(d["label_dropout"]),
        t_sampling=d["t_sampling"], lognormal_mean=float(d["lognormal_mean"]),
        lognormal_std=float(d["lognormal_std"]))
    self.tx, self.lr_fn = training.make_optimizer(
        learning_rate=float(o["learning_rate"]), warmup_steps=o["warmup_steps"],
        total_steps=cfg["train"]["steps"], decay=o["decay"], end_factor=float(o["end_factor"]),
        weight_decay=float(o["weight_decay"]), b1=float(o["b1"]), b2=float(o["b2"]), eps=float(o["eps"]),
        clip_norm=float(o["clip_norm"]))
    self.train_step = training.make_train_step(self.loss, self.tx, self.lr_fn, float(cfg["ema"]["decay"]),
                                               bool(cfg["ema"]["warmup"]))
    if jax.device_count() > 1:  # data-parallel over every device: state replicated, batch sharded
      from models import sharding
      mesh = sharding.make_mesh()
      sharding.check_batch_size(cfg["data"]["batch_size"], mesh)
      self.train_step = sharding.make_sharded_train_step(self.train_step, mesh)

  def batch(self, step):
    """(x0 float32, labels int32 or None) of the 0-based step ``step``."""
    from models import data
    x, labels = data.batch(self.dataset, step, self.cfg["data"]["batch_size"], self.cfg["seed"])
    x = jnp.asarray(x, jnp.float32)
    return x, (jnp.asarray(labels, jnp.int32) if self.num_classes else None)

  def init_params(self):
    """The network's initial params from the config's seed (a batch of one zero example)."""
    key = jax.random.fold_in(jax.random.key(self.cfg["seed"]), 0)
    x = jnp.zeros((1,) + tuple(self.dataset.shape), jnp.float32)
    cond = jnp.zeros((1,), jnp.int32) if self.num_classes else None
    return self.module.init(key, x, jnp.zeros((1,), jnp.float32), cond)["params"]

  def _init_state(self):
    from models import training
    key = jax.random.fold_in(jax.random.key(self.cfg["seed"]), 1)
    return training.init_state(self.init_params(), self.tx, key)

  def init_state(self):
    """The state at step 0 (one compiled program: eager init would compile every op on its own)."""
    return jax.jit(self._init_state)()

  def abstract_state(self):
    """The shapes and dtypes of the step-0 train state (``jax.eval_shape``), for restoring a checkpoint."""
    return jax.eval_shape(self._init_state)


def _truncate_metrics(workdir, step):
  """Keeps the complete metrics lines with step <= ``step`` (rewritten atomically if anything goes)."""
  path = os.path.join(workdir, METRICS)
  if not os.path.exists(path):
    return
  with open(path) as f:
    raw = f.read()
  keep = []
  for line in raw.splitlines(keepends=True):
    try:
      if line.endswith("\n") and json.loads(line)["step"] <= step:
        keep.append(line)
    except (ValueError, KeyError, TypeError):
      pass
  if "".join(keep) != raw:
    _write_atomic(workdir, METRICS, "".join(keep))


def _append(workdir, lines):
  if not lines:
    return
  with open(os.path.join(workdir, METRICS), "a") as f:
    f.write("".join(lines))
    f.flush()
    os.fsync(f.fileno())


def _eta(seconds):
  if not math.isfinite(seconds):
    return "?"
  seconds = int(round(seconds))
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f"{h}h{m:02d}m{s:02d}s" if h else (f"{m}m{s:02d}s" if m else f"{s}s")


class _StopFlag:
  """Sets ``stop`` on SIGTERM while installed (only from the main thread; elsewhere a no-op)."""

  def __init__(self):
    self.stop = False
    self._old = None

  def _handle(self, signum, frame):
    self.stop = True

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      self._old = signal.signal(signal.SIGTERM, self._handle)
    return self

  def __exit__(self, *exc):
    if self._old is not None:
      signal.signal(signal.SIGTERM, self._old)


def _checkpoint_dir(workdir):
  """checkpoints/ if it holds a complete checkpoint; None for a fresh start. A checkpoint folder with
  other contents than checkpoints and leftovers of killed saves raises (it is not ours to ignore)."""
  from models import checkpoints
  path = os.path.join(workdir, CHECKPOINTS)
  if checkpoints.latest_step(path) is not None:
    return path
  if os.path.isdir(path):
    other = sorted(n for n in os.listdir(path) if not n.startswith((".tmp-", ".old-")))
    if other:
      raise ValueError(f"checkpoint folder {path} holds no complete checkpoint but has {other}: cannot resume "
                       "from it; remove it to start from scratch")
  return None


def run(config, workdir):
  """Trains per ``config`` in ``workdir`` (resuming from its latest checkpoint); see the module doc.

  Returns {"status": "done" | "preempted", "step", "start_step", "steps_per_sec" (of the steps after
  the first of this process, which includes compilation; None with fewer than 2), "workdir", "devices"}.
  With more than one device the step runs data-parallel over all of them (models.sharding: state
  replicated, batch sharded; the batch size must divide the device count).
  The SIGTERM handler is installed from the start of the call (when called from the main thread): a
  SIGTERM during setup lets one step run, saves and returns.
  """
  from models import checkpoints

  cfg = resolve_config(config)
  with _StopFlag() as flag:
    os.makedirs(workdir, exist_ok=True)
    _check_saved_config(workdir, cfg)
    setup = Setup(cfg)
    resume = _checkpoint_dir(workdir)
    state = checkpoints.restore(resume, setup.abstract_state()) if resume else setup.init_state()
    if int(state.step) > cfg["train"]["steps"]:
      raise ValueError(f"the checkpoint in {resume} is at step {int(state.step)}, beyond "
                       f"train.steps={cfg['train']['steps']}")
    _truncate_metrics(workdir, int(state.step))
    sys.stderr.write(f"{'resuming at' if resume else 'starting at'} step {int(state.step)}/{cfg['train']['steps']} "
                     f"in {workdir}\n")
    return _train(setup, state, workdir, flag)


def _train(setup, state, workdir, flag):
  from models import checkpoints

  train = setup.cfg["train"]
  total, log_every, ckpt_every = train["steps"], train["log_every"], train["checkpoint_every"]
  ckpt_path = os.path.join(workdir, CHECKPOINTS)
  start = step = int(state.step)
  pending, lines = [], []
  window_start = time.perf_counter()
  first_done = None  # (time, step) when this process's first step (with its compilation) had finished
  status = "done"
  while step < total:
    x, labels = setup.batch(step)
    state, metrics = setup.train_step(state, x, labels)
    step += 1
    pending.append(metrics)
    if first_done is None:
      jax.block_until_ready(state.step)
      first_done = (time.perf_counter(), step)
    stopping = flag.stop
    if step % log_every == 0 or step == total or stopping:
      values = jax.device_get(pending)
      now = time.perf_counter()
      rate = len(values) / max(now - window_start, 1e-9)
      line = {"step": step, "loss": float(np.mean([v["loss"] for v in values])),
              "grad_norm": float(np.mean([v["grad_norm"] for v in values])), "lr": float(values[-1]["lr"]),
              "steps_per_sec": rate, "window": len(values)}
      lines.append(json.dumps(line) + "\n")
      sys.stderr.write(f"step {step}/{total} loss {line['loss']:.4f} lr {line['lr']:.2e} {rate:.1f} steps/s "
                       f"ETA {_eta((total - step) / rate)}\n")
      sys.stderr.flush()
      pending, window_start = [], now
    if step % ckpt_every == 0 or step == total or stopping:
      _append(workdir, lines)  # before the save: a kill in between leaves lines that resume drops
      lines = []
      checkpoints.save(ckpt_path, state, step, keep=train["keep_checkpoints"])
    if stopping and step < total:
      status = "preempted"
      sys.stderr.write(f"SIGTERM: saved the checkpoint of step {step} in {ckpt_path}; exiting\n")
      break

  if status == "done":
    params_dir = os.path.join(workdir, PARAMS)
    if checkpoints.latest_step(params_dir) != total:
      checkpoints.save(params_dir, {"ema_params": state.ema_params}, total, keep=1)
  rate = None
  if first_done is not None and step > first_done[1]:
    rate = (step - first_done[1]) / (time.perf_counter() - first_done[0])
  return {"status": status, "step": step, "start_step": start, "steps_per_sec": rate, "workdir": workdir,
          "devices": jax.device_count()}


def load_config(workdir):
  """The resolved config saved in ``workdir``."""
  path = os.path.join(workdir, CONFIG)
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, ValueError) as e:
    raise ValueError(f"{path} cannot be read: {e}") from None


def restore_state(workdir, step=None):
  """(Setup, TrainState) of the latest (or ``step``) checkpoint of ``workdir``."""
  from models import checkpoints
  setup = Setup(resolve_config(load_config(workdir)))
  return setup, checkpoints.restore(os.path.join(workdir, CHECKPOINTS), setup.abstract_state(), step)


def load_params(workdir):
  """(Setup, final EMA params) of a finished run: pass them to ``models.nets.denoiser(setup.module,
  params, prediction=..., time_label=...)`` with the config's diffusion settings to sample."""
  from models import checkpoints
  setup = Setup(resolve_config(load_config(workdir)))
  target = {"ema_params": jax.eval_shape(setup.init_params)}
  return setup, checkpoints.restore(os.path.join(workdir, PARAMS), target)["ema_params"]

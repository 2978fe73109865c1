"""Training a denoiser: the denoising score-matching loss, the optimiser, EMA and a resumable train step.

The loss (``DiffusionLoss``), for every schedule of ``solvers.schedules`` and every prediction kind of
``solvers.predictions``:

1. t is drawn per example (``t_sampling``):
   - ``"uniform"`` (default): uniform on the schedule's ``[t_min, t_max]`` (Ho et al. 2020 draw the
     integer step uniformly; Song et al. 2021 draw continuous t uniformly). For a ``DiscreteVP`` the
     time is the integer training index, drawn uniformly from ``{0, ..., N - 1}``.
   - ``"lognormal"``: EDM's noise distribution (Karras et al. 2022, Table 1): ln rho ~ N(P_mean, P_std^2)
     with rho = sigma / alpha (= sigma for the EDM schedule) and defaults P_mean = -1.2, P_std = 1.2,
     mapped to t = schedule.t_of_rho(rho) and clipped to [t_min, t_max] (rounded for a DiscreteVP).
     Use it with the EDM schedule: uniform t on EDM's [0.002, 80] puts almost every example at noise
     levels far above the data scale.
2. x_t = alpha(t) x0 + sigma(t) eps, eps ~ N(0, I).
3. The network sees ``time_label(schedule, t)`` (``solvers.predictions.TIME_LABELS``), the same
   conversion the ``solvers.Denoiser`` applies when sampling, so training and sampling agree.
4. The target is ``solvers.predictions.from_x0_eps(prediction, x0, eps, ...)``: eps, x0, v = alpha eps -
   sigma x0 (Salimans & Ho 2022), score = -eps / sigma (Song et al. 2021), or the flow-matching velocity
   alpha'(t) x0 + sigma'(t) eps (Lipman et al. 2023; Liu et al. 2023: eps - x0 for the Flow schedule).
   The conventions live in that one function.
5. The loss is the plain (unweighted) mean squared error over batch and data dimensions, in float32.
   No weighting is applied: in eps units this is Ho et al.'s L_simple for ``eps``, and weights
   (alpha/sigma)^2 for ``x0``, alpha^2 for ``v``, 1/sigma^2 for ``score`` (which therefore blows up at
   small sigma; prefer eps) and (alpha' sigma / alpha - sigma')^2 for ``velocity``; EDM's lambda(sigma)
   and preconditioning belong in the network if wanted.

Classifier-free guidance training (Ho & Salimans 2022): with ``num_classes > 0`` each example's class is
replaced by the null label ``num_classes`` with probability ``label_dropout``.

``make_optimizer``: gradient clipping by global norm, then AdamW (Loshchilov & Hutter 2019) with a linear
warmup and an optional cosine decay (Loshchilov & Hutter 2017). ``TrainState`` holds step, params, EMA
params, optimiser state and the base PRNG key; ``make_train_step`` returns the jitted
``train_step(state, x0, labels) -> (state, metrics)``. The randomness of step s is
``fold_in(key, s)``: a restored state continues bit for bit.
"""
import dataclasses
import math
from typing import Any, Callable, Optional

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax

from solvers import schedules as schedules_lib
from solvers.predictions import _resolve_time_label, check_kind, from_x0_eps

T_SAMPLINGS = ("uniform", "lognormal")
DECAYS = ("constant", "cosine")


def _bcast(v, x):
  """A (B,) vector shaped to broadcast against x of shape (B, ...)."""
  return jnp.reshape(v, v.shape + (1,) * (x.ndim - 1))


@dataclasses.dataclass(frozen=True, eq=False)  # hashed by identity: jax.jit(loss) works with array leaves
class DiffusionLoss:
  """The denoising score-matching loss of a network ``apply_fn(params, x, label, cond)`` (see module doc).

  num_classes: None or 0 for an unconditional network (cond is None), else the number of classes; the
  null label is ``num_classes``. label_dropout: probability of replacing a class by the null label.
  """
  apply_fn: Callable
  schedule: Any
  prediction: str = "eps"
  time_label: Any = "t"
  num_classes: Optional[int] = None
  label_dropout: float = 0.0
  t_sampling: str = "uniform"
  lognormal_mean: float = -1.2
  lognormal_std: float = 1.2

  def __post_init__(self):
    check_kind(self.prediction)
    _resolve_time_label(self.time_label)
    if self.t_sampling not in T_SAMPLINGS:
      raise ValueError(f"t_sampling={self.t_sampling!r} is unknown; valid: {', '.join(T_SAMPLINGS)}")
    if not 0.0 <= self.label_dropout <= 1.0:
      raise ValueError(f"label_dropout={self.label_dropout!r} must lie in [0, 1]")
    if self.num_classes is not None and self.num_classes < 0:
      raise ValueError(f"num_classes={self.num_classes!r} must be >= 0 (0 or None: unconditional)")
    if self.label_dropout > 0 and not self.num_classes:
      raise ValueError(f"label_dropout={self.label_dropout} needs a class-conditional network (num_classes > 0)")
    if self.lognormal_std <= 0:
      raise ValueError(f"lognormal_std={self.lognormal_std!r} must be > 0")
    if not float(self.schedule.t_min) < float(self.schedule.t_max):
      raise ValueError(f"schedule interval [{self.schedule.t_min}, {self.schedule.t_max}] is empty")

  @property
  def conditional(self):
    """Whether the network takes class labels (num_classes > 0)."""
    return bool(self.num_classes)

  def _discrete(self):
    return isinstance(self.schedule, schedules_lib.DiscreteVP)

  def sample_t(self, key, n, dtype=jnp.float32):
    """n training times per ``t_sampling`` (integer-valued for a DiscreteVP), in ``dtype``."""
    lo, hi = float(self.schedule.t_min), float(self.schedule.t_max)
    if self.t_sampling == "uniform":
      if self._discrete():
        return jax.random.randint(key, (n,), 0, self.schedule.num_train_timesteps).astype(dtype)
      return jax.random.uniform(key, (n,), dtype, lo, hi)
    log_rho = self.lognormal_mean + self.lognormal_std * jax.random.normal(key, (n,), dtype)
    t = jnp.clip(self.schedule.t_of_rho(jnp.exp(log_rho)), lo, hi)
    if self._discrete():
      t = jnp.round(t)
    return t.astype(dtype)

  def coefficients(self, t, dtype):
    """(alpha, sigma, alpha', sigma') at t in ``dtype`` (the derivatives only for velocity, else None)."""
    alpha, sigma = self.schedule.alpha(t), self.schedule.sigma(t)
    if self.prediction == "velocity":
      dalpha, dsigma = self.schedule.derivatives(t)
      return tuple(jnp.asarray(c).astype(dtype) for c in (alpha, sigma, dalpha, dsigma))
    return jnp.asarray(alpha).astype(dtype), jnp.asarray(sigma).astype(dtype), None, None

  def noisy_and_target(self, x0, eps, t):
    """(x_t, target) for data x0, noise eps and times t of shape (B,)."""
    alpha, sigma, dalpha, dsigma = (None if c is None else _bcast(c, x0)
                                    for c in self.coefficients(t, x0.dtype))
    x_t = alpha * x0 + sigma * eps
    return x_t, from_x0_eps(self.prediction, x0, eps, alpha, sigma, dalpha, dsigma).astype(x0.dtype)

  def label(self, t):
    """The network's time label of t, as ``solvers.Denoiser`` computes it, in t's dtype."""
    return jnp.asarray(_resolve_time_label(self.time_label)(self.schedule, t)).astype(t.dtype)

  def conditioning(self, labels, key):
    """The cond the network sees: None (unconditional), or labels with dropout to the null label."""
    if not self.conditional:
      return None
    if labels is None:
      raise ValueError(f"a class-conditional loss (num_classes={self.num_classes}) needs labels")
    labels = jnp.asarray(labels).astype(jnp.int32)
    if self.label_dropout > 0:
      drop = jax.random.bernoulli(key, self.label_dropout, labels.shape)
      labels = jnp.where(drop, jnp.int32(self.num_classes), labels)
    return labels

  def __call__(self, params, x0, labels, key):
    """(loss, aux) on a batch x0 (B, ...) with class labels (B,) or None; aux has t and cond."""
    x0 = jnp.asarray(x0)
    if not jnp.issubdtype(x0.dtype, jnp.floating):
      raise ValueError(f"x0 has dtype {x0.dtype}; a floating dtype is required")
    k_t, k_eps, k_drop = jax.random.split(key, 3)
    n = x0.shape[0]
    t = self.sample_t(k_t, n, x0.dtype)
    eps = jax.random.normal(k_eps, x0.shape, x0.dtype)
    x_t, target = self.noisy_and_target(x0, eps, t)
    cond = self.conditioning(labels, k_drop)
    out = self.apply_fn(params, x_t, self.label(t), cond)
    if jnp.shape(out) != x0.shape:
      raise ValueError(f"network output shape {jnp.shape(out)} differs from the data shape {x0.shape}")
    err = jnp.asarray(out).astype(jnp.float32) - target.astype(jnp.float32)
    return jnp.mean(jnp.square(err)), {"t": t, "cond": cond}


# ----------------------------------------------------------------------------------------------------
# Optimiser.


def learning_rate_schedule(learning_rate, warmup_steps=0, total_steps=None, decay="constant",
                           end_factor=0.0):
  """lr(count) for the update with 0-based index ``count``, float32.

  Linear warmup: lr = peak (count + 1) / warmup_steps for count < warmup_steps (so the first update is
  not a no-op), then peak; with ``decay="cosine"`` a half-cosine from peak at count = warmup_steps to
  ``end_factor * peak`` at count = total_steps (Loshchilov & Hutter 2017), flat after that.
  """
  if decay not in DECAYS:
    raise ValueError(f"decay={decay!r} is unknown; valid: {', '.join(DECAYS)}")
  if learning_rate <= 0:
    raise ValueError(f"learning_rate={learning_rate!r} must be > 0")
  if warmup_steps < 0:
    raise ValueError(f"warmup_steps={warmup_steps!r} must be >= 0")
  if decay == "cosine" and (total_steps is None or total_steps <= warmup_steps):
    raise ValueError(f"cosine decay needs total_steps > warmup_steps, got total_steps={total_steps!r}, "
                     f"warmup_steps={warmup_steps}")
  if not 0.0 <= end_factor <= 1.0:
    raise ValueError(f"end_factor={end_factor!r} must lie in [0, 1]")
  peak, warmup = float(learning_rate), int(warmup_steps)

  def lr(count):
    count = jnp.asarray(count).astype(jnp.float32)
    factor = jnp.float32(1.0)
    if warmup > 0:
      factor = jnp.minimum((count + 1.0) / warmup, 1.0)
    if decay == "cosine":
      progress = jnp.clip((count - warmup) / float(total_steps - warmup), 0.0, 1.0)
      factor = factor * (end_factor + (1.0 - end_factor) * 0.5 * (1.0 + jnp.cos(math.pi * progress)))
    return (peak * factor).astype(jnp.float32)

  return lr


def decay_mask(params):
  """Weight decay only on leaves with ndim >= 2 (kernels, embeddings), not on biases and norm scales."""
  return jax.tree_util.tree_map(lambda p: jnp.ndim(p) >= 2, params)


def make_optimizer(learning_rate=1e-3, warmup_steps=0, total_steps=None, decay="constant", end_factor=0.0,
                   weight_decay=0.0, b1=0.9, b2=0.999, eps=1e-8, clip_norm=1.0):
  """(optax transformation, lr schedule): clip_by_global_norm(clip_norm) then AdamW with the schedule of
  ``learning_rate_schedule`` (weight decay masked by ``decay_mask``). clip_norm None or 0: no clipping."""
  if clip_norm is not None and clip_norm < 0:
    raise ValueError(f"clip_norm={clip_norm!r} must be >= 0 (0 or None: no clipping)")
  if weight_decay < 0:
    raise ValueError(f"weight_decay={weight_decay!r} must be >= 0")
  lr = learning_rate_schedule(learning_rate, warmup_steps, total_steps, decay, end_factor)
  adamw = optax.adamw(lr, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay, mask=decay_mask)
  tx = optax.chain(optax.clip_by_global_norm(clip_norm), adamw) if clip_norm else adamw
  return tx, lr


# ----------------------------------------------------------------------------------------------------
# EMA.


def ema_decay_at(step, decay, warmup=True):
  """The EMA decay of the update with 0-based index ``step``: ``decay``, or with warmup
  min(decay, (1 + step) / (10 + step)) as TensorFlow's ExponentialMovingAverage with num_updates (used by
  Song et al. 2021's score_sde), so early averages are not dominated by the initialisation."""
  decay = jnp.float32(decay)
  if not warmup:
    return decay
  step = jnp.asarray(step).astype(jnp.float32)
  return jnp.minimum(decay, (1.0 + step) / (10.0 + step))


def ema_update(ema, params, decay):
  """ema <- decay ema + (1 - decay) params, leaf by leaf, keeping each leaf's dtype."""
  return jax.tree_util.tree_map(
      lambda e, p: (decay * e + (1.0 - decay) * p).astype(e.dtype), ema, params)


# ----------------------------------------------------------------------------------------------------
# Train state and step.


@flax.struct.dataclass
class TrainState:
  """Everything a resumed run needs. ``key`` is the raw uint32 key data of the base PRNG key (a plain
  array, so it checkpoints like any leaf); step s uses fold_in(key, s). The data position is ``step``."""
  step: jnp.ndarray
  params: Any
  ema_params: Any
  opt_state: Any
  key: jnp.ndarray


def init_state(params, tx, key):
  """A fresh TrainState: step 0, EMA = params, tx's initial state, and ``key`` (a typed key, raw uint32
  key data, or an int seed) kept as raw key data."""
  if isinstance(key, (int, np.integer)):
    key = jax.random.key(int(key))
  elif not (isinstance(key, jax.Array) and jnp.issubdtype(key.dtype, jax.dtypes.prng_key)):
    key = jax.random.wrap_key_data(jnp.asarray(key, jnp.uint32))
  params = jax.tree_util.tree_map(jnp.asarray, params)
  return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                    ema_params=jax.tree_util.tree_map(jnp.array, params),
                    opt_state=tx.init(params), key=jax.random.key_data(key))


def step_key(state):
  """The PRNG key of the step ``state.step``: fold_in(base key, step)."""
  return jax.random.fold_in(jax.random.wrap_key_data(state.key), state.step)


def make_train_step(loss, tx, lr_fn=None, ema_decay=0.999, ema_warmup=True, jit=True):
  """The train step ``(state, x0, labels) -> (state, metrics)`` for ``loss`` (a DiffusionLoss) and the
  optax transformation ``tx``. metrics: loss, grad_norm (global norm before clipping) and lr (of this
  update, from ``lr_fn`` as returned by make_optimizer; omitted without one), all float32 scalars."""
  if not 0.0 <= ema_decay <= 1.0:
    raise ValueError(f"ema_decay={ema_decay!r} must lie in [0, 1]")

  def train_step(state, x0, labels=None):
    (value, _), grads = jax.value_and_grad(loss, has_aux=True)(state.params, x0, labels, step_key(state))
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    params = jax.tree_util.tree_map(lambda new, old: new.astype(old.dtype), params, state.params)
    ema = ema_update(state.ema_params, params, ema_decay_at(state.step, ema_decay, ema_warmup))
    metrics = {"loss": value.astype(jnp.float32),
               "grad_norm": optax.tree.norm(grads).astype(jnp.float32)}
    if lr_fn is not None:
      metrics["lr"] = lr_fn(state.step)
    new = state.replace(step=state.step + 1, params=params, ema_params=ema, opt_state=opt_state)
    return new, metrics

  return jax.jit(train_step) if jit else train_step


__all__ = ["DiffusionLoss", "T_SAMPLINGS", "DECAYS", "learning_rate_schedule", "make_optimizer", "decay_mask",
           "ema_decay_at", "ema_update", "TrainState", "init_state", "step_key", "make_train_step"]

"""What a network predicts, and the denoiser value that solvers call.

Prediction kinds, for x = alpha x0 + sigma eps (alpha, sigma of the schedule at t):
- ``eps``: the noise; ``x0``: the data; ``score``: grad log p_t(x) = -eps / sigma;
- ``v``: v = alpha eps - sigma x0 (Salimans & Ho 2022; for VP schedules alpha^2 + sigma^2 = 1);
- ``velocity``: the flow-matching velocity u = dx/dt = alpha'(t) x0 + sigma'(t) eps (Lipman et al. 2023;
  u = eps - x0 for the Flow schedule).
All are affine in (x0, eps) at fixed (x, t), so every conversion goes through that pair.

A ``Denoiser`` is a pytree: the network's apply function and the time-label convention are static, the
params (and an optional conditioning ``cond``) are leaves, so new weights never recompile. Wrappers
(``Guided`` for classifier-free guidance, ``Thresholded`` for dynamic thresholding) are denoisers too.
Solvers only ever call ``denoiser.predict(kind, x, t, schedule)``.
"""
from typing import Any, Callable

import jax.numpy as jnp

from solvers.pytree import pytree_dataclass, static_field

PREDICTION_KINDS = ("eps", "x0", "v", "score", "velocity")


def check_kind(kind):
  """Raises a ValueError unless ``kind`` is one of ``PREDICTION_KINDS``."""
  if kind not in PREDICTION_KINDS:
    raise ValueError(f"prediction kind {kind!r} is unknown; valid: {', '.join(PREDICTION_KINDS)}")


def _coefficients(schedule, t, needs_derivatives):
  alpha, sigma = schedule.alpha(t), schedule.sigma(t)
  dalpha, dsigma = schedule.derivatives(t) if needs_derivatives else (None, None)
  return alpha, sigma, dalpha, dsigma


def to_x0_eps(kind, out, x, alpha, sigma, dalpha=None, dsigma=None):
  """(x0, eps) implied by a prediction of ``kind``."""
  check_kind(kind)
  if kind == "eps":
    return (x - sigma * out) / alpha, out
  if kind == "x0":
    return out, (x - alpha * out) / sigma
  if kind == "score":
    eps = -sigma * out
    return (x - sigma * eps) / alpha, eps
  if kind == "v":
    norm = alpha**2 + sigma**2
    return (alpha * x - sigma * out) / norm, (sigma * x + alpha * out) / norm
  det = alpha * dsigma - sigma * dalpha  # velocity
  return (dsigma * x - sigma * out) / det, (alpha * out - dalpha * x) / det


def from_x0_eps(kind, x0, eps, alpha, sigma, dalpha=None, dsigma=None):
  """The prediction of ``kind`` that corresponds to the pair (x0, eps)."""
  check_kind(kind)
  if kind == "eps":
    return eps
  if kind == "x0":
    return x0
  if kind == "score":
    return -eps / sigma
  if kind == "v":
    return alpha * eps - sigma * x0
  return dalpha * x0 + dsigma * eps


def convert(out, src, dst, x, t, schedule):
  """Converts a ``src`` prediction at (x, t) into a ``dst`` prediction."""
  check_kind(src)
  check_kind(dst)
  if src == dst:
    return out
  coeffs = _coefficients(schedule, t, "velocity" in (src, dst))
  if src == "x0" and dst == "eps" or src == "eps" and dst == "x0":
    # The direct form, one operation fewer than through the pair.
    return to_x0_eps(src, out, x, *coeffs)[1 if dst == "eps" else 0]
  x0, eps = to_x0_eps(src, out, x, *coeffs)
  return from_x0_eps(dst, x0, eps, *coeffs)


def _label_t(schedule, t):
  return t


def _label_t999(schedule, t):
  return 999.0 * t


def _label_t1000(schedule, t):
  return 1000.0 * t


def _label_rho(schedule, t):
  return schedule.rho(t)


def _label_edm_c_noise(schedule, t):
  return 0.25 * jnp.log(schedule.rho(t))


def _label_lambda(schedule, t):
  return schedule.lam(t)


TIME_LABELS = {
    "t": _label_t,                      # the schedule's own time (the integer index of a DiscreteVP)
    "t999": _label_t999,                # 999 t: score_sde DDPM++ models on continuous t in [0, 1]
    "t1000": _label_t1000,
    "rho": _label_rho,                  # sigma / alpha: k-diffusion / EDM-conditioned networks
    "edm_c_noise": _label_edm_c_noise,  # log(rho) / 4 (Karras et al. 2022, Table 1)
    "lambda": _label_lambda,            # half log-SNR
}


def _resolve_time_label(time_label):
  if callable(time_label):
    return time_label
  if time_label not in TIME_LABELS:
    raise ValueError(f"time_label {time_label!r} is unknown; valid: {', '.join(TIME_LABELS)} or a callable"
                     " (schedule, t) -> label")
  return TIME_LABELS[time_label]


@pytree_dataclass
class Denoiser:
  """A network as a value: ``apply_fn(params, x, label, cond)`` returns a ``prediction`` of x's shape.

  ``label`` is ``time_label(schedule, t)`` (a scalar; the network broadcasts it over the batch), so the
  convention a network was trained with (t, 999 t, an index, sigma, ...) lives here and nowhere else.
  """
  apply_fn: Callable = static_field()
  params: Any = None
  prediction: str = static_field(default="eps")
  time_label: Any = static_field(default="t")
  cond: Any = None

  def __post_init__(self):
    check_kind(self.prediction)
    _resolve_time_label(self.time_label)

  def raw(self, x, t, schedule):
    """The network's own output at (x, t), with its shape checked against x."""
    label = _resolve_time_label(self.time_label)(schedule, t)
    out = self.apply_fn(self.params, x, label, self.cond)
    if jnp.shape(out) != jnp.shape(x):
      raise ValueError(f"denoiser output shape {jnp.shape(out)} differs from the sample shape {jnp.shape(x)}")
    return out

  def predict(self, kind, x, t, schedule):
    """The prediction of ``kind`` at (x, t), in x's dtype."""
    return convert(self.raw(x, t, schedule), self.prediction, kind, x, t, schedule).astype(x.dtype)


@pytree_dataclass
class Guided:
  """Classifier-free guidance (Ho & Salimans 2022): out_u + scale (out_c - out_u), in the inner kind.

  Every prediction kind is affine in the output at fixed (x, t) with weights summing to one, so guiding
  in eps, x0, v or velocity gives the same result. The two network passes count as one NFE.
  ``scale`` is a leaf: new scales never recompile.
  """
  inner: Denoiser
  cond: Any
  uncond: Any
  scale: Any = 1.0

  def __post_init__(self):
    if not isinstance(self.inner, Denoiser):
      raise ValueError(f"Guided wraps a Denoiser (it sets its cond), got {type(self.inner).__name__}; to threshold "
                       "a guided model, wrap the other way round: Thresholded(inner=Guided(...))")

  def predict(self, kind, x, t, schedule):
    """The guided prediction of ``kind`` at (x, t): both network passes, combined in the network's own kind."""
    out_c = self.inner.replace(cond=self.cond).raw(x, t, schedule)
    out_u = self.inner.replace(cond=self.uncond).raw(x, t, schedule)
    out = out_u + self.scale * (out_c - out_u)
    return convert(out, self.inner.prediction, kind, x, t, schedule).astype(x.dtype)


THRESHOLD_SEMANTICS = ("imagen", "diffusers")


def dynamic_threshold(x0, ratio=0.995, max_val=1.0, semantics="imagen", batch_ndim=1):
  """Dynamic thresholding of a data prediction (Saharia et al. 2022, Imagen; DPM-Solver++ Sec. 5).

  s is the ``ratio`` quantile of |x0| over each sample (all axes after the first ``batch_ndim``).
  - ``imagen`` (Imagen, official DPM-Solver / UniPC): s <- max(s, max_val), so max_val is a FLOOR;
    x0 <- clip(x0, -s, s) / s.
  - ``diffusers`` (``_threshold_sample``, diffusers PR #3003): s <- clip(s, 1, max_val), so max_val
    (``sample_max_value``) is a CEILING; with its default 1.0, s = 1 and this is plain clipping to [-1, 1].
  """
  if semantics not in THRESHOLD_SEMANTICS:
    raise ValueError(f"semantics={semantics!r} is unknown; valid: {', '.join(THRESHOLD_SEMANTICS)}")
  axes = tuple(range(batch_ndim, x0.ndim))
  s = jnp.quantile(jnp.abs(x0), ratio, axis=axes, keepdims=True)
  s = jnp.maximum(s, max_val) if semantics == "imagen" else jnp.clip(s, 1.0, max_val)
  return (jnp.clip(x0, -s, s) / s).astype(x0.dtype)


@pytree_dataclass
class Thresholded:
  """A denoiser whose data prediction is dynamically thresholded (see ``dynamic_threshold``)."""
  inner: Any
  ratio: float = 0.995
  max_val: float = 1.0
  semantics: str = static_field(default="imagen")
  batch_ndim: int = static_field(default=1)

  def __post_init__(self):
    # Validate at construction (as Denoiser does), not at the first call inside a traced solver.
    if self.semantics not in THRESHOLD_SEMANTICS:
      raise ValueError(f"semantics={self.semantics!r} is unknown; valid: {', '.join(THRESHOLD_SEMANTICS)}")

  def predict(self, kind, x, t, schedule):
    """The inner model's x0 at (x, t), thresholded, then converted to ``kind``."""
    x0 = dynamic_threshold(self.inner.predict("x0", x, t, schedule), self.ratio, self.max_val,
                           self.semantics, self.batch_ndim)
    return convert(x0, "x0", kind, x, t, schedule).astype(x.dtype)

"""Noise schedules x_t = alpha(t) x_0 + sigma(t) eps, log-SNR native.

Every schedule is a pytree exposing ``log_alpha(t)``, ``log_sigma(t)``, the half log-SNR
``lam(t) = log(alpha / sigma)`` and its inverse ``t_of_lambda(lam)``, plus the interval ``[t_min, t_max]``
on which grids may live. Sampling runs from ``t_max`` (noise) to ``t_min`` (data), i.e. lambda increases.
``alpha_sigma_of_lambda(lam)`` gives the marginal coefficients at a noise level, including lam = +inf
(sigma = 0, alpha = 1 for every schedule here), which is where a final denoising step lands.

Conventions follow Song et al. 2021 (score_sde) and Lu et al. 2022 (DPM-Solver, Sec. 2 and App. D);
EDM is Karras et al. 2022 (alpha = 1, sigma = t); flow matching / rectified flow is Lipman et al. 2023,
Liu et al. 2023 (alpha = 1 - t, sigma = t). Tables of discrete schedules are kept in float64 when
``jax_enable_x64`` is on and float32 otherwise, whatever dtype the model runs in.
"""
import math

import jax
import jax.numpy as jnp
import numpy as np

from solvers.pytree import pytree_dataclass, static_field


def table_dtype():
  """The widest float dtype available: schedule tables and grids are computed in it."""
  return jnp.float64 if jax.config.jax_enable_x64 else jnp.float32


def _vp_log_sigma(log_alpha):
  # sigma = sqrt(1 - alpha^2), computed without cancellation near alpha = 1.
  return 0.5 * jnp.log(-jnp.expm1(2.0 * log_alpha))


def _vp_alpha_sigma(lam):
  # alpha^2 = sigmoid(2 lam), sigma^2 = sigmoid(-2 lam); exact at lam = +-inf.
  return jnp.sqrt(jax.nn.sigmoid(2.0 * lam)), jnp.sqrt(jax.nn.sigmoid(-2.0 * lam))


def _vp_log_alpha_of_lambda(lam):
  return -0.5 * jax.nn.softplus(-2.0 * lam)


class Schedule:
  """Shared methods; subclasses define log_alpha, log_sigma, t_of_lambda and alpha_sigma_of_lambda."""

  t_min: float
  t_max: float
  zero_sigma_t = None  # the time at which sigma = 0, where one exists

  def alpha(self, t):
    """alpha(t), the data coefficient of x_t = alpha x0 + sigma eps."""
    return jnp.exp(self.log_alpha(t))

  def sigma(self, t):
    """sigma(t), the noise coefficient of x_t = alpha x0 + sigma eps."""
    return jnp.exp(self.log_sigma(t))

  def lam(self, t):
    """Half log-SNR lambda(t) = log alpha(t) - log sigma(t)."""
    return self.log_alpha(t) - self.log_sigma(t)

  def rho(self, t):
    """sigma / alpha = exp(-lambda): the EDM / k-diffusion 'sigma' of a VP model."""
    return jnp.exp(-self.lam(t))

  def t_of_rho(self, rho):
    """The time whose rho = sigma / alpha is ``rho``: t(lambda = -log rho)."""
    return self.t_of_lambda(-jnp.log(rho))

  def derivatives(self, t):
    """(d alpha / dt, d sigma / dt) at t, by forward-mode autodiff."""
    t = jnp.asarray(t, table_dtype())
    one = jnp.ones_like(t)
    _, dalpha = jax.jvp(self.alpha, (t,), (one,))
    _, dsigma = jax.jvp(self.sigma, (t,), (one,))
    return dalpha, dsigma


@pytree_dataclass
class VPLinear(Schedule):
  """Continuous VP with linear beta(t) = beta_min + t (beta_max - beta_min), t in (0, 1].

  log alpha(t) = -(beta_max - beta_min) t^2 / 4 - beta_min t / 2 (Song et al. 2021, Eq. 33; DPM-Solver App. D).
  """
  beta_min: float = 0.1
  beta_max: float = 20.0
  t_min: float = static_field(default=1e-3)
  t_max: float = static_field(default=1.0)
  zero_sigma_t = 0.0

  def log_alpha(self, t):
    """-(beta_max - beta_min) t^2 / 4 - beta_min t / 2."""
    return -0.25 * (self.beta_max - self.beta_min) * t**2 - 0.5 * self.beta_min * t

  def log_sigma(self, t):
    """log sqrt(1 - alpha^2), without cancellation near alpha = 1."""
    return _vp_log_sigma(self.log_alpha(t))

  def t_of_lambda(self, lam):
    """The inverse of lambda(t) in closed form (DPM-Solver App. D): with L = log(1 + e^{-2 lambda}),
    t = 2 L / (sqrt(beta_min^2 + 2 (beta_max - beta_min) L) + beta_min)."""
    big_l = jax.nn.softplus(-2.0 * lam)  # = -2 log alpha
    b0, db = self.beta_min, self.beta_max - self.beta_min
    return 2.0 * big_l / (jnp.sqrt(b0**2 + 2.0 * db * big_l) + b0)

  def alpha_sigma_of_lambda(self, lam):
    """(alpha, sigma) at half log-SNR lam: sqrt(sigmoid(2 lam)), sqrt(sigmoid(-2 lam)); exact at +-inf."""
    return _vp_alpha_sigma(lam)


@pytree_dataclass
class VPCosine(Schedule):
  """Continuous cosine VP schedule (Nichol & Dhariwal 2021), as DPM-Solver's NoiseScheduleVP('cosine').

  log alpha(t) = log cos((t + s) / (1 + s) pi / 2) - log cos(s / (1 + s) pi / 2), s = 0.008, t <= 0.9946.
  """
  s: float = static_field(default=0.008)
  t_min: float = static_field(default=1e-3)
  t_max: float = static_field(default=0.9946)
  zero_sigma_t = 0.0

  def _log_alpha_0(self):
    return math.log(math.cos(self.s / (1.0 + self.s) * math.pi / 2.0))

  def log_alpha(self, t):
    """log cos((t + s) / (1 + s) pi / 2) - log cos(s / (1 + s) pi / 2)."""
    return jnp.log(jnp.cos((t + self.s) / (1.0 + self.s) * math.pi / 2.0)) - self._log_alpha_0()

  def log_sigma(self, t):
    """log sqrt(1 - alpha^2), without cancellation near alpha = 1."""
    return _vp_log_sigma(self.log_alpha(t))

  def t_of_lambda(self, lam):
    """The inverse of lambda(t): log alpha = -log(1 + e^{-2 lambda}) / 2, then the arccos of the cosine law."""
    log_alpha = _vp_log_alpha_of_lambda(lam)
    return 2.0 * (1.0 + self.s) / math.pi * jnp.arccos(jnp.exp(log_alpha + self._log_alpha_0())) - self.s

  def alpha_sigma_of_lambda(self, lam):
    """(alpha, sigma) at half log-SNR lam: sqrt(sigmoid(2 lam)), sqrt(sigmoid(-2 lam)); exact at +-inf."""
    return _vp_alpha_sigma(lam)


BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")


def make_betas(beta_schedule="linear", num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02):
  """DDPM / diffusers beta tables in float64 (Ho et al. 2020; Rombach et al. 2022; Nichol & Dhariwal 2021)."""
  n = int(num_train_timesteps)
  if n < 2:
    raise ValueError(f"num_train_timesteps={num_train_timesteps!r}: need at least 2")
  if beta_schedule == "linear":
    return np.linspace(beta_start, beta_end, n, dtype=np.float64)
  if beta_schedule == "scaled_linear":
    return np.linspace(beta_start**0.5, beta_end**0.5, n, dtype=np.float64) ** 2
  if beta_schedule == "squaredcos_cap_v2":
    def alpha_bar(u):
      return np.cos((u + 0.008) / 1.008 * np.pi / 2) ** 2
    u = np.arange(n, dtype=np.float64) / n
    return np.minimum(1.0 - alpha_bar(u + 1.0 / n) / alpha_bar(u), 0.999)
  raise ValueError(f"beta_schedule={beta_schedule!r} is unknown; valid: {', '.join(BETA_SCHEDULES)}")


INTERPOLATIONS = ("log_snr", "log_alpha")


@pytree_dataclass
class DiscreteVP(Schedule):
  """Discrete VP schedule of a DDPM-style model trained on integer steps n = 0..N-1.

  Time is the training index t in [0, N-1] (as DDPM and diffusers), so a network's time label is t itself.
  Between integer indices the schedule is interpolated piecewise linearly:
  - ``interpolation='log_snr'`` (default): lambda(t) linear in t. This is what diffusers' ``_sigma_to_t``
    does (log sigma linear in the index), so fractional times match its Karras / custom-sigma grids.
  - ``interpolation='log_alpha'``: log alpha(t) linear in t, as DPM-Solver's NoiseScheduleVP('discrete').
  Both agree at integers. DPM-Solver's continuous time is t_dpm = (n + 1) / N (``to_dpm_time``), so its
  interval [1/N, 1] is our [0, N-1]. The table is kept as lambda at the integers (``lam_table``).
  """
  lam_table: jnp.ndarray
  interpolation: str = static_field(default="log_snr")

  def __post_init__(self):
    if self.interpolation not in INTERPOLATIONS:
      raise ValueError(f"interpolation={self.interpolation!r} is unknown; valid: {', '.join(INTERPOLATIONS)}")

  @classmethod
  def from_alphas_cumprod(cls, alphas_cumprod, interpolation="log_snr"):
    """The schedule of a table alpha_bar_n = alpha_n^2 (diffusers' ``alphas_cumprod``), strictly decreasing in (0, 1)."""
    ac = np.asarray(alphas_cumprod, dtype=np.float64)
    if ac.ndim != 1 or ac.size < 2:
      raise ValueError(f"alphas_cumprod must be 1-D with at least 2 entries, got shape {ac.shape}")
    if not (np.all(ac > 0) and np.all(ac < 1) and np.all(np.diff(ac) < 0)):
      raise ValueError("alphas_cumprod must lie in (0, 1) and decrease strictly")
    lam = 0.5 * (np.log(ac) - np.log1p(-ac))
    return cls(lam_table=jnp.asarray(lam, table_dtype()), interpolation=interpolation)

  @classmethod
  def from_betas(cls, betas, interpolation="log_snr"):
    """The schedule of DDPM betas in (0, 1): alpha_bar_n = prod_{k <= n} (1 - beta_k) (Ho et al. 2020, Eq. 4)."""
    betas = np.asarray(betas, dtype=np.float64)
    if np.any(betas <= 0) or np.any(betas >= 1):
      raise ValueError("betas must lie in (0, 1)")
    return cls.from_alphas_cumprod(np.exp(np.cumsum(np.log1p(-betas))), interpolation)

  @classmethod
  def named(cls, beta_schedule="linear", num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02,
            interpolation="log_snr"):
    """diffusers-style construction: ``DiscreteVP.named('scaled_linear', 1000, 0.00085, 0.012)`` is SD's."""
    return cls.from_betas(make_betas(beta_schedule, num_train_timesteps, beta_start, beta_end), interpolation)

  @property
  def num_train_timesteps(self):
    """N, the length of the table (training steps 0..N-1)."""
    return self.lam_table.shape[0]

  @property
  def t_min(self):
    """0, the first training index."""
    return 0.0

  @property
  def t_max(self):
    """N - 1, the last training index."""
    return float(self.num_train_timesteps - 1)

  @property
  def alphas_cumprod(self):
    """alpha_bar at the integers, sigmoid(2 lambda) (diffusers' ``alphas_cumprod``)."""
    return jax.nn.sigmoid(2.0 * self.lam_table)

  def _index(self):
    return jnp.arange(self.num_train_timesteps, dtype=self.lam_table.dtype)

  def lam(self, t):
    """lambda(t), piecewise linear in t (``log_snr``) or through log alpha linear in t (``log_alpha``)."""
    if self.interpolation == "log_snr":
      return jnp.interp(t, self._index(), self.lam_table)
    log_alpha = jnp.interp(t, self._index(), _vp_log_alpha_of_lambda(self.lam_table))
    return log_alpha - _vp_log_sigma(log_alpha)

  def log_alpha(self, t):
    """log alpha = -log(1 + e^{-2 lambda(t)}) / 2."""
    return _vp_log_alpha_of_lambda(self.lam(t))

  def log_sigma(self, t):
    """log sigma = -log(1 + e^{2 lambda(t)}) / 2."""
    return -0.5 * jax.nn.softplus(2.0 * self.lam(t))

  def t_of_lambda(self, lam):
    """The inverse of ``lam``: interpolation of the table (constant beyond its ends)."""
    # lambda (and log alpha) decrease with the index: interpolate on the reversed tables.
    index = self._index()[::-1]
    if self.interpolation == "log_snr":
      return jnp.interp(lam, self.lam_table[::-1], index)
    table = _vp_log_alpha_of_lambda(self.lam_table)[::-1]
    return jnp.interp(_vp_log_alpha_of_lambda(lam), table, index)

  def alpha_sigma_of_lambda(self, lam):
    """(alpha, sigma) at half log-SNR lam: sqrt(sigmoid(2 lam)), sqrt(sigmoid(-2 lam)); exact at +-inf."""
    return _vp_alpha_sigma(lam)

  def to_dpm_time(self, t):
    """Our index t -> DPM-Solver's continuous time (t + 1) / N."""
    return (t + 1.0) / self.num_train_timesteps

  def from_dpm_time(self, t_dpm):
    """DPM-Solver's continuous time t_dpm -> our index N t_dpm - 1 (the inverse of ``to_dpm_time``)."""
    return t_dpm * self.num_train_timesteps - 1.0


@pytree_dataclass
class VE(Schedule):
  """Variance-exploding: alpha = 1, sigma(t) = sigma_min (sigma_max / sigma_min)^t (Song et al. 2021, Eq. 31)."""
  sigma_min: float = 0.01
  sigma_max: float = 50.0
  t_min: float = static_field(default=1e-5)
  t_max: float = static_field(default=1.0)

  def log_alpha(self, t):
    """0 (alpha = 1)."""
    return jnp.zeros_like(jnp.asarray(t, table_dtype()))

  def log_sigma(self, t):
    """log sigma_min + t log(sigma_max / sigma_min)."""
    return jnp.log(self.sigma_min) + t * (jnp.log(self.sigma_max) - jnp.log(self.sigma_min))

  def t_of_lambda(self, lam):
    """(log sigma - log sigma_min) / log(sigma_max / sigma_min) with sigma = e^{-lambda}."""
    return (-lam - jnp.log(self.sigma_min)) / (jnp.log(self.sigma_max) - jnp.log(self.sigma_min))

  def alpha_sigma_of_lambda(self, lam):
    """(1, e^{-lam})."""
    return jnp.ones_like(lam), jnp.exp(-lam)


@pytree_dataclass
class EDM(Schedule):
  """EDM (Karras et al. 2022): alpha = 1, sigma = t, t in [sigma_min, sigma_max] = [0.002, 80]."""
  t_min: float = static_field(default=0.002)
  t_max: float = static_field(default=80.0)
  zero_sigma_t = 0.0

  def log_alpha(self, t):
    """0 (alpha = 1)."""
    return jnp.zeros_like(jnp.asarray(t, table_dtype()))

  def log_sigma(self, t):
    """log t (sigma = t)."""
    return jnp.log(t)

  def t_of_lambda(self, lam):
    """e^{-lambda} (t = sigma)."""
    return jnp.exp(-lam)

  def alpha_sigma_of_lambda(self, lam):
    """(1, e^{-lam})."""
    return jnp.ones_like(lam), jnp.exp(-lam)


@pytree_dataclass
class Flow(Schedule):
  """Flow matching / rectified flow: alpha = 1 - t, sigma = t, t in [t_min, t_max] within [0, 1].

  At t = 1 (pure noise) lambda = -inf: solvers in data form handle it; noise-form updates need t_max < 1.
  """
  t_min: float = static_field(default=1e-3)
  t_max: float = static_field(default=1.0)
  zero_sigma_t = 0.0

  def alpha(self, t):
    """1 - t."""
    return 1.0 - t  # direct, so that derivatives stay finite at t = 1

  def sigma(self, t):
    """t."""
    return t

  def log_alpha(self, t):
    """log(1 - t)."""
    return jnp.log1p(-t)

  def log_sigma(self, t):
    """log t."""
    return jnp.log(t)

  def t_of_lambda(self, lam):
    """sigmoid(-lambda), the inverse of lambda = log((1 - t) / t)."""
    return jax.nn.sigmoid(-lam)

  def alpha_sigma_of_lambda(self, lam):
    """(sigmoid(lam), sigmoid(-lam)); (1, 0) at lam = +inf."""
    return jax.nn.sigmoid(lam), jax.nn.sigmoid(-lam)


SCHEDULES = {
    "vp_linear": VPLinear,
    "vp_cosine": VPCosine,
    "discrete_vp": DiscreteVP.named,
    "ve": VE,
    "edm": EDM,
    "flow": Flow,
}


def get(name, **kwargs):
  """Builds a schedule by name; an unknown name raises a ValueError listing the valid ones."""
  if name not in SCHEDULES:
    raise ValueError(f"schedule {name!r} is unknown; valid: {', '.join(sorted(SCHEDULES))}")
  return SCHEDULES[name](**kwargs)

"""DDIM (Song, Meng & Ermon 2021), the first-order exponential integrator (Lu et al. 2022, Eq. 3.7).

From node s to node t with h = lambda_t - lambda_s and eta in [0, 1] (eta = 0: deterministic DDIM;
eta = 1: DDPM ancestral sampling), sigma_eta = eta sigma_t sqrt(1 - e^{-2h}) (DDIM Eq. 16, written for
any alpha, sigma) and
  x_t = alpha_t x0 + sqrt(sigma_t^2 - sigma_eta^2) eps + sigma_eta z.
``form='x0'`` evaluates x0 = D(x_s) and writes it as the data-prediction exponential integrator
  x_t = (sigma_t / sigma_s) c x_s - alpha_t expm1(-h + log c) x0 + sigma_eta z,  c = sqrt(1 - eta^2 (1 - e^{-2h}));
``form='eps'`` evaluates eps and writes it as the noise-prediction exponential integrator
  x_t = (alpha_t / alpha_s) x_s - sigma_t (expm1(h) - expm1(log c)) eps + sigma_eta z.
The two are the same map in exact arithmetic. The x0 form is exact at both ends (alpha_s = 0 at the
start of a flow model, sigma_t = 0 at a final denoising step); the eps form needs alpha_s > 0.
"""
import dataclasses

import jax.numpy as jnp

from solvers import base

FORMS = ("x0", "eps")


@dataclasses.dataclass(frozen=True)
class DDIM(base.Solver):
  """DDIM (Song et al. 2021, Eq. 12; eta of Eq. 16), first order: ``form`` 'x0' or 'eps', ``eta`` in [0, 1]."""
  form: str = "x0"
  eta: float = 0.0
  order = 1

  def __post_init__(self):
    if self.form not in FORMS:
      raise ValueError(f"form={self.form!r} is unknown; valid: {', '.join(FORMS)}")
    if not 0.0 <= self.eta <= 1.0:
      raise ValueError(f"eta={self.eta!r} must lie in [0, 1]")

  @property
  def stochastic(self):
    """Whether eta > 0 (then ``sample`` needs a key)."""
    return self.eta > 0

  def coefficients(self, grid, schedule):
    """Per step: the weights of x_s ('x'), of the model output ('m') and of the noise ('z'), module docstring."""
    a_s, a_t = grid.alpha[:-1], grid.alpha[1:]
    s_s, s_t = grid.sigma[:-1], grid.sigma[1:]
    h = grid.lam[1:] - grid.lam[:-1]
    # log c = log sqrt(1 - eta^2 (1 - e^{-2h})), without cancellation.
    log_c = 0.5 * jnp.log1p(self.eta**2 * jnp.expm1(-2.0 * h))
    noise = self.eta * s_t * jnp.sqrt(-jnp.expm1(-2.0 * h))
    if self.form == "x0":
      return {"x": s_t / s_s * jnp.exp(log_c), "m": -a_t * jnp.expm1(-h + log_c), "z": noise}
    # sigma_t (e^h - c): at sigma_t = 0 (h = inf) use the finite limit alpha_t sigma_s / alpha_s.
    finite = s_t > 0
    safe_h = jnp.where(finite, h, 0.0)
    m = jnp.where(finite, -s_t * (jnp.expm1(safe_h) - jnp.expm1(log_c)), -a_t * s_s / a_s)
    return {"x": a_t / a_s, "m": m, "z": noise}

  def step(self, denoiser, schedule, grid, coeffs, i, state):
    """One DDIM step from node i to i + 1: x' = c_x x + c_m m(x, t_i) (+ c_z z when eta > 0); one model call."""
    c = base.cast_coefficients(coeffs, state.x)
    m = denoiser.predict(self.form, state.x, grid.t[i], schedule)
    x = c["x"] * state.x + c["m"] * m
    if self.stochastic:
      x = x + c["z"] * base.noise(state.key, x, i)
    return state._replace(x=x.astype(state.x.dtype), nfe=state.nfe + 1)


base.register("ddim", DDIM)
base.register("ddim_eps", lambda: DDIM(form="eps"))

"""Euler-Maruyama on the reverse-time diffusion SDE (Song et al. 2021, "Score-Based Generative Modeling through
Stochastic Differential Equations", Eq. 6; the score_sde ``EulerMaruyamaPredictor``).

The forward process x_t = alpha_t x0 + sigma_t eps of any schedule is the SDE dx = f(t) x dt + g(t) dW with
  f = d log alpha / dt,   g^2 = d sigma^2 / dt - 2 f sigma^2 = 2 sigma^2 d(log sigma - log alpha) / dt
(Kingma et al. 2021, "Variational Diffusion Models", Eq. 29 / Lu et al. 2022, Eq. 2.2), and its reverse
(Song et al. 2021, Eq. 6) is dx = [f x - g^2 score] dt + g dW-bar. One step from node s back to node t < s,
dt = s - t > 0, with the coefficients and the model at s and score = -eps / sigma_s (the prediction layer):
  x_t = (1 - f_s dt) x_s - (g_s^2 dt / sigma_s) eps(x_s) + g_s sqrt(dt) z.
A step into sigma = 0 (``final='zero'``) is the denoising jump x_t = x0(x_s) = (x_s - sigma_s eps) / alpha_s,
as score_sde's ``noise_removal``. Weak (and, the noise being additive, strong) order 1.
"""
import dataclasses

import jax.numpy as jnp

from solvers import base


@dataclasses.dataclass(frozen=True)
class EulerMaruyama(base.Solver):
  """Euler-Maruyama on the reverse SDE (Song et al. 2021, Eq. 6) of any schedule (module docstring); weak order 1,
  needs a key."""
  order = 1
  stochastic = True

  def coefficients(self, grid, schedule):
    """Per step: the weights of x, eps and z (drift and diffusion at the step's start; the jump into sigma = 0)."""
    t_s, t_t = grid.t[:-1], grid.t[1:]
    a_s, s_s, s_t = grid.alpha[:-1], grid.sigma[:-1], grid.sigma[1:]
    dalpha, dsigma = schedule.derivatives(t_s)
    drift = dalpha / a_s
    diffusion2 = 2.0 * s_s * dsigma - 2.0 * s_s**2 * drift  # g^2
    dt = t_s - t_t
    live = (s_s > 0) & (s_t > 0)  # the zero node itself (padding after final='zero') only ever starts skipped steps
    sde_x = jnp.where(live, 1.0 - drift * dt, 0.0)
    sde_eps = jnp.where(live, -diffusion2 * dt / jnp.where(live, s_s, 1.0), 0.0)
    sde_z = jnp.where(live, jnp.sqrt(jnp.where(live, diffusion2 * dt, 0.0)), 0.0)
    into_zero = s_t == 0
    return {"x": jnp.where(into_zero, 1.0 / a_s, sde_x), "eps": jnp.where(into_zero, -s_s / a_s, sde_eps),
            "z": jnp.where(into_zero, 0.0, sde_z)}

  def step(self, denoiser, schedule, grid, coeffs, i, state):
    """x' = c_x x + c_eps eps(x, t_i) + c_z z: one model call."""
    c = base.cast_coefficients(coeffs, state.x)
    eps = denoiser.predict("eps", state.x, grid.t[i], schedule)
    x = c["x"] * state.x + c["eps"] * eps
    x = x + c["z"] * base.noise(state.key, x, i)
    return state._replace(x=x.astype(state.x.dtype), nfe=state.nfe + 1)


base.register("euler_maruyama", EulerMaruyama)

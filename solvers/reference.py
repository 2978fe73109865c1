"""Reference solutions of the probability-flow ODE, to tight tolerance, with diffrax.

The ODE is integrated for v = x / alpha in the variable rho = sigma / alpha = exp(-lambda), where it reads
  dv / drho = eps_hat(alpha v, t(rho))
for every schedule (DEIS, Zhang & Chen 2023, Eq. 11; Karras et al. 2022, Eq. 4). It stays regular up to
rho = 0, so a reference can end with sigma = 0 exactly. A high-order adaptive Runge-Kutta method
(Dormand-Prince 8(7) by default) with a PID step-size controller does the work, in float64.
"""
import diffrax
import jax
import jax.numpy as jnp

MIN_RHO = 1e-8



def solve(denoiser, schedule, x_start, t_start, t_end, *, rtol=1e-10, atol=1e-10, max_steps=100_000,
          solver=None):
  """x at t_end (or at sigma = 0 with ``t_end='zero'``) on the PF-ODE trajectory through x_start at t_start.

  Needs jax_enable_x64 and alpha(t_start) > 0. Evaluates the denoiser as eps.
  """
  if not jax.config.jax_enable_x64:
    raise ValueError("reference solutions are computed in float64: enable jax_enable_x64 first")
  dtype = jnp.float64
  t_start = jnp.asarray(t_start, dtype)
  alpha_start = schedule.alpha(t_start)
  if not float(alpha_start) > 0:
    raise ValueError(f"t_start={float(t_start)!r} has alpha = 0: start where alpha > 0")
  rho_start = schedule.rho(t_start)
  if isinstance(t_end, str):
    if t_end != "zero":
      raise ValueError(f"t_end={t_end!r}: pass a time or 'zero'")
    if schedule.zero_sigma_t is None:
      raise ValueError(f"{type(schedule).__name__} never reaches sigma = 0: pass a time as t_end")
    rho_end = jnp.zeros((), dtype)
  else:
    rho_end = schedule.rho(jnp.asarray(t_end, dtype))

  def vector_field(rho, v, args):
    # At rho = 0 a model that predicts x0 gives eps = 0 / 0; evaluating at rho >= 1e-8 instead moves the
    # field by O(1e-8) on a final step of length O(rho), far below the tolerances used here.
    lam = -jnp.log(jnp.maximum(rho, MIN_RHO))
    t = schedule.t_of_lambda(lam)
    alpha, _ = schedule.alpha_sigma_of_lambda(lam)
    return denoiser.predict("eps", alpha * v, t, schedule)

  x_start = jnp.asarray(x_start, dtype)
  sol = diffrax.diffeqsolve(
      diffrax.ODETerm(vector_field), solver or diffrax.Dopri8(), t0=rho_start, t1=rho_end, dt0=None,
      y0=x_start / alpha_start, stepsize_controller=diffrax.PIDController(rtol=rtol, atol=atol),
      max_steps=max_steps)
  v_end = sol.ys[-1]
  alpha_end = jnp.asarray(1.0, dtype) if isinstance(t_end, str) else schedule.alpha(jnp.asarray(t_end, dtype))
  return alpha_end * v_end



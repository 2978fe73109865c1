"""The diffrax reference solver against the closed-form Gaussian PF-ODE solution."""
import jax
import jax.numpy as jnp
import pytest

from models import analytic
from solvers import reference, schedules


@pytest.mark.parametrize("schedule", [schedules.VPLinear(), schedules.DiscreteVP.named("scaled_linear", 1000, 0.00085, 0.012),
                                      schedules.EDM(), schedules.Flow(t_max=0.99)], ids=lambda s: type(s).__name__)
def test_reference_matches_the_closed_form_gaussian(schedule):
  oracle = analytic.gaussian(dim=3, seed=5)
  t0, t1 = schedule.t_max, schedule.t_min
  x = oracle.sample(jax.random.key(0), 4, schedule.alpha(t0), schedule.sigma(t0))
  ends = [t1] + (["zero"] if schedule.zero_sigma_t is not None else [])
  for end in ends:
    alpha_end, sigma_end = (1.0, 0.0) if end == "zero" else (schedule.alpha(end), schedule.sigma(end))
    exact = oracle.pf_ode_solution(x, schedule.alpha(t0), schedule.sigma(t0), alpha_end, sigma_end)
    got = reference.solve(oracle.denoiser(schedule, prediction="x0"), schedule, x, t0, end)
    assert float(jnp.max(jnp.abs(got - exact))) < 1e-8, end


def test_reference_refuses_what_it_cannot_do():
  oracle, schedule = analytic.gaussian(dim=2), schedules.VE()
  with pytest.raises(ValueError, match="never reaches sigma = 0"):
    reference.solve(oracle.denoiser(schedule), schedule, jnp.zeros((1, 2)), 1.0, "zero")
  flow = schedules.Flow()
  with pytest.raises(ValueError, match="t_start=1.0 has alpha = 0"):
    reference.solve(oracle.denoiser(flow), flow, jnp.zeros((1, 2)), 1.0, 0.01)
  with jax.enable_x64(False), pytest.raises(ValueError, match="enable jax_enable_x64"):
    reference.solve(oracle.denoiser(schedule), schedule, jnp.zeros((1, 2)), 1.0, 0.1)

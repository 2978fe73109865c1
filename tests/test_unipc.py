"""UniPC: identities with DDIM and DPM-Solver++, orders on linear and nonlinear problems, the corrector
switches, UniC as a plug-in, and no NaN where diffusers' bh1 gives one."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import solvers
from models import analytic
from solvers import dpm_solver_multistep as dpm
from solvers import grids, reference, schedules, unipc
from tests.test_battery import order_test_grid

SCHEDULE = schedules.VPLinear()


def _x_T(oracle, n=8, seed=1):
  return oracle.sample(jax.random.key(seed), n, SCHEDULE.alpha(1.0), SCHEDULE.sigma(1.0))


def _run(solver, oracle, grid, x):
  return solvers.sample(solver, oracle.denoiser(SCHEDULE), SCHEDULE, grid, x)


@pytest.mark.parametrize("prediction", dpm.PREDICTIONS)
@pytest.mark.parametrize("final", grids.FINAL_POLICIES)
def test_unip_identities(prediction, final):
  oracle = analytic.gmm(dim=3)
  x, grid = _x_T(oracle), grids.uniform_logsnr(SCHEDULE, 11, final=final)
  first = _run(unipc.UniPC(order=1, corrector=False, prediction=prediction), oracle, grid, x).x
  np.testing.assert_allclose(first, _run(solvers.get("ddim"), oracle, grid, x).x, rtol=1e-10, atol=1e-12)
  # UniP-2 with B(h) = expm1(hh) and no corrector is DPM-Solver(++) 2M midpoint (spec section 12).
  second = _run(unipc.UniPC(order=2, variant="bh2", corrector=False, prediction=prediction), oracle, grid, x).x
  dpm2 = _run(dpm.DPMSolverMultistep(order=2, prediction=prediction, lower_order_final_below=None), oracle, grid, x).x
  np.testing.assert_allclose(second, dpm2, rtol=1e-10, atol=1e-12)


def _gmm_errors(solver, oracle, x, ref, steps):
  return [float(jnp.sqrt(jnp.mean((_run(solver, oracle, order_test_grid(n), x).x - ref) ** 2))) for n in steps]


def test_unipc3_is_fourth_order_on_a_mixture_and_superconverges_on_gaussians():
  steps = (80, 160, 320)
  slope = lambda e: -np.polyfit(np.log(steps), np.log(e), 1)[0]
  solver = solvers.get("unipc_bh2_3").for_order_measurement()
  mixture = analytic.gmm(dim=4, seed=2, std=0.5)
  x = _x_T(mixture, n=16)
  ref = reference.solve(mixture.denoiser(SCHEDULE), SCHEDULE, x, 1.0, 1e-3, rtol=1e-12, atol=1e-12)
  assert abs(slope(_gmm_errors(solver, mixture, x, ref, steps)) - 4) <= 0.3
  gaussian = analytic.gaussian(dim=4, seed=3)
  x = _x_T(gaussian)
  errors = []
  for n in steps[:2]:
    grid = order_test_grid(n)
    exact = gaussian.pf_ode_solution(x, grid.alpha[0], grid.sigma[0], grid.alpha[n], grid.sigma[n])
    errors.append(float(jnp.sqrt(jnp.mean((_run(solver, gaussian, grid, x).x - exact) ** 2))))
  assert np.log2(errors[0] / errors[1]) > 4.3
  assert solver.superconverges_on_linear_problems and not solvers.get("unipc_bh2_2").superconverges_on_linear_problems


def test_unic_plugin_improves_dpm_solver_pp_2m():
  """The paper's Table 4 claim, measured: UniC after DPM-Solver++ 2M lowers the error at equal NFE."""
  mixture = analytic.gmm(dim=8)
  x = _x_T(mixture, n=32)
  ref = reference.solve(mixture.denoiser(SCHEDULE), SCHEDULE, x, 1.0, 1e-3, rtol=1e-10, atol=1e-10)
  for nfe in (5, 10, 20):
    grid = grids.uniform_logsnr(SCHEDULE, nfe)
    plain = _run(solvers.get("dpm_solver_pp_2m"), mixture, grid, x).x
    corrected = _run(solvers.get("dpm_solver_pp_2m_unic"), mixture, grid, x)
    assert int(corrected.nfe) == nfe
    rmse = lambda y: float(jnp.sqrt(jnp.mean((y - ref) ** 2)))
    assert rmse(corrected.x) < rmse(plain), nfe


def test_corrector_switches():
  oracle = analytic.gmm(dim=3)
  x, grid = _x_T(oracle), grids.uniform_logsnr(SCHEDULE, 8)
  off = _run(unipc.UniPC(order=2, corrector=False), oracle, grid, x).x
  all_disabled = _run(unipc.UniPC(order=2, disable_corrector=tuple(range(8))), oracle, grid, x).x
  np.testing.assert_allclose(all_disabled, off, rtol=1e-12)
  on = _run(unipc.UniPC(order=2), oracle, grid, x).x
  first_disabled = _run(unipc.UniPC(order=2, disable_corrector=(0,)), oracle, grid, x).x
  assert not np.allclose(on, off) and not np.allclose(first_disabled, on) and not np.allclose(first_disabled, off)
  # The last step is never corrected: disabling it changes nothing.
  np.testing.assert_allclose(_run(unipc.UniPC(order=2, disable_corrector=(7,)), oracle, grid, x).x, on, rtol=1e-12)


@pytest.mark.parametrize("variant", unipc.VARIANTS)
def test_finite_at_a_final_sigma_of_zero(variant):
  """Spec P6: diffusers' bh1 computes (-inf) * 0 at a final sigma of 0; here the step into zero is first order."""
  oracle = analytic.gmm(dim=3)
  for n in range(1, 16):
    out = _run(unipc.UniPC(order=3, variant=variant, lower_order_final=False), oracle,
               grids.uniform_logsnr(SCHEDULE, n, final="zero"), _x_T(oracle))
    assert bool(jnp.all(jnp.isfinite(out.x))) and int(out.nfe) == n


def test_bad_options():
  with pytest.raises(ValueError, match="variant='bh3'"):
    unipc.UniPC(variant="bh3")
  with pytest.raises(ValueError, match="order=4"):
    unipc.UniPC(order=4)
  with pytest.raises(ValueError, match="predictor"):
    unipc.UniPC(predictor=dpm.DPMSolverMultistep(prediction="noise"))


def test_order_3_samples_without_x64_as_users_run_it():
  """With x64 off (JAX's default) the order-3 tables need phi_4, whose series once divided by the Python int
  13!, which overflows int32 there: the solver raised OverflowError. It now matches the float64 run."""
  oracle = analytic.gmm(dim=3)
  x = _x_T(oracle)
  expected = _run("unipc_bh2_3", oracle, grids.uniform_logsnr(SCHEDULE, 8, final="zero"), x).x
  with jax.enable_x64(False):
    x32 = jnp.asarray(np.asarray(x), jnp.float32)
    got = _run("unipc_bh2_3", oracle, grids.uniform_logsnr(SCHEDULE, 8, final="zero"), x32).x
    assert got.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(got), np.asarray(expected), rtol=0, atol=1e-4)

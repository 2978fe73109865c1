"""DPM-Solver-v3 and its EMS: the DPM-Solver++ identity, exact step integrals, closed-form EMS of a Gaussian,
accuracy against UniPC / DPM-Solver++ with exact EMS of the GMM, orders, traced EMS, files and options."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import solvers
from models import analytic
from solvers import dpm_solver_multistep as dpm
from solvers import dpm_solver_v3 as v3
from solvers import ems as ems_lib
from solvers import grids, loop, reference, schedules
from tests.test_battery import order_test_grid

SCHEDULE = schedules.VPLinear()


def _x_T(oracle, n=8, seed=1):
  return oracle.sample(jax.random.key(seed), n, SCHEDULE.alpha(1.0), SCHEDULE.sigma(1.0))


def _run(solver, oracle, grid, x):
  return solvers.sample(solver, oracle.denoiser(SCHEDULE), SCHEDULE, grid, x).x


def _rmse(a, b):
  return float(jnp.sqrt(jnp.mean((a - b) ** 2)))


@pytest.fixture(scope="module")
def gmm_ems():
  """Exact-model EMS of the default GMM (dim 8): K = 120 nodes, 256 trajectories."""
  oracle = analytic.gmm()
  x_T = ems_lib.prior_samples(SCHEDULE, jax.random.key(0), 256, (8,))
  return oracle, ems_lib.compute(oracle.denoiser(SCHEDULE), SCHEDULE, x_T, num_nodes=120)


@pytest.mark.parametrize("order, final", [(2, "zero"), (3, "t_end"), (3, "zero")])
def test_degenerated_ems_is_dpm_solver_pp(order, final):
  oracle = analytic.gmm(dim=3)
  x, grid = _x_T(oracle), grids.uniform_logsnr(SCHEDULE, 11, final=final)
  ours = _run(v3.DPMSolverV3(order=order, use_corrector=False), oracle, grid, x)
  pp = dpm.DPMSolverMultistep(order=order, solver_type="heun", third_order="exact", lower_order_final_below=None)
  np.testing.assert_allclose(ours, _run(pp, oracle, grid, x), rtol=1e-12, atol=1e-12)


def test_step_integrals_match_brute_force():
  rng = np.random.default_rng(0)
  values = lambda: jnp.asarray(rng.uniform(-0.5, 0.5, (9, 2)))
  ems = ems_lib.EMS(lam=jnp.linspace(-4.0, 4.0, 9), l=1.0 + values(), s=values(), b=2 * values())
  lam_from, lam_to = jnp.array([-5.0, -1.3, 2.2]), jnp.array([-1.3, 2.2, 5.0])  # beyond the nodes at both ends
  out = jax.jit(lambda e: e.step_integrals(lam_from, lam_to, 3))(ems)
  fields = jax.jit(lambda e, lam: (e.integral("l", lam), e.integral("s", lam), e.value("b", lam)))
  for i in range(3):
    lam = np.linspace(float(lam_from[i]), float(lam_to[i]), 40001)
    big_l, big_s, b = map(np.asarray, fields(ems, jnp.asarray(lam)))
    growth = np.exp(big_l + big_s - big_l[0] - big_s[0])
    source = np.exp(big_s[0] - big_s) * b
    steps = np.diff(lam)[:, None]
    inner = np.concatenate([np.zeros((1, 2)), np.cumsum(0.5 * steps * (source[1:] + source[:-1]), 0)])
    trapezoid = lambda v: np.sum(0.5 * steps * (v[1:] + v[:-1]), 0)
    tau = (lam - lam[0])[:, None]
    for k, factorial in enumerate((1, 1, 2)):
      np.testing.assert_allclose(out["moments"][k][i], trapezoid(growth * tau**k) / factorial, rtol=1e-7)
    np.testing.assert_allclose(out["beta"][i], inner[-1], rtol=1e-7, atol=1e-9)
    np.testing.assert_allclose(out["q"][i], trapezoid(growth * inner), rtol=1e-7, atol=1e-9)
    np.testing.assert_allclose(out["decay_l"][i], np.exp(big_l[0] - big_l[-1]), rtol=1e-12)


def test_gaussian_ems_have_their_closed_form_and_make_first_order_nearly_exact():
  """eps = sigma (x - alpha mu) / v, v = alpha^2 std^2 + sigma^2, so l = sigma^2 / v = 1 / (1 + e^{2 lam} std^2),
  f = -l mu does not depend on x (s = 0 by our convention) and b = f' = -l' mu = 2 l (1 - l) mu."""
  oracle = analytic.gaussian(dim=3, seed=4)
  x_T = ems_lib.prior_samples(SCHEDULE, jax.random.key(1), 16, (3,))
  denoiser = oracle.denoiser(SCHEDULE)
  ems = ems_lib.compute(denoiser, SCHEDULE, x_T, num_nodes=80)
  l_exact = 1.0 / (1.0 + jnp.exp(2 * ems.lam)[:, None] * oracle.std**2)
  np.testing.assert_allclose(ems.l, l_exact, rtol=1e-10)
  np.testing.assert_allclose(ems.s, 0.0, atol=1e-12)
  np.testing.assert_allclose(ems.b, 2 * l_exact * (1 - l_exact) * oracle.mean, atol=2e-3)
  # The Jacobian is diagonal, so Hutchinson's estimate is exact with any probe.
  probed = ems_lib.compute(denoiser, SCHEDULE, x_T, num_nodes=80, hutchinson_probes=2)
  np.testing.assert_allclose(probed.l, ems.l, rtol=1e-10)
  x, grid = _x_T(oracle), grids.uniform_logsnr(SCHEDULE, 5)
  exact = oracle.pf_ode_solution(x, grid.alpha[0], grid.sigma[0], grid.alpha[5], grid.sigma[5])
  first = _rmse(_run(v3.DPMSolverV3(ems=ems, order=1, use_corrector=False), oracle, grid, x), exact)
  assert first < 1e-2 * _rmse(_run(solvers.get("ddim"), oracle, grid, x), exact)


def test_v3_with_exact_ems_beats_unipc_and_dpm_solver_pp_at_low_nfe(gmm_ems):
  oracle, ems = gmm_ems
  x = _x_T(oracle, n=64, seed=5)
  ref = reference.solve(oracle.denoiser(SCHEDULE), SCHEDULE, x, 1.0, SCHEDULE.t_min)
  rivals = ("unipc_bh2_3", "unipc_bh1_3", "dpm_solver_pp_3m")
  for steps in (5, 6, 8, 10):
    grid = grids.uniform_logsnr(SCHEDULE, steps)
    ours = _rmse(_run(v3.DPMSolverV3(ems=ems), oracle, grid, x), ref)
    errors = {name: _rmse(_run(name, oracle, grid, x), ref) for name in rivals}
    # At 10 steps DPM-Solver++ 3M runs without lower-order final steps (official rule: below 10) and wins.
    beaten = rivals[:2] if steps == 10 else rivals
    assert all(ours < errors[name] for name in beaten), (steps, ours, errors)


def test_order_with_exact_ems_on_the_mixture(gmm_ems):
  oracle, ems = gmm_ems
  x = _x_T(oracle, n=8)
  steps = (40, 80, 160)
  ref = reference.solve(oracle.denoiser(SCHEDULE), SCHEDULE, x, 1.0, SCHEDULE.t_min, rtol=1e-12, atol=1e-12)
  slope = lambda e: -np.polyfit(np.log(steps), np.log(e), 1)[0]
  solver = v3.DPMSolverV3(ems=ems, use_corrector=False).for_order_measurement()
  assert solver.declared_order == 3
  errors = [_rmse(_run(solver, oracle, order_test_grid(n), x), ref) for n in steps]
  assert abs(slope(errors) - 3) <= 0.3, errors


def test_taylor_corrector_is_third_order_once_asymptotic():
  """Between 40 and 160 steps the Taylor corrector's error cancels the predictor's (rates 0.9, 2.6); from
  ~300 steps on the rate settles at 3 (measured 2.9 up to 1280 steps)."""
  oracle = analytic.gaussian(dim=4, seed=3)
  x = _x_T(oracle)
  solver = v3.DPMSolverV3(c_pseudo=False).for_order_measurement()
  errors = []
  for n in (320, 640):
    lam0, lam1 = float(SCHEDULE.lam(1.0)), float(SCHEDULE.lam(SCHEDULE.t_min))
    u = np.linspace(0.0, 1.0, n + 1)
    times = np.array(SCHEDULE.t_of_lambda(jnp.asarray(lam0 + (lam1 - lam0) * (u + 0.5 * u * (1 - u)))))
    times[0], times[-1] = 1.0, SCHEDULE.t_min
    grid = grids.from_times(SCHEDULE, times, capacity=1024)
    exact = oracle.pf_ode_solution(x, grid.alpha[0], grid.sigma[0], grid.alpha[n], grid.sigma[n])
    errors.append(_rmse(_run(solver, oracle, grid, x), exact))
  assert abs(np.log2(errors[0] / errors[1]) - 3) <= 0.3, errors


def test_new_ems_never_recompile_and_get_gradients(gmm_ems):
  """(vmap is the battery's, on the registered solver: the EMS are the same leaves for every sample.)"""
  oracle, ems = gmm_ems
  x, grid = _x_T(oracle, n=4), grids.uniform_logsnr(SCHEDULE, 6, final="zero")
  run = lambda e: _run(v3.DPMSolverV3(ems=e), oracle, grid, x)
  base_x = run(ems)
  traces = loop.trace_count()
  moved = run(ems.replace(b=ems.b * 1.1))
  assert loop.trace_count() == traces and not np.allclose(moved, base_x)
  loss = lambda scale: jnp.sum(run(ems.replace(b=ems.b * scale)) ** 2)
  eps = 1e-5
  fd = (loss(1.0 + eps) - loss(1.0 - eps)) / (2 * eps)
  np.testing.assert_allclose(jax.grad(loss)(1.0), fd, rtol=1e-6)


def test_half_corrects_only_the_noisier_half():
  grid = grids.uniform_t(SCHEDULE, 10, capacity=11)
  corr_x = jax.jit(lambda solver: solver.coefficients(grid, SCHEDULE)["corr_x"])
  full, half = corr_x(v3.DPMSolverV3()), corr_x(v3.DPMSolverV3(half=True))
  corrected_node = np.asarray(grid.t[:-1])  # row i corrects node i
  noisy = corrected_node > 0.5 * (SCHEDULE.t_min + SCHEDULE.t_max)
  assert np.all(np.asarray(full)[1:10] == 0)  # every node 1..9 corrected without `half`
  np.testing.assert_array_equal(np.asarray(half)[1:10] == 0, noisy[1:10])
  assert 0 < np.sum(noisy[1:10]) < 9


def test_save_load_round_trip_and_key_mismatch(tmp_path, gmm_ems):
  _, ems = gmm_ems
  key = ems_lib.cache_key("gmm-default", SCHEDULE, t_start=1.0, t_end=1e-3, num_nodes=120, num_samples=256)
  path = str(tmp_path / "ems.npz")
  ems_lib.save(ems, path, key)
  loaded = ems_lib.load(path, key)
  for name in ("lam", "l", "s", "b"):
    np.testing.assert_array_equal(getattr(loaded, name), getattr(ems, name))
  other = ems_lib.cache_key("gmm-default", schedules.VPLinear(beta_max=10.0), t_start=1.0, t_end=1e-3, num_nodes=120,
                            num_samples=256)
  with pytest.raises(ValueError, match="VPLinear") as info:
    ems_lib.load(path, other)
  assert key in str(info.value) and other in str(info.value)
  assert [p.name for p in tmp_path.iterdir()] == ["ems.npz"]  # no temporary file left behind


@pytest.mark.parametrize("options", [dict(order=4), dict(p_pseudo="yes"), dict(half=1.5)])
def test_bad_options_raise(options):
  with pytest.raises(ValueError, match=list(options)[0]):
    v3.DPMSolverV3(**options)


def test_bad_ems_options_raise():
  oracle = analytic.gaussian(dim=2)
  with pytest.raises(ValueError, match="num_nodes"):
    ems_lib.compute(oracle.denoiser(SCHEDULE), SCHEDULE, jnp.zeros((2, 2)), num_nodes=0)


def test_prepare_computes_the_models_ems_over_the_grids_range():
  """Solver.prepare (what the convergence study calls): the EMS of the model from prior samples drawn with its
  key, over the grid's range up to its last node with sigma > 0 (the jump to sigma = 0 needs none)."""
  oracle = analytic.gmm(dim=3)
  denoiser = oracle.denoiser(SCHEDULE)
  grid = grids.uniform_logsnr(SCHEDULE, 6, t_start=0.9, t_end=1e-2, final="zero")
  prepared = v3.DPMSolverV3().prepare(denoiser, SCHEDULE, grid, jnp.zeros((5, 3)), jax.random.key(4), num_nodes=8,
                                      num_samples=16)
  samples = ems_lib.prior_samples(SCHEDULE, jax.random.key(4), 16, (3,), t_start=0.9)
  expected = ems_lib.compute(denoiser, SCHEDULE, samples, num_nodes=8, t_start=0.9, t_end=float(grid.t[5]))
  for field in ("lam", "l", "s", "b"):
    np.testing.assert_allclose(getattr(prepared.ems, field), getattr(expected, field), rtol=1e-12, atol=1e-14)
  assert not np.allclose(prepared.ems.l, 1.0)  # not the degenerated statistics

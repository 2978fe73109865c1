"""The one sampling loop and DDIM: compilation count, trajectory, NFE, DDIM's forms and its eta variant."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import solvers
from models import analytic
from solvers import base, ddim, grids, loop, pytree, schedules

SCHEDULE = schedules.VPLinear()


def _x_T(oracle, n, seed=0, schedule=SCHEDULE, t=None):
  t = schedule.t_max if t is None else t
  return oracle.sample(jax.random.key(seed), n, schedule.alpha(t), schedule.sigma(t))


def test_one_compilation_serves_nfe_1_to_50():
  compiles = []
  jax.monitoring.register_event_duration_secs_listener(
      lambda event, duration, **kw: compiles.append(event) if event == "/jax/core/compile/backend_compile_duration" else None)
  oracle = analytic.gmm(dim=4)
  denoiser = oracle.denoiser(SCHEDULE)
  x = _x_T(oracle, 8)
  solvers.sample("ddim", denoiser, SCHEDULE, grids.uniform_logsnr(SCHEDULE, 1), x)  # warm every kernel
  traces_before, compiles_before = loop.trace_count(), len(compiles)
  nfes = []
  for steps in range(1, 51):
    grid = grids.uniform_logsnr(SCHEDULE, steps)
    nfes.append(int(solvers.sample("ddim", denoiser, SCHEDULE, grid, x).nfe))
  assert nfes == list(range(1, 51))
  assert loop.trace_count() == traces_before
  assert len(compiles) == compiles_before  # nothing at all was compiled for the 50 step counts


def test_trajectory_holds_every_node_and_padding_repeats_the_end():
  oracle = analytic.gaussian(dim=3)
  x = _x_T(oracle, 2)
  grid = grids.uniform_logsnr(SCHEDULE, 5, capacity=16)
  sol = solvers.sample("ddim", oracle.denoiser(SCHEDULE), SCHEDULE, grid, x, return_trajectory=True)
  assert sol.trajectory.shape == (16, 2, 3)
  np.testing.assert_array_equal(sol.trajectory[0], x)
  np.testing.assert_array_equal(sol.trajectory[5], sol.x)
  np.testing.assert_array_equal(sol.trajectory[15], sol.x)
  assert not np.allclose(sol.trajectory[4], sol.x)
  # Each node matches a run that stops there.
  for n in (1, 3):
    partial = grids.from_times(SCHEDULE, grid.times()[: n + 1])
    np.testing.assert_allclose(solvers.sample("ddim", oracle.denoiser(SCHEDULE), SCHEDULE, partial, x).x,
                               sol.trajectory[n], rtol=1e-12)


@pytest.mark.parametrize("schedule", [schedules.VPLinear(), schedules.DiscreteVP.named(), schedules.EDM(),
                                      schedules.VPCosine()], ids=lambda s: type(s).__name__)
@pytest.mark.parametrize("final", grids.FINAL_POLICIES)
def test_ddim_eps_and_x0_forms_agree(schedule, final):
  oracle = analytic.gmm(dim=4)
  x = _x_T(oracle, 4, schedule=schedule)
  grid = grids.uniform_logsnr(schedule, 7, final=final)
  outs = [solvers.sample(ddim.DDIM(form=f), oracle.denoiser(schedule), schedule, grid, x).x for f in ddim.FORMS]
  np.testing.assert_allclose(outs[0], outs[1], rtol=1e-10, atol=1e-10)


def test_ddim_step_is_alpha_x0_plus_sigma_eps():
  """DDIM Eq. 12: x_t = alpha_t x0(x_s) + sigma_t eps(x_s), for every prediction kind of the model."""
  oracle = analytic.gmm(dim=4)
  x = _x_T(oracle, 4, t=0.6)
  grid = grids.from_times(SCHEDULE, np.array([0.6, 0.35]))
  a_s, s_s, a_t, s_t = SCHEDULE.alpha(0.6), SCHEDULE.sigma(0.6), SCHEDULE.alpha(0.35), SCHEDULE.sigma(0.35)
  x0, eps = oracle.x0_eps(x, a_s, s_s)
  for kind in solvers.predictions.PREDICTION_KINDS:
    out = solvers.sample("ddim", oracle.denoiser(SCHEDULE, prediction=kind), SCHEDULE, grid, x).x
    np.testing.assert_allclose(out, a_t * x0 + s_t * eps, rtol=1e-10, atol=1e-12)


def test_final_zero_step_returns_the_data_prediction():
  oracle = analytic.gmm(dim=4)
  x = _x_T(oracle, 4, t=0.2)
  grid = grids.from_times(SCHEDULE, np.array([0.2]), final="zero")
  for name in ("ddim", "ddim_eps"):
    out = solvers.sample(name, oracle.denoiser(SCHEDULE), SCHEDULE, grid, x)
    np.testing.assert_allclose(out.x, oracle.x0(x, SCHEDULE.alpha(0.2), SCHEDULE.sigma(0.2)), rtol=1e-12)
    assert int(out.nfe) == 1


def test_ddim_x0_form_starts_a_flow_model_at_pure_noise():
  flow = schedules.Flow()  # t_max = 1: alpha = 0, lambda = -inf
  oracle = analytic.gaussian(dim=4)
  x = _x_T(oracle, 64, schedule=flow)
  grid = grids.uniform_t(flow, 200, final="zero")
  out = solvers.sample("ddim", oracle.denoiser(flow, prediction="velocity"), flow, grid, x).x
  exact = oracle.pf_ode_solution(x, 0.0, 1.0, 1.0, 0.0)
  assert bool(jnp.all(jnp.isfinite(out)))
  assert float(jnp.sqrt(jnp.mean((out - exact) ** 2))) < 0.02


@pytest.mark.parametrize("eta", [0.5, 1.0])
def test_ddim_eta_samples_the_data_distribution(eta):
  """Stochastic DDIM (eta = 1 is DDPM ancestral) samples the data: moments of 8192 samples.

  Its variance is biased low by O(1/steps) (the exact reverse kernel has the extra variance of x0 given
  x_t that the DDIM/DDPM kernel omits: 5% at 100 logSNR steps for eta = 1), so 400 steps are used."""
  oracle = analytic.gaussian(dim=2, seed=4)
  x = _x_T(oracle, 8192, seed=9)
  grid = grids.uniform_logsnr(SCHEDULE, 400, final="zero")
  out = solvers.sample(ddim.DDIM(eta=eta), oracle.denoiser(SCHEDULE), SCHEDULE, grid, x,
                       key=jax.random.key(3)).x
  se = oracle.std / np.sqrt(8192)
  np.testing.assert_array_less(jnp.abs(jnp.mean(out, 0) - oracle.mean), 4 * se + 0.01)
  np.testing.assert_allclose(jnp.std(out, 0), oracle.std, rtol=0.03)
  # Noise is really drawn: another key gives other samples.
  other = solvers.sample(ddim.DDIM(eta=eta), oracle.denoiser(SCHEDULE), SCHEDULE, grid, x,
                         key=jax.random.key(4)).x
  assert float(jnp.max(jnp.abs(other - out))) > 1e-3


def test_guided_denoiser_runs_through_the_loop_with_new_scales_without_recompiling():
  oracle_c, oracle_u = analytic.gaussian(dim=3, seed=1), analytic.gaussian(dim=3, seed=2)

  def apply_fn(params, x, t, cond):
    oracle = jax.tree_util.tree_map(lambda a, b: jnp.where(cond, a, b), params[0], params[1])
    return oracle.eps(x, SCHEDULE.alpha(t), SCHEDULE.sigma(t))

  inner = solvers.Denoiser(apply_fn=apply_fn, params=(oracle_c, oracle_u))
  x = _x_T(oracle_u, 4)
  grid = grids.uniform_logsnr(SCHEDULE, 10)
  outs = {}
  for scale in (0.0, 1.0, 3.0):
    guided = solvers.Guided(inner=inner, cond=True, uncond=False, scale=scale)
    outs[scale] = solvers.sample("ddim", guided, SCHEDULE, grid, x).x
    if scale == 0.0:
      traces = loop.trace_count()
  assert loop.trace_count() == traces
  np.testing.assert_allclose(outs[0.0], solvers.sample("ddim", oracle_u.denoiser(SCHEDULE), SCHEDULE, grid, x).x,
                             rtol=1e-12)
  np.testing.assert_allclose(outs[1.0], solvers.sample("ddim", oracle_c.denoiser(SCHEDULE), SCHEDULE, grid, x).x,
                             rtol=1e-12)
  assert not np.allclose(outs[3.0], outs[1.0])


@pytest.mark.parametrize("final", grids.FINAL_POLICIES)
def test_vmap_over_grids_of_different_lengths_is_exact_and_differentiable(final):
  """Under vmap over grids the skip becomes a select: padded rows must not leak NaN into values or gradients."""
  oracle = analytic.gaussian(dim=3)
  x = _x_T(oracle, 2)
  grid_list = [grids.uniform_logsnr(SCHEDULE, n, final=final) for n in (3, 6)]
  stacked = jax.tree_util.tree_map(lambda *leaves: jnp.stack(leaves), *grid_list)

  def run(grid, x_T):
    return solvers.sample("ddim", oracle.denoiser(SCHEDULE), SCHEDULE, grid, x_T).x

  batched = jax.vmap(run, in_axes=(0, None))(stacked, x)
  for k, grid in enumerate(grid_list):
    np.testing.assert_allclose(batched[k], run(grid, x), rtol=1e-12)
  grad = jax.grad(lambda x_T: jnp.sum(jax.vmap(run, in_axes=(0, None))(stacked, x_T) ** 2))(x)
  assert bool(jnp.all(jnp.isfinite(grad)))


@pytree.pytree_dataclass
class _ScaledDDIM(base.Solver):
  """DDIM with its x-weight scaled by a traced leaf: a stand-in for solvers with learned parameters."""
  scale: jnp.ndarray
  inner: ddim.DDIM = pytree.static_field(default=ddim.DDIM())

  def coefficients(self, grid, schedule):
    rows = self.inner.coefficients(grid, schedule)
    return {**rows, "x": rows["x"] * self.scale}

  def step(self, denoiser, schedule, grid, coeffs, i, state):
    return self.inner.step(denoiser, schedule, grid, coeffs, i, state)


def test_solver_leaves_are_traced_not_static():
  oracle = analytic.gmm(dim=3)
  denoiser = oracle.denoiser(SCHEDULE)
  x = _x_T(oracle, 4)
  grid = grids.uniform_logsnr(SCHEDULE, 6)
  run = lambda scale: solvers.sample(_ScaledDDIM(scale=scale), denoiser, SCHEDULE, grid, x).x
  np.testing.assert_allclose(run(jnp.asarray(1.0)), solvers.sample("ddim", denoiser, SCHEDULE, grid, x).x, rtol=1e-13)
  traces = loop.trace_count()
  moved = run(jnp.asarray(1.01))
  assert loop.trace_count() == traces  # a new leaf value does not recompile
  assert not np.allclose(moved, run(jnp.asarray(1.0)))
  loss = lambda scale: jnp.sum(run(scale) ** 2)
  eps = 1e-6
  fd = (loss(jnp.asarray(1.0 + eps)) - loss(jnp.asarray(1.0 - eps))) / (2 * eps)
  np.testing.assert_allclose(jax.grad(loss)(jnp.asarray(1.0)), fd, rtol=1e-6)

"""The battery every registered solver must pass; a solver joins it by being registered.

- declared order on the closed-form Gaussian (slope of log error vs log step count, doubling sweep), with
  the solver's order-capping rules off (``for_order_measurement``);
- the state keeps its shapes and dtypes across a step;
- no recompilation for new params, key, or grid of the same capacity (any step count);
- the same result with jax.disable_jit();
- reported NFE equals the model calls counted;
- no NaN/Inf for 1..20 steps with both final-step policies, in float32;
- vmap over samples and per-sample keys; gradients w.r.t. model params and x_T match finite differences.

vmap and gradients are properties of a solver's step code, so they run once per code path
(``CODE_PATHS``): registered names of one class with the same randomness and string / bool options differ
only in numbers (order, beta, gamma: other coefficient tables, other history lengths), and the one with
the highest order stands for them. Everything else runs on every registered name.
"""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import solvers
from models import analytic
from solvers import grids, loop, predictions, schedules

ALL = solvers.available()
DETERMINISTIC = [name for name in ALL if not solvers.get(name).stochastic]
STOCHASTIC = [name for name in ALL if solvers.get(name).stochastic]
FIXED_GRID = [name for name in DETERMINISTIC if not solvers.get(name).adaptive]  # order measured on a grid


def _code_path(solver):
  """What selects a solver's step code: its class, its randomness, its string / bool options and the code
  paths of the solvers it wraps (a time-shifted DDIM is not a time-shifted DPM-Solver++)."""
  options = []
  for field in dataclasses.fields(solver):
    value = getattr(solver, field.name)
    if isinstance(value, solvers.base.Solver):
      options.append((field.name, _code_path(value)))
    elif value is None or isinstance(value, (str, bool)):
      options.append((field.name, value))
  return (type(solver), solver.stochastic) + tuple(options)


def _code_paths(names):
  representative = {}
  for name in names:
    key = _code_path(solvers.get(name))
    if key not in representative or solvers.get(name).order > solvers.get(representative[key]).order:
      representative[key] = name
  return sorted(representative.values())


CODE_PATHS = _code_paths(ALL)
STEPS = (40, 80, 160)  # where every registered solver is asymptotic on this problem
ORDER_TOLERANCE = 0.3

SCHEDULE = schedules.VPLinear()


def _gaussian():
  return analytic.gaussian(dim=4, seed=3)


def _x_T(oracle, n=8, seed=1, dtype=jnp.float64):
  t = SCHEDULE.t_max
  return oracle.sample(jax.random.key(seed), n, SCHEDULE.alpha(t), SCHEDULE.sigma(t)).astype(dtype)


def _run(name, denoiser, grid, x, key=0, **kwargs):
  return solvers.sample(name, denoiser, SCHEDULE, grid, x, key=jax.random.key(key), **kwargs)


def nonuniform_lambdas(steps, lam_start, lam_end):
  """steps + 1 values of lambda from lam_start to lam_end, smoothly non-uniform (step sizes vary by 3x).

  Uniform lambda steps make some methods superconverge on the Gaussian (the exactly-integrated 3M shows
  order 4 there, 3 on any non-uniform grid), which would hide a wrong declared order."""
  u = np.linspace(0.0, 1.0, steps + 1)
  return lam_start + (lam_end - lam_start) * (u + 0.5 * u * (1 - u))


def order_test_lambda_range():
  """(lambda at t_max, lambda at t_min) of the battery's schedule: the range its order test spans."""
  return tuple(float(SCHEDULE.lam(t)) for t in (SCHEDULE.t_max, SCHEDULE.t_min))


def order_test_grid(steps):
  """The grid of the order test: ``nonuniform_lambdas`` over the schedule's whole range."""
  lam = nonuniform_lambdas(steps, *order_test_lambda_range())
  times = np.array(SCHEDULE.t_of_lambda(jnp.asarray(lam)))
  times[0], times[-1] = SCHEDULE.t_max, SCHEDULE.t_min
  return grids.from_times(SCHEDULE, times, capacity=512)


@pytest.mark.parametrize("name", FIXED_GRID)
def test_declared_order_on_gaussian(name):
  oracle = _gaussian()
  x = _x_T(oracle)
  errors = []
  for steps in STEPS:
    grid = order_test_grid(steps)
    exact = oracle.pf_ode_solution(x, grid.alpha[0], grid.sigma[0], grid.alpha[steps], grid.sigma[steps])
    sol = _run(solvers.get(name).for_order_measurement(), oracle.denoiser(SCHEDULE), grid, x)
    errors.append(float(jnp.sqrt(jnp.mean((sol.x - exact) ** 2))))
  slope = -np.polyfit(np.log(STEPS), np.log(errors), 1)[0]
  solver = solvers.get(name)
  declared = solver.declared_order
  assert slope >= declared - ORDER_TOLERANCE, (name, declared, slope, errors)
  if not solver.superconverges_on_linear_problems:
    assert slope <= declared + ORDER_TOLERANCE, (name, declared, slope, errors)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
@pytest.mark.parametrize("name", ALL)
def test_state_keeps_shape_and_dtype(name, dtype):
  """Checked abstractly (jax.eval_shape): every step maps the state onto the same shapes and dtypes."""
  solver, oracle = solvers.get(name), _gaussian()
  grid = grids.uniform_logsnr(SCHEDULE, 5)
  denoiser = oracle.denoiser(SCHEDULE)
  x = _x_T(oracle, dtype=dtype)
  state = jax.eval_shape(lambda x: solver.init(denoiser, SCHEDULE, grid, x, jax.random.key(0)), x)
  coeffs = jax.eval_shape(lambda g: solver.coefficients(g, SCHEDULE), grid)
  for i in range(3):
    row = jax.tree_util.tree_map(lambda c: jax.ShapeDtypeStruct(c.shape[1:], c.dtype), coeffs)
    new = jax.eval_shape(lambda s, c, i=i: solver.step(denoiser, SCHEDULE, grid, c, i, s), state, row)
    assert jax.tree_util.tree_structure(new) == jax.tree_util.tree_structure(state)
    for before, after in zip(jax.tree_util.tree_leaves(state), jax.tree_util.tree_leaves(new)):
      assert (before.shape, before.dtype) == (after.shape, after.dtype)
    state = new
  assert state.x.dtype == dtype


def counting_denoiser(oracle, counter):
  """The oracle's denoiser (VP linear), adding 1 to counter[0] each time the model really runs."""
  inner = oracle.denoiser(SCHEDULE)

  def apply_fn(params, x, label, cond):
    jax.debug.callback(lambda: counter.__setitem__(0, counter[0] + 1))
    return inner.apply_fn(params, x, label, cond)

  return predictions.Denoiser(apply_fn=apply_fn, params=inner.params, prediction=inner.prediction)


@pytest.mark.parametrize("name", ALL)
def test_one_compilation_counted_nfe_and_same_result_without_jit(name):
  """Three properties on one compiled loop (the suite's time is mostly compilation):
  - new params, key or grid of the same capacity never recompile;
  - the reported NFE equals the model calls counted, for both final policies;
  - the same result (and NFE) under jax.disable_jit(), the debug path."""
  oracle, counter = _gaussian(), [0]
  denoiser = counting_denoiser(oracle, counter)
  x = _x_T(oracle)

  def counted_run(denoiser, grid, x, key):
    counter[0] = 0
    sol = _run(name, denoiser, grid, x, key=key)
    jax.effects_barrier()
    assert int(sol.nfe) == counter[0] > 0, (name, int(sol.nfe), counter[0])
    return sol

  counted_run(denoiser, grids.uniform_logsnr(SCHEDULE, 10), x, key=0)
  before = loop.trace_count()
  other = analytic.Gaussian(mean=oracle.mean + 0.5, std=oracle.std * 1.1).denoiser(SCHEDULE)
  counted_run(denoiser.replace(params=other.params), grids.uniform_logsnr(SCHEDULE, 10), x, key=1)
  counted_run(denoiser, grids.uniform_t(SCHEDULE, 10, t_end=0.01, final="zero"), x, key=2)
  counted_run(denoiser, grids.karras(SCHEDULE, 17), x, key=3)
  short = counted_run(denoiser, grids.uniform_logsnr(SCHEDULE, 3), x + 0.1, key=4)
  assert loop.trace_count() == before
  with jax.disable_jit():  # the same 3 steps without padding: eager cost grows with the capacity
    eager = counted_run(denoiser, grids.uniform_logsnr(SCHEDULE, 3, capacity=4), x + 0.1, key=4)
  # BDIA-EDM's Heun predictor point cancels terms ~45x larger than itself on this 3-step grid, and its
  # backward term cancels again, so the compiled (fused) and eager roundings differ by ~1e-12.
  tolerance = 1e-10 if name == "bdia_edm" else 1e-12
  np.testing.assert_allclose(eager.x, short.x, rtol=tolerance, atol=tolerance)
  assert int(eager.nfe) == int(short.nfe)


@pytest.mark.parametrize("name", ALL)
def test_finite_for_every_step_count_and_final_policy(name):
  oracle = analytic.gmm(dim=4, seed=2)
  x = _x_T(oracle, dtype=jnp.float32)
  for final in grids.FINAL_POLICIES:
    for steps in range(1, 21):
      sol = _run(name, oracle.denoiser(SCHEDULE), grids.uniform_logsnr(SCHEDULE, steps, final=final), x)
      assert sol.x.dtype == jnp.float32
      assert bool(jnp.all(jnp.isfinite(sol.x))), (name, final, steps)


@pytest.mark.parametrize("name", CODE_PATHS)
def test_vmap_over_samples_and_keys(name):
  oracle = _gaussian()
  x = _x_T(oracle, n=4)
  grid = grids.uniform_logsnr(SCHEDULE, 6)
  keys = jax.random.split(jax.random.key(7), 4)

  def one(x1, key):
    return solvers.sample(name, oracle.denoiser(SCHEDULE), SCHEDULE, grid, x1[None], key=key).x[0]

  batched = jax.vmap(one)(x, keys)
  looped = jnp.stack([one(x[i], keys[i]) for i in range(4)])
  np.testing.assert_allclose(batched, looped, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", CODE_PATHS)
def test_gradients_match_finite_differences(name):
  oracle = _gaussian()
  x = _x_T(oracle, n=3)
  grid = grids.uniform_logsnr(SCHEDULE, 5)
  weights = jnp.linspace(0.5, 1.5, x.size).reshape(x.shape)

  def loss(mean, x_T):
    model = analytic.Gaussian(mean=mean, std=oracle.std)
    sol = _run(name, model.denoiser(SCHEDULE), grid, x_T, key=5)
    return jnp.sum(weights * sol.x**2)

  g_mean, g_x = jax.grad(loss, argnums=(0, 1))(oracle.mean, x)
  d_mean = jax.random.normal(jax.random.key(0), oracle.mean.shape, x.dtype)
  d_x = jax.random.normal(jax.random.key(1), x.shape, x.dtype)
  # On the Gaussian a fixed-grid solver is affine in (mean, x_T) and the loss quadratic, so central differences
  # have no truncation error and a larger eps only cuts round-off (noise-form singlestep steps from
  # alpha(1) = 0.0066 lose ~2 digits to cancellation: eps = 1e-6 left a 1e-5 relative error there).
  eps = 1e-4
  fd_mean = (loss(oracle.mean + eps * d_mean, x) - loss(oracle.mean - eps * d_mean, x)) / (2 * eps)
  fd_x = (loss(oracle.mean, x + eps * d_x) - loss(oracle.mean, x - eps * d_x)) / (2 * eps)
  np.testing.assert_allclose(jnp.sum(g_mean * d_mean), fd_mean, rtol=1e-6)
  np.testing.assert_allclose(jnp.sum(g_x * d_x), fd_x, rtol=1e-6)


@pytest.mark.parametrize("name", STOCHASTIC)
def test_a_sample_depends_on_its_own_key_not_on_the_batch(name):
  """With one key per sample (key.shape == (batch,)), a sample is the same in any batch it is drawn in."""
  oracle = _gaussian()
  x, keys = _x_T(oracle, n=6, seed=2), jax.random.split(jax.random.key(11), 6)
  grid = grids.uniform_logsnr(SCHEDULE, 6, final="zero")
  run = lambda x, keys: solvers.sample(name, oracle.denoiser(SCHEDULE), SCHEDULE, grid, x, key=keys).x  # noqa: E731
  full, part = run(x, keys), run(x[2:5], keys[2:5])
  np.testing.assert_allclose(part, full[2:5], rtol=1e-12, atol=1e-12)
  assert float(jnp.min(jnp.max(jnp.abs(run(x, keys[::-1]) - full), axis=1))) > 0  # other keys: other noise

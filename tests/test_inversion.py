"""The inversion API (solvers/inversion.py) and the naive inversions (solvers/ddim_inversion.py,
solvers/dpm_solver_inversion.py): the pinned timestep alignment, orders of the reversed integration,
round trips with and without guidance for every method, one compilation, vmap, gradients, bad input."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models import analytic
from solvers import base, ddim_inversion, grids, inversion, loop, predictions, schedules

SCHEDULE = schedules.VPLinear()
GMM = analytic.gmm(dim=6, seed=2)
EXACT = ("bdia", "bdia_edm", "edict")


def _x0(n=8, seed=1, oracle=GMM):
  return oracle.sample(jax.random.key(seed), n)


def _relative(a, b):
  return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))


def _round_trip(method, denoiser, grid, x0):
  latent = inversion.invert(method, denoiser, SCHEDULE, grid, x0)
  return inversion.regenerate(method, denoiser, SCHEDULE, grid, latent).x


class _Recorder:
  """A denoiser eps(x, t) = f(t) (independent of x) that records its call times (under disable_jit)."""

  def __init__(self):
    self.times = []

  def predict(self, kind, x, t, schedule):
    self.times.append(float(t))
    eps = jnp.sin(3.0 * t + jnp.arange(x.shape[-1], dtype=x.dtype)) * jnp.ones_like(x)
    return predictions.convert(eps, "eps", kind, x, t, schedule)


@pytest.mark.parametrize("final", ["zero", "t_end"])
def test_ddim_inversion_calls_the_model_at_the_sampling_times_in_reverse(final):
  """N inversion steps for N sampling steps (diffusers#3436), the first call at the last sampling time
  (diffusers#5145: -19 instead of 1), never at sigma = 0; with eps independent of x this alignment makes
  the round trip exact, and the other alignment does not."""
  grid = grids.uniform_t(SCHEDULE, 4, t_end=0.05, final=final, capacity=6)
  x0 = _x0(3)
  sampler, inverse = _Recorder(), _Recorder()
  with jax.disable_jit():
    latent = inversion.invert("ddim", inverse, SCHEDULE, grid, x0)
    x = inversion.regenerate("ddim", sampler, SCHEDULE, grid, latent).x
    current = _Recorder()
    other = inversion.get("ddim", alignment="current")
    x_other = inversion.regenerate(other, _Recorder(), SCHEDULE, grid, inversion.invert(other, current, SCHEDULE, grid, x0)).x
  sampling_times = list(np.asarray(grid.t[:4]))
  np.testing.assert_allclose(sampler.times, sampling_times, rtol=0, atol=1e-15)
  np.testing.assert_allclose(inverse.times, sampling_times[::-1], rtol=0, atol=1e-15)
  np.testing.assert_allclose(current.times, list(np.asarray(grid.t[1:5]))[::-1], rtol=0, atol=1e-15)
  assert _relative(x, x0) < 1e-13
  assert _relative(x_other, x0) > 1e-3


def test_reverse_grid_is_the_same_nodes_backwards_and_traceable():
  grid = grids.uniform_logsnr(SCHEDULE, 5, t_end=1e-3, final="zero", capacity=8)
  rev = grids.reverse(grid)
  n = int(grid.num_steps)
  for field in ("t", "alpha", "sigma", "lam"):
    a, r = np.asarray(getattr(grid, field)), np.asarray(getattr(rev, field))
    np.testing.assert_array_equal(r[: n + 1], a[: n + 1][::-1])
    np.testing.assert_array_equal(r[n + 1:], a[0])  # padding repeats the noise end
  assert int(rev.num_steps) == n
  jitted = jax.jit(grids.reverse)(grid)
  np.testing.assert_array_equal(np.asarray(jitted.t), np.asarray(rev.t))
  twice = grids.reverse(rev)
  np.testing.assert_array_equal(np.asarray(twice.t)[: n + 1], np.asarray(grid.t)[: n + 1])


@pytest.mark.parametrize("name,order", [("ddim", 1), ("dpm_solver_pp", 2)])
def test_naive_inversion_integrates_the_reversed_ode_with_its_order(name, order):
  """On the Gaussian the PF-ODE is solved in closed form: invert the exact x0 of a known x_T and compare."""
  gaussian = analytic.gaussian(dim=6)
  x_T = jax.random.normal(jax.random.key(0), (8, 6))
  errors = []
  steps = (40, 80, 160)
  for n in steps:
    grid = grids.uniform_logsnr(SCHEDULE, n, t_end=1e-3, final="zero", capacity=256)
    x0 = gaussian.pf_ode_solution(x_T, grid.alpha[0], grid.sigma[0], 1.0, 0.0)
    errors.append(_relative(inversion.invert(name, gaussian.denoiser(SCHEDULE), SCHEDULE, grid, x0).x, x_T))
  slopes = -np.diff(np.log(errors)) / np.diff(np.log(steps))
  assert np.all(np.abs(slopes - order) < 0.15), (errors, slopes)


def test_multistep_inversion_at_the_sampling_alignment_would_be_first_order():
  """Why DPM-Solver++ inversion evaluates at the current node: DDIM inversion's sampling alignment
  perturbs each model value by O(h); the 2M step inherits it. Written out here as the documented variant."""
  gaussian = analytic.gaussian(dim=6)
  x_T = jax.random.normal(jax.random.key(0), (8, 6))
  errors = []
  for n in (40, 80):
    grid = grids.uniform_logsnr(SCHEDULE, n, t_end=1e-3, final="t_end", capacity=128)
    x0 = gaussian.pf_ode_solution(x_T, grid.alpha[0], grid.sigma[0], grid.alpha[n], grid.sigma[n])
    rev, x, previous = grids.reverse(grid), x0, None
    for j in range(n):
      a_s, s_s, a_t, s_t = (float(v) for v in (rev.alpha[j], rev.sigma[j], rev.alpha[j + 1], rev.sigma[j + 1]))
      h = float(rev.lam[j + 1] - rev.lam[j])
      d = gaussian.x0(x, a_t, s_t)  # the model at the target time, on the current state
      a1, a2 = -np.expm1(-h), 1 + np.expm1(-h) / h
      if previous is None:
        x = (s_t / s_s) * x + a_t * a1 * d
      else:  # linear interpolation between the previous value (at lambda_j) and this one (at lambda_{j+1})
        x = (s_t / s_s) * x + a_t * (a1 * previous + a2 * (d - previous))
      previous = d
    errors.append(_relative(x, x_T))
  assert abs(np.log2(errors[0] / errors[1]) - 1.0) < 0.15, errors


@pytest.mark.parametrize("name", EXACT)
@pytest.mark.parametrize("scale", [1.0, 4.0])
def test_exact_round_trip_with_guidance(name, scale):
  """Exact inversion holds for any denoiser: a guided one at scale 4 (the GMM's class 1 vs the mixture)."""
  denoiser = predictions.Guided(inner=GMM.denoiser(SCHEDULE), cond=GMM.label(1), uncond=None, scale=scale)
  grid = grids.uniform_logsnr(SCHEDULE, 50, t_end=1e-3, final="zero")
  x0 = _x0()
  assert _relative(_round_trip(name, denoiser, grid, x0), x0) < 1e-10


def test_naive_round_trip_error_is_far_larger_and_grows_with_guidance():
  """DDIM / DPM-Solver++ inversion drift (field notes D): orders of magnitude above the exact methods,
  and larger at guidance 4 than at 1. Float64, 50 steps."""
  grid = grids.uniform_logsnr(SCHEDULE, 50, t_end=1e-3, final="zero")
  x0 = _x0()
  errors = {}
  for scale in (1.0, 4.0):
    denoiser = predictions.Guided(inner=GMM.denoiser(SCHEDULE), cond=GMM.label(1), uncond=None, scale=scale)
    for name in ("ddim", "dpm_solver_pp", "bdia", "edict"):
      errors[name, scale] = _relative(_round_trip(name, denoiser, grid, x0), x0)
  for scale in (1.0, 4.0):
    exact = max(errors["bdia", scale], errors["edict", scale])
    assert min(errors["ddim", scale], errors["dpm_solver_pp", scale]) > 1e6 * exact, errors
  assert errors["ddim", 4.0] > errors["ddim", 1.0], errors


@pytest.mark.parametrize("name", ["ddim", "bdia", "edict"])
def test_float32_round_trip(name):
  """Float32 at 50 steps: <= 1e-4 for the exact methods (bdia_edm in tests/test_bdia.py), DDIM far above."""
  gmm = analytic.gmm(dim=6, seed=2, dtype=jnp.float32)
  grid = grids.uniform_logsnr(SCHEDULE, 50, t_end=1e-3, final="zero")
  x0 = _x0(oracle=gmm)
  assert x0.dtype == jnp.float32
  x = _round_trip(name, gmm.denoiser(SCHEDULE), grid, x0)
  assert x.dtype == jnp.float32
  error = _relative(x, x0)
  assert (error < 1e-4) if name != "ddim" else (error > 1e-2), error


@pytest.mark.parametrize("name", ["dpm_solver_pp", "bdia", "edict"])
def test_one_compilation_vmap_and_nfe(name):
  denoiser = GMM.denoiser(SCHEDULE)
  x0 = _x0(4)
  short, long = (grids.uniform_logsnr(SCHEDULE, n, t_end=1e-3, final="zero", capacity=32) for n in (7, 20))
  inversion.invert(name, denoiser, SCHEDULE, short, x0, return_trajectory=True)
  before = loop.trace_count()
  latent, solution = inversion.invert(name, denoiser, SCHEDULE, long, x0 + 0.1, return_trajectory=True)
  assert loop.trace_count() == before
  per_step = 2 if name == "edict" else 1
  assert int(solution.nfe) == per_step * 20
  assert solution.trajectory.shape == (32,) + x0.shape
  np.testing.assert_array_equal(np.asarray(solution.trajectory[0]), np.asarray(x0 + 0.1))
  one = jax.vmap(lambda x: inversion.invert(name, denoiser, SCHEDULE, long, x[None] + 0.1).x[0])(x0)
  np.testing.assert_allclose(one, latent.x, rtol=1e-12, atol=1e-12)
  regenerated = inversion.regenerate(name, denoiser, SCHEDULE, long, latent)
  assert int(regenerated.nfe) == per_step * (19 if name == "bdia" else 20)  # BDIA restarts from the pair


@pytest.mark.parametrize("name", ["bdia", "edict"])
def test_gradient_of_the_round_trip_is_the_identity(name):
  """Both directions differentiate; the exact round trip's Jacobian is the identity to rounding, and the
  guidance scale (a leaf) gets a finite gradient through the inversion."""
  grid = grids.uniform_logsnr(SCHEDULE, 12, t_end=1e-3, final="zero", capacity=16)
  x0, weights = _x0(3), jax.random.normal(jax.random.key(7), (3, 6))

  def loss(x, scale):
    denoiser = predictions.Guided(inner=GMM.denoiser(SCHEDULE), cond=GMM.label(0), uncond=None, scale=scale)
    return jnp.sum(weights * _round_trip(name, denoiser, grid, x))

  grad_x, grad_scale = jax.grad(loss, argnums=(0, 1))(x0, 2.0)
  np.testing.assert_allclose(grad_x, weights, rtol=1e-8, atol=1e-8)
  assert abs(float(grad_scale)) < 1e-6  # the round trip does not depend on the scale

  latent_sum = jax.grad(lambda s: jnp.sum(inversion.invert(
      name, predictions.Guided(inner=GMM.denoiser(SCHEDULE), cond=GMM.label(0), uncond=None, scale=s),
      SCHEDULE, grid, x0).x))(2.0)
  assert np.isfinite(float(latent_sum)) and abs(float(latent_sum)) > 0


def test_bad_input():
  grid = grids.uniform_logsnr(SCHEDULE, 5, t_end=1e-3)
  denoiser = GMM.denoiser(SCHEDULE)
  with pytest.raises(ValueError, match="'nope' is unknown; valid: ddim, dpm_solver_pp, bdia, bdia_edm, edict"):
    inversion.get("nope")
  with pytest.raises(ValueError, match="does not take options"):
    inversion.get("ddim", gamma=0.5)
  with pytest.raises(ValueError, match=r"gamma=0\.0 must lie in \(0, 1\]"):
    inversion.get("bdia", gamma=0.0)
  with pytest.raises(ValueError, match=r"p=1\.5 must lie in \(0, 1\]"):
    inversion.get("edict", p=1.5)
  with pytest.raises(ValueError, match="alignment='late' is unknown; valid: sampling, current"):
    ddim_inversion.DDIMInversion(alignment="late")
  latent = inversion.invert("ddim", denoiser, SCHEDULE, grid, _x0(2))
  with pytest.raises(ValueError, match="bdia regenerates from the latent pair"):
    inversion.regenerate("bdia", denoiser, SCHEDULE, grid, latent)
  with pytest.raises(ValueError, match="latent must be the base.Latent"):
    inversion.regenerate("ddim", denoiser, SCHEDULE, grid, latent.x)
  with pytest.raises(ValueError, match="dtype int32"):
    inversion.invert("ddim", denoiser, SCHEDULE, grid, jnp.ones((2, 6), jnp.int32))
  assert isinstance(latent, base.Latent) and latent.partner is None


@pytest.fixture(scope="module")
def trained_mlp():
  """A small MLP trained for 300 steps on two moons (eps prediction, VP linear): errors are the network's."""
  from models import data, mlp, nets, training
  moons = data.load("two_moons", size=2048, seed=0)
  module = mlp.MLP(hidden=64, depth=2)
  params = module.init(jax.random.key(0), jnp.zeros((1, 2)), jnp.zeros(()), None)["params"]
  loss = training.DiffusionLoss(apply_fn=nets.ModuleApply(module), schedule=SCHEDULE, prediction="eps", time_label="t999")
  tx, lr = training.make_optimizer(2e-3, warmup_steps=20)
  state, step = training.init_state(params, tx, 0), training.make_train_step(loss, tx, lr, ema_decay=0.99)
  for i in range(300):
    state, metrics = step(state, data.batch(moons, i, 128, seed=0)[0], None)
  return nets.denoiser(module, state.ema_params, prediction="eps", time_label="t999"), moons.x[:16], float(metrics["loss"])


@pytest.mark.parametrize("dtype", [jnp.float64, jnp.float32])
def test_round_trip_with_a_trained_network(trained_mlp, dtype):
  """The same bounds with a trained MLP as the denoiser, and DDIM inversion far above them."""
  denoiser, x0, loss = trained_mlp
  assert loss < 0.9  # it learned something (the loss starts near 1)
  grid = grids.uniform_logsnr(SCHEDULE, 50, t_end=1e-3, final="zero")
  x0 = jnp.asarray(x0, dtype)
  errors = {name: _relative(_round_trip(name, denoiser, grid, x0), x0) for name in ("ddim", "bdia", "bdia_edm", "edict")}
  bound = 1e-10 if dtype == jnp.float64 else 1e-4
  assert max(errors[name] for name in EXACT) < bound, errors
  assert errors["ddim"] > 1e3 * max(errors[name] for name in EXACT), errors

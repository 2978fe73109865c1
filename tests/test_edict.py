"""EDICT (solvers/edict.py): the official algorithm written out (alternating updates, fixed mixing layer),
exact round trips for odd and even step counts with and without alternation, float32 error against p."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import solvers
from models import analytic
from solvers import edict, grids, inversion, schedules

SCHEDULE = schedules.VPLinear()
GMM = analytic.gmm(dim=6, seed=2)


def _relative(a, b):
  return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))


def _official_edict(oracle, grid, x, p, alternate):
  """Wallace et al.'s generation loop in numpy: on odd steps (when alternating) y is updated first from
  eps(x), then x from eps(y'); then the mixing layer x = p x + (1 - p) y, y = p y + (1 - p) x."""
  a_, s_ = np.asarray(grid.alpha, np.float64), np.asarray(grid.sigma, np.float64)
  pair = [np.asarray(x, np.float64), np.asarray(x, np.float64)]
  for i in range(int(grid.num_steps)):
    a = a_[i + 1] / a_[i]
    b = s_[i + 1] - a * s_[i]
    order = (1, 0) if alternate and i % 2 == 1 else (0, 1)
    for k in order:
      pair[k] = a * pair[k] + b * np.asarray(oracle.eps(pair[1 - k], a_[i], s_[i]))
    pair[0] = p * pair[0] + (1 - p) * pair[1]
    pair[1] = p * pair[1] + (1 - p) * pair[0]
  return pair


@pytest.mark.parametrize("alternate", [True, False])
def test_matches_the_official_generation_loop(alternate):
  grid = grids.uniform_logsnr(SCHEDULE, 7, t_end=1e-2)
  x = jax.random.normal(jax.random.key(0), (5, 6))
  solver = edict.EDICT(p=0.9, alternate=alternate)
  state = solvers.loop.integrate(solver, GMM.denoiser(SCHEDULE), SCHEDULE, grid, x)[1]
  expected = _official_edict(GMM, grid, x, 0.9, alternate)
  np.testing.assert_allclose(state.x, expected[0], rtol=1e-11, atol=1e-11)
  np.testing.assert_allclose(state.partner, expected[1], rtol=1e-11, atol=1e-11)


@pytest.mark.parametrize("steps", [25, 26])
@pytest.mark.parametrize("alternate", [True, False])
def test_exact_round_trip_for_odd_and_even_step_counts(steps, alternate):
  """The inversion mirrors the alternation by the sampling step index, so odd step counts are exact too."""
  grid = grids.uniform_logsnr(SCHEDULE, steps, t_end=1e-3, final="zero")
  denoiser, x0 = GMM.denoiser(SCHEDULE), GMM.sample(jax.random.key(4), 8)
  method = inversion.get("edict", alternate=alternate)
  latent = inversion.invert(method, denoiser, SCHEDULE, grid, x0)
  regenerated = inversion.regenerate(method, denoiser, SCHEDULE, grid, latent)
  assert _relative(regenerated.x, x0) < 1e-11
  assert int(regenerated.nfe) == 2 * steps
  mismatched = inversion.get("edict", alternate=not alternate)
  assert _relative(inversion.regenerate(mismatched, denoiser, SCHEDULE, grid, latent).x, x0) > 1e-4


def test_float32_round_trip_against_p():
  """Mixing damps the inversion's rounding: p = 0.93 holds 1e-4 at 50 steps; p = 1 (no mixing) is far worse."""
  gmm = analytic.gmm(dim=6, seed=2, dtype=jnp.float32)
  denoiser, x0 = gmm.denoiser(SCHEDULE), gmm.sample(jax.random.key(4), 16)
  grid = grids.uniform_logsnr(SCHEDULE, 50, t_end=1e-3, final="zero")

  def error(p):
    method = inversion.get("edict", p=p)
    return _relative(inversion.regenerate(method, denoiser, SCHEDULE, grid, inversion.invert(method, denoiser, SCHEDULE, grid, x0)).x, x0)

  default, unmixed = error(0.93), error(1.0)
  assert default < 1e-4 and unmixed > 30 * default, (default, unmixed)


def test_bad_mixing():
  with pytest.raises(ValueError, match=r"p=0\.0 must lie in \(0, 1\]"):
    edict.EDICT(p=0.0)
  with pytest.raises(ValueError, match=r"p=1\.1 must lie in \(0, 1\]"):
    edict.EDICTInversion(p=1.1)

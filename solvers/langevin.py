"""The Langevin corrector of the predictor-corrector samplers (Song et al. 2021, "Score-Based Generative
Modeling through Stochastic Differential Equations", Algorithms 4 and 5; score_sde's ``LangevinCorrector``).

At node i, before the predictor's step i (score_sde's order: corrector, then predictor, so the final
sample is never corrected), ``n_steps`` Langevin moves at the fixed time t_i, each one model call:
  s = score(x, t_i),  x <- x + step s + sqrt(2 step) z,  z ~ N(0, I),  with the step size (``step_size``)
  'ald':       2 (snr sigma_t)^2, score_sde's ``AnnealedLangevinDynamics`` (Song & Ermon 2019, Alg. 1, with
               the marginal sigma_t as the noise scale): per sample and data-independent (the default);
  'snr':       2 (snr ||z|| / ||s||)^2 with the norms of each sample (Song et al. 2021, Alg. 5);
  'snr_batch': the same with the norms averaged over the batch (the leading axis) first, as score_sde's
               ``LangevinCorrector`` does: a sample then depends on the rest of its batch.
For an eps model ||s|| ~ ||eps|| / sigma_t, so 'ald' is 'snr' with ||eps|| = ||z||. In low dimension the
per-sample ratio ||z|| / ||s|| has a heavy tail (||s|| -> 0 near a mode), and 'snr' overshoots there:
on a 2-D Gaussian it inflates the variance tenfold (tests/test_sde_samplers.py); it is meant for images.
score_sde also multiplies the step by a = 1 - beta_i of its discrete VP chain (0.98 <= a < 1 for
beta_max = 20, N = 1000; a = 1 for VE); here a = 1 for every schedule.

The step size does not shrink with the grid's steps, so the corrector's bias (that of unadjusted
Langevin, O(snr^2)) does not vanish as the step count grows: declared weak order 0.

``predictor`` is any solver whose step starts from the state's x (one-step and multistep solvers; the
multistep anchor moves with x). A corrector step with snr = 0 leaves x unchanged (tested: the bare
predictor's samples, with n_steps more NFE per step).
"""
import dataclasses
from typing import Any

import jax.numpy as jnp

from solvers import base
from solvers.ddim import DDIM
from solvers.dpm_solver_multistep import DPMSolverMultistep
from solvers.dpm_solver_sde import DPMSolverSDE
from solvers.euler_maruyama import EulerMaruyama

PREDICTORS = (EulerMaruyama, DDIM, DPMSolverSDE, DPMSolverMultistep)
STEP_SIZES = ("ald", "snr", "snr_batch")


@dataclasses.dataclass(frozen=True)
class LangevinCorrector(base.Solver):
  """``n_steps`` Langevin moves at each node before ``predictor``'s step (Song et al. 2021, Alg. 4-5):
  signal-to-noise ratio ``snr``, step-size rule ``step_size`` ('ald', 'snr', 'snr_batch'; module docstring)."""
  predictor: Any = EulerMaruyama()
  snr: float = 0.16
  n_steps: int = 1
  step_size: str = "ald"
  stochastic = True
  order = 0

  def __post_init__(self):
    if not isinstance(self.predictor, PREDICTORS):
      raise ValueError(f"predictor={self.predictor!r} is not supported; valid: "
                       f"{', '.join(cls.__name__ for cls in PREDICTORS)}")
    if isinstance(self.n_steps, bool) or not isinstance(self.n_steps, int) or self.n_steps < 1:
      raise ValueError(f"n_steps={self.n_steps!r} must be an integer >= 1")
    if not self.snr >= 0:
      raise ValueError(f"snr={self.snr!r} must be >= 0")
    base.check_options(self, (("step_size", STEP_SIZES),))

  def num_iterations(self, grid):
    return self.predictor.num_iterations(grid)

  def active(self, grid, i, state):
    return self.predictor.active(grid, i, state)

  def init(self, denoiser, schedule, grid, x, key):
    """The predictor's state."""
    return self.predictor.init(denoiser, schedule, grid, x, key)

  def coefficients(self, grid, schedule):
    """The predictor's table (the moves need none)."""
    return self.predictor.coefficients(grid, schedule)

  def _step(self, score, z, sigma):
    """The Langevin step size of ``step_size`` (module docstring); norms over all but the leading axis."""
    if self.step_size == "ald":
      return 2.0 * (self.snr * sigma) ** 2
    axes = tuple(range(1, z.ndim)) if z.ndim > 1 else None
    z_norm = jnp.sqrt(jnp.sum(z**2, axis=axes, keepdims=True))
    s_norm = jnp.sqrt(jnp.sum(score**2, axis=axes, keepdims=True))
    if self.step_size == "snr_batch":
      z_norm, s_norm = jnp.mean(z_norm), jnp.mean(s_norm)
    return 2.0 * (self.snr * z_norm / s_norm) ** 2

  def step(self, denoiser, schedule, grid, coeffs, i, state):
    """The Langevin moves at (x, t_i), then the predictor's step i: n_steps more model calls than the predictor."""
    x = state.x.astype(base.compute_dtype(state.x))
    for j in range(self.n_steps):
      score = denoiser.predict("score", x, grid.t[i], schedule)
      z = base.noise(state.key, x, i, j + 1)  # the predictor draws from the key folded with i alone
      size = self._step(score, z, grid.sigma[i].astype(x.dtype))
      x = x + size * score + jnp.sqrt(2.0 * size) * z
    x = x.astype(state.x.dtype)
    moved = {"anchor": x} if hasattr(state, "anchor") else {}
    state = state._replace(x=x, nfe=state.nfe + self.n_steps, **moved)
    return self.predictor.step(denoiser, schedule, grid, coeffs, i, state)


base.register("euler_maruyama_langevin", LangevinCorrector)

"""Naive DDIM inversion (Song et al. 2021, Sec. 4.3; Mokady et al. 2023, null-text inversion, Eq. 4).

Runs the sampling grid backwards (``grids.reverse``): the step that undoes sampling step i (node i to
node i + 1) goes from node i + 1 to node i with the noise-prediction DDIM map
  x_i = (alpha_i / alpha_{i+1}) x_{i+1} + (sigma_i - alpha_i sigma_{i+1} / alpha_{i+1}) eps_hat,
the inverse of the sampling step with eps evaluated at x_{i+1} instead of the unknown x_i.

**Alignment.** ``alignment='sampling'`` (the default) evaluates eps_hat(x_{i+1}, t_i): the model time of
sampling step i, so N steps make N calls at exactly the sampling times (diffusers' DDIMInverseScheduler,
null-text inversion and EDICT's baseline do this), and a grid ending at sigma = 0 is never evaluated
there. ``alignment='current'`` evaluates eps_hat(x_{i+1}, t_{i+1}), the explicit Euler step of the
reversed ODE (BDIA's inversion code): its first call is at the sampling grid's last node (sigma = 0 on a
final='zero' grid, where eps is undefined for a network) and it never calls the model at t_0. The two
off-by-one bugs diffusers had (N - 1 inversion steps for N sampling steps, a first model call at
timestep -19 instead of 1) are pinned by tests/test_inversion.py.

The inversion is inexact: regeneration evaluates eps at x_i, not x_{i+1}, so the round trip carries an
O(h) error per step that grows with guidance scale (field notes, section D).
"""
import dataclasses

from solvers import base, exponential

ALIGNMENTS = ("sampling", "current")


@dataclasses.dataclass(frozen=True)
class DDIMInversion(base.Solver):
  """DDIM inversion on a reversed grid (``grids.reverse``); see the module docstring."""
  alignment: str = "sampling"
  order = 1

  def __post_init__(self):
    base.check_options(self, (("alignment", ALIGNMENTS),))

  def coefficients(self, grid, schedule):
    """Per step: the noise-form DDIM weights of x and eps, and the time the model is evaluated at (alignment)."""
    x, m, _ = exponential.first_order_rows(grid, data=False)
    model_t = grid.t[1:] if self.alignment == "sampling" else grid.t[:-1]
    return {"x": x, "m": m, "t": model_t}

  def step(self, denoiser, schedule, grid, coeffs, i, state):
    """One inversion step toward the noise end: one model call."""
    c = base.cast_coefficients({"x": coeffs["x"], "m": coeffs["m"]}, state.x)
    eps = denoiser.predict("eps", state.x, coeffs["t"], schedule)
    x = c["x"] * state.x + c["m"] * eps
    return state._replace(x=x.astype(state.x.dtype), nfe=state.nfe + 1)

"""BDIA: bi-directional integration approximation (Zhang, Lewis & Kleijn 2024, "Exact Diffusion Inversion
via Bi-directional Integration Approximation", ECCV), for DDIM and for the EDM Heun sampler.

**BDIA-DDIM** (the paper's Eq. 20 / Algorithm 1, written with sampling indices: node 0 is the noise end).
With the one-step DDIM map Phi(z; i -> j) = alpha_j x0_hat(z, t_i) + sigma_j eps_hat(z, t_i), which uses
the model at (z, t_i) only, the first step is plain DDIM and every later step is
  x_{i+1} = Phi(x_i; i -> i+1) + gamma [x_{i-1} - Phi(x_i; i -> i-1)],
one model call per step like DDIM (gamma = 0 is DDIM). Because the model is evaluated at x_i alone, the
step solves exactly for x_{i-1}:
  x_{i-1} = Phi(x_i; i -> i-1) + [x_{i+1} - Phi(x_i; i -> i+1)] / gamma,
which ``BDIAInversion`` runs on the reversed grid from the data x_N. Its first step (to x_{N-1}) is DDIM
inversion with the sampling alignment (``DDIMInversion``); any x_{N-1} works, because regeneration starts
from the stored pair (x_0, x_1) and skips the plain-DDIM first step, so it retraces the inversion's own
model calls and recovers x_N up to rounding.

**BDIA-EDM** (the paper applies BDIA to EDM's Heun sampler, Sec. 5.1). In EDM's variables v = x / alpha,
rho = sigma / alpha, with d_i = eps_hat(x_i, t_i): the forward term is the Heun step from node i (Euler on
the step into sigma = 0, as EDM's Algorithm 1), the backward term the Euler step that reuses d_i,
  v_{i+1} = Heun(v_i; i -> i+1) + gamma [v_{i-1} - v_i - (rho_{i-1} - rho_i) d_i],
two model calls per step (one on the final step into sigma = 0). The paper's gamma for EDM and its exact
EDM form were not retrievable; this is the same construction as BDIA-DDIM with EDM's step.

**Accuracy** (our analysis, measured in tests/test_bdia.py): the local error is (1 - gamma) times that of
the forward step, so BDIA-DDIM is first order for gamma < 1. At gamma = 1 it is the two-step leapfrog
scheme: time-reversible but only marginally stable (its parasitic root -gamma has modulus one), and the
inversion divides by gamma, so rounding grows like gamma^{-N/2}: gamma near 1 and float64 for editing,
as the paper does (gamma in [0.92, 1], float64 models). BDIA-EDM's Heun/Euler pair is not symmetric: it
stays first order at gamma = 1 and its float32 round trip is best near gamma = 0.9 (1e-5 at 50 steps; 2e-3
at gamma = 1). Defaults: gamma = 0.5 (the paper's text-to-image setting at 10 steps) for the samplers
``bdia_ddim`` and ``bdia_edm``; 0.96 (DDIM) and 0.9 (EDM) for inversion (``solvers.inversion``).
"""
import dataclasses

import jax
import jax.numpy as jnp

from solvers import base, exponential


def _ddim_map(grid, direction):
  """(x weight, x0_hat weight) of the x0-form DDIM map from node i to node i + direction (+1 or -1), one
  row per i; row 0's map to node -1 is the identity (its weight is never used)."""
  def shifted(a):
    return a[1:] if direction > 0 else jnp.concatenate([a[:1], a[:-2]])
  s_s = grid.sigma[:-1]
  s_s = jnp.where(s_s > 0, s_s, 1.0)  # a sigma = 0 node is never stepped from by this map
  x, m, _ = exponential.first_order_weights(grid.alpha[:-1], s_s, shifted(grid.alpha), shifted(grid.sigma),
                                            shifted(grid.lam) - grid.lam[:-1], data=True)
  return x, m


def _first_inversion_row(grid):
  """DDIM inversion's first step (sampling alignment) on x0_hat at t_1: x' = cx x + cm x0_hat."""
  a, b, _ = exponential.first_order_weights(grid.alpha[0], grid.sigma[0], grid.alpha[1], grid.sigma[1],
                                            grid.lam[1] - grid.lam[0], data=False)
  return a + b / grid.sigma[1], -b * grid.alpha[1] / grid.sigma[1]


def _check_gamma(gamma, inverse):
  low = 0.0
  if not (low < gamma <= 1.0 if inverse else low <= gamma <= 1.0):
    allowed = "(0, 1] (the inversion divides by gamma)" if inverse else "[0, 1]"
    raise ValueError(f"gamma={gamma!r} must lie in {allowed}")


def _pair_init(x, key, start):
  """Sampling starts from x_T (partner x_T, first step plain); regeneration from a stored Latent pair."""
  zero = jnp.zeros((), jnp.int32)
  if isinstance(start, base.Latent):
    return base.PairState(x=start.partner, partner=start.x, nfe=zero, key=key, start=jnp.ones((), jnp.int32))
  return base.PairState(x=start, partner=start, nfe=zero, key=key, start=zero)


@dataclasses.dataclass(frozen=True)
class _BDIASampler(base.Solver):
  """Shared by BDIA's samplers: gamma, the pair state and the skipped first step when starting from a pair."""
  gamma: float = 0.5

  def __post_init__(self):
    _check_gamma(self.gamma, inverse=False)

  def init(self, denoiser, schedule, grid, x, key):
    return _pair_init(x, key, x)

  def active(self, grid, i, state):
    return (i >= state.start) & (i < grid.num_steps)


@dataclasses.dataclass(frozen=True)
class BDIA(_BDIASampler):
  """BDIA-DDIM sampler (Zhang, Lewis & Kleijn 2024, Eq. 20); regenerates from a ``base.Latent`` pair."""

  @property
  def order(self):
    """First order for gamma < 1 (the local error is (1 - gamma) times DDIM's); leapfrog at gamma = 1: second."""
    return 2 if self.gamma == 1.0 else 1

  def coefficients(self, grid, schedule):
    """Per-step rows: the forward (i -> i+1) and backward (i -> i-1) DDIM maps and gamma (0 on the first step)."""
    (fx, fm), (bx, bm) = _ddim_map(grid, +1), _ddim_map(grid, -1)
    gamma = jnp.where(jnp.arange(grid.capacity - 1) == 0, 0.0, self.gamma)
    return {"fx": fx, "fm": fm, "bx": bx, "bm": bm, "gamma": gamma}

  def step(self, denoiser, schedule, grid, coeffs, i, state):
    """Eq. 20: x_{i+1} = Phi(x_i; i -> i+1) + gamma [x_{i-1} - Phi(x_i; i -> i-1)], one model call."""
    c = base.cast_coefficients(coeffs, state.x)
    x0 = denoiser.predict("x0", state.x, grid.t[i], schedule)
    forward = c["fx"] * state.x + c["fm"] * x0
    backward = c["bx"] * state.x + c["bm"] * x0
    x = forward + c["gamma"] * (state.partner - backward)
    return state._replace(x=x.astype(state.x.dtype), partner=state.x, nfe=state.nfe + 1)


@dataclasses.dataclass(frozen=True)
class BDIAInversion(base.Solver):
  """The exact inverse of ``BDIA`` on the reversed grid; its final state's (x, partner) is the Latent."""
  gamma: float = 0.96
  order = 1

  def __post_init__(self):
    _check_gamma(self.gamma, inverse=True)

  def init(self, denoiser, schedule, grid, x, key):
    return _pair_init(x, key, x)

  def coefficients(self, grid, schedule):
    """Rows undoing sampling step N - j on the reversed grid; row 0 is DDIM inversion (sampling alignment)."""
    # Row j undoes sampling step N - j: the current node is j, "forward" (the sampling direction) is
    # node j - 1 and "backward" node j + 1 of the reversed grid; row 0 is DDIM inversion.
    (fx, fm), (bx, bm) = _ddim_map(grid, -1), _ddim_map(grid, +1)
    first = jnp.arange(grid.capacity - 1) == 0
    cx, cm = _first_inversion_row(grid)
    return {"fx": jnp.where(first, 0.0, fx), "fm": jnp.where(first, 0.0, fm),
            "bx": jnp.where(first, cx, bx), "bm": jnp.where(first, cm, bm),
            "inv_gamma": jnp.where(first, 0.0, 1.0 / self.gamma),
            "t": jnp.where(first, grid.t[1], grid.t[:-1])}

  def step(self, denoiser, schedule, grid, coeffs, i, state):
    """Eq. 20 solved for the earlier node: x_{i-1} = Phi(x_i; i -> i-1) + [x_{i+1} - Phi(x_i; i -> i+1)] / gamma."""
    c = base.cast_coefficients({k: v for k, v in coeffs.items() if k != "t"}, state.x)
    x0 = denoiser.predict("x0", state.x, coeffs["t"], schedule)
    forward = c["fx"] * state.x + c["fm"] * x0
    backward = c["bx"] * state.x + c["bm"] * x0
    x = backward + c["inv_gamma"] * (state.partner - forward)
    return state._replace(x=x.astype(state.x.dtype), partner=state.x, nfe=state.nfe + 1)


def _edm_rows(grid, current, forward, backward, out):
  """Coefficients of BDIA-EDM's terms from node ``current`` (index arrays over the rows), all written in x
  at node ``out`` (v = x / alpha scaled back by alpha_out, so no term carries the 1 / alpha growth of v):
  the Euler predictor to ``forward`` (in x at ``forward``), the Heun step to ``forward``, the Euler step to
  ``backward`` and the weight of the partner, which sits at the node that is neither current nor out."""
  alpha, rho = grid.alpha, grid.sigma / grid.alpha
  a_c, a_f, a_o = alpha[current], alpha[forward], alpha[out]
  partner = jnp.where(out == forward, backward, forward)
  return {"pred_x": a_f / a_c, "pred_d": a_f * (rho[forward] - rho[current]),
          "x": a_o / a_c, "heun_d": a_o * (rho[forward] - rho[current]), "euler_d": a_o * (rho[backward] - rho[current]),
          "partner": a_o / alpha[partner], "heun": grid.sigma[forward] > 0, "t_forward": grid.t[forward]}


def _edm_terms(denoiser, schedule, grid, i, x, c):
  """(Heun step, backward Euler step, model calls) of BDIA-EDM at node i, in x at the row's out node.

  The Heun correction is skipped on a step into sigma = 0 (EDM's Algorithm 1, line 6)."""
  d = denoiser.predict("eps", x, grid.t[i], schedule)
  euler = c["x"] * x + c["heun_d"] * d

  def heun(_):
    d2 = denoiser.predict("eps", (c["pred_x"] * x + c["pred_d"] * d).astype(x.dtype), c["t_forward"], schedule)
    return c["x"] * x + c["heun_d"] * 0.5 * (d + d2)

  forward = jax.lax.cond(c["heun"], heun, lambda _: euler, None)
  backward = c["x"] * x + c["euler_d"] * d
  return forward, backward, 1 + c["heun"].astype(jnp.int32)


def _cast_edm_rows(coeffs, x):
  numeric = base.cast_coefficients({k: v for k, v in coeffs.items() if k not in ("heun", "t_forward")}, x)
  return {**numeric, "heun": coeffs["heun"], "t_forward": coeffs["t_forward"]}


@dataclasses.dataclass(frozen=True)
class BDIAEDM(_BDIASampler):
  """BDIA on EDM's Heun sampler (Zhang, Lewis & Kleijn 2024, Sec. 5.1); regenerates from a ``base.Latent`` pair."""

  @property
  def order(self):
    """Heun's 2 at gamma = 0; first order otherwise (the backward Euler term is first order, even at gamma = 1)."""
    return 2 if self.gamma == 0.0 else 1

  def coefficients(self, grid, schedule):
    """Per-step rows of the Heun step to i+1, the Euler step back to i-1 and the partner weight, in x at node i+1."""
    i = jnp.arange(grid.capacity - 1)
    rows = _edm_rows(grid, i, i + 1, jnp.maximum(i - 1, 0), i + 1)
    rows["gamma"] = jnp.where(i == 0, 0.0, self.gamma)
    return rows

  def step(self, denoiser, schedule, grid, coeffs, i, state):
    """Heun(x_i; i -> i+1) + gamma [x_{i-1} - Euler(x_i; i -> i-1)] (EDM's Heun as BDIA's forward map, Sec. 5.1)."""
    c = _cast_edm_rows(coeffs, state.x)
    forward, backward, calls = _edm_terms(denoiser, schedule, grid, i, state.x, c)
    x = forward + c["gamma"] * (c["partner"] * state.partner - backward)
    return state._replace(x=x.astype(state.x.dtype), partner=state.x, nfe=state.nfe + calls)


@dataclasses.dataclass(frozen=True)
class BDIAEDMInversion(base.Solver):
  """The exact inverse of ``BDIAEDM`` on the reversed grid; row 0 is DDIM inversion."""
  gamma: float = 0.9
  order = 1

  def __post_init__(self):
    _check_gamma(self.gamma, inverse=True)

  def init(self, denoiser, schedule, grid, x, key):
    return _pair_init(x, key, x)

  def coefficients(self, grid, schedule):
    """Rows undoing sampling step N - j on the reversed grid, written in x at the earlier node; row 0 is DDIM inversion."""
    # The sampling direction is towards node i - 1 of the reversed grid; the output is node i + 1.
    i = jnp.arange(grid.capacity - 1)
    rows = _edm_rows(grid, i, jnp.maximum(i - 1, 0), i + 1, i + 1)
    rows["inv_gamma"] = jnp.where(i == 0, 0.0, 1.0 / self.gamma)
    return rows

  def step(self, denoiser, schedule, grid, coeffs, i, state):
    """BDIA-EDM's step solved for the earlier node (divides by gamma); the model is called at the current node only."""
    def first(s):
      cx, cm = base.cast_coefficients(_first_inversion_row(grid), s.x)
      x0 = denoiser.predict("x0", s.x, grid.t[1], schedule)
      return s._replace(x=(cx * s.x + cm * x0).astype(s.x.dtype), partner=s.x, nfe=s.nfe + 1)

    def later(s):
      c = _cast_edm_rows(coeffs, s.x)
      forward, backward, calls = _edm_terms(denoiser, schedule, grid, i, s.x, c)
      x = backward + c["inv_gamma"] * (c["partner"] * s.partner - forward)
      return s._replace(x=x.astype(s.x.dtype), partner=s.x, nfe=s.nfe + calls)

    return jax.lax.cond(i == 0, first, later, state)


base.register("bdia_ddim", BDIA)
base.register("bdia_edm", BDIAEDM)

"""The EDM samplers (Karras, Aittala, Aila & Laine 2022, "Elucidating the Design Space of Diffusion-Based
Generative Models", NeurIPS): Euler and Heun (Algorithm 1) and the stochastic sampler with churn (Algorithm 2).

**Any schedule.** EDM's ODE (Eq. 4) for x = s(t) x_hat with noise level sigma(t) of x_hat becomes, with the
paper's choice sigma(t) = t, s(t) = 1 (Table 1, "ours") applied to the rescaled sample,
  dv / d rho = (v - D(v; rho)) / rho = eps_hat,   v = x / alpha,  rho = sigma / alpha,
so every step runs on (v, rho) and is written back in x = alpha v; the model is called through the
prediction layer at the schedule's time t(rho) (``Denoiser.predict('eps', ...)``). Stepping the model's own
t with its s(t) (the paper's columns for the original VP / VE samplers) is another discretisation and is
not implemented. In (v, rho) the Euler step is DDIM (``ddim_eps``), and Heun is rhoRK-DEIS '2heun' except
on the step into sigma = 0 (tests/test_edm.py checks both identities).

**One step** from node i to i + 1 (Algorithm 2, lines 4-8; Algorithm 1 is S_churn = 0):
  gamma_i = min(S_churn / N, sqrt(2) - 1) if S_tmin <= rho_i <= S_tmax else 0,   rho_hat = (1 + gamma_i) rho_i,
  v_hat = v_i + S_noise sqrt(rho_hat^2 - rho_i^2) z,   z ~ N(0, I) from ``base.step_key(key, i)``,
  d = eps_hat(v_hat, rho_hat),   v_{i+1} = v_hat + (rho_{i+1} - rho_hat) d                    (Euler),
  d' = eps_hat(v_{i+1}, rho_{i+1}),   v_{i+1} = v_hat + (rho_{i+1} - rho_hat) (d + d') / 2   (Heun correction),
with N = ``grid.num_steps``. The correction is skipped on a step into sigma = 0 (Algorithm 1, line 6), so
Heun costs 2N - 1 model calls on a grid ending at sigma = 0 (the EDM grid, ``grids.edm``) and 2N on a grid
ending at sigma > 0. Each Heun step is two loop iterations (predictor, then corrector), so the skipped
correction makes no model call; every iteration makes exactly one.

**Churn settings** (Table 5, ``CHURN_SETTINGS``): CIFAR-10 VP (S_churn, S_tmin, S_tmax, S_noise) =
(30, 0.01, 1, 1.007), the registered ``edm_heun_churn``; CIFAR-10 VE (80, 0.05, 1, 1.007); ImageNet-64
(80 for the pre-trained ADM model, 40 for EDM's own; 0.05, 50, 1.003). S_noise > 1 deliberately adds more
noise than the exact churn (the paper offsets the networks' tendency to remove too much noise), so it
biases the sampler of an exact denoiser slightly. S_tmin, S_tmax compare with rho.
"""
import dataclasses
import math
from typing import Any, NamedTuple

import jax.numpy as jnp

from solvers import base, deis

METHODS = ("euler", "heun")
MAX_GAMMA = math.sqrt(2.0) - 1.0
CHURN_SETTINGS = {
    "cifar10_vp": {"S_churn": 30.0, "S_tmin": 0.01, "S_tmax": 1.0, "S_noise": 1.007},
    "cifar10_ve": {"S_churn": 80.0, "S_tmin": 0.05, "S_tmax": 1.0, "S_noise": 1.007},
    "imagenet64_adm": {"S_churn": 80.0, "S_tmin": 0.05, "S_tmax": 50.0, "S_noise": 1.003},
    "imagenet64_edm": {"S_churn": 40.0, "S_tmin": 0.05, "S_tmax": 50.0, "S_noise": 1.003},
}


class EDMState(NamedTuple):
  """The EDM sampler's state: the current point, the step's start x_hat and the last slope."""
  x: jnp.ndarray       # after a predictor: the Euler point; after a corrector: the step's result
  anchor: jnp.ndarray  # x_hat, where the current step starts (after the churn)
  slope: jnp.ndarray   # the last model output eps_hat
  nfe: jnp.ndarray
  key: Any


@dataclasses.dataclass(frozen=True)
class EDM(base.Solver):
  """EDM Euler / Heun with optional churn (Karras et al. 2022, Algorithm 2; module docstring); S_churn = 0 is the
  deterministic Algorithm 1."""
  method: str = "heun"
  S_churn: float = 0.0
  S_tmin: float = 0.0
  S_tmax: float = math.inf
  S_noise: float = 1.0

  def __post_init__(self):
    base.check_options(self, (("method", METHODS),))
    if not (0.0 <= self.S_churn < math.inf):
      raise ValueError(f"S_churn={self.S_churn!r} must be finite and >= 0")
    if not (0.0 <= self.S_tmin <= self.S_tmax):
      raise ValueError(f"S_tmin={self.S_tmin!r}, S_tmax={self.S_tmax!r}: need 0 <= S_tmin <= S_tmax")
    if not (0.0 < self.S_noise < math.inf):
      raise ValueError(f"S_noise={self.S_noise!r} must be finite and > 0")

  @property
  def order(self):
    """2 for Heun, 1 for Euler."""
    return 2 if self.method == "heun" else 1

  @property
  def stochastic(self):
    """Whether S_churn > 0 (Algorithm 2; then ``sample`` needs a key)."""
    return self.S_churn > 0

  @property
  def stages(self):
    """Loop iterations (= model calls) per step: predictor, and the corrector for Heun."""
    return 2 if self.method == "heun" else 1

  def num_iterations(self, grid):
    return self.stages * (grid.capacity - 1)

  def active(self, grid, i, state):
    step, stage = i // self.stages, i % self.stages
    next_sigma = grid.sigma[jnp.minimum(step + 1, grid.capacity - 1)]
    return (step < grid.num_steps) & ((stage == 0) | (next_sigma > 0))

  def coefficients(self, grid, schedule):
    """One row per iteration: where the model is called, and the weights of the churn and of the update."""
    rho, drho = deis.rho_steps(grid)
    gamma = jnp.minimum(self.S_churn / grid.num_steps, MAX_GAMMA)
    churned = (rho >= self.S_tmin) & (rho <= self.S_tmax) & (rho > 0) & (gamma > 0)
    gamma = jnp.where(churned, gamma, 0.0)
    rho_hat = rho * (1.0 + gamma)
    lam_hat = -jnp.log(jnp.where(churned, rho_hat, 1.0))
    t_hat = jnp.where(churned, schedule.t_of_lambda(lam_hat), grid.t[:-1])
    alpha_hat = jnp.where(churned, schedule.alpha_sigma_of_lambda(lam_hat)[0], grid.alpha[:-1])
    alpha_next = grid.alpha[1:]
    predictor = {
        "t": t_hat,
        "scale": alpha_hat / grid.alpha[:-1],
        # alpha_hat S_noise sqrt(rho_hat^2 - rho^2) = alpha_hat S_noise rho sqrt(gamma (2 + gamma))
        "noise": alpha_hat * self.S_noise * rho * jnp.sqrt(gamma * (2.0 + gamma)),
        "predictor": jnp.ones_like(rho),
        "x": alpha_next / alpha_hat,
        "d": alpha_next * (drho - gamma * rho),
    }
    if self.method == "euler":
      return predictor
    corrector = dict(predictor, t=grid.t[1:], scale=jnp.ones_like(rho), noise=jnp.zeros_like(rho),
                     predictor=jnp.zeros_like(rho))
    # Interleave: row 2i is step i's predictor, row 2i + 1 its corrector.
    return {k: jnp.stack([predictor[k], corrector[k]], axis=1).reshape(-1) for k in predictor}

  def init(self, denoiser, schedule, grid, x, key):
    """An ``EDMState`` at x."""
    return EDMState(x=x, anchor=x, slope=jnp.zeros_like(x), nfe=jnp.zeros((), jnp.int32), key=key)

  def step(self, denoiser, schedule, grid, coeffs, i, state):
    """Predictor rows: churn, then Euler from (x_hat, rho_hat). Corrector rows: Heun from the same x_hat."""
    c = base.cast_coefficients({k: v for k, v in coeffs.items() if k != "t"}, state.x)
    x_eval = c["scale"] * state.x
    if self.stochastic:
      z = base.noise(state.key, state.x, i // self.stages).astype(x_eval.dtype)
      x_eval = x_eval + c["noise"] * z
    eps = denoiser.predict("eps", x_eval.astype(state.x.dtype), coeffs["t"], schedule)
    is_predictor = c["predictor"] > 0
    start = jnp.where(is_predictor, x_eval, state.anchor)
    slope = jnp.where(is_predictor, eps, 0.5 * (state.slope + eps))
    x = (c["x"] * start + c["d"] * slope).astype(state.x.dtype)
    return state._replace(x=x, anchor=start.astype(state.x.dtype), slope=eps, nfe=state.nfe + 1)


base.register("edm_euler", lambda: EDM(method="euler"))
base.register("edm_heun", EDM)
base.register("edm_heun_churn", lambda: EDM(**CHURN_SETTINGS["cifar10_vp"]))

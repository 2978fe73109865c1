"""DEIS: the diffusion exponential integrator sampler (Zhang & Chen 2023, "Fast Sampling of Diffusion Models
with Exponential Integrator", ICLR), in its three published variants, plus diffusers' log-rho variant.

The probability-flow ODE in noise prediction, for any schedule x_t = alpha_t x0 + sigma_t eps, is
  d(x / alpha) / dt = eps_hat(x, t) d rho / dt,   rho = sigma / alpha = exp(-lambda),
(from dx/dt = (alpha'/alpha) x + (sigma' - alpha' sigma / alpha) eps_hat), so with v = x / alpha
  x_{i+1} = (alpha_{i+1} / alpha_i) x_i + alpha_{i+1} int_{t_i}^{t_{i+1}} rho'(tau) eps_hat(tau) dtau.   (*)
For VP schedules this is the paper's exponential integrator x_{i+1} = Psi(t_{i+1}, t_i) x_i +
int Psi(t_{i+1}, tau) w(tau) eps_hat dtau with Psi(t, s) = sqrt(abar_t / abar_s) = alpha_t / alpha_s and
w = -(1/2) (d log abar / dtau) / sqrt(1 - abar): both integrands equal -alpha_{i+1} alpha'(tau) /
(sigma alpha^2) (checked in tests/test_deis.py). Step i evaluates eps_i = eps_hat(x_i, t_i) once and keeps
the last few outputs (newest first); it runs on the shared ``exponential.table_step`` with anchor
coefficient alpha_{i+1} / alpha_i.

- **tAB-DEIS** (``method='t_ab'``, registered ``deis_tab1`` .. ``deis_tab3``): eps_hat in (*) replaced by its
  Lagrange interpolant in **t** through (t_i, eps_i), ..., (t_{i-q}, eps_{i-q}), q = min(r, i) (warm-up):
    x_{i+1} = (alpha_{i+1} / alpha_i) x_i + sum_j C_ij eps_{i-j},
    C_ij = alpha_{i+1} int_{t_i}^{t_{i+1}} rho'(tau) l_j(tau) dtau.
- **rhoAB-DEIS** (``method='rho_ab'``, ``deis_rhoab1``, ``deis_rhoab2``): v_{i+1} = v_i + sum_j C_ij eps_{i-j},
  C_ij = int_{rho_i}^{rho_{i+1}} l_j(rho) d rho with the Lagrange basis in **rho** on rho_i, ..., rho_{i-q};
  as a table step the history weights are alpha_{i+1} C_ij. Degree 3 (``DEISMultistep(3, 'rho_ab')``) is
  4th order but not registered: on the battery's Gaussian it is still pre-asymptotic at 40/80/160 steps
  (successive orders 3.4, 3.7, then 3.8, 3.9 at 320, 640; slope 3.5), so it could pass neither as order 4
  nor as 3; tests/test_deis.py measures it at 160/320/640 steps.
- **rhoRK-DEIS** (``DEISRungeKutta``, ``deis_rhork_2heun``, ``_3kutta``, ``_4rk``): an explicit Runge-Kutta
  method on dv / d rho = eps_hat(alpha(rho) v, t(rho)) (tableaus below, ``TABLEAUS``); NFE = stages per step.
- **log-rho AB** (``deis_logrho()``, ``deis_logrho_2``, ``deis_logrho_3``): diffusers' ``DEISMultistepScheduler``
  (diffusers PR #1432), see its docstring.

**Naming.** The official API counts the polynomial *degree* r (``ab_order``): tAB/rhoAB with ab_order = r
have order r + 1 and ``deis_tab{r}`` / ``deis_rhoab{r}`` carry the degree (``deis_tab3`` is 4th order;
degree 0 is DDIM and is not registered). diffusers counts the *order* (``solver_order`` = r + 1), and
``deis_logrho_{k}`` follows diffusers: ``deis_logrho_2`` is second order. The rhoRK names are the official
``rk_method`` names, whose digit is the order.

**Coefficients.** Everything is computed once per grid, outside the loop, as arrays indexed by step, in
float64 when x64 is on; the traced ``num_steps`` only enters through jnp (warm-up degree min(r, i) is a
``jnp.minimum``), so one compilation serves every step count. The tAB weights and the rhoRK stage times and
alphas need t(lambda) between grid nodes, which the schedule gives.
- tAB: the integral in (*) is taken in lambda, int rho'(tau) l_j(tau) dtau = -int e^{-lambda} l_j(t(lambda))
  dlambda, by Gauss-Legendre with ``quadrature_nodes`` (16) nodes per step. In t, rho'(t) of a VP schedule
  has a sqrt(t) singularity at t = 0 just outside [t_min, t_max]; 16 nodes in t leave ~1e-4 relative error
  on the last step of a 10-step uniform-t grid, 16 nodes in lambda reach 1e-16 (measured against adaptive
  quadrature). C_i0 = alpha_{i+1} (rho_{i+1} - rho_i) - sum_{j >= 1} C_ij, so the weights of a constant
  eps sum to the exact DDIM weight, and degree 0 is DDIM's noise form to round-off. The official code
  (``jax_deis``) takes these integrals with a 10,000-point left Riemann sum in t (spec pitfall P11), so
  its coefficients differ from these by ~1e-4 relative (max over steps 1e-4 to 2e-4, measured for degree 3
  on 10- and 40-step uniform-t, quadratic-t and logSNR grids of VP linear); samples differ accordingly.
- rhoAB: the integrands are polynomials of degree <= 3 in rho, integrated exactly by 4-point
  Gauss-Legendre (exact to degree 7); C_i0 as above.

**End at sigma = 0** (``final='zero'``, rho_{i+1} = 0):
- tAB takes a first-order (DDIM) step: the grid's time of the sigma = 0 node is not a point of the
  t-parametrisation for every schedule (for a discrete or VE schedule it repeats the last time), and
  rho'(t) is singular there for VP. (DPM-Solver and diffusers force the same first order step.)
- rhoAB keeps its full degree: rho_{i+1} = 0 is an ordinary node of the rho-polynomial.
- rhoRK: a stage at rho = 0 would evaluate eps_hat at sigma = 0, which is 0/0 for a model predicting
  x0. A step that ends at sigma = 0 therefore uses an explicit method of the same stage count whose stages
  all lie at rho > 0: Ralston's 2nd order for '2heun' (c = 0, 2/3), Ralston's 3rd order for '3kutta'
  (c = 0, 1/2, 3/4) and for '4rk' (every 4-stage 4th-order explicit method has c_4 = 1, so this one step is
  3rd order, which keeps the global order 4; the 4th stage is evaluated at the 3rd stage's point and
  weighted 0: one unused model call, counted in the NFE). Stages between rho_i and 0 get their time
  from the schedule's t(lambda) (below t_min, clamped to 0 for discrete tables).
"""
import dataclasses

import jax.numpy as jnp
import numpy as np

from solvers import base, dpm_solver_multistep, exponential

METHODS = ("t_ab", "rho_ab")
MAX_DEGREE = 3


def gauss_legendre(num_nodes):
  """Gauss-Legendre nodes and weights on [0, 1] (numpy float64); exact for polynomials of degree 2n - 1."""
  u, w = np.polynomial.legendre.leggauss(int(num_nodes))
  return (u + 1.0) / 2.0, w / 2.0


def lagrange_integrals(nodes, points, weights, total, degree, max_degree):
  """Integrals of the Lagrange basis, one row per step.

  nodes: (n, max_degree + 1) interpolation nodes of each step, newest first; points, weights: (n, K) a
  quadrature rule of the step's measure mu; total: (n,) the exact mu of the interval; degree: (n,) int, the
  polynomial degree q of each step. Row i holds int l_j dmu for the basis on nodes[i, :q + 1] (zero for
  j > q); its column 0 is total - sum_{j >= 1}, since the basis sums to one.
  """
  n = nodes.shape[0]
  zeros = jnp.zeros((n, max_degree + 1), total.dtype)
  out = zeros.at[:, 0].set(total)
  for q in range(1, max_degree + 1):
    cols = []
    for j in range(1, q + 1):
      basis = jnp.ones_like(points)
      for m in range(q + 1):
        if m != j:
          denom = nodes[:, j] - nodes[:, m]
          denom = jnp.where(denom == 0, 1.0, denom)  # absent nodes (warm-up rows, padding): never selected
          basis = basis * (points - nodes[:, m:m + 1]) / denom[:, None]
      cols.append(jnp.sum(weights * basis, axis=1))
    rest = jnp.stack(cols, axis=1)
    row = jnp.concatenate([(total - jnp.sum(rest, axis=1))[:, None], rest, zeros[:, q + 1:]], axis=1)
    out = jnp.where((degree == q)[:, None], row, out)
  return out


def history_nodes(values, max_degree):
  """(n, max_degree + 1): row i holds values[i], values[i - 1], ..., values[i - max_degree] (0 before the start)."""
  return jnp.stack([exponential.previous(values, j, 0.0) for j in range(max_degree + 1)], axis=1)


def ddim_weight(grid):
  """alpha_{i+1} (rho_{i+1} - rho_i) per step, as DDIM's noise form computes it (finite at sigma_{i+1} = 0)."""
  a_s, a_t, s_s, s_t = grid.alpha[:-1], grid.alpha[1:], grid.sigma[:-1], grid.sigma[1:]
  h = exponential.step_sizes(grid)
  finite = s_t > 0
  return jnp.where(finite, -s_t * jnp.expm1(jnp.where(finite, h, 0.0)), -a_t * s_s / a_s)


def rho_steps(grid):
  """(rho_i, rho_{i+1} - rho_i) per step, from lambda (rho = 0 exactly at a sigma = 0 node)."""
  rho = jnp.exp(-grid.lam)
  h = exponential.step_sizes(grid)
  h = jnp.where(jnp.isnan(h), 0.0, h)
  return rho[:-1], rho[:-1] * jnp.expm1(-h)


@dataclasses.dataclass(frozen=True)
class DEISMultistep(base.Solver):
  """tAB-DEIS (``method='t_ab'``) and rhoAB-DEIS (``'rho_ab'``) of Zhang & Chen 2023, with polynomial degree
  ``ab_order`` = r; ``quadrature_nodes`` Gauss-Legendre nodes per step for the tAB integrals."""
  ab_order: int = 3
  method: str = "t_ab"
  quadrature_nodes: int = 16

  def __post_init__(self):
    if self.ab_order not in range(MAX_DEGREE + 1):
      raise ValueError(f"ab_order={self.ab_order!r} (the polynomial degree) is not supported; valid: 0, 1, 2, 3")
    if self.method not in METHODS:
      raise ValueError(f"method={self.method!r} is unknown; valid: {', '.join(METHODS)}")
    if isinstance(self.quadrature_nodes, bool) or not isinstance(self.quadrature_nodes, int) or self.quadrature_nodes < 2:
      raise ValueError(f"quadrature_nodes={self.quadrature_nodes!r} must be an integer >= 2")

  @property
  def order(self):
    """ab_order + 1: a degree-r polynomial extrapolation of eps gives order r + 1."""
    return self.ab_order + 1

  def degrees(self, grid):
    """The polynomial degree of each step: min(r, i); tAB steps into sigma = 0 are degree 0."""
    degree = jnp.minimum(self.ab_order, jnp.arange(grid.capacity - 1))
    if self.method == "t_ab":
      degree = jnp.where(grid.sigma[1:] == 0, 0, degree)
    return degree

  def coefficients(self, grid, schedule):
    """Table rows: anchor alpha_{i+1} / alpha_i and the history weights C_ij (module docstring)."""
    hist = self._rho_ab_weights(grid) if self.method == "rho_ab" else self.t_ab_weights(schedule, grid)
    return {"anchor": grid.alpha[1:] / grid.alpha[:-1], "hist": hist, "end": jnp.ones_like(grid.alpha[1:])}

  def _rho_ab_weights(self, grid):
    rho_s, drho = rho_steps(grid)
    u, w = gauss_legendre(4)  # exact for the degree <= 3 integrands
    nodes = history_nodes(jnp.exp(-grid.lam[:-1]), self.ab_order)
    return lagrange_integrals(nodes, rho_s[:, None] + drho[:, None] * u, (grid.alpha[1:] * drho)[:, None] * w,
                              ddim_weight(grid), self.degrees(grid), self.ab_order)

  def t_ab_weights(self, schedule, grid):
    """The tAB history weights C_ij (capacity - 1, r + 1), by Gauss-Legendre in lambda (module docstring)."""
    h = exponential.step_sizes(grid)
    h = jnp.where(jnp.isfinite(h), h, 0.0)  # the sigma = 0 step is degree 0: its row is the exact total
    u, w = gauss_legendre(self.quadrature_nodes)
    lam = grid.lam[:-1, None] + h[:, None] * u
    points = schedule.t_of_lambda(lam)
    weights = -jnp.exp(-lam) * h[:, None] * w  # d rho = -e^{-lambda} d lambda
    nodes = history_nodes(grid.t[:-1], self.ab_order)
    return lagrange_integrals(nodes, points, grid.alpha[1:, None] * weights, ddim_weight(grid), self.degrees(grid),
                              self.ab_order)

  def init(self, denoiser, schedule, grid, x, key):
    """A ``MultistepState`` with room for ab_order + 1 eps outputs."""
    return exponential.init_state(x, self.ab_order + 1, key)

  def step(self, denoiser, schedule, grid, coeffs, i, state):
    """x_{i+1} = (alpha_{i+1} / alpha_i) x_i + sum_j C_ij eps_{i-j}: one model call."""
    return exponential.table_step(denoiser, schedule, grid, "eps", coeffs, i, state)


# Runge-Kutta tableaus (A strictly lower triangular, b, c = row sums of A), by the official rk_method names;
# ZERO_STEP_TABLEAUS replace them on a step that ends at sigma = 0 (module docstring).
TABLEAUS = {
    "1euler": ([[0.0]], [1.0]),
    "2heun": ([[0.0, 0.0], [1.0, 0.0]], [0.5, 0.5]),
    "3kutta": ([[0.0, 0.0, 0.0], [0.5, 0.0, 0.0], [-1.0, 2.0, 0.0]], [1 / 6, 4 / 6, 1 / 6]),
    "4rk": ([[0.0, 0.0, 0.0, 0.0], [0.5, 0.0, 0.0, 0.0], [0.0, 0.5, 0.0, 0.0], [0.0, 0.0, 1.0, 0.0]],
            [1 / 6, 2 / 6, 2 / 6, 1 / 6]),
}
_RALSTON3 = [[0.0, 0.0, 0.0], [0.5, 0.0, 0.0], [0.0, 0.75, 0.0]]
ZERO_STEP_TABLEAUS = {
    "1euler": TABLEAUS["1euler"],
    "2heun": ([[0.0, 0.0], [2 / 3, 0.0]], [0.25, 0.75]),                              # Ralston 2
    "3kutta": (_RALSTON3, [2 / 9, 3 / 9, 4 / 9]),                                     # Ralston 3
    "4rk": ([row + [0.0] for row in _RALSTON3] + [[0.0, 0.75, 0.0, 0.0]], [2 / 9, 3 / 9, 4 / 9, 0.0]),
}
RK_ORDERS = {"1euler": 1, "2heun": 2, "3kutta": 3, "4rk": 4}


def tableau(name, zero_step=False):
  """(A, b, c) of a tableau as float64 numpy arrays."""
  a, b = (ZERO_STEP_TABLEAUS if zero_step else TABLEAUS)[name]
  a = np.asarray(a, np.float64)
  return a, np.asarray(b, np.float64), a.sum(axis=1)


@dataclasses.dataclass(frozen=True)
class DEISRungeKutta(base.Solver):
  """rhoRK-DEIS (Zhang & Chen 2023): explicit Runge-Kutta on dv / d rho = eps_hat(alpha(rho) v, t(rho)), v = x / alpha.

  With d rho = rho_{i+1} - rho_i and stage points rho_k = rho_i + c_k d rho (times t_k = t(-log rho_k),
  alphas alpha_k), in x = alpha v:
    X_k = (alpha_k / alpha_i) x_i + alpha_k d rho sum_{l<k} a_kl K_l,   K_k = eps_hat(X_k, t_k),
    x_{i+1} = (alpha_{i+1} / alpha_i) x_i + alpha_{i+1} d rho sum_k b_k K_k.
  Every step makes ``stages`` model calls (a fixed count, no branching); stages at c = 0 and c = 1 use the
  grid's own nodes.
  """
  rk_method: str = "3kutta"

  def __post_init__(self):
    if self.rk_method not in TABLEAUS:
      raise ValueError(f"rk_method={self.rk_method!r} is unknown; valid: {', '.join(TABLEAUS)}")

  @property
  def order(self):
    """The tableau's classical order (the digit of its name)."""
    return RK_ORDERS[self.rk_method]

  @property
  def stages(self):
    """Model calls per step: the tableau's number of stages."""
    return len(TABLEAUS[self.rk_method][1])

  def coefficients(self, grid, schedule):
    """Per-step stage times, stage coefficients and output weights (capacity - 1 rows)."""
    zero = grid.sigma[1:] == 0
    main, sub = tableau(self.rk_method), tableau(self.rk_method, zero_step=True)
    a, b, c = (jnp.where(zero.reshape((-1,) + (1,) * m.ndim), s, m) for m, s in zip(main, sub))
    rho_s, drho = rho_steps(grid)
    rho_k = rho_s[:, None] + c * drho[:, None]
    lam_k = -jnp.log(rho_k)
    start, end = c == 0, (c == 1) & ~zero[:, None]
    t_k = jnp.where(start, grid.t[:-1, None], jnp.where(end, grid.t[1:, None], schedule.t_of_lambda(lam_k)))
    t_k = jnp.where(jnp.isfinite(t_k), t_k, grid.t[:-1, None])  # padding rows past a sigma = 0 node (VE: t = -inf)
    alpha_k = jnp.where(start, grid.alpha[:-1, None],
                        jnp.where(end, grid.alpha[1:, None], schedule.alpha_sigma_of_lambda(lam_k)[0]))
    return {"x": grid.alpha[1:] / grid.alpha[:-1],
            "t": t_k,
            "sx": alpha_k / grid.alpha[:-1, None],
            "a": alpha_k[:, :, None] * drho[:, None, None] * a,
            "b": grid.alpha[1:, None] * drho[:, None] * b}

  def step(self, denoiser, schedule, grid, coeffs, i, state):
    """One Runge-Kutta step in (v, rho), written in x (class docstring): ``stages`` model calls."""
    c = base.cast_coefficients({k: v for k, v in coeffs.items() if k != "t"}, state.x)
    x = state.x
    ks = []
    for k in range(self.stages):
      xk = x
      if k:
        xk = c["sx"][k] * x
        for m in range(k):
          xk = xk + c["a"][k, m] * ks[m]
      ks.append(denoiser.predict("eps", xk.astype(x.dtype), coeffs["t"][k], schedule))
    out = c["x"] * x
    for k in range(self.stages):
      out = out + c["b"][k] * ks[k]
    return state._replace(x=out.astype(x.dtype), nfe=state.nfe + self.stages)


def deis_logrho(order=2, **options):
  """diffusers' ``DEISMultistepScheduler`` (``algorithm_type='deis'``, ``solver_type='logrho'``), orders 1-3.

  eps is interpolated by the Lagrange polynomial in log rho (= -lambda) through the last ``order`` model
  outputs and integrated exactly in rho (diffusers PR #1432, spec section 6):
    x_t = alpha_t (x_s / alpha_s + sum_j coef_j eps_j),  coef_j = F_j(rho_t) - F_j(rho_s),
    order 2: F(rho; b, c) = rho (log rho - log c - 1) / (log b - log c),
    order 3: F(rho; b, c, d) = rho [L^2 - 2L + 2 - (c' + d')(L - 1) + c'd'] / ((b' - c')(b' - d')),
  L = log rho, primes = logs of the nodes' rho. Since rho = e^{-lambda}, this is the noise-form exponential
  integrator with eps(lambda) a polynomial in lambda, integrated exactly, i.e. multistep DPM-Solver (noise,
  'heun') with the exactly integrated third-order term: this returns that solver, with diffusers' settings
  (the closed forms above cancel catastrophically for small steps in float32; the phi-function weights do not).
  Order 2 is DPM-Solver 2M 'heun'; order 3 is exact for quadratic eps(lambda), unlike the reference 3M;
  tests/test_deis.py checks the
  closed forms. Warm-up order min(order, i + 1); ``lower_order_final`` as diffusers (runs of fewer than
  ``lower_order_final_below`` = 15 steps end with orders 2, 1); a step into sigma = 0 is first order (rho_t = 0 is
  log rho = -inf; diffusers itself never ends at sigma = 0: its last point is rho at training step 0).
  ``thresholding`` thresholds x0 and converts back to eps, as diffusers, with its semantics by default.
  """
  return dpm_solver_multistep.DPMSolverMultistep(
      order=order, prediction="noise", solver_type="heun", third_order="exact", lower_order_final_below=15,
      threshold_semantics="diffusers", **options)


for _r in (1, 2, 3):
  base.register(f"deis_tab{_r}", lambda r=_r: DEISMultistep(ab_order=r, method="t_ab"))
for _r in (1, 2):  # degree 3: see the module docstring
  base.register(f"deis_rhoab{_r}", lambda r=_r: DEISMultistep(ab_order=r, method="rho_ab"))
for _name in ("2heun", "3kutta", "4rk"):
  base.register(f"deis_rhork_{_name}", lambda name=_name: DEISRungeKutta(rk_method=name))
base.register("deis_logrho_2", lambda: deis_logrho(order=2))
base.register("deis_logrho_3", lambda: deis_logrho(order=3))

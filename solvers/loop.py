"""The one sampling loop: a single jitted driver for every registered solver.

The grid arrives padded to its capacity; ``lax.scan`` runs ``solver.num_iterations(grid)`` iterations
(capacity - 1 by default) and a ``lax.cond`` on ``solver.active`` (by default ``i < grid.num_steps``)
skips the padding without a model call. The step count is therefore data,
not a compile-time constant: one compilation serves every NFE up to the capacity at a given shape,
new params, keys and grids never recompile, and the loop is reverse-mode differentiable and vmappable.
A solver is a static (hashable) argument unless it is a pytree with leaves (``solvers.pytree.pytree_dataclass``):
then its leaves, e.g. learned compensation ratios, are traced like the grid, so new values never recompile
and gradients flow to them. With ``jax.disable_jit()`` the same code runs as a host-side Python loop (the debug path).
"""
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from solvers import base
from solvers import grids as grids_lib

_TRACES = [0]  # incremented each time the loop is traced (= compiled); read by tests and the benchmark


def trace_count():
  """How many times the sampling loop has been traced in this process."""
  return _TRACES[0]


class Solution(NamedTuple):
  """What ``sample`` returns: the final sample, the model evaluations made, and optionally the trajectory."""
  x: jnp.ndarray                     # the final sample
  nfe: jnp.ndarray                   # model evaluations actually made
  trajectory: Optional[jnp.ndarray]  # (iterations + 1, *x.shape): x after every iteration; skipped ones repeat it


def _run(solver, denoiser, schedule, grid, start, key, return_trajectory, return_state=False):
  _TRACES[0] += 1
  steps = jnp.arange(solver.num_iterations(grid))
  coeffs = solver.coefficients(grid, schedule)
  state = solver.init(denoiser, schedule, grid, start, key)
  x = state.x

  def body(state, row):
    i, c = row
    state = jax.lax.cond(solver.active(grid, i, state),
                         lambda s: solver.step(denoiser, schedule, grid, c, i, s),
                         lambda s: s, state)
    return state, (state.x if return_trajectory else None)

  state, xs = jax.lax.scan(body, state, (steps, coeffs))
  trajectory = jnp.concatenate([x[None], xs]) if return_trajectory else None
  solution = Solution(x=state.x, nfe=state.nfe, trajectory=trajectory)
  return (solution, state) if return_state else solution


_run_static = jax.jit(_run, static_argnames=("solver", "return_trajectory", "return_state"))
_run_traced = jax.jit(_run, static_argnames=("return_trajectory", "return_state"))


def _has_leaves(solver):
  """Whether the solver is a pytree with array leaves (learned parameters, e.g. DC-Solver's ratios)."""
  leaves = jax.tree_util.tree_leaves(solver)
  return not (len(leaves) == 1 and leaves[0] is solver)


def _check_dtype(x):
  dtype = np.dtype(x.dtype) if hasattr(x, "dtype") else np.asarray(x).dtype
  if not np.issubdtype(dtype, np.floating):
    raise ValueError(f"x_T has dtype {dtype}; a floating dtype is required")
  if dtype == np.float64 and not jax.config.jax_enable_x64:
    raise ValueError("x_T has dtype float64 but jax_enable_x64 is off, so JAX would silently compute in "
                     "float32; enable it with jax.config.update('jax_enable_x64', True) or pass float32")
  return dtype


def _check_arguments(solver, grid, denoiser):
  if isinstance(solver, str):
    solver = base.get(solver)
  if not isinstance(grid, grids_lib.Grid):
    raise ValueError(f"grid must be a solvers.grids.Grid (build one with solvers.grids), got {type(grid).__name__}")
  if not hasattr(denoiser, "predict"):
    raise ValueError(f"denoiser must have a predict(kind, x, t, schedule) method, got {type(denoiser).__name__}")
  return solver


def _key(solver, key):
  if key is None:
    if solver.stochastic:
      raise ValueError(f"{type(solver).__name__} is stochastic: pass key=jax.random.key(seed)")
    key = jax.random.key(0)
  return key


def integrate(solver, denoiser, schedule, grid, start, *, key=None, return_trajectory=False):
  """The loop from ``start`` (an array, or a solver-specific pytree such as an inversion latent) to the
  end of ``grid``: returns ``(Solution, final_state)``, the state carrying what a sample alone does not
  (the second latent of an exact-inversion pair). Same compiled driver as ``sample``."""
  solver = _check_arguments(solver, grid, denoiser)
  for leaf in jax.tree_util.tree_leaves(start):
    _check_dtype(leaf)
  run = _run_traced if _has_leaves(solver) else _run_static
  return run(solver, denoiser, schedule, grid, start, _key(solver, key), return_trajectory, True)


def sample(solver, denoiser, schedule, grid, x_T, *, key=None, return_trajectory=False):
  """Integrates from x_T along ``grid`` with ``solver`` (an object or a registered name).

  Returns a ``Solution(x, nfe, trajectory)``. ``key`` is required by stochastic solvers; vmap this
  function over keys (and x_T) for per-sample randomness.
  """
  solver = _check_arguments(solver, grid, denoiser)
  dtype = _check_dtype(x_T)
  run = _run_traced if _has_leaves(solver) else _run_static
  return run(solver, denoiser, schedule, grid, jnp.asarray(x_T, dtype), _key(solver, key), return_trajectory)

"""The solver protocol, the shared state, and the registry that turns names into solvers.

A solver is a frozen (hashable) dataclass with
- ``order``: the method's order; ``declared_order``: the global order it converges with (the same unless
  the method is known to fall short of its nominal order); ``stochastic``: whether it draws noise;
- ``coefficients(grid, schedule)``: everything that depends only on the grid (and the schedule), as arrays with a leading axis of
  ``num_iterations(grid)`` (one row per step; ``grid.capacity - 1`` by default), computed once outside the
  loop in the grid's dtype;
- ``active(grid, i, state)``: whether iteration i runs (by default ``i < grid.num_steps``; an adaptive
  solver decides from its state);
- ``init(denoiser, schedule, grid, x, key)``: the initial state, a NamedTuple with at least ``x``
  and ``nfe`` (model evaluations so far);
- ``step(denoiser, schedule, grid, coeffs, i, state)``: one pure step from node i to node i + 1, where
  ``coeffs`` is row i of the table. It must keep the state's shapes and dtypes;
- ``prepare(denoiser, schedule, grid, x_T, key)``: the solver fitted to a model (model statistics, learned
  parameters) before sampling; itself for the solvers that need nothing.
"""
import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp


class State(NamedTuple):
  """The state of a one-step solver: the sample, the NFE so far and the PRNG key."""
  x: jnp.ndarray
  nfe: jnp.ndarray
  key: Any


class Latent(NamedTuple):
  """What an inversion returns and a regeneration starts from: the latent at the noise end of the grid and,
  for exact inversion, its partner (BDIA: the latent at the grid's second node; EDICT: the second of the
  coupled sequences). ``partner`` is None for naive (DDIM / DPM-Solver++) inversion."""
  x: jnp.ndarray
  partner: Any = None


class PairState(NamedTuple):
  """The state of the exact-inversion solvers (BDIA, EDICT): two latents. ``start`` is the first iteration
  the loop takes (1 when a BDIA regeneration starts from a stored pair, which replaces the first step)."""
  x: jnp.ndarray
  partner: jnp.ndarray
  nfe: jnp.ndarray
  key: Any
  start: jnp.ndarray


def compute_dtype(x):
  """Solver arithmetic runs in x's dtype, but never below float32 (bf16 samples step in float32)."""
  return jnp.promote_types(x.dtype, jnp.float32)


def cast_coefficients(coeffs, x):
  """Casts a row of float64 coefficients to the dtype the step computes in."""
  return jax.tree_util.tree_map(lambda c: jnp.asarray(c, compute_dtype(x)), coeffs)


def check_options(solver, choices):
  """Raises a ValueError naming the option whose value is not among its valid ones: choices = ((name, valid), ...)."""
  for name, valid in choices:
    if getattr(solver, name) not in valid:
      raise ValueError(f"{name}={getattr(solver, name)!r} is unknown; valid: {', '.join(map(str, valid))}")


def step_key(key, i):
  """The key of step i: samples do not depend on how many steps were taken before the draw."""
  return jax.random.fold_in(key, i)


def noise(key, x, *indices):
  """Standard normal noise shaped like x, drawn from ``key`` folded with each of ``indices`` (``step_key``).

  One key draws the whole array; a key per sample (``key.shape == x.shape[:1]``) draws each sample's
  noise from its own key, so a sample does not depend on the batch it is drawn in."""
  if not jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
    key = jax.random.wrap_key_data(key)

  def draw(k, shape):
    for index in indices:
      k = step_key(k, index)
    return jax.random.normal(k, shape, x.dtype)

  if key.ndim == 0:
    return draw(key, x.shape)
  if key.shape != x.shape[:1]:
    raise ValueError(f"key has shape {key.shape}: pass one key, or one per sample (shape {x.shape[:1]})")
  return jax.vmap(lambda k: draw(k, x.shape[1:]))(key)


class Solver:
  """Base class: subclasses are frozen dataclasses registered by name."""
  order: int = 1
  stochastic: bool = False
  # True where the Gaussian (a linear PF-ODE) shows a higher order than the declared one, which then is
  # checked on a nonlinear problem instead (UniPC-3 with UniC: order ~5 on Gaussians, 4 on mixtures).
  superconverges_on_linear_problems: bool = False
  # True for step-size-controlled solvers: they ignore the grid's inner nodes, so the battery's fixed-grid
  # order measurement does not apply (their own tests check accuracy against the tolerances instead).
  adaptive: bool = False

  def init(self, denoiser, schedule, grid, x, key):
    """The state before the first step: ``x`` (the sample at the grid's first node), zero NFE and ``key``."""
    return State(x=x, nfe=jnp.zeros((), jnp.int32), key=key)

  @property
  def declared_order(self):
    """The global order this configuration converges with (what the test battery checks)."""
    return self.order

  def num_iterations(self, grid):
    """How many times the loop may call ``step`` (static): one per grid interval by default."""
    return grid.capacity - 1

  def active(self, grid, i, state):
    """Whether iteration i is taken (traced); the loop skips the others without calling the model."""
    return i < grid.num_steps

  def prepare(self, denoiser, schedule, grid, x_T, key):
    """This solver fitted to ``denoiser`` before it samples ``grid`` from points shaped like ``x_T``.

    Solvers that learn from the model (DPM-Solver-v3's statistics, DC-Solver's ratios) draw their own
    training points with ``key``, never x_T itself; the others return themselves."""
    return self

  def for_order_measurement(self):
    """This solver with every rule that caps its order on purpose (lower-order final steps) switched off.

    A single first-order step contributes O(h^2) to the global error, so the declared order is measured
    on this configuration; the capped default is tested separately."""
    return self


_REGISTRY = {}


def register(name, factory):
  """Registers ``factory`` (a Solver class or a function returning a solver) under ``name``."""
  if name in _REGISTRY:
    raise ValueError(f"solver name {name!r} is already registered")
  _REGISTRY[name] = factory
  return factory


def available():
  """The registered solver names, sorted."""
  return sorted(_REGISTRY)


def get(name, **options):
  """The solver registered as ``name``, with ``options`` overriding its defaults."""
  if name not in _REGISTRY:
    raise ValueError(f"solver {name!r} is unknown; valid: {', '.join(available())}")
  solver = _REGISTRY[name]()
  return dataclasses.replace(solver, **options) if options else solver

"""Data parallelism over several devices with ``jax.sharding`` (no pmap): one 1-D mesh, the batch split
over it, everything else replicated, and the library's own jitted functions run unchanged.

- ``make_mesh(devices=None, axis="data")``: a 1-D ``Mesh`` over ``jax.devices()`` (every device of every
  process: the global mesh in a multi-host run).
- ``shard_batch(tree, mesh)``: each array of ``tree`` split along its leading (batch) axis; the batch size
  must be a multiple of the device count (a ValueError names both). ``shard_process_batch``: the same
  from each process's own rows (multi-host input).
- ``replicate(tree, mesh)``: a full copy on every device (params, train state, schedule, grid).
- ``sharded_sample``: ``solvers.sample`` with x_T (and per-sample keys) batch-sharded and the denoiser,
  schedule and grid replicated. The loop is the same jitted function; XLA's SPMD partitioner propagates
  the input shardings, so each device integrates its own rows and the result comes back batch-sharded.
- ``make_sharded_train_step(train_step, mesh)``: ``models.training``'s train step, unchanged, jitted with
  the state replicated and the batch sharded. The loss is a mean over the *global* batch, so the
  partitioner inserts the all-reduce of the gradients itself: every device applies the same averaged
  update and the replicated state stays identical everywhere.

Results equal the single-device ones up to float round-off (reductions over the batch are summed in a
different order; per-row work is identical). Random numbers do not depend on the sharding
(``jax_threefry_partitionable``, the default), so a sharded step draws the same noise as an unsharded one.
"""
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from solvers import loop


def make_mesh(devices=None, axis="data"):
  """A 1-D ``Mesh`` named ``axis`` over ``devices`` (default: ``jax.devices()``, all processes' devices)."""
  devices = list(jax.devices() if devices is None else devices)
  if not devices:
    raise ValueError("make_mesh needs at least one device, got none")
  if not isinstance(axis, str) or not axis:
    raise ValueError(f"axis must be a non-empty string, got {axis!r}")
  return Mesh(np.asarray(devices, dtype=object), (axis,))


def _axis(mesh):
  if not isinstance(mesh, Mesh):
    raise ValueError(f"mesh must be a jax.sharding.Mesh (build one with make_mesh), got {type(mesh).__name__}")
  if len(mesh.axis_names) != 1:
    raise ValueError(f"expected a 1-D data-parallel mesh, got axes {mesh.axis_names} of shape "
                     f"{tuple(mesh.devices.shape)}")
  return mesh.axis_names[0]


def batch_sharding(mesh):
  """The ``NamedSharding`` that splits an array's leading axis over the mesh."""
  return NamedSharding(mesh, PartitionSpec(_axis(mesh)))


def replicated_sharding(mesh):
  """The ``NamedSharding`` that copies an array onto every device of the mesh."""
  _axis(mesh)
  return NamedSharding(mesh, PartitionSpec())


def check_batch_size(batch_size, mesh):
  """Raises a ValueError unless ``batch_size`` splits evenly over the mesh's devices."""
  devices = mesh.devices.size
  if batch_size < 1 or batch_size % devices:
    raise ValueError(f"batch size {batch_size} is not a multiple of the {devices} devices of the mesh: "
                     f"use a batch size divisible by {devices} (or fewer devices)")


def _batch_size(leaf, what):
  shape = np.shape(leaf)
  if not shape:
    raise ValueError(f"{what}: a scalar has no batch axis to shard")
  return shape[0]


def shard_batch(tree, mesh):
  """``tree`` (an array or a pytree of arrays, e.g. ``(x0, labels)``; None leaves stay None) placed with
  its leading axis split over ``mesh``: device k of n holds rows [k B / n, (k + 1) B / n). Every leaf
  needs a leading axis of the same size B, a multiple of the device count (ValueError otherwise).

  Host arrays are copied from this process; in a multi-process run every process must pass the same
  global array (prefer ``shard_process_batch`` there)."""
  leaves = jax.tree_util.tree_leaves(tree)
  for leaf in leaves:
    check_batch_size(_batch_size(leaf, "shard_batch"), mesh)
  sizes = {_batch_size(leaf, "shard_batch") for leaf in leaves}
  if len(sizes) > 1:
    raise ValueError(f"shard_batch: the leaves have different leading (batch) sizes {sorted(sizes)}")
  return jax.device_put(tree, batch_sharding(mesh))


def shard_process_batch(tree, mesh):
  """The global batch-sharded array assembled from each process's own rows (the multi-host input path,
  ``jax.make_array_from_process_local_data``): every process passes its local block of B / P rows (P
  processes) and gets the global array of B rows. With one process this equals ``shard_batch``."""
  sharding = batch_sharding(mesh)
  local_devices = len(mesh.local_devices)

  def put(leaf):
    n = _batch_size(leaf, "shard_process_batch")
    if n % local_devices:
      raise ValueError(f"process-local batch size {n} is not a multiple of this process's {local_devices} "
                       f"devices of the mesh")
    return jax.make_array_from_process_local_data(sharding, np.asarray(leaf))

  return jax.tree_util.tree_map(put, tree)


def replicate(tree, mesh):
  """``tree`` (any pytree: params, a TrainState, a Denoiser, a schedule) copied onto every device."""
  return jax.device_put(tree, replicated_sharding(mesh))


def _is_typed_key(key):
  return jnp.issubdtype(key.dtype, jax.dtypes.prng_key)


def _place_key(key, batch, mesh):
  """A per-sample key array ((B,) typed keys or (B, 2) raw key data) sharded like the batch; one key
  replicated."""
  key = key if isinstance(key, jax.Array) else jnp.asarray(key)
  per_sample_shape = key.shape if _is_typed_key(key) else key.shape[:-1]
  if per_sample_shape == (batch,):
    return jax.device_put(key, batch_sharding(mesh))
  return replicate(key, mesh)


def sharded_sample(solver, denoiser, schedule, grid, x_T, mesh, *, key=None, return_trajectory=False):
  """``solvers.sample`` with the batch of ``x_T`` split over ``mesh`` (same arguments, same compiled
  loop, same ``Solution``). The denoiser (its params), schedule, grid and a learned solver's leaves are
  replicated; ``key`` is replicated when it is one key and batch-sharded when it holds one key per
  sample (``solvers.base.noise``), so a stochastic sample does not depend on the device it runs on.
  ``Solution.x`` is batch-sharded (``x.sharding``); ``nfe`` is replicated."""
  x_T = x_T if isinstance(x_T, jax.Array) else np.asarray(x_T)
  loop._check_dtype(x_T)  # before device_put could silently cast float64 to float32
  batch = _batch_size(x_T, "sharded_sample: x_T")
  x_T = shard_batch(x_T, mesh)
  denoiser, schedule, grid = replicate((denoiser, schedule, grid), mesh)
  if loop._has_leaves(solver):  # a learned solver (DC-Solver's ratios): its leaves are traced arguments
    solver = replicate(solver, mesh)
  if key is not None:
    key = _place_key(key, batch, mesh)
  return loop.sample(solver, denoiser, schedule, grid, x_T, key=key, return_trajectory=return_trajectory)


def make_sharded_train_step(train_step, mesh, donate_state=False):
  """``train_step`` (from ``models.training.make_train_step``, jitted or not) run data-parallel over
  ``mesh``: ``step(state, x0, labels=None) -> (state, metrics)`` with the state (and metrics) replicated
  and x0 / labels batch-sharded (``shard_batch`` is applied for you; arrays already placed are not
  copied). The global batch size must be a multiple of the device count. ``donate_state``: let XLA reuse
  the old state's buffers (the state passed in is then deleted)."""
  batch_spec, replicated = batch_sharding(mesh), replicated_sharding(mesh)
  jitted = jax.jit(train_step, in_shardings=(replicated, batch_spec, batch_spec),
                   out_shardings=(replicated, replicated), donate_argnums=(0,) if donate_state else ())

  def step(state, x0, labels=None):
    x0, labels = shard_batch((x0, labels), mesh)
    return jitted(replicate(state, mesh), x0, labels)

  step.jitted = jitted  # the jitted function itself (for .lower(...) / inspection)
  return step


__all__ = ["make_mesh", "batch_sharding", "replicated_sharding", "check_batch_size", "shard_batch",
           "shard_process_batch", "replicate", "sharded_sample", "make_sharded_train_step"]

"""models.sharding on 8 simulated CPU devices: batch-sharded sampling equals single-device sampling (two
deterministic solvers, one stochastic with per-sample keys) and comes back split over the 8 devices;
data-parallel training equals single-device training to float round-off and really all-reduces the
gradients; a batch size that does not split over the devices raises a ValueError naming both numbers.

``--xla_force_host_platform_device_count`` only takes effect before jax is imported, and this pytest
process has imported it already, so the checks run in ONE subprocess (this file run as a script, float32,
x64 off) that prints a JSON report; the tests below assert on it. A tiny Linen network (as in
tests/test_training.py) keeps the subprocess to a few seconds of compilation.
"""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEVICES = 8
BATCH = 16        # sampling batch: 2 rows per device
TRAIN_BATCH = 32  # training batch: 4 rows per device
TRAIN_STEPS = 5
DETERMINISTIC = ("ddim", "dpm_solver_pp_2m")
STOCHASTIC = "euler_maruyama"


# ------------------------------------------------------------------------------------------------
# The worker (runs in the subprocess, with 8 host devices).


def _worker():
  import time

  import flax.linen as nn
  import jax
  import jax.numpy as jnp
  import numpy as np

  from models import data, sharding, training
  from solvers import grids, loop, schedules
  from solvers.predictions import Denoiser

  start = time.perf_counter()

  class Tiny(nn.Module):
    @nn.compact
    def __call__(self, x, label, cond=None):
      label = jnp.broadcast_to(jnp.asarray(label, x.dtype), x.shape[:1])
      feats = jnp.stack([jnp.sin(label * f) for f in (1.0, 3.0)] + [jnp.cos(label * f) for f in (1.0, 3.0)], -1)
      h = nn.silu(nn.Dense(32)(jnp.concatenate([x, feats], -1)))
      return x + nn.Dense(x.shape[-1])(nn.silu(nn.Dense(32)(h)))  # residual: x0-predicted samples of order 1

  module = Tiny()

  def apply_fn(params, x, label, cond):
    return module.apply({"params": params}, x, label, cond)

  report = {"devices": jax.device_count()}
  mesh = sharding.make_mesh()
  expected = sharding.batch_sharding(mesh)

  def split_info(x):
    """How x is laid out: equivalent to the batch sharding, #devices, rows per shard, distinct row blocks."""
    shards = x.addressable_shards
    return {"batch_sharded": bool(x.sharding.is_equivalent_to(expected, x.ndim)),
            "devices": len({s.device for s in shards}),
            "rows": sorted({int(s.data.shape[0]) for s in shards}),
            "blocks": len({s.index[0].start for s in shards})}

  # (a) sampling: sharded vs unsharded, same loop.
  schedule = schedules.VPLinear()
  grid = grids.uniform_logsnr(schedule, 8)
  params = module.init(jax.random.key(0), jnp.zeros((1, 2)), jnp.zeros((1,)))["params"]
  den = Denoiser(apply_fn=apply_fn, params=params, prediction="x0", time_label="t")  # samples of order 1
  x_T = jnp.asarray(np.random.default_rng(0).normal(size=(BATCH, 2)), jnp.float32)
  keys = jax.random.split(jax.random.key(1), BATCH)
  report["sampling"] = {}
  for name in DETERMINISTIC + (STOCHASTIC,):
    key = keys if name == STOCHASTIC else None
    ref = loop.sample(name, den, schedule, grid, x_T, key=key)
    out = sharding.sharded_sample(name, den, schedule, grid, x_T, mesh, key=key)
    report["sampling"][name] = {
        "max_abs_diff": float(jnp.max(jnp.abs(np.asarray(out.x) - np.asarray(ref.x)))),
        "scale": float(jnp.max(jnp.abs(ref.x))), "finite": bool(np.isfinite(np.asarray(out.x)).all()),
        "nfe": [int(ref.nfe), int(out.nfe)], "dtype": str(out.x.dtype), "layout": split_info(out.x)}
  # the compiled loop works on 2 rows per device and communicates nothing
  placed = (sharding.replicate((den, schedule, grid), mesh), sharding.shard_batch(x_T, mesh))
  hlo = loop._run_static.lower(loop.base.get("ddim"), *placed[0], placed[1], jax.random.key(0),
                               False).compile().as_text()
  report["sampling_hlo"] = {"local_rows": f"f32[{BATCH // DEVICES},2]" in hlo,
                            "global_rows": f"f32[{BATCH},2]" in hlo,
                            "collectives": [c for c in ("all-gather", "all-reduce", "all-to-all",
                                                        "collective-permute") if c in hlo]}
  # per-sample keys: sample i does not depend on the batch it is drawn in (first half, unsharded)
  half = loop.sample(STOCHASTIC, den, schedule, grid, x_T[:BATCH // 2], key=keys[:BATCH // 2])
  full = sharding.sharded_sample(STOCHASTIC, den, schedule, grid, x_T, mesh, key=keys)
  report["per_sample_key_diff"] = float(jnp.max(jnp.abs(np.asarray(full.x)[:BATCH // 2] - np.asarray(half.x))))
  other = sharding.sharded_sample(STOCHASTIC, den, schedule, grid, x_T, mesh,
                                  key=jax.random.split(jax.random.key(2), BATCH))
  report["other_keys_diff"] = float(jnp.max(jnp.abs(np.asarray(other.x) - np.asarray(full.x))))
  # one key for the whole batch (replicated): the noise of the global shape does not depend on the sharding
  one = jax.random.key(4)
  report["one_key_diff"] = float(jnp.max(jnp.abs(
      np.asarray(sharding.sharded_sample(STOCHASTIC, den, schedule, grid, x_T, mesh, key=one).x) -
      np.asarray(loop.sample(STOCHASTIC, den, schedule, grid, x_T, key=one).x))))
  report["sampling_s"] = time.perf_counter() - start

  # (b) training: N data-parallel steps vs N single-device steps from the same state and batches.
  t0 = time.perf_counter()
  dataset = data.load("two_moons", size=256, seed=0)
  loss = training.DiffusionLoss(apply_fn=apply_fn, schedule=schedule)
  tx, lr_fn = training.make_optimizer(1e-2, clip_norm=1.0)
  train_step = training.make_train_step(loss, tx, lr_fn, ema_decay=0.9)
  init = module.init(jax.random.key(3), jnp.zeros((1, 2)), jnp.zeros((1,)))["params"]
  single = training.init_state(init, tx, 0)
  sharded = sharding.replicate(training.init_state(init, tx, 0), mesh)
  sharded_step = sharding.make_sharded_train_step(train_step, mesh)
  losses = []
  for s in range(TRAIN_STEPS):
    x0, _ = data.batch(dataset, s, TRAIN_BATCH, seed=0)
    single, m1 = train_step(single, x0)
    sharded, m2 = sharded_step(sharded, x0)
    losses.append([float(m1["loss"]), float(m2["loss"])])

  def max_diff(a, b):
    return max(float(jnp.max(jnp.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64))))
               for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)))

  moved = max_diff(single.params, init)
  leaves = jax.tree_util.tree_leaves(sharded.params)
  hlo = sharded_step.jitted.lower(sharded, sharding.shard_batch(x0, mesh), None).compile().as_text()
  report["training"] = {
      "param_diff": max_diff(single.params, sharded.params), "ema_diff": max_diff(single.ema_params, sharded.ema_params),
      "opt_state_diff": max_diff(single.opt_state, sharded.opt_state), "moved": moved,
      "losses": losses, "steps": [int(single.step), int(sharded.step)],
      "dtypes": sorted({str(p.dtype) for p in leaves}),
      "replicated": all(p.sharding.is_fully_replicated and len(p.sharding.device_set) == DEVICES for p in leaves),
      "all_reduce": "all-reduce" in hlo,
      "local_rows": f"f32[{TRAIN_BATCH // DEVICES},2]" in hlo}
  report["training_s"] = time.perf_counter() - t0

  # (c) a batch that does not split over the 8 devices.
  errors = {}
  bad = jnp.zeros((12, 2), jnp.float32)
  calls = {"shard_batch": lambda: sharding.shard_batch(bad, mesh),
           "sharded_sample": lambda: sharding.sharded_sample("ddim", den, schedule, grid, bad, mesh),
           "train_step": lambda: sharded_step(sharded, bad)}
  for what, call in calls.items():
    try:
      call()
      errors[what] = None
    except ValueError as err:
      errors[what] = str(err)
  report["errors"] = errors
  report["total_s"] = time.perf_counter() - start
  print("REPORT " + json.dumps(report))


# ------------------------------------------------------------------------------------------------
# The tests (this process).


@pytest.fixture(scope="module")
def report():
  env = dict(os.environ)
  env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={DEVICES}").strip()
  env["JAX_PLATFORMS"] = "cpu"
  env.pop("JAX_ENABLE_X64", None)
  env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
  proc = subprocess.run([sys.executable, os.path.abspath(__file__)], cwd=ROOT, env=env, capture_output=True,
                        text=True, timeout=300)
  assert proc.returncode == 0, f"worker failed (rc {proc.returncode}):\n{proc.stderr[-4000:]}"
  lines = [line for line in proc.stdout.splitlines() if line.startswith("REPORT ")]
  assert len(lines) == 1, proc.stdout[-2000:]
  return json.loads(lines[0][len("REPORT "):])


def test_worker_sees_eight_devices(report):
  assert report["devices"] == DEVICES


@pytest.mark.parametrize("name", DETERMINISTIC + (STOCHASTIC,))
def test_sharded_sampling_matches_single_device(report, name):
  r = report["sampling"][name]
  assert r["finite"] and 0.1 < r["scale"] < 100
  assert r["max_abs_diff"] <= 1e-6 * max(1.0, r["scale"]), r
  assert r["nfe"][0] == r["nfe"][1] > 0
  assert r["dtype"] == "float32"
  # really split: 8 devices, 2 rows each, 8 different row blocks
  assert r["layout"] == {"batch_sharded": True, "devices": DEVICES, "rows": [BATCH // DEVICES], "blocks": DEVICES}


def test_sharded_loop_is_local(report):
  assert report["sampling_hlo"] == {"local_rows": True, "global_rows": False, "collectives": []}


def test_per_sample_keys_do_not_depend_on_the_batch(report):
  assert report["per_sample_key_diff"] <= 1e-6
  assert report["one_key_diff"] <= 1e-6  # one replicated key: the same noise as on one device
  assert report["other_keys_diff"] > 1e-3  # the noise matters: other keys give other samples


def test_sharded_training_matches_single_device(report):
  r = report["training"]
  assert r["steps"] == [TRAIN_STEPS, TRAIN_STEPS]
  assert r["moved"] > 1e-3  # the params did train (lr 1e-2, 5 steps)
  assert r["param_diff"] <= 1e-5 and r["ema_diff"] <= 1e-5 and r["opt_state_diff"] <= 1e-5, r
  for single, sharded in r["losses"]:
    assert abs(single - sharded) <= 1e-5 * max(1.0, abs(single))
  assert r["dtypes"] == ["float32"]
  assert r["replicated"]  # the state stays one replicated copy
  assert r["all_reduce"] and r["local_rows"]  # each device sees its 4 rows; gradients are all-reduced


def test_bad_batch_size_names_both_numbers(report):
  for what, message in report["errors"].items():
    assert message is not None, f"{what} accepted a batch of 12 on 8 devices"
    assert "12" in message and "8 devices" in message, (what, message)


def test_single_device_mesh_and_errors():
  import jax
  import numpy as np

  from models import sharding
  mesh = sharding.make_mesh(jax.devices()[:1])
  assert mesh.axis_names == ("data",) and mesh.devices.size == 1
  x = sharding.shard_batch(np.arange(6.0).reshape(3, 2), mesh)
  np.testing.assert_array_equal(np.asarray(x), np.arange(6.0).reshape(3, 2))
  y = sharding.shard_process_batch(np.arange(6.0).reshape(3, 2), mesh)  # one process: the same array
  np.testing.assert_array_equal(np.asarray(y), np.asarray(x))
  with pytest.raises(ValueError, match="at least one device"):
    sharding.make_mesh([])
  with pytest.raises(ValueError, match="scalar"):
    sharding.shard_batch(np.float32(1.0), mesh)
  with pytest.raises(ValueError, match="different leading"):
    sharding.shard_batch((np.zeros((2, 1)), np.zeros((3,))), mesh)
  with pytest.raises(ValueError, match="1-D data-parallel mesh"):
    sharding.batch_sharding(jax.sharding.Mesh(np.asarray(jax.devices()[:1]).reshape(1, 1), ("a", "b")))


if __name__ == "__main__":
  _worker()

"""models.checkpoints: bit-identical round trips of a full train state, keep-last-k, atomic saves (the
leftovers of a killed save are ignored and cleaned), and a missing / corrupt checkpoint or a mismatched
target raising a ValueError naming the path."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments.convergence_lib import _umask
from models import checkpoints, training


def _state():
  k1, k2 = jax.random.split(jax.random.key(0))
  params = {"dense": {"kernel": jax.random.normal(k1, (3, 5), jnp.float32), "bias": jnp.zeros(5, jnp.float32)},
            "scale": jax.random.normal(k2, (5,), jnp.float32).astype(jnp.bfloat16)}
  tx, _ = training.make_optimizer(1e-3, warmup_steps=2, total_steps=10, decay="cosine", weight_decay=0.1)
  state = training.init_state(params, tx, jax.random.key(7))
  # Make every leaf distinctive (not the init zeros) so a mix-up of leaves would show.
  grads = jax.tree_util.tree_map(lambda p: jnp.ones_like(p), params)
  updates, opt_state = tx.update(grads, state.opt_state, params)
  return state.replace(step=jnp.int32(11), opt_state=opt_state,
                       ema_params=jax.tree_util.tree_map(lambda p, u: p + 2 * u, params, updates))


def _leaves_equal(a, b):
  la, lb = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
  return len(la) == len(lb) and all(
      np.asarray(x).dtype == np.asarray(y).dtype and np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(la, lb))


def _data_files(path):
  state_dir = os.path.join(path, checkpoints.STATE)
  files = [os.path.join(b, n) for b, _, names in os.walk(state_dir) for n in names]
  return sorted(files, key=os.path.getsize)


def test_round_trip_is_bit_identical_with_concrete_and_abstract_targets(tmp_path):
  state = _state()
  path = checkpoints.save(str(tmp_path), state, 11)
  assert path == os.path.join(str(tmp_path), "11")
  assert jax.tree_util.tree_structure(checkpoints.restore(str(tmp_path), state)) == jax.tree_util.tree_structure(state)
  assert _leaves_equal(checkpoints.restore(str(tmp_path), state), state)
  assert _leaves_equal(checkpoints.restore(str(tmp_path), jax.eval_shape(lambda: state)), state)
  restored = checkpoints.restore(str(tmp_path), state)
  assert restored.params["scale"].dtype == jnp.bfloat16 and restored.step.dtype == jnp.int32
  assert restored.key.dtype == jnp.uint32


def test_typed_prng_keys_round_trip(tmp_path):
  tree = {"key": jax.random.key(3, impl="rbg"), "x": jnp.arange(3.0, dtype=jnp.float32)}
  checkpoints.save(str(tmp_path), tree, 0)
  out = checkpoints.restore(str(tmp_path), tree)
  assert jax.random.key_impl(out["key"]) == jax.random.key_impl(tree["key"])
  assert np.array_equal(jax.random.key_data(out["key"]), jax.random.key_data(tree["key"]))
  assert np.array_equal(jax.random.normal(out["key"], (4,)), jax.random.normal(tree["key"], (4,)))


def test_keeps_the_newest_k_and_resaving_a_step_replaces_it(tmp_path):
  d = str(tmp_path)
  x = {"a": jnp.zeros(3, jnp.float32)}
  for step in (5, 10, 15, 20):
    checkpoints.save(d, {"a": x["a"] + step}, step, keep=2)
  assert checkpoints.steps(d) == [15, 20] and checkpoints.latest_step(d) == 20
  assert float(checkpoints.restore(d, x)["a"][0]) == 20.0
  assert float(checkpoints.restore(d, x, step=15)["a"][0]) == 15.0
  checkpoints.save(d, {"a": x["a"] - 1}, 20, keep=2)
  assert checkpoints.steps(d) == [15, 20] and float(checkpoints.restore(d, x)["a"][0]) == -1.0
  assert sorted(os.listdir(d)) == ["15", "20"]  # no temporary folders left
  mode = os.stat(os.path.join(d, "20")).st_mode & 0o777
  assert mode == 0o777 & ~_umask()  # the process umask, not mkdtemp's 0700


def test_leftovers_of_a_killed_save_are_ignored_and_cleaned(tmp_path):
  d = str(tmp_path)
  state = _state()
  checkpoints.save(d, state, 10)
  # A save killed after orbax finished (complete folder, not yet renamed) and one killed midway.
  os.rename(checkpoints.save(os.path.join(d, "scratch"), state.replace(step=jnp.int32(20)), 20),
            os.path.join(d, ".tmp-20-123-abcd"))
  os.rmdir(os.path.join(d, "scratch"))
  os.makedirs(os.path.join(d, ".tmp-30-456-ef01", "state.orbax-checkpoint-tmp"))
  assert checkpoints.steps(d) == [10]
  assert _leaves_equal(checkpoints.restore(d, state), state)
  checkpoints.save(d, state, 40)
  assert sorted(os.listdir(d)) == ["10", "40"]


def test_missing_directory_or_checkpoint_raises_naming_the_path(tmp_path):
  target = {"a": jnp.zeros(2)}
  missing = str(tmp_path / "nope")
  with pytest.raises(ValueError, match=f"{missing} does not exist"):
    checkpoints.restore(missing, target)
  with pytest.raises(ValueError, match=f"{tmp_path} holds no complete checkpoint"):
    checkpoints.restore(str(tmp_path), target)
  checkpoints.save(str(tmp_path), target, 3)
  with pytest.raises(ValueError, match=os.path.join(str(tmp_path), "4") + " does not exist"):
    checkpoints.restore(str(tmp_path), target, step=4)


@pytest.mark.parametrize("damage", ["truncate", "garble", "delete", "manifest", "no_manifest"])
def test_corrupt_checkpoint_raises_naming_the_file(tmp_path, damage):
  d = str(tmp_path)
  state = _state()
  path = checkpoints.save(d, state, 11)
  victim = _data_files(path)[-1]  # the largest file: array data
  if damage == "truncate":
    with open(victim, "r+b") as f:
      f.truncate(os.path.getsize(victim) // 2)
  elif damage == "garble":
    with open(victim, "r+b") as f:
      f.seek(os.path.getsize(victim) // 2)
      b = f.read(1)
      f.seek(-1, 1)
      f.write(bytes([b[0] ^ 0x01]))
  elif damage == "delete":
    os.remove(victim)
  else:
    victim = os.path.join(path, checkpoints.MANIFEST)
    if damage == "manifest":
      with open(victim, "r+b") as f:
        f.truncate(10)
    else:
      os.remove(victim)
  with pytest.raises(ValueError, match="cannot be read") as err:
    checkpoints.restore(d, state)
  assert victim in str(err.value)


def test_mismatched_target_raises(tmp_path):
  d = str(tmp_path)
  checkpoints.save(d, {"a": jnp.zeros((2, 3), jnp.float32), "b": jnp.zeros(2, jnp.int32)}, 1)
  with pytest.raises(ValueError, match=r"leaf \['a'\] was saved with shape \(2, 3\) dtype float32.*\(3, 2\)"):
    checkpoints.restore(d, {"a": jnp.zeros((3, 2), jnp.float32), "b": jnp.zeros(2, jnp.int32)})
  with pytest.raises(ValueError, match="dtype int32.*dtype float32"):
    checkpoints.restore(d, {"a": jnp.zeros((2, 3), jnp.float32), "b": jnp.zeros(2, jnp.float32)})
  with pytest.raises(ValueError, match=r"does not match the target's structure.*\['c'\]"):
    checkpoints.restore(d, {"a": jnp.zeros((2, 3), jnp.float32), "c": jnp.zeros(2, jnp.int32)})


def test_manifest_records_every_leaf(tmp_path):
  state = _state()
  path = checkpoints.save(str(tmp_path), state, 11)
  with open(os.path.join(path, checkpoints.MANIFEST)) as f:
    manifest = json.load(f)
  paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(state)]
  assert [m["path"] for m in manifest["leaves"]] == paths and manifest["step"] == 11
  assert set(manifest["files"]) and all(len(h) == 64 for h in manifest["files"].values())


def test_bad_arguments(tmp_path):
  with pytest.raises(ValueError, match="keep=0"):
    checkpoints.save(str(tmp_path), {"a": jnp.zeros(1)}, 0, keep=0)
  with pytest.raises(ValueError, match="step=-1"):
    checkpoints.save(str(tmp_path), {"a": jnp.zeros(1)}, -1)

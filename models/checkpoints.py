"""Orbax checkpoints behind two small functions: ``save(directory, state, step)`` and ``restore(directory,
target)``. Orbax's API moves; nothing else in the library touches it.

Layout of ``directory``::

  <step>/state/          the pytree's leaves, written by orbax (StandardCheckpointHandler)
  <step>/manifest.json   the leaves' paths, shapes and dtypes, and the SHA-256 of every file of state/
  .tmp-<step>-*/         a save in progress (or killed): ignored, removed by the next save

A save writes everything into a temporary folder, fsyncs it and renames it to ``<step>`` (one atomic
rename), then removes all but the newest ``keep`` steps. So ``<step>`` either is complete or does not
exist: a process killed at any point leaves the previous checkpoints intact. ``restore`` verifies the
manifest and the file hashes before reading, so a truncated or garbled file raises a ValueError naming
the file; it never falls back silently to an older step or to a fresh start (the caller decides).

Leaves are stored flat under their index, with their ``jax.tree_util.keystr`` paths in the manifest, so
any pytree (flax struct dataclasses, optax states with empty nodes, NamedTuples) round-trips through the
target's own structure. Typed PRNG keys are stored as their key data and re-wrapped with the target's
implementation (the default one for an abstract target). One writer per directory at a time.
"""
import hashlib
import json
import os
import secrets
import shutil

import jax
import numpy as np

MANIFEST = "manifest.json"
STATE = "state"
FORMAT = 1


def _is_key(x):
  dtype = getattr(x, "dtype", None)
  return dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key)


def _key_data_spec(leaf):
  """(shape, dtype) of the key data of a typed key leaf (an array or a ShapeDtypeStruct)."""
  spec = jax.eval_shape(jax.random.key_data, leaf)
  return tuple(spec.shape), np.dtype(spec.dtype)


def _wrap_key(data, leaf):
  # The target's implementation when it is a concrete key; an abstract one gets the default.
  impl = jax.random.key_impl(leaf) if isinstance(leaf, jax.Array) else None
  return jax.random.wrap_key_data(data, impl=impl)


def _flatten(tree):
  """[(path string, leaf)] of ``tree`` and its treedef."""
  leaves, treedef = jax.tree_util.tree_flatten_with_path(tree)
  return [(jax.tree_util.keystr(p), x) for p, x in leaves], treedef


def _leaf_name(i):
  return f"leaf_{i:05d}"


def _sha256(path):
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
      h.update(chunk)
  return h.hexdigest()


def _files(root):
  """Relative paths of the regular files under root, sorted."""
  out = []
  for base, _, names in os.walk(root):
    out.extend(os.path.relpath(os.path.join(base, n), root) for n in names)
  return sorted(out)


def _fsync_dir(path):
  fd = os.open(path, os.O_RDONLY)
  try:
    os.fsync(fd)
  finally:
    os.close(fd)


def _fsync_tree(root):
  for rel in _files(root):
    with open(os.path.join(root, rel), "rb") as f:
      os.fsync(f.fileno())
  for base, dirs, _ in os.walk(root):
    _fsync_dir(base)


def _new_dir(directory, prefix):
  """A new, uniquely named folder (created with the process umask, unlike mkdtemp's 0700)."""
  while True:
    path = os.path.join(directory, f"{prefix}{os.getpid()}-{secrets.token_hex(4)}")
    try:
      os.mkdir(path)
      return path
    except FileExistsError:
      continue


def steps(directory):
  """The complete checkpoint steps in ``directory``, ascending ([] if it does not exist)."""
  if not os.path.isdir(directory):
    return []
  return sorted(int(n) for n in os.listdir(directory)
                if n.isdigit() and str(int(n)) == n and os.path.isdir(os.path.join(directory, n)))


def latest_step(directory):
  """The newest complete step in ``directory``, or None when it holds none (or does not exist)."""
  found = steps(directory)
  return found[-1] if found else None


def save(directory, state, step, keep=3):
  """Saves the pytree ``state`` as checkpoint ``step`` of ``directory`` (created if missing), atomically,
  then keeps only the newest ``keep`` steps. Returns the checkpoint's path. Re-saving an existing step
  replaces it."""
  import orbax.checkpoint as ocp

  step = int(step)
  if step < 0:
    raise ValueError(f"step={step} must be >= 0")
  if keep < 1:
    raise ValueError(f"keep={keep} must be >= 1")
  os.makedirs(directory, exist_ok=True)
  flat, _ = _flatten(state)
  arrays, meta = {}, []
  for i, (path, leaf) in enumerate(flat):
    is_key = _is_key(leaf)
    arr = np.asarray(jax.device_get(jax.random.key_data(leaf) if is_key else leaf))
    arrays[_leaf_name(i)] = arr
    meta.append({"path": path, "shape": list(arr.shape), "dtype": str(arr.dtype), "prng_key": is_key})

  for name in os.listdir(directory):  # leftovers of saves that were killed
    if name.startswith(".tmp-") or name.startswith(".old-"):
      shutil.rmtree(os.path.join(directory, name), ignore_errors=True)
  tmp = _new_dir(directory, f".tmp-{step}-")
  try:
    ocp.Checkpointer(ocp.StandardCheckpointHandler()).save(
        os.path.join(tmp, STATE), args=ocp.args.StandardSave(arrays))
    state_dir = os.path.join(tmp, STATE)
    manifest = {"format": FORMAT, "step": step, "leaves": meta,
                "files": {rel: _sha256(os.path.join(state_dir, rel)) for rel in _files(state_dir)}}
    with open(os.path.join(tmp, MANIFEST), "w") as f:
      f.write(json.dumps(manifest, indent=1) + "\n")
    _fsync_tree(tmp)
    final = os.path.join(directory, str(step))
    if os.path.exists(final):
      old = _new_dir(directory, f".old-{step}-")
      os.rename(final, os.path.join(old, "x"))
      os.rename(tmp, final)
      shutil.rmtree(old, ignore_errors=True)
    else:
      os.rename(tmp, final)
    _fsync_dir(directory)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  for old_step in steps(directory)[:-keep]:
    shutil.rmtree(os.path.join(directory, str(old_step)), ignore_errors=True)
  return final


def _corrupt(path, why):
  return ValueError(f"checkpoint {path} cannot be read: {why}. Delete it (or the whole checkpoint folder to "
                    "start from scratch) if it cannot be repaired")


def _read_manifest(path):
  manifest_path = os.path.join(path, MANIFEST)
  try:
    with open(manifest_path) as f:
      manifest = json.load(f)
  except (OSError, ValueError) as e:
    raise _corrupt(manifest_path, f"{type(e).__name__}: {e}") from None
  if not isinstance(manifest, dict) or manifest.get("format") != FORMAT or not isinstance(
      manifest.get("leaves"), list) or not isinstance(manifest.get("files"), dict):
    raise _corrupt(manifest_path, "malformed manifest")
  state_dir = os.path.join(path, STATE)
  for rel, digest in sorted(manifest["files"].items()):
    file_path = os.path.join(state_dir, rel)
    if not os.path.isfile(file_path):
      raise _corrupt(file_path, "file missing")
    if _sha256(file_path) != digest:
      raise _corrupt(file_path, "SHA-256 mismatch (truncated or modified)")
  return manifest


def restore(directory, target, step=None):
  """The checkpoint ``step`` (default: the newest) of ``directory``, in the structure of ``target`` (a
  pytree of arrays or ShapeDtypeStructs like the saved one). A missing directory, no complete step, a
  corrupt file or a structure / shape / dtype mismatch raises a ValueError naming the path."""
  import orbax.checkpoint as ocp

  if not os.path.isdir(directory):
    raise ValueError(f"checkpoint directory {directory} does not exist")
  if step is None:
    step = latest_step(directory)
    if step is None:
      raise ValueError(f"checkpoint directory {directory} holds no complete checkpoint (no <step> folder)")
  path = os.path.join(directory, str(int(step)))
  if not os.path.isdir(path):
    raise ValueError(f"checkpoint {path} does not exist; steps in {directory}: {steps(directory)}")
  manifest = _read_manifest(path)

  flat, treedef = _flatten(target)
  saved = manifest["leaves"]
  want = [p for p, _ in flat]
  have = [m.get("path") for m in saved]
  if want != have:
    missing = [p for p in want if p not in have][:5]
    extra = [p for p in have if p not in want][:5]
    raise ValueError(f"checkpoint {path} does not match the target's structure: {len(have)} saved leaves vs "
                     f"{len(want)}; missing from the checkpoint: {missing}; not in the target: {extra}")
  abstract = {}
  for i, ((p, leaf), m) in enumerate(zip(flat, saved)):
    if _is_key(leaf):
      shape, dtype = _key_data_spec(leaf)
    else:
      shape, dtype = tuple(np.shape(leaf)), np.dtype(getattr(leaf, "dtype", np.asarray(leaf).dtype))
    if tuple(m["shape"]) != shape or m["dtype"] != str(dtype) or bool(m.get("prng_key")) != _is_key(leaf):
      raise ValueError(f"checkpoint {path}: leaf {p} was saved with shape {tuple(m['shape'])} dtype {m['dtype']}"
                       f"{' (PRNG key)' if m.get('prng_key') else ''}; the target has shape {shape} dtype {dtype}")
    abstract[_leaf_name(i)] = np.broadcast_to(np.zeros((), dtype), shape)  # no memory
  try:
    arrays = ocp.Checkpointer(ocp.StandardCheckpointHandler()).restore(
        os.path.join(path, STATE), args=ocp.args.StandardRestore(abstract))
  except Exception as e:  # orbax / tensorstore raise many types for unreadable data
    raise _corrupt(os.path.join(path, STATE), f"{type(e).__name__}: {e}") from e
  leaves = []
  for i, (_, leaf) in enumerate(flat):
    arr = jax.numpy.asarray(arrays[_leaf_name(i)])
    leaves.append(_wrap_key(arr, leaf) if _is_key(leaf) else arr)
  return jax.tree_util.tree_unflatten(treedef, leaves)


__all__ = ["save", "restore", "steps", "latest_step"]

"""The training experiment end to end (experiments/train.py, train_lib.py): a run SIGKILLed at several
points and SIGTERMed once, restarted each time until done, ends BIT-IDENTICAL (params, EMA, optimiser
state, step, key) to an uninterrupted run; metrics are never duplicated; a corrupt checkpoint stops the
restart with an error naming the file; a changed config is refused naming the keys.

Training runs in subprocesses (``python -m experiments.train``: float32, x64 off, CPU) sharing one JAX
persistent compilation cache, so only the first process pays for compilation; a cached executable is
the same program, and the reference run (compiled fresh) against the resumed ones (from the cache)
checks that too.
"""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from experiments import train_lib
from models import checkpoints

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 120
OVERRIDES = [
    "--config=experiments/configs/toy2d.py", f"--config.train.steps={STEPS}", "--config.train.checkpoint_every=10",
    "--config.train.log_every=10", "--config.train.keep_checkpoints=2", "--config.model.kwargs.hidden=32",
    "--config.model.kwargs.depth=1", "--config.data.batch_size=64", "--config.data.options.size=2048",
    "--config.optim.warmup_steps=20", "--config.seed=3",
]
TIMEOUT = 120


@pytest.fixture(scope="module")
def env(tmp_path_factory):
  e = dict(os.environ)
  e.update(JAX_PLATFORMS="cpu", JAX_ENABLE_X64="0", PYTHONPATH=REPO,
           JAX_COMPILATION_CACHE_DIR=str(tmp_path_factory.mktemp("jax_cache")),
           JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="-1")
  return e


class Proc:
  """``python -m experiments.train`` on a workdir, stdout / stderr into files next to it."""

  def __init__(self, env, workdir, tag):
    self.workdir, self.out, self.err = workdir, f"{workdir}.{tag}.out", f"{workdir}.{tag}.err"
    with open(self.out, "w") as out, open(self.err, "w") as err:
      self.p = subprocess.Popen([sys.executable, "-m", "experiments.train", f"--workdir={workdir}", *OVERRIDES],
                                cwd=REPO, env=env, stdout=out, stderr=err)

  def stderr(self):
    with open(self.err) as f:
      return f.read()

  def result(self):
    with open(self.out) as f:
      return json.loads(f.read().strip().splitlines()[-1])

  def wait(self):
    rc = self.p.wait(TIMEOUT)
    return rc

  def wait_for_checkpoint(self, at_least):
    """Polls the workdir until a checkpoint >= at_least exists; fails if the process ends first."""
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline:
      latest = checkpoints.latest_step(os.path.join(self.workdir, train_lib.CHECKPOINTS))
      if latest is not None and latest >= at_least:
        return latest
      if self.p.poll() is not None:
        pytest.fail(f"training ended (rc {self.p.returncode}) before checkpoint {at_least}:\n{self.stderr()[-3000:]}")
      time.sleep(0.005)
    self.p.kill()
    pytest.fail(f"no checkpoint {at_least} within {TIMEOUT}s")

  def signal(self, sig):
    self.p.send_signal(sig)
    return self.wait()


def _run_to_end(env, workdir, tag):
  proc = Proc(env, workdir, tag)
  rc = proc.wait()
  assert rc == 0, proc.stderr()[-3000:]
  return proc


def _final_state(workdir):
  _, state = train_lib.restore_state(workdir)
  _, ema = train_lib.load_params(workdir)
  return state, ema


def _metrics(workdir):
  with open(os.path.join(workdir, train_lib.METRICS)) as f:
    return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def reference(env, tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("reference") / "run")
  proc = _run_to_end(env, workdir, "ref")
  return workdir, proc


def test_uninterrupted_run_writes_its_outputs(reference):
  workdir, proc = reference
  assert proc.result()["status"] == "done" and proc.result()["step"] == STEPS
  with open(os.path.join(workdir, train_lib.CONFIG)) as f:
    config = json.load(f)
  assert config["train"]["steps"] == STEPS and config["model"]["kwargs"]["hidden"] == 32
  assert config["data"]["options"] == {"size": 2048, "seed": 0, "noise": 0.05}  # resolved defaults included
  rows = _metrics(workdir)
  assert [r["step"] for r in rows] == list(range(10, STEPS + 1, 10))
  assert all(r["window"] == 10 and r["steps_per_sec"] > 0 and np.isfinite(r["loss"]) for r in rows)
  assert rows[-1]["loss"] < rows[0]["loss"]
  assert rows[1]["lr"] == pytest.approx(2e-3, rel=1e-6)  # step 20 is the last warmup step: the peak
  assert checkpoints.steps(os.path.join(workdir, train_lib.CHECKPOINTS)) == [STEPS - 10, STEPS]  # keep 2
  assert checkpoints.steps(os.path.join(workdir, train_lib.PARAMS)) == [STEPS]
  err = proc.stderr()
  assert "steps/s" in err and "ETA" in err and f"step {STEPS}/{STEPS}" in err


def test_killed_and_terminated_run_resumes_bit_identically(env, reference, tmp_path):
  ref_dir, _ = reference
  workdir = str(tmp_path / "run")
  ckpts = os.path.join(workdir, train_lib.CHECKPOINTS)

  first = Proc(env, workdir, "1")
  first.wait_for_checkpoint(20)
  assert first.signal(signal.SIGKILL) == -signal.SIGKILL

  second = Proc(env, workdir, "2")
  seen = second.wait_for_checkpoint(checkpoints.latest_step(ckpts) + 20)
  assert second.signal(signal.SIGTERM) == 0, second.stderr()[-3000:]
  stopped = second.result()
  assert stopped["status"] == "preempted" and seen <= stopped["step"] < STEPS
  assert checkpoints.latest_step(ckpts) == stopped["step"]  # saved where it stopped
  assert "SIGTERM" in second.stderr()

  third = Proc(env, workdir, "3")
  third.wait_for_checkpoint(stopped["step"] + 15)
  assert third.signal(signal.SIGKILL) == -signal.SIGKILL

  last = _run_to_end(env, workdir, "4")
  assert last.result()["status"] == "done" and "resuming at step" in last.stderr()

  state, ema = _final_state(workdir)
  ref_state, ref_ema = _final_state(ref_dir)
  leaves, ref_leaves = jax.tree_util.tree_leaves_with_path(state), jax.tree_util.tree_leaves_with_path(ref_state)
  assert [p for p, _ in leaves] == [p for p, _ in ref_leaves]
  for (path, a), (_, b) in zip(leaves, ref_leaves):
    a, b = np.asarray(a), np.asarray(b)
    assert a.dtype == b.dtype and np.array_equal(a, b), jax.tree_util.keystr(path)
  assert int(state.step) == STEPS
  assert all(np.array_equal(a, b) for a, b in zip(jax.tree_util.tree_leaves(ema), jax.tree_util.tree_leaves(ref_ema)))
  assert all(np.asarray(x).dtype == np.float32 for x in jax.tree_util.tree_leaves(state.params))

  # Metrics: no step twice, every reference line present, equal wherever the window is the same.
  rows, ref_rows = _metrics(workdir), _metrics(ref_dir)
  steps = [r["step"] for r in rows]
  assert steps == sorted(set(steps)) and {r["step"] for r in ref_rows} <= set(steps)
  assert stopped["step"] in steps  # the SIGTERM save logged its partial window
  ref_by_step = {r["step"]: r for r in ref_rows}
  same = [r for r in rows if r["step"] in ref_by_step and r["window"] == ref_by_step[r["step"]]["window"]]
  assert len(same) >= len(ref_rows) - 1
  for r in same:
    assert (r["loss"], r["grad_norm"], r["lr"]) == tuple(ref_by_step[r["step"]][k] for k in ("loss", "grad_norm", "lr"))


def test_corrupt_checkpoint_fails_the_restart_naming_the_file(env, reference, tmp_path):
  ref_dir, _ = reference
  workdir = str(tmp_path / "run")
  shutil.copytree(ref_dir, workdir)
  state_dir = os.path.join(workdir, train_lib.CHECKPOINTS, str(STEPS), checkpoints.STATE)
  files = [os.path.join(b, n) for b, _, names in os.walk(state_dir) for n in names]
  victim = max(files, key=os.path.getsize)  # an array data file
  with open(victim, "r+b") as f:
    f.seek(os.path.getsize(victim) // 2)
    byte = f.read(1)
    f.seek(-1, 1)
    f.write(bytes([byte[0] ^ 0xFF]))
  proc = Proc(env, workdir, "corrupt")
  assert proc.wait() != 0
  err = proc.stderr()
  assert "ValueError" in err and victim in err and "starting at step 0" not in err
  assert os.path.getsize(os.path.join(workdir, train_lib.METRICS)) > 0  # nothing was reset


def test_restart_with_another_config_names_the_keys(reference, tmp_path):
  ref_dir, _ = reference
  workdir = str(tmp_path / "run")
  shutil.copytree(ref_dir, workdir)
  config = train_lib.load_config(workdir)
  config["optim"]["learning_rate"] = 1e-2
  config["train"]["steps"] = STEPS + 10
  with pytest.raises(ValueError, match=r"optim\.learning_rate, train\.steps") as err:
    train_lib.run(config, workdir)
  assert os.path.join(workdir, train_lib.CONFIG) in str(err.value)


def test_presets_resolve():
  from experiments.configs import digits, toy2d
  toy = train_lib.resolve_config(toy2d.get_config())
  assert toy["model"]["name"] == "mlp" and toy["data"]["name"] == "two_moons" and not toy["diffusion"]["conditional"]
  dig = train_lib.resolve_config(digits.get_config())
  assert dig["model"]["name"] == "unet" and dig["data"]["name"] == "digits"
  assert dig["diffusion"]["conditional"] and dig["diffusion"]["label_dropout"] == 0.1
  assert dig["model"]["kwargs"]["channel_mult"] == [1, 2]  # resolved with the module's own defaults
  with pytest.raises(ValueError, match="model.kwargs: unknown key.*'width'"):
    train_lib.resolve_config({**toy, "model": {"name": "mlp", "kwargs": {"width": 3}}})
  with pytest.raises(ValueError, match="unknown key.*train.stepz"):
    train_lib.resolve_config({**toy, "train": {**toy["train"], "stepz": 3}})


def test_fresh_start_only_without_a_checkpoint(tmp_path):
  ckpts = tmp_path / train_lib.CHECKPOINTS
  assert train_lib._checkpoint_dir(str(tmp_path)) is None  # fresh workdir
  os.makedirs(ckpts / ".tmp-10-123-abcd" / "state")  # a first save that was killed
  assert train_lib._checkpoint_dir(str(tmp_path)) is None
  os.makedirs(ckpts / "stray")
  with pytest.raises(ValueError, match=f"{ckpts} holds no complete checkpoint"):
    train_lib._checkpoint_dir(str(tmp_path))


def test_training_on_eight_devices_is_data_parallel_and_matches_one_device(tmp_path):
  """With more than one device, experiments.train shards the batch over all of them (state replicated):
  8 simulated CPU devices in a subprocess end within float round-off of this 1-device process."""
  overrides = ["--config.train.steps=20", "--config.train.checkpoint_every=10", "--config.train.log_every=10",
               "--config.optim.warmup_steps=5", "--config.data.batch_size=64"]
  config = os.path.join(REPO, "experiments", "configs", "toy2d.py")
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
  sharded = str(tmp_path / "sharded")
  proc = subprocess.run([sys.executable, "-m", "experiments.train", f"--config={config}", f"--workdir={sharded}",
                         *overrides], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert json.loads(proc.stdout.strip().splitlines()[-1])["devices"] == 8
  single = str(tmp_path / "single")
  cfg = train_lib.load_config(sharded)
  assert train_lib.run(cfg, single)["status"] == "done"
  a, b = train_lib.load_params(sharded)[1], train_lib.load_params(single)[1]
  for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=0, atol=1e-5)
  assert jax.device_count() == 1  # this process really is the single-device reference

"""Sampling a trained network (experiments/sample.py, sample_lib.py) on a tiny class-conditional two-moons
MLP trained once for the module (~9 s), plus hand-made workdirs of untrained networks (an image
U-Net, an unconditional MLP) that need no training compilation."""
import json
import os
import shutil
import subprocess
import sys

import jax
import matplotlib.image
import numpy as np
import pytest

from experiments import sample_lib, train_lib
from experiments.configs import toy2d
from models import checkpoints

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
STEPS = 1000  # ~1 s after the ~7 s compilation; 150 steps leave a network whose PF-ODE throws 40% of samples far out


def _toy_config(conditional=True):
  c = toy2d.get_config()
  c.data.options.size = 2048
  c.data.batch_size = 128
  c.model.kwargs.hidden = 32
  c.model.kwargs.depth = 1
  c.optim.warmup_steps = 10
  c.train.steps = STEPS
  c.train.log_every = 500
  c.train.checkpoint_every = STEPS
  c.diffusion.conditional = conditional
  c.diffusion.label_dropout = 0.2 if conditional else 0.0
  return c


def _untrained_workdir(path, config):
  """A finished-looking training workdir (config.json, params/<steps>/) of an untrained network: what
  sampling reads, without compiling a training step."""
  cfg = train_lib.resolve_config(config)
  os.makedirs(path)
  with open(os.path.join(path, train_lib.CONFIG), "w") as f:
    json.dump(cfg, f)
  setup = train_lib.Setup(cfg)
  # Zeros of the params' shapes (no initialisation to compile): the networks' zero-initialised output layers
  # make an untrained network predict exactly 0 anyway.
  params = jax.tree_util.tree_map(lambda s: np.zeros(s.shape, s.dtype), jax.eval_shape(setup.init_params))
  checkpoints.save(os.path.join(path, train_lib.PARAMS), {"ema_params": params}, cfg["train"]["steps"])
  return str(path)


def _load(workdir):
  with np.load(os.path.join(workdir, "samples.npz")) as z:
    return {k: z[k] for k in z.files}


@pytest.fixture(scope="module")
def model(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("train") / "toy")
  assert train_lib.run(_toy_config(), workdir)["status"] == "done"
  return workdir


@pytest.fixture(scope="module")
def sampled(model, tmp_path_factory):
  out = str(tmp_path_factory.mktemp("sample") / "new_subdir")  # run() must create it
  config = {"model": model, "solver": "dpm_solver_pp_2m", "grid": "uniform_logsnr", "steps": 10, "num_samples": 64}
  return out, sample_lib.run(config, out)


def test_outputs(sampled, model):
  out, result = sampled
  assert sorted(n for n in os.listdir(out)) == ["config.json", "samples.npz", "samples.png"]  # no temporaries
  z = _load(out)
  assert set(z) == {"samples", "labels", "nfe", "solver", "grid", "seconds"}
  assert z["samples"].shape == (64, 2) and z["samples"].dtype == np.float32
  assert np.all(np.isfinite(z["samples"])) and np.array_equal(z["samples"], result["samples"])
  data = sample_lib.load_model(model).setup.dataset.x
  nearest = np.min(np.linalg.norm(z["samples"][:, None] - data[None], axis=-1), axis=1)
  assert np.median(nearest) < 0.3  # on the moons (data std 1), not noise (~0.1 for this model)
  assert z["labels"].shape == (64,) and z["labels"].dtype == np.int32 and np.all(z["labels"] == -1)
  assert int(z["nfe"]) == 10 == result["nfe"]  # one model call per step
  assert str(z["solver"]) == "dpm_solver_pp_2m" and str(z["grid"]) == "logsnr"  # the builder's name is an alias
  assert float(z["seconds"]) > 0
  with open(os.path.join(out, "samples.png"), "rb") as f:
    assert f.read(8) == PNG_MAGIC
  assert matplotlib.image.imread(os.path.join(out, "samples.png")).ndim == 3
  with open(os.path.join(out, "config.json")) as f:
    record = json.load(f)
  assert record["sample"]["model"] == model and record["sample"]["steps"] == 10
  assert record["model"]["step"] == STEPS and record["model"]["params"] == os.path.join(model, "params", str(STEPS))
  assert record["model"]["train_config"] == train_lib.load_config(model)


def test_denoiser_is_the_one_training_used(model):
  """The Denoiser applies the training loss's network, prediction kind and time label to the EMA params."""
  m = sample_lib.load_model(model)
  den = sample_lib.denoiser(m)
  assert (den.prediction, den.time_label) == ("eps", "t999") == (m.setup.loss.prediction, m.setup.loss.time_label)
  x = jax.numpy.full((3, 2), 0.5, jax.numpy.float32)
  t = jax.numpy.asarray(0.3, jax.numpy.float32)
  direct = m.setup.loss.apply_fn(m.params, x, m.setup.loss.label(t), None)
  np.testing.assert_array_equal(den.raw(x, t, m.setup.schedule), direct)


@pytest.mark.parametrize("solver, steps, final, nfe", [("ddim", 7, "t_end", 7), ("edm_heun", 6, "zero", 11)])
def test_nfe_matches_the_solver(model, tmp_path, solver, steps, final, nfe):
  # Heun: two calls per step, the final jump to sigma = 0 an Euler step.
  result = sample_lib.run({"model": model, "solver": solver, "steps": steps, "final": final, "num_samples": 8},
                          str(tmp_path))
  assert result["nfe"] == int(_load(tmp_path)["nfe"]) == nfe
  assert np.all(np.isfinite(result["samples"]))


def test_same_seed_same_samples(model, tmp_path):
  """A stochastic solver: the seed fixes x_T and the noise."""
  config = {"model": model, "solver": "euler_maruyama", "steps": 8, "num_samples": 16, "seed": 3}
  a = sample_lib.run(config, str(tmp_path / "a"))["samples"]
  b = sample_lib.run(config, str(tmp_path / "b"))["samples"]
  c = sample_lib.run(dict(config, seed=4), str(tmp_path / "c"))["samples"]
  np.testing.assert_array_equal(a, b)
  assert np.max(np.abs(a - c)) > 0.1


def test_latest_checkpoint_holds_the_same_ema(model, sampled, tmp_path):
  # Training saves its last checkpoint at the final step: its EMA params are the final params.
  out, result = sampled
  config = {"model": model, "grid": "logsnr", "steps": 10, "num_samples": 64, "checkpoint": "latest"}
  latest = sample_lib.run(config, str(tmp_path))
  np.testing.assert_array_equal(latest["samples"], result["samples"])
  with open(tmp_path / "config.json") as f:
    assert json.load(f)["model"]["params"] == os.path.join(model, "checkpoints", str(STEPS))


def test_guided_sampling_by_class(model, tmp_path):
  base = {"model": model, "steps": 10, "num_samples": 64, "final": "zero"}
  one = sample_lib.run(dict(base, class_label=1, guidance=3.0), str(tmp_path / "one"))
  assert np.all(one["labels"] == 1) and one["samples"].shape == (64, 2) and one["nfe"] == 10  # a guided call: 1 NFE
  plain = sample_lib.run(dict(base, class_label=1), str(tmp_path / "plain"))  # guidance 1: the conditional net
  assert np.max(np.abs(one["samples"] - plain["samples"])) > 1e-2  # the scale matters
  every = sample_lib.run(dict(base, class_label=-1, guidance=3.0), str(tmp_path / "every"))
  np.testing.assert_array_equal(every["labels"], np.repeat([0, 1], 32))  # one row per class
  assert np.all(np.isfinite(every["samples"]))
  # The upper moon is class 0, the lower one class 1 (models.data.two_moons): guidance separates them.
  y = every["samples"][:, 1]
  assert np.mean(y[:32]) > np.mean(y[32:]) + 0.5
  assert np.array_equal(_load(tmp_path / "every")["labels"], every["labels"])


def test_image_model_writes_a_tile_grid(tmp_path):
  c = train_lib.default_config()
  c.data.name = "digits"
  c.model.name = "unet"
  c.model.kwargs = {"channels": 4, "channel_mult": (1,), "num_res_blocks": 1, "attention_levels": (), "norm_groups": 2}
  c.diffusion.schedule = "vp_cosine"
  c.diffusion.conditional = True
  c.train.steps = 1
  workdir = _untrained_workdir(tmp_path / "digits", c)
  result = sample_lib.run({"model": workdir, "solver": "ddim", "steps": 3, "num_samples": 12, "class_label": -1,
                           "guidance": 2.0}, str(tmp_path / "out"))
  assert result["samples"].shape == (20, 8, 8, 1) and result["samples"].dtype == np.float32  # 2 per class x 10
  np.testing.assert_array_equal(result["labels"], np.repeat(np.arange(10), 2))
  png = matplotlib.image.imread(str(tmp_path / "out" / "samples.png"))
  assert png.ndim == 3 and min(png.shape[:2]) > 200
  # The tile grid itself: [-1, 1] -> [0, 1], tile k at row k // cols, grey padding.
  tiles = np.stack([np.full((2, 3, 1), v, np.float32) for v in (-1.0, 0.0, 1.0, 3.0)])
  grid = sample_lib.image_grid(tiles, rows=2, cols=3)
  assert grid.shape == (2 * 3 + 1, 3 * 4 + 1, 1)
  np.testing.assert_array_equal(grid[1:3, 1:4, 0], 0.0)
  np.testing.assert_array_equal(grid[1:3, 5:8, 0], 0.5)
  np.testing.assert_array_equal(grid[1:3, 9:12, 0], 1.0)
  np.testing.assert_array_equal(grid[4:6, 1:4, 0], 1.0)  # 3.0 is clipped
  assert grid[0, 0, 0] == grid[4, 5, 0] == sample_lib.PAD_VALUE  # padding and an empty tile


@pytest.mark.parametrize("override, match", [
    ({"solver": "no_such_solver"}, "no_such_solver"),
    ({"grid": "spiral"}, "spiral"),
    ({"steps": 0}, "steps: 0 must be >= 1"),
    ({"num_samples": 0}, "num_samples: 0 must be >= 1"),
    ({"final": "never"}, "never"),
    ({"checkpoint": "best"}, "best"),
    ({"guidance": 2.0}, "needs a class label"),
    ({"guidance": -1.0, "class_label": 0}, "guidance=-1"),
    ({"class_label": -2}, "class_label: -2 must be >= -1"),
    ({"class_label": 2}, "class_label=2 is out of range.*2 classes"),
    ({"no_such_key": 1}, "no_such_key"),
])
def test_bad_config_raises(model, tmp_path, override, match):
  with pytest.raises(ValueError, match=match):
    sample_lib.run(dict({"model": model}, **override), str(tmp_path / "out"))
  assert not os.path.exists(tmp_path / "out")  # validated before anything is written


def test_bad_model_paths_raise_naming_them(model, tmp_path):
  out = str(tmp_path / "out")
  missing = str(tmp_path / "no_such_run")
  with pytest.raises(ValueError, match=f"{missing}.*does not exist"):
    sample_lib.run({"model": missing}, out)
  empty = tmp_path / "empty"
  empty.mkdir()
  with pytest.raises(ValueError, match=f"{empty} is not a training workdir.*config.json"):
    sample_lib.run({"model": str(empty)}, out)
  unfinished = tmp_path / "unfinished"  # a run stopped before its end: checkpoints, no final params
  shutil.copytree(model, unfinished, ignore=shutil.ignore_patterns("params"))
  with pytest.raises(ValueError, match=f"{unfinished}/params holds no final params.*--checkpoint=latest"):
    sample_lib.run({"model": str(unfinished)}, out)
  assert sample_lib.run({"model": str(unfinished), "checkpoint": "latest", "num_samples": 4, "steps": 2},
                        str(tmp_path / "ok"))["nfe"] == 2
  shutil.rmtree(unfinished / "checkpoints")
  with pytest.raises(ValueError, match=f"{unfinished}/checkpoints holds no complete checkpoint"):
    sample_lib.run({"model": str(unfinished), "checkpoint": "latest"}, out)
  assert not os.path.exists(out)


def test_class_label_needs_a_conditional_model(tmp_path):
  workdir = _untrained_workdir(tmp_path / "uncond", _toy_config(conditional=False))
  with pytest.raises(ValueError, match="unconditional"):
    sample_lib.run({"model": workdir, "class_label": 0}, str(tmp_path / "out"))
  result = sample_lib.run({"model": workdir, "num_samples": 4, "steps": 2}, str(tmp_path / "out"))
  assert result["samples"].shape == (4, 2)


def test_absl_main(model, tmp_path):
  out = tmp_path / "cli"
  cmd = [sys.executable, "-m", "experiments.sample", f"--workdir={out}", f"--model={model}", "--solver=ddim",
         "--grid=uniform_logsnr", "--steps=4", "--num_samples=8", "--final=zero", "--class_label=0", "--guidance=2"]
  proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr[-3000:]
  summary = json.loads(proc.stdout.strip().splitlines()[-1])
  assert summary["nfe"] == 4 and summary["num_samples"] == 8 and summary["finite"] is True
  z = _load(out)
  assert z["samples"].shape == (8, 2) and np.all(z["labels"] == 0)

  bad = subprocess.run(cmd[:5] + ["--steps=0"], cwd=REPO, capture_output=True, text=True, timeout=120)
  assert bad.returncode != 0 and "steps: 0 must be >= 1" in bad.stderr

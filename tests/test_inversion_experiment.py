"""The inversion study (experiments/inversion_lib.py and its absl main) on tiny settings."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from experiments import inversion_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
TINY = {"methods": ["ddim", "bdia", "edict"], "dtypes": ["float64"], "nfe_steps": [5, 10], "batch": 4,
        "guidance": [1.0], "gammas": [0.96], "mixing": [0.93], "edit_steps": 10, "repeats": 1}


def _read_json(path):
  with open(path) as f:
    return json.load(f)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("inversion") / "new_subdir"  # run() must create it
  returned = inversion_lib.run(TINY, str(workdir))
  return workdir, returned


def _runs(results, method):
  return [r for r in results["runs"] if r["method"] == method]


def test_results_json_and_round_trip_errors(tiny):
  workdir, returned = tiny
  results = _read_json(workdir / "results.json")
  assert results == returned and results["complete"] is True
  assert _read_json(workdir / "config.json") == results["config"]
  assert results["config"]["methods"] == ["ddim", "bdia", "edict"]
  assert {(r["method"], r["steps"]) for r in results["runs"]} == {(m, n) for m in TINY["methods"] for n in (5, 10)}
  for r in results["runs"]:
    assert r["dtype"] == "float64" and r["guidance"] == 1.0 and r["seconds"] >= 0
  for method in ("bdia", "edict"):
    assert results["methods"][method]["exact"]
    for r in _runs(results, method):
      assert r["rel_error"] < 1e-10, r
  for n in (5, 10):
    ddim = next(r for r in _runs(results, "ddim") if r["steps"] == n)
    exact = max(r["rel_error"] for r in results["runs"] if r["method"] != "ddim" and r["steps"] == n)
    assert ddim["rel_error"] > 100 * exact and ddim["rel_error"] <= ddim["max_sample_rel_error"]
  # The NFE comes from Solution.nfe: DDIM one call per step each way, BDIA's regeneration starts from the
  # stored pair (one step fewer), EDICT two calls per step.
  nfe = {(r["method"], r["steps"]): (r["nfe_invert"], r["nfe_regenerate"]) for r in results["runs"]}
  assert nfe[("ddim", 10)] == (10, 10) and nfe[("bdia", 10)] == (10, 9) and nfe[("edict", 5)] == (10, 10)
  # One compilation per direction for each (method, option, dtype): every grid has one capacity.
  assert [s["compilations"] for s in results["series"]] == [2, 2, 2]
  ddim_order = results["series"][0]["round_trip_order"][0]["order"]
  assert ddim_order > 0 and results["series"][1]["round_trip_order"][0]["order"] is None


def test_editing_record(tiny):
  _, results = tiny
  edit = results["editing"]
  assert edit["steps"] == 10 and edit["source_class"] == 0 and edit["target_class"] == 1
  assert edit["x0_in_source_class"] == 1.0 and edit["x0_typical"] == 1.0
  assert [r["method"] for r in edit["methods"]] == ["ddim", "bdia", "edict"]
  for r in edit["methods"]:
    assert 0.0 <= r["to_target"] <= 1.0 and r["to_target"] + r["in_source"] <= 1.0
    assert r["to_target"] == 1.0  # the one-hot target condition leaves no other class
    assert 0.0 <= r["typical"] <= 1.0
  offsets = {r["method"]: r["offset_change"] for r in edit["methods"]}
  assert 0 < edit["exact_offset_change_guidance_1"] < offsets["ddim"]


def test_table_and_plot(tiny):
  workdir, _ = tiny
  table = (workdir / "table.txt").read_text()
  for name in ("ddim", "bdia gamma=0.96", "edict p=0.93", "== float64, guidance 1 ==", "N=5", "N=10", "editing"):
    assert name in table
  png = (workdir / "inversion.png").read_bytes()
  assert png.startswith(PNG_MAGIC) and len(png) > 1000
  assert sorted(os.listdir(workdir)) == ["config.json", "inversion.png", "results.json", "table.txt"]


def test_option_sweep_and_defaults():
  config = inversion_lib.resolve_config({"gammas": "0.9,1", "mixing": [0.97]})
  assert config.methods == list(inversion_lib.METHOD_NAMES) and config.dtypes == ["float32", "float64"]
  assert inversion_lib.option_values(config, "bdia") == [{"gamma": 0.9}, {"gamma": 1.0}]
  assert inversion_lib.option_values(config, "ddim") == [{}]
  assert inversion_lib.library_default("bdia") == 0.96 and inversion_lib.library_default("dpm_solver_pp") is None
  assert inversion_lib.plotted_option(config, "bdia") == {"gamma": 1.0}  # the swept value closest to 0.96
  assert inversion_lib.plotted_option(config, "bdia_edm") == {"gamma": 0.9}  # its own default
  from solvers import inversion
  assert tuple(inversion.METHODS) == inversion_lib.METHOD_NAMES
  assert inversion_lib.plotted_option(config, "edict") == {"p": 0.97}


@pytest.mark.parametrize("override, match", [
    ({"methods": ["ddim", "null_text"]}, "null_text"),
    ({"dtypes": ["float16"]}, "float16"),
    ({"gammas": [0.9, 1.5]}, "1.5"),
    ({"gammas": [0.0]}, r"0\.0 must lie in \(0, 1\]"),
    ({"mixing": [-0.2]}, "-0.2"),
    ({"nfe_steps": [10, 0]}, "0 must be >= 1"),
    ({"guidance": ["strong"]}, "strong"),
    ({"target_class": 0}, "target_class"),
    ({"no_such_key": 1}, "no_such_key"),
])
def test_bad_config_raises(tmp_path, override, match):
  with pytest.raises(ValueError, match=match):
    inversion_lib.run(override, str(tmp_path / "w"))
  assert not os.path.exists(tmp_path / "w")  # validated before anything is written


def test_existing_workdir_is_not_corrupted(tmp_path, monkeypatch):
  """Unrelated files survive, an old results.json is replaced whole, and a run interrupted while writing
  its outputs leaves complete files and no temporaries."""
  (tmp_path / "notes.txt").write_text("keep me\n")
  (tmp_path / "results.json").write_text('{"old": true}\n')
  (tmp_path / "table.txt").write_text("stale table\n")
  replace = os.replace
  seen = []

  def interrupted_replace(src, dst):
    if os.path.basename(dst) == "inversion.png":  # the PNG is fully written to its temporary, then interrupted
      seen.append(open(src, "rb").read(8))
      raise KeyboardInterrupt("interrupted while renaming the plot")
    return replace(src, dst)

  monkeypatch.setattr(os, "replace", interrupted_replace)
  config = dict(TINY, methods=["ddim"], nfe_steps=[4], edit_steps=0)
  with pytest.raises(KeyboardInterrupt):
    inversion_lib.run(config, str(tmp_path))
  assert seen == [PNG_MAGIC]
  assert (tmp_path / "notes.txt").read_text() == "keep me\n"
  results = _read_json(tmp_path / "results.json")  # the last complete write: before the final one
  assert results["complete"] is False and [r["steps"] for r in results["runs"]] == [4]
  assert "ddim" in (tmp_path / "table.txt").read_text()  # the new table, written whole
  assert sorted(os.listdir(tmp_path)) == ["config.json", "notes.txt", "results.json", "table.txt"]


def test_absl_main(tmp_path):
  workdir = tmp_path / "inv"
  cmd = [sys.executable, "-m", "experiments.inversion", f"--workdir={workdir}", "--methods=bdia", "--dtypes=float64",
         "--nfe=4", "--batch=2", "--guidance=1", "--gammas=0.96", "--edit_steps=0", "--repeats=1"]
  proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr[-3000:]
  results = _read_json(workdir / "results.json")
  assert results["complete"] and [r["rel_error"] < 1e-10 for r in results["runs"]] == [True]
  assert "bdia gamma=0.96" in proc.stdout  # the table is printed

  bad = subprocess.run(cmd[:3] + ["--gammas=0.9,1.2"], cwd=REPO, capture_output=True, text=True, timeout=120)
  assert bad.returncode != 0 and "--gammas: 1.2 must lie in (0, 1]" in bad.stderr


# ----------------------------------------------------------------------------------------------------
# A trained network (--model): a tiny class-conditional digits U-Net trained for 20 steps once for the
# module (~10 s). The exact methods round-trip any network, so a barely trained one is enough.

MODEL_RUN = {"methods": ["ddim", "bdia", "edict"], "nfe_steps": [4, 8], "batch": 4, "guidance": [2.0],
             "gammas": [0.96], "mixing": [0.93], "edit_steps": 8, "repeats": 1, "grid_images": 3,
             "source_class": 3, "target_class": 8}


@pytest.fixture(scope="module")
def digits_model(tmp_path_factory):
  from experiments import train_lib
  from experiments.configs import digits
  c = digits.get_config()
  c.data.batch_size = 32
  c.model.kwargs = {"channels": 8, "channel_mult": (1,), "num_res_blocks": 1, "attention_levels": (), "norm_groups": 4}
  c.optim.warmup_steps = 2
  c.train.steps = c.train.log_every = c.train.checkpoint_every = 20
  workdir = str(tmp_path_factory.mktemp("train") / "digits")
  assert train_lib.run(c, workdir)["status"] == "done"
  return workdir


@pytest.fixture(scope="module")
def model_run(digits_model, tmp_path_factory):
  workdir = tmp_path_factory.mktemp("inversion_model") / "new_subdir"
  return workdir, inversion_lib.run(dict(MODEL_RUN, model=digits_model), str(workdir))


def test_model_round_trips(model_run, digits_model):
  workdir, returned = model_run
  assert sorted(os.listdir(workdir)) == ["config.json", "inversion.png", "inversion_grid.png", "results.json",
                                         "table.txt"]
  results = _read_json(workdir / "results.json")
  assert results == returned and results["complete"] is True
  config = _read_json(workdir / "config.json")
  assert config == results["config"] and config["model"] == digits_model
  # float32 by default for a network; its schedule over its whole interval, ending at sigma = 0.
  assert config["dtypes"] == ["float32"] and config["schedule"] == "vp_linear" and config["t_start"] is None
  assert config["dim"] is None and config["guidance"] == [2.0] and config["source_class"] == 3
  assert inversion_lib.resolve_config(config).model == digits_model  # a recorded config resolves again
  p = results["problem"]
  assert (p["t_start"], p["sigma_end"], p["model_step"], p["num_classes"], p["data_shape"]) == (1.0, 0.0, 20, 10, [8, 8, 1])
  from experiments import sample_lib
  data = sample_lib.load_model(digits_model).setup.dataset
  assert len(p["data_indices"]) == 4 and all(data.labels[i] == 3 for i in p["data_indices"])  # the source class
  runs = {(r["method"], r["steps"]): r for r in results["runs"]}
  assert set(runs) == {(m, n) for m in MODEL_RUN["methods"] for n in (4, 8)}
  for n in (4, 8):
    assert runs[("bdia", n)]["rel_error"] < 1e-4, runs[("bdia", n)]
    # EDICT (like BDIA-EDM) amplifies float32 rounding more on a network than on the GMM (here ~3e-4; ~1e-12
    # in float64); still far below the naive inversion's error.
    assert runs[("edict", n)]["rel_error"] < 1e-3, runs[("edict", n)]
    assert runs[("ddim", n)]["rel_error"] > 100 * max(runs[(m, n)]["rel_error"] for m in ("bdia", "edict"))
  assert [s["compilations"] for s in results["series"]] == [2] * 3
  edit = results["editing"]
  assert (edit["dtype"], edit["steps"], edit["source_class"], edit["target_class"]) == ("float32", 8, 3, 8)
  for r in edit["methods"]:
    assert 0 <= r["to_target"] + r["in_source"] <= 1 and r["change"] > 0 and r["nfe_invert"] > 0
  table = (workdir / "table.txt").read_text()
  for text in ("digits training data: 4 examples of class 3", "== float32, guidance 2 ==", "edict p=0.93",
               "regenerate guided to class 8", "g=2: to 8"):
    assert text in table


def test_model_image_grid(model_run, digits_model):
  """inversion_grid.png: rows = the first grid_images originals, columns original | round trip per method |
  edit per method, [-1, 1] -> [0, 1] pixel for pixel."""
  import matplotlib.image
  from experiments import sample_lib
  workdir, results = model_run
  assert (workdir / "inversion_grid.png").read_bytes().startswith(PNG_MAGIC)
  png = matplotlib.image.imread(str(workdir / "inversion_grid.png"))
  rows, cols = 3, 1 + 2 * 3
  layout = inversion_lib.grid_layout(rows, cols, 8, 8, panels=1)
  assert png.shape[:2] == (layout["height"], layout["width"])
  scale = layout["scale"]
  assert scale * 9 >= inversion_lib.GRID_TILE_PX
  mosaic_h, mosaic_w = (rows * 9 + 1) * scale, (cols * 9 + 1) * scale
  margin, header = inversion_lib.GRID_MARGIN, inversion_lib.GRID_HEADER
  assert png.shape[1] / png.shape[0] == pytest.approx((mosaic_w + 2 * margin) / (header + mosaic_h + margin))
  assert png.shape[1] > 1.5 * png.shape[0]  # 7 columns of 3 rows of square tiles, under a header
  x0 = sample_lib.load_model(digits_model).setup.dataset.x[results["problem"]["data_indices"]]

  def tile(r, c):  # the centre of each image pixel of tile (r, c), red channel
    y = layout["tops"][0] + (1 + r * 9 + np.arange(8)) * scale + scale // 2
    x = layout["left"] + (1 + c * 9 + np.arange(8)) * scale + scale // 2
    return png[y[:, None], x[None, :], 0]

  for r in range(rows):
    expected = np.clip((x0[r, :, :, 0] + 1) / 2, 0, 1)
    np.testing.assert_allclose(tile(r, 0), expected, atol=1.01 / 255)  # the original
    np.testing.assert_allclose(tile(r, 2), expected, atol=1.01 / 255)  # bdia's round trip
  assert np.max(np.abs(tile(0, 1) - tile(0, 0))) > 0.05  # ddim's round trip is visibly off


@pytest.mark.parametrize("override, match", [
    ({"target_class": 10}, "target_class=10 is out of range: the model in .* has 10 classes"),
    ({"source_class": 12, "target_class": 1}, "source_class=12 is out of range"),
    ({"source_class": 8, "target_class": 8}, "must differ"),
    ({"batch": 1000}, "batch=1000 is more than the 183 training examples of class 3"),
])
def test_model_bad_config_raises(digits_model, tmp_path, override, match):
  with pytest.raises(ValueError, match=match):
    inversion_lib.run(dict(MODEL_RUN, model=digits_model, **override), str(tmp_path / "w"))
  assert not os.path.exists(tmp_path / "w")  # checked against the model before anything is written


def test_model_paths_and_unconditional_models(tmp_path):
  from tests.test_sample_experiment import _toy_config, _untrained_workdir
  out = tmp_path / "w"
  missing = str(tmp_path / "no_such_run")
  with pytest.raises(ValueError, match=f"{missing}.*does not exist"):
    inversion_lib.run({"model": missing}, str(out))
  with pytest.raises(ValueError, match="model=''"):
    inversion_lib.run({"model": ""}, str(out))
  uncond = _untrained_workdir(tmp_path / "uncond", _toy_config(conditional=False))
  for flags in ({"source_class": 0}, {"target_class": 1}, {"guidance": [2.0]}):
    with pytest.raises(ValueError, match=f"{next(iter(flags))}=.*unconditional"):
      inversion_lib.run(dict(flags, model=uncond), str(out))
  assert not os.path.exists(out)
  # Without class flags it is studied as it is: no edit, and no image grid for 2-D data.
  results = inversion_lib.run({"model": uncond, "methods": ["bdia"], "nfe_steps": [3], "batch": 4, "gammas": [0.96],
                               "edit_steps": 2, "repeats": 1}, str(out))
  assert results["config"]["guidance"] == [1.0] and results["config"]["source_class"] is None
  assert results["editing"] is None and results["runs"][0]["rel_error"] < 1e-5
  inversion_lib.resolve_config(results["config"])  # guidance [1]: the network itself, accepted again
  assert sorted(os.listdir(out)) == ["config.json", "inversion.png", "results.json", "table.txt"]


def test_model_absl_main(digits_model, tmp_path):
  # Class flags beyond the GMM's range pass the flag checks with --model; the network's range is checked
  # once it is loaded.
  cmd = [sys.executable, "-m", "experiments.inversion", f"--workdir={tmp_path / 'inv'}", f"--model={digits_model}",
         "--source_class=3", "--target_class=12"]
  proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
  assert proc.returncode != 0 and "target_class=12 is out of range" in proc.stderr and "10 classes" in proc.stderr
  assert not os.path.exists(tmp_path / "inv")

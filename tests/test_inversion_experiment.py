"""The inversion study (experiments/inversion_lib.py and its absl main) on tiny settings."""
import json
import os
import subprocess
import sys

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

"""The learned-schedule experiment (experiments/learn_schedule.py, learn_schedule_lib.py) on tiny settings: it
writes its files and artifacts, its numbers are those the artifacts reproduce, and the sample and convergence
experiments accept a saved artifact by name (--grid=learned:<name>), on the GMM and on a small (randomly
initialised, not trained) network."""
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import solvers
from experiments import convergence_lib, learn_schedule_lib, sample_lib, train_lib
from experiments.configs import toy2d
from models import checkpoints
from solvers import learned_grids
from solvers import schedule_artifacts as sa

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
SOLVER = "dpm_solver_pp_2m"
GMM = {"dim": 2, "solvers": [SOLVER], "nfe": [3], "methods": ["gradient", "evolution", "hybrid"], "num_calibration": 6,
       "num_heldout": 8, "iterations": 15, "learning_rate": 0.1, "population": 8, "generations": 2,
       "reference_rtol": 1e-8, "reference_atol": 1e-8}


@pytest.fixture(scope="module")
def gmm_run(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("learn") / "gmm")
  return workdir, learn_schedule_lib.run(GMM, workdir)


def _random_network_workdir(path):
  """A finished-looking training workdir of a small unconditional MLP with random weights (an untrained one
  predicts exactly 0: its output layer starts at zero)."""
  c = toy2d.get_config()
  c.model.kwargs.hidden = 16
  c.model.kwargs.depth = 1
  c.diffusion.conditional = False
  c.diffusion.label_dropout = 0.0
  cfg = train_lib.resolve_config(c)
  os.makedirs(path)
  with open(os.path.join(path, train_lib.CONFIG), "w") as f:
    json.dump(cfg, f)
  shapes = jax.eval_shape(train_lib.Setup(cfg).init_params)
  rng = np.random.default_rng(0)
  params = jax.tree_util.tree_map(lambda s: (0.1 * rng.standard_normal(s.shape)).astype(s.dtype), shapes)
  checkpoints.save(os.path.join(path, train_lib.PARAMS), {"ema_params": params}, cfg["train"]["steps"])
  return str(path)


def test_outputs_and_artifacts(gmm_run):
  workdir, results = gmm_run
  assert sorted(os.listdir(workdir)) == ["config.json", "learned_schedules.png", "results.json", "schedules", "table.txt"]
  on_disk = json.load(open(os.path.join(workdir, "results.json")))
  assert on_disk["complete"] and on_disk["problem"]["model_key"] == "gmm-dim2-k4-seed0"
  assert open(os.path.join(workdir, "learned_schedules.png"), "rb").read(8) == PNG_MAGIC
  table = open(os.path.join(workdir, "table.txt")).read()
  assert "best hand-made" in table and "| gradient |" in table and "held-out / calibration" in table
  entry = results["solvers"][SOLVER]["3"]
  assert set(entry["baselines"]) == {"logsnr", "quadratic_t", "karras"}
  assert entry["best_hand_made_heldout"] == min(b["heldout"] for b in entry["baselines"].values())
  names = sorted(os.listdir(os.path.join(workdir, "schedules")))
  assert names == [f"gmm-dim2-k4-seed0-{SOLVER}-{m}-nfe3.json" for m in ("evolution", "gradient", "hybrid")]
  # The gradient from the evolution's grid: not worse on calibration (up to the 0.1% slack a grid ending exactly at
  # t_end is given when the last node is learned).
  hybrid = entry["methods"]["hybrid"]
  assert hybrid["init"] == "evolution" and hybrid["calibration"] <= 1.02 * entry["methods"]["evolution"]["calibration"]
  gradient = entry["methods"]["gradient"]
  first, last = gradient["history_first_last"]
  assert gradient["calibration"] <= first and gradient["calibration"] < entry["baselines"]["logsnr"]["calibration"] + 1e-12


def test_artifact_reproduces_the_recorded_numbers(gmm_run):
  workdir, results = gmm_run
  from models import analytic
  for method in ("gradient", "evolution", "hybrid"):
    record = results["solvers"][SOLVER]["3"]["methods"][method]
    artifact = sa.load(record["artifact"], search_path=os.path.join(workdir, "schedules"))
    assert artifact.method == method and artifact.nfe == artifact.num_steps == 3 and artifact.final == "zero"
    assert list(artifact.times) == record["times"]
    assert artifact.metrics["heldout_rmse"] == record["heldout"]
    schedule = artifact.make_schedule()
    problem = learned_grids.make_problem(analytic.gmm(dim=2).denoiser(schedule), schedule, jax.random.key(0),
                                         num_calibration=6, num_heldout=8, rtol=1e-8, atol=1e-8)
    sol = solvers.sample(artifact.solver_object(), problem.denoiser, schedule, artifact.grid(), problem.x_heldout)
    rmse = float(jnp.sqrt(jnp.mean((sol.x - problem.reference_heldout) ** 2)))
    assert rmse == pytest.approx(record["heldout"], rel=1e-12) and int(sol.nfe) == 3


def test_convergence_accepts_learned_grids_by_name(gmm_run):
  workdir, _ = gmm_run
  folder = os.path.join(workdir, "schedules")
  config = convergence_lib.resolve_config({"problems": ["gmm"], "dim": 2, "solvers": [SOLVER], "nfe_steps": [3],
                                           "final": "zero", "schedules_dir": folder,
                                           "grid": f"learned:gmm-dim2-k4-seed0-{SOLVER}-gradient-nfe{{nfe}}"})
  from solvers import grids, schedules
  _, (grid,), start, end = convergence_lib._sweep(grids, schedules.get("vp_linear"), config)
  artifact = sa.load(f"gmm-dim2-k4-seed0-{SOLVER}-gradient-nfe3", search_path=folder)
  np.testing.assert_array_equal(np.asarray(grid.t)[:3], np.asarray(artifact.times))
  assert int(grid.num_steps) == 3 and end[2] == 0.0
  with pytest.raises(ValueError, match="unknown; available: .*gradient-nfe3"):
    convergence_lib.resolve_config({"grid": "learned:nothing-here", "schedules_dir": folder, "nfe_steps": [3]})
  with pytest.raises(ValueError, match="final='zero'"):
    convergence_lib.resolve_config({"grid": f"learned:{artifact.name}", "schedules_dir": folder, "nfe_steps": [3]})
  with pytest.raises(ValueError, match="nfe_steps=\\[3\\]"):
    convergence_lib.resolve_config({"grid": f"learned:{artifact.name}", "schedules_dir": folder, "final": "zero"})


def test_model_schedule_and_the_sample_experiment_by_name(tmp_path):
  model = _random_network_workdir(tmp_path / "net")
  out = str(tmp_path / "learned")
  results = learn_schedule_lib.run({"model": model, "solvers": [SOLVER], "nfe": [3], "methods": ["gradient"],
                                    "num_calibration": 4, "num_heldout": 4, "iterations": 0, "dtype": "float32",
                                    "reference_rtol": 1e-7, "reference_atol": 1e-7}, out)
  key = sample_lib.model_key(sample_lib.load_model(model))
  steps = json.load(open(os.path.join(model, train_lib.CONFIG)))["train"]["steps"]
  assert results["problem"]["model_key"] == key and key.startswith("two_moons-") and key.endswith(f"-step{steps}")
  name = results["solvers"][SOLVER]["3"]["methods"]["gradient"]["artifact"]
  assert name == f"{key}-{SOLVER}-gradient-nfe3"
  folder = os.path.join(out, "schedules")
  sampled = sample_lib.run({"model": model, "grid": f"learned:{name}", "schedules_dir": folder, "num_samples": 8},
                           str(tmp_path / "samples"))
  artifact = sa.load(name, search_path=folder)
  assert sampled["nfe"] == 3 and sampled["solver"] == SOLVER
  record = json.load(open(tmp_path / "samples" / "config.json"))
  assert record["sample"]["steps"] == 3 and record["sample"]["final"] == "zero"
  assert record["learned_schedule"]["times"] == list(artifact.times) and record["model"]["key"] == key
  loaded = sample_lib.load_model(model)
  x_T = sample_lib.prior(artifact.grid().sigma[0], (8,) + loaded.shape, jax.random.fold_in(jax.random.key(0), 0))
  direct = solvers.sample(SOLVER, sample_lib.denoiser(loaded), loaded.setup.schedule, artifact.grid(), x_T).x
  np.testing.assert_array_equal(sampled["samples"], np.asarray(direct))
  with pytest.raises(ValueError, match="unknown; available: .*gradient-nfe3"):
    sample_lib.run({"model": model, "grid": "learned:no-such-schedule", "schedules_dir": folder}, str(tmp_path / "x"))
  with pytest.raises(ValueError, match="steps=5 differs"):
    sample_lib.run({"model": model, "grid": f"learned:{name}", "schedules_dir": folder, "steps": 5}, str(tmp_path / "x"))


@pytest.mark.parametrize("override, match", [
    ({"methods": ["annealing"]}, "annealing"),
    ({"solvers": ["heun3"]}, "heun3"),
    ({"solvers": ["euler_maruyama"]}, "stochastic"),
    ({"nfe": [0]}, "must be >= 1"),
    ({"baselines": ["edm"]}, "edm"),
    ({"num_calibration": 0}, "num_calibration"),
    ({"final": "t_end"}, "learn_end"),
    ({"dtype": "bfloat16"}, "bfloat16"),
    ({"problem": "gaussian"}, "gaussian"),
    ({"learning_rate": -1.0}, "learning_rate"),
])
def test_bad_config_raises(override, match):
  with pytest.raises(ValueError, match=match):
    learn_schedule_lib.resolve_config(override)


def test_multi_stage_solvers_are_refused(tmp_path):
  with pytest.raises(ValueError, match="one-call-per-step"):
    learn_schedule_lib.run(dict(GMM, solvers=["edm_heun"]), str(tmp_path / "heun"))
  assert not os.path.exists(tmp_path / "heun")  # refused before anything is written


def test_absl_flag_errors():
  bad = subprocess.run([sys.executable, "-m", "experiments.learn_schedule", "--workdir=/tmp/never_written",
                        "--methods=annealing"], cwd=REPO, capture_output=True, text=True, timeout=120)
  assert bad.returncode != 0 and "annealing" in bad.stderr and not os.path.exists("/tmp/never_written")

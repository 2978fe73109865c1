"""The convergence study (experiments/convergence_lib.py and its absl main) on tiny settings."""
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

import solvers
from experiments import convergence_lib
from models import analytic
from solvers import grids, reference, schedules

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _read_json(path):
  with open(path) as f:
    return json.load(f)


def _metrics(path):
  with open(path) as f:
    return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def gaussian_ddim(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("gaussian") / "new_subdir")  # run() must create it
  config = {"problems": ["gaussian"], "solvers": ["ddim"], "nfe_steps": [16, 32, 64], "batch": 4}
  returned = convergence_lib.run(config, workdir)
  return workdir, returned


def test_results_json_fields_and_order(gaussian_ddim):
  workdir, returned = gaussian_ddim
  results = _read_json(os.path.join(workdir, "results.json"))
  assert results == json.loads(json.dumps(returned))
  assert results["complete"] is True
  assert results["config"]["solvers"] == ["ddim"] and results["config"]["batch"] == 4
  assert list(results["problems"]) == ["gaussian"]
  rec = results["problems"]["gaussian"]["solvers"]["ddim"]
  assert rec["declared_order"] == solvers.get("ddim").order == 1
  assert abs(rec["fitted_order"] - 1.0) < 0.3, rec
  assert abs(rec["asymptotic_order"] - 1.0) < 0.3, rec
  assert rec["compilations"] == 1  # one capacity for the whole sweep: one compilation
  assert [r["steps"] for r in rec["runs"]] == [16, 32, 64]
  for r in rec["runs"]:
    assert set(r) >= {"steps", "nfe", "rmse", "seconds"}
    assert r["nfe"] == r["steps"]  # DDIM: one model call per step
    assert 0 < r["rmse"] < 1 and r["seconds"] >= 0
  errors = [r["rmse"] for r in rec["runs"]]
  assert errors == sorted(errors, reverse=True)
  assert _read_json(os.path.join(workdir, "config.json")) == results["config"]


def test_other_outputs(gaussian_ddim):
  workdir, returned = gaussian_ddim
  with open(os.path.join(workdir, "convergence.png"), "rb") as f:
    png = f.read()
  assert png.startswith(PNG_MAGIC) and len(png) > 1000
  import matplotlib.image
  assert matplotlib.image.imread(os.path.join(workdir, "convergence.png")).ndim == 3
  runs = returned["problems"]["gaussian"]["solvers"]["ddim"]["runs"]
  lines = _metrics(os.path.join(workdir, "metrics.jsonl"))
  assert len(lines) == len(runs) == 3
  assert [(m["problem"], m["solver"], m["nfe"]) for m in lines] == [("gaussian", "ddim", n) for n in (16, 32, 64)]
  with open(os.path.join(workdir, "table.txt")) as f:
    table = f.read()
  assert "fitted order" in table and table.count("gaussian  ddim") == 3
  assert not [n for n in os.listdir(workdir) if n.endswith(".tmp")]  # atomic writes leave no temporaries


def test_gmm_with_loose_reference_and_final_zero(tmp_path):
  config = {"problems": ["gaussian", "gmm"], "solvers": ["ddim"], "nfe_steps": [4, 8], "batch": 4,
            "final": "zero", "reference_rtol": 1e-6, "reference_atol": 1e-6}
  results = convergence_lib.run(config, str(tmp_path))
  gmm = results["problems"]["gmm"]
  assert gmm["answer"].startswith("reference") and gmm["rtol"] == 1e-6
  assert gmm["sigma_end"] == 0.0 and results["problems"]["gaussian"]["sigma_end"] == 0.0
  for problem in ("gaussian", "gmm"):
    runs = results["problems"][problem]["solvers"]["ddim"]["runs"]
    assert [r["nfe"] for r in runs] == [4, 8]
    assert runs[1]["rmse"] < runs[0]["rmse"]
  assert len(_metrics(tmp_path / "metrics.jsonl")) == 4


def test_solvers_that_learn_from_the_model_are_prepared_per_grid(tmp_path):
  """The study calls Solver.prepare before each run (timed as prepare_seconds): here dc_solver searches its
  ratios, and its result differs from the registered default's (rho = 1). (DPM-Solver-v3's prepare is
  tested in tests/test_dpm_solver_v3.py.)"""
  config = {"problems": ["gmm"], "solvers": ["dc_solver", "dpm_solver_pp_2m"], "nfe_steps": [6],
            "batch": 4, "reference_rtol": 1e-6, "reference_atol": 1e-6, "dim": 2}
  results = convergence_lib.run(config, str(tmp_path))
  records = results["problems"]["gmm"]["solvers"]
  runs = {name: record["runs"][0] for name, record in records.items()}
  assert runs["dc_solver"]["prepare_seconds"] > 0 and records["dc_solver"]["first_prepare_seconds"] > 0
  assert "prepare_seconds" not in runs["dpm_solver_pp_2m"] and "first_prepare_seconds" not in records["dpm_solver_pp_2m"]
  schedule = schedules.VPLinear()
  grid = grids.uniform_logsnr(schedule, 6, t_start=1.0, t_end=1e-3, capacity=7)
  oracle = analytic.gmm(dim=2)
  x_T = oracle.sample(jax.random.key(0), 4, grid.alpha[0], grid.sigma[0])
  answer = reference.solve(oracle.denoiser(schedule), schedule, x_T, 1.0, 1e-3)
  default = solvers.sample("dc_solver", oracle.denoiser(schedule), schedule, grid, x_T).x
  default_rmse = float(jnp.sqrt(jnp.mean((default - answer) ** 2)))
  assert abs(runs["dc_solver"]["rmse"] - default_rmse) > 1e-3 * default_rmse


def test_default_solvers_are_every_deterministic_one():
  config = convergence_lib.resolve_config(None)
  assert config.solvers == [n for n in solvers.available() if not solvers.get(n).stochastic]
  assert "ddim" in config.solvers and config.problems == ["gaussian", "gmm"]


@pytest.mark.parametrize("override, match", [
    ({"problems": ["gaussian", "banana"]}, "banana"),
    ({"solvers": ["no_such_solver"]}, "no_such_solver"),
    ({"nfe_steps": [4, 0]}, "0"),
    ({"grid": "spiral"}, "spiral"),
    ({"final": "never"}, "never"),
    ({"no_such_key": 1}, "no_such_key"),
])
def test_bad_config_raises(tmp_path, override, match):
  with pytest.raises(ValueError, match=match):
    convergence_lib.run(override, str(tmp_path / "w"))
  assert not os.path.exists(tmp_path / "w")  # validated before anything is written


def test_absl_main(tmp_path):
  workdir = tmp_path / "conv"
  cmd = [sys.executable, "-m", "experiments.convergence", f"--workdir={workdir}", "--solvers=ddim",
         "--nfe=4,8", "--problems=gaussian", "--batch=4"]
  proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr[-3000:]
  results = _read_json(workdir / "results.json")
  assert [r["nfe"] for r in results["problems"]["gaussian"]["solvers"]["ddim"]["runs"]] == [4, 8]
  assert "fitted order" in proc.stdout  # the table is printed

  bad = subprocess.run(cmd[:3] + ["--nfe=4,0"], cwd=REPO, capture_output=True, text=True, timeout=120)
  assert bad.returncode != 0 and "--nfe" in bad.stderr and "0 must be >= 1" in bad.stderr


# ----------------------------------------------------------------------------------------------------
# The problem 'model': a trained network (a tiny two-moons MLP, trained once for the module).


@pytest.fixture(scope="module")
def toy_model(tmp_path_factory):
  from experiments import train_lib
  from experiments.configs import toy2d
  c = toy2d.get_config()
  c.data.options.size = 2048
  c.data.batch_size = 128
  c.model.kwargs.hidden = 32
  c.model.kwargs.depth = 1
  c.optim.warmup_steps = 10
  c.train.steps = c.train.log_every = c.train.checkpoint_every = 1000
  workdir = str(tmp_path_factory.mktemp("train") / "toy")
  assert train_lib.run(c, workdir)["status"] == "done"
  return workdir


def test_model_problem(toy_model, tmp_path):
  config = {"model": toy_model, "solvers": ["ddim", "dpm_solver_pp_2m"], "nfe_steps": [5, 10, 20], "batch": 4}
  results = convergence_lib.run(config, str(tmp_path))
  assert results["config"]["problems"] == ["model"] and results["config"]["model"] == toy_model  # --model alone
  entry = results["problems"]["model"]
  assert list(results["problems"]) == ["model"]
  # The reference: diffrax at the tight default tolerances, timed, over the model schedule's whole interval.
  assert entry["answer"].startswith("reference") and entry["rtol"] == entry["atol"] == 1e-10
  assert entry["seconds"] > 0 and entry["error_floor"] == 1e-8
  schedule = schedules.VPLinear()  # the toy preset's
  assert (entry["t_start"], entry["t_end"]) == (schedule.t_max, schedule.t_min)
  assert entry["model"] == toy_model and entry["model_step"] == 1000 and entry["data_shape"] == [2]
  for name in ("ddim", "dpm_solver_pp_2m"):
    runs = entry["solvers"][name]["runs"]
    assert [r["nfe"] for r in runs] == [5, 10, 20]
    errors = [r["rmse"] for r in runs]
    assert all(e is not None and 0 < e < 10 for e in errors), errors
    assert errors[2] < 0.5 * errors[0], (name, errors)
    assert entry["solvers"][name]["fitted_order"] > 0.5
  ddim = [r["rmse"] for r in entry["solvers"]["ddim"]["runs"]]
  assert ddim == sorted(ddim, reverse=True)
  with open(tmp_path / "table.txt") as f:
    assert f.read().count("model    ddim") == 3
  with open(tmp_path / "convergence.png", "rb") as f:
    assert f.read(8) == PNG_MAGIC
  assert [m["problem"] for m in _metrics(tmp_path / "metrics.jsonl")] == ["model"] * 6


def test_model_problem_config_errors(toy_model, tmp_path):
  out = tmp_path / "w"
  with pytest.raises(ValueError, match="'model' needs model="):
    convergence_lib.run({"problems": ["model"]}, str(out))
  with pytest.raises(ValueError, match="leaves out 'model'"):
    convergence_lib.run({"problems": ["gaussian"], "model": toy_model}, str(out))
  missing = str(tmp_path / "no_such_run")
  with pytest.raises(ValueError, match=f"{missing}.*does not exist"):
    convergence_lib.run({"model": missing, "solvers": ["ddim"]}, str(out))
  with pytest.raises(ValueError, match=f"{tmp_path} is not a training workdir"):
    convergence_lib.run({"model": str(tmp_path), "solvers": ["ddim"]}, str(out))
  assert not os.path.exists(out)  # validated (and the model loaded) before anything is written


def test_absl_main_model_flag(tmp_path):
  cmd = [sys.executable, "-m", "experiments.convergence", f"--workdir={tmp_path / 'conv'}", "--problems=model"]
  bad = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
  assert bad.returncode != 0 and "needs model=" in bad.stderr and "--model" in bad.stderr

"""experiments.benchmark: one small run of the absl main with every part, in a subprocess with 8 simulated CPU
devices (``--xla_force_host_platform_device_count`` only acts before jax is imported, so it cannot be this
process; float32, x64 off, as users run it); the tests below read its results.json / table.txt / stdout.
Timings are never asserted against a bound (the machine is shared); their presence, sign and the
arithmetic between them are. Bad settings and a failing run are checked in this process.
"""
import importlib.util
import json
import math
import os
import subprocess
import sys

import pytest

from experiments import benchmark_lib as lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEVICES = 8
SOLVERS = ("ddim", "dpm_solver_pp_2m", "euler_maruyama", "dpm_solver_12")  # ode, ode, sde, adaptive
STEPS = 4
BATCH, DIM = 8, 4
UNET_BATCH = 8
FLAGS = [f"--solvers={','.join(SOLVERS)}", f"--steps={STEPS}", f"--batch={BATCH}", f"--dim={DIM}", "--repeats=2",
         f"--unet_batch={UNET_BATCH}", "--unet_solvers=ddim", "--unet_nfe=2", "--throughput_nfe=2",
         "--throughput_model=near_free"]
HAS_DIFFUSERS = all(importlib.util.find_spec(m) is not None for m in ("torch", "diffusers"))


def _env(devices=None):
  env = dict(os.environ)
  if devices:
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={devices}").strip()
  env["JAX_PLATFORMS"] = "cpu"
  env.pop("JAX_ENABLE_X64", None)
  env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
  return env


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("bench")
  proc = subprocess.run([sys.executable, "-m", "experiments.benchmark", f"--workdir={workdir}"] + FLAGS, cwd=ROOT,
                        env=_env(DEVICES), capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-4000:]
  with open(workdir / "results.json") as f:
    results = json.load(f)
  with open(workdir / "table.txt") as f:
    table = f.read()
  return {"results": results, "table": table, "stdout": proc.stdout, "workdir": workdir}


def test_every_part_is_written_and_the_table_printed_last(run):
  results, table = run["results"], run["table"]
  assert results["complete"]
  for part in lib.PARTS:
    assert part in results, part
  for header in ("1. Solver overhead", "1b. diffusers", "2. Compilation", "3. Sampling vs model cost", "4. Throughput"):
    assert header in table, header
  assert run["stdout"].endswith(table)  # printed last
  assert sorted(os.listdir(run["workdir"])) == ["results.json", "table.txt"]  # no temporary files left


def test_machine_is_recorded_and_named(run):
  import jax
  env = run["results"]["environment"]
  assert env["device_count"] == DEVICES and env["platform"] == "cpu" and env["x64"] is False
  assert env["jax_version"] == jax.__version__ and env["cpu_count"] == os.cpu_count()
  assert f"{env['device_kind']} (cpu) x {DEVICES} device(s)" in run["table"].splitlines()[0]


def test_one_compilation_per_grid_capacity(run):
  c = run["results"]["compile"]
  assert c["nfe"] == [1, 100]
  # NFE 1..63 pad to 64 nodes, 64..100 to 128: a loop that recompiled per NFE would count up to 100
  assert c["capacities"] == [64, 128] and c["distinct_capacities"] == 2
  assert c["compilations"] == 2
  assert [(k["nfe"], k["capacity"]) for k in c["compiling_calls"]] == [(1, 64), (64, 128)]
  for k in c["compiling_calls"]:  # compile time = the first call minus the same call cached
    assert math.isclose(k["compile_seconds"], k["first_call_seconds"] - k["cached_call_seconds"], rel_tol=1e-9)
  assert math.isclose(c["compile_seconds_total"], sum(k["compile_seconds"] for k in c["compiling_calls"]))
  assert c["cached_call_seconds"] < c["compile_seconds_per_compilation"]  # compiling costs more than a call


def _timings(tree, path=""):
  """Every (path, value) of a timing, rate or ratio in the results."""
  keys = ("_seconds", "_ms", "us_per_step", "us_per_nfe", "samples_per_second", "ratio", "ratio_best", "speedup",
          "_median")
  if isinstance(tree, dict):
    for k, v in tree.items():
      if k == "config":
        continue
      if isinstance(v, (int, float)) and not isinstance(v, bool) and any(k.endswith(s) for s in keys):
        yield f"{path}/{k}", v
      elif isinstance(v, (dict, list)):
        yield from _timings(v, f"{path}/{k}")
  elif isinstance(tree, list):
    for i, v in enumerate(tree):
      yield from _timings(v, f"{path}/{i}")


def test_every_timing_is_positive_and_finite(run):
  found = dict(_timings(run["results"]))
  assert len(found) > 30  # every part contributed
  for path, value in found.items():
    assert math.isfinite(value) and value > 0, (path, value)
  medians = [p for p in found if p.endswith("_median")]
  assert len(medians) >= 10
  for path in medians:  # the best of the calls is never above their median
    assert found[path[:-len("_median")]] <= found[path], path


def test_overhead_for_each_requested_solver(run):
  o = run["results"]["overhead"]
  assert list(o["solvers"]) == list(SOLVERS) and o["shape"] == [BATCH, DIM] and o["dtype"] == "float32"
  for name, r in o["solvers"].items():
    assert "error" not in r and r["finite"], (name, r)
    assert name in run["table"]
    assert math.isclose(r["us_per_nfe"], 1e3 * r["call_ms"] / r["nfe"])
    if name == "dpm_solver_12":  # adaptive: it picks its own steps, so only the cost per NFE applies
      assert r["kind"] == "adaptive" and r["us_per_step"] is None and r["nfe"] > 0
      continue
    assert r["nfe"] == STEPS  # one model call per step
    assert r["kind"] == ("sde" if name == "euler_maruyama" else "ode")
    assert math.isclose(r["us_per_step"], 1e3 * r["call_ms"] / STEPS)


def test_diffusers_rows(run):
  d = run["results"]["diffusers"]
  if not HAS_DIFFUSERS:
    assert d["available"] is False and d["reason"] and "diffusers: absent" in run["table"]
    return
  assert d["available"] is True
  assert list(d["schedulers"]) == list(lib.DIFFUSERS)
  for cls, r in d["schedulers"].items():
    assert r["ours"] == lib.DIFFUSERS[cls][1] and r["finite"]
    assert math.isclose(r["ratio"], r["ours_us_per_step"] / r["us_per_step"])
    assert cls in run["table"]
  # our counterpart measured in the overhead part is the very number compared
  ddim = d["schedulers"]["DDIMScheduler"]
  assert ddim["ours_us_per_step"] == run["results"]["overhead"]["solvers"]["ddim"]["us_per_step"]


def test_unet_ratio_is_reported(run):
  u = run["results"]["unet"]
  assert u["shape"] == [UNET_BATCH, 8, 8, 1] and "UNet" in u["model"] and u["dtype"] == "float32"
  assert [(r["solver"], r["steps"], r["nfe"]) for r in u["runs"]] == [("ddim", 2, 2)]
  r = u["runs"][0]
  assert r["finite"]
  assert math.isclose(r["ratio_best"], r["sample_seconds"] / (r["nfe"] * r["eval_seconds"]))
  # the loop's own cost per step (part 1's near-free ddim) relative to one network evaluation
  near_free = run["results"]["overhead"]["solvers"]["ddim"]["us_per_step"]
  assert math.isclose(r["predicted_ratio"], 1 + 1e-6 * near_free / r["eval_seconds"])


def test_throughput_on_one_and_all_devices(run):
  t = run["results"]["throughput"]
  assert t["batch"] == UNET_BATCH and t["batch"] % DEVICES == 0
  assert [r["devices"] for r in t["rows"]] == [1, DEVICES]
  for r in t["rows"]:
    assert r["finite"] and r["nfe"] == 2
    assert math.isclose(r["samples_per_second"], t["batch"] / r["sample_seconds"])
  assert math.isclose(t["speedup_best"], t["rows"][1]["samples_per_second"] / t["rows"][0]["samples_per_second"])


# ----------------------------------------------------------------------------------------------------
# Bad settings and failures (this process).


@pytest.mark.parametrize("override, named", [
    ({"solvers": ["ddim", "no_such_solver"]}, "no_such_solver"),
    ({"unet_solvers": ["nope"]}, "nope"),
    ({"steps": 0}, "steps (NFE): 0"),
    ({"compile_max_nfe": 0}, "compile_max_nfe (NFE): 0"),
    ({"unet_nfe": [10, 0]}, "unet_nfe (NFE): 0"),
    ({"throughput_nfe": -1}, "throughput_nfe (NFE): -1"),
    ({"batch": 0}, "batch: 0"),
    ({"unet_batch": 0}, "unet_batch: 0"),
    ({"repeats": 0}, "repeats: 0"),
    ({"parts": ["overhead", "warp"]}, "'warp'"),
    ({"parts": []}, "parts is empty"),
    ({"throughput_model": "big"}, "'big'"),
    ({"compile_solver": "dpm_solver_12"}, "adaptive"),
    ({"steps_per_call": 3}, "steps_per_call"),
    ({"model": "/nonexistent/train_workdir", "parts": ["unet"]}, "/nonexistent/train_workdir"),
])
def test_bad_settings_raise_naming_the_value(tmp_path, override, named):
  with pytest.raises(ValueError) as err:
    lib.run(override, str(tmp_path / "w"))
  assert named in str(err.value)
  assert not os.path.exists(tmp_path / "w")  # validated before anything is written


def test_a_failed_run_leaves_no_results(tmp_path, monkeypatch):
  workdir = tmp_path / "w"
  workdir.mkdir()
  for name in ("results.json", "table.txt"):  # an earlier run's outputs
    (workdir / name).write_text("old")

  def broken(config, cache):
    raise RuntimeError("the part failed")

  monkeypatch.setattr(lib, "overhead", broken)
  with pytest.raises(RuntimeError, match="the part failed"):
    lib.run({"parts": ["overhead"], "solvers": ["ddim"]}, str(workdir))
  assert os.listdir(workdir) == []  # neither a half-written nor a stale results.json / table.txt


def test_absl_main_rejects_a_bad_flag(tmp_path):
  workdir = tmp_path / "w"
  bad = subprocess.run([sys.executable, "-m", "experiments.benchmark", f"--workdir={workdir}", "--batch=0"],
                       cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=120)
  assert bad.returncode != 0 and "batch: 0 must be >= 1" in bad.stderr, bad.stderr[-2000:]
  assert not os.path.exists(workdir)

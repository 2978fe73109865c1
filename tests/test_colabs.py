"""The Colab notebooks (colabs/*.ipynb): each runs headless with its small settings and shows what it claims.

Each notebook runs in a fresh kernel of this interpreter (nbclient; the ipykernel of ``sys.executable``, not
whatever 'python3' kernelspec the machine has) with DOS_COLAB_SMALL=1 and DOS_COLAB_WORKDIR pointing into a
temporary folder, which is also the kernel's working directory: nothing is written into the repository. A
failing cell fails the test with its traceback. Each notebook writes the numbers it found to
WORKDIR/summary.json; the tests assert properties of those numbers (and that the figures were drawn).
"""
import importlib.util
import json
import math
import os
import pathlib
import sys
import time

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")
from jupyter_client import KernelManager  # noqa: E402  (a dependency of nbclient)
from jupyter_client.kernelspec import KernelSpecManager  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]
COLABS = ROOT / "colabs"
NOTEBOOKS = ("quickstart", "convergence", "inversion", "train_digits")
CELL_TIMEOUT = 300  # seconds per cell


def _strip_notebooks():
  spec = importlib.util.spec_from_file_location("strip_notebooks", ROOT / "scripts" / "strip_notebooks.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _kernel_manager():
  # No kernel folders: only the native ipykernel spec is found, which runs sys.executable.
  return KernelManager(kernel_name="python3", kernel_spec_manager=KernelSpecManager(kernel_dirs=[]))


def execute(name, tmp_path):
  """Runs colabs/<name>.ipynb headless; returns (executed notebook, its summary.json, wall seconds)."""
  nb = nbformat.read(COLABS / f"{name}.ipynb", as_version=4)
  workdir = tmp_path / "workdir"
  python_path = [str(ROOT)] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else [])
  env = dict(os.environ, DOS_COLAB_SMALL="1", DOS_COLAB_WORKDIR=str(workdir),
             PYTHONPATH=os.pathsep.join(python_path))
  client = nbclient.NotebookClient(nb, km=_kernel_manager(), timeout=CELL_TIMEOUT,
                                   resources={"metadata": {"path": str(tmp_path)}})
  started = time.perf_counter()
  client.execute(env=env)  # raises CellExecutionError (with the cell's traceback) if a cell fails
  seconds = time.perf_counter() - started
  sys.stderr.write(f"{name}.ipynb ran headless in {seconds:.1f} s\n")
  with open(workdir / "summary.json") as f:
    return nb, json.load(f), seconds


def images(nb):
  """How many PNG images the executed notebook displayed."""
  return sum("image/png" in out.get("data", {}) for cell in nb.cells if cell.cell_type == "code"
             for out in cell.outputs)


def test_notebooks_are_stripped_and_colab_ready():
  strip = _strip_notebooks()
  paths = sorted(COLABS.glob("*.ipynb"))
  assert sorted(p.stem for p in paths) == sorted(NOTEBOOKS)
  for path in paths:
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    assert strip.problems(nb) == [], f"{path.name} has outputs: run python scripts/strip_notebooks.py"
    code = [c.source for c in nb.cells if c.cell_type == "code"]
    # The first code cell installs the package on Colab only; one cell reads the small-settings switch.
    assert "google.colab" in code[0] and "diffusion-ode-solvers[colab]" in code[0], path.name
    assert sum("DOS_COLAB_SMALL" in c for c in code) == 1, path.name
    assert not any("jax.config.update(\"jax_platform" in c or "JAX_PLATFORMS" in c for c in code), path.name


def test_strip_removes_outputs():
  strip = _strip_notebooks()
  nb = nbformat.v4.new_notebook()
  cell = nbformat.v4.new_code_cell("1 + 1", execution_count=3,
                                   outputs=[nbformat.v4.new_output("execute_result", {"text/plain": "2"},
                                                                   execution_count=3)])
  cell.metadata["execution"] = {"iopub.status.idle": "2026-01-01T00:00:00Z"}
  nb.cells = [cell]
  assert len(strip.problems(nb)) == 3
  assert strip.problems(strip.strip(nb)) == []
  assert nb.cells[0].source == "1 + 1"


def test_quickstart(tmp_path):
  nb, summary, _ = execute("quickstart", tmp_path)
  import solvers
  records = summary["solvers"]
  assert summary["registered"] == solvers.available()
  assert set(records) <= set(solvers.available())
  # The small settings still run every kind of solver through the notebook's code paths.
  kinds = {record["kind"] for record in records.values()}
  assert {"deterministic", "stochastic (key=)", "adaptive (own NFE)", "learns from the model (prepare)"} <= kinds
  assert images(nb) >= 2  # trajectories, error against NFE
  for name, record in records.items():
    errors = [e for e in record["error"] if e is not None]
    assert errors, f"{name}: no finite result"
    if record["kind"].startswith(("stochastic", "adaptive")):
      continue
    # Deterministic solvers on a fixed grid: the error falls from the fewest to the most steps.
    assert record["steps"][-1] == max(summary["steps"]) and record["error"][-1] is not None, name
    assert record["error"][-1] < 0.5 * errors[0], f"{name}: {record['nfe']} -> {record['error']}"
    assert record["nfe"] == sorted(record["nfe"]), name
  # The stochastic samplers: the moment error falls with the steps, to the size of the Monte-Carlo floor.
  floor = summary["monte_carlo_floor"]
  for name, record in records.items():
    if record["kind"].startswith("stochastic"):
      assert record["error"][-1] < min(3 * floor, record["error"][0]), (name, record["error"], floor)


def test_convergence(tmp_path):
  nb, summary, _ = execute("convergence", tmp_path)
  assert images(nb) >= 1
  orders = summary["orders"]
  assert set(orders) == {"gaussian", "gmm"}
  # Fitted orders near the declared ones on the closed-form Gaussian (the battery's tolerance is 0.3); the
  # 2nd-order method's fit over 10..80 steps is still pre-asymptotic (1.8), its last three points are not.
  assert abs(orders["gaussian"]["ddim"]["fitted"] - 1.0) < 0.2, orders["gaussian"]["ddim"]
  assert abs(orders["gaussian"]["ddim"]["asymptotic"] - 1.0) < 0.2, orders["gaussian"]["ddim"]
  assert abs(orders["gaussian"]["dpm_solver_pp_2m"]["asymptotic"] - 2.0) < 0.3, orders["gaussian"]["dpm_solver_pp_2m"]
  # Higher order pays on the mixture too: at the most steps DEIS tAB3 (order 4) is 10x below DDIM.
  gmm = summary["final_rmse"]["gmm"]
  assert gmm["deis_tab3"] < 0.1 * gmm["ddim"], gmm


def test_inversion(tmp_path):
  nb, summary, _ = execute("inversion", tmp_path)
  assert images(nb) >= 1
  errors = summary["round_trip"]
  assert set(errors) == {"float32", "float64"}  # the notebook enables x64 by default
  for dtype, exact_bound in (("float32", 1e-4), ("float64", 1e-10)):
    for steps, ddim in errors[dtype]["ddim"].items():
      assert ddim > 1e-3, (dtype, steps, ddim)  # naive inversion is inexact
      for method in ("bdia", "edict"):
        error = errors[dtype][method][steps]
        assert error < 1e-2 * ddim, (dtype, method, steps, error, ddim)
        # EDICT's float32 round trip grows at small N (~8e-5 at 20 steps, ~2e-4 at 10): bounded from 50 on.
        if int(steps) >= 50 or dtype == "float64" or method == "bdia":
          assert error < exact_bound, (dtype, method, steps, error)


def test_train_digits(tmp_path):
  nb, summary, _ = execute("train_digits", tmp_path)
  assert images(nb) >= 2  # loss curve, the three samplers' image grids
  losses = summary["loss"]
  assert all(math.isfinite(v) for v in losses)
  assert losses[-1] < 0.75 * losses[0], losses  # training lowered the loss (0.62 -> 0.36 measured)
  assert len(summary["samples"]) == 3
  for name, record in summary["samples"].items():
    assert record["finite"], name
    assert record["shape"][1:] == [8, 8, 1], record
    # The data lie in [-1, 1]; samples of the briefly trained net stay near that range.
    assert -3.0 < record["min"] and record["max"] < 3.0, (name, record)

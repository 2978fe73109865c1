"""Schedule artifacts (solvers.schedule_artifacts): a saved artifact reloads by name or path to the same grid and
bit-identical samples (float64 and float32), the search path order (directory, $DOS_SCHEDULES, bundled), solver
options (DC-Solver ratios, USF choices), and ValueErrors for unknown names and bad fields."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import solvers
from models import analytic
from solvers import learned_grids, schedules
from solvers import schedule_artifacts as sa

SCHEDULE = schedules.VPLinear()
# Times with full float64 mantissas (as a learned grid has), decreasing from t_max, final='zero': 4 steps.
TIMES = np.array([1.0, 0.61803398874989484, 0.21415926535897931, 0.0271828182845904])


def _artifact(name="gmm-dim2-test", times=TIMES, **changes):
  options = dict(model="gmm-dim2-k4-seed0", schedule=SCHEDULE, solver="dpm_solver_pp_2m", times=times, final="zero",
                 nfe=4, method="gradient", metrics={"heldout_rmse": 0.25}, name=name)
  options.update(changes)
  return sa.make(**options)


@pytest.fixture(scope="module")
def setup():
  oracle = analytic.gmm(dim=2)
  x_T = jax.random.normal(jax.random.key(1), (16, 2), jnp.float64)
  return oracle.denoiser(SCHEDULE), x_T


def test_reload_by_name_gives_bit_identical_samples(tmp_path, setup):
  denoiser, x_T = setup
  artifact = _artifact()
  path = sa.save(artifact, str(tmp_path))
  assert path == os.path.join(str(tmp_path), "gmm-dim2-test.json")
  loaded = sa.load("gmm-dim2-test", search_path=str(tmp_path))
  assert loaded == artifact and loaded.to_json() == json.load(open(path))
  np.testing.assert_array_equal(np.asarray(loaded.times), TIMES)  # exact: JSON floats round-trip
  solver = solvers.get("dpm_solver_pp_2m")
  before = solvers.sample(solver, denoiser, SCHEDULE, learned_grids.make_grid(SCHEDULE, jnp.asarray(TIMES), "zero"), x_T)
  after = solvers.sample(loaded.solver_object(), denoiser, loaded.make_schedule(), loaded.grid(), x_T)
  np.testing.assert_array_equal(np.asarray(after.x), np.asarray(before.x))
  assert int(after.nfe) == loaded.nfe == 4
  # float32 samples (what users see) are bit-identical too, and so is a padded grid.
  x32 = x_T.astype(jnp.float32)
  a = solvers.sample(solver, denoiser, SCHEDULE, artifact.grid(), x32).x
  b = solvers.sample(solver, denoiser, SCHEDULE, sa.load(path).grid(capacity=16), x32).x
  assert a.dtype == jnp.float32
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_search_path_order(tmp_path, monkeypatch):
  first, second = tmp_path / "first", tmp_path / "second"
  sa.save(_artifact(), str(first))
  sa.save(_artifact(times=TIMES * np.array([1, 0.9, 0.9, 0.9])), str(second))
  monkeypatch.setenv(sa.ENV_VAR, str(second))
  assert sa.load("gmm-dim2-test").times[1] == pytest.approx(0.9 * TIMES[1])       # from $DOS_SCHEDULES
  assert sa.load("gmm-dim2-test", search_path=str(first)).times[1] == TIMES[1]  # the directory comes first
  assert sa.search_dirs(str(first)) == [str(first), str(second), sa.BUNDLED]
  assert set(sa.available(str(first))) >= {"gmm-dim2-test"}


def test_unknown_name_lists_the_available_ones(tmp_path):
  sa.save(_artifact(name="known-one"), str(tmp_path))
  with pytest.raises(ValueError, match="unknown.*known-one"):
    sa.load("missing-one", search_path=str(tmp_path))
  with pytest.raises(ValueError, match="does not exist"):
    sa.load(str(tmp_path / "nothing.json"))


def test_bundled_artifacts_load_and_are_valid():
  bundled = {name: path for name, path in sa.available().items() if os.path.dirname(path) == sa.BUNDLED}
  if not bundled:
    pytest.skip("no bundled artifacts in experiments/schedules/")
  for name in bundled:
    artifact = sa.load(name)
    times = np.asarray(artifact.times)
    assert artifact.name == name and np.all(np.diff(times) < 0)
    assert artifact.metrics["heldout_rmse"] > 0 and artifact.method in sa.METHODS


def test_a_bundled_artifact_reproduces_its_heldout_rmse():
  """The committed GMM artifacts were measured on 256 held-out starts drawn by learned_grids.make_problem with
  key(0) (its held-out draw does not depend on the calibration count): the stored RMSE is recomputed."""
  name = "gmm-dim8-k4-seed0-unipc_bh2_2-hybrid-nfe10"
  if name not in sa.available():
    pytest.skip(f"{name} is not bundled")
  artifact = sa.load(name)
  schedule = artifact.make_schedule()
  problem = learned_grids.make_problem(analytic.gmm(dim=8).denoiser(schedule), schedule, jax.random.key(0),
                                       num_calibration=1, num_heldout=artifact.metrics["num_heldout"])
  rmse = float(learned_grids.loss(artifact.solver_object(), jnp.asarray(artifact.times), problem.x_heldout,
                                  problem.reference_heldout, problem))
  assert rmse == pytest.approx(artifact.metrics["heldout_rmse"], rel=1e-9)
  assert rmse < 0.5 * artifact.metrics["best_hand_made_heldout_rmse"]


def test_schedules_round_trip():
  discrete = schedules.DiscreteVP.named("scaled_linear", 1000, 0.00085, 0.012)
  for schedule in (SCHEDULE, schedules.VPCosine(), schedules.EDM(), schedules.VE(sigma_max=80.0), discrete):
    back = sa.schedule_from_json(json.loads(json.dumps(sa.schedule_to_json(schedule))))
    assert type(back) is type(schedule)
    t = jnp.linspace(schedule.t_min + 0.1, schedule.t_max, 5)
    np.testing.assert_array_equal(np.asarray(back.lam(t)), np.asarray(schedule.lam(t)))
  with pytest.raises(ValueError, match="unknown"):
    sa.schedule_from_json({"class": "Cosine", "params": {}})


def test_solver_options_dc_ratios_and_usf_choices(tmp_path, setup):
  denoiser, x_T = setup
  ratios = [1.0, 1.0, 0.93, 1.1]
  artifact = _artifact(name="dc", solver="dc_solver", solver_options={"ratios": ratios})
  solver = sa.load("dc", search_path=str(sa.save(artifact, str(tmp_path)).rsplit(os.sep, 1)[0])).solver_object()
  np.testing.assert_array_equal(np.asarray(solver.ratios), ratios)
  assert np.asarray(artifact.solver_object(capacity=8).ratios).tolist() == ratios + [1.0] * 3
  direct = solvers.sample(solvers.dc_solver.with_ratios(solvers.get("dc_solver"), jnp.asarray(ratios)), denoiser,
                          SCHEDULE, artifact.grid(), x_T).x
  np.testing.assert_array_equal(np.asarray(solvers.sample(solver, denoiser, SCHEDULE, artifact.grid(), x_T).x),
                                np.asarray(direct))
  rho_one = solvers.sample(solvers.get("dc_solver"), denoiser, SCHEDULE, artifact.grid(), x_T).x
  assert not np.allclose(np.asarray(direct), np.asarray(rho_one))  # the ratios act

  from solvers import usf
  choices = usf.make_choices(["data", "noise", "data", "data"], [1, 2, 3, 1], [True, False, True, False])
  artifact = _artifact(name="usf", solver="usf", method="usf", solver_options=usf.choices_to_json(choices))
  loaded = sa.Artifact.from_json(json.loads(json.dumps(artifact.to_json())))
  got = solvers.sample(loaded.solver_object(), denoiser, SCHEDULE, loaded.grid(), x_T).x
  want = solvers.sample(usf.with_choices(solvers.get("usf"), choices), denoiser, SCHEDULE, artifact.grid(), x_T).x
  np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_default_name_and_fingerprint():
  assert sa.default_name("gmm-dim8-k4-seed0", "unipc_bh2_2", "gradient", 5) == "gmm-dim8-k4-seed0-unipc_bh2_2-gradient-nfe5"
  assert sa.default_name("w/x y", "ddim", "evolution", 4, "t_end") == "w_x_y-ddim-evolution-nfe4-tend"
  assert sa.config_fingerprint({"a": 1, "b": [2]}) == sa.config_fingerprint({"b": [2], "a": 1})
  assert sa.config_fingerprint({"a": 1}) != sa.config_fingerprint({"a": 2})


def test_bad_fields_raise(tmp_path):
  with pytest.raises(ValueError, match="method"):
    _artifact(method="magic")
  with pytest.raises(ValueError, match="monotone"):
    _artifact(times=TIMES[[0, 2, 1, 3]])
  with pytest.raises(ValueError, match="decrease"):
    _artifact(times=TIMES[::-1], final="t_end")
  with pytest.raises(ValueError, match="outside"):
    _artifact(times=np.array([1.5, 0.5, 0.1, 0.01]))
  with pytest.raises(ValueError, match="unknown"):
    _artifact(solver="heun3")
  with pytest.raises(ValueError, match="name"):
    _artifact(name="a/b")
  with pytest.raises(ValueError, match="non-finite"):
    _artifact(metrics={"rmse": float("nan")})
  with pytest.raises(ValueError, match="final"):
    _artifact(final="end")
  good = _artifact().to_json()
  with pytest.raises(ValueError, match="entries"):
    sa.Artifact.from_json(dict(good, num_steps=5))
  with pytest.raises(ValueError, match="missing keys \\['nfe'\\]"):
    sa.Artifact.from_json({k: v for k, v in good.items() if k != "nfe"})
  (tmp_path / "broken.json").write_text("{not json")
  with pytest.raises(ValueError, match="not valid JSON"):
    sa.load("broken", search_path=str(tmp_path))
  with pytest.raises(ValueError, match="Artifact"):
    sa.save(good, str(tmp_path))

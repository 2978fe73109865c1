"""solvers.diffusers_config: a diffusers scheduler config -> the equivalent schedule, grid, solver and network
convention, checked against diffusers itself on real-world-like configs.

The parity tests build the diffusers scheduler from the same dict (``SchedulerCls.from_config(cfg)``), run its
sampling loop on the analytic mixture with the harness of tests/test_diffusers_parity.py (``run_diffusers``,
``run_ours``, ``X_T``, its float64 / stock modes and tolerances) and assert that the sample of ``load(cfg)``
agrees, and that ``load(cfg).timesteps(N)`` (the network's labels at the grid's nodes) equals the scheduler's
``timesteps``. They skip without diffusers; the mapping and bad-input tests below do not need it.
"""
import contextlib
import inspect
import itertools
import json
import sys
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import solvers
from solvers import base, diffusers_config, grids, schedules

pytestmark = [
    pytest.mark.filterwarnings("ignore::FutureWarning"),
    pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning"),
    pytest.mark.filterwarnings("ignore:__array_wrap__ must accept context:DeprecationWarning"),
]

# Stable Diffusion 1.5's scheduler_config.json (a PNDMScheduler); SD 2.x / SDXL variants below.
SD15 = {"_class_name": "PNDMScheduler", "_diffusers_version": "0.6.0", "beta_end": 0.012,
        "beta_schedule": "scaled_linear", "beta_start": 0.00085, "clip_sample": False, "num_train_timesteps": 1000,
        "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1, "trained_betas": None}
SDXL_EULER = dict(SD15, _class_name="EulerDiscreteScheduler", interpolation_type="linear", prediction_type="epsilon",
                  sample_max_value=1.0, timestep_spacing="leading", use_karras_sigmas=False)
# A zero-terminal-SNR v-prediction fine-tune (Lin et al. 2024): trailing spacing, rescaled betas.
ZERO_SNR_V = dict(SD15, _class_name="UniPCMultistepScheduler", prediction_type="v_prediction",
                  rescale_betas_zero_snr=True, timestep_spacing="trailing")
SD3_FLOW = {"_class_name": "FlowMatchEulerDiscreteScheduler", "_diffusers_version": "0.29.0", "num_train_timesteps": 1000,
            "shift": 3.0}


def as_class(config, class_name, **changes):
  return dict(config, _class_name=class_name, **changes)


# --- without diffusers: the mapping, the grids, the files, bad input -----------------------------------------

MAPPING = [  # (config, registered name, prediction, time label kind)
    (as_class(SD15, "DPMSolverMultistepScheduler"), "dpm_solver_pp_2m", "eps", "t"),
    (as_class(SD15, "DPMSolverMultistepScheduler", algorithm_type="dpmsolver", solver_order=3,
              final_sigmas_type="sigma_min"), "dpm_solver_3m", "eps", "t"),
    (as_class(SD15, "DPMSolverMultistepScheduler", algorithm_type="sde-dpmsolver++", use_karras_sigmas=True),
     "dpm_solver_pp_2m_sde", "eps", "RoundedLabel"),
    (as_class(SD15, "DPMSolverSinglestepScheduler", solver_order=3, solver_type="heun"), "dpm_solver_pp_3s", "eps", "t"),
    (as_class(SD15, "DEISMultistepScheduler", solver_order=3), "deis_logrho_3", "eps", "t"),
    (as_class(ZERO_SNR_V, "UniPCMultistepScheduler", solver_type="bh1", solver_order=3), "unipc_bh1_3", "v", "t"),
    (SD15, "plms", "eps", "t"),
    (as_class(SD15, "PNDMScheduler", skip_prk_steps=False, prediction_type="v_prediction"), "pndm_f", "v", "t"),
    (as_class(SD15, "DDIMScheduler"), "ddim", "eps", "t"),
    (SDXL_EULER, "edm_euler", "eps", "t"),
    (as_class(SDXL_EULER, "EulerDiscreteScheduler", timestep_spacing="linspace"), "edm_euler", "eps",
     "SigmaInterpLabel"),
    (as_class(SDXL_EULER, "EulerDiscreteScheduler", timestep_type="continuous", prediction_type="v_prediction"),
     "edm_euler", "v", "edm_c_noise"),
    (as_class(SDXL_EULER, "HeunDiscreteScheduler"), "edm_heun", "eps", "t"),
    (as_class(SDXL_EULER, "EulerAncestralDiscreteScheduler"), "ddpm_ancestral", "eps", "t"),
    (as_class(SD15, "DDPMScheduler"), "ddpm_ancestral", "eps", "t"),
    (SD3_FLOW, "ddim", "velocity", "t1000"),
]


@pytest.mark.parametrize("config,name,prediction,label", MAPPING, ids=[f"{m[0]['_class_name']}-{m[1]}" for m in MAPPING])
def test_mapping(config, name, prediction, label):
  """The class and options map to the registered solver named, and name + options rebuild the solver."""
  loaded = diffusers_config.load(config)
  assert loaded.solver_name == name and loaded.prediction == prediction
  assert (loaded.time_label if isinstance(loaded.time_label, str) else type(loaded.time_label).__name__) == label
  assert solvers.get(loaded.solver_name, **loaded.options) == loaded.solver
  assert name in solvers.available()


def test_options_follow_the_config():
  """Each option changes the solver the way diffusers' scheduler changes its steps."""
  dpm = as_class(SD15, "DPMSolverMultistepScheduler")
  solver = diffusers_config.load(dpm).solver
  assert (solver.order, solver.prediction, solver.solver_type, solver.lower_order_final_below) == (2, "data", "midpoint", 15)
  solver = diffusers_config.load(dict(dpm, solver_order=3, solver_type="heun", lower_order_final=False)).solver
  assert (solver.order, solver.solver_type, solver.lower_order_final) == (3, "heun", False)
  euler_at_final = diffusers_config.load(dict(dpm, euler_at_final=True, lower_order_final=False)).solver
  assert euler_at_final.lower_order_final and euler_at_final.lower_order_final_below is None
  # diffusers reads UniPC's solver_type 'midpoint' as 'bh2', DPM-Solver's 'bh1' as 'midpoint'.
  assert diffusers_config.load(as_class(SD15, "UniPCMultistepScheduler", solver_type="midpoint")).solver.variant == "bh2"
  assert diffusers_config.load(dict(dpm, solver_type="bh1")).solver.solver_type == "midpoint"
  unipc = diffusers_config.load(as_class(SD15, "UniPCMultistepScheduler", predict_x0=False, disable_corrector=[0, 2],
                                         lower_order_final=False)).solver
  assert (unipc.prediction, unipc.disable_corrector, unipc.lower_order_final) == ("noise", (0, 2), False)
  single = as_class(SD15, "DPMSolverSinglestepScheduler", final_sigmas_type="sigma_min")
  assert diffusers_config.load(single).solver.schedule == "fixed"
  assert diffusers_config.load(dict(single, lower_order_final=True)).solver.schedule == "diffusers"
  assert diffusers_config.load(as_class(SD15, "PNDMScheduler", prediction_type="v_prediction")).solver.combine == "v"
  # Keys the class does not have are ignored (as diffusers' from_config) and listed.
  assert diffusers_config.load(dpm).ignored == ("clip_sample", "set_alpha_to_one", "skip_prk_steps")
  assert diffusers_config.load(SD15, scheduler="DPMSolverMultistepScheduler").solver == diffusers_config.load(dpm).solver


def test_schedule_from_betas_and_zero_terminal_snr():
  """scaled_linear betas as DiscreteVP.named; the zero-SNR rescale keeps alphas_cumprod[0], is affine in
  sqrt(alphas_cumprod) and ends at diffusers' 2**-24."""
  sd = diffusers_config.load(as_class(SD15, "DPMSolverMultistepScheduler")).schedule
  np.testing.assert_allclose(sd.alphas_cumprod, schedules.DiscreteVP.named("scaled_linear", 1000, 0.00085, 0.012)
                             .alphas_cumprod, rtol=1e-14)
  zero = diffusers_config.load(ZERO_SNR_V).schedule
  ac, ac0 = np.asarray(zero.alphas_cumprod), np.asarray(sd.alphas_cumprod)
  np.testing.assert_allclose(ac[-1], diffusers_config.ZERO_SNR_ALPHAS_CUMPROD, rtol=1e-13)
  np.testing.assert_allclose(ac[0], ac0[0], rtol=1e-12)
  slope, intercept = np.polyfit(np.sqrt(ac0[:-1]), np.sqrt(ac[:-1]), 1)
  np.testing.assert_allclose(np.sqrt(ac[:-1]), slope * np.sqrt(ac0[:-1]) + intercept, atol=1e-12)
  np.testing.assert_allclose(slope * np.sqrt(ac0[-1]) + intercept, 0.0, atol=1e-12)
  trained = diffusers_config.load(as_class(SD15, "DDIMScheduler", trained_betas=list(np.linspace(1e-4, 0.02, 1000))))
  np.testing.assert_allclose(trained.schedule.lam_table, schedules.DiscreteVP.named("linear").lam_table, rtol=1e-12)


def test_grids_follow_spacing_offset_and_end():
  ddim = as_class(SD15, "DDIMScheduler")  # leading, steps_offset 1, set_alpha_to_one False: ends at index 0
  loaded = diffusers_config.load(ddim)
  grid = loaded.grid(10)
  np.testing.assert_array_equal(loaded.timesteps(10), grids.diffusers_timesteps(1000, 10, "leading", "ddim", 1))
  assert int(grid.num_steps) == 10 and grid.t[10] == 0 and grid.sigma[10] > 0
  assert diffusers_config.load(dict(ddim, set_alpha_to_one=True)).grid(10).sigma[10] == 0
  # Timesteps ending at 0 with set_alpha_to_one=False: diffusers' last step 0 -> 0 is left out.
  assert int(diffusers_config.load(dict(ddim, steps_offset=0)).grid(10).num_steps) == 9
  dpm = diffusers_config.load(as_class(SD15, "DPMSolverMultistepScheduler", timestep_spacing="leading", steps_offset=1))
  np.testing.assert_array_equal(dpm.timesteps(7), grids.diffusers_timesteps(1000, 7, "leading", "dpm", 1))
  assert dpm.grid(7).sigma[7] == 0
  karras = diffusers_config.load(as_class(SD15, "DPMSolverMultistepScheduler", use_karras_sigmas=True))
  rho = np.exp(-np.asarray(karras.grid(10).lam[:10]))
  np.testing.assert_allclose(rho, np.exp(-np.asarray(grids.karras(karras.schedule, 10, final="zero").lam[:10])),
                             rtol=1e-14)
  np.testing.assert_array_equal(karras.timesteps(10), np.round(np.asarray(karras.grid(10).t[:10])))
  clipped = diffusers_config.load(as_class(SD15, "DPMSolverMultistepScheduler", beta_schedule="squaredcos_cap_v2",
                                           lambda_min_clipped=-5.1))
  last = 1000 - int(np.sum(np.asarray(clipped.schedule.lam_table) < -5.1))
  assert last < 1000
  np.testing.assert_array_equal(clipped.timesteps(10), grids.diffusers_timesteps(last, 10))


def test_load_from_json_file_and_folders(tmp_path):
  config = as_class(SD15, "DPMSolverMultistepScheduler", use_karras_sigmas=True)
  (tmp_path / "scheduler").mkdir()
  for folder in (tmp_path, tmp_path / "scheduler"):
    (folder / "scheduler_config.json").write_text(json.dumps(config))
  (tmp_path / "scheduler_config.json").write_text(json.dumps(dict(config, solver_order=3)))
  from_dict = diffusers_config.load(config)
  for source in (tmp_path / "scheduler" / "scheduler_config.json", str(tmp_path / "scheduler")):
    loaded = diffusers_config.load(source)
    assert loaded.solver == from_dict.solver and loaded.time_label == from_dict.time_label
    np.testing.assert_array_equal(loaded.timesteps(12), from_dict.timesteps(12))
  assert diffusers_config.load(tmp_path).solver.order == 3  # the folder's own file comes first
  pipeline = tmp_path / "pipeline"
  (pipeline / "scheduler").mkdir(parents=True)
  (pipeline / "scheduler" / "scheduler_config.json").write_text(json.dumps(config))
  assert diffusers_config.load(pipeline).solver == from_dict.solver
  with pytest.raises(ValueError, match="missing.json"):
    diffusers_config.load(tmp_path / "missing.json")
  (tmp_path / "broken.json").write_text("{not json")
  with pytest.raises(ValueError, match="broken.json"):
    diffusers_config.load(tmp_path / "broken.json")
  (tmp_path / "empty").mkdir()
  with pytest.raises(ValueError, match="no scheduler_config.json in the folder"):
    diffusers_config.load(tmp_path / "empty")


BAD = [
    (as_class(SD15, "LMSDiscreteScheduler"), "LMSDiscreteScheduler is unsupported"),
    (as_class(SD15, "KDPM2DiscreteScheduler"), "KDPM2DiscreteScheduler is unsupported"),
    (as_class(SD15, "NoSuchScheduler"), "'NoSuchScheduler' is unknown"),
    ({k: v for k, v in SD15.items() if k != "_class_name"}, "_class_name"),
    ({"_class_name": "DDPMScheduler"}, "clip_sample=True is unsupported"),  # google/ddpm-cifar10-32's default
    (as_class(SD15, "DDPMScheduler", variance_type="learned_range"), "variance_type='learned_range'"),
    (as_class(SD15, "DDIMScheduler", rescale_betas_zero_snr=True), "rescale_betas_zero_snr=True"),
    (as_class(SD15, "DDIMScheduler", clip_sample=True), "clip_sample=True"),
    (as_class(SD15, "DPMSolverMultistepScheduler", use_beta_sigmas=True), "use_beta_sigmas=True"),
    (as_class(SD15, "DPMSolverMultistepScheduler", thresholding=True), "thresholding=True"),
    (as_class(SD15, "DPMSolverMultistepScheduler", use_karras_sigmas=True, final_sigmas_type="sigma_min"),
     "karras sigmas with a final sigma_min"),
    (as_class(SD15, "DPMSolverMultistepScheduler", algorithm_type="dpmsolver"), "final_sigmas_type='zero'"),
    (as_class(SD15, "DPMSolverMultistepScheduler", algorithm_type="sde-dpmsolver"), "algorithm_type='sde-dpmsolver'"),
    (as_class(SD15, "DPMSolverMultistepScheduler", solver_order=3, euler_at_final=True), "euler_at_final=True"),
    (as_class(SD15, "DPMSolverMultistepScheduler", solver_order=4), "solver_order=4"),
    (as_class(SD15, "DPMSolverMultistepScheduler", timestep_spacing="uniform"), "timestep_spacing='uniform'"),
    (as_class(SD15, "DPMSolverMultistepScheduler", beta_schedule="sigmoid"), "beta_schedule='sigmoid'"),
    (as_class(SD15, "DPMSolverMultistepScheduler", num_train_timesteps=1.5), "num_train_timesteps=1.5"),
    (as_class(SD15, "DPMSolverMultistepScheduler", trained_betas=[0.1, 0.2]), "trained_betas"),
    (as_class(SD15, "DPMSolverSinglestepScheduler", solver_order=3), "solver_type='midpoint'"),
    (as_class(SD15, "DEISMultistepScheduler", use_karras_sigmas=True), "karras sigmas"),
    (as_class(SD15, "UniPCMultistepScheduler", sigma_min=0.1, use_karras_sigmas=True), "sigma_min=0.1"),
    (as_class(SD15, "PNDMScheduler", timestep_spacing="trailing"), "timestep_spacing='trailing'"),
    (as_class(SDXL_EULER, "EulerDiscreteScheduler", interpolation_type="log_linear"), "interpolation_type='log_linear'"),
    (as_class(SDXL_EULER, "EulerDiscreteScheduler", final_sigmas_type="sigma_min"), "final_sigmas_type='sigma_min'"),
    (dict(SD3_FLOW, use_dynamic_shifting=True), "use_dynamic_shifting=True"),
    (dict(SD3_FLOW, stochastic_sampling=True), "stochastic_sampling=True"),  # a key never read: not the default
]


@pytest.mark.parametrize("config,match", BAD, ids=[b[1][:40] for b in BAD])
def test_unsupported_input_raises_naming_it(config, match):
  with pytest.raises(ValueError, match=match.replace("(", r"\(").replace(")", r"\)")):
    diffusers_config.load(config)


def test_unsupported_grids_raise_naming_them():
  trailing_ddim = diffusers_config.load(as_class(SD15, "DDIMScheduler", timestep_spacing="trailing"))
  assert int(trailing_ddim.grid(10).num_steps) == 10  # 10 divides 1000: t - 100 is the next timestep
  with pytest.raises(ValueError, match="timestep_spacing='trailing' with num_inference_steps=7"):
    trailing_ddim.grid(7)  # diffusers steps to t - 142, not its next timestep (#9261)
  trailing = diffusers_config.load(as_class(SD15, "UniPCMultistepScheduler", timestep_spacing="trailing"))
  with pytest.raises(ValueError, match="num_inference_steps=61 gives diffusers 62 timesteps"):
    trailing.grid(61)
  for bad in (0, 2.5, True):
    with pytest.raises(ValueError, match="num_inference_steps"):
      trailing.grid(bad)
  with pytest.raises(ValueError, match="scheduler=3"):
    diffusers_config.load(SD15, scheduler=3)
  with pytest.raises(ValueError, match="config must be a dict"):
    diffusers_config.load(42)


def test_float32_users_get_float32_tables_and_the_float64_sample():
  """Without x64: float32 schedule and grid, the same timesteps, and a float32 sample within float32
  round-off of the float64 one (DPM-Solver++ 2M on SD 1.5's betas, the mixture oracle)."""
  from models import analytic
  config = as_class(SD15, "DPMSolverMultistepScheduler")
  results = {}
  x_T64 = np.random.default_rng(0).standard_normal((8, 4))
  oracle64 = analytic.gmm(dim=4, num_components=3, seed=1, dtype=jnp.float64)  # draws differ by dtype: cast it
  for x64 in (True, False):
    with jax.enable_x64(x64):
      loaded = diffusers_config.load(config)
      grid = loaded.grid(10)
      dtype = jnp.float64 if x64 else jnp.float32
      assert loaded.schedule.lam_table.dtype == dtype and grid.lam.dtype == dtype
      oracle = jax.tree_util.tree_map(lambda a: jnp.asarray(a, dtype), oracle64)
      inner = oracle.denoiser(loaded.schedule, loaded.prediction)
      denoiser = loaded.denoiser(inner.apply_fn, inner.params)
      x_T = jnp.asarray(x_T64, dtype)
      results[x64] = (loaded.timesteps(10), np.asarray(solvers.sample(loaded.solver, denoiser, loaded.schedule, grid,
                                                                       x_T).x))
      assert results[x64][1].dtype == dtype
  np.testing.assert_array_equal(results[True][0], results[False][0])
  diff = np.max(np.abs(results[True][1] - results[False][1])) / np.max(np.abs(results[True][1]))
  assert diff < 1e-5, diff


# --- with diffusers: parity on real-world-like configs ------------------------------------------------------


@pytest.fixture(scope="module")
def parity():
  pytest.importorskip("torch", reason="parity peer missing: pip install -e '.[parity]'")
  pytest.importorskip("diffusers", reason="parity peer missing: pip install -e '.[parity]'")
  from diffusers.utils import logging as diffusers_logging
  diffusers_logging.set_verbosity_error()  # from_config's note on the keys a class ignores
  from tests import test_diffusers_parity
  return test_diffusers_parity


def _from_config(cls):
  """run_diffusers' scheduler factory, as ``cls.from_config(config)``; its module is the scheduler's, so
  run_diffusers' float64 mode patches the right torch / numpy names."""
  def make(**config):
    return cls.from_config(config)
  make.__module__ = cls.__module__
  return make


def diffusers_runs(parity, config, num_steps, modes=("float64", "stock"), x_T=None):
  """run_diffusers on ``SchedulerCls.from_config(config)`` (the betas come from the config, not the harness's)."""
  import diffusers
  cls = getattr(diffusers, config["_class_name"])
  rest = {k: v for k, v in config.items() if k != "prediction_type"}
  x_T = parity.X_T if x_T is None else x_T
  with mock.patch.object(parity, "BETAS", {}):
    return {mode: parity.run_diffusers(_from_config(cls), rest, num_steps, mode,
                                       config.get("prediction_type", "epsilon"), x_T=x_T) for mode in modes}


def ours(parity, loaded, num_steps, key=None):
  grid = loaded.grid(num_steps)
  x_T = jnp.asarray(parity.X_T * loaded.init_noise_scale)
  if key is None:
    x, nfe = parity.run_ours(loaded.solver, grid, schedule=loaded.schedule, prediction=loaded.prediction,
                             time_label=loaded.time_label, x_T=x_T)
    return x, nfe, grid
  denoiser = parity.ORACLE.denoiser(loaded.schedule, loaded.prediction).replace(time_label=loaded.time_label)
  sol = solvers.sample(loaded.solver, denoiser, loaded.schedule, grid, x_T, key=key)
  return np.asarray(sol.x), int(sol.nfe), grid


def assert_parity(parity, config, num_steps, what, sigmas=True):
  """Our sample from load(config) vs diffusers' (float64 and stock modes), timesteps and NFE equal."""
  loaded = diffusers_config.load(config)
  runs = diffusers_runs(parity, config, num_steps)
  x, nfe, grid = ours(parity, loaded, num_steps)
  what = f"{what} N={num_steps}"
  np.testing.assert_array_equal(loaded.timesteps(num_steps), runs["float64"].timesteps, err_msg=what)
  if sigmas:
    parity._assert_parity(what, x, nfe, runs, grid, num_steps)  # also the sigma list and NFE
  else:
    parity._assert_close(x, runs["float64"].x, parity.F64_RTOL, what + " (float64)")
    parity._assert_close(x, runs["stock"].x, parity.STOCK_RTOL, what + " (stock)")
    assert nfe == runs["float64"].nfe
  return loaded, runs


@pytest.mark.parametrize("karras", (False, True), ids=("linspace", "karras"))
def test_sd15_dpm_solver_pp_2m(parity, karras):
  """SD 1.5's config read as DPMSolverMultistepScheduler (A1111's "DPM++ 2M" / "DPM++ 2M Karras"): the Karras
  grid's model timesteps are rounded, the solver steps on the exact sigmas."""
  config = as_class(SD15, "DPMSolverMultistepScheduler", use_karras_sigmas=karras)
  for num_steps in (10, 20):
    assert_parity(parity, config, num_steps, f"SD1.5 DPM++ 2M karras={karras}")


def test_sd15_ddim_leading_offset_one_without_alpha_one(parity):
  config = as_class(SD15, "DDIMScheduler")  # leading, steps_offset=1, set_alpha_to_one=False
  for num_steps in (10, 25):
    loaded, runs = assert_parity(parity, config, num_steps, "SD1.5 DDIM", sigmas=False)
    assert loaded.grid(num_steps).t[num_steps] == 0  # the last step goes to alphas_cumprod[0]


def test_zero_snr_v_prediction_unipc_trailing(parity):
  """v-prediction with zero-terminal-SNR betas and trailing spacing (UniPC bh2, order 2): the rescaled table
  (last entry 2**-24) equals diffusers', and so does the sample, starting at t = 999."""
  for num_steps in (7, 10):
    loaded, runs = assert_parity(parity, ZERO_SNR_V, num_steps, "zero-SNR v UniPC trailing")
    np.testing.assert_allclose(loaded.schedule.alphas_cumprod, runs["float64"].alphas_cumprod, rtol=1e-12)
    assert runs["float64"].timesteps[0] == 999


def test_sdxl_euler(parity):
  """SDXL's EulerDiscreteScheduler config (leading, steps_offset 1): edm_euler on the same sigmas, from the
  same noise: diffusers' x_T is init_noise_sigma z on its x / alpha scale, ours init_noise_scale z."""
  for num_steps in (10, 20):
    loaded = diffusers_config.load(SDXL_EULER)
    runs = diffusers_runs(parity, SDXL_EULER, num_steps, x_T=parity.X_T * _init_noise_sigma(SDXL_EULER, num_steps, parity))
    x, nfe, grid = ours(parity, loaded, num_steps)
    np.testing.assert_array_equal(loaded.timesteps(num_steps), runs["float64"].timesteps)
    parity._assert_parity(f"SDXL Euler N={num_steps}", x, nfe, runs, grid, num_steps)


def _init_noise_sigma(config, num_steps, parity):
  import diffusers
  cls = getattr(diffusers, config["_class_name"])
  with parity._float64_module(cls):
    scheduler = cls.from_config(config)
    scheduler.set_timesteps(num_steps)
    return float(scheduler.init_noise_sigma)


def test_euler_family_sigmas_labels_and_noise_scale(parity):
  """Where the harness's integer-timestep network cannot follow (fractional timesteps), the grid still gives
  diffusers' sigmas and the labels its timesteps: Euler linspace (sigma interpolated linearly in sigma),
  Euler Karras (log-sigma labels), Heun (its distinct timesteps; NFE 2N - 1), and the initial-noise scale
  (diffusers' init_noise_sigma is sigma_max, not sqrt(sigma_max^2 + 1), for linspace / trailing)."""
  import diffusers
  cases = [as_class(SDXL_EULER, "EulerDiscreteScheduler", timestep_spacing="linspace"),
           as_class(SDXL_EULER, "EulerDiscreteScheduler", use_karras_sigmas=True),
           as_class(SDXL_EULER, "HeunDiscreteScheduler", timestep_spacing="trailing", use_karras_sigmas=True),
           as_class(SDXL_EULER, "EulerAncestralDiscreteScheduler", timestep_spacing="trailing")]
  for config in cases:
    loaded = diffusers_config.load(config)
    cls = getattr(diffusers, config["_class_name"])
    for num_steps in (7, 20):
      with parity._float64_module(cls):
        scheduler = cls.from_config(config)
        scheduler.set_timesteps(num_steps)
      timesteps, sigmas = scheduler.timesteps.numpy(), scheduler.sigmas.numpy()
      if config["_class_name"] == "HeunDiscreteScheduler":  # t0, t1, t1, t2, t2, ...: one label per node
        timesteps, sigmas = timesteps[::2], np.append(sigmas[::2], 0.0)
        assert scheduler.timesteps.shape[0] == 2 * num_steps - 1
      grid = loaded.grid(num_steps)
      np.testing.assert_allclose(np.exp(-np.asarray(grid.lam[:num_steps])), sigmas[:num_steps], rtol=1e-12)
      assert grid.sigma[num_steps] == 0 and sigmas[num_steps] == 0
      np.testing.assert_allclose(loaded.timesteps(num_steps), timesteps, rtol=0, atol=1e-9)
      alpha_max = float(grid.alpha[0])
      np.testing.assert_allclose(loaded.init_noise_scale, float(scheduler.init_noise_sigma) * alpha_max, rtol=1e-12)


def test_deis(parity):
  for num_steps in (10, 20):
    assert_parity(parity, as_class(SD15, "DEISMultistepScheduler"), num_steps, "SD1.5 DEIS order 2")


def test_sd15_pndm_is_plms(parity):
  """SD 1.5's own scheduler (PNDM with skip_prk_steps, leading, offset 1): plms with diffusers' midpoints."""
  loaded = diffusers_config.load(SD15)
  for num_steps in (10,):
    runs = diffusers_runs(parity, SD15, num_steps)
    x, nfe, grid = ours(parity, loaded, num_steps)
    np.testing.assert_array_equal(np.unique(runs["float64"].timesteps)[::-1], loaded.timesteps(num_steps))
    parity._assert_close(x, runs["float64"].x, parity.F64_RTOL, "SD1.5 PNDM (float64)")
    parity._assert_close(x, runs["stock"].x, parity.STOCK_RTOL, "SD1.5 PNDM (stock)")
    assert nfe == runs["float64"].nfe == num_steps + 1


@contextlib.contextmanager
def _shared_noise(cls, key, like):
  """diffusers' randn_tensor returns our step noise base.noise(key, x, i), i counting its calls."""
  torch = pytest.importorskip("torch")
  calls = itertools.count()

  def randn_tensor(*args, **kwargs):
    return torch.from_numpy(np.array(base.noise(key, jnp.asarray(like), next(calls))))
  with mock.patch.object(sys.modules[cls.__module__], "randn_tensor", randn_tensor):
    yield


@pytest.mark.parametrize("config", [as_class(SDXL_EULER, "EulerAncestralDiscreteScheduler"),
                                    as_class(SD15, "DDPMScheduler", steps_offset=0)],
                         ids=("euler_ancestral", "ddpm"))
def test_ancestral_samplers_are_ddpm_ancestral_with_shared_noise(parity, config):
  """EulerAncestral (k-diffusion's sigma_up / sigma_down step) and DDPM (posterior mean and fixed_small
  variance) draw the same transitions as DDIM eta = 1: given the same normal draws, the same samples."""
  import diffusers
  cls = getattr(diffusers, config["_class_name"])
  key = jax.random.key(3)
  loaded = diffusers_config.load(config)
  x, nfe, _ = ours(parity, loaded, 10, key=key)
  with _shared_noise(cls, key, parity.X_T):
    runs = diffusers_runs(parity, config, 10, modes=("float64",),
                          x_T=parity.X_T * _init_noise_sigma(config, 10, parity))
  np.testing.assert_array_equal(loaded.timesteps(10), runs["float64"].timesteps)
  parity._assert_close(x, runs["float64"].x, parity.F64_RTOL, config["_class_name"])
  other, _, _ = ours(parity, loaded, 10, key=jax.random.key(4))
  assert parity.rel_diff(other, runs["float64"].x) > parity.DIFFERS  # the noise matters


def test_flow_match_euler_is_ddim_on_flow(parity):
  """SD3's FlowMatchEulerDiscreteScheduler (shift 3): the grid is its shifted sigmas, the labels its timesteps
  (1000 sigma), and DDIM on schedules.Flow with the velocity oracle gives its Euler sample."""
  import diffusers
  torch = pytest.importorskip("torch")
  cls = diffusers.FlowMatchEulerDiscreteScheduler
  loaded = diffusers_config.load(SD3_FLOW)
  for num_steps in (8, 20):
    with parity._float64_module(cls):
      scheduler = cls.from_config(SD3_FLOW)
      scheduler.set_timesteps(num_steps)
      x = torch.from_numpy(np.array(parity.X_T))
      for t in scheduler.timesteps:
        s = float(t) / 1000.0
        x0, eps = parity.ORACLE.x0_eps(jnp.asarray(x.numpy()), 1.0 - s, s)
        x = scheduler.step(torch.from_numpy(np.array(eps - x0)), t, x).prev_sample
    grid = loaded.grid(num_steps)
    np.testing.assert_allclose(np.asarray(grid.t[: num_steps + 1]), scheduler.sigmas.numpy(), rtol=1e-13, atol=0)
    np.testing.assert_allclose(loaded.timesteps(num_steps), scheduler.timesteps.numpy(), rtol=1e-13)
    ours_x, nfe = parity.run_ours(loaded.solver, grid, schedule=loaded.schedule, prediction="velocity",
                                  x_T=jnp.asarray(parity.X_T))
    parity._assert_close(ours_x, x.numpy(), parity.F64_RTOL, f"SD3 flow N={num_steps}")
    assert nfe == num_steps


def test_load_a_scheduler_object(parity):
  """A diffusers scheduler itself loads as its class and config (which keeps the keys from_config ignored)."""
  import diffusers
  config = as_class(SD15, "DPMSolverMultistepScheduler", use_karras_sigmas=True, solver_order=3)
  scheduler = diffusers.DPMSolverMultistepScheduler.from_config(config)
  loaded, from_dict = diffusers_config.load(scheduler), diffusers_config.load(config)
  assert loaded.class_name == "DPMSolverMultistepScheduler" and loaded.ignored == from_dict.ignored
  assert loaded.solver == from_dict.solver and loaded.time_label == from_dict.time_label
  scheduler.set_timesteps(12)
  np.testing.assert_array_equal(loaded.timesteps(12), scheduler.timesteps.numpy())


def test_defaults_are_diffusers_defaults(parity):
  """The defaults a config's missing keys take here are those of the pinned diffusers' signatures."""
  import diffusers
  for class_name, defaults in diffusers_config.DEFAULTS.items():
    signature = inspect.signature(getattr(diffusers, class_name).__init__)
    theirs = {k: p.default for k, p in signature.parameters.items() if k != "self"}
    assert theirs == defaults, class_name

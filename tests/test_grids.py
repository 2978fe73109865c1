"""Time grids: endpoints, spacing, padding, the final-step policy, diffusers' timesteps and validation."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from solvers import grids, schedules

SCHEDULES = {
    "vp_linear": schedules.VPLinear(),
    "vp_cosine": schedules.VPCosine(),
    "discrete": schedules.DiscreteVP.named("linear", 1000),
    "ve": schedules.VE(),
    "edm": schedules.EDM(),
    "flow": schedules.Flow(t_max=0.99),  # lambda finite at both ends, so every builder applies
}
NAMES = sorted(SCHEDULES)
BUILDERS = ("uniform_t", "quadratic_t", "logsnr", "karras")


def _real(grid, field="t"):
  return np.asarray(getattr(grid, field))[: int(grid.num_steps) + 1]


def _atol(schedule):
  return 1e-10 * max(1.0, schedule.t_max)


# ---------------------------------------------------------------- endpoints, monotonicity, spacing


@pytest.mark.parametrize("builder", BUILDERS)
@pytest.mark.parametrize("name", NAMES)
def test_endpoints_monotone_and_consistent_coefficients(builder, name):
  s = SCHEDULES[name]
  grid = grids.make(builder, s, 7)
  t = _real(grid)
  assert int(grid.num_steps) == 7 and t.shape == (8,)
  assert t[0] == pytest.approx(s.t_max, abs=_atol(s))
  assert t[-1] == pytest.approx(s.t_min, abs=_atol(s))
  assert np.all(np.diff(t) < 0)
  lam = _real(grid, "lam")
  assert np.all(np.diff(lam) > 0)
  tj = jnp.asarray(t)
  np.testing.assert_allclose(lam, s.lam(tj), rtol=1e-12, atol=1e-12)
  np.testing.assert_allclose(_real(grid, "alpha"), s.alpha(tj), rtol=1e-12)
  np.testing.assert_allclose(_real(grid, "sigma"), s.sigma(tj), rtol=1e-12)
  assert grid.t.dtype == grid.lam.dtype == grid.alpha.dtype == grid.sigma.dtype == jnp.float64
  assert grid.num_steps.dtype == jnp.int32


@pytest.mark.parametrize("name", NAMES)
def test_uniform_t_spacing(name):
  s = SCHEDULES[name]
  t = _real(grids.uniform_t(s, 9))
  np.testing.assert_allclose(np.diff(t), (s.t_min - s.t_max) / 9, rtol=1e-9)


@pytest.mark.parametrize("name", NAMES)
def test_quadratic_t_spacing(name):
  s = SCHEDULES[name]
  t = _real(grids.quadratic_t(s, 9))
  np.testing.assert_allclose(np.diff(np.sqrt(t)), (np.sqrt(s.t_min) - np.sqrt(s.t_max)) / 9, rtol=1e-9)
  # quadratic is denser near t_min than uniform
  assert np.abs(np.diff(t))[-1] < np.abs(np.diff(t))[0]


@pytest.mark.parametrize("name", NAMES)
def test_uniform_logsnr_spacing(name):
  s = SCHEDULES[name]
  grid = grids.uniform_logsnr(s, 9)
  lam = _real(grid, "lam")
  lam_ends = [float(s.lam(jnp.asarray(s.t_max))), float(s.lam(jnp.asarray(s.t_min)))]
  np.testing.assert_allclose(lam[[0, -1]], lam_ends, rtol=1e-12)
  np.testing.assert_allclose(np.diff(lam), (lam_ends[1] - lam_ends[0]) / 9, rtol=1e-8)


@pytest.mark.parametrize("name", NAMES)
def test_karras_spacing(name):
  s = SCHEDULES[name]
  grid = grids.karras(s, 9)
  rho = np.exp(-_real(grid, "lam"))
  rho_max, rho_min = float(s.rho(jnp.asarray(s.t_max))), float(s.rho(jnp.asarray(s.t_min)))
  np.testing.assert_allclose(rho[[0, -1]], [rho_max, rho_min], rtol=1e-10)
  np.testing.assert_allclose(np.diff(rho ** (1 / 7)), (rho_min ** (1 / 7) - rho_max ** (1 / 7)) / 9, rtol=1e-8)


def test_karras_explicit_bounds_and_rho():
  s = SCHEDULES["vp_linear"]
  grid = grids.karras(s, 5, sigma_min=0.1, sigma_max=10.0, rho=3.0)
  rho = np.exp(-_real(grid, "lam"))
  np.testing.assert_allclose(rho[[0, -1]], [10.0, 0.1], rtol=1e-10)
  np.testing.assert_allclose(np.diff(rho ** (1 / 3)), (0.1 ** (1 / 3) - 10.0 ** (1 / 3)) / 5, rtol=1e-9)


def test_edm_grid_on_edm_schedule():
  s = SCHEDULES["edm"]
  n = 6
  grid = grids.edm(s, n)
  assert int(grid.num_steps) == n  # n - 1 Karras intervals, then the jump to sigma = 0
  t = _real(grid)
  # Karras et al. 2022 Eq. 5 by hand: N = 6 points on [0.002, 80], then 0
  i = np.arange(n)
  expected = (80.0 ** (1 / 7) + i / (n - 1) * (0.002 ** (1 / 7) - 80.0 ** (1 / 7))) ** 7
  np.testing.assert_allclose(t[:n], expected, rtol=1e-12)
  assert t[n] == 0.0 and float(grid.sigma[n]) == 0.0 and float(grid.alpha[n]) == 1.0
  assert float(grid.lam[n]) == np.inf


def test_edm_grid_clips_bounds_to_the_schedule():
  s = SCHEDULES["vp_linear"]  # rho(t_max = 1) ~ 152 > 80; rho(t_min) ~ 0.0105 > 0.002
  grid = grids.edm(s, 8, final="t_end")
  rho = np.exp(-_real(grid, "lam"))
  assert rho[0] == pytest.approx(80.0, rel=1e-10)
  assert rho[-1] == pytest.approx(float(s.rho(jnp.asarray(s.t_min))), rel=1e-10)


def test_make_by_name_equals_the_builder():
  s = SCHEDULES["vp_cosine"]
  for name, builder in (("uniform_t", grids.uniform_t), ("quadratic_t", grids.quadratic_t),
                        ("logsnr", grids.uniform_logsnr), ("karras", grids.karras), ("edm", grids.edm)):
    a, b = grids.make(name, s, 5, final="zero"), builder(s, 5, final="zero")
    np.testing.assert_array_equal(a.t, b.t)
    np.testing.assert_array_equal(a.lam, b.lam)
  # the builders differ from each other, so the comparison above means something
  assert not np.allclose(grids.make("uniform_t", s, 5).t, grids.make("logsnr", s, 5).t)


def test_custom_t_start_t_end():
  s = SCHEDULES["vp_linear"]
  for builder in (grids.uniform_t, grids.quadratic_t, grids.uniform_logsnr):
    t = _real(builder(s, 4, t_start=0.8, t_end=0.05))
    assert t[0] == pytest.approx(0.8, abs=1e-14) and t[-1] == pytest.approx(0.05, abs=1e-14)


# ---------------------------------------------------------------- padding and capacity


@pytest.mark.parametrize("final", grids.FINAL_POLICIES)
def test_padding_repeats_the_last_node(final):
  s = SCHEDULES["vp_linear"]
  grid = grids.uniform_logsnr(s, 5, final=final)
  n = int(grid.num_steps)
  assert n == 5 and grid.capacity == 64
  for field in ("t", "alpha", "sigma", "lam"):
    values = np.asarray(getattr(grid, field))
    np.testing.assert_array_equal(values[n + 1:], values[n])
  assert len(grid.times()) == n + 1
  np.testing.assert_array_equal(grid.times(), np.asarray(grid.t)[: n + 1])


def test_default_capacity_is_64_or_the_next_power_of_two():
  assert grids.default_capacity(2) == 64
  assert grids.default_capacity(64) == 64
  assert grids.default_capacity(65) == 128
  assert grids.default_capacity(128) == 128
  assert grids.default_capacity(129) == 256
  s = SCHEDULES["vp_linear"]
  assert grids.uniform_t(s, 63).capacity == 64   # 64 nodes
  assert grids.uniform_t(s, 64).capacity == 128  # 65 nodes
  assert grids.uniform_t(s, 63, final="zero").capacity == 64   # 63 times + the zero node
  assert grids.uniform_t(s, 64, final="zero").capacity == 128  # 64 times + the zero node
  assert grids.uniform_t(s, 300).capacity == 512
  assert grids.uniform_t(s, 10, capacity=11).capacity == 11
  assert grids.uniform_t(s, 10, capacity=200).capacity == 200


def test_capacity_too_small_raises():
  s = SCHEDULES["vp_linear"]
  with pytest.raises(ValueError, match="capacity=10"):
    grids.uniform_t(s, 10, capacity=10)
  with pytest.raises(ValueError, match="capacity=5"):
    grids.from_times(s, [0.9, 0.5, 0.2, 0.1, 0.05], final="zero", capacity=5)


# ---------------------------------------------------------------- final = 'zero'


@pytest.mark.parametrize("builder", BUILDERS)
@pytest.mark.parametrize("name", ["vp_linear", "discrete", "edm", "ve"])
def test_final_zero(builder, name):
  s = SCHEDULES[name]
  grid = grids.make(builder, s, 6, final="zero")
  assert int(grid.num_steps) == 6
  t = _real(grid)
  assert t[0] == pytest.approx(s.t_max, abs=_atol(s))
  assert t[5] == pytest.approx(s.t_min, abs=_atol(s))  # the last real time is still t_min
  assert float(grid.alpha[6]) == 1.0 and float(grid.sigma[6]) == 0.0 and float(grid.lam[6]) == np.inf
  zero_t = s.zero_sigma_t if s.zero_sigma_t is not None else t[5]
  assert t[6] == zero_t
  # the first 6 nodes are those of a t_end grid with 5 steps
  ref = grids.make(builder, s, 5)
  np.testing.assert_allclose(t[:6], _real(ref), rtol=1e-12)


@pytest.mark.parametrize("builder", BUILDERS + ("edm",))
def test_single_step_final_zero_starts_at_t_max(builder):
  # one step = one denoising jump from the start of the grid (t_max), not from t_min
  s = SCHEDULES["vp_linear"]
  grid = grids.make(builder, s, 1, final="zero")
  assert int(grid.num_steps) == 1
  expected = s.t_max if builder != "edm" else float(s.t_of_rho(80.0))
  assert float(grid.t[0]) == pytest.approx(expected, abs=1e-12)
  assert float(grid.sigma[1]) == 0.0


def test_from_times():
  s = SCHEDULES["discrete"]
  times = [999, 800, 512.5, 100, 3]
  grid = grids.from_times(s, times)
  assert int(grid.num_steps) == 4
  np.testing.assert_array_equal(_real(grid), times)
  np.testing.assert_allclose(_real(grid, "lam"), s.lam(jnp.asarray(times, jnp.float64)), rtol=1e-14)
  grid = grids.from_times(s, times, final="zero")
  assert int(grid.num_steps) == 5 and float(grid.sigma[5]) == 0.0
  grid = grids.from_times(s, [998.6, 800.4, 0.3], round_to_integers=True)
  np.testing.assert_array_equal(_real(grid), [999, 800, 0])
  # a single time with final='zero' is one denoising step
  grid = grids.from_times(s, [500], final="zero")
  assert int(grid.num_steps) == 1 and float(grid.t[0]) == 500.0 and float(grid.lam[1]) == np.inf
  # increasing grids (inversion direction) are allowed with final='t_end'
  grid = grids.from_times(s, [3, 100, 999])
  assert np.all(np.diff(_real(grid)) > 0)


def test_from_times_float32_input_and_traced_times():
  s = SCHEDULES["vp_linear"]
  times = np.asarray([1.0, 0.5, 0.1, 0.001], np.float32)
  grid = grids.from_times(s, times)
  assert grid.t.dtype == jnp.float64
  traced = jax.jit(lambda ts: grids.from_times(s, ts, final="zero"))(jnp.asarray(times, jnp.float64))
  concrete = grids.from_times(s, times.astype(np.float64), final="zero")
  for field in ("t", "alpha", "sigma", "lam", "num_steps"):
    np.testing.assert_allclose(getattr(traced, field), getattr(concrete, field), rtol=1e-14)


def test_grid_float32_when_x64_off():
  with jax.enable_x64(False):
    s = schedules.DiscreteVP.named("linear", 1000)
    grid = grids.uniform_logsnr(s, 5, final="zero")
    assert grid.t.dtype == grid.lam.dtype == grid.alpha.dtype == jnp.float32
    assert np.all(np.diff(np.asarray(grid.lam)[:6]) > 0)


# ---------------------------------------------------------------- diffusers timesteps


def _diffusers_reference(big_t, n, spacing, family, offset=0):
  """diffusers' set_timesteps formulas, written out independently."""
  if spacing == "trailing":
    return (np.round(np.arange(big_t, 0, -big_t / n)) - 1)[:n]
  if family == "dpm" and spacing == "linspace":
    return np.linspace(0, big_t - 1, n + 1).round()[::-1][:-1]
  if family == "dpm":
    return (np.arange(0, n + 1) * (big_t // (n + 1))).round()[::-1][:-1] + offset
  if spacing == "linspace":
    return np.linspace(0, big_t - 1, n).round()[::-1]
  return (np.arange(0, n) * (big_t // n)).round()[::-1] + offset


def test_diffusers_timesteps_known_values():
  dt = grids.diffusers_timesteps
  np.testing.assert_array_equal(dt(1000, 10, "linspace", "dpm"), [999, 899, 799, 699, 599, 500, 400, 300, 200, 100])
  # leading, DPM family: ratio = 1000 // 11 = 90, (arange(11) * 90)[::-1][:-1]
  np.testing.assert_array_equal(dt(1000, 10, "leading", "dpm"), [900, 810, 720, 630, 540, 450, 360, 270, 180, 90])
  np.testing.assert_array_equal(dt(1000, 10, "leading", "dpm", steps_offset=1),
                                [901, 811, 721, 631, 541, 451, 361, 271, 181, 91])
  np.testing.assert_array_equal(dt(1000, 10, "leading", "ddim"), [900, 800, 700, 600, 500, 400, 300, 200, 100, 0])
  np.testing.assert_array_equal(dt(1000, 10, "leading", "ddim", steps_offset=1), np.arange(901, 0, -100))
  np.testing.assert_array_equal(dt(1000, 10, "linspace", "ddim"), [999, 888, 777, 666, 555, 444, 333, 222, 111, 0])
  for family in grids.SPACING_FAMILIES:
    np.testing.assert_array_equal(dt(1000, 10, "trailing", family), [999, 899, 799, 699, 599, 499, 399, 299, 199, 99])
  # by hand: 999 k / 7 = 142.71, 285.43, 428.14, 570.86, 713.57, 856.29
  np.testing.assert_array_equal(dt(1000, 7, "linspace", "dpm"), [999, 856, 714, 571, 428, 285, 143])
  # by hand: 1000 - k 333.33 = 1000, 666.67, 333.33 -> round - 1
  np.testing.assert_array_equal(dt(1000, 3, "trailing"), [999, 666, 332])
  assert dt(1000, 10).dtype == np.int64


@pytest.mark.parametrize("spacing", grids.SPACINGS)
@pytest.mark.parametrize("family", grids.SPACING_FAMILIES)
def test_diffusers_timesteps_match_the_formulas(spacing, family):
  for big_t in (1000, 999):
    for n in (1, 2, 5, 13, 20, 25, 50, 61, 100, 103, 250):
      steps = grids.diffusers_timesteps(big_t, n, spacing, family)
      assert steps.shape == (n,), (big_t, n)
      np.testing.assert_array_equal(steps, _diffusers_reference(big_t, n, spacing, family))
      assert np.all(np.diff(steps) < 0)
      assert steps.min() >= 0 and steps.max() <= big_t - 1


@pytest.mark.parametrize("spacing", grids.SPACINGS)
@pytest.mark.parametrize("family", grids.SPACING_FAMILIES)
def test_diffusers_timesteps_valid_for_every_step_count(spacing, family):
  big_t = 40
  for n in range(1, big_t + 1):
    if n == big_t and family == "dpm" and spacing != "trailing":
      with pytest.raises(ValueError, match=f"num_steps={n}"):  # n + 1 points on n integers would repeat
        grids.diffusers_timesteps(big_t, n, spacing, family)
      continue
    steps = grids.diffusers_timesteps(big_t, n, spacing, family)
    assert steps.shape == (n,) and np.all(np.diff(steps) < 0), n
    assert steps.min() >= 0 and steps.max() <= big_t - 1, n


def test_diffusers_timesteps_build_grids():
  s = SCHEDULES["discrete"]
  steps = grids.diffusers_timesteps(1000, 10)
  grid = grids.from_times(s, steps, final="zero", round_to_integers=True)
  assert int(grid.num_steps) == 10
  np.testing.assert_array_equal(_real(grid)[:10], steps)
  alphas_cumprod = np.cumprod(1 - np.linspace(1e-4, 0.02, 1000))
  np.testing.assert_allclose(_real(grid, "alpha")[:10] ** 2, alphas_cumprod[steps], rtol=1e-12)


# ---------------------------------------------------------------- validation


def test_invalid_times_raise_naming_the_value():
  s = SCHEDULES["discrete"]
  with pytest.raises(ValueError, match=r"t\[2\]=300.*t\[3\]=400"):
    grids.from_times(s, [900, 600, 300, 400, 100])
  with pytest.raises(ValueError, match=r"t\[1\]=600.*t\[2\]=600"):
    grids.from_times(s, [900, 600, 600, 100])
  with pytest.raises(ValueError, match=r"t\[0\]=5.*t\[1\]=5"):
    grids.from_times(s, [5, 5])
  with pytest.raises(ValueError, match=r"t\[1\]=1200"):
    grids.from_times(s, [999, 1200, 10])
  with pytest.raises(ValueError, match=r"t\[2\]=-1"):
    grids.from_times(s, [999, 10, -1])
  with pytest.raises(ValueError, match=r"t\[1\]=nan"):
    grids.from_times(s, [999, np.nan, 10])
  with pytest.raises(ValueError, match=r"t\[0\]=inf"):
    grids.from_times(s, [np.inf, 10])
  with pytest.raises(ValueError, match=r"10\.2.*9\.8"):
    grids.from_times(s, [500, 10.2, 9.8, 0], round_to_integers=True)
  with pytest.raises(ValueError, match=r"shape \(2, 2\)"):
    grids.from_times(s, [[900, 500], [100, 0]])
  with pytest.raises(ValueError, match="num_steps=0"):
    grids.from_times(s, [500])
  v = SCHEDULES["vp_linear"]
  with pytest.raises(ValueError, match=r"1\.5"):
    grids.from_times(v, [1.5, 0.5])
  with pytest.raises(ValueError, match=r"0\.0001"):  # below t_min = 1e-3
    grids.from_times(v, [0.5, 0.0001])
  with pytest.raises(ValueError, match=r"lambda\(1\.0\)=-inf"):
    grids.uniform_logsnr(schedules.Flow(), 5)


def test_final_zero_on_an_increasing_grid_raises():
  s = SCHEDULES["discrete"]
  with pytest.raises(ValueError, match="final='zero'.*decreasing.*t\\[0\\]=10.*t\\[1\\]=500"):
    grids.from_times(s, [10, 500, 900], final="zero")


@pytest.mark.parametrize("bad", [0, -3, 2.0, 1.5, True, "10", None])
def test_bad_num_steps_raise(bad):
  s = SCHEDULES["vp_linear"]
  for builder in ("uniform_t", "quadratic_t", "logsnr", "karras", "edm"):
    with pytest.raises(ValueError, match=f"num_steps={bad!r}"):
      grids.make(builder, s, bad)
  with pytest.raises(ValueError, match=f"num_steps={bad!r}"):
    grids.diffusers_timesteps(1000, bad)


def test_numpy_integer_num_steps_accepted():
  grid = grids.uniform_t(SCHEDULES["vp_linear"], np.int64(4))
  assert int(grid.num_steps) == 4


def test_unknown_names_raise_naming_the_value():
  s = SCHEDULES["vp_linear"]
  with pytest.raises(ValueError, match="'cosine_grid'.*karras"):
    grids.make("cosine_grid", s, 10)
  with pytest.raises(ValueError, match="'sigma_min'"):
    grids.uniform_t(s, 10, final="sigma_min")
  with pytest.raises(ValueError, match="'sigma_min'"):
    grids.from_times(s, [0.5, 0.1], final="sigma_min")
  with pytest.raises(ValueError, match="'middle'"):
    grids.diffusers_timesteps(1000, 10, spacing="middle")
  with pytest.raises(ValueError, match="'pndm'"):
    grids.diffusers_timesteps(1000, 10, family="pndm")
  with pytest.raises(ValueError, match="num_steps=1001"):
    grids.diffusers_timesteps(1000, 1001)
  with pytest.raises(ValueError, match="rho=0"):
    grids.karras(s, 5, rho=0)
  with pytest.raises(ValueError, match="sigma_min=2.0, sigma_max=1.0"):
    grids.karras(s, 5, sigma_min=2.0, sigma_max=1.0)

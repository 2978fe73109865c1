"""AutoDiffusion-style evolutionary search over time steps (solvers/evolutionary_search.py), on the analytic GMM."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models import analytic
from solvers import evolutionary_search as es
from solvers import grids, learned_grids, schedules

NUM_STEPS = 5       # ddim with final='zero': NFE 5
POPULATION = 24     # also the number of random schedules ranked: every batch of losses has this shape (one compile)
GENERATIONS = 8
NUM_CAL, NUM_HELD, NUM_SWD = 8, 48, 32


@pytest.fixture(scope="module")
def gmm_problem():
  schedule = schedules.VPLinear()
  oracle = analytic.gmm(dim=8)
  problem = learned_grids.make_problem(oracle.denoiser(schedule), schedule, jax.random.key(7), num_calibration=NUM_CAL,
                                       num_heldout=NUM_HELD, rtol=1e-8, atol=1e-8)
  return problem, oracle


@pytest.fixture(scope="module")
def calibration_loss(gmm_problem):
  return es.proxy_loss("ddim", gmm_problem[0])


@pytest.fixture(scope="module")
def heldout_loss(gmm_problem):
  problem = gmm_problem[0]
  return es.proxy_loss("ddim", problem._replace(x_calibration=problem.x_heldout,
                                                reference_calibration=problem.reference_heldout))


def _losses(loss_fn, schedules_):
  """loss_fn on each schedule, through one padded batch of POPULATION rows (the shape compiled once)."""
  batch = np.stack(schedules_)
  padded = np.concatenate([batch, np.repeat(batch[-1:], POPULATION - len(batch), 0)])
  return es.evaluate(loss_fn, padded)[: len(batch)]


@pytest.fixture(scope="module")
def searched(gmm_problem, calibration_loss):
  return es.search(calibration_loss, gmm_problem[0].schedule, NUM_STEPS, key=jax.random.key(0),
                   population=POPULATION, generations=GENERATIONS, parents=6)


def test_result_is_a_valid_schedule_from_the_candidates(gmm_problem, searched):
  times = searched.times
  schedule = gmm_problem[0].schedule
  assert times.shape == (NUM_STEPS,)   # final='zero': the sigma = 0 node is the grid's
  assert times[0] == schedule.t_max
  assert np.all(np.diff(times) < 0)
  assert times[-1] >= schedule.t_min
  candidates = es.candidate_times(schedule)
  assert np.all(np.isin(times, candidates))
  grids.from_times(schedule, times, final="zero")  # the grid validates monotonicity and range itself


def test_default_candidates_are_lambda_uniform_and_discrete_ones_integers():
  schedule = schedules.VPLinear()
  c = es.candidate_times(schedule)
  assert c.shape == (es.DEFAULT_CANDIDATES,) and c[0] == 1.0 and c[-1] == 1e-3
  steps = np.diff(np.asarray(schedule.lam(jnp.asarray(c))))
  np.testing.assert_allclose(steps, steps[0], rtol=1e-6)
  discrete = schedules.DiscreteVP.named("linear", 1000)
  d = es.candidate_times(discrete, t_start=999.0, t_end=10.0)
  np.testing.assert_array_equal(d, np.arange(999.0, 9.0, -1.0))


def test_elitism_improvement_and_accounting(searched, calibration_loss):
  best = np.asarray(searched.history["best"])
  assert best.shape == (GENERATIONS,)
  assert np.all(np.diff(best) <= 0)                       # elitism: the best so far never gets worse
  assert best[-1] < best[0]                               # the evolution improved on the random population
  assert searched.loss == best[-1]
  assert np.all(np.asarray(searched.history["generation_best"]) >= best)
  assert searched.evaluations == POPULATION * GENERATIONS
  assert searched.seconds > 0
  np.testing.assert_allclose(_losses(calibration_loss, [searched.times])[0], searched.loss, rtol=1e-12)


def test_deterministic_for_a_key(gmm_problem, calibration_loss, searched):
  again = es.search(calibration_loss, gmm_problem[0].schedule, NUM_STEPS, key=jax.random.key(0),
                    population=POPULATION, generations=GENERATIONS, parents=6)
  np.testing.assert_array_equal(again.times, searched.times)
  assert again.history == searched.history
  other = es.search(calibration_loss, gmm_problem[0].schedule, NUM_STEPS, key=jax.random.key(1),
                    population=POPULATION, generations=GENERATIONS, parents=6)
  assert other.history != searched.history


def test_found_grid_beats_uniform_t_for_ddim_at_nfe5(gmm_problem, calibration_loss, heldout_loss, searched):
  schedule = gmm_problem[0].schedule
  uniform = grids.uniform_t(schedule, NUM_STEPS, final="zero").times()[:-1]
  assert searched.loss <= _losses(calibration_loss, [uniform])[0]
  held = _losses(heldout_loss, [searched.times, uniform])
  assert held[0] < held[1]  # and on held-out starting noises, so it is not fitted to the calibration set alone


def test_seeded_search_never_loses_to_its_seed(gmm_problem, calibration_loss):
  schedule = gmm_problem[0].schedule
  seed = grids.uniform_logsnr(schedule, NUM_STEPS, final="zero").times()[:-1]
  result = es.search(calibration_loss, schedule, NUM_STEPS, key=jax.random.key(3), population=POPULATION,
                     generations=2, parents=4, init=seed)
  seed_loss = _losses(calibration_loss, [seed])[0]
  assert result.loss <= seed_loss
  assert result.history["best"][0] <= seed_loss * (1 + 1e-12)  # the seed is in the first population as it is


def _toy_loss(target_lam, schedule):
  """A cheap traceable loss: the distance in lambda to a target schedule (its minimum is known: zero)."""
  return lambda times: jnp.sqrt(jnp.mean((schedule.lam(times) - target_lam) ** 2))


def test_t_end_policy_keeps_both_ends_and_finds_a_known_optimum():
  schedule = schedules.VPLinear()
  candidates = es.candidate_times(schedule, candidates=40)
  target = candidates[[0, 9, 17, 30, 39]]                  # 4 steps ending at t_end: 3 free times among 38
  loss_fn = _toy_loss(schedule.lam(jnp.asarray(target)), schedule)
  result = es.search(loss_fn, schedule, 4, key=jax.random.key(0), final="t_end", candidates=40,
                     population=24, generations=12, parents=6)
  assert result.times.shape == (5,)
  assert result.times[0] == schedule.t_max and result.times[-1] == schedule.t_min
  assert np.all(np.diff(result.times) < 0)
  np.testing.assert_array_equal(result.times, target)
  assert result.loss < 1e-12


def test_discrete_schedule_searches_integer_steps():
  schedule = schedules.DiscreteVP.named("linear", 1000)
  target = np.array([999.0, 700.0, 400.0, 150.0])
  loss_fn = _toy_loss(schedule.lam(jnp.asarray(target)), schedule)
  result = es.search(loss_fn, schedule, 4, key=jax.random.key(0), t_end=1.0, population=24, generations=6,
                     parents=6)
  assert np.all(result.times == np.round(result.times)) and result.times[0] == 999.0
  assert np.all(np.diff(result.times) < 0) and result.times[-1] >= 1.0
  assert result.history["best"][-1] < result.history["best"][0]


def test_small_space_is_covered_without_errors():
  """Fewer distinct schedules (C(5, 2) = 10) than the population: duplicates fill it, the optimum is found."""
  schedule = schedules.VPLinear()
  target = es.candidate_times(schedule, candidates=6)[[0, 2, 4]]
  loss_fn = _toy_loss(schedule.lam(jnp.asarray(target)), schedule)
  result = es.search(loss_fn, schedule, 3, key=jax.random.key(0), candidates=6, population=12, generations=2)
  np.testing.assert_array_equal(result.times, target)


def test_chunked_evaluation_matches_vmap():
  schedule = schedules.VPLinear()
  candidates = es.candidate_times(schedule, candidates=30)
  batch = np.stack([candidates[[0, 3 + k, 12 + k, 29]] for k in range(9)])
  loss_fn = _toy_loss(schedule.lam(jnp.asarray(batch[4])), schedule)
  whole = es.evaluate(loss_fn, batch)
  assert whole[4] == 0.0 and np.all(whole[np.arange(9) != 4] > 0)
  np.testing.assert_allclose(es.evaluate(loss_fn, batch, chunk=4), whole, rtol=1e-14)


def _ranks(v):
  return np.argsort(np.argsort(v)).astype(float)


def _spearman(a, b):
  return float(np.corrcoef(_ranks(a), _ranks(b))[0, 1])


def test_proxies_rank_random_schedules_like_the_heldout_rmse(gmm_problem, calibration_loss, heldout_loss):
  """Spearman rank correlation, over 24 random 5-step ddim schedules, between each proxy and the held-out RMSE
  (48 starts). Measured: 0.98 for the RMSE on the 8 calibration starts, 0.96 for the reference-free sliced
  Wasserstein distance of 32 samples to 32 GMM draws (with 8 it is noise: -0.08)."""
  problem, oracle = gmm_problem
  schedule = problem.schedule
  rng = np.random.default_rng(0)
  candidates = es.candidate_times(schedule)
  picks = [np.sort(rng.choice(np.arange(1, candidates.size), NUM_STEPS - 1, replace=False))
           for _ in range(POPULATION)]
  batch = [np.concatenate([candidates[:1], candidates[k]]) for k in picks]
  held = _losses(heldout_loss, batch)
  rmse = _losses(calibration_loss, batch)
  x_swd = float(schedule.sigma(1.0)) * jax.random.normal(jax.random.key(11), (NUM_SWD, 8), jnp.float64)
  swd_problem = problem._replace(x_calibration=x_swd, reference_calibration=None)  # no reference needed
  swd_fn = es.proxy_loss("ddim", swd_problem, metric="swd", data=oracle.sample(jax.random.key(12), NUM_SWD),
                         key=jax.random.key(13))
  swd = _losses(swd_fn, batch)
  assert _spearman(rmse, held) > 0.9
  assert _spearman(swd, held) > 0.85


def test_float32_loss(gmm_problem, calibration_loss):
  """Users without x64: a float32 loss (samples, reference) searches the same way; its losses match float64's."""
  problem = gmm_problem[0]
  loss32 = es.proxy_loss("ddim", problem._replace(x_calibration=problem.x_calibration.astype(jnp.float32),
                                                  reference_calibration=problem.reference_calibration.astype(
                                                      jnp.float32)))
  result = es.search(loss32, problem.schedule, NUM_STEPS, key=jax.random.key(0), population=8, generations=2,
                     parents=2)
  assert np.isfinite(result.loss) and result.times.dtype == np.float64
  np.testing.assert_allclose(result.loss, _losses(calibration_loss, [result.times])[0], rtol=1e-4)


def test_bad_input_raises(gmm_problem, calibration_loss):
  schedule = gmm_problem[0].schedule
  key = jax.random.key(0)
  run = lambda **kw: es.search(kw.pop("loss_fn", calibration_loss), schedule, kw.pop("num_steps", NUM_STEPS),
                               **{"key": key, **kw})
  cases = [
      (dict(num_steps=0), "num_steps"), (dict(final="end"), "final"), (dict(population=1), "population"),
      (dict(parents=20, population=10), "parents"), (dict(generations=0), "generations"),
      (dict(mutation=0.0), "mutation"), (dict(crossover=1.5), "crossover"), (dict(key=None), "key"),
      (dict(loss_fn="rmse"), "loss_fn"), (dict(candidates=4), "candidates"), (dict(candidates=1), "candidates"),
      (dict(candidates=[2.0, 0.5]), "outside"), (dict(t_start=0.5, t_end=0.6), "t_start"),
      (dict(t_start=2.0), "t_start"), (dict(init=np.array([1.0, 0.5, 0.1])), "init"),
      (dict(init=np.array([0.9, 0.5, 0.3, 0.1, 0.01])), "t_start"), (dict(chunk=0), "chunk"),
      (dict(init=np.array([1.0, 0.5, 0.6, 0.1, 0.01])), "decreasing"),
      (dict(population=2, parents=1, init=[np.array([1.0, 0.5, 0.3, 0.1, t]) for t in (0.01, 0.02, 0.03)]),
       "population"),
  ]
  for kwargs, word in cases:
    with pytest.raises(ValueError, match=word):
      run(**kwargs)
  problem = gmm_problem[0]
  with pytest.raises(ValueError, match="metric"):
    es.proxy_loss("ddim", problem, metric="fid")
  with pytest.raises(ValueError, match="Problem"):
    es.proxy_loss("ddim", (problem.x_calibration, problem.reference_calibration))
  with pytest.raises(ValueError, match="reference"):
    es.proxy_loss("ddim", problem._replace(reference_calibration=problem.reference_calibration[:3]))
  with pytest.raises(ValueError, match="data"):
    es.proxy_loss("ddim", problem, metric="swd", key=key)
  with pytest.raises(ValueError, match="key"):
    es.proxy_loss("ddim", problem, metric="swd", data=problem.x_calibration)
  with pytest.raises(ValueError, match="num_schedules"):
    es.evaluate(calibration_loss, np.ones(5))

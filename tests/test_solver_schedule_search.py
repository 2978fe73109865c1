"""S^3 solver-schedule search over USF choices on a tiny GMM problem: beats a random search of the same budget and the
default UniPC / DPM-Solver++ schedules, its predictor ranks held-out schedules, canonical forms keep the loss, the
search is deterministic for a key, and bad input raises."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import solvers
from models import analytic
from solvers import learned_grids, schedules, usf
from solvers import solver_schedule_search as sss

SCHEDULE = schedules.VPLinear()
STEPS = 6
BUDGET = 48
FAST = dict(batch=16, predictor_steps=200, ensemble=2, zero_final=True)  # the problem's grid ends at sigma = 0


@pytest.fixture(scope="module")
def problem():
  """The GMM (dim 4), 16 calibration and 64 held-out starts with their references; the logSNR grid's times; the
  calibration loss of a USF solver, and the held-out loss of any solver."""
  oracle = analytic.gmm(dim=4, seed=1)
  prob = learned_grids.make_problem(oracle.denoiser(SCHEDULE), SCHEDULE, jax.random.key(0), num_calibration=16,
                                    num_heldout=64, final="zero")
  times = jnp.asarray(learned_grids.hand_made_times(SCHEDULE, "logsnr", STEPS, final="zero"))
  calibration = lambda s: learned_grids.loss(s, times, prob.x_calibration, prob.reference_calibration, prob)  # noqa: E731
  heldout = lambda s: float(learned_grids.loss(s, times, prob.x_heldout, prob.reference_heldout, prob))  # noqa: E731
  return calibration, heldout


@pytest.fixture(scope="module")
def searches(problem):
  calibration, _ = problem
  return {method: sss.search(calibration, STEPS, key=jax.random.key(3), budget=BUDGET, method=method, **FAST)
          for method in ("s3", "random")}


def test_search_beats_random_search_and_the_default_schedules(problem, searches):
  calibration, heldout = problem
  s3, random = searches["s3"], searches["random"]
  assert s3.loss <= random.loss, (s3.loss, random.loss)
  # The predictor-guided stages evaluate better schedules than the random initial set.
  initial = s3.history["evaluations"][0]
  losses = np.array([loss for _, loss in s3.evaluated])
  assert np.median(losses[initial:]) < 0.7 * np.median(losses[:initial]), (np.median(losses[initial:]),
                                                                            np.median(losses[:initial]))
  for name in ("unipc_bh2_2", "dpm_solver_pp_2m"):  # the registered solvers, not their USF seeds
    assert s3.loss <= float(calibration(solvers.get(name))) + 1e-12
  found = usf.USF(choices=s3.choices, lower_order_final=False)
  np.testing.assert_allclose(float(calibration(found)), s3.loss, rtol=1e-12)
  assert heldout(found) < 0.8 * heldout(solvers.get("unipc_bh2_2")), (heldout(found), heldout(solvers.get("unipc_bh2_2")))
  for result in (s3, random):
    assert result.evaluations == len(result.evaluated) == BUDGET
    keys = {tuple(np.concatenate([np.ravel(np.asarray(f)) for f in c])) for c, _ in result.evaluated}
    assert len(keys) == BUDGET  # no schedule evaluated twice
    assert result.loss == min(loss for _, loss in result.evaluated)
    assert np.all(np.diff(result.history["best"]) <= 0)
    assert result.seconds > 0
  assert s3.history["stage"] == ["initial", 1, 2, 3, 4] and s3.history["evaluations"][-1] == BUDGET


def test_canonical_schedules_have_the_same_loss(problem):
  """Canonicalisation (orders capped by the history, no corrector on the last step, data prediction for an order-1
  step without UniC from an uncorrected point, first order into sigma = 0) merges only schedules that run the same
  way."""
  calibration, _ = problem
  rng = np.random.default_rng(0)
  raw = [usf.make_choices(list(rng.integers(0, 2, STEPS)), list(rng.integers(1, 4, STEPS)),
                          list(rng.integers(0, 2, STEPS)), afs=bool(k % 2)) for k in range(16)]
  canonical = [sss._to_choices(sss._from_choices(c, STEPS, zero_final=True)) for c in raw]
  assert any(not np.array_equal(a.order, b.order) for a, b in zip(raw, canonical))
  evaluate = sss.make_evaluator(calibration, usf.USF(lower_order_final=False), 16)
  as_members = lambda cs: [tuple(np.concatenate([np.ravel(np.asarray(f)) for f in c])) for c in cs]  # noqa: E731
  np.testing.assert_allclose(evaluate(as_members(raw)), evaluate(as_members(canonical)), rtol=1e-10)


def test_predictor_ranks_held_out_schedules(problem):
  calibration, _ = problem
  rng = np.random.default_rng(1)
  space = sss._Space(STEPS, None, zero_final=True)
  members = sss._unseen(rng, lambda: space.random(rng), 96, set())
  losses = sss.make_evaluator(calibration, usf.USF(lower_order_final=False), 16)(members)
  predictor = sss.fit_predictor(members[:64], losses[:64], key=jax.random.key(0), capacity=BUDGET + 16,
                                steps=FAST["predictor_steps"], ensemble=FAST["ensemble"])
  correlation = sss.rank_correlation(predictor.scores(members[64:]), losses[64:])
  assert correlation > 0.3, correlation
  assert sss.rank_correlation(-losses[64:], losses[64:]) == -1.0


def test_deterministic_for_a_key(problem, searches):
  calibration, _ = problem
  again = sss.search(calibration, STEPS, key=jax.random.key(3), budget=BUDGET, method="s3", **FAST)
  first = searches["s3"]
  assert again.loss == first.loss
  np.testing.assert_equal(again.history, first.history)  # nan (no correlation at the initial stage) == nan
  for a, b in zip(again.choices, first.choices):
    np.testing.assert_array_equal(a, b)
  other = sss.search(calibration, STEPS, key=jax.random.key(4), budget=BUDGET, method="random", **FAST)
  assert [loss for _, loss in other.evaluated] != [loss for _, loss in searches["random"].evaluated]


@pytest.mark.parametrize("kwargs,message", [
    (dict(budget=0), "budget=0"),
    (dict(budget=1), "budget=1 is smaller than the 2 distinct seed schedules"),
    (dict(budget=10, initial=8), "leaves nothing for the stages"),
    (dict(method="greedy"), "method='greedy'"),
    (dict(num_steps=0), "num_steps=0"),
    (dict(mutation=1.5), "mutation=1.5"),
    (dict(tournament=0), "tournament=0"),
    (dict(afs="yes"), "afs='yes'"),
    (dict(solver=solvers.get("unipc_bh2_2")), "usf.USF"),
    (dict(seeds=[usf.constant_choices(3)]), "seed choices have 3 steps"),
    (dict(loss_fn=None), "loss_fn"),
])
def test_bad_input_raises(kwargs, message):
  arguments = dict(loss_fn=lambda s: 0.0, num_steps=STEPS, key=jax.random.key(0), budget=BUDGET)
  arguments.update(kwargs)
  loss_fn, num_steps = arguments.pop("loss_fn"), arguments.pop("num_steps")
  with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
    sss.search(loss_fn, num_steps, **arguments)


def test_rank_correlation_and_predictor_inputs_are_checked():
  with pytest.raises(ValueError, match="rank_correlation"):
    sss.rank_correlation([1.0], [2.0])
  with pytest.raises(ValueError, match="losses has shape"):
    sss.fit_predictor([sss._from_choices(usf.constant_choices(STEPS), STEPS)], [1.0, 2.0], key=jax.random.key(0))

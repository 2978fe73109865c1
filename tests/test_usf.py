"""USF: per-step choices reproduce the single-schedule solvers, a mixed schedule keeps its order, the analytical
first step saves exactly one NFE and is exact for centred Gaussian data, new choices never recompile, a population
of choices vmaps, gradients reach the grid, JSON round trips, and bad choices raise."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import solvers
from models import analytic
from solvers import dpm_solver_multistep as dpm
from solvers import grids, loop, schedules, unipc, usf
from tests.test_battery import counting_denoiser, nonuniform_lambdas, order_test_lambda_range

SCHEDULE = schedules.VPLinear()
CAPACITY = 16
STEPS = 7


def _x_T(oracle, n=8, seed=1, t=1.0, dtype=None):
  x = oracle.sample(jax.random.key(seed), n, SCHEDULE.alpha(t), SCHEDULE.sigma(t))
  return x if dtype is None else x.astype(dtype)


def _grid(steps=STEPS, final="zero", **kwargs):
  return grids.uniform_logsnr(SCHEDULE, steps, final=final, capacity=CAPACITY, **kwargs)


def _solver(*args, lower_order_final=False, **kwargs):
  return usf.USF(choices=usf.constant_choices(STEPS, *args, lower_order_final=lower_order_final, **kwargs),
                 lower_order_final=False)


@pytest.fixture(scope="module")
def mixture():
  oracle = analytic.gmm(dim=3)
  return oracle.denoiser(SCHEDULE), _x_T(oracle)


# (USF choices, the existing solver they are): data / order 1 is DDIM, order 2 without UniC is DPM-Solver(++) 2M
# (B(h) = expm1), with UniC it is UniPC; the registered default is unipc_bh2_2 with its lower-order final steps.
IDENTITIES = [
    ("ddim", lambda: _solver("data", 1, False), lambda: solvers.get("ddim")),
    ("dpm_solver_pp_2m", lambda: _solver("data", 2, False, lower_order_final=True),
     lambda: dpm.DPMSolverMultistep(order=2, lower_order_final_below=None)),
    ("dpm_solver_2m", lambda: _solver("noise", 2, False, lower_order_final=True),
     lambda: dpm.DPMSolverMultistep(order=2, prediction="noise", lower_order_final_below=None)),
    ("unipc_bh2_2", lambda: solvers.get("usf"), lambda: solvers.get("unipc_bh2_2")),
    ("unipc_bh2_2_explicit", lambda: _solver("data", 2, True, lower_order_final=True), lambda: solvers.get("unipc_bh2_2")),
    ("unipc_bh2_3", lambda: _solver("data", 3, True, lower_order_final=True), lambda: solvers.get("unipc_bh2_3")),
    ("unipc_noise_3", lambda: _solver("noise", 3, True, lower_order_final=True),
     lambda: unipc.UniPC(order=3, prediction="noise")),
]


@pytest.mark.parametrize("final", grids.FINAL_POLICIES)
@pytest.mark.parametrize("name,ours,theirs", IDENTITIES, ids=[i[0] for i in IDENTITIES])
def test_choices_reproduce_existing_solvers(mixture, name, ours, theirs, final):
  denoiser, x = mixture
  grid = _grid(final=final)
  mine, reference = (solvers.sample(s(), denoiser, SCHEDULE, grid, x) for s in (ours, theirs))
  np.testing.assert_allclose(mine.x, reference.x, rtol=0, atol=1e-13)
  assert int(mine.nfe) == int(reference.nfe) == STEPS


def test_first_order_steps_of_either_prediction_are_ddim(mixture):
  """Order 1 without UniC is the same map in data and noise form: a schedule alternating them is DDIM; with UniC
  the two forms differ (the corrector extrapolates x0 or eps)."""
  denoiser, x = mixture
  grid = _grid()
  alternating = [("data", "noise")[i % 2] for i in range(STEPS)]
  mixed = usf.USF(choices=usf.make_choices(alternating, 1, False), lower_order_final=False)
  np.testing.assert_allclose(solvers.sample(mixed, denoiser, SCHEDULE, grid, x).x,
                             solvers.sample("ddim", denoiser, SCHEDULE, grid, x).x, rtol=0, atol=1e-13)
  corrected = [usf.USF(choices=usf.constant_choices(STEPS, p, 1, True), lower_order_final=False) for p in ("data", "noise")]
  a, b = (solvers.sample(s, denoiser, SCHEDULE, grid, x).x for s in corrected)
  assert float(jnp.max(jnp.abs(a - b))) > 1e-4


@pytest.mark.parametrize("corrector,expected", [(False, 2), (True, 3)])
def test_a_mixed_schedule_keeps_its_order(corrector, expected):
  """Prediction types alternating in blocks of three steps: every data step after noise steps (and the reverse)
  reads the other type's history, so a wrong history would break the order (declared order = order + corrector)."""
  oracle = analytic.gaussian(dim=4, seed=3)
  x = _x_T(oracle)
  capacity = 256
  length = capacity - 1  # one choices shape for every step count
  prediction = [(i // 3) % 2 for i in range(length)]
  solver = usf.USF(choices=usf.make_choices(prediction, 2, corrector), lower_order_final=False)
  assert solver.declared_order == expected
  steps, errors = (40, 80, 160), []
  for n in steps:
    lam = nonuniform_lambdas(n, *order_test_lambda_range())
    times = np.array(SCHEDULE.t_of_lambda(jnp.asarray(lam)))
    times[0], times[-1] = SCHEDULE.t_max, SCHEDULE.t_min
    grid = grids.from_times(SCHEDULE, times, capacity=capacity)
    exact = oracle.pf_ode_solution(x, grid.alpha[0], grid.sigma[0], grid.alpha[n], grid.sigma[n])
    errors.append(float(jnp.sqrt(jnp.mean((solvers.sample(solver, oracle.denoiser(SCHEDULE), SCHEDULE, grid, x).x
                                           - exact) ** 2))))
  slope = -np.polyfit(np.log(steps), np.log(errors), 1)[0]
  assert abs(slope - expected) <= 0.3, (errors, slope)


def test_analytical_first_step_saves_one_nfe_and_is_exact_for_centred_gaussian_data():
  """With data ~ N(0, I) (``afs_data_std`` = 1) the AFS value is the exact model output, so the AFS run equals the run
  that calls the model there (with the history the AFS run uses: order 1 at step 1, no UniC after step 0) with one
  call fewer."""
  oracle = analytic.Gaussian(mean=jnp.zeros(3), std=jnp.ones(3))
  x = _x_T(oracle)
  counter = [0]
  denoiser = counting_denoiser(oracle, counter)
  grid = _grid()
  orders = [1, 1] + [2] * (STEPS - 2)
  correctors = [False] + [True] * (STEPS - 1)
  results = {}
  for afs in (False, True):
    counter[0] = 0
    solver = usf.USF(choices=usf.make_choices("data", orders, correctors, afs=afs), lower_order_final=False)
    results[afs] = solvers.sample(solver, denoiser, SCHEDULE, grid, x)
    jax.effects_barrier()
    assert int(results[afs].nfe) == counter[0] == STEPS - afs
  np.testing.assert_allclose(results[True].x, results[False].x, rtol=0, atol=1e-12)
  # A constant AFS schedule lowers the orders of steps 0-1 itself: the same run.
  constant = _solver("data", 2, True, afs=True)
  np.testing.assert_allclose(solvers.sample(constant, denoiser, SCHEDULE, grid, x).x, results[True].x, rtol=0, atol=1e-12)


def test_analytical_first_step_is_accurate_near_t_max():
  """On a Gaussian with non-zero mean the AFS value misses the exact output by O(alpha(t_start)): its error, and
  the sample's, shrink as the run starts closer to t_max = 1 (alpha = 0.0066), where the sample is within 1% of the
  sample with the exact first output."""
  oracle = analytic.gaussian(dim=3, seed=0)
  denoiser = oracle.denoiser(SCHEDULE)
  orders, correctors = [1, 1] + [2] * (STEPS - 2), [False] + [True] * (STEPS - 1)
  solver = {afs: usf.USF(choices=usf.make_choices("data", orders, correctors, afs=afs), lower_order_final=False)
            for afs in (False, True)}
  first, final = [], []
  for t_start in (0.6, 0.8, 1.0):
    x = _x_T(oracle, t=t_start)
    alpha, sigma = SCHEDULE.alpha(t_start), SCHEDULE.sigma(t_start)
    _, eps = solver[True]._analytic(x, alpha, sigma)
    first.append(float(jnp.sqrt(jnp.mean((eps - denoiser.predict("eps", x, t_start, SCHEDULE)) ** 2))))
    grid = _grid(t_start=t_start)
    a, b = (solvers.sample(solver[afs], denoiser, SCHEDULE, grid, x).x for afs in (True, False))
    final.append(float(jnp.sqrt(jnp.mean((a - b) ** 2)) / jnp.sqrt(jnp.mean(b**2))))
  assert first[0] > first[1] > first[2] and final[0] > final[1] > final[2], (first, final)
  assert first[2] < 3 * float(SCHEDULE.alpha(1.0)) and final[2] < 0.01, (first, final)


def test_new_choices_do_not_recompile_and_a_population_vmaps(mixture):
  denoiser, x = mixture
  grid = _grid()
  rng = np.random.default_rng(0)

  def random_choices():
    return usf.make_choices(list(rng.integers(0, 2, STEPS)), list(rng.integers(1, 4, STEPS)),
                            list(rng.integers(0, 2, STEPS)), afs=bool(rng.integers(0, 2)))

  population = [random_choices() for _ in range(4)]
  run = lambda c: solvers.sample(usf.USF(choices=c, lower_order_final=False), denoiser, SCHEDULE, grid, x)  # noqa: E731
  singles = [run(c) for c in population]
  before = loop.trace_count()
  singles += [run(c) for c in [random_choices() for _ in range(3)]]
  assert loop.trace_count() == before
  stacked = jax.tree_util.tree_map(lambda *a: jnp.stack(a), *population)
  batched = jax.jit(jax.vmap(lambda c: run(c).x))(stacked)
  np.testing.assert_allclose(batched, jnp.stack([s.x for s in singles[:4]]), rtol=0, atol=1e-12)
  assert len({float(jnp.sum(s.x)) for s in singles}) == len(singles)  # the choices matter


MIXED = dict(prediction=["noise", "data", "noise", "data", "data", "noise", "data"], order=[1, 2, 3, 3, 2, 2, 1],
             corrector=[True, True, False, True, True, False, False], afs=True)


def test_float32_matches_float64(mixture):
  """A mixed schedule (both types, orders 1-3, correctors, AFS) in float32 stays within 1e-4 of float64."""
  denoiser, x = mixture
  solver = usf.USF(choices=usf.make_choices(**MIXED), lower_order_final=False)
  high = solvers.sample(solver, denoiser, SCHEDULE, _grid(), x).x
  low = solvers.sample(solver, denoiser, SCHEDULE, _grid(), x.astype(jnp.float32)).x
  assert low.dtype == jnp.float32
  np.testing.assert_allclose(low, high, rtol=0, atol=1e-4 * float(jnp.max(jnp.abs(high))))


@pytest.mark.slow
def test_gradients_in_the_grid_times(mixture):
  """The RMSE of a mixed schedule is differentiable in the grid's times into sigma = 0 (what a learned grid
  optimises): finite gradients that match central differences. Slow (compiling the reverse pass through both
  types' coefficient tables takes ~12 s); the battery checks gradients through the step for params and x_T."""
  denoiser, x = mixture
  solver = usf.USF(choices=usf.make_choices(**MIXED), lower_order_final=False)
  grid = _grid()
  target = 1.1 * solvers.sample(solver, denoiser, SCHEDULE, grid, x).x
  times = jnp.asarray(grid.times()[:-1])

  def loss(times):
    g = grids.from_times(SCHEDULE, times, final="zero", capacity=CAPACITY)
    return jnp.sqrt(jnp.mean((solvers.sample(solver, denoiser, SCHEDULE, g, x).x - target) ** 2))

  gradient = jax.jit(jax.grad(loss))(times)
  assert bool(jnp.all(jnp.isfinite(gradient))) and float(jnp.max(jnp.abs(gradient))) > 0
  direction = jnp.zeros_like(times).at[1:-1].set(jnp.linspace(-1.0, 1.0, times.size - 2) * times[1:-1])
  eps = 1e-6
  fd = (loss(times + eps * direction) - loss(times - eps * direction)) / (2 * eps)
  np.testing.assert_allclose(jnp.sum(gradient * direction), fd, rtol=1e-5)


def test_json_round_trip():
  choices = usf.make_choices(["data", "noise", "data"], [1, 3, 2], [True, False, True], afs=True)
  data = usf.choices_to_json(choices)
  assert data == {"afs": True, "steps": [{"prediction": "data", "order": 1, "corrector": True},
                                         {"prediction": "noise", "order": 3, "corrector": False},
                                         {"prediction": "data", "order": 2, "corrector": True}]}
  back = usf.choices_from_json(data)
  for a, b in zip(back, choices):
    np.testing.assert_array_equal(a, b)
  assert usf.choices_to_json(choices, num_steps=2)["steps"] == data["steps"][:2]


@pytest.mark.parametrize("build,message", [
    (lambda: usf.make_choices("data", [1, 4], True), "choices.order[1]=4"),
    (lambda: usf.make_choices(["data", "both"], 2, True), "prediction='both'"),
    (lambda: usf.make_choices("data", 2, [0, 2]), "choices.corrector[1]=2"),
    (lambda: usf.make_choices("data", 2.0, True), "order="),
    (lambda: usf.check_choices(usf.Choices(np.zeros(3, int), np.ones(2, int), np.ones(3, int), np.asarray(0))),
     "one shape"),
    (lambda: usf.check_choices(usf.Choices(np.zeros(2), np.ones(2, int), np.ones(2, int), np.asarray(0))),
     "choices.prediction has dtype float64"),
    (lambda: usf.USF(choices=usf.Choices(np.zeros(2, int), np.ones(2, int), np.ones(2, int), np.asarray(3))),
     "choices.afs=3"),
    (lambda: usf.USF(choices={"order": 2}), "usf.Choices"),
    (lambda: usf.USF(variant="bh3"), "variant='bh3'"),
    (lambda: usf.USF(afs_data_std=0.0), "afs_data_std=0.0"),
    (lambda: usf.constant_choices(0), "num_steps=0"),
    (lambda: usf.constant_choices(3, order=5), "order=5"),
    (lambda: usf.with_choices(solvers.get("ddim"), usf.constant_choices(3)), "usf.USF"),
    (lambda: usf.choices_from_json({"steps": [{"prediction": "data", "order": 2}]}), "steps[0]"),
    (lambda: usf.choices_from_json({"steps": [{"prediction": "data", "order": 0, "corrector": True}]}),
     "choices.order[0]=0"),
    (lambda: usf.choices_from_json({"steps": [{"prediction": "x0", "order": 1, "corrector": True}]}),
     "prediction='x0'"),
    (lambda: usf.choices_from_json({"steps": [], "afs": False}), "non-empty"),
    (lambda: usf.choices_from_json({"steps": [{"prediction": "data", "order": 1, "corrector": True}], "afs": 1}),
     "afs=1"),
])
def test_bad_choices_raise(build, message):
  with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]").replace("(", r"\(")):
    build()


def test_choices_longer_than_the_grid_raise(mixture):
  denoiser, x = mixture
  solver = usf.USF(choices=usf.constant_choices(CAPACITY))  # 16 steps, room for 15
  with pytest.raises(ValueError, match="choices.prediction has 16 steps"):
    solvers.sample(solver, denoiser, SCHEDULE, _grid(), x)

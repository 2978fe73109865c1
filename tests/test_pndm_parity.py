"""Parity of the PNDM family with diffusers' PNDMScheduler on the analytic mixture (harness and modes of
tests/test_diffusers_parity.py).

diffusers' PRK mode (``skip_prk_steps=False``, its default) is ``f_pndm`` with ``midpoint='diffusers'``;
``skip_prk_steps=True`` is ``plms``; ``prediction_type='v_prediction'`` is ``combine='v'`` on a v-predicting
model. The scheduler steps from t to t - T // N ('leading' spacing here, where that is its next timestep) and
ends at alphas_cumprod = 1 (``set_alpha_to_one=True``, our final='zero') or at alphas_cumprod[0]; with
steps_offset=0 the latter is a zero-length last step (an identity that costs a model call), which our grid
leaves out (``ddim_grid``). N = 9 has T // N = 111 odd, where diffusers' two half steps differ by one.
"""
import pytest

from tests.test_diffusers_parity import (DIFFERS, F64_RTOL, NUM_TRAIN, _assert_close, ddim_grid, rel_diff,
                                         run_diffusers, run_ours)

diffusers = pytest.importorskip("diffusers", reason="parity peer missing: pip install -e '.[parity]'")

from solvers import grids  # noqa: E402
from solvers.pndm import PNDM  # noqa: E402

pytestmark = pytest.mark.filterwarnings(
    "ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning")

STEPS = (9, 20)
STOCK_RTOL = 1e-5  # measured <= 1.7e-6 (diffusers' float32 tables and arithmetic)
PREDICTIONS = {"epsilon": ("eps", "eps"), "v_prediction": ("v", "v")}  # diffusers -> (our model, combine)


def pndm_case(skip_prk_steps, set_alpha_to_one, steps_offset, num_steps, prediction_type="epsilon",
              modes=("float64", "stock"), midpoint="diffusers"):
  config = dict(skip_prk_steps=skip_prk_steps, set_alpha_to_one=set_alpha_to_one, steps_offset=steps_offset)
  runs = {mode: run_diffusers(diffusers.PNDMScheduler, config, num_steps, mode, prediction_type) for mode in modes}
  prediction, combine = PREDICTIONS[prediction_type]
  solver = PNDM(method="plms" if skip_prk_steps else "f_pndm", midpoint=midpoint, combine=combine)
  timesteps = grids.diffusers_timesteps(NUM_TRAIN, num_steps, "leading", "ddim", steps_offset)
  ours, nfe = run_ours(solver, ddim_grid(timesteps, set_alpha_to_one), prediction=prediction)
  return ours, nfe, runs


@pytest.mark.parametrize("prediction_type", PREDICTIONS)
@pytest.mark.parametrize("skip_prk_steps", (False, True))
def test_pndm_parity(skip_prk_steps, prediction_type):
  for set_alpha_to_one in (True, False):
    for steps_offset in (0, 1):
      for num_steps in STEPS:
        ours, nfe, runs = pndm_case(skip_prk_steps, set_alpha_to_one, steps_offset, num_steps, prediction_type)
        what = (f"PNDM skip_prk_steps={skip_prk_steps} {prediction_type} set_alpha_to_one={set_alpha_to_one} "
                f"steps_offset={steps_offset} N={num_steps}")
        _assert_close(ours, runs["float64"].x, F64_RTOL, what + " (float64)")
        _assert_close(ours, runs["stock"].x, STOCK_RTOL, what + " (stock)")
        identity_last_step = not set_alpha_to_one and steps_offset == 0
        assert runs["float64"].nfe == num_steps + (1 if skip_prk_steps else 9)
        assert nfe == runs["float64"].nfe - identity_last_step


def test_differences_from_diffusers():
  """What each option changes, against diffusers' float64 run: the t-midpoint equals diffusers' integer half
  step where T // N is even (N = 20) and differs where it is odd (N = 9); the official S-PNDM (AB2 for ever)
  is not diffusers' PLMS; combining eps instead of raw v is another method for a v model."""
  for num_steps, same in ((20, True), (9, False)):
    ours, _, runs = pndm_case(False, True, 0, num_steps, modes=("float64",), midpoint="t")
    assert (rel_diff(ours, runs["float64"].x) <= F64_RTOL) == same
    assert same or rel_diff(ours, runs["float64"].x) > 1e-6
  _, _, runs = pndm_case(True, True, 0, 20, modes=("float64",))
  timesteps = grids.diffusers_timesteps(NUM_TRAIN, 20, "leading", "ddim")
  s_pndm, _ = run_ours(PNDM(method="s_pndm"), ddim_grid(timesteps, True))
  assert rel_diff(s_pndm, runs["float64"].x) > DIFFERS
  _, _, runs = pndm_case(True, True, 0, 20, "v_prediction", modes=("float64",))
  eps_combined, _ = run_ours(PNDM(method="plms"), ddim_grid(timesteps, True), prediction="v")
  assert rel_diff(eps_combined, runs["float64"].x) > 1e-6


def parity_rows():
  """The PNDM rows of docs/parity.md: max relative difference per setting, float64 mode and stock per N."""
  rows = ["| solver | setting | float64 mode: max rel. diff | stock: " + " / ".join(f"N={n}" for n in STEPS) + " |",
          "|---|---|---|---|"]
  for skip_prk_steps in (False, True):
    for prediction_type in PREDICTIONS:
      for set_alpha_to_one in (True, False):
        for steps_offset in (0, 1):
          pairs = []
          for n in STEPS:
            ours, _, runs = pndm_case(skip_prk_steps, set_alpha_to_one, steps_offset, n, prediction_type)
            pairs.append((rel_diff(ours, runs["float64"].x), rel_diff(ours, runs["stock"].x)))
          solver = "PLMS (`plms`" if skip_prk_steps else "PRK + PLMS (`pndm_f`, midpoint='diffusers'"
          solver += ", combine='v')" if prediction_type == "v_prediction" else ")"
          rows.append(f"| {solver} | skip_prk_steps={skip_prk_steps}, {prediction_type}, set_alpha_to_one="
                      f"{set_alpha_to_one}, steps_offset={steps_offset} | {max(p[0] for p in pairs):.1e} | "
                      + " / ".join(f"{p[1]:.1e}" for p in pairs) + " |")
  return "\n".join(rows)


if __name__ == "__main__":
  print(parity_rows())

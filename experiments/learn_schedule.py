"""Learns sampling schedules at few NFE (gradient-learned grids, evolutionary time-step search, USF / S^3 solver
schedules) and compares them with the hand-made grids on held-out starts; saves each as a named artifact.

  python -m experiments.learn_schedule --workdir=/tmp/learned [--solvers=dpm_solver_pp_2m,unipc_bh2_2] \
      [--nfe=4,5,6,8,10] [--methods=gradient,evolution,usf] [--num_calibration=32] [--num_heldout=256]
  python -m experiments.learn_schedule --workdir=/tmp/learned_digits --model=/tmp/digits --num_calibration=16 \
      --num_heldout=32 --dtype=float32
  python -m experiments.sample --model=/tmp/digits --workdir=/tmp/s --grid=learned:<name> --schedules_dir=/tmp/learned_digits/schedules

Outputs in --workdir: config.json, results.json, table.txt, learned_schedules.png, schedules/<name>.json
(see experiments/learn_schedule_lib.py).
"""
from absl import app, flags

from experiments import cli
from experiments import learn_schedule_lib as lib
from solvers import grids

_D = lib.Config()
_WORKDIR = flags.DEFINE_string("workdir", None, "Output folder (created if missing). Required.", required=True)
_PROBLEM = flags.DEFINE_enum("problem", None, list(lib.PROBLEMS), "The analytic problem (default gmm without --model).")
_MODEL = flags.DEFINE_string("model", None, "A training workdir (python -m experiments.train): learn for its network "
                             "(unconditional) instead of the GMM.")
_DIM = flags.DEFINE_integer("dim", _D.dim, "GMM dimension.")
_SOLVERS = flags.DEFINE_list("solvers", list(_D.solvers), "Registered solvers (one model call per step).")
_NFE = flags.DEFINE_list("nfe", [str(n) for n in _D.nfe], "NFE (= steps) to learn schedules for.")
_METHODS = flags.DEFINE_list("methods", list(_D.methods), f"From {', '.join(lib.METHODS)}.")
_BASELINES = flags.DEFINE_list("baselines", list(_D.baselines), "Hand-made grids compared against.")
_FINAL = flags.DEFINE_enum("final", _D.final, list(grids.FINAL_POLICIES), "Final-step policy of every grid.")
_NUM_CAL = flags.DEFINE_integer("num_calibration", _D.num_calibration, "Starts the methods fit.")
_NUM_HELD = flags.DEFINE_integer("num_heldout", _D.num_heldout, "Held-out starts the results are measured on.")
_SEED = flags.DEFINE_integer("seed", _D.seed, "Seed of the starts (and, + 1, of the searches).")
_DTYPE = flags.DEFINE_enum("dtype", _D.dtype, list(lib.DTYPES), "dtype of the starts and samples.")
_ITERATIONS = flags.DEFINE_integer("iterations", _D.iterations, "gradient: Adam iterations.")
_LR = flags.DEFINE_float("learning_rate", _D.learning_rate, "gradient: Adam learning rate on the logits.")
_INIT = flags.DEFINE_string("init", _D.init, "gradient: starting grid, best (of the baselines on calibration) or a name.")
_LEARN_END = flags.DEFINE_boolean("learn_end", _D.learn_end, "gradient: learn the last node before sigma = 0 too.")
_POPULATION = flags.DEFINE_integer("population", _D.population, "evolution: schedules per generation.")
_GENERATIONS = flags.DEFINE_integer("generations", _D.generations, "evolution: generations.")
_USF_BUDGET = flags.DEFINE_integer("usf_budget", _D.usf_budget, "usf: true evaluations of the S^3 search.")
_SCHEDULES_DIR = flags.DEFINE_string("schedules_dir", None, "Where the artifacts go (default <workdir>/schedules).")
_FLAGS = {"problem": _PROBLEM, "model": _MODEL, "dim": _DIM, "solvers": _SOLVERS, "nfe": _NFE, "methods": _METHODS,
          "baselines": _BASELINES, "final": _FINAL, "num_calibration": _NUM_CAL, "num_heldout": _NUM_HELD,
          "seed": _SEED, "dtype": _DTYPE, "iterations": _ITERATIONS, "learning_rate": _LR, "init": _INIT,
          "learn_end": _LEARN_END, "population": _POPULATION, "generations": _GENERATIONS, "usf_budget": _USF_BUDGET,
          "schedules_dir": _SCHEDULES_DIR}


cli.validate_flags_with(lib.resolve_config, _FLAGS)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  lib.run({field: holder.value for field, holder in _FLAGS.items()}, _WORKDIR.value)


if __name__ == "__main__":
  app.run(main)

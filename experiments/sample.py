"""Draws samples from a trained network (a training workdir of experiments.train) with any solver and grid.

  python -m experiments.sample --workdir=/tmp/samples --model=/tmp/toy2d --solver=dpm_solver_pp_2m \
      --grid=logsnr --steps=10 --num_samples=64 [--final=zero] [--seed=0] [--checkpoint=params|latest]
  python -m experiments.sample --workdir=/tmp/digit3 --model=/tmp/digits --class_label=3 --guidance=2
  python -m experiments.sample --workdir=/tmp/digits_all --model=/tmp/digits --class_label=-1  # a row per class

Outputs in --workdir: config.json, samples.npz (samples, labels, nfe, solver, grid, seconds), samples.png
(see experiments/sample_lib.py); a JSON summary line on stdout.
"""
import sys

from absl import app, flags, logging

from experiments import cli
from experiments import sample_lib as lib
from solvers import grids

_D = lib.Config()
_WORKDIR = flags.DEFINE_string("workdir", None, "Output folder (created if missing). Required.", required=True)
_MODEL = flags.DEFINE_string("model", None, "The --workdir of a training run (python -m experiments.train). Required.",
                             required=True)
_SOLVER = flags.DEFINE_string("solver", _D.solver, f"A registered solver name (solvers.available()); default "
                              f"{lib.DEFAULT_SOLVER}, or the learned grid's solver with --grid=learned:<name>.")
_GRID = flags.DEFINE_string("grid", _D.grid, f"Time grid: one of {', '.join(sorted(grids.GRIDS))} (uniform_logsnr = "
                            "logsnr), or learned:<name>, a learned-schedule artifact (python -m "
                            "experiments.learn_schedule) found in --schedules_dir, $DOS_SCHEDULES or experiments/schedules/.")
_STEPS = flags.DEFINE_integer("steps", _D.steps, f"Number of grid steps (the NFE of one-call-per-step solvers); default "
                              f"{lib.DEFAULT_STEPS}, or the learned grid's.")
_NUM = flags.DEFINE_integer("num_samples", _D.num_samples, "Number of samples (per class with --class_label=-1: "
                            "ceil(num_samples / classes) each).")
_FINAL = flags.DEFINE_enum("final", _D.final, list(grids.FINAL_POLICIES),
                           f"Final-step policy: stop at t_min, or end with a jump to sigma = 0 ('zero'); default "
                           f"{lib.DEFAULT_FINAL}, or the learned grid's.")
_SCHEDULES_DIR = flags.DEFINE_string("schedules_dir", None, "A folder searched first for --grid=learned:<name>.")
_SEED = flags.DEFINE_integer("seed", _D.seed, "PRNG seed of x_T (and of a stochastic solver's noise).")
_CLASS = flags.DEFINE_integer("class_label", None, "Class of every sample (class-conditional models); -1: one row "
                              "per class. Unset: unconditional (the null label).")
_GUIDANCE = flags.DEFINE_float("guidance", None, "Classifier-free guidance scale towards --class_label (1: the "
                               "conditional model alone).")
_CHECKPOINT = flags.DEFINE_enum("checkpoint", _D.checkpoint, list(lib.CHECKPOINTS),
                                "params: the final EMA params; latest: the EMA params of the newest checkpoint.")
_FLAGS = {"model": _MODEL, "solver": _SOLVER, "grid": _GRID, "steps": _STEPS, "final": _FINAL,
          "num_samples": _NUM, "seed": _SEED, "class_label": _CLASS, "guidance": _GUIDANCE, "checkpoint": _CHECKPOINT,
          "schedules_dir": _SCHEDULES_DIR}


cli.validate_flags_with(lib.resolve_config, _FLAGS)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # orbax logs every restore at INFO
  result = lib.run({field: holder.value for field, holder in _FLAGS.items()}, _WORKDIR.value)
  sys.stdout.write(lib.summary_line(result) + "\n")


if __name__ == "__main__":
  app.run(main)

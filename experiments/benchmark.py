"""The speed benchmark: solver overhead per step (ours and diffusers'), compilations across NFE 1..100,
sampling time vs the digits U-Net's own cost, and throughput on one and on all devices, in one run.

  python -m experiments.benchmark --workdir=/tmp/bench                      # everything, ~3 min on 2 CPU cores
  python -m experiments.benchmark --workdir=/tmp/bench --parts=overhead,diffusers --solvers=ddim,unipc_bh2_2
  python -m experiments.benchmark --workdir=/tmp/bench --model=/tmp/digits  # the trained digits U-Net

Outputs in --workdir: results.json (every number, the machine) and table.txt, also printed last (see
experiments/benchmark_lib.py). Ratios are measured side by side in one run; timings of different runs
or machines are not comparable.
"""
from absl import app, flags

from experiments import benchmark_lib as lib
from experiments import cli

_D = lib.Config()
_WORKDIR = flags.DEFINE_string("workdir", None, "Output folder (created if missing). Required.", required=True)
_PARTS = flags.DEFINE_list("parts", list(_D.parts), f"Comma list of parts to run, from {', '.join(lib.PARTS)}.")
_SOLVERS = flags.DEFINE_list("solvers", None, "Comma list of registered solver names for the overhead part; default: "
                             f"every deterministic solver and {', '.join(lib.DEFAULT_STOCHASTIC)}.")
_STEPS = flags.DEFINE_integer("steps", _D.steps, "Steps per sample call in the overhead and diffusers parts.")
_BATCH = flags.DEFINE_integer("batch", _D.batch, "Batch of the near-free model's x_T (overhead, diffusers, compile).")
_DIM = flags.DEFINE_integer("dim", _D.dim, "Dimension of the near-free model's samples.")
_REPEATS = flags.DEFINE_integer("repeats", _D.repeats, "Timed calls per measurement (the median is kept).")
_SEED = flags.DEFINE_integer("seed", _D.seed, "PRNG seed of the inputs (and of the random U-Net weights).")
_COMPILE_SOLVER = flags.DEFINE_string("compile_solver", _D.compile_solver, "Solver of the compile part.")
_COMPILE_MAX_NFE = flags.DEFINE_integer("compile_max_nfe", _D.compile_max_nfe, "The compile part samples every NFE "
                                        "1..this.")
_MODEL = flags.DEFINE_string("model", None, "A training workdir (python -m experiments.train) whose network the unet "
                             "and throughput parts time; unset: the digits preset's U-Net with random weights.")
_UNET_BATCH = flags.DEFINE_integer("unet_batch", _D.unet_batch, "Batch of the unet part (and default of the "
                                   "throughput part's).")
_UNET_SOLVERS = flags.DEFINE_list("unet_solvers", list(_D.unet_solvers), "Comma list of solvers of the unet part.")
_UNET_NFE = flags.DEFINE_list("unet_nfe", [str(n) for n in _D.unet_nfe], "Comma list of step counts of the unet part.")
_TP_SOLVER = flags.DEFINE_string("throughput_solver", _D.throughput_solver, "Solver of the throughput part.")
_TP_NFE = flags.DEFINE_integer("throughput_nfe", _D.throughput_nfe, "Steps of the throughput part.")
_TP_BATCH = flags.DEFINE_integer("throughput_batch", None, "Batch of the throughput part (a multiple of the device "
                                 "count); default: --unet_batch rounded up to one.")
_TP_MODEL = flags.DEFINE_enum("throughput_model", _D.throughput_model, list(lib.THROUGHPUT_MODELS),
                              "Network of the throughput part: the U-Net or the near-free model.")
_FLAGS = {"parts": _PARTS, "solvers": _SOLVERS, "steps": _STEPS, "batch": _BATCH, "dim": _DIM, "repeats": _REPEATS,
          "seed": _SEED, "compile_solver": _COMPILE_SOLVER, "compile_max_nfe": _COMPILE_MAX_NFE, "model": _MODEL,
          "unet_batch": _UNET_BATCH, "unet_solvers": _UNET_SOLVERS, "unet_nfe": _UNET_NFE,
          "throughput_solver": _TP_SOLVER, "throughput_nfe": _TP_NFE, "throughput_batch": _TP_BATCH,
          "throughput_model": _TP_MODEL}


def _values(values):
  config = {field: values[holder.name] for field, holder in _FLAGS.items()}
  config["unet_nfe"] = cli.numbers(config["unet_nfe"], "unet_nfe", int, minimum=1)
  return config


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  try:  # a bad flag (its ValueError names the value) stops the run before the workdir is touched
    config = lib.resolve_config(_values({holder.name: holder.value for holder in _FLAGS.values()}))
  except ValueError as e:
    raise app.UsageError(str(e)) from None
  lib.run(config, _WORKDIR.value)


if __name__ == "__main__":
  app.run(main)

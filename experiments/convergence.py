"""The main job: solver-order convergence study (RMSE vs NFE) on the analytic Gaussian and GMM, or on a
trained network (--model: a training workdir; its reference is the diffrax solution of its PF-ODE).

  python -m experiments.convergence --workdir=/tmp/conv [--solvers=ddim,ddim_eps] [--nfe=5,10,20]
  python -m experiments.convergence --workdir=/tmp/conv_toy --model=/tmp/toy2d --solvers=ddim,dpm_solver_pp_2m

Outputs in --workdir: config.json, results.json, metrics.jsonl, table.txt, convergence.png.
"""
from absl import app, flags

from experiments import cli
from experiments import convergence_lib as lib
from solvers import grids

_D = lib.Config()
_WORKDIR = flags.DEFINE_string("workdir", None, "Output folder (created if missing). Required.", required=True)
_SOLVERS = flags.DEFINE_list("solvers", None, "Comma list of registered solver names; default: every "
                             "registered solver that is not stochastic.")
_NFE = flags.DEFINE_list("nfe", [str(n) for n in _D.nfe_steps], "Comma list of step counts (integers >= 1) to "
                         "sweep; the NFE a solver actually uses is recorded and fitted.")
_PROBLEMS = flags.DEFINE_list("problems", None, f"Comma list of problems, from {', '.join(lib.PROBLEMS + (lib.MODEL,))}; "
                              f"default: {','.join(lib.PROBLEMS)}, or {lib.MODEL} with --model.")
_MODEL = flags.DEFINE_string("model", None, f"A training workdir (python -m experiments.train): the network of the "
                             f"problem '{lib.MODEL}'. Keep --batch small (8-16) for image models: the reference "
                             "costs hundreds of network calls per sample.")
_GRID = flags.DEFINE_string("grid", _D.grid, f"Time grid builder of solvers.grids ({', '.join(sorted(grids.GRIDS))}), "
                            "or learned:<name>, a learned-schedule artifact (python -m experiments.learn_schedule; "
                            "'{nfe}' in the name: one per --nfe entry) found in --schedules_dir, $DOS_SCHEDULES or "
                            "experiments/schedules/.")
_SCHEDULES_DIR = flags.DEFINE_string("schedules_dir", None, "A folder searched first for --grid=learned:<name>.")
_FINAL = flags.DEFINE_enum("final", _D.final, list(grids.FINAL_POLICIES),
                           "Final-step policy: stop at t_end, or end with a jump to sigma = 0 ('zero').")
_BATCH = flags.DEFINE_integer("batch", _D.batch, "Number of starting points x_T.", lower_bound=1)
_SEED = flags.DEFINE_integer("seed", _D.seed, "PRNG seed of the x_T batch.", lower_bound=0)
_PREPARE_SEED = flags.DEFINE_integer("prepare_seed", _D.prepare_seed, "PRNG seed of the training points of solvers "
                                     "that learn from the model (DPM-Solver-v3 statistics, DC-Solver ratios).",
                                     lower_bound=0)


def _validator(check):
  """A flag validator whose ValueError (naming the bad value) becomes an absl flag error."""
  def validate(value):
    try:
      check(value)
    except ValueError as e:
      raise flags.ValidationError(str(e)) from None
    return True
  return validate


flags.register_validator("nfe", _validator(lambda v: cli.numbers(v, "nfe", int, minimum=1)))
flags.register_multi_flags_validator(
    ["problems", "model"], _validator(lambda v: lib.resolve_config({"problems": v["problems"], "model": v["model"]})))
flags.register_validator("solvers", _validator(lambda v: v is None or lib.resolve_config({"solvers": v})))
flags.register_multi_flags_validator(
    ["grid", "nfe", "final", "schedules_dir"],
    _validator(lambda v: lib.resolve_config({"grid": v["grid"], "nfe_steps": v["nfe"], "final": v["final"],
                                             "schedules_dir": v["schedules_dir"]})))


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  config = lib.Config(problems=_PROBLEMS.value, model=_MODEL.value, solvers=_SOLVERS.value, nfe_steps=list(cli.numbers(_NFE.value, "nfe", int, minimum=1)),
                      grid=_GRID.value, schedules_dir=_SCHEDULES_DIR.value, final=_FINAL.value, batch=_BATCH.value, seed=_SEED.value,
                      prepare_seed=_PREPARE_SEED.value)
  lib.run(config, _WORKDIR.value)


if __name__ == "__main__":
  app.run(main)

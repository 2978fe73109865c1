"""The inversion study: round-trip error ||regenerate(invert(x0)) - x0|| / ||x0||, NFE and time of every
inversion method (solvers.inversion) against the step count, per dtype, guidance scale and method option,
on the analytic class-conditional GMM or on a trained network (--model); plus an editing record
(regenerate towards another class).

  python -m experiments.inversion --workdir=/tmp/inversion [--methods=ddim,bdia] [--dtypes=float64] [--nfe=10,50]
  python -m experiments.inversion --workdir=/tmp/inv_digits --model=/tmp/digits --source_class=3 --target_class=8

Outputs in --workdir: config.json, results.json, table.txt, inversion.png, and inversion_grid.png for an
image model (see experiments/inversion_lib.py).
"""
from absl import app, flags

from experiments import inversion_lib as lib

_D = lib.Config()
_WORKDIR = flags.DEFINE_string("workdir", None, "Output folder (created if missing). Required.", required=True)
_MODEL = flags.DEFINE_string("model", None, "The --workdir of a training run (python -m experiments.train): invert "
                             "its training data with its network and schedule. Unset: the analytic GMM.")
_METHODS = flags.DEFINE_list("methods", list(_D.methods), f"Comma list of inversion methods, from {', '.join(lib.METHOD_NAMES)}.")
_DTYPES = flags.DEFINE_list("dtypes", None, f"Comma list of dtypes, from {', '.join(lib.DTYPES)} (default: "
                            f"{','.join(lib.DTYPES)}; {','.join(lib.MODEL_DTYPES)} with --model).")
_NFE = flags.DEFINE_list("nfe", [str(n) for n in _D.nfe_steps], "Comma list of step counts N (integers >= 1); the NFE "
                         "that invert and regenerate actually use is recorded.")
_GUIDANCE = flags.DEFINE_list("guidance", None, "Comma list of guidance scales (>= 0) towards the data's class; 1 is "
                              f"the class-conditional model (default: {','.join(f'{s:g}' for s in lib.GUIDANCE)}; "
                              "none for an unconditional model).")
_GAMMAS = flags.DEFINE_list("gammas", [f"{g:g}" for g in _D.gammas], "Comma list of BDIA gammas in (0, 1] "
                            "(bdia, bdia_edm).")
_MIXING = flags.DEFINE_list("mixing", [f"{p:g}" for p in _D.mixing], "Comma list of EDICT mixing values p in (0, 1].")
_BATCH = flags.DEFINE_integer("batch", _D.batch, "Number of data points x0.", lower_bound=1)
_SEED = flags.DEFINE_integer("seed", _D.seed, "PRNG seed of the x0 batch.", lower_bound=0)
_SOURCE = flags.DEFINE_integer("source_class", None, "Class of the data and of the inversion's condition (default "
                               f"{lib.CLASSES['source_class']}; none for an unconditional model).", lower_bound=0)
_TARGET = flags.DEFINE_integer("target_class", None, "Class the editing record regenerates towards (default "
                               f"{lib.CLASSES['target_class']}; none for an unconditional model).", lower_bound=0)
_EDIT_STEPS = flags.DEFINE_integer("edit_steps", _D.edit_steps, "Step count N of the editing record (float64; "
                                   "float32 with --model) and of inversion_grid.png; 0 leaves them out.",
                                   lower_bound=0)
_REPEATS = flags.DEFINE_integer("repeats", _D.repeats, "Timed round trips per point; the best is recorded.",
                                lower_bound=1)
_GRID_IMAGES = flags.DEFINE_integer("grid_images", _D.grid_images, "Originals (rows) shown in inversion_grid.png "
                                    "(image models).", lower_bound=1)
_FLAGS = {"methods": _METHODS, "dtypes": _DTYPES, "nfe_steps": _NFE, "guidance": _GUIDANCE, "gammas": _GAMMAS,
          "mixing": _MIXING, "batch": _BATCH, "seed": _SEED, "source_class": _SOURCE, "target_class": _TARGET,
          "edit_steps": _EDIT_STEPS, "repeats": _REPEATS, "model": _MODEL, "grid_images": _GRID_IMAGES}
_TOGETHER = ("source_class", "target_class", "model")  # checked together: the classes must differ, and their
# range is that of the GMM (without --model) or of the network (checked by run once it is loaded)


def _validator(fields):
  """A validator of the flags holding ``fields``: resolve_config's ValueError (naming the bad value and what
  is allowed) becomes a flag error."""
  def validate(value):
    # A multi-flag validator gets {flag name: value} (the flags are named like their fields).
    overrides = {f: value[f] for f in fields} if len(fields) > 1 else {fields[0]: value}
    try:
      lib.resolve_config(overrides)
    except ValueError as e:
      raise flags.ValidationError(str(e)) from None
    return True
  return validate


for _field, _holder in _FLAGS.items():
  if _field not in _TOGETHER:
    flags.register_validator(_holder.name, _validator([_field]))
flags.register_multi_flags_validator(list(_TOGETHER), _validator(list(_TOGETHER)))


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  lib.run({field: holder.value for field, holder in _FLAGS.items()}, _WORKDIR.value)


if __name__ == "__main__":
  app.run(main)

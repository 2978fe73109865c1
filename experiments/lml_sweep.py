"""The LML sweep: base solvers with and without Levenberg-Marquardt-Langevin moves at equal NFE on the GMM.

  python -m experiments.lml_sweep --workdir=/tmp/lml [--solvers=dpm_solver_pp_2m,ddim] [--nfe=5,10,20]
      [--dampings=0.3,3,30,inf] [--ranks=1] [--windows=0:inf,0:0.5] [--reuses=none,x0] [--snr=0.16] [--batch=2000]

Outputs in --workdir (atomic writes): config.json, results.json, table.txt. See experiments/lml_lib.py.
"""
import math

from absl import app, flags

from experiments import cli
from experiments import lml_lib as lib

_D = lib.Config()
_WORKDIR = flags.DEFINE_string("workdir", None, "Output folder (created if missing). Required.", required=True)
_SOLVERS = flags.DEFINE_list("solvers", list(_D.solvers), "Comma list of registered base solvers to wrap.")
_NFE = flags.DEFINE_list("nfe", [str(n) for n in _D.nfe], "Comma list of target NFEs (integers >= 2).")
_DAMPINGS = flags.DEFINE_list("dampings", [lib._fmt(d) for d in _D.dampings],
                              "Comma list of LML dampings lambda > 0; 'inf' is the plain Langevin move.")
_RANKS = flags.DEFINE_list("ranks", [str(r) for r in _D.ranks], "Comma list of LML ranks (integers >= 1).")
_WINDOWS = flags.DEFINE_list("windows", [f"{lib._fmt(a)}:{lib._fmt(b)}" for a, b in _D.windows],
                             "Comma list of sigma_min:sigma_max noise-level windows where LML acts.")
_REUSES = flags.DEFINE_list("reuses", list(_D.reuses), "Comma list from none, x0, eps: whether the predictor "
                            "reuses the move's model output (x0 or eps held fixed) instead of calling the model again.")
_KAPPA = flags.DEFINE_float("kappa", _D.kappa, "Weight decay over older outputs for rank > 1 (0..1).")
_SNR = flags.DEFINE_float("snr", _D.snr, "Langevin move size: step = 2 (snr sigma_t)^2.", lower_bound=0.0)
_DIM = flags.DEFINE_integer("dim", _D.dim, "GMM dimension.", lower_bound=1)
_BATCH = flags.DEFINE_integer("batch", _D.batch, "Samples per configuration.", lower_bound=2)
_SEED = flags.DEFINE_integer("seed", _D.seed, "PRNG seed.", lower_bound=0)


def _windows(values):
  out = []
  for v in values:
    parts = v.split(":")
    if len(parts) != 2:
      raise ValueError(f"--windows: {v!r} is not sigma_min:sigma_max")
    lo, hi = (float(p) for p in parts)
    if not 0 <= lo <= hi:
      raise ValueError(f"--windows: {v!r} needs 0 <= sigma_min <= sigma_max")
    out.append((lo, hi))
  return tuple(out)


def _reuses(values):
  for v in values:
    if v not in ("none", "x0", "eps"):
      raise ValueError(f"--reuses: {v!r} is not one of none, x0, eps")
  if not values:
    raise ValueError("--reuses is empty")
  return tuple(values)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  config = lib.Config(solvers=tuple(_SOLVERS.value), nfe=cli.numbers(_NFE.value, "nfe", int, minimum=2),
                      dampings=cli.numbers(_DAMPINGS.value, "dampings", float, minimum=0, exclusive=True), ranks=cli.numbers(_RANKS.value, "ranks", int, minimum=1),
                      windows=_windows(_WINDOWS.value), reuses=_reuses(_REUSES.value), kappa=_KAPPA.value, snr=_SNR.value, dim=_DIM.value,
                      batch=_BATCH.value, seed=_SEED.value)
  if not 0 <= config.kappa <= 1 or math.isnan(config.kappa):
    raise app.UsageError(f"--kappa={config.kappa} must lie in [0, 1]")
  lib.run(config, _WORKDIR.value)
  print(open(f"{_WORKDIR.value}/table.txt").read())


if __name__ == "__main__":
  app.run(main)

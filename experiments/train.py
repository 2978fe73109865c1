"""Trains a diffusion model (denoising score matching) into --workdir; resumes from its latest checkpoint.

  python -m experiments.train --config=experiments/configs/toy2d.py --workdir=/tmp/toy2d
  python -m experiments.train --config=experiments/configs/digits.py --config.train.steps=2000 --workdir=/tmp/digits

Outputs in --workdir: config.json, metrics.jsonl, checkpoints/<step>/, params/<step>/ (final EMA params);
a progress line per log step on stderr. SIGTERM saves a checkpoint and exits 0; rerun the same command
to resume (see experiments/train_lib.py).
"""
import json
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from experiments import train_lib

_CONFIG = config_flags.DEFINE_config_file("config", None, "A preset file of experiments/configs/ (get_config()); "
                                          "override keys with --config.<key>=<value>.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Output folder (created if missing); an existing one is resumed. "
                               "Required.", required=True)
flags.mark_flag_as_required("config")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO; --verbosity=0 brings it back
  result = train_lib.run(_CONFIG.value, _WORKDIR.value)
  sys.stdout.write(json.dumps(result) + "\n")


if __name__ == "__main__":
  app.run(main)

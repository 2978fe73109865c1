"""Toy preset: a small residual MLP on 2-D two moons, VP-linear eps prediction; trains in seconds on a CPU
(about 250 steps/s at batch 256 on 2 shared cores: the 2000 steps take ~15 s with startup).

  python -m experiments.train --config=experiments/configs/toy2d.py --workdir=/tmp/toy2d
"""
from experiments import train_lib


def get_config():
  config = train_lib.default_config()
  config.data.name = "two_moons"
  config.data.options = {"size": 50_000, "seed": 0, "noise": 0.05}
  config.data.batch_size = 256
  config.model.name = "mlp"
  config.model.kwargs = {"hidden": 128, "depth": 3, "embedding": "sinusoidal"}
  config.diffusion.schedule = "vp_linear"
  config.diffusion.prediction = "eps"
  config.diffusion.time_label = "t999"
  config.optim.learning_rate = 2e-3
  config.optim.warmup_steps = 100
  config.optim.decay = "cosine"
  config.ema.decay = 0.995
  config.train.steps = 2000
  config.train.log_every = 50
  config.train.checkpoint_every = 500
  return config

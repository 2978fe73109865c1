"""Digits preset: a small class-conditional U-Net (193k parameters) on the 8x8 scikit-learn digits (in
[-1, 1]), linear VP schedule, eps prediction, label dropout 0.1 for classifier-free guidance (Ho & Salimans 2022).

  python -m experiments.train --config=experiments/configs/digits.py --workdir=/tmp/digits \
      [--config.train.steps=2000]

Speed on a 2-core CPU: see the README (measured with this preset); the default run stays under 15 minutes.
"""
from experiments import train_lib


def get_config():
  config = train_lib.default_config()
  config.data.name = "digits"
  config.data.batch_size = 128
  config.model.name = "unet"
  config.model.kwargs = {"channels": 16, "channel_mult": (1, 2), "num_res_blocks": 1, "attention_levels": (-1,),
                         "num_heads": 1, "norm_groups": 8, "embedding": "sinusoidal"}
  config.diffusion.schedule = "vp_linear"
  config.diffusion.prediction = "eps"
  config.diffusion.time_label = "t999"
  config.diffusion.conditional = True
  config.diffusion.label_dropout = 0.1
  config.optim.learning_rate = 2e-3
  config.optim.warmup_steps = 200
  config.optim.decay = "cosine"
  config.ema.decay = 0.999
  config.train.steps = 6000
  config.train.log_every = 100
  config.train.checkpoint_every = 500
  return config

"""Digits preset: a small class-conditional U-Net on the 8x8 scikit-learn digits (in [-1, 1]), cosine VP
schedule, eps prediction, label dropout 0.1 for classifier-free guidance (Ho & Salimans 2022).

  python -m experiments.train --config=experiments/configs/digits.py --workdir=/tmp/digits \
      [--config.train.steps=2000]

Speed: about 4.6-4.9 steps/s on 2 shared CPU cores (batch 128, float32; ~15 s of compilation first), so
the default 6000 steps take about 20 minutes there.
"""
from experiments import train_lib


def get_config():
  config = train_lib.default_config()
  config.data.name = "digits"
  config.data.batch_size = 128
  config.model.name = "unet"
  config.model.kwargs = {"channels": 32, "channel_mult": (1, 2), "num_res_blocks": 1, "attention_levels": (-1,),
                         "num_heads": 1, "norm_groups": 8, "embedding": "sinusoidal"}
  config.diffusion.schedule = "vp_cosine"
  config.diffusion.prediction = "eps"
  config.diffusion.time_label = "t999"
  config.diffusion.conditional = True
  config.diffusion.label_dropout = 0.1
  config.optim.learning_rate = 1e-3
  config.optim.warmup_steps = 200
  config.optim.decay = "cosine"
  config.ema.decay = 0.999
  config.train.steps = 6000
  config.train.log_every = 100
  config.train.checkpoint_every = 500
  return config

"""Models: exact analytic oracles (``analytic``), Flax Linen networks (``mlp.MLP``, ``unet.UNet``, glue in
``nets``), training data (``data``), denoising score-matching training (``training``), orbax checkpoints
(``checkpoints``) and multi-device sharding (``sharding``)."""

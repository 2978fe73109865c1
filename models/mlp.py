"""A time- (and class-) conditioned residual MLP for low-dimensional data (2-D toys, GMMs, features).

Architecture: x -> Dense(hidden) -> ``depth`` pre-norm residual blocks -> LayerNorm - SiLU - Dense(D).
Each block is h + Dense0(SiLU(Dense(SiLU(LayerNorm(h))) + Dense(SiLU(emb)))), the conditioning vector
emb (``models.nets.ConditionEmbedding``: sinusoidal (Vaswani et al. 2017; Ho et al. 2020) or Gaussian
Fourier (Tancik et al. 2020; Song et al. 2021) time features through a small MLP, plus a class
embedding) added as a per-unit bias as in DDPM's residual blocks. Dense0 and the output layer start at
zero (as DDPM's last layers do), so each block starts as the identity and an untrained network
predicts exactly 0. Calling convention: ``models.nets``.
"""
from typing import Optional

import flax.linen as nn
import jax.numpy as jnp

from models import nets


class MLP(nn.Module):
  """``MLP(...).apply({"params": p}, x, label, cond)`` with x of shape (B, D); output (B, D).

  hidden: block width. depth: number of residual blocks. embedding: "sinusoidal" or "fourier" (see
  ``models.nets``). embedding_dim: width of the time features (default ``hidden``). num_classes: 0 for
  an unconditional net, else cond in [0, num_classes] with num_classes the null label.
  """
  hidden: int = 256
  depth: int = 4
  embedding: str = "sinusoidal"
  embedding_dim: Optional[int] = None
  num_classes: int = 0
  max_period: float = 10000.0
  fourier_scale: float = 16.0

  def __post_init__(self):
    nets.check_embedding(self.embedding)
    if self.hidden < 1 or self.depth < 0:
      raise ValueError(f"MLP needs hidden >= 1 and depth >= 0, got hidden={self.hidden}, depth={self.depth}")
    if self.num_classes < 0:
      raise ValueError(f"num_classes={self.num_classes}; need >= 0 (0 = unconditional)")
    super().__post_init__()

  @nn.compact
  def __call__(self, x, label, cond=None):
    x = jnp.asarray(x)
    if x.ndim != 2:
      raise ValueError(f"MLP takes x of shape (B, D), got shape {x.shape}")
    dtype = nets.compute_dtype(x)
    emb = nets.ConditionEmbedding(self.embedding_dim or self.hidden, self.hidden, self.embedding,
                                  self.num_classes, self.max_period, self.fourier_scale,
                                  name="condition")(label, cond, x.shape[0], dtype)
    emb = nn.silu(emb)
    h = nn.Dense(self.hidden, name="input")(x.astype(dtype))
    for i in range(self.depth):
      r = nn.silu(nn.LayerNorm(name=f"block{i}_norm")(h))
      r = nn.Dense(self.hidden, name=f"block{i}_dense")(r) + nn.Dense(self.hidden, name=f"block{i}_emb")(emb)
      r = nn.Dense(self.hidden, kernel_init=nn.initializers.zeros, name=f"block{i}_out")(nn.silu(r))
      h = h + r
    h = nn.silu(nn.LayerNorm(name="output_norm")(h))
    out = nn.Dense(x.shape[-1], kernel_init=nn.initializers.zeros, name="output")(h)
    return out.astype(x.dtype)

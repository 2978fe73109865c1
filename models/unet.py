"""A small DDPM++-style U-Net for images (NHWC), conditioned on the time label and optionally a class.

After DDPM (Ho et al. 2020) and DDPM++ / NCSN++ (Song et al. 2021, "Score-Based Generative Modeling
through SDEs"), scaled down for CPU training on small images:
- a 3x3 input conv, then ``len(channel_mult)`` levels; level i works at resolution (H / 2^i, W / 2^i)
  with ``channels * channel_mult[i]`` channels and ``num_res_blocks`` residual blocks, followed (except
  at the last level) by a 2x downsample (a stride-2 3x3 conv, or 2x2 average pooling);
- a middle of ResBlock - [attention] - ResBlock at the lowest resolution;
- a mirrored up path with ``num_res_blocks + 1`` blocks per level, each fed the concatenation of the
  running features and the matching down-path activation (the U-Net skip connections), and a 2x
  nearest-neighbour upsample + 3x3 conv between levels;
- GroupNorm - SiLU - 3x3 output conv, initialised to zero so an untrained network predicts exactly 0.
Residual blocks: GroupNorm - SiLU - conv3x3 - GroupNorm modulated by a per-channel (1 + scale, shift)
from a Dense of the conditioning vector (the scale-shift norm of Nichol & Dhariwal 2021 / the FiLM form
of DDPM's additive time injection) - SiLU - conv3x3 (zero-initialised, so a block starts as the
identity) - a 1x1 conv on the skip when the width changes, and the sum scaled by 1/sqrt(2) (DDPM++'s
``skip_rescale``). Self-attention blocks (GroupNorm, one Dense to q, k, v, multi-head dot-product
attention over the H*W positions, a zero-initialised output Dense, residual / sqrt(2)) follow every
residual block of the levels in ``attention_levels`` and sit in the middle when the lowest level is
among them. GroupNorm uses min(norm_groups, c) groups, which must divide every width c.

Spatial sizes: each of the ``len(channel_mult) - 1`` downsamples halves H and W exactly, so H and W must
be divisible by 2**(len(channel_mult) - 1): with the default two levels any even size (8x8 digits,
16x16, 28x28, 32x32); with three levels a multiple of 4 (8, 16, 28, 32); with four a multiple of 8.
Calling convention and time embeddings: ``models.nets``.
"""
import math
from typing import Optional, Tuple

import flax.linen as nn
import jax.numpy as jnp

from models import nets

DOWNSAMPLES = ("conv", "avg_pool")
_SQRT_HALF = 1.0 / math.sqrt(2.0)


class ResBlock(nn.Module):
  """GroupNorm-SiLU-conv twice with the time (and class) embedding as a scale / shift in between, plus a skip
  (1x1 conv when the channels change): the DDPM++ residual block (Song et al. 2021, score_sde)."""
  out_channels: int
  groups: int

  @nn.compact
  def __call__(self, x, emb):
    h = nn.silu(nn.GroupNorm(num_groups=min(self.groups, x.shape[-1]), name="norm0")(x))
    h = nn.Conv(self.out_channels, (3, 3), padding=1, name="conv0")(h)
    scale, shift = jnp.split(nn.Dense(2 * self.out_channels, name="emb")(emb)[:, None, None, :], 2, axis=-1)
    h = nn.GroupNorm(num_groups=min(self.groups, self.out_channels), name="norm1")(h) * (1 + scale) + shift
    h = nn.Conv(self.out_channels, (3, 3), padding=1, kernel_init=nn.initializers.zeros, name="conv1")(nn.silu(h))
    if x.shape[-1] != self.out_channels:
      x = nn.Conv(self.out_channels, (1, 1), name="skip")(x)
    return (x + h) * _SQRT_HALF


class Attention(nn.Module):
  """Multi-head self-attention over the pixels after a GroupNorm, added to the input (the DDPM U-Net's
  attention block, Ho et al. 2020)."""
  groups: int
  num_heads: int

  @nn.compact
  def __call__(self, x):
    b, height, width, c = x.shape
    h = nn.GroupNorm(num_groups=min(self.groups, c), name="norm")(x)
    qkv = nn.Dense(3 * c, name="qkv")(h).reshape(b, height * width, 3, self.num_heads, c // self.num_heads)
    h = nn.dot_product_attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2])
    h = nn.Dense(c, kernel_init=nn.initializers.zeros, name="out")(h.reshape(b, height, width, c))
    return (x + h) * _SQRT_HALF


class UNet(nn.Module):
  """``UNet(...).apply({"params": p}, x, label, cond)`` with x of shape (B, H, W, C); output x's shape.

  channels: width of level 0; level i has ``channels * channel_mult[i]``. num_res_blocks: residual
  blocks per level on the way down. attention_levels: levels (0 = full resolution; negative counts from
  the lowest, so the default (-1,) is the lowest resolution) with self-attention, () for none.
  num_heads: attention heads (must divide the widths attended). norm_groups: GroupNorm's group count
  cap. downsample: "conv" (stride-2 conv) or "avg_pool". embedding, embedding_dim (default
  4 * channels), max_period, fourier_scale: the time features (``models.nets``); the conditioning vector
  has width 4 * channels. num_classes: 0 for an unconditional net, else cond in [0, num_classes].

  The default (channels=16, channel_mult=(1, 2), one block per level, attention at 4x4 for 8x8 inputs)
  has 193k parameters (conditional: + 4 * channels per class and the null label) and is sized for CPU training on the 8x8 digits;
  channels=32 gives 755k parameters and about 4x the FLOPs.
  """
  channels: int = 16
  channel_mult: Tuple[int, ...] = (1, 2)
  num_res_blocks: int = 1
  attention_levels: Tuple[int, ...] = (-1,)
  num_heads: int = 1
  norm_groups: int = 8
  downsample: str = "conv"
  embedding: str = "sinusoidal"
  embedding_dim: Optional[int] = None
  num_classes: int = 0
  max_period: float = 10000.0
  fourier_scale: float = 16.0

  def __post_init__(self):
    # Lists would make the module unhashable (it is a static jit argument of a Denoiser): store tuples.
    for name in ("channel_mult", "attention_levels"):
      if isinstance(getattr(self, name), list):
        object.__setattr__(self, name, tuple(getattr(self, name)))
    nets.check_embedding(self.embedding)
    if self.downsample not in DOWNSAMPLES:
      raise ValueError(f"downsample {self.downsample!r} is unknown; valid: {', '.join(DOWNSAMPLES)}")
    if not self.channel_mult or min(self.channel_mult) < 1 or self.channels < 1:
      raise ValueError(f"UNet needs channels >= 1 and a non-empty channel_mult of positive ints, got "
                       f"channels={self.channels}, channel_mult={self.channel_mult}")
    if self.num_res_blocks < 1:
      raise ValueError(f"num_res_blocks={self.num_res_blocks}; need >= 1")
    if self.num_classes < 0:
      raise ValueError(f"num_classes={self.num_classes}; need >= 0 (0 = unconditional)")
    levels = len(self.channel_mult)
    for level in self.attention_levels:
      if not -levels <= level < levels:
        raise ValueError(f"attention_levels={self.attention_levels}: level {level} is out of range for "
                         f"{levels} levels (channel_mult={self.channel_mult}); valid: {-levels}..{levels - 1}")
    for i, mult in enumerate(self.channel_mult):
      width = self.channels * mult
      nets.group_count(width, self.norm_groups, f"UNet level {i} (channels={self.channels} x channel_mult={mult})")
      if i in self._attention() and width % self.num_heads:
        raise ValueError(f"UNet level {i}: {width} channels do not split into num_heads={self.num_heads} heads")
    super().__post_init__()

  def _attention(self):
    levels = len(self.channel_mult)
    return {level % levels for level in self.attention_levels}

  @nn.compact
  def __call__(self, x, label, cond=None):
    x = jnp.asarray(x)
    if x.ndim != 4:
      raise ValueError(f"UNet takes NHWC images of shape (B, H, W, C), got shape {x.shape}")
    levels = len(self.channel_mult)
    factor = 2 ** (levels - 1)
    if x.shape[1] % factor or x.shape[2] % factor:
      raise ValueError(f"UNet with {levels} levels (channel_mult={self.channel_mult}) halves the image "
                       f"{levels - 1} times: height and width must be divisible by {factor}, got "
                       f"{x.shape[1]}x{x.shape[2]}")
    dtype = nets.compute_dtype(x)
    attention = self._attention()
    emb = nets.ConditionEmbedding(self.embedding_dim or 4 * self.channels, 4 * self.channels, self.embedding,
                                  self.num_classes, self.max_period, self.fourier_scale,
                                  name="condition")(label, cond, x.shape[0], dtype)
    emb = nn.silu(emb)
    groups = self.norm_groups

    h = nn.Conv(self.channels, (3, 3), padding=1, name="input")(x.astype(dtype))
    skips = [h]
    for i, mult in enumerate(self.channel_mult):
      for j in range(self.num_res_blocks):
        h = ResBlock(self.channels * mult, groups, name=f"down{i}_res{j}")(h, emb)
        if i in attention:
          h = Attention(groups, self.num_heads, name=f"down{i}_attn{j}")(h)
        skips.append(h)
      if i < levels - 1:
        if self.downsample == "conv":
          h = nn.Conv(h.shape[-1], (3, 3), strides=(2, 2), padding=1, name=f"down{i}_downsample")(h)
        else:
          h = nn.avg_pool(h, (2, 2), strides=(2, 2))
        skips.append(h)

    h = ResBlock(h.shape[-1], groups, name="mid_res0")(h, emb)
    if levels - 1 in attention:
      h = Attention(groups, self.num_heads, name="mid_attn")(h)
    h = ResBlock(h.shape[-1], groups, name="mid_res1")(h, emb)

    for i in reversed(range(levels)):
      for j in range(self.num_res_blocks + 1):
        h = jnp.concatenate([h, skips.pop()], axis=-1)
        h = ResBlock(self.channels * self.channel_mult[i], groups, name=f"up{i}_res{j}")(h, emb)
        if i in attention:
          h = Attention(groups, self.num_heads, name=f"up{i}_attn{j}")(h)
      if i > 0:
        h = jnp.repeat(jnp.repeat(h, 2, axis=1), 2, axis=2)
        h = nn.Conv(h.shape[-1], (3, 3), padding=1, name=f"up{i}_upsample")(h)

    h = nn.silu(nn.GroupNorm(num_groups=min(groups, h.shape[-1]), name="output_norm")(h))
    out = nn.Conv(x.shape[-1], (3, 3), padding=1, kernel_init=nn.initializers.zeros, bias_init=nn.initializers.zeros,
                  name="output")(h)
    return out.astype(x.dtype)

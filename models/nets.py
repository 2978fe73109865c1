"""Shared pieces of the Flax networks (``models.mlp.MLP``, ``models.unet.UNet``) and their glue to the solvers.

Why Flax Linen: a Linen module is an immutable, hashable description of the architecture, and its
weights are a plain pytree (a nested dict of arrays) kept *outside* the module. That is exactly the
library's "the model is a value" design (DESIGN.md, property 6): ``denoiser(module, params)`` builds a
``solvers.Denoiser`` whose static ``apply_fn`` holds only the module (hashed into the jit cache key) and
whose ``params`` are ordinary pytree leaves of a jit argument, so new weights of the same shapes never
recompile the sampling loop, and ``jax.grad`` through ``solvers.sample`` w.r.t. the params just works.
(NNX modules carry their weights as object state and would have to be split back into exactly this
pair.) ``solvers/`` never imports Flax; only this package does.

The calling convention of every network here::

  out = module.apply({"params": params}, x, label, cond)

- ``x``: the noisy sample, (B, D) for the MLP, (B, H, W, C) NHWC for the U-Net; any float dtype. The
  computation runs in x's dtype promoted with float32 (float64 inputs under x64 compute in float64
  with the float32 weights promoted), and ``out`` has x's shape and dtype.
- ``label``: the time label (``Denoiser.time_label`` converts the schedule's t into it), a scalar
  (broadcast to the batch) or a (B,) array.
- ``cond``: ``None`` or integer class labels, scalar (broadcast) or (B,), in ``[0, num_classes]``; the
  value ``num_classes`` is the *null* label (``null_label``) used for the unconditional pass of
  classifier-free guidance and for label dropout in training. ``cond=None`` means the null label too.
  With ``num_classes == 0`` the network ignores ``cond``. Values are not checked in traced code: a
  label above ``num_classes`` gets a NaN embedding (``jnp.take``'s fill), so the output is NaN, and a
  negative one wraps around (-1 is the null label).
- The output is the raw prediction; what it means (eps, x0, v, velocity) is the Denoiser's
  ``prediction``. No mutable collections (LayerNorm / GroupNorm, no dropout): ``apply`` needs nothing
  but params and is deterministic. Initialise with ``module.init(key, x, label, cond)``.

Time embeddings (``EMBEDDINGS``):
- ``"sinusoidal"``: the Transformer position encoding (Vaswani et al. 2017) as DDPM uses it for the
  time step (Ho et al. 2020): [sin(label f_k), cos(label f_k)], f_k = max_period^(-k / (n/2 - 1)).
  Its frequencies span [1 / max_period, 1] radians per label unit, so it suits labels of order
  1..1000: train with ``time_label="t999"`` / ``"t1000"`` (or a DiscreteVP's index ``"t"``).
- ``"fourier"``: Gaussian random Fourier features (Tancik et al. 2020), as NCSN++ embeds log sigma
  (Song et al. 2021, "Score-Based Generative Modeling through SDEs"): [sin(2 pi label w_k),
  cos(2 pi label w_k)], w ~ N(0, fourier_scale^2). Here the w_k are not drawn from a PRNG but are the
  n/2 evenly spaced quantiles of |N(0, fourier_scale^2)| (the sign of w does not matter for a sin/cos
  pair): the same distribution, fixed forever, independent of the JAX version's random bits, and not
  a parameter (nothing for an optimiser or weight decay to touch). Suits labels of order 1
  (``"t"`` on [0, 1], ``"edm_c_noise"``, ``"lambda"`` / ``"rho"`` with a smaller ``fourier_scale``).
The features go through Dense - SiLU - Dense (DDPM); a learned class embedding (``num_classes + 1``
rows, the last for the null label) is added to the result (as in Dhariwal & Nichol 2021's ADM).
"""
import dataclasses
import math
import statistics
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from solvers.predictions import Denoiser

EMBEDDINGS = ("sinusoidal", "fourier")


def check_embedding(kind):
  """Raises a ValueError unless ``kind`` is one of ``EMBEDDINGS``."""
  if kind not in EMBEDDINGS:
    raise ValueError(f"embedding {kind!r} is unknown; valid: {', '.join(EMBEDDINGS)}")


def compute_dtype(x):
  """The dtype a network computes in for input x: x's dtype promoted with float32."""
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise ValueError(f"x has dtype {x.dtype}; a floating dtype is required")
  return jnp.promote_types(x.dtype, jnp.float32)


def sinusoidal_features(label, dim, max_period=10000.0):
  """(B, dim) Transformer / DDPM sinusoidal features of a (B,) label (zero-padded when dim is odd)."""
  half = dim // 2
  freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=label.dtype) / max(half - 1, 1))
  args = label[:, None] * freqs[None, :]
  feats = jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=-1)
  return jnp.pad(feats, ((0, 0), (0, dim - 2 * half)))


def fourier_frequencies(n, scale):
  """n fixed frequencies: the evenly spaced quantiles (k + 1/2) / n of |N(0, scale^2)| (half-normal)."""
  normal = statistics.NormalDist()
  return np.array([scale * normal.inv_cdf(0.5 + 0.5 * (k + 0.5) / n) for k in range(n)])


def fourier_features(label, dim, scale=16.0):
  """(B, dim) Gaussian Fourier features of a (B,) label, frequencies from ``fourier_frequencies``."""
  half = dim // 2
  w = jnp.asarray(fourier_frequencies(half, scale), label.dtype)
  args = 2.0 * jnp.pi * label[:, None] * w[None, :]
  feats = jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=-1)
  return jnp.pad(feats, ((0, 0), (0, dim - 2 * half)))


def batch_labels(label, cond, batch, num_classes, dtype):
  """Validates and broadcasts (label, cond) to (B,) arrays; cond None -> the null label."""
  label = jnp.asarray(label)
  if label.ndim == 0:
    label = jnp.broadcast_to(label, (batch,))
  if label.shape != (batch,):
    raise ValueError(f"label has shape {label.shape}; expected a scalar or shape ({batch},) for batch {batch}")
  label = label.astype(dtype)
  if num_classes == 0:
    return label, None
  if cond is None:
    cond = num_classes
  cond = jnp.asarray(cond)
  if not jnp.issubdtype(cond.dtype, jnp.integer):
    raise ValueError(f"cond has dtype {cond.dtype}; class labels must be integers in [0, {num_classes}] "
                     f"({num_classes} = the null label)")
  if cond.ndim == 0:
    cond = jnp.broadcast_to(cond, (batch,))
  if cond.shape != (batch,):
    raise ValueError(f"cond has shape {cond.shape}; expected a scalar or shape ({batch},) for batch {batch}")
  return label, cond


class ConditionEmbedding(nn.Module):
  """The (B, out_dim) conditioning vector of a network: time MLP(features(label)) + class embedding.

  ``features`` is the width of the sinusoidal / Fourier features, ``out_dim`` the output width.
  """
  features: int
  out_dim: int
  embedding: str = "sinusoidal"
  num_classes: int = 0
  max_period: float = 10000.0
  fourier_scale: float = 16.0

  def __post_init__(self):
    check_embedding(self.embedding)
    if self.features < 2:
      raise ValueError(f"embedding features={self.features}; need at least 2 (one sin/cos pair)")
    if self.num_classes < 0:
      raise ValueError(f"num_classes={self.num_classes}; need >= 0 (0 = unconditional)")
    super().__post_init__()

  @nn.compact
  def __call__(self, label, cond, batch, dtype):
    label, cond = batch_labels(label, cond, batch, self.num_classes, dtype)
    if self.embedding == "sinusoidal":
      feats = sinusoidal_features(label, self.features, self.max_period)
    else:
      feats = fourier_features(label, self.features, self.fourier_scale)
    emb = nn.Dense(self.out_dim, name="time_in")(feats)
    emb = nn.Dense(self.out_dim, name="time_out")(nn.silu(emb))
    if self.num_classes > 0:
      emb = emb + nn.Embed(self.num_classes + 1, self.out_dim, name="class_embed")(cond).astype(emb.dtype)
    return emb


def null_label(module, batch_size=None):
  """The unconditional class label of ``module`` (its ``num_classes``) as int32: a scalar, or a
  (batch_size,) array. Use it as ``Guided(uncond=...)`` and for label dropout in training."""
  num_classes = getattr(module, "num_classes", 0)
  if num_classes <= 0:
    raise ValueError(f"{type(module).__name__} has num_classes={num_classes}: it is unconditional and has no "
                     "null label; guidance needs a class-conditional network (num_classes > 0)")
  shape = () if batch_size is None else (batch_size,)
  return jnp.full(shape, num_classes, jnp.int32)


def count_params(params):
  """Number of scalars in a params pytree."""
  return sum(int(np.prod(jnp.shape(p))) for p in jax.tree_util.tree_leaves(params))


@dataclasses.dataclass(frozen=True)
class ModuleApply:
  """A Denoiser's ``apply_fn``: calls ``module.apply({"params": params}, x, label, cond)``.

  Frozen and hashable (Linen modules hash by their fields), so it is static in the jit cache key while
  the params stay traced leaves; two equal modules share one compilation."""
  module: Any

  def __call__(self, params, x, label, cond):
    return self.module.apply({"params": params}, x, label, cond)


def denoiser(module, params, *, prediction="eps", time_label="t", cond=None) -> Denoiser:
  """``module`` with ``params`` as a ``solvers.Denoiser`` (see the module docstring for the convention).

  ``prediction`` is what the network was trained to output, ``time_label`` the label convention it was
  trained with (``solvers.predictions.TIME_LABELS`` or a callable), ``cond`` its class labels (None:
  the null label of a class-conditional network). New params of the same shapes never recompile.
  """
  if not isinstance(module, nn.Module):
    raise ValueError(f"module must be a flax.linen.Module, got {type(module).__name__}")
  try:
    hash(module)
  except TypeError as err:
    raise ValueError(f"{type(module).__name__} is not hashable ({err}); give its fields hashable values "
                     "(tuples, not lists)") from err
  if isinstance(params, dict) and set(params) == {"params"}:
    raise ValueError("params is the variables dict {'params': ...} returned by module.init; pass "
                     "variables['params']")
  return Denoiser(apply_fn=ModuleApply(module), params=params, prediction=prediction, time_label=time_label,
                  cond=cond)


def group_count(channels, max_groups, where):
  """GroupNorm's group count for ``channels``: min(max_groups, channels), which must divide channels."""
  groups = min(max_groups, channels)
  if groups < 1 or channels % groups:
    raise ValueError(f"{where}: {channels} channels do not split into {groups} GroupNorm groups "
                     f"(norm_groups={max_groups}); choose channels divisible by min(norm_groups, channels)")
  return groups


__all__ = ["EMBEDDINGS", "ConditionEmbedding", "ModuleApply", "count_params", "denoiser", "null_label",
           "sinusoidal_features", "fourier_features", "fourier_frequencies", "group_count", "compute_dtype"]

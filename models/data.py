"""Training data as pure functions of explicit PRNG keys and seeds (no global random state).

- 2-D toys ``gmm2d``, ``checkerboard``, ``swiss_roll``, ``two_moons``: ``f(key, n, **options) -> (x, labels)``
  (jitted; n and the options static) with x (n, 2) float32 and labels (n,) int32 where a class is natural
  (the gmm2d component, the moon) or None. Each is standardised with constants derived from its own
  distribution (not from the draw): exactly mean 0 and mean per-coordinate variance 1, by one scalar scale
  so that shapes are not distorted (the per-axis stds differ from 1 where the shape is not round: two moons
  are wider than tall).
  ``gmm2d`` is an ``analytic.GMM`` (``ring_gmm``), so its exact denoiser is at hand as well.
- ``analytic_gmm_sample(oracle, key, n)``: samples of any ``models.analytic.GMM`` (x equals
  ``oracle.sample(key, n)``) with their component as the class.
- Images, NHWC float32 in [-1, 1] with int32 labels: scikit-learn's bundled 8x8 digits (no download) and
  MNIST / CIFAR-10 through tensorflow-datasets or Hugging Face ``datasets`` when one is installed
  (``load_remote``; otherwise an ImportError naming the pip command). Options ``resize`` (jax.image.resize,
  ``resize_method`` 'nearest' or 'bilinear') and then ``pad_to`` (centred zero-padding with the background
  value -1; the original block keeps its values).
- ``load(name, **options) -> Dataset``: the one entry point of training configs (names in ``NAMES``).
- ``batch(dataset, step, batch_size, seed) -> (x, labels)``: a deterministic, resumable stream, a pure
  function of (seed, step). The stream is the concatenation of one permutation of the dataset per epoch
  (epoch e is ``jax.random.permutation(fold_in(key(seed), e), N)``) and step s is its slice
  [s * batch_size, (s + 1) * batch_size): a batch may cross an epoch boundary, nothing is dropped, and
  every example appears exactly once in each epoch's N consecutive positions. So a training loop resumes
  bit-identically after a kill from its step alone. ``batch`` gathers on the host with numpy and memoises
  the epoch's permutation (a pure function, so results never depend on the memo): a step costs a gather.
  ``batch_indices`` computes the same indices jittably (step and seed may be traced) for a training step
  that gathers from a device-resident dataset.
"""
import functools
import inspect
import math
from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from models import analytic

RESIZE_METHODS = ("nearest", "bilinear")
SPLITS = ("train", "test")


class Dataset(NamedTuple):
  """A dataset held in host memory. ``x`` (N, ...) float32; ``labels`` (N,) int32 in
  [0, num_classes) or None (then num_classes == 0); ``oracle`` the exact ``analytic.GMM`` the data were
  drawn from ('gmm2d', 'analytic_gmm'), else None."""
  x: np.ndarray
  labels: Optional[np.ndarray]
  num_classes: int
  name: str
  oracle: Any = None

  @property
  def shape(self):
    """The shape of one example."""
    return self.x.shape[1:]

  @property
  def num_examples(self):
    """N, the number of examples."""
    return self.x.shape[0]


# ---------------------------------------------------------------- checks


def _int(name, value, minimum=None):
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
    raise ValueError(f"{name} must be an int, got {value!r}")
  if minimum is not None and value < minimum:
    raise ValueError(f"{name} must be >= {minimum}, got {value!r}")
  return int(value)


def _number(name, value, positive=False):
  """A finite real >= 0 (> 0 where ``positive``)."""
  if (isinstance(value, bool) or not isinstance(value, (int, float, np.number)) or not np.isfinite(value)
      or value < 0 or (positive and value == 0)):
    raise ValueError(f"{name} must be a finite number {'>' if positive else '>='} 0, got {value!r}")
  return float(value)


def _choice(name, value, allowed):
  if value not in allowed:
    raise ValueError(f"{name} must be one of {list(allowed)}, got {value!r}")
  return value


def _hw(name, value):
  """An image size option: an int (square) or a pair (height, width), each >= 1."""
  if isinstance(value, (tuple, list)) and len(value) == 2:
    return tuple(_int(name, v, 1) for v in value)
  if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
    size = _int(name, value, 1)
    return size, size
  raise ValueError(f"{name} must be an int or a pair (height, width), got {value!r}")


# ---------------------------------------------------------------- 2-D toys


def ring_gmm(num_components=8, std=0.1):
  """Equal-weight Gaussians on a circle of radius 1 with isotropic std ``std`` (in units of the radius),
  then centred and scaled to mean per-coordinate variance 1: an ``analytic.GMM`` in float32."""
  k = _int("num_components", num_components, 1)
  std = _number("std", std, positive=True)
  angles = 2 * np.pi * np.arange(k) / k
  means = np.stack([np.cos(angles), np.sin(angles)], axis=-1)
  means -= means.mean(axis=0)
  scale = 1.0 / np.sqrt(np.mean(np.sum(means**2, axis=-1)) / 2 + std**2)
  return analytic.GMM(weights=jnp.full((k,), 1.0 / k, jnp.float32),
                      means=jnp.asarray(means * scale, jnp.float32),
                      stds=jnp.full((k, 1), std * scale, jnp.float32))


@functools.partial(jax.jit, static_argnums=2)
def analytic_gmm_sample(oracle, key, n):
  """(x, component) for n draws of the ``analytic.GMM`` ``oracle``: x equals ``oracle.sample(key, n)``."""
  return oracle.sample(key, n, return_labels=True)


@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def gmm2d(key, n, num_components=8, std=0.1):
  """``num_components`` Gaussians on a circle (``ring_gmm``); labels: the component."""
  x, labels = analytic_gmm_sample(ring_gmm(num_components, std), key, n)
  return x.astype(jnp.float32), labels


@functools.partial(jax.jit, static_argnums=1)
def checkerboard(key, n):
  """Uniform on the 8 squares of a 4x4 board on [-2, 2]^2 whose (floor(x) + floor(y)) is even, times
  sqrt(3)/2 (each coordinate is uniform on [-2, 2], variance 4/3). No labels."""
  kx, ky, kr = jax.random.split(key, 3)
  x = jax.random.uniform(kx, (n,), jnp.float32, -2.0, 2.0)
  column = jnp.floor(x)
  row = 2.0 * jax.random.randint(kr, (n,), 0, 2).astype(jnp.float32) - 2.0 + jnp.mod(column, 2.0)
  y = row + jax.random.uniform(ky, (n,), jnp.float32)
  return jnp.stack([x, y], axis=-1) * np.float32(np.sqrt(3.0) / 2), None


_SWISS_T = (1.5 * np.pi, 4.5 * np.pi)


def _swiss_roll_moments(noise):
  """Exact mean (2,) and mean per-coordinate variance of (t cos t, t sin t) + noise, t uniform on
  _SWISS_T (Gauss-Legendre quadrature, exact to float64 round-off for these smooth integrands)."""
  nodes, weights = np.polynomial.legendre.leggauss(64)
  a, b = _SWISS_T
  t = (a + b) / 2 + (b - a) / 2 * nodes
  points = np.stack([t * np.cos(t), t * np.sin(t)], axis=-1)
  mean = 0.5 * weights @ points
  var = 0.5 * weights @ (points - mean)**2 + noise**2
  return mean, float(np.mean(var))


@functools.partial(jax.jit, static_argnums=(1, 2))
def swiss_roll(key, n, noise=0.5):
  """The 2-D Swiss roll (t cos t, t sin t), t uniform on [1.5 pi, 4.5 pi], plus Gaussian noise of std
  ``noise`` in those raw units (the arms are 2 pi apart), then standardised. No labels."""
  noise = _number("noise", noise)
  kt, kn = jax.random.split(key)
  a, b = _SWISS_T
  t = jax.random.uniform(kt, (n,), jnp.float32, a, b)
  raw = jnp.stack([t * jnp.cos(t), t * jnp.sin(t)], axis=-1)
  raw = raw + np.float32(noise) * jax.random.normal(kn, (n, 2), jnp.float32)
  mean, var = _swiss_roll_moments(noise)
  return (raw - mean.astype(np.float32)) * np.float32(1 / np.sqrt(var)), None


@functools.partial(jax.jit, static_argnums=(1, 2))
def two_moons(key, n, noise=0.05):
  """Two interleaved half circles of radius 1 (label 0: (cos a, sin a); label 1: (1 - cos a, 1/2 - sin a),
  a uniform on [0, pi], each label with probability 1/2) plus Gaussian noise of std ``noise`` in those
  units, then standardised (mean (1/2, 1/4) and variances known in closed form)."""
  noise = _number("noise", noise)
  kl, ka, kn = jax.random.split(key, 3)
  labels = jax.random.randint(kl, (n,), 0, 2, jnp.int32)
  angle = jax.random.uniform(ka, (n,), jnp.float32, 0.0, np.pi)
  upper = jnp.stack([jnp.cos(angle), jnp.sin(angle)], axis=-1)
  lower = jnp.stack([1.0 - jnp.cos(angle), 0.5 - jnp.sin(angle)], axis=-1)
  raw = jnp.where(labels[:, None] == 0, upper, lower)
  raw = raw + np.float32(noise) * jax.random.normal(kn, (n, 2), jnp.float32)
  var_x = 0.5 + 0.25
  var_y = 0.5 - 4 / np.pi**2 + (2 / np.pi - 0.25)**2
  scale = 1 / np.sqrt((var_x + var_y) / 2 + noise**2)
  return (raw - np.array([0.5, 0.25], np.float32)) * np.float32(scale), labels


# ---------------------------------------------------------------- images


def _format_images(images, max_value, resize=None, resize_method="bilinear", pad_to=None):
  """(N, H, W) or (N, H, W, C) values in [0, max_value] -> NHWC float32 in [-1, 1], resized then padded."""
  x = np.asarray(images, np.float32) * np.float32(2.0 / max_value) - np.float32(1.0)
  if x.ndim == 3:
    x = x[..., None]
  if resize is not None:
    height, width = _hw("resize", resize)
    method = _choice("resize_method", resize_method, RESIZE_METHODS)
    x = jax.image.resize(jnp.asarray(x), (x.shape[0], height, width, x.shape[3]), method)
    x = np.clip(np.asarray(x), -1.0, 1.0)
  if pad_to is not None:
    height, width = _hw("pad_to", pad_to)
    if height < x.shape[1] or width < x.shape[2]:
      raise ValueError(f"pad_to must be at least the image size {x.shape[1:3]}, got {pad_to!r}")
    top, left = (height - x.shape[1]) // 2, (width - x.shape[2]) // 2
    x = np.pad(x, ((0, 0), (top, height - x.shape[1] - top), (left, width - x.shape[2] - left), (0, 0)),
               constant_values=-1.0)
  return x


def _check_image_options(resize, resize_method, pad_to):
  if resize is not None:
    _hw("resize", resize)
  _choice("resize_method", resize_method, RESIZE_METHODS)
  if pad_to is not None:
    _hw("pad_to", pad_to)


# name -> (tensorflow-datasets name, Hugging Face repository, Hugging Face image column)
_REMOTE = {"mnist": ("mnist", "ylecun/mnist", "image"), "cifar10": ("cifar10", "uoft-cs/cifar10", "img")}


def load_remote(name, split="train", data_dir=None):
  """(images uint8 (N, H, W[, C]), labels (N,)) of 'mnist' or 'cifar10' via tensorflow-datasets, else
  Hugging Face ``datasets``; an ImportError naming the pip commands when neither is installed. Errors of
  an installed package (no network, say) are not masked."""
  tfds_name, hf_name, hf_column = _REMOTE[_choice("name", name, tuple(_REMOTE))]
  _choice("split", split, SPLITS)
  try:
    import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
  except ImportError:
    tfds = None
  if tfds is not None:
    images, labels = tfds.as_numpy(tfds.load(tfds_name, split=split, batch_size=-1, as_supervised=True,
                                             data_dir=data_dir))
    return np.asarray(images), np.asarray(labels)
  try:
    import datasets  # pylint: disable=import-outside-toplevel
  except ImportError:
    raise ImportError(
        f"dataset {name!r} is loaded through tensorflow-datasets or Hugging Face datasets, and neither is "
        "installed: run `pip install tensorflow tensorflow-datasets` or `pip install datasets pillow` "
        "(the digits dataset needs neither: load('digits'))") from None
  table = datasets.load_dataset(hf_name, split=split, cache_dir=data_dir).with_format("numpy")
  images = np.asarray(table[hf_column])
  if images.dtype == object:  # one array per image
    images = np.stack([np.asarray(image) for image in images])
  return images, np.asarray(table["label"])


# ---------------------------------------------------------------- the entry point


def _toy(name, sampler, num_classes, size, seed, oracle=None, **options):
  size = _int("size", size, 1)
  x, labels = sampler(jax.random.key(_int("seed", seed)), size, **options)
  return Dataset(x=np.asarray(x, np.float32), labels=None if labels is None else np.asarray(labels, np.int32),
                 num_classes=num_classes, name=name, oracle=oracle)


def _load_gmm2d(size=50_000, seed=0, num_components=8, std=0.1):
  oracle = ring_gmm(num_components, std)
  return _toy("gmm2d", gmm2d, int(num_components), size, seed, oracle=oracle, num_components=num_components,
              std=std)


def _load_checkerboard(size=50_000, seed=0):
  return _toy("checkerboard", checkerboard, 0, size, seed)


def _load_swiss_roll(size=50_000, seed=0, noise=0.5):
  return _toy("swiss_roll", swiss_roll, 0, size, seed, noise=noise)


def _load_two_moons(size=50_000, seed=0, noise=0.05):
  return _toy("two_moons", two_moons, 2, size, seed, noise=noise)


def _load_analytic_gmm(size=50_000, seed=0, dim=8, num_components=4, std=0.3, oracle_seed=0, dtype=None):
  """``analytic.gmm(dim, num_components, oracle_seed, std, dtype)`` (dtype None: analytic's default,
  float64 under jax_enable_x64), drawn with ``seed``; x in float32, the oracle in its own dtype."""
  oracle = analytic.gmm(_int("dim", dim, 1), _int("num_components", num_components, 1),
                        _int("oracle_seed", oracle_seed), _number("std", std, positive=True), dtype)
  return _toy("analytic_gmm", lambda key, n: analytic_gmm_sample(oracle, key, n), num_components, size,
              seed, oracle=oracle)


def _load_digits(pad_to=None, resize=None, resize_method="bilinear"):
  """scikit-learn's 1797 8x8 digits (values 0..16, bundled: no download), labels 0..9."""
  _check_image_options(resize, resize_method, pad_to)
  from sklearn.datasets import load_digits  # pylint: disable=import-outside-toplevel
  digits = load_digits()
  x = _format_images(digits.images, 16.0, resize, resize_method, pad_to)
  return Dataset(x=x, labels=digits.target.astype(np.int32), num_classes=10, name="digits")


def _remote_loader(name):
  def loader(split="train", data_dir=None, pad_to=None, resize=None, resize_method="bilinear"):
    _check_image_options(resize, resize_method, pad_to)
    images, labels = load_remote(name, split, data_dir)
    x = _format_images(images, 255.0, resize, resize_method, pad_to)
    return Dataset(x=x, labels=np.asarray(labels, np.int32), num_classes=10, name=name)
  return loader


_LOADERS = {
    "gmm2d": _load_gmm2d,
    "checkerboard": _load_checkerboard,
    "swiss_roll": _load_swiss_roll,
    "two_moons": _load_two_moons,
    "analytic_gmm": _load_analytic_gmm,
    "digits": _load_digits,
    "mnist": _remote_loader("mnist"),
    "cifar10": _remote_loader("cifar10"),
}
NAMES = tuple(_LOADERS)


def options(name):
  """The options of dataset ``name`` with their defaults."""
  if name not in _LOADERS:
    raise ValueError(f"unknown dataset {name!r}; the datasets are {list(NAMES)}")
  return {p.name: p.default for p in inspect.signature(_LOADERS[name]).parameters.values()}


def load(name, **opts):
  """The dataset ``name`` (one of ``NAMES``) with ``opts`` (see ``options(name)``): toys and
  'analytic_gmm' take ``size`` (default 50 000) and ``seed``; images take ``pad_to``, ``resize``,
  ``resize_method``, and 'mnist' / 'cifar10' also ``split`` and ``data_dir``. A ValueError names an
  unknown name, option or value."""
  allowed = options(name)
  unknown = sorted(set(opts) - set(allowed))
  if unknown:
    raise ValueError(f"dataset {name!r} has no option {', '.join(map(repr, unknown))}; "
                     f"its options are {list(allowed)}")
  return _LOADERS[name](**opts)


# ---------------------------------------------------------------- the batch stream


def num_batches_per_epoch(dataset, batch_size):
  """ceil(N / batch_size): the steps whose batches cover one epoch's N stream positions (the last of them
  may run into the next epoch, see ``batch``). ``dataset``: a Dataset or N."""
  n = dataset if isinstance(dataset, (int, np.integer)) else dataset.num_examples
  return -(-int(n) // _int("batch_size", batch_size, 1))


def _check_stream(num_examples, batch_size):
  n = _int("num_examples", num_examples, 1)
  b = _int("batch_size", batch_size, 1)
  if b > n:
    raise ValueError(f"batch_size must be at most the dataset size {n}, got {b}")
  return n, b


def _epoch_offset(n, b, step):
  """(epoch, offset in it) of stream position step * b, computed without forming step * b (Python ints or
  traced integers alike): every n / gcd(n, b) steps advance exactly b / gcd(n, b) epochs."""
  g = math.gcd(n, b)
  period, per = n // g, b // g
  cycle, rest = step // period, step % period
  return cycle * per + (rest * per) // period, ((rest * per) % period) * g


def epoch_permutation(num_examples, seed, epoch):
  """The order of epoch ``epoch`` of the stream: ``jax.random.permutation(fold_in(key(seed), epoch), N)``."""
  return jax.random.permutation(jax.random.fold_in(jax.random.key(seed), epoch), num_examples)


def batch_indices(num_examples, step, batch_size, seed):
  """Indices (batch_size,) int32 of stream positions [step * batch_size, (step + 1) * batch_size), where
  epoch e's N positions hold ``epoch_permutation(N, seed, e)``. Pure and jittable in ``step`` and
  ``seed`` (num_examples and batch_size static): for a training step that gathers from a device-resident
  dataset. Computes one permutation, two when the batch crosses an epoch boundary."""
  n, b = _check_stream(num_examples, batch_size)
  g = math.gcd(n, b)
  if (n // g - 1) * (b // g) >= 2**31:
    raise ValueError(f"batch_size {b} and dataset size {n} overflow batch_indices' int32 step arithmetic; "
                     "choose a batch_size sharing a larger factor with the size (or use batch)")
  epoch, offset = _epoch_offset(n, b, step)
  first = epoch_permutation(n, seed, epoch)
  second = jax.lax.cond(offset + b > n, lambda: epoch_permutation(n, seed, epoch + 1), lambda: first)
  position = offset + jnp.arange(b)
  return jnp.where(position < n, first[position % n], second[position % n]).astype(jnp.int32)


_jit_permutation = jax.jit(epoch_permutation, static_argnums=0)


@functools.lru_cache(maxsize=4)
def _host_permutation(n, seed, epoch):
  """A memo of ``epoch_permutation`` (a pure function, so this changes no result): consecutive steps of
  an epoch reuse one permutation instead of sorting N keys per step."""
  return np.asarray(_jit_permutation(n, seed, epoch)).astype(np.int32)


def batch(dataset, step, batch_size, seed=0):
  """(x, labels) of training step ``step``: a pure function of (seed, step), equal to gathering
  ``batch_indices(N, step, batch_size, seed)``. The stream crosses epoch boundaries: nothing is dropped,
  each example appears exactly once in each epoch's N positions. Host numpy (arrays of the dataset's
  kind; labels None where it has none); the epoch's permutation is memoised, so a step costs a gather."""
  n, b = _check_stream(dataset.num_examples, batch_size)
  seed = _int("seed", seed)
  epoch, offset = _epoch_offset(n, b, _int("step", step, 0))
  idx = _host_permutation(n, seed, epoch)[offset:offset + b]
  if offset + b > n:
    idx = np.concatenate([idx, _host_permutation(n, seed, epoch + 1)[:offset + b - n]])
  return dataset.x[idx], None if dataset.labels is None else dataset.labels[idx]

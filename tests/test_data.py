"""Training data (models/data.py): formats, standardisation, determinism, the resumable batch stream, the
image options, the optional MNIST / CIFAR-10 loaders (with stand-ins for their packages) and the errors."""
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models import analytic, data

TOYS = ("gmm2d", "checkerboard", "swiss_roll", "two_moons")
TOY_CLASSES = {"gmm2d": 8, "checkerboard": 0, "swiss_roll": 0, "two_moons": 2}
SIZE = 20_000


@pytest.fixture(scope="module")
def digits():
  return data.load("digits")


# ---------------------------------------------------------------- toys


@pytest.mark.parametrize("name", TOYS)
def test_toy_format_standardisation_and_determinism(name):
  ds = data.load(name, size=SIZE, seed=3)
  assert ds.name == name and ds.shape == (2,) and ds.num_examples == SIZE
  assert ds.x.dtype == np.float32 and np.all(np.isfinite(ds.x))
  assert ds.num_classes == TOY_CLASSES[name]
  if ds.num_classes:
    assert ds.labels.dtype == np.int32 and ds.labels.shape == (SIZE,)
    counts = np.bincount(ds.labels, minlength=ds.num_classes)
    assert len(counts) == ds.num_classes and counts.min() > 0.8 * SIZE / ds.num_classes
  else:
    assert ds.labels is None
  # Exactly mean 0 and mean per-coordinate variance 1 in distribution; a sample of 20 000 is within
  # ~4 standard errors of that, and the scalar scale keeps each axis' std near 1
  # (moons: 1.23, 0.70).
  np.testing.assert_allclose(ds.x.mean(0), 0.0, atol=0.05)
  assert abs(np.mean(ds.x.var(0)) - 1.0) < 0.05
  assert np.all((ds.x.std(0) > 0.6) & (ds.x.std(0) < 1.4))
  again = data.load(name, size=SIZE, seed=3)
  np.testing.assert_array_equal(again.x, ds.x)
  other = data.load(name, size=SIZE, seed=4)
  assert not np.allclose(other.x, ds.x)
  # load draws the toy's sampler, a pure function of the key.
  toy_options = {k: v for k, v in data.options(name).items() if k not in ("size", "seed")}
  x, labels = getattr(data, name)(jax.random.key(3), SIZE, **toy_options)
  assert x.shape == (SIZE, 2) and x.dtype == jnp.float32
  np.testing.assert_array_equal(np.asarray(x), ds.x)
  assert (labels is None) == (ds.labels is None)
  if labels is not None:
    np.testing.assert_array_equal(np.asarray(labels), ds.labels)


def test_checkerboard_occupies_the_even_squares():
  raw = data.load("checkerboard", size=SIZE, seed=3).x.astype(np.float64) * 2 / np.sqrt(3.0)  # [-2, 2]^2
  assert np.all(np.abs(raw) <= 2.0 + 1e-5)
  squares = np.floor(raw[:, 0]) + np.floor(raw[:, 1])
  inside = np.abs(raw - np.round(raw)).min(1) > 1e-4      # away from float32 rounding at the edges
  assert np.all(squares[inside] % 2 == 0)
  assert len(np.unique(np.floor(raw[inside]), axis=0)) == 8


def test_two_moons_labels_match_the_moons():
  x, labels = data.two_moons(jax.random.key(0), 2000, noise=0.0)
  scale = np.sqrt(((0.75 + 0.5 - 4 / np.pi**2 + (2 / np.pi - 0.25)**2) / 2))
  raw = np.asarray(x, np.float64) * scale + [0.5, 0.25]
  labels = np.asarray(labels)
  np.testing.assert_allclose(np.hypot(*raw[labels == 0].T), 1.0, atol=1e-5)
  np.testing.assert_allclose(np.hypot(raw[labels == 1, 0] - 1, raw[labels == 1, 1] - 0.5), 1.0, atol=1e-5)
  assert np.all(raw[labels == 0, 1] >= -1e-6) and np.all(raw[labels == 1, 1] <= 0.5 + 1e-6)


def test_gmm2d_oracle_and_labels():
  ds = data.load("gmm2d", size=2000, num_components=5, std=0.02)
  assert ds.num_classes == 5 and isinstance(ds.oracle, analytic.GMM)
  means = np.asarray(ds.oracle.means)
  # Points sit at their labelled component's mean (std 0.02 before scaling).
  assert np.max(np.linalg.norm(ds.x - means[ds.labels], axis=1)) < 0.2
  # The means lie on a circle and the mixture is standardised exactly.
  radii = np.linalg.norm(means, axis=1)
  np.testing.assert_allclose(radii, radii[0], rtol=1e-5)
  np.testing.assert_allclose(radii[0]**2 / 2 + float(ds.oracle.stds[0, 0])**2, 1.0, rtol=1e-5)


# ---------------------------------------------------------------- the analytic GMM as a dataset


def test_analytic_gmm_matches_the_oracle():
  ds = data.load("analytic_gmm", size=3000, seed=2, dim=5, num_components=3, std=0.01, oracle_seed=1)
  oracle = analytic.gmm(5, 3, 1, 0.01)
  assert ds.shape == (5,) and ds.x.dtype == np.float32 and ds.num_classes == 3
  assert ds.labels.dtype == np.int32 and set(np.unique(ds.labels)) == {0, 1, 2}
  np.testing.assert_array_equal(np.asarray(ds.oracle.means), np.asarray(oracle.means))
  # x is the oracle's own sample (same key), and each point is at its labelled component's mean.
  sample = jax.jit(lambda o, key: o.sample(key, 3000))(oracle, jax.random.key(2))
  np.testing.assert_array_equal(ds.x, np.asarray(sample, np.float32))
  assert np.max(np.abs(ds.x - np.asarray(oracle.means)[ds.labels])) < 0.1
  np.testing.assert_allclose(np.bincount(ds.labels) / 3000, np.asarray(oracle.weights), atol=0.04)


# ---------------------------------------------------------------- images


def test_digits_format(digits):
  assert digits.x.shape == (1797, 8, 8, 1) and digits.shape == (8, 8, 1) and digits.x.dtype == np.float32
  assert digits.x.min() == -1.0 and digits.x.max() == 1.0
  # Values 0..16 map to -1 + v / 8 exactly.
  np.testing.assert_array_equal(np.unique((digits.x + 1) * 8), np.arange(17))
  assert digits.labels.dtype == np.int32 and set(np.unique(digits.labels)) == set(range(10))
  assert digits.num_classes == 10 and digits.oracle is None


@pytest.mark.parametrize("pad_to, before", [(16, 4), (32, 12), ((9, 11), (0, 1))])
def test_padding_keeps_the_block_and_fills_the_background(digits, pad_to, before):
  padded = data.load("digits", pad_to=pad_to)
  height, width = (pad_to, pad_to) if isinstance(pad_to, int) else pad_to
  top, left = (before, before) if isinstance(before, int) else before
  assert padded.x.shape == (1797, height, width, 1) and padded.x.dtype == np.float32
  np.testing.assert_array_equal(padded.x[:, top:top + 8, left:left + 8], digits.x)
  mask = np.ones((height, width), bool)
  mask[top:top + 8, left:left + 8] = False
  assert np.all(padded.x[:, mask] == -1.0)
  np.testing.assert_array_equal(padded.labels, digits.labels)


def test_resize(digits):
  nearest = data.load("digits", resize=16, resize_method="nearest")
  assert nearest.x.shape == (1797, 16, 16, 1)
  # Nearest upsampling by 2 repeats each pixel in a 2x2 block.
  np.testing.assert_array_equal(nearest.x, digits.x.repeat(2, axis=1).repeat(2, axis=2))
  smooth = data.load("digits", resize=12, pad_to=16)
  assert smooth.x.shape == (1797, 16, 16, 1) and smooth.x.dtype == np.float32
  assert smooth.x.min() >= -1.0 and smooth.x.max() <= 1.0
  assert len(np.unique(smooth.x)) > 17           # interpolated values
  assert np.all(smooth.x[:, :2] == -1.0) and np.all(smooth.x[:, :, 14:] == -1.0)


# ---------------------------------------------------------------- MNIST / CIFAR-10


@pytest.mark.parametrize("name", ["mnist", "cifar10"])
def test_missing_packages_say_what_to_install(monkeypatch, name):
  monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)   # `import` of a None entry fails
  monkeypatch.setitem(sys.modules, "datasets", None)
  with pytest.raises(ImportError, match=rf"{name}.*pip install tensorflow tensorflow-datasets.*"
                                        r"pip install datasets"):
    data.load(name)


def _fake_images(rng, n, shape):
  return rng.integers(0, 256, (n,) + shape, dtype=np.uint8), rng.integers(0, 10, n)


@pytest.mark.parametrize("name, shape", [("mnist", (28, 28, 1)), ("cifar10", (32, 32, 3))])
def test_tfds_path(monkeypatch, name, shape):
  images, labels = _fake_images(np.random.default_rng(0), 6, shape)
  calls = []

  def fake_load(dataset, split, batch_size, as_supervised, data_dir):
    calls.append((dataset, split, batch_size, as_supervised, data_dir))
    return images, labels

  monkeypatch.setitem(sys.modules, "tensorflow_datasets", types.SimpleNamespace(load=fake_load,
                                                                                as_numpy=lambda t: t))
  ds = data.load(name, split="test", data_dir="/somewhere", pad_to=36)
  assert calls == [(name, "test", -1, True, "/somewhere")]
  assert ds.x.shape == (6, 36, 36, shape[2]) and ds.x.dtype == np.float32 and ds.name == name
  top = (36 - shape[0]) // 2                       # 4 for MNIST, 2 for CIFAR-10
  np.testing.assert_allclose(ds.x[:, top:top + shape[0], top:top + shape[1]],
                             images.reshape((6,) + shape) / 127.5 - 1.0, atol=1e-6)
  assert ds.x.min() >= -1.0 and ds.x.max() <= 1.0
  assert ds.labels.dtype == np.int32 and ds.num_classes == 10
  np.testing.assert_array_equal(ds.labels, labels)


def test_hugging_face_path(monkeypatch):
  images, labels = _fake_images(np.random.default_rng(1), 5, (28, 28))
  calls = []

  class Table:
    def with_format(self, kind):
      assert kind == "numpy"
      return {"image": np.array(list(images) + [None], dtype=object)[:-1], "label": labels}

  def load_dataset(repo, split, cache_dir):
    calls.append((repo, split, cache_dir))
    return Table()

  monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)
  monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
  ds = data.load("mnist")
  assert calls == [("ylecun/mnist", "train", None)]
  assert ds.x.shape == (5, 28, 28, 1) and ds.x.dtype == np.float32
  np.testing.assert_allclose(ds.x[..., 0], images / 127.5 - 1.0, atol=1e-6)
  np.testing.assert_array_equal(ds.labels, labels)


# ---------------------------------------------------------------- the batch stream


@pytest.mark.parametrize("batch_size", [64, 100, 1797])
def test_stream_covers_each_epoch_exactly_once(digits, batch_size):
  n = digits.num_examples
  steps = 3 * data.num_batches_per_epoch(digits, batch_size) + 1
  assert data.num_batches_per_epoch(n, batch_size) == -(-n // batch_size)
  xs, ls = zip(*(data.batch(digits, s, batch_size, seed=5) for s in range(steps)))
  assert all(x.shape == (batch_size, 8, 8, 1) and x.dtype == np.float32 for x in xs)
  # Recover the example indices from the labels' positions: use a dataset whose x is its index.
  index_ds = data.Dataset(x=np.arange(n), labels=None, num_classes=0, name="index")
  stream = np.concatenate([data.batch(index_ds, s, batch_size, seed=5)[0] for s in range(steps)])
  np.testing.assert_array_equal(np.concatenate(xs), digits.x[stream])
  np.testing.assert_array_equal(np.concatenate(ls), digits.labels[stream])
  orders = [stream[e * n:(e + 1) * n] for e in range(3)]
  for order in orders:
    np.testing.assert_array_equal(np.sort(order), np.arange(n))        # each example once per epoch
  assert not np.array_equal(orders[0], orders[1])                        # reshuffled every epoch
  np.testing.assert_array_equal(orders[1], np.asarray(data.epoch_permutation(n, 5, 1)))


def test_stream_is_a_pure_function_of_seed_and_step():
  ds = data.load("two_moons", size=1000, seed=0)
  late = data.batch(ds, 12_345, 96, seed=1)      # computed first: no dependence on earlier calls
  for s in range(5):
    data.batch(ds, s, 96, seed=1)
  data.batch(ds, 7, 96, seed=2)
  again = data.batch(ds, 12_345, 96, seed=1)
  np.testing.assert_array_equal(late[0], again[0])
  np.testing.assert_array_equal(late[1], again[1])
  assert not np.array_equal(data.batch(ds, 12_345, 96, seed=2)[0], late[0])
  assert not np.array_equal(data.batch(ds, 12_346, 96, seed=1)[0], late[0])


def test_batch_indices_jitted_agree_with_batch():
  n, b = 1000, 96
  index_ds = data.Dataset(x=np.arange(n), labels=None, num_classes=0, name="index")
  indices = jax.jit(data.batch_indices, static_argnums=(0, 2))
  for step in (0, 10, 11, 12_345, 2**31 // b + 17):     # 10 crosses the first epoch boundary
    got = np.asarray(indices(n, jnp.asarray(step, jnp.int32), b, jnp.asarray(3)))   # int32: no overflow
    assert got.dtype == np.int32
    np.testing.assert_array_equal(got, data.batch(index_ds, step, b, seed=3)[0])
    epoch, offset = divmod(step * b, n)           # the exact epoch and offset, in Python ints
    assert data._epoch_offset(n, b, step) == (epoch, offset)


# ---------------------------------------------------------------- errors


@pytest.mark.parametrize("call, match", [
    (lambda: data.load("mnst"), r"'mnst'.*digits.*cifar10"),
    (lambda: data.load("digits", pad=16), r"'pad'.*pad_to.*resize"),
    (lambda: data.load("gmm2d", dim=3), r"'dim'.*num_components"),
    (lambda: data.load("digits", pad_to=6), r"pad_to.*\(8, 8\).*6"),
    (lambda: data.load("digits", pad_to=(16, 16, 1)), r"pad_to.*pair"),
    (lambda: data.load("digits", resize=0), r"resize.*>= 1.*0"),
    (lambda: data.load("digits", resize=16, resize_method="lanczos3"), r"resize_method.*nearest.*lanczos3"),
    (lambda: data.load("mnist", split="validation"), r"split.*train.*test.*validation"),
    (lambda: data.load("two_moons", size=0), r"size.*0"),
    (lambda: data.load("checkerboard", size=10.5), r"size.*int.*10.5"),
    (lambda: data.load("swiss_roll", noise=-1.0), r"noise.*-1.0"),
    (lambda: data.load("gmm2d", std=0.0), r"std.*> 0"),
    (lambda: data.load("analytic_gmm", dim=0), r"dim.*0"),
    (lambda: data.options("nope"), r"'nope'"),
    (lambda: data.batch(data.load("two_moons", size=10), 0, 11), r"batch_size.*10.*11"),
    (lambda: data.batch(data.load("two_moons", size=10), -1, 2), r"step.*-1"),
    (lambda: data.batch(data.load("two_moons", size=10), 0, 2, seed=1.5), r"seed.*1.5"),
])
def test_bad_input_raises_value_error(call, match):
  with pytest.raises(ValueError, match=match):
    call()

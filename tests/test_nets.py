"""The Flax networks (models.mlp.MLP, models.unet.UNet) and their glue (models.nets): the calling
convention, zero output at init, conditioning, no recompilation for new params, gradients through the
sampler, guidance, and errors naming the bad value. Small widths so the file runs in seconds."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import solvers
from solvers import grids, loop, schedules
from models import nets
from models.mlp import MLP
from models.unet import UNet

B = 3


def small_mlp(**kw):
  return MLP(**{"hidden": 16, "depth": 2, "embedding_dim": 8, **kw})


def small_unet(**kw):
  return UNet(**{"channels": 8, "channel_mult": (1, 2), "norm_groups": 4, **kw})


CASES = {
    "mlp": (small_mlp, (B, 2)),
    "unet8x8x1": (small_unet, (B, 8, 8, 1)),
    "unet16x16x3": (small_unet, (B, 16, 16, 3)),
}


def example(module, shape, dtype=jnp.float32, seed=0):
  x = jnp.asarray(np.random.default_rng(seed).normal(size=shape), dtype)
  cond = jnp.zeros((shape[0],), jnp.int32) if module.num_classes else None
  return x, jnp.zeros((shape[0],)), cond


@functools.lru_cache(maxsize=None)
def real_init(module, shape):
  """(output at init, params) of module.init_with_output on ``example`` (jitted; the RngBitGenerator key
  only because it compiles faster than threefry)."""
  out, variables = jax.jit(module.init_with_output)(jax.random.key(0, impl="unsafe_rbg"), *example(module, shape))
  return out, variables["params"]


def random_params(module, shape, seed=0):
  """Params of init's structure drawn at random (numpy, so nothing compiles): kernels N(0, 1 / fan_in),
  biases and embeddings N(0, 0.1^2), norm scales 1 + N(0, 0.1^2). A network far from its zero init."""
  rng = np.random.default_rng(seed)
  shapes = jax.eval_shape(module.init, jax.random.key(0), *example(module, shape))["params"]

  def draw(path, leaf):
    name = jax.tree_util.keystr(path[-1:])
    z = rng.normal(size=leaf.shape)
    if "kernel" in name:
      z = z / np.sqrt(np.prod(leaf.shape[:-1]))
    elif "scale" in name:
      z = 1.0 + 0.1 * z
    else:
      z = 0.1 * z if "bias" in name else z
    return jnp.asarray(z, leaf.dtype)

  return jax.tree_util.tree_map_with_path(draw, shapes)


def perturb(params, seed=0, scale=0.1):
  rng = np.random.default_rng(seed)
  return jax.tree_util.tree_map(lambda p: p + jnp.asarray(scale * rng.normal(size=p.shape), p.dtype), params)


@functools.lru_cache(maxsize=None)
def jitted_apply(module):
  """One compiled apply for (B,) labels and (B,) class labels (a U-Net runs op by op very slowly in eager
  mode: every op compiles on first use); the scalar / None conventions are checked on the MLP."""
  if module.num_classes:
    return jax.jit(lambda p, x, label, cond: module.apply({"params": p}, x, label, cond))
  return jax.jit(lambda p, x, label, cond=None: module.apply({"params": p}, x, label, None))


def full(value, dtype=jnp.float32):
  return jnp.full((B,), value, dtype)


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("num_classes", [0, 4])
def test_shape_and_dtype(case, num_classes):
  make, shape = CASES[case]
  module = make(num_classes=num_classes)
  params = random_params(module, shape)
  conds = [None] if num_classes == 0 else [None, jnp.int32(1), jnp.arange(B, dtype=jnp.int32) % (num_classes + 1)]
  labels = (0.5, jnp.linspace(0.1, 0.9, B), jnp.linspace(0.1, 0.9, B, dtype=jnp.float32))  # f64 and f32 labels
  for dtype in (jnp.float32, jnp.float64):
    x = example(module, shape, dtype)[0]
    for label, cond in zip(labels, conds * 3):  # (trace only: jax.eval_shape compiles nothing)
      out = jax.eval_shape(lambda p, x, label: module.apply({"params": p}, x, label, cond), params, x, label)
      assert out.shape == x.shape and out.dtype == dtype
  if num_classes and case != "unet8x8x1":  # values (unet8x8x1's: in the tests below): finite, nonzero
    x = example(module, shape, jnp.float32)[0]
    out = jitted_apply(module)(params, x, jnp.linspace(0.1, 0.9, B, dtype=jnp.float32), conds[-1])
    assert out.shape == x.shape and out.dtype == x.dtype
    assert np.all(np.isfinite(out)) and float(jnp.abs(out).max()) > 1e-3


@pytest.mark.parametrize("case,num_classes", [("mlp", 4), ("unet8x8x1", 4)])
def test_zero_output_at_init(case, num_classes):
  make, shape = CASES[case]
  module = make(num_classes=num_classes)
  out, params = real_init(module, shape)
  assert out.shape == shape and out.dtype == jnp.float32 and np.all(np.asarray(out) == 0.0)
  apply = jitted_apply(module)
  cond = jnp.arange(B, dtype=jnp.int32)
  # Only the zero output layer makes it 0: perturbed, the same params give a nonzero output.
  out = apply(perturb(params), example(module, shape)[0], jnp.linspace(0.1, 0.9, B, dtype=jnp.float32), cond)
  assert float(jnp.abs(out).max()) > 1e-3


# (The embedding is shared code, models.nets.ConditionEmbedding: "fourier" on the MLP only, for speed.)
@pytest.mark.parametrize("case,embedding", [("mlp", "sinusoidal"), ("mlp", "fourier"), ("unet8x8x1", "sinusoidal")])
def test_output_depends_on_label_and_class(case, embedding):
  make, shape = CASES[case]
  module = make(num_classes=4, embedding=embedding)
  params, x = random_params(module, shape, seed=1), example(module, shape)[0]
  apply = jitted_apply(module)
  label = 0.3 if embedding == "fourier" else 300.0
  null = nets.null_label(module)
  assert int(null) == 4
  zeros, ones = full(0, jnp.int32), full(1, jnp.int32)
  base = apply(params, x, full(label), zeros)
  other_time = apply(params, x, full(2 * label), zeros)
  other_class = apply(params, x, full(label), ones)
  null_out = apply(params, x, full(label), nets.null_label(module, B))
  for different in (other_time, other_class, null_out):
    assert float(jnp.abs(different - base).max()) > 1e-4
  assert float(jnp.abs(null_out - other_class).max()) > 1e-4
  # Per-sample labels and classes act per sample.
  mixed = apply(params, x, jnp.array([label, 2 * label, label], jnp.float32), jnp.array([0, 0, 1], jnp.int32))
  for row, ref in enumerate((base, other_time, other_class)):
    np.testing.assert_allclose(mixed[row], ref[row], rtol=1e-5, atol=1e-6)
  if case == "mlp":  # scalars broadcast; cond=None is the null label
    eager = lambda label, cond: module.apply({"params": params}, x, label, cond)
    np.testing.assert_allclose(eager(label, jnp.int32(1)), other_class, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(eager(label, None), null_out, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(eager(label, null), null_out, rtol=1e-6, atol=1e-6)


def test_unconditional_module_ignores_cond():
  module = small_mlp()
  params, x = random_params(module, (B, 2)), example(module, (B, 2))[0]
  a = module.apply({"params": params}, x, 0.5, None)
  b = module.apply({"params": params}, x, 0.5, jnp.arange(B, dtype=jnp.int32))
  np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("case", ["mlp", "unet8x8x1"])
def test_denoiser_samples_without_retracing_for_new_params(case):
  make, shape = CASES[case]
  module = make(num_classes=4)
  params, x_T = real_init(module, shape)[1], example(module, shape)[0]
  cond = jnp.arange(B, dtype=jnp.int32)
  schedule = schedules.VPLinear()
  grid = grids.uniform_logsnr(schedule, 5)
  den = nets.denoiser(module, params, prediction="eps", time_label="t999", cond=cond)
  first = solvers.sample("ddim", den, schedule, grid, x_T)
  # Zero output = zero eps: DDIM then scales x_T by alpha(t_end) / alpha(t_start).
  ratio = float(grid.alpha[grid.num_steps] / grid.alpha[0])
  np.testing.assert_allclose(first.x, ratio * x_T, rtol=1e-5)
  count = loop.trace_count()
  # New params of the same shapes, new labels, and an equal but freshly built module: no retrace.
  den2 = nets.denoiser(make(num_classes=4), perturb(params), prediction="eps", time_label="t999", cond=cond[::-1])
  second = solvers.sample("ddim", den2, schedule, grid, x_T)
  assert loop.trace_count() == count
  assert second.x.shape == x_T.shape and second.x.dtype == x_T.dtype and np.all(np.isfinite(second.x))
  assert float(jnp.abs(second.x - first.x).max()) > 1e-4


def test_grad_through_sampler_wrt_params():
  module = small_mlp(num_classes=2)
  params, x_T = random_params(module, (B, 2)), example(module, (B, 2))[0]
  schedule = schedules.VPLinear()
  grid = grids.uniform_logsnr(schedule, 3)
  cond = jnp.array([0, 1, 2], jnp.int32)

  def loss(p):
    den = nets.denoiser(module, p, prediction="eps", time_label="t999", cond=cond)
    return jnp.sum(solvers.sample("ddim", den, schedule, grid, x_T).x ** 2)

  grads = jax.grad(loss)(params)
  leaves = jax.tree_util.tree_leaves(grads)
  assert all(np.all(np.isfinite(g)) for g in leaves)
  assert float(jnp.abs(grads["output"]["kernel"]).max()) > 0
  assert float(jnp.abs(grads["condition"]["class_embed"]["embedding"]).max()) > 0
  assert nets.count_params(grads) == nets.count_params(params)


def test_guided_runs_and_interpolates():
  module = small_mlp(num_classes=3)
  params, x_T = random_params(module, (2, 2)), example(module, (2, 2))[0]
  schedule = schedules.VPLinear()
  grid = grids.uniform_logsnr(schedule, 3)
  cond, null = jnp.array([0, 2], jnp.int32), nets.null_label(module, 2)
  den = nets.denoiser(module, params, time_label="t999")
  run = lambda d: solvers.sample("ddim", d, schedule, grid, x_T).x
  guided = lambda scale: run(solvers.Guided(inner=den, cond=cond, uncond=null, scale=scale))
  out = guided(2.0)
  assert out.shape == x_T.shape and np.all(np.isfinite(out))
  # scale 1 is the conditional model, scale 0 the unconditional one (scale is a leaf: one compilation).
  cond_only = run(den.replace(cond=cond))
  np.testing.assert_allclose(guided(1.0), cond_only, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(guided(0.0), run(den.replace(cond=null)), rtol=1e-5, atol=1e-5)
  assert float(jnp.abs(out - cond_only).max()) > 1e-5


def test_count_params_and_fourier_frequencies():
  module = MLP(hidden=4, depth=1, embedding_dim=6, num_classes=2)
  params = real_init(module, (2, 3))[1]
  # condition: 6*4+4 + 4*4+4 + 3*4; input 3*4+4; block: LN 8, 3 Dense 3*(16+4); output LN 8 + 4*3+3.
  assert nets.count_params(params) == (28 + 20 + 12) + 16 + (8 + 60) + (8 + 15)
  w = nets.fourier_frequencies(1001, 2.0)
  assert np.all(w > 0) and np.all(np.diff(w) > 0)
  np.testing.assert_allclose(np.median(w), 2.0 * 0.6744897501960817, rtol=1e-3)  # half-normal median


def _raises(match, fn):
  with pytest.raises(ValueError, match=match):
    fn()


def test_bad_input_names_the_value():
  x8 = jnp.zeros((2, 8, 8, 1))
  _raises("divisible by 4, got 6x6", lambda: UNet(channel_mult=(1, 2, 2)).init(jax.random.key(0), jnp.zeros((1, 6, 6, 1)), 0.0))
  _raises("12 channels do not split into 8", lambda: UNet(channels=12))
  _raises("'gaussian' is unknown; valid: sinusoidal, fourier", lambda: MLP(embedding="gaussian"))
  _raises("'gaussian' is unknown", lambda: UNet(embedding="gaussian"))
  _raises("'max_pool' is unknown", lambda: UNet(downsample="max_pool"))
  _raises("level 2 is out of range", lambda: UNet(attention_levels=(2,)))
  _raises("num_heads=3", lambda: UNet(num_heads=3))
  _raises(r"shape \(B, D\), got shape \(2, 8, 8, 1\)", lambda: small_mlp().init(jax.random.key(0), x8, 0.0))
  _raises(r"got shape \(2, 3\)", lambda: small_unet().init(jax.random.key(0), jnp.zeros((2, 3)), 0.0))
  _raises(r"label has shape \(3,\)", lambda: small_mlp().init(jax.random.key(0), jnp.zeros((2, 2)), jnp.zeros(3)))
  _raises("cond has dtype float", lambda: small_mlp(num_classes=2).init(jax.random.key(0), jnp.zeros((2, 2)), 0.0,
                                                                         jnp.zeros(2)))
  _raises("x has dtype int", lambda: small_mlp().init(jax.random.key(0), jnp.zeros((2, 2), jnp.int32), 0.0))
  _raises("num_classes=0: it is unconditional", lambda: nets.null_label(small_mlp()))
  params = random_params(small_mlp(), (2, 2))
  _raises("pass variables\\['params'\\]", lambda: nets.denoiser(small_mlp(), {"params": params}))
  _raises("time_label 'sigma' is unknown", lambda: nets.denoiser(small_mlp(), params, time_label="sigma"))
  # A list field is stored as a tuple, so the module stays hashable (a static jit argument).
  assert hash(UNet(channel_mult=[1, 2])) == hash(UNet(channel_mult=(1, 2)))

"""models.training: the loss's target is right for every schedule and prediction kind (the exact oracle
scores ~0), t sampling, label dropout statistics, the learning-rate schedule, EMA math, the train step
(metrics, dtypes, determinism), and a tiny network learning a 2-D mixture.

The networks here are a tiny Flax Linen module defined in this file (the training core does not depend
on models.mlp / models.unet). Tests run with x64 enabled (conftest): training must still be float32.
"""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models import analytic, training
from solvers import schedules
from solvers.predictions import PREDICTION_KINDS, Denoiser

SCHEDULES = {
    "vp_linear": schedules.VPLinear(),
    "vp_cosine": schedules.VPCosine(),
    "discrete_vp": schedules.DiscreteVP.named("linear", 1000),
    "ve": schedules.VE(),
    "edm": schedules.EDM(),
    "flow": schedules.Flow(),
}


class Tiny(nn.Module):
  """x (B, D), label (B,) or scalar, cond None or (B,) int: a 2-layer MLP on [x, features(label), class]."""
  hidden: int = 64
  num_classes: int = 0

  @nn.compact
  def __call__(self, x, label, cond=None):
    label = jnp.broadcast_to(jnp.asarray(label, x.dtype), x.shape[:1])
    feats = jnp.stack([jnp.sin(label * f) for f in (1.0, 3.0, 9.0)] +
                      [jnp.cos(label * f) for f in (1.0, 3.0, 9.0)], -1)
    h = jnp.concatenate([x, feats], -1)
    h = nn.Dense(self.hidden)(h)
    if self.num_classes:
      h = h + nn.Embed(self.num_classes + 1, self.hidden)(cond)
    h = nn.Dense(self.hidden)(nn.silu(h))
    return nn.Dense(x.shape[-1])(nn.silu(h))


def _apply(module):
  return lambda params, x, label, cond: module.apply({"params": params}, x, label, cond)


def _delta_oracle(point, schedule, kind, time_label="t"):
  """apply_fn and params of the exact model of data concentrated on ``point`` (a Gaussian of std 0):
  its eps / x0 / ... prediction is exact at every (x, t), so it scores the training target exactly.
  The label, per example in training, is mapped back to t, so a non-identity time label is checked too."""
  den = analytic.Gaussian(mean=point, std=jnp.zeros_like(point)).denoiser(schedule, kind)
  to_t = {"t": lambda s, l: l, "t999": lambda s, l: l / 999.0, "lambda": lambda s, l: s.t_of_lambda(l),
          "rho": lambda s, l: s.t_of_rho(l), "edm_c_noise": lambda s, l: s.t_of_rho(jnp.exp(4.0 * l))}[time_label]

  def apply_fn(params, x, label, cond):
    t = to_t(params["schedule"], label)
    return den.apply_fn(params, x, t[:, None] if jnp.ndim(t) == 1 else t, cond)  # the oracle broadcasts t

  return apply_fn, den.params


@pytest.mark.parametrize("kind", PREDICTION_KINDS)
@pytest.mark.parametrize("name", list(SCHEDULES))
def test_exact_model_has_zero_loss(name, kind):
  schedule = SCHEDULES[name]
  point = jnp.asarray([0.7, -1.3, 0.2], jnp.float32)
  apply_fn, params = _delta_oracle(point, schedule, kind)
  loss = training.DiffusionLoss(apply_fn, schedule, prediction=kind, time_label="t")
  x0 = jnp.broadcast_to(point, (512, 3))
  value, aux = loss(params, x0, None, jax.random.key(0))
  # Scale: the mean square of the target itself.
  eps = jax.random.normal(jax.random.split(jax.random.key(0), 3)[1], x0.shape, jnp.float32)
  _, target = loss.noisy_and_target(x0, eps, aux["t"])
  scale = float(jnp.mean(target.astype(jnp.float64) ** 2))
  assert value.dtype == jnp.float32
  assert float(value) <= 1e-7 * scale, (float(value), scale)
  # A wrong model does not score ~0: the test can fail.
  wrong_fn, wrong_params = _delta_oracle(point + 0.5, schedule, kind)
  wrong = training.DiffusionLoss(wrong_fn, schedule, prediction=kind, time_label="t")(
      wrong_params, x0, None, jax.random.key(0))[0]
  assert float(wrong) > 1e-3 * scale


@pytest.mark.parametrize("name,time_label", [("vp_linear", "t999"), ("vp_cosine", "lambda"), ("edm", "edm_c_noise"),
                                             ("ve", "rho"), ("discrete_vp", "t")])
def test_network_sees_the_denoisers_time_label(name, time_label):
  schedule = SCHEDULES[name]
  point = jnp.asarray([0.5, -0.25], jnp.float32)
  apply_fn, params = _delta_oracle(point, schedule, "eps", time_label)
  loss = training.DiffusionLoss(apply_fn, schedule, prediction="eps", time_label=time_label)
  x0 = jnp.broadcast_to(point, (256, 2))
  value, aux = jax.jit(loss)(params, x0, None, jax.random.key(1))  # jit works (discrete tables included)
  assert float(value) < 1e-6
  # Sampling through solvers.Denoiser with the same convention recovers the data point.
  den = Denoiser(apply_fn=apply_fn, params=params, prediction="eps", time_label=time_label)
  t = aux["t"][0]
  x = schedule.alpha(t) * point + schedule.sigma(t) * jnp.asarray([0.3, 0.1], jnp.float32)
  np.testing.assert_allclose(den.predict("x0", x[None].astype(jnp.float32), t, schedule)[0], point, atol=2e-3)


def test_uniform_times_cover_the_interval_and_discrete_times_are_integers():
  n = 20000
  for name, schedule in SCHEDULES.items():
    t = training.DiffusionLoss(lambda *a: None, schedule).sample_t(jax.random.key(2), n)
    assert t.dtype == jnp.float32 and t.shape == (n,)
    lo, hi = float(schedule.t_min), float(schedule.t_max)
    assert float(t.min()) >= lo and float(t.max()) <= hi
    assert abs(float(t.mean()) - (lo + hi) / 2) < 0.02 * (hi - lo), name
    if name == "discrete_vp":
      assert np.array_equal(np.asarray(t), np.round(np.asarray(t))) and float(t.min()) == 0 and float(t.max()) == 999


def test_lognormal_times_follow_edm():
  loss = training.DiffusionLoss(lambda *a: None, schedules.EDM(), t_sampling="lognormal")
  t = np.asarray(loss.sample_t(jax.random.key(3), 40000), np.float64)
  assert abs(np.log(t).mean() + 1.2) < 0.03 and abs(np.log(t).std() - 1.2) < 0.03
  # On a VP schedule the same law is on rho = sigma / alpha, and discrete times are rounded.
  vp = training.DiffusionLoss(lambda *a: None, SCHEDULES["discrete_vp"], t_sampling="lognormal")
  t = np.asarray(vp.sample_t(jax.random.key(3), 1000))
  assert np.array_equal(t, np.round(t)) and t.min() >= 0 and t.max() <= 999


@pytest.mark.parametrize("p", [0.0, 0.1, 0.5, 1.0])
def test_label_dropout_rate(p):
  loss = training.DiffusionLoss(lambda *a: None, schedules.VPLinear(), num_classes=10, label_dropout=p)
  labels = jnp.asarray(np.arange(40000) % 10, jnp.int32)
  cond = loss.conditioning(labels, jax.random.key(4))
  dropped = np.asarray(cond == 10)
  assert cond.dtype == jnp.int32
  assert abs(dropped.mean() - p) < 4 * np.sqrt(p * (1 - p) / labels.size) + 1e-12
  assert np.array_equal(np.asarray(cond)[~dropped], np.asarray(labels)[~dropped])
  if 0 < p < 1:  # independent of the class
    rates = [dropped[np.asarray(labels) == c].mean() for c in range(10)]
    assert max(abs(r - p) for r in rates) < 5 * np.sqrt(p * (1 - p) / 4000)


def test_dropout_is_fresh_each_step():
  module = Tiny(num_classes=3)
  x0 = jnp.zeros((512, 2), jnp.float32)
  labels = jnp.zeros(512, jnp.int32)
  params = jax.jit(module.init)(jax.random.key(0), x0, jnp.zeros(512), labels)["params"]
  loss = training.DiffusionLoss(_apply(module), schedules.VPLinear(), num_classes=3, label_dropout=0.5)
  state = training.init_state(params, training.make_optimizer(1e-3)[0], 0)
  k0, k1 = training.step_key(state), training.step_key(state.replace(step=state.step + 1))
  cond = jax.jit(lambda key: loss(params, x0, labels, key)[1]["cond"])
  c0, c1 = cond(k0), cond(k1)
  assert not np.array_equal(c0, c1)
  assert np.array_equal(c0, cond(k0))


def test_learning_rate_schedule_values():
  lr = training.learning_rate_schedule(1e-3, warmup_steps=10, total_steps=110, decay="cosine", end_factor=0.1)
  v = {c: float(lr(c)) for c in (0, 4, 9, 10, 60, 110, 200)}
  assert v[0] == pytest.approx(1e-4) and v[4] == pytest.approx(5e-4) and v[9] == pytest.approx(1e-3)
  assert v[10] == pytest.approx(1e-3) and v[60] == pytest.approx(1e-3 * (0.1 + 0.9 * 0.5), rel=1e-6)
  assert v[110] == pytest.approx(1e-4) and v[200] == pytest.approx(1e-4)
  assert lr(3).dtype == jnp.float32
  const = training.learning_rate_schedule(2e-3)
  assert float(const(0)) == pytest.approx(2e-3) and float(const(10**6)) == pytest.approx(2e-3)
  with pytest.raises(ValueError, match="total_steps"):
    training.learning_rate_schedule(1e-3, 10, None, "cosine")
  with pytest.raises(ValueError, match="decay='linear'"):
    training.learning_rate_schedule(1e-3, decay="linear")


def test_optimizer_applies_the_warmup_rate():
  # Adam's first update is lr * g / (|g| + eps) = lr sign(g): every weight moves by lr(0) = peak / warmup.
  params = {"w": jnp.asarray([[1.0, -2.0], [0.5, 3.0]], jnp.float32)}
  tx, lr = training.make_optimizer(1e-2, warmup_steps=4, clip_norm=1.0)
  grads = {"w": jnp.asarray([[3.0, -1.0], [0.2, 5.0]], jnp.float32)}
  updates, _ = tx.update(grads, tx.init(params), params)
  np.testing.assert_allclose(updates["w"], -2.5e-3 * np.sign(grads["w"]), rtol=1e-4)


def test_ema_decay_and_update():
  assert float(training.ema_decay_at(0, 0.999)) == pytest.approx(0.1)
  assert float(training.ema_decay_at(90, 0.999)) == pytest.approx(0.91)
  assert float(training.ema_decay_at(10**6, 0.999)) == pytest.approx(0.999)
  assert float(training.ema_decay_at(0, 0.999, warmup=False)) == pytest.approx(0.999)
  ema = training.ema_update({"a": jnp.asarray([1.0, 2.0], jnp.float32)}, {"a": jnp.asarray([3.0, 6.0], jnp.float32)}, 0.75)
  np.testing.assert_allclose(ema["a"], [1.5, 3.0])
  assert ema["a"].dtype == jnp.float32


def _toy_problem(num_classes=0, dropout=0.0, prediction="eps", **opt):
  oracle = analytic.gmm(dim=2, num_components=3, seed=1, std=0.15, dtype=jnp.float32)
  module = Tiny(num_classes=num_classes)
  x_init = jnp.zeros((4, 2), jnp.float32)
  cond = jnp.zeros(4, jnp.int32) if num_classes else None
  params = jax.jit(module.init)(jax.random.key(0), x_init, jnp.zeros(4), cond)["params"]
  loss = training.DiffusionLoss(_apply(module), schedules.VPLinear(), prediction=prediction, time_label="t",
                                num_classes=num_classes, label_dropout=dropout)
  tx, lr = training.make_optimizer(**{"learning_rate": 3e-3, "warmup_steps": 20, **opt})
  return oracle, params, loss, tx, lr


def test_train_step_metrics_ema_and_determinism():
  _, params, loss, tx, lr = _toy_problem(num_classes=3, dropout=0.2)
  state = training.init_state(params, tx, 5)
  step = training.make_train_step(loss, tx, lr, ema_decay=0.9, ema_warmup=False)
  x0 = jax.random.normal(jax.random.key(1), (64, 2), jnp.float32)
  labels = jnp.arange(64, dtype=jnp.int32) % 3
  s1, m = step(state, x0, labels)
  assert set(m) == {"loss", "grad_norm", "lr"} and all(v.dtype == jnp.float32 and v.shape == () for v in m.values())
  assert float(m["lr"]) == pytest.approx(float(lr(0)))
  grads = jax.jit(jax.grad(lambda p: loss(p, x0, labels, training.step_key(state))[0]))(params)
  assert float(m["grad_norm"]) == pytest.approx(float(jnp.sqrt(sum(jnp.sum(g**2) for g in jax.tree_util.tree_leaves(grads)))), rel=1e-5)
  assert int(s1.step) == 1 and s1.step.dtype == jnp.int32 and np.array_equal(s1.key, state.key)
  for leaf in jax.tree_util.tree_leaves((s1.params, s1.ema_params, s1.opt_state)):
    assert leaf.dtype in (jnp.float32, jnp.int32)
  expected = jax.tree_util.tree_map(lambda e, p: 0.9 * e + 0.1 * p, state.ema_params, s1.params)
  for a, b in zip(jax.tree_util.tree_leaves(s1.ema_params), jax.tree_util.tree_leaves(expected)):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
  # Deterministic in (state, batch); a different step index draws different noise.
  s1b, mb = step(state, x0, labels)
  assert all(np.array_equal(a, b) for a, b in zip(jax.tree_util.tree_leaves(s1), jax.tree_util.tree_leaves(s1b)))
  _, m_other = step(state.replace(step=jnp.int32(7)), x0, labels)
  assert float(m_other["loss"]) != float(m["loss"])


def test_loss_decreases_on_a_tiny_network():
  oracle, params, loss, tx, lr = _toy_problem(total_steps=300, decay="cosine")
  state = training.init_state(params, tx, 0)
  step = training.make_train_step(loss, tx, lr, ema_decay=0.99)
  losses = []
  data = oracle.sample(jax.random.key(9), 300 * 256).astype(jnp.float32).reshape(300, 256, 2)
  for i in range(300):
    state, m = step(state, data[i], None)
    losses.append(float(m["loss"]))
  first, last = np.mean(losses[:20]), np.mean(losses[-50:])
  assert last < 0.7 * first, (first, last)
  # The EMA model beats the initial one on held-out data (same noise for both).
  x0 = oracle.sample(jax.random.key(123), 4096).astype(jnp.float32)
  held_out = jax.jit(lambda p: loss(p, x0, None, jax.random.key(77))[0])
  assert float(held_out(state.ema_params)) < 0.8 * float(held_out(params))


def test_bad_configurations_raise():
  vp = schedules.VPLinear()
  with pytest.raises(ValueError, match="t_sampling='loguniform'"):
    training.DiffusionLoss(None, vp, t_sampling="loguniform")
  with pytest.raises(ValueError, match="prediction kind 'noise'"):
    training.DiffusionLoss(None, vp, prediction="noise")
  with pytest.raises(ValueError, match="time_label 'sigma'"):
    training.DiffusionLoss(None, vp, time_label="sigma")
  with pytest.raises(ValueError, match="label_dropout=1.5"):
    training.DiffusionLoss(None, vp, num_classes=3, label_dropout=1.5)
  with pytest.raises(ValueError, match="needs a class-conditional"):
    training.DiffusionLoss(None, vp, label_dropout=0.1)
  with pytest.raises(ValueError, match="needs labels"):
    training.DiffusionLoss(None, vp, num_classes=3).conditioning(None, jax.random.key(0))
  with pytest.raises(ValueError, match="ema_decay=1.5"):
    training.make_train_step(training.DiffusionLoss(None, vp), training.make_optimizer()[0], ema_decay=1.5)

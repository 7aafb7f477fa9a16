"""jbptt.diagnostics against known answers and direct computations."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jbptt
import jbptt.diagnostics as jd

from conftest import D, H, carry0, data, full_grad, step_loss

tree_map = jax.tree_util.tree_map
leaves = jax.tree_util.tree_leaves


def cos_err(a, b):
  """Cosine and relative error of two gradient lists, in numpy."""
  a = np.concatenate([np.ravel(x) for x in a])
  b = np.concatenate([np.ravel(x) for x in b])
  cos = a @ b / (np.linalg.norm(a) * np.linalg.norm(b))
  return cos, np.linalg.norm(a - b) / np.linalg.norm(b)


def trunc_grad(step, p, h, xs, k1, k2, losses="new"):
  """The TBPTT(k1, k2) gradient, straight from jbptt.truncated_loss."""
  f = jbptt.truncated_loss(step, k1=k1, k2=k2, losses=losses)
  return jax.jit(jax.grad(lambda p: f(p, h, xs)[0]))(p)


# (n, k1, k2, losses): k1 < n dividing it or not, k1 > n, k1 = 1, k2 = n and
# k2 > n; the other two losses values once each.
@pytest.mark.parametrize("n,k1,k2,losses", [
    (8, 4, 8, "new"), (7, 3, 9, "new"), (7, 9, 7, "new"), (7, 1, 8, "new"),
    (7, 3, 7, "window"), (7, 3, 10, "last")])
def test_k2_at_least_n_is_unbiased(n, k1, k2, losses, params):
  xs, h = data(n), carry0()
  bias = jd.gradient_bias(step_loss, params, h, xs, k1=k1, k2=k2,
                          losses=losses)
  np.testing.assert_allclose(bias.cosine, 1.0, atol=1e-12)
  np.testing.assert_allclose(bias.relative_error, 0.0, atol=1e-10)
  for c, e in zip(leaves(bias.leaf_cosine), leaves(bias.leaf_relative_error)):
    np.testing.assert_allclose(c, 1.0, atol=1e-12)
    np.testing.assert_allclose(e, 0.0, atol=1e-10)


@pytest.mark.parametrize("k1,k2", [(2, 5), (5, 2)])  # both fast paths
def test_matches_direct_computation_new(k1, k2, params):
  n = 10
  xs, h = data(n), carry0()
  got = jd.gradient_bias(step_loss, params, h, xs, k1=k1, k2=k2)
  g = trunc_grad(step_loss, params, h, xs, k1, k2)
  want = full_grad(params, h, xs)  # independent of jbptt
  cos, err = cos_err(leaves(g), leaves(want))
  assert cos < 1 - 1e-4 and err > 1e-3  # truncation matters here
  np.testing.assert_allclose(got.cosine, cos, rtol=1e-10)
  np.testing.assert_allclose(got.relative_error, err, rtol=1e-10)
  for name in params:
    c, e = cos_err([g[name]], [want[name]])
    np.testing.assert_allclose(got.leaf_cosine[name], c, rtol=1e-10)
    np.testing.assert_allclose(got.leaf_relative_error[name], e, rtol=1e-10)


@pytest.mark.parametrize("losses", ["last"])  # "window": in the sweep test
def test_other_losses_compare_with_their_own_losses_untruncated(losses,
                                                                params):
  n, k1, k2 = 9, 3, 2
  xs, h = data(n), carry0()
  got = jd.gradient_bias(step_loss, params, h, xs, k1=k1, k2=k2, losses=losses)
  g = trunc_grad(step_loss, params, h, xs, k1, k2, losses)
  want = trunc_grad(step_loss, params, h, xs, k1, n, losses)
  cos, err = cos_err(leaves(g), leaves(want))
  assert cos < 1 - 1e-4
  np.testing.assert_allclose(got.cosine, cos, rtol=1e-10)
  np.testing.assert_allclose(got.relative_error, err, rtol=1e-10)


def test_resets_are_passed_through(params):
  """Resets at the chunk boundaries cut the gradient there anyway."""
  n, k = 12, 4
  xs, h = data(n), carry0()
  resets = np.zeros((n,), bool)
  resets[[4, 8]] = True
  cut = jd.gradient_bias(step_loss, params, h, xs, k1=k, k2=k, resets=resets)
  np.testing.assert_allclose(cut.cosine, 1.0, atol=1e-12)
  np.testing.assert_allclose(cut.relative_error, 0.0, atol=1e-10)
  # Without them TBPTT(4, 4) is biased on these data: see
  # test_matches_direct_computation_new and test_sweep_shapes_and_values.


def test_zero_gradients_follow_the_documented_conventions(params):
  p = dict(params, unused=jnp.zeros(3))
  step = lambda p, h, x: step_loss({k: p[k] for k in params}, h, x)
  bias = jd.gradient_bias(step, p, carry0(), data(6), k1=2, k2=2)
  assert float(bias.leaf_cosine["unused"]) == 1.0
  assert float(bias.leaf_relative_error["unused"]) == 0.0
  assert float(bias.leaf_cosine["W"]) < 1.0  # the others are compared


def test_bfloat16_params_give_float32_metrics():
  p = tree_map(lambda a: a.astype(jnp.bfloat16), {"W": jnp.eye(H) * 0.5,
                                                   "U": jnp.ones((D, H)),
                                                   "b": jnp.zeros(H),
                                                   "v": jnp.ones(H)})
  xs = tree_map(lambda a: a.astype(jnp.bfloat16), data(6))
  bias = jd.gradient_bias(step_loss, p, carry0(jnp.bfloat16), xs, k1=3, k2=3)
  assert bias.cosine.dtype == jnp.float32
  assert 0.5 < float(bias.cosine) < 1.0


# A linear RNN h_t = h_(t-1) W + x_t U (row vectors, a batch of B rows),
# loss_t = mean over the batch of h_t . c. Then d loss_t / d h_(t-j) has, in
# every row, (W^j c) / B, so its norm over the batch is ||W^j c|| / sqrt(B):
# the same for every t >= j.
def linear_step(p, h, x):
  h = h @ p["W"] + x @ p["U"]
  return h, jnp.mean(h @ p["c"])


@pytest.mark.parametrize("scale", [0.5, 1.3])  # vanishing, exploding
@pytest.mark.parametrize("batch", [1, 3])
def test_linear_rnn_lag_norms_are_known(scale, batch):
  rng = np.random.default_rng(0)
  w = rng.standard_normal((H, H))
  w *= scale / np.max(np.abs(np.linalg.eigvals(w)))  # spectral radius
  p = {"W": jnp.asarray(w), "U": jnp.asarray(rng.standard_normal((D, H))),
       "c": jnp.asarray(rng.standard_normal(H))}
  n, lags = 9, 6
  xs = jnp.asarray(rng.standard_normal((n, batch, D)))
  got = jd.lag_norms(linear_step, p, jnp.zeros((batch, H)), xs, max_lag=lags)
  want = np.array([np.linalg.norm(np.linalg.matrix_power(w, j) @ p["c"])
                   for j in range(1, lags + 1)]) / np.sqrt(batch)
  np.testing.assert_array_equal(got.lags, np.arange(1, lags + 1))
  np.testing.assert_allclose(got.norms, want, rtol=1e-10)
  for t in range(1, n + 1):
    for j in range(1, lags + 1):
      value = got.per_step[t - 1, j - 1]
      if t < j:
        assert np.isnan(value), (t, j)
      else:
        np.testing.assert_allclose(value, want[j - 1], rtol=1e-10)


def lstm_step(p, carry, x):
  """An LSTM with a tuple carry (c, h) and a squared error on a read-out."""
  c, h = carry
  u, y = x
  i, f, g, o = jnp.split(h @ p["Wh"] + u @ p["Wx"] + p["b"], 4, axis=-1)
  c = jax.nn.sigmoid(f) * c + jax.nn.sigmoid(i) * jnp.tanh(g)
  h = jax.nn.sigmoid(o) * jnp.tanh(c)
  return (c, h), jnp.mean((h @ p["v"] - y) ** 2)


def lstm_case(n=7):
  k = jax.random.split(jax.random.key(3), 6)
  p = {"Wh": 0.8 * jax.random.normal(k[0], (H, 4 * H), jnp.float64),
       "Wx": jax.random.normal(k[1], (D, 4 * H), jnp.float64),
       "b": 0.1 * jax.random.normal(k[2], (4 * H,), jnp.float64),
       "v": jax.random.normal(k[3], (H,), jnp.float64)}
  carry = (jnp.full((2, H), 0.3), jnp.full((2, H), -0.2))
  xs = (jax.random.normal(k[4], (n, 2, D), jnp.float64),
        jax.random.normal(k[5], (n, 2), jnp.float64))
  return lstm_step, p, carry, xs


def test_lag_norms_of_an_lstm_tuple_carry_match_direct_jacobians():
  step, p, carry, xs = lstm_case()
  assert isinstance(carry, tuple)
  n, lags = 7, 5

  @jax.jit
  def direct(p, carry, xs):
    """norms[t - 1, s] = ||d loss_t / d h_s||, one Jacobian per state h_s."""
    x = lambda i: tree_map(lambda a: a[i], xs)
    rows, h_s = [], carry
    for s in range(n):
      def losses_from(h, s=s):
        out = []
        for i in range(s, n):
          h, loss = step(p, h, x(i))
          out.append(loss)
        return jnp.stack(out)
      jac = jax.jacrev(losses_from)(h_s)  # leaves (n - s, 2, H)
      sq = sum(jnp.sum(a ** 2, axis=(1, 2)) for a in leaves(jac))
      rows.append(jnp.concatenate([jnp.zeros(s + 1), jnp.sqrt(sq)])[: n + 1])
      h_s = step(p, h_s, x(s))[0]
    return jnp.stack(rows, axis=1)[1:]  # (t = 1..n, s = 0..n-1)

  by_state = np.asarray(direct(p, carry, xs))
  want = np.full((n, lags), np.nan)
  for t in range(1, n + 1):
    for j in range(1, min(t, lags) + 1):
      want[t - 1, j - 1] = by_state[t - 1, t - j]
  got = jd.lag_norms(step, p, carry, xs, max_lag=lags)
  np.testing.assert_allclose(got.per_step, want, rtol=1e-9)
  np.testing.assert_allclose(got.norms, np.nanmean(want, axis=0), rtol=1e-9)


def test_gradient_bias_with_an_lstm_tuple_carry():
  step, p, carry, xs = lstm_case()
  exact = jd.gradient_bias(step, p, carry, xs, k1=9, k2=7)
  np.testing.assert_allclose(exact.cosine, 1.0, atol=1e-12)
  got = jd.gradient_bias(step, p, carry, xs, k1=3, k2=2)
  cos, err = cos_err(leaves(trunc_grad(step, p, carry, xs, 3, 2)),
                     leaves(trunc_grad(step, p, carry, xs, 7, 7)))
  assert cos < 1 - 1e-6
  np.testing.assert_allclose(got.cosine, cos, rtol=1e-10)
  np.testing.assert_allclose(got.relative_error, err, rtol=1e-10)


def test_sweep_shapes_and_values(params):
  n = 8
  xs, h = data(n), carry0()
  k2s = [1, 2, 8]
  curve = jd.sweep(step_loss, params, h, xs, k2s=k2s)
  np.testing.assert_array_equal(curve.k1, k2s)  # default k1 = k2
  np.testing.assert_array_equal(curve.k2, k2s)
  assert curve.cosine.shape == curve.relative_error.shape == (3,)
  for i, k in enumerate(k2s):
    b = jd.gradient_bias(step_loss, params, h, xs, k1=k, k2=k)
    np.testing.assert_allclose(curve.cosine[i], b.cosine, rtol=1e-12)
    np.testing.assert_allclose(curve.relative_error[i], b.relative_error,
                               rtol=1e-12)
  assert curve.cosine[0] < curve.cosine[-1] == pytest.approx(1.0, abs=1e-12)

  grid = jd.sweep(step_loss, params, h, xs, k2s=[2, 8],
                  k1s=np.array([3, 9])[:, None], losses="window")
  assert grid.cosine.shape == grid.k1.shape == grid.k2.shape == (2, 2)
  np.testing.assert_array_equal(grid.k1[:, 0], [3, 9])
  np.testing.assert_array_equal(grid.k2[0], [2, 8])
  b = jd.gradient_bias(step_loss, params, h, xs, k1=3, k2=2, losses="window")
  assert b.cosine < 1 - 1e-4
  np.testing.assert_allclose(grid.cosine[0, 0], b.cosine, rtol=1e-12)
  np.testing.assert_allclose(grid.relative_error[0, 0], b.relative_error,
                             rtol=1e-12)
  np.testing.assert_allclose(grid.cosine[:, 1], 1.0, atol=1e-12)  # k2 = n


@pytest.mark.parametrize("kwargs,match", [
    ({"k2s": []}, "k2s must hold at least one"),
    ({"k2s": [2, 0]}, r"k2s must hold positive ints, got 0"),
    ({"k2s": [2, 1.5]}, r"k2s must hold positive ints, got 1.5"),
    ({"k2s": [2, True]}, r"k2s must hold positive ints, got True"),
    ({"k2s": [2, 3], "k1s": [-1]}, r"k1s must hold positive ints, got -1"),
    ({"k2s": [2, 3], "k1s": [1, 2, 3]}, "k1s and k2s must broadcast"),
    ({"k2s": [2], "k1s": []}, "k1s must hold at least one"),
    ({"k2s": [2], "losses": "all"}, "losses must be one of"),
])
def test_sweep_bad_arguments(kwargs, match, params):
  with pytest.raises(ValueError, match=match):
    jd.sweep(step_loss, params, carry0(), data(4), **kwargs)


@pytest.mark.parametrize("max_lag,match", [
    (0, r"max_lag must be a positive int, got max_lag=0"),
    (2.0, r"max_lag must be a positive int, got max_lag=2.0"),
    (5, r"max_lag must be at most the sequence length n=4, got max_lag=5"),
])
def test_lag_norms_bad_max_lag(max_lag, match, params):
  with pytest.raises(ValueError, match=match):
    jd.lag_norms(step_loss, params, carry0(), data(4), max_lag=max_lag)


@pytest.mark.parametrize("kwargs,match", [
    ({"k1": 0, "k2": 2}, "k1 must be a positive int"),
    ({"k1": 2, "k2": -1}, "k2 must be a positive int"),
    ({"k1": 2, "k2": 2, "losses": "old"}, "losses must be one of"),
])
def test_gradient_bias_bad_arguments(kwargs, match, params):
  with pytest.raises(ValueError, match=match):
    jd.gradient_bias(step_loss, params, carry0(), data(4), **kwargs)


def test_lag_norms_checks_the_step(params):
  bad = lambda p, h, x: (h, jnp.zeros(2))
  with pytest.raises(TypeError, match="scalar loss"):
    jd.lag_norms(bad, params, carry0(), data(4), max_lag=2)


# k2 rules ---------------------------------------------------------------------


def test_gradient_bias_of_randomized_is_its_mean_over_keys(params):
  xs, h = data(9), carry0()
  rule = jbptt.Randomized(3, 9)
  key = jax.random.key(5)
  samples = 16
  b = jd.gradient_bias(step_loss, params, h, xs, k1=2, k2=rule, key=key,
                       samples=samples)
  # Directly: one truncated_loss gradient per key, their mean and spread.
  f = jbptt.truncated_loss(step_loss, k1=2, k2=rule)
  per_key = [leaves(jax.grad(lambda p, k=k: f(p, h, xs, key=k)[0])(params))
             for k in jax.random.split(key, samples)]
  flat = np.stack([np.concatenate([np.ravel(x) for x in g]) for g in per_key])
  mean = flat.mean(axis=0)
  full = np.concatenate([np.ravel(x) for x in leaves(full_grad(params, h, xs))])
  cos, err = cos_err([mean], [full])
  np.testing.assert_allclose(b.cosine, cos, rtol=1e-9)
  np.testing.assert_allclose(b.relative_error, err, rtol=1e-7)
  variance = np.mean(np.sum((flat - mean) ** 2, axis=1)) / np.sum(full ** 2)
  np.testing.assert_allclose(b.relative_variance, variance, rtol=1e-7)
  assert variance > 0
  fixed = jd.gradient_bias(step_loss, params, h, xs, k1=2, k2=3)
  assert float(fixed.relative_variance) == 0.0


def test_gradient_bias_of_adaptive_is_that_of_its_choice(params):
  xs, h = data(12), carry0()
  rule = jbptt.Adaptive(0.2, (1, 2, 4, 8))
  choice = jd.adaptive_choice(step_loss, params, h, xs, k1=3, k2=rule)
  assert int(choice.k2) in rule.choices and 0 < float(choice.beta) < 1
  b = jd.gradient_bias(step_loss, params, h, xs, k1=3, k2=rule)
  fixed = jd.gradient_bias(step_loss, params, h, xs, k1=3, k2=int(choice.k2))
  np.testing.assert_allclose(b.relative_error, fixed.relative_error,
                             rtol=1e-9)
  # The decay rate is the one the choice rule reads: the smallest choice
  # with beta ** k2 <= delta, else the largest.
  ok = [c for c in rule.choices if float(choice.beta) ** c <= rule.delta]
  assert int(choice.k2) == (ok[0] if ok else rule.choices[-1])


def test_rule_errors(params):
  xs, h = data(6), carry0()
  with pytest.raises(ValueError, match="key"):
    jd.gradient_bias(step_loss, params, h, xs, k1=2, k2=jbptt.Randomized(2, 4))
  with pytest.raises(ValueError, match="samples must be a positive int"):
    jd.gradient_bias(step_loss, params, h, xs, k1=2,
                     k2=jbptt.Randomized(2, 4), key=jax.random.key(0),
                     samples=0)
  with pytest.raises(TypeError, match="jbptt.Adaptive"):
    jd.adaptive_choice(step_loss, params, h, xs, k1=2, k2=4)

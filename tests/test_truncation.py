"""k2 as a rule: jbptt.Randomized (ARTBP) and jbptt.Adaptive.

Checked against the plain-loop references of ``reference.py`` written from
the multiplier contract (``jbptt._src.truncation``): the update ending at t
is TBPTT(k1, K) with the carry cotangent entering h_(t-d) multiplied by
m_t(d). The trainer's tests carry a ``trainer_`` prefix in their names
(``pytest tests/test_truncation.py -k trainer_``).
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jbptt
from jbptt._src.truncation import Adaptive, Randomized

import reference as ref
from conftest import (
    assert_trees_close,
    carry0,
    data,
    init_params,
    step_loss,
)

tree_map = jax.tree_util.tree_map


def randomized_fn(n_unused, k1, rule, losses="new"):
  """The jitted (loss, grad) of truncated_loss with a traced key."""
  f = jbptt.truncated_loss(step_loss, k1=k1, k2=rule, losses=losses)

  def loss(p, h, xs, key, resets):
    return f(p, h, xs, key=key, resets=resets)[0]

  return jax.jit(jax.value_and_grad(loss))


# truncated_loss with Randomized ---------------------------------------------

# (n, k1, max, mean, losses, resets): k1 < max, k1 = max, k1 > max, n not a
# multiple of k1, every losses value; means whose multiplier 1 / (1 - c) is
# exact in float32 (see test_randomized_multiplier_is_exact_in_float64).
RANDOMIZED_CASES = [
    (9, 2, 5, 2.0, "new", False),     # k1 < max, k1 does not divide max
    (12, 3, 6, 3.0, "window", False),  # k1 < max, k1 divides max
    (10, 4, 4, 2.0, "window", False),  # k1 = max, n not a multiple of k1
    (11, 4, 4, 3.0, "new", True),      # k1 = max, resets
    (11, 5, 3, 2.0, "last", False),    # k1 > max, tail
    (10, 8, 3, 3.0, "window", False),  # k1 > max, tail reaching back
    (9, 2, 5, 3.0, "last", True),      # k1 < max, resets
]


def reset_mask(n):
  r = np.zeros((n, 2), bool)
  r[3, 0] = r[6, 1] = True
  if n > 8:
    r[8, :] = True
  return r


@pytest.mark.parametrize("n,k1,max_,mean,losses,with_resets", RANDOMIZED_CASES)
def test_randomized_matches_reference(n, k1, max_, mean, losses, with_resets):
  xs, h, params = data(n), carry0(), init_params()
  resets = reset_mask(n) if with_resets else None
  vg = randomized_fn(n, k1, Randomized(mean, max_), losses)
  for seed in (0, 7):
    key = jax.random.PRNGKey(seed)
    loss, grad = vg(params, h, xs, key, resets)
    want_loss, want_grad, _ = ref.truncated_loss_scaled(
        step_loss, params, h, xs, k1, max_, ref.artbp_mult(key, mean, max_),
        losses, resets=resets)
    np.testing.assert_allclose(loss, want_loss, rtol=0, atol=1e-10)
    assert_trees_close(grad, want_grad, atol=1e-10)


def test_randomized_typed_key():
  """A typed key (jax.random.key) draws what its raw key data draws."""
  n, k1, max_, mean = 9, 2, 5, 2.0
  xs, h, params = data(n), carry0(), init_params()
  f = jbptt.truncated_loss(step_loss, k1=k1, k2=Randomized(mean, max_))
  key = jax.random.key(3)
  g = jax.jit(jax.grad(lambda p, k: f(p, h, xs, key=k)[0]))(params, key)
  _, want, _ = ref.truncated_loss_scaled(
      step_loss, params, h, xs, k1, max_, ref.artbp_mult(key, mean, max_))
  assert_trees_close(g, want, atol=1e-10)


def test_randomized_multiplier_is_exact_in_float64():
  """mean = 2.5: m = 1 / (1 - 0.4) = 5/3, not a float32 number. In float64
  the gradient must use the contract's multiplier to 1e-10."""
  n, k1, max_, mean = 9, 2, 5, 2.5
  xs, h, params = data(n), carry0(), init_params()
  vg = randomized_fn(n, k1, Randomized(mean, max_))
  key = jax.random.PRNGKey(3)
  _, grad = vg(params, h, xs, key, None)
  _, want, _ = ref.truncated_loss_scaled(
      step_loss, params, h, xs, k1, max_, ref.artbp_mult(key, mean, max_))
  assert_trees_close(grad, want, atol=1e-10)


@pytest.mark.parametrize("n,k1,max_,losses", [(9, 2, 5, "new"),
                                              (11, 4, 3, "last")])
def test_randomized_huge_mean_is_tbptt_k1_max(n, k1, max_, losses):
  xs, h, params = data(n), carry0(), init_params()
  vg = randomized_fn(n, k1, Randomized(1e12, max_), losses)
  loss, grad = vg(params, h, xs, jax.random.PRNGKey(1), None)
  f = jbptt.truncated_loss(step_loss, k1=k1, k2=max_, losses=losses)
  want_loss, want = jax.jit(jax.value_and_grad(
      lambda p: f(p, h, xs)[0]))(params)
  np.testing.assert_allclose(loss, want_loss, rtol=0, atol=1e-10)
  assert_trees_close(grad, want, atol=1e-10)


def _scalar_step(p, h, x):
  h = jnp.tanh(p["w"] * h + p["u"] * x)
  return h, (h - 0.5 * x) ** 2


def test_randomized_is_unbiased():
  """E[Randomized(mean, max=n)] is TBPTT(k1, n); TBPTT(k1, mean) is not."""
  n, k1, mean, keys = 10, 2, 3.0, 4000
  p = {"w": jnp.float64(1.3), "u": jnp.float64(0.7)}
  xs = jax.random.normal(jax.random.PRNGKey(5), (n,))
  h = jnp.float64(0.2)

  def grad(k2, key=None):
    f = jbptt.truncated_loss(_scalar_step, k1=k1, k2=k2)
    kw = {} if key is None else {"key": key}
    return jax.grad(lambda p: f(p, h, xs, **kw)[0])(p)

  full = jax.jit(lambda: grad(n))()
  fixed = jax.jit(lambda: grad(int(mean)))()
  split = jax.random.split(jax.random.PRNGKey(0), keys)
  draws = jax.jit(jax.vmap(lambda k: grad(Randomized(mean, n), k)))(split)
  for name in p:
    se = float(np.std(draws[name]) / np.sqrt(keys))
    assert se > 0
    assert abs(float(np.mean(draws[name]) - full[name])) < 4 * se, name
    assert abs(float(fixed[name] - full[name])) > 10 * se, name


# truncated_loss with Adaptive -----------------------------------------------


def _linear_step(a, h, x):
  h = a * h + x
  return h, 0.5 * h ** 2


def constant_stream(a, n, c=0.7):
  """h_0 = c and x_t = c (1 - a): h_t = c for every t, so every update end's
  norms ||d loss_t / d h_(t-j)|| = c a**j (their mean too)."""
  return jnp.float64(c), jnp.full((n,), c * (1 - a), jnp.float64)


CHOICES = (2, 4, 6)


def expected_k2(a, delta, choices=CHOICES):
  ok = [c for c in choices if a ** c <= delta]
  return ok[0] if ok else choices[-1]


# (a, delta, expected k2, k1, losses): deltas far from a**c of any choice.
ADAPTIVE_CASES = [
    (0.3, 0.3, 2, 2, "new"),
    (0.6, 0.2, 4, 3, "new"),
    (0.8, 0.33, 6, 2, "last"),
    (0.9, 0.3, 6, 4, "new"),    # none qualifies: the largest
    (0.9, 0.73, 4, 2, "last"),
]


@pytest.mark.parametrize("a,delta,want_k2,k1,losses", ADAPTIVE_CASES)
def test_adaptive_is_tbptt_of_its_choice(a, delta, want_k2, k1, losses):
  assert expected_k2(a, delta) == want_k2
  n = 13
  h, xs = constant_stream(a, n)
  a = jnp.float64(a)
  f = jbptt.truncated_loss(_linear_step, k1=k1, k2=Adaptive(delta, CHOICES),
                           losses=losses)
  loss, grad = jax.jit(jax.value_and_grad(lambda p: f(p, h, xs)[0]))(a)
  want_loss, want, _ = ref.truncated_loss(_linear_step, a, h, xs, k1,
                                          want_k2, losses)
  np.testing.assert_allclose(loss, want_loss, rtol=0, atol=1e-10)
  np.testing.assert_allclose(grad, want, rtol=1e-9, atol=1e-10)
  for other in CHOICES:  # the check tells the choices apart
    if other != want_k2:
      _, g, _ = ref.truncated_loss(_linear_step, a, h, xs, k1, other, losses)
      assert abs(float(g - want)) > 1e-6


# Errors ------------------------------------------------------------------------


@pytest.mark.parametrize("make,name", [
    (lambda: Randomized(mean=0.5, max=4), "mean"),
    (lambda: Randomized(2, 0), "max"),
    (lambda: Adaptive(1.5, (2,)), "delta"),
    (lambda: Adaptive(0.1, ()), "choices"),
    (lambda: Adaptive(0.1, (0,)), "choices"),
    (lambda: jbptt.truncated_loss(step_loss, k1=2, k2="x"), "k2"),
    (lambda: jbptt.truncated_loss(step_loss, k1=2, k2=Adaptive(0.1, (2, 4)),
                                  losses="window"), "window"),
])
def test_bad_rules_raise(make, name):
  with pytest.raises(ValueError, match=name):
    make()


def test_key_required_for_randomized_only():
  xs, h, params = data(5), carry0(), init_params()
  f = jbptt.truncated_loss(step_loss, k1=2, k2=Randomized(2.0, 3))
  with pytest.raises(ValueError, match="key"):
    f(params, h, xs)
  g = jbptt.truncated_loss(step_loss, k1=2, k2=3)
  with pytest.raises(ValueError, match="key"):
    g(params, h, xs, key=jax.random.PRNGKey(0))
  a = jbptt.truncated_loss(step_loss, k1=2, k2=Adaptive(0.1, (2, 3)))
  with pytest.raises(ValueError, match="key"):
    a(params, h, xs, key=jax.random.PRNGKey(0))


def test_trainer_errors():
  xs, h, params = data(5), carry0(), init_params()
  tr = jbptt.trainer(step_loss, optax.sgd(0.1), k1=2, k2=Randomized(2.0, 3))
  with pytest.raises(ValueError, match="key"):
    tr.init(params, h, xs)
  plain = jbptt.trainer(step_loss, optax.sgd(0.1), k1=2, k2=3)
  with pytest.raises(ValueError, match="key"):
    plain.init(params, h, xs, key=jax.random.PRNGKey(0))
  with pytest.raises(ValueError, match="window"):
    jbptt.trainer(step_loss, optax.sgd(0.1), k1=2, k2=Adaptive(0.1, (2, 4)),
                  losses="window")
  with pytest.raises(ValueError, match="k2"):
    jbptt.trainer(step_loss, optax.sgd(0.1), k1=2, k2="x")


# Trainer --------------------------------------------------------------------

SGD = optax.sgd(0.1)
N_STREAM = 24

# (k1, max, mean, losses)
TRAINER_RANDOMIZED = [
    (2, 6, 2.0, "new"),   # k1 < max
    (4, 3, 3.0, "new"),   # k1 > max
    (5, 4, 2.0, "last"),  # k1 > max, 24 not a multiple of 5
    (4, 4, 3.0, "window"),
]


def _stream_params():
  return init_params(), carry0(), data(N_STREAM)


@pytest.mark.parametrize("stored", [False, True], ids=["recompute", "stored"])
@pytest.mark.parametrize("k1,max_,mean,losses", TRAINER_RANDOMIZED)
def test_trainer_randomized_matches_reference(k1, max_, mean, losses, stored):
  params, h, xs = _stream_params()
  key = jax.random.PRNGKey(11)
  gradient = jbptt.StoredStates() if stored else jbptt.Recompute()
  tr = jbptt.trainer(step_loss, SGD, k1=k1, k2=Randomized(mean, max_),
                     losses=losses, gradient=gradient)
  state, metrics = tr.update(tr.init(params, h, xs, key=key), xs)
  mult = ref.artbp_mult(key, mean, max_)
  run = ref.train_stored if stored else ref.train
  want, want_losses, want_carry = run(step_loss, SGD, params, h, xs, k1,
                                      max_, losses, mult=mult)
  assert_trees_close(state.params, want, atol=1e-9)
  assert_trees_close(state.carry, want_carry, atol=1e-9)
  valid = np.asarray(metrics.valid)
  np.testing.assert_allclose(np.asarray(metrics.loss)[valid], want_losses,
                             rtol=0, atol=1e-9)
  ends = range(k1, N_STREAM + 1, k1)
  assert list(np.asarray(metrics.k2)[valid]) == [
      ref.artbp_realized(mult, t, max_) for t in ends]


@pytest.mark.parametrize("stored", [False, True], ids=["recompute", "stored"])
def test_trainer_randomized_chunks(stored):
  """Two chunks of different lengths train as one call (the draws follow the
  stream step, not the call)."""
  k1, max_, mean = 2, 6, 2.0
  params, h, xs = _stream_params()
  key = jax.random.PRNGKey(11)
  gradient = jbptt.StoredStates() if stored else jbptt.Recompute()
  tr = jbptt.trainer(step_loss, SGD, k1=k1, k2=Randomized(mean, max_),
                     gradient=gradient)
  state0 = tr.init(params, h, xs, key=key)
  whole, _ = tr.update(state0, xs)
  cut = 9
  first, _ = tr.update(state0, tree_map(lambda a: a[:cut], xs))
  second, _ = tr.update(first, tree_map(lambda a: a[cut:], xs))
  assert_trees_close(second.params, whole.params, atol=1e-12)
  assert_trees_close(second.carry, whole.carry, atol=1e-12)


# (k1, k2, losses, resets)
BURN_IN_CASES = [
    (2, 5, "new", False),    # k1 < k2
    (3, 6, "window", True),  # k1 < k2, resets
    (4, 3, "new", False),    # k1 > k2
    (4, 4, "last", True),    # k1 = k2, resets
]


@pytest.mark.parametrize("burn_in", [1, 3])
@pytest.mark.parametrize("k1,k2,losses,with_resets", BURN_IN_CASES)
def test_trainer_burn_in_matches_reference(k1, k2, losses, with_resets,
                                           burn_in):
  params, h, xs = _stream_params()
  resets = reset_mask(N_STREAM) if with_resets else None
  tr = jbptt.trainer(step_loss, SGD, k1=k1, k2=k2, losses=losses,
                     gradient=jbptt.Recompute(burn_in=burn_in))
  state, metrics = tr.update(tr.init(params, h, xs, resets), xs, resets)
  want, want_losses, want_carry = ref.train(
      step_loss, SGD, params, h, xs, k1, k2, losses, resets=resets,
      burn_in=burn_in)
  assert_trees_close(state.params, want, atol=1e-9)
  assert_trees_close(state.carry, want_carry, atol=1e-9)
  valid = np.asarray(metrics.valid)
  np.testing.assert_allclose(np.asarray(metrics.loss)[valid], want_losses,
                             rtol=0, atol=1e-9)


def test_trainer_burn_in_with_randomized():
  k1, max_, mean, burn_in = 2, 5, 2.0, 3
  params, h, xs = _stream_params()
  key = jax.random.PRNGKey(4)
  tr = jbptt.trainer(step_loss, SGD, k1=k1, k2=Randomized(mean, max_),
                     gradient=jbptt.Recompute(burn_in=burn_in))
  state, _ = tr.update(tr.init(params, h, xs, key=key), xs)
  want, _, _ = ref.train(step_loss, SGD, params, h, xs, k1, max_,
                         mult=ref.artbp_mult(key, mean, max_),
                         burn_in=burn_in)
  assert_trees_close(state.params, want, atol=1e-9)


# (a, delta, expected k2); a changes little under sgd(1e-4).
TRAINER_ADAPTIVE = [(0.3, 0.3, 2), (0.8, 0.33, 6), (0.9, 0.73, 4)]


@pytest.mark.parametrize("a,delta,want_k2", TRAINER_ADAPTIVE)
def test_trainer_adaptive_linear(a, delta, want_k2):
  assert expected_k2(a, delta) == want_k2
  k1, n = 2, N_STREAM
  opt = optax.sgd(1e-4)
  xs = jax.random.normal(jax.random.PRNGKey(2), (n,))
  h = jnp.float64(0.5)
  a = jnp.float64(a)
  tr = jbptt.trainer(_linear_step, opt, k1=k1, k2=Adaptive(delta, CHOICES))
  state, metrics = tr.update(tr.init(a, h, xs), xs)
  valid = np.asarray(metrics.valid)
  k2s = [int(k) for k in np.asarray(metrics.k2)[valid]]
  assert k2s == [want_k2] * (n // k1)
  assert int(state.truncation.k2) == want_k2
  want, _, _ = ref.train(_linear_step, opt, a, h, xs, k1, CHOICES[-1],
                         k2_of_update=k2s)
  assert abs(float(state.params - a)) > 1e-5  # it trained
  np.testing.assert_allclose(state.params, want, rtol=0, atol=1e-10)


def test_burn_in_changes_nothing_with_fixed_params():
  # The refreshed start state is the stored one when params are fixed.
  xs, h, p = data(11), carry0(), init_params()
  for k1, k2 in ((2, 5), (4, 3)):
    grads = [jax.grad(lambda p, g=g: jbptt.truncated_loss(
        step_loss, k1=k1, k2=k2, gradient=g)(p, h, xs)[0])(p)
        for g in (jbptt.Recompute(), jbptt.Recompute(burn_in=4))]
    assert_trees_close(grads[0], grads[1], atol=0)


@pytest.mark.parametrize("burn_in", [-1, 1.5, True])
def test_bad_burn_in(burn_in):
  with pytest.raises(ValueError, match=r"burn_in=\.\.\.\) must be a "
                     rf"non-negative int .*, got burn_in={burn_in!r}\."):
    jbptt.trainer(step_loss, optax.sgd(0.1), k1=2, k2=2,
                  gradient=jbptt.Recompute(burn_in=burn_in))


def test_randomized_draws_do_not_depend_on_x64():
  # A run resumed, or checked, under the other precision draws the same
  # truncation points.
  from jbptt._src import truncation

  rule = Randomized(3, 40)
  key = jax.random.key(11)
  t, d = jnp.arange(1, 200)[:, None], jnp.arange(1, 40)[None, :]
  draws = []
  for x64 in (False, True):
    with jax.enable_x64(x64):
      draws.append(np.asarray(truncation.multipliers(rule, key, t, d)) == 0)
  np.testing.assert_array_equal(draws[0], draws[1])
  assert 0.25 < draws[0].mean() < 0.42  # c = 1/3

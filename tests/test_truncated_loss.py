"""truncated_loss against the plain-loop reference and the known special cases."""

import inspect

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized

import jbptt

import reference as ref
from conftest import (
  CASES,
  NOTHING,
  assert_trees_close,
  assert_unrolled,
  carry0,
  data,
  full_grad,
  full_loss,
  init_params,
  max_diff,
  scans,
  step_loss,
)

tree_map = jax.tree_util.tree_map


def loss_grad(f, *args, **kwargs):
  """The jitted gradient of ``f(params, *args, **kwargs)[0]`` (a loss): one
  compilation, where an eager gradient compiles every operation on its own.
  Eager evaluation is checked in MatchesReferenceTest."""
  return jax.jit(jax.grad(lambda p: f(p, *args, **kwargs)[0]))

# Checked with and without jit: k1 < k2 (k1 dividing k2 or not), k1 = k2
# with a tail, k1 > k2; one of each losses value. The others with jit only.
EAGER_CASES = [(9, 2, 5, "new"), (9, 3, 6, "window"), (10, 4, 4, "window"),
               (7, 3, 2, "last")]


def named(cases):
  return [(f"_n{n}_k1_{k1}_k2_{k2}_{losses}", n, k1, k2, losses)
          for n, k1, k2, losses in cases]


class MatchesReferenceTest(chex.TestCase):
  """The loss, gradient and final carry of the plain-loop reference."""

  def check(self, n, k1, k2, losses):
    xs, h, params = data(n), carry0(), init_params()
    f = jbptt.truncated_loss(step_loss, k1=k1, k2=k2, losses=losses)
    vg = self.variant(jax.value_and_grad(f, has_aux=True))
    (loss, final), grad = vg(params, h, xs)
    want_loss, want_grad, want_final = ref.truncated_loss(
        step_loss, params, h, xs, k1, k2, losses)
    np.testing.assert_allclose(loss, want_loss, rtol=1e-10)
    assert_trees_close(grad, want_grad)
    assert_trees_close(final, want_final)

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.named_parameters(*named(EAGER_CASES))
  def test_with_and_without_jit(self, n, k1, k2, losses):
    self.check(n, k1, k2, losses)

  @chex.variants(with_jit=True)
  @parameterized.named_parameters(
      *named(c for c in CASES if c not in EAGER_CASES))
  def test_with_jit(self, n, k1, k2, losses):
    self.check(n, k1, k2, losses)


@pytest.mark.parametrize("n", [1, 5, 12])
def test_n_n_is_full_bptt(n, params):
  xs, h = data(n), carry0()
  want = full_grad(params, h, xs)
  got = loss_grad(jbptt.truncated_loss(step_loss, k1=n, k2=n), h, xs)(params)
  assert_trees_close(got, want)
  # k2 beyond the sequence changes nothing either.
  f = jbptt.truncated_loss(step_loss, k1=n, k2=3 * n)
  assert_trees_close(loss_grad(f, h, xs)(params), want)


def test_one_n_is_the_full_gradient_of_each_step(params):
  n = 7
  xs, h = data(n), carry0()

  def loss_at(p, tau):
    def body(h, x):
      return step_loss(p, h, x)
    _, losses = jax.lax.scan(body, h, xs)
    return losses[tau]

  per_step = jax.jit(jax.vmap(jax.grad(loss_at), in_axes=(None, 0)))(
      params, jnp.arange(n))
  want = tree_map(lambda g: g.mean(0), per_step)
  got = loss_grad(jbptt.truncated_loss(step_loss, k1=1, k2=n), h, xs)(params)
  assert_trees_close(got, want)


@pytest.mark.parametrize("n,k", [(12, 4), (12, 3), (6, 1)])
def test_k_k_is_chunking_with_stop_gradient(n, k, params):
  xs, h = data(n), carry0()

  def chunked(p):
    total, carry = 0.0, h
    for start in range(0, n, k):
      piece = tree_map(lambda a: a[start:start + k], xs)
      carry = jax.lax.stop_gradient(carry)
      loss, carry = full_loss(p, carry, piece)
      total += loss * k
    return total / n

  want = jax.jit(jax.grad(chunked))(params)
  got = loss_grad(jbptt.truncated_loss(step_loss, k1=k, k2=k), h, xs)(params)
  assert_trees_close(got, want)


def test_truncation_changes_the_gradient(params):
  """Guards the tests above: a truncated gradient differs from BPTT."""
  xs, h = data(10), carry0()
  full = full_grad(params, h, xs)
  trunc = loss_grad(jbptt.truncated_loss(step_loss, k1=2, k2=2), h, xs)(
      params)
  assert max_diff(full, trunc) > 1e-3


def test_value_is_mean_sequence_loss_for_new(params):
  xs, h = data(9), carry0()
  want, want_h = full_loss(params, h, xs)
  for k1, k2 in [(2, 5), (4, 4), (5, 2)]:
    f = jax.jit(jbptt.truncated_loss(step_loss, k1=k1, k2=k2))
    loss, final = f(params, h, xs)
    np.testing.assert_allclose(loss, want, rtol=1e-12)
    assert_trees_close(final, want_h)


def test_final_carry_carries_no_gradient(params):
  xs, h = data(6), carry0()
  f = jbptt.truncated_loss(step_loss, k1=3, k2=3)
  g = jax.jit(jax.grad(lambda p: jnp.sum(f(p, h, xs)[1])))(params)
  assert max(float(jnp.max(jnp.abs(x))) for x in jax.tree_util.tree_leaves(g)) == 0


@pytest.mark.parametrize("k1,k2", [(3, 3), (2, 5), (4, 2)])
def test_vmap_over_a_batch(k1, k2, params):
  n = 8
  u, y = data(n, batch=3)
  per_example_xs = (jnp.swapaxes(u, 0, 1)[:, :, None],
                    jnp.swapaxes(y, 0, 1)[:, :, None])
  h = carry0(batch=3)[:, None]  # (batch, 1, H): each example a batch of one
  f = jbptt.truncated_loss(step_loss, k1=k1, k2=k2)
  grads = jax.jit(jax.vmap(jax.grad(lambda p, h, xs: f(p, h, xs)[0]),
                           in_axes=(None, 0, 0)))(params, h, per_example_xs)
  for i in range(3):
    xs_i = tree_map(lambda a: a[i], per_example_xs)
    _, want, _ = ref.truncated_loss(step_loss, params, h[i], xs_i, k1, k2)
    assert_trees_close(tree_map(lambda g: g[i], grads), want)
  # The batched call averages the per-example losses, so its gradient is
  # the mean of the per-example gradients.
  batched = loss_grad(f, carry0(batch=3), (u, y))(params)
  assert_trees_close(batched, tree_map(lambda g: g.mean(0), grads))


# k1 < k2, k1 = k2 with n not a multiple of k1, k1 > k2; every losses value.
@pytest.mark.parametrize("n,k1,k2,losses", [
    (10, 2, 5, "new"), (10, 2, 5, "last"), (11, 4, 4, "window"),
    (9, 5, 2, "new"), (9, 5, 2, "window")])
def test_resets_match_reference(n, k1, k2, losses, params):
  xs, h = data(n), carry0()
  resets = np.zeros((n, 2), bool)
  resets[3, 0] = resets[7, 1] = resets[8, 0] = True
  h0 = jnp.zeros_like(h)
  f = jbptt.truncated_loss(step_loss, k1=k1, k2=k2, losses=losses)
  (loss, final), grad = jax.jit(jax.value_and_grad(f, has_aux=True))(
      params, h, xs, resets=resets, initial_carry=h0)
  want_loss, want_grad, want_final = ref.truncated_loss(
      step_loss, params, h, xs, k1, k2, losses, resets=resets, h0=h0)
  np.testing.assert_allclose(loss, want_loss, rtol=1e-10)
  assert_trees_close(grad, want_grad)
  assert_trees_close(final, want_final)


@pytest.mark.parametrize("k1,k2", [(4, 4), (2, 8), (4, 1), (12, 12)])
def test_reset_at_update_boundary_equals_separate_pieces(k1, k2, params):
  """A reset cuts the sequence: the gradient is that of the two pieces."""
  n, cut = 12, 4
  xs, h = data(n), carry0()
  resets = np.zeros((n,), bool)
  resets[cut] = True
  f = jbptt.truncated_loss(step_loss, k1=k1, k2=k2)
  got = loss_grad(f, h, xs, resets=resets)(params)
  g1 = loss_grad(f, h, tree_map(lambda a: a[:cut], xs))(params)
  g2 = loss_grad(f, h, tree_map(lambda a: a[cut:], xs))(params)
  # With k1 dividing the cut the pieces' updates line up with the whole's,
  # except that k1 = n makes one update of the whole sequence.
  want = tree_map(lambda a, b: (a * cut + b * (n - cut)) / n, g1, g2)
  assert_trees_close(got, want)


@pytest.mark.parametrize("n,k1,k2", [(7, 2, 5), (7, 3, 2)])
def test_gradient_with_respect_to_xs(n, k1, k2, params):
  xs, h = data(n), carry0()
  f = jbptt.truncated_loss(step_loss, k1=k1, k2=k2, losses="window")
  got = jax.jit(jax.grad(lambda xs: f(params, h, xs)[0]))(xs)
  want = ref.truncated_grad_xs(step_loss, params, h, xs, k1, k2, "window")
  assert_trees_close(got, want)


def test_integer_inputs_get_float0_cotangents(params):
  """A token stream: the integer leaf gets no gradient, the rest do."""
  n = 9
  tokens = jax.random.randint(jax.random.PRNGKey(3), (n, 2), 0, 5)
  _, y = data(n)
  table = jax.random.normal(jax.random.PRNGKey(4), (5, 3))

  def token_loss(p, h, x):
    tok, target = x
    return step_loss(p, h, (table[tok], target))

  h = carry0()
  f = jbptt.truncated_loss(token_loss, k1=2, k2=5)
  grad = loss_grad(f, h, (tokens, y))(params)
  g = jbptt.truncated_loss(step_loss, k1=2, k2=5)
  want = loss_grad(g, h, (table[tokens], y))(params)
  assert_trees_close(grad, want)
  d_tok, d_y = jax.jit(jax.grad(lambda xs: f(params, h, xs)[0],
                                allow_int=True))((tokens, y))
  assert d_tok.dtype == jax.dtypes.float0
  assert d_y.shape == y.shape and float(jnp.max(jnp.abs(d_y))) > 0


@pytest.mark.parametrize("n,k1,k2,losses", [
    (9, 2, 5, "window"), (12, 4, 7, "new"), (10, 4, 4, "last"), (7, 3, 2, "new")])
def test_remat_gives_the_same_gradient(n, k1, k2, losses, params):
  """remat trades compute for memory; values and gradients are unchanged
  (the default path is checked against the reference above)."""
  xs, h = data(n), carry0()
  resets = np.zeros((n, 2), bool)
  resets[4, 1] = True
  kw = dict(k1=k1, k2=k2, losses=losses)
  plain = jbptt.truncated_loss(step_loss, **kw)
  remat = jbptt.truncated_loss(
      step_loss, gradient=jbptt.Recompute(remat=NOTHING), **kw)
  vg = lambda f: jax.jit(jax.value_and_grad(
      lambda p: f(p, h, xs, resets=resets)[0]))(params)
  (v1, g1), (v2, g2) = vg(plain), vg(remat)
  np.testing.assert_allclose(v1, v2, rtol=1e-12)
  assert_trees_close(g1, g2, atol=1e-12, rtol=1e-10)
  assert max_diff(g1, full_grad(params, h, xs)) > 1e-6


@pytest.mark.parametrize("n,k1,k2,losses,unroll", [
    (9, 2, 5, "window", 3), (13, 4, 4, "new", 3), (7, 3, 2, "last", 2),
    (6, 2, 9, "new", 4), (13, 2, 5, "window", 8),  # 8: more steps than k2
    (13, 4, 4, "new", True)])
def test_unroll_gives_the_same_gradient(n, k1, k2, losses, unroll, params):
  """unroll reaches the per-step scans; values and gradients are unchanged."""
  xs, h = data(n), carry0()
  resets = np.zeros((n, 2), bool)
  resets[4, 0] = True
  kw = dict(k1=k1, k2=k2, losses=losses)
  plain = jbptt.truncated_loss(step_loss, unroll=1, **kw)
  unrolled = jbptt.truncated_loss(step_loss, unroll=unroll, **kw)
  vg = lambda f: jax.jit(jax.value_and_grad(
      lambda p, xs: f(p, h, xs, resets=resets)[0], argnums=(0, 1)))
  (v1, g1), (v2, g2) = vg(plain)(params, xs), vg(unrolled)(params, xs)
  np.testing.assert_allclose(v1, v2, rtol=1e-12)
  assert_trees_close(g1, g2, atol=1e-12, rtol=1e-10)
  jaxpr = jax.make_jaxpr(lambda p: unrolled(p, h, xs, resets=resets))(params)
  assert_unrolled(jaxpr, unroll, n_loops=int(k1 >= k2 and n >= k1))
  # The reverse passes too; for k1 >= k2 the loop over chunks, and its
  # transpose, keep unroll 1.
  jaxpr = jax.make_jaxpr(jax.grad(lambda p: unrolled(p, h, xs)[0]))(params)
  assert_unrolled(jaxpr, unroll, n_loops=2 * int(k1 >= k2 and n >= k1))


@pytest.mark.parametrize("k1,k2", [(2, 5), (4, 4)])
def test_default_unroll_is_one(k1, k2, params):
  """unroll defaults to 1, stated in the signature and not read from the
  backend: every scan of the loss and of its gradient has unroll 1."""
  default = inspect.signature(jbptt.truncated_loss).parameters["unroll"]
  assert default.default == 1
  f = jbptt.truncated_loss(step_loss, k1=k1, k2=k2)
  xs, h = data(13), carry0()
  found = scans(jax.make_jaxpr(jax.grad(lambda p: f(p, h, xs)[0]))(params))
  assert len(found) > 1 and {u for _, u in found} == {1}, found

"""Flax adapters (Linen and NNX cells, LSTM tuple carries) and layers."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import jbptt
import jbptt.flax as jf

import reference as ref
from conftest import D, assert_trees_close, feed, max_diff

tree_map = jax.tree_util.tree_map
LINEN_CELLS = [nn.LSTMCell, nn.OptimizedLSTMCell, nn.GRUCell, nn.MGUCell,
               nn.SimpleCell]


def seq(n, batch=2, seed=0):
  k = jax.random.split(jax.random.PRNGKey(seed), 2)
  return (jax.random.normal(k[0], (n, batch, D)),
          jax.random.normal(k[1], (n, batch, 5)))


def mse(params, y, z):
  del params  # the read-out is the identity
  return jnp.mean((y - z) ** 2)


# One LSTM step for the tests below, so that the reference's jitted pieces
# (cached per step function and shapes) are compiled once for all of them.
LSTM = nn.LSTMCell(features=5, param_dtype=jnp.float64)
LSTM_STEP = jbptt.cell_loss(jf.linen_cell(LSTM), mse)


@pytest.mark.parametrize("n,k1,k2,losses", [
    (9, 2, 5, "new"), (10, 4, 4, "window"), (7, 3, 2, "last")])
def test_linen_lstm_tuple_carry_matches_reference(n, k1, k2, losses):
  variables, carry = jf.init_linen_cell(LSTM, jax.random.key(0), (2, D))
  assert isinstance(carry, tuple) and len(carry) == 2
  carry = tree_map(lambda c: c + 0.1, carry)
  step = LSTM_STEP
  xs = seq(n)
  f = jbptt.truncated_loss(step, k1=k1, k2=k2, losses=losses)
  (loss, final), grad = jax.jit(jax.value_and_grad(f, has_aux=True))(
      variables, carry, xs)
  want_loss, want_grad, want_final = ref.truncated_loss(
      step, variables, carry, xs, k1, k2, losses)
  np.testing.assert_allclose(loss, want_loss, rtol=1e-9)
  assert_trees_close(grad, want_grad, atol=1e-9)
  assert_trees_close(final, want_final)


def test_linen_lstm_trainer_matches_reference():
  variables, carry = jf.init_linen_cell(LSTM, jax.random.key(1), (2, D))
  step = LSTM_STEP
  xs = seq(11)
  opt = optax.adam(0.02)
  want_params, want_losses, want_carry = ref.train(
      step, opt, variables, carry, xs, 2, 5)
  tr = jbptt.trainer(step, opt, k1=2, k2=5)
  state, losses = feed(tr, tr.init(variables, carry, xs), xs, [5])
  assert_trees_close(state.params, want_params, atol=1e-9)
  assert_trees_close(state.carry, want_carry, atol=1e-9)
  np.testing.assert_allclose(losses, want_losses, rtol=1e-9)


@pytest.mark.parametrize("cell_type", LINEN_CELLS)
def test_linen_cells_unroll_like_nn_rnn(cell_type):
  module = cell_type(features=6)
  variables, carry = jf.init_linen_cell(module, jax.random.key(0), (2, D))
  u = seq(7)[0].astype(jnp.float32)
  _, ys = jbptt.truncated_unroll(jf.linen_cell(module), variables, carry, u,
                                 k=None)
  want = nn.RNN(module, time_major=True).apply(
      {"params": {"cell": variables["params"]}}, u, initial_carry=carry)
  np.testing.assert_allclose(ys, want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("cell_type", [nnx.LSTMCell, nnx.GRUCell])
def test_nnx_cell_matches_reference(cell_type):
  module = cell_type(D, 5, rngs=nnx.Rngs(0), param_dtype=jnp.float64)
  cell, params = jf.nnx_cell(module)
  carry = module.initialize_carry((2, D), nnx.Rngs(1))
  carry = tree_map(lambda c: c.astype(jnp.float64), carry)
  step = jbptt.cell_loss(cell, mse)
  xs = seq(8)
  f = jbptt.truncated_loss(step, k1=3, k2=5)
  (loss, _), grad = jax.jit(jax.value_and_grad(f, has_aux=True))(
      params, carry, xs)
  want_loss, want_grad, _ = ref.truncated_loss(step, params, carry, xs, 3, 5)
  np.testing.assert_allclose(loss, want_loss, rtol=1e-9)
  assert_trees_close(grad, want_grad, atol=1e-9)
  # The values are the module's own.
  _, ys = jbptt.truncated_unroll(cell, params, carry, xs[0], k=None)
  want = nnx.RNN(module, time_major=True)(xs[0], initial_carry=carry)
  np.testing.assert_allclose(ys, want, rtol=1e-9)


def layer_vs_truncated_loss(n, k):
  """The gradient the layer gives equals truncated_loss(k, k)'s."""
  module = nn.LSTMCell(features=5, param_dtype=jnp.float64)
  inputs, targets = seq(n)
  batch_major = jnp.swapaxes(inputs, 0, 1)
  layer = jf.TruncatedRNN(module, k=k)
  variables = layer.init(jax.random.key(0), batch_major)
  carry = module.initialize_carry(jax.random.key(0), (2, D))

  def model_loss(v):
    ys = layer.apply(v, batch_major, initial_carry=carry)
    return jnp.mean((jnp.swapaxes(ys, 0, 1) - targets) ** 2)

  step = jbptt.cell_loss(jf.linen_cell(module), mse)
  f = jbptt.truncated_loss(step, k1=k, k2=k)
  cell_params = {"params": variables["params"]["cell"]}
  want = jax.jit(jax.grad(lambda p: f(p, carry, (inputs, targets))[0]))(
      cell_params)
  got = jax.jit(jax.grad(model_loss))(variables)
  return got["params"]["cell"], want["params"]


def test_linen_layer_is_nn_rnn_forward_and_tbptt_backward():
  module = nn.LSTMCell(features=5)
  x = jax.random.normal(jax.random.key(3), (2, 12, D), jnp.float32)
  layer = jf.TruncatedRNN(module, k=4)
  variables = jax.jit(layer.init)(jax.random.key(0), x)
  rnn = nn.RNN(module)
  assert jax.tree_util.tree_structure(variables) == jax.tree_util.tree_structure(
      jax.eval_shape(rnn.init, jax.random.key(0), x))
  np.testing.assert_allclose(jax.jit(layer.apply)(variables, x),
                             jax.jit(rnn.apply)(variables, x), rtol=1e-6)
  carry, ys = jax.jit(lambda v, x: layer.apply(v, x, return_carry=True))(
      variables, x)
  assert ys.shape == (2, 12, 5) and carry[1].shape == (2, 5)

  got, want = layer_vs_truncated_loss(12, 4)
  assert_trees_close(got, want, atol=1e-10)
  full, _ = layer_vs_truncated_loss(12, 12)
  assert max_diff(full, got) > 1e-4  # the cut is real


def test_nnx_layer_is_nnx_rnn_forward_and_truncated_backward():
  x = jax.random.normal(jax.random.key(3), (2, 12, D), jnp.float32)
  cell = nnx.LSTMCell(D, 5, rngs=nnx.Rngs(0))
  layer = jf.NNXTruncatedRNN(cell, k=4)
  np.testing.assert_allclose(layer(x), nnx.RNN(cell)(x), rtol=1e-6)

  @nnx.jit
  def grads(model):
    return nnx.grad(lambda m: jnp.mean(m(x) ** 2))(model)

  g_trunc = grads(layer)
  g_full = grads(nnx.RNN(cell))
  # Reference: jbptt.truncated_unroll on the pure cell.
  pure, params = jf.nnx_cell(cell)
  carry = cell.initialize_carry((2, D), nnx.Rngs(carry=0))
  want = jax.jit(jax.grad(lambda p: jnp.mean(jbptt.truncated_unroll(
      pure, p, carry, jnp.swapaxes(x, 0, 1), k=4)[1] ** 2)))(params)
  assert_trees_close(nnx.state(g_trunc, nnx.Param)["cell"], want, atol=1e-7)
  assert max_diff(nnx.state(g_full, nnx.Param)["cell"], want) > 1e-5


def test_adapters_reject_wrong_modules():
  with pytest.raises(TypeError, match="flax.linen Module"):
    jf.linen_cell(lambda p, h, x: (h, x))
  with pytest.raises(TypeError, match="flax.nnx Module"):
    jf.nnx_cell(nn.LSTMCell(3))
  with pytest.raises(ValueError, match="k must be a positive int"):
    jf.NNXTruncatedRNN(nnx.LSTMCell(D, 5, rngs=nnx.Rngs(0)), k=0)

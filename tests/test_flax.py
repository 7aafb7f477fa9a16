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
from conftest import D, H, assert_trees_close, feed, max_diff

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


# -- the layers against nn.RNN / nnx.RNN -------------------------------------
#
# Shapes: batch 2, features 3, hidden 4, time 7; lengths (5, 3) leave padding
# for both sequences, so that k = 5 (at least every length, less than the
# padded length) runs the masked cuts and must still cut nothing.

T, LENGTHS = 7, (5, 3)
F64 = dict(param_dtype=jnp.float64)


def inputs(shape=(2, T, D), seed=3):
  return jax.random.normal(jax.random.key(seed), shape, jnp.float64)


def weights(ys):
  """Fixed weights of a linear loss on the outputs."""
  return tree_map(lambda y: jax.random.normal(jax.random.key(9), y.shape,
                                              y.dtype), ys)


def plain(tree):
  """``tree`` with typed PRNG keys as their key data (to compare)."""
  return tree_map(lambda a: jax.random.key_data(a) if jnp.issubdtype(
      jnp.result_type(a), jax.dtypes.prng_key) else a, tree)


def linear_loss(carry, ys, mask=None):
  """``sum(w * ys)`` (where ``mask``, if given) plus half the final carry."""
  w = weights(ys)
  if mask is not None:
    w = w * mask.reshape(mask.shape + (1,) * (ys.ndim - mask.ndim))
  return jnp.sum(w * ys) + 0.5 * sum(
      jnp.sum(c) for c in jax.tree_util.tree_leaves(carry))


def test_signatures_are_flax_s():
  """Every argument of the installed Flax layers, same defaults, plus k."""
  import dataclasses
  import inspect

  def fields(cls):
    return [(f.name, f.default) for f in dataclasses.fields(cls)
            if f.name not in ("parent", "name")]

  def params(f, drop=("self",)):
    return [(p.name, p.default, p.kind) for p in
            inspect.signature(f).parameters.values() if p.name not in drop]

  assert fields(jf.TruncatedRNN) == [fields(nn.RNN)[0], ("k", dataclasses.MISSING),
                                     *fields(nn.RNN)[1:]]
  assert params(jf.TruncatedRNN.__call__) == params(nn.RNN.__call__)
  ours = params(jf.NNXTruncatedRNN.__init__)
  assert ours[1][0] == "k" and ours[:1] + ours[2:] == params(nnx.RNN.__init__)
  assert params(jf.NNXTruncatedRNN.__call__) == params(nnx.RNN.__call__)


def run_linen(layer, variables, x, carry, call, *, mask=None, rngs=None,
              mutable=False):
  """Outputs, carry, updated collections and the gradients wrt
  ``(variables, x, carry)`` of :func:`linear_loss`, jitted."""

  def loss(v, x, c):
    out = layer.apply(v, x, initial_carry=c, return_carry=True, rngs=rngs,
                      mutable=mutable, **call)
    (c, ys), updates = out if mutable else (out, {})
    return linear_loss(c, ys, mask), (c, ys, updates)

  (_, aux), grads = jax.jit(jax.value_and_grad(
      loss, argnums=(0, 1, 2), has_aux=True))(variables, x, carry)
  return aux, grads


def parity_case(shape, call):
  """The inputs and the call arguments (``seq_lengths`` as an array) of a
  parity case."""
  call = dict(call)
  if "seq_lengths" in call:
    call["seq_lengths"] = jnp.array(call["seq_lengths"])
  return inputs(shape), call


LINEN_PARITY = [
    # (cell, ctor kwargs, call kwargs, input shape, k)
    ("lstm", {"reverse": True, "keep_order": True}, {"seq_lengths": LENGTHS},
     (2, T, D), 5),
    ("gru", {"time_major": True}, {"seq_lengths": LENGTHS, "reverse": True},
     (T, 2, D), 5),
    ("gru", {"unroll": 2}, {}, (2, 2, T, D), None),  # two batch axes
    ("conv", {}, {"seq_lengths": LENGTHS}, (2, T, 3, 3, 1), 5),  # 3 feature axes
]


def linen_cell_of(name):
  return {"lstm": lambda: nn.LSTMCell(H, **F64),
          "gru": lambda: nn.GRUCell(H, **F64),
          "conv": lambda: nn.ConvLSTMCell(2, (2, 2), **F64)}[name]()


@pytest.mark.parametrize("name,ctor,call,shape,k", LINEN_PARITY)
def test_linen_layer_equals_nn_rnn(name, ctor, call, shape, k):
  x, call = parity_case(shape, call)
  ours = jf.TruncatedRNN(linen_cell_of(name), k, **ctor)
  flax_rnn = nn.RNN(linen_cell_of(name), **ctor)
  variables = flax_rnn.init(jax.random.key(0), x, **call)
  carry = flax_rnn.apply(variables, x, return_carry=True, **call)[0]
  carry = tree_map(lambda c: c + 0.3, carry)  # a carry of our own
  got = run_linen(ours, variables, x, carry, call)
  want = run_linen(flax_rnn, variables, x, carry, call)
  assert_trees_close(got, want, atol=1e-12)
  if k is None:  # the default initial carry, from init_key
    key = dict(init_key=jax.random.key(5), **call)
    np.testing.assert_array_equal(ours.apply(variables, x, **key),
                                  flax_rnn.apply(variables, x, **key))


class DropoutBatchNormCell(nn.RNNCellBase):
  """A GRU with dropout and batch normalization on its input."""

  param_dtype = jnp.float64  # init_linen_cell's example input's dtype

  @nn.compact
  def __call__(self, carry, x):
    x = nn.Dropout(0.3, deterministic=False)(x)
    x = nn.BatchNorm(use_running_average=False, **F64)(x)
    return nn.GRUCell(H, **F64)(carry, x)

  @nn.nowrap
  def initialize_carry(self, key, input_shape):
    return nn.GRUCell(H, parent=None, **F64).initialize_carry(key,
                                                             input_shape)

  @property
  def num_feature_axes(self):
    return 1


@pytest.mark.parametrize("split_dropout", [True, False])
def test_linen_layer_dropout_and_batch_stats_as_nn_rnn(split_dropout):
  """Collections and rngs as nn.RNN's, also with a cut (k=2); the batch
  statistics are kept per step (variable_axes), as nn.RNN can initialize
  them (not with variable_carry, which nn.RNN's init refuses)."""
  kw = dict(variable_axes={"batch_stats": 0},
            split_rngs={"params": False, "dropout": split_dropout})
  x = inputs()
  flax_rnn = nn.RNN(DropoutBatchNormCell(), **kw)
  rngs = {"params": jax.random.key(0), "dropout": jax.random.key(1)}
  variables = flax_rnn.init(rngs, x)
  assert set(variables) == {"params", "batch_stats"}
  assert_trees_close(jf.TruncatedRNN(DropoutBatchNormCell(), 2, **kw).init(
      rngs, x), variables, 0, 0)
  carry = jnp.full((2, H), 0.1)
  run = lambda layer: run_linen(layer, variables, x, carry, {},
                                rngs={"dropout": jax.random.key(2)},
                                mutable=["batch_stats"])
  (c, ys, updates), grads = run(flax_rnn)
  assert max_diff(updates, {"batch_stats": variables["batch_stats"]}) > 1e-3
  for k in (T, 2):
    (c2, ys2, updates2), grads2 = run(
        jf.TruncatedRNN(DropoutBatchNormCell(), k, **kw))
    assert_trees_close((c2, ys2, updates2), (c, ys, updates), atol=1e-12)
    if k == T:
      assert_trees_close(grads2, grads, atol=1e-12)
    else:
      assert max_diff(grads2[0]["params"], grads[0]["params"]) > 1e-4


def test_linen_layer_variable_carry_as_nn_rnn():
  """Batch statistics carried from step to step (variable_carry) advance
  as in nn.RNN, cut or not; nn.RNN cannot initialize them, so the
  variables come from the cell's own init."""
  x = inputs()
  carry = jnp.full((2, H), 0.1)
  cell_vars = DropoutBatchNormCell().init(
      {"params": jax.random.key(0), "dropout": jax.random.key(1)}, carry,
      x[:, 0])
  variables = {c: {"cell": tree_map(lambda a: a.astype(jnp.float64), v)}
               for c, v in cell_vars.items()}  # float32 statistics
  kw = dict(variable_carry="batch_stats",
            split_rngs={"params": False, "dropout": True})
  run = lambda layer: run_linen(layer, variables, x, carry, {},
                                rngs={"dropout": jax.random.key(2)},
                                mutable=["batch_stats"])
  want = run(nn.RNN(DropoutBatchNormCell(), **kw))
  got = run(jf.TruncatedRNN(DropoutBatchNormCell(), 3, **kw))
  assert max_diff(want[0][2], {"batch_stats": variables["batch_stats"]}) > 1e-3
  assert_trees_close(got[0], want[0], atol=1e-12)
  assert max_diff(got[1][0]["params"], want[1][0]["params"]) > 1e-4


def test_linen_layer_named_as_nn_rnn_inside_a_model():
  """Unnamed layers take nn.RNN's names, so a swap keeps every variable."""

  class Model(nn.Module):
    k: int | None

    @nn.compact
    def __call__(self, x):
      rnn = nn.RNN if self.k is None else (
          lambda cell: jf.TruncatedRNN(cell, self.k))
      y = rnn(nn.GRUCell(H, parent=None, **F64))(x)
      return nn.Dense(2, **F64)(rnn(nn.LSTMCell(H, parent=None, **F64))(y))

  x = inputs()
  want = Model(None).init(jax.random.key(0), x)
  got = Model(3).init(jax.random.key(0), x)
  assert set(got["params"]) == {"RNN_0", "RNN_1", "Dense_0"}
  assert_trees_close(got, want, 0, 0)


# -- the truncation against a plain loop -------------------------------------


def reference_loss(step, params, carry, x, lengths, k, reverse, keep_order):
  """:func:`linear_loss` of a truncated layer, written from the definition:
  one Python loop per sequence over its own valid steps, in processing order
  (from its last valid element with ``reverse``), the carry held constant
  entering steps k, 2k, ...; padding is never run."""
  ys_shape = (x.shape[0], x.shape[1], H)
  w = weights(jnp.zeros(ys_shape, x.dtype))
  total = 0.0
  for b, length in enumerate(lengths):
    h = tree_map(lambda c: c[b:b + 1], carry)
    order = range(length - 1, -1, -1) if reverse else range(length)
    for t, i in enumerate(order):
      if t > 0 and t % k == 0:
        h = jax.lax.stop_gradient(h)
      h, y = step(params, h, x[b:b + 1, i])
      position = t if reverse and not keep_order else i
      total = total + jnp.sum(w[b, position] * y[0])
    total = total + 0.5 * sum(jnp.sum(c) for c in jax.tree_util.tree_leaves(h))
  return total


def reference_grads(step, params, carry, x, lengths, k, reverse=False,
                    keep_order=False):
  f = lambda p, x, c: reference_loss(step, p, c, x, lengths, k, reverse,
                                     keep_order)
  return jax.jit(jax.grad(f, argnums=(0, 1, 2)))(params, x, carry)


def valid_mask(lengths, n=T):
  return jnp.arange(n)[None] < jnp.array(lengths)[:, None]


TRUNCATION = [
    # (k, reverse, keep_order, seq_lengths, time_major)
    (3, False, False, (7, 4), False),
    (2, True, True, (6, 3), False),
    (3, True, False, None, False),
]


@pytest.mark.parametrize("k,reverse,keep_order,lengths,time_major", TRUNCATION)
def test_linen_layer_truncation_matches_plain_loop(k, reverse, keep_order,
                                                   lengths, time_major):
  cell = nn.GRUCell(H, **F64)
  x = inputs()
  carry = tree_map(lambda c: c + 0.2, cell.initialize_carry(
      jax.random.key(0), (2, D)))
  call = {"reverse": reverse, "keep_order": keep_order}
  if lengths is not None:
    call["seq_lengths"] = jnp.array(lengths)
  mask = valid_mask(lengths or (T, T))
  layer = jf.TruncatedRNN(cell, k, time_major=time_major)
  layer_x = jnp.swapaxes(x, 0, 1) if time_major else x
  variables = layer.init(jax.random.key(1), layer_x)
  (_, grads) = run_linen(layer, variables, layer_x, carry, call,
                         mask=mask.T if time_major else mask)
  g_params, g_x, g_carry = grads
  if time_major:
    g_x = jnp.swapaxes(g_x, 0, 1)
  want = reference_grads(jf.linen_cell(cell),
                         {"params": variables["params"]["cell"]}, carry, x,
                         lengths or (T, T), k, reverse, keep_order)
  assert_trees_close(({"params": g_params["params"]["cell"]}, g_x, g_carry),
                     want, atol=1e-12)
  full = run_linen(jf.TruncatedRNN(cell, None, time_major=time_major),
                   variables, layer_x, carry, call,
                   mask=mask.T if time_major else mask)[1]
  assert max_diff(grads, full) > 1e-4  # the cut is real


def test_linen_bidirectional_equals_nn_and_truncates_each_direction():
  x, lengths = inputs(), jnp.array(LENGTHS)
  cells = lambda: (nn.GRUCell(H, **F64), nn.GRUCell(H, **F64))
  flax_bi = nn.Bidirectional(*(nn.RNN(c) for c in cells()))
  variables = flax_bi.init(jax.random.key(0), x, seq_lengths=lengths)
  carry = (jnp.full((2, H), 0.1), jnp.full((2, H), -0.2))
  call = {"seq_lengths": lengths}
  mask = valid_mask(LENGTHS)
  want = run_linen(flax_bi, variables, x, carry, call, mask=mask)
  for k in (5, 2):
    ours = nn.Bidirectional(*(jf.TruncatedRNN(c, k) for c in cells()))
    assert_trees_close(ours.init(jax.random.key(0), x, seq_lengths=lengths),
                       variables, 0, 0)
    (c, ys, _), grads = run_linen(ours, variables, x, carry, call, mask=mask)
    assert_trees_close((c, ys), want[0][:2], atol=1e-12)
    if k == 5:  # at least every length: nothing cut, padding included
      assert_trees_close(grads, want[1], atol=1e-12)
    else:  # each direction's cut is the plain loop's (tests above)
      assert max_diff(grads, want[1]) > 1e-4


# -- NNX ----------------------------------------------------------------------


class NNXDropoutCell(nnx.RNNCellBase):
  """A GRU with dropout and batch normalization on its input."""

  def __init__(self, rngs):
    self.drop = nnx.Dropout(0.3, rngs=rngs)
    self.norm = nnx.BatchNorm(D, rngs=rngs, **F64)
    self.gru = nnx.GRUCell(D, H, rngs=rngs, **F64)

  def __call__(self, carry, x):
    return self.gru(carry, self.norm(self.drop(x)))

  def initialize_carry(self, input_shape, rngs=None):
    return jnp.zeros(input_shape[:-1] + (H,), jnp.float64)

  @property
  def num_feature_axes(self):
    return 1


def nnx_cell_of(name):
  return {"lstm": lambda: nnx.LSTMCell(D, H, rngs=nnx.Rngs(0), **F64),
          "gru": lambda: nnx.GRUCell(D, H, rngs=nnx.Rngs(0), **F64),
          "drop": lambda: NNXDropoutCell(nnx.Rngs(0, dropout=1))}[name]()


def run_nnx(layer, x, carry, call, mask=None):
  """Outputs, carry, the layer's state after the call, and the gradients
  wrt ``(params, x, carry)`` of :func:`linear_loss`, jitted."""

  @nnx.jit
  def go(layer, x, carry):
    def loss(layer, x, c):
      c, ys = layer(x, initial_carry=c, return_carry=True, **call)
      return linear_loss(c, ys, mask), (c, ys)

    (_, aux), grads = nnx.value_and_grad(loss, argnums=(0, 1, 2),
                                         has_aux=True)(layer, x, carry)
    return aux, grads

  aux, (g_layer, g_x, g_carry) = go(layer, x, carry)
  return aux, plain(nnx.state(layer)), (nnx.state(g_layer, nnx.Param), g_x,
                                       g_carry)


NNX_PARITY = [
    # (cell, ctor kwargs, call kwargs, input shape, k)
    ("gru", {"reverse": True, "keep_order": True}, {"seq_lengths": LENGTHS},
     (2, T, D), 5),
    ("drop", {}, {}, (2, T, D), 2),  # rngs and batch stats carried, a cut
    ("drop", {"broadcast_rngs": "dropout"}, {"seq_lengths": LENGTHS},
     (2, T, D), 5),
    ("lstm", {"unroll": 3}, {}, (2, 2, T, D), None),  # two batch axes
]


@pytest.mark.parametrize("name,ctor,call,shape,k", NNX_PARITY)
def test_nnx_layer_equals_nnx_rnn(name, ctor, call, shape, k):
  x, call = parity_case(shape, call)
  ours = jf.NNXTruncatedRNN(nnx_cell_of(name), k, **ctor)
  flax_rnn = nnx.RNN(nnx_cell_of(name), **ctor)
  assert_trees_close(plain(nnx.state(ours)), plain(nnx.state(flax_rnn)), 0, 0)
  carry = tree_map(lambda c: c + 0.3, flax_rnn.cell.initialize_carry(
      x.shape[:1] + x.shape[2:] if not ctor.get("time_major")
      else x.shape[1:], nnx.Rngs(2)))
  if len(shape) == 4:
    carry = tree_map(lambda c: c + 0.3, flax_rnn.cell.initialize_carry(
        shape[:2] + shape[3:], nnx.Rngs(2)))
  got = run_nnx(ours, x, carry, call)
  want = run_nnx(flax_rnn, x, carry, call)
  assert_trees_close(got[:2], want[:2], atol=1e-12)
  if k is None or k >= 5:
    assert_trees_close(got[2], want[2], atol=1e-12)
  else:
    assert max_diff(got[2][0], want[2][0]) > 1e-4
  if name == "drop":  # the rng count and the batch statistics advanced
    assert max_diff(nnx.state(ours, nnx.BatchStat),
                    nnx.state(nnx_cell_of(name), nnx.BatchStat)) > 1e-3


@pytest.mark.parametrize("k,reverse,keep_order,lengths,time_major",
                         TRUNCATION[1:])
def test_nnx_layer_truncation_matches_plain_loop(k, reverse, keep_order,
                                                 lengths, time_major):
  cell = nnx.GRUCell(D, H, rngs=nnx.Rngs(0), **F64)
  x = inputs()
  carry = tree_map(lambda c: c + 0.2,
                   cell.initialize_carry((2, D), nnx.Rngs(2)))
  call = {"reverse": reverse, "keep_order": keep_order}
  if lengths is not None:
    call["seq_lengths"] = jnp.array(lengths)
  mask = valid_mask(lengths or (T, T))
  layer = jf.NNXTruncatedRNN(cell, k, time_major=time_major)
  layer_x = jnp.swapaxes(x, 0, 1) if time_major else x
  _, _, (g_params, g_x, g_carry) = run_nnx(
      layer, layer_x, carry, call, mask=mask.T if time_major else mask)
  if time_major:
    g_x = jnp.swapaxes(g_x, 0, 1)
  step, params = jf.nnx_cell(cell)
  want = reference_grads(step, params, carry, x, lengths or (T, T), k,
                         reverse, keep_order)
  assert_trees_close((g_params["cell"], g_x, g_carry), want, atol=1e-12)


def test_nnx_bidirectional_equals_nnx():
  x, lengths = inputs(), jnp.array(LENGTHS)
  carry = (jnp.full((2, H), 0.1), jnp.full((2, H), -0.2))
  call = {"seq_lengths": lengths}
  cells = lambda: (nnx.GRUCell(D, H, rngs=nnx.Rngs(0), **F64),
                   nnx.GRUCell(D, H, rngs=nnx.Rngs(1), **F64))
  want = run_nnx(nnx.Bidirectional(*(nnx.RNN(c) for c in cells())), x, carry,
                 call)
  got = run_nnx(nnx.Bidirectional(*(jf.NNXTruncatedRNN(c, 5)
                                    for c in cells())), x, carry, call)
  assert_trees_close(got, want, atol=1e-12)
  cut = run_nnx(nnx.Bidirectional(*(jf.NNXTruncatedRNN(c, 2)
                                    for c in cells())), x, carry, call)
  assert_trees_close(cut[:2], want[:2], atol=1e-12)
  assert max_diff(cut[2][0], want[2][0]) > 1e-4


# -- cells with state besides params, in the trainer -------------------------


def test_linen_cell_carries_collections_and_rngs():
  module = DropoutBatchNormCell()
  params, carry = jf.init_linen_cell(module, jax.random.key(0), (2, D),
                                     rngs=("dropout",))
  assert set(params) == {"params"}
  assert isinstance(carry, jf.CellCarry) and set(carry.state) == {
      "batch_stats"} and set(carry.rngs) == {"dropout"}
  x = inputs((T, 2, D))
  got_carry, got_ys = jbptt.truncated_unroll(jf.linen_cell(module), params,
                                             carry, x, k=2)
  # Reference: the documented contract, one step at a time.
  h, state, key = carry.carry, carry.state, carry.rngs["dropout"]
  ys = []
  for t in range(T):
    key, step_key = jax.random.split(jax.random.wrap_key_data(key))
    key = jax.random.key_data(key)
    (h, y), state = module.apply({**params, **state}, h, x[t],
                                 rngs={"dropout": step_key},
                                 mutable=["batch_stats"])
    ys.append(y)
  assert_trees_close((got_carry, got_ys),
                     (jf.CellCarry(h, state, {"dropout": key}),
                      jnp.stack(ys)), atol=1e-12)
  # The trainer optimizes the params only and carries the rest.
  step = jbptt.cell_loss(jf.linen_cell(module), mse)
  tr = jbptt.trainer(step, optax.sgd(0.1), k1=2, k2=3)
  xs = (x, jnp.zeros((T, 2, H)))
  state, metrics = tr.update(tr.init(params, carry, xs), xs)
  assert set(state.params) == {"params"}
  assert_trees_close(state.carry.state, got_carry.state, atol=1e-12)
  assert max_diff(state.params, params) > 1e-4


def test_nnx_cell_carries_state():
  module = NNXDropoutCell(nnx.Rngs(0, dropout=1))
  cell, params = jf.nnx_cell(module)
  carry = jf.CellCarry(jnp.zeros((2, H)), nnx.state(module, nnx.Not(nnx.Param)))
  x = inputs((T, 2, D))
  got_carry, got_ys = jbptt.truncated_unroll(cell, params, carry, x, k=3)
  # Reference: the module itself, called step by step (its state advances).
  copy, h, ys = nnx.clone(module), carry.carry, []
  for t in range(T):
    h, y = copy(h, x[t])
    ys.append(y)
  assert_trees_close(got_ys, jnp.stack(ys), atol=1e-12)
  assert_trees_close(plain(got_carry.state),
                     plain(nnx.state(copy, nnx.Not(nnx.Param))), atol=1e-12)
  step = jbptt.cell_loss(cell, mse)
  tr = jbptt.trainer(step, optax.sgd(0.1), k1=2, k2=3)
  xs = (x, jnp.zeros((T, 2, H)))
  state, _ = tr.update(tr.init(params, carry, xs), xs)
  assert_trees_close(plain(state.carry.state), plain(got_carry.state),
                     atol=1e-12)
  assert max_diff(state.params, params) > 1e-4


# -- errors -------------------------------------------------------------------


def test_adapters_reject_wrong_modules():
  with pytest.raises(TypeError, match="flax.linen Module"):
    jf.linen_cell(lambda p, h, x: (h, x))
  with pytest.raises(TypeError, match="flax.nnx Module"):
    jf.nnx_cell(nn.LSTMCell(3))
  with pytest.raises(ValueError, match="k must be a positive int"):
    jf.NNXTruncatedRNN(nnx.LSTMCell(D, 5, rngs=nnx.Rngs(0)), k=0)
  with pytest.raises(ValueError, match=r"k must be a positive int, got k=2.5"):
    jf.TruncatedRNN(nn.LSTMCell(5), 2.5)
  with pytest.raises(TypeError, match="rngs must be a tuple"):
    jf.init_linen_cell(nn.LSTMCell(5), jax.random.key(0), (2, D),
                       rngs="dropout")


def test_layers_reject_bad_inputs():
  x = inputs()
  layer = jf.TruncatedRNN(nn.GRUCell(H, **F64), 2)
  variables = layer.init(jax.random.key(0), x)
  with pytest.raises(ValueError, match=r"seq_lengths must have the inputs' "
                     r"batch shape \(2,\), got shape \(3,\)"):
    layer.apply(variables, x, seq_lengths=jnp.array([1, 2, 3]))
  with pytest.raises(TypeError, match="seq_lengths must be integers"):
    layer.apply(variables, x, seq_lengths=jnp.array([1.0, 2.0]))
  with pytest.raises(ValueError, match=r"no time axis"):
    layer.apply(variables, x[0, 0])
  with pytest.raises(ValueError, match=r"carry\[1\] has shape \(4,\)"):
    layer.apply(variables, x, seq_lengths=jnp.array([7, 3]),
                initial_carry=(jnp.zeros((2, H)), jnp.zeros(4)))
  nnx_layer = jf.NNXTruncatedRNN(nnx.GRUCell(D, H, rngs=nnx.Rngs(0)), 2)
  with pytest.raises(ValueError, match=r"seq_lengths must have"):
    nnx_layer(x, seq_lengths=jnp.array([[7, 3]]))


def test_flax_guide_examples_run():
  """The Python blocks of docs/guides/flax.md run as written."""
  import pathlib
  import re
  guide = pathlib.Path(__file__).parents[1] / "docs" / "guides" / "flax.md"
  blocks = re.findall(r"```python\n(.*?)```", guide.read_text(), re.S)
  assert len(blocks) == 2
  with jax.enable_x64(False):
    for block in blocks:
      exec(compile(block, str(guide), "exec"), {})

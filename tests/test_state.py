"""The trainer's state: its structure fixed at init, refused by other
trainers, scannable, and a checkpoint template without data."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jbptt
import jbptt.checkpoint

from conftest import assert_trees_close, carry0, data, step_loss

tree_map = jax.tree_util.tree_map


def spec(tree):
  return tree_map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), tree)


def structure(state):
  """Tree structure, shapes and dtypes (and weak types) of a state."""
  return (jax.tree_util.tree_structure(state),
          [(a.shape, a.dtype, getattr(a, "weak_type", False))
           for a in jax.tree_util.tree_leaves(state)])


@pytest.mark.parametrize("k1,k2,gradient", [
    (2, 5, jbptt.Recompute()), (2, 5, jbptt.StoredStates()),
    (4, 4, jbptt.Recompute()), (5, 2, jbptt.Recompute())])
@pytest.mark.parametrize("with_resets", [False, True])
def test_update_keeps_the_structure_and_can_be_scanned(k1, k2, gradient,
                                                       with_resets, params):
  xs = data(12)
  resets = jnp.zeros((12, 2), bool).at[7, 1].set(True)
  tr = jbptt.trainer(step_loss, optax.adam(0.01), k1=k1, k2=k2,
                     gradient=gradient)
  state = tr.init(params, carry0(), spec(xs),
                  spec(resets) if with_resets else None)
  r = resets if with_resets else None
  new, _ = tr.update(state, xs, r)
  assert structure(new) == structure(state)
  # A lax.scan over update: chunks of 4 steps, three of them.
  chunks = tree_map(lambda a: a.reshape((3, 4) + a.shape[1:]), xs)
  rs = None if r is None else r.reshape(3, 4, 2)

  def body(s, inp):
    return tr.update(s, *inp)

  scanned, metrics = jax.lax.scan(body, state, (chunks, rs))
  assert_trees_close(scanned.params, new.params)
  assert metrics.loss.shape[0] == 3


def test_init_from_specs_equals_init_from_a_chunk(params):
  xs = data(9)
  tr = jbptt.trainer(step_loss, optax.sgd(0.1), k1=2, k2=5)
  a = tr.init(params, carry0(), xs)
  b = tr.init(params, carry0(), spec(xs))
  assert structure(a) == structure(b)
  sa, _ = tr.update(a, xs)
  sb, _ = tr.update(b, xs)
  assert_trees_close(sa, sb, atol=0, rtol=0)


@pytest.mark.parametrize("other,named", [
    (dict(k1=2, k2=16), "k2=16"),
    (dict(k1=4, k2=8, losses="window"), "losses='window'"),
    (dict(k1=4, k2=8, gradient=jbptt.StoredStates()), "StoredStates"),
    (dict(k1=2, k2=8), "k1=2"),
])
def test_a_state_of_another_trainer_is_refused(other, named, params):
  xs = data(8)
  ours = jbptt.trainer(step_loss, optax.sgd(0.1), k1=4, k2=8)
  theirs = jbptt.trainer(step_loss, optax.sgd(0.1), **other)
  state = theirs.init(params, carry0(), xs)
  with pytest.raises(ValueError, match="another trainer") as e:
    ours.update(state, xs)
  assert named in str(e.value)


def test_another_optimizer_state_is_refused(params):
  xs = data(8)
  state = jbptt.trainer(step_loss, optax.adam(0.1), k1=4, k2=4).init(
      params, carry0(), xs)
  sgd = jbptt.trainer(step_loss, optax.sgd(0.1), k1=4, k2=4)
  with pytest.raises(ValueError, match="opt_state"):
    sgd.update(state, xs)


def test_resets_must_be_declared(params):
  xs = data(6)
  tr = jbptt.trainer(step_loss, optax.sgd(0.1), k1=2, k2=4)
  state = tr.init(params, carry0(), xs)
  with pytest.raises(ValueError, match="declared without resets"):
    tr.update(state, xs, jnp.zeros((6, 2), bool))


def test_other_stream_shapes_are_refused(params):
  tr = jbptt.trainer(step_loss, optax.sgd(0.1), k1=2, k2=4)
  state = tr.init(params, carry0(), data(6))
  with pytest.raises(ValueError, match="stream declared at init"):
    tr.update(state, data(6, batch=3))


def test_init_requires_xs(params):
  tr = jbptt.trainer(step_loss, optax.sgd(0.1), k1=2, k2=4)
  with pytest.raises(TypeError):
    tr.init(params, carry0())  # pylint: disable=no-value-for-parameter


def test_checkpoint_template_needs_no_data(tmp_path, params):
  xs = data(11)
  tr = jbptt.trainer(step_loss, optax.adam(0.05), k1=2, k2=5)
  state, _ = tr.update(tr.init(params, carry0(), xs), tree_map(
      lambda a: a[:7], xs))
  jbptt.checkpoint.save(tmp_path, state)
  like = tr.init(tree_map(jnp.zeros_like, params), carry0(), spec(xs))
  back = jbptt.checkpoint.restore(tmp_path, like)
  assert structure(back) == structure(state)
  rest = tree_map(lambda a: a[7:], xs)
  want, _ = tr.update(state, rest)
  got, _ = tr.update(back, rest)
  assert_trees_close(got.params, want.params, atol=0, rtol=0)


def test_nonfinite_updates_are_skipped_by_optax(params):
  """A NaN input makes one update's gradient NaN: optax.apply_if_finite
  skips it (params kept), Metrics and the optimizer state count it."""
  u, y = data(8)
  u = u.at[5].set(np.nan)
  tr = jbptt.trainer(step_loss, optax.adam(0.1), k1=4, k2=4)
  state = tr.init(params, carry0(), (u, y))
  first, m1 = tr.update(state, (u[:4], y[:4]))
  second, m2 = tr.update(first, (u[4:], y[4:]))
  assert not bool(m1.skipped[0]) and bool(m2.skipped[0])
  assert int(second.opt_state.total_notfinite) == 1
  assert_trees_close(second.params, first.params, atol=0, rtol=0)
  assert_trees_close(second.opt_state.inner_state, first.opt_state.inner_state,
                     atol=0, rtol=0)


def test_checks_still_refuse_after_a_good_call(params):
  """update skips the checks for a layout that passed; every other layout is
  still checked."""
  xs = data(8)
  ours = jbptt.trainer(step_loss, optax.adam(0.1), k1=4, k2=8)
  state = ours.init(params, carry0(), xs)
  for _ in range(2):
    state, _ = ours.update(state, xs)  # this layout passes, then is cached
  other = jbptt.trainer(step_loss, optax.adam(0.1), k1=2, k2=16)
  with pytest.raises(ValueError, match="another trainer"):
    ours.update(other.init(params, carry0(), xs), xs)
  sgd = jbptt.trainer(step_loss, optax.sgd(0.1), k1=4, k2=8)
  with pytest.raises(ValueError, match="opt_state"):
    ours.update(sgd.init(params, carry0(), xs), xs)
  with pytest.raises(ValueError, match="declared without resets"):
    ours.update(state, xs, jnp.zeros((8, 2), bool))
  wide = tree_map(lambda a: jnp.concatenate([a, a], axis=-1), xs)
  with pytest.raises(ValueError, match="does not match the stream"):
    ours.update(state, wide)
  with pytest.raises(TypeError, match="TrainState"):
    ours.update(tuple(state), xs)


def test_pack_state_round_trips_every_dtype():
  """pack_state keeps every leaf bit for bit: mixed dtypes (float32, float64,
  bfloat16, int32, bool), scalars and empty buffers."""
  from jbptt._src import packing
  tree = {"a": jnp.arange(6, dtype=jnp.float32).reshape(2, 3),
          "b": (jnp.array(True), jnp.zeros((0, 2), jnp.int32)),
          "c": jnp.array([1.5, -2.0], jnp.bfloat16),
          "d": jnp.array(7, jnp.int32), "e": jnp.ones((1, 1), jnp.float64)}
  lay = packing.packing_of(tree)
  buffers = packing.pack(tree, lay)
  assert len(buffers) == 5 and all(b.ndim == 1 for b in buffers)
  back = packing.unpack(buffers, lay)
  assert structure(back) == structure(tree)
  for x, y in zip(jax.tree_util.tree_leaves(back),
                  jax.tree_util.tree_leaves(tree)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.parametrize("k1,k2,gradient", [
    (2, 5, jbptt.Recompute()), (3, 3, jbptt.Recompute()),
    (1, 4, jbptt.StoredStates())])
def test_a_packed_state_trains_as_the_state(k1, k2, gradient, params):
  """update on a PackedState returns a PackedState; fed a stream in uneven
  chunks with resets, it gives exactly the states and metrics of the plain
  state."""
  xs = data(11)
  resets = jnp.zeros((11, 2), bool).at[6, 0].set(True)
  tr = jbptt.trainer(step_loss, optax.adam(0.01), k1=k1, k2=k2,
                     gradient=gradient)
  plain = tr.init(params, carry0(), xs, resets)
  packed = jbptt.pack_state(plain)
  assert isinstance(packed, jbptt.PackedState)
  assert structure(packed.unpack()) == structure(plain)
  for a, b in ((0, 4), (4, 5), (5, 11)):
    chunk = tree_map(lambda v: v[a:b], xs)
    plain, m1 = tr.update(plain, chunk, resets[a:b])
    packed, m2 = tr.update(packed, chunk, resets[a:b])
    assert isinstance(packed, jbptt.PackedState)
    assert_trees_close(m2, m1, atol=0, rtol=0)
  assert_trees_close(packed.unpack(), plain, atol=0, rtol=0)


def test_a_packed_state_is_checked(params):
  xs = data(4)
  tr = jbptt.trainer(step_loss, optax.sgd(0.1), k1=2, k2=2)
  packed = jbptt.pack_state(tr.init(params, carry0(), xs))
  other = jbptt.trainer(step_loss, optax.sgd(0.1), k1=2, k2=3)
  with pytest.raises(ValueError, match="k2=2"):
    other.update(packed, xs)
  with pytest.raises(ValueError, match="xs does not match"):
    tr.update(packed, tree_map(lambda a: a[..., :1], xs))
  short = packed._replace(buffers=tuple(b[1:] for b in packed.buffers))
  with pytest.raises(ValueError, match="do not match its packing"):
    tr.update(short, xs)
  with pytest.raises(TypeError, match="expects a jbptt.TrainState"):
    jbptt.pack_state(packed)

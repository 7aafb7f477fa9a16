"""trainer against the plain online loop, splits, resets, NaN handling."""

import inspect

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jbptt

import reference as ref
from conftest import (
  ADAM,
  CASES,
  NOTHING,
  RECOMPUTE,
  H,
  assert_trees_close,
  assert_trees_equal,
  assert_unrolled,
  carry0,
  data,
  feed,
  gradient_id,
  make_trainer,
  max_diff,
  scans,
  spec,
  step_loss,
  structure,
)

tree_map = jax.tree_util.tree_map
STORED = jbptt.StoredStates()

# The stream of the tests with resets: 14 steps fed in pieces of 5, 3 and 6
# (a piece shorter than k1, pieces that are not multiples of k1, cuts inside
# windows), resets in one row of the batch and in both at once. Tests of one
# configuration share the trainer of conftest.make_trainer, and so its
# compilations for these shapes.
N = 14
CUTS = [5, 8]


def stream_resets(first=0):
  """The stream's reset mask, with no resets before step ``first``."""
  resets = np.zeros((N, 2), bool)
  resets[2, 0] = resets[5, 1] = resets[9, 0] = resets[9, 1] = True
  resets[:first] = False
  return resets


def piece(tree, a, b):
  return tree_map(lambda v: v[a:b], tree)


@pytest.mark.parametrize("n,k1,k2,losses,gradient", [
    *[(*case, RECOMPUTE) for case in CASES],
    (9, 2, 5, "window", jbptt.Recompute(remat=NOTHING)),
    (10, 8, 3, "new", jbptt.Recompute(remat=NOTHING)),
], ids=gradient_id)
def test_matches_reference(n, k1, k2, losses, gradient, params):
  xs, h = data(n), carry0()
  want_params, want_losses, want_carry = ref.train(
      step_loss, ADAM, params, h, xs, k1, k2, losses)
  tr = make_trainer(k1, k2, losses, gradient)
  cuts = [3] if losses == "new" and n > 3 else []
  state, got_losses = feed(tr, tr.init(params, h, xs), xs, cuts)
  assert_trees_close(state.params, want_params)
  np.testing.assert_allclose(got_losses, want_losses, rtol=1e-10)
  assert_trees_close(state.carry, want_carry)
  assert int(state.step) == n
  assert int(state.opt_state.total_notfinite) == 0


@pytest.mark.parametrize("k1,k2", [(4, 4), (3, 7), (5, 2)])
def test_split_invariance(k1, k2, params):
  """A stream split anywhere trains as the whole stream (and the reference):
  the same params, carry, losses, optimizer state and history."""
  n = 23
  xs, h = data(n), carry0()
  want_params, want_losses, want_carry = ref.train(
      step_loss, ADAM, params, h, xs, k1, k2)
  tr = make_trainer(k1, k2)
  # The whole; pieces of one step, pieces of 7 starting at every phase of
  # k1; a first piece of 8 (several updates and a pending step in one call).
  whole = None
  for cuts in ([], [1, 8, 15, 22], [8, 9, 16]):
    split, got_losses = feed(tr, tr.init(params, h, xs), xs, cuts)
    assert_trees_close(split.params, want_params)
    assert_trees_close(split.carry, want_carry)
    np.testing.assert_allclose(got_losses, want_losses, rtol=1e-10)
    if whole is None:
      whole = split
    assert_trees_close(split.opt_state, whole.opt_state)
    assert_trees_close(split.history, whole.history)
    assert int(split.step) == n


def test_metrics_layout(params):
  tr = make_trainer(4, 4)
  state = tr.init(params, carry0(), data(8))

  def check(m, valid):
    assert m._fields == ("loss", "weight", "grad_norm", "valid", "skipped",
                         "k2")
    assert all(a.shape == (len(valid),) for a in m)
    assert m.valid.tolist() == valid
    assert m.skipped.dtype == bool and not bool(jnp.any(m.skipped))
    assert m.weight.tolist() == [4.0 if ok else 0.0 for ok in valid]
    assert bool(jnp.all((m.grad_norm > 0) == m.valid))

  state, m = tr.update(state, data(3))  # no update: one empty slot
  check(m, [False])
  state, m = tr.update(state, data(5))  # completes it and makes another
  check(m, [True, True])
  state, m = tr.update(state, data(6))  # 6 steps: one update, 2 pending
  check(m, [True, False])
  state, m = tr.update(state, data(2))  # completes the pending update
  check(m, [True])
  # ceil(9 / 4) = 3 slots, rounded up to 4 (the capacity class); then 5, to 8.
  state, m = tr.update(state, data(9))
  check(m, [True, True, False, False])
  state, m = tr.update(state, data(19))  # 1 pending + 19: 5 updates
  check(m, [True] * 5 + [False] * 3)
  assert int(state.step) == 44


def test_one_program_per_capacity_class(params):
  """update traces (and compiles) its program once per capacity class (the
  chunk's ceil(m / k1) update slots rounded up to a power of two), not once
  per chunk length."""
  traces = []

  def counted(p, h, x):
    traces.append(1)
    return step_loss(p, h, x)

  tr = jbptt.trainer(counted, optax.sgd(0.1), k1=4, k2=6)
  state = tr.init(params, carry0(), data(8))
  state, _ = tr.update(state, data(8, seed=1))
  after_first = len(traces)
  assert after_first > 0
  for seed, m in enumerate([5, 6, 7, 8, 5], start=2):  # class 8
    state, _ = tr.update(state, data(m, seed=seed))
  assert len(traces) == after_first
  state, _ = tr.update(state, data(9))  # class 16: a new program
  after_second = len(traces)
  assert after_second > after_first
  for m in (10, 13, 16):
    state, _ = tr.update(state, tree_map(np.asarray, data(m)))  # host arrays
  assert len(traces) == after_second


@pytest.mark.parametrize("k1,k2,losses", [
    (3, 3, "new"), (2, 5, "new"), (4, 2, "new"), (2, 5, "window"),
    (4, 2, "last")])
def test_resets_match_reference(k1, k2, losses, params):
  xs, h, resets = data(N), carry0(), stream_resets()
  want_params, want_losses, want_carry = ref.train(
      step_loss, ADAM, params, h, xs, k1, k2, losses, resets=resets)
  tr = make_trainer(k1, k2, losses)
  state, got_losses = feed(tr, tr.init(params, h, xs, resets), xs, CUTS,
                           resets)
  assert_trees_close(state.params, want_params)
  np.testing.assert_allclose(got_losses, want_losses, rtol=1e-10)
  assert_trees_close(state.carry, want_carry)


@pytest.mark.parametrize("k1,k2,gradient", [
    (2, 5, RECOMPUTE), (2, 5, STORED), (4, 2, RECOMPUTE)], ids=gradient_id)
def test_stream_without_resets_keeps_none(k1, k2, gradient, params):
  """A stream declared without resets is traced without them and trains as
  one declared with them and fed all-false (in one call: the tests above
  feed both kinds in pieces)."""
  xs, h = data(N), carry0()
  tr = make_trainer(k1, k2, gradient=gradient)
  plain, plain_m = tr.update(tr.init(params, h, xs), xs)
  zeros = np.zeros((N, 2), bool)
  masked, masked_m = tr.update(tr.init(params, h, xs, zeros), xs, zeros)
  assert plain.history.resets is None
  assert masked.history.resets is not None
  assert_trees_close(plain.params, masked.params)
  assert_trees_close(plain.carry, masked.carry)
  assert_trees_close(plain_m, masked_m, rtol=1e-12)


@pytest.mark.parametrize("k1,k2,gradient", [
    (3, 3, RECOMPUTE), (2, 5, RECOMPUTE), (4, 2, RECOMPUTE), (2, 5, STORED),
    (4, 2, STORED)], ids=gradient_id)
def test_resets_arriving_mid_stream(k1, k2, gradient, params):
  """Resets declared at init, none given for the first piece, then given: as
  one stream with resets from the start (the plain-loop reference). A stream
  declared without resets refuses them."""
  xs, h = data(N), carry0()
  resets = stream_resets(first=CUTS[0])
  tr = make_trainer(k1, k2, gradient=gradient)
  state = tr.init(params, h, xs, spec(resets))
  state, _ = tr.update(state, piece(xs, 0, CUTS[0]))
  assert state.history.resets is not None
  assert not bool(jnp.any(state.history.resets))
  state, _ = feed(tr, state, piece(xs, CUTS[0], N), [CUTS[1] - CUTS[0]],
                  resets[CUTS[0]:])
  train = ref.train if gradient is RECOMPUTE else ref.train_stored
  want_params, _, want_carry = train(step_loss, ADAM, params, h, xs, k1, k2,
                                     resets=resets)
  assert_trees_close(state.params, want_params)
  assert_trees_close(state.carry, want_carry)

  undeclared = tr.init(params, h, xs)
  with pytest.raises(ValueError, match="declared without resets"):
    tr.update(undeclared, piece(xs, 0, CUTS[0]), resets[:CUTS[0]])


def test_reset_equals_training_pieces_separately(params):
  """k2 within a piece: a reset at an update boundary separates the streams
  (resets of per-step shape (): the whole batch at once)."""
  k1 = k2 = 3
  xs, h = data(12), carry0()
  resets = np.zeros((12,), bool)
  resets[6] = True
  tr = jbptt.trainer(step_loss, optax.sgd(0.1), k1=k1, k2=k2)
  joint, _ = feed(tr, tr.init(params, h, xs, resets), xs, [], resets)
  state = tr.init(params, h, xs)
  state, _ = tr.update(state, piece(xs, 0, 6))
  second = tr.init(state.params, h, xs)._replace(opt_state=state.opt_state)
  second, _ = tr.update(second, piece(xs, 6, 12))
  assert_trees_close(joint.params, second.params)
  assert_trees_close(joint.carry, second.carry)


def test_nonfinite_update_is_skipped_and_counted(params):
  """A NaN target makes one update's loss and gradient NaN: that update is
  not applied (optax.apply_if_finite), the next ones are."""
  u, y = data(12)
  y = y.at[5].set(jnp.nan)  # the update ending at 8 sees a NaN loss
  tr = jbptt.trainer(step_loss, optax.adam(0.05), k1=4, k2=4)
  state = tr.init(params, carry0(), (u, y))
  state, m1 = tr.update(state, (u[:4], y[:4]))
  assert not bool(m1.skipped[0])
  before = state
  state, m2 = tr.update(state, (u[4:8], y[4:8]))
  assert bool(m2.skipped[0]) and not bool(jnp.isfinite(m2.loss[0]))
  assert_trees_equal(state.params, before.params)
  assert_trees_equal(state.opt_state.inner_state, before.opt_state.inner_state)
  assert int(state.opt_state.total_notfinite) == 1
  state, m3 = tr.update(state, (u[8:], y[8:]))
  assert not bool(m3.skipped[0]) and bool(jnp.isfinite(m3.loss[0]))
  assert all(bool(jnp.all(jnp.isfinite(a)))
             for a in jax.tree_util.tree_leaves(state.params))
  assert max_diff(state.params, before.params) > 0
  assert int(state.opt_state.total_notfinite) == 1


def test_learns_a_delay(params):
  """End to end: TBPTT(4, 8) learns to output the input of 3 steps ago."""
  key = jax.random.PRNGKey(0)
  n, lag = 3000, 3
  u = jax.random.normal(key, (n, 8, 1))
  y = jnp.concatenate([jnp.zeros((lag, 8)), u[:-lag, :, 0]])

  def init(key):
    k = jax.random.split(key, 3)
    return {"W": 0.3 * jax.random.normal(k[0], (H * 4, H * 4)),
            "U": jax.random.normal(k[1], (1, H * 4)),
            "v": 0.1 * jax.random.normal(k[2], (H * 4,))}

  def delay_loss(p, h, x):
    u, y = x
    h = jnp.tanh(h @ p["W"] + u @ p["U"])
    return h, jnp.mean((h @ p["v"] - y) ** 2)

  tr = jbptt.trainer(delay_loss, optax.adam(1e-2), k1=4, k2=8)
  state = tr.init(init(key), jnp.zeros((8, H * 4)), (u, y))
  state, m = tr.update(state, (u, y))
  loss = m.loss[m.valid]
  assert float(loss[1:5].mean()) > 0.5  # chance: the target's variance
  assert float(loss[-50:].mean()) < 0.1


@pytest.mark.parametrize("k1,k2", [(2, 5), (4, 2)])
def test_init_fixes_the_structure(k1, k2, params):
  """init from a chunk and resets, or from ShapeDtypeStructs of any time
  length: the same state, and exactly the structure that update returns."""
  xs, h, resets = data(N), carry0(), stream_resets()
  tr = make_trainer(k1, k2)
  from_data = tr.init(params, h, xs, resets)
  from_specs = tr.init(params, h, spec(piece(xs, 0, 1)),
                       jax.ShapeDtypeStruct((3, 2), jnp.bool_))
  assert_trees_equal(from_specs, from_data)
  assert from_data.history.xs is not None
  a, _ = tr.update(from_data, xs, resets)
  b, _ = tr.update(from_specs, xs, resets)
  assert structure(a) == structure(b) == structure(from_data)
  assert_trees_equal(a, b)


@pytest.mark.parametrize("k1,k2,gradient", [
    (2, 5, RECOMPUTE), (4, 2, RECOMPUTE), (1, 4, STORED)], ids=gradient_id)
def test_state_can_be_donated(k1, k2, gradient, params):
  """No two leaves of a fresh state share a buffer, so the whole state can be
  donated; donating changes nothing in the result."""
  xs, h, resets = data(N), carry0(), stream_resets()
  tr = make_trainer(k1, k2, gradient=gradient)
  plain = tr.init(params, h, xs, resets)
  for _ in range(2):  # the stream's chunk, twice
    plain, _ = tr.update(plain, xs, resets)
  donating = jax.jit(tr.update, donate_argnums=0)
  fresh = lambda: tree_map(jnp.copy, (params, h))  # donation consumes them
  for state in (tr.init(*fresh(), xs, resets),
                tr.init(*fresh(), spec(xs), spec(resets))):
    state, _ = donating(state, xs, resets)  # a fresh state
    state, _ = donating(state, xs, resets)  # a state that update returned
    assert_trees_close(state.params, plain.params, atol=1e-12, rtol=1e-12)
    assert_trees_close(state.carry, plain.carry, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("k1,k2,gradient,unroll", [
    (3, 3, RECOMPUTE, 2), (2, 5, RECOMPUTE, 3), (4, 2, RECOMPUTE, True),
    (1, 4, STORED, True),
    (2, 5, STORED, 8),  # 8: more than the window's steps
], ids=gradient_id)
def test_unroll_changes_nothing(k1, k2, gradient, unroll, params):
  """unroll reaches the per-step scans and leaves the result as it was.

  The stream is fed in one call (an unrolled program is slow to compile;
  test_split_invariance covers the pieces), 14 steps: k1 = 3, 4 and 5 leave
  steps pending, so the stream's advance past the last update runs too.
  """
  xs, h, resets = data(N), carry0(), stream_resets()
  tr = make_trainer(k1, k2, gradient=gradient)
  unrolled = make_trainer(k1, k2, gradient=gradient, unroll=unroll)
  want, want_m = tr.update(tr.init(params, h, xs, resets), xs, resets)
  got, got_m = unrolled.update(unrolled.init(params, h, xs, resets), xs,
                               resets)
  assert_trees_close(got.params, want.params, atol=1e-12, rtol=1e-12)
  assert_trees_close(got.carry, want.carry, atol=1e-12, rtol=1e-12)
  assert_trees_close(got_m, want_m, atol=1e-12, rtol=1e-12)
  # The loop over updates is a while loop (a traced trip count), not a scan.
  assert_unrolled(jax.make_jaxpr(unrolled.update)(got, xs, resets), unroll)


@pytest.mark.parametrize("gradient", [RECOMPUTE, STORED], ids=gradient_id)
def test_default_unroll_is_one(gradient, params):
  """unroll defaults to 1, stated in the signature and not read from the
  backend: every scan of an update has unroll 1."""
  assert inspect.signature(jbptt.trainer).parameters["unroll"].default == 1
  tr = jbptt.trainer(step_loss, optax.adam(0.05), k1=2, k2=5,
                     gradient=gradient)
  xs = data(13)
  state = tr.init(params, carry0(), xs)
  found = scans(jax.make_jaxpr(tr.update)(state, xs))
  assert len(found) > 1 and {u for _, u in found} == {1}, found


# StoredStates differs from Recompute for k1 < k2 only: those kinds each, and
# k1 = k2, k1 > k2 (the same path as Recompute), each losses value, remat.
STORED_CASES = [
    (9, 2, 5, "new", STORED), (9, 3, 6, "new", STORED),
    (6, 1, 6, "new", STORED), (12, 4, 7, "last", STORED),
    (5, 2, 9, "window", STORED), (8, 4, 4, "new", STORED),
    (7, 3, 2, "window", STORED),
    (9, 2, 5, "new", jbptt.StoredStates(remat=NOTHING)),
    (10, 4, 4, "last", jbptt.StoredStates(remat=NOTHING)),
]


@pytest.mark.parametrize("n,k1,k2,losses,gradient", STORED_CASES,
                         ids=gradient_id)
def test_stored_states_match_their_reference(n, k1, k2, losses, gradient,
                                             params):
  """gradient=StoredStates(): Williams & Peng's BPTT(h; h0) on the stored
  states."""
  xs, h = data(n), carry0()
  resets = np.zeros((n, 2), bool)
  resets[n // 2, 1] = True
  want_params, want_losses, want_carry = ref.train_stored(
      step_loss, ADAM, params, h, xs, k1, k2, losses, resets=resets)
  tr = make_trainer(k1, k2, losses, gradient)
  cuts = [3] if k1 < k2 and n > 3 else []  # k1 >= k2: see the next test
  state, got_losses = feed(tr, tr.init(params, h, xs, resets), xs, cuts,
                           resets)
  assert_trees_close(state.params, want_params)
  np.testing.assert_allclose(got_losses, want_losses, rtol=1e-10)
  assert_trees_close(state.carry, want_carry)


@pytest.mark.parametrize("n,k1,k2", [(10, 4, 4), (10, 8, 3), (12, 2, 6)])
def test_stored_equals_recompute_exactly_when_k1_ge_k2(n, k1, k2, params):
  """For k1 >= k2 every window lies within the steps run with the current
  params, so the stored states are the re-run ones; for k1 < k2 they are not
  (guards the test above)."""
  xs, h = data(n), carry0()
  stored = ref.train_stored(step_loss, ADAM, params, h, xs, k1, k2)[0]
  recomputed = ref.train(step_loss, ADAM, params, h, xs, k1, k2)[0]
  if k1 >= k2:
    assert_trees_close(stored, recomputed)
  else:
    assert max_diff(stored, recomputed) > 1e-6

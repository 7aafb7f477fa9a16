"""trainer against the plain online loop, splits, resets, NaN handling."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jbptt

import reference as ref
from conftest import (
  CONFIGS,
  POLICIES,
  assert_trees_close,
  assert_unrolled,
  carry0,
  data,
  max_diff,
  step_loss,
)

tree_map = jax.tree_util.tree_map


def feed(tr, state, xs, cuts, resets=None):
  """Feeds xs in pieces split at ``cuts``; returns state and valid losses."""
  n = jax.tree_util.tree_leaves(xs)[0].shape[0]
  bounds = [0, *cuts, n]
  losses = []
  for a, b in zip(bounds[:-1], bounds[1:]):
    piece = tree_map(lambda v: v[a:b], xs)
    r = None if resets is None else resets[a:b]
    state, m = tr.update(state, piece, r)
    losses += [float(v) for v, ok in zip(m.loss, m.valid) if ok]
  return state, losses


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("n,k1,k2", CONFIGS)
def test_matches_reference(n, k1, k2, policy, params):
  xs, h = data(n), carry0()
  opt = optax.adam(0.05)
  want_params, want_losses, want_carry = ref.train(
      step_loss, opt, params, h, xs, k1, k2, policy)
  tr = jbptt.trainer(step_loss, opt, k1=k1, k2=k2, policy=policy)
  cuts = [3] if policy == "new" and n > 3 else []
  state, losses = feed(tr, tr.init(params, h), xs, cuts)
  assert_trees_close(state.params, want_params)
  np.testing.assert_allclose(losses, want_losses, rtol=1e-10)
  assert_trees_close(state.carry, want_carry)
  assert int(state.step) == n


@pytest.mark.parametrize("k1,k2", [(4, 4), (3, 7), (5, 2)])
def test_split_invariance(k1, k2, params):
  n = 23
  xs, h = data(n), carry0()
  tr = jbptt.trainer(step_loss, optax.adam(0.05), k1=k1, k2=k2)
  whole, whole_losses = feed(tr, tr.init(params, h), xs, [])
  for cuts in ([1, 8, 15, 22], [5, 6, 13]):
    split, losses = feed(tr, tr.init(params, h), xs, cuts)
    assert_trees_close(split.params, whole.params)
    assert_trees_close(split.opt_state, whole.opt_state)
    assert_trees_close(split.carry, whole.carry)
    np.testing.assert_allclose(losses, whole_losses, rtol=1e-10)


def test_metrics_layout(params):
  tr = jbptt.trainer(step_loss, optax.sgd(0.1), k1=4, k2=4)
  state = tr.init(params, carry0())
  state, m = tr.update(state, data(8))
  assert m.loss.shape == (2,) and bool(jnp.all(m.valid))
  state, m = tr.update(state, data(6))  # 6 steps: one update, 2 pending
  assert m.loss.shape == (2,) and m.valid.tolist() == [True, False]
  state, m = tr.update(state, data(2))  # completes the pending update
  assert m.valid.tolist() == [True]
  assert int(state.step) == 16


def test_retraces_only_when_shapes_change(params):
  traces = []

  def counted(p, h, x):
    traces.append(1)
    return step_loss(p, h, x)

  tr = jbptt.trainer(counted, optax.sgd(0.1), k1=4, k2=6)
  state = tr.init(params, carry0())
  state, _ = tr.update(state, data(8, seed=1))  # allocates the history
  after_second = len(traces)
  for seed in range(2, 6):
    state, _ = tr.update(state, data(8, seed=seed))
  assert len(traces) == after_second
  state, _ = tr.update(state, data(5))
  assert len(traces) > after_second


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("k1,k2", [(3, 3), (2, 5), (4, 2)])
def test_resets_match_reference(k1, k2, policy, params):
  n = 12
  xs, h = data(n), carry0()
  resets = np.zeros((n, 2), bool)
  resets[2, 0] = resets[5, 1] = resets[9, 0] = resets[9, 1] = True
  opt = optax.adam(0.05)
  want_params, want_losses, want_carry = ref.train(
      step_loss, opt, params, h, xs, k1, k2, policy, resets=resets)
  tr = jbptt.trainer(step_loss, opt, k1=k1, k2=k2, policy=policy)
  state, losses = feed(tr, tr.init(params, h), xs, [4, 7], resets)
  assert_trees_close(state.params, want_params)
  np.testing.assert_allclose(losses, want_losses, rtol=1e-10)
  assert_trees_close(state.carry, want_carry)


@pytest.mark.parametrize("history", ["recompute", "stored"])
@pytest.mark.parametrize("k1,k2", [(4, 4), (3, 7), (5, 2)])
def test_stream_without_resets_keeps_none(k1, k2, history, params):
  """A stream without resets is traced without them and trains as all-false."""
  n = 17
  xs, h = data(n), carry0()
  tr = jbptt.trainer(step_loss, optax.adam(0.05), k1=k1, k2=k2,
                     history=history)
  plain, plain_losses = feed(tr, tr.init(params, h), xs, [6, 11])
  masked, masked_losses = feed(tr, tr.init(params, h), xs, [6, 11],
                               np.zeros((n,), bool))
  assert plain.history.resets is None
  assert masked.history.resets is not None
  assert_trees_close(plain.params, masked.params)
  assert_trees_close(plain.carry, masked.carry)
  np.testing.assert_allclose(plain_losses, masked_losses, rtol=1e-12)


@pytest.mark.parametrize("history", ["recompute", "stored"])
@pytest.mark.parametrize("k1,k2", [(3, 3), (2, 5), (4, 2)])
def test_resets_arriving_mid_stream(k1, k2, history, params):
  """Pieces fed without resets, then with them: as one stream with resets."""
  n = 14
  xs, h = data(n), carry0()
  resets = np.zeros((n, 2), bool)
  resets[8, 0] = resets[11, 1] = True
  opt = optax.adam(0.05)
  tr = jbptt.trainer(step_loss, opt, k1=k1, k2=k2, history=history)
  state = tr.init(params, h)
  state, _ = tr.update(state, tree_map(lambda a: a[:7], xs))
  assert state.history.resets is None
  state, _ = tr.update(state, tree_map(lambda a: a[7:], xs), resets[7:])
  whole, _ = feed(tr, tr.init(params, h), xs, [7], resets)
  assert_trees_close(state.params, whole.params)
  assert_trees_close(state.carry, whole.carry)
  if history == "recompute":
    want_params, _, want_carry = ref.train(
        step_loss, opt, params, h, xs, k1, k2, "new", resets=resets)
    assert_trees_close(state.params, want_params)
    assert_trees_close(state.carry, want_carry)


def test_reset_equals_training_pieces_separately(params):
  """k2 within a piece: a reset at an update boundary separates the streams."""
  k1 = k2 = 3
  xs, h = data(12), carry0()
  resets = np.zeros((12,), bool)
  resets[6] = True
  tr = jbptt.trainer(step_loss, optax.sgd(0.1), k1=k1, k2=k2)
  joint, _ = feed(tr, tr.init(params, h), xs, [], resets)
  state = tr.init(params, h)
  state, _ = tr.update(state, tree_map(lambda a: a[:6], xs))
  second = tr.init(state.params, h)._replace(opt_state=state.opt_state)
  second, _ = tr.update(second, tree_map(lambda a: a[6:], xs))
  assert_trees_close(joint.params, second.params)
  assert_trees_close(joint.carry, second.carry)


def test_nonfinite_update_is_skipped_and_counted(params):
  u, y = data(12)
  y = y.at[5].set(jnp.nan)  # the update ending at 8 sees a NaN loss
  tr = jbptt.trainer(step_loss, optax.adam(0.05), k1=4, k2=4)
  state = tr.init(params, carry0())
  state, m1 = tr.update(state, (u[:4], y[:4]))
  before = state.params
  state, m2 = tr.update(state, (u[4:8], y[4:8]))
  assert bool(m2.skipped[0]) and not bool(jnp.isfinite(m2.loss[0]))
  assert_trees_close(state.params, before, atol=0, rtol=0)
  assert int(state.num_skipped) == 1
  state, m3 = tr.update(state, (u[8:], y[8:]))
  assert not bool(m3.skipped[0]) and bool(jnp.isfinite(m3.loss[0]))
  assert all(bool(jnp.all(jnp.isfinite(a)))
             for a in jax.tree_util.tree_leaves(state.params))
  assert int(state.num_skipped) == 1


def test_learns_a_delay(params):
  """End to end: TBPTT(4, 8) learns to output the input of 3 steps ago."""
  key = jax.random.PRNGKey(0)
  n, lag = 3000, 3
  u = jax.random.normal(key, (n, 8, 1))
  y = jnp.concatenate([jnp.zeros((lag, 8)), u[:-lag, :, 0]])
  from conftest import H

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
  state = tr.init(init(key), jnp.zeros((8, H * 4)))
  state, m = tr.update(state, (u, y))
  assert float(m.loss[1:5].mean()) > 0.5  # chance: the target's variance
  assert float(m.loss[-50:].mean()) < 0.1


@pytest.mark.parametrize("k1,k2", [(3, 7), (4, 2)])
def test_init_with_xs_allocates_history(k1, k2, params):
  xs, h = data(13), carry0()
  resets = np.zeros((13, 2), bool)
  resets[5, 1] = True
  tr = jbptt.trainer(step_loss, optax.adam(0.05), k1=k1, k2=k2)
  lazy, _ = tr.update(tr.init(params, h), xs, resets)
  early = tr.init(params, h, xs, resets)
  assert early.history is not None
  assert jax.tree_util.tree_structure(early) == jax.tree_util.tree_structure(lazy)
  early, _ = tr.update(early, xs, resets)
  assert_trees_close(early.params, lazy.params)
  assert_trees_close(early.carry, lazy.carry)
  with pytest.raises(ValueError, match="resets given without xs"):
    tr.init(params, h, resets=resets)


@pytest.mark.parametrize("k1,k2,history", [
    (3, 7, "recompute"), (4, 2, "recompute"), (1, 4, "stored")])
def test_state_can_be_donated(k1, k2, history, params):
  """No two leaves of a fresh state share a buffer, so the whole state can be
  donated; donating changes nothing in the result."""
  n = 14
  xs, h = data(n), carry0()
  resets = np.zeros((n, 2), bool)
  resets[9, 0] = True
  tr = jbptt.trainer(step_loss, optax.adam(0.05), k1=k1, k2=k2,
                     history=history)
  plain, _ = feed(tr, tr.init(params, h), xs, [5], resets)
  donating = tr._replace(update=jax.jit(tr.update, donate_argnums=0))
  fresh = lambda: tree_map(jnp.copy, (params, h))  # donation consumes them
  for state in (tr.init(*fresh()), tr.init(*fresh(), xs, resets)):
    state, _ = feed(donating, state, xs, [5], resets)
    assert_trees_close(state.params, plain.params, atol=1e-12, rtol=1e-12)
    assert_trees_close(state.carry, plain.carry, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("k1,k2,history,unroll", [
    (3, 3, "recompute", 2), (2, 5, "recompute", 3), (2, 5, "stored", 3),
    (5, 2, "recompute", True), (1, 4, "stored", True),
    (2, 5, "recompute", 8)])  # 8: the default on a GPU
def test_unroll_changes_nothing(k1, k2, history, unroll, params):
  """unroll reaches the per-step scans and leaves the result as it was."""
  n = 13
  xs, h = data(n), carry0()
  resets = np.zeros((n, 2), bool)
  resets[8, 1] = True
  kw = dict(k1=k1, k2=k2, history=history)
  tr = jbptt.trainer(step_loss, optax.adam(0.05), unroll=1, **kw)
  unrolled = jbptt.trainer(step_loss, optax.adam(0.05), unroll=unroll, **kw)
  want, want_losses = feed(tr, tr.init(params, h), xs, [6], resets)
  got, got_losses = feed(unrolled, unrolled.init(params, h), xs, [6], resets)
  assert_trees_close(got.params, want.params, atol=1e-12, rtol=1e-12)
  assert_trees_close(got.carry, want.carry, atol=1e-12, rtol=1e-12)
  np.testing.assert_allclose(got_losses, want_losses, rtol=1e-12)
  jaxpr = str(jax.make_jaxpr(unrolled.update)(got, xs, resets))
  assert_unrolled(jaxpr, unroll, n_loops=1)  # the loop over updates is not


@pytest.mark.parametrize("backend,want", [("gpu", 8), ("cpu", 1), ("tpu", 1)])
@pytest.mark.parametrize("history", ["recompute", "stored"])
def test_default_unroll_follows_the_backend(backend, want, history, params,
                                            monkeypatch):
  """unroll=None (the default) is 8 on a GPU and 1 elsewhere, read from JAX's
  default backend when update is traced."""
  monkeypatch.setattr(jax, "default_backend", lambda: backend)
  tr = jbptt.trainer(step_loss, optax.adam(0.05), k1=2, k2=5, history=history)
  xs = data(13)
  state = tr.init(params, carry0(), xs)
  jaxpr = str(jax.make_jaxpr(tr.update)(state, xs))
  assert_unrolled(jaxpr, want, n_loops=1)  # the loop over updates: 1


STORED_CASES = [(n, k1, k2, "new") for n, k1, k2 in CONFIGS] + [
    (9, 2, 5, "window"), (12, 4, 7, "last"), (5, 2, 9, "window"),
    (7, 3, 2, "window")]


@pytest.mark.parametrize("n,k1,k2,policy", STORED_CASES)
def test_stored_history_matches_its_reference(n, k1, k2, policy, params):
  """history="stored": Williams & Peng's BPTT(h; h0) on the stored states."""
  xs, h = data(n), carry0()
  resets = np.zeros((n, 2), bool)
  resets[n // 2, 1] = True
  opt = optax.adam(0.05)
  want_params, want_losses, want_carry = ref.train_stored(
      step_loss, opt, params, h, xs, k1, k2, policy, resets=resets)
  tr = jbptt.trainer(step_loss, opt, k1=k1, k2=k2, policy=policy,
                     history="stored")
  cuts = [3] if k1 < k2 and n > 3 else []  # k1 >= k2: see the next test
  state, losses = feed(tr, tr.init(params, h), xs, cuts, resets)
  assert_trees_close(state.params, want_params)
  np.testing.assert_allclose(losses, want_losses, rtol=1e-10)
  assert_trees_close(state.carry, want_carry)


@pytest.mark.parametrize("n,k1,k2", [(10, 4, 4), (10, 8, 3), (12, 2, 6)])
def test_stored_equals_recompute_exactly_when_k1_ge_k2(n, k1, k2, params):
  """For k1 >= k2 every window lies within the steps run with the current
  params, so the stored states are the re-run ones; for k1 < k2 they are not
  (guards the test above)."""
  xs, h = data(n), carry0()
  opt = optax.adam(0.05)
  stored = ref.train_stored(step_loss, opt, params, h, xs, k1, k2)[0]
  recomputed = ref.train(step_loss, opt, params, h, xs, k1, k2)[0]
  if k1 >= k2:
    assert_trees_close(stored, recomputed)
  else:
    assert max_diff(stored, recomputed) > 1e-6

"""Weighted step losses (padded batches) and the read-out outside the
recurrence, against the plain-loop references, on every path."""

import jax
import jax.extend as jex
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jbptt

import reference as ref
from conftest import D, H, assert_trees_close, carry0, data

tree_map = jax.tree_util.tree_map
NOTHING = jax.checkpoint_policies.nothing_saveable
# (n, k1, k2): k1 < k2, k1 = k2, k1 > k2, n not a multiple of k1.
WCONFIGS = [(10, 2, 5), (9, 3, 3), (11, 4, 2), (8, 1, 3)]
GRADIENTS = {
    "recompute": jbptt.Recompute(),
    "recompute+remat": jbptt.Recompute(remat=NOTHING),
    "stored": jbptt.StoredStates(),
    "stored+remat": jbptt.StoredStates(remat=NOTHING),
}


def cell(p, h, u):
  h = jnp.tanh(h @ p["W"] + u @ p["U"] + p["b"])
  return h, h


def head(p, y, target):
  """Squared error of a linear read-out, weighted by a 0/1 example mask."""
  z, mask = target
  per_example = (y @ p["v"] - z) ** 2
  return jbptt.WeightedLoss(jnp.sum(mask * per_example), jnp.sum(mask))


def plain_head(p, y, target):
  return jnp.mean((y @ p["v"] - target) ** 2)


def weighted_step(p, h, x):
  """The same model as one step (the head inside the recurrence)."""
  u, target = x
  h, y = cell(p, h, u)
  return h, head(p, y, target)


def padded(n, seed=3, zero_steps=()):
  """A batch of 2 streams, the second padded (mask 0) on a third of the
  steps, and both masked on ``zero_steps`` (0-based)."""
  u, z = data(n, seed)
  mask = np.ones((n, 2))
  mask[::3, 1] = 0.0
  mask[list(zero_steps), :] = 0.0
  return u, (z, jnp.asarray(mask))


@pytest.fixture
def params():
  k = jax.random.split(jax.random.PRNGKey(0), 4)
  return {
      "W": 0.6 * jax.random.normal(k[0], (H, H)),
      "U": jax.random.normal(k[1], (D, H)),
      "b": 0.1 * jax.random.normal(k[2], (H,)),
      "v": jax.random.normal(k[3], (H,)),
  }


def resets_of(n):
  r = np.zeros((n, 2), bool)
  r[5, 0] = True
  return jnp.asarray(r)


@pytest.mark.parametrize("n,k1,k2,losses", [
    (10, 2, 5, "new"), (10, 2, 5, "window"), (8, 1, 3, "last"),
    (9, 3, 3, "new"), (11, 4, 2, "window"), (11, 4, 2, "last")])
def test_truncated_loss_weighted_matches_reference(n, k1, k2, losses, params):
  xs, resets = padded(n), resets_of(n)
  want_loss, want_grad, _ = ref.truncated_loss(
      weighted_step, params, carry0(), xs, k1, k2, losses, resets=resets)
  for step in (weighted_step, jbptt.cell_loss(cell, head)):
    for grad_opt in (jbptt.Recompute(), jbptt.Recompute(remat=NOTHING)):
      f = jbptt.truncated_loss(step, k1=k1, k2=k2, losses=losses,
                               gradient=grad_opt)
      (loss, _), grad = jax.value_and_grad(
          lambda p: f(p, carry0(), xs, resets=resets), has_aux=True)(params)
      np.testing.assert_allclose(loss, want_loss, rtol=1e-10)
      assert_trees_close(grad, want_grad)


def test_truncated_loss_of_zero_weight_is_zero(params):
  n = 6
  xs = padded(n, zero_steps=range(n))
  f = jbptt.truncated_loss(weighted_step, k1=2, k2=4)
  (loss, _), grad = jax.value_and_grad(
      lambda p: f(p, carry0(), xs), has_aux=True)(params)
  assert float(loss) == 0.0
  assert all(float(jnp.abs(g).max()) == 0.0 for g in jax.tree.leaves(grad))


def test_weights_are_not_counts(params):
  """sum(total) / sum(weight), not the mean of per-step ratios."""
  n = 4
  u, (z, mask) = padded(n)
  mask = mask.at[1].set(jnp.array([0.0, 0.0])).at[2].set(
      jnp.array([1.0, 0.0]))
  xs = (u, (z, mask))
  f = jbptt.truncated_loss(jbptt.cell_loss(cell, head), k1=4, k2=4)
  loss, _ = f(params, carry0(), xs)
  h, totals, weights = carry0(), [], []
  for t in range(n):
    h, y = cell(params, h, u[t])
    w = head(params, y, (z[t], mask[t]))
    totals.append(w.total)
    weights.append(w.weight)
  np.testing.assert_allclose(loss, sum(totals) / sum(weights), rtol=1e-12)


# Every strategy and every configuration kind, without the full product.
TRAINER_CASES = [
    ((10, 2, 5), "recompute"), ((10, 2, 5), "stored"),
    ((8, 1, 3), "stored+remat"), ((9, 3, 3), "recompute+remat"),
    ((11, 4, 2), "recompute"), ((11, 4, 2), "stored"),
]


@pytest.mark.parametrize("config,name", TRAINER_CASES)
def test_trainer_weighted_matches_reference(config, name, params):
  """Under Adam, with an update whose weights sum to 0 (steps k1+1..2k1 all
  padding): that update makes no optimizer step, which Adam would show."""
  n, k1, k2 = config
  zero = range(k1, 2 * k1)
  xs, resets = padded(n, zero_steps=zero), resets_of(n)
  opt = optax.adam(0.05)
  reference = ref.train_stored if name.startswith("stored") else ref.train
  losses = "new"
  want_params, want_losses, want_carry = reference(
      weighted_step, opt, params, carry0(), xs, k1, k2, losses, resets=resets)
  for step in (weighted_step, jbptt.cell_loss(cell, head)):
    tr = jbptt.trainer(step, opt, k1=k1, k2=k2, losses=losses,
                       gradient=GRADIENTS[name])
    state = tr.init(params, carry0(), xs, resets)
    cut = 3
    state, m1 = tr.update(state, tree_map(lambda a: a[:cut], xs), resets[:cut])
    state, m2 = tr.update(state, tree_map(lambda a: a[cut:], xs), resets[cut:])
    assert_trees_close(state.params, want_params)
    assert_trees_close(state.carry, want_carry)
    valid = np.concatenate([m1.valid, m2.valid])
    got = np.concatenate([m1.loss, m2.loss])[valid]
    np.testing.assert_allclose(got, want_losses, rtol=1e-9, atol=1e-12)
    weight = np.concatenate([m1.weight, m2.weight])[valid]
    assert weight[1] == 0.0 and (weight[0] > 0)
    # The zero-weight update made no optimizer step: Adam's count says so.
    assert int(state.opt_state.inner_state[0].count) == len(want_losses) - 1


def test_zero_weight_update_keeps_params_and_optimizer_state(params):
  xs = padded(4, zero_steps=range(4))
  tr = jbptt.trainer(weighted_step, optax.adam(0.1), k1=2, k2=2)
  state = tr.init(params, carry0(), xs)
  new, metrics = tr.update(state, xs)
  assert np.all(np.asarray(metrics.weight) == 0)
  assert not np.any(metrics.skipped)
  assert_trees_close(new.params, state.params, atol=0, rtol=0)
  assert_trees_close(new.opt_state, state.opt_state, atol=0, rtol=0)


@pytest.mark.parametrize("config,name,losses", [
    (c, g, lo) for (c, g), lo in zip(TRAINER_CASES, [
        "new", "window", "last", "window", "last", "new"])])
def test_readout_outside_equals_inside(config, name, losses, params):
  """cell_loss (read-out after the scan) against the same step with the
  read-out inside each step: params, carry and losses equal."""
  n, k1, k2 = config
  xs, resets = data(n), resets_of(n)
  inside = jbptt.cell_loss(cell, plain_head)
  hidden = lambda p, h, x: inside(p, h, x)  # not recognisable as cell_loss
  out = []
  for step in (inside, hidden):
    tr = jbptt.trainer(step, optax.adam(0.05), k1=k1, k2=k2, losses=losses,
                       gradient=GRADIENTS[name])
    state = tr.init(params, carry0(), xs, resets)
    state, m = tr.update(state, xs, resets)
    out.append((state.params, state.carry, m.loss))
  assert_trees_close(out[0], out[1], atol=1e-12, rtol=1e-10)


def _dots(jaxpr, depth=0):
  """(loop depth, rhs shape) of every dot_general, nested."""
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "dot_general":
      yield depth, eqn.invars[1].aval.shape
    inner = depth + (eqn.primitive.name in ("scan", "while"))
    for sub in jex.core.jaxprs_in_params(eqn.params):
      yield from _dots(sub, inner)


@pytest.mark.parametrize("k1,k2", [(4, 4), (2, 6)])
def test_readout_is_outside_the_per_step_loops(k1, k2, params):
  """With cell_loss, the read-out's products with v (shape (H,)) are in the
  loop over updates only, not in a loop over steps (depth 2); with the same
  step hidden behind a lambda they are inside the per-step loop."""
  xs = data(8)
  step = jbptt.cell_loss(cell, plain_head)
  hidden = lambda p, h, x: step(p, h, x)
  depths = {}
  for name, s in (("outside", step), ("inside", hidden)):
    tr = jbptt.trainer(s, optax.sgd(0.1), k1=k1, k2=k2)
    state = tr.init(params, carry0(), xs)
    jaxpr = jax.make_jaxpr(tr.update)(state, xs).jaxpr
    depths[name] = {d for d, rhs in _dots(jaxpr) if rhs == (H,)}
  assert depths["outside"] == {1}
  assert max(depths["inside"]) == 2

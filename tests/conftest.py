"""Shared small models and helpers for the tests (float64 for exact checks).

Every helper that more than one test file needs lives here: the model and
its data, tree comparisons (on ``chex``), the plain-``lax.scan`` gradient,
feeding a trainer in pieces, and the walk over a jaxpr's scans.
"""

import functools

import chex
import jax
import jax.extend as jex
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jbptt

tree_map = jax.tree_util.tree_map

D, H, B = 3, 4, 2
LOSSES = ("new", "window", "last")
NOTHING = jax.checkpoint_policies.nothing_saveable

# (n, k1, k2): k1 < k2, k1 = k2, k1 > k2, k2 >= n, k1 >= n, n not a
# multiple of k1, k1 dividing k2 or not, and the canonical configurations.
CONFIGS = [
    (8, 4, 4),    # k1 = k2, dividing n
    (10, 4, 4),   # k1 = k2, n not a multiple of k1
    (9, 2, 5),    # k1 < k2, k1 does not divide k2
    (9, 3, 6),    # k1 < k2, k1 divides k2
    (7, 3, 2),    # k1 > k2
    (11, 5, 1),   # TBPTT(k1, 1)
    (6, 6, 6),    # TBPTT(n, n)
    (6, 1, 6),    # TBPTT(1, n)
    (5, 2, 9),    # k2 > n
    (5, 7, 3),    # k1 > n
    (7, 1, 1),
    (12, 4, 7),   # k1 < k2, n multiple of k1
    (10, 8, 3),   # k1 > k2, tail reaching back into the last chunk
]

# (n, k1, k2, losses): every configuration of CONFIGS once, the losses values
# spread so that each meets k1 < k2, k1 = k2 and k1 > k2 (the full cross
# product costs three times as much and finds nothing more: the losses
# value only changes the static injection masks of a path).
CASES = [
    (8, 4, 4, "new"),
    (10, 4, 4, "window"),
    (9, 2, 5, "new"),
    (9, 3, 6, "window"),
    (7, 3, 2, "last"),
    (11, 5, 1, "new"),
    (6, 6, 6, "last"),
    (6, 1, 6, "window"),
    (5, 2, 9, "last"),
    (5, 7, 3, "window"),
    (7, 1, 1, "new"),
    (12, 4, 7, "last"),
    (10, 8, 3, "new"),
    (5, 2, 9, "new"),     # "new" also with k2 > n
    (7, 3, 2, "window"),  # "window" also with k1 > k2 and a tail
]
assert {c[:3] for c in CASES} == set(CONFIGS)
assert all({losses for _, k1, k2, losses in CASES if np.sign(k1 - k2) == kind}
           == set(LOSSES) for kind in (-1, 0, 1))


def init_params(key=0, dtype=jnp.float64):
  k = jax.random.split(jax.random.PRNGKey(key), 4)
  return {
      "W": (0.6 * jax.random.normal(k[0], (H, H))).astype(dtype),
      "U": jax.random.normal(k[1], (D, H)).astype(dtype),
      "b": (0.1 * jax.random.normal(k[2], (H,))).astype(dtype),
      "v": jax.random.normal(k[3], (H,)).astype(dtype),
  }


def step_loss(p, h, x):
  """A batched tanh RNN with a linear read-out and a squared error."""
  u, y = x
  h = jnp.tanh(h @ p["W"] + u @ p["U"] + p["b"])
  return h, jnp.mean((h @ p["v"] - y) ** 2)


def data(n, seed=1, dtype=jnp.float64, batch=B):
  k = jax.random.split(jax.random.PRNGKey(seed), 2)
  return (
      jax.random.normal(k[0], (n, batch, D)).astype(dtype),
      jax.random.normal(k[1], (n, batch)).astype(dtype),
  )


def carry0(dtype=jnp.float64, batch=B):
  return jnp.full((batch, H), 0.1, dtype)


def spec(tree):
  """``jax.ShapeDtypeStruct``s of the leaves of ``tree``."""
  return tree_map(lambda a: jax.ShapeDtypeStruct(jnp.shape(a),
                                                 jnp.result_type(a)), tree)


# Tree comparisons -----------------------------------------------------------


def _as_float64(tree):
  return tree_map(lambda a: np.asarray(a, np.float64), tree)


def assert_trees_close(actual, desired, atol=1e-10, rtol=1e-8):
  """The same structure and leaf shapes, and values within ``atol + rtol *
  |desired|`` (``chex.assert_trees_all_close`` in float64, so that bool and
  int leaves compare as numbers and the dtypes may differ)."""
  chex.assert_trees_all_close(_as_float64(actual), _as_float64(desired),
                              atol=atol, rtol=rtol, strict=True)


def assert_trees_equal(actual, desired):
  """The same structure, leaf shapes, dtypes and values, exactly."""
  chex.assert_trees_all_equal(actual, desired, strict=True)


def assert_trees_near(actual, desired, tol):
  """Every leaf within ``tol * (1 + max |desired leaf|)`` of ``desired``: a
  tolerance on the leaf's scale, for low-precision dtypes."""
  chex.assert_trees_all_equal_structs(actual, desired)
  for x, y in zip(jax.tree_util.tree_leaves(_as_float64(actual)),
                  jax.tree_util.tree_leaves(_as_float64(desired))):
    chex.assert_trees_all_close(x, y, rtol=0.0, strict=True,
                                atol=tol * (1 + np.max(np.abs(y))))


def structure(tree):
  """The tree structure and every leaf's shape and dtype."""
  return (jax.tree_util.tree_structure(tree),
          [(jnp.shape(a), jnp.result_type(a))
           for a in jax.tree_util.tree_leaves(tree)])


def max_diff(a, b):
  return max(
      float(jnp.max(jnp.abs(x - y)))
      for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b))
  )


# References without jbptt ---------------------------------------------------


def full_loss(p, h, xs, step=step_loss):
  """``(mean loss, final carry)`` of a plain ``lax.scan`` of ``step``."""
  h, losses = jax.lax.scan(lambda h, x: step(p, h, x), h, xs)
  return jnp.mean(losses), h


@functools.partial(jax.jit, static_argnames="step")
def full_grad(p, h, xs, step=step_loss):
  """Full BPTT of the mean loss with a plain scan (no jbptt)."""
  return jax.grad(lambda p: full_loss(p, h, xs, step)[0])(p)


# Trainers --------------------------------------------------------------------


def gradient_id(value):
  """A test id for a gradient strategy (``ids=`` of ``parametrize``); the
  default id for anything else."""
  if isinstance(value, (jbptt.Recompute, jbptt.StoredStates)):
    name = "recompute" if isinstance(value, jbptt.Recompute) else "stored"
    return name + ("+remat" if value.remat is not None else "")
  return None


ADAM = optax.adam(0.05)
RECOMPUTE = jbptt.Recompute()


def make_trainer(k1, k2, losses="new", gradient=RECOMPUTE, unroll=1,
                 step=step_loss, optimizer=ADAM):
  """``jbptt.trainer(step, optimizer, ...)``, one per configuration, so that
  tests of the same configuration and chunk shapes reuse its compilations
  (a trainer is pure: sharing it shares nothing but jit's cache)."""
  return _trainer(k1, k2, losses, gradient, unroll, step, optimizer)


@functools.lru_cache(maxsize=None, typed=True)  # typed: unroll=True is not 1
def _trainer(k1, k2, losses, gradient, unroll, step, optimizer):
  return jbptt.trainer(step, optimizer, k1=k1, k2=k2, losses=losses,
                       gradient=gradient, unroll=unroll)


def feed(tr, state, xs, cuts, resets=None):
  """Feeds ``xs`` in pieces split at ``cuts``; returns the state and the
  losses of the updates made."""
  n = jax.tree_util.tree_leaves(xs)[0].shape[0]
  bounds = [0, *cuts, n]
  losses = []
  for a, b in zip(bounds[:-1], bounds[1:]):
    piece = tree_map(lambda v: v[a:b], xs)
    r = None if resets is None else resets[a:b]
    state, m = tr.update(state, piece, r)
    losses += [float(v) for v, ok in zip(m.loss, m.valid) if ok]
  return state, losses


# Jaxprs ----------------------------------------------------------------------


def scans(jaxpr):
  """``(length, unroll)`` of every scan in ``jaxpr`` (a ``ClosedJaxpr`` or a
  ``Jaxpr``) and in the jaxprs nested in its equations' params."""
  jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
  found = []
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "scan":
      found.append((eqn.params["length"], eqn.params["unroll"]))
    for sub in jex.core.jaxprs_in_params(eqn.params):
      found += scans(sub)
  return found


def assert_unrolled(jaxpr, unroll, n_loops: int = 0):
  """Every scan in ``jaxpr`` has ``unroll`` (``True``: its length), except
  ``n_loops`` scans with unroll 1 (loops over windows; for ``unroll == 1``
  every scan, those loops included, has 1)."""
  found = scans(jaxpr)
  assert len(found) > n_loops, found
  want = lambda n: n if unroll is True else unroll
  others = [u for n, u in found if u != want(n)]
  loops = 0 if unroll is not True and unroll == 1 else n_loops
  assert others == [1] * loops, found


# Fixtures ----------------------------------------------------------------------


@pytest.fixture(autouse=True)
def x64():
  """The tests run in float64 (exact comparisons); the doctests do not."""
  with jax.enable_x64(True):
    yield


@pytest.fixture
def params():
  return init_params()

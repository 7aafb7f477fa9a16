"""Shared small models and helpers for the tests (float64 for exact checks)."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

tree_map = jax.tree_util.tree_map

D, H, B = 3, 4, 2

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
POLICIES = ("new", "window", "last")


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


def assert_trees_close(a, b, atol=1e-10, rtol=1e-8):
  sa, sb = jax.tree_util.tree_structure(a), jax.tree_util.tree_structure(b)
  assert sa == sb, (sa, sb)
  for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
    np.testing.assert_allclose(np.asarray(x, np.float64),
                               np.asarray(y, np.float64), atol=atol, rtol=rtol)


def max_diff(a, b):
  return max(
      float(jnp.max(jnp.abs(x - y)))
      for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b))
  )


@pytest.fixture(autouse=True)
def x64():
  """The tests run in float64 (exact comparisons); the doctests do not."""
  with jax.enable_x64(True):
    yield


@pytest.fixture
def params():
  return init_params()


def assert_unrolled(jaxpr: str, unroll, n_loops: int = 0):
  """Every scan in the printed ``jaxpr`` has ``unroll`` (``True``: its
  length), except ``n_loops`` scans with unroll 1 (loops over windows; for
  ``unroll == 1`` every scan, those loops included, has 1)."""
  lengths = [int(v) for v in re.findall(r"\blength=(\d+)", jaxpr)]
  unrolls = [int(v) for v in re.findall(r"\bunroll=(\d+)", jaxpr)]
  assert len(lengths) == len(unrolls) > n_loops
  want = lambda n: n if unroll is True else unroll
  others = [u for n, u in zip(lengths, unrolls) if u != want(n)]
  loops = 0 if unroll is not True and unroll == 1 else n_loops
  assert others == [1] * loops, (lengths, unrolls)

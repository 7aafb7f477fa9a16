"""unroll, truncated_unroll, cell_loss and schedule against plain loops."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jbptt

import reference as ref
from conftest import assert_trees_close, carry0, data, init_params, max_diff


def cell(p, h, u):
  h = jnp.tanh(h @ p["W"] + u @ p["U"] + p["b"])
  return h, h @ p["v"]


def test_unroll_is_a_python_loop():
  p, h, (u, _) = init_params(), carry0(), data(6)
  carry, ys = jbptt.unroll(cell, p, h, u, unroll=2)
  want = []
  for t in range(6):
    h, y = cell(p, h, u[t])
    want.append(y)
  assert_trees_close(carry, h)
  assert_trees_close(ys, jnp.stack(want))


@pytest.mark.parametrize("n,k", [(12, 4), (10, 4), (5, 1), (6, 9)])
def test_truncated_unroll_cuts_after_every_k_steps(n, k):
  p, h, (u, y) = init_params(), carry0(), data(n)

  def blocks(p):  # a plain loop that holds the carry after steps k, 2k, ...
    total, carry = 0.0, h
    for t in range(n):
      if t and t % k == 0:
        carry = jax.lax.stop_gradient(carry)
      carry, out = cell(p, carry, u[t])
      total += jnp.sum((out - y[t]) ** 2)
    return total

  def ours(p):
    _, outs = jbptt.truncated_unroll(cell, p, h, u, k=k)
    return jnp.sum((outs - y) ** 2)

  assert_trees_close(jax.grad(ours)(p), jax.grad(blocks)(p))
  # The first block reaches the initial carry.
  g_h = jax.grad(lambda h: jnp.sum(jbptt.truncated_unroll(cell, p, h, u, k=k)[1]))(h)
  assert float(jnp.max(jnp.abs(g_h))) > 0
  _, plain = jbptt.unroll(cell, p, h, u)
  assert_trees_close(jbptt.truncated_unroll(cell, p, h, u, k=k)[1], plain)
  if k < n:
    full = jax.grad(lambda p: jnp.sum((jbptt.unroll(cell, p, h, u)[1] - y) ** 2))(p)
    assert max_diff(full, jax.grad(ours)(p)) > 1e-6


def test_cell_loss_builds_a_step_loss():
  p, h, (u, y) = init_params(), carry0(), data(1)
  step = jbptt.cell_loss(cell, lambda out, z: jnp.mean((out - z) ** 2))
  new_h, loss = step(p, h, (u[0], y[0]))
  want_h, out = cell(p, h, u[0])
  assert_trees_close(new_h, want_h)
  np.testing.assert_allclose(loss, jnp.mean((out - y[0]) ** 2))


@pytest.mark.parametrize("policy", ["new", "window", "last"])
@pytest.mark.parametrize("n,k1,k2", [(10, 3, 4), (7, 7, 7), (9, 4, 2), (5, 1, 9)])
def test_schedule_is_the_contract(n, k1, k2, policy):
  updates = jbptt.schedule(n, k1, k2, policy)
  ends = [u.t for u in updates]
  assert ends == sorted(set(list(range(k1, n + 1, k1)) + [n]))
  t_prev = 0
  for u in updates:
    assert list(u.injected) == ref.injected(u.t, t_prev, k2, policy)
    t_prev = u.t


def test_schedule_canonical_cases():
  # TBPTT(k1, 1): every loss sees one step.
  for u in jbptt.schedule(9, 3, 1):
    assert all(s == tau - 1 for tau, s in u.injected)
  # TBPTT(n, n): one update, back to the start.
  (u,) = jbptt.schedule(6, 6, 6)
  assert u.t == 6 and {s for _, s in u.injected} == {0}
  # The last, shorter update still reaches k2 steps back.
  assert jbptt.schedule(10, 4, 4)[-1].injected == ((9, 6), (10, 6))

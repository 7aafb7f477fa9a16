"""truncated_unroll, cell_loss and schedule against plain loops."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jbptt

import reference as ref
from conftest import (
  LOSSES,
  assert_trees_close,
  carry0,
  data,
  init_params,
  max_diff,
)


def cell(p, h, u):
  h = jnp.tanh(h @ p["W"] + u @ p["U"] + p["b"])
  return h, h @ p["v"]


def scan(p, h, u):
  """The plain ``lax.scan`` of ``cell`` (no jbptt)."""
  return jax.lax.scan(lambda h, u: cell(p, h, u), h, u)


@pytest.mark.parametrize("unroll", [1, 2, True])
def test_k_none_is_a_python_loop(unroll):
  p, h, (u, _) = init_params(), carry0(), data(6)
  carry, ys = jbptt.truncated_unroll(cell, p, h, u, k=None, unroll=unroll)
  want = []
  for t in range(6):
    h, y = cell(p, h, u[t])
    want.append(y)
  assert_trees_close(carry, h)
  assert_trees_close(ys, jnp.stack(want))


def test_k_none_cuts_nothing():
  p, h, (u, y) = init_params(), carry0(), data(7)
  loss = lambda run: lambda p: jnp.sum((run(p, h, u)[1] - y) ** 2)
  ours = jax.jit(jax.grad(loss(
      lambda p, h, u: jbptt.truncated_unroll(cell, p, h, u, k=None))))
  assert_trees_close(ours(p), jax.jit(jax.grad(loss(scan)))(p))


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

  @jax.jit
  def ours(p, h):
    return jbptt.truncated_unroll(cell, p, h, u, k=k)

  loss = lambda run: lambda p: jnp.sum((run(p, h)[1] - y) ** 2)
  got = jax.jit(jax.grad(loss(ours)))(p)
  assert_trees_close(got, jax.jit(jax.grad(blocks))(p))
  # The first block reaches the initial carry.
  g_h = jax.jit(jax.grad(lambda h: jnp.sum(ours(p, h)[1])))(h)
  assert float(jnp.max(jnp.abs(g_h))) > 0
  # The values are those of a plain scan; the gradient is not, if cut.
  plain_carry, plain = scan(p, h, u)
  carry, ys = ours(p, h)
  assert_trees_close(ys, plain)
  assert_trees_close(carry, plain_carry)
  if k < n:
    full = jax.jit(jax.grad(loss(lambda p, h: scan(p, h, u))))(p)
    assert max_diff(full, got) > 1e-6


def test_truncated_unroll_needs_k():
  p, h, (u, _) = init_params(), carry0(), data(3)
  with pytest.raises(TypeError, match="k"):
    jbptt.truncated_unroll(cell, p, h, u)  # pylint: disable=missing-kwoa
  with pytest.raises(ValueError, match="k must be a positive int, got k=0"):
    jbptt.truncated_unroll(cell, p, h, u, k=0)
  with pytest.raises(ValueError, match="unroll must be a positive int"):
    jbptt.truncated_unroll(cell, p, h, u, k=2, unroll=0)


def test_cell_loss_builds_a_step_loss():
  p, h, (u, y) = init_params(), carry0(), data(1)
  step = jbptt.cell_loss(cell, lambda p, out, z: jnp.mean((out - z) ** 2))
  new_h, loss = step(p, h, (u[0], y[0]))
  want_h, out = cell(p, h, u[0])
  assert_trees_close(new_h, want_h)
  np.testing.assert_allclose(loss, jnp.mean((out - y[0]) ** 2))


def test_cell_loss_reads_out_with_the_params():
  """loss_fn takes the params first: a read-out head can live in them."""
  p, h, (u, y) = init_params(), carry0(), data(1)
  head = lambda p, h, z: jnp.mean((h @ p["v"] - z) ** 2)
  step = jbptt.cell_loss(lambda p, h, u: (cell(p, h, u)[0],) * 2, head)
  g = jax.grad(lambda p: step(p, h, (u[0], y[0]))[1])(p)
  assert float(jnp.max(jnp.abs(g["v"]))) > 0
  with pytest.raises(TypeError, match="two callables"):
    jbptt.cell_loss(cell, None)


@pytest.mark.parametrize("losses", LOSSES)
@pytest.mark.parametrize("n,k1,k2", [(10, 3, 4), (7, 7, 7), (9, 4, 2), (5, 1, 9)])
def test_schedule_is_the_contract(n, k1, k2, losses):
  updates = jbptt.schedule(n, k1, k2, losses=losses)
  ends = [u.t for u in updates]
  assert ends == sorted(set(list(range(k1, n + 1, k1)) + [n]))
  t_prev = 0
  for u in updates:
    assert list(u.injected) == ref.injected(u.t, t_prev, k2, losses)
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

"""The overlapping windows' slots, made by index arithmetic, against tables
built from the contract's schedule; programs whose size does not grow
with n."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jbptt
from jbptt._src import layout


def tables_from_schedule(n, k1, k2, losses):
  """(keep, seed) laid out from jbptt.schedule: window w in slot w mod m,
  m the most windows active at a step."""
  windows = []
  for update in jbptt.schedule(n, k1, k2, losses):
    s = max(0, update.t - k2)
    windows.append((s, update.t, [tau for tau, _ in update.injected]))
  active = np.zeros(n + 2, int)
  for s, t, _ in windows:
    active[s + 1] += 1
    active[t + 1] -= 1
  m = max(1, int(np.cumsum(active).max()))
  keep, seed = np.zeros((n, m), bool), np.zeros((n, m), bool)
  for w, (s, t, taus) in enumerate(windows):
    keep[s + 1:t, w % m] = True
    for tau in taus:
      seed[tau - 1, w % m] = True
  return keep, seed


def test_slots_equal_the_schedules_tables():
  # n a multiple of k1 or not, k1 dividing k2 or not, k2 > n; every losses.
  for n in (1, 5, 9, 12, 17):
    for k1 in (1, 2, 3, 5):
      for k2 in sorted({k1 + 1, 2 * k1, 2 * k1 + 1, 9}):
        for losses in ("new", "window", "last"):
          keep, seed = tables_from_schedule(n, k1, k2, losses)
          m = layout.num_slots(n, k1, k2)
          assert m == keep.shape[1], (n, k1, k2)
          got_keep, got_seed = layout.slot_tables(n, k1, k2, losses, m)
          np.testing.assert_array_equal(got_keep, keep)
          np.testing.assert_array_equal(got_seed, seed)


@pytest.mark.parametrize("k1,k2", [(1, 64), (8, 32)])
def test_program_size_does_not_grow_with_n(k1, k2):
  def step_loss(w, h, x):
    h = jnp.tanh(w * h + x)
    return h, (h - 0.5) ** 2

  f = jbptt.truncated_loss(step_loss, k1=k1, k2=k2)
  grad = jax.jit(jax.grad(lambda w, xs: f(w, jnp.float32(0), xs)[0]))
  sizes = [len(grad.lower(jnp.float32(0.5), jnp.ones(n, jnp.float32))
               .as_text()) for n in (1_000, 100_000)]
  assert sizes[1] < 1.1 * sizes[0], sizes

"""The overlapping windows of TBPTT(k1 < k2) over a sequence, by arithmetic.

With fixed params (:func:`jbptt.truncated_loss`) the windows of every update
run through the same states, so their adjoints travel back together
(:mod:`jbptt._src.adjoint`), each window in a *slot*. This module lays the
windows out in slots from index arithmetic on the device (``iota``): the
layout is periodic in ``k1``, so the program holds no table of the sequence
and its size does not grow with ``n``.

Windows are numbered ``w = 0, 1, ..., W - 1`` (``W = ceil(n / k1)``); window
``w`` ends at ``t_w = min((w + 1) * k1, n)``, is truncated at the state after
``s_w = max(0, t_w - k2)`` and, per :mod:`jbptt._src.semantics`, injects
``w * k1 < tau <= t_w`` (``"new"``), ``s_w < tau <= t_w`` (``"window"``) or
``tau = t_w`` (``"last"``). Window ``w`` occupies slot ``w mod m``, ``m`` the
most windows active at one step; the windows active at a step are
consecutive, so their slots differ.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np


def num_windows(n: int, k1: int) -> int:
  """``W``, the number of updates of a sequence of ``n`` steps."""
  return -(-n // k1)


def num_slots(n: int, k1: int, k2: int) -> int:
  """``m``: the most windows active at one step (those with ``s_w < step <=
  t_w``), computed without listing the windows."""
  steps = np.arange(1, n + 1, dtype=np.int64)
  last = num_windows(n, k1) - 1
  first = (steps - 1) // k1  # the first window with t_w >= step
  bound = steps + k2  # active windows have t_w < step + k2
  ends_before = np.minimum(last, (bound - 1) // k1) + (n < bound)
  return max(1, int((ends_before - first).max()))


def slot_windows(n: int, k1: int, m: int):
  """``(w, t)``: int ``(n, m)`` arrays, the window slot ``c`` holds at step
  ``i + 1`` (row ``i``) and the step at which it ends."""
  step = jnp.arange(1, n + 1)[:, None]
  slot = jnp.arange(m)[None, :]
  first = (step - 1) // k1
  w = first + jnp.mod(slot - first, m)
  return w, jnp.minimum((w + 1) * k1, n)


def slot_tables(n: int, k1: int, k2: int, losses: str, m: int):
  """``(keep, seed)``: boolean ``(n, m)`` arrays, made on the device.

  Row ``i`` is step ``i + 1``. ``keep[i, c]``: slot ``c`` holds a window
  whose adjoint passes on from step ``i + 1`` to the state before it (false
  at the window's first step, ``s_w + 1``, and for an empty slot).
  ``seed[i, c]``: the window in slot ``c`` injects the loss of step
  ``i + 1``.
  """
  step = jnp.arange(1, n + 1)[:, None]
  first = (step - 1) // k1
  w, t = slot_windows(n, k1, m)
  s = jnp.maximum(0, t - k2)
  active = (w < num_windows(n, k1)) & (s < step) & (step <= t)
  keep = active & (step > s + 1)
  if losses == "new":
    seed = active & (w == first)
  elif losses == "window":
    seed = active
  else:
    seed = active & (step == t)
  return keep, seed

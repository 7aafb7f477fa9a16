"""The truncation mechanics: one window of steps with its gradient cut.

Every fast path of :mod:`jbptt` is built from :func:`segment_loss`: a run of
``L`` steps from a carry held constant, in which the first ``n_own`` steps
each see only their own step (their entering carry is held constant too) and
the remaining steps backpropagate to the state after step ``n_own``. Masks
say which step losses count (``inject``, static) and which steps exist
(``valid``, for windows padded before the start of a stream).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

tree_map = jax.tree_util.tree_map


def select_leading(mask, on_true, on_false):
  """``where(mask, on_true, on_false)`` leaf by leaf, ``mask`` leading.

  ``mask`` has shape ``S``; every leaf has shape ``S + F`` and the mask is
  broadcast over the trailing ``F``.
  """

  def pick(a, b):
    if jnp.ndim(mask) == 0 and jnp.shape(a) == jnp.shape(b):
      # A scalar predicate selects whole arrays: no broadcast mask is made
      # (or stored for the backward pass) at every step.
      a, b = jnp.asarray(a), jnp.asarray(b)
      dtype = jnp.result_type(a, b)
      return lax.select(mask, a.astype(dtype), b.astype(dtype))
    m = jnp.reshape(mask, jnp.shape(mask) + (1,) * (jnp.ndim(a) - jnp.ndim(mask)))
    return jnp.where(m, a, b)

  return tree_map(pick, on_true, on_false)


def masked_step(step_loss, params, carry, x, reset, valid, initial_carry):
  """One step: reset the carry where asked, step, keep it where not valid.

  A reset replaces the carry by ``initial_carry`` before the step; no
  gradient crosses it (``where`` sends none to the replaced branch). An
  invalid step (``valid`` False) leaves the carry unchanged, reset or not.
  """
  entering = carry
  if reset is not None:
    carry = select_leading(reset, initial_carry, carry)
  new_carry, loss = step_loss(params, carry, x)
  if valid is not None:
    new_carry = select_leading(valid, new_carry, entering)
  return new_carry, loss


def _slice(tree, start, stop):
  return tree_map(lambda a: a[start:stop], tree)


def segment_loss(
    step_loss,
    params,
    carry,
    xs,
    resets,
    valid,
    initial_carry,
    *,
    n_own: int,
    inject: np.ndarray,
    unroll: int | bool = 1,
):
  """Runs one truncated window and sums its injected losses.

  Args:
    step_loss: ``(params, carry, x) -> (carry, loss)``.
    params: the parameters (differentiated).
    carry: the carry before the window; held constant.
    xs: the window's inputs, leaves of leading length ``L``.
    resets: ``None`` or a boolean mask of shape ``(L,) + S``.
    valid: ``None`` or a boolean ``(L,)``; invalid steps keep the carry and
      never count.
    initial_carry: the carry a reset restores; held constant.
    n_own: the number of leading steps that see only their own step.
    inject: a static boolean ``(L,)``: the step losses that count.
    unroll: steps per iteration of the scan, passed to ``lax.scan``.

  Returns:
    ``(loss_sum, final_carry)``: the sum of the counted step losses and the
    carry after the window.
  """
  length = len(inject)
  initial_carry = lax.stop_gradient(initial_carry)
  inputs = (xs, resets, valid)

  def run(p, h, start, stop, cut_each):
    def body(h, inp):
      if cut_each:
        h = lax.stop_gradient(h)
      return masked_step(step_loss, p, h, *inp, initial_carry)

    return lax.scan(body, h, _slice(inputs, start, stop), unroll=unroll)

  h = lax.stop_gradient(carry)
  losses = []
  if n_own:
    own_params = params if inject[:n_own].any() else lax.stop_gradient(params)
    h, own = run(own_params, h, 0, n_own, True)
    h = lax.stop_gradient(h)
    losses.append(own)
  if n_own < length:
    h, rest = run(params, h, n_own, length, False)
    losses.append(rest)
  losses = jnp.concatenate(losses) if len(losses) > 1 else losses[0]
  if valid is None and np.all(inject):  # every loss counts: no mask to apply
    return jnp.sum(losses), h
  mask = jnp.asarray(inject)
  if valid is not None:
    mask = mask & valid
  loss_sum = jnp.sum(jnp.where(mask, losses, jnp.zeros_like(losses)))
  return loss_sum, h


def forward(step_loss, params, carry, xs, resets, initial_carry, valid=None,
            unroll=1):
  """Runs the steps for their values only; returns every carry ``h_1..h_L``."""
  params = lax.stop_gradient(params)

  def body(h, inp):
    h, _ = masked_step(step_loss, params, h, *inp, initial_carry)
    return h, h

  return lax.scan(body, lax.stop_gradient(carry), (xs, resets, valid),
                  unroll=unroll)

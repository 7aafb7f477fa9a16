"""The truncation mechanics: one window of steps with its gradient cut.

Every re-run window of :mod:`jbptt` is built from :func:`segment_loss`: a run of
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

from jbptt._src import gradient, truncation

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


def hold(cut, carry):
  """``carry``, held constant (``stop_gradient``) where ``cut``.

  The cut between two truncated blocks as a mask, for a loop that counts its
  steps itself (the truncating Flax layers, whose scan is Flax's): ``cut``
  leads every leaf as in :func:`select_leading`, ``()`` for the whole carry
  or e.g. ``(batch,)`` for sequences cut at steps of their own.
  """
  return select_leading(cut, lax.stop_gradient(carry), carry)


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


def masked_sum(values, inject, valid):
  """The sum of ``values`` (leading ``L``) where ``inject`` (static) and
  ``valid`` (``None`` or a boolean ``(L,)``) hold."""
  if valid is None and np.all(inject):  # every step counts: no mask
    return jnp.sum(values)
  mask = jnp.asarray(inject)
  if valid is not None:
    mask = mask & valid
  return jnp.sum(jnp.where(mask, values, jnp.zeros_like(values)))


def segment_loss(
    split,
    params,
    carry,
    xs,
    resets,
    valid,
    initial_carry,
    *,
    n_own: int,
    inject: np.ndarray,
    remat=None,
    unroll: int | bool = 1,
    scale=None,
):
  """Runs one truncated window; returns its injected totals and weights.

  The cell of ``split`` (:mod:`jbptt._src.steps`) is scanned over the
  window; its head is evaluated once over all of the window's outputs.

  Args:
    split: the step, as a :class:`jbptt._src.steps.Split`.
    params: the parameters (differentiated).
    carry: the carry before the window; held constant.
    xs: the window's inputs, leaves of leading length ``L``.
    resets: ``None`` or a boolean mask of shape ``(L,) + S``.
    valid: ``None`` or a boolean ``(L,)``; invalid steps keep the carry and
      never count.
    initial_carry: the carry a reset restores; held constant.
    n_own: the number of leading steps that see only their own step.
    inject: a static boolean ``(L,)``: the step losses that count.
    remat: ``None`` or a ``jax.checkpoint`` policy for each step.
    unroll: steps per iteration of the scan, passed to ``lax.scan``.
    scale: ``None`` or a float ``(L,)``: the multiplier of the cotangent of
      the carry entering each step (:mod:`jbptt._src.truncation`); only the
      steps after the first ``n_own + 1`` use theirs.

  Returns:
    ``(total, weight, final_carry)``: the sums of the counted steps' totals
    and weights, and the carry after the window.
  """
  length = len(inject)
  initial_carry = lax.stop_gradient(initial_carry)
  inputs = (xs, resets, valid)
  cell = gradient.rematted(
      lambda p, h, x, r, v: masked_step(split.cell, p, h, x, r, v,
                                        initial_carry),
      remat,
  )

  def run(p, h, start, stop, cut_each):
    def body(h, inp):
      if cut_each:
        h = lax.stop_gradient(h)
      return cell(p, h, *inp)

    if cut_each or scale is None:
      return lax.scan(body, h, _slice(inputs, start, stop), unroll=unroll)

    def scaled_body(h, inp):
      inp, m = inp
      return body(truncation.scale_cotangent(h, m), inp)

    return lax.scan(scaled_body, h, (_slice(inputs, start, stop),
                                     scale[start:stop]), unroll=unroll)

  h = lax.stop_gradient(carry)
  outs = []
  if n_own:
    own_params = params if inject[:n_own].any() else lax.stop_gradient(params)
    h, own = run(own_params, h, 0, n_own, True)
    h = lax.stop_gradient(h)
    outs.append(own)
  if n_own < length:
    h, rest = run(params, h, n_own, length, False)
    outs.append(rest)
  outs = outs[0] if len(outs) == 1 else tree_map(
      lambda a, b: jnp.concatenate([a, b]), *outs)
  totals, weights = split.head(params, outs, xs)
  return (masked_sum(totals, inject, valid), masked_sum(weights, inject, valid),
          h)


def forward(cell, params, carry, xs, resets, initial_carry, valid=None,
            unroll=1):
  """Runs ``cell`` for its carries only; returns the final carry and every
  carry ``h_1..h_L``."""
  params = lax.stop_gradient(params)

  def body(h, inp):
    h, _ = masked_step(cell, params, h, *inp, initial_carry)
    return h, h

  return lax.scan(body, lax.stop_gradient(carry), (xs, resets, valid),
                  unroll=unroll)


def truncated_scan(cell, params, carry, xs, *, k: int, unroll=1):
  """As ``lax.scan`` of ``cell(params, carry, x) -> (carry, y)``, in blocks
  of ``k`` steps each run from a carry held constant (the first block from
  ``carry`` itself); returns ``(carry, ys)``."""
  n = jax.tree_util.tree_leaves(xs)[0].shape[0]
  step = lambda h, x: cell(params, h, x)
  first = min(k, n)
  h, ys_first = lax.scan(step, carry, _slice(xs, 0, first), unroll=unroll)
  pieces = [ys_first]
  q = (n - first) // k
  if q:
    def block(h, xb):
      return lax.scan(step, lax.stop_gradient(h), xb, unroll=unroll)

    fold = lambda a: jnp.reshape(a[first:first + q * k], (q, k) + a.shape[1:])
    h, ys = lax.scan(block, h, tree_map(fold, xs))
    pieces.append(tree_map(lambda a: jnp.reshape(a, (q * k,) + a.shape[2:]),
                           ys))
  if first + q * k < n:
    h, ys_tail = lax.scan(step, lax.stop_gradient(h),
                          _slice(xs, first + q * k, n), unroll=unroll)
    pieces.append(ys_tail)
  ys = pieces[0] if len(pieces) == 1 else tree_map(
      lambda *a: jnp.concatenate(a), *pieces)
  return h, ys

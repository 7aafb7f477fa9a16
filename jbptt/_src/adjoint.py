"""Shared-forward adjoints: many truncated windows backpropagated in one pass.

When the states a set of truncated windows runs through are already known
(``h_0 .. h_n`` of one forward pass with fixed params, or the stored states of
a stream), no window needs to be re-run. The gradient of every window is a
sum over its steps of the step's vector-Jacobian product (VJP) at that step's
stored input state, and VJPs are linear. So one reverse pass over the steps
does it all:

* the adjoints of the (at most ``m``) windows active at step ``i`` travel
  together as a batch with a leading axis of size ``m`` (one *slot* each);
* at step ``i`` each slot receives the cotangent ``seed[i, slot]`` of the
  step's loss in the window it holds, the step's carry VJP is applied to the
  ``m`` slots at once (``vmap``), and a slot whose window is truncated at this
  step's input state is dropped (``keep[i, slot]`` false);
* the params and input cotangents are taken once, from the sum over the slots.

A step's loss may be read out of its output by a head evaluated over all the
rows at once (:mod:`jbptt._src.steps`); its VJP is linear and separable over
rows, so each slot's output cotangent is its seed times the row's unit one.

The linearisation points do not depend on the adjoints, so by default every
step is linearised at once (``vmap`` over time: large batched matmuls), and
the sequential part does nothing but the carry VJPs; the params and input
cotangents are one more batched call. With a ``jax.checkpoint`` policy
(``remat``) the steps are instead linearised one after the other keeping only
what the policy saves, and the params and input cotangents are taken step by
step inside the reverse pass.
"""

from __future__ import annotations

import jax
import jax.extend as jex
import jax.numpy as jnp
import numpy as np
from jax import lax

tree_map = jax.tree_util.tree_map


def _is_var(v) -> bool:
  return isinstance(v, jex.core.Var)


def depends_on_inputs(fn, *args) -> list[bool]:
  """For each output leaf of ``fn(*args)``: whether it depends on ``args``.

  A conservative data-flow walk over ``fn``'s jaxpr (a nested call counts as
  depending on all of its inputs). Values computed from closed-over
  constants only are independent.
  """
  closed = jax.make_jaxpr(fn)(*args)
  dep = set(closed.jaxpr.invars)
  for eqn in closed.jaxpr.eqns:
    if any(_is_var(v) and v in dep for v in eqn.invars):
      dep.update(eqn.outvars)
  return [_is_var(v) and v in dep for v in closed.jaxpr.outvars]


def _split(xs):
  """Splits ``xs`` into its inexact (differentiable) leaves and the others."""
  leaves, treedef = jax.tree_util.tree_flatten(xs)
  is_float = [jnp.issubdtype(jnp.result_type(a), jnp.inexact) for a in leaves]

  def merge(floats, others):
    fi, oi = iter(floats), iter(others)
    return jax.tree_util.tree_unflatten(
        treedef, [next(fi) if f else next(oi) for f in is_float]
    )

  floats = [a for a, f in zip(leaves, is_float) if f]
  others = [a for a, f in zip(leaves, is_float) if not f]

  def cotangent(d_floats):
    di = iter(d_floats)
    return jax.tree_util.tree_unflatten(treedef, [
        next(di) if f else np.zeros(np.shape(a), jax.dtypes.float0)
        for a, f in zip(leaves, is_float)
    ])

  return floats, others, merge, cotangent


def _row(tree, i):
  return tree_map(lambda a: a[i], tree)


def _where_rows(mask, tree):
  """Zeroes the slots (leading axis) of ``tree`` where ``mask`` is false;
  a float ``mask`` multiplies them (exactly zero where it is 0)."""

  def pick(a):
    m = jnp.reshape(mask, mask.shape + (1,) * (a.ndim - 1))
    if m.dtype == bool:
      return jnp.where(m, a, jnp.zeros_like(a))
    return jnp.where(m != 0, a * m.astype(a.dtype), jnp.zeros_like(a))

  return tree_map(pick, tree)


def _scaled(s, tree):
  """``tree`` times the scalar ``s`` (a seed), leaf by leaf."""
  return tree_map(lambda a: (s * a).astype(a.dtype), tree)


def _slots_vjp(pull, lam, seed_i, g_i, index):
  """``pull`` applied to every slot of ``(lam, seed_i * g_i)``; output
  ``index``."""
  if seed_i.shape[0] == 1:  # one slot: no vmap (its reshapes cost per step)
    ct = pull((tree_map(lambda a: a[0], lam), _scaled(seed_i[0], g_i)))[index]
    return tree_map(lambda a: a[None], ct)
  return jax.vmap(lambda c, s: pull((c, _scaled(s, g_i)))[index])(lam, seed_i)


def _linearise(step, params, hs_prev, rows, remat):
  """Every row's step linearised: ``(outs, pull_of_row)``.

  Returns the rows' outputs and a function ``pull_of_row(i_residuals)``
  rebuilding row ``i``'s VJP from its slice of the stacked residuals, plus
  those stacked residuals. Residuals that do not depend on the row (e.g. the
  weights) are kept once instead of once per row. Without ``remat`` all rows
  are linearised at once (``vmap``: batched matmuls); with a
  ``jax.checkpoint`` policy one after the other (``lax.map``), keeping only
  what the policy saves.
  """
  fn = step if remat is None else jax.checkpoint(step, policy=remat)
  box = []

  def residuals(h, row):
    if remat is None:  # the VJP of the carry only: its residuals are fewer
      out, pull = jax.vjp(lambda h: fn(params, h, *row), h)
    else:  # params and inputs too: their cotangents are taken per step
      out, pull = jax.vjp(lambda p, h, fl: fn(p, h, fl, *row[1:]), params, h,
                          row[0])
    leaves, treedef = jax.tree_util.tree_flatten(pull)
    box.append(treedef)
    return out, leaves

  batched = depends_on_inputs(
      lambda h, row: residuals(h, row)[1], _row(hs_prev, 0), _row(rows, 0)
  )
  if remat is None:
    out_axes = (0, [0 if b else None for b in batched])
    (_, outs), leaves = jax.vmap(residuals, out_axes=out_axes)(hs_prev, rows)
    stacked = [a for a, b in zip(leaves, batched) if b]
    fixed = [a for a, b in zip(leaves, batched) if not b]
  else:
    _, first = residuals(_row(hs_prev, 0), _row(rows, 0))
    fixed = [a for a, b in zip(first, batched) if not b]

    def row_residuals(args):
      (_, out), leaves = residuals(*args)
      return out, [a for a, b in zip(leaves, batched) if b]

    outs, stacked = lax.map(row_residuals, (hs_prev, rows))
  treedef = box[-1]

  def pull_of_row(res_i):
    it_s, it_f = iter(res_i), iter(fixed)
    return jax.tree_util.tree_unflatten(
        treedef, [next(it_s) if b else next(it_f) for b in batched]
    )

  return outs, pull_of_row, stacked


def backprop(cell, head, params, hs_prev, xs, resets, keep, seed, *,
             remat=None, unroll: int | bool = 1):
  """Cotangents of params and xs for windows laid out by ``keep``/``seed``.

  Args:
    cell: ``cell(params, h, x, reset) -> (h, out)``, one step (``reset`` may
      be ``None``).
    head: ``head(params, outs, xs) -> (totals, weights)`` over the rows (see
      :mod:`jbptt._src.steps`); it must treat each row on its own.
    params: the params every step is linearised at.
    hs_prev: the input state of every row (leaves of leading length ``L``).
    xs: the rows' inputs (leading length ``L``).
    resets: ``None`` or the rows' reset masks.
    keep: boolean ``(L, m)``: whether slot ``m``'s adjoint passes on from
      row ``i`` to its input state (see :mod:`jbptt._src.layout`); or a
      float ``(L, m)``: the multiplier with which it passes on (0: not at
      all; :mod:`jbptt._src.truncation`).
    seed: ``(L, m)`` cotangents of the rows' totals, per slot.
    remat: ``None`` or a ``jax.checkpoint`` policy: with one, the steps are
      linearised one after the other keeping what the policy saves, and the
      params and input cotangents are taken step by step in the reverse
      pass.
    unroll: steps per iteration of the reverse scan, passed to ``lax.scan``.

  Returns:
    ``(d_params, d_xs, (totals, weights))``: ``d_xs`` with ``float0`` leaves
    for integer inputs; ``totals`` and ``weights`` the ``(L,)`` rows' values.
  """
  floats, others, merge, cotangent = _split(xs)
  rows = (floats, others, resets)

  def step(p, h, row_floats, row_others, r):
    return cell(p, h, merge(row_floats, row_others), r)

  outs, pull_of_row, stacked = _linearise(step, params, hs_prev, rows, remat)
  # The head's VJP is linear in its cotangent and separable over rows: one
  # pull with unit seeds gives each row's output cotangent per unit seed; one
  # with the rows' total seeds gives the head's params cotangent.
  totals, totals_pull, weights = jax.vjp(
      lambda p, o, fl: head(p, o, merge(fl, others)), params, outs, floats,
      has_aux=True)
  weights = lax.stop_gradient(weights)
  unit = totals_pull(jnp.ones_like(totals))[1]
  seed_rows = seed.sum(1).astype(totals.dtype)
  d_params_head, _, d_floats_head = totals_pull(seed_rows)
  zero_lam = tree_map(
      lambda a: jnp.zeros((keep.shape[1],) + a.shape[1:], a.dtype), hs_prev
  )
  seed = seed.astype(totals.dtype)

  if remat is not None:
    zero_p = tree_map(jnp.zeros_like, params)

    def body(carry, inp):
      lam, d_p = carry
      res_i, g_i, keep_i, seed_i = inp
      pull = pull_of_row(res_i)
      d_h = _slots_vjp(pull, lam, seed_i, g_i, 1)
      total = (tree_map(lambda a: a.sum(0), lam), _scaled(seed_i.sum(0), g_i))
      dp_i, _, dfl = pull(total)
      d_p = tree_map(jnp.add, d_p, dp_i)
      return (_where_rows(keep_i, d_h), d_p), dfl

    (_, d_params), d_floats = lax.scan(
        body, (zero_lam, zero_p), (stacked, unit, keep, seed), reverse=True,
        unroll=unroll,
    )
  else:
    def body(lam, inp):
      res_i, g_i, keep_i, seed_i = inp
      d_h = _slots_vjp(pull_of_row(res_i), lam, seed_i, g_i, 0)
      return _where_rows(keep_i, d_h), tree_map(lambda a: a.sum(0), lam)

    _, lam_sum = lax.scan(body, zero_lam, (stacked, unit, keep, seed),
                          reverse=True, unroll=unroll)

    def all_steps(p, fl):
      return jax.vmap(lambda h, fl, ot, r: step(p, h, fl, ot, r))(
          hs_prev, fl, others, resets
      )

    _, pull_all = jax.vjp(all_steps, params, floats)
    g_rows = jax.vmap(_scaled)(seed_rows, unit)
    d_params, d_floats = pull_all((lam_sum, g_rows))
  d_params = tree_map(jnp.add, d_params, d_params_head)
  d_floats = tree_map(jnp.add, d_floats, d_floats_head)
  return d_params, cotangent(d_floats), (totals, weights)

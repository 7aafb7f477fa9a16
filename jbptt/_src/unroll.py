"""``unroll`` and ``truncated_unroll``: a recurrent cell over a sequence."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from jbptt._src import semantics


def unroll(cell, params, carry, xs, *, unroll: int = 1):
  """``jax.lax.scan`` of ``cell(params, carry, x) -> (carry, y)`` over ``xs``.

  Args:
    cell: the recurrent cell, a pure function.
    params: its parameters, closed over by every step.
    carry: the initial carry (any pytree).
    xs: a pytree whose leaves share a leading time axis.
    unroll: passed to ``lax.scan``.

  Returns:
    ``(carry, ys)``: the final carry and the stacked outputs.
  """
  return lax.scan(lambda h, x: cell(params, h, x), carry, xs, unroll=unroll)


def truncated_unroll(cell, params, carry, xs, *, k: int, unroll: int = 1):
  """As :func:`unroll`, but the carry is held constant after every ``k`` steps.

  The carries after steps ``k, 2k, ...`` pass through ``stop_gradient``, so
  any loss on the outputs backpropagates only within its block of ``k``
  steps (the first block also reaches ``carry``). With a loss on every
  output and ``k`` dividing ``n`` this is TBPTT(k, k); it is the engine of
  the truncating Flax layers.

  Args:
    cell: ``cell(params, carry, x) -> (carry, y)``.
    params: its parameters.
    carry: the initial carry.
    xs: a pytree whose leaves share a leading time axis.
    k: the truncation length (positive int).
    unroll: passed to ``lax.scan``.

  Returns:
    ``(carry, ys)`` as :func:`unroll`; the values are identical.
  """
  k = semantics.check_positive_int("k", k)

  def body(state, x):
    h, i = state
    cut = (i > 0) & (i % k == 0)
    h = jax.tree_util.tree_map(
        lambda a: jnp.where(cut, lax.stop_gradient(a), a), h
    )
    h, y = cell(params, h, x)
    return (h, i + 1), y

  (carry, _), ys = lax.scan(body, (carry, 0), xs, unroll=unroll)
  return carry, ys


def cell_loss(cell, loss_fn):
  """Turns a cell and a per-step loss into a ``step_loss`` for the combinators.

  Args:
    cell: ``cell(params, carry, inputs) -> (carry, y)``.
    loss_fn: ``loss_fn(y, targets) -> scalar`` (reduce over the batch).

  Returns:
    ``step_loss(params, carry, (inputs, targets)) -> (carry, loss)``: each
    time slice of ``xs`` is an ``(inputs, targets)`` pair.

  Examples:
    >>> import jax.numpy as jnp, jbptt
    >>> cell = lambda w, h, u: (jnp.tanh(w * h + u),) * 2
    >>> step_loss = jbptt.cell_loss(cell, lambda y, z: jnp.mean((y - z) ** 2))
    >>> step_loss(0.5, jnp.zeros(2), (jnp.ones(2), jnp.ones(2)))[1].shape
    ()
  """

  def step_loss(params, carry, x):
    inputs, targets = x
    carry, y = cell(params, carry, inputs)
    return carry, loss_fn(y, targets)

  return step_loss

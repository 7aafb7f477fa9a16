"""Step losses: weighted losses, and a cell with its read-out outside.

Every combinator works on a step split in two (:class:`Split`): a *cell*
``(params, carry, x) -> (carry, out)`` that is scanned over time, and a
*head* ``(params, outs, xs) -> (totals, weights)`` evaluated once over all
the steps of a window (vectorised over time), after the scan. For a plain
``step_loss`` the cell is the step and the head only reads its loss; for a
step made by :func:`cell_loss` the cell is the user's recurrent cell and the
head is the read-out and loss, so a large read-out (a language model's
vocabulary) becomes one matmul over the window instead of one per step.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax


class WeightedLoss(NamedTuple):
  """A step's loss as a sum and a weight, for padded or masked batches.

  A ``step_loss`` may return this as its loss. An update's objective is
  ``sum(total) / sum(weight)`` over its injected steps, and its gradient the
  sum of the truncated gradients of the totals divided by ``sum(weight)``
  (the weights are held constant). A plain scalar loss ``l`` means
  ``WeightedLoss(l, 1)``.

  Attributes:
    total: a scalar: for a padded batch, the sum of the real examples' losses
      at this step.
    weight: a scalar: their number (any non-negative number; an int is cast
      to ``total``'s dtype).

  Examples:
    >>> import jax.numpy as jnp, jbptt
    >>> def step_loss(w, h, x):
    ...   u, y, mask = x                      # mask: 1 for real examples
    ...   h = jnp.tanh(w * h + u)
    ...   return h, jbptt.WeightedLoss(jnp.sum(mask * (h - y) ** 2),
    ...                                jnp.sum(mask))
  """

  total: Any
  weight: Any


def as_weighted(loss) -> WeightedLoss:
  """``loss`` as a :class:`WeightedLoss` whose weight has ``total``'s dtype
  and carries no gradient."""
  if isinstance(loss, WeightedLoss):
    total = jnp.asarray(loss.total)
    weight = lax.stop_gradient(jnp.asarray(loss.weight))
    return WeightedLoss(total, weight.astype(total.dtype))
  loss = jnp.asarray(loss)
  return WeightedLoss(loss, jnp.ones((), loss.dtype))


@dataclasses.dataclass(frozen=True)
class CellLoss:
  """A recurrent cell and a per-step loss of its output (see :func:`cell_loss`).

  Called as a ``step_loss``, it runs both in one step; the combinators
  instead run ``loss_fn`` after the scan over the cell, once per window.

  Attributes:
    cell: ``cell(params, carry, inputs) -> (carry, y)``.
    loss_fn: ``loss_fn(params, y, targets) -> loss``.
  """

  cell: Callable
  loss_fn: Callable

  def __call__(self, params, carry, x):
    inputs, targets = x
    carry, y = self.cell(params, carry, inputs)
    return carry, self.loss_fn(params, y, targets)


def cell_loss(cell, loss_fn) -> CellLoss:
  """A ``step_loss`` from a cell and a loss of its output, read out outside.

  ``step_loss(params, carry, (inputs, targets)) = (carry', loss_fn(params, y,
  targets))`` with ``(carry', y) = cell(params, carry, inputs)``: each time
  slice of ``xs`` is an ``(inputs, targets)`` pair. :func:`jbptt.truncated_loss`
  and :func:`jbptt.trainer` recognise a step made this way: they scan the
  cell alone and evaluate ``loss_fn`` once per window over all of its steps
  (``jax.vmap`` over time), so a read-out head in ``loss_fn`` becomes one
  large matmul. Values and gradients are those of the step above.

  Args:
    cell: ``cell(params, carry, inputs) -> (carry, y)``.
    loss_fn: ``loss_fn(params, y, targets) -> loss``: a scalar (reduce over
      the batch) or a :class:`WeightedLoss`. ``params`` are the cell's, so a
      read-out head can live in them. It must treat each step on its own
      (it is vectorised over time).

  Returns:
    A :class:`CellLoss`, callable as ``step_loss(params, carry, x)``.

  Examples:
    >>> import jax.numpy as jnp, jbptt
    >>> cell = lambda p, h, u: (jnp.tanh(p["w"] * h + u),) * 2
    >>> head = lambda p, y, z: jnp.mean((p["v"] * y - z) ** 2)
    >>> step_loss = jbptt.cell_loss(cell, head)
    >>> p = {"w": 0.5, "v": 2.0}
    >>> step_loss(p, jnp.zeros(2), (jnp.ones(2), jnp.ones(2)))[1].shape
    ()
  """
  if not callable(cell) or not callable(loss_fn):
    raise TypeError(
        "cell_loss(cell, loss_fn) takes two callables, got "
        f"cell={cell!r}, loss_fn={loss_fn!r}."
    )
  return CellLoss(cell, loss_fn)


class Split(NamedTuple):
  """A step as a scanned cell and a head over a window's outputs.

  Attributes:
    cell: ``(params, carry, x) -> (carry, out)``.
    head: ``(params, outs, xs) -> (totals, weights)``, over a leading time
      axis (``outs`` and ``xs`` of the same length).
    is_cell_loss: whether the step came from :func:`cell_loss`.
  """

  cell: Callable
  head: Callable
  is_cell_loss: bool


def split(step_loss) -> Split:
  """``step_loss`` as a :class:`Split`."""
  if isinstance(step_loss, CellLoss):
    user_cell, loss_fn = step_loss.cell, step_loss.loss_fn

    def cell(params, carry, x):
      return user_cell(params, carry, x[0])

    def head(params, ys, xs):
      one = lambda y, z: tuple(as_weighted(loss_fn(params, y, z)))
      return jax.vmap(one)(ys, xs[1])

    return Split(cell, head, True)

  def step(params, carry, x):
    carry, loss = step_loss(params, carry, x)
    return carry, as_weighted(loss)

  return Split(step, lambda params, outs, xs: (outs.total, outs.weight), False)

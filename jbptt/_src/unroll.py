"""``truncated_unroll``: a recurrent cell over a sequence, gradient cut every
``k`` steps."""

from __future__ import annotations

from jbptt._src import checks, gradient, segment, semantics


def truncated_unroll(cell, params, carry, xs, *, k: int | None,
                     unroll: int | bool = 1):
  """As ``jax.lax.scan`` of ``cell``, but the carry is held constant after
  every ``k`` steps.

  The carries after steps ``k, 2k, ...`` pass through ``stop_gradient``, so
  any loss on the outputs backpropagates only within its block of ``k``
  steps (the first block also reaches ``carry``). With a loss on every
  output and ``k`` dividing ``n`` this is TBPTT(k, k); it is the engine of
  the truncating Flax layers. ``k=None`` cuts nothing (plain ``lax.scan``).

  Args:
    cell: ``cell(params, carry, x) -> (carry, y)``.
    params: its parameters.
    carry: the initial carry.
    xs: a pytree whose leaves share a leading time axis.
    k: the truncation length (positive int), or ``None``.
    unroll: passed to ``lax.scan``.

  Returns:
    ``(carry, ys)``: the final carry and the stacked outputs; the values are
    those of ``lax.scan``.

  Examples:
    >>> import jax, jax.numpy as jnp, jbptt
    >>> cell = lambda w, h, x: (jnp.tanh(w * h + x),) * 2
    >>> carry, ys = jbptt.truncated_unroll(cell, 0.5, 0.0, jnp.ones(5), k=2)
    >>> ys.shape
    (5,)
  """
  n = checks.time_length(xs)
  k = n if k is None else semantics.check_positive_int("k", k)
  unroll = gradient.check_unroll(unroll)
  return segment.truncated_scan(cell, params, checks.as_arrays(carry), xs,
                                k=k, unroll=unroll)

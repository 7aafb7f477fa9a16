"""The semantics of TBPTT(k1, k2): the contract every fast path implements.

Definition (Williams & Peng, 1990; Sutskever, 2013, section 2.8.6)
------------------------------------------------------------------

A step function ``step_loss(params, carry, x) -> (carry, loss)`` is applied to
the slices ``x_1, ..., x_n`` of a pytree ``xs`` whose leaves share a leading
time axis of length ``n``. Steps are numbered ``1..n``; ``h_t`` is the carry
after step ``t`` and ``h_0`` the initial carry. The loss of step ``t`` is a
pair ``(total_t, weight_t)``: a :class:`jbptt.WeightedLoss`, or a scalar
``loss_t`` meaning ``(loss_t, 1)``. Weights are held constant.

* **Updates** end at ``t = k1, 2*k1, ...``. When a whole sequence is given
  (:func:`jbptt.truncated_loss`), a last update ends at ``n`` if ``k1`` does
  not divide ``n``.
* The update ending at ``t`` **injects** a set of step losses, each
  backpropagated to the state after step ``s``, which is held constant
  (``stop_gradient``). ``t_prev`` is the end of the previous update (0 for the
  first one).

| ``losses``   | injected steps ``tau``           | truncation point ``s``           |
|--------------|----------------------------------|----------------------------------|
| ``"new"``    | ``t_prev < tau <= t``            | ``max(0, min(t - k2, tau - 1))`` |
| ``"window"`` | ``max(0, t - k2) < tau <= t``    | ``max(0, t - k2)``               |
| ``"last"``   | ``tau = t``                      | ``max(0, t - k2)``               |

So for ``k1 <= k2`` every update backpropagates through its last ``k2``
steps, and the final, shorter update of a sequence whose length is not a
multiple of ``k1`` also reaches back ``k2`` steps (past ``t_prev``). For
``k1 > k2`` a loss older than ``t - k2`` gets only its own step:
TBPTT(k1, 1) gives every loss exactly one step.

* The objective of an update is ``sum(total_tau) / sum(weight_tau)`` over its
  injected steps, and its gradient the sum of the truncated gradients of the
  injected ``total_tau`` divided by ``sum(weight_tau)``. With plain scalar
  losses that is the mean of the injected losses and of their truncated
  gradients. An update whose weights sum to 0 has objective and gradient 0;
  :func:`jbptt.trainer` makes no optimizer step for it (params and optimizer
  state are kept).

Consequences: TBPTT(n, n) is full BPTT; TBPTT(1, n) takes, at each step, the
full BPTT gradient of that step's loss; TBPTT(k, k) with ``k`` dividing ``n``
is chunking the sequence with ``stop_gradient`` at the chunk boundaries.

``k2`` may also be a rule, :class:`jbptt.Randomized` or :class:`jbptt.Adaptive`
(:mod:`jbptt._src.truncation`): the update ending at ``t`` is then TBPTT(k1,
``K``), ``K`` the rule's reach, with the carry's cotangent flowing from step
``j + 1`` into ``h_j`` multiplied by a factor ``m_t(d)``, ``d = t - j`` (0: a
truncation point).

Reference loop
--------------

The plain-Python meaning of :func:`jbptt.truncated_loss` (fixed params):

```python
def reference(step_loss, params, h0, xs, k1, k2, losses):
  n = len(xs)
  hs = [h0]                                   # forward values h_0..h_n
  for x in xs:
    hs.append(step_loss(params, hs[-1], x)[0])
  total, grad, weight = 0.0, 0.0, 0.0
  for t, injected in schedule(n, k1, k2, losses):
    for tau, s in injected:                   # total_tau back to h_s
      def total_tau(p):
        h = jax.lax.stop_gradient(hs[s])
        for x in xs[s:tau]:
          h, loss = step_loss(p, h, x)
        loss = loss if isinstance(loss, WeightedLoss) else (loss, 1.0)
        return loss[0], loss[1]
      (value, w), g = jax.value_and_grad(total_tau, has_aux=True)(params)
      total, grad, weight = total + value, grad + g, weight + w
  if weight == 0:
    return 0.0, 0.0
  return total / weight, grad / weight
```

In the online :func:`jbptt.trainer` the stream's carry advances with the
params current at each step; at each update the window is re-run from the
*stored* stream state ``h_s`` with the current params, and the update's
gradient (as above, per update) is handed to the optax optimizer.

References:
  Williams & Peng, `An Efficient Gradient-Based Algorithm for On-Line Training
  of Recurrent Network Trajectories <https://doi.org/10.1162/neco.1990.2.4.490>`_,
  Neural Computation 2(4), 1990.

  Sutskever, `Training Recurrent Neural Networks
  <https://www.cs.utoronto.ca/~ilya/pubs/ilya_sutskever_phd_thesis.pdf>`_,
  PhD thesis, University of Toronto, 2013.
"""

from __future__ import annotations

import numbers
from typing import NamedTuple

LOSSES = ("new", "window", "last")


class Update(NamedTuple):
  """One update of the TBPTT(k1, k2) schedule of a sequence.

  Attributes:
    t: the step at which the update ends (1-based).
    injected: ``(tau, s)`` pairs: the loss of step ``tau`` is backpropagated
      to the state after step ``s``, held constant.
  """

  t: int
  injected: tuple[tuple[int, int], ...]


def check_positive_int(name: str, value) -> int:
  """Returns ``value`` as an int, or raises a ValueError naming ``name``."""
  if (
      isinstance(value, bool)
      or not isinstance(value, numbers.Integral)
      or value < 1
  ):
    raise ValueError(
        f"{name} must be a positive int, got {name}={value!r} "
        f"(of type {type(value).__name__})."
    )
  return int(value)


def check_losses(losses) -> str:
  """Returns ``losses`` or raises a ValueError listing the allowed values."""
  if not isinstance(losses, str) or losses not in LOSSES:
    raise ValueError(
        f"losses must be one of {LOSSES}, got losses={losses!r}."
    )
  return losses


def check_config(k1, k2, losses) -> tuple[int, int, str]:
  """Validates a TBPTT(k1, k2) configuration; returns it normalised."""
  return (check_positive_int("k1", k1), check_positive_int("k2", k2),
          check_losses(losses))


def update_ends(n: int, k1: int) -> list[int]:
  """The steps at which the updates of a sequence of length ``n`` end."""
  ends = list(range(k1, n + 1, k1))
  if n % k1:
    ends.append(n)
  return ends


def injected(t: int, t_prev: int, k2: int, losses: str):
  """The ``(tau, s)`` pairs injected by the update ending at ``t``."""
  if losses == "new":
    return tuple(
        (tau, max(0, min(t - k2, tau - 1))) for tau in range(t_prev + 1, t + 1)
    )
  s = max(0, t - k2)
  if losses == "window":
    return tuple((tau, s) for tau in range(s + 1, t + 1))
  return ((t, s),)


def schedule(n: int, k1: int, k2: int, losses: str = "new") -> list[Update]:
  """The TBPTT(k1, k2) updates of a whole sequence of ``n`` steps.

  A pure-Python statement of the contract, used to lay out the fast paths,
  by the tests and by ``jbptt schedule``.

  Args:
    n: the sequence length.
    k1: steps between updates.
    k2: how many steps each update backpropagates through.
    losses: which losses an update injects: ``"new"``, ``"window"`` or
      ``"last"`` (see the module docstring).

  Returns:
    One :class:`Update` per update, in order.

  Examples:
    >>> [u.t for u in schedule(10, 4, 6)]
    [4, 8, 10]
    >>> schedule(5, 2, 1, "last")[0]
    Update(t=2, injected=((2, 1),))
  """
  n = check_positive_int("n", n)
  k1, k2, losses = check_config(k1, k2, losses)
  updates, t_prev = [], 0
  for t in update_ends(n, k1):
    updates.append(Update(t, injected(t, t_prev, k2, losses)))
    t_prev = t
  return updates

"""The gradient strategies of the combinators, and their other options.

A strategy says how an update backpropagates through its window; it is one
keyword object, ``gradient=``, as diffrax's ``adjoint=``:

* :class:`Recompute` (the default): the window is re-run from its stored
  truncation state with the current params and differentiated. This is the
  contract of :mod:`jbptt._src.semantics` exactly.
* :class:`StoredStates`: Williams & Peng's BPTT(h; h0). The stream's states
  are stored as the stream computed them and nothing is re-run.

Both take ``remat``, a ``jax.checkpoint`` policy (or ``None``), honoured on
every path: it decides which intermediates of each step are kept from the
step's linearisation for its backward pass; everything else is recomputed
then.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import numpy as np


@dataclasses.dataclass(frozen=True)
class Recompute:
  """Re-run each window from its stored start state with the current params.

  The gradient of an update is the exact TBPTT(k1, k2) gradient of the
  contract (:mod:`jbptt._src.semantics`).

  Attributes:
    remat: ``None`` (keep every intermediate of the window's steps for the
      backward pass) or a ``jax.checkpoint`` policy, e.g.
      ``jax.checkpoint_policies.nothing_saveable`` (keep only each step's
      inputs) or ``dots_saveable`` (also keep matmul outputs); the rest is
      recomputed in the backward pass. Values and gradients are the same.
    burn_in: ``b``, a non-negative int. Before an update of
      :func:`jbptt.trainer` re-runs its window, the window's start state is
      refreshed: the ``b`` stream steps before it are run again from their
      stored state with the current params, under ``stop_gradient`` and
      injecting no loss (R2D2's burn-in; steps before the stream's start
      are not run, resets apply). The stream's own carry is not changed.
      ``0`` (the default) re-runs from the stored state itself. With fixed
      params (:func:`jbptt.truncated_loss`) the refreshed state is the
      stored one, so ``burn_in`` changes nothing there.

  Examples:
    >>> import jax, jbptt
    >>> jbptt.Recompute(remat=jax.checkpoint_policies.nothing_saveable)
    Recompute(remat=<function nothing_saveable at ...>, burn_in=0)
    >>> jbptt.Recompute(burn_in=16).burn_in
    16

  References:
    Kapturowski, Ostrovski, Quan, Munos & Dabney, `Recurrent Experience
    Replay in Distributed Reinforcement Learning
    <https://openreview.net/forum?id=r1lyTjAqYX>`_, ICLR 2019 (burn-in).
  """

  remat: Callable | None = None
  burn_in: int = 0


@dataclasses.dataclass(frozen=True)
class StoredStates:
  """Backpropagate through the stream's stored states; re-run nothing.

  Williams & Peng's BPTT(h; h0): the states of the last ``k2`` stream steps
  are stored as the stream computed them (each with the params current at
  its step). An update linearises step ``j`` of its window at (current
  params, stored ``h_(j-1)``, ``x_j``), all steps at once, and carries the
  adjoint back through them. For ``k1 >= k2`` the stored states are the
  re-run ones and the gradient equals :class:`Recompute`'s; for ``k1 < k2``
  states older than ``t - k1`` were computed with older params, so the
  gradient differs by terms of the order of the params' change over the
  window, at a lower cost (no second forward pass). Only
  :func:`jbptt.trainer` takes it: with fixed params (:func:`jbptt.truncated_loss`)
  stored and recomputed states are the same.

  Attributes:
    remat: ``None`` or a ``jax.checkpoint`` policy: what each step's
      linearisation keeps for the backward pass (see :class:`Recompute`).
      With a policy the steps are linearised one after the other, so only
      what the policy saves is held for the whole window.

  Examples:
    >>> import jax.numpy as jnp, optax, jbptt
    >>> def step_loss(p, h, x):
    ...   h = jnp.tanh(p * h + x)
    ...   return h, jnp.mean(h ** 2)
    >>> tr = jbptt.trainer(step_loss, optax.sgd(0.1), k1=2, k2=6,
    ...                    gradient=jbptt.StoredStates())
    >>> xs = jnp.ones((10, 3))
    >>> state, metrics = tr.update(tr.init(jnp.float32(0.5), jnp.zeros(3), xs),
    ...                            xs)
    >>> int(metrics.valid.sum())                   # an update every 2 steps
    5

  References:
    Williams & Peng, An Efficient Gradient-Based Algorithm for On-Line
    Training of Recurrent Network Trajectories, Neural Computation, 1990.
  """

  remat: Callable | None = None


STRATEGIES = (Recompute, StoredStates)
RECOMPUTE = Recompute()  # the default strategy


def check_gradient(gradient, allowed=STRATEGIES):
  """Returns ``gradient`` if it is one of ``allowed`` with a valid ``remat``."""
  names = " or ".join(f"jbptt.{c.__name__}(...)" for c in allowed)
  if not isinstance(gradient, allowed):
    raise TypeError(f"gradient must be {names}, got gradient={gradient!r}.")
  remat = gradient.remat
  if remat is not None and not callable(remat):
    raise ValueError(
        f"{type(gradient).__name__}(remat=...) must be None or a "
        "jax.checkpoint policy (a callable such as "
        f"jax.checkpoint_policies.nothing_saveable), got remat={remat!r}."
    )
  burn_in = getattr(gradient, "burn_in", 0)
  if (isinstance(burn_in, (bool, np.bool_))
      or not isinstance(burn_in, (int, np.integer)) or burn_in < 0):
    raise ValueError(
        "Recompute(burn_in=...) must be a non-negative int (stream steps "
        f"re-run before each window), got burn_in={burn_in!r}.")
  return gradient


def check_unroll(unroll):
  """Returns ``unroll`` (a positive int, or a bool as ``lax.scan`` takes it)
  or raises a ValueError."""
  if isinstance(unroll, (bool, np.bool_)):
    return bool(unroll)
  if isinstance(unroll, (int, np.integer)) and unroll >= 1:
    return int(unroll)
  raise ValueError(
      "unroll must be a positive int or a bool (as jax.lax.scan takes it), "
      f"got unroll={unroll!r}."
  )


def rematted(fn, remat):
  """``fn`` wrapped in ``jax.checkpoint(..., policy=remat)``, or as is."""
  if remat is None:
    return fn
  return jax.checkpoint(fn, policy=remat)

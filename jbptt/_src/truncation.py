"""How far back an update reaches: ``k2`` as an int or as a rule.

``k2`` of :func:`jbptt.truncated_loss` and :func:`jbptt.trainer` is a
positive int (TBPTT(k1, k2), :mod:`jbptt._src.semantics`) or one of:

* :class:`Randomized` ``(mean, max)``: unbiased randomized truncation
  (ARTBP, Tallec & Ollivier, 2017).
* :class:`Adaptive` ``(delta, choices)``: the smallest ``k2`` of ``choices``
  whose estimated relative bias is at most ``delta`` (Aicher, Foti & Fox,
  2019).

Both are laid out as TBPTT(k1, ``K``), ``K`` their *reach* (``max``, or the
largest choice), with a multiplier on the carry's cotangent: in the update
that ends at step ``t``, the cotangent that passes back from step ``j + 1``
into the state ``h_j`` (the state at *distance* ``d = t - j``) is multiplied
by ``m_t(d)``. A loss's own step is never scaled; ``m_t(d) = 0`` is a
truncation point: nothing from later steps reaches ``h_j`` or what lies
before it, while losses at or before step ``j`` are backpropagated from
there as usual. Every path of the combinators (the chunked and overlapping
paths of ``truncated_loss``, :class:`jbptt.Recompute` and
:class:`jbptt.StoredStates` in the trainer) applies the same multipliers.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

tree_map = jax.tree_util.tree_map
_FLOAT = float  # the default float dtype: float64 under jax_enable_x64


@dataclasses.dataclass(frozen=True)
class Randomized:
  """Unbiased randomized truncation (ARTBP) with a hard reach of ``max``.

  In the update that ends at step ``t``, every state ``h_(t-d)`` that the
  backward pass reaches (``1 <= d < max``) is a truncation point with
  probability ``c = 1 / mean``, drawn independently per update and per
  state (one draw for the whole carry, batch included). Where it is not,
  the cotangent passing through it from later steps is multiplied by
  ``1 / (1 - c)``. Nothing is backpropagated to ``h_(t-max)`` or before
  (nor across a reset, nor before the first step): the update is
  TBPTT(k1, ``max``) with these multipliers. Every factor has expectation 1,
  so when ``max`` reaches the start of the sequence the expected gradient is
  the untruncated one; the distance to the first truncation point is
  geometric with mean ``mean`` (capped at ``max``). As ``mean`` grows the
  update tends to TBPTT(k1, ``max``).

  The draws come from a PRNG key: ``key=`` of ``truncated_loss``'s function,
  ``key`` of the trainer's ``init`` (kept in the state). The draw for the
  state at distance ``d`` in the update ending at ``t`` is
  ``jax.random.uniform(fold_in(fold_in(key, t), d), dtype=float32) < c``
  (float32 whether or not ``jax_enable_x64`` is set): the same in every
  path, chunking and resumption.

  With ``losses="window"`` an update injects the losses of its last ``max``
  steps.

  Attributes:
    mean: the expected truncation length ``1 / c``, a real ``>= 1``
      (``1``: every state is a truncation point, each loss gets its own step).
    max: the hard reach, a positive int: the cost of TBPTT(k1, ``max``).

  Examples:
    >>> import jbptt
    >>> jbptt.Randomized(mean=8, max=64)
    Randomized(mean=8.0, max=64)

  References:
    Tallec & Ollivier, `Unbiasing Truncated Backpropagation Through Time
    <https://arxiv.org/abs/1705.08209>`_, 2017.
  """

  mean: float
  max: int

  def __post_init__(self):
    mean = self.mean
    if (isinstance(mean, bool) or not isinstance(mean, numbers.Real)
        or not math.isfinite(mean) or mean < 1):
      raise ValueError(
          "Randomized(mean=...) must be a finite real >= 1 (the expected "
          f"truncation length), got mean={mean!r}.")
    if (isinstance(self.max, bool) or not isinstance(self.max, numbers.Integral)
        or self.max < 1):
      raise ValueError(
          "Randomized(max=...) must be a positive int (the hard reach), got "
          f"max={self.max!r}.")
    object.__setattr__(self, "mean", float(mean))
    object.__setattr__(self, "max", int(self.max))


@dataclasses.dataclass(frozen=True)
class Adaptive:
  """Adaptive k2: the smallest choice whose estimated bias is small enough.

  The per-lag gradient norms ``||d loss_t / d h_(t-j)||``, ``j = 1..K`` (``K =
  max(choices)``), of the loss at the end of an update's window are measured
  with the current params (an extra forward and backward pass of the window),
  and their geometric decay rate ``beta`` is fitted (least squares of ``log``
  norm against ``j``, over the lags whose state exists and whose norm is
  positive; with several windows, within each). The update uses the smallest
  ``k2`` in ``choices`` with ``beta ** k2 <= delta`` (``beta ** k2`` estimates
  the relative bias of the truncated gradient), or the largest choice if none
  qualifies. The trainer re-estimates at its first update and then every
  ``every`` updates, keeping the choice in between (``TrainState.truncation``);
  :class:`jbptt.Metrics` ``.k2`` reports the ``k2`` of each update.
  ``truncated_loss`` (fixed params) estimates once per call, from the windows of
  all of its updates (one slope fitted within each window).

  The program holds one branch per choice (``lax.switch``): with
  :class:`jbptt.Recompute` an update re-runs the window of ``K`` steps
  forward and backpropagates only through the chosen ``k2``, so it costs
  about TBPTT(k1, chosen) plus the forward steps of the rest, and a probe
  every ``every`` updates; :class:`jbptt.StoredStates` cuts its window of
  ``K`` stored states at the chosen ``k2`` with a traced multiplier, at the
  cost of TBPTT(k1, K). ``losses="window"`` is refused (its injected losses
  depend on ``k2``).

  Attributes:
    delta: the allowed relative bias, in ``(0, 1)``.
    choices: the allowed values of ``k2``, positive ints (kept sorted).
    every: updates between re-estimates in the trainer, a positive int.

  Examples:
    >>> import jbptt
    >>> jbptt.Adaptive(0.1, choices=(32, 8, 16))
    Adaptive(delta=0.1, choices=(8, 16, 32), every=10)

  References:
    Aicher, Foti & Fox, `Adaptively Truncating Backpropagation Through Time
    to Control Gradient Bias <https://arxiv.org/abs/1905.11596>`_, UAI 2019.
  """

  delta: float
  choices: tuple[int, ...]
  every: int = 10

  def __post_init__(self):
    delta = self.delta
    if (isinstance(delta, bool) or not isinstance(delta, numbers.Real)
        or not 0 < delta < 1):
      raise ValueError(
          "Adaptive(delta=...) must be a real in (0, 1) (the allowed "
          f"relative bias), got delta={delta!r}.")
    try:
      choices = tuple(self.choices)
    except TypeError:
      choices = None
    if not choices or any(
        isinstance(c, bool) or not isinstance(c, numbers.Integral) or c < 1
        for c in choices):
      raise ValueError(
          "Adaptive(choices=...) must be a non-empty sequence of positive "
          f"ints, got choices={self.choices!r}.")
    if (isinstance(self.every, bool)
        or not isinstance(self.every, numbers.Integral) or self.every < 1):
      raise ValueError(
          "Adaptive(every=...) must be a positive int (updates between "
          f"re-estimates), got every={self.every!r}.")
    object.__setattr__(self, "delta", float(delta))
    object.__setattr__(self, "choices", tuple(sorted({int(c) for c in choices})))
    object.__setattr__(self, "every", int(self.every))


RULES = (Randomized, Adaptive)


class AdaptiveState(NamedTuple):
  """What the trainer keeps for :class:`Adaptive` between updates.

  Attributes:
    k2: the ``k2`` chosen at the last estimate (int32).
    beta: the decay rate estimated then (float32; NaN before the first).
  """

  k2: jax.Array
  beta: jax.Array


def check_k2(k2):
  """Returns ``k2`` (an int, or a :class:`Randomized` / :class:`Adaptive`)."""
  if isinstance(k2, RULES):
    return k2
  if (isinstance(k2, bool) or not isinstance(k2, numbers.Integral)
      or k2 < 1):
    raise ValueError(
        "k2 must be a positive int, a jbptt.Randomized(mean, max) or a "
        f"jbptt.Adaptive(delta, choices), got k2={k2!r} (of type "
        f"{type(k2).__name__}).")
  return int(k2)


def check_losses(k2, losses):
  """Refuses ``losses="window"`` for :class:`Adaptive`."""
  if isinstance(k2, Adaptive) and losses == "window":
    raise ValueError(
        "losses='window' injects the losses of the last k2 steps, which "
        "jbptt.Adaptive changes from update to update; use losses='new' or "
        "'last' with it, got losses='window'.")


def reach(k2) -> int:
  """``K``: the static window of ``k2`` (itself, ``max``, ``max(choices)``)."""
  if isinstance(k2, Randomized):
    return k2.max
  if isinstance(k2, Adaptive):
    return k2.choices[-1]
  return k2


def uniform(key, t, d):
  """The uniform draw for the state at distance ``d`` of the update ending
  at ``t`` (int arrays, broadcast against each other)."""
  t, d = jnp.broadcast_arrays(jnp.asarray(t, jnp.int32),
                              jnp.asarray(d, jnp.int32))

  def one(t, d):
    return jax.random.uniform(
        jax.random.fold_in(jax.random.fold_in(key, t), d), dtype=jnp.float32)

  return jax.vmap(one)(t.ravel(), d.ravel()).reshape(t.shape)


def multipliers(k2, aux, t, d):
  """``m_t(d)`` in the default float dtype (float64 with ``jax_enable_x64``),
  broadcast over ``t`` and ``d`` (``d >= 1``).

  ``aux`` is the rule's traced part: the key for :class:`Randomized`, the
  chosen ``k2`` for :class:`Adaptive`, ignored for an int.
  """
  d = jnp.asarray(d)
  inside = d < reach(k2)
  if isinstance(k2, Randomized):
    c = 1.0 / k2.mean
    scale = 0.0 if c >= 1 else 1.0 / (1.0 - c)
    passes = uniform(aux, t, d) >= c
    return jnp.where(inside & passes, jnp.asarray(scale, _FLOAT),
                     jnp.asarray(0, _FLOAT))
  if isinstance(k2, Adaptive):
    inside = inside & (d < aux)
  return jnp.broadcast_to(inside, jnp.broadcast_shapes(jnp.shape(t), d.shape)
                          ).astype(_FLOAT)


def realized(k2, aux, t):
  """The reach of the update ending at ``t`` (int32): the first distance
  with a zero multiplier, at most ``reach(k2)``."""
  big = reach(k2)
  if isinstance(k2, Adaptive):
    return jnp.asarray(aux, jnp.int32)
  if not isinstance(k2, Randomized):
    return jnp.int32(big)
  d = jnp.arange(1, big + 1)
  cut = multipliers(k2, aux, t, d) == 0
  return jnp.min(jnp.where(cut, d, big)).astype(jnp.int32)


def scale_cotangent(tree, m):
  """``tree`` unchanged; its cotangent (tangent) multiplied by ``m``, and
  exactly zero where ``m`` is 0 (a truncation point)."""
  return _scale(tree, jnp.asarray(m))


@jax.custom_jvp
def _scale(tree, m):
  return tree


@_scale.defjvp
def _scale_jvp(primals, tangents):
  tree, m = primals
  dtree, _ = tangents

  def one(t):
    if t.dtype == jax.dtypes.float0:
      return t
    return jnp.where(m != 0, t * m.astype(t.dtype), jnp.zeros_like(t))

  return tree, tree_map(one, dtree)


def decay_rate(norms, lags, ok):
  """``log beta``: the least-squares slope of ``log norms`` against ``lags``
  over the entries where ``ok`` (and the norm is positive and finite); NaN
  with fewer than two such lags.

  ``norms`` and ``ok`` may have leading axes (one row per window, lags
  last): the slope is then pooled within rows (each row its own intercept),
  so rows of different scales or lag ranges do not bend it.
  """
  norms = jnp.asarray(norms, jnp.float32)
  ok = jnp.broadcast_to(ok, norms.shape) & (norms > 0) & jnp.isfinite(norms)
  x = jnp.broadcast_to(jnp.asarray(lags, jnp.float32), norms.shape)
  y = jnp.log(jnp.where(ok, norms, 1.0))
  w = ok.astype(jnp.float32)
  count = jnp.sum(w, axis=-1, keepdims=True)
  mx = jnp.sum(w * x, axis=-1, keepdims=True) / jnp.maximum(count, 1)
  my = jnp.sum(w * y, axis=-1, keepdims=True) / jnp.maximum(count, 1)
  sxx = jnp.sum(w * (x - mx) ** 2)
  sxy = jnp.sum(w * (x - mx) * (y - my))
  return jnp.where(sxx > 0, sxy / jnp.where(sxx > 0, sxx, 1), jnp.nan)


def choose(k2: Adaptive, log_beta):
  """The smallest choice with ``beta ** c <= delta`` (int32); the largest if
  none does or ``log_beta`` is NaN."""
  choices = np.asarray(k2.choices)
  ok = choices * log_beta <= math.log(k2.delta)
  return jnp.where(jnp.any(ok), jnp.asarray(choices)[jnp.argmax(ok)],
                   choices[-1]).astype(jnp.int32)


def choice_index(k2: Adaptive, chosen):
  """The index of ``chosen`` in ``k2.choices`` (int32)."""
  return jnp.searchsorted(jnp.asarray(k2.choices), chosen).astype(jnp.int32)


def window_norms(cell, params, start, xs, resets, valid, initial_carry, head):
  """``||d loss_t / d h_(t-j)||`` for ``j = L..1`` over a window of ``L``
  steps ending at ``t``, run from ``start`` (the state at lag ``L``).

  ``loss_t`` is the last step's total; row ``i`` of the result is the lag
  ``L - i``. Invalid steps keep the carry (and their rows mean nothing).
  """
  from jbptt._src import segment  # a cycle otherwise: segment uses this

  length = jax.tree_util.tree_leaves(xs)[0].shape[0]
  params = lax.stop_gradient(params)
  deltas = tree_map(lambda a: jnp.zeros((length,) + jnp.shape(a),
                                        jnp.result_type(a)), start)

  def last_total(deltas):
    def body(h, inp):
      x, r, v, dl = inp
      h = tree_map(jnp.add, h, dl)
      return segment.masked_step(cell, params, h, x, r, v, initial_carry)

    _, outs = lax.scan(body, lax.stop_gradient(start),
                       (xs, resets, valid, deltas))
    last = tree_map(lambda a: a[-1:], (outs, xs))
    totals, _ = head(params, *last)
    return totals[0]

  grads = jax.grad(last_total)(deltas)
  sq = sum(jnp.sum(jnp.square(a.astype(jnp.float32)),
                   axis=tuple(range(1, a.ndim)))
           for a in jax.tree_util.tree_leaves(grads)
           if jnp.issubdtype(a.dtype, jnp.inexact))
  return jnp.sqrt(sq)

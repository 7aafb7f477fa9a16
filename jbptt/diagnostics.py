"""Truncation-bias diagnostics: how far TBPTT(k1, k2) is from full BPTT.

Truncation trades an exact gradient for a cheap, online one. These functions
measure what is traded, on given params and data:

* :func:`gradient_bias`: the cosine similarity and relative error of the
  TBPTT(k1, k2) gradient against the untruncated gradient of the same
  losses, overall and per parameter leaf.
* :func:`sweep`: the same over many ``(k1, k2)``, as NumPy arrays to plot.
* :func:`adaptive_choice`: the ``k2`` that :class:`jbptt.Adaptive` picks for
  a sequence, and the decay rate it estimated.
* :func:`lag_norms`: the norms ``||d loss_t / d h_(t-j)||`` of the full,
  untruncated dependence of each step's loss on the states ``j`` steps
  before it, for ``j = 1..max_lag``: how fast gradients vanish or explode
  with the lag, the reason truncation exists (and the reason it may cost
  little).

Indexing follows the contract (:mod:`jbptt._src.semantics`): steps are
``1..n``, ``h_t`` is the carry after step ``t``, ``h_0`` the initial carry,
and ``loss_t`` is produced by step ``t`` from ``h_(t-1)``.

Both gradients of :func:`gradient_bias` are ``jax.grad`` of
:func:`jbptt.truncated_loss`; nothing here truncates anything itself.

Examples:
  >>> import jax.numpy as jnp, jbptt.diagnostics as jd
  >>> def step_loss(w, h, x):
  ...   h = jnp.tanh(w * h + x)
  ...   return h, (h - 0.5) ** 2
  >>> xs = jnp.linspace(-1.0, 1.0, 12)
  >>> bias = jd.gradient_bias(step_loss, 0.9, 0.0, xs, k1=3, k2=3)
  >>> bool(bias.cosine > 0.9), bool(bias.relative_error > 0.0)
  (True, True)
  >>> round(float(jd.gradient_bias(step_loss, 0.9, 0.0, xs, k1=3, k2=12)
  ...             .cosine), 6)  # k2 >= n: nothing is truncated
  1.0

References:
  Williams & Peng, An Efficient Gradient-Based Algorithm for On-Line Training
  of Recurrent Network Trajectories, Neural Computation 2(4), 1990.

  Bengio, Simard & Frasconi, Learning Long-Term Dependencies with Gradient
  Descent is Difficult, IEEE Transactions on Neural Networks 5(2), 1994.

  Tallec & Ollivier, Unbiasing Truncated Backpropagation Through Time,
  arXiv:1705.08209, 2017.
"""

from __future__ import annotations

import functools
import numbers
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jbptt._src import checks, semantics, steps, truncation
from jbptt._src import truncated_loss as tl
from jbptt._src.truncated_loss import truncated_loss

__all__ = ("AdaptiveChoice", "GradientBias", "LagNorms", "Sweep",
           "adaptive_choice", "gradient_bias", "lag_norms", "sweep")

tree_map = jax.tree_util.tree_map


class GradientBias(NamedTuple):
  """How a truncated gradient compares with the untruncated one.

  Attributes:
    cosine: the cosine similarity of the two gradients, all leaves
      concatenated (a scalar; 1 means the same direction).
    relative_error: ``||g_trunc - g_full|| / ||g_full||``, all leaves
      concatenated (a scalar; 0 means equal).
    leaf_cosine: the same per leaf, a pytree shaped like ``params``.
    leaf_relative_error: the same per leaf, a pytree shaped like ``params``.
    relative_variance: for a :class:`jbptt.Randomized` k2, the estimator's
      variance over keys relative to the untruncated gradient,
      ``mean_i ||g_i - mean(g)||^2 / ||g_full||^2`` over the ``samples``
      keys (the other figures are then those of ``mean(g)``, the estimate
      of its expectation: its bias); ``0`` for a deterministic ``k2``.

  Where both gradients are zero the cosine is 1 and the error 0; where only
  one is zero the cosine is 0 (and the error ``inf`` if ``g_full`` is).
  """

  cosine: jax.Array
  relative_error: jax.Array
  leaf_cosine: Any
  leaf_relative_error: Any
  relative_variance: jax.Array


class Sweep(NamedTuple):
  """:func:`gradient_bias` over a grid of configurations, as NumPy arrays.

  All four arrays have the broadcast shape of the ``k1s`` and ``k2s`` given
  to :func:`sweep`.

  Attributes:
    k1: the ``k1`` of each configuration.
    k2: the ``k2`` of each configuration.
    cosine: its overall cosine similarity with the untruncated gradient.
    relative_error: its overall relative error.
  """

  k1: np.ndarray
  k2: np.ndarray
  cosine: np.ndarray
  relative_error: np.ndarray


class LagNorms(NamedTuple):
  """Per-lag norms of the untruncated state gradients of the step losses.

  Attributes:
    lags: ``[1, ..., max_lag]`` (int).
    norms: ``norms[j - 1]`` is the mean of ``per_step[:, j - 1]`` over the
      steps ``t = j..n`` where it is defined; shape ``(max_lag,)``.
    per_step: ``per_step[t - 1, j - 1] = ||d loss_t / d h_(t-j)||`` for
      ``t = 1..n``, NaN where ``t < j``; shape ``(n, max_lag)``.
  """

  lags: jax.Array
  norms: jax.Array
  per_step: jax.Array


def _wide(a):
  """``a`` in at least float32, so that norms of bfloat16 leaves are sane."""
  a = jnp.asarray(a)
  return a.astype(jnp.promote_types(a.dtype, jnp.float32))


def _compare(g, ref):
  """Cosine and relative error of ``g`` against ``ref`` from sums of squares."""
  dot, gg, rr, dd = (jnp.sum(v) for v in (g * ref, g * g, ref * ref,
                                          (g - ref) ** 2))
  return _ratios(dot, gg, rr, dd)


def _ratios(dot, gg, rr, dd):
  norms = jnp.sqrt(gg) * jnp.sqrt(rr)
  both_zero = (gg == 0) & (rr == 0)
  cosine = jnp.where(both_zero, 1.0,
                     jnp.where(norms > 0, dot / jnp.where(norms > 0, norms, 1),
                               0.0))
  cosine = jnp.clip(cosine, -1.0, 1.0)  # rounding can step past 1
  error = jnp.where(
      rr > 0, jnp.sqrt(dd) / jnp.sqrt(jnp.where(rr > 0, rr, 1)),
      jnp.where(dd > 0, jnp.inf, 0.0))
  return cosine, error


@functools.partial(jax.jit, static_argnames=("step_loss", "k1", "k2", "losses"))
def _grad(step_loss, params, carry, xs, resets, initial_carry, *, k1, k2,
          losses, keys=None):
  """The gradient; for :class:`jbptt.Randomized`, one per key (leading
  axis)."""
  f = truncated_loss(step_loss, k1=k1, k2=k2, losses=losses)
  grad = lambda key: jax.grad(
      lambda p: f(p, carry, xs, resets=resets, initial_carry=initial_carry,
                  key=key)[0])(params)
  return grad(None) if keys is None else jax.vmap(grad)(keys)


def _sum_all(tree):
  return sum(jnp.sum(v) for v in jax.tree_util.tree_leaves(tree))


@jax.jit
def _bias(g, ref, spread=None) -> GradientBias:
  g, ref = tree_map(_wide, g), tree_map(_wide, ref)
  leaf = tree_map(_compare, g, ref)
  pick = lambda i: tree_map(lambda _, c: c[i], g, leaf)
  sums = [_sum_all(tree_map(op, g, ref))
          for op in (lambda a, b: a * b, lambda a, b: a * a,
                     lambda a, b: b * b, lambda a, b: (a - b) ** 2)]
  cosine, error = _ratios(*sums)
  variance = jnp.zeros((), cosine.dtype)
  if spread is not None:  # per-key gradients: their mean squared deviation
    deviation = _sum_all(tree_map(
        lambda a, m: jnp.mean(jnp.square(_wide(a) - m), axis=0), spread, g))
    rr = sums[2]
    variance = jnp.where(rr > 0, deviation / jnp.where(rr > 0, rr, 1),
                         jnp.where(deviation > 0, jnp.inf, 0.0))
  return GradientBias(cosine, error, pick(0), pick(1), variance)


def _reference_config(n: int, k1: int, losses: str) -> tuple[int, int]:
  """The ``(k1, k2)`` of the untruncated gradient of the same losses."""
  # For "new" every k1 with k2 >= n is full BPTT; TBPTT(n, n) is the
  # cheapest (one scan). "window" and "last" inject losses that depend on
  # k1, so only k2 changes.
  return (n, n) if losses == "new" else (k1, n)


def gradient_bias(step_loss, params, carry, xs, *, k1: int, k2,
                  losses: str = "new", resets=None, initial_carry=None,
                  key=None, samples: int = 256) -> GradientBias:
  """The TBPTT(k1, k2) gradient against the untruncated one, same losses.

  Let ``g_trunc`` be ``jax.grad`` of ``jbptt.truncated_loss(step_loss,
  k1=k1, k2=k2, losses=losses)`` and ``g_full`` that of the same losses with
  ``k2 = n`` (nothing truncated). For ``losses="new"`` (the default) this is
  ``TBPTT(n, n)``: full BPTT of the sequence's mean loss. This returns

  * ``cosine = <g_trunc, g_full> / (||g_trunc|| ||g_full||)``,
  * ``relative_error = ||g_trunc - g_full|| / ||g_full||``,

  over all leaves of ``params`` concatenated and per leaf. Both gradients are
  computed by jitted functions, compiled once per ``(step_loss, k1, k2,
  losses)`` and shapes.

  For ``k2 = jbptt.Adaptive(...)`` ``g_trunc`` is the gradient with the
  ``k2`` it picks (:func:`adaptive_choice`). For ``k2 =
  jbptt.Randomized(...)`` ``g_trunc`` is the mean of the gradients for
  ``samples`` keys split from ``key`` (its bias: ideally 0 when ``max``
  reaches the start), and ``relative_variance`` their variance.

  Args:
    step_loss: ``step_loss(params, carry, x) -> (carry, loss)`` with a scalar
      loss (as for :func:`jbptt.truncated_loss`).
    params: the parameters at which to compare (a pytree).
    carry: the initial carry.
    xs: a pytree whose leaves share a leading time axis of length ``n``.
    k1: steps between updates (positive int).
    k2: steps each update backpropagates through: a positive int, a
      :class:`jbptt.Randomized` or a :class:`jbptt.Adaptive`.
    losses: ``"new"``, ``"window"`` or ``"last"``.
    resets: optional per-step reset mask, as for ``truncated_loss``.
    initial_carry: the carry a reset restores (default: ``carry``).
    key: a PRNG key, for a :class:`jbptt.Randomized` ``k2`` only.
    samples: the keys drawn for a :class:`jbptt.Randomized` ``k2`` (a
      positive int; they are ``vmap``-ed: memory grows with it).

  Returns:
    A :class:`GradientBias` of float arrays (at least float32).

  Raises:
    ValueError: for a bad ``k1``, ``k2`` or ``losses``, or bad ``xs`` or
      ``resets`` (as ``truncated_loss``).

  Examples:
    >>> import jax.numpy as jnp, jbptt.diagnostics as jd
    >>> def step_loss(p, h, x):
    ...   h = jnp.tanh(p["w"] * h + p["u"] * x)
    ...   return h, h ** 2
    >>> p = {"u": 1.0, "w": 0.8}
    >>> b = jd.gradient_bias(step_loss, p, 0.0, jnp.ones(10), k1=5, k2=1)
    >>> sorted(b.leaf_cosine), bool(b.leaf_cosine["u"] > 0.5)
    (['u', 'w'], True)

  References:
    Williams & Peng, Neural Computation 2(4), 1990; Tallec & Ollivier,
    Unbiasing Truncated Backpropagation Through Time, 2017.
  """
  rule = truncation.check_k2(k2)
  k1, _, losses = semantics.check_config(k1, truncation.reach(rule), losses)
  truncation.check_losses(rule, losses)
  tl.check_key(rule, key)
  samples = semantics.check_positive_int("samples", samples)
  n = checks.time_length(xs)
  keys = (jax.random.split(key, samples)
          if isinstance(rule, truncation.Randomized) else None)
  g_trunc = _grad(step_loss, params, carry, xs, resets, initial_carry, k1=k1,
                  k2=rule, losses=losses, keys=keys)
  r1, r2 = _reference_config(n, k1, losses)
  g_full = _grad(step_loss, params, carry, xs, resets, initial_carry, k1=r1,
                 k2=r2, losses=losses)
  if keys is None:
    return _bias(g_trunc, g_full)
  mean = tree_map(lambda a: jnp.mean(_wide(a), axis=0), g_trunc)
  return _bias(mean, g_full, g_trunc)


class AdaptiveChoice(NamedTuple):
  """What :class:`jbptt.Adaptive` picks for a sequence.

  Attributes:
    k2: the chosen ``k2`` (int32).
    beta: the estimated geometric decay rate of the per-lag norms (float32;
      NaN if fewer than two lags could be fitted, and then ``k2`` is the
      largest choice).
  """

  k2: jax.Array
  beta: jax.Array


@functools.partial(jax.jit, static_argnames=("step_loss", "k1", "rule"))
def _adaptive_choice(step_loss, params, carry, xs, resets, initial_carry, *,
                     k1, rule):
  carry = checks.as_arrays(carry)
  h0 = carry if initial_carry is None else checks.as_arrays(initial_carry)
  if resets is not None:
    resets = checks.check_resets(resets, checks.time_length(xs), carry)
  k2, log_beta = tl.adaptive_k2(steps.split(step_loss), rule, params, carry,
                                xs, resets, h0, checks.time_length(xs), k1)
  return AdaptiveChoice(k2, jnp.exp(log_beta))


def adaptive_choice(step_loss, params, carry, xs, *, k1: int, k2,
                    resets=None, initial_carry=None) -> AdaptiveChoice:
  """The ``k2`` that ``jbptt.truncated_loss(step_loss, k1=k1, k2=k2)``
  uses for this sequence, ``k2`` a :class:`jbptt.Adaptive`.

  The norms ``||d loss_t / d h_(t-j)||``, ``j = 1..max(choices)``, of the
  loss at the end of each update are taken, their decay rate ``beta``
  fitted on a log scale (one slope within every update's window), and the
  smallest choice with ``beta ** k2 <= delta`` taken (see
  :class:`jbptt.Adaptive`).

  Args:
    step_loss: as for :func:`gradient_bias`.
    params: the parameters.
    carry: the initial carry.
    xs: a pytree whose leaves share a leading time axis.
    k1: steps between updates (positive int).
    k2: a :class:`jbptt.Adaptive`.
    resets: optional per-step reset mask, as for ``truncated_loss``.
    initial_carry: the carry a reset restores (default: ``carry``).

  Returns:
    An :class:`AdaptiveChoice`.

  Raises:
    TypeError: if ``k2`` is not a :class:`jbptt.Adaptive`.

  Examples:
    >>> import jax.numpy as jnp, jbptt, jbptt.diagnostics as jd
    >>> step_loss = lambda a, h, x: (a * h + x, 0.5 * (a * h + x) ** 2)
    >>> c = jd.adaptive_choice(step_loss, 0.5, 0.0, jnp.ones(40), k1=4,
    ...                        k2=jbptt.Adaptive(0.01, (2, 4, 8, 16)))
    >>> int(c.k2), round(float(c.beta), 4)  # 0.5 ** 8 <= 0.01 < 0.5 ** 4
    (8, 0.5)
  """
  if not isinstance(k2, truncation.Adaptive):
    raise TypeError(f"k2 must be a jbptt.Adaptive(...), got k2={k2!r}.")
  k1 = semantics.check_positive_int("k1", k1)
  checks.check_step(step_loss, params, checks.as_arrays(carry),
                    checks.first_step(xs))
  return _adaptive_choice(step_loss, params, carry, xs, resets, initial_carry,
                          k1=k1, rule=k2)


def _check_ks(name: str, values) -> np.ndarray:
  """An int array of positive values, or a ValueError naming ``name``."""
  array = np.asarray(values, dtype=object)
  flat = array.reshape(-1)
  if flat.size == 0:
    raise ValueError(f"{name} must hold at least one positive int, got "
                     f"{name}={values!r}.")
  for v in flat:
    if (isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 1):
      raise ValueError(
          f"{name} must hold positive ints, got {v!r} in {name}={values!r}."
      )
  return array.astype(np.int64)


def sweep(step_loss, params, carry, xs, *, k2s, k1s=None, losses: str = "new",
          resets=None, initial_carry=None) -> Sweep:
  """:func:`gradient_bias` for many configurations, ready to plot.

  ``k1s`` and ``k2s`` broadcast against each other as NumPy arrays: a list of
  ``k2`` with one ``k1`` is a curve, ``k1s[:, None]`` against a list of
  ``k2`` a grid. The untruncated gradient is computed once (once per ``k1``
  for ``losses="window"`` and ``"last"``).

  Args:
    step_loss: as for :func:`gradient_bias`.
    params: the parameters at which to compare.
    carry: the initial carry.
    xs: a pytree whose leaves share a leading time axis.
    k2s: an int or an array-like of positive ints (non-empty).
    k1s: likewise, broadcast against ``k2s``; ``None`` (the default) means
      ``k1 = k2`` for each, TBPTT(k2, k2) (chunking).
    losses: ``"new"``, ``"window"`` or ``"last"``.
    resets: optional per-step reset mask, as for ``truncated_loss``.
    initial_carry: the carry a reset restores (default: ``carry``).

  Returns:
    A :class:`Sweep` of NumPy arrays of the broadcast shape.

  Raises:
    ValueError: if ``k1s`` or ``k2s`` is empty or holds anything but
      positive ints, or they do not broadcast; as :func:`gradient_bias`
      otherwise.

  Examples:
    >>> import numpy as np, jax.numpy as jnp, jbptt.diagnostics as jd
    >>> def step_loss(w, h, x):
    ...   h = jnp.tanh(w * h + x)
    ...   return h, (h - 0.5) ** 2
    >>> xs = jnp.linspace(-1.0, 1.0, 8)
    >>> s = jd.sweep(step_loss, 0.9, 0.0, xs, k2s=[1, 2, 8])
    >>> s.k1.tolist(), s.cosine.shape, float(s.relative_error[-1])
    ([1, 2, 8], (3,), 0.0)
    >>> jd.sweep(step_loss, 0.9, 0.0, xs, k2s=[2, 4, 8],
    ...          k1s=np.array([1, 2])[:, None]).cosine.shape
    (2, 3)
  """
  k2 = _check_ks("k2s", k2s)
  k1 = k2 if k1s is None else _check_ks("k1s", k1s)
  try:
    k1, k2 = np.broadcast_arrays(k1, k2)
  except ValueError as e:
    raise ValueError(
        f"k1s and k2s must broadcast against each other, got shapes "
        f"{np.shape(k1)} and {np.shape(k2)}."
    ) from e
  losses = semantics.check_losses(losses)
  n = checks.time_length(xs)
  refs: dict[tuple[int, int], Any] = {}
  cosine = np.empty(k1.shape)
  error = np.empty(k1.shape)
  for i in np.ndindex(k1.shape):
    a, b = int(k1[i]), int(k2[i])
    key = _reference_config(n, a, losses)
    if key not in refs:
      refs[key] = _grad(step_loss, params, carry, xs, resets, initial_carry,
                        k1=key[0], k2=key[1], losses=losses)
    g = _grad(step_loss, params, carry, xs, resets, initial_carry, k1=a, k2=b,
              losses=losses)
    bias = _bias(g, refs[key])
    cosine[i], error[i] = float(bias.cosine), float(bias.relative_error)
  return Sweep(np.array(k1), np.array(k2), cosine, error)


def _sum_sq_per_step(tree):
  """``sum`` of squares of each leaf's entries but its leading axis, added."""
  return sum(jnp.sum(jnp.square(_wide(a)), axis=tuple(range(1, jnp.ndim(a))))
             for a in jax.tree_util.tree_leaves(tree))


@functools.partial(jax.jit, static_argnames=("step_loss", "max_lag"))
def _lag_norms(step_loss, params, carry, xs, *, max_lag):
  n = checks.time_length(xs)
  deltas = tree_map(lambda a: jnp.zeros((n,) + a.shape, a.dtype), carry)

  def losses(deltas):
    # delta_s is added to h_s where step s + 1 consumes it, so the gradient
    # of loss_t with respect to delta_s is d loss_t / d h_s.
    def body(h, inp):
      x, d = inp
      return step_loss(params, tree_map(jnp.add, h, d), x)

    return lax.scan(body, carry, (xs, deltas))[1]

  values, vjp = jax.vjp(losses, deltas)

  def norms_of_step(i):  # row i: step t = i + 1; column s: ||d loss_t / d h_s||
    (g,) = vjp(jax.nn.one_hot(i, n, dtype=values.dtype))
    return jnp.sqrt(_sum_sq_per_step(g))

  by_state = lax.map(norms_of_step, jnp.arange(n))  # (n, n)
  lags = np.arange(1, max_lag + 1)
  s = np.arange(1, n + 1)[:, None] - lags[None, :]  # s = t - j
  valid = s >= 0
  per_step = jnp.where(valid, by_state[np.arange(n)[:, None], np.maximum(s, 0)],
                       jnp.nan)
  norms = jnp.sum(jnp.where(valid, per_step, 0.0), axis=0) / valid.sum(axis=0)
  return LagNorms(jnp.asarray(lags), norms, per_step)


def lag_norms(step_loss, params, carry, xs, *, max_lag: int) -> LagNorms:
  """Norms of ``d loss_t / d h_(t-j)`` for lags ``j = 1..max_lag``, untruncated.

  ``h_(t-j)`` is the carry after step ``t - j``; ``j = 1`` is the state that
  step ``t`` consumed, ``j = t`` the initial carry ``h_0``. The derivative is
  the full dependence of ``loss_t`` on that state through steps
  ``t-j+1..t`` with ``params`` fixed (no truncation), and its norm is taken
  over every entry of every carry leaf (batch rows included: with a loss
  averaged over a batch of independent streams it shrinks with the batch).
  A norm that decays geometrically in ``j`` is a vanishing gradient: the
  losses of a TBPTT(k1, k2) window lose little beyond ``k2``; one that grows
  is an exploding gradient.

  Computed with zero perturbations ``delta_s`` added to each state inside a
  plain ``lax.scan`` of ``step_loss``: one forward pass, then one
  vector-Jacobian product per step (``lax.map``), ``O(n^2)`` steps of work
  and ``O(n)`` carries of memory beyond the forward pass.

  Args:
    step_loss: ``step_loss(params, carry, x) -> (carry, loss)``, scalar loss.
    params: the parameters.
    carry: the initial carry ``h_0`` (any pytree).
    xs: a pytree whose leaves share a leading time axis of length ``n``.
    max_lag: the largest lag ``J`` (``1 <= J <= n``).

  Returns:
    A :class:`LagNorms`: ``lags`` (``(J,)``), ``norms`` (``(J,)``, the mean
    over the ``n - j + 1`` steps ``t = j..n``) and ``per_step``
    (``(n, J)``, NaN where ``t < j``).

  Raises:
    ValueError: if ``max_lag`` is not an int in ``1..n``, or ``xs`` is bad.
    TypeError: if ``step_loss`` changes the carry or returns a non-scalar.

  Examples:
    >>> import jax.numpy as jnp, jbptt.diagnostics as jd
    >>> step_loss = lambda w, h, x: (w * h + x, w * h + x)  # loss_t = h_t
    >>> r = jd.lag_norms(step_loss, 0.5, 0.0, jnp.ones(6), max_lag=3)
    >>> r.norms.tolist()  # |d h_t / d h_(t-j)| = 0.5 ** j
    [0.5, 0.25, 0.125]
    >>> r.per_step.shape
    (6, 3)

  References:
    Bengio, Simard & Frasconi, Learning Long-Term Dependencies with Gradient
    Descent is Difficult, IEEE Transactions on Neural Networks, 1994.
    Pascanu, Mikolov & Bengio, On the Difficulty of Training Recurrent
    Neural Networks, ICML 2013.
  """
  max_lag = semantics.check_positive_int("max_lag", max_lag)
  n = checks.time_length(xs)
  if max_lag > n:
    raise ValueError(
        f"max_lag must be at most the sequence length n={n}, got "
        f"max_lag={max_lag}."
    )
  carry = checks.as_arrays(carry)
  checks.check_step(step_loss, params, carry, checks.first_step(xs))
  return _lag_norms(step_loss, params, carry, xs, max_lag=max_lag)

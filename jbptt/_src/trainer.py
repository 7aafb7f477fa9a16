"""``trainer``: online TBPTT(k1, k2) on a stream, optax style."""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

from jbptt._src import adjoint, checks, packing, segment, semantics, steps, truncation
from jbptt._src import gradient as strategies
from jbptt._src import truncated_loss as tl

tree_map = jax.tree_util.tree_map

# optax.apply_if_finite gives up skipping after this many non-finite updates
# in a row: never, for the int32 counter it keeps.
_NEVER = int(np.iinfo(np.int32).max)


class History(NamedTuple):
  """What the stream keeps between calls of ``update``.

  Attributes:
    xs: the last ``L - 1`` inputs, oldest first (``L``, the window re-run
      or backpropagated at each update: ``max(k1, K) + burn_in``, ``K`` the
      reach of ``k2``).
    resets: the matching reset masks; ``None`` for a stream declared without
      resets (then no step of an update selects between carries).
    anchor: the stream's carry after the last update.
    starts: for ``L > k1``, stored stream carries (leading axis): with
      :class:`jbptt.Recompute` those after steps ``t - L`` of the next
      ``ceil(L / k1) - 1`` updates, with :class:`jbptt.StoredStates` the
      last ``K - k1`` carries before the anchor; ``None`` for ``L = k1``.
  """

  xs: Any
  resets: jax.Array | None
  anchor: Any
  starts: Any


@jax.tree_util.register_static
@dataclasses.dataclass(frozen=True)
class Signature:
  """What a state was made for: a static part of its pytree (no leaves).

  ``update`` compares it with its own trainer's and refuses a state made by
  another trainer.
  """

  k1: int
  k2: Any  # an int, or a jbptt.Randomized / jbptt.Adaptive
  losses: str
  gradient: Any
  resets: tuple[int, ...] | None  # the per-step reset shape, if declared

  def differences(self, other: Signature) -> list[str]:
    """``"name: theirs (ours)"`` for every field that differs."""
    return [f"{f.name}={getattr(other, f.name)!r} (this trainer: "
            f"{getattr(self, f.name)!r})" for f in dataclasses.fields(self)
            if getattr(self, f.name) != getattr(other, f.name)]


class TrainState(NamedTuple):
  """The state of an online TBPTT(k1, k2) run; its structure is fixed by
  ``init``.

  Attributes:
    params: the current parameters.
    opt_state: the optimizer's state: an ``optax.ApplyIfFiniteState`` whose
      ``inner_state`` is the given optimizer's and whose ``total_notfinite``
      counts the updates skipped as non-finite.
    carry: the stream's current carry (after the last step fed).
    initial_carry: the carry that a reset restores.
    step: how many stream steps have been fed (int32).
    history: the buffers of the pending window (:class:`History`).
    truncation: what the ``k2`` rule keeps: ``None`` for an int, the PRNG
      key's data (``uint32``) for :class:`jbptt.Randomized`, a
      ``jbptt.AdaptiveState(k2, beta)`` for :class:`jbptt.Adaptive`.
    signature: the trainer's configuration (static: no leaves).
  """

  params: Any
  opt_state: Any
  carry: Any
  initial_carry: Any
  step: jax.Array
  history: History
  truncation: Any
  signature: Signature


class Metrics(NamedTuple):
  """Per-update metrics of one ``update`` call.

  Every field has one entry per update slot of the call's capacity class
  (see :func:`capacity`): ``ceil(len(xs) / k1)`` rounded up to a power of
  two. Slot ``j`` holds the ``j``-th update that ends in the chunk; ``valid``
  marks the slots in which an update happened, the others hold zeros (mask
  with it: ``metrics.loss[metrics.valid]``).

  Attributes:
    loss: the update's objective, ``sum(total) / sum(weight)`` over its
      injected steps (0 when the weights sum to 0).
    weight: ``sum(weight)`` over its injected steps (their number, for plain
      scalar losses). An update of weight 0 changes nothing: no optimizer
      step, params and optimizer state kept.
    grad_norm: the global norm of its gradient.
    valid: whether an update ended in this slot.
    skipped: whether its gradient was not finite, so that it was not applied
      (``optax.apply_if_finite``: params and inner optimizer state kept).
    k2: how far the update backpropagated (int32): ``k2`` for an int; the
      choice for :class:`jbptt.Adaptive`; for :class:`jbptt.Randomized` the
      distance of the first truncation point drawn (at most ``max``).
  """

  loss: jax.Array
  weight: jax.Array
  grad_norm: jax.Array
  valid: jax.Array
  skipped: jax.Array
  k2: jax.Array


class Trainer(NamedTuple):
  """TBPTT(k1, k2) online, as a pair of pure functions (optax style).

  Made by :func:`jbptt.trainer`, which documents both in full.

  Attributes:
    init: ``init(params, carry, xs, resets=None, *, key=None) -> TrainState``: the state
      of a stream whose chunks look like ``xs`` (arrays or
      ``jax.ShapeDtypeStruct``s); ``resets`` declares that it has resets.
    update: ``update(state, xs, resets=None) -> (state, metrics)``: feeds a
      chunk of any length, making an update every ``k1`` stream steps;
      ``state`` may be a :class:`TrainState` or a :class:`PackedState`, and
      comes back as given.

  Examples:
    >>> import jax.numpy as jnp, optax, jbptt
    >>> def step_loss(p, h, x):
    ...   h = jnp.tanh(p * h + x)
    ...   return h, jnp.mean(h ** 2)
    >>> tr = jbptt.trainer(step_loss, optax.sgd(0.1), k1=2, k2=3)
    >>> xs = jnp.ones((5, 4))                      # (time, batch)
    >>> state = tr.init(jnp.float32(0.5), jnp.zeros(4), xs)
    >>> state, metrics = tr.update(state, xs)
    >>> int(state.step), int(metrics.valid.sum())  # 5 steps, 2 updates
    (5, 2)
  """

  init: Callable[..., TrainState]
  update: Callable[..., tuple[TrainState, Metrics]]


class Layout(NamedTuple):
  """The static shape of a trainer's windows.

  Attributes:
    k1, k2, losses: the configuration (``k2``: the reach ``K``, an int).
    length: the window re-run or backpropagated at each update,
      ``max(k1, k2) + burn_in``.
    n_own: the window's leading steps that see only their own step (or,
      the first ``burn_in``, none), ``max(0, k1 - k2) + burn_in``.
    n_starts: the stored start states (see :class:`History`).
    offset: where, in the ``k1`` new steps, a future window starts.
    inject: a boolean ``(length,)``: the steps whose losses an update injects.
    overlap: ``length > k1``: the window starts before the last update.
    stored: backpropagate through stored states (``k1 < k2`` only).
  """

  k1: int
  k2: int
  losses: str
  length: int
  n_own: int
  n_starts: int
  offset: int
  inject: np.ndarray
  overlap: bool
  stored: bool


def window_layout(k1: int, k2: int, losses: str, stored: bool,
                  burn_in: int = 0) -> Layout:
  """The :class:`Layout` of TBPTT(k1, k2) in a stream (``burn_in`` steps
  re-run before each window, :class:`jbptt.Recompute` only)."""
  stored = stored and k1 < k2
  base = max(k1, k2)
  length = base + burn_in
  overlap = length > k1
  if not overlap:
    n_starts = 0
  elif stored:
    n_starts = k2 - k1
  else:
    n_starts = math.ceil(length / k1) - 1
  taus = [tau for tau, _ in semantics.injected(base, base - k1, k2, losses)]
  inject = np.concatenate([np.zeros(burn_in, bool),
                           tl.inject_mask(0, base, taus)])
  return Layout(k1, k2, losses, length, max(0, k1 - k2) + burn_in, n_starts,
                (-length) % k1, inject, overlap, stored)


def _concat(a, b):
  return tree_map(lambda u, v: jnp.concatenate([u, v]), a, b)


def _dslice(tree, start, size):
  return tree_map(lambda a: lax.dynamic_slice_in_dim(a, start, size), tree)


def _strong(tree):
  """Every leaf as a JAX array of its own dtype, not weakly typed (so that a
  state keeps exactly its types through ``update``), in a buffer of its own
  (so that a state can be donated)."""
  return tree_map(lambda a: jnp.array(a, dtype=jnp.result_type(a)), tree)


def _per_step(xs):
  """``ShapeDtypeStruct``s of one time step of ``xs`` (arrays or specs)."""
  return tree_map(lambda a: jax.ShapeDtypeStruct(tuple(a.shape[1:]),
                                                 jnp.dtype(a.dtype)), xs)


def new_history(lay: Layout, carry, x_step, reset_shape) -> History:
  """Empty buffers for a stream whose steps look like ``x_step``."""
  pad = lay.length - 1
  return History(
      xs=tree_map(lambda s: jnp.zeros((pad,) + s.shape, s.dtype), x_step),
      resets=None if reset_shape is None else jnp.zeros(
          (pad,) + reset_shape, bool),
      anchor=tree_map(jnp.copy, carry),
      starts=tree_map(lambda a: jnp.repeat(a[None], lay.n_starts, axis=0),
                      carry) if lay.overlap else None,
  )


def _newest(lay: Layout, tree):
  """The window's last ``k1`` steps: those fed since the last update."""
  return tree_map(lambda a: a[lay.length - lay.k1:], tree)


def _valid(lay: Layout, t):
  """Which steps of the window ending at stream step ``t`` exist (>= 1)."""
  return (t - lay.length + 1 + jnp.arange(lay.length)) >= 1


def recomputed_window(split, lay, remat, unroll, h0, params, anchor, starts,
                      wx, wr, t, truncate):
  """:class:`jbptt.Recompute`: the window re-run from its stored start.

  ``truncate(start, wx, wr, valid, t) -> (scale, info)`` gives the
  multipliers of the window's carries (``None`` for an int k2) or, for
  :class:`jbptt.Adaptive`, a pair ``(index, choices)``: the window is then
  cut at ``choices[index]`` by ``lax.switch`` (one branch per choice).

  Returns ``((total, weight), grads, h_end, starts, info)``: the sums of the
  injected totals and weights, the gradient of the total, the stream's carry
  after the window, the updated stored starts and ``truncate``'s info.
  """
  if lay.overlap:
    valid = _valid(lay, t)
    cx, cr = _newest(lay, (wx, wr))
    before = lambda tree: tree_map(lambda a: a[:lay.offset], tree)
    after = lambda tree: tree_map(lambda a: a[lay.offset:], tree)
    h_mid, _ = segment.forward(split.cell, params, anchor, before(cx),
                               before(cr), h0, unroll=unroll)
    h_end, _ = segment.forward(split.cell, params, h_mid, after(cx),
                               after(cr), h0, unroll=unroll)
    queue = _concat(starts, tree_map(lambda a: a[None], h_mid))
    start = tree_map(lambda a: a[0], queue)
    starts = tree_map(lambda a: a[1:], queue)
  else:
    valid, start = None, anchor
  scale, info = truncate(start, wx, wr, valid, t, branches=True)

  def loss(p, n_own, scale):
    return segment.segment_loss(
        split, p, start, wx, wr, valid, h0, n_own=n_own, inject=lay.inject,
        remat=remat, unroll=unroll, scale=scale)

  def objective(p):
    if isinstance(scale, tuple):  # Adaptive: the steps before t - k2 own
      index, choices = scale
      total, weight, h = lax.switch(index, [
          lambda p, c=c: loss(p, lay.length - c, None) for c in choices], p)
    else:
      total, weight, h = loss(p, lay.n_own, scale)
    return total, (weight, h)

  (total, (weight, h)), grads = jax.value_and_grad(objective, has_aux=True)(
      params)
  return (total, weight), grads, (h_end if lay.overlap else h), starts, info


def stored_window(split, lay, remat, unroll, h0, params, anchor, starts, wx,
                  wr, t, truncate):
  """:class:`jbptt.StoredStates`: backpropagation through stored states.

  Returns what :func:`recomputed_window` returns.
  """
  valid = _valid(lay, t)
  cx, cr = _newest(lay, (wx, wr))
  h_end, hs = segment.forward(split.cell, params, anchor, cx, cr, h0,
                              unroll=unroll)
  prev = _concat(_concat(starts, tree_map(lambda a: a[None], anchor)),
                 tree_map(lambda a: a[:-1], hs))
  mask = jnp.asarray(lay.inject) & valid
  keep = jnp.concatenate([jnp.zeros((1,), bool), valid[:-1]])
  scale, info = truncate(tree_map(lambda a: a[0], prev), wx, wr, valid, t)
  if scale is not None:
    keep = jnp.where(keep, scale, 0.0)
  grads, _, (totals, weights) = adjoint.backprop(
      lambda p, h, x, r: segment.masked_step(split.cell, p, h, x, r, None, h0),
      split.head, params, prev, wx, wr, keep[:, None], mask[:, None],
      remat=remat, unroll=unroll,
  )
  total = jnp.sum(jnp.where(mask, totals, jnp.zeros_like(totals)))
  weight = jnp.sum(jnp.where(mask, weights, jnp.zeros_like(weights)))
  return ((total, weight), grads, h_end, tree_map(lambda a: a[lay.k1:], prev),
          info)


def rule_truncate(split, lay, rule, h0, params, kept):
  """``truncate(start, wx, wr, valid, t, branches=False)`` of one update for
  ``k2 = rule`` (see :func:`recomputed_window`): ``(scale, (kept,
  k2_used))``, ``kept`` the state of the rule (:attr:`TrainState.truncation`)
  after the update; with ``branches``, an :class:`jbptt.Adaptive` gives
  ``(index, choices)`` in place of ``scale``."""
  distance = lay.length - jnp.arange(lay.length)  # of each entering carry

  def truncate(start, wx, wr, valid, t, branches=False):
    if not isinstance(rule, truncation.RULES):
      return None, (kept, jnp.int32(rule))
    if isinstance(rule, truncation.Randomized):
      return (truncation.multipliers(rule, kept, t, distance),
              (kept, truncation.realized(rule, kept, t)))
    due = ((t // lay.k1) - 1) % rule.every == 0
    new = lax.cond(
        due, lambda: _estimate(split, lay, rule, h0, params, start, wx, wr,
                               valid, t, kept),
        lambda: kept)
    if branches:
      return (truncation.choice_index(rule, new.k2), rule.choices), (new,
                                                                      new.k2)
    return truncation.multipliers(rule, new.k2, t, distance), (new, new.k2)

  return truncate


def _estimate(split, lay, rule, h0, params, start, wx, wr, valid, t, old):
  """:class:`jbptt.Adaptive`'s estimate from the window of the update ending
  at ``t``: its last loss's norms at lags ``1..K`` (re-run from the window's
  start with the current params), their decay rate and the choice."""
  norms = truncation.window_norms(split.cell, params, start, wx, wr, valid,
                                  h0, split.head)
  lags = lay.length - jnp.arange(lay.length)
  log_beta = truncation.decay_rate(norms, lags,
                                   (lags <= lay.k2) & (t - lags >= 0))
  known = ~jnp.isnan(log_beta)
  return truncation.AdaptiveState(
      jnp.where(known, truncation.choose(rule, log_beta), old.k2),
      jnp.where(known, jnp.exp(log_beta), old.beta).astype(old.beta.dtype))


def optimizer_step(optimizer, params, opt_state, grads, weight):
  """One optax step with ``grads``, or none at all if ``weight`` is 0.

  A ``cond``, not a select of both results: the skipped branch costs nothing
  and the params are not copied at every update.
  """

  def apply(params_opt):
    params, opt_state = params_opt
    updates, new_state = optimizer.update(grads, opt_state, params)
    new_state = tree_map(lambda a, b: jnp.asarray(a, jnp.result_type(b)),
                         new_state, opt_state)
    return optax.apply_updates(params, updates), new_state

  return lax.cond(weight > 0, apply, lambda params_opt: params_opt,
                  (params, opt_state))


def _current(split, lay, unroll, h0, params, anchor, tail_x, tail_r, left):
  """The stream's carry: the anchor advanced over the ``left`` steps fed
  since the last update (the last ``left`` of ``tail_x``)."""
  tail_valid = jnp.arange(lay.k1 - 1) >= (lay.k1 - 1 - left)
  return lax.cond(
      left > 0,
      lambda: segment.forward(split.cell, params, anchor, tail_x, tail_r, h0,
                              tail_valid, unroll=unroll)[0],
      lambda: anchor,
  )


def capacity(m: int, k1: int) -> int:
  """The capacity class of a chunk of ``m`` steps, in steps.

  Its update slots, ``ceil(m / k1)``, rounded up to a power of two, times
  ``k1``. ``update`` pads a chunk to its capacity (the padding steps change
  nothing), so that one compiled program serves every chunk length of a
  class, and a stream fed in chunks of varying lengths compiles at most
  ``log2`` of its longest chunk's slots programs; :class:`Metrics` has one
  entry per slot.

  Args:
    m: the chunk's steps, an int >= 1.
    k1: the trainer's ``k1``.

  Returns:
    The steps of the chunk's class, a multiple of ``k1`` that is at least
    ``m``.

  Examples:
    >>> import jbptt
    >>> [jbptt.capacity(m, k1=4) for m in (1, 4, 5, 9, 16, 17)]
    [4, 4, 8, 16, 16, 32]
  """
  slots = -(-m // k1)
  return k1 * (1 << (slots - 1).bit_length())


def _update(step_loss, split, optimizer, lay, rule, remat, unroll, state, xs,
            resets, m):
  """One call of ``update``, traced: the loop over the chunk's updates.

  ``xs`` (and ``resets``) hold a chunk of ``m`` steps (traced) padded to a
  static capacity; the steps past ``m`` are never read. The loop runs once
  per update that ends in the chunk, so its cost follows ``m``; the metrics
  have one slot per update the capacity could hold.
  """
  cap = checks.time_length(xs)
  checks.check_step(step_loss, state.params, state.carry,
                    checks.first_step(xs))
  hist = state.history
  if resets is not None:
    resets = checks.check_resets(resets, cap, state.carry)
    shape = hist.resets.shape[1:]
    try:
      resets = jnp.broadcast_to(resets, (cap,) + shape)
    except ValueError:
      raise ValueError(
          f"resets has per-step shape {resets.shape[1:]}; the stream was "
          f"declared at init with per-step shape {shape}.") from None
  elif hist.resets is not None:
    resets = jnp.zeros((cap,) + hist.resets.shape[1:], bool)
  h0 = state.initial_carry
  t0 = state.step
  pad = lay.length - 1
  buffered = hist.xs
  if lay.overlap:  # steps before the stream's start: a real input, not 0s
    before = t0 - pad + jnp.arange(pad) < 0
    buffered = tree_map(
        lambda b, x: jnp.where(
            jnp.reshape(before, (pad,) + (1,) * (b.ndim - 1)), x[:1], b),
        buffered, xs)
  all_x = _concat(buffered, xs)
  all_r = None if resets is None else jnp.concatenate([hist.resets, resets])
  pending = t0 % lay.k1
  n_updates = (pending + m) // lay.k1  # slots 1..n_updates hold one each
  window = stored_window if lay.stored else recomputed_window

  def run_update(carry, j):
    params, opt_state, anchor, starts, kept = carry
    first = j * lay.k1 - pending - 1  # index of the window's first step
    t = t0 - pending + j * lay.k1  # the update's end, a stream step
    wx = _dslice(all_x, first, lay.length)
    wr = None if all_r is None else _dslice(all_r, first, lay.length)
    truncate = rule_truncate(split, lay, rule, h0, params, kept)
    (total, weight), grads, h_end, starts, (kept, k2) = window(
        split, lay, remat, unroll, h0, params, anchor, starts, wx, wr, t,
        truncate)
    grads = tree_map(lambda g: g * (1 / jnp.where(weight > 0, weight, 1))
                     .astype(g.dtype), grads)
    new_params, new_opt = optimizer_step(optimizer, params, opt_state, grads,
                                         weight)
    metrics = Metrics(
        loss=tl.weighted_mean(total, weight),
        weight=weight,
        grad_norm=optax.tree.norm(grads),
        valid=jnp.array(True),
        skipped=(weight > 0) & ~new_opt.last_finite,
        k2=k2,
    )
    return (new_params, new_opt, h_end, starts, kept), metrics

  init_carry = (state.params, state.opt_state, hist.anchor, hist.starts,
                state.truncation)
  shapes = jax.eval_shape(run_update, init_carry, 1)[1]
  n_slots = (lay.k1 - 1 + cap) // lay.k1
  empty = tree_map(lambda s: jnp.zeros((n_slots,) + s.shape, s.dtype), shapes)

  def body(j, carry):
    inner, table = carry
    inner, metrics = run_update(inner, j)
    table = tree_map(
        lambda a, v: lax.dynamic_update_index_in_dim(a, v, j - 1, 0),
        table, metrics)
    return inner, table

  (params, opt_state, anchor, starts, kept), metrics = lax.fori_loop(
      1, n_updates + 1, body, (init_carry, empty))
  if lay.k1 == 1:  # no steps after the last update
    carry = anchor
  else:  # the anchor advanced over the steps fed since the last update
    tail = lambda a: lax.dynamic_slice_in_dim(a, pad + m - (lay.k1 - 1),
                                              lay.k1 - 1)
    carry = _current(split, lay, unroll, h0, params, anchor,
                     tree_map(tail, all_x),
                     None if all_r is None else tail(all_r),
                     (pending + m) % lay.k1)
  keep_last = lambda a: lax.dynamic_slice_in_dim(a, m, pad)
  history = History(
      xs=tree_map(keep_last, _concat(hist.xs, xs)),
      resets=None if all_r is None else keep_last(all_r),
      anchor=anchor,
      starts=starts,
  )
  new_state = TrainState(params, opt_state, carry, h0, t0 + m, history,
                         kept, state.signature)
  # Exactly the structure, shapes and dtypes it was given.
  new_state = tree_map(lambda a, b: jnp.asarray(a, jnp.result_type(b)),
                       new_state, state)
  return new_state, metrics


def trainer(
    step_loss,
    optimizer: optax.GradientTransformation,
    *,
    k1: int,
    k2: int | truncation.Randomized | truncation.Adaptive,
    losses: str = "new",
    gradient: strategies.Recompute | strategies.StoredStates = (
        strategies.RECOMPUTE),
    unroll: int | bool = 1,
) -> Trainer:
  """Online TBPTT(k1, k2): train on a stream fed in chunks of any length.

  The stream's carry advances with the params current at each step. Every
  ``k1`` stream steps an update ends at ``t``: by default
  (:class:`jbptt.Recompute`) the window is re-run from the stored stream
  state after step ``s`` (``t - k2``, see :mod:`jbptt._src.semantics`) with
  the current params; the gradient of the injected totals divided by their
  weight (:class:`jbptt.WeightedLoss`; their number for plain losses) is
  passed to ``optimizer`` and applied. ``update`` runs a whole chunk as one
  jitted XLA program (a loop over its updates with the optax step inside);
  steps left over when the chunk is not a multiple of ``k1`` wait in the
  state, so splitting a stream into pieces of any lengths gives the same
  params as one call on the whole.

  Chunk lengths: ``update`` compiles one program per capacity class, the
  chunk's ``ceil(len(xs) / k1)`` update slots rounded up to a power of two
  (:func:`capacity`): a chunk is padded to its class, and the loop runs
  once per update it holds, so a call costs what its steps cost, whatever
  the class. Padding a chunk of host (NumPy) arrays compiles nothing; a
  chunk of JAX arrays of a length not seen before compiles a small copy.

  Safety: ``optimizer`` is wrapped in ``optax.apply_if_finite`` (without a
  limit), so an update whose gradient is not finite is not applied: params
  and the optimizer's state are kept, ``Metrics.skipped`` marks it and
  ``state.opt_state.total_notfinite`` counts it. An update whose weights sum
  to 0 makes no optimizer step at all (``Metrics.weight`` shows it). The
  stream's carry advances in both cases.

  Args:
    step_loss: ``step_loss(params, carry, x) -> (carry, loss)``; ``loss`` a
      scalar (average it over the batch inside) or a
      :class:`jbptt.WeightedLoss`. A step made by :func:`jbptt.cell_loss` is
      scanned as its cell alone, its read-out evaluated once per window.
    optimizer: an ``optax.GradientTransformation``.
    k1: steps between updates (positive int).
    k2: steps each update backpropagates through: a positive int, or
      :class:`jbptt.Randomized` (unbiased randomized truncation; ``init``
      then takes ``key=``, kept in ``state.truncation``) or
      :class:`jbptt.Adaptive` (re-estimated every ``every`` updates;
      ``Metrics.k2`` reports each update's). A rule runs as TBPTT(k1,
      ``K``), ``K`` its reach, with multipliers on the carry's cotangent
      (:mod:`jbptt._src.truncation`), on every path.
    losses: which losses an update injects: ``"new"`` (default), ``"window"``
      or ``"last"`` (see :mod:`jbptt._src.semantics`).
    gradient: how an update backpropagates through its window:
      :class:`jbptt.Recompute` (default; re-run the window, the contract's
      gradient exactly) or :class:`jbptt.StoredStates` (backpropagate
      through the states the stream stored, cheaper for ``k1 < k2``), each
      with its ``remat`` policy; ``Recompute(burn_in=b)`` refreshes each
      window's start state by re-running the ``b`` steps before it.
    unroll: steps per iteration of the per-step scans (the stream's advance,
      the window's forward and reverse passes), passed to ``jax.lax.scan``:
      a positive int or ``True``. The result is the same; see the speed
      guide for which to choose per backend.

  Returns:
    A :class:`Trainer`:

    * ``init(params, carry, xs, resets=None, *, key=None) -> TrainState``.
      ``key``, a PRNG key, is required for :class:`jbptt.Randomized` (and
      refused otherwise): update ``t``'s draws come from it and ``t``, so a
      run is reproducible and resumes exactly from a checkpoint. ``xs`` is a
      chunk of the stream or a pytree of ``jax.ShapeDtypeStruct`` (its time
      length does not matter); ``resets`` a mask or a ``ShapeDtypeStruct``
      of shape ``(T,) + S``: giving it declares that the stream has resets
      of per-step shape ``S`` (a leading prefix of the carry leaves' shapes).
      The state's structure, shapes and dtypes are then fixed: it is a
      complete template for :func:`jbptt.checkpoint.restore`.
    * ``update(state, xs, resets=None) -> (TrainState, Metrics)``:
      ``resets`` is a boolean ``(len(xs),) + S`` mask: where it is true the
      carry is replaced by the initial carry before the step and no gradient
      crosses the boundary. The returned state has exactly the structure of
      the given one, so ``update`` can be scanned. ``state`` may also be a
      :class:`jbptt.PackedState` (:func:`jbptt.pack_state`), returned packed:
      a live feed of a few steps per call then dispatches one buffer per
      dtype instead of every leaf of the state.

  Raises:
    ValueError: for a bad ``k1``, ``k2``, ``losses``, ``remat`` or
      ``unroll`` (at once); in ``update``, for a state made by another
      trainer or for another stream (naming what differs), a packed state
      whose buffers do not match its packing, or resets given to a stream
      declared without them.
    TypeError: for an ``optimizer`` or ``gradient`` of the wrong type (at
      once), or a ``step_loss`` that changes the carry or returns a
      non-scalar loss.

  Examples:
    >>> import jax.numpy as jnp, optax, jbptt
    >>> def step_loss(w, h, x):
    ...   h = jnp.tanh(w * h + x)
    ...   return h, (h - 0.5) ** 2
    >>> tr = jbptt.trainer(step_loss, optax.sgd(0.1), k1=4, k2=8)
    >>> xs = jnp.ones(10)
    >>> state = tr.init(jnp.float32(0.3), jnp.float32(0.0), xs)
    >>> state, metrics = tr.update(state, xs)
    >>> metrics.valid.tolist(), int(state.step)  # 3 updates in 4 slots
    ([True, True, False, False], 10)

  References:
    Williams & Peng, An Efficient Gradient-Based Algorithm for On-Line
    Training of Recurrent Network Trajectories, Neural Computation, 1990.
  """
  rule = truncation.check_k2(k2)
  k1, reach, losses = semantics.check_config(k1, truncation.reach(rule),
                                             losses)
  truncation.check_losses(rule, losses)
  gradient = strategies.check_gradient(gradient)
  unroll = strategies.check_unroll(unroll)
  if not isinstance(optimizer, optax.GradientTransformation) and not (
      hasattr(optimizer, "init") and hasattr(optimizer, "update")
  ):
    raise TypeError(
        "optimizer must be an optax.GradientTransformation, got "
        f"{type(optimizer).__name__}."
    )
  safe = optax.apply_if_finite(optimizer, max_consecutive_errors=_NEVER)
  lay = window_layout(k1, reach, losses,
                      isinstance(gradient, strategies.StoredStates),
                      getattr(gradient, "burn_in", 0))
  split = steps.split(step_loss)

  def signature(reset_shape):
    return Signature(k1, rule, losses, gradient, reset_shape)

  def init(params, carry, xs, resets=None, *, key=None) -> TrainState:
    tl.check_key(rule, key)
    params, carry = _strong(params), _strong(checks.as_arrays(carry))
    checks.time_length(xs)
    x_step = _per_step(xs)
    checks.check_step(step_loss, params, carry, x_step)
    reset_shape = None
    if resets is not None:
      reset_shape = tuple(resets.shape[1:])
      checks.check_reset_shape(reset_shape, carry)
    return TrainState(
        params=params,
        opt_state=_strong(safe.init(params)),
        carry=carry,
        initial_carry=tree_map(jnp.copy, carry),
        step=jnp.zeros((), jnp.int32),
        history=new_history(lay, carry, x_step, reset_shape),
        truncation=_rule_state(rule, key),
        signature=signature(reset_shape),
    )

  def run(state, xs, resets, m):
    return _update(step_loss, split, safe, lay, rule, gradient.remat, unroll,
                   state, xs, resets, m)

  def run_packed(state, xs, resets, m):
    new_state, metrics = run(
        packing.unpack(state.buffers, state.packing), xs, resets, m)
    return state._replace(buffers=packing.pack(new_state,
                                               state.packing)), metrics

  jitted, jitted_packed = jax.jit(run), jax.jit(run_packed)

  passed = set()  # argument layouts that passed every check

  def check_state(state, xs, resets):
    """Clear errors for a state or chunk this trainer cannot take. A layout
    (structures, the signature, shapes and dtypes) that passed once is not
    checked again: a live feed pays one flatten per call, not the checks."""
    key = _layout_key(state, xs, resets)
    if key in passed:
      return
    if isinstance(state, packing.PackedState):
      state = packing.checked_template(state)
    _check_state(state, xs, resets)  # raises for a key of None
    if len(passed) < 64:  # a few layouts per trainer; bounded all the same
      passed.add(key)

  def _check_state(state, xs, resets):
    if not isinstance(state, TrainState):
      raise TypeError(
          f"update expects a jbptt.TrainState, got {type(state).__name__}.")
    ours = signature(state.signature.resets)
    if state.signature != ours:
      raise ValueError(
          "the state was made by another trainer: "
          + ", ".join(ours.differences(state.signature))
          + ". Make it with this trainer's init.")
    want = jax.tree_util.tree_structure(jax.eval_shape(safe.init,
                                                       state.params))
    got = jax.tree_util.tree_structure(state.opt_state)
    if want != got:
      raise ValueError(
          "the state's opt_state does not have this trainer's optimizer "
          f"state structure: {got} given, {want} expected.")
    if resets is not None and state.signature.resets is None:
      raise ValueError(
          "resets given to a stream declared without resets; declare them "
          "at init: trainer.init(params, carry, xs, resets=...) with a mask "
          "or a jax.ShapeDtypeStruct of shape (T,) + S.")
    given = jax.tree_util.tree_structure(xs)
    have = jax.tree_util.tree_structure(state.history.xs)
    if given != have or any(
        jnp.shape(a)[1:] != b.shape[1:] or jnp.result_type(a) != b.dtype
        for a, b in zip(jax.tree_util.tree_leaves(xs),
                        jax.tree_util.tree_leaves(state.history.xs))):
      raise ValueError(
          "xs does not match the stream declared at init: per-step "
          f"{_describe(_per_step(xs))} given, "
          f"{_describe(_per_step(state.history.xs))} declared.")

  def update(state: TrainState, xs, resets=None):
    check_state(state, xs, resets)
    m = checks.time_length(xs)
    if resets is not None:
      checks.check_length(resets, m)
    cap = capacity(m, k1)
    run = jitted_packed if isinstance(state, packing.PackedState) else jitted
    return run(state, _padded(xs, m, cap), _padded(resets, m, cap), m)

  return Trainer(init=init, update=update)


def _rule_state(rule, key):
  """The initial :attr:`TrainState.truncation` of ``k2 = rule``."""
  if isinstance(rule, truncation.Randomized):
    if jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key):
      key = jax.random.key_data(key)
    return jnp.array(key, jnp.uint32)
  if isinstance(rule, truncation.Adaptive):
    return truncation.AdaptiveState(jnp.int32(rule.choices[-1]),
                                    jnp.float32(jnp.nan))
  return None


def _layout_key(state, xs, resets):
  """What ``update``'s checks read from its arguments, hashable: the
  structures of the state (with its static signature), ``xs`` and ``resets``,
  the shapes and dtypes of the params and of the declared stream, and the
  per-step shapes and dtypes of ``xs`` and ``resets``. For a packed state,
  its packing (which holds the structure) and its buffers' shapes."""
  if isinstance(state, packing.PackedState):
    head = (state.packing, _shapes(state.buffers, 0))
  elif isinstance(state, TrainState):
    head = (jax.tree_util.tree_structure(state), _shapes(state.params, 0),
            _shapes(state.history.xs, 1))
  else:
    return None
  return head + (jax.tree_util.tree_structure(xs), _shapes(xs, 1),
                 _shapes(resets, 1))


def _shapes(tree, skip):
  """``(shape[skip:], dtype)`` of every leaf of ``tree``."""
  out = []
  for a in jax.tree_util.tree_leaves(tree):
    dtype = getattr(a, "dtype", None)  # arrays: an attribute, no promotion
    out.append((np.shape(a)[skip:],
                jnp.result_type(a) if dtype is None else dtype))
  return tuple(out)


def _pad(a, size, xnp):
  """``a`` padded with zeros along its first axis to ``size`` (``xnp``:
  ``np`` or ``jnp``)."""
  return xnp.concatenate([a, xnp.zeros((size - a.shape[0],) + a.shape[1:],
                                       a.dtype)])


@functools.partial(jax.jit, static_argnums=1)
def _pad_arrays(leaves, size):
  return [_pad(a, size, jnp) for a in leaves]


def _padded(tree, m: int, size: int):
  """``tree`` (``m`` steps) padded with zeros along time to ``size`` steps:
  host arrays on the host (nothing compiled), JAX arrays in one small program
  (traced into the caller's program under a transformation)."""
  if tree is None or m == size:
    return tree
  leaves, treedef = jax.tree_util.tree_flatten(tree)
  on_device = iter(_pad_arrays(
      [a for a in leaves if isinstance(a, jax.Array)], size))
  return jax.tree_util.tree_unflatten(treedef, [
      next(on_device) if isinstance(a, jax.Array)
      else _pad(np.asarray(a), size, np) for a in leaves])


def _describe(spec) -> str:
  return str(tree_map(lambda s: f"{s.dtype}{list(s.shape)}", spec))

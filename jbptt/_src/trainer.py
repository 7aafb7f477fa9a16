"""``trainer``: online TBPTT(k1, k2) on a stream, optax style."""

from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax import lax

from jbptt._src import adjoint, checks, options, segment, semantics
from jbptt._src import truncated_loss as tl

tree_map = jax.tree_util.tree_map


class History(NamedTuple):
  """What the stream keeps between calls of ``update``.

  Attributes:
    xs: the last ``L - 1`` inputs (``L = max(k1, k2)``), oldest first.
    resets: the matching reset masks; ``None`` while the stream has had none
      (then no step of an update selects between carries).
    anchor: the stream's carry after the last update.
    starts: for ``k1 < k2``, stored stream carries (leading axis): with
      ``history="recompute"`` those after steps ``t - k2`` of the next
      ``ceil(k2 / k1) - 1`` updates, with ``history="stored"`` the last
      ``k2 - k1`` carries before the anchor; ``None`` for ``k1 >= k2``.
  """

  xs: Any
  resets: jax.Array | None
  anchor: Any
  starts: Any


class TrainState(NamedTuple):
  """The state of an online TBPTT(k1, k2) run.

  Attributes:
    params: the current parameters.
    opt_state: the optax optimizer's state.
    carry: the stream's current carry (after the last step fed).
    initial_carry: the carry that a reset restores.
    step: how many stream steps have been fed (int32).
    num_skipped: how many updates were skipped for a non-finite loss or
      gradient (int32).
    history: the buffers of the pending window, allocated by ``init`` when
      it is given ``xs``, else by the first ``update`` (``None`` before).
  """

  params: Any
  opt_state: Any
  carry: Any
  initial_carry: Any
  step: jax.Array
  num_skipped: jax.Array
  history: History | None


class Metrics(NamedTuple):
  """Per-update metrics of one ``update`` call.

  Every field has one entry per update slot of the call: ``ceil`` of the
  chunk length over ``k1`` slots at most, exactly ``len(xs) // k1`` when the
  chunk length is a multiple of ``k1``. ``valid`` marks the slots in which an
  update happened.

  Attributes:
    loss: the mean of the losses the update injected (its objective).
    grad_norm: the global norm of its gradient.
    valid: whether an update ended in this slot.
    skipped: whether the loss or gradient was not finite, so the update was
      not applied (params and optimizer state kept).
  """

  loss: jax.Array
  grad_norm: jax.Array
  valid: jax.Array
  skipped: jax.Array


class Trainer(NamedTuple):
  """A pair of pure functions, ``init`` and ``update`` (optax style)."""

  init: Callable[..., TrainState]
  update: Callable[..., tuple[TrainState, Metrics]]


def _concat(a, b):
  return tree_map(lambda u, v: jnp.concatenate([u, v]), a, b)


def _copy(tree):
  """The leaves copied, so that no two leaves of a state share a buffer
  (a state can then be donated: ``jax.jit(update, donate_argnums=0)``)."""
  return tree_map(jnp.copy, tree)


def _dslice(tree, start, size):
  return tree_map(lambda a: lax.dynamic_slice_in_dim(a, start, size), tree)


def _all_resets(hist_resets, resets, m, pad):
  """The reset masks of the history and the chunk, joined (time leading).

  ``None`` when neither has any: a stream without resets is traced without
  them, so its steps make no selection between carries. Otherwise a missing
  side is all false and both are broadcast to a common mask shape.
  """
  if hist_resets is None and resets is None:
    return None
  if hist_resets is None:
    hist_resets = jnp.zeros((pad,) + resets.shape[1:], bool)
  if resets is None:
    resets = jnp.zeros((m,) + hist_resets.shape[1:], bool)
  shape = jnp.broadcast_shapes(hist_resets.shape[1:], resets.shape[1:])
  return jnp.concatenate([
      jnp.broadcast_to(hist_resets, (pad,) + shape),
      jnp.broadcast_to(resets, (m,) + shape),
  ])


def _all_finite(tree):
  leaves = [jnp.all(jnp.isfinite(a)) for a in jax.tree_util.tree_leaves(tree)]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)


def trainer(
    step_loss,
    optimizer: optax.GradientTransformation,
    *,
    k1: int,
    k2: int,
    policy: str = "new",
    history: str = "recompute",
    remat=None,
    unroll: int | bool | None = None,
) -> Trainer:
  """Online TBPTT(k1, k2): train on a stream fed in chunks of any length.

  The stream's carry advances with the params current at each step. Every
  ``k1`` stream steps an update ends at ``t``: the window is re-run from the
  stored stream state after step ``s`` (``t - k2``, see
  :mod:`jbptt._src.semantics`) with the current params, the gradient of the
  injected losses is divided by their number, passed to ``optimizer`` and
  applied. ``update`` runs a whole chunk as one jitted XLA program (a scan
  over its updates with the optax step inside); steps left over when the
  chunk is not a multiple of ``k1`` wait in the state, so splitting a stream
  into pieces of any lengths gives the same params as one call on the whole.

  An update whose loss or gradient is not finite is skipped: params and
  optimizer state are kept, ``Metrics.skipped`` marks it and
  ``TrainState.num_skipped`` counts it; the stream's carry still advances.

  Args:
    step_loss: ``step_loss(params, carry, x) -> (carry, loss)``; scalar loss
      (average it over the batch inside).
    optimizer: an ``optax.GradientTransformation``.
    k1: steps between updates (positive int).
    k2: steps each update backpropagates through (positive int).
    policy: ``"new"`` (default), ``"window"`` or ``"last"``.
    history: how an update backpropagates through its window.
      ``"recompute"`` (default): the window is re-run from the stored state
      ``h_s`` with the current params and differentiated, as above.
      ``"stored"``: Williams & Peng's BPTT(h; h0): the stream's states of
      the last ``k2`` steps are stored as the stream computed them (each with
      the params current at its step) and nothing is re-run; the gradient
      backpropagates through those stored states, step ``j``'s Jacobians and
      loss taken at (current params, stored ``h_(j-1)``, ``x_j``): all steps
      of the window are linearised at once (in parallel over time), then one
      sequential reverse pass carries the adjoint. For ``k1 >= k2`` every
      window lies within the steps run since the last update, so the stored
      states are the re-run ones and both give the same gradient (the same
      code runs). For ``k1 < k2`` the states older than ``t - k1`` were
      computed with older params, so the gradient differs from the default
      by terms of the order of the params' change over the window; it is
      cheaper (no re-run of the window, no second forward pass).
    remat: ``None`` (default) or a ``jax.checkpoint`` policy (e.g.
      ``jax.checkpoint_policies.nothing_saveable``) to trade compute for
      memory in the window's backward pass: with ``"recompute"`` every step
      of the window is wrapped in ``jax.checkpoint(step_loss, policy=remat)``;
      with ``"stored"`` each step is linearised inside the reverse pass
      instead of all at once. The result is the same.
    unroll: steps per iteration of the per-step scans (the stream's advance,
      the window's forward and reverse passes), passed to ``jax.lax.scan``:
      a positive int, ``True`` for fully unrolled loops, or ``None`` (the
      default) for 8 when JAX's default backend is a GPU and 1 otherwise
      (read when ``update`` is traced). The result is the same. On an H100
      GPU 8 ran about twice as fast as 1; on a 2-core CPU 1 suits large cells
      and 4 to 8 can be faster for small ones (each step a few tiny kernels, e.g.
      online training with batch 1) (measured: README, Performance).

  Returns:
    A :class:`Trainer` with ``init(params, carry, xs=None, resets=None) ->
    TrainState`` and ``update(state, xs, resets=None) -> (TrainState,
    Metrics)``. ``resets`` is an optional boolean ``(len(xs),) + S`` mask
    (``S`` a leading prefix of the carry leaves' shapes): where it is true the
    carry is replaced by the initial carry before the step and no gradient
    crosses the boundary. The history buffers are allocated by ``init`` when
    it is given a chunk of the stream ``xs`` (and ``resets``, if the stream
    has them; only their shapes and first step are used), otherwise by the
    first ``update``. A state with its buffers allocated is the template that
    :func:`jbptt.checkpoint.restore` needs.

  Examples:
    >>> import jax.numpy as jnp, optax, jbptt
    >>> def step_loss(w, h, x):
    ...   h = jnp.tanh(w * h + x)
    ...   return h, (h - 0.5) ** 2
    >>> tr = jbptt.trainer(step_loss, optax.sgd(0.1), k1=4, k2=8)
    >>> state = tr.init(jnp.float32(0.3), jnp.float32(0.0))
    >>> state, metrics = tr.update(state, jnp.ones(10))
    >>> metrics.loss.shape, int(state.step)
    ((3,), 10)

  References:
    Williams & Peng, An Efficient Gradient-Based Algorithm for On-Line
    Training of Recurrent Network Trajectories, Neural Computation, 1990.
  """
  k1, k2, policy = semantics.check_config(k1, k2, policy)
  stored = options.check_history(history) == "stored" and k1 < k2
  remat = options.check_remat(remat)
  unroll_option = options.check_unroll(unroll)
  if not isinstance(optimizer, optax.GradientTransformation) and not (
      hasattr(optimizer, "init") and hasattr(optimizer, "update")
  ):
    raise TypeError(
        "optimizer must be an optax.GradientTransformation, got "
        f"{type(optimizer).__name__}."
    )
  overlap = k1 < k2
  length = k2 if overlap else k1  # the window re-run at each update
  n_own = max(0, k1 - k2)
  if not overlap:
    n_starts = 0
  elif stored:
    n_starts = k2 - k1
  else:
    n_starts = math.ceil(k2 / k1) - 1
  offset = (-k2) % k1  # where, in a chunk, a future window starts
  taus = [tau for tau, _ in semantics.injected(length, length - k1, k2, policy)]
  inject = tl.inject_mask(0, length, taus)
  window_step = options.rematted(step_loss, remat)

  def init(params, carry, xs=None, resets=None) -> TrainState:
    carry = checks.as_arrays(carry)
    state = TrainState(
        params=params,
        opt_state=optimizer.init(params),
        carry=carry,
        initial_carry=_copy(carry),
        step=jnp.zeros((), jnp.int32),
        num_skipped=jnp.zeros((), jnp.int32),
        history=None,
    )
    if xs is None:
      if resets is not None:
        raise ValueError("init: resets given without xs.")
      return state
    return allocate(state, xs, resets)

  def new_history(state, xs, reset_shape):
    pad = length - 1
    return History(
        xs=tree_map(lambda a: jnp.repeat(a[:1], pad, axis=0), xs),
        resets=None if reset_shape is None else jnp.zeros(
            (pad,) + reset_shape, bool
        ),
        anchor=_copy(state.carry),
        starts=tree_map(
            lambda a: jnp.repeat(a[None], n_starts, axis=0), state.carry
        ) if overlap else None,
    )

  def _update(state: TrainState, xs, resets):
    unroll = options.resolved_unroll(unroll_option)
    m = checks.time_length(xs)
    checks.check_step(step_loss, state.params, state.carry, checks.first_step(xs))
    hist = state.history
    if resets is not None:
      resets = checks.check_resets(resets, m, state.carry)
    all_x = _concat(hist.xs, xs)
    all_r = _all_resets(hist.resets, resets, m, length - 1)
    h0 = state.initial_carry
    t0 = state.step
    pending = t0 % k1
    n_slots = (k1 - 1 + m) // k1
    loss_dtype = jax.eval_shape(
        step_loss, state.params, state.carry, checks.first_step(xs)
    )[1].dtype

    def forward(params, h, xs, resets, start, stop):
      sl = lambda a: a[start:stop]
      return segment.forward(
          step_loss, params, h, tree_map(sl, xs), tree_map(sl, resets), h0,
          unroll=unroll,
      )

    def newest(tree):
      """The window's last ``k1`` steps: those fed since the last update."""
      return tree_map(lambda a: a[length - k1:], tree)

    def recomputed_window(params, anchor, starts, wx, wr, t):
      """The window re-run from its stored start with the current params."""
      if overlap:
        valid = (t - length + 1 + jnp.arange(length)) >= 1
        cx, cr = newest((wx, wr))
        h_mid, _ = forward(params, anchor, cx, cr, 0, offset)
        h_end, _ = forward(params, h_mid, cx, cr, offset, k1)
        queue = _concat(starts, tree_map(lambda a: a[None], h_mid))
        start = tree_map(lambda a: a[0], queue)
        starts = tree_map(lambda a: a[1:], queue)
        count = jnp.sum(jnp.asarray(inject) & valid)
      else:
        valid, start, count = None, anchor, len(taus)

      def objective(p):
        total, h = segment.segment_loss(
            window_step, p, start, wx, wr, valid, h0, n_own=n_own,
            inject=inject, unroll=unroll,
        )
        return total / count, h

      (loss, h), grads = jax.value_and_grad(objective, has_aux=True)(params)
      return (loss, grads), (h_end if overlap else h), starts

    def stored_window(params, anchor, starts, wx, wr, t):
      """Backpropagation through the stored states of the window."""
      valid = (t - length + 1 + jnp.arange(length)) >= 1
      cx, cr = newest((wx, wr))
      h_end, hs = forward(params, anchor, cx, cr, 0, k1)
      prev = _concat(_concat(starts, tree_map(lambda a: a[None], anchor)),
                     tree_map(lambda a: a[:-1], hs))
      mask = jnp.asarray(inject) & valid
      seed = mask.astype(loss_dtype) / jnp.sum(mask).astype(loss_dtype)
      keep = jnp.concatenate([jnp.zeros((1,), bool), valid[:-1]])
      grads, _, losses = adjoint.backprop(
          lambda p, h, x, r: segment.masked_step(step_loss, p, h, x, r, None, h0),
          params, prev, wx, wr, keep[:, None], seed[:, None],
          sequential=remat is not None, unroll=unroll,
      )
      loss = jnp.sum(jnp.where(mask, losses, jnp.zeros_like(losses)) * seed)
      return (loss, grads), h_end, tree_map(lambda a: a[k1:], prev)

    def run_update(carry, j):
      params, opt_state, anchor, starts, n_skipped = carry
      first = j * k1 - pending - 1  # index of the window's first step
      t = t0 - pending + j * k1  # the update's end, a stream step
      wx = _dslice(all_x, first, length)
      wr = _dslice(all_r, first, length)
      if stored:
        (loss, grads), h_end, starts = stored_window(
            params, anchor, starts, wx, wr, t
        )
      else:
        (loss, grads), h_end, starts = recomputed_window(
            params, anchor, starts, wx, wr, t
        )
      finite = _all_finite(loss) & _all_finite(grads)

      def apply(params_opt):
        params, opt_state = params_opt
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

      # A cond, not a select of both results: the skipped branch costs
      # nothing and the params are not copied at every update.
      new_params, new_opt_state = lax.cond(
          finite, apply, lambda params_opt: params_opt, (params, opt_state)
      )
      carry = (
          new_params,
          new_opt_state,
          h_end,
          starts,
          n_skipped + (~finite).astype(jnp.int32),
      )
      metrics = Metrics(
          loss=loss,
          grad_norm=optax.tree.norm(grads),
          valid=jnp.array(True),
          skipped=~finite,
      )
      return carry, metrics

    def slot(carry, j):
      if m % k1 == 0:  # every slot holds an update
        return run_update(carry, j)
      shapes = jax.eval_shape(run_update, carry, j)[1]
      skip = lambda c, _: (c, tree_map(lambda s: jnp.zeros(s.shape, s.dtype), shapes))
      return lax.cond(j * k1 - pending <= m, run_update, skip, carry, j)

    # The stream's current carry: the anchor after the last update advanced
    # over the steps fed since (``left`` of them).
    left = (pending + m) % k1

    def current(params, anchor):
      tail_x, tail_r = tree_map(lambda a: a[-(k1 - 1):], (all_x, all_r))
      tail_valid = jnp.arange(k1 - 1) >= (k1 - 1 - left)
      return lax.cond(
          left > 0,
          lambda: segment.forward(
              step_loss, params, anchor, tail_x, tail_r, h0, tail_valid,
              unroll=unroll,
          )[0],
          lambda: anchor,
      )

    def slot_and_carry(carry, j):
      """A slot; after the last one, also the stream's current carry.

      The current carry is made inside the loop, in a buffer the loop
      carries, rather than after it: XLA:CPU may share a buffer defined
      after the loop with the loop's temporaries, and a shared buffer
      orders kernels that could otherwise run at once (measured: the
      backward step's two matmuls, one after the other).
      """
      inner, stream = carry
      inner, metrics = slot(inner, j)
      params, _, anchor, _, _ = inner
      if k1 == 1:  # no steps after the last update
        return (inner, anchor), metrics
      stream = lax.cond(
          j == n_slots, lambda: current(params, anchor), lambda: stream
      )
      return (inner, stream), metrics

    init_carry = (
        state.params, state.opt_state, hist.anchor, hist.starts,
        state.num_skipped,
    )
    ((params, opt_state, anchor, starts, n_skipped), carry), metrics = lax.scan(
        slot_and_carry, (init_carry, state.carry), jnp.arange(1, n_slots + 1)
    )

    keep_last = lambda a: a[a.shape[0] - (length - 1):]
    buffers = History(
        xs=tree_map(keep_last, all_x),
        resets=tree_map(keep_last, all_r),
        anchor=anchor,
        starts=starts,
    )
    new_state = TrainState(
        params=params,
        opt_state=opt_state,
        carry=carry,
        initial_carry=h0,
        step=t0 + m,
        num_skipped=n_skipped,
        history=buffers,
    )
    return new_state, metrics

  jitted = jax.jit(_update)

  def allocate(state, xs, resets):
    checks.time_length(xs)
    shape = None if resets is None else jnp.shape(resets)[1:]
    return state._replace(history=new_history(state, xs, shape))

  def update(state: TrainState, xs, resets=None):
    if state.history is None:  # allocate outside the jitted program
      state = allocate(state, xs, resets)
    return jitted(state, xs, resets)

  return Trainer(init=init, update=update)

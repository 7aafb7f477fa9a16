"""``truncated_loss``: the TBPTT(k1, k2) loss of a sequence, fixed params."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jbptt._src import adjoint, checks, layout, segment, semantics, steps, truncation
from jbptt._src import gradient as strategies

tree_map = jax.tree_util.tree_map


def inject_mask(start: int, length: int, taus) -> np.ndarray:
  """Marks the steps ``start+1 .. start+length`` that are in ``taus``."""
  at = start + 1 + np.arange(length)
  return np.isin(at, np.fromiter(taus, dtype=np.int64, count=len(taus)))


def _n_own(t: int, k2: int, start: int) -> int:
  return max(0, t - k2 - start)


def _take(tree, idx):
  return tree_map(lambda a: a[idx], tree)


def _scales(mult, t, start, length):
  """The multipliers of the carries entering steps ``start+1 ..
  start+length`` in the update ending at ``t``; ``None`` for an int k2."""
  if mult is None:
    return None
  return mult(t, t - start - jnp.arange(length))


def _chunked(split, params, carry, xs, resets, h0, n, k1, k2, losses, remat,
             unroll, mult):
  """k1 >= k2: consecutive chunks, one scan, cost of plain BPTT."""
  q = n // k1
  total, weight = 0.0, 0.0
  h = carry
  t_prev = q * k1
  c_tail = max(0, n - k2)
  b_tail = k1 * (min(t_prev, c_tail) // k1)
  if q:
    taus = [tau for tau, _ in semantics.injected(k1, 0, k2, losses)]
    inject = inject_mask(0, k1, taus)
    n_own = k1 - k2

    def chunk(h, inp):
      xc, rc, i = inp
      total, weight, h_end = segment.segment_loss(
          split, params, h, xc, rc, None, h0, n_own=n_own, inject=inject,
          remat=remat, unroll=unroll,
          scale=_scales(mult, (i + 1) * k1, i * k1, k1),
      )
      return h_end, (total, weight, h)

    fold = lambda a: jnp.reshape(a[: q * k1], (q, k1) + a.shape[1:])
    rs = None if resets is None else fold(resets)
    h, (totals, weights, starts) = lax.scan(
        chunk, h, (tree_map(fold, xs), rs, jnp.arange(q)))
    total, weight = jnp.sum(totals), jnp.sum(weights)
    if n % k1 and b_tail < t_prev:
      h = tree_map(lambda a: a[b_tail // k1], starts)
  if n % k1:
    taus = [tau for tau, _ in semantics.injected(n, t_prev, k2, losses)]
    rs = None if resets is None else resets[b_tail:]
    tail_total, tail_weight, h = segment.segment_loss(
        split, params, h, _take(xs, slice(b_tail, n)), rs, None, h0,
        n_own=_n_own(n, k2, b_tail),
        inject=inject_mask(b_tail, n - b_tail, taus), remat=remat,
        unroll=unroll, scale=_scales(mult, n, b_tail, n - b_tail),
    )
    total, weight = total + tail_total, weight + tail_weight
  return total, weight, h


def _overlapping(split, params, carry, xs, resets, h0, n, k1, k2, losses,
                 remat, unroll, mult):
  """k1 < k2: one forward pass, then every window's adjoint in one pass.

  With fixed params all overlapping windows run through the same states, so
  the forward pass is shared and the reverse pass carries the adjoints of
  the windows active at each step as one batch (:mod:`jbptt._src.adjoint`).
  """
  m = layout.num_slots(n, k1, k2)

  def cell(p, h, x, r, h0):
    return segment.masked_step(split.cell, p, h, x, r, None, h0)

  def run(params, carry, xs, resets, h0):
    def body(h, inp):
      h, out = cell(params, h, *inp, h0)
      return h, (h, out)

    h, (hs, outs) = lax.scan(body, carry, (xs, resets), unroll=unroll)
    totals, weights = split.head(params, outs, xs)
    seed = layout.slot_tables(n, k1, k2, losses, m)[1]
    mult = jnp.sum(seed, axis=1).astype(totals.dtype)
    total = jnp.sum(totals * mult)
    weight = lax.stop_gradient(jnp.sum(weights * mult))
    return (total, weight, h), hs

  @jax.custom_vjp
  def total_loss(params, carry, xs, resets, h0, scale):
    return run(params, carry, xs, resets, h0)[0]

  def fwd(params, carry, xs, resets, h0, scale):
    out, hs = run(params, carry, xs, resets, h0)
    return out, (params, carry, xs, resets, h0, scale, hs)

  def bwd(res, cts):
    params, carry, xs, resets, h0, scale, hs = res
    g = cts[0]
    hs_prev = tree_map(
        lambda a, b: jnp.concatenate([a[None], b[:-1]]), carry, hs
    )
    keep, seed = layout.slot_tables(n, k1, k2, losses, m)
    if scale is not None:
      keep = jnp.where(keep, scale, 0.0)
    d_params, d_xs, _ = adjoint.backprop(
        lambda p, h, x, r: cell(p, h, x, r, h0), split.head, params, hs_prev,
        xs, resets, keep, seed.astype(g.dtype) * g, remat=remat,
        unroll=unroll,
    )
    return d_params, None, d_xs, None, None, None

  total_loss.defvjp(fwd, bwd)
  scale = None
  if mult is not None:  # row i passes its adjoint on to h_i
    t = layout.slot_windows(n, k1, m)[1]
    scale = mult(t, t - jnp.arange(n)[:, None])
  return total_loss(params, carry, xs, resets, h0, scale)


def weighted_mean(total, weight):
  """``total / weight``, and 0 where ``weight`` is 0 (nothing injected
  counts); ``weight`` carries no gradient."""
  weight = lax.stop_gradient(weight)
  positive = weight > 0
  return jnp.where(positive, total, 0.0) / jnp.where(positive, weight, 1.0)


def truncated_loss(
    step_loss, *, k1: int,
    k2: int | truncation.Randomized | truncation.Adaptive, losses: str = "new",
    gradient: strategies.Recompute = strategies.RECOMPUTE,
    unroll: int | bool = 1,
):
  """The TBPTT(k1, k2) loss of a whole sequence with fixed parameters.

  As ``jax.lax.scan`` of ``step_loss`` over ``xs``, but the gradient is the
  truncated one of Williams & Peng (1990): every ``k1`` steps (and at ``n``)
  an update injects step losses, each backpropagated only to the state
  ``k2`` steps before the update's end (see :mod:`jbptt._src.semantics` for
  the exact contract and a reference loop).

  For ``k1 >= k2`` this is one scan with ``stop_gradient`` at the right
  steps: it costs what full BPTT costs. For ``k1 < k2`` the params are fixed,
  so all overlapping windows run through the same states: one forward pass
  stores them, and one reverse pass carries the adjoints of the (at most
  ``ceil(k2 / k1) + 1``) windows active at each step together as a batch,
  dropping each at its truncation state; every step is linearised once and
  the params and ``xs`` cotangents are taken once from the sum of the
  windows' adjoints (:mod:`jbptt._src.adjoint`). That path is a
  ``jax.custom_vjp``: reverse mode only (``jax.grad``, ``jax.vjp``), no
  forward mode (``jax.jvp``).

  A step made by :func:`jbptt.cell_loss` is scanned as its cell alone; its
  ``loss_fn`` is evaluated once over all the outputs of each window (for
  ``k1 < k2``, of the sequence), vectorised over time.

  Args:
    step_loss: ``step_loss(params, carry, x) -> (carry, loss)``; ``loss`` a
      scalar or a :class:`jbptt.WeightedLoss`; the carry keeps its
      structure, shapes and dtypes.
    k1: steps between updates (positive int).
    k2: steps each update backpropagates through: a positive int, or a rule
      (:mod:`jbptt._src.truncation`): :class:`jbptt.Randomized` (unbiased
      randomized truncation; the function then needs ``key=``) or
      :class:`jbptt.Adaptive` (the smallest ``k2`` of its choices whose
      estimated bias is small enough, estimated once per call from the
      sequence). A rule runs as TBPTT(k1, ``K``), ``K`` its reach (``max``,
      the largest choice), with multipliers on the carry's cotangent.
    losses: which losses an update injects: ``"new"`` (those of its own
      ``k1`` steps, the default), ``"window"`` (all of its last ``k2``) or
      ``"last"`` (only the loss at its end; sequence-to-one).
    gradient: :class:`jbptt.Recompute` (the only strategy: with fixed params
      stored and recomputed states are the same). Its ``remat``, a
      ``jax.checkpoint`` policy, decides what of each step is kept for the
      backward pass (for ``k1 >= k2`` each step runs under
      ``jax.checkpoint(..., policy=remat)``; for ``k1 < k2`` each step's
      linearisation keeps what the policy saves, one step after the other).
    unroll: steps per iteration of the per-step scans (forward and reverse),
      passed to ``jax.lax.scan``: a positive int or ``True`` (fully
      unrolled). Values and gradients are the same; see the speed guide for
      which to choose per backend.

  Returns:
    ``f(params, carry, xs, *, resets=None, initial_carry=None, key=None) ->
    (loss, final_carry)``; ``key`` a PRNG key, required for
    :class:`jbptt.Randomized` and refused otherwise. ``loss`` is ``sum(total) /
    sum(weight)`` over every injected step of every update (for plain scalar
    losses and ``"new"``: the mean loss of the sequence; 0 if the weights sum to
    0), and its gradient the sum of the truncated gradients of the injected
    totals divided by ``sum(weight)``. ``final_carry`` is the carry after step
    ``n`` (held constant), ready for the next sequence. ``resets`` is an
    optional boolean of shape ``(n,) + S`` (``S`` a leading prefix of the carry
    leaves' shapes, e.g. ``(batch,)``): where it is true the carry is replaced
    by ``initial_carry`` (default: ``carry``) before the step, and no gradient
    crosses that boundary. ``carry`` and ``initial_carry`` receive no gradient
    (they are held constant); float ``xs`` do, integer ``xs`` get ``float0``
    cotangents.

  Raises:
    ValueError: for a bad ``k1``, ``k2``, ``losses``, ``remat``,
      ``burn_in`` or ``unroll`` (at once), a missing, unneeded or bad
      ``key``, or ``xs`` leaves with different time lengths or bad
      ``resets`` (at trace time).
    TypeError: for a ``gradient`` that is not a :class:`jbptt.Recompute`
      (at once); (at trace time) if ``step_loss`` changes the carry or
      returns a non-scalar loss.

  Examples:
    >>> import jax, jax.numpy as jnp, jbptt
    >>> def step_loss(w, h, x):
    ...   h = jnp.tanh(w * h + x)
    ...   return h, (h - 1.0) ** 2
    >>> f = jbptt.truncated_loss(step_loss, k1=2, k2=3)
    >>> loss, h = f(0.5, 0.0, jnp.ones(7))
    >>> grad = jax.grad(lambda w: f(w, 0.0, jnp.ones(7))[0])(0.5)

  References:
    Williams & Peng, An Efficient Gradient-Based Algorithm for On-Line
    Training of Recurrent Network Trajectories, Neural Computation, 1990.
  """
  rule = truncation.check_k2(k2)
  k1, k2, losses = semantics.check_config(k1, truncation.reach(rule), losses)
  truncation.check_losses(rule, losses)
  remat = _check_strategy(gradient).remat
  unroll = _check_unroll(unroll)
  split = steps.split(step_loss)

  def loss_fn(params, carry, xs, *, resets=None, initial_carry=None,
              key=None):
    check_key(rule, key)
    n = checks.time_length(xs)
    carry = checks.as_arrays(carry)
    h0 = carry if initial_carry is None else checks.as_arrays(initial_carry)
    checks.check_step(step_loss, params, carry, checks.first_step(xs))
    if jax.tree_util.tree_structure(h0) != jax.tree_util.tree_structure(
        carry
    ) or jax.tree_util.tree_map(jnp.shape, h0) != jax.tree_util.tree_map(
        jnp.shape, carry
    ):
      raise ValueError(
          "initial_carry must have the carry's structure and shapes."
      )
    if resets is not None:
      resets = checks.check_resets(resets, n, carry)
    def run(k2, mult=None):
      path = _chunked if k1 >= k2 else _overlapping
      total, weight, final = path(split, params, carry, xs, resets, h0, n,
                                  k1, k2, losses, remat, unroll, mult)
      return jnp.asarray(total), jnp.asarray(weight), final

    if isinstance(rule, truncation.Adaptive):  # one branch per choice
      chosen = adaptive_k2(split, rule, params, carry, xs, resets, h0, n,
                           k1)[0]
      total, weight, final = lax.switch(
          truncation.choice_index(rule, chosen),
          [lambda c=c: run(c) for c in rule.choices])
    elif isinstance(rule, truncation.Randomized):
      total, weight, final = run(
          k2, lambda t, d: truncation.multipliers(rule, key, t, d))
    else:
      total, weight, final = run(k2)
    return weighted_mean(total, weight), lax.stop_gradient(final)

  return loss_fn


def check_key(rule, key):
  """A PRNG key for :class:`jbptt.Randomized`, none for the others."""
  randomized = isinstance(rule, truncation.Randomized)
  if randomized and key is None:
    raise ValueError(
        f"k2={rule!r} draws its truncation points from a PRNG key: pass "
        "key=jax.random.key(...) (or a jax.random.PRNGKey).")
  if not randomized and key is not None:
    raise ValueError(
        f"key= is only used by k2=jbptt.Randomized(...); k2={rule!r} draws "
        "nothing, so pass no key.")
  if randomized:
    dtype = getattr(key, "dtype", None)
    typed = dtype is not None and jax.dtypes.issubdtype(
        dtype, jax.dtypes.prng_key)
    raw = dtype == jnp.uint32 and jnp.shape(key) == (2,)
    if not (typed and jnp.shape(key) == ()) and not raw:
      raise ValueError(
          "key must be one PRNG key (jax.random.key(seed) or "
          f"jax.random.PRNGKey(seed)), got {key!r}.")


def adaptive_k2(split, rule, params, carry, xs, resets, h0, n, k1):
  """The :class:`jbptt.Adaptive` choice for a whole sequence: ``(k2, log
  beta)`` (int32, float32; NaN if it could not be fitted) from the per-lag
  norms of the losses at the ends of its updates, fitted within each."""
  big = rule.choices[-1]
  _, hs = segment.forward(split.cell, params, carry, xs, resets, h0)
  hs = _concat_first(carry, hs)  # hs[s] = h_s, s = 0..n
  pad = lambda a: jnp.concatenate([jnp.repeat(a[:1], big, axis=0), a])
  xp = tree_map(pad, xs)
  rp = None if resets is None else jnp.concatenate(
      [jnp.zeros((big,) + resets.shape[1:], bool), resets])
  ends = jnp.asarray(semantics.update_ends(n, k1))
  rows = jnp.arange(big)

  def norms_at(t):
    window = lambda tree: tree_map(
        lambda a: lax.dynamic_slice_in_dim(a, t, big), tree)
    start = tree_map(lambda a: a[jnp.maximum(t - big, 0)], hs)
    valid = t - big + 1 + rows >= 1
    norms = truncation.window_norms(
        split.cell, params, start, window(xp),
        None if rp is None else window(rp), valid, h0, split.head)
    return norms, t - (big - rows) >= 0  # row i is the lag big - i

  norms, ok = lax.map(norms_at, ends)
  log_beta = truncation.decay_rate(norms, big - rows, ok)
  return truncation.choose(rule, log_beta), log_beta


def _concat_first(first, rest):
  return tree_map(lambda a, b: jnp.concatenate([a[None], b]), first, rest)


def _check_strategy(strategy):
  if isinstance(strategy, strategies.StoredStates):
    raise TypeError(
        "truncated_loss takes gradient=jbptt.Recompute(...) only: with fixed "
        "params the stored states are the recomputed ones (StoredStates is "
        f"for jbptt.trainer), got gradient={strategy!r}."
    )
  return strategies.check_gradient(strategy, (strategies.Recompute,))


_check_unroll = strategies.check_unroll

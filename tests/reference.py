"""Plain-loop references of TBPTT(k1, k2), written from the contract.

Deliberately slow and obvious: one ``jax.grad`` per injected loss, each
re-running the steps from the stored state it is truncated at. A step's loss
is a scalar or a ``(total, weight)`` pair (``jbptt.WeightedLoss`` is one): an
update's objective is sum(total) / sum(weight), its gradient the sum of the
totals' truncated gradients over sum(weight); an update of weight 0 makes no
optimizer step. Nothing here uses jbptt.
"""

import functools

import jax
import jax.numpy as jnp
import optax

tree_map = jax.tree_util.tree_map


def injected(t, t_prev, k2, policy):
  """(tau, s) pairs of the update ending at t, straight from the issue."""
  if policy == "new":
    return [(tau, max(0, min(t - k2, tau - 1))) for tau in range(t_prev + 1, t + 1)]
  s = max(0, t - k2)
  if policy == "window":
    return [(tau, s) for tau in range(s + 1, t + 1)]
  assert policy == "last"
  return [(t, s)]


def _reset(reset, h0, h):
  if reset is None:
    return h
  def pick(a, b):
    m = jnp.reshape(reset, jnp.shape(reset) + (1,) * (a.ndim - jnp.ndim(reset)))
    return jnp.where(m, a, b)
  return tree_map(pick, h0, h)


def _x(xs, i):
  return tree_map(lambda a: a[i], xs)


def _loss_from(step_loss, params, h_s, xs, resets, h0, s, tau):
  """loss_tau re-run from the constant state after step s."""
  piece = tree_map(lambda a: a[s:tau], xs)
  rs = None if resets is None else jnp.asarray(resets[s:tau])
  return _loss_of_piece(step_loss, params, h_s, piece, rs, h0)


def _pair(loss):
  """A step's loss as (total, weight)."""
  if isinstance(loss, tuple):
    total, weight = loss
    return total, jnp.asarray(weight, jnp.result_type(total))
  return loss, jnp.ones((), jnp.result_type(loss))


def _loss_of_piece(step_loss, params, h_s, piece, resets, h0):
  """((total, weight), d total / d params) of the piece's last step."""
  (total, weight), grad = _piece_grad(step_loss, params, h_s, piece, resets,
                                      h0)
  return (total, weight), grad


@functools.partial(jax.jit, static_argnums=0)
@functools.partial(jax.value_and_grad, argnums=1, has_aux=True)
def _piece_grad(step_loss, params, h_s, piece, resets, h0):
  """The total of the piece's last step (the weight as aux), from h_s held
  constant.

  A plain Python loop over the piece; jit only caches it per length.
  """
  h = jax.lax.stop_gradient(h_s)
  length = jax.tree_util.tree_leaves(piece)[0].shape[0]
  loss = None
  for j in range(length):
    r = None if resets is None else resets[j]
    h = _reset(r, jax.lax.stop_gradient(h0), h)
    h, loss = step_loss(params, h, _x(piece, j))
  total, weight = _pair(loss)
  return total, jax.lax.stop_gradient(weight)


@functools.lru_cache(maxsize=None)
def _jitted(step_loss):
  """One step with the reset applied; jit only caches it."""
  return jax.jit(lambda p, h, x, r, h0: step_loss(p, _reset(r, h0, h), x))


def forward_states(step_loss, params, carry, xs, resets=None, h0=None):
  h0 = carry if h0 is None else h0
  n = jax.tree_util.tree_leaves(xs)[0].shape[0]
  hs = [carry]
  for j in range(1, n + 1):
    r = None if resets is None else resets[j - 1]
    h, _ = _jitted(step_loss)(params, hs[-1], _x(xs, j - 1), r, h0)
    hs.append(h)
  return hs


def truncated_loss(step_loss, params, carry, xs, k1, k2, policy="new",
                   resets=None, h0=None):
  """(mean injected loss, gradient / count, final carry) of a sequence."""
  h0 = carry if h0 is None else h0
  n = jax.tree_util.tree_leaves(xs)[0].shape[0]
  hs = forward_states(step_loss, params, carry, xs, resets, h0)
  ends = list(range(k1, n + 1, k1))
  if n % k1:
    ends.append(n)
  total, grad, weight, t_prev = 0.0, None, 0.0, 0
  for t in ends:
    for tau, s in injected(t, t_prev, k2, policy):
      (v, w), g = _loss_from(step_loss, params, hs[s], xs, resets, h0, s, tau)
      total, weight = total + v, weight + w
      grad = g if grad is None else tree_map(jnp.add, grad, g)
    t_prev = t
  if weight == 0:
    return 0.0, tree_map(jnp.zeros_like, grad), hs[n]
  return total / weight, tree_map(lambda g: g / weight, grad), hs[n]


def _step(optimizer, params, opt_state, grad_sum, weight):
  """One optax update with the injected totals' gradients over ``weight``;
  none at all when ``weight`` is 0."""
  if weight == 0:
    return params, opt_state
  grad = tree_map(lambda g: g / weight, grad_sum)
  updates, opt_state = optimizer.update(grad, opt_state, params)
  return optax.apply_updates(params, updates), opt_state


def _online(step_loss, optimizer, params, carry, xs, k1, resets, update):
  """The stream loop of the online references: the carry advances with the
  params current at each step; at every k1-th step t, ``update(params, hs,
  t) -> (total, grad_sum, weight)`` (``hs[i]`` the stream state after step
  i) and one optax step. Returns (params, losses per update, carry)."""
  h0 = carry
  opt_state = optimizer.init(params)
  n = jax.tree_util.tree_leaves(xs)[0].shape[0]
  hs = [carry]
  losses = []
  for t in range(1, n + 1):
    r = None if resets is None else resets[t - 1]
    h, _ = _jitted(step_loss)(params, hs[-1], _x(xs, t - 1), r, h0)
    hs.append(h)
    if t % k1 == 0:
      total, grad, weight = update(params, hs, t)
      params, opt_state = _step(optimizer, params, opt_state, grad, weight)
      losses.append(total / weight if weight else 0.0)
  return params, losses, hs[n]


def _summed(pieces):
  """(total, grad_sum, weight) of ``((total, weight), grad)`` pieces."""
  total, grad, weight = 0.0, None, 0.0
  for (v, w), g in pieces:
    total, weight = total + v, weight + w
    grad = g if grad is None else tree_map(jnp.add, grad, g)
  return total, grad, weight


def train(step_loss, optimizer, params, carry, xs, k1, k2, policy="new",
          resets=None, *, mult=None, burn_in=0, k2_of_update=None):
  """Online TBPTT on a stream: returns (params, losses per update, carry).

  Optional (jbptt.Recompute with a k2 rule or burn-in): ``mult(t, d)``, the
  multiplier of the carry cotangent entering h_(t-d) in the update ending at
  t (k2 is then the rule's reach K); ``burn_in``, stream steps re-run with
  the current params before each window; ``k2_of_update``, the int k2 of
  each update (jbptt.Adaptive: the injected set uses it, the window still
  starts at t - max(k1, k2)). See ``_train_rules``.
  """
  if mult is not None or burn_in or k2_of_update is not None:
    return _train_rules(step_loss, optimizer, params, carry, xs, k1, k2,
                        policy, resets, mult, burn_in, k2_of_update)
  def update(params, hs, t):
    return _summed(
        _loss_from(step_loss, params, hs[s], xs, resets, carry, s, tau)
        for tau, s in injected(t, t - k1, k2, policy))

  return _online(step_loss, optimizer, params, carry, xs, k1, resets, update)


def truncated_grad_xs(step_loss, params, carry, xs, k1, k2, policy="new"):
  """The gradient of truncated_loss's loss with respect to (float) xs."""
  n = jax.tree_util.tree_leaves(xs)[0].shape[0]
  hs = forward_states(step_loss, params, carry, xs)
  ends = list(range(k1, n + 1, k1))
  if n % k1:
    ends.append(n)
  grad, count, t_prev = tree_map(jnp.zeros_like, xs), 0, 0
  for t in ends:
    for tau, s in injected(t, t_prev, k2, policy):
      def loss_tau(piece, s=s):
        h = jax.lax.stop_gradient(hs[s])
        for j in range(tau - s):
          h, loss = step_loss(params, h, _x(piece, j))
        return loss
      g = jax.grad(loss_tau)(tree_map(lambda a, s=s, tau=tau: a[s:tau], xs))
      grad = tree_map(lambda a, b, s=s, tau=tau: a.at[s:tau].add(b), grad, g)
      count += 1
    t_prev = t
  return tree_map(lambda g: g / count, grad)


@functools.partial(jax.jit, static_argnums=0)
def _step_vjp(step_loss, params, h_prev, x, reset, h0, ct_h, ct_loss):
  """One step's VJP at (params, h_prev): ((total, weight), d params,
  d h_prev)."""
  def f(p, h):
    h, loss = step_loss(p, _reset(reset, jax.lax.stop_gradient(h0), h), x)
    total, weight = _pair(loss)
    return (h, total), weight
  (_, total), pull, weight = jax.vjp(f, params, h_prev, has_aux=True)
  d_p, d_h = pull((ct_h, jnp.asarray(ct_loss, total.dtype)))
  return (total, weight), d_p, d_h


def train_stored(step_loss, optimizer, params, carry, xs, k1, k2, policy="new",
                 resets=None, *, mult=None):
  """Online TBPTT with history="stored" (Williams & Peng's BPTT(h; h0)).

  The stream's states h_t are stored as they are computed (each with the
  params current at its step). The update at t backpropagates every injected
  loss_tau to the stored state h_s through the stored states: step j's
  Jacobians are taken at (current params, stored h_(j-1), x_j); nothing is
  re-run. Returns (params, losses per update, carry) like ``train``.
  ``mult(t, d)`` (optional, k2 the rule's reach): the multiplier of the
  carry cotangent entering h_(t-d) in the update ending at t.
  """
  if mult is not None:
    return _train_stored_scaled(step_loss, optimizer, params, carry, xs, k1,
                                k2, policy, resets, mult)
  h0 = carry
  zero_h = tree_map(jnp.zeros_like, carry)

  def update(params, hs, t):
    total, grad, weight = 0.0, None, 0.0
    for tau, s in injected(t, t - k1, k2, policy):
      lam = zero_h
      for j in range(tau, s, -1):  # steps tau, tau-1, ..., s+1
        r = None if resets is None else resets[j - 1]
        ct_loss = 1.0 if j == tau else 0.0
        (v, w), d_p, lam = _step_vjp(step_loss, params, hs[j - 1],
                                     _x(xs, j - 1), r, h0, lam, ct_loss)
        if j == tau:
          total, weight = total + v, weight + w
        grad = d_p if grad is None else tree_map(jnp.add, grad, d_p)
    return total, grad, weight

  return _online(step_loss, optimizer, params, carry, xs, k1, resets, update)


# Truncation rules (k2 as a rule): multipliers on the carry's cotangent ------
#
# The update ending at t is TBPTT(k1, K) (K the rule's reach) except that the
# cotangent passing back from step j + 1 into h_j (distance d = t - j,
# 1 <= d < K) is multiplied by mult(t, d); a loss's own step is never scaled,
# and mult(t, d) = 0 is a truncation point.


@jax.jit
def _artbp_uniform(key, t, d):
  return jax.random.uniform(jax.random.fold_in(jax.random.fold_in(key, t), d),
                            dtype=jnp.float32)


def artbp_multiplier(key, mean, max_, t, d):
  """m_t(d) of Randomized(mean, max_) (ARTBP), a Python float, from the
  formula: c = 1 / mean; u = uniform(fold_in(fold_in(key, t), d)) in
  float32 with t, d int32 scalars; 0 if u < c, else 1 / (1 - c); and 0 for
  d >= max_."""
  if d >= max_:
    return 0.0
  c = 1.0 / mean
  u = float(_artbp_uniform(key, jnp.int32(t), jnp.int32(d)))
  return 0.0 if u < c else 1.0 / (1.0 - c)


def artbp_mult(key, mean, max_):
  """``mult(t, d)`` of Randomized(mean, max_) with ``key``, memoised."""
  memo = {}

  def mult(t, d):
    if (t, d) not in memo:
      memo[(t, d)] = artbp_multiplier(key, mean, max_, t, d)
    return memo[(t, d)]

  return mult


def artbp_realized(mult, t, max_):
  """The distance of the first truncation point of the update ending at t
  (at most max_)."""
  for d in range(1, max_):
    if mult(t, d) == 0:
      return d
  return max_


def _scaled_walk(step_loss, params, states, base, xs, resets, h0, tau, s,
                 scale):
  """((total, weight), d total / d params) of loss_tau backpropagated to h_s
  (held constant) by explicit per-step VJPs at ``states`` (``states[i]`` is
  the state after step ``base + i``). ``scale(j)`` (or None) multiplies the
  carry cotangent passing from step j + 1 into h_j, for j > s."""
  lam = tree_map(jnp.zeros_like, states[0])
  grad, value = None, None
  for j in range(tau, s, -1):  # steps tau, tau-1, ..., s+1
    r = None if resets is None else resets[j - 1]
    ct_loss = 1.0 if j == tau else 0.0
    (v, w), d_p, lam = _step_vjp(step_loss, params, states[j - 1 - base],
                                 _x(xs, j - 1), r, h0, lam, ct_loss)
    if j == tau:
      value = (v, w)
    grad = d_p if grad is None else tree_map(jnp.add, grad, d_p)
    if j - 1 > s and scale is not None:
      m = scale(j - 1)
      if m == 0:  # a truncation point: nothing more passes back
        break
      lam = tree_map(lambda a, m=m: a * m, lam)
  return value, grad


def truncated_loss_scaled(step_loss, params, carry, xs, k1, K, mult,
                          policy="new", resets=None):
  """truncated_loss of TBPTT(k1, K) with the carry cotangent of the update
  ending at t multiplied by ``mult(t, d)`` where it enters h_(t-d).

  Returns (loss, grad, final carry) like ``truncated_loss``.
  """
  h0 = carry
  n = jax.tree_util.tree_leaves(xs)[0].shape[0]
  hs = forward_states(step_loss, params, carry, xs, resets, h0)
  ends = list(range(k1, n + 1, k1))
  if n % k1:
    ends.append(n)
  total, grad, weight, t_prev = 0.0, None, 0.0, 0
  for t in ends:
    scale = lambda j, t=t: mult(t, t - j)
    for tau, s in injected(t, t_prev, K, policy):
      (v, w), g = _scaled_walk(step_loss, params, hs, 0, xs, resets, h0, tau,
                               s, scale)
      total, weight = total + v, weight + w
      grad = g if grad is None else tree_map(jnp.add, grad, g)
    t_prev = t
  if weight == 0:
    return 0.0, tree_map(jnp.zeros_like, grad), hs[n]
  return total / weight, tree_map(lambda g: g / weight, grad), hs[n]


def _rerun(step_loss, params, h, xs, resets, h0, a, b):
  """[h_a, ..., h_b]: steps a+1..b re-run from h (the state after step a)
  with ``params``."""
  out = [h]
  for j in range(a + 1, b + 1):
    r = None if resets is None else resets[j - 1]
    h, _ = _jitted(step_loss)(params, h, _x(xs, j - 1), r, h0)
    out.append(h)
  return out


def _train_rules(step_loss, optimizer, params, carry, xs, k1, k2, policy,
                 resets, mult, burn_in, k2_of_update):
  """``train`` with multipliers, burn-in or a per-update k2 (the Recompute
  contract, written out).

  The update at t re-runs its window of L = max(k1, k2) steps (k2: the reach
  K) with the current params from its start state: the stored stream state
  h_(t-L), or with burn_in = b the state obtained by re-running the stream
  steps t-L-b+1..t-L (those >= 1) from the stored h_(max(0, t-L-b)) with the
  current params (no gradient, no loss). Each injected loss (k2_u of
  ``k2_of_update`` if given, else k2) is backpropagated through the re-run
  states with the multipliers ``mult(t, d)``.
  """
  h0 = carry
  L = max(k1, k2)

  def update(params, hs, t):
    k2u = k2 if k2_of_update is None else int(k2_of_update[t // k1 - 1])
    a = max(0, t - L)
    start = hs[a]
    if burn_in and a > 0:
      c = max(0, a - burn_in)
      start = _rerun(step_loss, params, hs[c], xs, resets, h0, c, a)[-1]
    states = _rerun(step_loss, params, start, xs, resets, h0, a, t)
    scale = None if mult is None else (lambda j: mult(t, t - j))
    return _summed(
        _scaled_walk(step_loss, params, states, a, xs, resets, h0, tau, s,
                     scale)
        for tau, s in injected(t, t - k1, k2u, policy))

  return _online(step_loss, optimizer, params, carry, xs, k1, resets, update)


def _train_stored_scaled(step_loss, optimizer, params, carry, xs, k1, k2,
                         policy, resets, mult):
  """``train_stored`` with the multipliers ``mult(t, d)``."""
  def update(params, hs, t):
    return _summed(
        _scaled_walk(step_loss, params, hs, 0, xs, resets, carry, tau, s,
                     lambda j: mult(t, t - j))
        for tau, s in injected(t, t - k1, k2, policy))

  return _online(step_loss, optimizer, params, carry, xs, k1, resets, update)

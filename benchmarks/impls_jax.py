"""The JAX implementations: jbptt and what a JAX user would write by hand.

Every implementation trains the same model (a Flax ``OptimizedLSTMCell`` and
a linear read-out, squared error) with Adam on the same data, and exposes
``run(xs, ys)``: train on one stretch of ``n`` steps, blocking until done.
The language-model case (``LM_IMPLS``, at the end) trains an embedding, an
LSTM and a read-out over the vocabulary on a token stream instead.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

import jbptt
from jbptt import flax as jf

LR = 1e-3


class Model(nn.Module):
  hidden: int
  out: int

  @nn.compact
  def __call__(self, carry, x):
    carry, h = nn.OptimizedLSTMCell(self.hidden, name="cell")(carry, x)
    return carry, nn.Dense(self.out, name="readout")(h)


def setup(case, seed=0):
  """``(cell, params, carry, step_loss)`` for a case."""
  model = Model(case.hidden, 1)
  key = jax.random.key(seed)
  carry = nn.OptimizedLSTMCell(case.hidden).initialize_carry(
      key, (case.batch, case.dim))
  params = model.init(key, carry, jnp.zeros((case.batch, case.dim), jnp.float32))
  cell = jf.linen_cell(model)
  step_loss = jbptt.cell_loss(cell, lambda p, o, y: jnp.mean((o - y) ** 2))
  return cell, params, carry, step_loss


def stream_spec(case):
  """``jax.ShapeDtypeStruct``s of a chunk of the case's stream (for
  ``Trainer.init``; its time length does not matter)."""
  return (jax.ShapeDtypeStruct((1, case.batch, case.dim), jnp.float32),
          jax.ShapeDtypeStruct((1, case.batch, 1), jnp.float32))


def _block(tree):
  return jax.block_until_ready(tree)


class Trainer:
  """``jbptt.trainer``: the stream flows across calls."""

  name = "jbptt.trainer"
  options = {}  # the variants below pass their keyword options here

  def __init__(self, case):
    _, params, carry, step_loss = setup(case)
    self.tr = jbptt.trainer(step_loss, optax.adam(LR), k1=case.k1, k2=case.k2,
                            **self.options)
    self.state = self.tr.init(params, carry, stream_spec(case))

  def run(self, xs, ys):
    self.state, metrics = self.tr.update(self.state, (xs, ys))
    _block(metrics.loss)


class TrainerStored(Trainer):
  """``jbptt.trainer(..., gradient=jbptt.StoredStates())`` (k1 < k2; the
  same as the default for k1 >= k2)."""

  name = "jbptt.trainer (stored)"
  options = {"gradient": jbptt.StoredStates()}

  def __init__(self, case):
    if case.k1 >= case.k2:
      raise NotImplementedError("the same as jbptt.trainer for k1 >= k2")
    super().__init__(case)


class TrainerRemat(Trainer):
  """``jbptt.trainer(..., gradient=jbptt.Recompute(remat=nothing_saveable))``
  (``jax.checkpoint_policies.nothing_saveable``; run by the remat case only)."""

  name = "jbptt.trainer (remat)"
  options = {"gradient": jbptt.Recompute(
      remat=jax.checkpoint_policies.nothing_saveable)}


def unrolled(impl: type, unroll: int) -> type:
  """``impl`` with ``unroll=unroll`` added to its keyword ``options``:
  ``unroll`` steps per iteration of every per-step loop."""
  if impl.name.endswith(")"):  # e.g. "jbptt.trainer (stored)"
    name = f"{impl.name[:-1]}, unroll={unroll})"
  else:
    name = f"{impl.name} (unroll={unroll})"
  return type(f"{impl.__name__}Unrolled{unroll}", (impl,), {
      "__doc__": f"{impl.__doc__}\n\nWith unroll={unroll}.",
      "name": name,
      "options": {**impl.options, "unroll": unroll},
  })


TrainerUnrolled = unrolled(Trainer, 4)


class TrainerFedInChunks(Trainer):
  """``jbptt.trainer`` fed ``k1`` steps per ``update`` call, as a live
  stream arrives (run by the stream case, see ``run.impls_for``)."""

  name = "jbptt.trainer, k1 steps per call"

  def __init__(self, case):
    super().__init__(case)
    self.k1 = case.k1

  def run(self, xs, ys):
    key = id(xs)
    if getattr(self, "key", None) != key:  # the pieces, as they would arrive
      self.key = key
      self.pieces = [(xs[i:i + self.k1], ys[i:i + self.k1])
                     for i in range(0, xs.shape[0], self.k1)]
    for piece in self.pieces:
      self.state, metrics = self.tr.update(self.state, piece)
    _block(metrics.loss)


class TrainerFedInChunksPacked(TrainerFedInChunks):
  """As ``TrainerFedInChunks``, the state packed by ``jbptt.pack_state`` (one
  buffer per dtype, so each call dispatches a few arrays)."""

  name = "jbptt.trainer, k1 steps per call, packed"

  def __init__(self, case):
    super().__init__(case)
    self.state = jbptt.pack_state(self.state)


class _OneStepPerSequence:
  """One gradient of ``loss_fn(params, carry, (xs, ys)) -> (loss, carry)``
  over the whole sequence, then one Adam step."""

  options = {}  # keyword options for ``loss_fn`` (see ``unrolled``)

  def __init__(self, case):
    _, self.params, self.carry, step_loss = setup(case)
    loss_fn = self.loss_fn(step_loss, case, **self.options)
    opt = optax.adam(LR)
    self.opt_state = opt.init(self.params)

    @jax.jit
    def step(params, opt_state, carry, xs, ys):
      (loss, carry), grads = jax.value_and_grad(loss_fn, has_aux=True)(
          params, carry, (xs, ys))
      updates, opt_state = opt.update(grads, opt_state, params)
      return optax.apply_updates(params, updates), opt_state, carry, loss

    self.step = step

  def run(self, xs, ys):
    self.params, self.opt_state, self.carry, loss = self.step(
        self.params, self.opt_state, self.carry, xs, ys)
    _block(loss)


class TruncatedLoss(_OneStepPerSequence):
  """``jbptt.truncated_loss`` on the sequence, then one Adam step."""

  name = "jbptt.truncated_loss"

  @staticmethod
  def loss_fn(step_loss, case, **options):
    return jbptt.truncated_loss(step_loss, k1=case.k1, k2=case.k2, **options)


class FullBPTT(_OneStepPerSequence):
  """Full BPTT: one gradient of the whole sequence, one Adam step."""

  name = "full BPTT"

  @staticmethod
  def loss_fn(step_loss, case):
    def loss_fn(params, carry, xs):
      carry, losses = jax.lax.scan(
          lambda h, x: step_loss(params, h, x), carry, xs)
      return jnp.mean(losses), carry

    return loss_fn


class ScanReference:
  """Hand-written: one jitted scan over chunks, stop_gradient at boundaries,
  an Adam step per chunk (k1 = k2 only): the zero-overhead reference."""

  name = "hand-written scan"
  options = {}  # "unroll": steps per iteration of the scan (see ``unrolled``)

  def __init__(self, case):
    if case.k1 != case.k2:
      raise NotImplementedError("chunk boundaries need k1 = k2")
    _, self.params, self.carry, step_loss = setup(case)
    opt = optax.adam(LR)
    self.opt_state = opt.init(self.params)
    k = case.k1

    def chunk_loss(params, h, xc, yc):
      h, losses = jax.lax.scan(lambda h, x: step_loss(params, h, x),
                               jax.lax.stop_gradient(h), (xc, yc),
                               unroll=self.options.get("unroll", 1))
      return jnp.mean(losses), h

    @jax.jit
    def run(params, opt_state, carry, xs, ys):
      fold = lambda a: a.reshape((-1, k) + a.shape[1:])

      def body(c, inp):
        params, opt_state, h = c
        (loss, h), g = jax.value_and_grad(chunk_loss, has_aux=True)(
            params, h, *inp)
        updates, opt_state = opt.update(g, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state, h), loss

      (params, opt_state, carry), losses = jax.lax.scan(
          body, (params, opt_state, carry), (fold(xs), fold(ys)))
      return params, opt_state, carry, losses

    self.step = run

  def run(self, xs, ys):
    self.params, self.opt_state, self.carry, loss = self.step(
        self.params, self.opt_state, self.carry, xs, ys)
    _block(loss)


# The reference for jbptt.trainer(..., unroll=4) (run by the unroll case).
ScanReferenceUnrolled = unrolled(ScanReference, 4)


class FlaxLoop:
  """What a JAX user writes today: a Python loop over updates, one jitted
  call per update (the window re-run from the stored stream state)."""

  name = "Flax + Python loop"

  def __init__(self, case):
    if case.k1 > case.k2:
      raise NotImplementedError("written for k1 <= k2")
    _, self.params, self.carry, step_loss = setup(case)
    opt = optax.adam(LR)
    self.opt_state = opt.init(self.params)
    self.k1, self.k2 = case.k1, case.k2

    def window_loss(params, h, xw, yw):
      h, losses = jax.lax.scan(lambda h, x: step_loss(params, h, x),
                               jax.lax.stop_gradient(h), (xw, yw))
      return jnp.mean(losses[-case.k1:]), h

    @jax.jit
    def update(params, opt_state, h, xw, yw):
      (loss, h), g = jax.value_and_grad(window_loss, has_aux=True)(
          params, h, xw, yw)
      updates, opt_state = opt.update(g, opt_state, params)
      return optax.apply_updates(params, updates), opt_state, h, loss

    @jax.jit
    def advance(params, h, xc, yc):
      return jax.lax.scan(lambda h, x: step_loss(params, h, x), h, (xc, yc))[0]

    self.update, self.advance = update, advance

  def run(self, xs, ys):
    k1, k2 = self.k1, self.k2
    n = xs.shape[0]
    if k1 >= k2:  # the window is the chunk
      for t in range(k1, n + 1, k1):
        self.params, self.opt_state, self.carry, loss = self.update(
            self.params, self.opt_state, self.carry, xs[t - k1:t], ys[t - k1:t])
    else:  # keep the stream states; windows reach back k2 steps
      states = {0: self.carry}
      for t in range(k1, n + 1, k1):
        states[t] = self.advance(self.params, states[t - k1], xs[t - k1:t],
                                 ys[t - k1:t])
        s = max(0, t - k2)
        if s not in states:
          base = (s // k1) * k1
          states[s] = self.advance(self.params, states[base], xs[base:s],
                                   ys[base:s])
        self.params, self.opt_state, _, loss = self.update(
            self.params, self.opt_state, states[s], xs[s:t], ys[s:t])
        for old in [key for key in states if key < t - k2 - k1]:
          del states[old]
      self.carry = states[max(states)]
    _block(loss)


IMPLS = [Trainer, TrainerUnrolled, TrainerStored, TruncatedLoss, ScanReference,
         FlaxLoop, FullBPTT]
# The unroll case: the trainer at each unroll (1, its default, included), the
# scan at 1 and 4, stored states and truncated_loss at 1 and 8; every one
# passes its unroll explicitly.
UNROLL_IMPLS = (
    [unrolled(Trainer, u) for u in (1, 2, 4, 8, 16)]
    + [ScanReference, ScanReferenceUnrolled]
    + [unrolled(impl, u) for impl in (TrainerStored, TruncatedLoss)
       for u in (1, 8)]
)


# -- the language-model case ------------------------------------------------------


class LMCell(nn.Module):
  """One step of a word-level language model: embed the tokens, step an LSTM."""

  vocab: int
  dim: int
  hidden: int

  @nn.compact
  def __call__(self, carry, tokens):
    x = nn.Embed(self.vocab, self.dim, name="embed")(tokens)
    return nn.OptimizedLSTMCell(self.hidden, name="lstm")(carry, x)


def lm_setup(case, seed=0):
  """``(cell, loss_fn, params, carry)`` of the language model of a case.

  ``cell(params, carry, tokens) -> (carry, h)`` is the embedding and the
  LSTM; ``loss_fn(params, h, targets)`` the read-out over the vocabulary
  (``nn.Dense``) and the softmax cross-entropy, averaged over the batch.
  ``params`` is ``{"cell": ..., "head": ...}``.
  """
  cell_module = LMCell(case.vocab, case.dim, case.hidden)
  head = nn.Dense(case.vocab, name="decoder")
  key_cell, key_head, key_carry = jax.random.split(jax.random.key(seed), 3)
  carry = nn.OptimizedLSTMCell(case.hidden).initialize_carry(
      key_carry, (case.batch, case.dim))
  params = {
      "cell": cell_module.init(key_cell, carry,
                               jnp.zeros((case.batch,), jnp.int32)),
      "head": head.init(key_head, jnp.zeros((case.batch, case.hidden))),
  }

  def cell(p, carry, tokens):
    return cell_module.apply(p["cell"], carry, tokens)

  def loss_fn(p, h, targets):
    logits = head.apply(p["head"], h)
    return optax.softmax_cross_entropy_with_integer_labels(
        logits, targets).mean()

  return cell, loss_fn, params, carry


def head_in_step(cell, loss_fn):
  """A plain ``step_loss``: the cell, the read-out and the loss in each step
  (what ``jbptt.cell_loss`` computes, without telling the trainer so)."""

  def step_loss(params, carry, x):
    tokens, targets = x
    carry, h = cell(params, carry, tokens)
    return carry, loss_fn(params, h, targets)

  return step_loss


class LMTrainer(Trainer):
  """``jbptt.trainer`` on the language model, the read-out and loss inside
  every step of the scan (a plain ``step_loss``)."""

  name = "jbptt.trainer (head in step)"
  make_step = staticmethod(head_in_step)

  def __init__(self, case):
    if not case.vocab:
      raise NotImplementedError("the language-model case only")
    cell, loss_fn, params, carry = lm_setup(case)
    self.tr = jbptt.trainer(self.make_step(cell, loss_fn), optax.adam(LR),
                            k1=case.k1, k2=case.k2, **self.options)
    tokens = jax.ShapeDtypeStruct((1, case.batch), jnp.int32)
    self.state = self.tr.init(params, carry, (tokens, tokens))


class LMTrainerCellLoss(LMTrainer):
  """``jbptt.trainer`` on ``jbptt.cell_loss(cell, loss_fn)``: the scan runs
  the embedding and LSTM only; the read-out and loss are evaluated once per
  window, over all of its steps."""

  name = "jbptt.trainer (cell_loss)"
  make_step = staticmethod(jbptt.cell_loss)


LM_IMPLS = [LMTrainer, LMTrainerCellLoss]

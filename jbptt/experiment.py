"""Training runs on the built-in tasks: the engine of ``jbptt compare`` / ``train``.

A small Flax recurrent model (a cell and a linear read-out) is trained online
with :func:`jbptt.trainer` on ``batch`` parallel streams of a
:class:`jbptt.tasks.Task`, then evaluated on held-out streams. Nothing here
truncates anything itself: TBPTT is the trainer's.
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import jbptt
from jbptt import flax as jf
from jbptt.tasks import Task

CELLS = {
    "lstm": nn.OptimizedLSTMCell,
    "gru": nn.GRUCell,
    "mgu": nn.MGUCell,
    "simple": nn.SimpleCell,
}


class StreamModel(nn.Module):
  """A recurrent cell with a linear read-out: ``(carry, x) -> (carry, out)``."""

  cell_type: str
  hidden: int
  in_dim: int
  out_dim: int
  symbols: bool

  @nn.compact
  def __call__(self, carry, x):
    u = jax.nn.one_hot(x, self.in_dim) if self.symbols else x
    carry, h = CELLS[self.cell_type](self.hidden, name="cell")(carry, u)
    return carry, nn.Dense(self.out_dim, name="readout")(h)


@dataclasses.dataclass(frozen=True)
class Config:
  """One TBPTT configuration of a run.

  ``seq_len`` cuts the stream into independent sequences of that length
  (the carry is reset at each start); ``None`` lets the carry flow.
  """

  label: str
  k1: int
  k2: int
  policy: str = "new"
  seq_len: int | None = None


@dataclasses.dataclass
class Result:
  """What a run measured."""

  config: str
  k1: int
  k2: int
  updates: int
  wall_s: float
  steps_per_s: float
  final_loss: float
  final_accuracy: float | None
  curve_step: list[int]
  curve_loss: list[float]
  state: Any = dataclasses.field(repr=False, default=None)

  def summary(self) -> dict:
    """The JSON row of ``results.json``."""
    return {
        "config": self.config, "k1": self.k1, "k2": self.k2,
        "updates": self.updates, "wall_s": round(self.wall_s, 3),
        "steps_per_s": round(self.steps_per_s, 1),
        "final_loss": self.final_loss, "final_accuracy": self.final_accuracy,
    }


def canonical_configs(task: Task) -> tuple[int, list[Config]]:
  """The five canonical configurations, sized to the task's context.

  Returns ``(n, configs)``: ``n`` is the sequence length of TBPTT(n, n) and
  TBPTT(1, n); ``k2`` of the others covers twice the context.
  """
  span = max(16, 2 * task.context)
  n = span
  return n, [
      Config("(n, n) BPTT", n, n, seq_len=n),
      Config("(1, n)", 1, n, seq_len=n),
      Config("(k1, 1)", 8, 1),
      Config("(k1, k2) k1 < k2", 4, span),
      Config("(k1, k2) k1 = k2", span, span),
  ]


def _loss_fn(task: Task):
  if task.kind == "classification":
    return lambda out, y: optax.softmax_cross_entropy_with_integer_labels(
        out, y).mean()
  return lambda out, y: jnp.mean((out - y) ** 2)


def build(task: Task, cell: str, hidden: int, batch: int, seed: int):
  """``(model, params, carry)`` for ``batch`` streams."""
  model = StreamModel(cell, hidden, task.in_dim, task.out_dim, task.symbols)
  key_params, key_carry = jax.random.split(jax.random.key(seed))
  carry = CELLS[cell](hidden).initialize_carry(key_carry, (batch, task.in_dim))
  x = jnp.zeros((batch,), jnp.int32) if task.symbols else jnp.zeros(
      (batch, task.in_dim))
  return model, model.init(key_params, carry, x), carry


def _resets(start: int, length: int, seq_len: int | None, batch: int):
  if seq_len is None:
    return None
  t = start + np.arange(length)
  return np.broadcast_to(((t % seq_len == 0) & (t > 0))[:, None], (length, batch))


def _chunk_len(steps: int, config: Config, pieces: int = 25) -> int:
  unit = math.lcm(config.k1, config.seq_len or 1)
  return unit * max(1, round(steps / pieces / unit))


def evaluate(task: Task, model, params, config: Config, batch: int, seed: int,
             steps: int = 2000):
  """Held-out loss and accuracy, in the run's own regime (cut or stream).

  Targets within ``task.context`` steps of a (re)start are not scored.
  """
  inputs, targets = task.sample(seed, steps, batch)
  if config.seq_len is not None:  # independent sequences become the batch
    n = config.seq_len
    usable = (steps // n) * n
    fold = lambda a: np.swapaxes(
        a[:usable].reshape((usable // n, n) + a.shape[1:]), 0, 1).reshape(
            (n, -1) + a.shape[2:])
    inputs, targets = fold(inputs), fold(targets)
  carry = CELLS[model.cell_type](model.hidden).initialize_carry(
      jax.random.key(0), (inputs.shape[1], task.in_dim))
  _, out = jbptt.unroll(jf.linen_cell(model), params, carry, jnp.asarray(inputs))
  out, y = out[task.context:], jnp.asarray(targets)[task.context:]
  loss = float(_loss_fn(task)(out, y))
  accuracy = None
  if task.kind == "classification":
    accuracy = float(jnp.mean(jnp.argmax(out, -1) == y))
  return loss, accuracy


def _trainer(task: Task, model, config: Config, lr: float, unroll=None):
  step_loss = jbptt.cell_loss(jf.linen_cell(model), _loss_fn(task))
  optimizer = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(lr))
  return jbptt.trainer(step_loss, optimizer, k1=config.k1, k2=config.k2,
                       policy=config.policy, unroll=unroll)


def template(task: Task, config: Config, *, batch: int = 32, hidden: int = 64,
             lr: float = 1e-2, cell: str = "lstm", seed: int = 0):
  """A ``TrainState`` of the run's structure: the template of a restore."""
  model, params, carry = build(task, cell, hidden, batch, seed)
  inputs, targets = task.sample(seed + 1, 1, batch)
  resets = _resets(0, 1, config.seq_len, batch)
  xs = (jnp.asarray(inputs), jnp.asarray(targets))
  return _trainer(task, model, config, lr).init(params, carry, xs, resets)


def run(
    task: Task,
    config: Config,
    *,
    steps: int,
    batch: int = 32,
    hidden: int = 64,
    lr: float = 1e-2,
    cell: str = "lstm",
    seed: int = 0,
    unroll: int | None = None,
    on_progress: Callable[[int], None] | None = None,
    resume: tuple[Any, dict] | None = None,
    on_chunk: Callable[[Any, dict], None] | None = None,
) -> Result:
  """Trains one configuration online on ``steps`` steps of ``batch`` streams.

  The stream is fed in about 25 chunks (multiples of ``k1``).
  ``on_chunk(state, progress)`` is called after each (``progress``: a
  JSON-able dict of the updates, training seconds and learning curve so
  far); ``resume=(state, progress)`` continues a run from such a point, and
  gives the params an uninterrupted run would have. ``unroll`` is passed to
  ``jbptt.trainer`` (``None``: its default).
  """
  model, params, carry = build(task, cell, hidden, batch, seed)
  tr = _trainer(task, model, config, lr, unroll)
  inputs, targets = task.sample(seed + 1, steps, batch)
  if resume is None:
    state, progress = tr.init(params, carry), {
        "updates": 0, "wall_s": 0.0, "curve_step": [], "curve_loss": []}
  else:
    state, progress = resume
    progress = {k: list(v) if isinstance(v, list) else v
                for k, v in progress.items()}
  chunk = _chunk_len(steps, config)
  begin = int(state.step)
  if begin % chunk or begin > steps:
    raise ValueError(f"cannot resume at step {begin}: not a chunk boundary "
                     f"(chunks of {chunk}) within {steps} steps.")
  if on_progress is not None and begin:
    on_progress(begin)
  for a in range(begin, steps, chunk):
    start = time.perf_counter()
    b = min(steps, a + chunk)
    xs = (jnp.asarray(inputs[a:b]), jnp.asarray(targets[a:b]))
    state, metrics = tr.update(state, xs, _resets(a, b - a, config.seq_len, batch))
    valid = np.asarray(metrics.valid)
    losses = np.asarray(metrics.loss)[valid]
    first_end = (a // config.k1 + 1) * config.k1
    progress["curve_step"] += [first_end + i * config.k1 for i in range(len(losses))]
    progress["curve_loss"] += [float(v) for v in losses]
    progress["updates"] += int(valid.sum())
    progress["wall_s"] += time.perf_counter() - start
    if on_chunk is not None:
      on_chunk(state, progress)
    if on_progress is not None:
      on_progress(b - a)
  wall = max(progress["wall_s"], 1e-9)
  loss, accuracy = evaluate(task, model, state.params, config, batch, seed + 2)
  return Result(config.label, config.k1, config.k2, progress["updates"], wall,
                steps / wall, loss, accuracy, progress["curve_step"],
                progress["curve_loss"], state)

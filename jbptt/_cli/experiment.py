"""Training runs on the built-in tasks: the engine of ``jbptt compare`` / ``train``.

A small Flax recurrent model is trained online with :func:`jbptt.trainer` on
``batch`` parallel streams of a :class:`jbptt._cli.tasks.Task`, then
evaluated on held-out data: fresh streams of a built-in task, the held-out
part of a user data file (its ``split``), beside the split's baseline. The
model is a recurrent Flax cell, the only thing the trainer scans, and a
linear read-out head applied in the loss (:func:`jbptt.cell_loss`); both
live in one params pytree. Nothing here truncates anything itself: TBPTT is
the trainer's.
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Any, Callable, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import jbptt
from jbptt import flax as jf
from jbptt._cli.config import TRAIN, RunConfig
from jbptt._cli.tasks import Task

__all__ = (
    "CELLS",
    "Config",
    "Placement",
    "Result",
    "Score",
    "StreamModel",
    "build",
    "canonical_configs",
    "evaluate",
    "evaluate_split",
    "run",
    "template",
)

tree_map = jax.tree_util.tree_map

# The keys are jbptt._cli.config.CELLS, the choices of --cell.
HELDOUT_STEPS = 2000  # the steps of a built-in task's held-out streams

CELLS = {
    "lstm": nn.OptimizedLSTMCell,
    "gru": nn.GRUCell,
    "mgu": nn.MGUCell,
    "simple": nn.SimpleCell,
}


@dataclasses.dataclass(frozen=True)
class StreamModel:
  """A recurrent Flax cell and a linear read-out, as pure functions of params.

  ``params = {"cell": ..., "readout": ...}`` (see :meth:`init`) holds the
  variables of both. :meth:`cell` is the recurrence alone, what the trainer
  scans; :meth:`head` maps its outputs to logits or predictions, outside the
  recurrence, so it can be applied to all the steps of a window at once.

  Attributes:
    cell_type: a key of :data:`CELLS`.
    hidden: the cell's width.
    in_dim: input features (the vocabulary, for symbols).
    out_dim: classes or regression outputs.
    symbols: inputs are int symbols, one-hot encoded before the cell.
  """

  cell_type: str
  hidden: int
  in_dim: int
  out_dim: int
  symbols: bool

  def _cell(self) -> nn.Module:
    return CELLS[self.cell_type](self.hidden)

  def _encode(self, x):
    return (jax.nn.one_hot(x, self.in_dim, dtype=jnp.float32) if self.symbols
            else x)

  def cell(self, params, carry, x):
    """``(carry, h)`` after one step of input ``x`` (the recurrence only)."""
    return jf.linen_cell(self._cell())(params["cell"], carry, self._encode(x))

  def head(self, params, h):
    """The read-out of cell outputs ``h`` (any leading axes)."""
    return nn.Dense(self.out_dim).apply(params["readout"], h)

  def initialize_carry(self, batch: int):
    """The initial carry of ``batch`` streams."""
    return self._cell().initialize_carry(jax.random.key(0),
                                         (batch, self.in_dim))

  def init(self, key, carry, x):
    """The params for a carry and one step's input ``x``, as Flax's ``init``."""
    key_cell, key_head = jax.random.split(key)
    cell = self._cell().init(key_cell, carry, self._encode(x))
    _, h = self._cell().apply(cell, carry, self._encode(x))
    return {"cell": cell,
            "readout": nn.Dense(self.out_dim).init(key_head, h)}


@dataclasses.dataclass(frozen=True)
class Config:
  """One TBPTT configuration of a run.

  ``seq_len`` cuts the stream into independent sequences of that length
  (the carry is reset at each start); ``None`` lets the carry flow.
  """

  label: str
  k1: int
  k2: int | str  # an int or a rule's text (config.parse_k2)
  losses: str = TRAIN.losses
  seq_len: int | None = None


@dataclasses.dataclass
class Result:
  """What a run measured.

  ``final_loss`` (and ``final_accuracy``) is the held-out loss in the
  training loss's units (cross-entropy in nats, or the mean squared error of
  the standardised series); ``heldout_loss`` is the same score in
  ``loss_unit``: bits per character for text, RMSE in the data's own units
  for a series, else ``final_loss``. ``baseline_loss`` is the baseline's
  score in that unit on the same targets (user data files only).
  """

  config: str
  k1: int
  k2: int | str
  updates: int
  wall_s: float
  steps_per_s: float
  final_loss: float
  final_accuracy: float | None
  curve_step: list[int]
  curve_loss: list[float]
  state: Any = dataclasses.field(repr=False, default=None)
  curve_k2: list[int] = dataclasses.field(default_factory=list)
  heldout: str = ""
  heldout_loss: float | None = None
  loss_unit: str = ""
  baseline: str | None = None
  baseline_loss: float | None = None
  rmse_by_column: dict | None = None
  baseline_by_column: dict | None = None

  def summary(self) -> dict:
    """The JSON row of ``results.json``."""
    return {
        "config": self.config, "k1": self.k1, "k2": self.k2,
        "updates": self.updates, "wall_s": round(self.wall_s, 3),
        "steps_per_s": round(self.steps_per_s, 1),
        "final_loss": self.final_loss, "final_accuracy": self.final_accuracy,
        "heldout": self.heldout, "heldout_loss": self.heldout_loss,
        "loss_unit": self.loss_unit, "baseline": self.baseline,
        "baseline_loss": self.baseline_loss,
        "rmse_by_column": self.rmse_by_column,
        "baseline_by_column": self.baseline_by_column,
        "k2_mean": (round(sum(self.curve_k2) / len(self.curve_k2), 3)
                    if self.curve_k2 else None),
        "k2_last": self.curve_k2[-1] if self.curve_k2 else None,
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


def _task_loss(task: Task):
  """``loss(out, targets)``: the task's loss of the read-out's outputs."""
  if task.kind == "classification":
    return lambda out, y: optax.softmax_cross_entropy_with_integer_labels(
        out, y).mean()
  return lambda out, y: jnp.mean((out - y) ** 2)


def build(task: Task, settings: RunConfig = TRAIN):
  """``(model, params, carry)`` for ``settings.batch`` streams.

  Reads ``settings.cell``, ``hidden``, ``batch`` and ``seed``.
  """
  model = StreamModel(settings.cell, settings.hidden, task.in_dim,
                      task.out_dim, task.symbols)
  carry = model.initialize_carry(settings.batch)
  x = (jnp.zeros((settings.batch,), jnp.int32) if task.symbols
       else jnp.zeros((settings.batch, task.in_dim), jnp.float32))
  return model, model.init(jax.random.key(settings.seed), carry, x), carry


def _resets(start: int, length: int, seq_len: int | None, batch: int,
            restarts: np.ndarray | None = None):
  """The chunk's resets: sequence starts (``seq_len``), and the task's own
  ``restarts`` of its streams (the whole stream's mask), or ``None``."""
  if seq_len is None and restarts is None:
    return None
  t = start + np.arange(length)
  cuts = (np.zeros(length, bool) if seq_len is None
          else (t % seq_len == 0) & (t > 0))
  mask = np.broadcast_to(cuts[:, None], (length, batch))
  if restarts is not None:
    mask = mask | restarts[start:start + length]
  return mask


def _chunk_len(steps: int, config: Config, pieces: int = 25) -> int:
  unit = math.lcm(config.k1, config.seq_len or 1)
  return unit * max(1, round(steps / pieces / unit))


def _stream_spec(task: Task, inputs, targets, config: Config):
  """``(xs, resets)`` for ``Trainer.init``: one step's shapes and dtypes.

  ``resets`` is given when the configuration cuts the stream into sequences
  or the task's streams start again (a user data file), so that the state is
  made for a stream with resets.
  """
  spec = lambda a: jax.ShapeDtypeStruct((1,) + a.shape[1:], a.dtype)
  xs = (spec(inputs), spec(targets))
  batch = inputs.shape[1]
  resets = (None if config.seq_len is None and task.resets is None
            else jax.ShapeDtypeStruct((1, batch), jnp.bool_))
  return xs, resets


class Placement:
  """Where a run's arrays live: on this process, or split over processes.

  With one JAX process the arrays are left as they are. With several
  (``jax.distributed.initialize``), every process holds the whole stream on
  the host (the same seed gives the same streams) and feeds its slice of
  the batch, ``batch // process_count`` streams: the carry and the stream's
  chunks are global arrays sharded over the batch of every process's
  devices (:func:`jbptt.sharding.shard_batch`), the params replicated, so
  the trainer's updates are those of one process on the whole batch.
  """

  def __init__(self, batch: int):
    self.processes = jax.process_count()
    if self.processes > 1:
      from jbptt import sharding

      self._sharding = sharding
      self._mesh = sharding.batch_mesh()
      size = batch // self.processes
      index = jax.process_index()
      self._mine = slice(index * size, (index + 1) * size)

  def params(self, tree):
    """Params, replicated over every device."""
    if self.processes == 1:
      return tree
    return self._sharding.replicate(tree, self._mesh)

  def carry(self, tree):
    """A ``(batch, ...)`` carry, this process's streams."""
    if self.processes == 1:
      return tree
    return self._sharding.shard_batch(
        tree_map(lambda a: np.asarray(a)[self._mine], tree), self._mesh)

  def stream(self, tree):
    """``(time, batch, ...)`` arrays (``None`` stays ``None``)."""
    if self.processes == 1:
      return tree_map(jnp.asarray, tree)
    return self._sharding.shard_batch(
        tree_map(lambda a: np.asarray(a)[:, self._mine], tree), self._mesh,
        batch_axis=1)

  def host(self, tree):
    """Replicated arrays as NumPy arrays, the same on every process."""
    if self.processes == 1:
      return tree
    return tree_map(np.asarray, tree)


def _init(task: Task, model: StreamModel, tr, params, carry, inputs, targets,
          config: Config, placement: Placement, seed: int):
  """The trainer's first state, placed (a ``random:`` k2 draws from the
  key of ``seed + 3``)."""
  xs, resets = _stream_spec(task, inputs, targets, config)
  if placement.processes > 1:  # placed arrays of one step
    xs, resets = placement.stream(tree_map(
        lambda s: np.zeros(s.shape, s.dtype), (xs, resets)))
  key = (jax.random.key(seed + 3)
         if isinstance(k2_rule(config.k2), jbptt.Randomized) else None)
  return tr.init(placement.params(params), placement.carry(carry), xs, resets,
                 key=key)


def evaluate(task: Task, model: StreamModel, params, config: Config, *,
             batch: int, seed: int, steps: int = HELDOUT_STEPS):
  """Held-out loss and accuracy, in the run's own regime (cut or stream).

  On ``steps`` fresh steps of ``batch`` streams of a built-in task (a user
  data file's held-out part is :func:`evaluate_split`'s). Targets within
  ``task.context`` steps of a (re)start are not scored.
  """
  inputs, targets = task.sample(seed, steps, batch)
  if config.seq_len is not None:  # independent sequences become the batch
    n = config.seq_len
    usable = (steps // n) * n
    fold = lambda a: np.swapaxes(
        a[:usable].reshape((usable // n, n) + a.shape[1:]), 0, 1).reshape(
            (n, -1) + a.shape[2:])
    inputs, targets = fold(inputs), fold(targets)
  carry = model.initialize_carry(inputs.shape[1])
  _, h = jax.lax.scan(lambda c, x: model.cell(params, c, x), carry,
                      jnp.asarray(inputs))
  out = model.head(params, h[task.context:])
  y = jnp.asarray(targets)[task.context:]
  loss = float(_task_loss(task)(out, y))
  accuracy = None
  if task.kind == "classification":
    accuracy = float(jnp.mean(jnp.argmax(out, -1) == y))
  return loss, accuracy


class Score(NamedTuple):
  """The held-out score of a user data file's split (see :class:`Result`)."""

  loss: float
  accuracy: float | None
  heldout_loss: float
  by_column: dict | None


def evaluate_split(task: Task, model: StreamModel, params) -> Score:
  """The held-out score on ``task.split``, one stream in time order.

  The model reads the split's inputs from a fresh carry (the steps before
  the held-out part first, unscored) and only its ``scored`` targets count:
  the score in the training loss's units, and in the split's unit (bits per
  character, or RMSE in the data's units, overall and per target column).
  """
  split = task.split
  classify = task.kind == "classification"

  def step(carry, xy):
    x, y = xy
    carry, h = model.cell(params, carry, x)
    out = model.head(params, h)
    if classify:
      return carry, (optax.softmax_cross_entropy_with_integer_labels(out, y),
                     jnp.argmax(out, -1) == y)
    return carry, ((out - y) ** 2, None)

  _, (err, hit) = jax.lax.scan(step, model.initialize_carry(1),
                               (jnp.asarray(split.inputs),
                                jnp.asarray(split.targets)))
  err, scored = np.asarray(err, np.float64), split.scored
  loss = float(err[scored].mean())
  if classify:
    return Score(loss, float(np.asarray(hit)[scored].mean()),
                 loss / math.log(2), None)
  sq = err * split.scale ** 2  # in the data's units
  by_column = {name: float(np.sqrt(sq[..., i][scored[..., i]].mean()))
               for i, name in enumerate(split.names)}
  return Score(loss, None, float(np.sqrt(sq[scored].mean())), by_column)


def _heldout(task: Task, model: StreamModel, params, config: Config,
             settings: RunConfig) -> dict:
  """The :class:`Result` fields of the held-out score and the baseline."""
  if task.split is None:
    loss, accuracy = evaluate(task, model, params, config,
                              batch=settings.batch, seed=settings.seed + 2)
    return dict(
        final_loss=loss, final_accuracy=accuracy, heldout_loss=loss,
        heldout=(f"fresh streams: {HELDOUT_STEPS} steps x {settings.batch} "
                 f"(seed {settings.seed + 2})"),
        loss_unit=("cross-entropy (nats)" if task.kind == "classification"
                   else "mean squared error"))
  split = task.split
  score = evaluate_split(task, model, params)
  return dict(
      final_loss=score.loss, final_accuracy=score.accuracy,
      heldout=split.description, heldout_loss=score.heldout_loss,
      loss_unit=split.unit, baseline=split.baseline,
      baseline_loss=split.baseline_loss, rmse_by_column=score.by_column,
      baseline_by_column=split.baseline_by_column)


def k2_rule(k2: int | str):
  """The ``k2`` of :func:`jbptt.trainer` for a ``--k2`` value (an int, or
  the text :func:`jbptt._cli.config.parse_k2` made)."""
  if isinstance(k2, int):
    return k2
  kind, *parts = k2.split(":")
  if kind == "random":
    return jbptt.Randomized(float(parts[0]), int(parts[1]))
  return jbptt.Adaptive(float(parts[0]),
                        tuple(int(c) for c in parts[1].split(",")))


def _trainer(task: Task, model: StreamModel, config: Config,
             settings: RunConfig):
  task_loss = _task_loss(task)
  step_loss = jbptt.cell_loss(
      model.cell, lambda params, h, y: task_loss(model.head(params, h), y))
  optimizer = optax.chain(optax.clip_by_global_norm(1.0),
                          optax.adam(settings.lr))
  return jbptt.trainer(step_loss, optimizer, k1=config.k1,
                       k2=k2_rule(config.k2),
                       losses=config.losses, unroll=settings.unroll)


def template(task: Task, config: Config, settings: RunConfig = TRAIN):
  """A ``TrainState`` of the run's structure: the template of a restore."""
  model, params, carry = build(task, settings)
  inputs, targets = task.sample(settings.seed + 1, 1, settings.batch)
  return _init(task, model, _trainer(task, model, config, settings), params,
               carry, inputs, targets, config, Placement(settings.batch),
               settings.seed)


def run(
    task: Task,
    config: Config,
    settings: RunConfig = TRAIN,
    *,
    on_progress: Callable[[int], None] | None = None,
    resume: tuple[Any, dict] | None = None,
    on_chunk: Callable[[Any, dict], None] | None = None,
) -> Result:
  """Trains one configuration online on ``steps`` steps of ``batch`` streams.

  The model, optimizer and stream come from ``settings`` (``steps``,
  ``batch``, ``hidden``, ``lr``, ``cell``, ``seed``, ``unroll``); the
  truncation from ``config`` (``settings``' task, data, k1, k2 and losses are
  not read: they are how ``jbptt train`` names ``task`` and ``config``).

  The stream is fed in about 25 chunks (multiples of ``k1``).
  ``on_chunk(state, progress)`` is called after each (``progress``: a
  JSON-able dict of the updates, training seconds and learning curve so
  far); ``resume=(state, progress)`` continues a run from such a point, and
  gives the params an uninterrupted run would have.

  On several JAX processes each feeds its slice of the batch
  (:class:`Placement`) and the result is every process's, the same.

  The result's held-out score is :func:`evaluate`'s on fresh streams of a
  built-in task, :func:`evaluate_split`'s on a user data file's held-out
  part, there in the carried-stream regime whatever ``config.seq_len``.
  """
  steps, batch = settings.steps, settings.batch
  model, params, carry = build(task, settings)
  tr = _trainer(task, model, config, settings)
  inputs, targets = task.sample(settings.seed + 1, steps, batch)
  restarts = (None if task.resets is None
              else task.resets(settings.seed + 1, steps, batch))
  placement = Placement(batch)
  if resume is None:
    state = _init(task, model, tr, params, carry, inputs, targets, config,
                  placement, settings.seed)
    progress = {"updates": 0, "wall_s": 0.0, "curve_step": [], "curve_loss": [],
                "curve_k2": []}
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
    xs, resets = placement.stream(
        ((inputs[a:b], targets[a:b]),
         _resets(a, b - a, config.seq_len, batch, restarts)))
    state, metrics = tr.update(state, xs, resets)
    valid = np.asarray(metrics.valid)
    losses = np.asarray(metrics.loss)[valid]
    first_end = (a // config.k1 + 1) * config.k1
    progress["curve_step"] += [first_end + i * config.k1 for i in range(len(losses))]
    progress["curve_loss"] += [float(v) for v in losses]
    progress.setdefault("curve_k2", [])  # runs saved before it existed
    progress["curve_k2"] += [int(v) for v in np.asarray(metrics.k2)[valid]]
    progress["updates"] += int(valid.sum())
    progress["wall_s"] += time.perf_counter() - start
    if on_chunk is not None:
      on_chunk(state, progress)
    if on_progress is not None:
      on_progress(b - a)
  wall = max(progress["wall_s"], 1e-9)
  return Result(config.label, config.k1, config.k2, progress["updates"], wall,
                steps / wall, curve_step=progress["curve_step"],
                curve_loss=progress["curve_loss"], state=state,
                curve_k2=progress.get("curve_k2", []),
                **_heldout(task, model, placement.host(state.params),
                           config, settings))

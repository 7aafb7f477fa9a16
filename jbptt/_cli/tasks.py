"""Built-in tasks: deterministic, generated in memory, as B parallel streams.

Every task yields ``(inputs, targets)`` arrays with a leading time axis and a
batch axis: ``inputs`` of shape ``(steps, batch, features)`` (floats) or
``(steps, batch)`` (int symbols), ``targets`` likewise. The same ``seed``
always gives the same streams.

* ``recall``: delayed recall. Random symbols; the target at ``t`` is the
  input at ``t - lag`` (classification, chance ``1 / vocab``).
* ``adding``: the adding problem on a stream (Hochreiter & Schmidhuber,
  1997, as a stream): each step carries a value in [0, 1) and a marker bit;
  markers come every ``gap`` steps on average, and the target is the sum of
  the values at the last two markers (regression).
* ``mackey-glass``: the chaotic Mackey-Glass series (tau = 17), next-value
  regression.
* ``text``: a UTF-8 text file, next-character classification.
* ``series``: a numeric ``.csv`` or ``.npy`` file of shape ``(T,)`` or
  ``(T, D)``, next-value regression (standardised).

The last two, the user's data files, are read by :mod:`jbptt._cli.data`:
their training streams read only the first part of the file, and the task's
``split`` holds the last part, held out, with a baseline measured on it.
"""

from __future__ import annotations

import dataclasses
import pathlib
from typing import Callable

import numpy as np

from jbptt._cli import data as _data
from jbptt._cli.config import TRAIN
from jbptt._cli.data import DataError

__all__ = (
    "BUILTIN",
    "DataError",
    "Task",
    "adding",
    "delayed_recall",
    "get",
    "mackey_glass",
)


@dataclasses.dataclass(frozen=True)
class Task:
  """A stream task.

  Attributes:
    name: the task's name.
    kind: ``"classification"`` or ``"regression"``.
    in_dim: the number of input features (the vocabulary for symbols).
    out_dim: the number of classes or regression outputs.
    symbols: whether inputs are int symbols (one-hot encoded by the model).
    context: the steps after a reset before a target can be predicted.
    chance: the accuracy of guessing (classification), else ``None``.
    sample: ``sample(seed, steps, batch) -> (inputs, targets)``.
    description: one line for tables and plots.
    resets: ``resets(seed, steps, batch)``, the ``(steps, batch)`` mask of
      the steps where ``sample``'s streams (same arguments) start again
      with a fresh carry; ``None``: streams never do (built-in tasks).
    split: a user data file's held-out part and baseline
      (:class:`jbptt._cli.data.Split`); ``None``: held-out streams are
      fresh ``sample`` streams (built-in tasks).
  """

  name: str
  kind: str
  in_dim: int
  out_dim: int
  symbols: bool
  context: int
  chance: float | None
  sample: Callable[[int, int, int], tuple[np.ndarray, np.ndarray]]
  description: str
  resets: Callable[[int, int, int], np.ndarray] | None = None
  split: _data.Split | None = None


def delayed_recall(lag: int = 6, vocab: int = 8) -> Task:
  """The target at step t is the symbol seen at step t - lag."""

  def sample(seed, steps, batch):
    rng = np.random.default_rng(seed)
    x = rng.integers(0, vocab, size=(steps + lag, batch), dtype=np.int32)
    return x[lag:], x[:-lag]

  return Task("recall", "classification", vocab, vocab, True, lag, 1 / vocab,
              sample, f"delayed recall (lag {lag}, {vocab} symbols)")


def adding(gap: int = 10) -> Task:
  """The sum of the values at the last two markers, markers ~ every gap steps."""

  def sample(seed, steps, batch):
    rng = np.random.default_rng(seed)
    values = rng.random((steps, batch), dtype=np.float32)
    marks = rng.random((steps, batch)) < 1.0 / gap
    targets = np.zeros((steps, batch), np.float32)
    last = np.zeros((2, batch), np.float32)  # the last two marked values
    for t in range(steps):
      m = marks[t]
      last[0, m], last[1, m] = last[1, m], values[t, m]
      targets[t] = last[0] + last[1]
    inputs = np.stack([values, marks.astype(np.float32)], axis=-1)
    return inputs, targets[..., None]

  return Task("adding", "regression", 2, 1, False, 3 * gap, None, sample,
              f"adding problem stream (markers every ~{gap} steps)")


def _mackey_glass(steps, batch, rng, tau=17, beta=0.2, gamma=0.1, power=10,
                  substeps=10):
  """Euler integration, ``substeps`` per unit time, sampled once per unit."""
  dt = 1.0 / substeps
  lag = tau * substeps
  burn = 500
  total = (steps + 1 + burn) * substeps
  x = np.empty((total + lag + 1, batch))
  x[: lag + 1] = 1.2 + 0.2 * rng.standard_normal((1, batch))  # the history
  for i in range(lag, total + lag):
    delayed = x[i - lag]
    x[i + 1] = x[i] + dt * (beta * delayed / (1 + delayed**power) - gamma * x[i])
  series = x[lag + burn * substeps::substeps][: steps + 1]
  return ((series - 0.9) / 0.23).astype(np.float32)  # about zero mean, unit sd


def mackey_glass() -> Task:
  """Next value of the Mackey-Glass series, one initial history per stream."""

  def sample(seed, steps, batch):
    s = _mackey_glass(steps, batch, np.random.default_rng(seed))
    return s[:-1, :, None], s[1:, :, None]

  return Task("mackey-glass", "regression", 1, 1, False, 0, None, sample,
              "Mackey-Glass series, next value (tau 17)")


BUILTIN = {
    "recall": delayed_recall,
    "adding": adding,
    "mackey-glass": mackey_glass,
}


def get(name: str | None = None, data: str | None = None, *,
        heldout: float = TRAIN.heldout, inputs: str | None = TRAIN.inputs,
        targets: str | None = TRAIN.targets,
        missing: str = TRAIN.missing) -> Task:
  """A built-in task by name, or a task from a user data file.

  Args:
    name: a key of :data:`BUILTIN` (``None``: ``"recall"``).
    data: a user data file, read instead: a ``.csv`` / ``.npy`` series,
      else UTF-8 text.
    heldout: the fraction of ``data`` held out at its end.
    inputs: a series' input columns (names or indices, by commas).
    targets: a series' target columns.
    missing: what to do with a series' missing cells (see
      :class:`jbptt._cli.config.RunConfig`).

  Returns:
    The task.

  Raises:
    ValueError: for an unknown name.
    DataError: for a data file that cannot be used, or column or missing
      options given for a text file.
  """
  if data is not None:
    path = pathlib.Path(data)
    if not path.is_file():
      raise DataError(f"data file {data!r} does not exist or is not a file")
    if path.suffix.lower() in (".csv", ".npy"):
      fields, split = _data.series_file(path, heldout=heldout, inputs=inputs,
                                        targets=targets, missing=missing)
      return Task("series", "regression", symbols=False, context=0,
                  chance=None, split=split, **fields)
    given = [f"--{k} {v}" for k, v in [("inputs", inputs), ("targets", targets),
                                        ("missing", missing)]
             if v != getattr(TRAIN, k)]
    if given:
      raise DataError(f"{', '.join(given)}: only for a .csv / .npy series; "
                      f"{path.name} is read as text")
    fields, split = _data.text_file(path, heldout=heldout)
    return Task("text", "classification", symbols=True, context=0,
                chance=None, split=split, **fields)
  name = name or "recall"
  if name not in BUILTIN:
    raise ValueError(
        f"unknown task {name!r}; choose one of {', '.join(BUILTIN)}")
  return BUILTIN[name]()

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
"""

from __future__ import annotations

import dataclasses
import pathlib
from typing import Callable

import numpy as np

__all__ = (
    "BUILTIN",
    "DataError",
    "Task",
    "adding",
    "delayed_recall",
    "get",
    "mackey_glass",
    "series_file",
    "text_file",
)


class DataError(ValueError):
  """A user data file that cannot be used; the message says why."""


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


def _offset_streams(array, seed, steps, batch):
  """``batch`` windows of ``steps + 1`` items of ``array``, at random offsets
  (wrapping around); returns ``(inputs, next items)``."""
  rng = np.random.default_rng(seed)
  start = rng.integers(0, len(array), size=batch)
  pos = (start[None, :] + np.arange(steps + 1)[:, None]) % len(array)
  s = array[pos]
  return s[:-1], s[1:]


def text_file(path) -> Task:
  """Next-character prediction on a UTF-8 text file (streams at offsets)."""
  path = pathlib.Path(path)
  try:
    raw = path.read_bytes()
  except OSError as e:
    raise DataError(f"cannot read data file {str(path)!r}: {e.strerror}") from e
  try:
    text = raw.decode("utf-8")
  except UnicodeDecodeError as e:
    raise DataError(
        f"data file {str(path)!r} is not UTF-8 text (byte {e.start})") from e
  if len(text) < 2:
    raise DataError(f"data file {str(path)!r} has fewer than 2 characters")
  alphabet = sorted(set(text))
  index = {c: i for i, c in enumerate(alphabet)}
  codes = np.array([index[c] for c in text], np.int32)

  def sample(seed, steps, batch):
    return _offset_streams(codes, seed, steps, batch)

  vocab = len(alphabet)
  return Task("text", "classification", vocab, vocab, True, 0, None, sample,
              f"characters of {path.name} ({vocab} symbols)")


def _load_series(path: pathlib.Path) -> np.ndarray:
  if path.suffix.lower() == ".npy":
    try:
      data = np.load(path, allow_pickle=False)
    except OSError as e:
      raise DataError(f"cannot read data file {str(path)!r}: {e}") from e
    except ValueError as e:
      raise DataError(f"data file {str(path)!r} is not a numeric .npy: {e}") from e
    if not np.issubdtype(data.dtype, np.number):
      raise DataError(f"data file {str(path)!r} holds {data.dtype}, not numbers")
    return np.asarray(data, np.float64)
  try:
    lines = path.read_text(encoding="utf-8").splitlines()
  except OSError as e:
    raise DataError(f"cannot read data file {str(path)!r}: {e.strerror}") from e
  except UnicodeDecodeError as e:
    raise DataError(f"data file {str(path)!r} is not UTF-8 text") from e
  rows = []
  for number, line in enumerate(lines, 1):
    if not line.strip():
      continue
    cells = [c.strip() for c in line.split(",")]
    try:
      rows.append([float(c) for c in cells])
    except ValueError:
      if not rows and number == 1:  # a header line
        continue
      bad = next(c for c in cells if not _is_float(c))
      raise DataError(
          f"data file {str(path)!r} line {number}: {bad!r} is not a number"
      ) from None
    if len(rows[-1]) != len(rows[0]):
      raise DataError(
          f"data file {str(path)!r} line {number}: {len(rows[-1])} columns, "
          f"expected {len(rows[0])}")
  return np.asarray(rows, np.float64)


def _is_float(text: str) -> bool:
  try:
    float(text)
  except ValueError:
    return False
  return True


def series_file(path) -> Task:
  """Next-value regression on a numeric series from a .csv or .npy file."""
  path = pathlib.Path(path)
  data = _load_series(path)
  if data.ndim == 1:
    data = data[:, None]
  if data.ndim != 2 or data.shape[0] < 2 or data.shape[1] < 1:
    raise DataError(
        f"data file {str(path)!r} must hold a series of shape (T,) or (T, D) "
        f"with T >= 2, got shape {data.shape}")
  if not np.all(np.isfinite(data)):
    raise DataError(f"data file {str(path)!r} contains NaN or inf")
  scale = data.std(0)
  data = ((data - data.mean(0)) / np.where(scale > 0, scale, 1)).astype(np.float32)

  def sample(seed, steps, batch):
    return _offset_streams(data, seed, steps, batch)

  dim = data.shape[1]
  return Task("series", "regression", dim, dim, False, 0, None, sample,
              f"series {path.name} ({dim} feature{'s' * (dim > 1)}), next value")


BUILTIN = {
    "recall": delayed_recall,
    "adding": adding,
    "mackey-glass": mackey_glass,
}


def get(name: str | None = None, data: str | None = None) -> Task:
  """A built-in task by name, or a task from a user data file.

  Raises:
    ValueError: for an unknown name.
    DataError: for a data file that cannot be used.
  """
  if data is not None:
    path = pathlib.Path(data)
    if not path.is_file():
      raise DataError(f"data file {data!r} does not exist or is not a file")
    if path.suffix.lower() in (".csv", ".npy"):
      return series_file(path)
    return text_file(path)
  name = name or "recall"
  if name not in BUILTIN:
    raise ValueError(
        f"unknown task {name!r}; choose one of {', '.join(BUILTIN)}")
  return BUILTIN[name]()

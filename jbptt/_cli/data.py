"""User data files for ``jbptt train --data``: columns, gaps, a time split, a baseline.

A file becomes a :class:`jbptt._cli.tasks.Task` whose training streams read
only the first part of the data, and whose :class:`Split` holds the last
part, held out, with a baseline measured on it:

* a ``.csv`` / ``.npy`` series of ``T`` rows: regression of the target
  columns of row ``t + 1`` from the input columns of row ``t``, standardised
  with the training part's means and standard deviations. The baseline is
  persistence (the next value is the current one); both are scored as RMSE
  in the data's own units.
* any other file, UTF-8 text: next-character classification. The baseline
  is the unigram model of the training part (add-one smoothed); both are
  scored in bits per character.

The last ``round(heldout * T)`` rows (characters) are held out. Step ``t``
reads row ``t`` and predicts row ``t + 1``; it is held out when row
``t + 1`` is. A training stream starts at a random step of the training
part and runs to its end, where it starts again at the first step with a
fresh carry (a reset): no stream runs on from the end of the data to its
start, none ever reaches a held-out row. The held-out score runs the model as
one stream, in time order, over the :data:`WARMUP` steps before the held-out
part (read, not scored) and then over every held-out step.

A missing cell (empty, ``NA``, ``N/A``, ``NaN``, ``null``) of a chosen
column refuses the file unless ``missing`` says to drop its row, to fill it
forward, or to interpolate it (linearly between the values around it in the
training part; forward in the held-out part, so that no held-out input is
made from a later value). Held-out targets that were filled are not scored.
"""

from __future__ import annotations

import csv
import io
import math
import pathlib
from typing import NamedTuple

import numpy as np

from jbptt._cli.config import MISSING

__all__ = ("WARMUP", "DataError", "Split", "series_file", "text_file")

WARMUP = 1000  # steps the held-out score reads, unscored, before the part
MISSING_CELLS = ("", "na", "n/a", "nan", "null")  # read as missing, any case
_FIRST = 5  # the missing cells' rows an error shows


class DataError(ValueError):
  """A user data file that cannot be used; the message says why."""


class Split(NamedTuple):
  """The held-out part of a user data file, and the baseline on it.

  Attributes:
    inputs: the held-out stream's inputs, one stream: ``(n, 1, features)``
      floats or ``(n, 1)`` int symbols, from up to :data:`WARMUP` steps
      before the held-out part to its end.
    targets: its targets, ``(n, 1, outputs)`` or ``(n, 1)``.
    scored: which targets count, shaped as ``targets``: the held-out ones
      that were not filled in.
    description: what was held out, e.g. ``"last 10% of sunspots.csv: lines
      280-310 (31 of 309 rows)"``.
    train_steps: the steps of the training part.
    unit: the unit of the held-out score: ``"RMSE"`` (in the data's units)
      or ``"bits per char"``.
    baseline: the baseline's name.
    baseline_loss: its score on the scored targets, in ``unit``.
    baseline_train_loss: the same in the training loss's units (the
      standardised mean squared error, or nats), for the plot.
    scale: ``(outputs,)`` the target columns' standard deviations in the
      training part (a series), else ``None``.
    names: the target columns' names (a series), else ``None``.
    baseline_by_column: the baseline's RMSE of each target column (a
      series), else ``None``.
    notes: lines that say how the file was read (columns, gaps).
  """

  inputs: np.ndarray
  targets: np.ndarray
  scored: np.ndarray
  description: str
  train_steps: int
  unit: str
  baseline: str
  baseline_loss: float
  baseline_train_loss: float
  scale: np.ndarray | None
  names: tuple[str, ...] | None
  baseline_by_column: dict | None
  notes: tuple[str, ...]


class _Table(NamedTuple):
  """A file's columns as floats, NaN where a cell is missing or not a number."""

  names: tuple[str, ...]
  values: np.ndarray  # (rows, columns) float64
  lines: np.ndarray  # (rows,) the 1-based line (csv) or row (npy) of each row
  where: str  # "line" or "row"
  header: bool
  bad: dict  # column -> the message about its first cell that is not a number

  def label(self, column: int) -> str:
    return repr(self.names[column]) if self.header else str(column)


# -- reading -------------------------------------------------------------------


def _read_text(path: pathlib.Path) -> str:
  try:
    return path.read_bytes().decode("utf-8")
  except OSError as e:
    raise DataError(f"cannot read data file {str(path)!r}: {e.strerror}") from e
  except UnicodeDecodeError as e:
    raise DataError(
        f"data file {str(path)!r} is not UTF-8 text (byte {e.start})") from e


def _number(cell: str) -> float | None:
  """The cell's value: NaN when missing, ``None`` when not a number."""
  if cell.lower() in MISSING_CELLS:
    return math.nan
  try:
    return float(cell)
  except ValueError:
    return None


def _columns(rows, lines, where, names, header) -> _Table:
  """A :class:`_Table` from rows of cells (strings or numbers)."""
  width = len(names)
  values = np.full((len(rows), width), np.nan)
  bad = {}
  for r, cells in enumerate(rows):
    for c, cell in enumerate(cells):
      value = _number(cell) if isinstance(cell, str) else float(cell)
      if value is not None and not math.isinf(value):
        values[r, c] = value
      elif c not in bad:
        what = "a number" if value is None else "a finite number"
        bad[c] = f"{where} {lines[r]}: {cell!r} is not {what}"
  return _Table(tuple(names), values, np.asarray(lines, np.int64), where,
                header, bad)


def _read_csv(path: pathlib.Path) -> _Table:
  """The cells of a CSV file; its first line is a header when no cell of
  it is a number."""
  reader = csv.reader(io.StringIO(_read_text(path)))
  rows, lines, names = [], [], None
  try:
    for row in reader:
      if not row:  # a blank line
        continue
      cells = [c.strip() for c in row]
      if names is None:
        names = cells
        if not any(_number(c) is not None for c in cells):
          header = True
          continue
        names, header = [str(i) for i in range(len(cells))], False
      if len(cells) != len(names):
        raise DataError(
            f"data file {str(path)!r} line {reader.line_num}: {len(cells)} "
            f"columns, expected {len(names)}")
      rows.append(cells)
      lines.append(reader.line_num)
  except csv.Error as e:
    raise DataError(f"data file {str(path)!r} line {reader.line_num}: {e}") from e
  return _columns(rows, lines, "line", names or [], names is not None and header)


def _read_npy(path: pathlib.Path) -> _Table:
  try:
    data = np.load(path, allow_pickle=False)
  except OSError as e:
    raise DataError(f"cannot read data file {str(path)!r}: {e}") from e
  except ValueError as e:
    raise DataError(f"data file {str(path)!r} is not a numeric .npy: {e}") from e
  if not np.issubdtype(data.dtype, np.number):
    raise DataError(f"data file {str(path)!r} holds {data.dtype}, not numbers")
  if data.ndim == 1:
    data = data[:, None]
  if data.ndim != 2:
    raise DataError(f"data file {str(path)!r} must hold a series of shape (T,) "
                    f"or (T, D), got shape {data.shape}")
  data = np.asarray(data, np.float64)
  return _columns(data, list(range(1, len(data) + 1)), "row",
                  [str(i) for i in range(data.shape[1])], False)


# -- columns -------------------------------------------------------------------


def _choose(table: _Table, spec: str | None, option: str, path) -> list[int]:
  """The columns that ``spec`` names (names or 0-based indices, by commas)."""
  count = len(table.names)
  if spec is None:
    return list(range(count))
  chosen = []
  for part in (p.strip() for p in spec.split(",")):
    if table.header and part in table.names:
      if table.names.count(part) > 1:
        raise DataError(f"{option} {spec!r}: {path.name} has several columns "
                        f"named {part!r}; choose one by its index")
      column = table.names.index(part)
    elif part.isdigit() and int(part) < count:
      column = int(part)
    else:
      names = (", ".join(table.names) + " or their" if table.header
               else "its")
      raise DataError(f"{option} {spec!r}: {path.name} has no column {part!r}; "
                      f"choose {names} 0-based indices 0-{count - 1}")
    if column not in chosen:
      chosen.append(column)
  return chosen


def _numeric(table: _Table, used: list[int], path):
  """Refuses a chosen column that is not numeric, saying how to skip it."""
  for c in used:
    if c in table.bad:
      numeric = [table.names[i] for i in range(len(table.names))
                 if i not in table.bad]
      hint = (f"leave it out: choose the columns with --inputs / --targets "
              f"(names or indices), e.g. --inputs {','.join(numeric)}"
              if numeric else "no column of it is numeric")
      raise DataError(f"data file {str(path)!r} column {table.label(c)} is not "
                      f"numeric: {table.bad[c]}; {hint}")


def _time_index_notes(table: _Table, used: list[int]) -> list[str]:
  """Notes on default columns that increase at every row, as a time index
  does: forecasting one is wasted effort."""
  notes = []
  for c in used:
    col = table.values[:, c]
    col = col[~np.isnan(col)]
    if len(used) > 1 and len(col) > 2 and np.all(np.diff(col) > 0):
      others = ",".join(table.names[i] for i in used if i != c)
      notes.append(f"column {table.label(c)} increases at every row; if it "
                   "is a time index (a date, a year), leave it out: "
                   f"--inputs {others}")
  return notes


# -- gaps and the split --------------------------------------------------------


def _lines(lines, rows) -> str:
  shown = ", ".join(str(n) for n in lines[rows[:_FIRST]])
  return shown + (", ..." if len(rows) > _FIRST else "")


def _refuse_gaps(table, used, miss, path):
  counts = ", ".join(f"{int(n)} in column {table.label(c)}"
                     for c, n in zip(used, miss.sum(0)) if n)
  total = int(miss.sum())
  rows = np.flatnonzero(miss.any(1))
  raise DataError(
      f"data file {str(path)!r} has {total} missing cell{'s' * (total > 1)} "
      f"(empty, NA or NaN): {counts}; first on {table.where}s "
      f"{_lines(table.lines, rows)}; drop their rows or fill them with "
      f"--missing drop, ffill or interpolate")


def _ffill(x, miss):
  """Each missing cell takes the last value above it (NaN before the first)."""
  index = np.where(miss, 0, np.arange(len(x))[:, None])
  np.maximum.accumulate(index, axis=0, out=index)
  filled = np.take_along_axis(x, index, axis=0)
  return np.where(miss & (np.cumsum(~miss, 0) == 0), np.nan, filled)


def _interpolate(x, miss):
  """Linear interpolation between the values around each gap; a gap at the
  end takes the last value, one at the start the first."""
  t = np.arange(len(x))
  out = x.copy()
  for c in range(x.shape[1]):
    seen = ~miss[:, c]
    if seen.any():
      out[:, c] = np.interp(t, t[seen], x[seen, c])
  return out


def _held_rows(rows: int, fraction: float, path) -> int:
  held = round(fraction * rows)
  if held < 1:
    raise DataError(f"--heldout {fraction} holds out nothing of {path.name} "
                    f"({rows} rows); hold out more")
  if rows - held < 2:
    raise DataError(f"--heldout {fraction} leaves {rows - held} training rows "
                    f"of {path.name} ({rows} rows), fewer than 2; hold out less")
  return held


def _prepare(table: _Table, used, fraction, missing, path):
  """``(x, filled, lines, held, notes)``: the used columns with their gaps
  handled, which cells were filled, and the held-out rows at the end."""
  if missing not in MISSING:
    raise DataError(f"--missing {missing!r}: choose one of {', '.join(MISSING)}")
  x, lines = table.values[:, used], table.lines
  miss = np.isnan(x)
  notes = []
  if len(x) < 2:
    raise DataError(f"data file {str(path)!r} must hold a series of at least "
                    f"2 rows, got {len(x)}")
  if miss.any() and missing == "error":
    _refuse_gaps(table, used, miss, path)
  if not miss.any() or missing == "error":
    return x, miss, lines, _held_rows(len(x), fraction, path), notes
  count = int(miss.sum())
  if missing == "drop":
    keep = ~miss.any(1)
    notes.append(f"--missing drop: dropped the {int((~keep).sum())} rows with "
                 f"missing cells ({count} cells); the rows around a gap are "
                 "read as consecutive")
    x, lines = x[keep], lines[keep]
    if len(x) < 2:
      raise DataError(f"data file {str(path)!r} keeps {len(x)} rows once the "
                      "rows with missing cells are dropped; it needs 2")
    return x, np.zeros_like(x, bool), lines, _held_rows(len(x), fraction, path), notes
  if miss.all(0).any():
    c = used[int(np.flatnonzero(miss.all(0))[0])]
    raise DataError(f"data file {str(path)!r} column {table.label(c)} has no "
                    "value at all")
  start = int((np.cumsum(~miss, 0) == 0).sum(0).max())  # rows before a value
  held = _held_rows(len(x) - start, fraction, path)
  split = len(x) - held
  values = _ffill(x, miss)
  if missing == "interpolate":
    values[:split] = _interpolate(x[:split], miss[:split])
    how = ("linear interpolation in the training part, forward fill in the "
           "held-out part")
  else:
    how = "forward fill (the last value above)"
  notes.append(f"--missing {missing}: filled {count} missing cells by {how}; "
               "held-out targets that were filled are not scored")
  if start:
    notes.append(f"dropped the first {start} rows, before every chosen column "
                 "has a value")
  return values[start:], miss[start:], lines[start:], held, notes


def _describe(fraction, path, where, first, last, held, total, unit="rows"):
  return (f"last {100 * fraction:g}% of {path.name}: {where}s {first}-{last} "
          f"({held} of {total} {unit})")


def _heldout_steps(train_rows: int, total: int) -> tuple[int, int]:
  """``(first, start)``: the first held-out step and the held-out stream's
  first step, :data:`WARMUP` steps before it (or the first step)."""
  first = train_rows - 1  # its target is the first held-out row
  return first, max(0, first - WARMUP)


# -- tasks ---------------------------------------------------------------------


def _positions(seed, steps, batch, train_steps):
  """Each stream's step of the training part at each of ``steps`` steps."""
  rng = np.random.default_rng(seed)
  start = rng.integers(0, train_steps, size=batch)
  return (start[None, :] + np.arange(steps)[:, None]) % train_steps


def _restarts(positions):
  """Where a stream starts the training part again: its carry is reset."""
  return (positions == 0) & (np.arange(len(positions)) > 0)[:, None]


def series_file(path, *, heldout: float, inputs: str | None,
                targets: str | None, missing: str):
  """A next-row regression task on a ``.csv`` / ``.npy`` series, time split.

  Args:
    path: the file.
    heldout: the fraction of its rows held out, at the end.
    inputs: the input columns: names or 0-based indices separated by commas
      (``None``: every column).
    targets: the target columns, likewise (``None``: the inputs).
    missing: ``"error"``, ``"drop"``, ``"ffill"`` or ``"interpolate"``.

  Returns:
    ``(fields, split)``: the :class:`jbptt._cli.tasks.Task` fields that the
    file decides (``in_dim``, ``out_dim``, ``sample``, ``resets``,
    ``description``) and its :class:`Split`.

  Raises:
    DataError: for a file, a column choice or a split that cannot be used.
  """
  path = pathlib.Path(path)
  table = _read_npy(path) if path.suffix.lower() == ".npy" else _read_csv(path)
  input_cols = _choose(table, inputs, "--inputs", path)
  target_cols = (input_cols if targets is None
                 else _choose(table, targets, "--targets", path))
  used = sorted(set(input_cols) | set(target_cols))
  _numeric(table, used, path)
  notes = _time_index_notes(table, used) if inputs is None else []
  x, filled, lines, held, gap_notes = _prepare(table, used, heldout, missing,
                                               path)
  notes += gap_notes
  rows, at = len(x), {c: i for i, c in enumerate(used)}
  xi, yi = [at[c] for c in input_cols], [at[c] for c in target_cols]
  split = rows - held
  train, seen = x[:split], ~filled[:split]
  count = seen.sum(0)
  mean = np.where(seen, train, 0).sum(0) / count
  sd = np.sqrt(np.where(seen, (train - mean) ** 2, 0).sum(0) / count)
  sd = np.where(sd > 0, sd, 1.0)
  z = ((x - mean) / sd).astype(np.float32)
  train_steps = split - 1

  def sample(seed, steps, batch):
    pos = _positions(seed, steps, batch, train_steps)
    return z[pos][..., xi], z[pos + 1][..., yi]

  def resets(seed, steps, batch):
    return _restarts(_positions(seed, steps, batch, train_steps))

  first, start = _heldout_steps(split, rows)
  steps = np.arange(start, rows - 1)
  scored = (steps >= first)[:, None] & ~filled[steps + 1][:, yi]
  if not scored.any():
    raise DataError(f"--heldout {heldout}: every held-out target of "
                    f"{path.name} was filled in; hold out more")
  # Persistence: the next value of each target column is its current one.
  now, nxt = x[first:rows - 1][:, yi], x[first + 1:][:, yi]
  keep = ~filled[first + 1:][:, yi]
  sq = np.where(keep, (nxt - now) ** 2, 0.0)
  names = tuple(table.names[c] for c in target_cols)
  by_column = {n: float(np.sqrt(sq[:, i].sum() / max(keep[:, i].sum(), 1)))
               for i, n in enumerate(names)}
  description = _describe(heldout, path, table.where, lines[split], lines[-1],
                          held, rows)
  unscored = int((~keep).sum())
  if unscored:
    description += (f", {unscored} filled target{'s' * (unscored > 1)} not "
                    "scored")
  show = lambda cols: ", ".join(table.names[c] for c in cols)
  what = (show(input_cols) if input_cols == target_cols
          else f"{show(input_cols)} -> {show(target_cols)}")
  fields = dict(
      in_dim=len(xi), out_dim=len(yi), sample=sample, resets=resets,
      description=f"series {path.name} ({what}), next value")
  return fields, Split(
      inputs=z[steps][:, None][..., xi], targets=z[steps + 1][:, None][..., yi],
      scored=scored[:, None], description=description, train_steps=train_steps,
      unit="RMSE", baseline="persistence (next value = current value)",
      baseline_loss=float(np.sqrt(sq.sum() / keep.sum())),
      baseline_train_loss=float((sq / sd[yi] ** 2).sum() / keep.sum()),
      scale=sd[yi], names=names, baseline_by_column=by_column,
      notes=tuple(notes))


def text_file(path, *, heldout: float):
  """A next-character task on a UTF-8 text file, time split.

  Args:
    path: the file.
    heldout: the fraction of its characters held out, at the end.

  Returns:
    ``(fields, split)``, as :func:`series_file`.

  Raises:
    DataError: for a file or a split that cannot be used.
  """
  path = pathlib.Path(path)
  text = _read_text(path)
  if len(text) < 2:
    raise DataError(f"data file {str(path)!r} has fewer than 2 characters")
  alphabet = sorted(set(text))
  index = {c: i for i, c in enumerate(alphabet)}
  codes = np.array([index[c] for c in text], np.int32)
  total, vocab = len(codes), len(alphabet)
  held = round(heldout * total)
  if held < 1 or total - held < 2:
    raise DataError(f"--heldout {heldout} leaves {total - held} training and "
                    f"{held} held-out characters of {path.name}; each needs "
                    "at least 1 (and training 2)")
  split = total - held
  train_steps = split - 1

  def sample(seed, steps, batch):
    pos = _positions(seed, steps, batch, train_steps)
    return codes[pos], codes[pos + 1]

  def resets(seed, steps, batch):
    return _restarts(_positions(seed, steps, batch, train_steps))

  first, start = _heldout_steps(split, total)
  steps = np.arange(start, total - 1)
  # The unigram model of the training part, add-one smoothed.
  p = (np.bincount(codes[:split], minlength=vocab) + 1) / (split + vocab)
  nats = float(-np.log(p[codes[split:]]).mean())
  fields = dict(in_dim=vocab, out_dim=vocab, sample=sample, resets=resets,
                description=f"characters of {path.name} ({vocab} symbols)")
  return fields, Split(
      inputs=codes[steps][:, None], targets=codes[steps + 1][:, None],
      scored=(steps >= first)[:, None], train_steps=train_steps,
      description=_describe(heldout, path, "character", split + 1, total, held,
                            total, "characters"),
      unit="bits per char",
      baseline="unigram of the training part (add-one smoothed)",
      baseline_loss=nats / math.log(2), baseline_train_loss=nats, scale=None,
      names=None, baseline_by_column=None, notes=())

"""`jbptt train --data`: columns, gaps, the time split and the baselines.

The files are small and shaped like real ones (a quoted header, a date
column, empty and NA cells); every baseline and score is checked against a
value computed here, independently, with numpy.
"""

import collections
import json
import math
import shutil

import numpy as np
import pytest

from jbptt import checkpoint
from jbptt._cli import data, tasks
from jbptt._cli.main import main

TINY = ["--k1", "4", "--k2", "8", "--steps", "32", "--batch", "2",
        "--hidden", "4"]


def write_csv(path, header, rows):
  path.write_text(header + "\n" + "\n".join(",".join(r) for r in rows) + "\n")
  return path


def run_main(argv, capsys):
  """``(status, stdout, stderr)`` of the command, run in this process."""
  try:
    status = main(argv)
  except SystemExit as e:  # argparse's errors
    status = e.code
  out, err = capsys.readouterr()
  return status, out, err


def ffill(x):
  out, last = [], math.nan
  for v in x:
    last = last if math.isnan(v) else v
    out.append(last)
  return np.array(out)


def standardise(x, train_rows):
  """The training part's mean and sd, of its observed values."""
  seen = x[:train_rows][~np.isnan(x[:train_rows])]
  return seen.mean(), seen.std()


def persistence_rmse(x, observed, first):
  """RMSE of "next = current" on the targets from row ``first`` on."""
  keep = observed[first:]
  err = x[first:] - x[first - 1:-1]
  return float(np.sqrt(np.mean(err[keep] ** 2)))


@pytest.fixture
def dated(tmp_path):
  """A weekly series with a quoted header, dates and two columns."""
  t = np.arange(40)
  level = 10 + 3 * np.sin(t / 3) + 0.1 * t
  flow = np.cos(t / 5)
  rows = [(f"1958-{1 + i // 4:02d}-{1 + 7 * (i % 4):02d}", f"{a:.3f}", f"{b:.3f}")
          for i, (a, b) in enumerate(zip(level, flow))]
  path = write_csv(tmp_path / "weekly.csv", '"date","level","flow"', rows)
  return path, np.round(level, 3), np.round(flow, 3)


def test_columns_by_name_or_index_and_a_date_refused(dated):
  path, level, flow = dated
  with pytest.raises(data.DataError) as e:
    tasks.get(data=str(path))
  assert "column 'date' is not numeric: line 2: '1958-01-01'" in str(e.value)
  assert "--inputs level,flow" in str(e.value)
  by_name = tasks.get(data=str(path), inputs="level,flow", targets="flow")
  by_index = tasks.get(data=str(path), inputs="1, 2", targets="2")
  for a, b in zip(by_name.sample(3, 50, 2), by_index.sample(3, 50, 2)):
    np.testing.assert_array_equal(a, b)
  inputs, targets = by_name.sample(3, 50, 2)
  assert inputs.shape == (50, 2, 2) and targets.shape == (50, 2, 1)
  assert by_name.description == "series weekly.csv (level, flow -> flow), next value"
  # The target is the next row's flow, standardised by the training rows.
  split = 40 - 4
  m_level, s_level = standardise(level, split)
  m_flow, s_flow = standardise(flow, split)
  value = inputs[..., 0] * s_level + m_level
  rows = np.array([np.flatnonzero(np.isclose(level, v, atol=1e-4)).item()
                   for v in value.ravel()]).reshape(value.shape)
  np.testing.assert_allclose(targets[..., 0] * s_flow + m_flow,
                             flow[rows + 1], atol=1e-5)
  for bad, message in [("nope", "has no column 'nope'; choose date, level, flow"),
                       ("3", "has no column '3'")]:
    with pytest.raises(data.DataError, match="--inputs"):
      tasks.get(data=str(path), inputs=bad)
    with pytest.raises(data.DataError) as e:
      tasks.get(data=str(path), inputs="level", targets=bad)
    assert message in str(e.value) and "--targets" in str(e.value)


def test_a_time_index_column_is_noted(tmp_path):
  path = write_csv(tmp_path / "sun.csv", '"YEAR","SUNACTIVITY"',
                   [(str(1700 + i), str(v)) for i, v in enumerate(
                       [5, 11, 16, 23, 36, 58, 29, 20, 10, 8, 3, 0, 0, 2, 11])])
  (note,) = tasks.get(data=str(path)).split.notes
  assert "column 'YEAR' increases at every row" in note
  assert note.endswith("--inputs SUNACTIVITY")
  assert tasks.get(data=str(path), inputs="SUNACTIVITY").split.notes == ()


def test_training_streams_never_reach_the_heldout_part(tmp_path):
  """A ramp: each value names its row. Targets are the next row, always in
  the training part; a stream at the end starts again, with a reset."""
  path = write_csv(tmp_path / "ramp.csv", "v", [(str(i),) for i in range(40)])
  task = tasks.get(data=str(path), heldout=0.25)
  split = task.split
  assert split.description == "last 25% of ramp.csv: lines 32-41 (10 of 40 rows)"
  assert split.train_steps == 29
  mean, sd = standardise(np.arange(40.0), 30)
  inputs, targets = task.sample(5, 100, 3)
  resets = task.resets(5, 100, 3)
  x = np.rint(inputs[..., 0] * sd + mean)
  y = np.rint(targets[..., 0] * sd + mean)
  np.testing.assert_array_equal(y, x + 1)  # never wraps to the start
  assert y.max() == 29 and x.min() == 0  # row 29 is the last training row
  np.testing.assert_array_equal(resets, (x == 0) & (np.arange(100) > 0)[:, None])
  assert resets.sum() >= 3
  # The held-out stream reads rows 0..38 and scores the targets 30..39.
  held_x = np.rint(split.inputs[:, 0, 0] * sd + mean)
  np.testing.assert_array_equal(held_x, np.arange(39))
  np.testing.assert_array_equal(np.flatnonzero(split.scored[:, 0, 0]),
                                np.arange(29, 39))
  assert split.baseline_loss == pytest.approx(1.0)  # persistence misses by 1
  assert split.baseline_by_column == {"v": pytest.approx(1.0)}


GAPPY = [3.0, 4.0, 6.0, None, 5.0, 7.0, None, None, 9.0, 8.0, 10.0, 12.0, 11.0,
         13.0, 12.0, 14.0, 13.0, None, 15.0, 17.0]


@pytest.fixture
def gappy(tmp_path):
  cells = ["" if v is None else f"{v}" for v in GAPPY]
  cells[6] = "NA"
  rows = [(f"2020-01-{i + 1:02d}", c) for i, c in enumerate(cells)]
  path = write_csv(tmp_path / "gaps.csv", "date,value", rows)
  return path, np.array([math.nan if v is None else v for v in GAPPY])


def test_missing_cells_are_refused_with_count_and_lines(gappy):
  path, _ = gappy
  with pytest.raises(data.DataError) as e:
    tasks.get(data=str(path), inputs="value")
  message = str(e.value)
  assert "has 4 missing cells (empty, NA or NaN): 4 in column 'value'" in message
  assert "first on lines 5, 8, 9, 19;" in message
  assert "--missing drop, ffill or interpolate" in message


@pytest.mark.parametrize("missing", ["drop", "ffill", "interpolate"])
def test_missing_cells_dropped_or_filled(gappy, missing):
  path, x = gappy
  task = tasks.get(data=str(path), inputs="value", missing=missing,
                   heldout=0.25)
  split = task.split
  observed = ~np.isnan(x)
  if missing == "drop":
    want, observed = x[observed], observed[observed]
    assert "dropped the 4 rows with missing cells" in split.notes[0]
  elif missing == "ffill":
    want = ffill(x)
    assert "filled 4 missing cells by forward fill" in split.notes[0]
  else:  # linear in the training rows 0..14, forward in the held-out ones
    t = np.arange(15)
    want = np.concatenate([np.interp(t, t[observed[:15]], x[:15][observed[:15]]),
                           ffill(x)[15:]])
    assert "linear interpolation in the training part" in split.notes[0]
  rows = len(want)
  held = round(0.25 * rows)
  mean, sd = standardise(np.where(observed, want, np.nan), rows - held)
  np.testing.assert_allclose(split.inputs[:, 0, 0] * sd + mean, want[:-1],
                             rtol=1e-5)
  np.testing.assert_allclose(split.scale, [sd])
  # Filled held-out targets are scored neither for the model nor the baseline.
  first = rows - held
  np.testing.assert_array_equal(split.scored[:, 0, 0],
                                (np.arange(rows - 1) >= first - 1)
                                & observed[1:])
  assert split.baseline_loss == pytest.approx(
      persistence_rmse(want, observed, first))
  if missing != "drop":
    assert split.description.endswith("(5 of 20 rows), 1 filled target not scored")


def test_unigram_baseline_in_bits_per_char(tmp_path):
  text = "the cat sat on the mat; " * 4 + "a dog! " * 2
  path = tmp_path / "story.txt"
  path.write_text(text, encoding="utf-8")
  split = tasks.get(data=str(path), heldout=0.2).split
  held = round(0.2 * len(text))
  train, test = text[:-held], text[-held:]
  counts = collections.Counter(train)
  vocab = sorted(set(text))
  total = len(train) + len(vocab)
  bits = -np.mean([math.log2((counts[c] + 1) / total) for c in test])
  assert split.baseline_loss == pytest.approx(bits)
  assert split.unit == "bits per char"
  n = len(text)
  assert split.description == (f"last 20% of story.txt: characters "
                               f"{n - held + 1}-{n} ({held} of {n} characters)")
  assert int(split.scored.sum()) == held


def test_train_on_a_series_reports_heldout_rmse_and_persistence(tmp_path,
                                                                capsys, gappy):
  path, x = gappy
  out = tmp_path / "run"
  argv = ["train", "--data", str(path), "--inputs", "value", "--missing",
          "ffill", "--heldout", "0.25", "--out", str(out), *TINY]
  status, stdout, err = run_main(argv, capsys)
  assert status == 0, err
  text = " ".join(stdout.split())
  assert "note: --missing ffill: filled 4 missing cells" in text
  assert ("held out: last 25% of gaps.csv: lines 17-21 (5 of 20 rows), 1 "
          "filled target not scored; baseline: persistence") in text
  (row,) = json.loads((out / "results.json").read_text())
  observed = ~np.isnan(x)
  want = ffill(x)
  assert row["baseline_loss"] == pytest.approx(
      persistence_rmse(want, observed, 15))
  _, sd = standardise(x, 15)
  assert row["heldout_loss"] == pytest.approx(math.sqrt(row["final_loss"]) * sd)
  assert row["rmse_by_column"] == {"value": pytest.approx(row["heldout_loss"])}
  assert row["loss_unit"] == "RMSE" and row["heldout"].startswith("last 25%")
  assert row["notes"][0].startswith("--missing ffill")
  saved = checkpoint.read_info(out / "checkpoints")["run"]
  assert (saved["inputs"], saved["missing"], saved["heldout"]) == (
      "value", "ffill", 0.25)
  # A resumed run (its template has the restarts' resets) ends the same.
  steps = sorted(int(p.name) for p in (out / "checkpoints").iterdir())
  shutil.rmtree(out / "checkpoints" / str(steps[-1]))
  status, _, err = run_main(["train", "--resume", str(out)], capsys)
  assert status == 0, err
  (again,) = json.loads((out / "results.json").read_text())
  assert again["heldout_loss"] == row["heldout_loss"]


def test_train_on_text_reports_bits_per_char(tmp_path, capsys):
  path = tmp_path / "book.txt"
  path.write_text("héllo wörld, " * 20, encoding="utf-8")
  out = tmp_path / "run"
  status, stdout, err = run_main(
      ["train", "--data", str(path), "--out", str(out), "--k1", "4", "--k2",
       "4", "--steps", "16", "--batch", "2", "--hidden", "4"], capsys)
  assert status == 0, err
  (row,) = json.loads((out / "results.json").read_text())
  assert row["loss_unit"] == "bits per char"
  assert row["heldout_loss"] == pytest.approx(row["final_loss"] / math.log(2))
  assert row["baseline_loss"] == pytest.approx(
      tasks.get(data=str(path)).split.baseline_loss)
  assert 0 <= row["final_accuracy"] <= 1
  assert "characters 235-260 (26 of 260 characters)" in row["heldout"]
  assert f"{row['heldout_loss']:.4g}" in stdout  # in the table
  assert f"{row['baseline_loss']:.4g}" in stdout


@pytest.mark.parametrize("extra,message", [
    (["--inputs", "nope"], "--inputs 'nope': weekly.csv has no column 'nope'"),
    (["--inputs", "level", "--targets", "9"], "--targets '9': weekly.csv has no"),
    ([], "column 'date' is not numeric"),
    (["--inputs", "level", "--heldout", "0"], "must be a fraction in (0, 1), got 0"),
    (["--inputs", "level", "--heldout", "1"], "must be a fraction in (0, 1), got 1"),
    (["--inputs", "level", "--heldout", "x"], "--heldout: must be a number"),
    (["--inputs", "level", "--heldout", "0.01"], "holds out nothing of weekly.csv"),
    (["--inputs", "level", "--heldout", "0.9"],
     "--heldout 0.9 leaves 3 training steps of weekly.csv, fewer than --k2 8"),
    (["--inputs", "level", "--missing", "zero"], "invalid choice: 'zero'"),
])
def test_bad_data_input_exits_2_with_one_line(dated, tmp_path, capsys, extra,
                                              message):
  path, _, _ = dated
  out = tmp_path / "o"
  status, _, err = run_main(["train", "--data", str(path), "--out", str(out),
                             *TINY, *extra], capsys)
  assert status == 2 and message in err, err
  assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
  assert not out.exists()


@pytest.mark.parametrize("argv,message", [
    (["--task", "recall", "--inputs", "a"], "--inputs: only with --data FILE"),
    (["--task", "recall", "--heldout", "0.2"], "--heldout: only with --data"),
    (["--data", "TEXT", "--targets", "0"], "--targets 0: only for a .csv / .npy"),
])
def test_data_options_elsewhere_are_refused(tmp_path, capsys, argv, message):
  text = tmp_path / "t.txt"
  text.write_text("abcabc" * 10)
  argv = [str(text) if a == "TEXT" else a for a in argv]
  status, _, err = run_main(["train", *argv, "--out", str(tmp_path / "o"),
                             *TINY], capsys)
  assert status == 2 and message in err, err

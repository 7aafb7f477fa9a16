"""The ``jbptt`` command end to end (``main`` in this process, or a process
of its own), bad input."""

import contextlib
import dataclasses
import io
import json
import os
import shutil
import subprocess
import sys
from typing import NamedTuple

import jax
import numpy as np
import pytest

import jbptt
from jbptt import checkpoint
from jbptt._cli import config, experiment, tasks
from jbptt._cli.main import main, parser


class Ran(NamedTuple):
  returncode: int
  stdout: str
  stderr: str


def jbptt_cmd(*args):
  """The command run in this process (``main``), as ``python -m jbptt``
  would run it: its exit status and what it printed."""
  out, err = io.StringIO(), io.StringIO()
  with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
    try:
      status = main(list(args))
    except SystemExit as e:  # argparse's --help and errors
      status = e.code
  return Ran(status, out.getvalue(), err.getvalue())


def jbptt_process(*args, timeout=300):
  """The command in a process of its own (the entry point, process-wide
  output such as asyncio's logged errors)."""
  return subprocess.run([sys.executable, "-m", "jbptt", *args],
                        capture_output=True, text=True, timeout=timeout,
                        check=False)


TINY = ["--steps", "64", "--batch", "4", "--hidden", "8"]


def test_compare_end_to_end(tmp_path):
  out = tmp_path / "cmp"
  r = jbptt_cmd("compare", "--out", str(out), "--seed", "1", *TINY,
                "--add", "random:4:16", "--add", "adaptive:0.1:4,8,16")
  assert r.returncode == 0, r.stderr
  assert "n = 16" in r.stdout
  rows = json.loads((out / "results.json").read_text())
  assert [(row["k1"], row["k2"]) for row in rows] == [
      (16, 16), (1, 16), (8, 1), (4, 16), (16, 16), (16, "random:4:16"),
      (16, "adaptive:0.1:4,8,16")]
  for row in rows:
    assert set(row) >= {"config", "k1", "k2", "updates", "wall_s",
                        "final_loss", "final_accuracy", "k2_mean", "k2_last"}
    assert row["updates"] == 64 // row["k1"]
    assert 0 <= row["final_accuracy"] <= 1
    if isinstance(row["k2"], int):
      assert row["k2_mean"] == row["k2_last"] == row["k2"]
  assert 1 <= rows[5]["k2_mean"] <= 16 and 1 <= rows[5]["k2_last"] <= 16
  assert rows[6]["k2_last"] in (4, 8, 16)
  assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  assert not [p for p in os.listdir(out) if p.startswith(".jbptt")]


def test_train_task_and_checkpoint(tmp_path):
  out = tmp_path / "train"
  r = jbptt_cmd("train", "--task", "mackey-glass", "--k1", "4", "--k2", "8",
                "--losses", "window", "--cell", "gru", "--out", str(out), *TINY)
  assert r.returncode == 0, r.stderr
  (row,) = json.loads((out / "results.json").read_text())
  assert (row["k1"], row["k2"], row["updates"]) == (4, 8, 16)
  assert row["final_accuracy"] is None
  assert (out / "curves.png").exists()
  ckpts = out / "checkpoints"
  assert checkpoint.latest_step(ckpts) == 64
  info = checkpoint.read_info(ckpts)
  assert info["run"] == {**config.TRAIN.saved(), "task": "mackey-glass",
                         "k1": 4, "k2": 8, "losses": "window", "cell": "gru",
                         "steps": 64, "batch": 4, "hidden": 8}
  assert len(info["progress"]["curve_loss"]) == 16
  # Starting another run over these checkpoints is refused, nothing lost.
  r = jbptt_cmd("train", "--task", "recall", "--k1", "2", "--k2", "2",
                "--out", str(out), *TINY)
  assert r.returncode == 2 and "--resume" in r.stderr
  assert checkpoint.latest_step(ckpts) == 64


def _state(out, step):
  settings = config.RunConfig(
      **checkpoint.read_info(out / "checkpoints", step=step)["run"])
  task = tasks.get(settings.task, settings.data)
  tbptt = experiment.Config("", settings.k1, settings.k2, settings.losses)
  like = experiment.template(task, tbptt, settings)
  return checkpoint.restore(out / "checkpoints", like, step=step)


def test_resume_continues_exactly(tmp_path):
  out = tmp_path / "run"
  r = jbptt_cmd("train", "--task", "recall", "--k1", "3", "--k2",
                "random:3:8", "--out", str(out), *TINY)
  assert r.returncode == 0, r.stderr
  (whole,) = json.loads((out / "results.json").read_text())
  assert whole["k2"] == "random:3:8"
  done = _state(out, 64)
  steps = sorted(int(p.name) for p in (out / "checkpoints").iterdir())
  assert steps[-1] == 64 and len(steps) == 2
  # An interruption after the second-to-last chunk: its checkpoint is newest.
  shutil.rmtree(out / "checkpoints" / "64")
  (out / "results.json").unlink()
  r = jbptt_cmd("train", "--resume", str(out), "--steps", "64")
  assert r.returncode == 0, r.stderr
  assert f"resuming {out} at step {steps[0]} of 64" in r.stdout.replace("\n", "")
  for a, b in zip(jax.tree_util.tree_leaves(_state(out, 64)),
                  jax.tree_util.tree_leaves(done)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  (resumed,) = json.loads((out / "results.json").read_text())
  assert resumed["updates"] == whole["updates"] == 21
  assert resumed["final_loss"] == whole["final_loss"]
  assert resumed["k2_mean"] == whole["k2_mean"]


def test_unroll_reaches_the_trainer(tmp_path, monkeypatch):
  """`--unroll` is passed to `jbptt.trainer`, not saved, and free on resume."""
  seen = []
  trainer = jbptt.trainer

  def spy(*args, **kwargs):
    seen.append(kwargs["unroll"])
    return trainer(*args, **kwargs)

  monkeypatch.setattr(jbptt, "trainer", spy)
  out = tmp_path / "run"
  with jax.enable_x64(False):  # as the command runs
    assert main(["train", "--task", "recall", "--k1", "4", "--k2", "4",
                 "--out", str(out), "--unroll", "4", "--steps", "16",
                 "--batch", "2", "--hidden", "4"]) == 0
    assert seen == [4]
    assert "unroll" not in checkpoint.read_info(out / "checkpoints")["run"]
    shutil.rmtree(out / "checkpoints" / "16")
    assert main(["train", "--resume", str(out), "--unroll", "2"]) == 0
    assert seen[1:] == [2, 2]  # the restore template, then the run
    assert checkpoint.latest_step(out / "checkpoints") == 16
  # `compare` runs its configurations through the same `_run`.
  assert parser().parse_args(["compare", "--unroll", "3"]).unroll == 3
  assert parser().parse_args(["compare"]).unroll == 1


def test_defaults_come_from_run_config():
  """The parser's defaults and help texts are RunConfig's."""
  args = parser().parse_args(["compare"])
  given = {f.name: getattr(args, f.name)
           for f in dataclasses.fields(config.RunConfig) if hasattr(args, f.name)}
  assert config.COMPARE == dataclasses.replace(config.TRAIN, **given)
  assert config.COMPARE.steps != config.TRAIN.steps  # so both are read
  # `train` leaves out what is not given, so that --resume can tell.
  args = parser().parse_args(["train", "--task", "recall", "--k1", "2",
                              "--k2", "2"])
  assert (args.steps, args.losses, args.cell, args.unroll) == (
      None, None, None, config.TRAIN.unroll)
  for command, defaults in [("compare", config.COMPARE),
                            ("train", config.TRAIN)]:
    r = jbptt_cmd(command, "--help")
    text = " ".join(r.stdout.split())
    for option in ("steps", "batch", "hidden", "lr", "cell", "unroll"):
      assert f"(default: {getattr(defaults, option)})" in text, (command, option)
  assert "(default: new)" in text and "--policy" not in text
  assert tuple(experiment.CELLS) == config.CELLS
  assert set(config.TRAIN.saved()) == set(config.RunConfig.saved_names())
  assert "unroll" not in config.TRAIN.saved()


def test_resume_errors(tmp_path):
  r = jbptt_cmd("train", "--resume", str(tmp_path / "none"))
  assert r.returncode == 2 and "no checkpoint in" in r.stderr
  out = tmp_path / "run"
  r = jbptt_cmd("train", "--task", "recall", "--k1", "8", "--k2", "8",
                "--out", str(out), *TINY)
  assert r.returncode == 0, r.stderr
  r = jbptt_cmd("train", "--resume", str(out), "--k2", "4", "--hidden", "8")
  assert r.returncode == 2
  assert "these differ: --k2 4 (the run has 8)" in r.stderr
  r = jbptt_cmd("train", "--resume", str(out), "--out",
                str(tmp_path / "x"))
  assert r.returncode == 2 and "leave out --out" in r.stderr
  data = next((out / "checkpoints" / "64" / "state").rglob("d/*"))
  data.write_bytes(b"")  # a damaged checkpoint: refused, with the reason
  r = jbptt_process("train", "--resume", str(out))
  assert r.returncode == 2 and "is corrupt or incomplete" in r.stderr
  assert "Traceback" not in r.stderr


@pytest.mark.parametrize("kind", ["text", "csv", "npy"])
def test_train_on_user_data(tmp_path, kind):
  if kind == "text":
    data = tmp_path / "book.txt"
    data.write_text("héllo wörld, " * 40, encoding="utf-8")
  elif kind == "csv":
    data = tmp_path / "series.csv"
    t = np.arange(300)
    data.write_text("a,b\n" + "\n".join(f"{np.sin(x / 5):.4f},{x % 7}" for x in t))
  else:
    data = tmp_path / "series.npy"
    np.save(data, np.cos(np.arange(200) / 3.0))
  out = tmp_path / "o"
  r = jbptt_cmd("train", "--data", str(data), "--k1", "8", "--k2", "8",
                "--out", str(out), *TINY)
  assert r.returncode == 0, r.stderr
  assert json.loads((out / "results.json").read_text())[0]["updates"] == 8


def test_schedule_diagram():
  r = jbptt_process("schedule", "--n", "10", "--k1", "4", "--k2", "6")
  assert r.returncode == 0, r.stderr
  lines = r.stdout.splitlines()
  rows = [line for line in lines if line.startswith("t=")]
  assert len(rows) == 3  # updates at 4, 8, 10
  assert rows[0].endswith(" |oooo" + "." * 6)  # t=4: losses 1..4 from h_0
  assert rows[1].endswith("..|--oooo" + "." * 2)   # t=8: truncated at 2
  assert rows[2].endswith("." * 4 + "|----oo")     # t=10: truncated at 4


def test_schedule_losses():
  r = jbptt_cmd("schedule", "--n", "8", "--k1", "4", "--k2", "2",
                "--losses", "last")
  assert r.returncode == 0, r.stderr
  assert "losses 'last'" in r.stdout
  rows = [line for line in r.stdout.splitlines() if line.startswith("t=")]
  assert rows == ["t=4   ..|-o....", "t=8   ......|-o"]


@pytest.mark.parametrize("args,message", [
    (["train", "--task", "recall", "--k1", "0", "--k2", "4"], "--k1 must be >= 1"),
    (["train", "--task", "recall", "--k1", "4", "--k2", "-1"],
     "--k2: must be an int >= 1, random:MEAN:MAX"),
    (["train", "--task", "recall", "--k1", "4", "--k2", "random:0.5:8"],
     "got 'random:0.5:8'"),
    (["train", "--task", "recall", "--k1", "4", "--k2", "random:4"],
     "got 'random:4'"),
    (["train", "--task", "recall", "--k1", "4", "--k2", "adaptive:1.5"],
     "got 'adaptive:1.5'"),
    (["train", "--task", "recall", "--k1", "4", "--k2", "adaptive:0.1:0,4"],
     "got 'adaptive:0.1:0,4'"),
    (["compare", "--add", "often"], "--add: must be an int >= 1"),
    (["train", "--task", "recall", "--k1", "x", "--k2", "4"],
     "--k1 must be an integer"),
    (["compare", "--task", "nope"], "unknown task 'nope'"),
    (["train", "--data", "/does/not/exist.txt", "--k1", "2", "--k2", "2"],
     "does not exist"),
    (["schedule", "--n", "5", "--k1", "0", "--k2", "1"], "--k1 must be >= 1"),
    (["schedule", "--n", "500", "--k1", "2", "--k2", "2"], "too long to draw"),
    (["compare", "--steps", "0"], "--steps must be >= 1"),
    (["compare", "--unroll", "0"], "--unroll must be >= 1"),
    (["train", "--task", "recall", "--k1", "2", "--k2", "2", "--unroll", "2.5"],
     "--unroll must be an integer"),
    (["train", "--k1", "2", "--k2", "2"], "one of --task or --data is required"),
    (["train", "--task", "recall", "--k2", "2"], "--k1 is required"),
    (["train", "--task", "recall", "--k1", "2", "--k2", "2", "--losses", "all"],
     "invalid choice: 'all'"),
])
def test_bad_input_exits_2_with_one_line(args, message):
  r = jbptt_cmd(*args)
  assert r.returncode == 2
  assert message in r.stderr
  assert "Traceback" not in r.stderr
  assert len(r.stderr.strip().splitlines()) <= 3  # argparse adds its usage


@pytest.mark.parametrize("content,message", [
    (b"", "fewer than 2 characters"),
    (b"\xff\xfe\x00bad", "is not UTF-8"),
])
def test_bad_text_data(tmp_path, content, message):
  data = tmp_path / "d.txt"
  data.write_bytes(content)
  out = tmp_path / "o"
  r = jbptt_cmd("train", "--data", str(data), "--k1", "2", "--k2", "2",
                "--out", str(out))
  assert r.returncode == 2 and message in r.stderr
  assert "Traceback" not in r.stderr
  assert not out.exists() or not any(out.iterdir())


@pytest.mark.parametrize("content,suffix,message", [
    ("1.0\n2.0\nabc\n", ".csv", "line 3: 'abc' is not a number"),
    ("1,2\n3\n", ".csv", "line 2: 1 columns, expected 2"),
    ("", ".csv", "must hold a series"),
    ("1.0\nnan\n", ".csv", "1 missing cell (empty, NA or NaN)"),
])
def test_bad_series_data(tmp_path, content, suffix, message):
  data = tmp_path / f"d{suffix}"
  data.write_text(content)
  r = jbptt_cmd("train", "--data", str(data), "--k1", "2", "--k2", "2",
                "--out", str(tmp_path / "o"))
  assert r.returncode == 2 and message in r.stderr, r.stderr
  assert "Traceback" not in r.stderr


def test_unwritable_out(tmp_path):
  blocker = tmp_path / "file"
  blocker.write_text("x")
  r = jbptt_cmd("compare", "--out", str(blocker))
  assert r.returncode == 2 and "is not a folder" in r.stderr
  r = jbptt_cmd("compare", "--out", str(blocker / "sub"))
  assert r.returncode == 2 and "cannot be written" in r.stderr
  assert "Traceback" not in r.stderr


@pytest.mark.parametrize("name", sorted(tasks.BUILTIN))
def test_generators_are_deterministic_with_shapes(name):
  task = tasks.get(name)
  a = task.sample(3, 50, 4)
  b = task.sample(3, 50, 4)
  c = task.sample(4, 50, 4)
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x, y)
  assert not np.array_equal(a[0], c[0])
  inputs, targets = a
  assert inputs.shape[:2] == (50, 4) and targets.shape[:2] == (50, 4)
  if task.symbols:
    assert inputs.dtype == np.int32 and inputs.max() < task.in_dim
  else:
    assert inputs.shape[2] == task.in_dim and targets.shape[2] == task.out_dim
    assert np.all(np.isfinite(inputs))


def test_recall_targets_are_lagged_inputs():
  inputs, targets = tasks.delayed_recall(lag=3, vocab=5).sample(0, 20, 2)
  np.testing.assert_array_equal(targets[3:], inputs[:-3])


def test_adding_targets_sum_the_last_two_marked_values():
  inputs, targets = tasks.adding(gap=4).sample(0, 200, 1)
  values, marks = inputs[:, 0, 0], inputs[:, 0, 1] > 0
  marked = []
  for t in range(200):
    if marks[t]:
      marked.append(values[t])
    want = sum(marked[-2:])
    np.testing.assert_allclose(targets[t, 0, 0], want, rtol=1e-6)


def test_mackey_glass_is_bounded_and_chaotic():
  inputs, targets = tasks.mackey_glass().sample(0, 1000, 2)
  np.testing.assert_array_equal(inputs[1:], targets[:-1])
  assert abs(float(inputs.mean())) < 1 and 0.3 < float(inputs.std()) < 3
  assert not np.allclose(inputs[:, 0], inputs[:, 1])


def test_console_script_is_declared():
  import importlib.metadata as md

  eps = md.entry_points(group="console_scripts")
  assert any(ep.name == "jbptt" and ep.value == "jbptt._cli.main:main" for ep in eps)
  assert jbptt.__version__

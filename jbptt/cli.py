"""The ``jbptt`` command: ``compare``, ``train`` and ``schedule``.

Bad input (k1 or k2 <= 0, an unknown task, an unusable data file, an --out
that cannot be written, a checkpoint that cannot be resumed) exits with
status 2 and one line on stderr; outputs are written to a temporary folder and
moved in place only when complete, checkpoints atomically (orbax).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import pathlib
import shutil
import sys
import tempfile

from jbptt._src import semantics

MAX_DIAGRAM = 120


class UsageError(Exception):
  """Bad input: reported on one line, exit status 2."""


def _positive(name):
  def parse(text):
    try:
      value = int(text)
    except ValueError:
      raise argparse.ArgumentTypeError(
          f"{name} must be an integer, got {text!r}") from None
    if value < 1:
      raise argparse.ArgumentTypeError(f"{name} must be >= 1, got {value}")
    return value
  return parse


def _positive_float(text):
  try:
    value = float(text)
  except ValueError:
    raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
  if not value > 0:
    raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
  return value


class _Parser(argparse.ArgumentParser):
  def error(self, message):
    self.exit(2, f"{self.prog}: error: {message}\n")


# -- schedule ------------------------------------------------------------------


def diagram(n: int, k1: int, k2: int, policy: str = "new") -> str:
  """A text picture of TBPTT(k1, k2) on ``n`` steps, one line per update.

  In each line, step columns read: ``o`` a loss injected by this update, ``-``
  a step its gradient passes through without a loss, ``|`` the state it is
  truncated at (held constant), ``.`` a step it does not touch.
  """
  updates = semantics.schedule(n, k1, k2, policy)
  width = len(str(n))
  lines = [
      f"TBPTT(k1={k1}, k2={k2}), policy {policy!r}, n={n}: "
      f"{len(updates)} update{'s' * (len(updates) != 1)}",
      "  o loss injected   - backpropagated through   | held constant "
      "(truncation point)   . untouched",
  ]
  prefix = lambda t: f"t={t:>{width}}   "
  digits = "".join(str(j % 10) for j in range(1, n + 1))
  lines.append(" " * (len(prefix(0)) + 1) + digits)
  for u in updates:
    row = ["."] * (n + 1)  # index 0 is the initial state h_0
    for tau, s in u.injected:
      for j in range(s + 1, tau + 1):
        if row[j] != "o":
          row[j] = "-"
    for tau, _ in u.injected:
      row[tau] = "o"
    cuts = {s for _, s in u.injected}
    for s in cuts:
      if row[s] == ".":
        row[s] = "|"
    lines.append(prefix(u.t) + "".join(row))
  lines.append(
      "column 0 is the initial state; each loss at tau is backpropagated to "
      "the state after step s = max(0, min(t - k2, tau - 1))"
      if policy == "new" else
      "column 0 is the initial state; every loss is backpropagated to the "
      "state after step max(0, t - k2)")
  return "\n".join(lines)


def cmd_schedule(args) -> int:
  if args.n > MAX_DIAGRAM:
    raise UsageError(f"--n {args.n} is too long to draw; use at most {MAX_DIAGRAM}")
  print(diagram(args.n, args.k1, args.k2, args.policy))
  return 0


# -- outputs -------------------------------------------------------------------


def _prepare_out(out: str) -> pathlib.Path:
  """Checks that ``out`` can be written; returns it (created if needed)."""
  path = pathlib.Path(out)
  if path.exists() and not path.is_dir():
    raise UsageError(f"--out {out!r} exists and is not a folder")
  try:
    path.mkdir(parents=True, exist_ok=True)
    probe = tempfile.NamedTemporaryFile(dir=path, prefix=".jbptt-probe-")
    probe.close()
  except OSError as e:
    raise UsageError(f"--out {out!r} cannot be written: {e.strerror}") from e
  return path


def _commit(staging: pathlib.Path, out: pathlib.Path):
  """Moves every finished file from ``staging`` into ``out``."""
  for item in staging.iterdir():
    target = out / item.name
    if target.is_dir() and not target.is_symlink():
      shutil.rmtree(target)
    os.replace(item, target)


def _plot(results, task, path: pathlib.Path):
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  import numpy as np

  fig, ax = plt.subplots(figsize=(8, 4.5))
  for r in results:
    steps, loss = np.asarray(r.curve_step), np.asarray(r.curve_loss)
    if len(loss) == 0:
      continue
    window = max(1, len(loss) // 50)
    smooth = np.convolve(loss, np.ones(window) / window, mode="valid")
    ax.plot(steps[window - 1:], smooth, label=f"{r.config} (k1={r.k1}, k2={r.k2})")
  ax.set_xlabel("stream step")
  ax.set_ylabel("training loss (moving average)")
  ax.set_title(task.description)
  if task.kind == "classification" and task.chance:
    import math

    ax.axhline(math.log(task.out_dim), color="grey", ls=":", lw=1,
               label="chance (uniform guess)")
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def _table(results, title):
  from rich.table import Table

  table = Table(title=title, caption="wall s includes compilation; final loss "
                "and accuracy on held-out streams")
  for col in ("config", "k1", "k2", "updates", "wall s", "steps/s",
              "final loss", "final accuracy"):
    table.add_column(col, justify="left" if col == "config" else "right")
  for r in results:
    acc = "-" if r.final_accuracy is None else f"{r.final_accuracy:.3f}"
    table.add_row(r.config, str(r.k1), str(r.k2), str(r.updates),
                  f"{r.wall_s:.1f}", f"{r.steps_per_s:.0f}",
                  f"{r.final_loss:.4f}", acc)
  return table


def _progress(console):
  from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
  )

  return Progress(TextColumn("{task.description:<28}"), BarColumn(),
                  MofNCompleteColumn(), TimeElapsedColumn(), console=console,
                  transient=False)


def _run(progress, task, config, args, **kwargs):
  from jbptt import experiment

  bar = progress.add_task(f"TBPTT{config.label}" if config.label[0] == "("
                          else config.label, total=args.steps)
  return experiment.run(
      task, config, steps=args.steps, batch=args.batch, hidden=args.hidden,
      lr=args.lr, cell=args.cell, seed=args.seed, unroll=args.unroll,
      on_progress=lambda k: progress.advance(bar, k), **kwargs)


def _train_all(task, configs, args, console):
  with _progress(console) as progress:
    return [_run(progress, task, config, args) for config in configs]


def _write(results, task, out, extra=None):
  """Writes results.json, curves.png (and ``extra(staging)``) atomically."""
  with tempfile.TemporaryDirectory(dir=out, prefix=".jbptt-") as tmp:
    staging = pathlib.Path(tmp)
    (staging / "results.json").write_text(
        json.dumps([r.summary() for r in results], indent=2) + "\n")
    _plot(results, task, staging / "curves.png")
    if extra is not None:
      extra(staging)
    _commit(staging, out)


def _task(args):
  from jbptt import tasks

  try:
    return tasks.get(getattr(args, "task", None), getattr(args, "data", None))
  except ValueError as e:  # DataError included
    raise UsageError(str(e)) from e


def _console():
  from rich.console import Console

  return Console(width=max(100, shutil.get_terminal_size().columns))


def cmd_compare(args) -> int:
  task = _task(args)
  out = _prepare_out(args.out)
  from jbptt import experiment

  n, configs = experiment.canonical_configs(task)
  console = _console()
  console.print(f"[bold]jbptt compare[/]: {task.description}; {args.steps} steps "
                f"x {args.batch} streams; TBPTT(n, n) and TBPTT(1, n) on "
                f"sequences of n = {n}; the others on the stream, carry flowing")
  results = _train_all(task, configs, args, console)
  console.print(_table(results, f"{task.description}, {args.steps} steps"))
  _write(results, task, out)
  console.print(f"wrote {out / 'results.json'} and {out / 'curves.png'}")
  return 0


# The settings of a `train` run, saved with its checkpoints; `--resume` reads
# them back. Options left out on the command line take these defaults.
TRAIN_DEFAULTS = {"task": None, "data": None, "k1": None, "k2": None,
                  "policy": "new", "steps": 6000, "seed": 0, "batch": 32,
                  "hidden": 64, "lr": 1e-2, "cell": "lstm"}
CHECKPOINTS = "checkpoints"


def _settings(args, saved=None) -> dict:
  """The run's settings: the saved ones, else the given ones or defaults."""
  given = {k: getattr(args, k) for k in TRAIN_DEFAULTS
           if getattr(args, k) is not None}
  if given.get("data") is not None:
    given["data"] = str(pathlib.Path(given["data"]).absolute())
  if saved is None:
    if given.get("task") is None and given.get("data") is None:
      raise UsageError("one of --task or --data is required (or --resume DIR)")
    for k in ("k1", "k2"):
      if k not in given:
        raise UsageError(f"--{k} is required (or --resume DIR)")
    return {**TRAIN_DEFAULTS, **given}
  differ = [f"--{k} {v} (the run has {saved.get(k)})" for k, v in given.items()
            if saved.get(k) != v]
  if differ:
    raise UsageError("--resume continues a run with its own settings; these "
                     "differ: " + ", ".join(differ))
  return dict(saved)


def _resume_point(root: pathlib.Path):
  """The settings and newest checkpoint step of the run saved in ``root``."""
  from jbptt import checkpoint

  ckpts = root / CHECKPOINTS
  try:
    step = checkpoint.latest_step(ckpts)
    if step is None:
      raise UsageError(f"--resume {str(root)!r}: no checkpoint in {ckpts}")
    info = checkpoint.read_info(ckpts, step=step)
  except checkpoint.CheckpointError as e:
    raise UsageError(f"--resume {str(root)!r}: {e}") from e
  if not isinstance(info, dict) or set(info) != {"run", "progress"} or set(
      info["run"]) != set(TRAIN_DEFAULTS):
    raise UsageError(f"--resume {str(root)!r}: the checkpoint at step {step} "
                     "was not written by `jbptt train`")
  return step, info


def cmd_train(args) -> int:
  from jbptt import checkpoint, experiment

  saved = None
  if args.resume is not None:
    if args.out is not None and pathlib.Path(args.out).absolute() != pathlib.Path(
        args.resume).absolute():
      raise UsageError("--resume writes into the run's own folder; leave out "
                       "--out")
    step, saved = _resume_point(pathlib.Path(args.resume))
    args.out = args.resume
  settings = _settings(args, None if saved is None else saved["run"])
  vars(args).update(settings)
  if args.out is None:
    args.out = "jbptt-out"
  task = _task(args)
  out = _prepare_out(args.out)
  ckpts = out / CHECKPOINTS
  config = experiment.Config(f"TBPTT({args.k1}, {args.k2})", args.k1, args.k2,
                             args.policy)
  resume = None
  if saved is not None:
    like = experiment.template(task, config, batch=args.batch,
                               hidden=args.hidden, lr=args.lr, cell=args.cell,
                               seed=args.seed)
    try:
      state = checkpoint.restore(ckpts, like, step=step)
    except checkpoint.CheckpointError as e:
      raise UsageError(f"--resume {args.resume!r}: {e}") from e
    resume = (state, saved["progress"])
  elif checkpoint.latest_step(ckpts) is not None:
    raise UsageError(f"--out {args.out!r} holds the checkpoints of another "
                     f"run; continue it with --resume {args.out}, or choose "
                     "another --out")

  def save(state, progress):
    if int(state.step) > (0 if saved is None else step):
      checkpoint.save(ckpts, state, info={"run": settings, "progress": progress})

  console = _console()
  if saved is not None:
    console.print(f"resuming {out} at step {step} of {args.steps}")
  with _progress(console) as progress:
    result = _run(progress, task, config, args, resume=resume, on_chunk=save)
  console.print(_table([result], f"{task.description}, {args.steps} steps"))
  _write([result], task, out)
  console.print(f"wrote {out / 'results.json'}, {out / 'curves.png'} and "
                f"{ckpts / str(int(result.state.step))}")
  return 0


def parser() -> argparse.ArgumentParser:
  p = _Parser(prog="jbptt", description="Truncated BPTT, TBPTT(k1, k2), in JAX.")
  sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

  def common(q, steps, fill=True):
    # With fill=False, options left out stay None (`train` fills them in).
    d = lambda value: value if fill else None
    q.add_argument("--out", default=d("jbptt-out"),
                   help="output folder (default: jbptt-out)")
    q.add_argument("--steps", type=_positive("--steps"), default=d(steps),
                   help=f"stream steps per run (default: {steps})")
    q.add_argument("--seed", type=int, default=d(0), help="(default: 0)")
    q.add_argument("--batch", type=_positive("--batch"), default=d(32),
                   help="parallel streams (default: 32)")
    q.add_argument("--hidden", type=_positive("--hidden"), default=d(64),
                   help="(default: 64)")
    q.add_argument("--lr", type=_positive_float, default=d(1e-2),
                   help="Adam learning rate, gradients clipped at norm 1 "
                   "(default: 0.01)")
    q.add_argument("--cell", choices=["lstm", "gru", "mgu", "simple"],
                   default=d("lstm"), help="(default: lstm)")
    # Not a setting of the run: it changes the speed, never the result, so a
    # resumed run may choose another.
    q.add_argument("--unroll", type=_positive("--unroll"), default=None,
                   help="steps per iteration of the per-step loops; changes "
                   "the speed, not the result (default: 8 on a GPU, else 1)")

  q = sub.add_parser("compare", help="the canonical configurations side by side")
  q.add_argument("--task", default="recall", help="recall, adding or mackey-glass")
  common(q, 12000)
  q.set_defaults(run=cmd_compare)

  q = sub.add_parser("train", help="one TBPTT(k1, k2) run, checkpointed; "
                     "--resume DIR continues an interrupted one")
  src = q.add_mutually_exclusive_group()
  src.add_argument("--task", help="recall, adding or mackey-glass")
  src.add_argument("--data", help="a UTF-8 text file, or a .csv / .npy series")
  q.add_argument("--k1", type=_positive("--k1"))
  q.add_argument("--k2", type=_positive("--k2"))
  q.add_argument("--policy", choices=semantics.POLICIES,
                 help="(default: new)")
  q.add_argument("--resume", metavar="DIR",
                 help="continue the run whose --out was DIR from its newest "
                 "checkpoint, with its settings, to its --steps")
  common(q, 6000, fill=False)
  q.set_defaults(run=cmd_train)

  q = sub.add_parser("schedule", help="draw the TBPTT(k1, k2) schedule")
  q.add_argument("--n", type=_positive("--n"), required=True)
  q.add_argument("--k1", type=_positive("--k1"), required=True)
  q.add_argument("--k2", type=_positive("--k2"), required=True)
  q.add_argument("--policy", choices=semantics.POLICIES, default="new")
  q.set_defaults(run=cmd_schedule)
  return p


def _quiet_closed_loop(hook):
  """An unraisable-exception hook that drops tensorstore's late callbacks.

  When orbax fails to read a damaged checkpoint, tensorstore reads still in
  flight complete after orbax's event loop has closed and report
  ``RuntimeError('Event loop is closed')``; the command has already said what
  is wrong, so these are not shown.
  """

  def quiet(unraisable):
    if not (isinstance(unraisable.exc_value, RuntimeError)
            and str(unraisable.exc_value) == "Event loop is closed"):
      hook(unraisable)

  return quiet


def _not_a_failed_read(record: logging.LogRecord) -> bool:
  """A filter of asyncio's log that drops orbax's unretrieved read errors.

  When orbax fails to read a damaged checkpoint, its other reads in flight
  fail too; asyncio logs each as "Task exception was never retrieved", with a
  traceback, when it is garbage collected. The command has already said what
  is wrong, so these are not shown; any other record passes.
  """
  if "exception was never retrieved" not in record.getMessage().split("\n")[0]:
    return True
  exc = record.exc_info[1] if record.exc_info else None
  tb = exc.__traceback__ if exc is not None else None
  while tb is not None:
    if f"{os.sep}orbax{os.sep}" in tb.tb_frame.f_code.co_filename:
      return False
    tb = tb.tb_next
  return True


def main(argv=None) -> int:
  args = parser().parse_args(argv)
  sys.unraisablehook = _quiet_closed_loop(sys.unraisablehook)
  logging.getLogger("asyncio").addFilter(_not_a_failed_read)
  try:
    return args.run(args)
  except UsageError as e:
    print(f"jbptt {args.command}: error: {e}", file=sys.stderr)
    return 2
  except KeyboardInterrupt:
    saved = args.command == "train" and args.out and (
        pathlib.Path(args.out) / CHECKPOINTS).is_dir()
    print(f"jbptt {args.command}: interrupted; " + (
        f"continue with: jbptt train --resume {args.out}" if saved
        else "nothing written"), file=sys.stderr)
    return 130


if __name__ == "__main__":
  sys.exit(main())

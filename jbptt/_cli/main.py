"""The ``jbptt`` command: ``compare``, ``train`` and ``schedule``.

The options take their defaults from :mod:`jbptt._cli.config`. Bad input (k1
or k2 <= 0, an unknown task, an unusable data file, an --out that cannot be
written, a checkpoint that cannot be resumed) exits with status 2 and one
line on stderr; outputs are written to a temporary folder and moved in place
only when complete, checkpoints atomically (orbax).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib
import shutil
import sys
import tempfile

from jbptt._cli.config import CELLS, COMPARE, OUT, TRAIN, RunConfig
from jbptt._src.diagram import schedule_diagram
from jbptt._src.semantics import LOSSES

__all__ = ("UsageError", "main", "parser")

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


def cmd_schedule(args) -> int:
  """``jbptt schedule``: prints :func:`jbptt.schedule_diagram`."""
  if args.n > MAX_DIAGRAM:
    raise UsageError(f"--n {args.n} is too long to draw; use at most {MAX_DIAGRAM}")
  print(schedule_diagram(args.n, args.k1, args.k2, args.losses))
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


def _run(progress, task, config, settings: RunConfig, **kwargs):
  from jbptt._cli import experiment

  bar = progress.add_task(f"TBPTT{config.label}" if config.label[0] == "("
                          else config.label, total=settings.steps)
  return experiment.run(task, config, settings,
                        on_progress=lambda k: progress.advance(bar, k), **kwargs)


def _train_all(task, configs, settings: RunConfig, console):
  with _progress(console) as progress:
    return [_run(progress, task, config, settings) for config in configs]


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


def _task(settings: RunConfig):
  from jbptt._cli import tasks

  try:
    return tasks.get(settings.task, settings.data)
  except ValueError as e:  # DataError included
    raise UsageError(str(e)) from e


def _console():
  from rich.console import Console

  return Console(width=max(100, shutil.get_terminal_size().columns))


def _given(args) -> dict:
  """The settings given on the command line (options left out are None)."""
  names = [f.name for f in dataclasses.fields(RunConfig)]
  return {k: getattr(args, k) for k in names
          if getattr(args, k, None) is not None}


def cmd_compare(args) -> int:
  """``jbptt compare``: the canonical configurations, side by side."""
  settings = dataclasses.replace(COMPARE, **_given(args))
  task = _task(settings)
  out = _prepare_out(args.out)
  from jbptt._cli import experiment

  n, configs = experiment.canonical_configs(task)
  console = _console()
  console.print(f"[bold]jbptt compare[/]: {task.description}; {settings.steps} "
                f"steps x {settings.batch} streams; TBPTT(n, n) and TBPTT(1, n) "
                f"on sequences of n = {n}; the others on the stream, carry "
                "flowing")
  results = _train_all(task, configs, settings, console)
  console.print(_table(results, f"{task.description}, {settings.steps} steps"))
  _write(results, task, out)
  console.print(f"wrote {out / 'results.json'} and {out / 'curves.png'}")
  return 0


# A `train` run saves its settings (`RunConfig.saved()`) with its
# checkpoints; `--resume` reads them back.
CHECKPOINTS = "checkpoints"


def _settings(args, saved=None) -> RunConfig:
  """The run's settings: the saved ones, else the given ones or defaults.

  ``unroll`` is not saved: it is always the given one.
  """
  given = _given(args)
  if given.get("data") is not None:
    given["data"] = str(pathlib.Path(given["data"]).absolute())
  if saved is None:
    if given.get("task") is None and given.get("data") is None:
      raise UsageError("one of --task or --data is required (or --resume DIR)")
    for k in ("k1", "k2"):
      if k not in given:
        raise UsageError(f"--{k} is required (or --resume DIR)")
    return dataclasses.replace(TRAIN, **given)
  differ = [f"--{k} {v} (the run has {saved.get(k)})" for k, v in given.items()
            if k in saved and saved[k] != v]
  if differ:
    raise UsageError("--resume continues a run with its own settings; these "
                     "differ: " + ", ".join(differ))
  speed = {k: v for k, v in given.items() if k not in saved}
  return RunConfig(**saved, **speed)


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
      info["run"]) != set(RunConfig.saved_names()):
    raise UsageError(f"--resume {str(root)!r}: the checkpoint at step {step} "
                     "was not written by `jbptt train`")
  return step, info


def cmd_train(args) -> int:
  """``jbptt train``: one run, checkpointed, or ``--resume`` of one."""
  from jbptt import checkpoint
  from jbptt._cli import experiment

  saved = None
  if args.resume is not None:
    if args.out is not None and pathlib.Path(args.out).absolute() != pathlib.Path(
        args.resume).absolute():
      raise UsageError("--resume writes into the run's own folder; leave out "
                       "--out")
    step, saved = _resume_point(pathlib.Path(args.resume))
    args.out = args.resume
  settings = _settings(args, None if saved is None else saved["run"])
  if args.out is None:
    args.out = OUT
  task = _task(settings)
  out = _prepare_out(args.out)
  ckpts = out / CHECKPOINTS
  config = experiment.Config(f"TBPTT({settings.k1}, {settings.k2})",
                             settings.k1, settings.k2, settings.losses)
  resume = None
  if saved is not None:
    like = experiment.template(task, config, settings)
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
      checkpoint.save(ckpts, state, info={"run": settings.saved(),
                                          "progress": progress})

  console = _console()
  if saved is not None:
    console.print(f"resuming {out} at step {step} of {settings.steps}")
  with _progress(console) as progress:
    result = _run(progress, task, config, settings, resume=resume,
                  on_chunk=save)
  console.print(_table([result], f"{task.description}, {settings.steps} steps"))
  _write([result], task, out)
  console.print(f"wrote {out / 'results.json'}, {out / 'curves.png'} and "
                f"{ckpts / str(int(result.state.step))}")
  return 0


def parser() -> argparse.ArgumentParser:
  """The command's parser; defaults from :data:`jbptt._cli.config.COMPARE` /
  :data:`~jbptt._cli.config.TRAIN`."""
  p = _Parser(prog="jbptt", description="Truncated BPTT, TBPTT(k1, k2), in JAX.")
  sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

  def common(q, d: RunConfig, fill=True):
    # With fill=False, options left out stay None (`train` fills them in,
    # or takes them from the run it resumes).
    default = lambda value: value if fill else None
    q.add_argument("--out", default=default(OUT),
                   help=f"output folder (default: {OUT})")
    q.add_argument("--steps", type=_positive("--steps"), default=default(d.steps),
                   help=f"stream steps per run (default: {d.steps})")
    q.add_argument("--seed", type=int, default=default(d.seed),
                   help=f"(default: {d.seed})")
    q.add_argument("--batch", type=_positive("--batch"), default=default(d.batch),
                   help=f"parallel streams (default: {d.batch})")
    q.add_argument("--hidden", type=_positive("--hidden"),
                   default=default(d.hidden), help=f"(default: {d.hidden})")
    q.add_argument("--lr", type=_positive_float, default=default(d.lr),
                   help="Adam learning rate, gradients clipped at norm 1 "
                   f"(default: {d.lr})")
    q.add_argument("--cell", choices=CELLS, default=default(d.cell),
                   help=f"(default: {d.cell})")
    # Not a saved setting of the run: it changes the speed, never the
    # result, so a resumed run may choose another.
    q.add_argument("--unroll", type=_positive("--unroll"), default=d.unroll,
                   help="steps per iteration of the per-step loops "
                   "(jbptt.trainer's unroll); changes the speed, not the "
                   f"result (default: {d.unroll})")

  losses_help = ("which losses each update injects: new (the steps since the "
                 "previous update), window (every step of its k2 window) or "
                 f"last (its last step) (default: {TRAIN.losses})")

  q = sub.add_parser("compare", help="the canonical configurations side by side")
  q.add_argument("--task", default=COMPARE.task,
                 help=f"recall, adding or mackey-glass (default: {COMPARE.task})")
  common(q, COMPARE)
  q.set_defaults(run=cmd_compare)

  q = sub.add_parser("train", help="one TBPTT(k1, k2) run, checkpointed; "
                     "--resume DIR continues an interrupted one")
  src = q.add_mutually_exclusive_group()
  src.add_argument("--task", help="recall, adding or mackey-glass")
  src.add_argument("--data", help="a UTF-8 text file, or a .csv / .npy series")
  q.add_argument("--k1", type=_positive("--k1"), help="steps between updates")
  q.add_argument("--k2", type=_positive("--k2"),
                 help="steps each update backpropagates through")
  q.add_argument("--losses", choices=LOSSES, help=losses_help)
  q.add_argument("--resume", metavar="DIR",
                 help="continue the run whose --out was DIR from its newest "
                 "checkpoint, with its settings, to its --steps")
  common(q, TRAIN, fill=False)
  q.set_defaults(run=cmd_train)

  q = sub.add_parser("schedule", help="draw the TBPTT(k1, k2) schedule")
  q.add_argument("--n", type=_positive("--n"), required=True)
  q.add_argument("--k1", type=_positive("--k1"), required=True)
  q.add_argument("--k2", type=_positive("--k2"), required=True)
  q.add_argument("--losses", choices=LOSSES, default=TRAIN.losses,
                 help=losses_help)
  q.set_defaults(run=cmd_schedule)
  return p


def main(argv=None) -> int:
  """Runs the command on ``argv`` (default: ``sys.argv[1:]``); the exit status."""
  args = parser().parse_args(argv)
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

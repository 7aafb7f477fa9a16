"""The ``jbptt`` command: ``compare``, ``train`` and ``schedule``.

The options take their defaults from :mod:`jbptt._cli.config`. Bad input (k1
or k2 <= 0, an unknown task, an unusable data file, a column that does not
exist, a held-out fraction outside (0, 1) or a split that leaves fewer
training steps than k2, an --out that cannot be written, a checkpoint that
cannot be resumed) exits with status 2 and one line on stderr; outputs are
written to a temporary folder and moved in place only when complete,
checkpoints atomically (orbax).
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

from jbptt._cli.config import (
  ADAPTIVE_CHOICES,
  CELLS,
  COMPARE,
  DATA_OPTIONS,
  MISSING,
  OUT,
  TRAIN,
  RunConfig,
  k2_reach,
  parse_k2,
)
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


def _number(ok, allowed: str):
  """An argparse type: a float for which ``ok(value)``, else ``allowed``."""
  def parse(text):
    try:
      value = float(text)
    except ValueError:
      raise argparse.ArgumentTypeError(
          f"must be a number, got {text!r}") from None
    if not ok(value):
      raise argparse.ArgumentTypeError(f"must be {allowed}, got {text}")
    return value
  return parse


_positive_float = _number(lambda v: v > 0, "> 0")
_fraction = _number(lambda v: 0 < v < 1, "a fraction in (0, 1)")


def _k2(text):
  """``--k2`` and ``--add``: an int or a rule (``config.parse_k2``)."""
  try:
    return parse_k2(text)
  except ValueError as e:
    raise argparse.ArgumentTypeError(str(e).removeprefix("--k2 ")) from None


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
  split = task.split
  ax.set_title(task.description if split is None
               else f"{task.description}\nheld out: {split.description}",
               fontsize=10)
  if split is not None:
    ax.axhline(split.baseline_train_loss, color="grey", ls="--", lw=1,
               label=f"{split.baseline}, on the held-out part")
  if task.kind == "classification" and task.chance:
    import math

    ax.axhline(math.log(task.out_dim), color="grey", ls=":", lw=1,
               label="chance (uniform guess)")
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def _table(results, title, split=None):
  """The results' table; for a user data file (its ``split``) with the
  held-out score in the data's units beside the baseline's."""
  from rich.table import Table

  caption = ("wall s includes compilation; final loss and accuracy on "
             "held-out streams")
  columns = ["config", "k1", "k2", "updates", "wall s", "steps/s",
             "final loss", "final accuracy"]
  if split is not None:
    caption = (f"wall s includes compilation; held out: {split.description}; "
               "final loss: the training loss's, on the held-out part; "
               f"baseline: {split.baseline}")
    columns += [f"held-out {split.unit}", f"baseline {split.unit}"]
  table = Table(title=title, caption=caption)
  for col in columns:
    table.add_column(col, justify="left" if col == "config" else "right")
  for r in results:
    acc = "-" if r.final_accuracy is None else f"{r.final_accuracy:.3f}"
    row = [r.config, str(r.k1), str(r.k2), str(r.updates), f"{r.wall_s:.1f}",
           f"{r.steps_per_s:.0f}", f"{r.final_loss:.4f}", acc]
    if split is not None:
      row += [f"{r.heldout_loss:.4g}", f"{r.baseline_loss:.4g}"]
    table.add_row(*row)
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
    about = {} if task.split is None else {
        "data": task.description, "notes": list(task.split.notes)}
    (staging / "results.json").write_text(
        json.dumps([{**r.summary(), **about} for r in results], indent=2)
        + "\n")
    _plot(results, task, staging / "curves.png")
    if extra is not None:
      extra(staging)
    _commit(staging, out)


def _task(settings: RunConfig):
  from jbptt._cli import tasks

  try:
    return tasks.get(settings.task, settings.data, heldout=settings.heldout,
                     inputs=settings.inputs, targets=settings.targets,
                     missing=settings.missing)
  except ValueError as e:  # DataError included
    raise UsageError(str(e)) from e


def _console(quiet: bool = False):
  from rich.console import Console

  return Console(width=max(100, shutil.get_terminal_size().columns),
                 quiet=quiet)


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
  span = configs[-1].k1  # TBPTT(span, span): the rows --add compares with
  configs += [experiment.Config(f"(k1, {k2})", span, k2)
              for k2 in args.add or ()]
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
    options = [f"--{k}" for k in DATA_OPTIONS if k in given]
    if options and given.get("data") is None:
      raise UsageError(f"{', '.join(options)}: only with --data FILE (a "
                       f"--task generates its held-out streams afresh)")
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
  names = set(RunConfig.saved_names())
  if not isinstance(info, dict) or set(info) != {"run", "progress"} or not (
      names - set(DATA_OPTIONS) <= set(info["run"]) <= names):
    raise UsageError(f"--resume {str(root)!r}: the checkpoint at step {step} "
                     "was not written by `jbptt train`")
  older = [k for k in DATA_OPTIONS if k not in info["run"]]
  if older and info["run"]["data"] is not None:
    raise UsageError(f"--resume {str(root)!r}: written by an earlier jbptt, "
                     "whose --data runs held nothing out; start a new run")
  info["run"] = {**{k: getattr(TRAIN, k) for k in older}, **info["run"]}
  return step, info


PROCESS_OPTIONS = ("coordinator", "num_processes", "process_id")


def _start_processes(args) -> None:
  """``--distributed``: joins the run's processes
  (``jax.distributed.initialize``), before anything touches JAX's devices.

  The coordinator, process count and index are the options given, else what
  JAX finds in the environment (``JAX_COORDINATOR_ADDRESS``, SLURM, Open MPI,
  Kubernetes and other clusters JAX detects). On CPUs the processes'
  collectives are gloo's unless ``JAX_CPU_COLLECTIVES_IMPLEMENTATION`` says
  otherwise.
  """
  given = [f"--{k.replace('_', '-')}" for k in PROCESS_OPTIONS
           if getattr(args, k) is not None]
  if not args.distributed:
    if given:
      raise UsageError(f"{', '.join(given)}: only with --distributed")
    return
  import jax

  if not os.environ.get("JAX_CPU_COLLECTIVES_IMPLEMENTATION"):
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  try:
    jax.distributed.initialize(coordinator_address=args.coordinator,
                               num_processes=args.num_processes,
                               process_id=args.process_id)
  except (ValueError, RuntimeError) as e:
    raise UsageError(f"--distributed: {_first_line(e)}") from e


def _first_line(e: Exception) -> str:
  text = str(e).strip()
  return text.splitlines()[0] if text else type(e).__name__


def _lead() -> bool:
  """Whether this is the process that prints and writes the outputs (process
  0 of a --distributed run; the only one otherwise)."""
  import jax

  return jax.process_index() == 0


def _sync(name: str) -> None:
  """Waits for every process of a --distributed run (nothing on one)."""
  import jax

  if jax.process_count() > 1:
    from jax.experimental import multihost_utils

    multihost_utils.sync_global_devices(name)


def cmd_train(args) -> int:
  """``jbptt train``: one run, checkpointed, or ``--resume`` of one."""
  from jbptt import checkpoint
  from jbptt._cli import experiment

  _start_processes(args)
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
  split = task.split
  if split is not None and split.train_steps < k2_reach(settings.k2):
    raise UsageError(
        f"--heldout {settings.heldout} leaves {split.train_steps} training "
        f"steps of {pathlib.Path(settings.data).name}, fewer than --k2 "
        f"{settings.k2} reaches; hold out less or choose a smaller --k2")
  processes = _processes(settings)
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

  _sync("jbptt.train:start")  # every process checked --out first

  def save(state, progress):  # every process saves its part
    if int(state.step) > (0 if saved is None else step):
      checkpoint.save(ckpts, state, info={"run": settings.saved(),
                                          "progress": progress})

  console = _console(quiet=not _lead())
  if processes > 1:
    console.print(f"{processes} processes, {settings.batch // processes} "
                  "streams each")
  if saved is not None:
    console.print(f"resuming {out} at step {step} of {settings.steps}")
  if split is not None:
    for note in split.notes:
      console.print(f"note: {note}", highlight=False)
    console.print(f"held out: {split.description}; baseline: "
                  f"{split.baseline}", highlight=False)
  with _progress(console) as progress:
    result = _run(progress, task, config, settings, resume=resume,
                  on_chunk=save)
  console.print(_table([result], f"{task.description}, {settings.steps} steps",
                       split))
  if _lead():
    _write([result], task, out)
  _sync("jbptt.train:written")
  console.print(f"wrote {out / 'results.json'}, {out / 'curves.png'} and "
                f"{ckpts / str(int(result.state.step))}")
  return 0


def _processes(settings: RunConfig) -> int:
  """The run's process count; its streams must divide over the devices."""
  import jax

  processes, devices = jax.process_count(), jax.device_count()
  if processes > 1 and settings.batch % devices:
    raise UsageError(f"--batch {settings.batch} does not divide over the "
                     f"{devices} devices of {processes} processes")
  return processes


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

  K2_HELP = ("steps each update backpropagates through: an int, "
             "random:MEAN:MAX (unbiased randomized truncation, ARTBP: mean "
             "truncation length MEAN, at most MAX steps) or "
             "adaptive:DELTA[:C1,C2,...] (the smallest choice whose "
             "estimated relative bias is at most DELTA; default choices "
             f"{','.join(map(str, ADAPTIVE_CHOICES))})")
  losses_help = ("which losses each update injects: new (the steps since the "
                 "previous update), window (every step of its k2 window) or "
                 f"last (its last step) (default: {TRAIN.losses})")

  q = sub.add_parser("compare", help="the canonical configurations side by side")
  q.add_argument("--task", default=COMPARE.task,
                 help=f"recall, adding or mackey-glass (default: {COMPARE.task})")
  q.add_argument("--add", type=_k2, action="append", metavar="K2",
                 help="an extra row: TBPTT(k1, K2) with the k1 of the "
                 "k1 = k2 row, K2 as --k2 of train takes it, e.g. "
                 "random:8:64 or adaptive:0.1 (repeatable)")
  common(q, COMPARE)
  q.set_defaults(run=cmd_compare)

  q = sub.add_parser("train", help="one TBPTT(k1, k2) run, checkpointed; "
                     "--resume DIR continues an interrupted one")
  src = q.add_mutually_exclusive_group()
  src.add_argument("--task", help="recall, adding or mackey-glass")
  src.add_argument("--data", help="a UTF-8 text file, or a .csv / .npy series")
  q.add_argument("--k1", type=_positive("--k1"), help="steps between updates")
  q.add_argument("--k2", type=_k2, help=K2_HELP)
  q.add_argument("--losses", choices=LOSSES, help=losses_help)
  q.add_argument("--heldout", type=_fraction, metavar="FRACTION",
                 help="the fraction of a --data file held out at its end, "
                 "never trained on; the held-out score and a baseline are "
                 f"measured on it (default: {TRAIN.heldout})")
  q.add_argument("--inputs", metavar="COLUMNS",
                 help="a .csv / .npy series' input columns: names or 0-based "
                 "indices, separated by commas (default: every column)")
  q.add_argument("--targets", metavar="COLUMNS",
                 help="its target columns, predicted one row ahead, likewise "
                 "(default: the inputs)")
  q.add_argument("--missing", choices=MISSING,
                 help="missing cells (empty, NA, NaN) of the chosen columns: "
                 "refuse the file, drop their rows, fill them forward, or "
                 "interpolate them (linearly in the training part, forward in "
                 f"the held-out part) (default: {TRAIN.missing})")
  q.add_argument("--resume", metavar="DIR",
                 help="continue the run whose --out was DIR from its newest "
                 "checkpoint, with its settings, to its --steps")
  common(q, TRAIN, fill=False)
  # Not saved settings: how this run's processes meet.
  q.add_argument("--distributed", action="store_true",
                 help="one of several processes (jax.distributed.initialize): "
                 "each feeds its slice of the --batch streams, process 0 "
                 "prints and writes the outputs, all save the checkpoints "
                 "(--out on a shared file system); the coordinator, process "
                 "count and index come from the three options below or from "
                 "the environment (JAX_COORDINATOR_ADDRESS, SLURM, Open MPI, "
                 "Kubernetes, ...)")
  q.add_argument("--coordinator", metavar="HOST:PORT",
                 help="with --distributed: process 0's address")
  q.add_argument("--num-processes", type=_positive("--num-processes"),
                 help="with --distributed: how many processes")
  q.add_argument("--process-id", type=int,
                 help="with --distributed: this process's index, from 0")
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

"""The ``jbptt`` command: ``compare``, ``train`` and ``schedule``.

Bad input (k1 or k2 <= 0, an unknown task, an unusable data file, an --out
that cannot be written) exits with status 2 and one line on stderr; outputs
are written to a temporary folder and moved in place only when complete.
"""

from __future__ import annotations

import argparse
import json
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


def _train_all(task, configs, args, console):
  from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
  )

  from jbptt import experiment

  results = []
  with Progress(TextColumn("{task.description:<28}"), BarColumn(),
                MofNCompleteColumn(), TimeElapsedColumn(), console=console,
                transient=False) as progress:
    for config in configs:
      bar = progress.add_task(f"TBPTT{config.label}" if config.label[0] == "("
                              else config.label, total=args.steps)
      results.append(experiment.run(
          task, config, steps=args.steps, batch=args.batch, hidden=args.hidden,
          lr=args.lr, cell=args.cell, seed=args.seed,
          on_progress=lambda k, bar=bar: progress.advance(bar, k)))
  return results


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


def cmd_train(args) -> int:
  task = _task(args)
  out = _prepare_out(args.out)
  from flax import serialization

  from jbptt import experiment

  config = experiment.Config(f"TBPTT({args.k1}, {args.k2})", args.k1, args.k2,
                             args.policy)
  console = _console()
  (result,) = _train_all(task, [config], args, console)
  console.print(_table([result], f"{task.description}, {args.steps} steps"))

  def save_checkpoint(staging):
    (staging / "checkpoint.msgpack").write_bytes(
        serialization.to_bytes(result.state._replace(history=None)))

  _write([result], task, out, save_checkpoint)
  console.print(f"wrote {out / 'results.json'}, {out / 'curves.png'} and "
                f"{out / 'checkpoint.msgpack'}")
  return 0


def parser() -> argparse.ArgumentParser:
  p = _Parser(prog="jbptt", description="Truncated BPTT, TBPTT(k1, k2), in JAX.")
  sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

  def common(q, steps):
    q.add_argument("--out", default="jbptt-out", help="output folder")
    q.add_argument("--steps", type=_positive("--steps"), default=steps,
                   help="stream steps per run")
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--batch", type=_positive("--batch"), default=32,
                   help="parallel streams")
    q.add_argument("--hidden", type=_positive("--hidden"), default=64)
    q.add_argument("--lr", type=_positive_float, default=1e-2,
                   help="Adam learning rate (gradients clipped at norm 1)")
    q.add_argument("--cell", choices=["lstm", "gru", "mgu", "simple"],
                   default="lstm")

  q = sub.add_parser("compare", help="the canonical configurations side by side")
  q.add_argument("--task", default="recall", help="recall, adding or mackey-glass")
  common(q, 12000)
  q.set_defaults(run=cmd_compare)

  q = sub.add_parser("train", help="one TBPTT(k1, k2) run")
  src = q.add_mutually_exclusive_group(required=True)
  src.add_argument("--task", help="recall, adding or mackey-glass")
  src.add_argument("--data", help="a UTF-8 text file, or a .csv / .npy series")
  q.add_argument("--k1", type=_positive("--k1"), required=True)
  q.add_argument("--k2", type=_positive("--k2"), required=True)
  q.add_argument("--policy", choices=semantics.POLICIES, default="new")
  common(q, 6000)
  q.set_defaults(run=cmd_train)

  q = sub.add_parser("schedule", help="draw the TBPTT(k1, k2) schedule")
  q.add_argument("--n", type=_positive("--n"), required=True)
  q.add_argument("--k1", type=_positive("--k1"), required=True)
  q.add_argument("--k2", type=_positive("--k2"), required=True)
  q.add_argument("--policy", choices=semantics.POLICIES, default="new")
  q.set_defaults(run=cmd_schedule)
  return p


def main(argv=None) -> int:
  args = parser().parse_args(argv)
  try:
    return args.run(args)
  except UsageError as e:
    print(f"jbptt {args.command}: error: {e}", file=sys.stderr)
    return 2
  except KeyboardInterrupt:
    print(f"jbptt {args.command}: interrupted; nothing written", file=sys.stderr)
    return 130


if __name__ == "__main__":
  sys.exit(main())

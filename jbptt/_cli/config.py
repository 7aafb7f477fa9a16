"""``RunConfig``: the settings of a run, the one source of the CLI's defaults.

The command's options take their defaults from :data:`TRAIN` and
:data:`COMPARE`, ``jbptt train`` saves :meth:`RunConfig.saved` with its
checkpoints and ``--resume`` reads it back, and :mod:`jbptt._cli.experiment`
reads the model and training settings from a ``RunConfig``. This module
imports nothing heavy, so that building the parser stays fast.
"""

from __future__ import annotations

import dataclasses

__all__ = (
    "CELLS",
    "COMPARE",
    "DATA_OPTIONS",
    "MISSING",
    "OUT",
    "SPEED_ONLY",
    "TRAIN",
    "RunConfig",
)

CELLS = ("lstm", "gru", "mgu", "simple")
MISSING = ("error", "drop", "ffill", "interpolate")  # the choices of --missing
# The settings of a --data file. Runs saved before they existed lack them: a
# --task run resumes with their defaults (it does not read them), a --data
# run is refused (its data had no held-out part).
DATA_OPTIONS = ("heldout", "inputs", "targets", "missing")
SPEED_ONLY = ("unroll",)  # settings that change the speed, never the result
OUT = "jbptt-out"  # the default output folder


@dataclasses.dataclass(frozen=True)
class RunConfig:
  """The settings of a training run; the defaults are the command's.

  Attributes:
    task: a built-in task's name (``None``: ``data``, else ``"recall"``).
    data: a user data file, a UTF-8 text or a ``.csv`` / ``.npy`` series.
    heldout: the fraction of a ``data`` file held out, at its end: no
      training stream reaches it; the held-out score and the baseline are
      measured on it.
    inputs: a ``.csv`` / ``.npy`` file's input columns, names or 0-based
      indices separated by commas (``None``: every column).
    targets: its target columns, read from the next row, likewise
      (``None``: the inputs).
    missing: what to do with missing cells (empty, ``NA``, ``NaN``) of the
      chosen columns: ``"error"`` (refuse the file), ``"drop"`` (their
      rows), ``"ffill"`` (the last value above) or ``"interpolate"``
      (linear in the training part, forward fill in the held-out part).
    k1: steps between updates of ``jbptt train`` (``compare`` uses its
      canonical configurations instead).
    k2: steps each update backpropagates through (``jbptt train``).
    losses: which losses an update injects: ``"new"``, ``"window"`` or
      ``"last"`` (``jbptt train``).
    steps: stream steps per run.
    seed: the seed of the params, the training and the held-out streams.
    batch: parallel streams.
    hidden: the recurrent cell's width.
    lr: Adam's learning rate (gradients clipped at global norm 1).
    cell: ``"lstm"``, ``"gru"``, ``"mgu"`` or ``"simple"``.
    unroll: steps per iteration of the per-step loops, ``jbptt.trainer``'s
      ``unroll``: it changes the speed, not the result, so it is not saved
      and a resumed run may choose another.
  """

  task: str | None = None
  data: str | None = None
  heldout: float = 0.1
  inputs: str | None = None
  targets: str | None = None
  missing: str = "error"
  k1: int | None = None
  k2: int | None = None
  losses: str = "new"
  steps: int = 6000
  seed: int = 0
  batch: int = 32
  hidden: int = 64
  lr: float = 1e-2
  cell: str = "lstm"
  unroll: int = 1

  def saved(self) -> dict:
    """The JSON-able settings that a ``train`` checkpoint records."""
    return {k: v for k, v in dataclasses.asdict(self).items()
            if k not in SPEED_ONLY}

  @classmethod
  def saved_names(cls) -> tuple[str, ...]:
    """The keys of :meth:`saved`."""
    return tuple(f.name for f in dataclasses.fields(cls)
                 if f.name not in SPEED_ONLY)


TRAIN = RunConfig()
COMPARE = RunConfig(task="recall", steps=12000)

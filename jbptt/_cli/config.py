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
    "k2_reach",
    "parse_k2",
)

CELLS = ("lstm", "gru", "mgu", "simple")
MISSING = ("error", "drop", "ffill", "interpolate")  # the choices of --missing
# The settings of a --data file. Runs saved before they existed lack them: a
# --task run resumes with their defaults (it does not read them), a --data
# run is refused (its data had no held-out part).
DATA_OPTIONS = ("heldout", "inputs", "targets", "missing")
SPEED_ONLY = ("unroll",)  # settings that change the speed, never the result
OUT = "jbptt-out"  # the default output folder
ADAPTIVE_CHOICES = (2, 4, 8, 16, 32, 64)  # adaptive:DELTA without choices
K2_FORMS = ("an int >= 1, random:MEAN:MAX (MEAN >= 1, MAX an int >= 1) or "
            "adaptive:DELTA[:C1,C2,...] (DELTA in (0, 1), choices ints >= 1, "
            f"default {','.join(map(str, ADAPTIVE_CHOICES))})")


def parse_k2(text: str) -> int | str:
  """``--k2``: an int, or the canonical text of a rule (``random:MEAN:MAX``,
  ``adaptive:DELTA:C1,C2,...``); raises ValueError with the allowed forms.
  :func:`jbptt._cli.experiment.k2_rule` makes the rule of the text."""
  text = str(text).strip()
  bad = ValueError(f"--k2 must be {K2_FORMS}, got {text!r}")
  head, _, rest = text.partition(":")
  try:
    if not rest:
      value = int(text)
      if value < 1:
        raise bad
      return value
    parts = rest.split(":")
    if head == "random" and len(parts) == 2:
      mean, top = float(parts[0]), int(parts[1])
      if not (1 <= mean < float("inf")) or top < 1:
        raise bad
      return f"random:{mean:g}:{top}"
    if head == "adaptive" and len(parts) in (1, 2):
      delta = float(parts[0])
      choices = (sorted({int(c) for c in parts[1].split(",")})
                 if len(parts) == 2 else list(ADAPTIVE_CHOICES))
      if not 0 < delta < 1 or not choices or choices[0] < 1:
        raise bad
      return f"adaptive:{delta:g}:{','.join(map(str, choices))}"
  except ValueError:
    raise bad from None
  raise bad


def k2_reach(k2: int | str) -> int:
  """The steps a ``--k2`` reaches back at most (an int, ``MAX``, the
  largest choice)."""
  if isinstance(k2, int):
    return k2
  last = k2.split(":")[-1]
  return max(int(c) for c in last.split(","))


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
    k2: steps each update backpropagates through (``jbptt train``): an int
      or a rule's text (:func:`parse_k2`).
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
  k2: int | str | None = None
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

"""The keyword options of the combinators, validated eagerly."""

from __future__ import annotations

import jax
import numpy as np

HISTORIES = ("recompute", "stored")


def check_history(history) -> str:
  """Returns ``history`` or raises a ValueError listing the allowed ones."""
  if not isinstance(history, str) or history not in HISTORIES:
    raise ValueError(
        f"history must be one of {HISTORIES}, got history={history!r}."
    )
  return history


def check_remat(remat):
  """Returns ``remat`` (``None`` or a ``jax.checkpoint`` policy) or raises."""
  if remat is not None and not callable(remat):
    raise ValueError(
        "remat must be None or a jax.checkpoint policy (a callable such as "
        f"jax.checkpoint_policies.nothing_saveable), got remat={remat!r}."
    )
  return remat


def check_unroll(unroll):
  """Returns ``unroll`` (a positive int or a bool, as ``lax.scan`` takes it)
  or raises a ValueError."""
  if isinstance(unroll, (bool, np.bool_)):
    return bool(unroll)
  if isinstance(unroll, (int, np.integer)) and unroll >= 1:
    return int(unroll)
  raise ValueError(
      "unroll must be a positive int or a bool (as jax.lax.scan takes it), "
      f"got unroll={unroll!r}."
  )


def rematted(step_loss, remat):
  """``step_loss`` wrapped in ``jax.checkpoint(..., policy=remat)``, or as is."""
  if remat is None:
    return step_loss
  return jax.checkpoint(step_loss, policy=remat)

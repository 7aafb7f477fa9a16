"""The keyword options of the combinators, validated eagerly."""

from __future__ import annotations

import jax
import numpy as np

HISTORIES = ("recompute", "stored")

# unroll=None on a GPU: per-step loops of a few small kernels each pay the
# loop's per-iteration cost there; unrolling 8 steps ran the trainer 1.9x to
# 2.4x faster on an H100, and slower on the CPU for a B=32, H=128 LSTM
# (README, Performance).
GPU_UNROLL = 8


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
  """Returns ``unroll`` (``None``, or a positive int or a bool as
  ``lax.scan`` takes it) or raises a ValueError."""
  if unroll is None:
    return None
  if isinstance(unroll, (bool, np.bool_)):
    return bool(unroll)
  if isinstance(unroll, (int, np.integer)) and unroll >= 1:
    return int(unroll)
  raise ValueError(
      "unroll must be None, a positive int or a bool (as jax.lax.scan takes "
      f"it), got unroll={unroll!r}."
  )


def resolved_unroll(unroll):
  """``unroll`` as given, or for ``None`` the default of JAX's default
  backend (read when the computation is traced): ``GPU_UNROLL`` on a GPU, 1
  elsewhere."""
  if unroll is not None:
    return unroll
  return GPU_UNROLL if jax.default_backend() == "gpu" else 1


def rematted(step_loss, remat):
  """``step_loss`` wrapped in ``jax.checkpoint(..., policy=remat)``, or as is."""
  if remat is None:
    return step_loss
  return jax.checkpoint(step_loss, policy=remat)

"""Checkpoint and resume of a training stream: the whole ``TrainState``.

A long stream must survive a restart without losing its place. :func:`save`
writes everything a :class:`jbptt.TrainState` holds -- params, optimizer
state, the stream's carry and initial carry, the step counter, the pending
steps and window buffers of its history -- with orbax-checkpoint, under
``directory/<step>`` (``step`` is the stream step). :func:`restore` reads it
back into the structure of a template state, so that training continues with
exactly the params an uninterrupted run would have.

Guarantees:

* Writes are atomic: orbax writes into a temporary folder and renames it when
  complete; an interrupted save leaves the previous checkpoints as they were
  and is never read back.
* A checkpoint records, for every leaf, its path in the state, shape, dtype
  and a SHA-256 of its bytes. :func:`restore` compares paths, shapes and
  dtypes against the template *before* reading any array, and the checksums
  after; a corrupt, truncated or mismatched checkpoint raises
  :class:`CheckpointError` naming what does not match. Nothing is returned
  but a complete state.
* ``info`` (a JSON-able dict, e.g. the run's ``k1``, ``k2`` and data) is
  stored with the state; ``restore(..., info=...)`` checks it.

The template must have the checkpoint's structure: a state whose history
buffers are allocated, e.g. ``trainer.init(params, carry, xs, resets)`` with a
chunk of the stream (see :func:`jbptt.trainer`), or any state after an
``update``. Sharded templates (see :mod:`jbptt.sharding`) are restored with
their shardings, on one host or many.

Examples:
  >>> import tempfile, jax.numpy as jnp, optax, jbptt, jbptt.checkpoint
  >>> def step_loss(w, h, x):
  ...   h = jnp.tanh(w * h + x)
  ...   return h, (h - 0.5) ** 2
  >>> tr = jbptt.trainer(step_loss, optax.adam(0.1), k1=4, k2=8)
  >>> xs = jnp.linspace(0.0, 1.0, 10)
  >>> state, _ = tr.update(tr.init(jnp.float32(0.3), jnp.float32(0.0)), xs[:6])
  >>> root = tempfile.mkdtemp()
  >>> path = jbptt.checkpoint.save(root, state, info={"k1": 4, "k2": 8})
  >>> like = tr.init(jnp.float32(0.0), jnp.float32(0.0), xs)
  >>> back = jbptt.checkpoint.restore(root, like, info={"k1": 4, "k2": 8})
  >>> int(back.step), bool(back.params == state.params)
  (6, True)

References:
  orbax-checkpoint, https://orbax.readthedocs.io (CheckpointManager,
  StandardSave / StandardRestore, JsonSave).
"""

from __future__ import annotations

import hashlib
import json
import pathlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jbptt._src.trainer import TrainState

__all__ = ("CheckpointError", "latest_step", "read_info", "restore", "save")

FORMAT = "jbptt.checkpoint/1"
_MAX_LISTED = 6


class CheckpointError(ValueError):
  """A checkpoint that cannot be restored; the message says what is wrong."""


def _ocp():
  import orbax.checkpoint as ocp  # a Flax dependency; imported when used

  return ocp


def _manager(directory, *, keep: int | None = None, create: bool = False):
  ocp = _ocp()
  options = ocp.CheckpointManagerOptions(
      max_to_keep=keep, create=create, enable_async_checkpointing=False
  )
  return ocp.CheckpointManager(
      pathlib.Path(directory).absolute(), options=options
  )


def _leaves(state) -> tuple[list[str], list[Any], Any]:
  if not isinstance(state, TrainState):
    raise TypeError(
        f"expected a jbptt.TrainState, got {type(state).__name__}."
    )
  with_path, treedef = jax.tree_util.tree_flatten_with_path(state)
  paths = [jax.tree_util.keystr(p) for p, _ in with_path]
  return paths, [leaf for _, leaf in with_path], treedef


def _spec(leaf) -> tuple[tuple[int, ...], str]:
  dtype = leaf.dtype if hasattr(leaf, "dtype") else jnp.asarray(leaf).dtype
  return tuple(int(d) for d in np.shape(leaf)), str(dtype)


def _digest(leaf) -> str | None:
  """SHA-256 of a leaf's bytes; ``None`` where this host does not hold all."""
  if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
    return None
  data = np.ascontiguousarray(np.asarray(leaf))
  return hashlib.sha256(data.tobytes()).hexdigest()


def _key(i: int) -> str:
  return f"leaf_{i:05d}"


def save(directory, state: TrainState, *, info: dict | None = None,
         keep: int | None = 2) -> pathlib.Path:
  """Writes ``state`` atomically to ``directory/<state.step>``.

  Args:
    directory: the folder of a stream's checkpoints (created if needed).
    state: the :class:`jbptt.TrainState` to save, whole.
    info: an optional JSON-able dict stored with it (e.g. ``k1``, ``k2``).
    keep: how many of the newest checkpoints to keep in ``directory``
      (older ones are deleted after the new one is complete); ``None``
      keeps all.

  Returns:
    The path of the new checkpoint.

  Raises:
    CheckpointError: if ``directory`` already has a checkpoint at this step.
    TypeError: if ``state`` is not a ``TrainState``.
    ValueError: for a bad ``keep`` or an ``info`` that is not JSON-able.
  """
  if keep is not None and (isinstance(keep, bool) or not isinstance(keep, int)
                           or keep < 1):
    raise ValueError(f"keep must be a positive int or None, got {keep!r}.")
  try:
    json.dumps(info, allow_nan=False)
  except (TypeError, ValueError) as e:
    raise ValueError(f"info must be a JSON-able dict or None: {e}.") from e
  ocp = _ocp()
  paths, leaves, _ = _leaves(state)
  step = int(state.step)
  manifest = {
      "format": FORMAT,
      "step": step,
      "leaves": [
          {"path": p, "shape": list(_spec(v)[0]), "dtype": _spec(v)[1],
           "sha256": _digest(v)}
          for p, v in zip(paths, leaves)
      ],
      "info": info,
  }
  arrays = {_key(i): v if isinstance(v, (jax.Array, np.ndarray))
            else np.asarray(v) for i, v in enumerate(leaves)}
  with _manager(directory, keep=keep, create=True) as mngr:
    if step in mngr.all_steps():
      raise CheckpointError(
          f"{mngr.directory} already has a checkpoint at step {step}."
      )
    mngr.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(arrays),
        manifest=ocp.args.JsonSave(manifest),
    ))
    mngr.wait_until_finished()
    return pathlib.Path(mngr.directory) / str(step)


def latest_step(directory) -> int | None:
  """The newest complete checkpoint's step in ``directory``, or ``None``."""
  if not pathlib.Path(directory).is_dir():
    return None
  with _manager(directory) as mngr:
    return mngr.latest_step()


def _pick_step(mngr, directory, step):
  steps = mngr.all_steps()
  if not steps:
    raise CheckpointError(f"no checkpoint in {directory}.")
  if step is None:
    return max(steps)
  if step not in steps:
    raise CheckpointError(
        f"no checkpoint at step {step} in {directory}; it has "
        f"{sorted(steps)}."
    )
  return step


def _brief(error: Exception, limit: int = 300) -> str:
  """The first line of an orbax / tensorstore error, without its spec dump."""
  text = (str(error).splitlines() or [""])[0].split(" [tensorstore_spec=")[0]
  return text if len(text) <= limit else text[: limit - 3] + "..."


def _read_manifest(mngr, step, where) -> dict:
  ocp = _ocp()
  try:
    manifest = mngr.restore(step, args=ocp.args.Composite(
        manifest=ocp.args.JsonRestore()))["manifest"]
  except Exception as e:  # noqa: BLE001 -- any failure: unreadable
    raise CheckpointError(
        f"{where} is corrupt or incomplete: its manifest cannot be read "
        f"({type(e).__name__}: {_brief(e)})."
    ) from e
  if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
    raise CheckpointError(f"{where} is not a jbptt checkpoint ({FORMAT}).")
  return manifest


def read_info(directory, *, step: int | None = None) -> dict | None:
  """The ``info`` dict saved with a checkpoint (default: the newest)."""
  directory = pathlib.Path(directory)
  if not directory.is_dir():
    raise CheckpointError(f"no checkpoint in {directory}: not a folder.")
  with _manager(directory) as mngr:
    step = _pick_step(mngr, directory, step)
    return _read_manifest(mngr, step, directory / str(step))["info"]


def _listed(items):
  shown = "; ".join(items[:_MAX_LISTED])
  more = len(items) - _MAX_LISTED
  return shown + (f"; and {more} more" if more > 0 else "")


def _check_structure(manifest, paths, leaves, where):
  saved = {e["path"]: e for e in manifest["leaves"]}
  problems = []
  missing = [p for p in paths if p not in saved]
  extra = [p for p in saved if p not in set(paths)]
  if missing:
    problems.append("the template has leaves the checkpoint lacks: "
                    + ", ".join(missing[:_MAX_LISTED]))
  if extra:
    problems.append("the checkpoint has leaves the template lacks: "
                    + ", ".join(extra[:_MAX_LISTED]))
  for p, v in zip(paths, leaves):
    if p not in saved:
      continue
    shape, dtype = _spec(v)
    want_shape, want_dtype = tuple(saved[p]["shape"]), saved[p]["dtype"]
    if shape != want_shape or dtype != want_dtype:
      problems.append(
          f"{p}: {want_dtype}{list(want_shape)} in the checkpoint, "
          f"{dtype}{list(shape)} in the template"
      )
  if problems:
    hint = ""
    if any(p.startswith(".history") for p in missing + extra):
      hint = (" (a template needs its history buffers: build it with "
              "trainer.init(params, carry, xs, resets) from a chunk of the "
              "stream, with the same k1, k2 and resets shape)")
    raise CheckpointError(
        f"{where} does not match the template: {_listed(problems)}{hint}."
    )
  return [saved[p] for p in paths]


def _check_info(manifest, info, where):
  saved = manifest["info"]
  if saved == info:
    return
  if not isinstance(saved, dict) or not isinstance(info, dict):
    raise CheckpointError(f"{where}: info {saved!r} was saved, {info!r} "
                          "was expected.")
  diffs = [f"{k}: {saved.get(k, '<missing>')!r} saved, "
           f"{info.get(k, '<missing>')!r} expected"
           for k in sorted(set(saved) | set(info), key=str)
           if saved.get(k, "<missing>") != info.get(k, "<missing>")]
  raise CheckpointError(f"{where} was saved for another run: {_listed(diffs)}.")


def _abstract(leaf):
  shape, dtype = _spec(leaf)
  sharding = leaf.sharding if isinstance(leaf, jax.Array) else None
  return jax.ShapeDtypeStruct(shape, jnp.dtype(dtype), sharding=sharding)


def _place(value, leaf):
  """The restored ``value`` as the template ``leaf``'s kind of array."""
  if value is None or not isinstance(leaf, jax.Array):
    return value
  if isinstance(value, jax.Array) and value.sharding == leaf.sharding:
    return value
  return jax.device_put(value, leaf.sharding)


def restore(directory, like: TrainState, *, step: int | None = None,
            info: dict | None = None) -> TrainState:
  """Reads a checkpoint saved by :func:`save` into the structure of ``like``.

  Args:
    directory: the folder given to :func:`save`.
    like: a template ``TrainState`` with the checkpoint's structure, shapes
      and dtypes (its values are not used; its shardings are).
    step: which checkpoint (default: the newest complete one).
    info: if given, the ``info`` the checkpoint must have been saved with.

  Returns:
    The saved state, every leaf restored.

  Raises:
    CheckpointError: no checkpoint; a checkpoint that is corrupt, truncated
      or not jbptt's; one whose leaves, shapes, dtypes or ``info`` do not
      match; the message names what does not match.
  """
  ocp = _ocp()
  directory = pathlib.Path(directory)
  if not directory.is_dir():
    raise CheckpointError(f"no checkpoint in {directory}: not a folder.")
  paths, leaves, treedef = _leaves(like)
  with _manager(directory) as mngr:
    step = _pick_step(mngr, directory, step)
    where = f"checkpoint {directory / str(step)}"
    manifest = _read_manifest(mngr, step, where)
    if info is not None:
      _check_info(manifest, info, where)
    entries = _check_structure(manifest, paths, leaves, where)
    abstract = {_key(i): _abstract(v) for i, v in enumerate(leaves)}
    try:
      arrays = mngr.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract)))["state"]
    except Exception as e:  # noqa: BLE001 -- any failure: unreadable
      raise CheckpointError(
          f"{where} is corrupt or incomplete: its arrays cannot be read "
          f"({type(e).__name__}: {_brief(e)})."
      ) from e
  values = [_place(arrays.get(_key(i)), leaf) for i, leaf in enumerate(leaves)]
  bad = [e["path"] for e, v in zip(entries, values)
         if v is None or _spec(v) != (tuple(e["shape"]), e["dtype"])
         or (e["sha256"] is not None and _digest(v) not in (None, e["sha256"]))]
  if bad:
    raise CheckpointError(
        f"{where} is corrupt: these leaves do not match their recorded "
        f"checksums: {', '.join(bad[:_MAX_LISTED])}."
    )
  return jax.tree_util.tree_unflatten(treedef, values)


"""Checkpoint and resume of a training stream: the whole ``TrainState``.

A long stream must survive a restart without losing its place. :func:`save`
writes everything a :class:`jbptt.TrainState` holds -- params, optimizer
state, the stream's carry and initial carry, the step counter, the pending
steps and window buffers of its history -- with orbax-checkpoint, under
``directory/<step>`` (``step`` is the stream step). :func:`restore` reads it
back into the structure of a template state, so that training continues with
exactly the params an uninterrupted run would have.

Guarantees:

* Writes are atomic: orbax writes the arrays into a temporary folder and
  renames it when complete; then the checkpoint's manifest, ``jbptt.json``,
  is written (to a temporary file, renamed). A checkpoint is complete when
  its manifest is there: an interrupted save leaves the previous checkpoints
  as they were and is never read back, and the checkpoints beyond ``keep``
  are deleted only once the new one is complete.
* The manifest records, for every leaf, its path in the state, shape, dtype
  and a SHA-256 of its bytes, and, for every file of the checkpoint, its size
  and SHA-256. :func:`restore` compares paths, shapes and dtypes against the
  template, then every file's size and checksum, *before orbax reads any
  array*, and the leaves' checksums after; a corrupt, truncated or
  mismatched checkpoint raises one :class:`CheckpointError` naming what does
  not match, and leaves nothing running behind it. Nothing is returned but a
  complete state.
* ``info`` (a JSON-able dict, e.g. the run's ``k1``, ``k2`` and data) is
  stored with the state; ``restore(..., info=...)`` checks it.

The template must have the checkpoint's structure: a state from
``trainer.init(params, carry, xs, resets)`` (see :func:`jbptt.trainer`), or
any state after an ``update``. Sharded templates (see :mod:`jbptt.sharding`)
are restored with their shardings, on one host or many: every leaf gets the
template's sharding (a leaf the template holds uncommitted, such as an
optimizer's step count made by ``jnp.zeros``, comes back uncommitted).

On several processes (``jax.distributed.initialize``), every process calls
:func:`save` and :func:`restore` with its part of the same state, and the
checks are split so that every byte is checked by someone:

* every process checks every file's size and SHA-256 (the folder is shared);
* a leaf some process holds whole (replicated params, the optimizer state,
  the step) has a SHA-256 of all its bytes, checked by every process;
* a leaf no process holds whole (a carry sharded over the batch) has a
  SHA-256 per shard, recorded at save by the process holding it (the
  ``shards`` entry of its leaf in ``jbptt.json``, keyed by the shard's place
  ``"start:stop,..."``); at restore each process checks the shards it holds
  that have a recorded place. Restored on another layout (another number of
  processes), the shards' places differ and these leaves are covered by the
  files' checksums alone.

A failed check on any process raises :class:`CheckpointError` on all of
them. A checkpoint saved on N processes can be restored on any other number
(orbax reads each process's part from the global arrays).

Checkpoints written by jbptt before 1.0 (format ``jbptt.checkpoint/1``, with
no ``jbptt.json``) are refused with a :class:`CheckpointError` that says so.

Examples:
  >>> import tempfile, jax.numpy as jnp, optax, jbptt, jbptt.checkpoint
  >>> def step_loss(w, h, x):
  ...   h = jnp.tanh(w * h + x)
  ...   return h, (h - 0.5) ** 2
  >>> tr = jbptt.trainer(step_loss, optax.adam(0.1), k1=4, k2=8)
  >>> xs = jnp.linspace(0.0, 1.0, 10)
  >>> state = tr.init(jnp.float32(0.3), jnp.float32(0.0), xs)
  >>> state, _ = tr.update(state, xs[:6])
  >>> root = tempfile.mkdtemp()
  >>> path = jbptt.checkpoint.save(root, state, info={"k1": 4, "k2": 8})
  >>> like = tr.init(jnp.float32(0.0), jnp.float32(0.0), xs)
  >>> back = jbptt.checkpoint.restore(root, like, info={"k1": 4, "k2": 8})
  >>> int(back.step), bool(back.params == state.params)
  (6, True)

References:
  orbax-checkpoint, https://orbax.readthedocs.io (CheckpointManager,
  StandardSave / StandardRestore).
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jbptt._src.trainer import TrainState

__all__ = ("CheckpointError", "latest_step", "read_info", "restore", "save")

FORMAT = "jbptt.checkpoint/2"
_OLD_FORMATS = ("jbptt.checkpoint/1",)
_MANIFEST = "jbptt.json"
_ARRAYS = "state"
_MAX_LISTED = 6


class CheckpointError(ValueError):
  """A checkpoint that cannot be read: missing, incomplete, corrupt, of an
  older format, or not made for the template or ``info`` given.

  A ``ValueError``; its message names the checkpoint's folder and says what
  is wrong (the step asked for that does not exist, the files or leaves
  whose checksums differ, the fields of the template that differ). Raised by
  :func:`restore` and :func:`read_info`, before any value is returned: a
  state is restored whole or not at all.
  """


def _ocp():
  import orbax.checkpoint as ocp  # a Flax dependency; imported when used

  return ocp


def _manager(directory, *, create: bool = False):
  ocp = _ocp()
  options = ocp.CheckpointManagerOptions(
      create=create, enable_async_checkpointing=False
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


def _whole(leaf) -> bool:
  """Whether this process can read all of ``leaf`` (held whole here)."""
  return not isinstance(leaf, jax.Array) or (
      leaf.is_fully_addressable or leaf.is_fully_replicated)


def _sha(data) -> str:
  return hashlib.sha256(np.ascontiguousarray(data).tobytes()).hexdigest()


def _digest(leaf) -> str | None:
  """SHA-256 of a leaf's bytes; ``None`` where no process holds it whole."""
  return _sha(np.asarray(leaf)) if _whole(leaf) else None


def _index_key(index, shape) -> str:
  """A shard's place in its global array, e.g. ``"0:4,0:3"``."""
  return ",".join(f"{a}:{b}" for a, b, _ in
                  (s.indices(d) for s, d in zip(index, shape)))


def _shard_digests(leaf, *, primary: bool = True) -> dict[str, str]:
  """SHA-256 of each shard this process holds, keyed by its place.

  Args:
    leaf: a ``jax.Array``.
    primary: only the shards of replica 0 (each part of the array once over
      all processes); else every addressable shard.

  Returns:
    ``{index key: sha256}``.
  """
  return {_index_key(s.index, leaf.shape): _sha(np.asarray(s.data))
          for s in leaf.addressable_shards if not primary or s.replica_id == 0}


def _file_digest(path: pathlib.Path) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      h.update(block)
  return h.hexdigest()


def _files(step_dir: pathlib.Path) -> dict[str, dict]:
  """Size and SHA-256 of every file orbax wrote for a checkpoint."""
  return {
      p.relative_to(step_dir).as_posix(): {
          "size": p.stat().st_size, "sha256": _file_digest(p)}
      for p in sorted(step_dir.rglob("*"))
      if p.is_file() and not p.name.startswith(_MANIFEST)
  }


def _write_json(target: pathlib.Path, value) -> None:
  """Writes ``value`` atomically: a temporary file, synced, renamed."""
  tmp = target.with_name(f"{target.name}.tmp")
  with open(tmp, "w") as f:
    json.dump(value, f, indent=1)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, target)


def _write_manifest(step_dir: pathlib.Path, manifest: dict) -> None:
  """Writes ``jbptt.json`` atomically."""
  _write_json(step_dir / _MANIFEST, manifest)


def _part(process: int) -> str:
  return f"{_MANIFEST}.shards.{process}"


def _merge_parts(step_dir: pathlib.Path, processes: int) -> dict:
  """The shard checksums every process wrote: ``{path: {index: sha256}}``.

  The parts are deleted once read; the merged checksums go into the
  manifest.
  """
  merged: dict[str, dict[str, str]] = {}
  for i in range(processes):
    part = step_dir / _part(i)
    for path, digests in json.loads(part.read_text()).items():
      merged.setdefault(path, {}).update(digests)
    part.unlink()
  return merged


def _barrier(name: str) -> None:
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils

    multihost_utils.sync_global_devices(name)


def _key(i: int) -> str:
  return f"leaf_{i:05d}"


def _complete(root: pathlib.Path, steps) -> list[int]:
  return sorted(s for s in steps if (root / str(s) / _MANIFEST).is_file())


def save(directory, state: TrainState, *, info: dict | None = None,
         keep: int | None = 2) -> pathlib.Path:
  """Writes ``state`` atomically to ``directory/<state.step>``.

  Args:
    directory: the folder of a stream's checkpoints (created if needed).
    state: the :class:`jbptt.TrainState` to save, whole.
    info: an optional JSON-able dict stored with it (e.g. ``k1``, ``k2``).
    keep: how many of the newest complete checkpoints to keep in
      ``directory`` (older ones are deleted after the new one is complete);
      ``None`` keeps all.

  Returns:
    The path of the new checkpoint.

  Raises:
    CheckpointError: if ``directory`` already has a checkpoint at this step
      (the remains of an interrupted save are replaced).
    TypeError: if ``state`` is not a ``TrainState``.
    ValueError: for a bad ``keep`` or an ``info`` that is not JSON-able.

  Examples:
    >>> import tempfile, jax.numpy as jnp, optax, jbptt, jbptt.checkpoint as jc
    >>> def step_loss(p, h, x):
    ...   h = jnp.tanh(p * h + x)
    ...   return h, jnp.mean(h ** 2)
    >>> tr = jbptt.trainer(step_loss, optax.sgd(0.1), k1=2, k2=2)
    >>> xs = jnp.ones((3, 4))
    >>> state, _ = tr.update(tr.init(jnp.float32(0.5), jnp.zeros(4), xs), xs)
    >>> folder = tempfile.mkdtemp()
    >>> _ = jc.save(folder, state, info={"k1": 2})
    >>> jc.latest_step(folder), jc.read_info(folder)
    (3, {'k1': 2})
    >>> back = jc.restore(folder, tr.init(jnp.float32(0.5), jnp.zeros(4), xs))
    >>> int(back.step), float(back.params) == float(state.params)
    (3, True)
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
  with _manager(directory, create=True) as mngr:
    root = pathlib.Path(mngr.directory)
    path = root / str(step)
    if step in mngr.all_steps():
      if _complete(root, [step]) or (path / "manifest").is_dir():
        raise CheckpointError(
            f"{root} already has a checkpoint at step {step}."
        )
      mngr.delete(step)  # arrays without a manifest: an interrupted save
    mngr.save(step, args=ocp.args.Composite(
        **{_ARRAYS: ocp.args.StandardSave(arrays)}), force=True)
    mngr.wait_until_finished()
    split = {p: _shard_digests(v) for p, v in zip(paths, leaves)
             if not _whole(v)}
    if split:  # each process's shards' checksums, merged by process 0
      _write_json(path / _part(jax.process_index()), split)
      _barrier(f"jbptt.checkpoint.shards:{step}")
    if jax.process_index() == 0:
      if split:
        shards = _merge_parts(path, jax.process_count())
        for entry in manifest["leaves"]:
          entry["shards"] = shards.get(entry["path"])
      _write_manifest(path, {**manifest, "files": _files(path)})
    _barrier(f"jbptt.checkpoint.save:{step}")
    if keep is not None:
      kept = _complete(root, mngr.all_steps())[-keep:]
      for old in mngr.all_steps():
        if old < kept[0]:
          mngr.delete(old)
    return path


def latest_step(directory) -> int | None:
  """The newest complete checkpoint's step in ``directory``.

  A checkpoint is complete once :func:`save` has written its manifest;
  one whose save was interrupted is never reported.

  Args:
    directory: the folder given to :func:`save`; it need not exist.

  Returns:
    The step (an int), or ``None`` if the folder has no complete
    checkpoint or does not exist.
  """
  if not pathlib.Path(directory).is_dir():
    return None
  with _manager(directory) as mngr:
    steps = _complete(pathlib.Path(mngr.directory), mngr.all_steps())
  return steps[-1] if steps else None


def _why_not(step_dir: pathlib.Path) -> str:
  """Why a checkpoint folder without ``jbptt.json`` cannot be read."""
  try:
    old = json.loads((step_dir / "manifest" / "metadata").read_text())
    old = old.get("format") if isinstance(old, dict) else None
  except (OSError, ValueError):
    old = None
  if old in _OLD_FORMATS:
    return (f"it was written by jbptt before 1.0 ({old}), which this version "
            f"does not read (it reads {FORMAT}); restore it with that jbptt, "
            "or start the run again")
  return (f"it has no {_MANIFEST} (an interrupted save, or a damaged "
          "checkpoint)")


def _pick_step(mngr, directory, step) -> int:
  root = pathlib.Path(mngr.directory)
  steps = sorted(mngr.all_steps())
  complete = _complete(root, steps)
  if step is None:
    if complete:
      return complete[-1]
    if not steps:
      raise CheckpointError(f"no checkpoint in {directory}.")
    raise CheckpointError(
        f"no complete checkpoint in {directory}: step {steps[-1]} is "
        f"corrupt or incomplete: {_why_not(root / str(steps[-1]))}."
    )
  if step not in steps:
    raise CheckpointError(
        f"no checkpoint at step {step} in {directory}; it has "
        f"{steps}."
    )
  if step not in complete:
    raise CheckpointError(
        f"checkpoint {directory / str(step)} is corrupt or incomplete: "
        f"{_why_not(root / str(step))}."
    )
  return step


def _read_manifest(step_dir: pathlib.Path, where: str) -> dict:
  try:
    manifest = json.loads((step_dir / _MANIFEST).read_text())
  except (OSError, ValueError) as e:
    raise CheckpointError(
        f"{where} is corrupt or incomplete: its {_MANIFEST} cannot be read "
        f"({type(e).__name__}: {e})."
    ) from e
  if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
    raise CheckpointError(f"{where} is not a jbptt checkpoint ({FORMAT}).")
  ok = (isinstance(manifest.get("leaves"), list)
        and isinstance(manifest.get("files"), dict) and "info" in manifest
        and all(isinstance(e, dict) and {"path", "shape", "dtype", "sha256"}
                <= set(e) for e in manifest["leaves"])
        and all(isinstance(e, dict) and isinstance(e.get("size"), int)
                and isinstance(e.get("sha256"), str)
                for e in manifest["files"].values()))
  if not ok:
    raise CheckpointError(
        f"{where} is corrupt: its {_MANIFEST} lacks entries of {FORMAT}."
    )
  return manifest


def read_info(directory, *, step: int | None = None) -> dict | None:
  """The ``info`` saved with a checkpoint, without reading its arrays.

  Args:
    directory: the folder given to :func:`save`.
    step: the checkpoint's step; ``None``: the newest complete one.

  Returns:
    The ``info`` dict given to :func:`save` (JSON values), or ``None`` if it
    was saved without one.

  Raises:
    CheckpointError: if ``directory`` is not a folder, has no such step, or
      the checkpoint's manifest is missing or unreadable.
  """
  directory = pathlib.Path(directory)
  if not directory.is_dir():
    raise CheckpointError(f"no checkpoint in {directory}: not a folder.")
  with _manager(directory) as mngr:
    step = _pick_step(mngr, directory, step)
  return _read_manifest(directory / str(step),
                        f"checkpoint {directory / str(step)}")["info"]


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
      hint = (" (the history buffers differ: build the template with "
              "trainer.init(params, carry, xs, resets) of a trainer with the "
              "same k1 and k2, giving resets if the saved stream had them)")
    raise CheckpointError(
        f"{where} does not match the template: {_listed(problems)}{hint}."
    )
  return [saved[p] for p in paths]


def _check_files(manifest, step_dir: pathlib.Path, where: str) -> None:
  """Every file the checkpoint was saved with is there, whole and intact.

  Run before orbax is given the checkpoint, because orbax cannot fail a read
  cleanly: its ``restore`` starts the reads of all arrays at once
  (``asyncio.gather`` without ``return_exceptions``) in an event loop of its
  own (``asyncio_utils.run_sync``), which it closes as soon as the first
  read fails, with the others still in flight and never cancelled or
  awaited. Those report afterwards: tensorstore's threads, completing a read,
  hit the closed loop (``RuntimeError('Event loop is closed')`` on
  ``sys.unraisablehook``), and asyncio logs "Task exception was never
  retrieved" when the failed tasks are collected. No orbax API gives access
  to that loop or those tasks to wait for them. So damage is found here, and
  orbax only reads a checkpoint whose every byte is as saved.
  """
  problems = []
  for name, entry in manifest["files"].items():
    f = step_dir / name
    if not f.is_file():
      problems.append(f"{name} is missing")
    elif f.stat().st_size != entry["size"]:
      problems.append(f"{name} has {f.stat().st_size} bytes, "
                      f"{entry['size']} were saved")
    elif _file_digest(f) != entry["sha256"]:
      problems.append(f"{name} does not match its checksum")
  if not any(n.startswith(f"{_ARRAYS}/") for n in manifest["files"]):
    problems.append(f"its {_MANIFEST} lists no array files")
  if problems:
    raise CheckpointError(
        f"{where} is corrupt or incomplete: {_listed(problems)}."
    )


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


def _brief(error: Exception, limit: int = 300) -> str:
  """The first line of an orbax / tensorstore error, without its spec dump."""
  text = (str(error).splitlines() or [""])[0].split(" [tensorstore_spec=")[0]
  return text if len(text) <= limit else text[: limit - 3] + "..."


def _abstract(leaf):
  shape, dtype = _spec(leaf)
  sharding = leaf.sharding if isinstance(leaf, jax.Array) else None
  return jax.ShapeDtypeStruct(shape, jnp.dtype(dtype), sharding=sharding)


def _place(value, leaf):
  """The restored ``value`` as the template ``leaf``'s kind of array.

  A leaf the template holds committed to its sharding is placed there; an
  uncommitted one (``jnp.zeros(())`` made on the default device, such as an
  optimizer's step count) comes back uncommitted, so that jit may move it
  beside arrays on a mesh of several processes' devices, as it could the
  template's.
  """
  if value is None or not isinstance(leaf, jax.Array):
    return value
  if not leaf.committed:
    return jax.device_put(np.asarray(value))
  if isinstance(value, jax.Array) and value.sharding == leaf.sharding:
    return value
  return jax.device_put(value, leaf.sharding)


def _corrupt(entry, value) -> bool:
  """Whether a restored leaf differs from what ``save`` recorded.

  This process checks what it can read of ``value``: the whole leaf's
  SHA-256 where the leaf is held whole here and was saved whole; else each
  shard it holds whose place in the array matches a shard recorded at save
  (a checkpoint restored with the layout it was saved with has every shard
  checked by the process holding it; shards of another layout are covered
  by the files' checksums only).
  """
  if value is None or _spec(value) != (tuple(entry["shape"]), entry["dtype"]):
    return True
  if entry["sha256"] is not None and _whole(value):
    return _digest(value) != entry["sha256"]
  saved = entry.get("shards") or {}
  if not isinstance(value, jax.Array):
    return False
  held = _shard_digests(value, primary=False)
  return any(saved[k] != d for k, d in held.items() if k in saved)


def _anywhere(flag: bool) -> bool:
  """Whether ``flag`` holds on any process (all processes must call it)."""
  if jax.process_count() == 1:
    return flag
  from jax.experimental import multihost_utils

  return bool(np.any(multihost_utils.process_allgather(np.int32(flag))))


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
    CheckpointError: no checkpoint; a checkpoint that is corrupt, truncated,
      incomplete or not jbptt's (or of jbptt before 1.0); one whose leaves,
      shapes, dtypes or ``info`` do not match; the message names what does
      not match.

  Examples:
    See :func:`save`.
  """
  ocp = _ocp()
  directory = pathlib.Path(directory)
  if not directory.is_dir():
    raise CheckpointError(f"no checkpoint in {directory}: not a folder.")
  paths, leaves, treedef = _leaves(like)
  with _manager(directory) as mngr:
    step = _pick_step(mngr, directory, step)
    step_dir = pathlib.Path(mngr.directory) / str(step)
    where = f"checkpoint {directory / str(step)}"
    manifest = _read_manifest(step_dir, where)
    if info is not None:
      _check_info(manifest, info, where)
    entries = _check_structure(manifest, paths, leaves, where)
    _check_files(manifest, step_dir, where)
    abstract = {_key(i): _abstract(v) for i, v in enumerate(leaves)}
    try:
      arrays = mngr.restore(step, args=ocp.args.Composite(
          **{_ARRAYS: ocp.args.StandardRestore(abstract)}))[_ARRAYS]
    except Exception as e:  # noqa: BLE001 -- e.g. a file changed meanwhile
      raise CheckpointError(
          f"{where} is corrupt or incomplete: its arrays cannot be read "
          f"({type(e).__name__}: {_brief(e)})."
      ) from e
  values = [_place(arrays.get(_key(i)), leaf) for i, leaf in enumerate(leaves)]
  bad = [e["path"] for e, v in zip(entries, values) if _corrupt(e, v)]
  if _anywhere(bool(bad)):  # every process raises, or none
    mine = ", ".join(bad[:_MAX_LISTED]) or "found on another process"
    raise CheckpointError(
        f"{where} is corrupt: leaves do not match their recorded "
        f"checksums: {mine}."
    )
  return jax.tree_util.tree_unflatten(treedef, values)

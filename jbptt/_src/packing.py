"""A pytree held in one flat buffer per dtype, for cheap calls of jitted code.

Calling a jitted function costs a fixed amount per array it takes and returns
(on a CPU, microseconds each). A :class:`jbptt.TrainState` has a few dozen
arrays (the params, the optimizer's moments, the carries and the stream's
buffers), so a live feed that calls ``update`` with a few steps at a time
pays that cost many times per call. :func:`pack_state` moves the same values
into one flat buffer per dtype; ``update`` takes and returns that form,
unpacking and repacking inside its program (a copy of the state per call,
small next to the dispatch it saves for small models).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np


@jax.tree_util.register_static
@dataclasses.dataclass(frozen=True)
class Packing:
  """Where each leaf of a packed pytree lives (static: no leaves).

  Attributes:
    treedef: the pytree's structure.
    shapes: each leaf's shape, in leaf order.
    dtypes: each leaf's dtype, in leaf order.
    groups: the buffers' dtypes, in buffer order.
  """

  treedef: Any
  shapes: tuple[tuple[int, ...], ...]
  dtypes: tuple[np.dtype, ...]
  groups: tuple[np.dtype, ...]

  def template(self):
    """The pytree of ``jax.ShapeDtypeStruct`` that this packing holds."""
    return jax.tree_util.tree_unflatten(self.treedef, [
        jax.ShapeDtypeStruct(s, d) for s, d in zip(self.shapes, self.dtypes)])


def packing_of(tree) -> Packing:
  """The :class:`Packing` of ``tree`` (arrays or ``ShapeDtypeStruct``)."""
  leaves, treedef = jax.tree_util.tree_flatten(tree)
  shapes = tuple(tuple(np.shape(a)) for a in leaves)
  dtypes = tuple(jnp.dtype(a.dtype) for a in leaves)
  groups = tuple(dict.fromkeys(dtypes))  # first-seen order
  return Packing(treedef, shapes, dtypes, groups)


def pack(tree, packing: Packing) -> tuple[jax.Array, ...]:
  """The leaves of ``tree`` raveled into one buffer per dtype of ``packing``."""
  leaves = jax.tree_util.tree_leaves(tree)
  return tuple(
      jnp.concatenate([jnp.ravel(a) for a, d in zip(leaves, packing.dtypes)
                       if d == group])
      for group in packing.groups)


def unpack(buffers, packing: Packing):
  """The pytree that :func:`pack` raveled into ``buffers``."""
  offsets = dict.fromkeys(packing.groups, 0)
  leaves = []
  for shape, dtype in zip(packing.shapes, packing.dtypes):
    buffer = buffers[packing.groups.index(dtype)]
    size = math.prod(shape)
    start = offsets[dtype]
    leaves.append(jnp.reshape(buffer[start:start + size], shape))
    offsets[dtype] = start + size
  return jax.tree_util.tree_unflatten(packing.treedef, leaves)


class PackedState(NamedTuple):
  """A :class:`jbptt.TrainState` in one flat buffer per dtype.

  ``update`` takes it wherever it takes a ``TrainState`` and returns the same
  form; each call then dispatches a handful of arrays instead of every leaf
  of the state. Made by :func:`pack_state`; :meth:`unpack` gives the
  ``TrainState`` back (for the params, a checkpoint or an evaluation).

  Attributes:
    buffers: one 1-D array per dtype of the state's leaves.
    packing: where each leaf lives (static).

  Examples:
    >>> import jax.numpy as jnp, optax, jbptt
    >>> def step_loss(p, h, x):
    ...   h = jnp.tanh(p * h + x)
    ...   return h, jnp.mean(h ** 2)
    >>> tr = jbptt.trainer(step_loss, optax.sgd(0.1), k1=2, k2=4)
    >>> xs = jnp.ones((8, 3))
    >>> packed = jbptt.pack_state(tr.init(jnp.float32(0.5), jnp.zeros(3), xs))
    >>> for a in range(0, 8, 2):                   # k1 steps per call
    ...   packed, metrics = tr.update(packed, xs[a:a + 2])
    >>> int(packed.unpack().step)
    8
  """

  buffers: tuple[jax.Array, ...]
  packing: Packing

  def unpack(self):
    """The :class:`jbptt.TrainState` that this holds (new arrays)."""
    return _unpack(self)


@jax.jit
def _unpack(packed: PackedState):
  return unpack(packed.buffers, packed.packing)


@jax.jit
def _pack(state) -> PackedState:
  packing = packing_of(state)
  return PackedState(pack(state, packing), packing)


def pack_state(state) -> PackedState:
  """``state`` (a :class:`jbptt.TrainState`) as a :class:`PackedState`.

  For a live feed: a stream fed a few steps per ``update`` call spends most
  of each call dispatching the state's arrays; packed, it dispatches one
  buffer per dtype. The values are the same, bit for bit.

  Args:
    state: a ``TrainState`` made by a trainer's ``init`` or ``update``.

  Returns:
    A :class:`PackedState` holding copies of every leaf of ``state``.

  Raises:
    TypeError: if ``state`` is not a ``TrainState``.

  Examples:
    >>> import jax.numpy as jnp, optax, jbptt
    >>> def step_loss(w, h, x):
    ...   h = jnp.tanh(w * h + x)
    ...   return h, (h - 0.5) ** 2
    >>> tr = jbptt.trainer(step_loss, optax.sgd(0.1), k1=2, k2=2)
    >>> xs = jnp.ones(6)
    >>> state = tr.init(jnp.float32(0.3), jnp.float32(0.0), xs[:2])
    >>> packed = jbptt.pack_state(state)
    >>> for i in range(0, 6, 2):  # a live feed, k1 steps per call
    ...   packed, metrics = tr.update(packed, xs[i:i + 2])
    >>> int(packed.unpack().step)
    6
  """
  from jbptt._src.trainer import TrainState  # the trainer imports this module
  if not isinstance(state, TrainState):
    raise TypeError(
        f"pack_state expects a jbptt.TrainState, got {type(state).__name__}.")
  return _pack(state)


def checked_template(packed: PackedState):
  """The pytree of ``jax.ShapeDtypeStruct`` that ``packed`` holds.

  Raises:
    ValueError: if its buffers are not one 1-D array per dtype of its packing,
      each as long as the leaves of that dtype.
  """
  sizes = dict.fromkeys(packed.packing.groups, 0)
  for shape, dtype in zip(packed.packing.shapes, packed.packing.dtypes):
    sizes[dtype] += math.prod(shape)
  want = [((size,), dtype) for dtype, size in sizes.items()]
  got = [(tuple(np.shape(b)), jnp.result_type(b)) for b in packed.buffers]
  if got != want:
    raise ValueError(
        "the PackedState's buffers do not match its packing: "
        f"{_describe(got)} given, {_describe(want)} expected. Make it with "
        "jbptt.pack_state.")
  return packed.packing.template()


def _describe(buffers) -> str:
  return ", ".join(f"{d}{list(s)}" for s, d in buffers) or "none"

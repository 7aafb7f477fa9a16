"""Data parallelism with plain ``jax.sharding``: a batch axis over a device mesh.

:func:`jbptt.trainer` and :func:`jbptt.truncated_loss` are pure jitted
programs, so they need nothing special to run data-parallel: give them a
stream whose batch axis is sharded over a mesh (``NamedSharding`` with a
``PartitionSpec`` over that axis, for ``xs`` and for the carry) and replicated
params; XLA partitions the steps and reduces the gradients, and the params
stay replicated and equal to a one-device run's. These helpers build the mesh
and place the data.

On many hosts: call ``jax.distributed.initialize()`` first on every host;
:func:`batch_mesh` then spans every device of every host, and
:func:`shard_batch` takes each host's *local* slice of the batch (a global
array is assembled with ``jax.make_array_from_process_local_data``).

Examples:
  >>> import jax, jax.numpy as jnp, jbptt.sharding as js
  >>> mesh = js.batch_mesh()
  >>> xs = js.shard_batch(jnp.zeros((10, 4 * len(jax.devices()), 3)), mesh,
  ...                     batch_axis=1)
  >>> xs.sharding.spec[1]
  'batch'
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

__all__ = ("batch_mesh", "replicate", "shard_batch")


def batch_mesh(devices=None, axis_name: str = "batch") -> Mesh:
  """A one-axis mesh over ``devices``, for data parallelism over the batch.

  Args:
    devices: the devices, in mesh order; ``None``: ``jax.devices()``, every
      device of every process.
    axis_name: the mesh axis's name, which :func:`shard_batch` splits the
      batch over.

  Returns:
    A ``jax.sharding.Mesh`` of shape ``(len(devices),)``.

  Raises:
    ValueError: if ``devices`` is empty.

  Examples:
    >>> import jax, jbptt.sharding as js
    >>> js.batch_mesh().shape["batch"] == len(jax.devices())
    True
  """
  devices = jax.devices() if devices is None else list(devices)
  if not devices:
    raise ValueError("batch_mesh needs at least one device.")
  return Mesh(np.array(devices), (axis_name,))


def _spec(ndim: int, batch_axis: int, axis_name: str) -> PartitionSpec:
  del ndim  # trailing axes are unsplit
  return PartitionSpec(*([None] * batch_axis + [axis_name]))


def shard_batch(tree, mesh: Mesh, *, batch_axis: int = 0):
  """Places every leaf of ``tree`` with its ``batch_axis`` split over ``mesh``.

  Use ``batch_axis=1`` for time-major streams ``(time, batch, ...)`` and
  ``batch_axis=0`` for carries ``(batch, ...)``. With several processes each
  passes its local slice of the batch.

  Args:
    tree: a pytree of arrays (NumPy or JAX); with several processes, this
      process's slice of the batch.
    mesh: a one-axis mesh, e.g. :func:`batch_mesh`'s.
    batch_axis: the leaves' batch axis.

  Returns:
    ``tree`` with every leaf a ``jax.Array`` split over ``mesh`` along
    ``batch_axis`` (the global batch: the local one times the process count).

  Examples:
    >>> import jax, numpy as np, jbptt.sharding as js
    >>> mesh = js.batch_mesh()
    >>> h = js.shard_batch(np.zeros((2 * len(jax.devices()), 5)), mesh)
    >>> h.sharding.spec[0]
    'batch'

  Raises:
    ValueError: if a leaf has no such axis or its batch does not divide over
      the mesh.
  """
  (axis_name,) = mesh.axis_names
  size = mesh.devices.size
  processes = jax.process_count()

  def place(path, leaf):
    leaf = np.asarray(leaf) if not isinstance(leaf, jax.Array) else leaf
    name = jax.tree_util.keystr(path) or "the leaf"
    if leaf.ndim <= batch_axis:
      raise ValueError(f"{name} has shape {leaf.shape}: no batch axis {batch_axis}.")
    sharding = NamedSharding(mesh, _spec(leaf.ndim, batch_axis, axis_name))
    batch = leaf.shape[batch_axis] * processes
    if batch % size:
      raise ValueError(
          f"{name} has a batch of {batch} along axis {batch_axis}, which does "
          f"not divide over {size} devices.")
    if processes > 1:
      global_shape = list(leaf.shape)
      global_shape[batch_axis] = batch
      return jax.make_array_from_process_local_data(
          sharding, np.asarray(leaf), tuple(global_shape))
    return jax.device_put(leaf, sharding)

  return jax.tree_util.tree_map_with_path(place, tree)


def replicate(tree, mesh: Mesh):
  """Places every leaf of ``tree`` whole on every device of ``mesh``.

  For the params (and anything else every device needs whole). With several
  processes, every process must pass the same values.

  Args:
    tree: a pytree of arrays.
    mesh: the mesh, e.g. :func:`batch_mesh`'s.

  Returns:
    ``tree`` with every leaf a ``jax.Array`` replicated over ``mesh``
    (``PartitionSpec()``).

  Examples:
    >>> import jax.numpy as jnp, jbptt.sharding as js
    >>> params = js.replicate({"W": jnp.ones((3, 3))}, js.batch_mesh())
    >>> params["W"].sharding.is_fully_replicated
    True
  """
  return jax.device_put(tree, NamedSharding(mesh, PartitionSpec()))

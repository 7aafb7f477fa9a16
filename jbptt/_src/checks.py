"""Trace-time validation of the data handed to the combinators.

Every check runs on shapes and dtypes only, so it costs nothing at run time
and fails before anything is computed, with a message that names the
argument, the offending leaf and what is allowed.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jbptt._src import steps


def _path(path) -> str:
  return jax.tree_util.keystr(path)


def time_length(xs, name: str = "xs") -> int:
  """The shared leading time length of the leaves of ``xs``.

  Raises:
    ValueError: if ``xs`` has no leaves, a leaf is a scalar, the leaves
      disagree on their leading length, or that length is zero.
  """
  leaves = jax.tree_util.tree_leaves_with_path(xs)
  if not leaves:
    raise ValueError(f"{name} has no array leaves; it needs a time axis.")
  lengths = {}
  for path, leaf in leaves:
    shape = tuple(leaf.shape) if hasattr(leaf, "shape") else jnp.shape(leaf)
    if not shape:
      raise ValueError(
          f"{name}{_path(path)} is a scalar; every leaf of {name} needs a "
          "leading time axis."
      )
    lengths[_path(path)] = shape[0]
  if len(set(lengths.values())) > 1:
    raise ValueError(
        f"the leaves of {name} must share one leading time length, got "
        f"{lengths}."
    )
  n = next(iter(lengths.values()))
  if n == 0:
    raise ValueError(f"{name} has zero time steps; give at least one.")
  return n


def as_arrays(tree):
  """``tree`` with every leaf as a JAX array (Python scalars included)."""
  return jax.tree_util.tree_map(jnp.asarray, tree)


def _spec(tree):
  return jax.tree_util.tree_map(
      lambda a: a if isinstance(a, jax.ShapeDtypeStruct)
      else jax.ShapeDtypeStruct(jnp.shape(a), jnp.result_type(a)), tree
  )


def check_step(step_loss, params, carry, x, name: str = "step_loss"):
  """Checks that ``step_loss(params, carry, x)`` keeps the carry and that its
  loss is a scalar or a :class:`jbptt.WeightedLoss`.

  Raises:
    TypeError: if the returned carry's structure, or a leaf's shape or dtype,
      differs from the input carry's, or the loss is not a float scalar or a
      :class:`jbptt.WeightedLoss` of scalars.
  """
  if isinstance(step_loss, steps.CellLoss) and not (
      isinstance(x, (tuple, list)) and len(x) == 2):
    raise TypeError(
        "a step made by jbptt.cell_loss takes xs whose time slices are "
        f"(inputs, targets) pairs, got a slice of type {type(x).__name__}."
    )
  try:
    out = jax.eval_shape(step_loss, _spec(params), _spec(carry), _spec(x))
  except (TypeError, ValueError) as e:
    raise type(e)(f"{name}(params, carry, x) failed on one step: {e}") from e
  if not (isinstance(out, tuple) and len(out) == 2):
    raise TypeError(
        f"{name} must return a pair (carry, loss), got {type(out).__name__}."
    )
  new_carry, loss = out
  in_def = jax.tree_util.tree_structure(carry)
  out_def = jax.tree_util.tree_structure(new_carry)
  if in_def != out_def:
    raise TypeError(
        f"{name} changed the carry's structure: it took {in_def} and "
        f"returned {out_def}."
    )
  for (path, a), b in zip(
      jax.tree_util.tree_leaves_with_path(carry),
      jax.tree_util.tree_leaves(new_carry),
  ):
    a_shape, a_dtype = jnp.shape(a), jnp.result_type(a)
    if a_shape != b.shape or a_dtype != b.dtype:
      raise TypeError(
          f"{name} changed carry{_path(path)} from {a_dtype}{list(a_shape)} "
          f"to {b.dtype}{list(b.shape)}; the carry must keep its shape and "
          "dtype from step to step."
      )
  parts = tuple(loss) if isinstance(loss, steps.WeightedLoss) else (loss,)
  if any(jax.tree_util.tree_structure(a).num_leaves != 1
         or jnp.shape(jax.tree_util.tree_leaves(a)[0]) != () for a in parts):
    shape = jax.tree_util.tree_map(jnp.shape, loss)
    raise TypeError(
        f"{name} must return a scalar loss or a jbptt.WeightedLoss of two "
        f"scalars, got one of shape {shape}; reduce it (for example with "
        ".mean() over the batch, or a sum and a count for WeightedLoss)."
    )
  if not all(jnp.issubdtype(a.dtype, jnp.inexact) for a in parts[:1]):
    raise TypeError(f"{name} must return a floating-point loss, got "
                    f"{parts[0].dtype}.")


def check_resets(resets, n: int, carry, name: str = "resets"):
  """Checks a per-step reset mask of shape ``(n,) + S`` against the carry.

  ``S`` (the shape of one step's mask, ``()`` for one stream) must be a prefix
  of the shape of every carry leaf.

  Returns:
    ``resets`` as a boolean array.
  """
  check_length(resets, n, name)
  resets = jnp.asarray(resets)
  if not (jnp.issubdtype(resets.dtype, jnp.bool_)
          or jnp.issubdtype(resets.dtype, jnp.integer)):
    raise TypeError(f"{name} must be boolean, got dtype {resets.dtype}.")
  check_reset_shape(resets.shape[1:], carry, name)
  return resets.astype(bool)


def check_length(a, n: int, name: str = "resets"):
  """Checks that ``a`` has shape ``(n, ...)``: ``n`` steps like ``xs``."""
  shape = jnp.shape(a)
  if not shape or shape[0] != n:
    raise ValueError(
        f"{name} must have shape (n, ...) with n={n} time steps like xs, got "
        f"shape {shape}."
    )


def check_reset_shape(per_step, carry, name: str = "resets"):
  """Checks that the per-step reset shape is a prefix of every carry leaf's."""
  per_step = tuple(per_step)
  for path, leaf in jax.tree_util.tree_leaves_with_path(carry):
    if jnp.shape(leaf)[: len(per_step)] != per_step:
      raise ValueError(
          f"{name} has per-step shape {per_step}, which is not a leading "
          f"prefix of carry{_path(path)}'s shape {jnp.shape(leaf)}."
      )


def first_step(xs):
  """The slice of ``xs`` at its first time step."""
  return jax.tree_util.tree_map(lambda a: a[0], xs)

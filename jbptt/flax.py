"""Flax adapters: Linen and NNX cells as jbptt cells, and truncating layers.

* :func:`linen_cell` / :func:`nnx_cell` turn any Flax recurrent cell (Linen:
  ``LSTMCell``, ``OptimizedLSTMCell``, ``GRUCell``, ``MGUCell``,
  ``SimpleCell`` or a user's module with ``__call__(carry, x) -> (carry, y)``;
  NNX likewise) into a pure ``cell(params, carry, x) -> (carry, y)`` for
  :func:`jbptt.truncated_unroll`, :func:`jbptt.cell_loss`,
  :func:`jbptt.truncated_loss` and :func:`jbptt.trainer`.
* :class:`TruncatedRNN` (Linen) and :class:`NNXTruncatedRNN` are drop-ins for
  ``flax.linen.RNN`` / ``flax.nnx.RNN`` that hold the carry constant every
  ``k`` steps (:func:`jbptt.truncated_unroll`), so a model trained on long
  sequences backpropagates through blocks of ``k`` steps only.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn
from flax import nnx

from jbptt._src.semantics import check_positive_int
from jbptt._src.unroll import truncated_unroll

__all__ = (
    "NNXTruncatedRNN",
    "TruncatedRNN",
    "init_linen_cell",
    "linen_cell",
    "nnx_cell",
)


def linen_cell(module: nn.Module):
  """A Linen cell as ``cell(variables, carry, x) -> (carry, y)``.

  ``variables`` is what ``module.init`` returns (``{"params": ...}``).

  Examples:
    >>> import jax, jax.numpy as jnp, flax.linen as nn, jbptt
    >>> module = nn.LSTMCell(features=8)
    >>> variables, carry = jbptt.flax.init_linen_cell(
    ...     module, jax.random.key(0), (4, 3))
    >>> cell = jbptt.flax.linen_cell(module)
    >>> carry, ys = jbptt.truncated_unroll(cell, variables, carry,
    ...                                    jnp.ones((5, 4, 3)), k=None)
    >>> ys.shape
    (5, 4, 8)
  """
  if not isinstance(module, nn.Module):
    raise TypeError(f"linen_cell expects a flax.linen Module, got {module!r}.")

  def cell(variables, carry, x):
    return module.apply(variables, carry, x)

  return cell


def init_linen_cell(module: nn.Module, key, input_shape: tuple[int, ...]):
  """``(variables, carry)`` of a Linen cell for inputs of ``input_shape``.

  Args:
    module: a Linen cell with ``initialize_carry(key, input_shape)``.
    key: a PRNG key.
    input_shape: the shape of one step's input, batch dimensions included,
      e.g. ``(batch, features)``.
  """
  key_carry, key_params = jax.random.split(key)
  carry = module.initialize_carry(key_carry, tuple(input_shape))
  dtype = getattr(module, "param_dtype", jnp.float32)
  variables = module.init(key_params, carry, jnp.zeros(input_shape, dtype))
  return variables, carry


def nnx_cell(module: nnx.Module):
  """An NNX cell as ``(cell, params)`` with ``cell(params, carry, x)``.

  ``params`` is the module's ``nnx.Param`` state; its other state is held
  fixed inside ``cell``. Write trained params back with
  ``nnx.update(module, params)``.

  Examples:
    >>> import jax.numpy as jnp, flax.nnx as nnx, jbptt
    >>> module = nnx.GRUCell(3, 8, rngs=nnx.Rngs(0))
    >>> cell, params = jbptt.flax.nnx_cell(module)
    >>> carry = module.initialize_carry((4, 3), nnx.Rngs(0))
    >>> carry, ys = jbptt.truncated_unroll(cell, params, carry,
    ...                                    jnp.ones((5, 4, 3)), k=None)
    >>> ys.shape
    (5, 4, 8)
  """
  if not isinstance(module, nnx.Module):
    raise TypeError(f"nnx_cell expects a flax.nnx Module, got {module!r}.")
  graphdef, params, rest = nnx.split(module, nnx.Param, ...)

  def cell(params, carry, x):
    return nnx.merge(graphdef, params, rest)(carry, x)

  return cell, params


def _to_time_major(inputs, time_major: bool):
  axis = 0 if time_major else inputs.ndim - 2
  return jnp.moveaxis(inputs, axis, 0), axis


class TruncatedRNN(nn.Module):
  """As ``flax.linen.RNN``, but the gradient is cut every ``k`` steps.

  The forward values equal ``nn.RNN(cell)``'s and the parameters live at the
  same place (``params/cell/...``), so it swaps in for ``nn.RNN`` and loads
  its checkpoints. In the backward pass the carry is held constant after
  steps ``k, 2k, ...`` (see :func:`jbptt.truncated_unroll`): with a loss on
  every output this is TBPTT(k, k) inside a model.

  Attributes:
    cell: a Linen recurrent cell (only its ``params`` collection is used).
    k: the truncation length.
    time_major: inputs are ``(time, ..., features)`` instead of
      ``(..., time, features)``.
    return_carry: also return the final carry.
    unroll: passed to ``lax.scan``.
  """

  cell: nn.RNNCellBase
  k: int
  time_major: bool = False
  return_carry: bool = False
  unroll: int = 1

  @nn.compact
  def __call__(self, inputs, *, initial_carry: Any = None, init_key=None,
               return_carry: bool | None = None):
    check_positive_int("k", self.k)
    cell = self.cell.clone(parent=None)
    xs, axis = _to_time_major(inputs, self.time_major)
    if initial_carry is None:
      key = jax.random.key(0) if init_key is None else init_key
      initial_carry = cell.initialize_carry(key, xs.shape[1:])
    if self.is_initializing():  # creates params/cell/... as nn.RNN does
      self.cell(initial_carry, xs[0])
    params = self.cell.variables["params"]
    carry, ys = truncated_unroll(
        lambda p, h, x: cell.apply({"params": p}, h, x),
        params, initial_carry, xs, k=self.k, unroll=self.unroll,
    )
    ys = jnp.moveaxis(ys, 0, axis)
    return_carry = self.return_carry if return_carry is None else return_carry
    return (carry, ys) if return_carry else ys


class NNXTruncatedRNN(nnx.Module):
  """As ``flax.nnx.RNN``, but the gradient is cut every ``k`` steps.

  Forward values equal ``nnx.RNN(cell)``'s; in the backward pass the carry is
  held constant after steps ``k, 2k, ...`` (:func:`jbptt.truncated_unroll`).

  Args:
    cell: an NNX recurrent cell.
    k: the truncation length.
    time_major: inputs are ``(time, ..., features)``.
    return_carry: also return the final carry.
    unroll: passed to ``lax.scan``.
  """

  def __init__(self, cell: nnx.Module, k: int, *, time_major: bool = False,
               return_carry: bool = False, unroll: int = 1):
    self.cell = cell
    self.k = check_positive_int("k", k)
    self.time_major = time_major
    self.return_carry = return_carry
    self.unroll = unroll

  def __call__(self, inputs, *, initial_carry: Any = None,
               return_carry: bool | None = None, rngs: nnx.Rngs | None = None):
    xs, axis = _to_time_major(inputs, self.time_major)
    if initial_carry is None:
      rngs = nnx.Rngs(carry=0) if rngs is None else rngs
      initial_carry = self.cell.initialize_carry(xs.shape[1:], rngs)
    cell, params = nnx_cell(self.cell)
    carry, ys = truncated_unroll(
        cell, params, initial_carry, xs, k=self.k, unroll=self.unroll
    )
    ys = jnp.moveaxis(ys, 0, axis)
    return_carry = self.return_carry if return_carry is None else return_carry
    return (carry, ys) if return_carry else ys

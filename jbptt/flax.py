"""Flax adapters: Linen and NNX cells as jbptt cells, and truncating layers.

* :func:`linen_cell` / :func:`nnx_cell` turn any Flax recurrent cell (Linen:
  ``LSTMCell``, ``OptimizedLSTMCell``, ``GRUCell``, ``MGUCell``,
  ``SimpleCell``, ``ConvLSTMCell`` or a user's module with
  ``__call__(carry, x) -> (carry, y)``; NNX likewise) into a pure
  ``cell(params, carry, x) -> (carry, y)`` for :func:`jbptt.truncated_unroll`,
  :func:`jbptt.cell_loss`, :func:`jbptt.truncated_loss` and
  :func:`jbptt.trainer`. A cell with collections besides ``params`` (batch
  statistics, dropout's rngs, NNX ``BatchStat`` / ``Rngs``) carries them in a
  :class:`CellCarry`, so the optimizer sees the ``params`` only and the rest
  is state that advances step by step.
* :class:`TruncatedRNN` (Linen) and :class:`NNXTruncatedRNN` are
  ``flax.linen.RNN`` / ``flax.nnx.RNN`` with the carry held constant every
  ``k`` steps (:func:`jbptt._src.segment.hold`, the cut of
  :func:`jbptt.truncated_unroll`), so a model trained on long sequences
  backpropagates through blocks of ``k`` steps only. They take every argument
  of Flax's layers, with the same meaning and defaults, and run Flax's own
  scan, so variables, rngs and values are Flax's.

**The truncated gradient of the layers.** Steps are counted in the order they
are processed: from the end with ``reverse``, and with ``seq_lengths`` from
each sequence's own first (``reverse``: last) valid element, which
``flip_sequences`` puts at step 0. The carry entering step ``t`` is held
constant when ``t`` is a positive multiple of ``k`` and, with ``seq_lengths``,
``t < seq_lengths[b]``: padding steps (always after a sequence's valid steps
in processing order) are run as Flax runs them and never counted nor cut. So
with ``k`` at least as long as every sequence nothing is cut and everything,
the gradient included, is ``nn.RNN``'s. As in Flax, outputs at padding steps
are not meaningful: mask them out of the loss, and then no gradient ever
reaches padding. In plain Python, for one sequence ``b`` processed as
``x_0, x_1, ...``::

  h = carry
  for t, x in enumerate(xs):
    if t > 0 and t % k == 0 and t < length_b:
      h = stop_gradient(h)
    h, y[t] = cell(h, x)
"""

from __future__ import annotations

from typing import Any, Mapping, NamedTuple

import jax
import jax.numpy as jnp
from flax import linen as nn
from flax import nnx
from flax.core import FrozenDict
from flax.linen import module as linen_module
from flax.linen.recurrent import flip_sequences

from jbptt._src import segment
from jbptt._src.semantics import check_positive_int

__all__ = (
    "CellCarry",
    "NNXTruncatedRNN",
    "TruncatedRNN",
    "init_linen_cell",
    "linen_cell",
    "nnx_cell",
)

tree_map = jax.tree_util.tree_map


# -- cells --------------------------------------------------------------------


class CellCarry(NamedTuple):
  """The carry of a cell with state besides its ``params``.

  :func:`linen_cell`'s and :func:`nnx_cell`'s cells take and return one when
  given one, so that :func:`jbptt.trainer` (which optimizes its ``params``
  argument and threads the carry) updates the ``params`` only and carries
  the rest from step to step, across updates and chunks.

  Attributes:
    carry: the cell's own carry.
    state: Linen: a dict of the collections besides ``params`` (e.g.
      ``{"batch_stats": ...}``), all mutable, updated at every step; NNX: the
      module's non-``Param`` state, ``nnx.state(module, nnx.Not(nnx.Param))``
      (batch statistics, ``Rngs`` keys and counts), likewise.
    rngs: Linen only: a dict of rng stream name to key (e.g.
      ``{"dropout": key}``, typed or raw); each step splits it and gives the
      cell a fresh key. NNX keeps its rngs in ``state``; leave this empty.

  Examples:
    >>> import jax, jax.numpy as jnp, flax.linen as nn, jbptt
    >>> class Cell(nn.Module):  # an LSTM with dropout on its input
    ...   @nn.compact
    ...   def __call__(self, carry, x):
    ...     x = nn.Dropout(0.5, deterministic=False)(x)
    ...     return nn.LSTMCell(4)(carry, x)
    ...   def initialize_carry(self, key, shape):
    ...     return nn.LSTMCell(4, parent=None).initialize_carry(key, shape)
    >>> params, carry = jbptt.flax.init_linen_cell(
    ...     Cell(), jax.random.key(0), (2, 3), rngs=("dropout",))
    >>> sorted(params), sorted(carry.rngs)
    (['params'], ['dropout'])
    >>> carry, ys = jbptt.truncated_unroll(jbptt.flax.linen_cell(Cell()),
    ...                                    params, carry, jnp.ones((5, 2, 3)),
    ...                                    k=2)
    >>> ys.shape
    (5, 2, 4)
  """

  carry: Any
  state: Any = None
  rngs: Any = None


def _split_key(key):
  """``(next_key, step_key)`` of a typed or raw key, in the key's own form."""
  if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
    return tuple(jax.random.split(key))
  next_key, step_key = jax.random.split(jax.random.wrap_key_data(key))
  return jax.random.key_data(next_key), jax.random.key_data(step_key)


def _typed(key):
  return (key if jnp.issubdtype(key.dtype, jax.dtypes.prng_key)
          else jax.random.wrap_key_data(key))


def _like(given, new: dict):
  """``new`` in the mapping type of ``given`` (``None`` stays ``None``)."""
  return None if given is None else type(given)(new)


def linen_cell(module: nn.Module):
  """A Linen cell as ``cell(params, carry, x) -> (carry, y)``.

  ``params`` is a variables dict: what ``module.init`` returns
  (``{"params": ...}``) for a cell with ``params`` only. ``carry`` is the
  cell's own carry, or a :class:`CellCarry` whose ``state`` holds the other
  collections (mutable, returned updated) and whose ``rngs`` the rng streams
  (split at every step); :func:`init_linen_cell` makes either.

  Args:
    module: a Linen module with ``__call__(carry, x) -> (carry, y)``.

  Returns:
    The pure ``cell``.

  Raises:
    TypeError: if ``module`` is not a Linen module.

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

  def cell(params, carry, x):
    if not isinstance(carry, CellCarry):
      return module.apply(params, carry, x)
    state = dict(carry.state or {})
    keys = {name: _split_key(key) for name, key in (carry.rngs or {}).items()}
    step_rngs = {name: _typed(step) for name, (_, step) in keys.items()}
    if state:
      (h, y), new_state = module.apply({**params, **state}, carry.carry, x,
                                       rngs=step_rngs, mutable=list(state))
      state.update(new_state)
    else:
      h, y = module.apply(params, carry.carry, x, rngs=step_rngs)
    rngs = {name: next_key for name, (next_key, _) in keys.items()}
    return CellCarry(h, _like(carry.state, state), _like(carry.rngs, rngs)), y

  return cell


def init_linen_cell(module: nn.Module, key, input_shape: tuple[int, ...], *,
                    rngs: tuple[str, ...] = ()):
  """``(params, carry)`` of a Linen cell for inputs of ``input_shape``.

  For a cell with only ``params`` (and no ``rngs`` asked for), ``params`` is
  ``module.init``'s variables and ``carry`` the cell's own. Otherwise
  ``params`` is ``{"params": ...}`` alone and ``carry`` a :class:`CellCarry`
  holding the other collections and a key per rng stream, so that an
  optimizer sees the parameters only.

  Args:
    module: a Linen cell with ``initialize_carry(key, input_shape)``.
    key: a PRNG key.
    input_shape: the shape of one step's input, batch dimensions included,
      e.g. ``(batch, features)``.
    rngs: the names of the rng streams the cell draws from at every step
      (``("dropout",)`` for ``nn.Dropout``); each gets a key of its own.

  Returns:
    ``(params, carry)``.

  Raises:
    TypeError: if ``rngs`` is not a tuple or list of names.

  Examples:
    >>> import jax, flax.linen as nn, jbptt.flax as jf
    >>> params, carry = jf.init_linen_cell(nn.GRUCell(4), jax.random.key(0),
    ...                                    (2, 3))  # (batch, features)
    >>> list(params), carry.shape
    (['params'], (2, 4))
  """
  if isinstance(rngs, str) or not all(isinstance(r, str) for r in rngs):
    raise TypeError(f"rngs must be a tuple of rng stream names, got "
                    f"rngs={rngs!r}.")
  key_carry, key_params = jax.random.split(key)
  carry = module.initialize_carry(key_carry, tuple(input_shape))
  dtype = getattr(module, "param_dtype", jnp.float32)
  x = jnp.zeros(input_shape, dtype)
  if not rngs:
    variables = module.init(key_params, carry, x)
  else:
    keys = jax.random.split(key_params, 2 * len(rngs) + 1)
    init_rngs = {"params": keys[0], **dict(zip(rngs, keys[1::2]))}
    variables = module.init(init_rngs, carry, x)
  state = {c: v for c, v in variables.items() if c != "params"}
  if not state and not rngs:
    return variables, carry
  step_keys = {name: jax.random.key_data(k)
               for name, k in zip(rngs, keys[2::2])} if rngs else {}
  if state:  # in the dtypes a step returns (Flax makes some float32 first)
    step_rngs = {name: jax.random.wrap_key_data(k)
                 for name, k in step_keys.items()}
    after = jax.eval_shape(lambda: module.apply(
        variables, carry, x, rngs=step_rngs, mutable=list(state))[1])
    state = {c: tree_map(lambda a, s: a.astype(s.dtype), v, after[c])
             if c in after else v for c, v in state.items()}
  params = {"params": variables["params"]} if "params" in variables else {}
  return params, CellCarry(carry, state, step_keys)


def nnx_cell(module: nnx.Module):
  """An NNX cell as ``(cell, params)`` with ``cell(params, carry, x)``.

  ``params`` is the module's ``nnx.Param`` state. Given the cell's own carry,
  ``cell`` holds the module's other state fixed (as it is now); given a
  :class:`CellCarry` whose ``state`` is that state,
  ``nnx.state(module, nnx.Not(nnx.Param))``, it runs the module on it and
  returns it updated (batch statistics, ``Rngs`` counts: a fresh dropout
  mask at every step). Write trained params (and state) back with
  ``nnx.update(module, params)``.

  Args:
    module: an NNX module with ``__call__(carry, x) -> (carry, y)``.

  Returns:
    ``(cell, params)``.

  Raises:
    TypeError: if ``module`` is not an NNX module.

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
    if not isinstance(carry, CellCarry):
      return nnx.merge(graphdef, params, rest)(carry, x)
    if carry.rngs:
      raise ValueError(
          "an NNX cell keeps its rngs in its state; give CellCarry(carry, "
          f"state) with rngs empty, got rngs={carry.rngs!r}.")
    m = nnx.merge(graphdef, params, carry.state)
    h, y = m(carry.carry, x)
    _, _, state = nnx.split(m, nnx.Param, ...)
    return CellCarry(h, state, carry.rngs), y

  return cell, params


# -- the layers ---------------------------------------------------------------


def _check_k(k):
  return None if k is None else check_positive_int("k", k)


def _layout(inputs, num_feature_axes: int, time_major: bool):
  """``(time_axis, batch_dims)`` of ``inputs``, as ``nn.RNN`` reads them."""
  if num_feature_axes < 1 or inputs.ndim < num_feature_axes + 1:
    raise ValueError(
        f"inputs of shape {inputs.shape} have no time axis before the cell's "
        f"{num_feature_axes} feature axes; give (*batch, time, *features) "
        "or, with time_major=True, (time, *batch, *features).")
  time_axis = 0 if time_major else inputs.ndim - (num_feature_axes + 1)
  batch_dims = (inputs.shape[1:inputs.ndim - num_feature_axes] if time_major
                else inputs.shape[:time_axis])
  return time_axis, tuple(batch_dims)


def _check_seq_lengths(seq_lengths, batch_dims):
  if seq_lengths is None:
    return None
  shape = jnp.shape(seq_lengths)
  if shape != batch_dims:
    raise ValueError(
        f"seq_lengths must have the inputs' batch shape {batch_dims}, got "
        f"shape {shape}.")
  if not jnp.issubdtype(jnp.result_type(seq_lengths), jnp.integer):
    raise TypeError(f"seq_lengths must be integers, got dtype "
                    f"{jnp.result_type(seq_lengths)}.")
  return jnp.asarray(seq_lengths)


def _cuts(n: int, k: int | None, seq_lengths, carry, batch_dims, name: str):
  """Where the carry entering step ``t`` (processing order) is held:
  ``(n,)``, or ``(n,) + batch`` with ``seq_lengths``; ``None`` if nowhere.
  Cut per sequence, the ``carry`` must lead with the batch shape."""
  if k is None or k >= n:
    return None
  t = jnp.arange(n)
  cut = (t > 0) & (t % k == 0)
  if seq_lengths is None:
    return cut
  _check_carry_batch(carry, batch_dims, name)
  t = t.reshape((n,) + (1,) * seq_lengths.ndim)
  return cut.reshape(t.shape) & (t < seq_lengths[None])


def _check_carry_batch(carry, batch_dims, name: str):
  """With ``seq_lengths``, sequences are cut on their own: every carry leaf
  must lead with the batch shape."""
  for path, leaf in jax.tree_util.tree_leaves_with_path(carry):
    if tuple(jnp.shape(leaf))[:len(batch_dims)] != batch_dims:
      raise ValueError(
          f"{name} with seq_lengths and k cuts each sequence at its own "
          f"steps, so every carry leaf must lead with the batch shape "
          f"{batch_dims}; carry{jax.tree_util.keystr(path)} has shape "
          f"{jnp.shape(leaf)}.")


def _flip(tree, seq_lengths, batch_dims, time_major: bool):
  return tree_map(lambda a: flip_sequences(a, seq_lengths, len(batch_dims),
                                           time_major), tree)


def _last_carry(carries, seq_lengths):
  """Each sequence's carry after its last valid step, from the stacked
  ``(time, *batch, ...)`` carries (``nn.RNN``'s selection, any batch rank)."""
  batch = seq_lengths.shape
  idx = jnp.reshape(seq_lengths - 1, (-1,))

  def pick(a):
    flat = jnp.reshape(a, (a.shape[0], idx.shape[0]) + a.shape[1 + len(batch):])
    return jnp.reshape(flat[idx, jnp.arange(idx.shape[0])],
                       batch + a.shape[1 + len(batch):])

  return tree_map(pick, carries)


def _options(layer, return_carry, time_major, reverse, keep_order):
  """A call's options: each one given, else the layer's attribute."""
  given = dict(return_carry=return_carry, time_major=time_major,
               reverse=reverse, keep_order=keep_order)
  return tuple(getattr(layer, name) if value is None else value
               for name, value in given.items())


def _prepare(inputs, cell, seq_lengths, time_major: bool, reverse: bool):
  """Flax's reading of a layer call: ``(inputs, time_axis, batch_dims,
  seq_lengths, carry_shape)``, the inputs flipped into processing order."""
  time_axis, batch_dims = _layout(inputs, cell.num_feature_axes, time_major)
  seq_lengths = _check_seq_lengths(seq_lengths, batch_dims)
  if reverse:
    inputs = _flip(inputs, seq_lengths, batch_dims, time_major)
  carry_shape = inputs.shape[:time_axis] + inputs.shape[time_axis + 1:]
  return inputs, time_axis, batch_dims, seq_lengths, carry_shape


def _finish(carry, outputs, *, slice_carry, seq_lengths, batch_dims,
            time_major, reverse, keep_order, return_carry):
  """The layer's result from the scan's, as Flax's layers return it."""
  if slice_carry:
    carries, outputs = outputs
    carry = _last_carry(carries, seq_lengths)
  if reverse and keep_order:
    outputs = _flip(outputs, seq_lengths, batch_dims, time_major)
  return (carry, outputs) if return_carry else outputs


def _step(cell, carry, x, cut, slice_carry: bool):
  """One step of Flax's scan body, the carry held where ``cut``."""
  if cut is not None:
    carry = segment.hold(cut, carry)
  carry, y = cell(carry, x)
  return carry, ((carry, y) if slice_carry else y)


def _autoname_as_rnn(module: nn.Module):
  """Names an unnamed submodule ``RNN_<i>``, from ``nn.RNN``'s counter, so
  that swapping ``nn.RNN`` for :class:`TruncatedRNN` keeps every variable's
  path, and hence its initial value and rngs."""
  if module.name is not None:
    return
  parent = module.parent
  if parent is getattr(linen_module, "_unspecified_parent", None):
    stack = linen_module._context.module_stack
    parent = stack[-1] if stack else None
  state = getattr(parent, "_state", None)
  if (not isinstance(parent, nn.Module) or state is None or state.in_setup
      or not parent._initialization_allowed):
    return  # named by its attribute (setup), or top level: nothing to do
  cursor = state.autoname_cursor.get("RNN", 0)
  object.__setattr__(module, "name", f"RNN_{cursor}")
  state.autoname_cursor["RNN"] = cursor + 1


class TruncatedRNN(nn.Module):
  """As ``flax.linen.RNN``, but the gradient is cut every ``k`` steps.

  Takes every attribute and call argument of ``nn.RNN`` with its meaning
  and default (``k`` comes second) and runs ``nn.RNN``'s own ``nn.scan``
  with the same ``variable_axes``, ``variable_broadcast``,
  ``variable_carry`` and ``split_rngs``, so the variables of every
  collection (at ``cell/...``; an unnamed layer is auto-named ``RNN_0``,
  ... like ``nn.RNN``), the rngs (dropout masks), outputs and carries are
  ``nn.RNN``'s, and it works as either direction of ``nn.Bidirectional``.
  Only the backward pass differs: the carry entering every ``k``-th step in
  processing order is held constant (see :mod:`jbptt.flax` for the exact
  rule with ``reverse`` and ``seq_lengths``); with a loss on every output this
  is TBPTT(k, k) inside a model. Collections carried with ``variable_carry``
  (e.g. batch statistics) advance as in ``nn.RNN`` and are not cut.

  Attributes:
    cell: a Linen recurrent cell (``nn.RNNCellBase``).
    k: the truncation length, a positive int; ``None`` cuts nothing.
    time_major: inputs are ``(time, *batch, *features)`` instead of
      ``(*batch, time, *features)``.
    return_carry: also return the final carry.
    reverse: process the sequence from its end (padding stays at the end).
    keep_order: with ``reverse``, return the outputs in the original order.
    unroll: passed to ``nn.scan``.
    variable_axes: passed to ``nn.scan``.
    variable_broadcast: passed to ``nn.scan``.
    variable_carry: passed to ``nn.scan``.
    split_rngs: passed to ``nn.scan``.

  Examples:
    >>> import jax, jax.numpy as jnp, flax.linen as nn, jbptt
    >>> x = jnp.ones((2, 7, 3))                          # (batch, time, features)
    >>> layer = nn.Bidirectional(jbptt.flax.TruncatedRNN(nn.GRUCell(4), 3),
    ...                          jbptt.flax.TruncatedRNN(nn.GRUCell(4), 3))
    >>> variables = layer.init(jax.random.key(0), x)
    >>> layer.apply(variables, x, seq_lengths=jnp.array([7, 4])).shape
    (2, 7, 8)

  References:
    Williams, R. J. and Peng, J. (1990). An efficient gradient-based algorithm
    for on-line training of recurrent network trajectories. Neural
    Computation 2(4).
  """

  cell: nn.RNNCellBase
  k: int | None
  time_major: bool = False
  return_carry: bool = False
  reverse: bool = False
  keep_order: bool = False
  unroll: int = 1
  variable_axes: Mapping[Any, Any] = FrozenDict()
  variable_broadcast: Any = "params"
  variable_carry: Any = False
  split_rngs: Mapping[Any, bool] = FrozenDict({"params": False})

  def __post_init__(self):
    _check_k(self.k)
    _autoname_as_rnn(self)
    super().__post_init__()

  def __call__(self, inputs, *, initial_carry: Any = None, init_key=None,
               seq_lengths=None, return_carry: bool | None = None,
               time_major: bool | None = None, reverse: bool | None = None,
               keep_order: bool | None = None):
    """Runs the cell over ``inputs``; the arguments are ``nn.RNN``'s.

    Args:
      inputs: ``(*batch, time, *features)`` (``time_major``:
        ``(time, *batch, *features)``).
      initial_carry: the initial carry; by default the cell's
        ``initialize_carry(init_key, ...)``.
      init_key: the key of ``initialize_carry`` (default ``key(0)``).
      seq_lengths: ``None`` or an int array of the batch shape: each
        sequence's length; later elements are padding.
      return_carry: overrides the attribute.
      time_major: overrides the attribute.
      reverse: overrides the attribute.
      keep_order: overrides the attribute.

    Returns:
      The outputs, or ``(carry, outputs)`` with ``return_carry``; with
      ``seq_lengths`` the carry is each sequence's after its last valid step.
    """
    return_carry, time_major, reverse, keep_order = _options(
        self, return_carry, time_major, reverse, keep_order)
    inputs, time_axis, batch_dims, seq_lengths, shape = _prepare(
        inputs, self.cell, seq_lengths, time_major, reverse)
    if initial_carry is None:
      key = jax.random.key(0) if init_key is None else init_key
      initial_carry = self.cell.initialize_carry(key, shape)
    cuts = _cuts(inputs.shape[time_axis], self.k, seq_lengths, initial_carry,
                 batch_dims, "TruncatedRNN")
    slice_carry = seq_lengths is not None and return_carry
    out_axes = (0, time_axis) if slice_carry else time_axis
    scan = lambda fn, in_axes: nn.scan(
        fn, in_axes=in_axes, out_axes=out_axes, unroll=self.unroll,
        variable_axes=self.variable_axes,
        variable_broadcast=self.variable_broadcast,
        variable_carry=self.variable_carry, split_rngs=self.split_rngs)
    if cuts is None:  # nothing to cut: nn.RNN's own program
      carry, outputs = scan(
          lambda cell, h, x: _step(cell, h, x, None, slice_carry),
          time_axis)(self.cell, initial_carry, inputs)
    else:
      carry, outputs = scan(
          lambda cell, h, x, cut: _step(cell, h, x, cut, slice_carry),
          (time_axis, 0))(self.cell, initial_carry, inputs, cuts)
    return _finish(carry, outputs, slice_carry=slice_carry,
                   seq_lengths=seq_lengths, batch_dims=batch_dims,
                   time_major=time_major, reverse=reverse,
                   keep_order=keep_order, return_carry=return_carry)


class NNXTruncatedRNN(nnx.RNN):
  """As ``flax.nnx.RNN``, but the gradient is cut every ``k`` steps.

  An ``nnx.RNN`` (a subclass, with the same state) whose call runs
  ``nnx.RNN``'s own ``nnx.scan`` (``state_axes``, ``broadcast_rngs``) with the
  carry entering every ``k``-th step in processing order held constant (the
  rule with ``reverse`` and ``seq_lengths`` is in :mod:`jbptt.flax`); values,
  state updates and rngs are ``nnx.RNN``'s, and it works as either direction
  of ``nnx.Bidirectional``.

  Args:
    cell: an NNX recurrent cell (``nnx.RNNCellBase``).
    k: the truncation length, a positive int; ``None`` cuts nothing.
    time_major: inputs are ``(time, *batch, *features)``.
    return_carry: also return the final carry.
    reverse: process the sequence from its end (padding stays at the end).
    keep_order: with ``reverse``, return the outputs in the original order.
    unroll: passed to ``nnx.scan``.
    state_axes: as ``nnx.RNN``'s: how the cell's state is scanned.
    broadcast_rngs: as ``nnx.RNN``'s: the rng streams broadcast (the same key
      at every step, e.g. recurrent dropout).
    rngs: as ``nnx.RNN``'s: the stream of ``initialize_carry``.

  Raises:
    ValueError: if ``k`` is neither ``None`` nor a positive int.

  Examples:
    >>> import jax.numpy as jnp, flax.nnx as nnx, jbptt
    >>> x = jnp.ones((2, 7, 3))
    >>> layer = nnx.Bidirectional(
    ...     jbptt.flax.NNXTruncatedRNN(nnx.GRUCell(3, 4, rngs=nnx.Rngs(0)), 3),
    ...     jbptt.flax.NNXTruncatedRNN(nnx.GRUCell(3, 4, rngs=nnx.Rngs(1)), 3))
    >>> layer(x, seq_lengths=jnp.array([7, 4])).shape
    (2, 7, 8)
  """

  def __init__(self, cell, k: int | None, *, time_major: bool = False,
               return_carry: bool = False, reverse: bool = False,
               keep_order: bool = False, unroll: int = 1,
               state_axes: Mapping[str, Any] | None = None,
               broadcast_rngs: Any = None, rngs: Any = True):
    super().__init__(cell, time_major=time_major, return_carry=return_carry,
                     reverse=reverse, keep_order=keep_order, unroll=unroll,
                     state_axes=state_axes, broadcast_rngs=broadcast_rngs,
                     rngs=rngs)
    self.k = _check_k(k)

  def __call__(self, inputs, *, initial_carry: Any = None, seq_lengths=None,
               return_carry: bool | None = None,
               time_major: bool | None = None, reverse: bool | None = None,
               keep_order: bool | None = None, rngs: Any = None):
    """Runs the cell over ``inputs``; the arguments are ``nnx.RNN``'s.

    Args:
      inputs: ``(*batch, time, *features)`` (``time_major``:
        ``(time, *batch, *features)``).
      initial_carry: the initial carry; by default the cell's
        ``initialize_carry``, from ``rngs`` or the layer's stream.
      seq_lengths: ``None`` or an int array of the batch shape.
      return_carry: overrides the attribute.
      time_major: overrides the attribute.
      reverse: overrides the attribute.
      keep_order: overrides the attribute.
      rngs: the ``Rngs`` or stream of ``initialize_carry``.

    Returns:
      The outputs, or ``(carry, outputs)`` with ``return_carry``.
    """
    return_carry, time_major, reverse, keep_order = _options(
        self, return_carry, time_major, reverse, keep_order)
    inputs, time_axis, batch_dims, seq_lengths, shape = _prepare(
        inputs, self.cell, seq_lengths, time_major, reverse)
    if rngs is None:
      rngs = self.rngs
    if isinstance(rngs, nnx.Rngs):
      rngs = rngs.carry.fork()
    if initial_carry is None:
      initial_carry = self.cell.initialize_carry(shape, rngs)
    cuts = _cuts(inputs.shape[time_axis], self.k, seq_lengths, initial_carry,
                 batch_dims, "NNXTruncatedRNN")
    slice_carry = seq_lengths is not None and return_carry
    broadcast_rngs = nnx.All(nnx.RngState, self.broadcast_rngs)
    state_axes = nnx.StateAxes({broadcast_rngs: None, **self.state_axes})
    out_axes = (nnx.Carry, (0, time_axis) if slice_carry else time_axis)
    # As nnx.RNN: split_rngs with splits=1 and squeeze=True gives unique
    # broadcast rngs at every call. nnx's scan passes every parameter of the
    # function, so a call with nothing to cut scans one without the cuts.
    scan = lambda fn, *axes: nnx.split_rngs(
        splits=1, only=self.broadcast_rngs, squeeze=True)(nnx.compat.scan(
            fn, in_axes=(state_axes, nnx.Carry, time_axis, *axes),
            out_axes=out_axes, unroll=self.unroll))
    args = (self.cell, initial_carry, inputs)
    if cuts is None:  # nothing to cut: nnx.RNN's own program
      carry, outputs = scan(
          lambda cell, h, x: _step(cell, h, x, None, slice_carry))(*args)
    else:
      carry, outputs = scan(
          lambda cell, h, x, cut: _step(cell, h, x, cut, slice_carry),
          0)(*args, cuts)
    return _finish(carry, outputs, slice_carry=slice_carry,
                   seq_lengths=seq_lengths, batch_dims=batch_dims,
                   time_major=time_major, reverse=reverse,
                   keep_order=keep_order, return_carry=return_carry)

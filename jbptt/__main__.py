"""``python -m jbptt``: a one-minute demonstration of TBPTT(k1, k2).

A small Flax LSTM learns delayed recall (the target at step t is the symbol
seen at step t - lag) on a long stream, trained online by
:func:`jbptt.trainer` under several truncations. Configurations whose ``k2``
covers the lag learn it; TBPTT(k1, 1) cannot see past one step.
"""

from __future__ import annotations

import argparse
import sys
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

import jbptt
import jbptt.flax as jf


class RecallModel(nn.Module):
  """An LSTM cell with a linear read-out: ``(carry, x) -> (carry, logits)``."""

  hidden: int
  vocab: int

  @nn.compact
  def __call__(self, carry, x):
    inputs = jax.nn.one_hot(x, self.vocab)
    carry, h = nn.OptimizedLSTMCell(self.hidden)(carry, inputs)
    return carry, nn.Dense(self.vocab)(h)


def recall_stream(key, steps, batch, vocab, lag):
  """Random symbols and, as targets, the same symbols ``lag`` steps late."""
  x = jax.random.randint(key, (steps + lag, batch), 0, vocab)
  return x[lag:], x[:-lag]


def run(k1, k2, steps, batch, hidden, vocab, lag, seed):
  model = RecallModel(hidden, vocab)
  cell = jf.linen_cell(model)
  key_init, key_data, key_eval = jax.random.split(jax.random.key(seed), 3)
  carry = nn.OptimizedLSTMCell(hidden).initialize_carry(key_init, (batch, vocab))
  params = model.init(key_init, carry, jnp.zeros((batch,), jnp.int32))
  step_loss = jbptt.cell_loss(
      cell,
      lambda logits, y: optax.softmax_cross_entropy_with_integer_labels(
          logits, y).mean(),
  )
  tr = jbptt.trainer(step_loss, optax.adam(3e-3), k1=k1, k2=k2)
  xs = recall_stream(key_data, steps, batch, vocab, lag)
  state = tr.init(params, carry)
  start = time.perf_counter()
  state, metrics = tr.update(state, xs)
  jax.block_until_ready(metrics)
  wall = time.perf_counter() - start
  # Accuracy of the trained model on a fresh stream.
  u, y = recall_stream(key_eval, 500, batch, vocab, lag)
  _, logits = jbptt.unroll(cell, state.params, carry, u)
  accuracy = float(jnp.mean(jnp.argmax(logits[lag:], -1) == y[lag:]))
  final_loss = float(jnp.mean(metrics.loss[-20:]))
  return len(metrics.loss), wall, final_loss, accuracy


def main(argv=None):
  parser = argparse.ArgumentParser(
      prog="python -m jbptt", description=__doc__.split("\n")[0])
  parser.add_argument("--steps", type=int, default=4000)
  parser.add_argument("--lag", type=int, default=5)
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args(argv)
  if args.steps < 1 or args.lag < 1:
    parser.exit(2, "python -m jbptt: error: --steps and --lag must be >= 1\n")
  from rich.console import Console
  from rich.table import Table

  configs = [(8, 1), (8, 8), (4, 16)]
  table = Table(title=f"Delayed recall, lag {args.lag}, chance 1/8, "
                f"{args.steps} steps x 32 streams ({jax.default_backend()})")
  for col in ("TBPTT(k1, k2)", "updates", "wall s (with compile)", "final loss",
              "accuracy"):
    table.add_column(col, justify="right")
  for k1, k2 in configs:
    updates, wall, loss, acc = run(k1, k2, args.steps, 32, 64, 8, args.lag,
                                   args.seed)
    table.add_row(f"({k1}, {k2})", str(updates), f"{wall:.1f}", f"{loss:.3f}",
                  f"{acc:.3f}")
  Console().print(table)
  return 0


if __name__ == "__main__":
  sys.exit(main())

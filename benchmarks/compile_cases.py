"""Compile-time cases of ``run.py``: chunks of random lengths and long ``n``.

``chunks``: a stream fed to ``jbptt.trainer`` in chunks of random lengths,
counting XLA compilations, against one call on the whole stream.
``long-n``: ``jbptt.truncated_loss``'s gradient at growing ``n``: lowering and
compile time, the lowered program's size, and run time per step.
"""

from __future__ import annotations

import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jbptt

_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"


class CompileCounter:
  """Counts XLA backend compilations while it is active (``with``)."""

  def __init__(self):
    self.count, self._on = 0, False
    jax.monitoring.register_event_duration_secs_listener(self._listen)

  def _listen(self, event, duration, **kwargs):
    if self._on and event == _COMPILE_EVENT:
      self.count += 1

  def __enter__(self):
    self.count, self._on = 0, True
    return self

  def __exit__(self, *exc):
    self._on = False


_COUNTER = None


def _counter():
  global _COUNTER
  if _COUNTER is None:  # listeners cannot be removed: one per process
    _COUNTER = CompileCounter()
  return _COUNTER


def _rnn(hidden, dim, seed=0):
  """A tanh RNN cell with a linear read-out and squared error."""
  k = jax.random.split(jax.random.key(seed), 3)
  params = {"w": jax.random.normal(k[0], (dim, hidden)) / dim**0.5,
            "u": jax.random.normal(k[1], (hidden, hidden)) / hidden**0.5,
            "v": jax.random.normal(k[2], (hidden, 1)) / hidden**0.5}

  def step_loss(p, h, xy):
    x, y = xy
    h = jnp.tanh(x @ p["w"] + h @ p["u"])
    return h, jnp.mean((h @ p["v"] - y) ** 2)

  return params, step_loss


def _stream(n, batch, dim, seed=1):
  rng = np.random.default_rng(seed)
  xs = rng.standard_normal((n, batch, dim)).astype(np.float32)
  ys = np.sin(np.cumsum(xs[..., :1], axis=0) / 8).astype(np.float32)
  return xs, ys


def chunks_case(calls=40, low=50, high=500, k1=8, k2=32, hidden=16, dim=4,
                batch=1, seed=0, progress=None):
  """Rows: a stream fed in ``calls`` chunks of lengths uniform in
  ``[low, high]`` to a fresh trainer (compilations, total time), the same
  chunks again (time per step, compiled), and one call on the whole stream."""
  lengths = np.random.default_rng(seed).integers(low, high + 1, calls)
  n = int(lengths.sum())
  xs, ys = _stream(n, batch, dim)
  params, step_loss = _rnn(hidden, dim)
  bounds = np.concatenate([[0], np.cumsum(lengths)])
  pieces = [(xs[a:b], ys[a:b]) for a, b in zip(bounds[:-1], bounds[1:])]
  tr = jbptt.trainer(step_loss, optax.adam(1e-3), k1=k1, k2=k2)
  spec = (xs[:1], ys[:1])
  counter = _counter()

  def feed(state, chunks):
    for piece in chunks:
      state, metrics = tr.update(state, piece)
    jax.block_until_ready(metrics.loss)
    return state

  h0 = jnp.zeros((batch, hidden))
  state = tr.init(params, h0, spec)
  with counter:
    start = time.perf_counter()
    state = feed(state, pieces)
    first_s = time.perf_counter() - start
  compiles = counter.count
  if progress:
    progress()
  again = []
  for _ in range(3):
    start = time.perf_counter()
    state = feed(state, pieces)
    again.append(time.perf_counter() - start)
  if progress:
    progress()
  whole = tr.init(params, h0, spec)
  with counter:
    feed(whole, [(xs, ys)])
  whole_compiles = counter.count
  whole_s = []
  for _ in range(3):
    start = time.perf_counter()
    whole = feed(whole, [(xs, ys)])
    whole_s.append(time.perf_counter() - start)
  if progress:
    progress()
  base = {"case": "chunks", "k1": k1, "k2": k2, "batch": batch,
          "hidden": hidden, "n": n, "calls": calls,
          "distinct_lengths": len(set(lengths.tolist())),
          "lengths": f"{low} to {high}"}
  step_again = statistics.median(again) / n
  step_whole = statistics.median(whole_s) / n
  return [
      {**base, "impl": f"jbptt.trainer, {calls} chunks", "compiles": compiles,
       "first_pass_s": round(first_s, 3),
       "us_per_step": round(step_again * 1e6, 2),
       "ratio_to_whole": round(step_again / step_whole, 2)},
      {**base, "impl": "jbptt.trainer, one call", "compiles": whole_compiles,
       "first_pass_s": None, "us_per_step": round(step_whole * 1e6, 2),
       "ratio_to_whole": 1.0},
  ]


def long_n_case(lengths, configs=((1, 64), (8, 32)), hidden=8, dim=2,
                batch=1, repeats=3, run_up_to=10**6, progress=None):
  """Rows: ``jax.grad`` of ``truncated_loss`` at each ``n`` and ``(k1, k2)``:
  trace and lowering time, compile time, the lowered program's size (its
  StableHLO text), run time per step (only for ``n <= run_up_to``)."""
  params, step_loss = _rnn(hidden, dim)
  h0 = jnp.zeros((batch, hidden))
  rows = []
  for k1, k2 in configs:
    loss = jbptt.truncated_loss(step_loss, k1=k1, k2=k2)
    grad = jax.jit(jax.grad(lambda p, xs: loss(p, h0, xs)[0]))
    for n in lengths:
      xs = _stream(n, batch, dim)
      start = time.perf_counter()
      lowered = grad.lower(params, xs)
      lower_s = time.perf_counter() - start
      size = len(lowered.as_text())
      start = time.perf_counter()
      compiled = lowered.compile()
      compile_s = time.perf_counter() - start
      row = {"case": "long-n", "impl": "jax.grad(jbptt.truncated_loss)",
             "k1": k1, "k2": k2, "batch": batch, "hidden": hidden, "n": n,
             "lower_s": round(lower_s, 3), "compile_s": round(compile_s, 3),
             "program_kb": round(size / 1024, 1), "us_per_step": None}
      if n <= run_up_to:
        jax.block_until_ready(compiled(params, xs))
        times = []
        for _ in range(repeats):
          start = time.perf_counter()
          jax.block_until_ready(compiled(params, xs))
          times.append(time.perf_counter() - start)
        row["us_per_step"] = round(statistics.median(times) / n * 1e6, 3)
      rows.append(row)
      if progress:
        progress()
  return rows


def markdown(rows) -> list[str]:
  """The two cases' tables, as lines."""
  lines = []
  ch = [r for r in rows if r["case"] == "chunks"]
  if ch:
    r0 = ch[0]
    lines += ["", f"A stream of {r0['n']} steps fed in {r0['calls']} chunks of "
              f"random lengths ({r0['lengths']} steps, {r0['distinct_lengths']} "
              f"distinct) to a fresh trainer, against one call on the whole "
              f"stream (TBPTT({r0['k1']}, {r0['k2']}), tanh RNN, B="
              f"{r0['batch']}, H={r0['hidden']}; compiles: XLA compilations "
              "counted with jax.monitoring; first pass: the fresh trainer's "
              "total time; us / step: compiled, median of 3):", "",
              "| implementation | compiles | first pass s | us / step | "
              "ratio to one call |", "|---|---|---|---|---|"]
    lines += [f"| {r['impl']} | {r['compiles']} | {r['first_pass_s'] or '-'} | "
              f"{r['us_per_step']} | {r['ratio_to_whole']:.2f} |" for r in ch]
  ln = [r for r in rows if r["case"] == "long-n"]
  if ln:
    lines += ["", "jax.grad of jbptt.truncated_loss against the sequence length "
              f"n (tanh RNN, B={ln[0]['batch']}, H={ln[0]['hidden']}; lower: "
              "trace and lower to StableHLO; program: its text's size):", "",
              "| k1 | k2 | n | lower s | compile s | program KB | us / step |",
              "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['k1']} | {r['k2']} | {r['n']} | {r['lower_s']} | "
              f"{r['compile_s']} | {r['program_kb']} | "
              f"{r['us_per_step'] if r['us_per_step'] is not None else '-'} |"
              for r in ln]
  return lines

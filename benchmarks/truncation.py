"""What the k2 rules cost: Randomized, Adaptive and burn-in against fixed k2.

    python benchmarks/truncation.py [--repeats 7] [--out DIR] [--smoke]

One LSTM (H=64, D=16, batch 16) trained online by :func:`jbptt.trainer` in
chunks of 256 steps with k1 = 8. Each row is timed on the same chunk after
a warm-up call (compilation excluded), the median of ``repeats`` calls, and
compared with the fixed k2 it stands for, in this run:

* ``Randomized(8, 64)`` against TBPTT(8, 8) (the same mean) and
  TBPTT(8, 64) (the same reach), with :class:`jbptt.Recompute` and
  :class:`jbptt.StoredStates`;
* ``Adaptive(0.1, (8, 16, 32, 64))`` against TBPTT(8, 64) (its window) and
  the fixed k2 it chose, with both strategies;
* ``Recompute(burn_in=16)`` at TBPTT(8, 8) against no burn-in.

Writes ``DIR/results.json`` and ``DIR/results.md`` (date, machine,
versions).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import sys
import time

BATCH, HIDDEN, DIM, CHUNK, K1 = 16, 64, 16, 256, 8
SMOKE = (8, 4, 2, 32)  # hidden, dim, batch, chunk of --smoke


def _problem(hidden, dim, batch, chunk):
  import jax
  import jax.numpy as jnp
  import numpy as np

  rng = np.random.default_rng(0)
  params = {"Wx": rng.standard_normal((dim, 4 * hidden)) * 0.1,
            "Wh": rng.standard_normal((hidden, 4 * hidden)) * 0.1,
            "b": np.zeros(4 * hidden), "out": rng.standard_normal(hidden) * 0.1}
  params = {k: jnp.asarray(v, jnp.float32) for k, v in params.items()}

  def step_loss(p, carry, x):
    u, y = x
    h, c = carry
    gates = u @ p["Wx"] + h @ p["Wh"] + p["b"]
    i, f, g, o = jnp.split(gates, 4, axis=-1)
    c = jax.nn.sigmoid(f) * c + jax.nn.sigmoid(i) * jnp.tanh(g)
    h = jax.nn.sigmoid(o) * jnp.tanh(c)
    return (h, c), jnp.mean((h @ p["out"] - y) ** 2)

  carry = (jnp.zeros((batch, hidden)), jnp.zeros((batch, hidden)))
  xs = (jnp.asarray(rng.standard_normal((chunk, batch, dim)), jnp.float32),
        jnp.asarray(rng.standard_normal((chunk, batch)), jnp.float32))
  return step_loss, params, carry, xs


def _time(k2, gradient, problem, repeats):
  """Median ms per chunk of ``update``, and the k2 of the last updates."""
  import jax
  import numpy as np
  import optax

  import jbptt

  step_loss, params, carry, xs = problem
  tr = jbptt.trainer(step_loss, optax.adam(1e-3), k1=K1, k2=k2,
                     gradient=gradient)
  key = jax.random.key(0) if isinstance(k2, jbptt.Randomized) else None
  state = tr.init(params, carry, xs, key=key)
  state, metrics = tr.update(state, xs)  # compile and warm up
  jax.block_until_ready(state)
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    state, metrics = tr.update(state, xs)
    jax.block_until_ready(state)
    times.append(time.perf_counter() - start)
  used = np.asarray(metrics.k2)[np.asarray(metrics.valid)]
  return statistics.median(times) * 1e3, float(used.mean())


def environment() -> dict:
  """:func:`processes.environment` (date, command, machine, versions, load)
  and the JAX device."""
  import jax

  sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
  from processes import environment as shared

  return {**shared(), "device": str(jax.devices()[0].device_kind)}


def rows(repeats: int, smoke: bool) -> list[dict]:
  """Every row: its label, strategy, ms per chunk, mean k2 and its peers."""
  import jbptt

  sizes = SMOKE if smoke else (HIDDEN, DIM, BATCH, CHUNK)
  problem = _problem(*sizes)
  mean, top = 8, 64
  adaptive = jbptt.Adaptive(0.1, (8, 16, 32, 64))
  cases = [
      ("TBPTT(8, 8)", 8, jbptt.Recompute()),
      ("TBPTT(8, 64)", top, jbptt.Recompute()),
      (f"Randomized({mean}, {top})", jbptt.Randomized(mean, top),
       jbptt.Recompute()),
      ("TBPTT(8, 64), stored", top, jbptt.StoredStates()),
      (f"Randomized({mean}, {top}), stored", jbptt.Randomized(mean, top),
       jbptt.StoredStates()),
      ("Adaptive(0.1, (8, 16, 32, 64))", adaptive, jbptt.Recompute()),
      ("Adaptive(0.1, (8, 16, 32, 64)), stored", adaptive,
       jbptt.StoredStates()),
      ("TBPTT(8, 8), burn_in=16", 8, jbptt.Recompute(burn_in=16)),
  ]
  out = []
  for label, k2, gradient in cases:
    ms, used = _time(k2, gradient, problem, repeats)
    out.append({"config": label, "ms_per_chunk": ms, "k2_mean": used})
    print(f"{label}: {ms:.1f} ms per chunk (mean k2 {used:g})", flush=True)
  chosen = round(out[5]["k2_mean"])
  if chosen not in (8, 64):  # the fixed k2 Adaptive settled on, timed too
    ms, used = _time(chosen, jbptt.Recompute(), problem, repeats)
    out.append({"config": f"TBPTT(8, {chosen})", "ms_per_chunk": ms,
                "k2_mean": used})
  return out


PEERS = {  # row: the fixed rows it is compared with
    "Randomized(8, 64)": ("TBPTT(8, 8)", "TBPTT(8, 64)"),
    "Randomized(8, 64), stored": ("TBPTT(8, 8)", "TBPTT(8, 64), stored"),
    "Adaptive(0.1, (8, 16, 32, 64))": ("TBPTT(8, 64)", "chosen"),
    "Adaptive(0.1, (8, 16, 32, 64)), stored": ("TBPTT(8, 64), stored",
                                               "chosen"),
    "TBPTT(8, 8), burn_in=16": ("TBPTT(8, 8)",),
}


def table(results: list[dict], env: dict, repeats: int, smoke: bool) -> str:
  hidden, dim, batch, chunk = SMOKE if smoke else (HIDDEN, DIM, BATCH, CHUNK)
  ms = {r["config"]: r["ms_per_chunk"] for r in results}
  chosen = round(next(r["k2_mean"] for r in results
                      if r["config"].startswith("Adaptive")))
  lines = [f"# The cost of the k2 rules ({env['date']})", "",
           f"{env['machine']} ({env['device']}); jax {env['jax']}, jaxlib "
           f"{env['jaxlib']}; load average {env['load_average'][0]:.1f} at "
           "the end" + ("; --smoke sizes" if smoke else ""), "",
           f"LSTM H={hidden}, D={dim}, batch {batch}, chunks of {chunk} steps,"
           f" k1 = {K1}; median of {repeats} chunks after a warm-up; ratios "
           "are times against the named fixed-k2 row, in this run", "",
           "| config | mean k2 used | ms per chunk | ratios |",
           "|---|---|---|---|"]
  for r in results:
    peers = PEERS.get(r["config"], ())
    ratios = []
    for peer in peers:
      name = f"TBPTT(8, {chosen})" if peer == "chosen" else peer
      if name in ms:
        ratios.append(f"{r['ms_per_chunk'] / ms[name]:.2f}x {name}")
    lines.append(f"| {r['config']} | {r['k2_mean']:.2f} | "
                 f"{r['ms_per_chunk']:.1f} | {'; '.join(ratios)} |")
  return "\n".join(lines) + "\n"


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--repeats", type=int, default=7)
  parser.add_argument("--out", default="bench-out-truncation")
  parser.add_argument("--smoke", action="store_true",
                      help="tiny sizes and 1 repeat: checks that it runs")
  args = parser.parse_args(argv)
  repeats = 1 if args.smoke else args.repeats
  out = pathlib.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  results = rows(repeats, args.smoke)
  env = environment()
  text = table(results, env, repeats, args.smoke)
  (out / "results.md").write_text(text)
  (out / "results.json").write_text(json.dumps(
      {"environment": env, "rows": results}, indent=1))
  print(text)


if __name__ == "__main__":
  main()

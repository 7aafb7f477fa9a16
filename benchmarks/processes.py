"""The trainer's throughput on 1, 2 and 4 JAX processes of this machine.

    python benchmarks/processes.py [--processes 1 2 4] [--repeats 7] [--out DIR]

Each point starts ``P`` processes on 127.0.0.1 (``jax.distributed``, gloo CPU
collectives, one CPU device each) that train one LSTM language-model-like
stream together, each feeding its ``batch / P`` streams
(:func:`jbptt.sharding.shard_batch`): TBPTT(16, 16) and TBPTT(4, 16),
chunks of 64 steps, the same global batch at every ``P``. After a warm-up
chunk, process 0 times ``repeats`` chunks (each ``update`` waited for) and
reports the median; the table gives ms per chunk, steps per second of the
global batch and the ratio to one process, measured in this run. On one
machine the processes share its cores, so this shows what the collectives
cost, not a speed-up. Writes ``DIR/results.json`` and ``DIR/results.md``
(with the date, machine and versions).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import platform
import socket
import statistics
import subprocess
import sys
import time

CONFIGS = [(16, 16), (4, 16)]
BATCH, HIDDEN, DIM, CHUNK = 16, 64, 16, 64
TIMEOUT = 300.0


def worker(port: int, n: int, i: int, repeats: int, result: str) -> None:
  """One process of a point: trains, times, writes ``result`` (process 0)."""
  import jax

  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}",
                             num_processes=n, process_id=i)
  import jax.numpy as jnp
  import numpy as np
  import optax

  import jbptt
  import jbptt.sharding as js

  rng = np.random.default_rng(0)
  params = {"Wx": rng.standard_normal((DIM, 4 * HIDDEN)) * 0.1,
            "Wh": rng.standard_normal((HIDDEN, 4 * HIDDEN)) * 0.1,
            "b": np.zeros(4 * HIDDEN), "out": rng.standard_normal(HIDDEN)}
  params = {k: v.astype(np.float32) for k, v in params.items()}

  def step_loss(p, carry, x):
    u, y = x
    h, c = carry
    gates = u @ p["Wx"] + h @ p["Wh"] + p["b"]
    a, f, g, o = jnp.split(gates, 4, -1)
    c = jax.nn.sigmoid(f) * c + jax.nn.sigmoid(a) * jnp.tanh(g)
    h = jax.nn.sigmoid(o) * jnp.tanh(c)
    return (h, c), jnp.mean((h @ p["out"] - y) ** 2)

  mesh = js.batch_mesh()
  size = BATCH // n
  mine = slice(i * size, (i + 1) * size)
  chunks = [(rng.standard_normal((CHUNK, BATCH, DIM)).astype(np.float32),
             rng.standard_normal((CHUNK, BATCH)).astype(np.float32))
            for _ in range(repeats + 1)]
  placed = [js.shard_batch(jax.tree.map(lambda a: a[:, mine], c), mesh,
                           batch_axis=1) for c in chunks]
  zeros = np.zeros((BATCH, HIDDEN), np.float32)
  carry = js.shard_batch((zeros[mine], zeros[mine]), mesh)
  out = {}
  for k1, k2 in CONFIGS:
    tr = jbptt.trainer(step_loss, optax.adam(1e-3), k1=k1, k2=k2)
    state = tr.init(js.replicate(params, mesh), carry, placed[0])
    times = []
    for j, xs in enumerate(placed):
      start = time.perf_counter()
      state, metrics = tr.update(state, xs)
      jax.block_until_ready((state, metrics))
      if j:  # the first compiles
        times.append(time.perf_counter() - start)
    out[f"TBPTT({k1}, {k2})"] = 1e3 * statistics.median(times)
  if i == 0:
    pathlib.Path(result).write_text(json.dumps(out))
  jax.distributed.shutdown()


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def point(n: int, repeats: int, folder: pathlib.Path) -> dict:
  """Runs ``n`` worker processes; process 0's medians (ms per chunk)."""
  result = folder / f"point-{n}.json"
  port = free_port()
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  env.pop("XLA_FLAGS", None)  # one CPU device per process
  procs = [subprocess.Popen(
      [sys.executable, __file__, "--_worker", str(port), str(n), str(i),
       str(repeats), str(result)], env=env) for i in range(n)]
  try:
    deadline = time.monotonic() + TIMEOUT
    while any(p.poll() is None for p in procs):
      if time.monotonic() > deadline or any(p.poll() not in (None, 0)
                                            for p in procs):
        raise RuntimeError(f"{n} processes: failed or timed out after "
                           f"{TIMEOUT:g} s (exit codes "
                           f"{[p.poll() for p in procs]})")
      time.sleep(0.1)
    if any(p.returncode for p in procs):
      raise RuntimeError(f"{n} processes: exit codes "
                         f"{[p.returncode for p in procs]}")
    return json.loads(result.read_text())
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
      p.wait()


def environment() -> dict:
  import importlib.metadata as md

  cpu = platform.processor() or platform.machine()
  try:
    for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
      if line.startswith("model name"):
        cpu = line.split(":", 1)[1].strip()
        break
  except OSError:
    pass
  return {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(
      timespec="minutes"), "command": " ".join(sys.argv),
      "machine": f"{cpu}, {os.cpu_count()} cores", "python":
      platform.python_version(), **{p: md.version(p) for p in
                                    ("jax", "jaxlib", "optax")},
      "load_average": list(os.getloadavg())}


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--processes", type=int, nargs="+", default=[1, 2, 4])
  parser.add_argument("--repeats", type=int, default=7)
  parser.add_argument("--out", default="bench-out-processes")
  parser.add_argument("--_worker", nargs=5, help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if args._worker:
    port, n, i, repeats, result = args._worker
    worker(int(port), int(n), int(i), int(repeats), result)
    return
  if any(BATCH % n for n in args.processes):
    parser.error(f"--processes must divide the batch of {BATCH}")
  out = pathlib.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  points = {n: point(n, args.repeats, out) for n in args.processes}
  for n in args.processes:
    (out / f"point-{n}.json").unlink()
  env = environment()
  base = points[args.processes[0]]
  lines = [f"# Trainer throughput on several processes ({env['date']})", "",
           f"{env['machine']}; jax {env['jax']}, jaxlib {env['jaxlib']}; "
           f"load average {env['load_average'][0]:.1f} at the end", "",
           f"LSTM H={HIDDEN}, D={DIM}, global batch {BATCH}, chunks of "
           f"{CHUNK} steps; median of {args.repeats} chunks; ratio: time "
           f"against {args.processes[0]} process(es), in this run", "",
           "| config | processes | ms per chunk | steps/s | ratio |",
           "|---|---|---|---|---|"]
  for config in base:
    for n in args.processes:
      ms = points[n][config]
      lines.append(f"| {config} | {n} | {ms:.1f} | {CHUNK / ms * 1e3:.0f} | "
                   f"{ms / base[config]:.2f}x |")
  text = "\n".join(lines) + "\n"
  (out / "results.md").write_text(text)
  (out / "results.json").write_text(json.dumps(
      {"environment": env, "ms_per_chunk": points}, indent=1))
  print(text)


if __name__ == "__main__":
  main()

"""jbptt against PyTorch, Keras and hand-written JAX TBPTT, side by side.

    python benchmarks/run.py [--quick] [--smoke] [--out DIR] [--cases NAME ...]
    python benchmarks/run.py --replot DIR [DIR ...]   # redraw saved results' plots

Each case runs every implementation in this one process, interleaved, after a
warm-up call (whose extra time over the median is reported as compile time),
and reports medians over the repeats. The memory case runs each point in a
fresh subprocess and reports its peak resident memory (on a GPU, the device's
peak). Writes ``DIR/results.json``, ``DIR/results.md`` (every time also as a
ratio to ``jbptt.trainer`` measured in the same run; see ``BASE``),
``DIR/environment.json`` (date, command, machine, versions) and PNG plots.
The same command runs on a GPU: JAX finds it, and PyTorch uses CUDA when
present.

The lm case is a word-level language model (embedding, LSTM, a read-out
over a vocabulary of ``vocab`` tokens, softmax cross-entropy, Adam) on a
synthetic token stream, TBPTT(35, 35) as in PyTorch's word_language_model:
the trainer with the read-out inside each step against
``jbptt.cell_loss`` (the read-out once per window) and that PyTorch recipe.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import importlib.metadata
import json
import os
import pathlib
import platform
import statistics
import subprocess
import sys
import time

os.environ["KERAS_BACKEND"] = "jax"  # before anything imports Keras
# On a GPU, JAX would otherwise take 75% of its memory up front, and the
# memory and remat cases' subprocesses could not start beside this process.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
# PyTorch's OpenMP threads otherwise spin while they wait for each other: on a
# CPU shared with any other busy process its nn.LSTM then runs 5 to 10 times
# slower (measured: 22 ms a chunk of the lm case alone, 200 to 1800 beside a
# test run). Set OMP_WAIT_POLICY=ACTIVE to measure the spinning default.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

import jax  # noqa: E402
import numpy as np  # noqa: E402

import compile_cases  # noqa: E402
import impls_jax  # noqa: E402
import impls_torch  # noqa: E402


@dataclasses.dataclass(frozen=True)
class Case:
  name: str
  batch: int
  dim: int
  hidden: int
  n: int
  k1: int
  k2: int
  vocab: int = 0  # the lm case's vocabulary (dim: its embedding); 0 otherwise


def cases(mode: str) -> dict[str, list[Case]]:
  """Named groups of cases; ``mode`` is full, quick or smoke."""
  if mode == "smoke":
    return {
        "lstm": [Case("lstm", 2, 3, 8, 32, 8, 8), Case("lstm", 2, 3, 8, 32, 4, 8)],
        "stream": [Case("stream", 1, 3, 8, 16, 4, 8)],
        "unroll": [Case("unroll", 2, 3, 8, 32, 8, 8)],
        "lm": [Case("lm", 2, 8, 16, 16, 8, 8, vocab=64)],
        "memory": [],
        "remat": [],
        "devices": [],
        "chunks": [],
        "long-n": [],
    }
  n_big = 1024 if mode == "full" else 256
  return {
      "lstm": [Case("lstm", 32, 16, 128, n_big, 32, 32),
               Case("lstm", 32, 16, 128, n_big, 8, 32)],
      "online": [Case("online", 1, 4, 32, 512, 4, 16),
                 Case("online", 1, 4, 32, 512, 1, 16)],
      "stream": [Case("stream", 1, 4, 32, 512, 4, 16),
                 Case("stream", 1, 4, 32, 512, 1, 16)],
      "k2-sweep": [Case("k2-sweep", 32, 16, 128, n_big // 2, 8, k2)
                   for k2 in (8, 16, 32, 64)],
      "unroll": [Case("unroll", 32, 16, 128, n_big, 32, 32),
                 Case("unroll", 32, 16, 128, n_big, 8, 32),
                 Case("unroll", 1, 4, 32, 512, 4, 16)],
      # Embedding 64, LSTM 128, batch 16, TBPTT(35, 35); 20 chunks a run
      # (8 in --quick).
      "lm": [Case("lm", 16, 64, 128, 35 * (20 if mode == "full" else 8), 35, 35,
                  vocab=v) for v in ((2000, 10_000) if mode == "full" else (2000,))],
      "memory": [],  # run by memory_case
      "remat": [],  # run by remat_case
      "devices": [],  # run by devices_case
      "chunks": [],  # run by compile_cases.chunks_case
      "long-n": [],  # run by compile_cases.long_n_case
  }


def device_name() -> str:
  d = jax.devices()[0]
  if d.platform == "cpu":
    return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
  return f"{d.platform} ({d.device_kind})"


def data(case: Case, seed: int = 0):
  """The case's stream: ``(xs, ys)``, time-major (``lm_tokens`` for lm)."""
  if case.vocab:
    return lm_tokens(case, seed)
  rng = np.random.default_rng(seed)
  xs = rng.standard_normal((case.n, case.batch, case.dim)).astype(np.float32)
  ys = rng.standard_normal((case.n, case.batch, 1)).astype(np.float32)
  return jax.numpy.asarray(xs), jax.numpy.asarray(ys)


def lm_tokens(case: Case, seed: int = 0):
  """A synthetic token stream for the lm case: ``(tokens, next tokens)``,
  int32 arrays of shape ``(n, batch)``, each batch row its own stream.

  A seeded Markov chain: from token ``a`` the next token is one of four
  successors of ``a`` fixed at random (with probabilities 0.5, 0.25, 0.15,
  0.1), or, with probability 0.1, any token of the vocabulary.
  """
  rng = np.random.default_rng(seed)
  vocab, n, batch = case.vocab, case.n, case.batch
  successors = rng.integers(0, vocab, (vocab, 4))
  which = rng.choice(4, size=(n, batch), p=[0.5, 0.25, 0.15, 0.1])
  jump = rng.random((n, batch)) < 0.1
  anywhere = rng.integers(0, vocab, (n, batch))
  tokens = np.empty((n + 1, batch), np.int32)
  tokens[0] = rng.integers(0, vocab, batch)
  for t in range(n):
    tokens[t + 1] = np.where(jump[t], anywhere[t],
                             successors[tokens[t], which[t]])
  return jax.numpy.asarray(tokens[:-1]), jax.numpy.asarray(tokens[1:])


def impls_for(case: Case):
  """The implementations a case compares (the stream case: the trainer fed
  the whole sequence in one call against ``k1`` steps per call, its state
  as it is and packed; the unroll
  case: the trainer at each ``unroll`` against the hand-written scan's; the
  lm case: the read-out in each step, ``jbptt.cell_loss`` and PyTorch's
  word_language_model)."""
  if case.vocab:
    return impls_jax.LM_IMPLS + impls_torch.LM_IMPLS
  if case.name == "stream":
    return [impls_jax.Trainer, impls_jax.TrainerFedInChunks,
            impls_jax.TrainerFedInChunksPacked]
  if case.name == "unroll":
    return impls_jax.UNROLL_IMPLS
  return impls_jax.IMPLS + impls_torch.IMPLS


def available(impl_types, case):
  """Instances of the implementations that can run ``case`` here."""
  made, skipped = [], []
  for impl_type in impl_types:
    try:
      made.append(impl_type(case))
    except (NotImplementedError, ImportError) as e:
      skipped.append((impl_type.name, str(e)))
  return made, skipped


def time_case(case: Case, repeats: int, progress=None):
  """Rows for every implementation of one case, interleaved repeats."""
  xs, ys = data(case)
  impls, skipped = available(impls_for(case), case)
  first = {}
  for impl in impls:
    start = time.perf_counter()
    impl.run(xs, ys)
    first[impl.name] = time.perf_counter() - start
    if progress:
      progress()
  times = {impl.name: [] for impl in impls}
  for _ in range(repeats):
    for impl in impls:
      start = time.perf_counter()
      impl.run(xs, ys)
      times[impl.name].append(time.perf_counter() - start)
      if progress:
        progress()
  rows = []
  for impl in impls:
    med = statistics.median(times[impl.name])
    row = {
        "case": case.name, "impl": impl.name, "k1": case.k1, "k2": case.k2,
        "batch": case.batch, "hidden": case.hidden, "n": case.n,
        "ms_per_seq": round(med * 1e3, 2), "steps_per_s": round(case.n / med, 1),
        "peak_mem_mb": _device_peak_mb(),
        "compile_s": round(max(0.0, first[impl.name] - med), 3),
        "device": device_name(),
    }
    if case.vocab:  # per chunk of k1 steps, and tokens (steps x batch)
      chunks = case.n / case.k1
      row.update({
          "vocab": case.vocab, "dim": case.dim,
          "ms_per_chunk": round(med * 1e3 / chunks, 2),
          "min_ms_per_chunk": round(min(times[impl.name]) * 1e3 / chunks, 2),
          "tokens_per_s": round(case.n * case.batch / med),
          "repeats": repeats,
          "ms_all": [round(t * 1e3, 2) for t in times[impl.name]],
      })
    rows.append(row)
  return rows, skipped


def _device_peak_mb():
  stats = jax.devices()[0].memory_stats()
  if not stats or "peak_bytes_in_use" not in stats:
    return None  # the CPU reports no device memory; see the memory case
  return round(stats["peak_bytes_in_use"] / 2**20, 1)


# -- memory against stream length, one subprocess per point ---------------------


def _high_water_mb():
  """This process's peak resident memory (VmHWM; reset by exec, unlike
  ru_maxrss, which a child inherits from a large parent)."""
  try:
    with open("/proc/self/status") as f:
      for line in f:
        if line.startswith("VmHWM:"):
          return int(line.split()[1]) / 1024
  except OSError:
    pass
  import resource

  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def memory_probe(impl: str, n: int, chunk: int) -> dict:
  """Runs in a fresh process: trains on a stream of n steps, returns peaks."""
  case = Case("memory", 8, 4, 64, n, 32, 32)
  rss0 = _high_water_mb()
  rng = np.random.default_rng(0)
  if impl == "jbptt.trainer":
    model = impls_jax.Trainer(case)
    for start in range(0, n, chunk):  # the stream arrives chunk by chunk
      m = min(chunk, n - start)
      model.run(*data(dataclasses.replace(case, n=m), seed=start))
  else:
    model = impls_jax.FullBPTT(case)
    xs = rng.standard_normal((n, case.batch, case.dim)).astype(np.float32)
    ys = rng.standard_normal((n, case.batch, 1)).astype(np.float32)
    model.run(jax.numpy.asarray(xs), jax.numpy.asarray(ys))
  return {"peak_rss_mb": round(_high_water_mb(), 1),
          "start_rss_mb": round(rss0, 1), "device_peak_mb": _device_peak_mb()}


def memory_case(lengths, chunk, progress=None):
  rows = []
  for impl in ("jbptt.trainer", "full BPTT"):
    for n in lengths:
      if impl == "full BPTT" and n > 100_000:
        continue  # grows linearly; 1e5 already shows it
      start = time.perf_counter()
      out = subprocess.run(
          [sys.executable, __file__, "--_memprobe", impl, str(n), str(chunk)],
          capture_output=True, text=True, check=False)
      wall = time.perf_counter() - start
      if out.returncode != 0:
        raise RuntimeError(f"memory probe {impl} n={n} failed:\n{out.stderr}")
      probe = json.loads(out.stdout.strip().splitlines()[-1])
      peak = probe["device_peak_mb"] or probe["peak_rss_mb"]
      rows.append({
          "case": "memory", "impl": impl, "k1": 32, "k2": 32, "batch": 8,
          "hidden": 64, "n": n, "ms_per_seq": round(wall * 1e3, 1),
          "steps_per_s": round(n / wall, 1), "peak_mem_mb": peak,
          "compile_s": None, "device": device_name(),
      })
      if progress:
        progress()
  return rows


# -- remat for a long window, one subprocess per point --------------------------


def remat_probe(impl: str, k: int, batch: int, hidden: int) -> dict:
  """Runs in a fresh process: TBPTT(k, k) over 2 k steps, twice; returns the
  peak resident memory and the second run's time."""
  case = Case("remat", batch, 4, hidden, 2 * k, k, k)
  cls = impls_jax.TrainerRemat if "remat" in impl else impls_jax.Trainer
  model = cls(case)
  xs, ys = data(case)
  model.run(xs, ys)
  start = time.perf_counter()
  model.run(xs, ys)
  wall = time.perf_counter() - start
  return {"peak_rss_mb": round(_high_water_mb(), 1), "ms": wall * 1e3,
          "device_peak_mb": _device_peak_mb()}


def remat_case(k: int, batch: int, hidden: int, progress=None):
  rows = []
  for impl in ("jbptt.trainer", "jbptt.trainer (remat)"):
    out = subprocess.run(
        [sys.executable, __file__, "--_rematprobe", impl, str(k), str(batch),
         str(hidden)], capture_output=True, text=True, check=False)
    if out.returncode != 0:
      raise RuntimeError(f"remat probe {impl} failed:\n{out.stderr}")
    probe = json.loads(out.stdout.strip().splitlines()[-1])
    rows.append({
        "case": "remat", "impl": impl, "k1": k, "k2": k, "batch": batch,
        "hidden": hidden, "n": 2 * k, "ms_per_seq": round(probe["ms"], 1),
        "steps_per_s": round(2 * k / probe["ms"] * 1e3, 1),
        "peak_mem_mb": probe["device_peak_mb"] or probe["peak_rss_mb"],
        "compile_s": None, "device": device_name(),
    })
    if progress:
      progress()
  return rows


# -- data parallel over forced host devices, one subprocess per count ---------


def devices_probe(count: int, n: int, repeats: int) -> dict:
  """Runs in a process with ``count`` host devices: trainer throughput."""
  import jbptt.sharding as js

  case = Case("devices", 32, 16, 128, n, 32, 32)
  model = impls_jax.Trainer(case)
  mesh = js.batch_mesh()
  xs, ys = js.shard_batch(data(case), mesh, batch_axis=1)
  # A state made from replicated params and a sharded carry keeps their
  # shardings (its buffers are made from them).
  model.state = model.tr.init(js.replicate(model.state.params, mesh),
                              js.shard_batch(model.state.carry, mesh),
                              (xs, ys))
  start = time.perf_counter()
  model.run(xs, ys)
  first = time.perf_counter() - start
  model.run(xs, ys)  # the state's shardings settle after the first call
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    model.run(xs, ys)
    times.append(time.perf_counter() - start)
  med = statistics.median(times)
  return {"ms": med * 1e3, "compile_s": max(0.0, first - med),
          "devices": len(jax.devices())}


def devices_case(n: int, repeats: int, progress=None, counts=(1, 2, 4)):
  rows = []
  for count in counts:
    env = dict(os.environ,
               XLA_FLAGS=f"--xla_force_host_platform_device_count={count}")
    out = subprocess.run(
        [sys.executable, __file__, "--_devprobe", str(count), str(n), str(repeats)],
        capture_output=True, text=True, check=False, env=env)
    if out.returncode != 0:
      raise RuntimeError(f"devices probe {count} failed:\n{out.stderr}")
    probe = json.loads(out.stdout.strip().splitlines()[-1])
    rows.append({
        "case": "devices", "impl": f"jbptt.trainer, {probe['devices']} device(s)",
        "k1": 32, "k2": 32, "batch": 32, "hidden": 128, "n": n,
        "ms_per_seq": round(probe["ms"], 2),
        "steps_per_s": round(n / probe["ms"] * 1e3, 1), "peak_mem_mb": None,
        "compile_s": round(probe["compile_s"], 3),
        "device": device_name() + f", {count} forced host device(s)",
    })
    if progress:
      progress()
  return rows


# -- outputs ---------------------------------------------------------------------

# The implementation each case's ratios divide by (default: jbptt.trainer).
BASE = {"unroll": "jbptt.trainer (unroll=1)", "lm": "jbptt.trainer (cell_loss)"}
_SAME_CASE = ("case", "k1", "k2", "batch", "hidden", "n", "vocab")


def base_ms(rows, row):
  """The time of ``row``'s case's base implementation (``BASE``) in ``rows``,
  or ``None`` if it did not run."""
  name = BASE.get(row["case"], "jbptt.trainer")
  return next((r["ms_per_seq"] for r in rows if r["impl"] == name and all(
      r.get(key) == row.get(key) for key in _SAME_CASE)), None)


def _ratio(rows, row):
  base = base_ms(rows, row)
  return "-" if base is None else f"{row['ms_per_seq'] / base:.2f}"


def environment(argv) -> dict:
  """When, how and where this run ran: date, command, machine, versions."""
  versions = {}
  for dist in ("jax", "jaxlib", "flax", "optax", "torch", "keras", "numpy"):
    try:
      versions[dist] = importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
      versions[dist] = None
  try:
    lscpu = subprocess.run(["lscpu"], capture_output=True, text=True,
                           check=False).stdout.splitlines()[:10]
  except OSError:
    lscpu = []
  knobs = ("OMP_WAIT_POLICY", "OMP_NUM_THREADS", "XLA_FLAGS")
  return {
      "date": START_TIME, "end": _now(),
      "command": " ".join(["python", "benchmarks/run.py", *argv]),
      "device": device_name(), "python": platform.python_version(),
      "machine": [" ".join(line.split()) for line in lscpu], "versions": versions,
      "environment": {k: os.environ[k] for k in knobs if k in os.environ},
      # Other processes share this CPU: the load before and after the run.
      "load_average": {"start": START_LOAD, "end": _load()},
  }


def _load():
  try:
    return [round(x, 2) for x in os.getloadavg()]
  except OSError:
    return None


def _now():
  return datetime.datetime.now(datetime.timezone.utc).isoformat(
      timespec="seconds")


START_LOAD, START_TIME = _load(), _now()


_OWN_TABLES = ("memory", "devices", "remat", "lm", "chunks", "long-n")


def markdown(rows, skipped, env=None) -> str:
  lines = []
  if env:
    versions = ", ".join(f"{k} {v}" for k, v in env["versions"].items() if v)
    knobs = ", ".join(f"{k}={v}" for k, v in env["environment"].items())
    lines += [f"Run: `{env['command']}`, {env['date']} to {env['end']}; "
              f"Python {env['python']}, "
              f"{versions}; {knobs}; load average (1, 5, 15 min) "
              f"{env['load_average']['start']} at the start, "
              f"{env['load_average']['end']} at the end.", ""]
    if env["machine"]:
      lines += ["Machine (`lscpu | head`): " + "; ".join(env["machine"]) + ".", ""]
  lines += [f"Device: {device_name()}. Medians; ratio = time / jbptt.trainer's time "
            "in the same case and run (> 1: slower than jbptt; the unroll case: "
            "jbptt.trainer (unroll=1)'s, the lm case: jbptt.trainer "
            "(cell_loss)'s).", ""]
  lines += ["| case | k1 | k2 | B | H | n | implementation | ms / seq | steps/s | "
            "ratio to jbptt | compile s | peak MB |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|"]
  for row in rows:
    if row["case"] in _OWN_TABLES:
      continue
    lines.append(
        f"| {row['case']} | {row['k1']} | {row['k2']} | {row['batch']} | "
        f"{row['hidden']} | {row['n']} | {row['impl']} | {row['ms_per_seq']:.1f} | "
        f"{row['steps_per_s']:.0f} | {_ratio(rows, row)} | "
        f"{row['compile_s']} | {row['peak_mem_mb'] or '-'} |")
  lm = [r for r in rows if r["case"] == "lm"]
  if lm:
    lines += ["", "Language model (embedding E, LSTM H, read-out over V tokens, "
              "softmax cross-entropy, Adam; a synthetic token stream; n steps a "
              "run, an update every k1; tokens = steps x batch; ratio to "
              "jbptt.trainer (cell_loss); medians of the repeats, and their "
              "minimum):", "",
              "| V | E | H | B | k1 | k2 | n | implementation | ms / chunk | "
              "min ms / chunk | tokens/s | ratio to cell_loss | compile s |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['vocab']} | {r['dim']} | {r['hidden']} | {r['batch']} | "
              f"{r['k1']} | {r['k2']} | {r['n']} | {r['impl']} | "
              f"{r['ms_per_chunk']:.1f} | {r['min_ms_per_chunk']:.1f} | "
              f"{r['tokens_per_s']:.0f} | {_ratio(rows, r)} | {r['compile_s']} |"
              for r in lm]
  mem = [r for r in rows if r["case"] == "memory"]
  if mem:
    lines += ["", "Memory against stream length (TBPTT(32, 32), B=8, H=64; peak "
              "resident memory of a fresh process, or the device's peak on a GPU):",
              "", "| implementation | n | peak MB | wall s |", "|---|---|---|---|"]
    lines += [f"| {r['impl']} | {r['n']} | {r['peak_mem_mb']} | "
              f"{r['ms_per_seq'] / 1e3:.1f} |" for r in mem]
  rem = [r for r in rows if r["case"] == "remat"]
  if rem:
    lines += ["", "remat for a long window (TBPTT(k, k) over 2 k steps, peak resident "
              "memory of a fresh process; remat = "
              "jax.checkpoint_policies.nothing_saveable):", "",
              "| implementation | k | B | H | peak MB | ms / 2k steps |",
              "|---|---|---|---|---|---|"]
    lines += [f"| {r['impl']} | {r['k1']} | {r['batch']} | {r['hidden']} | "
              f"{r['peak_mem_mb']} | {r['ms_per_seq']:.0f} |" for r in rem]
  dev = [r for r in rows if r["case"] == "devices"]
  if dev:
    base = dev[0]["ms_per_seq"]
    lines += ["", "Data parallel over forced host devices (jbptt.trainer, "
              "TBPTT(32, 32), B=32 split over the devices, H=128; ratio to one "
              "device):", "",
              "| implementation | ms / seq | steps/s | ratio to 1 device |",
              "|---|---|---|---|"]
    lines += [f"| {r['impl']} | {r['ms_per_seq']:.1f} | {r['steps_per_s']:.0f} | "
              f"{r['ms_per_seq'] / base:.2f} |" for r in dev]
  lines += compile_cases.markdown(rows)
  if skipped:
    lines += ["", "Not run here: " + "; ".join(
        sorted({f"{name} ({why})" for name, why in skipped}))]
  return "\n".join(lines) + "\n"


# A fixed colour per implementation, the same in every plot of every run
# (matplotlib's default cycle repeats after 10 and depends on the order).
# Roughly, jbptt blues and greens, JAX baselines greys and browns, PyTorch
# reds and oranges; variants of one implementation get well-separated hues.
COLOURS = {
    "jbptt.trainer": "#1f77b4",
    "jbptt.trainer (unroll=1)": "#aec7e8",
    "jbptt.trainer (unroll=2)": "#5254a3",
    "jbptt.trainer (unroll=4)": "#ce6dbd",
    "jbptt.trainer (unroll=8)": "#08306b",
    "jbptt.trainer (unroll=16)": "#637939",
    "jbptt.trainer (stored)": "#17becf",
    "jbptt.trainer (stored, unroll=1)": "#9edae5",
    "jbptt.trainer (stored, unroll=8)": "#0b6e78",
    "jbptt.trainer (remat)": "#843c39",
    "jbptt.trainer, k1 steps per call": "#74c476",
    "jbptt.trainer, k1 steps per call, packed": "#006d2c",
    "jbptt.trainer (head in step)": "#e7ba52",
    "jbptt.trainer (cell_loss)": "#6b6ecf",
    "jbptt.truncated_loss": "#2ca02c",
    "jbptt.truncated_loss (unroll=1)": "#b5cf6b",
    "jbptt.truncated_loss (unroll=8)": "#98df8a",
    "hand-written scan": "#7f7f7f",
    "hand-written scan (unroll=4)": "#c7c7c7",
    "Flax + Python loop": "#8c564b",
    "full BPTT": "#bcbd22",
    "PyTorch nn.LSTM chunked": "#d62728",
    "PyTorch LSTMCell loop": "#ff7f0e",
    "PyTorch forum recipe": "#ff9896",
    "PyTorch word_language_model": "#ad494a",
    "Keras 3 stateful LSTM (JAX)": "#9467bd",
}


def colours(impls) -> dict[str, str]:
  """A colour for each of ``impls``, no two alike: ``COLOURS`` where it has
  one not taken yet, else the first free colour of tab20."""
  import matplotlib

  spare = [matplotlib.colors.to_hex(c) for c in matplotlib.colormaps["tab20"].colors]
  spare += [matplotlib.colors.to_hex(c) for c in matplotlib.colormaps["tab20b"].colors]
  chosen: dict[str, str] = {}
  for impl in impls:
    want = COLOURS.get(impl)
    if want is None or want in chosen.values():
      want = next(c for c in spare if c not in chosen.values())
    chosen[impl] = want
  return chosen


def machine(rows, env=None) -> str:
  """Where the results were measured, from the results themselves: the
  device recorded in the rows, the CPU model and the date of the run when
  ``environment.json`` has them (never the plotting machine's device)."""
  devices = {r["device"] for r in rows if r.get("device")}
  # "cpu (...), 2 forced host device(s)" (the devices case) is that cpu.
  devices = sorted(d for d in devices
                   if not any(e != d and d.startswith(e) for e in devices))
  where = ", ".join(devices) or "device not recorded"
  if env:
    model = next((line.split(":", 1)[1].strip() for line in env.get("machine", [])
                  if line.startswith("Model name:")), None)
    if model and model not in where:
      where += f", {model}"
    if env.get("date"):
      where += f", {env['date'][:10]}"
  return where


def plots(rows, out: pathlib.Path, env=None):
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  title_where = machine(rows, env)
  speed = [r for r in rows if r["case"] not in _OWN_TABLES or r["case"] == "lm"]
  group = lambda r: (r["case"], r["k1"], r["k2"], r.get("vocab", 0))
  groups = sorted({group(r) for r in speed})
  impls = sorted({r["impl"] for r in speed})
  if groups:
    colour = colours(impls)
    fig, ax = plt.subplots(figsize=(max(6, 1.3 * len(groups)) + 3.2, 4.8))
    width = 0.8 / len(impls)
    for i, impl in enumerate(impls):
      xs, hs = [], []
      for j, g in enumerate(groups):
        match = [r for r in speed if group(r) == g and r["impl"] == impl]
        if match:
          xs.append(j + i * width)
          hs.append(match[0]["ms_per_seq"])
      ax.bar(xs, hs, width, label=impl, color=colour[impl], edgecolor="white",
             linewidth=0.3)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(groups))])
    ax.set_xticklabels([f"{c}{f' V={v}' if v else ''}\n({k1}, {k2})"
                        for c, k1, k2, v in groups], fontsize=9)
    ax.set_yscale("log")
    ax.set_ylabel("ms per sequence (log scale)")
    ax.set_title(f"TBPTT training time, {title_where}", fontsize=10)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0),
              frameon=False)
    fig.tight_layout()
    fig.savefig(out / "speed.png", dpi=110, bbox_inches="tight")
    plt.close(fig)
  mem = [r for r in rows if r["case"] == "memory"]
  if mem:
    mem_impls = sorted({r["impl"] for r in mem})
    colour = colours(mem_impls)
    fig, ax = plt.subplots(figsize=(7, 4))
    for impl in mem_impls:
      pts = sorted((r["n"], r["peak_mem_mb"]) for r in mem if r["impl"] == impl)
      ax.plot(*zip(*pts), marker="o", label=impl, color=colour[impl])
    ax.set_xscale("log")
    ax.set_xlabel("stream length n")
    ax.set_ylabel("peak memory (MB)")
    ax.set_title(f"Memory against stream length, TBPTT(32, 32)\n{title_where}",
                 fontsize=10)
    ax.legend(fontsize=8, frameon=False)
    fig.tight_layout()
    fig.savefig(out / "memory.png", dpi=110)
    plt.close(fig)


def replot(folder: pathlib.Path) -> bool:
  """Redraws ``folder``'s plots from its saved ``results.json`` (and
  ``environment.json``, if any), without running anything; ``False`` if the
  folder holds no rows of this script."""
  rows = json.loads((folder / "results.json").read_text())
  if not isinstance(rows, list):
    return False
  env_file = folder / "environment.json"
  env = json.loads(env_file.read_text()) if env_file.exists() else None
  plots(rows, folder, env)
  return True


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  mode = parser.add_mutually_exclusive_group()
  mode.add_argument("--quick", action="store_true", help="smaller cases, 3 repeats")
  mode.add_argument("--smoke", action="store_true", help="tiny, seconds (CI)")
  parser.add_argument("--out", default="bench-out")
  parser.add_argument("--cases", nargs="*",
                      help="lstm, online, stream, k2-sweep, lm, memory, remat, "
                      "devices, chunks, long-n; unroll (the trainer at unroll 1 "
                      "to 16, run only when named)")
  parser.add_argument("--repeats", type=int)
  parser.add_argument("--replot", nargs="+", metavar="DIR",
                      help="redraw the plots of results folders from their "
                      "results.json; runs nothing")
  parser.add_argument("--_memprobe", nargs=3, help=argparse.SUPPRESS)
  parser.add_argument("--_devprobe", nargs=3, help=argparse.SUPPRESS)
  parser.add_argument("--_rematprobe", nargs=4, help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if args.replot:
    for folder in args.replot:
      done = replot(pathlib.Path(folder))
      print(f"{folder}: {'plots redrawn' if done else 'no rows of run.py, skipped'}")
    return 0
  if args._devprobe:
    count, n, reps = (int(v) for v in args._devprobe)
    print(json.dumps(devices_probe(count, n, reps)))
    return 0
  if args._rematprobe:
    impl, k, batch, hidden = args._rematprobe
    print(json.dumps(remat_probe(impl, int(k), int(batch), int(hidden))))
    return 0
  if args._memprobe:
    impl, n, chunk = args._memprobe
    print(json.dumps(memory_probe(impl, int(n), int(chunk))))
    return 0
  level = "smoke" if args.smoke else "quick" if args.quick else "full"
  groups = cases(level)
  # The unroll sweep compiles 12 programs per case: asked for by name only.
  wanted = args.cases or [g for g in groups if g != "unroll" and not (
      level == "smoke" and g in ("devices", "remat"))]
  unknown = [c for c in wanted if c not in groups]
  if unknown:
    parser.error(f"unknown case(s) {unknown}; choose from {list(groups)}")
  repeats = args.repeats or {"smoke": 1, "quick": 3, "full": 7}[level]
  lengths = {"smoke": [1000], "quick": [1000, 10_000, 100_000],
             "full": [1000, 10_000, 100_000, 1_000_000]}[level]
  out = pathlib.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)

  from rich.progress import Progress

  rows, skipped = [], []
  with Progress() as progress:
    for group in wanted:
      if group == "memory":
        bar = progress.add_task("memory", total=2 * len(lengths))
        rows += memory_case(lengths, 1000, lambda: progress.advance(bar))
        continue
      if group == "remat":
        bar = progress.add_task("remat", total=2)
        k, b, h = {"smoke": (64, 2, 8), "quick": (1024, 32, 128),
                   "full": (4096, 32, 128)}[level]
        rows += remat_case(k, b, h, lambda: progress.advance(bar))
        continue
      if group == "devices":
        if jax.default_backend() != "cpu":
          skipped.append(("devices case", "it forces host (CPU) devices; this "
                          f"run's device is {device_name()}"))
          continue
        counts = (1, 2) if level == "smoke" else (1, 2, 4)
        bar = progress.add_task("devices", total=len(counts))
        n_dev = {"smoke": 64, "quick": 256, "full": 1024}[level]
        rows += devices_case(n_dev, min(repeats, 3),
                             lambda: progress.advance(bar), counts)
        continue
      if group == "chunks":
        bar = progress.add_task("chunks", total=3)
        calls = {"smoke": 4, "quick": 40, "full": 40}[level]
        rows += compile_cases.chunks_case(
            calls=calls, progress=lambda: progress.advance(bar))
        continue
      if group == "long-n":
        ns = {"smoke": [100, 200], "quick": [1000, 10_000, 100_000],
              "full": [1000, 10_000, 100_000, 1_000_000]}[level]
        bar = progress.add_task("long-n", total=2 * len(ns))
        rows += compile_cases.long_n_case(
            ns, repeats=min(repeats, 3), progress=lambda: progress.advance(bar))
        continue
      for case in groups[group]:
        n_impls = len(available(impls_for(case), case)[0])
        bar = progress.add_task(f"{case.name} ({case.k1}, {case.k2})",
                                total=n_impls * (repeats + 1))
        case_rows, case_skipped = time_case(case, repeats,
                                            lambda bar=bar: progress.advance(bar))
        rows += case_rows
        skipped += case_skipped
  env = environment(sys.argv[1:] if argv is None else argv)
  (out / "results.json").write_text(json.dumps(rows, indent=2) + "\n")
  (out / "environment.json").write_text(json.dumps(env, indent=2) + "\n")
  (out / "results.md").write_text(markdown(rows, skipped, env))
  plots(rows, out, env)
  print(markdown(rows, skipped, env))
  return 0


if __name__ == "__main__":
  sys.exit(main())

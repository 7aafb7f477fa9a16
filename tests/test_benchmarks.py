"""``benchmarks/run.py --smoke`` keeps working (no timings are asserted)."""

import json
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_benchmark_smoke(tmp_path):
  out = subprocess.run(
      [sys.executable, str(ROOT / "benchmarks" / "run.py"), "--smoke",
       "--out", str(tmp_path)],
      capture_output=True, text=True, timeout=600, check=False)
  assert out.returncode == 0, out.stderr[-3000:]
  rows = json.loads((tmp_path / "results.json").read_text())
  keys = {"case", "impl", "k1", "k2", "batch", "hidden", "n", "ms_per_seq",
          "steps_per_s", "peak_mem_mb", "compile_s", "device"}
  assert rows and all(keys <= set(r) for r in rows)
  impls = {r["impl"] for r in rows}
  assert {"jbptt.trainer", "jbptt.trainer (unroll=4)", "jbptt.truncated_loss",
          "hand-written scan", "Flax + Python loop", "full BPTT"} <= impls
  assert {(r["k1"], r["k2"]) for r in rows if r["case"] == "lstm"} == {(8, 8), (4, 8)}
  assert {r["impl"] for r in rows if r["case"] == "memory"} == {
      "jbptt.trainer", "full BPTT"}
  assert all(r["ms_per_seq"] > 0 for r in rows)
  table = (tmp_path / "results.md").read_text()
  assert "ratio to jbptt" in table and "| jbptt.trainer |" in table
  assert (tmp_path / "speed.png").exists() and (tmp_path / "memory.png").exists()


def test_hand_written_peers_train_like_the_trainer():
  """The hand-written JAX peers train the same thing as jbptt (same params)."""
  sys.path.insert(0, str(ROOT / "benchmarks"))
  import jax
  import numpy as np

  import impls_jax
  from run import Case, data

  for peer, k1, k2 in [(impls_jax.FlaxLoop, 4, 4), (impls_jax.FlaxLoop, 2, 6),
                       (impls_jax.ScanReference, 4, 4)]:
    case = Case("t", 2, 3, 8, 24, k1, k2)
    xs, ys = data(case)
    ours, theirs = impls_jax.Trainer(case), peer(case)
    ours.run(xs, ys)
    theirs.run(xs, ys)
    for a, b in zip(jax.tree_util.tree_leaves(ours.state.params),
                    jax.tree_util.tree_leaves(theirs.params)):
      np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-5)

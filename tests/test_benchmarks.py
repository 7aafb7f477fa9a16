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
                       (impls_jax.ScanReference, 4, 4),
                       (impls_jax.ScanReferenceUnrolled, 4, 4)]:
    case = Case("t", 2, 3, 8, 24, k1, k2)
    xs, ys = data(case)
    ours, theirs = impls_jax.Trainer(case), peer(case)
    ours.run(xs, ys)
    theirs.run(xs, ys)
    for a, b in zip(jax.tree_util.tree_leaves(ours.state.params),
                    jax.tree_util.tree_leaves(theirs.params)):
      np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-5)


def test_unroll_case_runs_each_unroll(monkeypatch):
  """The unroll case (run by name only) times the trainer at its default and
  at 1, 2, 4, 8, 16, the hand-written scan at 1 and 4, stored history and
  truncated_loss at 1 and 8; each gets its unroll."""
  sys.path.insert(0, str(ROOT / "benchmarks"))
  import impls_jax
  from run import Case, cases, impls_for

  for level in ("smoke", "quick", "full"):
    assert all(c.name == "unroll" for c in cases(level)["unroll"])
  case = Case("unroll", 2, 3, 8, 16, 4, 4)
  impls = impls_for(case)
  assert len({i.name for i in impls}) == len(impls) == 12
  assert [i.options.get("unroll", 1) for i in impls[6:8]] == [1, 4]
  seen = []

  def spy(make):
    def made(*args, **kwargs):
      seen.append((make.__name__, kwargs.get("history"),
                   kwargs.get("unroll", "default")))
      return make(*args, **kwargs)
    return made

  for name in ("trainer", "truncated_loss"):
    monkeypatch.setattr(impls_jax.jbptt, name, spy(getattr(impls_jax.jbptt, name)))
  case = Case("unroll", 2, 3, 8, 16, 2, 4)
  for impl in impls[:6] + impls[8:]:
    impl(case)
  assert seen == [("trainer", None, u) for u in ("default", 1, 2, 4, 8, 16)] + [
      ("trainer", "stored", 1), ("trainer", "stored", 8),
      ("truncated_loss", None, 1), ("truncated_loss", None, 8)]

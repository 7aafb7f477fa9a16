"""``benchmarks/run.py --smoke`` keeps working (no timings are asserted)."""

import importlib.util
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
  every = json.loads((tmp_path / "results.json").read_text())
  own = {"chunks", "long-n"}  # the compile cases, with their own columns
  rows = [r for r in every if r["case"] not in own]
  keys = {"case", "impl", "k1", "k2", "batch", "hidden", "n", "ms_per_seq",
          "steps_per_s", "peak_mem_mb", "compile_s", "device"}
  assert rows and all(keys <= set(r) for r in rows)
  impls = {r["impl"] for r in rows}
  assert {"jbptt.trainer", "jbptt.trainer (unroll=4)", "jbptt.truncated_loss",
          "hand-written scan", "Flax + Python loop", "full BPTT"} <= impls
  assert {(r["k1"], r["k2"]) for r in rows if r["case"] == "lstm"} == {(8, 8), (4, 8)}
  assert {r["impl"] for r in rows if r["case"] == "memory"} == {
      "jbptt.trainer", "full BPTT"}
  lm = [r for r in rows if r["case"] == "lm"]
  assert {"jbptt.trainer (head in step)", "jbptt.trainer (cell_loss)"} <= {
      r["impl"] for r in lm}
  assert all(r["ms_per_chunk"] > 0 and r["tokens_per_s"] > 0 for r in lm)
  assert all(r["ms_per_seq"] > 0 for r in rows)
  chunks = [r for r in every if r["case"] == "chunks"]
  assert [r["calls"] for r in chunks] == [4, 4] and all(
      r["compiles"] >= 1 and r["us_per_step"] > 0 for r in chunks)
  long_n = [r for r in every if r["case"] == "long-n"]
  assert {(r["k1"], r["k2"], r["n"]) for r in long_n} == {
      (k1, k2, n) for k1, k2 in ((1, 64), (8, 32)) for n in (100, 200)}
  assert all(r["program_kb"] > 0 and r["us_per_step"] > 0 for r in long_n)
  table = (tmp_path / "results.md").read_text()
  assert "| jbptt.trainer, 4 chunks |" in table and "| k1 | k2 | n | lower s" in table
  assert "ratio to jbptt" in table and "| jbptt.trainer |" in table
  assert "| jbptt.trainer (cell_loss) |" in table and "ratio to cell_loss" in table
  env = json.loads((tmp_path / "environment.json").read_text())
  assert env["date"] and env["versions"]["jax"] and "--smoke" in env["command"]
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
  """The unroll case (run by name only) times the trainer at 1 (its default),
  2, 4, 8, 16, the hand-written scan at 1 and 4, stored states and
  truncated_loss at 1 and 8; each is given its unroll explicitly."""
  sys.path.insert(0, str(ROOT / "benchmarks"))
  import impls_jax
  from run import Case, cases, impls_for

  for level in ("smoke", "quick", "full"):
    assert all(c.name == "unroll" for c in cases(level)["unroll"])
  case = Case("unroll", 2, 3, 8, 16, 4, 4)
  impls = impls_for(case)
  assert len({i.name for i in impls}) == len(impls) == 11
  assert [i.options.get("unroll", 1) for i in impls[5:7]] == [1, 4]
  seen = []

  def spy(make):
    def made(*args, **kwargs):
      gradient = kwargs.get("gradient")
      seen.append((make.__name__, gradient and type(gradient).__name__,
                   kwargs.get("unroll", "default")))
      return make(*args, **kwargs)
    return made

  for name in ("trainer", "truncated_loss"):
    monkeypatch.setattr(impls_jax.jbptt, name, spy(getattr(impls_jax.jbptt, name)))
  case = Case("unroll", 2, 3, 8, 16, 2, 4)
  for impl in impls[:5] + impls[7:]:
    impl(case)
  assert seen == [("trainer", None, u) for u in (1, 2, 4, 8, 16)] + [
      ("trainer", "StoredStates", 1), ("trainer", "StoredStates", 8),
      ("truncated_loss", None, 1), ("truncated_loss", None, 8)]


def _bench():
  """The benchmark modules ``(run, impls_jax)``."""
  sys.path.insert(0, str(ROOT / "benchmarks"))
  import impls_jax
  import run

  return run, impls_jax


def test_lm_cell_loss_trains_like_the_head_in_each_step():
  """The lm case's two trainers (read-out in each step, ``jbptt.cell_loss``)
  reach the same params after a few updates, k1 = k2 and k1 < k2."""
  import jax
  import numpy as np

  run, impls_jax = _bench()
  for k1, k2 in [(4, 4), (3, 6)]:
    case = run.Case("lm", 2, 8, 16, 12, k1, k2, vocab=50)
    xs, ys = run.data(case)
    assert xs.dtype == ys.dtype == np.int32 and xs.shape == (12, 2)
    np.testing.assert_array_equal(xs[1:], ys[:-1])  # targets: the next tokens
    inside, outside = impls_jax.LMTrainer(case), impls_jax.LMTrainerCellLoss(case)
    for _ in range(2):  # 2 x 12 steps: 6 or 8 updates, the stream continued
      inside.run(xs, ys)
      outside.run(xs, ys)
    before = impls_jax.lm_setup(case)[2]
    moved = jax.tree_util.tree_map(lambda a, b: np.abs(a - b).max(),
                                   inside.state.params, before)
    assert min(jax.tree_util.tree_leaves(moved)) > 0  # every leaf trained
    for a, b in zip(jax.tree_util.tree_leaves(inside.state.params),
                    jax.tree_util.tree_leaves(outside.state.params)):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(inside.state.carry, outside.state.carry,
                               rtol=1e-5, atol=1e-6)


def test_lm_torch_recipe_trains_like_jbptt():
  """PyTorch's word_language_model peer, started from the JAX params,
  trains the same thing as ``jbptt.cell_loss`` (torch: optional)."""
  import numpy as np
  import pytest

  torch = pytest.importorskip("torch")
  run, impls_jax = _bench()
  import impls_torch

  case = run.Case("lm", 2, 8, 16, 16, 4, 4, vocab=50)
  xs, ys = run.data(case)
  ours, theirs = impls_jax.LMTrainerCellLoss(case), impls_torch.TorchWordLM(case)
  p = ours.state.params
  lstm, head = p["cell"]["params"]["lstm"], p["head"]["params"]
  gates = "ifgo"  # torch's order of the LSTM's gates; flax names them alike
  as_torch = lambda a: torch.tensor(np.asarray(a))
  with torch.no_grad():
    theirs.encoder.weight.copy_(as_torch(p["cell"]["params"]["embed"]["embedding"]))
    theirs.rnn.weight_ih_l0.copy_(as_torch(np.concatenate(
        [lstm["i" + g]["kernel"] for g in gates], axis=1).T))
    theirs.rnn.weight_hh_l0.copy_(as_torch(np.concatenate(
        [lstm["h" + g]["kernel"] for g in gates], axis=1).T))
    theirs.rnn.bias_ih_l0.zero_()  # flax has one bias, torch two: freeze one
    theirs.rnn.bias_ih_l0.requires_grad_(False)
    theirs.rnn.bias_hh_l0.copy_(as_torch(np.concatenate(
        [lstm["h" + g]["bias"] for g in gates])))
    theirs.decoder.weight.copy_(as_torch(np.asarray(head["kernel"]).T))
    theirs.decoder.bias.copy_(as_torch(head["bias"]))
  ours.run(xs, ys)
  theirs.run(xs, ys)
  p = ours.state.params
  lstm, head = p["cell"]["params"]["lstm"], p["head"]["params"]
  close = lambda a, b: np.testing.assert_allclose(
      np.asarray(a), b.detach().numpy(), rtol=1e-4, atol=1e-5)
  close(p["cell"]["params"]["embed"]["embedding"], theirs.encoder.weight)
  close(np.concatenate([lstm["h" + g]["kernel"] for g in gates], axis=1).T,
        theirs.rnn.weight_hh_l0)
  close(head["kernel"].T, theirs.decoder.weight)
  close(ours.state.carry[1], theirs.hidden[0][0])


def test_truncation_benchmark_smoke(tmp_path):
  spec = importlib.util.spec_from_file_location(
      "truncation_bench", ROOT / "benchmarks" / "truncation.py")
  bench = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(bench)
  bench.main(["--smoke", "--out", str(tmp_path)])
  rows = json.loads((tmp_path / "results.json").read_text())["rows"]
  configs = [r["config"] for r in rows]
  assert configs[:8] == [
      "TBPTT(8, 8)", "TBPTT(8, 64)", "Randomized(8, 64)",
      "TBPTT(8, 64), stored", "Randomized(8, 64), stored",
      "Adaptive(0.1, (8, 16, 32, 64))",
      "Adaptive(0.1, (8, 16, 32, 64)), stored", "TBPTT(8, 8), burn_in=16"]
  assert all(r["ms_per_chunk"] > 0 for r in rows)
  assert rows[0]["k2_mean"] == 8 and rows[1]["k2_mean"] == 64
  assert 1 <= rows[2]["k2_mean"] <= 64
  assert rows[5]["k2_mean"] in (8, 16, 32, 64)
  table = (tmp_path / "results.md").read_text()
  assert "x TBPTT(8, 8)" in table and "H=8, D=4, batch 2" in table

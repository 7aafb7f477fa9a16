"""jbptt on several real JAX processes on this machine (gloo CPU collectives).

Each process has one CPU device and feeds its slice of the batch
(:func:`jbptt.sharding.shard_batch`); every result is compared with a
one-process run of the same global batch in the test process. Starting a
process costs seconds (it imports JAX), so few launches run many scenarios:

* 2 processes: ``trainer`` for k1 < k2, k1 = k2, k1 > k2 and
  :class:`jbptt.StoredStates` on a stream with resets fed in chunks of 5
  and 6 steps; ``truncated_loss`` gradients; a checkpoint saved after the
  first chunk (inside a k1 chunk), then the run continued.
* 2 fresh processes: that checkpoint restored (every leaf with the
  template's sharding) and continued: the uninterrupted run's params; a copy
  with one shard's recorded checksum altered raises
  :class:`jbptt.checkpoint.CheckpointError` on every process.
* 4 processes: the 2-process checkpoint restored on 4 processes (another
  layout) and continued by ``trainer``: the params of the one-process run.

The launches share a compilation cache (a temporary folder per session), so
the fresh processes reuse what the first ones compiled.
"""

from __future__ import annotations

import functools
import json
import shutil

import jax
import jax.numpy as jnp
import multihost
import numpy as np
import optax
import pytest

import jbptt

D, H, B, N = 2, 4, 8, 11
CUTS = (5,)  # chunks of 5 and 6 steps; 5 is inside a k1 = 3 chunk
# (k1, k2, gradient): k1 < k2, k1 = k2, k1 > k2, stored states. The chunk
# lengths are uneven but of one capacity class for most (few compilations).
CONFIGS = [(3, 7, "recompute"), (4, 4, "recompute"), (5, 2, "recompute"),
           (3, 7, "stored"), (3, "random", "recompute"),
           (2, "adaptive", "stored")]
# k2 rules by name (the configurations are ids and cache keys).
RULES = {"random": jbptt.Randomized(3, 7),
         "adaptive": jbptt.Adaptive(0.2, (2, 4, 7), every=2)}
LOSS_CONFIGS = [(3, 7)]
CK = CONFIGS[0]  # saved after the first chunk: with 2 steps pending
TIMEOUT = 240.0


def model():
  """Params, initial carry, inputs, targets and resets of the global batch."""
  rng = np.random.default_rng(0)
  params = {"W": (0.5 * rng.standard_normal((H, H))).astype(np.float32),
            "U": rng.standard_normal((D, H)).astype(np.float32),
            "v": rng.standard_normal(H).astype(np.float32)}
  xs = (rng.standard_normal((N, B, D)).astype(np.float32),
        rng.standard_normal((N, B)).astype(np.float32))
  resets = np.zeros((N, B), bool)
  resets[3, 1] = resets[7, 6] = resets[9, 3] = True
  return params, np.zeros((B, H), np.float32), xs, resets


def step_loss(p, h, x):
  u, y = x
  h = jnp.tanh(h @ p["W"] + u @ p["U"])
  return h, jnp.mean((h @ p["v"] - y) ** 2)


@functools.lru_cache(maxsize=None)
def make(k1, k2, gradient):
  g = jbptt.StoredStates() if gradient == "stored" else jbptt.Recompute()
  return jbptt.trainer(step_loss, optax.adam(0.05), k1=k1,
                       k2=RULES.get(k2, k2), gradient=g)


def start(cfg, tr, *args):
  """``tr.init(*args)``, with a key for a randomized k2."""
  return tr.init(*args, key=jax.random.key(4) if cfg[1] == "random" else None)


def pieces(tree, cuts, n=N):
  bounds = [0, *cuts, n]
  return [jax.tree_util.tree_map(lambda v, a=a, b=b: v[a:b], tree)
          for a, b in zip(bounds[:-1], bounds[1:])]


def feed(tr, state, xs, resets, cuts):
  for x, r in zip(pieces(xs, cuts), pieces(resets, cuts)):
    state, _ = tr.update(state, x, r)
  return state


def host(tree):
  return jax.tree_util.tree_map(np.asarray, tree)


# In each process ------------------------------------------------------------


def _placed(params, h0, xs, resets, cuts=CUTS):
  """This process's slice of the batch, as global arrays over all devices:
  params, carry and the stream's pieces ``[(xs, resets), ...]`` (sliced here,
  on the host, so that no slicing of global arrays compiles)."""
  import jbptt.sharding as js

  mesh = js.batch_mesh()
  size, i = B // jax.process_count(), jax.process_index()
  mine = slice(i * size, (i + 1) * size)
  local = jax.tree_util.tree_map(lambda v: v[:, mine], (xs, resets))
  parts = [js.shard_batch(p, mesh, batch_axis=1) for p in pieces(local, cuts)]
  return (js.replicate(params, mesh), js.shard_batch(h0[mine], mesh),
          js.shard_batch(local, mesh, batch_axis=1), parts)


def _gather(tree):
  from jax.experimental import multihost_utils

  return host(multihost_utils.process_allgather(tree, tiled=True))


def _shardings(state, like):
  """The paths of leaves whose sharding or commitment differ from ``like``."""
  pairs = zip(jax.tree_util.tree_leaves_with_path(state),
              jax.tree_util.tree_leaves(like))
  return [jax.tree_util.keystr(p) for (p, a), b in pairs
          if a.sharding != b.sharding or a.committed != b.committed]


def train_and_save(root=None, configs=CONFIGS, loss_configs=LOSS_CONFIGS):
  """Every configuration on this process's slice of the batch; ``CK`` saved
  in ``root`` after its first chunk (inside a k1 chunk), then continued."""
  import jbptt.checkpoint as jc

  p_s, h_s, xs_s, parts = _placed(*model())
  out = {}
  for cfg in configs:
    tr = make(*cfg)
    state = start(cfg, tr, p_s, h_s, *parts[0])
    for j, (x, r) in enumerate(parts):
      if j == 1 and cfg == CK and root is not None:
        jc.save(root, state, info={"k1": CK[0], "k2": CK[1]})
      state, _ = tr.update(state, x, r)
    out[cfg] = _gather((state.params, state.carry))
    out[cfg, "replicated"] = all(
        v.sharding.is_fully_replicated for v in jax.tree.leaves(state.params))
  for k1, k2 in loss_configs:
    f = jbptt.truncated_loss(step_loss, k1=k1, k2=k2)
    grad = jax.jit(jax.grad(lambda p, h, x, f=f: f(p, h, x)[0]))
    out["grad", k1, k2] = _gather(grad(p_s, h_s, xs_s[0]))
  return out


def restore_and_continue(root, altered=None):
  """Restores ``CK`` from ``root`` into a fresh template, reports whether
  every leaf has the template's sharding, continues the stream; then tries
  the ``altered`` copy (if given) and reports which processes raised."""
  import jbptt.checkpoint as jc

  out = {"processes": jax.process_count()}
  params, h0, xs, resets = model()
  params = jax.tree_util.tree_map(lambda v: v + 1.0, params)  # unused values
  p_s, h_s, _, parts = _placed(params, h0 + 1.0, xs, resets)
  tr = make(*CK)
  like = tr.init(p_s, h_s, *parts[0])
  try:
    back = jc.restore(root, like, info={"k1": CK[0], "k2": CK[1]})
  except jc.CheckpointError as e:
    out["error"] = str(e)
    return out
  out["step"] = int(back.step)
  out["mismatched"] = _shardings(back, like)
  for x, r in parts[1:]:
    back, _ = tr.update(back, x, r)
  out["resumed"] = _gather((back.params, back.carry))
  if altered is not None:
    from jax.experimental import multihost_utils

    try:
      jc.restore(altered, like)
      raised = ""
    except jc.CheckpointError as e:
      raised = str(e)
    flags = multihost_utils.process_allgather(np.int32(bool(raised)))
    out["altered"] = (raised, [int(f) for f in np.ravel(flags)])
  return out


# In the test process ---------------------------------------------------------


@functools.lru_cache(maxsize=None)
def reference(cfg):
  """``cfg``'s params and carry after the stream, on one process."""
  params, h0, xs, resets = model()
  tr = make(*cfg)
  state = feed(tr, start(cfg, tr, params, h0, xs, resets), xs, resets, CUTS)
  return host((state.params, state.carry))


def close(actual, desired):
  jax.tree_util.tree_map(
      lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5),
      actual, desired)


def launch(target, n, cache, **kwargs):
  try:
    return multihost.launch(f"test_multiprocess:{target}", n,
                            timeout=TIMEOUT, cache_dir=str(cache), **kwargs)
  except multihost.Unavailable as e:
    pytest.skip(f"no gloo CPU collectives for several JAX processes: {e}")


def alter_one_shard(src, dst):
  """A copy of checkpoint ``src`` whose carry's first shard checksum is off."""
  shutil.copytree(src, dst)
  (step,) = [p for p in dst.iterdir() if p.name.isdigit()]
  manifest = json.loads((step / "jbptt.json").read_text())
  (carry,) = [e for e in manifest["leaves"] if e["path"] == ".carry"]
  key = sorted(carry["shards"])[0]
  carry["shards"][key] = "0" * 64
  (step / "jbptt.json").write_text(json.dumps(manifest))
  return key


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
  """The launches' shared compilation cache."""
  return tmp_path_factory.mktemp("compilation-cache")


@pytest.fixture(scope="module")
def two(tmp_path_factory, cache):
  """One launch of 2: every configuration; ``CK`` saved mid-stream."""
  root = tmp_path_factory.mktemp("multiprocess") / "ck"
  return root, launch("train_and_save", 2, cache, root=str(root))


@pytest.fixture(scope="module")
def resumed_two(two, cache):
  """2 fresh processes: the checkpoint restored and continued."""
  root, _ = two
  key = alter_one_shard(root, root.with_name("altered"))
  out = launch("restore_and_continue", 2, cache, root=str(root),
               altered=str(root.with_name("altered")))
  return key, out


@pytest.fixture(scope="module")
def four(two, cache):
  """One launch of 4: the 2-process checkpoint restored and continued."""
  root, _ = two
  return launch("restore_and_continue", 4, cache, root=str(root))


@pytest.mark.parametrize("cfg", CONFIGS, ids=str)
def test_trainer_two_processes(two, cfg):
  _, out = two
  close(out[cfg], reference(cfg))
  assert out[cfg, "replicated"]


@pytest.mark.parametrize("k1,k2", LOSS_CONFIGS)
def test_truncated_loss_two_processes(two, k1, k2):
  _, out = two
  params, h0, xs, _ = model()
  f = jbptt.truncated_loss(step_loss, k1=k1, k2=k2)
  grad = jax.grad(lambda p: f(p, h0, xs)[0])(params)
  close(out["grad", k1, k2], host(grad))


def test_checkpoint_saved_with_shard_checksums(two):
  root, _ = two
  (step,) = [p for p in root.iterdir() if p.name.isdigit()]
  assert int(step.name) == CUTS[0] and CUTS[0] % CK[0]
  manifest = json.loads((step / "jbptt.json").read_text())
  by_path = {e["path"]: e for e in manifest["leaves"]}
  # The carry is split over the batch: one checksum per process's shard.
  assert by_path[".carry"]["sha256"] is None
  assert sorted(by_path[".carry"]["shards"]) == ["0:4,0:4", "4:8,0:4"]
  # Every leaf has a checksum of its whole or of each of its shards.
  assert all(e["sha256"] or e.get("shards") for e in manifest["leaves"])
  assert not [p for p in step.iterdir() if ".shards." in p.name]


def test_restore_on_fresh_processes_continues(two, resumed_two):
  _, saved = two
  _, out = resumed_two
  assert "error" not in out, out.get("error")
  assert out["step"] == CUTS[0]
  assert out["mismatched"] == []  # every leaf has the template's sharding
  np.testing.assert_array_equal(out["resumed"][0]["W"],
                                saved[CK][0]["W"])
  close(out["resumed"], saved[CK])
  close(out["resumed"], reference(CK))


def test_altered_shard_checksum_raises_everywhere(resumed_two):
  key, out = resumed_two
  raised, flags = out["altered"]
  assert flags == [1, 1]  # no process returned a state
  assert "corrupt" in raised and ".carry" in raised, raised
  assert key in ("0:4,0:4", "4:8,0:4")


def test_two_process_checkpoint_on_four(four):
  out = four
  assert out["processes"] == 4
  if "error" in out:  # allowed, if clear
    assert "checkpoint" in out["error"], out["error"]
    return
  assert out["mismatched"] == []
  close(out["resumed"], reference(CK))


# `jbptt train --distributed` ------------------------------------------------

# TBPTT(8, 12) in 6 chunks of 8 steps (a checkpoint after each).
TRAIN = ["--task", "adding", "--k1", "8", "--k2", "12", "--steps", "48",
         "--batch", "4", "--hidden", "8"]


def _train_on(n, cache, *args):
  """``jbptt train *args --distributed`` on ``n`` processes; their outputs."""
  argv = lambda i, port: [
      "-m", "jbptt", "train", *args, "--distributed", "--coordinator",
      f"127.0.0.1:{port}", "--num-processes", str(n), "--process-id", str(i)]
  try:
    return multihost.commands(argv, n, timeout=TIMEOUT, cache_dir=str(cache))
  except multihost.Unavailable as e:
    pytest.skip(f"no gloo CPU collectives for several JAX processes: {e}")


def test_jbptt_train_on_two_processes(tmp_path, cache):
  """Two processes train, checkpoint and resume as one process does; only
  process 0 prints and writes the outputs."""
  from jbptt._cli.main import main

  assert main(["train", *TRAIN, "--out", str(tmp_path / "one")]) == 0
  (want,) = json.loads((tmp_path / "one" / "results.json").read_text())
  two = tmp_path / "two"
  logs = _train_on(2, cache, *TRAIN, "--out", str(two))
  assert "2 processes, 2 streams each" in logs[0] and "TBPTT(8, 12)" in logs[0]
  assert "TBPTT(8, 12)" not in logs[1] and "wrote" not in logs[1]
  (got,) = json.loads((two / "results.json").read_text())
  for key in ("updates", "final_loss", "heldout_loss"):
    assert got[key] == pytest.approx(want[key], rel=1e-5), key
  # Interrupted after its last checkpoint but one, resumed on 2 processes.
  steps = sorted(int(p.name) for p in (two / "checkpoints").iterdir())
  shutil.rmtree(two / "checkpoints" / str(steps[-1]))
  (two / "results.json").unlink()
  logs = _train_on(2, cache, "--resume", str(two))
  assert f"resuming {two} at step {steps[-2]}" in " ".join(logs[0].split())
  (again,) = json.loads((two / "results.json").read_text())
  assert again["final_loss"] == pytest.approx(want["final_loss"], rel=1e-5)
  assert again["updates"] == want["updates"]

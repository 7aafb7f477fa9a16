"""Checkpoint / resume of a TrainState: exact continuation, atomic, strict."""

import gc
import json
import logging
import os
import pathlib
import re
import shutil
import sys
import time

import jax
import numpy as np
import optax
import pytest

import jbptt
import jbptt.checkpoint as jc

from conftest import carry0, data, init_params, step_loss

tree_map = jax.tree_util.tree_map


def assert_trees_equal(a, b):
  assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
  for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def piece(tree, a, b):
  return tree_map(lambda v: v[a:b], tree)


def stream(n=23):
  xs = data(n)
  resets = np.zeros((n, 2), bool)
  resets[n // 3, 0] = resets[2 * n // 3, 1] = True
  return xs, resets


# (k1, k2, cut, gradient): every cut falls inside a k1 chunk (pending steps
# are saved); k2 rules keep their key or estimate in the state.
@pytest.mark.parametrize("k1,k2,cut,gradient", [
    (4, 4, 10, None), (3, 7, 8, None), (8, 3, 13, None), (6, 30, 7, None),
    (3, jbptt.Randomized(3, 7), 8, None),
    (4, jbptt.Adaptive(0.1, (2, 4, 8), every=2), 10, None),
    (4, 4, 10, jbptt.Recompute(burn_in=3)),
])
def test_resume_is_exact(tmp_path, k1, k2, cut, gradient):
  # Two chunks of one length (one compilation): the second fed to the state
  # in memory, and to that state saved and restored.
  xs, resets = stream(2 * cut)
  params, h = init_params(), carry0()
  opt = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(0.05))
  tr = jbptt.trainer(step_loss, opt, k1=k1, k2=k2,
                     gradient=gradient or jbptt.Recompute())
  keyed = isinstance(k2, jbptt.Randomized)
  key = (lambda seed: jax.random.key(seed)) if keyed else (lambda seed: None)
  first, _ = tr.update(tr.init(params, h, xs, resets, key=key(1)),
                       piece(xs, 0, cut), resets[:cut])
  whole, _ = tr.update(first, piece(xs, cut, None), resets[cut:])
  assert cut % k1  # saved with steps pending
  info = {"k1": k1, "k2": str(k2)}
  jc.save(tmp_path, first, info=info)
  del first
  # A fresh process would build its template from other values: only the
  # structure, shapes and dtypes of the template are used.
  like = tr.init(init_params(key=7), h * 0, piece(xs, 0, 1), resets[:1],
                 key=key(99))
  back = jc.restore(tmp_path, like, info=info)
  assert int(back.step) == cut
  resumed, _ = tr.update(back, piece(xs, cut, None), resets[cut:])
  assert_trees_equal(resumed, whole)


@pytest.fixture(scope="module")
def run():
  """A TBPTT(3, 7) trainer, a template and its state after 8 steps (built
  once: each ``update`` chunk length compiles once per trainer)."""
  with jax.enable_x64(True):
    xs, resets = stream()
    tr = jbptt.trainer(step_loss, optax.adam(0.05), k1=3, k2=7)
    like = tr.init(init_params(), carry0(), xs, resets)
    state, _ = tr.update(like, piece(xs, 0, 8), resets[:8])
  return tr, like, state


@pytest.fixture
def saved(tmp_path, run):
  """``run``'s state saved in ``tmp_path / "ck"``."""
  tr, like, state = run
  path = jc.save(tmp_path / "ck", state, info={"k1": 3, "k2": 7})
  return tmp_path / "ck", path, state, like, tr


def test_layout_and_latest(saved):
  root, path, state, like, tr = saved
  assert path == root / "8" and path.is_dir()
  assert (path / "jbptt.json").is_file()
  assert jc.latest_step(root) == 8
  assert jc.read_info(root) == {"k1": 3, "k2": 7}
  assert jc.latest_step(root / "nothing-here") is None
  # The restored state has the template's static part (its signature).
  assert jc.restore(root, like).signature == like.signature


def test_keep_and_same_step(saved):
  root, _, state, like, tr = saved
  xs, resets = stream()
  for a, b in [(8, 12), (12, 16), (16, 20)]:
    state, _ = tr.update(state, piece(xs, a, b), resets[a:b])
    jc.save(root, state, keep=2)
  assert sorted(int(p.name) for p in root.iterdir()) == [16, 20]
  assert int(jc.restore(root, like).step) == 20
  assert int(jc.restore(root, like, step=16).step) == 16
  with pytest.raises(jc.CheckpointError, match="already has a checkpoint at step 20"):
    jc.save(root, state)
  with pytest.raises(jc.CheckpointError, match=r"no checkpoint at step 8 .*\[16, 20\]"):
    jc.restore(root, like, step=8)
  with pytest.raises(ValueError, match="keep must be a positive int"):
    jc.save(root, state, keep=0)
  with pytest.raises(ValueError, match="info must be a JSON-able dict"):
    jc.save(root / "other", state, info={"f": object()})
  assert not (root / "other").exists() or not any((root / "other").iterdir())


def test_interrupted_write_is_ignored(saved):
  root, path, state, like, tr = saved
  # What a save killed half-way leaves: orbax's temporary folder, no commit.
  tmp = root / "9.orbax-checkpoint-tmp-1234"
  (tmp / "state").mkdir(parents=True)
  (tmp / "state" / "junk").write_bytes(b"\x00" * 10)
  # Or killed after orbax's commit, before the manifest: arrays, no manifest.
  shutil.copytree(path, root / "16")
  (root / "16" / "jbptt.json").unlink()
  assert jc.latest_step(root) == 8
  assert_trees_equal(jc.restore(root, like), state)
  with pytest.raises(jc.CheckpointError, match=r"16 is corrupt or incomplete: "
                     r"it has no jbptt\.json \(an interrupted save"):
    jc.restore(root, like, step=16)
  # Saving that step again replaces what the interrupted save left.
  xs, resets = stream()
  later, _ = tr.update(state, piece(xs, 8, 16), resets[8:16])
  jc.save(root, later, keep=None)
  assert jc.latest_step(root) == 16
  assert_trees_equal(jc.restore(root, like), later)


def test_template_without_resets(saved):
  # The saved stream declared resets; a template without them lacks a buffer.
  root, _, _, _, tr = saved
  xs, _ = stream()
  with pytest.raises(jc.CheckpointError,
                     match=r"template lacks: \.history\.resets"):
    jc.restore(root, tr.init(init_params(), carry0(), xs))
  with pytest.raises(jc.CheckpointError, match=r"trainer\.init\(params, carry, xs"):
    jc.restore(root, tr.init(init_params(), carry0(), xs))


def test_mismatched_shapes_dtypes_and_config(saved):
  root, _, _, like, _ = saved
  wide = like._replace(params={**like.params, "W": np.zeros((5, 5))})
  with pytest.raises(jc.CheckpointError,
                     match=r"\.params\['W'\]: float64\[4, 4\] in the checkpoint, "
                     r"float64\[5, 5\] in the template"):
    jc.restore(root, wide)
  f32 = like._replace(params=tree_map(lambda a: a.astype(np.float32), like.params))
  with pytest.raises(jc.CheckpointError, match=r"\.params\['U'\]: float64.*float32"):
    jc.restore(root, f32)
  # Another k2 has other history buffers: named, never restored.
  tr = jbptt.trainer(step_loss, optax.adam(0.05), k1=3, k2=9)
  xs, resets = stream()
  with pytest.raises(jc.CheckpointError, match=r"\.history\.xs\[0\]"):
    jc.restore(root, tr.init(init_params(), carry0(), xs, resets))
  with pytest.raises(jc.CheckpointError, match="k2: 7 saved, 9 expected"):
    jc.restore(root, like, info={"k1": 3, "k2": 9})
  with pytest.raises(TypeError, match="TrainState"):
    jc.restore(root, like.params)


def _damage(path, damage):
  """Damages the files orbax reads for ``path``'s arrays; returns one name."""
  state = pathlib.Path(path, "state")
  if damage == "metadata":
    files = [state / "_METADATA"]
  elif damage == "ocdbt":
    files = sorted(state.rglob("manifest.ocdbt"))
  else:  # the OCDBT data files, which hold the arrays
    files = sorted(p for p in state.rglob("*") if p.is_file() and p.parent.name == "d")
    if damage == "empty":
      files = files[:1]
  assert files
  for f in files:
    raw = bytearray(f.read_bytes())
    if damage in ("flip", "metadata"):
      for i in range(len(raw) // 2, len(raw)):
        raw[i] ^= 0x5A
      f.write_bytes(bytes(raw))
    elif damage in ("truncate", "ocdbt"):
      f.write_bytes(bytes(raw[: len(raw) // 2]))
    elif damage == "empty":
      f.write_bytes(b"")
    elif damage == "extend":
      f.write_bytes(bytes(raw) + b"\x00" * 16)
    else:
      assert damage == "delete"
      f.unlink()
  return files[0].relative_to(path).as_posix()


@pytest.fixture
def no_late_reports(monkeypatch, capfd, caplog, recwarn):
  """Asserts, when called, that nothing reached ``sys.unraisablehook``, the
  logs (``asyncio``'s from INFO, others from WARNING), warnings or
  stderr, after garbage collection and a short bounded wait (what a failed
  orbax read leaves in flight reports from other threads, or when its tasks
  are collected)."""
  unraisable = []
  monkeypatch.setattr(sys, "unraisablehook", unraisable.append)
  caplog.set_level(logging.INFO, logger="asyncio")

  def check():
    for _ in range(3):
      gc.collect()
      time.sleep(0.1)
    gc.collect()
    assert [f"{u.exc_type.__name__}: {u.exc_value}" for u in unraisable] == []
    assert [f"{r.name}: {r.getMessage().splitlines()[0]}" for r in caplog.records
            if r.name.startswith("asyncio") or r.levelno >= logging.WARNING] == []
    assert [str(w.message) for w in recwarn] == []
    assert capfd.readouterr().err == ""

  return check


@pytest.mark.parametrize("damage,why", [
    ("flip", "does not match its checksum"),
    ("truncate", r"has \d+ bytes, \d+ were saved"),
    ("empty", r"has 0 bytes, \d+ were saved"),
    ("extend", r"has \d+ bytes, \d+ were saved"),
    ("delete", "is missing"),
    ("metadata", "does not match its checksum"),
    ("ocdbt", r"has \d+ bytes, \d+ were saved"),
])
def test_damaged_files(saved, no_late_reports, damage, why):
  # Found before orbax reads anything: one CheckpointError and nothing after
  # it. (Once orbax starts on a damaged file, the reads still in flight when
  # the first one fails report later; repeated, so that a restore that gets
  # that far fails here surely.)
  root, path, _, like, _ = saved
  name = _damage(path, damage)
  for _ in range(10):
    with pytest.raises(jc.CheckpointError) as e:
      jc.restore(root, like)
    assert type(e.value) is jc.CheckpointError
    assert re.search(rf"is corrupt or incomplete: .*{re.escape(name)} {why}",
                     str(e.value)), str(e.value)
  no_late_reports()


def test_damaged_manifest(saved, no_late_reports):
  root, path, state, like, _ = saved
  manifest = path / "jbptt.json"
  text = manifest.read_text()
  manifest.write_text(text[: len(text) // 2])
  with pytest.raises(jc.CheckpointError, match=r"corrupt or incomplete: its "
                     r"jbptt\.json cannot be read \(JSONDecodeError"):
    jc.restore(root, like)
  manifest.write_text(json.dumps({**json.loads(text), "files": None}))
  with pytest.raises(jc.CheckpointError, match="corrupt: its jbptt.json lacks"):
    jc.restore(root, like)
  manifest.unlink()  # the manifest makes a checkpoint complete
  assert jc.latest_step(root) is None
  with pytest.raises(jc.CheckpointError, match=r"no complete checkpoint in .*: "
                     r"step 8 is corrupt or incomplete: it has no jbptt\.json"):
    jc.restore(root, like)
  with pytest.raises(jc.CheckpointError, match=r"8 is corrupt or incomplete"):
    jc.read_info(root, step=8)
  no_late_reports()


def test_checksum_mismatch(saved):
  # Bytes that still decode but are not the ones saved: caught by SHA-256.
  root, path, _, like, _ = saved
  meta = path / "jbptt.json"
  manifest = json.loads(meta.read_text())
  entry = next(e for e in manifest["leaves"] if e["path"] == ".params['W']")
  entry["sha256"] = "0" * 64
  meta.write_text(json.dumps(manifest))
  with pytest.raises(jc.CheckpointError,
                     match=r"corrupt: .*checksums: \.params\['W'\]"):
    jc.restore(root, like)


def test_format_1_is_refused(saved):
  # What jbptt before 1.0 wrote: orbax's "manifest" item, no jbptt.json.
  root, path, state, like, _ = saved
  old = json.loads((path / "jbptt.json").read_text())
  (path / "jbptt.json").unlink()
  (path / "manifest").mkdir()
  (path / "manifest" / "metadata").write_text(json.dumps(
      {**old, "format": "jbptt.checkpoint/1", "files": None}))
  with pytest.raises(jc.CheckpointError,
                     match=r"written by jbptt before 1\.0 \(jbptt\.checkpoint/1\)"):
    jc.restore(root, like)
  with pytest.raises(jc.CheckpointError, match="already has a checkpoint at step 8"):
    jc.save(root, state)


def test_no_checkpoint(tmp_path, saved):
  _, _, _, like, _ = saved
  with pytest.raises(jc.CheckpointError, match="not a folder"):
    jc.restore(tmp_path / "missing", like)
  os.mkdir(tmp_path / "empty")
  with pytest.raises(jc.CheckpointError, match="no checkpoint in"):
    jc.restore(tmp_path / "empty", like)

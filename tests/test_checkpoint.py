"""Checkpoint / resume of a TrainState: exact continuation, atomic, strict."""

import json
import os
import pathlib
import shutil

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
  resets[9, 0] = resets[16, 1] = True
  return xs, resets


# (k1, k2, cut): every cut falls inside a k1 chunk (pending steps are saved).
@pytest.mark.parametrize("k1,k2,cut", [
    (4, 4, 10), (3, 7, 8), (8, 3, 13), (6, 30, 7),
])
def test_resume_is_exact(tmp_path, k1, k2, cut):
  xs, resets = stream()
  params, h = init_params(), carry0()
  opt = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(0.05))
  tr = jbptt.trainer(step_loss, opt, k1=k1, k2=k2)
  whole, _ = tr.update(tr.init(params, h), xs, resets)

  first, _ = tr.update(tr.init(params, h), piece(xs, 0, cut), resets[:cut])
  assert cut % k1  # saved with steps pending
  jc.save(tmp_path, first, info={"k1": k1, "k2": k2})
  del first
  # A fresh process would build its template from other values: only the
  # structure, shapes and dtypes of the template are used.
  like = tr.init(init_params(key=7), h * 0, piece(xs, 0, 1), resets[:1])
  back = jc.restore(tmp_path, like, info={"k1": k1, "k2": k2})
  assert int(back.step) == cut
  resumed, _ = tr.update(back, piece(xs, cut, None), resets[cut:])
  assert_trees_equal(resumed, whole)


@pytest.fixture
def saved(tmp_path):
  """A checkpoint of a TBPTT(3, 7) stream after 8 steps; its template."""
  xs, resets = stream()
  tr = jbptt.trainer(step_loss, optax.adam(0.05), k1=3, k2=7)
  state, _ = tr.update(tr.init(init_params(), carry0()), piece(xs, 0, 8),
                       resets[:8])
  path = jc.save(tmp_path / "ck", state, info={"k1": 3, "k2": 7})
  like = tr.init(init_params(), carry0(), xs, resets)
  return tmp_path / "ck", path, state, like, tr


def test_layout_and_latest(saved):
  root, path, state, like, tr = saved
  assert path == root / "8" and path.is_dir()
  assert jc.latest_step(root) == 8
  assert jc.read_info(root) == {"k1": 3, "k2": 7}
  assert jc.latest_step(root / "nothing-here") is None


def test_keep_and_same_step(saved):
  root, _, state, like, tr = saved
  xs, resets = stream()
  for a, b in [(8, 12), (12, 15), (15, 20)]:
    state, _ = tr.update(state, piece(xs, a, b), resets[a:b])
    jc.save(root, state, keep=2)
  assert sorted(int(p.name) for p in root.iterdir()) == [15, 20]
  assert int(jc.restore(root, like).step) == 20
  assert int(jc.restore(root, like, step=15).step) == 15
  with pytest.raises(jc.CheckpointError, match="already has a checkpoint at step 20"):
    jc.save(root, state)
  with pytest.raises(jc.CheckpointError, match=r"no checkpoint at step 8 .*\[15, 20\]"):
    jc.restore(root, like, step=8)
  with pytest.raises(ValueError, match="keep must be a positive int"):
    jc.save(root, state, keep=0)
  with pytest.raises(ValueError, match="info must be a JSON-able dict"):
    jc.save(root / "other", state, info={"f": object()})
  assert not (root / "other").exists() or not any((root / "other").iterdir())


def test_interrupted_write_is_ignored(saved):
  root, _, state, like, _ = saved
  # What a save killed half-way leaves: orbax's temporary folder, no commit.
  tmp = root / "9.orbax-checkpoint-tmp-1234"
  (tmp / "state").mkdir(parents=True)
  (tmp / "state" / "junk").write_bytes(b"\x00" * 10)
  assert jc.latest_step(root) == 8
  assert_trees_equal(jc.restore(root, like), state)


def test_template_without_history(saved):
  root, _, _, _, tr = saved
  with pytest.raises(jc.CheckpointError,
                     match=r"checkpoint lacks.*|template lacks: \.history"):
    jc.restore(root, tr.init(init_params(), carry0()))
  with pytest.raises(jc.CheckpointError, match=r"trainer\.init\(params, carry, xs"):
    jc.restore(root, tr.init(init_params(), carry0()))


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


def _files(path, part):
  return sorted(p for p in pathlib.Path(path, part).rglob("*")
                if p.is_file() and p.stat().st_size > 0)


@pytest.mark.parametrize("damage", ["flip", "truncate", "delete", "manifest"])
def test_corrupt_or_truncated(saved, damage):
  root, path, _, like, _ = saved
  data_files = [p for p in _files(path, "state") if "/d/" in str(p)]
  assert data_files
  for f in data_files:
    raw = bytearray(f.read_bytes())
    if damage == "flip":
      for i in range(len(raw) // 2, len(raw)):
        raw[i] ^= 0x5A
      f.write_bytes(bytes(raw))
    elif damage == "truncate":
      f.write_bytes(bytes(raw[: len(raw) // 2]))
    elif damage == "delete":
      f.unlink()
  if damage == "manifest":
    shutil.rmtree(path / "manifest")
  with pytest.raises(jc.CheckpointError, match="corrupt"):
    jc.restore(root, like)


def test_checksum_mismatch(saved):
  # Bytes that still decode but are not the ones saved: caught by SHA-256.
  root, path, _, like, _ = saved
  meta = path / "manifest" / "metadata"
  manifest = json.loads(meta.read_text())
  entry = next(e for e in manifest["leaves"] if e["path"] == ".params['W']")
  entry["sha256"] = "0" * 64
  meta.write_text(json.dumps(manifest))
  with pytest.raises(jc.CheckpointError,
                     match=r"corrupt: .*checksums: \.params\['W'\]"):
    jc.restore(root, like)


def test_no_checkpoint(tmp_path, saved):
  _, _, _, like, _ = saved
  with pytest.raises(jc.CheckpointError, match="not a folder"):
    jc.restore(tmp_path / "missing", like)
  os.mkdir(tmp_path / "empty")
  with pytest.raises(jc.CheckpointError, match="no checkpoint in"):
    jc.restore(tmp_path / "empty", like)

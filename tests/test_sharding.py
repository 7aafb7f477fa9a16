"""Data parallel over 4 forced host devices: the same params as one device."""

import pathlib
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import pytest

import jbptt.sharding as js

# Run in a fresh process: the 4 host devices must be set before JAX starts.
SCRIPT = textwrap.dedent("""
    import sys
    import chex
    chex.set_n_cpu_devices(4)
    import jax, jax.numpy as jnp, numpy as np, optax
    import jbptt, jbptt.sharding as js
    sys.path.insert(0, TESTS)
    from conftest import assert_trees_close
    assert len(jax.devices()) == 4
    D, H, B, n = 3, 8, 8, 30
    k = jax.random.split(jax.random.key(0), 3)
    params = {"W": 0.5 * jax.random.normal(k[0], (H, H)),
              "U": jax.random.normal(k[1], (D, H)),
              "v": jax.random.normal(k[2], (H,))}
    def step_loss(p, h, x):
      u, y = x
      h = jnp.tanh(h @ p["W"] + u @ p["U"])
      return h, jnp.mean((h @ p["v"] - y) ** 2)
    xs = (jax.random.normal(k[0], (n, B, D)), jax.random.normal(k[1], (n, B)))
    h0 = jnp.zeros((B, H))
    resets = np.zeros((n, B), bool); resets[11, 3] = True
    mesh = js.batch_mesh()
    xs_s, r_s = js.shard_batch((xs, resets), mesh, batch_axis=1)
    h_s, p_s = js.shard_batch(h0, mesh), js.replicate(params, mesh)
    def close(a, b):
      assert_trees_close(a, b, rtol=1e-5, atol=1e-6)
    for k1, k2 in [(4, 4), (3, 8), (5, 2), (3, jbptt.Randomized(3, 8)),
                   (2, jbptt.Adaptive(0.2, (2, 4, 8), every=2))]:
      key = jax.random.key(3) if isinstance(k2, jbptt.Randomized) else None
      tr = jbptt.trainer(step_loss, optax.adam(1e-2), k1=k1, k2=k2)
      one = tr.init(params, h0, xs, resets, key=key)
      one, m1 = tr.update(one, xs, resets)
      many = tr.init(p_s, h_s, xs_s, r_s, key=key)
      used = []  # the k2 of each update
      for a, b in [(0, 7), (7, 30)]:  # uneven pieces, still sharded
        many, m2 = tr.update(many, jax.tree_util.tree_map(lambda v: v[a:b], xs_s),
                             r_s[a:b])
        used.append(np.asarray(m2.k2)[np.asarray(m2.valid)])
      close(one.params, many.params)
      close(one.carry, many.carry)
      assert many.params["W"].sharding.is_fully_replicated
      assert many.carry.sharding.spec == jax.sharding.PartitionSpec("batch")
      assert np.array_equal(np.asarray(m1.k2)[np.asarray(m1.valid)],
                            np.concatenate(used))
      f = jbptt.truncated_loss(step_loss, k1=k1, k2=k2)
      grad = jax.jit(jax.grad(lambda p, h, x: f(p, h, x, key=key)[0]))
      g1, g2 = grad(params, h0, xs), grad(p_s, h_s, xs_s)
      close(g1, g2)
      assert g2["W"].sharding.is_fully_replicated
    # A sharded state saved mid-stream comes back with its shardings.
    import tempfile, jbptt.checkpoint as jc
    root = tempfile.mkdtemp()
    jc.save(root, many)
    back = jc.restore(root, tr.init(p_s, h_s, xs_s, r_s, key=key))
    close(back, many)
    assert back.carry.sharding.spec == jax.sharding.PartitionSpec("batch")
    assert back.params["W"].sharding.is_fully_replicated
    print("ok")
""")


def test_data_parallel_matches_one_device():
  tests = str(pathlib.Path(__file__).parent)
  out = subprocess.run([sys.executable, "-c", f"TESTS = {tests!r}\n" + SCRIPT],
                       capture_output=True, text=True, timeout=600,
                       check=False)
  assert out.returncode == 0, out.stderr[-3000:]
  assert out.stdout.strip().endswith("ok")


def test_shard_batch_errors():
  mesh = js.batch_mesh(jax.devices()[:1])
  with pytest.raises(ValueError, match="no batch axis 1"):
    js.shard_batch(jnp.zeros((3,)), mesh, batch_axis=1)
  with pytest.raises(ValueError, match="at least one device"):
    js.batch_mesh([])
  placed = js.shard_batch({"x": jnp.zeros((5, 2))}, mesh, batch_axis=1)
  assert placed["x"].shape == (5, 2)

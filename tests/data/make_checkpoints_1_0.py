"""Writes ``checkpoints-1.0/``: small checkpoints of jbptt 1.0.0, with the
params that 1.0 reached after training on from them (``expected.npz``).

Run once, with jbptt 1.0.0 (commit c33b5d0), from the repository root:
``python tests/data/make_checkpoints_1_0.py``. ``tests/test_compat.py``
restores them with today's code, trains on and compares. Self-contained (no
conftest) so that it describes exactly what was written.
"""

import json
import pathlib
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jbptt
import jbptt.checkpoint as jc

HERE = pathlib.Path(__file__).parent / "checkpoints-1.0"
D, H, B = 3, 4, 2


def init_params():
  k = jax.random.split(jax.random.PRNGKey(0), 4)
  return {"W": 0.6 * jax.random.normal(k[0], (H, H)),
          "U": jax.random.normal(k[1], (D, H)),
          "b": 0.1 * jax.random.normal(k[2], (H,)),
          "v": jax.random.normal(k[3], (H,))}


def step_loss(p, h, x):
  u, y = x
  h = jnp.tanh(h @ p["W"] + u @ p["U"] + p["b"])
  return h, jnp.mean((h @ p["v"] - y) ** 2)


def cell(p, h, x):
  u, _ = x
  h = jnp.tanh(h @ p["W"] + u @ p["U"] + p["b"])
  return h, h


def readout(p, y, x):
  return jnp.mean((y @ p["v"] - x[1]) ** 2)


def data(n):
  k = jax.random.split(jax.random.PRNGKey(1), 2)
  return (jax.random.normal(k[0], (n, B, D)), jax.random.normal(k[1], (n, B)))


def resets_of(n):
  r = np.zeros((n, B), bool)
  r[n // 3, 0] = r[2 * n // 3, 1] = True
  return r


# name: (k1, k2, gradient, step, key seed or None)
CASES = {
    "overlap": (3, 7, jbptt.Recompute(), "step", None),
    "chunks-burn-in": (4, 4, jbptt.Recompute(burn_in=3), "cell", None),
    "stored": (2, 6, jbptt.StoredStates(), "step", None),
    "randomized": (3, jbptt.Randomized(3, 7), jbptt.Recompute(), "step", 5),
    "adaptive": (4, jbptt.Adaptive(0.1, (2, 4, 8), every=2),
                 jbptt.StoredStates(), "cell", None),
}
CUT, N = 10, 20  # saved after 10 steps (inside a k1 chunk), then 10 more


def make(name):
  k1, k2, gradient, kind, seed = CASES[name]
  step = step_loss if kind == "step" else jbptt.cell_loss(cell, readout)
  tr = jbptt.trainer(step, optax.adam(0.05), k1=k1, k2=k2, gradient=gradient)
  xs, resets = data(N), resets_of(N)
  key = None if seed is None else jax.random.key(seed)
  state = tr.init(init_params(), jnp.full((B, H), 0.1), xs, resets, key=key)
  return tr, state, xs, resets


def main():
  jax.config.update("jax_enable_x64", True)
  shutil.rmtree(HERE, ignore_errors=True)
  HERE.mkdir(parents=True)
  expected = {}
  for name in CASES:
    tr, state, xs, resets = make(name)
    state, _ = tr.update(state, jax.tree.map(lambda a: a[:CUT], xs),
                         resets[:CUT])
    jc.save(HERE / name, state, info={"case": name})
    state, m = tr.update(state, jax.tree.map(lambda a: a[CUT:], xs),
                         resets[CUT:])
    for k, v in state.params.items():
      expected[f"{name}/params/{k}"] = np.asarray(v)
    expected[f"{name}/carry"] = np.asarray(state.carry)
    expected[f"{name}/loss"] = np.asarray(m.loss)
    expected[f"{name}/k2"] = np.asarray(m.k2)
  np.savez(HERE / "expected.npz", **expected)
  (HERE / "README.md").write_text(
      "Checkpoints written by jbptt 1.0.0 (commit c33b5d0) with "
      "`tests/data/make_checkpoints_1_0.py`; `tests/test_compat.py` restores "
      "them. Do not regenerate with a later version.\n")
  print(json.dumps(sorted(expected)[:5]), len(expected))


if __name__ == "__main__":
  main()

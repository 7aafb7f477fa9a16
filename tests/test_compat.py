"""Checkpoints written by jbptt 1.0 restore, and training goes on exactly as
it did in 1.0 (``tests/data/checkpoints-1.0``, see its generator)."""

import pathlib
import sys

import jax
import numpy as np
import pytest

import jbptt.checkpoint as jc

sys.path.insert(0, str(pathlib.Path(__file__).parent / "data"))
import make_checkpoints_1_0 as v1  # noqa: E402

HERE = v1.HERE


@pytest.mark.parametrize("name", sorted(v1.CASES))
def test_1_0_checkpoint_resumes_as_in_1_0(name):
  expected = np.load(HERE / "expected.npz")
  tr, like, xs, resets = v1.make(name)
  state = jc.restore(HERE / name, like, info={"case": name})
  assert int(state.step) == v1.CUT
  state, m = tr.update(state, jax.tree.map(lambda a: a[v1.CUT:], xs),
                       resets[v1.CUT:])
  for k, v in state.params.items():
    np.testing.assert_allclose(v, expected[f"{name}/params/{k}"], rtol=1e-10,
                               atol=1e-12)
  np.testing.assert_allclose(state.carry, expected[f"{name}/carry"],
                             rtol=1e-10, atol=1e-12)
  np.testing.assert_allclose(m.loss, expected[f"{name}/loss"], rtol=1e-10,
                             atol=1e-12)
  np.testing.assert_array_equal(m.k2, expected[f"{name}/k2"])

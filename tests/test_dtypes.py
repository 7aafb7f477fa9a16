"""float32, float64 and bfloat16: dtypes kept, values close to float64."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jbptt

from conftest import carry0, data, init_params, step_loss

tree_map = jax.tree_util.tree_map
TOL = {jnp.float32: 1e-4, jnp.bfloat16: 0.1, jnp.float64: 1e-12}


def dtypes_of(tree):
  return {a.dtype for a in jax.tree_util.tree_leaves(tree)}


def close(a, b, tol):
  for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    assert np.max(np.abs(x - y)) <= tol * (1 + np.max(np.abs(y))), (x, y)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64, jnp.bfloat16])
@pytest.mark.parametrize("k1,k2", [(3, 3), (2, 5), (5, 2)])
def test_truncated_loss_keeps_dtype(dtype, k1, k2):
  p, h, xs = init_params(dtype=dtype), carry0(dtype), data(9, dtype=dtype)
  f = jbptt.truncated_loss(step_loss, k1=k1, k2=k2)
  (loss, final), grad = jax.jit(jax.value_and_grad(f, has_aux=True))(p, h, xs)
  assert loss.dtype == dtype and final.dtype == dtype
  assert dtypes_of(grad) == {jnp.dtype(dtype)}
  p64 = init_params(dtype=jnp.float64)
  (want, want_final), want_grad = jax.value_and_grad(f, has_aux=True)(
      p64, carry0(), tree_map(lambda a: a.astype(jnp.float64), xs))
  close(loss, want, TOL[dtype])
  close(final, want_final, TOL[dtype])
  close(grad, want_grad, TOL[dtype] * (10 if dtype == jnp.bfloat16 else 1))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64, jnp.bfloat16])
@pytest.mark.parametrize("k1,k2", [(3, 3), (2, 5)])
def test_trainer_keeps_dtype(dtype, k1, k2):
  p, h, xs = init_params(dtype=dtype), carry0(dtype), data(12, dtype=dtype)
  tr = jbptt.trainer(step_loss, optax.adam(1e-3), k1=k1, k2=k2)
  state, metrics = tr.update(tr.init(p, h), xs)
  assert dtypes_of(state.params) == {jnp.dtype(dtype)}
  assert state.carry.dtype == dtype
  assert dtypes_of(state.history.anchor) == {jnp.dtype(dtype)}
  assert metrics.loss.dtype == dtype
  assert bool(jnp.all(jnp.isfinite(metrics.loss)))

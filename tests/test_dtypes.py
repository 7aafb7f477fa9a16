"""float32, float64 and bfloat16: dtypes kept, values close to float64."""

import jax
import jax.numpy as jnp
import optax
import pytest

import jbptt

from conftest import (
  assert_trees_near,
  carry0,
  data,
  gradient_id,
  init_params,
  step_loss,
)

tree_map = jax.tree_util.tree_map
TOL = {jnp.float32: 1e-4, jnp.bfloat16: 0.1, jnp.float64: 1e-12}
DTYPES = [jnp.float32, jnp.float64, jnp.bfloat16]


def dtypes_of(tree):
  return {a.dtype for a in jax.tree_util.tree_leaves(tree)}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("k1,k2", [(3, 3), (2, 5), (5, 2)])
def test_truncated_loss_keeps_dtype(dtype, k1, k2):
  p, h, xs = init_params(dtype=dtype), carry0(dtype), data(9, dtype=dtype)
  f = jbptt.truncated_loss(step_loss, k1=k1, k2=k2)
  vg = jax.jit(jax.value_and_grad(f, has_aux=True))
  (loss, final), grad = vg(p, h, xs)
  assert loss.dtype == dtype and final.dtype == dtype
  assert dtypes_of(grad) == {jnp.dtype(dtype)}
  p64 = init_params(dtype=jnp.float64)
  (want, want_final), want_grad = vg(
      p64, carry0(), tree_map(lambda a: a.astype(jnp.float64), xs))
  assert_trees_near(loss, want, TOL[dtype])
  assert_trees_near(final, want_final, TOL[dtype])
  assert_trees_near(grad, want_grad,
                    TOL[dtype] * (10 if dtype == jnp.bfloat16 else 1))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("k1,k2,gradient", [
    (3, 3, jbptt.Recompute()), (2, 5, jbptt.Recompute()),
    (2, 5, jbptt.StoredStates())], ids=gradient_id)
def test_trainer_keeps_dtype(dtype, k1, k2, gradient):
  p, h, xs = init_params(dtype=dtype), carry0(dtype), data(12, dtype=dtype)
  tr = jbptt.trainer(step_loss, optax.adam(1e-3), k1=k1, k2=k2,
                     gradient=gradient)
  state = tr.init(p, h, xs)
  new, metrics = tr.update(state, xs)
  assert dtypes_of(new.params) == {jnp.dtype(dtype)}
  assert new.carry.dtype == dtype
  assert dtypes_of(new.history.anchor) == {jnp.dtype(dtype)}
  assert dtypes_of(new.history.xs) == {jnp.dtype(dtype)}
  assert dtypes_of(new.opt_state.inner_state) == dtypes_of(
      state.opt_state.inner_state)
  assert metrics.loss.dtype == metrics.weight.dtype == dtype
  assert metrics.grad_norm.dtype == dtype
  assert bool(jnp.all(jnp.isfinite(metrics.loss)))
  assert not bool(jnp.any(metrics.skipped))

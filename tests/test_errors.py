"""Every bad input gives a clear error at trace time, never a wrong answer."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jbptt

from conftest import carry0, data, step_loss


def make_truncated(step, **kw):
  return lambda p, h, xs, **k: jbptt.truncated_loss(step, **kw)(p, h, xs, **k)


def make_trained(step, **kw):
  tr = jbptt.trainer(step, optax.sgd(0.1), **kw)
  return lambda p, h, xs, **k: tr.update(tr.init(p, h), xs, **k)


RUNNERS = {"truncated_loss": make_truncated, "trainer": make_trained}


@pytest.mark.parametrize("name,value", [
    ("k1", 0), ("k1", -3), ("k1", 2.0), ("k1", "4"), ("k1", True), ("k1", None),
    ("k2", 0), ("k2", 1.5),
])
@pytest.mark.parametrize("factory", ["truncated_loss", "trainer"])
def test_bad_k(factory, name, value):
  kw = {"k1": 2, "k2": 2, name: value}
  build = (lambda: jbptt.truncated_loss(step_loss, **kw)) if factory == \
      "truncated_loss" else (lambda: jbptt.trainer(step_loss, optax.sgd(1), **kw))
  with pytest.raises(ValueError, match=rf"{name} must be a positive int, got "
                     rf"{name}={value!r}"):
    build()


@pytest.mark.parametrize("policy", ["all", "NEW", None, 1])
def test_bad_policy(policy):
  with pytest.raises(ValueError, match="policy must be one of"):
    jbptt.truncated_loss(step_loss, k1=2, k2=2, policy=policy)
  with pytest.raises(ValueError, match="policy must be one of"):
    jbptt.trainer(step_loss, optax.sgd(1), k1=2, k2=2, policy=policy)


@pytest.mark.parametrize("option,value,message", [
    ("unroll", 0, "unroll must be None, a positive int or a bool"),
    ("unroll", 2.0, "unroll must be None, a positive int or a bool"),
    ("unroll", "auto", "unroll must be None, a positive int or a bool"),
    ("remat", "nothing", "remat must be None or a jax.checkpoint policy"),
])
def test_bad_options(option, value, message):
  with pytest.raises(ValueError, match=message):
    jbptt.truncated_loss(step_loss, k1=2, k2=3, **{option: value})
  with pytest.raises(ValueError, match=message):
    jbptt.trainer(step_loss, optax.sgd(1), k1=2, k2=3, **{option: value})


def test_bad_history():
  with pytest.raises(ValueError, match="history must be one of"):
    jbptt.trainer(step_loss, optax.sgd(1), k1=2, k2=3, history="cached")


def test_bad_optimizer():
  with pytest.raises(TypeError, match="optimizer must be an optax"):
    jbptt.trainer(step_loss, "adam", k1=2, k2=2)


@pytest.mark.parametrize("runner", RUNNERS)
@pytest.mark.parametrize("jit", [False, True])
def test_xs_time_lengths_differ(runner, jit, params):
  u, y = data(8)
  f = RUNNERS[runner](step_loss, k1=2, k2=2)
  if jit:
    f = jax.jit(f)
  with pytest.raises(ValueError, match=r"share one leading time length.*8.*5"):
    f(params, carry0(), (u, y[:5]))


@pytest.mark.parametrize("runner", RUNNERS)
def test_xs_empty_or_scalar(runner, params):
  u, y = data(8)
  f = RUNNERS[runner](step_loss, k1=2, k2=2)
  with pytest.raises(ValueError, match="zero time steps"):
    f(params, carry0(), (u[:0], y[:0]))
  with pytest.raises(ValueError, match=r"xs\[1\] is a scalar"):
    f(params, carry0(), (u, jnp.float64(1.0)))


@pytest.mark.parametrize("runner", RUNNERS)
@pytest.mark.parametrize("bad,match", [
    (lambda p, h, x: (h.astype(jnp.float32), jnp.sum(h)),
     r"changed carry from float64\[2, 4\] to float32\[2, 4\]"),
    (lambda p, h, x: (h[:1], jnp.sum(h)),
     r"changed carry from float64\[2, 4\] to float64\[1, 4\]"),
    (lambda p, h, x: ((h, h), jnp.sum(h)), "changed the carry's structure"),
    (lambda p, h, x: (h, h), r"scalar loss, got one of shape \(2, 4\)"),
    (lambda p, h, x: h, r"must return a pair \(carry, loss\)"),
])
def test_bad_step_loss(runner, bad, match, params):
  f = RUNNERS[runner](bad, k1=2, k2=3)
  with pytest.raises(TypeError, match=match):
    f(params, carry0(), data(6))


def test_bad_tuple_carry_names_the_leaf(params):
  def bad(p, carry, x):
    c, h = carry
    return (c, h.astype(jnp.float32)), jnp.sum(h)

  f = jbptt.truncated_loss(bad, k1=2, k2=2)
  with pytest.raises(TypeError, match=r"changed carry\[1\]"):
    f(params, (carry0(), carry0()), data(4))


@pytest.mark.parametrize("runner", RUNNERS)
@pytest.mark.parametrize("resets,match", [
    (np.zeros((7, 2), bool), r"shape \(n, ...\) with n=8"),
    (np.zeros((8, 3), bool), r"per-step shape \(3,\).*\(2, 4\)"),
    (np.zeros((8, 2), np.float32), "must be boolean"),
])
def test_bad_resets(runner, resets, match, params):
  f = RUNNERS[runner](step_loss, k1=2, k2=2)
  with pytest.raises((ValueError, TypeError), match=match):
    f(params, carry0(), data(8), resets=resets)


def test_bad_initial_carry(params):
  f = jbptt.truncated_loss(step_loss, k1=2, k2=2)
  with pytest.raises(ValueError, match="initial_carry must have the carry's"):
    f(params, carry0(), data(4), initial_carry=jnp.zeros((3, 4)))


def test_schedule_validates():
  with pytest.raises(ValueError, match="n must be a positive int"):
    jbptt.schedule(0, 2, 2)

"""Every bad input gives a clear error at trace time, never a wrong answer."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from absl.testing import parameterized

import jbptt

from conftest import carry0, data, init_params, step_loss


def make_truncated(step, **kw):
  return lambda p, h, xs, **k: jbptt.truncated_loss(step, **kw)(p, h, xs, **k)


def make_trained(step, **kw):
  """init on the chunk (declaring its resets, if any) and update with it:
  the errors of both."""
  tr = jbptt.trainer(step, optax.sgd(0.1), **kw)
  return lambda p, h, xs, **k: tr.update(
      tr.init(p, h, xs, k.get("resets")), xs, **k)


RUNNERS = {"truncated_loss": make_truncated, "trainer": make_trained}


def build(factory, **kw):
  if factory == "truncated_loss":
    return jbptt.truncated_loss(step_loss, **kw)
  return jbptt.trainer(step_loss, optax.sgd(1), **kw)


FACTORIES = ["truncated_loss", "trainer"]


@pytest.mark.parametrize("name,value", [
    ("k1", 0), ("k1", -3), ("k1", 2.0), ("k1", "4"), ("k1", True), ("k1", None),
    ("k2", 0), ("k2", 1.5),
])
@pytest.mark.parametrize("factory", FACTORIES)
def test_bad_k(factory, name, value):
  kw = {"k1": 2, "k2": 2, name: value}
  with pytest.raises(ValueError, match=rf"{name} must be a positive int.*got "
                     rf"{name}={value!r}"):
    build(factory, **kw)


@pytest.mark.parametrize("losses", ["all", "NEW", None, 1])
@pytest.mark.parametrize("factory", FACTORIES)
def test_bad_losses(factory, losses):
  with pytest.raises(ValueError, match="losses must be one of"):
    build(factory, k1=2, k2=2, losses=losses)


@pytest.mark.parametrize("old", [
    {"policy": "new"}, {"remat": None}, {"history": "stored"},
])
@pytest.mark.parametrize("factory", FACTORIES)
def test_keywords_of_0_1_are_gone(factory, old):
  """policy=, remat= and history= are not silently accepted."""
  with pytest.raises(TypeError, match="unexpected keyword"):
    build(factory, k1=2, k2=3, **old)


@pytest.mark.parametrize("value", [0, 2.0, "auto", None])
@pytest.mark.parametrize("factory", FACTORIES)
def test_bad_unroll(factory, value):
  with pytest.raises(ValueError, match="unroll must be a positive int or a "
                     rf"bool .*got unroll={value!r}"):
    build(factory, k1=2, k2=3, unroll=value)


@pytest.mark.parametrize("strategy", [jbptt.Recompute, jbptt.StoredStates])
def test_bad_remat(strategy):
  factories = ["trainer"] + (["truncated_loss"]
                             if strategy is jbptt.Recompute else [])
  for factory in factories:
    with pytest.raises(ValueError, match=rf"{strategy.__name__}\(remat=...\) "
                       "must be None or a jax.checkpoint policy"):
      build(factory, k1=2, k2=3, gradient=strategy(remat="nothing"))


@pytest.mark.parametrize("gradient", ["stored", None, jax.checkpoint_policies.
                                      nothing_saveable])
@pytest.mark.parametrize("factory", FACTORIES)
def test_bad_gradient(factory, gradient):
  allowed = ("jbptt.Recompute\\(...\\)" if factory == "truncated_loss" else
             "jbptt.Recompute\\(...\\) or jbptt.StoredStates\\(...\\)")
  with pytest.raises(TypeError, match=f"gradient must be {allowed}"):
    build(factory, k1=2, k2=3, gradient=gradient)


def test_truncated_loss_refuses_stored_states():
  with pytest.raises(TypeError, match="takes gradient=jbptt.Recompute"):
    jbptt.truncated_loss(step_loss, k1=2, k2=3, gradient=jbptt.StoredStates())


def test_bad_optimizer():
  with pytest.raises(TypeError, match="optimizer must be an optax"):
    jbptt.trainer(step_loss, "adam", k1=2, k2=2)


class TimeLengthsTest(chex.TestCase):
  """Leaves of xs with different time lengths, with and without jit."""

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.parameters(*RUNNERS)
  def test_xs_time_lengths_differ(self, runner):
    u, y = data(8)
    f = self.variant(RUNNERS[runner](step_loss, k1=2, k2=2))
    with pytest.raises(ValueError,
                       match=r"share one leading time length.*8.*5"):
      f(init_params(), carry0(), (u, y[:5]))


@pytest.mark.parametrize("runner", RUNNERS)
def test_xs_empty_or_scalar(runner, params):
  u, y = data(8)
  f = RUNNERS[runner](step_loss, k1=2, k2=2)
  with pytest.raises(ValueError, match="zero time steps"):
    f(params, carry0(), (u[:0], y[:0]))
  with pytest.raises(ValueError, match=r"xs\[1\] is a scalar"):
    f(params, carry0(), (u, jnp.float64(1.0)))


def test_update_checks_each_chunk(params):
  """A chunk given to update is checked as the one given to init."""
  u, y = data(8)
  tr = jbptt.trainer(step_loss, optax.sgd(0.1), k1=2, k2=2)
  state = tr.init(params, carry0(), (u, y))
  with pytest.raises(ValueError, match=r"share one leading time length.*8.*5"):
    tr.update(state, (u, y[:5]))
  with pytest.raises(ValueError, match="zero time steps"):
    tr.update(state, (u[:0], y[:0]))
  with pytest.raises(ValueError, match="stream declared at init"):
    tr.update(state, (u, jnp.float64(1.0)))
  with pytest.raises(ValueError, match="stream declared at init"):
    tr.update(state, (u, y.astype(jnp.float32)))


@pytest.mark.parametrize("runner", RUNNERS)
@pytest.mark.parametrize("bad,match", [
    (lambda p, h, x: (h.astype(jnp.float32), jnp.sum(h)),
     r"changed carry from float64\[2, 4\] to float32\[2, 4\]"),
    (lambda p, h, x: (h[:1], jnp.sum(h)),
     r"changed carry from float64\[2, 4\] to float64\[1, 4\]"),
    (lambda p, h, x: ((h, h), jnp.sum(h)), "changed the carry's structure"),
    (lambda p, h, x: (h, h), r"scalar loss or a jbptt.WeightedLoss.*shape "
     r"\(2, 4\)"),
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


BAD_RESETS = [
    (np.zeros((7, 2), bool), r"shape \(n, ...\) with n=8"),
    (np.zeros((8, 3), bool), r"per-step shape \(3,\).*\(2, 4\)"),
    (np.zeros((8, 2), np.float32), "must be boolean"),
]


@pytest.mark.parametrize("resets,match", BAD_RESETS)
def test_bad_resets_truncated_loss(resets, match, params):
  f = jbptt.truncated_loss(step_loss, k1=2, k2=2)
  with pytest.raises((ValueError, TypeError), match=match):
    f(params, carry0(), data(8), resets=resets)


@pytest.mark.parametrize("resets,match", BAD_RESETS)
def test_bad_resets_trainer_update(resets, match, params):
  """Resets declared at init with the right per-step shape, then bad ones."""
  tr = jbptt.trainer(step_loss, optax.sgd(0.1), k1=2, k2=2)
  state = tr.init(params, carry0(), data(8), np.zeros((8, 2), bool))
  with pytest.raises((ValueError, TypeError), match=match):
    tr.update(state, data(8), resets)


def test_bad_resets_declared_at_init(params):
  tr = jbptt.trainer(step_loss, optax.sgd(0.1), k1=2, k2=2)
  with pytest.raises(ValueError, match=r"per-step shape \(3,\).*\(2, 4\)"):
    tr.init(params, carry0(), data(8), np.zeros((8, 3), bool))
  with pytest.raises(ValueError, match=r"per-step shape \(3,\).*\(2, 4\)"):
    tr.init(params, carry0(), data(8), jax.ShapeDtypeStruct((1, 3), bool))


def test_bad_initial_carry(params):
  f = jbptt.truncated_loss(step_loss, k1=2, k2=2)
  with pytest.raises(ValueError, match="initial_carry must have the carry's"):
    f(params, carry0(), data(4), initial_carry=jnp.zeros((3, 4)))


def test_schedule_validates():
  with pytest.raises(ValueError, match="n must be a positive int"):
    jbptt.schedule(0, 2, 2)
  with pytest.raises(ValueError, match="losses must be one of"):
    jbptt.schedule(4, 2, 2, losses="all")

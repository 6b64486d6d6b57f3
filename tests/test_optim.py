"""lmjax/optim.py: the learning-rate schedule against its formula, the optimizer following
it, clipping by global norm, and AdamW minimising a quadratic. Weight decay is set to 0
throughout: which parameters decay is not settled here."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import shakespeare_char
from lmjax import optim

NUM_STEPS = 40


def opt_config(**fields):
  config = shakespeare_char.get_config('tiny').opt
  config.update(dict(lr=0.1, min_lr=0.01, warmup_steps=8, weight_decay=0.0, grad_clip=0.0))
  config.update(fields)
  return config


def expected_lr(step, *, lr=0.1, min_lr=0.01, warmup=8, num_steps=NUM_STEPS):
  """Linear warmup from 0, then cosine from lr down to min_lr at num_steps, flat after."""
  if step < warmup:
    return lr * step / warmup
  progress = min(step - warmup, num_steps - warmup) / (num_steps - warmup)
  return min_lr + (lr - min_lr) * 0.5 * (1 + math.cos(math.pi * progress))


@pytest.mark.parametrize('step', [0, 1, 4, 8, 9, 16, 24, 39, 40, 55])
def test_schedule_warms_up_linearly_then_decays_by_cosine_to_min_lr(step):
  schedule = optim.learning_rate_schedule(opt_config(), NUM_STEPS)
  assert float(schedule(step)) == pytest.approx(expected_lr(step), rel=1e-6, abs=1e-9)


def test_schedule_peaks_at_the_end_of_warmup_and_ends_at_min_lr():
  schedule = optim.learning_rate_schedule(opt_config(lr=3e-3, min_lr=3e-4, warmup_steps=10),
                                          80)
  assert float(schedule(0)) == 0.0
  assert float(schedule(10)) == pytest.approx(3e-3)
  assert float(schedule(80)) == pytest.approx(3e-4)
  values = [float(schedule(s)) for s in range(81)]
  assert max(values) == pytest.approx(3e-3)
  assert all(a <= b for a, b in zip(values[:10], values[1:11]))  # rising during warmup
  assert all(a >= b for a, b in zip(values[10:], values[11:]))  # then never rising


def test_a_constant_gradient_moves_each_weight_by_the_scheduled_learning_rate():
  """Adam normalises a constant gradient to its sign, so each update is -lr(step)."""
  tx = optim.make_optimizer(opt_config(), NUM_STEPS)
  params = {'w': jnp.zeros((2, 3)), 'b': jnp.zeros((3,))}
  grads = {'w': jnp.array([[2.0, -1.0, 0.5], [-3.0, 1.0, 4.0]]), 'b': jnp.array([1.0, -2.0, 5.0])}
  opt_state = tx.init(params)
  update = jax.jit(tx.update)
  for step in range(NUM_STEPS + 3):
    updates, opt_state = update(grads, opt_state, params)
    for name in params:
      np.testing.assert_allclose(updates[name], -expected_lr(step) * np.sign(grads[name]),
                                 rtol=1e-5, atol=1e-9, err_msg=f'step {step}, {name}')


def _updates(tx, gradient_sequence):
  params = {'a': jnp.zeros((2,)), 'b': jnp.zeros((1, 1))}
  opt_state = tx.init(params)
  update = jax.jit(tx.update)
  out = []
  for grads in gradient_sequence:
    updates, opt_state = update(grads, opt_state, params)
    out.append(updates)
  return out


def test_clipping_scales_the_whole_gradient_to_the_global_norm_before_adam():
  # Global norm 50, then a small gradient (norm below the clip), then 50 again. Adam's
  # moments remember the large ones unless they are clipped first.
  big = {'a': jnp.array([30.0, 0.0]), 'b': jnp.array([[40.0]])}
  small = {'a': jnp.array([0.3, -0.1]), 'b': jnp.array([[0.2]])}
  sequence = [big, small, big, small, small]
  clipped = _updates(optim.make_optimizer(opt_config(grad_clip=1.0), NUM_STEPS), sequence)
  unclipped = optim.make_optimizer(opt_config(grad_clip=0.0), NUM_STEPS)
  by_hand = _updates(unclipped, [jax.tree.map(lambda g: g / 50.0, big), small,
                                 jax.tree.map(lambda g: g / 50.0, big), small, small])
  raw = _updates(unclipped, sequence)
  for got, want in zip(clipped, by_hand):
    for name in got:
      np.testing.assert_allclose(got[name], want[name], rtol=1e-5, atol=1e-9)
  # Without clipping the large gradients dominate the moments: the last update differs.
  assert not np.allclose(clipped[-1]['a'], raw[-1]['a'], rtol=1e-2)


def test_adamw_minimises_a_quadratic():
  target = {'w': jnp.array([[1.0, -2.0], [0.5, 3.0], [-1.5, 0.25]]), 'b': jnp.array([2.0, -1.0])}

  def loss_fn(params):
    return sum(jnp.sum((p - t) ** 2) for p, t in zip(jax.tree.leaves(params),
                                                       jax.tree.leaves(target)))

  num_steps = 300
  tx = optim.make_optimizer(opt_config(lr=0.1, min_lr=1e-3, warmup_steps=10, grad_clip=1.0),
                            num_steps)

  @jax.jit
  def run(params):
    def step(carry, _):
      params, opt_state = carry
      grads = jax.grad(loss_fn)(params)
      updates, opt_state = tx.update(grads, opt_state, params)
      return (optax.apply_updates(params, updates), opt_state), None

    (params, _), _ = jax.lax.scan(step, (params, tx.init(params)), None, length=num_steps)
    return params

  start = jax.tree.map(jnp.zeros_like, target)
  final = run(start)
  assert float(loss_fn(final)) < 1e-4 * float(loss_fn(start))

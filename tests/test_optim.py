"""lmjax/optim.py: the learning-rate schedule against its formula, the optimizer following
it, clipping by global norm, AdamW minimising a quadratic (weight decay 0 in these), and
which parameters of each model weight decay applies to."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import flax.linen as nn

from configs import rnn_shakespeare_char, shakespeare_char
from lmjax import optim, state as state_lib
from lmjax.models import transformer

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
  params = {'kernel': jnp.zeros((2, 3)), 'bias': jnp.zeros((3,))}
  grads = {'kernel': jnp.array([[2.0, -1.0, 0.5], [-3.0, 1.0, 4.0]]),
           'bias': jnp.array([1.0, -2.0, 5.0])}
  opt_state = tx.init(params)
  update = jax.jit(tx.update)
  for step in range(NUM_STEPS + 3):
    updates, opt_state = update(grads, opt_state, params)
    for name in params:
      np.testing.assert_allclose(updates[name], -expected_lr(step) * np.sign(grads[name]),
                                 rtol=1e-5, atol=1e-9, err_msg=f'step {step}, {name}')


def _updates(tx, gradient_sequence):
  params = {'bias': jnp.zeros((2,)), 'kernel': jnp.zeros((1, 1))}
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
  big = {'bias': jnp.array([30.0, 0.0]), 'kernel': jnp.array([[40.0]])}
  small = {'bias': jnp.array([0.3, -0.1]), 'kernel': jnp.array([[0.2]])}
  sequence = [big, small, big, small, small]
  clipped = _updates(optim.make_optimizer(opt_config(grad_clip=1.0), NUM_STEPS), sequence)
  unclipped = optim.make_optimizer(opt_config(grad_clip=0.0), NUM_STEPS)
  by_hand = _updates(unclipped, [jax.tree.map(lambda g: g / 50.0, big), small,
                                 jax.tree.map(lambda g: g / 50.0, big), small, small])
  raw = _updates(unclipped, sequence)
  for got, want in zip(clipped, by_hand, strict=True):
    for name in got:
      np.testing.assert_allclose(got[name], want[name], rtol=1e-5, atol=1e-9)
  # Without clipping the large gradients dominate the moments: the last update differs.
  assert not np.allclose(clipped[-1]['bias'], raw[-1]['bias'], rtol=1e-2)


def test_adamw_minimises_a_quadratic():
  target = {'kernel': jnp.array([[1.0, -2.0], [0.5, 3.0], [-1.5, 0.25]]),
            'bias': jnp.array([2.0, -1.0])}

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


def _abstract_params(config, vocab_size=20):
  model = state_lib.build_model(config, vocab_size)
  return jax.eval_shape(lambda: nn.meta.unbox(
      model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))['params']))


def _config(family=shakespeare_char, **model):
  config = family.get_config('tiny')
  config.model.update(model)
  return config


TRANSFORMER = ({'embedding', 'position_embed', 'kernel'}, {'bias', 'scale'})
RECURRENT = ({'embedding', 'input_kernel', 'recurrent_kernel', 'output_kernel'},
             {'bias', 'output_bias'})


@pytest.mark.parametrize('config, decayed, not_decayed', [
    (_config(), *TRANSFORMER),
    (_config(scan_layers=True), *TRANSFORMER),  # every parameter one rank up
    (_config(causal=False), *TRANSFORMER),  # the masked-LM encoder
    (_config(lora_rank=4), TRANSFORMER[0] | {'lora_a', 'lora_b'}, TRANSFORMER[1]),
    (_config(rnn_shakespeare_char, name='rnn'), *RECURRENT),
    (_config(rnn_shakespeare_char, name='lstm'), *RECURRENT),
    (_config(rnn_shakespeare_char, name='gru'), RECURRENT[0], RECURRENT[1] | {'recurrent_bias'}),
], ids=['transformer', 'scanned', 'encoder', 'lora', 'rnn', 'lstm', 'gru'])
def test_weight_decay_is_for_embeddings_and_kernels_never_biases_or_norms(config, decayed,
                                                                          not_decayed):
  params = _abstract_params(config)
  mask = optim.decay_mask(params)
  names = {True: set(), False: set()}
  for path, decays in jax.tree_util.tree_flatten_with_path(mask)[0]:
    names[decays].add(path[-1].key)
  assert names == {True: decayed, False: not_decayed}
  # Biases of rank 2 and more exist: an ndim rule would decay them.
  leaves = jax.tree_util.tree_flatten_with_path(params)[0]
  assert max(leaf.ndim for path, leaf in leaves if path[-1].key in not_decayed) >= 2


def test_a_name_nobody_classified_is_refused():
  with pytest.raises(ValueError, match=r"\['layer'\]\['gain'\].*DECAYED or NOT_DECAYED"):
    optim.decay_mask({'layer': {'gain': jnp.ones((2, 2))}})


def test_scanned_layers_and_plain_ones_take_the_same_five_adamw_steps():
  """With weight decay on: the same gradients, stacked for the scanned model, give the
  stacked parameters of the plain model (the gradients themselves are equal, as
  tests/models/test_transformer.py shows)."""
  config = _config()
  config.opt.update(weight_decay=0.5, lr=0.1, warmup_steps=1)
  tx = optim.make_optimizer(config.opt, NUM_STEPS)
  rng = np.random.default_rng(0)
  plain = jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape), x.dtype),
                       _abstract_params(config))
  scanned = transformer.stack_layers(plain)
  plain_state, scanned_state = tx.init(plain), tx.init(scanned)

  @jax.jit  # one program per tree structure, not one per operation and leaf shape
  def step(params, grads, state):
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  for _ in range(5):
    grads = jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape), x.dtype), plain)
    plain, plain_state = step(plain, grads, plain_state)
    scanned, scanned_state = step(scanned, transformer.stack_layers(grads), scanned_state)
  for a, b in zip(jax.tree.leaves(transformer.stack_layers(plain)), jax.tree.leaves(scanned),
                  strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)

"""lmjax/steps.py: one optimizer step on a tiny model and a fixed batch, a step whose loss
is not finite, the evaluation step's sums, and an evaluation of a whole set or its first
batches."""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import authorship, shakespeare_char
from lmjax import optim, state as state_lib, steps
from lmjax.data import pipeline

VOCAB = 16
BATCH, SEQ_LEN = 4, 8


def _random_params(model, seed=0, stddev=0.3):
  """Parameters of the model's shapes drawn by NumPy (compiling the initialisers would
  dominate these tests)."""
  abstract = jax.eval_shape(lambda: nn.meta.unbox(
      model.init(jax.random.key(0), jnp.zeros((1, SEQ_LEN), jnp.int32))['params']))
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda x: jnp.asarray(stddev * rng.normal(size=x.shape), x.dtype),
                      abstract)


def _setup(config):
  config.model.update(num_layers=1, num_heads=2, d_model=16, d_ff=32, max_len=SEQ_LEN)
  config.opt.update(lr=1e-2, warmup_steps=0)  # the first step already moves the weights
  config.train.update(seq_len=SEQ_LEN)
  model = state_lib.build_model(config, VOCAB)
  tx = optim.make_optimizer(config.opt, config.train.num_steps)
  params = _random_params(model)
  state = state_lib.TrainState(step=jnp.zeros((), jnp.int32), params=params,
                               opt_state=tx.init(params))
  train_step = jax.jit(functools.partial(steps.train_step, model=model, tx=tx))
  eval_step = jax.jit(functools.partial(steps.eval_step, model=model))
  return model, state, train_step, eval_step


@pytest.fixture(scope='module')
def lm():
  return _setup(shakespeare_char.get_config('tiny'))


def _batch(seed=0, weights=None):
  tokens = jax.random.randint(jax.random.key(seed), (BATCH, SEQ_LEN + 1), 1, VOCAB)
  batch = {'inputs': tokens[:, :-1], 'targets': tokens[:, 1:]}
  batch['weights'] = jnp.ones((BATCH, SEQ_LEN)) if weights is None else weights
  return batch


def _mean_loss(eval_step, params, batch):
  sums = eval_step(params, batch)
  return float(sums['loss_sum'] / sums['weight_sum'])


def _assert_same(a, b):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_array_equal(x, y)


def test_one_step_lowers_the_loss_of_its_batch_and_reports_it(lm):
  _, state, train_step, eval_step = lm
  batch = _batch()
  before = _mean_loss(eval_step, state.params, batch)
  new_state, metrics = train_step(state, batch, jax.random.key(1))
  assert int(new_state.step) == 1
  assert float(metrics['loss']) == pytest.approx(before, rel=1e-6)  # of the weights before
  assert float(metrics['nonfinite']) == 0.0 and float(metrics['grad_norm']) > 0
  assert 0.0 <= float(metrics['accuracy']) <= 1.0
  after = _mean_loss(eval_step, new_state.params, batch)
  assert after < before - 0.01, (before, after)


def test_several_steps_in_one_call_are_the_steps_one_by_one(lm):
  model, state, train_step, _ = lm
  tx = train_step.__wrapped__.keywords['tx']  # the optimizer of the one-step function
  batches = [_batch(seed) for seed in range(3)]
  rng = jax.random.key(1)
  several = jax.jit(functools.partial(steps.train_steps, model=model, tx=tx))
  got, metrics = several(state, jax.tree.map(lambda *x: jnp.stack(x), *batches), rng)
  expected = state
  for i, batch in enumerate(batches):
    expected, step_metrics = train_step(expected, batch, rng)
    for name, value in step_metrics.items():
      np.testing.assert_allclose(metrics[name][i], value, rtol=1e-6, err_msg=name)
  assert int(got.step) == 3
  # The loop is compiled as its own program, so its sums may round differently; Adam's
  # division by the root of small second moments lifts that to about 1e-4 here, against
  # updates of about the learning rate (1e-2).
  for x, y in zip(jax.tree.leaves((got.params, got.opt_state)),
                  jax.tree.leaves((expected.params, expected.opt_state)), strict=True):
    np.testing.assert_allclose(x, y, rtol=1e-3, atol=5e-4)


def test_a_nonfinite_loss_leaves_the_weights_and_optimizer_alone_and_is_reported(lm):
  _, state, train_step, _ = lm
  batch = _batch()
  # An infinite embedding for a token the batch holds: its logits, loss and gradient are
  # not finite.
  token = int(batch['inputs'][0, 0])
  embedding = state.params['token_embed']['embedding']
  poisoned = state.replace(params={**state.params, 'token_embed': {
      'embedding': embedding.at[token].set(jnp.inf)}})
  new_state, metrics = train_step(poisoned, batch, jax.random.key(1))
  assert not np.isfinite(float(metrics['loss']))
  assert float(metrics['nonfinite']) == 1.0
  assert int(new_state.step) == 1  # the step counts
  _assert_same(new_state.params, poisoned.params)
  _assert_same(new_state.opt_state, poisoned.opt_state)


def test_tokens_of_weight_zero_change_neither_the_loss_nor_the_update(lm):
  _, state, train_step, _ = lm
  weights = jnp.ones((BATCH, SEQ_LEN)).at[1].set(0.0).at[3, 4:].set(0.0)
  batch = _batch(weights=weights)
  other = dict(batch)  # other tokens where the weights are 0
  garbage = _batch(seed=9)
  other['targets'] = jnp.where(weights > 0, batch['targets'], garbage['targets'])
  other['inputs'] = batch['inputs'].at[1].set(garbage['inputs'][1])
  a, metrics_a = train_step(state, batch, jax.random.key(1))
  b, metrics_b = train_step(state, other, jax.random.key(1))
  assert float(metrics_a['loss']) == pytest.approx(float(metrics_b['loss']), rel=1e-6)
  for x, y in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params), strict=True):
    np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-7)


def test_eval_step_sums_the_weighted_loss_so_batches_add_up(lm):
  model, state, _, eval_step = lm
  weights = jnp.ones((BATCH, SEQ_LEN)).at[2:, 5:].set(0.0)  # padding at the end of two rows
  batch = _batch(seed=3, weights=weights)
  sums = jax.device_get(eval_step(state.params, batch))
  assert float(sums['weight_sum']) == BATCH * SEQ_LEN - 2 * 3
  # The loss sum by hand: -log p(target) from the model's logits, over weighted tokens.
  logits = np.asarray(jax.jit(model.apply)({'params': state.params}, batch['inputs']),
                      np.float64)
  log_probs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  nll = -np.take_along_axis(log_probs, np.asarray(batch['targets'])[..., None], -1)[..., 0]
  assert float(sums['loss_sum']) == pytest.approx(float((nll * weights).sum()), rel=1e-5)
  correct = (logits.argmax(-1) == np.asarray(batch['targets'])) * np.asarray(weights)
  assert float(sums['correct_sum']) == correct.sum()
  # The sums of two halves of the batch (the other half weighted 0) add up to the whole.
  first = jnp.arange(BATCH)[:, None] < 2
  halves = [jax.device_get(eval_step(state.params, {**batch, 'weights': weights * part}))
            for part in (first, ~first)]
  for key in sums:
    assert float(sums[key]) == pytest.approx(float(halves[0][key] + halves[1][key]), rel=1e-6)


def test_evaluation_reads_the_whole_set_or_its_first_batches(lm):
  _, state, _, eval_step = lm
  tokens = np.asarray(jax.random.randint(jax.random.key(5), (5 * BATCH * SEQ_LEN + 1,), 1,
                                         VOCAB))
  evals = pipeline.eval_set(tokens, seq_len=SEQ_LEN, batch_size=BATCH)
  assert evals.num_batches == 5
  first_two = pipeline.EvalSet({k: v[:2 * BATCH] for k, v in evals.arrays.items()}, BATCH)
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  whole = steps.evaluate(eval_step, state.params, evals, device, False)
  capped = steps.evaluate(eval_step, state.params, evals, device, False, max_batches=2)
  assert capped == steps.evaluate(eval_step, state.params, first_two, device, False)
  assert capped['loss'] != whole['loss']
  assert steps.evaluate(eval_step, state.params, evals, device, False, max_batches=9) == whole


def test_a_classifier_step_scores_one_label_per_passage_and_lowers_its_loss():
  _, state, train_step, _ = _setup(authorship.get_config('tiny'))
  inputs = jax.random.randint(jax.random.key(4), (BATCH, SEQ_LEN), 1, VOCAB)
  mask = jnp.arange(SEQ_LEN)[None] < jnp.array([[8], [5], [3], [8]])  # right-padded rows
  batch = {'inputs': jnp.where(mask, inputs, 0), 'mask': mask,
           'labels': jnp.array([0, 1, 1, 0]), 'weights': jnp.array([1.0, 1.0, 1.0, 0.0])}
  first_state, first = train_step(state, batch, jax.random.key(1))
  # Accuracy over the 3 passages of weight 1.
  assert float(first['loss']) > 0 and round(3 * float(first['accuracy']), 4) in (0, 1, 2, 3)
  # What the padding holds and the label of a passage of weight 0 change nothing.
  other = {**batch, 'inputs': jnp.where(mask, batch['inputs'], 7),
           'labels': batch['labels'].at[3].set(1)}
  other = {**other, 'inputs': other['inputs'].at[3].set(5)}
  other_state, other_first = train_step(state, other, jax.random.key(1))
  assert float(other_first['loss']) == pytest.approx(float(first['loss']), rel=1e-6)
  for x, y in zip(jax.tree.leaves(first_state.params), jax.tree.leaves(other_state.params),
                  strict=True):
    np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-7)
  _, second = train_step(first_state, batch, jax.random.key(1))
  assert float(second['loss']) < float(first['loss'])

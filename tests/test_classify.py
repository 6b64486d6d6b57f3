"""Sequence classification: the heads, the metrics, and a language model fine-tuned into
an author classifier on the real `authorship` dataset."""
import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import authorship, shakespeare_char
from lmjax import evaluation, events, finetune, generation, losses, state as state_lib, tasks, train
from lmjax import workdir as workdir_lib
from lmjax.data import corpora
from lmjax.errors import UserError
from lmjax.models import rnn, transformer


def test_metrics_match_a_hand_computation():
  # Rows: true class; columns: predicted. 'c' is never predicted and never true.
  confusion = [[5, 2, 0], [1, 3, 0], [0, 0, 0]]
  got = losses.classification_metrics(confusion, ('a', 'b', 'c'))
  p_a, p_b = 5 / 6, 3 / 5
  r_a, r_b = 5 / 7, 3 / 4
  f1_a, f1_b = 2 * p_a * r_a / (p_a + r_a), 2 * p_b * r_b / (p_b + r_b)
  want = {'accuracy': 8 / 11,
          'precision/a': p_a, 'precision/b': p_b, 'precision/c': 0.0,
          'precision_macro': (p_a + p_b) / 3,
          'recall/a': r_a, 'recall/b': r_b, 'recall/c': 0.0, 'recall_macro': (r_a + r_b) / 3,
          'f1/a': f1_a, 'f1/b': f1_b, 'f1/c': 0.0, 'f1_macro': (f1_a + f1_b) / 3}
  assert got.keys() == want.keys()
  for k in want:
    assert got[k] == pytest.approx(want[k], abs=1e-12), k


def test_confusion_counts_weighted_rows_by_true_and_predicted_class():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(40, 3)).astype(np.float32)
  labels = rng.integers(0, 3, 40)
  weights = (rng.random(40) < 0.7).astype(np.float32)  # 0: a padding row
  sums = jax.device_get(losses.classification_sums(jnp.asarray(logits), jnp.asarray(labels),
                                                   jnp.asarray(weights)))
  by_hand = np.zeros((3, 3))
  for true, predicted, w in zip(labels, logits.argmax(-1), weights):
    by_hand[true, predicted] += w
  np.testing.assert_array_equal(sums['confusion'], by_hand)
  assert sums['weight_sum'] == weights.sum()
  assert sums['correct_sum'] == np.trace(by_hand)


def test_balanced_weights_give_each_class_the_same_total():
  labels = np.array([0, 2, 0, 0, 2, 0])  # class 1 is absent
  counts = np.bincount(labels, minlength=3)
  weights = tasks.balanced_weights(labels, counts)
  assert weights.mean() == pytest.approx(1.0)
  assert weights[labels == 0].sum() == pytest.approx(weights[labels == 2].sum())
  np.testing.assert_allclose(weights, [0.75, 1.5, 0.75, 0.75, 1.5, 0.75])


@pytest.mark.parametrize('family', ['transformer', 'lstm'])
def test_the_head_reads_the_last_real_position_and_ignores_padding(family):
  if family == 'transformer':
    model = transformer.Transformer(vocab_size=30, num_layers=2, num_heads=2, d_model=16,
                                    d_ff=32, max_len=10, num_classes=3)
  else:
    model = rnn.RecurrentLM(vocab_size=30, cell='lstm', num_layers=2, d_model=8,
                            hidden_size=16, tie_embeddings=False, num_classes=3)
  ids = jnp.asarray(np.random.default_rng(1).integers(1, 30, (3, 10)), jnp.int32)
  params = nn.meta.unbox(model.init(jax.random.key(0), ids)['params'])
  assert set(params['classifier']) == {'kernel', 'bias'}
  assert not {'output_kernel', 'output_bias'} & set(params)  # no language-model output
  lengths = np.array([4, 10, 7])
  mask = jnp.arange(10)[None] < lengths[:, None]
  apply = jax.jit(model.apply)  # eager, every op would compile on its own
  logits = apply({'params': params}, ids, mask_BxT=mask)
  assert logits.shape == (3, 3) and logits.dtype == jnp.float32
  other_padding = jnp.where(mask, ids, 5)
  np.testing.assert_array_equal(apply({'params': params}, other_padding, mask_BxT=mask),
                                logits)
  alone = apply({'params': params}, ids[:1, :4])  # row 0 without its padding
  np.testing.assert_allclose(alone[0], logits[0], rtol=1e-5, atol=1e-6)


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
  """A tiny Shakespeare language model (10 steps, 1 device), fine-tuned into an author
  classifier (30 steps, 1 device)."""
  root = tmp_path_factory.mktemp('authorship')
  base, tuned = str(root / 'base'), str(root / 'tuned')
  lm = shakespeare_char.get_config('tiny')
  lm.train.update(num_steps=10, eval_every=10, checkpoint_every=10, sample_tokens=0)
  lm.opt.warmup_steps = 2
  train.train_and_evaluate(lm, base, devices=jax.devices()[:1])
  config = authorship.get_config('tiny')
  config.init_from.workdir = base
  train.train_and_evaluate(config, tuned)
  return base, tuned, config


def test_a_language_model_becomes_a_classifier_with_all_but_its_head(runs):
  base, _, config = runs
  _, _, base_params, _ = workdir_lib.load_trained(base)
  model = state_lib.build_model(config, len(base_params['token_embed']['embedding']))
  abstract = jax.eval_shape(lambda: nn.meta.unbox(
      model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))['params']))
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device),
                          abstract)
  loaded, _ = finetune.load_base_params(config, base, abstract, device)
  want = finetune._flat(jax.device_get(base_params))
  got = finetune._flat(jax.device_get(loaded))
  assert set(got) == set(want)  # the head is not among them: it starts fresh
  for name in want:
    np.testing.assert_array_equal(got[name], want[name], err_msg=name)


def test_metrics_reach_tensorboard_result_json_and_evaluate(runs):
  _, tuned, _ = runs
  with open(os.path.join(tuned, workdir_lib.RESULT_FILE)) as f:
    final = json.load(f)['eval']
  assert final['classes'] == list(corpora.class_names('authorship'))
  confusion = np.array(final['confusion_matrix'])
  validation = corpora.load_split_passages('authorship', 'validation')
  assert confusion.sum() == len(validation)
  # Rows are the true classes: they count the split's passages of each author.
  np.testing.assert_array_equal(confusion.sum(axis=1),
                                np.bincount([p[3] for p in validation], minlength=2))
  assert final['accuracy'] == pytest.approx(np.trace(confusion) / confusion.sum())
  scalars = events.read_scalars(tuned)
  for tag in ('eval/loss', 'eval/accuracy', 'eval/f1_macro', 'eval/precision/milton',
              'eval/recall/shakespeare', 'train/loss'):
    assert tag in scalars, tag
  assert scalars['eval/f1_macro'][30] == pytest.approx(final['f1_macro'], rel=1e-6)

  # The run's last evaluation again, on one device.
  again = evaluation.evaluate_workdir(tuned, 'validation', devices=jax.devices()[:1])
  assert again['confusion_matrix'] == final['confusion_matrix']
  assert again['loss'] == pytest.approx(final['loss'], rel=1e-5)
  test = evaluation.evaluate_workdir(tuned, 'test', batch_size=40)
  assert test['num_examples'] == len(corpora.load_split_passages('authorship', 'test'))
  assert np.sum(test['confusion_matrix']) == test['num_examples']


def test_a_classifier_generates_no_text(runs):
  _, tuned, _ = runs
  config, tokenizer, params, _ = workdir_lib.load_trained(tuned)
  with pytest.raises(UserError, match='classifier.*evaluate.py'):
    generation.generate_texts(config, params, tokenizer, ['To be'], max_new_tokens=4)

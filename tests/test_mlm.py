"""Masked-LM pretraining: BERT's corruption, the bidirectional encoder, a run end to end."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import shakespeare_char
from lmjax import evaluation, generation, train, workdir as workdir_lib
from lmjax.data import pipeline
from lmjax.data.tfdata import tf
from lmjax.errors import UserError
from lmjax.models import transformer


def test_masking_selects_15_percent_then_masks_80_randomizes_10_keeps_10():
  masking = pipeline.Masking(rate=0.15, mask_id=50, vocab_size=50)
  tokens = np.random.default_rng(0).integers(0, 50, (400, 500)).astype(np.int32)
  inputs, weights = masking.apply(tf.constant(tokens), tf.constant([3, 7], tf.int64))
  inputs, selected = inputs.numpy(), weights.numpy() > 0
  n = selected.sum()
  assert n / tokens.size == pytest.approx(0.15, abs=0.003)  # 200,000 draws: sd 0.0008
  np.testing.assert_array_equal(inputs[~selected], tokens[~selected])  # the rest untouched
  masked = inputs[selected] == 50
  changed = ~masked & (inputs[selected] != tokens[selected])
  kept = inputs[selected] == tokens[selected]
  assert masked.mean() == pytest.approx(0.8, abs=0.01)
  # A random replacement is the original token 1 time in 50, and then counts as kept.
  assert changed.mean() == pytest.approx(0.1 * 49 / 50, abs=0.006)
  assert kept.mean() == pytest.approx(0.1 + 0.1 / 50, abs=0.006)
  assert inputs.max() <= 50 and inputs.min() >= 0
  again, _ = masking.apply(tf.constant(tokens), tf.constant([3, 7], tf.int64))
  np.testing.assert_array_equal(again.numpy(), inputs)
  other, _ = masking.apply(tf.constant(tokens), tf.constant([3, 8], tf.int64))
  assert (other.numpy() != inputs).any()


def test_masked_batches_resume_exactly_and_keep_the_true_tokens_as_targets():
  tokens = np.random.default_rng(1).integers(1, 30, 5000).astype(np.int32)
  masking = pipeline.Masking(rate=0.15, mask_id=30, vocab_size=30)

  def batches(start, count):
    ds = pipeline.train_dataset(tokens, seq_len=16, global_batch=8, seed=4,
                                start_example=start, masking=masking)
    return [b for _, b in zip(range(count), ds.as_numpy_iterator())]

  whole = batches(0, 6)
  resumed = batches(3 * 8, 3)
  for a, b in zip(whole[3:], resumed, strict=True):
    for k in ('inputs', 'targets', 'weights'):
      np.testing.assert_array_equal(a[k], b[k])
  unmasked = batches(0, 1)[0]['targets']
  plain = pipeline.train_dataset(tokens, seq_len=16, global_batch=8, seed=4)
  # The same windows as next-token training reads, without their last target.
  np.testing.assert_array_equal(unmasked, next(plain.as_numpy_iterator())['inputs'])
  assert (whole[0]['inputs'] != whole[0]['targets']).any()
  assert (whole[0]['weights'] != whole[1]['weights']).any()  # a new draw every batch


def test_the_encoder_sees_both_ways_and_ignores_padding():
  model = transformer.Transformer(vocab_size=30, num_layers=2, num_heads=2, d_model=16,
                                  d_ff=32, max_len=8, causal=False)
  ids = jnp.asarray(np.random.default_rng(2).integers(1, 30, (2, 8)), jnp.int32)
  params = nn.meta.unbox(model.init(jax.random.key(0), ids)['params'])

  apply = jax.jit(model.apply)
  # Position 0 changes with the last token: a causal model's would not.
  changed = apply({'params': params}, ids.at[:, -1].set(ids[:, -1] % 29 + 1))
  assert not np.allclose(changed[:, 0], apply({'params': params}, ids)[:, 0])
  mask = jnp.arange(8)[None] < jnp.array([[5], [8]])
  padded = apply({'params': params}, ids, mask_BxT=mask)
  repadded = apply({'params': params}, jnp.where(mask, ids, 7), mask_BxT=mask)
  np.testing.assert_allclose(padded[0, :5], repadded[0, :5], rtol=1e-5, atol=1e-6)
  with pytest.raises(UserError, match='cannot decode'):
    transformer.Transformer(vocab_size=30, num_layers=1, num_heads=2, d_model=16, d_ff=32,
                            max_len=8, causal=False, decode=True)


def test_a_masked_lm_trains_and_evaluate_reproduces_its_last_evaluation(tmp_path):
  config = shakespeare_char.get_config('tiny')
  config.model.causal = False
  # The whole split, as evaluate_workdir scores it.
  config.train.update(num_steps=12, eval_every=12, checkpoint_every=12, eval_batches=0)
  config.opt.warmup_steps = 2
  workdir = str(tmp_path)
  logged = train.train_and_evaluate(config, workdir, devices=jax.devices()[:1])
  assert 'bits_per_char' not in logged  # not comparable with a left-to-right model's
  again = evaluation.evaluate_workdir(workdir, 'validation', devices=jax.devices()[:2])
  assert again['loss'] == pytest.approx(logged['loss'], rel=1e-5)
  assert again['accuracy'] == pytest.approx(logged['accuracy'], rel=1e-6)
  # About 15% of the validation split's characters are scored.
  assert 0.14 < again['num_tokens'] / 245000 < 0.16
  config, tokenizer, params, _ = workdir_lib.load_trained(workdir)
  assert params['token_embed']['embedding'].shape[0] == tokenizer.vocab_size + 1  # the mask
  with pytest.raises(UserError, match='encoder'):
    generation.generate_texts(config, params, tokenizer, ['To be'], max_new_tokens=4)

"""lmjax/generation.py: prompts continued by a tiny randomly initialised character model
with a real tokenizer; what comes back, where it stops, and what is refused."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import authorship, rnn_shakespeare_char, shakespeare_char
from lmjax import decode, generation, state as state_lib
from lmjax.data import tokenizers
from lmjax.errors import UserError

MAX_LEN = 24
NEW = 12
SEED = 9  # weights whose greedy continuations of the prompts below vary and have no EOS


def tiny_config():
  config = shakespeare_char.get_config('tiny')
  config.model.update(num_layers=1, num_heads=2, d_model=16, d_ff=32, max_len=MAX_LEN)
  return config


@pytest.fixture(scope='module')
def tokenizer():
  return tokenizers.CharTokenizer.train(['abcdefgh '])  # 9 characters and EOS


@pytest.fixture(scope='module')
def params(tokenizer):
  """Random weights of stddev 0.5, drawn by NumPy: GPT-2's init is so flat that every logit
  ties, and compiling the initialisers would dominate these tests."""
  model = state_lib.build_model(tiny_config(), tokenizer.vocab_size)
  abstract = jax.eval_shape(lambda: nn.meta.unbox(
      model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))['params']))
  rng = np.random.default_rng(SEED)
  return jax.tree.map(lambda x: (0.5 * rng.normal(size=x.shape)).astype(x.dtype), abstract)


@pytest.fixture(scope='module')
def greedy(tokenizer, params):
  """The greedy continuations of two prompts, NEW tokens each."""
  results = generation.generate_texts(tiny_config(), params, tokenizer, ['abc', 'h'],
                                      max_new_tokens=NEW, strategy='greedy')
  # What the tests below take for granted about these weights: no EOS, several characters.
  assert all(row['finish'] == 'length' for (row,) in results), results
  assert len(set(results[0][0]['text'])) >= 3, results
  return results


def test_the_context_is_the_position_table_or_unbounded_for_a_recurrent_model():
  assert generation.context_length(tiny_config()) == MAX_LEN
  assert generation.context_length(rnn_shakespeare_char.get_config('tiny')) is None


def test_the_evaluation_sample_is_as_long_as_asked_whatever_the_context(tokenizer, params):
  """An evaluation's sample of 60 tokens from a model of MAX_LEN positions: all of them."""
  config = tiny_config()
  config.train.update(sample_prompt='abc', sample_tokens=60)
  sample = generation.sample_text(config, params, tokenizer)
  assert sample.startswith('abc') and len(sample) == len('abc') + 60


def test_each_prompt_gets_its_continuation_with_tokens_score_and_finish(tokenizer, greedy):
  assert len(greedy) == 2
  for (row,) in greedy:
    assert set(row) == {'text', 'tokens', 'score', 'finish'}
    assert len(row['tokens']) == NEW and len(row['text']) == NEW  # the new text only
    assert tokenizer.decode(row['tokens']) == row['text']
    assert isinstance(row['score'], float) and row['score'] < 0  # a log-probability


# The calls below share the greedy fixture's shapes (2 prompts, a 16-token buffer), so that
# the decode loop compiles once for them.


def test_fewer_new_tokens_give_the_start_of_the_same_greedy_text(tokenizer, params, greedy):
  shorter = generation.generate_texts(tiny_config(), params, tokenizer, ['abc', 'h'],
                                      max_new_tokens=NEW - 2, strategy='greedy')
  for (row,), (whole,) in zip(shorter, greedy, strict=True):
    assert row['tokens'] == whole['tokens'][:NEW - 2] and row['finish'] == 'length'


def test_a_stop_string_cuts_the_text_before_it(tokenizer, params, greedy):
  text, other = greedy[0][0]['text'], greedy[1][0]['text']
  stops = (text[8:11], text[4:6])
  # Of two stop strings, the one reached first cuts.
  (row, *_), _ = generation.generate_texts(tiny_config(), params, tokenizer, ['abc', 'h'],
                                           max_new_tokens=NEW, strategy='greedy',
                                           stop_strings=stops)
  assert row['text'] == text[:min(text.find(stop) for stop in stops)] and len(row['text']) <= 4
  assert row['finish'] == 'stop'
  never = ('hhh', 'ggg')
  assert not any(stop in text + other for stop in never)
  results = generation.generate_texts(tiny_config(), params, tokenizer, ['abc', 'h'],
                                      max_new_tokens=NEW, strategy='greedy', stop_strings=never)
  assert results == greedy


def test_after_eos_continues_the_prompt_as_a_document_after_the_end_of_text_id(
    tokenizer, params):
  """What a language model of documents saw in training: the end-of-text id, then the
  document. `after_eos` puts it before each prompt, as the text itself cannot."""
  (after, *_), _ = generation.generate_texts(tiny_config(), params, tokenizer, ['abc', 'h'],
                                             max_new_tokens=NEW, strategy='greedy',
                                             after_eos=True)
  logits_fn, state = generation.decoder_fns(tiny_config(), params, tokenizer.vocab_size)(
      batch_size=1, cache_len=MAX_LEN)
  ids = np.concatenate([[tokenizer.eos_id], tokenizer.encode('abc')]).astype(np.int32)
  expected = decode.generate(logits_fn, state, [ids],
                             max_new_tokens=NEW, eos_id=tokenizer.eos_id, max_len=MAX_LEN,
                             strategy='greedy')[0][0]
  assert after['tokens'] == expected.tokens.tolist()


def test_samples_are_as_many_as_asked_and_repeat_under_a_seed(tokenizer, params):
  def sample(seed):
    return generation.generate_texts(tiny_config(), params, tokenizer, ['abc', 'h'],
                                     max_new_tokens=NEW, strategy='sample', num_samples=3,
                                     temperature=1.0, seed=seed)

  first = sample(0)
  assert [len(rows) for rows in first] == [3, 3]
  assert all(len(row['tokens']) <= NEW for rows in first for row in rows)
  assert sample(0) == first


def test_an_empty_prompt_or_stop_string_is_refused_naming_it(tokenizer, params):
  with pytest.raises(UserError, match='prompt 2 is empty; give some text to continue'):
    generation.generate_texts(tiny_config(), params, tokenizer, ['abc', ''], max_new_tokens=4)
  with pytest.raises(UserError, match='a stop string is empty'):
    generation.generate_texts(tiny_config(), params, tokenizer, ['abc'], max_new_tokens=4,
                              stop_strings=('a', ''))


def test_a_classifier_or_an_encoder_is_refused_as_a_generator(tokenizer, params):
  with pytest.raises(UserError, match=r"this run is a classifier \(data.name='authorship'\)"):
    generation.generate_texts(authorship.get_config('tiny'), params, tokenizer, ['abc'],
                              max_new_tokens=4)
  encoder = tiny_config()
  encoder.model.causal = False
  with pytest.raises(UserError, match=r'bidirectional encoder \(model.causal=False\)'):
    generation.generate_texts(encoder, params, tokenizer, ['abc'], max_new_tokens=4)

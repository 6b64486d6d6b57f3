"""Tokenizers on the real corpus: exact round trips, clear errors, save/load."""
import json

import jax.numpy as jnp
import numpy as np
import pytest

from lmjax.data import corpora, tokenizers

# Small enough to train in about a second, large enough for byte fallback (256
# pieces) plus the corpus's characters plus merges.
SPM_VOCAB = 512


@pytest.fixture(scope='module')
def train_texts():
  return [text for _, text in corpora.load_split_texts('shakespeare', 'train')]


@pytest.fixture(scope='module')
def validation():
  return dict(corpora.load_split_texts('shakespeare', 'validation'))


@pytest.fixture(scope='module')
def char_tokenizer(train_texts):
  return tokenizers.CharTokenizer.train(train_texts)


@pytest.fixture(scope='module', params=['bpe', 'unigram'])
def spm_tokenizer(request, train_texts):
  # A subset of the training split keeps training quick.
  return tokenizers.SentencePieceTokenizer.train(train_texts[:6], SPM_VOCAB, request.param)


# Whitespace SentencePiece loses unless told not to: newlines, runs of spaces,
# leading spaces, trailing spaces, blank lines; and characters never seen in
# training, which byte fallback must carry.
TRICKY = ['  two leading spaces', 'a  b   c', '\n\nstarts with newlines', 'ends with space ',
          'x\n\n\n   indented\n', ' ', '\n', 'caf\u00e9 \u2603 \U0001F600 \t tab']


def test_char_vocabulary(char_tokenizer, train_texts):
  chars = set(''.join(train_texts))
  assert char_tokenizer.vocab_size == len(chars) + 1
  assert char_tokenizer.eos_id == 0
  assert char_tokenizer.kind == 'char'


def test_char_round_trip_on_a_validation_work(char_tokenizer, validation):
  text = validation['julius_caesar']
  ids = char_tokenizer.encode(text)
  assert ids.dtype == np.int32 and ids.shape == (len(text),)
  assert ids.min() >= 1  # 0 is eos, never a character
  assert char_tokenizer.decode(ids) == text


def test_char_decode_accepts_lists_and_arrays_and_skips_eos(char_tokenizer):
  ids = char_tokenizer.encode('To be, or not to be')
  eos = char_tokenizer.eos_id
  with_eos = np.concatenate([ids[:5], [eos], ids[5:], [eos]])
  for form in (with_eos, with_eos.tolist(), jnp.asarray(with_eos)):
    assert char_tokenizer.decode(form) == 'To be, or not to be'
  assert char_tokenizer.decode([]) == ''
  with pytest.raises(ValueError, match='outside the vocabulary'):
    char_tokenizer.decode([char_tokenizer.vocab_size])


def test_char_unknown_characters_are_named(char_tokenizer):
  with pytest.raises(ValueError) as error:
    char_tokenizer.encode('O Romeo, \u2603 Romeo! caf\u00e9')
  message = str(error.value)
  assert "'\u2603'" in message and "'\u00e9'" in message
  assert "'R'" not in message
  assert 'training split' in message


def test_char_save_load(char_tokenizer, validation, tmp_path):
  char_tokenizer.save(tmp_path)
  assert json.loads((tmp_path / 'tokenizer.json').read_text())['kind'] == 'char'
  loaded = tokenizers.load_tokenizer(tmp_path)
  assert isinstance(loaded, tokenizers.CharTokenizer)
  text = validation['twelfth_night']
  np.testing.assert_array_equal(loaded.encode(text), char_tokenizer.encode(text))
  assert loaded.vocab_size == char_tokenizer.vocab_size


def test_load_without_tokenizer_says_so(tmp_path):
  with pytest.raises(FileNotFoundError, match='No tokenizer in .*train first'):
    tokenizers.load_tokenizer(tmp_path)


def test_spm_round_trips_real_text_exactly(spm_tokenizer, validation):
  assert spm_tokenizer.vocab_size == SPM_VOCAB
  for title, text in validation.items():
    ids = spm_tokenizer.encode(text)
    assert ids.dtype == np.int32 and ids.ndim == 1
    assert len(ids) < len(text) * 0.8, f'{title}: pieces barely longer than characters'
    assert spm_tokenizer.decode(ids) == text, title
  # The real text has what the round trip must keep.
  twelfth_night = validation['twelfth_night']
  assert '  ' in twelfth_night and '\n ' in twelfth_night and '\n\n' in twelfth_night


@pytest.mark.parametrize('text', TRICKY)
def test_spm_round_trips_whitespace_and_unseen_characters(spm_tokenizer, text):
  assert spm_tokenizer.decode(spm_tokenizer.encode(text)) == text


def test_spm_eos_decodes_to_nothing(spm_tokenizer):
  ids = spm_tokenizer.encode('Good night, sweet prince')
  eos = spm_tokenizer.eos_id
  with_eos = np.concatenate([ids, [eos], ids])
  assert spm_tokenizer.decode(jnp.asarray(with_eos)) == 'Good night, sweet prince' * 2
  assert eos not in ids


def test_spm_save_load(spm_tokenizer, validation, tmp_path):
  spm_tokenizer.save(tmp_path)
  assert (tmp_path / 'tokenizer.model').exists()
  loaded = tokenizers.load_tokenizer(tmp_path)
  assert isinstance(loaded, tokenizers.SentencePieceTokenizer)
  assert (loaded.vocab_size, loaded.eos_id) == (spm_tokenizer.vocab_size, spm_tokenizer.eos_id)
  text = validation['julius_caesar']
  np.testing.assert_array_equal(loaded.encode(text), spm_tokenizer.encode(text))


@pytest.mark.parametrize('model_type', ['bpe', 'unigram'])
def test_spm_training_is_deterministic(train_texts, model_type):
  first, second = (tokenizers.SentencePieceTokenizer.train(train_texts[6:9], SPM_VOCAB, model_type)
                   for _ in range(2))
  assert first.model_proto == second.model_proto


def test_spm_vocab_too_large_names_the_config_field(validation):
  with pytest.raises(ValueError, match=r'data\.vocab_size=50000 is too large.*at most \d+'):
    tokenizers.SentencePieceTokenizer.train([validation['lovers_complaint']], 50000)
  with pytest.raises(ValueError, match=r'data\.vocab_size=100 is too small'):
    tokenizers.SentencePieceTokenizer.train([validation['lovers_complaint']], 100)


def test_build_tokenizer_trains_once_then_reuses(validation, tmp_path):
  calls = []

  def texts():
    calls.append(1)
    return [validation['julius_caesar']]

  first = tokenizers.build_tokenizer('sentencepiece', str(tmp_path), texts, vocab_size=400)
  assert len(calls) == 1 and (tmp_path / 'tokenizer.json').exists()

  def must_not_train():
    raise AssertionError('build_tokenizer trained again instead of reusing the directory')

  again = tokenizers.build_tokenizer('sentencepiece', str(tmp_path), must_not_train,
                                     vocab_size=400)
  assert again.model_proto == first.model_proto

  with pytest.raises(ValueError, match=r"data\.tokenizer='char'.*" + str(tmp_path)):
    tokenizers.build_tokenizer('char', str(tmp_path), must_not_train)
  with pytest.raises(ValueError, match=r'data\.vocab_size=800'):
    tokenizers.build_tokenizer('sentencepiece', str(tmp_path), must_not_train, vocab_size=800)


def test_build_tokenizer_char_and_unknown_kind(validation, tmp_path):
  tokenizer = tokenizers.build_tokenizer('char', str(tmp_path),
                                         lambda: [validation['julius_caesar']])
  assert tokenizers.load_tokenizer(tmp_path).vocab_size == tokenizer.vocab_size
  with pytest.raises(ValueError, match=r"data\.tokenizer='bytes'.*'char', 'sentencepiece'"):
    tokenizers.build_tokenizer('bytes', str(tmp_path / 'other'), lambda: [])
